"""Record sources: field mapping, lazy random access, malformed records, globs, Parquet."""

import os
import pickle
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phimr_jax.data import DataError, open_records
from tests.data import write_jsonl

FIELDS = {"problem": "question", "solution": "rollout", "answer": "gold", "difficulty": "level",
          "domain": "subject"}
REQUIRED = ("problem", "solution")


def _row(i, **over):
    row = {"question": f"q{i}", "rollout": f"s{i}", "gold": str(i), "level": i % 5 + 1,
           "subject": "algebra", "extra": [1, 2]}
    row.update(over)
    return row


def test_jsonl_maps_fields_and_reads_lazily(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [_row(0), "", _row(1, gold=None), "   ", _row(2)])
    src = open_records(str(path), fields=FIELDS, required=REQUIRED)
    assert len(src) == 3 and src.num_malformed == 0  # blank lines are not records
    assert src[0] == {"problem": "q0", "solution": "s0", "answer": "0", "difficulty": 1,
                      "domain": "algebra"}
    assert src[1]["answer"] is None and src[-1]["problem"] == "q2"
    with pytest.raises(IndexError):
        src[3]
    # Rewrite record 2 in place (same length): the source reads the file at access time.
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"q2"', b'"Q2"'))
    assert src[2]["problem"] == "Q2"


def test_patterns_globs_lists_and_directories(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        write_jsonl(tmp_path / name, [_row(ord(name[0])), _row(ord(name[0]) + 100)])
    by_glob = open_records(str(tmp_path / "*.jsonl"), fields=FIELDS, required=REQUIRED)
    assert [by_glob[i]["problem"] for i in range(4)] == ["q97", "q197", "q98", "q198"]  # sorted
    by_csv = open_records(f"{tmp_path}/b.jsonl, {tmp_path}/a.jsonl", fields=FIELDS)
    assert by_csv[0]["problem"] == "q98"  # order of the patterns
    assert len(open_records([str(tmp_path)], fields=FIELDS)) == 4
    assert len(open_records(f"{tmp_path}/a.jsonl,{tmp_path}/*.jsonl", fields=FIELDS)) == 4
    with pytest.raises(FileNotFoundError, match="nope"):
        open_records(f"{tmp_path}/a.jsonl,{tmp_path}/nope*.jsonl", fields=FIELDS)
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported"):
        open_records(str(tmp_path / "c.txt"), fields=FIELDS)
    with pytest.raises(ValueError, match="not in fields"):
        open_records(str(tmp_path / "a.jsonl"), fields=FIELDS, required=("rationale",))


BAD_LINES = [
    ('{"question": "q", "rollout": ', "invalid JSON"),
    ('[1, 2]', "list, not an object"),
    (_row(0, rollout=None), "missing required field 'rollout' (solution)"),
    (_row(0, question="  "), "required field 'question' (problem) is empty"),
    (_row(0, rollout=7), "'rollout' (solution) must be str, got int"),
    (_row(0, level=True), "'level' (difficulty) must be str/int/float, got bool"),
    (_row(0, gold=3), "'gold' (answer) must be str, got int"),
]


@pytest.mark.parametrize("bad,reason", BAD_LINES)
def test_malformed_jsonl_fails_with_file_and_line(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [_row(0), "", bad, _row(1)])
    with pytest.raises(DataError) as e:
        open_records(str(path), fields=FIELDS, required=REQUIRED)
    assert str(e.value).startswith(f"{path}:3: ")
    assert reason in str(e.value)


def test_malformed_jsonl_skipped_and_counted(tmp_path):
    rows = [_row(0)] + [b for b, _ in BAD_LINES] + ["", _row(1, level="Level 3", gold=None)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    src = open_records(str(path), fields=FIELDS, required=REQUIRED, skip_malformed=True)
    assert len(src) == 2 and src.num_malformed == len(BAD_LINES)
    assert [src[i]["problem"] for i in range(2)] == ["q0", "q1"]
    assert src[1]["difficulty"] == "Level 3"
    assert len(src.malformed_examples) == 5
    assert src.malformed_examples[0].startswith(f"{path}:2: invalid JSON")
    with pytest.raises(DataError, match="no valid records"):
        open_records(str(write_jsonl(tmp_path / "e.jsonl", ["[]", "{}"])), fields=FIELDS,
                     required=REQUIRED, skip_malformed=True)


def test_json_extension_hint(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[\n{"question": "q"}\n]\n')
    with pytest.raises(DataError, match="one JSON object per line"):
        open_records(str(path), fields=FIELDS)


def _write_parquet(path, rows, row_group_size):
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return str(path)


def test_parquet_row_groups_and_mixed_with_jsonl(tmp_path):
    rows = [_row(i) for i in range(10)]
    pqf = _write_parquet(tmp_path / "p.parquet", rows, row_group_size=3)
    src = open_records(pqf, fields=FIELDS, required=REQUIRED)
    assert len(src) == 10
    order = np.random.default_rng(0).permutation(10)
    assert [src[int(i)]["problem"] for i in order] == [f"q{i}" for i in order]
    assert src[9] == {"problem": "q9", "solution": "s9", "answer": "9", "difficulty": 5,
                      "domain": "algebra"}
    jsonl = write_jsonl(tmp_path / "z.jsonl", [_row(10)])
    both = open_records([pqf, str(jsonl)], fields=FIELDS, required=REQUIRED)
    assert [both[i]["problem"] for i in range(11)] == [f"q{i}" for i in range(11)]


def test_parquet_malformed_rows(tmp_path):
    rows = [_row(i) for i in range(7)]
    rows[4]["rollout"] = None
    rows[5]["question"] = ""
    pqf = _write_parquet(tmp_path / "p.parquet", rows, row_group_size=2)
    with pytest.raises(DataError, match=rf"^{pqf}:5: missing required field 'rollout'"):
        open_records(pqf, fields=FIELDS, required=REQUIRED)
    src = open_records(pqf, fields=FIELDS, required=REQUIRED, skip_malformed=True)
    assert src.num_malformed == 2 and len(src) == 5
    assert [src[i]["problem"] for i in range(5)] == ["q0", "q1", "q2", "q3", "q6"]
    assert src.malformed_examples[1] == f"{pqf}:6: required field 'question' (problem) is empty"
    with pytest.raises(DataError, match="required columns 'nope' \\(solution\\)"):
        open_records(pqf, fields={**FIELDS, "solution": "nope"}, required=REQUIRED,
                     skip_malformed=True)


def test_source_pickles_and_is_thread_safe(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [_row(i) for i in range(50)])
    pqf = _write_parquet(tmp_path / "b.parquet", [_row(i) for i in range(50, 100)], 7)
    src = open_records([str(jsonl), pqf], fields=FIELDS, required=REQUIRED)
    src[0], src[60]  # open the file handles / fill the row-group cache before pickling
    copy = pickle.loads(pickle.dumps(src))
    assert [copy[i] for i in range(100)] == [src[i] for i in range(100)]
    results, errors = {}, []

    def read(seed):
        try:
            order = np.random.default_rng(seed).permutation(100)
            results[seed] = {int(i): src[int(i)]["problem"] for i in order}
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)
    threads = [threading.Thread(target=read, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results.values():
        assert r == {i: f"q{i}" for i in range(100)}


def test_index_is_offsets_not_records(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [_row(i, rollout="x" * 1000) for i in range(100)])
    src = open_records(str(path), fields=FIELDS, required=REQUIRED)
    (jfile,) = src._files
    assert jfile.starts.dtype == np.int64 and jfile.starts.shape == (100,)
    size = sum(a.nbytes for a in vars(jfile).values() if isinstance(a, np.ndarray))
    assert size == 100 * 12 < os.path.getsize(path) // 50
