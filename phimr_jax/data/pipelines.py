"""grain pipelines: records -> tokenised chat examples -> fixed-shape numpy training batches.

Every batch (per process) is a dict of numpy arrays, each [batch_size, seq_len]:
  inputs int32, targets int32 (inputs shifted by one), loss_mask float32 (1.0 where the target
  is a completion token), positions int32 (restart at 0 in every example), segment_ids int32
  (1, 2, ... = the example within the row, 0 = padding).

An example is `prompt_ids(problem) + completion_ids(solution)` (the completion ends with <|end|>);
inputs = ids[:-1], targets = ids[1:], and the loss covers exactly the targets that are completion
tokens: the solution and its final <|end|>, never the prompt. Stage 1 ("loss on all solution
tokens") and stage 2 use the same mask.

- `midtrain_dataset` (stage 1): examples are packed into rows with grain's
  `FirstFitPackIterDataset` (no example is split across rows; the rest of a row is padding).
- `sft_dataset` (stage 2): one example per row, right-padded, optionally restricted to a harder
  subset (`min_difficulty`, `domains`), so the model sees where each answer stops; or
  padding-free (`PackBatch`): the same examples per batch sharing rows, each attending only to
  itself.

Order of operations: shard the source's record indices (record i goes to process
i % shard_count; shards are disjoint and cover everything) -> pre-pass -> shuffle (grain's index
shuffle, a new permutation per epoch from `seed`) -> repeat `num_epochs` (None = forever) ->
tokenise (lazily, in grain's read threads) -> pack or pad -> batch (drop_remainder=True: the
last partial batch of a finite run is dropped).

Pre-pass and counting: before building the dataset each process reads and tokenises every
record of *its shard* once, applies the filters and drops examples longer than seq_len
(`len(ids) - 1 > seq_len`; never truncated), and keeps only the int64 indices of the survivors
(8 bytes per example; the pass itself holds three int64 per record of the shard). The
`DataStats` are therefore exact and known up front, and per-process; `num_malformed` is the
source's count (all shards). The pre-pass costs one extra tokenisation of the shard (batched;
the HF tokenizer encodes a batch in parallel in Rust): fine for the demo and for curated
subsets, minutes-to-hours for 10M long rollouts on one host, and it divides over hosts. Token
ids are not cached (10M rollouts x 16K tokens would not fit in memory); the map tokenises
again when the example is read.

Checkpointing: `it = iter(dataset)`; `it.get_state()` is a small dict of ints (JSON-able) and
`it.set_state(state)` on a fresh iterator of the same dataset (same source, tokenizer and
arguments) continues with exactly the same batches. Multi-host caveat: shards differ in size
(by one record, plus whatever the filters and length drops remove, plus packing), so with a
finite `num_epochs` processes can run out at different steps; train for a fixed number of
steps with `num_epochs=None` instead (`stats.num_kept` / `num_tokens` size an epoch).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, Iterable, Optional, Sequence

import grain
import numpy as np

from phimr_jax.data.sources import DataError
from phimr_jax.data.tokenizers import ChatTokenizer

log = logging.getLogger(__name__)

SEQUENCE_KEYS = ("inputs", "targets", "loss_mask")
BATCH_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")
PREPASS_CHUNK = 256  # records tokenised per batch call in the pre-pass
PREPASS_LOG_EVERY = 100_000


@dataclasses.dataclass(frozen=True)
class DataStats:
    """Counts for one process's shard (except num_malformed: the whole source)."""

    num_records: int  # good records in this shard
    num_kept: int  # examples per epoch after filtering and dropping too-long ones
    num_too_long: int  # dropped: len(ids) - 1 > seq_len
    num_filtered: int  # dropped by min_difficulty / domains (SFT)
    num_malformed: int  # records the source skipped as malformed (all shards)
    num_tokens: int  # input tokens of the kept examples, per epoch
    num_loss_tokens: int  # trained (completion) tokens of the kept examples, per epoch

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# --- examples -------------------------------------------------------------------------------
def example_arrays(tokenizer: ChatTokenizer, record: dict) -> dict[str, np.ndarray]:
    """inputs/targets int32 and loss_mask float32 (each len(ids) - 1) for one record."""
    prompt = tokenizer.prompt_ids(record["problem"])
    return _arrays(prompt, tokenizer.completion_ids(record["solution"]))


def _arrays(prompt: list[int], completion: list[int]) -> dict[str, np.ndarray]:
    return masked_arrays(prompt + completion, len(prompt))


def masked_arrays(ids: list[int], first_scored: int) -> dict[str, np.ndarray]:
    """inputs/targets/loss_mask of one token sequence whose tokens from `first_scored` on are
    scored (targets[t] = ids[t + 1], so the mask starts at first_scored - 1)."""
    ids = np.asarray(ids, dtype=np.int32)
    loss_mask = np.zeros(len(ids) - 1, dtype=np.float32)
    loss_mask[first_scored - 1:] = 1.0
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": loss_mask}


class _Featurize:
    """grain map: record index -> example arrays (picklable for grain worker processes)."""

    def __init__(self, source, tokenizer: ChatTokenizer):
        self.source, self.tokenizer = source, tokenizer

    def __call__(self, index) -> dict[str, np.ndarray]:
        return example_arrays(self.tokenizer, self.source[int(index)])


class PadRow:
    """grain map: one example -> one right-padded row with positions and segment ids."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = seq_len, pad_id

    def __call__(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, t = len(ex["inputs"]), self.seq_len
        row = {"inputs": np.full(t, self.pad_id, np.int32),
               "targets": np.full(t, self.pad_id, np.int32),
               "loss_mask": np.zeros(t, np.float32),
               "positions": np.zeros(t, np.int32), "segment_ids": np.zeros(t, np.int32)}
        for key in SEQUENCE_KEYS:
            row[key][:n] = ex[key]
        row["positions"][:n] = np.arange(n, dtype=np.int32)
        row["segment_ids"][:n] = 1
        return row


class PackBatch:
    """grain batch_fn, padding-free SFT: a batch of examples -> rows of seq_len holding each
    example whole (first-fit decreasing), with segment ids 1, 2, ... per row and positions
    restarting at 0 in every example, so that no token attends across examples and each one
    is seen exactly as in its own padded row. The same examples per step, the same
    token-weighted loss, less padding. The row count is rounded up to a multiple of
    `row_multiple` (a handful of shapes to compile; the batch splits over devices and
    gradient-accumulation microbatches)."""

    def __init__(self, seq_len: int, pad_id: int, row_multiple: int = 1):
        if row_multiple < 1:
            raise ValueError(f"row_multiple must be >= 1, got {row_multiple}")
        self.seq_len, self.pad_id, self.row_multiple = seq_len, pad_id, row_multiple

    def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
        t = self.seq_len
        lengths = [len(ex["inputs"]) for ex in examples]
        used: list[int] = []  # tokens in each row so far
        place = []  # (example, row, offset)
        for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):
            row = next((r for r, n in enumerate(used) if n + lengths[i] <= t), len(used))
            if row == len(used):
                used.append(0)
            place.append((i, row, used[row]))
            used[row] += lengths[i]
        rows = -(-len(used) // self.row_multiple) * self.row_multiple
        out = {"inputs": np.full((rows, t), self.pad_id, np.int32),
               "targets": np.full((rows, t), self.pad_id, np.int32),
               "loss_mask": np.zeros((rows, t), np.float32),
               "positions": np.zeros((rows, t), np.int32),
               "segment_ids": np.zeros((rows, t), np.int32)}
        segments = [0] * len(used)
        for i, row, start in sorted(place, key=lambda p: (p[1], p[2])):
            n, span = lengths[i], slice(start, start + lengths[i])
            for key in SEQUENCE_KEYS:
                out[key][row, span] = examples[i][key]
            out["positions"][row, span] = np.arange(n, dtype=np.int32)
            segments[row] += 1
            out["segment_ids"][row, span] = segments[row]
        return out


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packed row -> our batch keys (its per-feature segment ids / positions)."""
    return {"inputs": row["inputs"], "targets": row["targets"], "loss_mask": row["loss_mask"],
            "positions": row["inputs_positions"], "segment_ids": row["inputs_segment_ids"]}


# --- pre-pass -------------------------------------------------------------------------------
def difficulty_value(value) -> Optional[float]:
    """A numeric difficulty: numbers as is, strings like "3", "3.5" or "Level 5"; None if absent."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = re.search(r"-?\d+(?:\.\d+)?", str(value))
    if m is None:
        raise DataError(f"difficulty {value!r} has no number; cannot apply min_difficulty")
    return float(m.group())


def _make_filter(min_difficulty: Optional[float],
                 domains: Optional[Iterable[str]]) -> Optional[Callable[[dict], bool]]:
    """record -> keep? Records without a difficulty/domain fail an active filter."""
    if min_difficulty is None and domains is None:
        return None
    allowed = None if domains is None else frozenset(domains)

    def keep(record: dict) -> bool:
        if min_difficulty is not None:
            level = difficulty_value(record.get("difficulty"))
            if level is None or level < min_difficulty:
                return False
        return allowed is None or record.get("domain") in allowed
    return keep


def _check_record(record: dict, index: int) -> None:
    for key in ("problem", "solution"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise DataError(f"record {index} has no {key!r}; open the source with "
                            f"required=('problem', 'solution') to locate it (file:line)")


def _shard_indices(n: int, shard_index: int, shard_count: int) -> np.ndarray:
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    return np.arange(shard_index, n, shard_count, dtype=np.int64)


def _chunk_lengths(source, tokenizer: ChatTokenizer, chunk: np.ndarray,
                   keep: Optional[Callable[[dict], bool]],
                   copies: Optional[Callable[[dict], int]] = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(example length len(ids) - 1, completion length, appearances per epoch) per record;
    length -1 where filtered out."""
    records = [source[int(i)] for i in chunk]
    for i, record in zip(chunk, records):
        _check_record(record, int(i))
    passing = [j for j, r in enumerate(records) if keep is None or keep(r)]
    prompts = tokenizer.prompt_ids_batch([records[j]["problem"] for j in passing])
    completions = tokenizer.completion_ids_batch([records[j]["solution"] for j in passing])
    lengths = np.full(len(chunk), -1, np.int64)
    loss = np.zeros(len(chunk), np.int64)
    count = np.ones(len(chunk), np.int64)
    for j, p, c in zip(passing, prompts, completions):
        lengths[j], loss[j] = len(p) + len(c) - 1, len(c)
        if copies is not None:
            count[j] = copies(records[j])
    return lengths, loss, count


def prepass(source, tokenizer: ChatTokenizer, *, seq_len: int, shard_index: int = 0,
            shard_count: int = 1, keep: Optional[Callable[[dict], bool]] = None,
            copies: Optional[Callable[[dict], int]] = None,
            ) -> tuple[np.ndarray, DataStats]:
    """(kept record indices of this shard, stats): filter, tokenise once, drop too-long.

    `copies(record)`: how many times a kept record appears per epoch (default once); the
    indices then list every kept record once, followed by the second appearances, the third,
    and so on, and the counts in `stats` cover every appearance.
    """
    indices = _shard_indices(len(source), shard_index, shard_count)
    lengths = np.empty(len(indices), np.int64)
    loss = np.empty(len(indices), np.int64)
    count = np.empty(len(indices), np.int64)
    for start in range(0, len(indices), PREPASS_CHUNK):
        part = slice(start, start + PREPASS_CHUNK)
        lengths[part], loss[part], count[part] = _chunk_lengths(source, tokenizer,
                                                                indices[part], keep, copies)
        if start and start % PREPASS_LOG_EVERY < PREPASS_CHUNK:
            log.info("pre-pass: %d / %d records", start, len(indices))
    good = (lengths >= 0) & (lengths <= seq_len)
    times = count[good]
    stats = DataStats(num_records=len(indices), num_kept=int(times.sum()),
                      num_too_long=int((lengths > seq_len).sum()),
                      num_filtered=int((lengths < 0).sum()),
                      num_malformed=getattr(source, "num_malformed", 0),
                      num_tokens=int((lengths[good] * times).sum()),
                      num_loss_tokens=int((loss[good] * times).sum()))
    if stats.num_too_long:
        log.warning("dropped %d of %d examples longer than seq_len=%d (shard %d/%d)",
                    stats.num_too_long, len(indices), seq_len, shard_index, shard_count)
    if not stats.num_kept:
        raise DataError(f"no usable examples in shard {shard_index}/{shard_count}: {stats}")
    kept = indices[good]
    if stats.num_kept > len(kept):
        log.info("%d kept examples appear more than once: %d rows per epoch",
                 int((times > 1).sum()), stats.num_kept)
    return np.concatenate([kept] + [kept[times > k] for k in range(1, int(times.max()))]), stats


def _make_copies(min_difficulty: float, repeats: int) -> Callable[[dict], int]:
    """record -> `repeats` if its difficulty is >= min_difficulty, else 1."""
    if repeats < 1:
        raise ValueError(f"oversample repeats must be >= 1, got {repeats}")

    def copies(record: dict) -> int:
        level = difficulty_value(record.get("difficulty"))
        return repeats if level is not None and level >= min_difficulty else 1
    return copies


# --- datasets -------------------------------------------------------------------------------
def _examples(kept: np.ndarray, source, tokenizer: ChatTokenizer, *, seed: int,
              num_epochs: Optional[int], shuffle: bool) -> grain.MapDataset:
    ds = grain.MapDataset.source(kept)
    if shuffle:
        ds = ds.shuffle(seed=seed)  # a different permutation in every epoch of the repeat
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds.map(_Featurize(source, tokenizer))


def _read_options(batch_size: int, read_threads: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=read_threads,
                             prefetch_buffer_size=max(64, 2 * batch_size))


def _check_shapes(seq_len: int, batch_size: int, num_epochs: Optional[int]) -> None:
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1 (got {seq_len}, {batch_size})")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")


def midtrain_dataset(source, tokenizer: ChatTokenizer, *, seq_len: int, batch_size: int,
                     seed: int, num_epochs: Optional[int], shard_index: int = 0,
                     shard_count: int = 1, shuffle: bool = True,
                     num_packing_bins: Optional[int] = None, read_threads: int = 4,
                     ) -> tuple[grain.IterDataset, DataStats]:
    """Stage-1 batches: examples packed first-fit into rows of seq_len (see module doc).

    `num_packing_bins` (default batch_size) rows are filled at once: more bins, less padding,
    more mixing of neighbouring examples (and of epochs at epoch boundaries). With shuffle, the
    bins of each packed group are also emitted in a seeded random order.
    """
    _check_shapes(seq_len, batch_size, num_epochs)
    kept, stats = prepass(source, tokenizer, seq_len=seq_len, shard_index=shard_index,
                          shard_count=shard_count)
    ds = _examples(kept, source, tokenizer, seed=seed, num_epochs=num_epochs, shuffle=shuffle)
    ds = ds.to_iter_dataset(_read_options(batch_size, read_threads))
    pad = tokenizer.pad_id
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={k: seq_len for k in SEQUENCE_KEYS},
        num_packing_bins=num_packing_bins or batch_size, seed=seed, shuffle_bins=shuffle,
        meta_features=("targets", "loss_mask"),  # packed too, but no own segment ids/positions
        padding_struct={"inputs": pad, "targets": pad, "loss_mask": 0.0})
    ds = ds.map(_rename_packed).batch(batch_size, drop_remainder=True)
    return ds, stats


def sft_dataset(source, tokenizer: ChatTokenizer, *, seq_len: int, batch_size: int, seed: int,
                num_epochs: Optional[int], shard_index: int = 0, shard_count: int = 1,
                shuffle: bool = True, min_difficulty: Optional[float] = None,
                domains: Optional[Sequence[str]] = None, read_threads: int = 4,
                oversample: Optional[tuple[float, int]] = None,
                padding_free: bool = False, row_multiple: int = 1,
                ) -> tuple[grain.IterDataset, DataStats]:
    """Stage-2 batches: one example per row, right-padded; the harder subset if asked.
    `padding_free`: the batch's examples share rows instead (`PackBatch`, a multiple of
    `row_multiple` rows), each still whole and attending only to itself.

    `min_difficulty` keeps records whose numeric difficulty (see `difficulty_value`) is >= it;
    `domains` keeps records whose domain is one of them; records lacking the field are
    filtered out. Both are counted in `num_filtered`. `oversample` = (difficulty, repeats):
    each kept example whose difficulty is >= that appears `repeats` times per epoch (each
    epoch reshuffled as a whole), so the hard part of the subset weighs more without
    dropping the rest; `num_kept` and the token counts then count every appearance.
    """
    _check_shapes(seq_len, batch_size, num_epochs)
    kept, stats = prepass(source, tokenizer, seq_len=seq_len, shard_index=shard_index,
                          shard_count=shard_count, keep=_make_filter(min_difficulty, domains),
                          copies=None if oversample is None else _make_copies(*oversample))
    ds = _examples(kept, source, tokenizer, seed=seed, num_epochs=num_epochs, shuffle=shuffle)
    if padding_free:
        ds = ds.to_iter_dataset(_read_options(batch_size, read_threads))
        return ds.batch(batch_size, drop_remainder=True,
                        batch_fn=PackBatch(seq_len, tokenizer.pad_id, row_multiple)), stats
    ds = ds.map(PadRow(seq_len, tokenizer.pad_id))
    ds = ds.to_iter_dataset(_read_options(batch_size, read_threads))
    return ds.batch(batch_size, drop_remainder=True), stats


def eval_examples(source, tokenizer: ChatTokenizer, n: Optional[int], *,
                  question_suffix: str = "", system: Optional[str] = None,
                  reasoning: bool = True) -> list[dict]:
    """The first n records (all if n is None) as {"prompt_ids", "answer", "problem"}.

    `question_suffix` is appended to the problem (e.g. " Please reason step by step, and put
    your final answer within \\boxed{}." for the paper's evaluation prompt).
    """
    count = len(source) if n is None else min(n, len(source))
    out = []
    for i in range(count):
        record = source[i]
        answer = record.get("answer")
        if not isinstance(record.get("problem"), str) or not answer:
            raise DataError(f"record {i} lacks a problem or a gold answer; open the source "
                            "with required=('problem', 'answer') to locate it (file:line)")
        question = record["problem"] + question_suffix
        out.append({"prompt_ids": tokenizer.prompt_ids(question, system, reasoning),
                    "answer": str(answer), "problem": record["problem"]})
    return out
