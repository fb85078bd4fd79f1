import json

import pytest

from marl_llm.__main__ import main as cli_main
from marl_llm.config import ConfigError
from marl_llm.eval_store import compare, find_outcomes, load_outcomes, save_outcomes


def test_saved_outcomes_round_trip_and_drop_subset_metrics(tmp_path):
    path = save_outcomes(tmp_path / "eval" / "step_4", ["a", "b"], {"correct": [1, 0], "subset": [1.0]})
    ids, outcomes = load_outcomes(path)
    assert ids == ["a", "b"] and outcomes == {"correct": [1.0, 0.0]}
    assert not list((tmp_path / "eval" / "step_4").glob("*.tmp"))


def test_run_folder_finds_its_newest_test_then_dev_then_standalone_evaluation(tmp_path):
    save_outcomes(tmp_path / "eval_step_12", ["a"], {"correct": [1]})
    assert find_outcomes(tmp_path).parent.name == "eval_step_12"
    for step in (2, 10, 4):
        save_outcomes(tmp_path / "eval" / "dev" / f"step_{step}", ["a"], {"correct": [step]})
    assert find_outcomes(tmp_path).parent == tmp_path / "eval" / "dev" / "step_10"  # numeric, not lexical, order
    save_outcomes(tmp_path / "eval" / "test" / "step_9", ["a"], {"correct": [1]})
    assert find_outcomes(tmp_path).parent == tmp_path / "eval" / "test" / "step_9"  # test wins over a newer dev


def test_compare_pairs_by_task_id(tmp_path):
    save_outcomes(tmp_path / "a", ["t1", "t2", "t3", "t4"], {"correct": [1, 1, 0, 1], "reward": [1, 1, 0, 1]})
    save_outcomes(tmp_path / "b", ["t4", "t3", "t2", "t9"], {"correct": [0, 0, 1, 1]})
    diffs = compare(tmp_path / "a", tmp_path / "b")
    assert list(diffs) == ["correct"]  # only metrics both have
    iv = diffs["correct"]
    # common tasks t2, t3, t4: a = 1, 0, 1; b = 1, 0, 0
    assert iv.n == 3 and iv.estimate == pytest.approx(1 / 3)


def test_compare_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="has no evaluation outcomes"):
        compare(tmp_path, tmp_path)
    save_outcomes(tmp_path / "a", ["t1"], {"correct": [1]})
    save_outcomes(tmp_path / "b", ["t2"], {"correct": [1]})
    with pytest.raises(ConfigError, match="no task in common"):
        compare(tmp_path / "a", tmp_path / "b")
    save_outcomes(tmp_path / "c", ["t1"], {"correct": [0]})
    with pytest.raises(ConfigError, match=r"\['acc'\] are not in both"):
        compare(tmp_path / "a", tmp_path / "c", ["acc"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "outcomes.json").write_text(json.dumps({"ids": []}))
    with pytest.raises(ConfigError, match="not an outcomes file"):
        load_outcomes(tmp_path / "d")


def test_compare_command_prints_paired_differences(tmp_path, capsys):
    save_outcomes(tmp_path / "a", ["t1", "t2"], {"correct": [1, 1]})
    save_outcomes(tmp_path / "b", ["t1", "t2"], {"correct": [0, 1]})
    assert cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "correct  +0.50" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli_main(["compare", str(tmp_path / "a")])
    assert e.value.code == 2
