"""`load_rows`: local files, bundled generators, column mapping, and exact one-line errors.

Expected messages are written out here from the spec ("<file>: line <n>: <problem>"); the JSON parser's
own wording for a malformed line comes from `json.loads` on the same text. Runs in seconds.
"""

import json

import pytest
import torch
from datasets import Dataset

from align.data.loading import DataSource, load_rows, load_sources
from align.data.reasoning import reasoning_rows
from align.errors import DataError, UserError

torch.manual_seed(0)
PAIR = ("prompt", "chosen", "rejected")


def _jsonl(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _pair(i: int) -> str:
    return json.dumps({"prompt": f"q{i}", "chosen": f"good{i}", "rejected": f"bad{i}"})


def test_good_jsonl_loads_every_row(tmp_path):
    f = _jsonl(tmp_path / "pairs.jsonl", [_pair(i) for i in range(4)] + [""])  # a trailing blank line is fine
    ds, skipped = load_rows(str(f), required=PAIR)
    assert isinstance(ds, Dataset) and skipped == 0
    assert ds["prompt"] == ["q0", "q1", "q2", "q3"] and ds["chosen"][2] == "good2"


def test_column_mapping_renames(tmp_path):
    rows = [json.dumps({"question": "q", "good": "a", "bad": "b"})]
    f = _jsonl(tmp_path / "mapped.jsonl", rows)
    ds, _ = load_rows(str(f), columns_map={"question": "prompt", "good": "chosen", "bad": "rejected"}, required=PAIR)
    assert ds.to_list() == [{"prompt": "q", "chosen": "a", "rejected": "b"}]


def test_missing_column_names_file_line_and_column(tmp_path):
    f = _jsonl(tmp_path / "pairs.jsonl", [_pair(0), json.dumps({"prompt": "q", "chosen": "a"})])
    with pytest.raises(DataError) as e:
        load_rows(str(f), required=PAIR)
    assert str(e.value) == f"{f}: line 2: missing column 'rejected'"


def test_missing_mapped_column_names_both_names(tmp_path):
    f = _jsonl(tmp_path / "pairs.jsonl", [json.dumps({"q": "x", "chosen": "a", "rejected": "b"})])
    with pytest.raises(DataError) as e:
        load_rows(str(f), columns_map={"question": "prompt"}, required=PAIR)
    assert str(e.value) == f"{f}: line 1: missing column 'question' (mapped to 'prompt')"


def test_empty_file(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    with pytest.raises(DataError) as e:
        load_rows(str(f), required=PAIR)
    assert str(e.value) == f"{f}: empty file (no rows)"
    blank = _jsonl(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(DataError) as e:
        load_rows(str(blank), required=PAIR)
    assert str(e.value) == f"{blank}: empty file (no rows)"


def test_malformed_json_line_is_named(tmp_path):
    bad = '{"prompt": "q", "chosen": "a", "rejected": '
    f = _jsonl(tmp_path / "pairs.jsonl", [_pair(0), _pair(1), bad, _pair(3)])
    with pytest.raises(json.JSONDecodeError) as parse:
        json.loads(bad)
    with pytest.raises(DataError) as e:
        load_rows(str(f), required=PAIR)
    assert str(e.value) == f"{f}: line 3: malformed JSON ({parse.value.msg})"
    assert "\n" not in str(e.value)
    assert isinstance(e.value, UserError)


def test_skip_drops_and_counts_bad_rows(tmp_path):
    lines = [
        _pair(0),
        "{not json",
        json.dumps({"prompt": "q", "chosen": "a"}),  # missing rejected
        json.dumps({"prompt": "q", "chosen": "", "rejected": "b"}),  # empty value
        "[1, 2]",  # not an object
        _pair(5),
    ]
    f = _jsonl(tmp_path / "pairs.jsonl", lines)
    ds, skipped = load_rows(str(f), required=PAIR, on_bad_rows="skip")
    assert skipped == 4
    assert ds["prompt"] == ["q0", "q5"]
    with pytest.raises(DataError) as e:  # with "error", the first bad line stops the load
        load_rows(str(f), required=PAIR)
    assert str(e.value).startswith(f"{f}: line 2: malformed JSON")


def test_all_rows_bad_with_skip_is_still_an_error(tmp_path):
    f = _jsonl(tmp_path / "pairs.jsonl", ["{oops", json.dumps({"prompt": "q"})])
    with pytest.raises(DataError) as e:
        load_rows(str(f), required=PAIR, on_bad_rows="skip")
    assert str(e.value) == f"{f}: no valid rows (2 skipped)"


def test_json_csv_and_parquet_files(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(3)]
    j = tmp_path / "pairs.json"
    j.write_text(json.dumps(rows))
    c = tmp_path / "pairs.csv"
    Dataset.from_list(rows).to_csv(str(c), index=False)
    p = tmp_path / "pairs.parquet"
    Dataset.from_list(rows).to_parquet(str(p))
    for f in (j, c, p):
        ds, skipped = load_rows(str(f), required=PAIR)
        assert ds.to_list() == rows and skipped == 0, f


def test_table_missing_column_and_null_cell(tmp_path):
    p = tmp_path / "pairs.parquet"
    Dataset.from_list([{"prompt": "q", "chosen": "a"}]).to_parquet(str(p))
    with pytest.raises(DataError) as e:
        load_rows(str(p), required=PAIR)
    assert str(e.value) == f"{p}: missing column 'rejected' (found: prompt, chosen)"
    c = tmp_path / "pairs.csv"
    c.write_text("prompt,chosen,rejected\nq0,a0,b0\nq1,,b1\n")
    with pytest.raises(DataError) as e:
        load_rows(str(c), required=PAIR)
    assert str(e.value) == f"{c}: row 2: empty value in column 'chosen'"
    ds, skipped = load_rows(str(c), required=PAIR, on_bad_rows="skip")
    assert (len(ds), skipped) == (1, 1)


def test_messages_are_validated(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "robot", "content": "hi"}]}
    f = _jsonl(tmp_path / "sft.jsonl", [json.dumps(good), json.dumps(bad)])
    with pytest.raises(DataError) as e:
        load_rows(str(f), required=["messages"])
    assert str(e.value) == f"{f}: line 2: column 'messages': message 0 has unknown role 'robot'"


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError) as e:
        load_rows(str(tmp_path / "nope.jsonl"))
    assert str(e.value) == f"{tmp_path / 'nope.jsonl'}: file not found"
    t = tmp_path / "notes.txt"
    t.write_text("hello")
    with pytest.raises(DataError) as e:
        load_rows(str(t))
    assert str(e.value) == f"{t}: unsupported file type '.txt' (use .jsonl, .json, .parquet, .csv)"


def test_bundled_sources_match_the_generators():
    ds, skipped = load_rows("bundled:reasoning?levels=1&n=12&seed=2", split="test", required=["prompt", "answer"])
    assert skipped == 0
    assert ds.to_list() == reasoning_rows("test", n=12, seed=2, levels=[1])
    with pytest.raises(DataError) as e:
        load_rows("bundled:poetry")
    assert str(e.value).startswith("bundled:poetry: unknown bundled dataset 'poetry' (known: ")
    with pytest.raises(DataError) as e:
        load_rows("bundled:reasoning?colour=red")
    assert str(e.value).startswith("bundled:reasoning?colour=red: ")


def test_load_sources_concatenates_and_keeps_required_columns():
    ds, skipped = load_sources(
        [DataSource(source="bundled:chat_sft?n=5"), DataSource(source="bundled:safety_sft?n=7")], required=["messages"]
    )
    assert len(ds) == 12 and ds.column_names == ["messages"] and skipped == 0
