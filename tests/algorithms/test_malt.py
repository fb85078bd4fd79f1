"""MALT on hand-built trees and fake policies (no engines), plus one slow end-to-end run.

Fake policies implement the Policy surface MALT uses (generate, generate_async, train_async,
snapshot_reference) and answer from the prompt, so every value, label, dataset and vote below is
computable by hand.
"""
import json
import random
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FakePolicy as SharedFakePolicy

from algorithms.base import majority_index
from algorithms.malt import (MALT, PROMPTS, ROLES, MALTConfig, backup_values, build_dataset, is_correct, label_tree,
                             pair_samples, sft_samples, verdict)
from envs.base import Env, EnvConfig, Reward, make_env
from marl_llm.buffer import TrajectoryBuffer
from marl_llm.config import (ClusterConfig, ConfigError, LearnerConfig, LoraConfig, ModelConfig, RolloutConfig,
                             RunConfig, TrainerConfig)
from marl_llm.jsonl import read_jsonl, write_jsonl
from marl_llm.types import Episode, PairSample, Turn, chunks


# ---- fakes ------------------------------------------------------------------------------------------
class FakeEnv(Env):
    """An answer env the fake policies can read: its own (answering) prompt is JSON (role, gold,
    context); MALT fills its verifier and refiner templates with the question `gold=<answer>`
    (`prompt_of` reads both back)."""

    def question_text(self, task):
        return f"gold={task['answer']}"

    def instruction(self, task):
        return "End with <answer>X</answer>."

    def messages(self, user):
        return [{"role": "user", "content": user}]

    def prompt(self, task, role="single", **context):
        return self.messages(json.dumps({"role": role, "gold": task["answer"], **context}))

    def extract_answer(self, text):
        m = re.findall(r"<answer>(.*?)</answer>", text or "")
        return m[-1].strip() if m else None

    def reward(self, task, outputs):
        (final,) = outputs.values()  # one final answer, as an answer env scores
        c = float(self.extract_answer(final) == task["answer"])
        return Reward(c, {"correct": c, "format": float(self.extract_answer(final) is not None)})


def template_pattern(template):
    """A regex that reads a template's `{field}` values back from the filled text."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(x) if i % 2 == 0 else f"(?P<{x}>.*?)" for i, x in enumerate(parts)) + r"\Z",
                      re.S)


def prompt_of(content):
    """The fields of a fake prompt: the env's JSON, or the values MALT's template was filled with."""
    if content.startswith("{"):
        return json.loads(content)
    for role, template in PROMPTS.items():
        m = template_pattern(template).match(content)
        if m:
            return {"role": role, "gold": m["question"].removeprefix("gold="), **m.groupdict()}
    raise AssertionError(f"not a prompt of the fake env or of MALT: {content!r}")


def ids(text):
    return [1 + (ord(ch) % 200) for ch in text] or [1]


class Step:
    """A fake in-flight train step: the step ran at dispatch; `result()` logs its collection."""

    def __init__(self, trace, key, metrics):
        self.trace, self.key, self.metrics = trace, key, metrics

    def result(self):
        self.trace.append(("result", *self.key))
        return self.metrics


class RecordingPolicy(SharedFakePolicy):
    """The shared fake with `train_async`; `trace` logs every role's train dispatches, results and
    reference snapshots in one order (what lockstep training promises)."""

    def __init__(self, *args, trace, **kw):
        super().__init__(*args, **kw)
        self.trace = trace

    def train_async(self, samples, loss):
        self.trace.append(("dispatch", self.name, loss.kind))
        return Step(self.trace, (self.name, loss.kind), self.train(samples, loss))

    def snapshot_reference(self):
        self.trace.append(("snapshot", self.name))
        super().snapshot_reference()


def FakePolicy(name, respond, trace=None):
    """A fake answering from the prompt's fields (`prompt_of`): `respond(fields, k)`."""
    return RecordingPolicy(name, lambda p, req, k: respond(prompt_of(req.messages[-1]["content"]), k),
                           prompt_ids=lambda req: ids(req.messages[-1]["content"]), completion_ids=ids,
                           sample_logprob=-0.5, score_logprob=-0.25,
                           train_metrics={"loss": 0.5, "accuracy": 1.0, "reward_margin": 0.1},
                           trace=[] if trace is None else trace)


def tree_responders(n):
    """Generator sample g, critique j, refinement k: the refinement is right iff g + j + k < n."""
    def gen(p, k):
        return f"G{k} <answer>{p['gold'] if k == 0 else 'no'}</answer>"

    def ver(p, k):
        return f"V{k} on {p['answer'][:2]}"

    def ref(p, k):
        g, j = int(p["answer"][1]), int(p["critique"][1])
        return f"R{k} <answer>{p['gold'] if g + j + k < n else 'wrong'}</answer>"
    return {"generator": gen, "verifier": ver, "refiner": ref}


def make_run(tmp_path, cfg, steps=1, batch_size=2, model=None, temperature=0.3):
    """The run of the MALT presets: trees sampled at rollout.temperature=0.3 (the paper's)."""
    return RunConfig(algo=cfg, env=EnvConfig(name="fake"), model=model or ModelConfig(name="tiny", source="tiny"),
                     rollout=RolloutConfig(max_new_tokens=16, temperature=temperature), learner=LearnerConfig(),
                     cluster=ClusterConfig(),
                     trainer=TrainerConfig(steps=steps, batch_size=batch_size, output_dir=str(tmp_path),
                                           loggers=[], progress=False))


def make_algo(tmp_path, steps=1, responders=None, buffer=None, env=None, trace=None, **kw):
    cfg = MALTConfig(**kw)
    algo = MALT(cfg, env or FakeEnv(EnvConfig(name="fake")), make_run(tmp_path, cfg, steps=steps))
    algo.validate()
    responders = responders or tree_responders(cfg.branching)
    trace = [] if trace is None else trace
    pols = {r: FakePolicy(r, responders[r], trace) for r in ROLES}
    algo.setup(pols, buffer if buffer is not None else TrajectoryBuffer(tmp_path / "buffer.jsonl"))
    return algo, pols


def tasks(k, start=0):
    return [{"id": f"q{i}", "answer": str(10 + i)} for i in range(start, start + k)]


def run_steps(algo, steps, k=2):
    out = []
    for step in steps:
        eps = algo.collect(tasks(k, start=step * k), step)
        algo.buffer.add(eps)
        out.append(algo.update(eps, step))
    return out


# ---- hand-built tree ----------------------------------------------------------------------------------
def T(agent, tid, parent=None, reward=None):
    return Turn(agent=agent, policy=agent, prompt_ids=ids(f"p-{parent}-{agent}"), completion_ids=ids(tid),
                text=tid, parent=parent, id=tid, reward=reward)


def hand_tree():
    """Branching 2. Leaves under v11 [1,1], v12 [1,0], v21 [0,0], v22 [1,0].
    Values: v11 1.0, v12 0.5, v21 0.0, v22 0.5; g1 0.75, g2 0.25."""
    turns = [T("generator", "g1"), T("generator", "g2")]
    turns += [T("verifier", v, parent="g" + v[1]) for v in ("v11", "v12", "v21", "v22")]
    leaves = {"v11": [1, 1], "v12": [1, 0], "v21": [0, 0], "v22": [1, 0]}
    for v, rs in leaves.items():
        turns += [T("refiner", f"r{v[1:]}{k + 1}", parent=v, reward=r) for k, r in enumerate(rs)]
    return turns


def hand_episode(threshold=0.5):
    turns = hand_tree()
    backup_values(turns)
    label_tree(turns, threshold)
    return Episode(task={"id": "q", "answer": "1"}, turns=turns, group="q", meta={"malt": True}), {t.id: t for t in turns}


def test_value_backup_means_of_children():
    _, t = hand_episode()
    assert [t[v].value for v in ("v11", "v12", "v21", "v22")] == [1.0, 0.5, 0.0, 0.5]
    assert t["g1"].value == 0.75 and t["g2"].value == 0.25
    assert t["r111"].value == 1.0 and t["r122"].value == 0.0


def test_labels_strictly_above_threshold_exactly_half_is_incorrect():
    _, t = hand_episode(0.5)
    assert is_correct(0.5, 0.5) is False and is_correct(0.5000001, 0.5) is True and is_correct(None, 0.0) is False
    correct = {k for k, x in t.items() if x.meta["correct"]}
    assert correct == {"g1", "v11", "r111", "r112", "r121", "r221"}
    assert t["v12"].meta["correct"] is False and t["v22"].meta["correct"] is False  # value exactly 0.5


def test_threshold_change_moves_labels_and_sets():
    ep, _ = hand_episode()
    low = build_dataset([ep], 0.4)
    assert sorted(r["turn_id"] for r in low if r["kind"] == "sft" and r["role"] == "verifier") == ["v11", "v12", "v22"]
    # at 0.4 both critiques under g1 are correct: no verifier pair there; under g2, v22 beats v21
    vp = [(r["chosen"]["turn_id"], r["rejected"]["turn_id"]) for r in low if r["kind"] == "pair" and r["role"] == "verifier"]
    assert vp == [("v22", "v21")]
    high = build_dataset([ep], 0.8)
    assert [r["turn_id"] for r in high if r["kind"] == "sft" and r["role"] == "generator"] == []  # g1 = 0.75


def test_sft_sets_per_role():
    ep, _ = hand_episode()
    rows = build_dataset([ep], 0.5)
    sft = {r: sorted(x["turn_id"] for x in rows if x["kind"] == "sft" and x["role"] == r) for r in ROLES}
    assert sft == {"generator": ["g1"], "verifier": ["v11"], "refiner": ["r111", "r112", "r121", "r221"]}
    samples = sft_samples(rows, "refiner")
    assert len(samples) == 4 and all(s.completion_ids for s in samples)


def test_dpo_pairs_are_correct_incorrect_siblings():
    ep, t = hand_episode()
    rows = build_dataset([ep], 0.5)
    pairs = {r: sorted((x["chosen"]["turn_id"], x["rejected"]["turn_id"]) for x in rows
                       if x["kind"] == "pair" and x["role"] == r) for r in ROLES}
    # refinements under one critique: v11 all correct, v21 all wrong -> no pair; v12, v22 one each
    assert pairs["refiner"] == [("r121", "r122"), ("r221", "r222")]
    assert pairs["verifier"] == [("v11", "v12")]          # critiques under g1; none under g2
    assert pairs["generator"] == [("g1", "g2")]           # answers under the question (built, unused)
    for x in rows:
        if x["kind"] == "pair":
            assert t[x["chosen"]["turn_id"]].parent == t[x["rejected"]["turn_id"]].parent == x["parent"]
            assert x["prompt_ids"] == t[x["chosen"]["turn_id"]].prompt_ids


def test_every_combination_and_cap():
    turns = [T("generator", "g")] + [T("verifier", "v", parent="g")]
    turns += [T("refiner", f"r{k}", parent="v", reward=r) for k, r in enumerate([1, 1, 1, 0, 0])]
    backup_values(turns)
    ep = Episode(task={"id": "q"}, turns=turns)
    ref = [x for x in build_dataset([ep], 0.5) if x["kind"] == "pair" and x["role"] == "refiner"]
    assert len(ref) == 3 * 2
    capped = [x for x in build_dataset([ep], 0.5, max_pairs_per_parent=2) if x["kind"] == "pair"]
    chosen = [x["chosen"]["turn_id"] for x in capped]
    rejected = [x["rejected"]["turn_id"] for x in capped]
    assert len(capped) == 2 and set(chosen) == {"r0", "r1"} and set(rejected) == {"r3", "r4"}
    assert len({(x["chosen"]["turn_id"], x["rejected"]["turn_id"]) for x in ref}) == 6


def test_export_jsonl_round_trip(tmp_path):
    ep, _ = hand_episode()
    algo, _ = make_algo(tmp_path)
    rows = build_dataset([ep], 0.5, prompt=algo.role_prompt)
    path = write_jsonl(tmp_path / "d" / "iter_0.jsonl", rows)
    back = read_jsonl(path, "the MALT export")
    assert back == rows
    assert all("messages" in r for r in back)
    for role in ROLES:
        assert sft_samples(back, role) == sft_samples(rows, role)
        assert pair_samples(back, role) == pair_samples(rows, role)


# ---- voting --------------------------------------------------------------------------------------------
def test_majority_vote_and_ties():
    assert majority_index(["3", "4", "4"]) == 1
    assert majority_index(["3", "4", "5"]) == 0            # three-way tie: the first answer seen
    assert majority_index(["4", "3", "3", "4"]) == 0       # 2-2 tie: the class that appeared first
    assert majority_index([None, "7", None]) == 1          # no answer never votes
    assert majority_index([None, None]) is None
    same = lambda a, b: float(a) == float(b)  # noqa: E731
    assert majority_index(["2", "3", "3.0"], same) == 1
    assert verdict("step 2 is wrong. Verdict: incorrect") is False
    assert verdict("Everything checks out. Verdict: Correct.") is True and verdict("hmm") is None


# ---- prompts ---------------------------------------------------------------------------------------------
SYSTEM = ("You are a careful problem solver. Reason step by step, then give the final answer inside <answer></answer> "
          "tags.")
QUESTION = "What is 2 + 3?"
INSTRUCTION = "End your reply with the final number in the form <answer>N</answer>."


def math_algo(tmp_path, **kw):
    cfg = MALTConfig(**kw)
    algo = MALT(cfg, make_env({"name": "math", "source": "generator", "train_size": 1, "eval_size": 1}),
                make_run(tmp_path, cfg))
    algo.validate()
    return algo


def test_prompts_are_the_texts_the_env_built_before(tmp_path):
    """The role prompts and stop strings, byte for byte as env=math built them when its roles
    included MALT's (the verifier's and refiner's texts are MALT's own now)."""
    algo = math_algo(tmp_path)
    task = {"id": "t", "question": QUESTION, "answer": "5"}
    answer, critique = "  3 + 2 = 5 <answer>5</answer>\n", "\nStep 1 is right. Verdict: correct  "
    user = {
        "generator": f"{QUESTION}\n\nSolve the problem step by step. {INSTRUCTION}",
        "verifier": (f"{QUESTION}\n\nProposed solution:\n3 + 2 = 5 <answer>5</answer>\n\nCheck this solution step "
                     "by step and point out any mistakes. Do not write a new solution. End with a verdict: correct or "
                     "incorrect."),
        "refiner": (f"{QUESTION}\n\nProposed solution:\n3 + 2 = 5 <answer>5</answer>\n\nCritique of the solution:\n"
                    f"Step 1 is right. Verdict: correct\n\nUsing the critique, write the final correct solution. "
                    f"{INSTRUCTION}"),
    }
    context = {"generator": {}, "verifier": {"answer": answer}, "refiner": {"answer": answer, "critique": critique}}
    stops = {"generator": ["</answer>"], "verifier": None, "refiner": ["</answer>"]}
    for role in ROLES:
        (req,) = algo.role_requests(role, [task], 2, seed=("tree", 0, role), contexts=[context[role]])
        assert req.messages == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user[role]}], role
        assert req.sampling.stop == stops[role] and req.sampling.n == 2 and req.sampling.temperature == 0.3, role
        assert req.sampling.seed == algo.seed("tree", 0, role, 0)
    # the G+V ablation: the generator revises its answer with the critique (the env's feedback prompt)
    revise = algo.role_prompt(task, "generator", previous="P", feedback="F")
    assert revise[-1]["content"] == (user["generator"] + "\n\nYour previous response:\nP\n\nHere is the feedback:"
                                     "\nF\n\nRevise your response.")
    with pytest.raises(ValueError, match="role 'verifier' needs context answer"):
        algo.role_prompt(task, "verifier")
    with pytest.raises(ValueError, match="role 'refiner' needs context answer=<generator output> and critique"):
        algo.role_prompt(task, "refiner", answer="x")


def test_prompt_override_per_role(tmp_path):
    algo = math_algo(tmp_path, prompts={"verifier": "Q: {question}\nA: {answer}\nVerdict?"})
    task = {"id": "t", "question": QUESTION, "answer": "5"}
    assert algo.role_prompt(task, "verifier", answer=" 7 ")[-1]["content"] == f"Q: {QUESTION}\nA: 7\nVerdict?"
    assert algo.role_prompt(task, "refiner", answer="7", critique="c")[-1]["content"].startswith(
        f"{QUESTION}\n\nProposed solution:\n7\n\nCritique of the solution:\nc\n\n")


# ---- collection ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5])
def test_collect_is_three_batched_calls(tmp_path, k):
    algo, pols = make_algo(tmp_path, branching=3)
    eps = algo.collect(tasks(k), step=0)
    assert [len(pols[r].calls) for r in ROLES] == [1, 1, 1]
    assert [len(pols[r].calls[0]) for r in ROLES] == [k, 3 * k, 9 * k]
    assert all(req.sampling.n == 3 and req.sampling.temperature == 0.3 for r in ROLES for req in pols[r].calls[0])
    assert len(eps) == k
    for ep in eps:
        by_id = {t.id: t for t in ep.turns}
        count = {r: [t for t in ep.turns if t.agent == r] for r in ROLES}
        assert [len(count[r]) for r in ROLES] == [3, 9, 27]
        assert all(t.parent is None for t in count["generator"])
        assert all(by_id[t.parent].agent == "generator" for t in count["verifier"])
        assert all(by_id[t.parent].agent == "verifier" for t in count["refiner"])
        for v in count["verifier"]:  # V(v) = mean of its refinements, V(g) = mean of its critiques
            kids = [t.value for t in count["refiner"] if t.parent == v.id]
            assert len(kids) == 3 and v.value == pytest.approx(sum(kids) / 3)
            assert v.meta["correct"] == (v.value > 0.5)
        g_vals = sorted(g.value for g in count["generator"])
        # refinement right iff g + j + k < 3: g=0 -> 6/9, g=1 -> 3/9, g=2 -> 1/9
        assert g_vals == pytest.approx([1 / 9, 3 / 9, 6 / 9])
        assert ep.reward == pytest.approx(10 / 27) and ep.meta["threshold"] == 0.5
    # the verifier saw the generator's answer; the refiner saw answer and critique
    assert prompt_of(pols["verifier"].calls[0][0].messages[0]["content"])["answer"].startswith("G0")
    p = prompt_of(pols["refiner"].calls[0][0].messages[0]["content"])
    assert p["answer"].startswith("G0") and p["critique"].startswith("V0")


def test_trees_are_stored_with_values_in_the_buffer(tmp_path):
    algo, _ = make_algo(tmp_path, branching=2)
    run_steps(algo, [0])
    back = TrajectoryBuffer.load(tmp_path / "buffer.jsonl").episodes
    assert len(back) == 2 and all(len(e.turns) == 2 + 4 + 8 for e in back)
    assert all(t.value is not None and "correct" in t.meta for e in back for t in e.turns)


# ---- training ---------------------------------------------------------------------------------------------
def kinds(pol):
    """Event kinds in order: sft / dpo (train steps), snapshot, logprobs (a scoring call)."""
    return [e[1] if e[0] == "train" else e[0] for e in pol.events]


def test_update_trains_per_role_sft_then_dpo(tmp_path):
    algo, pols = make_algo(tmp_path, steps=1, branching=2, sft_batch_size=2, sft_epochs=2)
    (m,) = run_steps(algo, [0], k=3)
    assert m["malt/trained"] == 1.0
    # per question (branching 2): gen SFT {g0}; verifier SFT {v0 under g0}; 4 refiner leaves right
    assert m["train/data/sft/generator"] == 3 and m["train/data/sft/verifier"] == 3
    assert m["train/data/sft/refiner"] == 12
    assert m["train/data/pairs/refiner"] == 6 and m["train/data/pairs/verifier"] == 3
    assert m["train/data/pairs/generator"] == 3
    assert set(kinds(pols["generator"])) == {"sft"}                      # SFT only
    assert len(kinds(pols["generator"])) == 2 * 2                          # 2 epochs x ceil(3 / 2) steps
    for role, sft_steps in (("verifier", 2 * 2), ("refiner", 2 * 6)):
        k = kinds(pols[role])
        first_dpo = k.index("dpo")
        assert k[:first_dpo] == ["sft"] * sft_steps + ["snapshot"]   # SFT, then the SFT model is the reference
        assert set(k[first_dpo:]) == {"dpo"}   # no scoring call: the learner scores the reference in the step
        dpo = [s for e in pols[role].events if e[0] == "train" and e[1] == "dpo" for s in e[2]]
        assert dpo and all(isinstance(p, PairSample) for p in dpo)
        assert next(e[3] for e in pols[role].events if e[0] == "train" and e[1] == "dpo").beta == 0.2
    assert all(len(e[2]) <= 2 for e in pols["refiner"].events if e[0] == "train" and e[1] == "sft")


def test_generator_dpo_and_role_selection(tmp_path):
    algo, pols = make_algo(tmp_path, branching=2, generator_dpo=True, dpo_roles=["refiner"], sft_roles=["refiner"])
    run_steps(algo, [0])
    assert kinds(pols["generator"])[:1] == ["snapshot"] and set(kinds(pols["generator"])[1:]) == {"dpo"}
    assert kinds(pols["verifier"]) == []
    assert "sft" in kinds(pols["refiner"]) and "dpo" in kinds(pols["refiner"])


def test_export_matches_what_was_trained(tmp_path):
    algo, pols = make_algo(tmp_path, branching=2, export_path=str(tmp_path / "exp"))
    run_steps(algo, [0])
    rows = read_jsonl(tmp_path / "exp" / "iter_0.jsonl", "the MALT export")
    # each row's messages are the prompt its node was sampled from (one prompt builder)
    assert rows and all(r["prompt_ids"] == ids(r["messages"][-1]["content"]) for r in rows)
    for role in ROLES:
        trained = [s for e in pols[role].events if e[0] == "train" and e[1] == "sft" for s in e[2]]
        key = lambda s: (s.prompt_ids, s.completion_ids)  # noqa: E731
        assert sorted(map(key, trained)) == sorted(map(key, sft_samples(rows, role)))
        dpo = [p for e in pols[role].events if e[0] == "train" and e[1] == "dpo" for p in e[2]]
        pk = lambda p: (p.prompt_ids, p.chosen_ids, p.rejected_ids)  # noqa: E731
        assert sorted(map(pk, dpo)) == (sorted(map(pk, pair_samples(rows, role))) if role != "generator" else [])
    used = {(r["kind"], r["role"]): r["used"] for r in rows}
    assert used[("pair", "generator")] is False and used[("pair", "verifier")] is True


def test_roles_train_in_lockstep_with_their_own_seeded_orders(tmp_path):
    trace = []
    algo, pols = make_algo(tmp_path, branching=2, sft_batch_size=2, sft_epochs=2, dpo_batch_size=4, dpo_epochs=2,
                           export_path=str(tmp_path / "exp"), trace=trace)
    run_steps(algo, [0], k=3)

    def lockstep(kind, steps):  # step i of every role dispatched before any is awaited
        out = []
        for i in range(max(steps.values())):
            live = [r for r in ROLES if i < steps.get(r, 0)]
            out += [("dispatch", r, kind) for r in live] + [("result", r, kind) for r in live]
        return out
    # SFT: 3 / 3 / 12 samples in batches of 2 for 2 epochs; DPO: 3 / 6 pairs in batches of 4 for 2 epochs
    assert trace == (lockstep("sft", {"generator": 4, "verifier": 4, "refiner": 12})
                     + [("snapshot", "verifier"), ("snapshot", "refiner")]
                     + lockstep("dpo", {"verifier": 2, "refiner": 4}))
    # each role's batches: one local RNG seeded from (iteration, role) shuffles its SFT epochs, then its DPO epochs
    rows = read_jsonl(tmp_path / "exp" / "iter_0.jsonl", "the MALT export")
    for role in ROLES:
        rng = random.Random(algo.seed("train", 0, role))
        expected = []
        for items, epochs, size in ((sft_samples(rows, role), 2, 2),
                                    (pair_samples(rows, role) if role != "generator" else [], 2, 4)):
            for _ in range(epochs if items else 0):
                order = list(items)
                rng.shuffle(order)
                expected += list(chunks(order, size))
        assert [e[2] for e in pols[role].events if e[0] == "train"] == expected, role


def test_iterations_split_steps_and_threshold_schedule(tmp_path):
    algo, pols = make_algo(tmp_path, steps=4, branching=2, iterations=2, threshold_schedule=[0.5, 0.2])
    ms = run_steps(algo, range(4))
    assert [m["malt/trained"] for m in ms] == [0.0, 1.0, 0.0, 1.0]
    assert [m["malt/iteration"] for m in ms] == [0, 0, 1, 1]
    assert [m["malt/threshold"] for m in ms] == [0.5, 0.5, 0.2, 0.2]
    assert ms[1]["train/data/sft/generator"] == 4      # 2 steps x 2 questions, g0 only
    assert ms[3]["train/data/sft/generator"] == 8      # at 0.2 g1 (value 0.25) is correct too
    eps = TrajectoryBuffer.load(tmp_path / "buffer.jsonl").episodes
    assert [e.meta["iteration"] for e in eps] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert (tmp_path / "malt_dataset" / "iter_1.jsonl").is_file()


def test_collection_ahead_of_training_labels_trees_with_their_own_block(tmp_path):
    # trainer.max_staleness >= 1: step 2's trees are collected before step 1 trains block 0
    algo, _ = make_algo(tmp_path, steps=4, branching=2, iterations=2, threshold_schedule=[0.5, 0.2])
    early = [algo.collect(tasks(2, start=s * 2), s) for s in (0, 1, 2)]
    assert algo.iteration == 0  # nothing trained yet
    assert [e.meta["iteration"] for eps in early for e in eps] == [0, 0, 0, 0, 1, 1]
    assert [e.meta["threshold"] for eps in early for e in eps] == [0.5, 0.5, 0.5, 0.5, 0.2, 0.2]


def test_resume_rebuilds_the_block_from_the_buffer(tmp_path):
    def trained(pols):
        return sorted((tuple(s.prompt_ids), tuple(s.completion_ids)) for r in ROLES
                      for e in pols[r].events if e[0] == "train" and e[1] == "sft" for s in e[2])

    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref, ref_pols = make_algo(ref_dir, steps=4, branching=2)
    run_steps(ref, range(4))

    a, _ = make_algo(run_dir, steps=4, branching=2)
    run_steps(a, range(2))
    state = json.loads(json.dumps(a.state_dict()))            # JSON-serialisable
    b, b_pols = make_algo(run_dir, steps=4, branching=2, buffer=TrajectoryBuffer(run_dir / "buffer.jsonl"))
    b.load_state_dict(state)
    assert len(b._pending) == 4
    run_steps(b, range(2, 4))
    assert trained(b_pols) == trained(ref_pols) and trained(ref_pols)


def test_resume_after_a_training_only_keeps_newer_trees(tmp_path):
    a, _ = make_algo(tmp_path, steps=4, branching=2, iterations=2)
    run_steps(a, range(3))                                     # trains at step 1
    b, _ = make_algo(tmp_path, steps=4, branching=2, iterations=2, buffer=TrajectoryBuffer(tmp_path / "buffer.jsonl"))
    b.load_state_dict(a.state_dict())
    assert {e.step for e in b._pending} == {2} and b.iteration == 1


# ---- evaluation -------------------------------------------------------------------------------------------
def eval_responders():
    def gen(p, k):
        if "feedback" in p:                                    # G+V: the generator revises -> always wrong
            return "revised <answer>w</answer>"
        return f"G{k} <answer>{p['gold'] if k == 0 else 'w' + str(k)}</answer>"

    def ver(p, k):
        return f"V{k}: verdict {'correct' if p['gold'] in p['answer'] else 'incorrect'}"

    def ref(p, k):
        if p["critique"] == MALTConfig().no_critique:          # G+R: echo the generator's answer
            return p["answer"]
        return f"R <answer>{p['gold'] if int(p['answer'][1]) < 2 else 'w'}</answer>"
    return {"generator": gen, "verifier": ver, "refiner": ref}


def test_evaluate_chains_votes_and_ablations(tmp_path):
    algo, pols = make_algo(tmp_path, responders=eval_responders())
    res = algo.evaluate(tasks(4))
    assert [len(pols[r].calls) for r in ROLES] == [2, 1, 2]   # batched: G (+G+V), V, R (+G+R)
    assert [len(c) for c in pols["refiner"].calls] == [12, 12]
    assert res["acc/generator"] == pytest.approx(1 / 3) and res["mv/g"] == 1.0   # 3-way tie -> first
    assert res["acc/refiner"] == pytest.approx(2 / 3) and res["mv/gvr"] == 1.0 and "accuracy" not in res
    assert res["acc/verifier_verdict"] == 1.0
    assert res["mv/gv"] == 0.0 and res["acc/gv"] == 0.0
    assert res["mv/gr"] == 1.0 and res["acc/gr"] == pytest.approx(1 / 3)
    assert res["generations_per_question"] == 9.0


def test_initial_baselines_reported_with_every_evaluation(tmp_path):
    algo, pols = make_algo(tmp_path, responders=eval_responders(), eval_ablations=False)
    algo.env.tasks = lambda split: {"test": tasks(2, start=50)}[split]  # trainer.test only (eval_every=0)
    algo.prepare(tasks(2))
    assert algo.baselines["baseline/mv/g"] == 1.0 and algo.baselines["baseline/mv/gvr"] == 1.0
    res = algo.evaluate(tasks(2))
    assert res["baseline/acc/refiner"] == pytest.approx(2 / 3)
    assert algo.state_dict()["baselines"] == algo.baselines


def test_base_baseline_scores_only_the_base_models_vote_and_is_paired_with_it(tmp_path):
    """`baselines=base`: before training only the generator's chains run (no verifier or refiner
    call), giving the paper's baseline, the base model + MV, paired with the trained G -> V -> R."""
    algo, pols = make_algo(tmp_path, responders=eval_responders(), eval_ablations=False, baselines="base")
    algo.env.tasks = lambda split: {"test": tasks(2, start=50)}[split]
    algo.prepare(tasks(2))
    assert [len(pols[r].calls) for r in ROLES] == [1, 0, 0]
    assert sorted(algo.initial_outcomes["outcomes"]) == ["baseline/acc/generator", "baseline/mv/g"]
    assert algo.baselines["baseline/mv/g"] == 1.0 and algo.baselines["baseline/acc/generator"] == pytest.approx(1 / 3)
    res = algo.evaluate(tasks(2, start=50))
    assert res["mv/gvr"] == 1.0 and res["baseline/mv/g"] == 1.0 and "baseline/mv/gvr" not in res
    assert res["diff/mv/gvr-baseline/mv/g"] == 0.0 and res["diff/mv/gvr-baseline/mv/g/n"] == 2


# ---- config and specs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, needle", [
    (dict(branching=0), "algo.branching=0"),
    (dict(value_threshold=1.0), "algo.value_threshold=1.0"),
    (dict(threshold_schedule=[0.5, 0.6]), "at most algo.iterations=1"),
    (dict(prompts={"generator": "{question}"}), "the generator answers with the env's own prompt"),
    (dict(dpo_roles=["generator"]), "generator_dpo"),
    (dict(sft_roles=["judge"]), "algo.sft_roles"),
    (dict(dpo_beta=0.0), "algo.dpo_beta"),
    (dict(chains=0), "algo.chains=0"),
    (dict(baselines="later"), "['initial', 'base', 'frozen', 'none']"),
    (dict(baselines="frozen", role_models={"verifier": "tiny"}), "'frozen'"),
])
def test_bad_config(kw, needle):
    with pytest.raises(ConfigError) as e:
        MALTConfig(**kw)
    assert needle in str(e.value)


class NoRoles(FakeEnv):
    roles = ("leader",)


class NoHooks(Env):  # an env without an answer env's question text and instruction
    def prompt(self, task, role="single", **context):
        return [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("kw, run_kw, env, needle", [
    (dict(iterations=3), dict(steps=2), FakeEnv, "algo.iterations=3 needs trainer.steps >= 3"),
    (dict(role_models={"critic": "tiny"}), {}, FakeEnv, "keys must be roles"),
    ({}, dict(temperature=0.0), FakeEnv, "rollout.temperature=0.0"),
    ({}, {}, NoRoles, "needs env roles ['single']"),
    ({}, {}, NoHooks, "has no ['question_text', 'instruction', 'messages']"),
])
def test_run_level_checks(tmp_path, kw, run_kw, env, needle):
    """What needs the run or the env is checked by `validate` (the pre-flight check calls it)."""
    cfg = MALTConfig(**kw)
    algo = MALT(cfg, env(EnvConfig(name="fake")), make_run(tmp_path, cfg, **run_kw))
    with pytest.raises(ConfigError) as e:
        algo.validate()
    assert needle in str(e.value)


def test_policy_specs(tmp_path):
    algo, _ = make_algo(tmp_path)
    specs = {s.name: s for s in algo.policy_specs()}
    assert list(specs) == list(ROLES) and all(s.trainable for s in specs.values())
    assert {n: s.reference for n, s in specs.items()} == {"generator": False, "verifier": True, "refiner": True}
    algo, _ = make_algo(tmp_path, baselines="frozen", generator_dpo=True)
    specs = {s.name: s for s in algo.policy_specs()}
    assert specs["generator"].reference and not specs["base"].trainable

    # LoRA adapters or full copies is the engine's choice from model.lora: every role gets the run's
    # model as it is (with model.lora: one adapter per role)
    algo, _ = make_algo(tmp_path)
    assert [s.model for s in algo.policy_specs()] == [algo.run.model] * 3 and algo.run.model.lora is None
    cfg = MALTConfig()
    lora_model = ModelConfig(name="tiny", source="tiny", lora=LoraConfig(r=4))
    algo = MALT(cfg, FakeEnv(EnvConfig(name="fake")), make_run(tmp_path, cfg, model=lora_model))
    assert {s.model.lora.r for s in algo.policy_specs()} == {4}
    # a role's own preset
    algo, _ = make_algo(tmp_path, role_models={"verifier": "tiny-wide"})
    assert [s.model.name for s in algo.policy_specs()] == ["tiny", "tiny-wide", "tiny"]


DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("env_cfg", [
    {"name": "math", "source": "generator", "train_size": 3, "eval_size": 1},
    {"name": "competition_math", "data": {"path": str(DATA / "competition_math.jsonl"), "eval_size": 1}},
    {"name": "csqa", "data": {"path": str(DATA / "csqa.jsonl"), "eval_size": 1}},
    {"name": "reasoning_gym", "task": "basic_arithmetic", "train_size": 3, "eval_size": 1},
], ids=lambda c: c["name"])
def test_with_verifiable_answer_envs(tmp_path, env_cfg):
    """A tree on each env's own prompts and reward: only the refinements under (answer 0,
    critique 0) repeat the dataset's reference answer, so exactly those leaves score."""
    if env_cfg["name"] == "reasoning_gym":
        pytest.importorskip("reasoning_gym")
    env = make_env(env_cfg)
    train = env.train_tasks()[:3]
    golds = {t["question"]: env.reference_outputs(t)["single"] for t in train}

    def gold(text):
        return next(a for q, a in golds.items() if q in text)

    def gen(p, k):
        return f"answer {k}: " + (gold(p) if k == 0 else "I am not sure.")

    def ver(p, k):
        return f"critique {k}: verdict incorrect"

    def ref(p, k):
        return gold(p) if k == 0 and "answer 0" in p and "critique 0" in p else "I give up."

    def TextPolicy(name, respond):  # plain-text prompts (a real env's)
        return SharedFakePolicy(name, lambda p, req, k: respond(req.messages[-1]["content"], k),
                                prompt_ids=lambda req: ids(req.messages[-1]["content"]), completion_ids=ids)

    cfg = MALTConfig(branching=2)
    algo = MALT(cfg, env, make_run(tmp_path, cfg))
    algo.validate()
    assert [s.name for s in algo.policy_specs()] == list(ROLES)
    algo.setup({r: TextPolicy(r, f) for r, f in zip(ROLES, (gen, ver, ref))}, TrajectoryBuffer())
    eps = algo.collect(train, 0)
    assert len(eps) == len(train)
    for ep in eps:
        leaves = [t for t in ep.turns if t.agent == "refiner"]
        assert sum(t.reward for t in leaves) == 1.0           # only the chain (answer 0, critique 0) is right
        assert ep.components["correct"] == pytest.approx(1 / 8)


# ---- end to end (real engines) -------------------------------------------------------------------------
def _engines_missing():
    for mod in ("marl_llm.learner.group", "marl_llm.rollout.worker"):
        try:
            __import__(mod)
        except Exception as e:  # noqa: BLE001
            return f"{mod} cannot be imported ({type(e).__name__}: {e})"
    return None


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("lora", [False, True], ids=["copies", "lora"])
def test_end_to_end_one_iteration_saves_all_roles(tmp_path, lora):
    reason = _engines_missing()
    if reason:
        pytest.skip(f"engines unavailable: {reason}")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "marl_llm.train", "algo=malt", "env=math", "model=tiny", "algo.branching=2",
           "trainer.steps=1", "trainer.batch_size=2", "trainer.eval_every=1", "trainer.eval_size=2",
           "algo.chains=2", "env.train_size=8", "env.eval_size=2",
           # LoRA roles share one vLLM engine (an adapter slot per role); copies run on the hf backend
           f"rollout.backend={'vllm' if lora else 'hf'}",
           "rollout.max_new_tokens=8", "trainer.loggers=[]", "trainer.progress=false",
           f"trainer.output_dir={out}"] + (["+model.lora.r=16"] if lora else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=Path(__file__).resolve().parents[2],
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    for role in ROLES:
        assert (out / "checkpoints" / "step_1" / role / "config.json").is_file(), role
        adapter = out / "checkpoints" / "step_1" / role / "adapter" / "adapter_config.json"
        assert adapter.is_file() == lora, role
    eps = TrajectoryBuffer.load(out / "buffer.jsonl").episodes
    assert len(eps) == 2 and all(len(e.turns) == 2 + 4 + 8 for e in eps)
    assert (out / "malt_dataset" / "iter_0.jsonl").is_file()
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["malt/trained"] == 1.0 and "eval/mv/gvr" in rec and "eval/baseline/mv/gvr" in rec
    if lora:
        log = (out / "train.log").read_text()
        for role in ROLES:
            assert f"LoRA adapter {role!r} on a shared engine" in log, role
        # the evaluation CLI serves the checkpoint's three adapters from one engine
        r = subprocess.run([sys.executable, "-m", "marl_llm.evaluate", f"run_dir={out}", f"out={tmp_path / 'e.json'}"],
                           capture_output=True, text=True, timeout=1200, cwd=Path(__file__).resolve().parents[2],
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                "RAY_AUTH_MODE": "disabled"})
        assert r.returncode == 0, r.stderr[-5000:]
        assert "mv/gvr" in json.loads((tmp_path / "e.json").read_text())
        for role in ROLES:
            assert f"policy {role!r}: serving the LoRA adapter saved in" in r.stdout + r.stderr, role


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("lora", [None, LoraConfig(r=8, alpha=16)], ids=["copy", "lora"])
def test_train_roles_sft_then_dpo_on_a_real_learner(tmp_path, lora, request):
    """MALT's SFT -> snapshot -> DPO sequence (the learner scores the reference in each step) on a
    real ZeRO-3 learner group, for a full-copy role and a LoRA role (the adapter is what SFT and
    DPO train)."""
    reason = _engines_missing()
    if reason:
        pytest.skip(f"engines unavailable: {reason}")
    request.getfixturevalue("ray_session")   # Ray only once the engines are known to import
    import math

    from marl_llm import runtime
    from marl_llm.learner.group import LearnerGroup
    from marl_llm.models import resolve_model
    from marl_llm.policy import Policy, PolicySpec
    from marl_llm.types import Sample

    model = ModelConfig(name="tiny", source="tiny", lora=lora)
    group = LearnerGroup("refiner", resolve_model(model), model,
                         LearnerConfig(num_ranks=1, num_cpus=1, lr=5e-3 if lora is None else 2e-2, micro_batch_size=4, bf16="false",
                                       timeout_s=120), 0, True, runtime.actor_env())
    try:
        policy = Policy(PolicySpec("refiner", model, reference=True), [], group)
        algo, _ = make_algo(tmp_path, sft_epochs=4, sft_batch_size=4, dpo_epochs=4, dpo_batch_size=4)
        algo.policies["refiner"] = policy
        rng = random.Random(3)

        def seq(a, b, vocab=range(100, 3000)):
            return [rng.choice(vocab) for _ in range(rng.randrange(a, b))]
        good, bad = range(500, 506), range(2500, 2506)   # chosen replies use `good` tokens, rejected `bad`

        def pair():
            return PairSample([1] + seq(3, 6), seq(3, 7, good), seq(3, 7, bad))
        sft = [Sample([1] + seq(3, 6), seq(3, 8)) for _ in range(4)]
        pairs, held = [pair() for _ in range(4)], [pair() for _ in range(4)]
        m = algo.train_roles({"refiner": sft}, {"refiner": pairs}, iteration=0)["refiner"]
        assert m["refiner/sft_steps"] == 4 and m["refiner/dpo_steps"] == 4
        assert m["refiner/sft_loss"] < m["refiner/sft_loss_first"]
        assert m["refiner/dpo_loss_first"] == pytest.approx(math.log(2.0), abs=1e-4)  # reference = SFT model
        assert m["refiner/dpo_loss"] < math.log(2.0) and m["refiner/dpo_reward_margin"] > 0

        # held-out pairs of the same kind: the chosen-over-rejected margin against the reference
        # (the SFT model, where it is 0 by construction) rose
        def margins(reference):
            lp = policy.logprobs([x for p in held for x in p.as_samples()], reference=reference)
            return [sum(lp[2 * i]) - sum(lp[2 * i + 1]) for i in range(len(held))]
        gain = [a - b for a, b in zip(margins(False), margins(True))]
        assert min(gain) > 0, gain
    finally:
        group.shutdown()


def test_evaluate_pairs_the_initial_baseline_on_the_same_questions(tmp_path):
    algo, pols = make_algo(tmp_path, responders=eval_responders(), eval_ablations=False)
    algo.run.trainer.eval_every = 1
    algo.env.tasks = lambda split: {"dev": tasks(4), "test": tasks(2, start=20)}[split]
    algo.prepare(tasks(2))
    # dev and test, the sets the run evaluates, scored in one pass
    assert algo.initial_outcomes["ids"] == ["q0", "q1", "q2", "q3", "q20", "q21"]
    assert [len(c) for c in pols["generator"].calls] == [6]
    test = algo.evaluate(tasks(2, start=20))
    assert test["mv/gvr/n"] == 2 and test["diff/mv/gvr-baseline/mv/gvr/n"] == 2
    res = algo.evaluate(tasks(4))      # the same questions: paired
    assert res["mv/gvr/n"] == 4 and res["mv/gvr/ci_low"] < res["mv/gvr"] == res["mv/gvr/ci_high"] == 1.0
    # per-chain scores become one per question (the mean over its chains): n counts questions
    assert res["acc/generator/n"] == 4 and res["acc/generator"] == pytest.approx(1 / 3)
    assert res["diff/mv/gvr-baseline/mv/gvr"] == 0.0 and res["diff/mv/gvr-baseline/mv/g/n"] == 4
    assert res["diff/mv/gvr-mv/g"] == 0.0
    other = algo.evaluate(tasks(2, start=10))  # other questions: the baseline is reported, not paired
    assert other["baseline/mv/gvr"] == 1.0 and not any(k.startswith("diff/mv/gvr-baseline") for k in other)
    restored, _ = make_algo(tmp_path, responders=eval_responders(), eval_ablations=False)
    restored.load_state_dict(algo.state_dict())
    assert restored.initial_outcomes == algo.initial_outcomes


def test_frozen_baseline_is_computed_once_and_paired(tmp_path):
    algo, pols = make_algo(tmp_path, responders=eval_responders(), baselines="frozen", eval_ablations=False)
    base = FakePolicy("base", lambda p, k: "B <answer>w</answer> verdict incorrect")
    algo.setup({**pols, "base": base}, TrajectoryBuffer(tmp_path / "b.jsonl"))
    res = algo.evaluate(tasks(3))
    assert res["baseline/mv/gvr"] == 0.0 and res["diff/mv/gvr-baseline/mv/gvr"] == 1.0
    calls = len(base.calls)
    algo.evaluate(tasks(3))
    assert len(base.calls) == calls  # frozen weights, seeded decoding: reused
