"""The shared algorithm scaffolding of algorithms/base.py (no engines)."""
import pytest

from algorithms.base import (Algorithm, PGConfig, group_episodes, group_samples, majority_index, reward_metrics,
                             sampling, score_metrics, seed_for, vote)
from envs.base import Env, EnvConfig, Reward
from marl_llm.config import ConfigError, RolloutConfig, RunConfig
from marl_llm.types import Episode, Turn


def _ep(group, reward, n_tokens=2, components=None):
    t = Turn(agent="single", policy="policy", prompt_ids=[1], completion_ids=list(range(n_tokens)), text="x")
    return Episode(task={"id": group}, turns=[t], reward=reward, components=components or {"correct": reward},
                   group=group)


def test_group_episodes_keeps_first_appearance_order():
    eps = [_ep("b", 1.0), _ep("a", 0.0), _ep("b", 0.0)]
    groups = group_episodes(eps)
    assert list(groups) == ["b", "a"] and groups["b"] == [eps[0], eps[2]]


def test_group_samples_are_group_relative():
    eps = [_ep("a", 3.0), _ep("b", 1.0), _ep("a", 1.0), _ep("b", 1.0)]
    assert [s.advantage for s in group_samples(eps)] == [1.0, -1.0, 0.0, 0.0]
    assert [s.advantage for s in group_samples(eps, std_normalize=True)] == pytest.approx([1.0, -1.0, 0.0, 0.0],
                                                                                         abs=1e-5)


def test_reward_metrics_block():
    eps = [_ep("a", 1.0, 2), _ep("a", 0.0, 4), _ep("b", 1.0, 6), _ep("b", 1.0, 8)]
    m = reward_metrics(eps)
    assert m == {"reward/mean": 0.75, "reward/max": 1.0, "reward/correct": 0.75, "groups/mixed": 0.5,
                 "tokens/completion_mean": 5.0}
    assert "groups/mixed" not in reward_metrics([_ep("a", 1.0), _ep("b", 0.0)])  # no group of 2+


def test_score_metrics():
    assert score_metrics([Reward(1.0, {"c": 1.0}), Reward(0.0, {"c": 0.5})]) == {"reward": 0.5, "c": 0.75}


def test_sampling_forces_top_p_1_at_temperature_0():
    rollout = RolloutConfig(temperature=0.7, top_p=0.9, max_new_tokens=12)
    s = sampling(rollout, n=3, seed=5)
    assert (s.n, s.temperature, s.top_p, s.max_tokens, s.seed) == (3, 0.7, 0.9, 12, 5)
    g = sampling(rollout, temperature=0.0)
    assert (g.temperature, g.top_p) == (0.0, 1.0)


def test_seeds_are_stable_and_distinct():
    assert seed_for(0, "collect", 3, 1) == seed_for(0, "collect", 3, 1)
    seeds = {seed_for(s, phase, step, i) for s in (0, 1) for phase in ("collect", "eval") for step in range(5)
             for i in range(8)}
    assert len(seeds) == 2 * 2 * 5 * 8 and all(0 <= x < 2 ** 32 for x in seeds)


class _Env(Env):
    roles = ("single",)

    def prompt(self, task, role="single", **context):
        return [{"role": "user", "content": f"{task['q']} {context}"}]


def test_requests_and_seed_of_an_algorithm():
    run = RunConfig(algo=PGConfig(), rollout=RolloutConfig(temperature=1.0, top_p=0.8, max_new_tokens=7), seed=3)
    algo = Algorithm(run.algo, _Env(EnvConfig(name="e")), run)
    reqs = algo.requests("single", [{"q": "a"}, {"q": "b"}], 2, seed=("collect", 4), contexts=[{"x": 1}, {}])
    assert [r.messages[0]["content"] for r in reqs] == ["a {'x': 1}", "b {}"]
    assert [r.sampling.seed for r in reqs] == [seed_for(3, "collect", 4, 0), seed_for(3, "collect", 4, 1)]
    assert all((r.sampling.n, r.sampling.top_p, r.sampling.max_tokens) == (2, 0.8, 7) for r in reqs)
    assert algo.requests("single", [{"q": "a"}], temperature=0.0)[0].sampling.seed is None
    assert reqs[0].sampling.stop is None  # this env has no stop strings
    loss = algo.loss
    assert (loss.kind, loss.agg, loss.norm_tokens, loss.clip_eps, loss.kl_coef) == ("pg", "token_sum_norm", 7, 0.2, 0.0)


def test_requests_stop_where_the_env_says_a_reply_ends():
    from envs.base import make_env
    env = make_env({"name": "math", "train_size": 4, "eval_size": 2})
    run = RunConfig(algo=PGConfig(), rollout=RolloutConfig(), seed=0)
    algo = Algorithm(run.algo, env, run)
    task = env.tasks("test")[0]
    assert algo.requests("single", [task])[0].sampling.stop == ["</answer>"]
    # a protocol's own role: its own prompt; the env's stop strings unless it passes its own
    own = lambda t, **ctx: algo.answer_prompt("{question}\n{team}\n{answer_instruction}", t, **ctx)  # noqa: E731
    req = algo.requests("leader", [task], contexts=[{"team": "x"}], prompt=own)[0]
    assert req.sampling.stop == ["</answer>"]
    assert req.messages[-1]["content"] == f"{task['question']}\nx\n{env.cfg.answer_instruction}"
    assert req.messages[0] == {"role": "system", "content": env.cfg.system_prompt}
    # a critique quotes solutions: its protocol passes no stop strings
    assert algo.requests("verifier", [task], prompt=own, stop=[])[0].sampling.stop is None
    with pytest.raises(ValueError, match="has no role 'leader'"):
        env.prompt(task, "leader")  # protocols' roles are not the env's
    off = make_env({"name": "math", "train_size": 4, "eval_size": 2, "stop_at_answer": False})
    assert Algorithm(run.algo, off, run).requests("single", [task])[0].sampling.stop is None
    boxed = make_env({"name": "math", "train_size": 4, "eval_size": 2, "answer_instruction": "Put it in \\boxed{}."})
    assert boxed.stop("single") == []


def test_majority_vote_and_env_equivalence():
    assert majority_index(["3", "4", "4"]) == 1 and majority_index([None, None]) is None
    env = _Env(EnvConfig(name="e"))
    assert env.answers_equal("3", "3") and not env.answers_equal(None, None)  # the base Env's rule
    assert vote(env, ["x", "y", "y"]) == 1


@pytest.mark.parametrize("kw, needle", [
    (dict(group_size=1), "algo.group_size=1 must be >= 2; group-relative advantages"),
    (dict(loss_agg="avg"), "algo.loss_agg='avg' is not allowed; choose one of"),
    (dict(clip_eps=-0.1), "algo.clip_eps=-0.1 must be > 0 or null"),
    (dict(kl_coef=-1.0), "algo.kl_coef=-1.0 must be >= 0"),
])
def test_pg_config_rejects_bad_values(kw, needle):
    with pytest.raises(ConfigError) as e:
        PGConfig(**kw)
    assert needle in str(e.value)


# ---- evaluation with intervals ----------------------------------------------------------------------------
def test_outcome_metrics_intervals_and_paired_differences():
    from algorithms.base import outcome_metrics
    from marl_llm.stats import mean_interval, paired_difference, wilson_interval
    a, b = [1, 1, 0, 1, 0, 1, 1, 1], [1, 0, 0, 1, 0, 0, 1, 0]
    r = [0.5, 1.5, 0.25, 1.0, 0.0, 2.0, 1.0, 1.5]
    m = outcome_metrics({"acc": a, "base/acc": b, "reward": r, "empty": []},
                        [("acc", "base/acc"), ("acc", "missing")])
    w = wilson_interval(6, 8)  # 0/1 outcomes: a success rate
    assert (m["acc"], m["acc/ci_low"], m["acc/ci_high"], m["acc/n"]) == (0.75, w.low, w.high, 8)
    t = mean_interval(r)       # real-valued: Student t
    assert (m["reward/ci_low"], m["reward/ci_high"]) == (t.low, t.high)
    d = paired_difference(a, b)
    assert m["diff/acc-base/acc"] == pytest.approx(0.375) and m["diff/acc-base/acc/ci_low"] == d.low
    assert m["diff/acc-base/acc/n"] == 8
    assert "empty" not in m and not any("missing" in k for k in m)  # no outcomes, no metric
    # identical policies: a zero difference with zero width
    z = outcome_metrics({"x": a, "y": list(a)}, [("x", "y")])
    assert (z["diff/x-y"], z["diff/x-y/ci_low"], z["diff/x-y/ci_high"]) == (0.0, 0.0, 0.0)


def test_eval_metrics_keeps_outcomes_and_frozen_baseline_is_computed_once_per_task_set():
    algo = Algorithm(None, Env(EnvConfig()), None)
    m = algo.eval_metrics({"acc": [1, 0, True]})
    assert algo.eval_outcomes == {"acc": [1.0, 0.0, 1.0]} and m["acc/n"] == 3
    calls = []

    def compute():
        calls.append(1)
        return {"base/acc": [0.0] * len(calls)}
    t1, t2 = [{"id": "a"}, {"id": "b"}], [{"id": "a"}]
    assert algo.frozen_baseline("base", t1, compute) == {"base/acc": [0.0]}
    assert algo.frozen_baseline("base", t1, compute) == {"base/acc": [0.0]} and len(calls) == 1  # reused
    algo.frozen_baseline("base", t2, compute)                                                      # other tasks
    assert len(calls) == 2


# ---- the shared training loop, validation and correctness ------------------------------------------
class _Learner:
    """Records the order of dispatches and completions of train steps (no engine)."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def train_step_async(self, samples, loss):
        self.log.append(("start", self.name, [s.completion_ids[0] for s in samples]))

        def wait():
            self.log.append(("done", self.name))
            return {"loss": float(len(samples))}
        return wait


def _policies(names, concurrent):
    from marl_llm.policy import Policy, PolicySpec, TrainGate
    from marl_llm.config import ModelConfig
    log, gate = [], TrainGate(concurrent)
    return log, {n: Policy(PolicySpec(n, ModelConfig()), [], _Learner(n, log), train_gate=gate) for n in names}


@pytest.mark.parametrize("concurrent", [False, True])
def test_train_epochs_lockstep_shuffles_like_one_policy_alone(concurrent):
    import random

    from algorithms.base import TrainJob, train_epochs
    from marl_llm.losses import LossConfig
    from marl_llm.types import Sample
    log, pols = _policies(["a", "b"], concurrent)
    items = {"a": [Sample([1], [i]) for i in range(5)], "b": [Sample([1], [10 + i]) for i in range(2)]}
    jobs = {n: TrainJob(pols[n], items[n], epochs=2, batch_size=2, loss=LossConfig(kind="sft"),
                        rng=random.Random(n)) for n in pols}
    out = train_epochs(jobs)
    assert [len(e) for e in out["a"]] == [3, 3] and [len(e) for e in out["b"]] == [1, 1]
    assert out["a"][0][-1] == {"loss": 1.0}
    # each policy saw exactly the order its own rng gives (as a loop over one policy would)
    for n in pols:
        rng, want = random.Random(n), []
        for _ in range(2):
            order = [s.completion_ids[0] for s in items[n]]
            rng.shuffle(order)
            want += [order[i:i + 2] for i in range(0, len(order), 2)]
        assert [b for kind, name, *b in log if kind == "start" and name == n] == [[w] for w in want]
    starts = [(e[0], e[1]) for e in log]
    if concurrent:  # both policies' first steps are in flight before either is awaited
        assert starts[:3] == [("start", "a"), ("start", "b"), ("done", "a")]
    else:  # the engine waits for a's step before b's starts
        assert starts[:3] == [("start", "a"), ("done", "a"), ("start", "b")]


def test_generate_all_batches_policies_that_share_an_engine():
    from marl_llm.config import ModelConfig
    from marl_llm.policy import Policy, PolicySpec, generate_all
    from marl_llm.types import Completion, GenerationRequest

    calls = []

    class Worker:
        class generate:  # noqa: N801 - stands in for a Ray actor method
            @staticmethod
            def remote(requests, adapter):
                calls.append(len(requests))
                return [[Completion([1], [2], [0.0], r.messages[0]["content"])] for r in requests]

    shared, own = Worker(), Worker()
    get = lambda ref, timeout=None: ref  # noqa: E731
    team = {n: Policy(PolicySpec(n, ModelConfig(), trainable=False), [shared], get=get) for n in ("t0", "t1")}
    other = Policy(PolicySpec("x", ModelConfig(), trainable=False), [own], get=get)
    req = lambda text: GenerationRequest(messages=[{"role": "user", "content": text}])  # noqa: E731
    out = generate_all({"t0": (team["t0"], [req("a"), req("b")]), "x": (other, [req("c")]),
                        "t1": (team["t1"], [req("d")])}).result()
    assert sorted(calls) == [1, 3]  # t0 and t1 went out as one batch
    assert {k: [c[0].text for c in v] for k, v in out.items()} == {"t0": ["a", "b"], "x": ["c"], "t1": ["d"]}


def test_correct_of_and_validate_hooks():
    from algorithms.base import correct_of
    assert correct_of(Reward(1.1, {"correct": 1.0, "format": 1.0}), 1.1) == 1.0
    assert correct_of(Reward(0.1, {"correct": 0.0}), 1.1) == 0.0
    assert correct_of(Reward(4.0, {"tests": 1.0}), 4.0) == 1.0 and correct_of(Reward(3.0), 4.0) == 0.0

    class NeedsLeader(Algorithm):
        env_hooks = ("question_text",)

        def required_roles(self):
            return ("single", "leader")

    run = RunConfig(algo=PGConfig(name="x"), rollout=RolloutConfig(), seed=0)
    with pytest.raises(ConfigError, match=r"algo=x needs env roles \['leader'\]"):
        NeedsLeader(run.algo, _Env(EnvConfig(name="e")), run).validate()

    class Plain(NeedsLeader):
        def required_roles(self):
            return ("single",)
    with pytest.raises(ConfigError, match=r"env 'e' has no \['question_text'\]"):
        Plain(run.algo, _Env(EnvConfig(name="e")), run).validate()
