"""Lazy, random-access record sources over local JSONL and Parquet files (grain data sources).

`open_records(patterns, fields=..., required=...)` returns a `RecordSource`: `len(src)` and
`src[i] -> dict` with *canonical* keys (the keys of `fields`), whatever the files call them.
Nothing is loaded up front except a small index:

- JSONL (`.jsonl`, and `.json` files holding one object per line): one pass records the byte
  offset (int64) and length (int32) of every good line, 12 bytes per record (120 MB for 10M
  records); `src[i]` reads that line back with `os.pread` (thread-safe, no shared file position)
  and parses it again.
- Parquet: row-group sizes come from the footer; `src[i]` decodes the row group holding row i
  (only the mapped columns) and keeps the last few decoded row groups. Parquet is therefore
  row-group granular: fully random access over large row groups decodes a whole group per record.
  Write training Parquet with small row groups (a few hundred rows) or use JSONL for shuffled reads.

Validation happens in the indexing pass, in both modes, so a bad record fails before training
starts rather than hours in: a record must be a JSON object whose `required` fields are present,
non-empty strings (`difficulty` may also be int/float); optional mapped fields must be absent,
null, or of that type. Blank JSONL lines are not records. With `skip_malformed=False` (default)
the first bad record raises `DataError("file:line: reason")` (1-based line; for Parquet the
1-based row within the file). With `skip_malformed=True` bad records are left out of the index
and counted: `num_malformed`, `malformed_examples` (the first few messages). A required column
missing from a Parquet schema is a configuration error and always raises. The cost of indexing
is one sequential read and one JSON parse per line (Parquet: one decode of the mapped columns).
Simplifications: no compressed JSONL (it cannot be seeked; decompress first); no nested field
paths (`fields` values are top-level keys); files must not change after indexing (a changed
line is reported as a DataError when read).
"""

from __future__ import annotations

import bisect
import collections
import glob
import json
import logging
import os
import threading
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

JSONL_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)
NUMERIC_FIELDS = ("difficulty",)  # canonical fields that may also be int/float
MAX_EXAMPLES = 5  # malformed-record messages kept for logging
PARQUET_CACHE_GROUPS = 4  # decoded row groups kept per Parquet file


class DataError(ValueError):
    """A record or file that cannot be used; the message starts with `file:line:`."""


def expand_patterns(patterns: str | Sequence[str]) -> list[str]:
    """Local paths, globs or directories (comma-separated string or list) -> sorted file list.

    A directory stands for the JSONL/Parquet files directly inside it. Every pattern must match
    at least one file; the same file listed twice is read once.
    """
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",")]
    files: list[str] = []
    for pattern in (p.strip() for p in patterns):
        if not pattern:
            continue
        files.extend(_expand_one(pattern))
    if not files:
        raise FileNotFoundError(f"no data files given (patterns={patterns!r})")
    return list(dict.fromkeys(files))


def _expand_one(pattern: str) -> list[str]:
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
        found = [os.path.join(pattern, f) for f in sorted(os.listdir(pattern))
                 if f.endswith(JSONL_EXTENSIONS + PARQUET_EXTENSIONS)]
    else:
        found = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
    if not found:
        raise FileNotFoundError(f"data pattern {pattern!r} matches no file")
    for f in found:
        if not f.endswith(JSONL_EXTENSIONS + PARQUET_EXTENSIONS):
            raise DataError(f"{f}: unsupported data file type (expected "
                            f"{', '.join(JSONL_EXTENSIONS + PARQUET_EXTENSIONS)})")
    return found


class _Schema:
    """The canonical <- file field mapping and the validation rules of one source."""

    def __init__(self, fields: Mapping[str, str], required: Iterable[str]):
        self.fields = dict(fields)
        self.required = tuple(required)
        unknown = [k for k in self.required if k not in self.fields]
        if unknown:
            raise ValueError(f"required fields {unknown} are not in fields {self.fields}")

    def convert(self, obj: Any) -> dict:
        """Validated canonical record from one parsed object; raises ValueError(reason)."""
        if not isinstance(obj, dict):
            raise ValueError(f"record is a {type(obj).__name__}, not an object")
        out = {}
        for canon, name in self.fields.items():
            value = obj.get(name)
            self._check(canon, name, value)
            out[canon] = value
        return out

    def _check(self, canon: str, name: str, value: Any) -> None:
        label = f"field {name!r}" + (f" ({canon})" if canon != name else "")
        if value is None:
            if canon in self.required:
                raise ValueError(f"missing required {label}")
            return
        allowed = (str, int, float) if canon in NUMERIC_FIELDS else (str,)
        if isinstance(value, bool) or not isinstance(value, allowed):
            kinds = "/".join(t.__name__ for t in allowed)
            raise ValueError(f"{label} must be {kinds}, got {type(value).__name__}")
        if canon in self.required and isinstance(value, str) and not value.strip():
            raise ValueError(f"required {label} is empty")


class _Malformed:
    """Counts skipped records and keeps the first few messages."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0
        self.examples: list[str] = []

    def report(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if not self.skip:
            raise DataError(message)
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(message)


class _JsonlFile:
    """Index of the good lines of one JSONL file; reads a line back with os.pread."""

    def __init__(self, path: str, schema: _Schema, malformed: _Malformed):
        self.path = path
        self.schema = schema
        self._fd: Optional[int] = None
        self._lock = threading.Lock()
        starts, lengths = [], []
        with open(path, "rb") as f:
            offset = 0
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        schema.convert(_parse_json(line, path))
                        starts.append(offset)
                        lengths.append(len(line))
                    except ValueError as e:
                        malformed.report(f"{path}:{lineno}", str(e))
                offset += len(line)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.starts)

    def get(self, i: int) -> dict:
        start, length = int(self.starts[i]), int(self.lengths[i])
        line = os.pread(self._descriptor(), length, start)
        try:
            return self.schema.convert(_parse_json(line, self.path))
        except ValueError as e:
            raise DataError(f"{self.path}:{self._line_number(start)}: {e} "
                            "(the file changed after it was indexed?)") from None

    def _descriptor(self) -> int:
        if self._fd is None:  # opened lazily, so a pickled copy (grain worker) opens its own
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def _line_number(self, start: int) -> int:
        with open(self.path, "rb") as f:
            return f.read(start).count(b"\n") + 1

    def __getstate__(self):
        state = {**self.__dict__, "_fd": None}
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _parse_json(line: bytes, path: str) -> Any:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        hint = " (.json files must hold one JSON object per line)" if path.endswith(".json") else ""
        raise ValueError(f"invalid JSON: {e}{hint}") from None


class _ParquetFile:
    """Row-group index of one Parquet file (plus the good rows if some were skipped)."""

    def __init__(self, path: str, schema: _Schema, malformed: _Malformed):
        import pyarrow.parquet as pq
        self.path = path
        self.schema = schema
        meta = pq.ParquetFile(path).metadata
        names = set(meta.schema.names)
        missing = [f"{n!r} ({c})" for c, n in schema.fields.items()
                   if c in schema.required and n not in names]
        if missing:
            raise DataError(f"{path}: required columns {', '.join(missing)} not in the "
                            f"schema {sorted(names)}")
        self.columns = [n for n in schema.fields.values() if n in names]
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.group_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._pf = None
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.rows = self._validate(malformed)

    def _validate(self, malformed: _Malformed) -> Optional[np.ndarray]:
        """None if every row is good, else the int64 array of good row numbers."""
        bad = []
        for g in range(len(self.group_starts) - 1):
            for r, obj in enumerate(self._group(g)):
                try:
                    self.schema.convert(obj)
                except ValueError as e:
                    row = int(self.group_starts[g]) + r
                    malformed.report(f"{self.path}:{row + 1}", str(e))
                    bad.append(row)
        if not bad:
            return None
        return np.setdiff1d(np.arange(self.group_starts[-1], dtype=np.int64), bad)

    def __len__(self) -> int:
        return int(self.group_starts[-1]) if self.rows is None else len(self.rows)

    def get(self, i: int) -> dict:
        row = i if self.rows is None else int(self.rows[i])
        g = int(np.searchsorted(self.group_starts, row, side="right")) - 1
        obj = self._group(g)[row - int(self.group_starts[g])]
        return self.schema.convert(obj)

    def _group(self, g: int) -> list[dict]:
        """Row group g as a list of {column: python value}, from a small LRU cache."""
        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
            if self._pf is None:
                import pyarrow.parquet as pq
                self._pf = pq.ParquetFile(self.path)
            rows = self._pf.read_row_group(g, columns=self.columns).to_pylist()
            self._cache[g] = rows
            if len(self._cache) > PARQUET_CACHE_GROUPS:
                self._cache.popitem(last=False)
            return rows

    def __getstate__(self):
        state = {**self.__dict__, "_pf": None, "_cache": collections.OrderedDict()}
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class RecordSource:
    """Random-access records with canonical keys over several files (grain data source).

    `src[i]` returns {canonical: value} for every key of `fields` (None where an optional field
    is absent). Indices run over the good records of the files in the order given.
    """

    def __init__(self, files: Sequence[str], *, fields: Mapping[str, str],
                 required: Sequence[str] = (), skip_malformed: bool = False):
        schema = _Schema(fields, required)
        malformed = _Malformed(skip_malformed)
        self._files = [_open_file(path, schema, malformed) for path in files]
        self._ends = np.cumsum([len(f) for f in self._files], dtype=np.int64)
        self.fields = dict(fields)
        self.paths = list(files)
        self.num_malformed = malformed.count
        self.malformed_examples = list(malformed.examples)
        if malformed.count:
            log.warning("skipped %d malformed records in %s; first: %s", malformed.count,
                        files, self.malformed_examples)
        if len(self) == 0:
            raise DataError(f"no valid records in {list(files)} "
                            f"({malformed.count} malformed, e.g. {self.malformed_examples})")

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"record index {index} out of range for {n} records")
        k = bisect.bisect_right(self._ends, index)
        start = int(self._ends[k - 1]) if k else 0
        return self._files[k].get(index - start)

    def __repr__(self) -> str:
        return (f"RecordSource({len(self)} records in {len(self.paths)} files, "
                f"{self.num_malformed} malformed skipped)")


def _open_file(path: str, schema: _Schema, malformed: _Malformed):
    if path.endswith(PARQUET_EXTENSIONS):
        return _ParquetFile(path, schema, malformed)
    return _JsonlFile(path, schema, malformed)


def open_records(patterns: str | Sequence[str], *, fields: Mapping[str, str],
                 required: Sequence[str] = (), skip_malformed: bool = False) -> RecordSource:
    """Index the files matched by `patterns` and return a lazy RecordSource (see module doc).

    fields: canonical name -> field name in the files, e.g. {"problem": "question",
    "solution": "rollout"}; `required`: canonical names every record must have (non-empty).
    """
    return RecordSource(expand_patterns(patterns), fields=fields, required=tuple(required),
                        skip_malformed=skip_malformed)
