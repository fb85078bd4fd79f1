"""The GPU plan of a run: which actor goes on which GPU and what each GPU must hold, worked out
before Ray, vLLM or DeepSpeed start (`check_run` stops a GPU run whose plan does not fit;
`python -m marl_llm.preflight` prints it).

Placement follows what `marl_llm.cluster.Cluster.build_policies` asks Ray for, in its order: LoRA
policies on one base model (vLLM backend) share one set of rollout workers, every other policy
has `rollout.num_workers` of its own, each asking for `rollout_gpus(...)` GPUs; a trainable
policy then gets `learner.num_ranks` ranks of `learner_gpus(...)` GPUs (frozen ones none). GPUs
are handed out as Ray packs them on nodes of `cluster.gpus_per_node`: a whole-number request
takes that many free devices of one node, a fraction the first device with room (colocated).

Memory of a device is the sum over its actors, each an estimate:
- rollout worker (vLLM): `rollout.gpu_memory_utilization` of each of its devices, which must
  hold its share of the model's weights with room left for a KV cache;
- learner rank: the model states (16-bit weights, fp32 master weights, gradients, Adam moments)
  as DeepSpeed's own estimator gives them for the ZeRO stage, rank count and optimiser offload;
  a LoRA policy's frozen base and a frozen reference copy; the activations of the largest
  micro-batch (`activation_gb`, a rough formula); a CUDA context.
Model sizes come from the model's config.json (a local folder or the Hub cache) or from
`KNOWN_MODELS`: no weights are loaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from marl_llm.cluster import learner_gpus, rollout_gpus
from marl_llm.config import ClusterConfig, LearnerConfig, LoraConfig, ModelConfig, RunConfig
from marl_llm.models import TINY_DEFAULTS
from marl_llm.policy import PolicySpec
from marl_llm.preflight import DTYPE_BYTES, GB, LOGIT_COPIES, PreflightError, is_local_path

# the cluster `python -m marl_llm.preflight` plans for when none is described or detected: one
# node of 8 x 80 GB GPUs (A100/H100 80GB), what the paper presets (conf/experiment/*_paper.yaml)
# are sized for
DEFAULT_GPUS_PER_NODE, DEFAULT_GPU_MEMORY_GB = 8, 80.0
# activations a transformer layer keeps for its backward, in bytes per token and hidden unit, in
# bf16 (learner.bf16=auto trains in it on GPUs): 34, from Korthikanti et al. 2022 ("Reducing
# Activation Recomputation in Large Transformer Models", eq. 1) without the attention-score term
# flash attention / SDPA do not store. Rough: SwiGLU's wider MLP keeps somewhat more.
LAYER_ACTIVATION_BYTES = 34
# with gradient checkpointing a layer keeps only its bf16 input; one layer's activations exist
# again while it is recomputed in the backward
CHECKPOINTED_LAYER_BYTES = 2
# a learner process's CUDA context, cuBLAS workspaces and NCCL buffers (~0.5-1 GiB in PyTorch;
# not measured here: the project's machines have no GPU)
CUDA_CONTEXT_GB = 1.0
# the settings that lower an actor's estimate, as the error names them
LEARNER_KNOBS = ("more learner.num_ranks", "learner.zero_stage=3", "learner.offload_optimizer=true",
                 "learner.gradient_checkpointing=true",
                 "a smaller learner.micro_batch_size or learner.micro_batch_tokens")
ROLLOUT_KNOBS = ("a smaller rollout.gpu_memory_utilization",)


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only transformer (Llama/Qwen layout) that fix its size."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # the lm head is the embedding matrix
    head_dim: int = 0  # 0: hidden / heads

    @classmethod
    def from_config(cls, cfg: dict) -> "Shape":
        """From a Hugging Face config.json (a multimodal model's text part)."""
        c = cfg.get("text_config") or cfg
        heads = int(c["num_attention_heads"])
        return cls(int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["intermediate_size"]), heads,
                   int(c.get("num_key_value_heads") or heads), int(c["vocab_size"]),
                   bool(c.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
                   int(c.get("head_dim") or 0))

    def _linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of a decoder layer, by module name."""
        q, kv, h, i = self.heads * self.head_size, self.kv_heads * self.head_size, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def params(self) -> int:
        """Embeddings, the lm head unless tied, per layer the linears and two norms, the final norm
        (biases and q/k norms, under 0.01% of a model here, left out)."""
        per_layer = sum(a * b for a, b in self._linears().values()) + 2 * self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * per_layer + self.hidden

    @property
    def largest_layer(self) -> int:
        """Parameters of the largest module, DeepSpeed's `largest_layer_params` (ZeRO-3 gathers it whole)."""
        return max(self.vocab * self.hidden, *(a * b for a, b in self._linears().values()))

    def lora_params(self, lora: LoraConfig) -> int:
        """A LoRA adapter's parameters: r x (in + out) per adapted linear and layer (names the
        model lacks count 0; the learner rejects them at start)."""
        dims = self._linears()
        return self.layers * lora.r * sum(sum(dims.get(m, (0, 0))) for m in lora.target_modules)


SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what model.source=smollm2_gguf converts
# The presets' models, from their published config.json on the Hub (the project's machines cannot
# reach it; transformers' config defaults are other sizes): an offline run still gets a plan.
KNOWN_MODELS = {
    "Qwen/Qwen2.5-7B-Instruct": Shape(3584, 28, 18944, 28, 4, 152064, tied=False),  # 7.6B
    "Qwen/Qwen2.5-1.5B-Instruct": Shape(1536, 28, 8960, 12, 2, 151936, tied=True),  # 1.5B
    "Qwen/Qwen2.5-Coder-3B": Shape(2048, 36, 11008, 16, 2, 151936, tied=True),  # 3.1B
    "Qwen/Qwen3-1.7B": Shape(2048, 28, 6144, 16, 8, 151936, tied=True, head_dim=128),  # 1.7B
    "meta-llama/Llama-3.1-8B-Instruct": Shape(4096, 32, 14336, 32, 8, 128256, tied=False),  # 8.0B
    SMOLLM2_HUB_ID: Shape(576, 30, 1536, 9, 3, 49152, tied=True),  # 135M
}


def _hub_config(path: str) -> Optional[dict]:
    """The config.json of a local model folder or of a Hub id in the local Hub cache."""
    if is_local_path(path):
        file: Optional[Path] = Path(path).expanduser() / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache
        try:
            cached = try_to_load_from_cache(path, "config.json")
        except ValueError:  # not a valid repo id
            cached = None
        file = Path(cached) if isinstance(cached, str) else None
    return json.loads(file.read_text()) if file is not None and file.is_file() else None


def model_shape(m: ModelConfig) -> Optional[Shape]:
    """The model's shape without loading it; None when nothing here knows it."""
    if m.source == "tiny":  # random-init Llama with the SmolLM2 tokenizer (marl_llm.models)
        return Shape.from_config({**TINY_DEFAULTS, **m.tiny, "vocab_size": KNOWN_MODELS[SMOLLM2_HUB_ID].vocab})
    path = SMOLLM2_HUB_ID if m.source == "smollm2_gguf" else str(m.path)
    cfg = _hub_config(path)
    return Shape.from_config(cfg) if cfg else KNOWN_MODELS.get(path)


# ---- the cluster ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuCluster:
    nodes: int
    gpus_per_node: int
    memory_gb: float  # GiB per GPU
    origin: str  # where the numbers come from, for the plan's header

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def detect_gpus() -> Optional[tuple[int, float]]:
    """(GPUs, GiB of the smallest) on this machine; None without CUDA."""
    from marl_llm import runtime
    if not runtime.has_gpu():
        return None
    import torch
    n = torch.cuda.device_count()
    return n, min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) / GB


def target_cluster(cfg: ClusterConfig, default: bool = False) -> Optional[GpuCluster]:
    """The GPUs a run targets: `cluster.gpus_per_node` / `cluster.gpu_memory_gb` where set, else
    this machine's, else (`default`, for the preflight command) one node of 8 x 80 GiB; None when
    there are none (a CPU run)."""
    detected = detect_gpus()
    guess = detected or ((DEFAULT_GPUS_PER_NODE, DEFAULT_GPU_MEMORY_GB) if default else (0, 0.0))
    per_node = cfg.gpus_per_node or guess[0]
    if not per_node:
        return None
    memory = cfg.gpu_memory_gb or guess[1]
    if not memory:
        raise PreflightError(f"cluster.gpus_per_node={per_node} needs cluster.gpu_memory_gb (GiB of one GPU): "
                             "this machine has no GPU to read it from")
    origin = "described by cluster.num_nodes, cluster.gpus_per_node, cluster.gpu_memory_gb"
    if not (cfg.gpus_per_node and cfg.gpu_memory_gb):
        origin = (f"{'detected on this machine' if detected else 'the default description'}; describe yours "
                  "with cluster.num_nodes, cluster.gpus_per_node, cluster.gpu_memory_gb")
    return GpuCluster(cfg.num_nodes, per_node, memory, origin)


# ---- actors and their memory ---------------------------------------------------------------------
@dataclass
class Actor:
    role: str  # rollout | learner
    name: str
    gpus: float  # what it asks Ray for
    parts: dict[str, float]  # GiB on each of its devices, by component
    knobs: tuple[str, ...]  # the settings that lower it
    weights_gb: float = 0.0  # a vLLM engine's weights per device, which must fit in its share

    @property
    def gb(self) -> float:
        return sum(self.parts.values())


def model_states_bytes(shape: Shape, lc: LearnerConfig, lora: Optional[LoraConfig]) -> int:
    """One rank's model states (trained parameters: bf16 weights, fp32 master weights, gradients,
    Adam moments) on its GPU, from DeepSpeed's estimator for the ZeRO stage (stage 1 shares the
    stage-1/2 optimiser and its estimator; stage 0 is stage 2 with nothing to shard across)."""
    trained = shape.lora_params(lora) if lora else shape.params
    offload = lc.offload_optimizer and lc.zero_stage > 0  # as the learner's DeepSpeed config
    if lc.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        return estimate_zero3_model_states_mem_needs(trained, shape.largest_layer, num_gpus_per_node=lc.num_ranks,
                                                     cpu_offload=offload, cpu_offload_params=False)[1]
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    ranks = lc.num_ranks if lc.zero_stage else 1
    return estimate_zero2_model_states_mem_needs(trained, num_gpus_per_node=ranks, cpu_offload=offload)[1]


def micro_batch_tokens(lc: LearnerConfig, per_sample: int) -> int:
    """Tokens of the largest micro-batch of samples of up to `per_sample` tokens: `micro_batch_size`
    of them, cut at `micro_batch_tokens` (a micro-batch always holds one sample)."""
    tokens = per_sample * lc.micro_batch_size
    return min(tokens, max(lc.micro_batch_tokens, per_sample)) if lc.micro_batch_tokens else tokens


def activation_gb(shape: Shape, m: ModelConfig, lc: LearnerConfig, max_new_tokens: int) -> float:
    """Activations of the largest micro-batch (rough): every layer's (or, with gradient
    checkpointing, every layer's input plus one layer's) per token, and the logits with their
    fp32 log-softmax and gradients for the completion tokens (the learner computes no others)."""
    tokens = micro_batch_tokens(lc, m.max_model_len)
    scored = micro_batch_tokens(lc, max_new_tokens)  # completion tokens: at most max_new_tokens a sample
    if lc.gradient_checkpointing:
        per_token = shape.hidden * (CHECKPOINTED_LAYER_BYTES * shape.layers + LAYER_ACTIVATION_BYTES)
    else:
        per_token = shape.hidden * LAYER_ACTIVATION_BYTES * shape.layers
    return (tokens * per_token + scored * shape.vocab * 4 * LOGIT_COPIES) / GB


def learner_parts(shape: Shape, m: ModelConfig, lc: LearnerConfig, reference: bool,
                  max_new_tokens: int) -> dict[str, float]:
    """One learner rank's GPU memory (GiB) by component."""
    shards = lc.num_ranks if lc.zero_stage == 3 else 1
    frozen_copy = shape.params * (4 if lc.bf16 == "false" else 2) / shards / GB  # ZeRO-3 partitions it too
    parts = {f"model states (DeepSpeed ZeRO-{lc.zero_stage}, {lc.num_ranks} rank{'s' * (lc.num_ranks > 1)}"
             f"{', optimizer offloaded' if lc.offload_optimizer and lc.zero_stage else ''})":
             model_states_bytes(shape, lc, m.lora) / GB}
    if m.lora is not None:
        parts["frozen base"] = frozen_copy
    if reference:
        parts["reference"] = frozen_copy
    parts[f"activations ({micro_batch_tokens(lc, m.max_model_len)} tokens"
          f"{', checkpointed' if lc.gradient_checkpointing else ''})"] = activation_gb(shape, m, lc, max_new_tokens)
    parts["CUDA context"] = CUDA_CONTEXT_GB
    return parts


def rollout_workers(name: str, m: ModelConfig, run: RunConfig, cluster: GpuCluster) -> list[Actor]:
    """One engine set's `rollout.num_workers` workers."""
    r = run.rollout
    gpus = rollout_gpus(r, {"GPU": cluster.gpus})
    if gpus > 1 and gpus != int(gpus):
        raise PreflightError(f"rollout.num_gpus={gpus} is not allowed; Ray takes a fraction of one GPU or a whole "
                             "number of GPUs")
    if gpus > cluster.gpus_per_node:
        raise PreflightError(f"a rollout worker asks for {gpus:g} GPUs (rollout.tensor_parallel_size / "
                             f"rollout.num_gpus) but a node has {cluster.gpus_per_node} (cluster.gpus_per_node); "
                             "Ray puts a worker on one node: lower rollout.tensor_parallel_size")
    shape = model_shape(m)
    weights = shape.params * DTYPE_BYTES[m.dtype] / GB if shape else 0.0
    if r.backend == "vllm":
        share = r.gpu_memory_utilization * cluster.memory_gb
        parts = {f"vLLM share ({r.gpu_memory_utilization:g} x {cluster.memory_gb:g})": share}
        knobs, own_weights = ROLLOUT_KNOBS, weights / r.tensor_parallel_size
    else:  # hf generation: the weights; its generation cache is not estimated
        parts, knobs, own_weights = {"weights (hf backend)": weights}, (), 0.0
    return [Actor("rollout", f"rollout {name} #{i}", gpus, parts, knobs, own_weights) for i in range(r.num_workers)]


def learner_ranks(s: PolicySpec, run: RunConfig, cluster: GpuCluster) -> list[Actor]:
    """A trainable policy's `learner.num_ranks` ranks."""
    lc = s.learner or run.learner
    shape = model_shape(s.model)
    parts = (learner_parts(shape, s.model, lc, s.reference, run.rollout.max_new_tokens) if shape
             else {"CUDA context": CUDA_CONTEXT_GB})
    gpus = learner_gpus(lc, {"GPU": cluster.gpus})
    return [Actor("learner", f"learner {s.name} rank {i}", gpus, parts, LEARNER_KNOBS) for i in range(lc.num_ranks)]


def engine_groups(specs: list[PolicySpec], run: RunConfig) -> dict[str, list[PolicySpec]]:
    """The policies of each engine, as `Cluster.build_policies` groups them (`cluster.engine_key`):
    LoRA adapters of one base and frozen copies of the same weights share one."""
    from marl_llm.cluster import engine_key
    groups: dict[str, list[PolicySpec]] = {}
    for s in specs:
        groups.setdefault(engine_key(s, run.rollout), []).append(s)
    return groups


def run_actors(specs: list[PolicySpec], run: RunConfig, cluster: GpuCluster, train: bool = True) -> list[Actor]:
    """Every actor the run starts, in the order `Cluster.build_policies` creates them (spec
    order; a shared engine with the first policy that uses it)."""
    from marl_llm.cluster import engine_key
    groups, started, actors = engine_groups(specs, run), set(), []
    for s in specs:
        key = engine_key(s, run.rollout)
        if key not in started:
            started.add(key)
            actors += rollout_workers("+".join(g.name for g in groups[key]), s.model, run, cluster)
        if train and s.trainable:
            actors += learner_ranks(s, run, cluster)
    return actors


# ---- placement -----------------------------------------------------------------------------------
EPS = 1e-9  # fractions of a GPU add up in floating point


@dataclass
class Device:
    node: int
    index: int
    free: float = 1.0
    actors: list[Actor] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"node{self.node}:gpu{self.index}"

    @property
    def gb(self) -> float:
        return sum(a.gb for a in self.actors)


def _take(node: list[Device], gpus: float) -> list[Device]:
    """The devices of `node` a request for `gpus` gets ([] if it does not fit there)."""
    if gpus < 1:
        return next(([d] for d in node if d.free >= gpus - EPS), [])
    whole = [d for d in node if d.free >= 1 - EPS]
    return whole[:int(gpus)] if len(whole) >= gpus else []


def place(actors: list[Actor], gpus_per_node: int) -> list[list[Device]]:
    """The nodes the actors fill, placed in order as Ray packs them; a node is added whenever a
    request fits on none so far (the caller compares the count with the cluster's)."""
    nodes: list[list[Device]] = []
    for a in actors:
        if not a.gpus:
            continue
        got = next((g for g in (_take(n, a.gpus) for n in nodes) if g), None)
        if got is None:
            nodes.append([Device(len(nodes), i) for i in range(gpus_per_node)])
            got = _take(nodes[-1], a.gpus)
        for d in got:
            d.free -= min(a.gpus, 1.0)
            d.actors.append(a)
    return nodes


# ---- the plan ------------------------------------------------------------------------------------
@dataclass
class Plan:
    cluster: GpuCluster
    devices: list[Device]  # those in use
    cpu_actors: list[Actor]  # asking for no GPU
    policies: list[str]  # one line each: name, trainable or frozen, model and size

    def render(self) -> str:
        c = self.cluster
        lines = [f"GPU plan: {c.nodes} node{'s' * (c.nodes > 1)} x {c.gpus_per_node} GPUs x {c.memory_gb:g} GiB "
                 f"({c.origin})", "policies:", *(f"  {p}" for p in self.policies),
                 f"{'device':<12} {'GiB':>6}  actor: estimate per device (GiB)"]
        for d in self.devices:
            for i, a in enumerate(d.actors):
                lead = f"{d.name:<12} {d.gb:>6.1f}" if i == 0 else " " * 19
                lines.append(f"{lead}  {a.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in a.parts.items()))
        lines += [f"{'cpu':<12} {'-':>6}  {a.name} (asks for no GPU)" for a in self.cpu_actors]
        worst = max(self.devices, key=lambda d: d.gb, default=None)
        if worst is not None:
            lines.append(f"{len(self.devices)} of {c.gpus} GPUs in use; the largest estimate is {worst.gb:.1f} of "
                         f"{c.memory_gb:g} GiB ({worst.name})")
        return "\n".join(lines)

    def check(self) -> None:
        """A device whose estimate is over its memory, or an engine whose weights do not fit in
        its vLLM share, is a PreflightError naming it and what lowers it."""
        for d in self.devices:
            for a in d.actors:
                if a.weights_gb > a.gb:
                    raise PreflightError(
                        f"GPU {d.name}: {a.name} gets {a.gb:.1f} GiB ({next(iter(a.parts))}), less than its "
                        f"{a.weights_gb:.1f} GiB of model weights per GPU, leaving vLLM no KV cache; raise "
                        "rollout.gpu_memory_utilization or rollout.tensor_parallel_size")
            if d.gb > self.cluster.memory_gb + EPS:
                what = "; ".join(f"{a.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in a.parts.items())
                                 for a in d.actors)
                knobs = dict.fromkeys(k for a in d.actors for k in a.knobs)
                raise PreflightError(f"GPU {d.name} needs an estimated {d.gb:.1f} GiB, over its "
                                     f"{self.cluster.memory_gb:g} GiB ({what}); lower it with {', '.join(knobs)}")


def describe(s: PolicySpec) -> str:
    """A policy's line in the plan: trainable or frozen, its model and size."""
    shape = model_shape(s.model)
    size = f"{shape.params / 1e9:.2f}B params" if shape else \
        "size unknown: no config.json in a local folder or the Hub cache; its learners are not estimated"
    lora = f"; LoRA r={s.model.lora.r}: {shape.lora_params(s.model.lora) / 1e6:.1f}M trained" \
        if s.model.lora is not None and shape else ""
    kind = "trainable" if s.trainable else "frozen"
    return f"{s.name}: {kind}, {s.model.path or s.model.name} ({size}{lora})"


def plan_run(specs: list[PolicySpec], run: RunConfig, cluster: GpuCluster, train: bool = True) -> Plan:
    """The run's actors placed on the cluster's GPUs; more GPUs than the cluster has is a PreflightError."""
    actors = run_actors(specs, run, cluster, train)
    nodes = place(actors, cluster.gpus_per_node)
    devices = [d for n in nodes for d in n if d.actors]
    if len(nodes) > cluster.nodes:
        asks = {role: sum(a.gpus for a in actors if a.role == role) for role in ("rollout", "learner")}
        raise PreflightError(
            f"the run needs {len(devices)} GPUs on {len(nodes)} node(s) of {cluster.gpus_per_node} (rollout workers "
            f"ask for {asks['rollout']:g}, learner ranks for {asks['learner']:g}), but the cluster has {cluster.gpus} "
            f"(cluster.num_nodes={cluster.nodes} x cluster.gpus_per_node={cluster.gpus_per_node}); lower "
            "rollout.num_workers or learner.num_ranks, share GPUs with fractions (rollout.num_gpus=0.5 "
            "learner.num_gpus=0.5), or describe a bigger cluster")
    return Plan(cluster, devices, [a for a in actors if not a.gpus], [describe(s) for s in specs])
