"""The HF transformers rollout backend: `generate` with left-padded batches; needs nothing extra.

Log-probs: `generate(..., output_scores=True)` returns, per step, the scores the next token was
drawn from after all logits processors and warpers (temperature, top-p). log_softmax of those at
the sampled token is the behaviour policy's log-prob, the same quantity the vLLM backend returns
(`logprobs_mode="processed_logprobs"`); greedy decoding applies no warpers, so there it is the
plain model log-prob.

Stop strings follow vLLM with `include_stop_str_in_output=True`: a row stops once its text contains
one anywhere (transformers' own `stop_strings` only match at the end); the tokens up to the completing
one are kept, and the text ends with the stop string (it matches the tokens that are trained on).

Every generation knob is set explicitly: `generate` otherwise fills unset ones from the model's
`generation_config.json` and from global defaults (top_k=50 among them).
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from marl_llm import runtime
from marl_llm.config import ModelConfig, RolloutConfig
from marl_llm.rollout.backend import RolloutBackend, eos_ids
from marl_llm.types import Completion, GenerationRequest, SamplingConfig

log = logging.getLogger(__name__)

GREEDY_EPS = 1e-5


class StopOnText(StoppingCriteria):
    """Stop a row once its generated text contains a stop string anywhere (vLLM's semantics;
    transformers' own `stop_strings` only match at the end of the text)."""

    def __init__(self, tokenizer, stops: list[str], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, [x for x in stops if x], start
        # a string of m characters spans at most m tokens; the margin covers empty special tokens
        self.window = max(len(x) for x in self.stops) + 8 if self.stops else 0

    def __call__(self, input_ids: torch.Tensor, scores=None, **kw) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.start:].tolist():
            text = self.tokenizer.decode(row[-self.window:], skip_special_tokens=True)
            done.append(any(x in text for x in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop(tokenizer, toks: list[int], stops: list[str]) -> tuple[int, str] | None:
    """(number of tokens up to the one that completes the first stop string, text up to and
    including it)."""
    stops = [x for x in stops if x]
    text = tokenizer.decode(toks, skip_special_tokens=True)
    if not any(x in text for x in stops):
        return None
    lo, hi = 1, len(toks)  # "prefix contains a stop string" is monotone: bisect the shortest
    while lo < hi:
        mid = (lo + hi) // 2
        if any(x in tokenizer.decode(toks[:mid], skip_special_tokens=True) for x in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo, text[:min(text.find(x) + len(x) for x in stops if x in text)]


def _key(s: SamplingConfig) -> tuple:
    """Requests batch together when they sample alike. The seed is left out so that per-request
    seeds (every algorithm sets them) do not turn batching off: a batch is seeded with its first
    request's seed, which makes it reproducible for the same requests (vLLM seeds each request)."""
    return (s.n, float(s.temperature), float(s.top_p), int(s.max_tokens),
            tuple(s.stop) if s.stop else None)


class HFBackend(RolloutBackend):
    name = "hf"

    def __init__(self, model_path: str, model_cfg: ModelConfig, rollout_cfg: RolloutConfig,
                 seed: int, tokenizer=None):
        super().__init__(model_path, model_cfg, rollout_cfg, seed, tokenizer)
        import transformers
        from transformers import AutoModelForCausalLM

        from marl_llm import runtime
        self.version = transformers.__version__
        self.device = torch.device("cuda") if runtime.has_gpu() else torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # 2 threads on 2 shared cores collapse (docs/CPU.md, Threads)
        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, model_cfg.dtype)).to(self.device).eval()
        self.eos = sorted(eos_ids(model_path, self.tokenizer))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos[0]
        self.batch_size = max(1, int(rollout_cfg.hf_batch_size))
        torch.manual_seed(seed)
        self.start_s = time.perf_counter() - t0
        log.info("HF transformers %s engine (generate, %s, %s) for %s started in %.1fs", self.version,
                 self.device.type, model_cfg.dtype, model_path, self.start_s)

    def info(self) -> dict:
        return {**super().info(), "device": self.device.type, "engine_start_s": round(self.start_s, 2)}

    # ---- generation ------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest], adapter=None) -> list[list[Completion]]:
        if adapter is not None:
            raise NotImplementedError("the hf rollout backend serves no LoRA adapters")
        prompts = [self.prompt_ids(r) for r in requests]
        out: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(_key(r.sampling), []).append(i)
        for idx in groups.values():
            s = requests[idx[0]].sampling
            per_batch = max(1, self.batch_size // max(1, s.n))  # hf_batch_size counts sequences
            for a in range(0, len(idx), per_batch):
                chunk = idx[a:a + per_batch]
                runtime.rebalance()
                seeded = requests[chunk[0]].sampling
                for i, comps in zip(chunk, self._generate_batch([prompts[i] for i in chunk], seeded)):
                    out[i] = comps
        return out

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], s: SamplingConfig) -> list[list[Completion]]:
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every prompt ends at column `width`
            if p:
                ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[row, width - len(p):] = 1
        greedy = s.temperature < GREEDY_EPS
        gc = GenerationConfig(
            # greedy samples are identical: decode once, copy n times below
            do_sample=not greedy, num_beams=1, num_return_sequences=1 if greedy else s.n,
            max_new_tokens=s.max_tokens,
            temperature=1.0 if greedy else float(s.temperature), top_p=1.0 if greedy else float(s.top_p),
            top_k=0, min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
            eos_token_id=self.eos, pad_token_id=self.pad_id, bos_token_id=None,
            output_scores=True, return_dict_in_generate=True)
        kw = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), generation_config=gc)
        if s.stop:
            kw["stopping_criteria"] = StoppingCriteriaList([StopOnText(self.tokenizer, list(s.stop), width)])
        if s.seed is not None and not greedy:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(int(s.seed))
                res = self.model.generate(**kw)
        else:
            res = self.model.generate(**kw)

        new = res.sequences[:, width:].cpu()                     # [rows, steps]
        steps = len(res.scores)
        lps = torch.empty(new.shape[0], steps)
        for t, sc in enumerate(res.scores):                      # per step: [rows, vocab]
            lsm = torch.log_softmax(sc.float(), dim=-1).cpu()
            lps[:, t] = lsm.gather(1, new[:, t:t + 1]).squeeze(1)
        eos = set(self.eos)
        results = []
        for p_i, p in enumerate(prompts):
            comps = []
            rows = [p_i] * s.n if greedy else range(p_i * s.n, (p_i + 1) * s.n)
            for row in rows:
                toks = new[row].tolist()
                end, reason = len(toks), "length"
                for t, tok in enumerate(toks):       # everything after the first EOS is padding
                    if tok in eos:
                        end, reason = t + 1, "stop"
                        break
                toks = toks[:end]
                # a row stopped by a stop string is padded after it (pad may equal EOS): cut there
                cut = cut_at_stop(self.tokenizer, toks, list(s.stop)) if s.stop else None
                if cut is not None:
                    end, text, reason = cut[0], cut[1], "stop"
                    toks = toks[:end]
                else:
                    text = self.tokenizer.decode(toks, skip_special_tokens=True)
                comps.append(Completion(prompt_ids=list(p), completion_ids=toks,
                                        logprobs=lps[row, :end].tolist(), text=text, finish_reason=reason))
            results.append(comps)
        return results

    # ---- weights ---------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        named = self.spec.normalise(named_tensors, keep_lm_head=True)
        expected = self.model.state_dict().keys()
        # a tied lm_head may or may not be listed by state_dict(); follow the model
        state = {n: t for n, t in named if n in expected or n != self.spec.LM_HEAD}
        # strict: every parameter replaced, nothing unknown (validated above, checked again here)
        self.model.load_state_dict(state, strict=True)
        if self.spec.tied:
            self.model.tie_weights()
