"""MALT: a generator, a verifier and a refiner trained from a search tree (arXiv 2412.01928).

What the paper specifies: three roles answer in sequence (generator -> verifier -> refiner);
training data comes from a tree with branching n per level (n=3: 27 leaves per question) sampled
at temperature 0.3; a leaf's value is its correctness, inner values are means of their children
("global pooling"), a node is correct iff its value > 0.5; each role gets SFT on its correct
nodes, then the verifier and refiner DPO (beta 0.2) on (correct, incorrect) siblings against the
SFT model; the generator is SFT only; roles are LoRA adapters of one base; inference is three
chains with a majority vote (MV@3). Where it is silent we chose: how steps map onto the tree
collection (`iterations` blocks, below), all sibling pairs (or a cap), exporting the datasets,
seeded local shuffles, the ablations and baselines of `evaluate`, and full copies per role
unless `model.lora` is set (the paper's adapters: the malt_paper preset sets it).

Roles (one policy each, all trainable; `algo.role_models` may give a different preset per role):
the generator answers the question; the verifier reads the question and one answer and writes a
critique; the refiner reads both and writes the final solution. Whether a role is a full copy of
the base or a LoRA adapter on it is the engine's decision (`model.lora`), as is whether the
roles' learner groups train at the same time (`learner.concurrent`).

Prompts (MALT's own, `PROMPTS`; `algo.prompts.<role>` overrides one): the generator answers with
the env's own answering prompt (role `single`; the G+V ablation's revision passes the env's
`previous`/`feedback` context); the verifier's and refiner's templates are filled with the env's
question text and answer instruction and their ancestors' texts (stripped), as the env's chat
messages (`Algorithm.answer_prompt`). The answering roles' replies end at the env's stop strings
of an answer (`</answer>`); the verifier's are not stopped (a critique quotes solutions).

Tree protocol (`collect`, per batch of questions): the levels are grown in one loop, one
generate call per level for the whole batch, whatever its size, sampled at `rollout.temperature`
(the presets cpu_malt_math and malt_paper set the paper's 0.3): level 1 asks the generator for
`branching` samples of every question (one request per question, n = branching); level 2 asks
the verifier for `branching` critiques of every (question, answer); level 3 asks the refiner
for `branching` refinements of every (question, answer, critique). Every node is a `Turn`
(`parent` = the node it answers, `round` = its level); one question's whole tree (n + n^2 + n^3
turns, 3 + 9 + 27 by default) is one `Episode` in the trajectory buffer, with the values already
written.

Credit (value back-up, "global pooling"): a leaf's value is the env's reward component
`reward_key` (default `correct`: 1 iff the refiner's extracted answer is right); a critique's
value is the mean of its refinements'; an answer's value the mean of its critiques'. A node is
labelled correct iff value > threshold (strictly: exactly 0.5 is incorrect at 0.5); labels go to
`Turn.meta["correct"]`, values to `Turn.value`, the threshold to `Episode.meta["threshold"]`.

Datasets (rebuilt from the trees at training time): SFT set per role = its correct nodes; DPO
pairs per role = (correct, incorrect) siblings under one parent, every combination (or at most
`max_pairs_per_parent`): refinements under one critique, critiques under one answer, answers under
one question (the generator's pairs are built and exported but unused unless
`generator_dpo=true`). Everything is exported as JSONL (`export_path`, default
`<run folder>/malt_dataset/iter_<k>.jsonl`; `marl_llm.jsonl.read_jsonl` reads it back,
`sft_samples` / `pair_samples` turn its rows into training data).

Training (`train_epochs`, the roles in lockstep: step i of every role is dispatched before any
is awaited): every role SFT on its set (`sft_epochs` passes, `sft_batch_size` samples per
optimiser step, shuffled with the role's seeded local RNG); then the DPO roles (`dpo_roles`,
default verifier and refiner) snapshot the SFT model as their reference and run `dpo_epochs`
passes of DPO (beta `dpo_beta`, `dpo_batch_size` pairs per step; the learner scores the pairs
under the reference inside each step). The generator is SFT only (the paper found DPO hurt an
instruct model).

Mapping onto the trainer loop: `trainer.steps` are split into `iterations` equal blocks of
ceil(steps / iterations) steps. Each step collects the trees of one batch of `trainer.batch_size`
questions (and logs their statistics); no weights change inside a block, so every tree of a block
comes from the same roles (the paper's offline data). The block's last step (and the run's last
step) builds the datasets from all trees collected since the previous training, exports them and
trains. `iterations=1` is the paper's offline variant over steps x batch_size questions;
`iterations>1` repeats collect -> train with the updated roles (the paper's online future work),
iteration k labelling with `threshold_schedule[k]` (the last entry repeats; empty: always
`value_threshold`). `prepare` does nothing heavy (at most the initial baseline evaluation).
Resume: the block length, the iteration counter and the last training step are in `state_dict`;
the trees collected since that training are read back from the trajectory buffer file (which the
trainer truncates to the checkpoint), so a resumed block trains on exactly the same trees.

Evaluation (`evaluate`): `chains` G -> V -> R chains per question, batched (one generate call per
stage for all questions), sampled at `eval_temperature`; majority vote over the chains' final
answers (MV@chains; ties go to the answer seen first). Reported: `acc/generator` and
`acc/refiner` (per chain), `acc/verifier_verdict` (the critique's last "correct"/"incorrect"
agrees with the answer's real correctness; a critique is not an answer, so this is its only
score), `mv/gvr` (MALT's number), and ablations with the same models:
`mv/g` (G only: the vote over the generator's answers), `mv/gv` (G+V: the generator revises its
own answer using the critique, through the env's `previous`/`feedback` prompt context; no
refiner), `mv/gr` (G+R: the refiner improves the answer without a critique, `critique` =
`no_critique`). Baselines at equal compute (`baselines`): `initial` (default) evaluates the
untrained roles once before training (in `prepare`, on the dev and/or test tasks the run evaluates) and reports
them with every evaluation under `baseline/`: `baseline/mv/g` is the base model (the initial
generator) sampled `chains` times + MV, `baseline/mv/gvr` the untrained G-V-R + MV; `base` scores
only `baseline/mv/g` before training (the paper's baseline, with a third of `initial`'s
generations: no verifier or refiner); `frozen` adds a
frozen `base` policy (rollout workers only) that runs the untrained G-V-R chains at the first
evaluation of a task set (frozen weights and seeded requests: later evaluations reuse them; also
under `python -m marl_llm.evaluate`); `none` skips them. Every score comes with its 95% interval
over the questions (per-chain scores are averaged per question first, so n counts questions), and
the paired differences of `comparisons()` (trained G-V-R + MV against the baselines and against G
only). Every vote's replies are kept (`mv/<variant>`, `baseline/mv/<variant>`: the picked chain's
final reply and the chains' final replies voted over; algorithms/base.py "Replies"). The chains
are sampled at `eval_temperature` (0.3 by default, seeded: not greedy, so that the chains differ),
and the decoding label says so: "temperature 0.3, seed <run seed>".

LoRA roles (`model.lora` set, e.g. `+model.lora.r=16`; the paper's set-up, malt_paper): each role's
checkpoint is the merged model plus its adapter in `adapter/` (marl_llm/learner/lora.py says how
adapters reach the rollout engines).
"""
from __future__ import annotations

import logging
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from algorithms.base import (AlgoConfig, Algorithm, TrainJob, outcome_metrics, reward_metrics, score_outcomes,
                             train_epochs, vote)
from marl_llm.config import ConfigError, check, check_choice, check_min, check_positive, check_range
from marl_llm.jsonl import write_jsonl
from marl_llm.losses import LossConfig
from marl_llm.metrics import mean
from marl_llm.policy import PolicySpec
from marl_llm.registry import register_algorithm
from marl_llm.types import Episode, GenerationRequest, PairSample, Sample, Turn

log = logging.getLogger(__name__)

ROLES = ("generator", "verifier", "refiner")  # the tree's levels, in order
LEVEL = {r: i for i, r in enumerate(ROLES)}
CONTEXT_KEY = {"generator": "answer", "verifier": "critique"}  # how a node's text enters its descendants' prompts
# the untrained roles' metrics: `baseline/mv/gvr` is the untrained G -> V -> R + MV, `baseline/mv/g`
# the base model (the untrained generator) x chains + MV
BASELINE = "baseline/"
# the verifier's and refiner's prompts ({question} and {answer_instruction} come from the env; the
# generator answers with the env's own answering prompt)
PROMPTS: dict[str, str] = {
    "verifier": ("{question}\n\nProposed solution:\n{answer}\n\nCheck this solution step by step and point out any "
                 "mistakes. Do not write a new solution. End with a verdict: correct or incorrect."),
    "refiner": ("{question}\n\nProposed solution:\n{answer}\n\nCritique of the solution:\n{critique}\n\n"
                "Using the critique, write the final correct solution. {answer_instruction}"),
}


@dataclass
class MALTConfig(AlgoConfig):
    name: str = "malt"
    # ---- tree sampling
    branching: int = 3                    # n samples per node and level: n^3 leaves per question
    reward_key: str = "correct"           # reward component used as a leaf's value (else the total)
    # ---- credit
    value_threshold: float = 0.5          # a node is correct iff value > threshold (strict)
    threshold_schedule: list[float] = field(default_factory=list)  # per iteration; last repeats
    max_pairs_per_parent: int = 0         # 0: every (correct, incorrect) sibling combination
    # ---- iterations
    iterations: int = 1                   # 1: the paper's offline variant; >1: collect -> train repeated
    # ---- roles
    # role -> conf/model preset name; null (or a role left out): the run's `model=`
    role_models: dict[str, Optional[str]] = field(default_factory=dict)
    # role -> prompt template (verifier, refiner); a role left out keeps PROMPTS' text
    prompts: dict[str, str] = field(default_factory=lambda: dict(PROMPTS))
    # ---- training
    sft_roles: list[str] = field(default_factory=lambda: list(ROLES))
    sft_epochs: int = 1
    sft_batch_size: int = 8               # paper: 8
    dpo_roles: list[str] = field(default_factory=lambda: ["verifier", "refiner"])
    generator_dpo: bool = False           # the generator's pairs are always built; train on them?
    dpo_epochs: int = 1
    dpo_batch_size: int = 8
    dpo_beta: float = 0.2                 # paper: 0.2
    export_path: Optional[str] = None     # folder for iter_<k>.jsonl; default <output_dir>/malt_dataset
    # ---- evaluation
    chains: int = 3                       # G -> V -> R chains per question, majority vote (MV@3)
    eval_temperature: float = 0.3         # chains are sampled (seeded), not greedy: MV needs different chains
    eval_ablations: bool = True           # also G+V (generator revises) and G+R (no critique)
    baselines: str = "initial"            # initial | base | frozen | none
    no_critique: str = "(no critique available)"

    def __post_init__(self):
        check(isinstance(self.branching, int) and self.branching >= 1, "algo.branching", self.branching,
              "must be an integer >= 1 (paper: 3)")
        for key, v in [("value_threshold", self.value_threshold)] + [
                (f"threshold_schedule[{i}]", t) for i, t in enumerate(self.threshold_schedule)]:
            check_range(f"algo.{key}", v, 0, 1, hi_open=True, note="values are means of 0/1 rewards")
        check_min("algo.iterations", self.iterations, 1)
        check(len(self.threshold_schedule) <= self.iterations, "algo.threshold_schedule", list(self.threshold_schedule),
              f"has too many entries; give at most algo.iterations={self.iterations} thresholds (one per iteration)")
        check_positive("algo.max_pairs_per_parent", self.max_pairs_per_parent, allow_zero=True,
                       note="0 means all pairs")
        unknown = sorted(set(self.prompts) - set(PROMPTS))
        check(not unknown, "algo.prompts", sorted(self.prompts), f"is not allowed: keys must be of {list(PROMPTS)} "
              f"(got {unknown}; the generator answers with the env's own prompt)")
        for key, roles, allowed in (("sft_roles", self.sft_roles, ROLES),
                                    ("dpo_roles", self.dpo_roles, ("verifier", "refiner"))):
            wrong = [r for r in roles if r not in allowed]
            hint = " (the generator's DPO is switched by algo.generator_dpo=true)" if "generator" in wrong else ""
            check(not wrong and len(set(roles)) == len(roles), f"algo.{key}", list(roles),
                  f"is not allowed; give distinct roles of {list(allowed)}{hint}")
        for key in ("sft_epochs", "dpo_epochs"):
            check_positive(f"algo.{key}", getattr(self, key), allow_zero=True, note="0 skips that phase")
        for key in ("sft_batch_size", "dpo_batch_size", "chains"):
            check_positive(f"algo.{key}", getattr(self, key))
        check_positive("algo.dpo_beta", self.dpo_beta, note="paper: 0.2")
        check_positive("algo.eval_temperature", self.eval_temperature, allow_zero=True)
        check_choice("algo.baselines", self.baselines, ("initial", "base", "frozen", "none"))
        check(self.baselines != "frozen" or not any(self.role_models.values()), "algo.baselines", self.baselines,
              "is not allowed with algo.role_models: 'frozen' builds one untrained copy of `model=`; use "
              "'initial' (the untrained roles scored before training) or 'none'")

    def threshold(self, iteration: int) -> float:
        if self.threshold_schedule:
            return float(self.threshold_schedule[min(iteration, len(self.threshold_schedule) - 1)])
        return float(self.value_threshold)

    @property
    def dpo_role_set(self) -> tuple[str, ...]:
        if self.dpo_epochs <= 0:
            return ()
        return tuple(r for r in ROLES if r in self.dpo_roles or (r == "generator" and self.generator_dpo))


# ---- trees: values and labels ---------------------------------------------------------------------
def is_correct(value: Optional[float], threshold: float) -> bool:
    """The paper's label: strictly above the threshold (exactly 0.5 is incorrect at 0.5)."""
    return value is not None and value > threshold


def backup_values(turns: Sequence[Turn]) -> None:
    """Write `Turn.value`: a leaf's value is its reward; an inner node's the mean of its children's
    values (children = turns whose `parent` is its id). Works for any tree shape."""
    by_id = {t.id: t for t in turns}
    children: dict[str, list[Turn]] = defaultdict(list)
    for t in turns:
        if t.parent is not None and t.parent in by_id:
            children[t.parent].append(t)

    def depth(t: Turn) -> int:
        d = 0
        while t.parent is not None and t.parent in by_id:
            t, d = by_id[t.parent], d + 1
        return d

    for t in sorted(turns, key=depth, reverse=True):  # children before parents
        kids = children.get(t.id)
        if kids:
            vals = [k.value for k in kids if k.value is not None]
            t.value = sum(vals) / len(vals) if vals else None
        else:
            t.value = None if t.reward is None else float(t.reward)


def label_tree(turns: Iterable[Turn], threshold: float) -> None:
    for t in turns:
        t.meta["correct"] = is_correct(t.value, threshold)


# ---- datasets -------------------------------------------------------------------------------------
def prompt_context(path: dict[str, str]) -> dict[str, str]:
    """A role's prompt context from the texts of its ancestors (role -> text): the generator's
    output is the `answer`, the verifier's the `critique`."""
    return {CONTEXT_KEY[r]: text for r, text in path.items() if r in CONTEXT_KEY}


def _context(turn: Turn, by_id: dict[str, Turn]) -> dict[str, str]:
    """The prompt context a node was generated from (its ancestors' texts)."""
    path: dict[str, str] = {}
    node = by_id.get(turn.parent) if turn.parent else None
    while node is not None:
        path[node.agent] = node.text
        node = by_id.get(node.parent) if node.parent else None
    return prompt_context(path)


def _diagonal(n_chosen: int, n_rejected: int, cap: int) -> list[tuple[int, int]]:
    """All (chosen, rejected) index pairs, in wrapped diagonals: the first max(n_chosen, n_rejected)
    pairs already use every sibling, so a cap spreads over both sides."""
    c, r = n_chosen, n_rejected
    if c >= r:
        pairs = [(a, (a + d) % r) for d in range(r) for a in range(c)]
    else:
        pairs = [((b + d) % c, b) for d in range(c) for b in range(r)]
    return pairs[:cap] if cap else pairs


def build_dataset(episodes: Iterable[Episode], threshold: float, prompt: Optional[Callable[..., Any]] = None,
                  iteration: int = 0, max_pairs_per_parent: int = 0) -> list[dict[str, Any]]:
    """JSON rows of the SFT sets and DPO pairs of every role from the trees in `episodes`.

    kind "sft": one correct node (role, prompt_ids, completion_ids, text, value).
    kind "pair": (chosen = a correct node, rejected = an incorrect sibling with the same parent).
    With `prompt` (`MALT.role_prompt`: `(task, role, **context) -> messages`), rows also carry
    the chat `messages` of the node's prompt (for inspection)."""
    rows: list[dict[str, Any]] = []
    for ep in episodes:
        by_id = {t.id: t for t in ep.turns}
        qid = str(ep.task.get("id", ep.group))
        siblings: dict[tuple[str, Optional[str]], list[Turn]] = defaultdict(list)
        messages: dict[Optional[str], Any] = {}

        def msgs(t: Turn):
            if t.parent not in messages:
                messages[t.parent] = prompt(ep.task, t.agent, **_context(t, by_id))
            return messages[t.parent]

        for t in ep.turns:
            if t.agent not in LEVEL or t.value is None or not t.completion_ids:
                continue
            siblings[(t.agent, t.parent)].append(t)
            if is_correct(t.value, threshold):
                row = {"kind": "sft", "role": t.agent, "question_id": qid, "iteration": iteration,
                       "threshold": threshold, "turn_id": t.id, "parent": t.parent, "value": t.value,
                       "prompt_ids": list(t.prompt_ids), "completion_ids": list(t.completion_ids),
                       "text": t.text}
                if prompt is not None:
                    row["messages"] = msgs(t)
                rows.append(row)
        for (role, parent), sibs in siblings.items():
            good = [t for t in sibs if is_correct(t.value, threshold)]
            badl = [t for t in sibs if not is_correct(t.value, threshold)]
            for i, j in _diagonal(len(good), len(badl), max_pairs_per_parent):
                c, r = good[i], badl[j]
                row = {"kind": "pair", "role": role, "question_id": qid, "iteration": iteration,
                       "threshold": threshold, "parent": parent, "prompt_ids": list(c.prompt_ids),
                       "chosen": {"turn_id": c.id, "value": c.value, "completion_ids": list(c.completion_ids),
                                  "text": c.text},
                       "rejected": {"turn_id": r.id, "value": r.value, "completion_ids": list(r.completion_ids),
                                    "text": r.text}}
                if prompt is not None:
                    row["messages"] = msgs(c)
                rows.append(row)
    return rows


def sft_samples(rows: Iterable[dict[str, Any]], role: str) -> list[Sample]:
    return [Sample(list(r["prompt_ids"]), list(r["completion_ids"]))
            for r in rows if r["kind"] == "sft" and r["role"] == role]


def pair_samples(rows: Iterable[dict[str, Any]], role: str) -> list[PairSample]:
    return [PairSample(list(r["prompt_ids"]), list(r["chosen"]["completion_ids"]),
                       list(r["rejected"]["completion_ids"]))
            for r in rows if r["kind"] == "pair" and r["role"] == role]


def dataset_counts(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    out = {f"data/{k}/{r}": 0 for k in ("sft", "pairs") for r in ROLES}
    for row in rows:
        out[f"data/{'sft' if row['kind'] == 'sft' else 'pairs'}/{row['role']}"] += 1
    return out


def phase_metrics(prefix: str, epochs: list[list[dict[str, float]]], keys: Sequence[str]) -> dict[str, float]:
    """A training phase's metrics from its per-epoch train results: `<prefix>_steps`, the first
    step's loss (`<prefix>_loss_first`) and the last epoch's mean of each of `keys`."""
    out = {f"{prefix}_steps": sum(len(e) for e in epochs),
           f"{prefix}_loss_first": epochs[0][0].get("loss", float("nan"))}
    for key in keys:
        out[f"{prefix}_{key}"] = mean(r.get(key, float("nan")) for r in epochs[-1])
    return out


# ---- verdicts ------------------------------------------------------------------------------------
_VERDICT = re.compile(r"\b(incorrect|correct)\b", re.I)


def verdict(critique: str) -> Optional[bool]:
    """The critique's last verdict word: True for "correct", False for "incorrect", else None."""
    found = _VERDICT.findall(critique or "")
    return None if not found else found[-1].lower() == "correct"


# ---- the algorithm --------------------------------------------------------------------------------
@register_algorithm("malt")
class MALT(Algorithm):
    Config = MALTConfig
    headline = ("mv/gvr", "acc/generator", "acc/refiner")
    # the verifier's and refiner's prompts are built on an answer env's question and instruction
    env_hooks = ("question_text", "instruction", "messages")

    def __init__(self, cfg: MALTConfig, env, run):
        super().__init__(cfg, env, run)
        steps = int(run.trainer.steps)
        # training state (see state_dict)
        self.steps_per_iteration = max(1, math.ceil(steps / cfg.iterations)) if steps else 1
        self.iteration = 0
        self.last_train_step = -1
        self.baselines: dict[str, float] = {}      # `initial`: the untrained roles' metrics
        self.initial_outcomes: dict[str, Any] = {}  # `initial`: {"ids": task ids, "outcomes": per task}
        self.history: list[dict[str, Any]] = []
        self._pending: list[Episode] = []

    # ---- validation and policies ------------------------------------------------------------------
    def required_roles(self) -> tuple[str, ...]:
        return ("single",)  # the generator answers with the env's own answering prompt

    def roles(self) -> tuple[str, ...]:
        return ROLES

    def validate(self) -> None:
        super().validate()
        check_positive("rollout.temperature", self.run.rollout.temperature,
                       note="MALT samples its trees at it: n different samples per node need a temperature > 0 "
                            "(paper: 0.3)")
        steps, iterations = int(self.run.trainer.steps), self.cfg.iterations
        if steps and iterations > steps:
            raise ConfigError(f"algo.iterations={iterations} needs trainer.steps >= {iterations} "
                              f"(each iteration collects for at least one step); got trainer.steps={steps}")

    def policy_specs(self) -> list[PolicySpec]:
        dpo = self.cfg.dpo_role_set
        specs = [PolicySpec(r, self.role_model(r), trainable=True, reference=r in dpo) for r in ROLES]
        if self.cfg.baselines == "frozen":
            specs.append(PolicySpec("base", self.run.model, trainable=False))
        return specs

    # ---- prompts ----------------------------------------------------------------------------------
    def role_prompt(self, task: dict[str, Any], role: str, **context: Any) -> list[dict[str, str]]:
        """The chat messages of `role` on `task`. The generator answers with the env's answering
        prompt (with `previous` and `feedback`: a revision); the verifier needs `answer` (the
        generator's output), the refiner `answer` and `critique` (the verifier's output)."""
        if role == "generator":
            return self.env.prompt(task, "single", **context)
        answer, critique = context.get("answer"), context.get("critique")
        if role == "verifier":
            if answer is None:
                raise ValueError("role 'verifier' needs context answer=<the generator's output>")
            return self.answer_prompt(self.template("verifier"), task, answer=str(answer).strip())
        if answer is None or critique is None:
            raise ValueError("role 'refiner' needs context answer=<generator output> and critique=<verifier output>")
        return self.answer_prompt(self.template("refiner"), task, answer=str(answer).strip(),
                                  critique=str(critique).strip())

    def template(self, role: str) -> str:
        return self.cfg.prompts.get(role) or PROMPTS[role]

    def role_requests(self, role: str, tasks: Sequence[dict[str, Any]], n: int, temperature: Optional[float] = None,
                      seed: Optional[tuple] = None,
                      contexts: Optional[Sequence[dict[str, Any]]] = None) -> list[GenerationRequest]:
        """`requests` with the role's prompt. The answering roles' replies end at the env's stop
        strings of an answer; the verifier's never (a critique quotes solutions, answer tags and all)."""
        stop = [] if role == "verifier" else self.env.stop("single")
        return self.requests(role, tasks, n, temperature, seed=seed, contexts=contexts, stop=stop,
                             prompt=lambda task, **ctx: self.role_prompt(task, role, **ctx))

    # ---- scoring ---------------------------------------------------------------------------------
    def _leaf_values(self, items: list[tuple[dict, dict[str, str]]]):
        rewards = self.env.reward_batch(items) if items else []
        key = self.cfg.reward_key
        vals = []
        for r in rewards:
            if key in r.components:
                vals.append(float(r.components[key]))
            else:
                if not getattr(self, "_warned_key", False):
                    log.warning("env reward has no component %r (components: %s): using the total as the "
                                "leaf value", key, sorted(r.components))
                    self._warned_key = True
                vals.append(float(r.total))
        return vals, rewards

    # ---- collection -------------------------------------------------------------------------------
    def collect(self, tasks, step):
        """One tree per question, grown level by level (generator, verifier, refiner): one batched
        generate call per level for the whole batch."""
        cfg, n = self.cfg, self.cfg.branching
        k = self.iteration_of(step)  # from the step, not self.iteration: collection may run ahead of training
        thr = cfg.threshold(k)
        trees: list[list[Turn]] = [[] for _ in tasks]
        # the open nodes: (task index, the node to branch from, role -> text along its path)
        frontier: list[tuple[int, Optional[Turn], dict[str, str]]] = [(i, None, {}) for i in range(len(tasks))]
        with self.timer("generate"):
            for level, role in enumerate(ROLES):
                outs = self.policies[role].generate(self.role_requests(  # at rollout.temperature
                    role, [tasks[i] for i, _, _ in frontier], n, seed=("tree", step, role),
                    contexts=[prompt_context(path) for _, _, path in frontier]))
                grown = []
                for (i, parent, path), comps in zip(frontier, outs):
                    for c in comps:
                        t = Turn.from_completion(c, agent=role, policy=role, round=level,
                                                 parent=None if parent is None else parent.id)
                        trees[i].append(t)
                        grown.append((i, t, {**path, role: t.text}))
                frontier = grown
        with self.timer("reward"):
            # a leaf scores the refiner's answer (the env scores one final answer)
            vals, rewards = self._leaf_values([(tasks[i], {"refiner": path["refiner"]}) for i, _, path in frontier])
        leaf_comps: list[list[dict[str, float]]] = [[] for _ in tasks]
        for (i, leaf, _), val, rew in zip(frontier, vals, rewards):
            leaf.reward = val
            leaf.meta["reward_total"] = float(rew.total)
            leaf_comps[i].append(rew.components)
        episodes = []
        for i, (task, turns) in enumerate(zip(tasks, trees)):
            backup_values(turns)
            label_tree(turns, thr)
            leaves = [t for t in turns if t.agent == "refiner"]
            gens = [t for t in turns if t.agent == "generator" and t.value is not None]
            comps = {k: mean(c.get(k, 0.0) for c in leaf_comps[i]) for k in (leaf_comps[i][0] if leaf_comps[i] else {})}
            episodes.append(Episode(
                task=task, turns=turns, reward=mean(t.reward for t in leaves) if leaves else None,
                components=comps, group=str(task.get("id", i)), step=step,
                meta={"malt": True, "iteration": k, "threshold": thr, "branching": n,
                      "value": mean(g.value for g in gens) if gens else None}))
        return episodes

    # ---- update -----------------------------------------------------------------------------------
    def iteration_of(self, step: int) -> int:
        """The iteration whose block contains `step` (the trees of a block train together)."""
        return step // self.steps_per_iteration

    def is_train_step(self, step: int) -> bool:
        total = int(self.run.trainer.steps)
        return (step + 1) % self.steps_per_iteration == 0 or (total > 0 and step + 1 >= total)

    def tree_metrics(self, episodes: list[Episode], threshold: float) -> dict[str, float]:
        """The standard block over the trees (a tree's reward is its leaves' mean value, so
        reward/mean is the mean leaf value and reward/max the best tree's), plus per-role node
        values, correct-label shares and the dataset the trees would give."""
        m: dict[str, Any] = {**reward_metrics(episodes), "tree/questions": len(episodes),
                             "tree/solvable": mean(any(t.reward and t.reward > 0 for t in e.turns if t.agent == "refiner")
                                                   for e in episodes)}
        for role in ROLES:
            nodes = [t for e in episodes for t in e.turns if t.agent == role and t.value is not None]
            m[f"tree/value/{role}"] = mean(t.value for t in nodes) if nodes else float("nan")
            m[f"tree/correct/{role}"] = mean(is_correct(t.value, threshold) for t in nodes) if nodes else float("nan")
        m.update(dataset_counts(build_dataset(episodes, threshold, max_pairs_per_parent=self.cfg.max_pairs_per_parent)))
        return m

    def update(self, episodes, step):
        thr = self.cfg.threshold(self.iteration)
        self._pending.extend(episodes)
        metrics = self.tree_metrics(episodes, thr)
        metrics.update({"malt/iteration": self.iteration, "malt/threshold": thr,
                        "malt/pending_questions": len(self._pending), "malt/trained": 0.0})
        if self.is_train_step(step):
            metrics.update(self.train_iteration(step))
            metrics["malt/trained"] = 1.0
        return metrics

    def export_dir(self) -> Path:
        return Path(self.cfg.export_path) if self.cfg.export_path else Path(self.run.trainer.output_dir) / "malt_dataset"

    def train_iteration(self, step: int) -> dict[str, Any]:
        """Datasets from every tree since the last training -> export -> SFT (then DPO) per role."""
        cfg, k = self.cfg, self.iteration
        thr = cfg.threshold(k)
        with self.timer("dataset"):
            rows = build_dataset(self._pending, thr, prompt=self.role_prompt, iteration=k,
                                 max_pairs_per_parent=cfg.max_pairs_per_parent)
            dpo = cfg.dpo_role_set
            for row in rows:
                row["used"] = ((row["role"] in cfg.sft_roles and cfg.sft_epochs > 0) if row["kind"] == "sft"
                               else row["role"] in dpo)
            path = write_jsonl(self.export_dir() / f"iter_{k}.jsonl", rows)
        log.info("MALT iteration %d: %d questions, threshold %.3f, dataset %s -> %s", k, len(self._pending), thr,
                 dataset_counts(rows), path)
        sft = {r: sft_samples(rows, r) if r in cfg.sft_roles and cfg.sft_epochs > 0 else [] for r in ROLES}
        pairs = {r: pair_samples(rows, r) if r in dpo else [] for r in ROLES}
        with self.timer("train"):
            results = self.train_roles(sft, pairs, k)
        metrics: dict[str, Any] = {f"train/{k2}": v for k2, v in dataset_counts(rows).items()}
        for res in results.values():
            metrics.update(res)
        losses = [res.get(f"{r}/dpo_loss", res.get(f"{r}/sft_loss")) for r, res in results.items()]
        losses = [x for x in losses if x is not None]
        if losses:
            metrics["loss"] = mean(losses)
        self.history.append({"iteration": k, "step": step, "threshold": thr, "questions": len(self._pending),
                             "export": str(path), **dataset_counts(rows)})
        self._pending = []
        self.last_train_step = step
        self.iteration += 1
        return metrics

    def train_roles(self, sft: dict[str, list[Sample]], pairs: dict[str, list[PairSample]],
                    iteration: int) -> dict[str, dict[str, Any]]:
        """SFT of every role on its correct nodes, then DPO of every role with pairs against its
        SFT model (snapshot as the reference); the roles train in lockstep within each phase. One
        local RNG per role, seeded from the iteration, shuffles its SFT epochs and then its DPO
        epochs (never the trainer's global RNG state). Returns role -> its metrics."""
        cfg = self.cfg
        rngs = {r: random.Random(self.seed("train", iteration, r)) for r in ROLES}

        def jobs(data, epochs, batch_size, loss):
            return {r: TrainJob(self.policies[r], items, epochs, batch_size, loss, rngs[r])
                    for r, items in data.items() if items}

        sft_done = train_epochs(jobs(sft, cfg.sft_epochs, cfg.sft_batch_size,
                                     LossConfig(kind="sft", clip_eps=None, agg="token_mean")))
        for r, items in pairs.items():
            if items:
                self.policies[r].snapshot_reference()  # the SFT model is DPO's reference
        dpo_done = train_epochs(jobs(pairs, cfg.dpo_epochs, cfg.dpo_batch_size,
                                     LossConfig(kind="dpo", clip_eps=None, agg="token_mean", beta=cfg.dpo_beta)))
        out = {}
        for r in ROLES:
            m: dict[str, Any] = {f"{r}/sft_samples": len(sft.get(r, [])), f"{r}/dpo_pairs": len(pairs.get(r, []))}
            if r in sft_done:
                m.update(phase_metrics(f"{r}/sft", sft_done[r], ("loss",)))
            if r in dpo_done:
                m.update(phase_metrics(f"{r}/dpo", dpo_done[r], ("loss", "accuracy", "reward_margin")))
            out[r] = m
        return out

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "last_train_step": self.last_train_step,
                "steps_per_iteration": self.steps_per_iteration, "baselines": dict(self.baselines),
                "initial_outcomes": dict(self.initial_outcomes),
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state.get("iteration", 0))
        self.last_train_step = int(state.get("last_train_step", -1))
        self.steps_per_iteration = int(state.get("steps_per_iteration", self.steps_per_iteration))
        self.baselines = dict(state.get("baselines", {}))
        self.initial_outcomes = dict(state.get("initial_outcomes", {}))
        self.history = list(state.get("history", []))
        stored = self.buffer.read() if self.buffer is not None else []
        self._pending = [e for e in stored if e.meta.get("malt") and e.step > self.last_train_step]
        if self._pending:
            log.info("MALT resume: %d trees collected since the last training (step %d) read back from the buffer",
                     len(self._pending), self.last_train_step)

    # ---- evaluation -------------------------------------------------------------------------------
    def prepare(self, tasks):
        """Nothing heavy: the trees are collected step by step. With `baselines=initial`, the
        untrained roles are scored once here on every task the run will evaluate (dev with
        trainer.eval_every, test with trainer.test; in one pass), reported under baseline/; with
        `base`, only the initial generator's chains and their vote."""
        if self.cfg.baselines in ("initial", "base") and not self.baselines:
            eval_tasks = [t for split in self.run.trainer.eval_splits()
                          for t in self.env.tasks(split)[: self.run.trainer.eval_size]]
            if eval_tasks:
                with self.timer("baseline"):
                    outcomes = self.chain_outcomes(eval_tasks, self.policies, prefix=BASELINE,
                                                   generator_only=self.cfg.baselines == "base")
                # their replies are saved with every evaluation that reports them (`initial_replies_of`)
                replies, self._replies = self._replies, {}
                self.initial_outcomes = {"ids": [t["id"] for t in eval_tasks], "outcomes": outcomes,
                                         "replies": replies}
                self.baselines = outcome_metrics(outcomes)
        return tasks

    def initial_outcomes_of(self, tasks) -> dict[str, list[float]]:
        """The untrained roles' outcomes on `tasks`, in their order, if `prepare` scored them all; else {}."""
        position = {tid: i for i, tid in enumerate(self.initial_outcomes.get("ids", []))}
        if not all(t["id"] in position for t in tasks):
            return {}
        return {k: [v[position[t["id"]]] for t in tasks] for k, v in self.initial_outcomes["outcomes"].items()}

    def initial_replies_of(self, tasks) -> dict[str, list[dict[str, Any]]]:
        """The untrained roles' kept replies on `tasks` (scored by `prepare`), in their order."""
        kept = self.initial_outcomes.get("replies", {})
        by_id = {name: {row["task_id"]: row for row in rows} for name, rows in kept.items()}
        return {name: [rows[t["id"]] for t in tasks] for name, rows in by_id.items()}

    def evaluate(self, tasks):
        """The chains of the trained roles and the baselines, with 95% intervals over the
        questions and the paired differences of `comparisons()` (where the baseline was scored on the
        same questions: always with `frozen`, with `initial` when these questions were scored
        before training)."""
        if not tasks:
            return {}
        outcomes = self.chain_outcomes(tasks, self.policies)
        initial = {}
        if self.cfg.baselines == "frozen" and "base" in self.policies:
            base = {r: self.policies["base"] for r in ROLES}
            outcomes.update(self.frozen_baseline("base", tasks, lambda: self.chain_outcomes(
                tasks, base, ablations=False, prefix=BASELINE)))
        elif initial_outcomes := self.initial_outcomes_of(tasks):
            outcomes.update(initial_outcomes)
            self._replies.update(self.initial_replies_of(tasks))
        else:
            initial = self.baselines  # scored on other questions: reported, not paired
        return {**self.eval_metrics(outcomes), **initial, "generations_per_question": float(3 * self.cfg.chains)}

    def comparisons(self) -> list[tuple[str, str]]:
        """The trained G -> V -> R + MV against the untrained G -> V -> R + MV, against the base
        model sampled `chains` times + MV, and against the trained generator alone + MV."""
        return [("mv/gvr", "baseline/mv/gvr"), ("mv/gvr", "baseline/mv/g"), ("mv/gvr", "mv/g")]

    def _correct(self, items: list[tuple[dict, dict[str, str]]]) -> list[float]:
        return self._leaf_values(items)[0]

    def chain_outcomes(self, tasks, pols: dict, ablations: Optional[bool] = None,
                       prefix: str = "", generator_only: bool = False) -> dict[str, list[float]]:
        """`chains` G -> V -> R chains per question (one generate call per stage for all questions)
        and majority votes; ablations G only, G+V (generator revises with the critique), G+R.
        Returns one outcome per question for every metric (named `<prefix><metric>`; BASELINE for
        the untrained roles): a vote's correctness, or the mean over the question's chains of a
        per-chain score. Every vote keeps its replies (`keep_replies`, `<prefix>mv/<variant>`): per
        question the final reply of the chain the vote picked, with the chains' final replies it
        voted over (`candidates`). `generator_only`: the generator's chains and their vote (`mv/g`,
        `acc/generator`), nothing after them."""
        cfg, C = self.cfg, self.cfg.chains
        ablations = (cfg.eval_ablations if ablations is None else ablations) and not generator_only
        if not tasks:
            return {}
        flat = [(i, c) for i in range(len(tasks)) for c in range(C)]  # (question, chain)
        chain_tasks = [tasks[i] for i, _ in flat]
        sent: dict[str, list[GenerationRequest]] = {}  # stage -> its requests, one per chain

        def ask(role: str, stage: str, contexts: list[dict[str, str]]):
            """One request per chain, all of a stage dispatched at once."""
            sent[stage] = self.role_requests(role, chain_tasks, 1, cfg.eval_temperature, seed=("eval", stage),
                                             contexts=contexts)
            return pols[role].generate_async(sent[stage])

        def chain_texts(results) -> dict[tuple[int, int], str]:
            return {k: (r[0].text if r else "") for k, r in zip(flat, results)}

        g_reqs = self.role_requests("generator", tasks, C, cfg.eval_temperature, seed=("eval", "g"))
        sent["g"] = [g_reqs[i] for i, _ in flat]  # one request per question samples all its chains
        G = pols["generator"].generate(g_reqs)
        g_text = {(i, c): (G[i][c].text if c < len(G[i]) else "") for i, c in flat}
        stages = {"generator": ("generator", g_text)}
        if not generator_only:
            v_pending = ask("verifier", "v", [{"answer": g_text[k]} for k in flat])
            gr_pending = ask("refiner", "gr", [{"answer": g_text[k], "critique": cfg.no_critique} for k in flat]) \
                if ablations else None
            v_text = chain_texts(v_pending.result())
            r_pending = ask("refiner", "r", [{"answer": g_text[k], "critique": v_text[k]} for k in flat])
            gv_pending = ask("generator", "gv", [{"previous": g_text[k], "feedback": v_text[k]} for k in flat]) \
                if ablations else None
            r_text = chain_texts(r_pending.result())
            stages["refiner"] = ("refiner", r_text)
            if ablations:
                stages["gv"] = ("generator", chain_texts(gv_pending.result()))
                stages["gr"] = ("refiner", chain_texts(gr_pending.result()))
        correct = {name: dict(zip(flat, self._correct([(tasks[i], {key: texts[i, c]}) for i, c in flat])))
                   for name, (key, texts) in stages.items()}
        questions = range(len(tasks))

        def mv(name: str, metric: str) -> list[float]:
            """The majority vote over stage `name`'s chains: its correctness per question, its
            replies kept under `<prefix><metric>` (no vote: the first chain's, which has no answer)."""
            role, texts = stages[name]
            votes = [vote(self.env, [texts[i, c] for c in range(C)]) for i in questions]
            scores = [0.0 if v is None else float(correct[name][i, v]) for i, v in zip(questions, votes)]
            picked = [(i, v or 0) for i, v in zip(questions, votes)]
            reqs = sent[{"generator": "g", "refiner": "r"}.get(name, name)]
            self.keep_replies(prefix + metric, tasks, {role: ([reqs[i * C + c] for i, c in picked],
                                                              [texts[k] for k in picked])},
                              scores, cfg.reward_key, candidates=[[texts[i, c] for c in range(C)] for i in questions])
            return scores

        def per_question(chain_values: dict[tuple[int, int], float]) -> list[float]:
            return [mean(chain_values[i, c] for c in range(C)) for i in questions]

        res = {}
        if not generator_only:
            final = self.env.reward_batch([(tasks[i], {"refiner": r_text[i, c]}) for i, c in flat])
            verdicts = {k: verdict(v_text[k]) for k in flat}
            res = {
                "mv/gvr": mv("refiner", "mv/gvr"),
                "acc/refiner": per_question(correct["refiner"]),
                "acc/verifier_verdict": per_question({k: float(v is not None and v == (correct["generator"][k] > 0))
                                                      for k, v in verdicts.items()}),
                **{k: per_question(dict(zip(flat, v))) for k, v in score_outcomes(final).items()},
            }
        res.update({"mv/g": mv("generator", "mv/g"), "acc/generator": per_question(correct["generator"])})
        if ablations:
            res.update({"mv/gv": mv("gv", "mv/gv"), "mv/gr": mv("gr", "mv/gr"), "acc/gv": per_question(correct["gv"]),
                        "acc/gr": per_question(correct["gr"])})
        return {prefix + k: v for k, v in res.items()}
