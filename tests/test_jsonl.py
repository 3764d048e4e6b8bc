"""The shared JSON-records reader every user-file loader goes through."""
import pytest

from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import iter_jsonl, read_json_records


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_jsonl_and_json_list_give_the_same_records(tmp_path):
    rows = [{"a": 1}, {"a": 2}]
    a = write(tmp_path, "r.jsonl", '{"a": 1}\n\n   \n{"a": 2}\n')
    b = write(tmp_path, "r.json", '  [{"a": 1}, {"a": 2}]')
    c = write(tmp_path, "r.txt", '[{"a": 1},\n {"a": 2}]')  # a list, whatever the suffix
    assert read_json_records(a) == read_json_records(b) == read_json_records(c) == rows
    assert [where for where, _ in iter_jsonl(a)] == [f"{a}:1", f"{a}:4"]


@pytest.mark.parametrize("name,text,kw,match", [
    ("r.jsonl", '{"a": 1}\n{"a": 2\n', {}, r"r\.jsonl:2 \(config\.x\): malformed JSON line"),
    ("r.json", '[{"a": 1},\n {"a": ]', {}, r"r\.json:2 \(config\.x\): malformed JSON \("),
    ("r.json", '{"a": 1}', {}, r"expected a JSON list of records"),
    ("r.jsonl", '{"a": 1}\n[1]\n', {"objects": True}, r"record 2 is not a JSON object"),
])
def test_bad_files_name_file_and_line(tmp_path, name, text, kw, match):
    with pytest.raises(UserError, match=match):
        read_json_records(write(tmp_path, name, text), note=" (config.x)", **kw)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        read_json_records(str(tmp_path / "nope.jsonl"))
