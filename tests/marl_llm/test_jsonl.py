import pytest

from marl_llm.config import ConfigError
from marl_llm.jsonl import read_jsonl, write_jsonl


def test_write_then_read_round_trips_atomically(tmp_path):
    rows = [{"a": 1}, {"b": [1, 2], "c": "x"}]
    path = write_jsonl(tmp_path / "sub" / "f.jsonl", rows)
    assert read_jsonl(path, "the file") == rows
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize("text, needle", [
    ('{"a": 1}\n\nnot json\n', r"algo.sft_file: .*f.jsonl line 3 is not valid JSON"),
    ('{"a": 1}\n[1, 2]\n', r"f.jsonl line 2 is a list, not a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, text, needle):
    (tmp_path / "f.jsonl").write_text(text)
    with pytest.raises(ConfigError, match=needle):
        read_jsonl(tmp_path / "f.jsonl", "algo.sft_file")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"algo.sft_file='.*nope.jsonl' does not exist"):
        read_jsonl(tmp_path / "nope.jsonl", "algo.sft_file")
