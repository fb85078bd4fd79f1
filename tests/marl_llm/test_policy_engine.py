"""The engine decides engine things: frozen policies with the same base weights share one set of
rollout workers (whatever the algorithm names them) and batch together through `generate_all`;
`Policy.tokenize` templates a chat exactly as the workers do for generation; `train_async`
steps of two policies overlap only with `learner.concurrent=true`."""
import dataclasses

import pytest
from hydra import compose, initialize_config_dir

from marl_llm.config import conf_dir, validate
from marl_llm.losses import LossConfig
from marl_llm.policy import PolicySpec, generate_all
from marl_llm.types import GenerationRequest, Sample, SamplingConfig

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def built(ray_session):
    from marl_llm.cluster import Cluster

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["env=toy", "model=tiny", "rollout.backend=hf",
                                                       "learner.concurrent=true"])
    run = validate(cfg)
    other = dataclasses.replace(run.model, seed=run.model.seed + 1)  # other weights
    specs = [PolicySpec("a", run.model), PolicySpec("b", run.model),
             PolicySpec("team0", run.model, trainable=False), PolicySpec("team1", run.model, trainable=False),
             PolicySpec("stranger", other, trainable=False)]
    ps = Cluster(run.cluster).start().build_policies(specs, run)
    yield ps
    for p in ps.values():
        if p.learner is not None:
            p.learner.shutdown()


def test_frozen_policies_with_the_same_weights_share_one_engine(built):
    assert built["team0"].rollout_workers == built["team1"].rollout_workers
    assert built["team0"].engine == built["team1"].engine
    assert built["stranger"].engine != built["team0"].engine  # other weights: its own engine
    assert built["a"].engine != built["b"].engine != built["team0"].engine  # trainable: one each
    req = lambda q: GenerationRequest(messages=[{"role": "user", "content": q}],  # noqa: E731
                                      sampling=SamplingConfig(n=1, temperature=0.0, max_tokens=4))
    out = generate_all({"team0": (built["team0"], [req("Say hi."), req("Count.")]),
                        "team1": (built["team1"], [req("Say hi.")])}).result()
    assert [len(v) for v in out.values()] == [2, 1]
    assert out["team0"][0][0].completion_ids == out["team1"][0][0].completion_ids  # same weights, greedy


def test_tokenize_matches_the_prompt_generation_sees(built):
    msgs = [{"role": "user", "content": "Name a colour."}]
    gen = built["a"].generate([GenerationRequest(messages=msgs, sampling=SamplingConfig(max_tokens=2))])[0][0]
    prompt_ids, completion_ids = built["a"].tokenize(msgs, "Blue.")
    assert prompt_ids == gen.prompt_ids
    assert len(completion_ids) >= 2  # the reply's tokens, then EOS


def test_train_async_of_two_policies_returns_each_ones_metrics(built):
    sft = LossConfig(kind="sft")
    batch = [Sample([1, 5, 6], [7, 8, 9]), Sample([1, 9], [10, 11])]
    pa, pb = built["a"].train_async(batch, sft), built["b"].train_async(batch, sft)
    ma, mb = pa.result(), pb.result()
    assert ma["global_step"] == mb["global_step"] == 1 and ma["n_samples"] == mb["n_samples"] == 2
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)  # same weights, same data
    assert built["a"].dirty and built["b"].dirty
