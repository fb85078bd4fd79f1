"""One source for config defaults: every value a conf/ YAML sets is its dataclass's default.

The YAMLs of the algorithm and env plugins (conf/algo, conf/env: the registered plugin's `Config`)
and of the engine groups (conf/rollout, learner, trainer, cluster: marl_llm/config.py) repeat
their dataclass's defaults so that `--cfg job` and the files document them. A key the dataclass
does not have, or a value that differs from its default, fails here unless `DIFFERS` lists it with
the reason the YAML sets another value; an entry that no longer differs fails too.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from marl_llm.config import ClusterConfig, LearnerConfig, RolloutConfig, TrainerConfig
from marl_llm.registry import ALGORITHMS, ENVS

CONF = Path(__file__).resolve().parents[2] / "conf"
ENGINE_GROUPS = {"rollout": RolloutConfig, "learner": LearnerConfig, "trainer": TrainerConfig,
                 "cluster": ClusterConfig}
PLUGIN_GROUPS = {"algo": ALGORITHMS, "env": ENVS}

# (YAML file under conf/, dotted key) -> why the YAML sets a value other than the dataclass default
DIFFERS = {
    ("trainer/default.yaml", "output_dir"): "a run folder named after the run's algo and env (interpolation)",
    ("cluster/ray.yaml", "name"): "cluster=ray is the option that joins a running cluster; the dataclass is local",
    ("cluster/ray.yaml", "address"): "auto: the cluster of `ray start` / `ray job submit`; a local one needs none",
    ("env/writing.yaml", "data.eval_size"): "sized for the bundled offline file (41 posts, 8 held out); the Hub "
                                            "data has a validation split",
    ("env/arxiv_expansion.yaml", "data.eval_size"): "sized for the bundled offline file (6 abstracts, 2 held out); "
                                                    "the Hub data has a val split",
}
# registered built-in plugins without a preset in conf/, and why
NO_YAML = {("env", "multiple_choice"): "the generic multiple-choice env for your own data; mmlu, csqa and bbh "
                                       "are its presets"}


def yaml_files():
    return sorted(str(p.relative_to(CONF)) for group in [*PLUGIN_GROUPS, *ENGINE_GROUPS]
                  for p in (CONF / group).glob("*.yaml"))


def schema(rel: str, yaml: dict):
    group = rel.split("/")[0]
    if group in ENGINE_GROUPS:
        return ENGINE_GROUPS[group]
    assert Path(rel).stem == yaml.get("name"), f"conf/{rel}: name={yaml.get('name')!r} is not the file's name"
    return PLUGIN_GROUPS[group].get(yaml["name"]).Config


def differences(yaml: dict, default, prefix: str = "") -> dict[str, tuple]:
    """dotted key -> (YAML value, dataclass default) for every key the YAML sets to another value
    or that the dataclass does not have (default: "no such field")."""
    out: dict[str, tuple] = {}
    names = {f.name for f in dataclasses.fields(default)}
    for key, value in yaml.items():
        if key not in names:
            out[prefix + key] = (value, "no such field")
            continue
        d = getattr(default, key)
        if dataclasses.is_dataclass(d) and isinstance(value, dict):
            out.update(differences(value, d, f"{prefix}{key}."))
        elif value != d or isinstance(value, bool) != isinstance(d, bool):
            out[prefix + key] = (value, d)
    return out


@pytest.mark.parametrize("rel", yaml_files())
def test_yaml_sets_its_dataclass_defaults(rel):
    yaml = OmegaConf.to_container(OmegaConf.load(CONF / rel), resolve=False)
    cls = schema(rel, yaml)
    found = differences(yaml, cls())
    unexplained = {k: v for k, v in found.items() if (rel, k) not in DIFFERS}
    assert not unexplained, (f"conf/{rel} differs from {cls.__module__}.{cls.__qualname__} (key: (YAML, default)): "
                             f"{unexplained}; set the YAML to the default, or list the key in DIFFERS with the reason")
    stale = [k for (r, k) in DIFFERS if r == rel and k not in found]
    assert not stale, f"conf/{rel}: {stale} now match the dataclass; remove them from DIFFERS"
    if rel.split("/")[0] != "env":  # these document every default (env YAMLs leave out long prompt tables)
        missing = {f.name for f in dataclasses.fields(cls)} - set(yaml)
        assert not missing, f"conf/{rel} leaves out {sorted(missing)}: list every field with its default"


@pytest.mark.parametrize("group", list(PLUGIN_GROUPS))
def test_every_builtin_plugin_has_a_yaml(group):
    registry = PLUGIN_GROUPS[group]
    builtin = [n for n in registry.names() if registry.get(n).__module__.split(".")[0] in ("algorithms", "envs")]
    missing = [n for n in builtin if not (CONF / group / f"{n}.yaml").is_file() and (group, n) not in NO_YAML]
    assert not missing, f"registered {group} plugins without conf/{group}/<name>.yaml: {missing}"
