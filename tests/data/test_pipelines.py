"""grain pipelines: packing layout, SFT padding and masks, dropping/counting, checkpointing,
determinism and sharding."""

import collections
import itertools
import json

import numpy as np
import pytest

from phimr_jax.data import (DataError, eval_examples, example_arrays, load_tokenizer,
                            midtrain_dataset, open_records, sft_dataset)
from tests.data import CANONICAL, demo_paths, hf_tokenizer_dir, sp_model, write_jsonl

KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")
DTYPES = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32,
          "positions": np.int32, "segment_ids": np.int32}


FITS = 320  # Row length that every demo record fits (the longest is 273 tokens with `tok`).


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("sentencepiece", sp_model())


@pytest.fixture(scope="module")
def source():
    return open_records(demo_paths()["train"], fields=CANONICAL, required=("problem", "solution"))


def _key(inputs) -> bytes:
    return np.asarray(inputs, np.int32).tobytes()


def _examples_by_key(source, tok):
    """inputs bytes -> (record index, example arrays) for every record of the source."""
    out = {}
    for i in range(len(source)):
        ex = example_arrays(tok, source[i])
        out.setdefault(_key(ex["inputs"]), (i, ex))
    return out


def _batches(ds, n=None):
    return list(itertools.islice(iter(ds), n))


def _segments(row):
    """(start, end) of each segment of a packed/padded row, checking the row's layout."""
    seg = row["segment_ids"]
    n_real = int(np.count_nonzero(seg))
    assert np.all(seg[n_real:] == 0), "padding only at the end of a row"
    bounds, start = [], 0
    for sid in range(1, int(seg.max()) + 1):
        length = int(np.count_nonzero(seg == sid))
        assert np.all(seg[start:start + length] == sid), "segments are contiguous, 1, 2, ..."
        bounds.append((start, start + length))
        start += length
    assert start == n_real
    return bounds


def test_example_arrays_mask_completion_only(tok, source):
    record = source[0]
    prompt = tok.prompt_ids(record["problem"])
    completion = tok.completion_ids(record["solution"])
    ex = example_arrays(tok, record)
    ids = prompt + completion
    assert ex["inputs"].tolist() == ids[:-1] and ex["targets"].tolist() == ids[1:]
    assert ex["targets"][ex["loss_mask"] == 1].tolist() == completion  # incl. the final <|end|>
    assert ex["targets"][ex["loss_mask"] == 0].tolist() == prompt[1:]  # no loss on the prompt
    assert ex["targets"][-1] == tok.end_id and ex["loss_mask"][-1] == 1
    assert {k: v.dtype for k, v in ex.items()} == {k: DTYPES[k] for k in ex}


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_packing_layout_and_every_example_once(kind, source):
    tok = load_tokenizer(kind, sp_model() if kind == "sentencepiece" else hf_tokenizer_dir())
    examples = _examples_by_key(source, tok)
    ds, stats = midtrain_dataset(source, tok, seq_len=300, batch_size=1, seed=0, num_epochs=1,
                                 num_packing_bins=4)
    assert stats.num_kept == len(source) and stats.num_too_long == 0
    seen, rows = collections.Counter(), 0
    for batch in iter(ds):
        assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
            k: (np.dtype(DTYPES[k]), (1, 300)) for k in KEYS}
        row = {k: v[0] for k, v in batch.items()}
        bounds = _segments(row)
        rows += 1
        assert len(bounds) >= 1
        end = bounds[-1][1]
        assert np.all(row["inputs"][end:] == tok.pad_id) and np.all(row["loss_mask"][end:] == 0)
        assert np.all(row["positions"][end:] == 0) and np.all(row["targets"][end:] == tok.pad_id)
        for s, e in bounds:
            np.testing.assert_array_equal(row["positions"][s:e], np.arange(e - s))
            _, ex = examples[_key(row["inputs"][s:e])]  # a whole example: never split
            np.testing.assert_array_equal(row["targets"][s:e], ex["targets"])
            np.testing.assert_array_equal(row["loss_mask"][s:e], ex["loss_mask"])
            assert row["targets"][e - 1] == tok.end_id and row["loss_mask"][e - 1] == 1
            seen[_key(row["inputs"][s:e])] += 1
    assert sum(seen.values()) == len(source) and set(seen) == set(examples)
    assert rows < len(source) * 0.75  # rows really hold several examples
    assert stats.num_tokens == sum(len(ex["inputs"]) for _, ex in examples.values())
    assert stats.num_loss_tokens == sum(int(ex["loss_mask"].sum())
                                        for _, ex in examples.values())


@pytest.mark.parametrize("row_multiple", [1, 4])
def test_padding_free_sft_batches_hold_the_same_examples_whole(tok, source, row_multiple):
    """Padding-free SFT: each batch holds exactly the examples of the padded batch at the same
    step (same order of batches), each whole in one row with positions from 0 and its own
    segment id; fewer rows, a multiple of row_multiple."""
    def build(**kw):
        return sft_dataset(source, tok, seq_len=FITS, batch_size=8, seed=3, num_epochs=1,
                           **kw)[0]
    padded = _batches(build())
    packed = _batches(build(padding_free=True, row_multiple=row_multiple))
    assert len(packed) == len(padded) > 3
    rows = 0
    for want, got in zip(padded, packed):
        assert set(got) == set(KEYS) and all(got[k].dtype == DTYPES[k] for k in KEYS)
        n = got["inputs"].shape[0]
        assert got["inputs"].shape == (n, FITS) and n % row_multiple == 0 and n <= 8
        rows += n
        examples = collections.Counter()
        for r in range(n):
            row = {k: v[r] for k, v in got.items()}
            for s, e in _segments(row):
                np.testing.assert_array_equal(row["positions"][s:e], np.arange(e - s))
                examples[(_key(row["inputs"][s:e]), _key(row["targets"][s:e]),
                          row["loss_mask"][s:e].tobytes())] += 1
            end = int(np.count_nonzero(row["segment_ids"]))
            assert np.all(row["loss_mask"][end:] == 0) and np.all(row["inputs"][end:] == tok.pad_id)
        expected = collections.Counter()
        for r in range(8):
            e = int(want["segment_ids"][r].sum())
            expected[(_key(want["inputs"][r, :e]), _key(want["targets"][r, :e]),
                      want["loss_mask"][r, :e].tobytes())] += 1
        assert examples == expected
    # Rows really are shared (these test records run to 273 tokens in 320-token rows, so a
    # multiple of 4 often rounds back up to 8).
    assert rows < (0.75 if row_multiple == 1 else 1.0) * 8 * len(packed)


def _length_records(tmp_path, tok, seq_len):
    """Records whose example lengths (len(ids) - 1) straddle seq_len, incl. an exact fit."""
    base = {"problem": "What is 1 + 1?", "answer": "2", "domain": "arithmetic"}
    overhead = len(example_arrays(tok, {**base, "solution": ""})["inputs"])
    rows = []
    for i, extra in enumerate([-5, 0, 1, 40, -20, 3, 0]):
        solution = "ab" * 200
        n = seq_len - overhead + extra  # tokens of solution wanted
        ids = tok.encode(solution)[:max(n, 0)]
        rows.append({**base, "solution": tok.decode(ids), "difficulty": i})
    path = write_jsonl(tmp_path / "lengths.jsonl", rows)
    src = open_records(str(path), fields=CANONICAL, required=("problem", "solution"))
    lengths = [len(example_arrays(tok, src[i])["inputs"]) for i in range(len(src))]
    return src, lengths


@pytest.mark.parametrize("builder", [midtrain_dataset, sft_dataset])
def test_too_long_examples_dropped_and_counted(builder, tok, tmp_path):
    seq_len = 120
    src, lengths = _length_records(tmp_path, tok, seq_len)
    assert seq_len in lengths and any(n > seq_len for n in lengths)
    ds, stats = builder(src, tok, seq_len=seq_len, batch_size=1, seed=0, num_epochs=1)
    too_long = sum(n > seq_len for n in lengths)
    assert (stats.num_records, stats.num_too_long, stats.num_kept) == (
        len(lengths), too_long, len(lengths) - too_long)
    got = sorted(int(np.count_nonzero(b["segment_ids"][0])) for b in iter(ds))
    if builder is sft_dataset:
        assert got == sorted(n for n in lengths if n <= seq_len)  # kept whole, never truncated
    else:
        assert sum(got) == sum(n for n in lengths if n <= seq_len)


def test_sft_rows_padding_and_filter(tok, tmp_path):
    rows = [{"problem": f"What is {i} + 1?", "solution": f"{i} + 1 = {i + 1}.",
             "answer": str(i + 1), "difficulty": d, "domain": dom}
            for i, (d, dom) in enumerate([(1, "arithmetic"), ("Level 5", "algebra"),
                                          (4.5, "arithmetic"), (None, "arithmetic"),
                                          ("4", "geometry"), (5, "arithmetic")])]
    src = open_records(str(write_jsonl(tmp_path / "s.jsonl", rows)), fields=CANONICAL)
    ds, stats = sft_dataset(src, tok, seq_len=96, batch_size=2, seed=0, num_epochs=1,
                            shuffle=False, min_difficulty=4, domains=["arithmetic", "algebra"])
    assert (stats.num_records, stats.num_filtered, stats.num_kept) == (6, 3, 3)
    batches = _batches(ds)
    assert len(batches) == 1  # 3 kept, batch 2, remainder dropped
    for b, record in zip(batches[0]["inputs"], [rows[1], rows[2]]):
        np.testing.assert_array_equal(b[:len(example_arrays(tok, record)["inputs"])],
                                      example_arrays(tok, record)["inputs"])
    row = {k: v[0] for k, v in batches[0].items()}
    ex = example_arrays(tok, rows[1])
    n = len(ex["inputs"])
    assert _segments(row) == [(0, n)]
    np.testing.assert_array_equal(row["positions"], np.r_[np.arange(n), np.zeros(96 - n)])
    np.testing.assert_array_equal(row["loss_mask"], np.r_[ex["loss_mask"], np.zeros(96 - n)])
    assert np.all(row["inputs"][n:] == tok.pad_id) and np.all(row["targets"][n:] == tok.pad_id)
    bad = str(write_jsonl(tmp_path / "b.jsonl", [{**rows[0], "difficulty": "hard"}]))
    with pytest.raises(DataError, match="'hard' has no number"):
        sft_dataset(open_records(bad, fields=CANONICAL), tok, seq_len=96, batch_size=1, seed=0,
                    num_epochs=1, min_difficulty=3)


def test_sft_oversampling_repeats_the_hard_examples_in_every_epoch(tok, tmp_path):
    """oversample=(5, 3): records of difficulty >= 5 (after the filters) appear 3 times per
    epoch, the rest once; the counts cover every appearance; a record without a difficulty is
    never oversampled; the first epoch's order differs from the second's."""
    rows = [{"problem": f"What is {i} + 1?", "solution": f"{i} + 1 = {i + 1}.",
             "answer": str(i + 1), "difficulty": d, "domain": "arithmetic"}
            for i, d in enumerate([1, 5, None, "Level 6", 0, 2])]
    src = open_records(str(write_jsonl(tmp_path / "s.jsonl", rows)), fields=CANONICAL)
    plain, once = sft_dataset(src, tok, seq_len=96, batch_size=1, seed=0, num_epochs=1)
    ds, stats = sft_dataset(src, tok, seq_len=96, batch_size=1, seed=0, num_epochs=2,
                            oversample=(5, 3))
    assert once.num_kept == 6 and stats.num_kept == 10  # 2 hard records, 2 extra times each
    hard_tokens = sum(len(example_arrays(tok, rows[i])["inputs"]) for i in (1, 3))
    hard_loss = sum(int(example_arrays(tok, rows[i])["loss_mask"].sum()) for i in (1, 3))
    assert stats.num_tokens == once.num_tokens + 2 * hard_tokens
    assert stats.num_loss_tokens == once.num_loss_tokens + 2 * hard_loss
    index = {_key(example_arrays(tok, r)["inputs"]): i for i, r in enumerate(rows)}
    seen = [index[_key(b["inputs"][0][b["segment_ids"][0] > 0])] for b in _batches(ds, 20)]
    for epoch in (seen[:10], seen[10:]):
        assert collections.Counter(epoch) == {0: 1, 1: 3, 2: 1, 3: 3, 4: 1, 5: 1}
    assert seen[:10] != seen[10:]
    # A filter first, then the oversampling of what it kept: level 5 is filtered out.
    _, stats = sft_dataset(src, tok, seq_len=96, batch_size=1, seed=0, num_epochs=1,
                           min_difficulty=6, oversample=(5, 4))
    assert (stats.num_filtered, stats.num_kept) == (5, 4)
    _, stats = sft_dataset(src, tok, seq_len=96, batch_size=1, seed=0, num_epochs=1,
                           oversample=(5, 1))
    assert stats == once and len(_batches(plain)) == 6
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        sft_dataset(src, tok, seq_len=96, batch_size=1, seed=0, num_epochs=1, oversample=(5, 0))


@pytest.mark.parametrize("builder,k,kwargs", [
    (midtrain_dataset, 44, {}),
    (midtrain_dataset, 43, {"num_packing_bins": 3}),  # saved in the middle of a packed group
    (sft_dataset, 58, {}),
    (sft_dataset, 58, {"padding_free": True, "row_multiple": 2})])
def test_checkpoint_restore_is_bit_exact(builder, k, kwargs, tok, source):
    """Advance k batches (close to the end of the first epoch: about 47 packed / 60 SFT
    batches per epoch), save, take 6 more across the epoch boundary; a rebuilt pipeline
    restored from the saved state gives the same 6."""
    def build():
        return builder(source, tok, seq_len=FITS, batch_size=4, seed=7, num_epochs=None,
                       **kwargs)[0]
    it = iter(build())
    for _ in range(k):
        next(it)
    while "num_packing_bins" in kwargs and it.get_state()["next_row"] == 0:  # inside a group
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a JSON checkpoint would store
    expected = [next(it) for _ in range(6)]
    restored = iter(build())
    restored.set_state(state)
    for want, got in zip(expected, [next(restored) for _ in range(6)]):
        for key in KEYS:
            np.testing.assert_array_equal(want[key], got[key])
            assert want[key].dtype == got[key].dtype


def test_determinism_seeds_and_epochs(tok, source):
    def order(seed, num_epochs=1):
        ds, _ = sft_dataset(source, tok, seq_len=FITS, batch_size=1, seed=seed,
                            num_epochs=num_epochs)
        return [_key(b["inputs"][0][b["segment_ids"][0] > 0]) for b in iter(ds)]
    first = order(0, num_epochs=2)
    assert first == order(0, num_epochs=2)
    epoch1, epoch2 = first[:len(source)], first[len(source):]
    assert sorted(epoch1) == sorted(epoch2) and epoch1 != epoch2  # reshuffled each epoch
    assert order(1) != epoch1
    a, _ = midtrain_dataset(source, tok, seq_len=FITS, batch_size=2, seed=3, num_epochs=1)
    b, _ = midtrain_dataset(source, tok, seq_len=FITS, batch_size=2, seed=3, num_epochs=1)
    for x, y in zip(_batches(a), _batches(b)):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])


@pytest.mark.parametrize("builder", [midtrain_dataset, sft_dataset])
def test_shards_are_disjoint_and_cover_everything(builder, tok, source):
    examples = _examples_by_key(source, tok)
    shards, records = [], 0
    for shard in range(2):
        ds, stats = builder(source, tok, seq_len=FITS, batch_size=1, seed=5, num_epochs=1,
                            shard_index=shard, shard_count=2)
        records += stats.num_records
        got = set()
        for batch in iter(ds):
            row = {k: v[0] for k, v in batch.items()}
            for s, e in _segments(row):
                got.add(examples[_key(row["inputs"][s:e])][0])
        assert len(got) == stats.num_kept
        shards.append(got)
    assert records == len(source)
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(len(source)))
    with pytest.raises(ValueError, match="shard_index 2 not in"):
        builder(source, tok, seq_len=FITS, batch_size=1, seed=5, num_epochs=1, shard_index=2,
                shard_count=2)


def test_malformed_count_and_nothing_usable(tok, tmp_path):
    good = {"problem": "What is 1 + 1?", "solution": "1 + 1 = 2.", "answer": "2"}
    path = write_jsonl(tmp_path / "m.jsonl", [good, "{oops", {"problem": "x"}, good])
    src = open_records(str(path), fields=CANONICAL, required=("problem", "solution"),
                       skip_malformed=True)
    _, stats = sft_dataset(src, tok, seq_len=128, batch_size=1, seed=0, num_epochs=1)
    assert (stats.num_malformed, stats.num_records, stats.num_kept) == (2, 2, 2)
    with pytest.raises(DataError, match="no usable examples"):
        midtrain_dataset(src, tok, seq_len=8, batch_size=1, seed=0, num_epochs=1)
    lax = open_records(str(path), fields=CANONICAL, skip_malformed=True)  # nothing required
    with pytest.raises(DataError, match="record 1 has no 'solution'"):
        sft_dataset(lax, tok, seq_len=128, batch_size=1, seed=0, num_epochs=1)


def test_eval_examples(tok):
    src = open_records(demo_paths()["heldout"], fields=CANONICAL,
                       required=("problem", "answer"))
    out = eval_examples(src, tok, 5)
    assert len(out) == 5 and len(eval_examples(src, tok, None)) == len(src)
    for i, ex in enumerate(out):
        record = src[i]
        assert ex == {"prompt_ids": tok.prompt_ids(record["problem"]),
                      "answer": record["answer"], "problem": record["problem"]}
    suffix = " Please reason step by step, and put your final answer within \\boxed{}."
    ex = eval_examples(src, tok, 1, question_suffix=suffix)[0]
    assert tok.decode(ex["prompt_ids"]).endswith(f"{suffix}<|end|><|assistant|>")
