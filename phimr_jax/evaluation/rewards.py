"""Verifiable rewards: +1 / -1 per completion by Math-Verify, in a pool of killable processes.

The paper's RL and rollout-DPO stages score a completion +1 when its final answer is equivalent
to the gold answer (Math-Verify, gold first) and -1 otherwise. What is graded, and how, is in
`_reward_worker.py` (`verify_one`); this module makes it safe and fast to run on thousands of
model outputs per step.

Why worker processes: Math-Verify parses and compares with sympy, which runs for minutes or
forever on some outputs (`\\boxed{9^{9^{9}}}` against "17" evaluates a 370-million-digit integer),
and its own timeouts use `signal.alarm`, which works only in a process's main thread. So:
- Workers are fresh interpreters running `_reward_worker.py` (exec'd subprocesses: never a fork
  of this process, which may hold JAX's threads, and unlike multiprocessing's "spawn" and
  "forkserver" contexts they do not re-import our `__main__`, i.e. JAX and the trainer). Each
  imports math_verify once and serves until the pool closes; the default pool lives for the
  whole process, so the 1-2 s import is paid once per worker, not per call.
- Dispatch: each idle worker gets a chunk of up to `chunk_size` items (smaller near the end of a
  batch, to balance the workers) and answers item by item. The parent waits on all workers'
  pipes with `poll`; nothing here uses threads or signals.
- Timeout, per item: a worker's deadline is `timeout_s` after it received its chunk or
  sent its last answer, i.e. after it began its current item. At the deadline the parent
  SIGKILLs it, scores that item wrong (`num_timeouts`), puts the item's unanswered chunk-mates
  back at the front of the queue (they are not penalised) and starts a replacement, while the
  other workers go on. A worker that dies by itself (OOM killer, its own CPU limit, a crash in C
  code) is handled alike, counted in `num_errors`; its item is not retried, so an input that
  crashes workers cannot loop. Workers cap their address space and per-item CPU time (see
  `_reward_worker.py`), so even a worker orphaned by a SIGKILLed trainer ends by itself.
- Errors: an item whose completion or answer is not a string, a malformed choice letter, or an
  exception that escapes Math-Verify's own handling scores wrong and counts in `num_errors`.
  Math-Verify's internal parse and comparison failures are just wrong answers (as in
  Math-Verify), not errors. Empty completions score wrong without reaching a worker.
- Mode "choice" (GPQA letters) needs no sympy: it is graded here, in linear time, without workers.

Simplifications: one grading call at a time per pool (a lock serialises callers); chunks are sent
with blocking writes to workers that are idle, hence reading; a pool is unusable in a forked
child (the default pool is recreated there instead).
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from typing import Sequence

import numpy as np

from phimr_jax.evaluation._reward_worker import MODES, extract_answer, grade_choice, verify_one

__all__ = ["math_reward", "RewardPool", "extract_answer", "verify_one", "default_pool"]

_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_reward_worker.py")
_MAX_START_FAILURES = 3  # workers exiting before they are ready, in a row, before we give up


class _Worker:
    """One worker process and the parent's view of it."""

    def __init__(self, max_memory_mb: int):
        self.proc = subprocess.Popen([sys.executable, _WORKER_SCRIPT, str(max_memory_mb)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                     close_fds=True)
        self.fd = self.proc.stdout.fileno()
        self.started = time.monotonic()
        self.ready = False
        self.buffer = b""
        self.pending: deque[int] = deque()  # batch indices sent and not yet answered, in order
        self.deadline = math.inf

    def send(self, timeout_s: float, items: list) -> None:
        payload = pickle.dumps((timeout_s, items), protocol=pickle.HIGHEST_PROTOCOL)
        data = memoryview(struct.pack(">Q", len(payload)) + payload)
        fd = self.proc.stdin.fileno()
        while data:  # an idle worker is blocked reading, so this drains as fast as it reads
            data = data[os.write(fd, data):]

    def read_lines(self) -> list[bytes] | None:
        """Complete lines received so far (call only when readable); None at end of file."""
        data = os.read(self.fd, 1 << 16)
        if not data:
            return None
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        return lines

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
        self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def _readable(workers: list[_Worker], timeout_s: float) -> list[_Worker]:
    """Workers with output or end-of-file to read, waiting up to `timeout_s`. poll, not select:
    a trainer can hold more than select's 1024 file descriptors."""
    poller = select.poll()
    for w in workers:
        poller.register(w.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    # Rounded up: waking a hair before a deadline would only spin once more.
    events = {fd for fd, _ in poller.poll(max(0, math.ceil(timeout_s * 1000)))}
    return [w for w in workers if w.fd in events]


def _shutdown(workers: list[_Worker], owner_pid: int, grace_s: float = 1.0) -> None:
    """Close the workers' stdin (they exit), then SIGKILL whatever is still running."""
    if os.getpid() != owner_pid:  # a forked child must not touch its parent's workers
        return
    for w in workers:
        try:
            w.proc.stdin.close()
        except OSError:
            pass
    end = time.monotonic() + grace_s
    for w in workers:
        try:
            w.proc.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        w.kill()
    workers.clear()


def _check_batch(completions, answers, mode: str) -> tuple[list, list]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(completions, str) or isinstance(answers, str):
        raise TypeError("completions and answers are sequences of strings, not strings")
    completions, answers = list(completions), list(answers)
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    # Plain str for pickling (np.str_ would make workers import numpy); datasets often store
    # answers as numbers. Anything else that is not a string scores wrong, as an error.
    completions = [str(c) if isinstance(c, str) else c for c in completions]
    answers = [str(a) if isinstance(a, (str, numbers.Number)) and not isinstance(a, bool) else a
               for a in answers]
    return completions, answers


def _grade_choice_batch(completions: list, answers: list) -> tuple[np.ndarray, int]:
    ok = np.zeros(len(completions), dtype=bool)
    errors = 0
    for i, (c, a) in enumerate(zip(completions, answers)):
        try:
            ok[i] = grade_choice(c, a)
        except Exception:  # noqa: BLE001 - a bad gold letter, a non-string: wrong, counted
            errors += 1
    return ok, errors


class RewardPool:
    """Worker processes grading completions with a hard per-item timeout (see module doc).

    num_workers: processes (default min(8, CPUs available)); timeout_s: per-item limit;
    max_memory_mb: each worker's address-space cap (0: none); chunk_size: most items sent to a
    worker at once; start_timeout_s: how long a new worker may take to import math_verify.
    Counters (cumulative, for logging): num_timeouts, num_errors, num_restarts.
    """

    def __init__(self, num_workers: int | None = None, timeout_s: float = 5.0, *,
                 max_memory_mb: int = 4096, chunk_size: int = 8,
                 start_timeout_s: float = 120.0):
        if num_workers is None:
            num_workers = _default_num_workers()
        if num_workers < 1 or timeout_s <= 0 or chunk_size < 1 or start_timeout_s <= 0:
            raise ValueError("num_workers, timeout_s, chunk_size and start_timeout_s must be > 0")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.max_memory_mb = max_memory_mb
        self.chunk_size = chunk_size
        self.start_timeout_s = start_timeout_s
        self.num_timeouts = 0
        self.num_errors = 0
        self.num_restarts = 0
        self._start_failures = 0
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        # Also runs at interpreter exit (weakref.finalize registers with atexit).
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._pid)
        for _ in range(num_workers):  # they import math_verify while the caller does other work
            self._workers.append(_Worker(max_memory_mb))

    # ------------------------------------------------------------------------------ public API

    def grade(self, completions: Sequence[str], answers: Sequence[str], mode: str = "math", *,
              timeout_s: float | None = None) -> np.ndarray:
        """bool array: whether each completion's final answer matches its gold answer.

        timeout_s: per-item limit for this call (default: the pool's).
        """
        completions, answers = _check_batch(completions, answers, mode)
        timeout_s = self.timeout_s if timeout_s is None else float(timeout_s)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        with self._lock:
            self._check_usable()
            if mode == "choice":
                ok, errors = _grade_choice_batch(completions, answers)
                self.num_errors += errors
                return ok
            return self._grade_math(completions, answers, timeout_s)

    def wait_ready(self) -> None:
        """Block until every worker has imported math_verify, e.g. so that the first training
        step's timing does not include it (grading does not need this: it uses whoever is ready)."""
        with self._lock:
            self._check_usable()
            while not all(w.ready for w in self._workers):
                self._wait_and_collect(np.zeros(0, dtype=bool), deque(), self.timeout_s)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        with self._lock:
            self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ scheduling

    def _check_usable(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("this RewardPool is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("a RewardPool cannot be used in a forked child process")

    def _grade_math(self, completions: list, answers: list, timeout_s: float) -> np.ndarray:
        ok = np.zeros(len(completions), dtype=bool)
        todo: deque[int] = deque()
        for i, (c, a) in enumerate(zip(completions, answers)):
            if not isinstance(c, str) or not isinstance(a, str):
                self.num_errors += 1
            elif c.strip() and a.strip():  # nothing to find in an empty string: wrong
                todo.append(i)
        left = len(todo)
        try:
            while left:
                self._dispatch(todo, completions, answers, timeout_s)
                left -= self._wait_and_collect(ok, todo, timeout_s)
        finally:
            # Interrupted (KeyboardInterrupt, a start-up failure): answers still in flight would
            # be read as the next call's, so those workers are replaced.
            for w in list(self._workers):
                if w.pending:
                    self._replace(w)
        return ok

    def _dispatch(self, todo: deque, completions: list, answers: list, timeout_s: float) -> None:
        for w in list(self._workers):
            if not todo:
                return
            if not w.ready or w.pending:
                continue
            # Chunks amortise the round trip; near the end they shrink so workers finish together.
            size = max(1, min(self.chunk_size, len(todo) // (2 * len(self._workers))))
            chunk = [todo.popleft() for _ in range(size)]
            try:
                w.send(timeout_s, [(completions[i], answers[i], "math") for i in chunk])
            except OSError:  # it died while idle: the chunk goes to another worker
                todo.extendleft(reversed(chunk))
                self._replace(w)
                continue
            w.pending.extend(chunk)
            w.deadline = time.monotonic() + timeout_s

    def _wait_and_collect(self, ok: np.ndarray, todo: deque, timeout_s: float) -> int:
        """Wait for answers until the next deadline; returns how many items were finished."""
        now = time.monotonic()
        wake = min([w.deadline for w in self._workers if w.pending]
                   + [w.started + self.start_timeout_s for w in self._workers if not w.ready],
                   default=now + 1.0)
        # Resolve fds to workers now: a replacement started below may reuse a closed fd number.
        readable = _readable(self._workers, wake - now)
        done = sum(self._read(w, ok, todo, timeout_s) for w in readable)

        now = time.monotonic()
        for w in list(self._workers):
            if w.pending and now >= w.deadline:
                if _readable([w], 0.0):  # answered at the last moment?
                    done += self._read(w, ok, todo, timeout_s)
                    if w not in self._workers or not w.pending or w.deadline > now:
                        continue
                w.pending.popleft()  # the item it is stuck on: wrong
                self.num_timeouts += 1
                done += 1
                todo.extendleft(reversed(w.pending))  # its chunk-mates are graded elsewhere
                w.pending.clear()
                self._replace(w)
            elif not w.ready and now >= w.started + self.start_timeout_s:
                self._replace(w)
                raise RuntimeError(f"a reward worker did not start within "
                                   f"{self.start_timeout_s} s (its stderr may say why)")
        return done

    def _read(self, w: _Worker, ok: np.ndarray, todo: deque, timeout_s: float) -> int:
        lines = w.read_lines()
        if lines is None:  # the worker died
            done = 0
            if w.pending:  # its current item may be what killed it: wrong, not retried
                w.pending.popleft()
                self.num_errors += 1
                done = 1
                todo.extendleft(reversed(w.pending))
                w.pending.clear()
            elif not w.ready:
                self._start_failures += 1
                if self._start_failures >= _MAX_START_FAILURES:
                    self._replace(w)
                    raise RuntimeError(
                        f"{self._start_failures} reward workers in a row exited during start-up "
                        f"(exit code {w.proc.poll()}; their stderr says why: is math-verify "
                        f"installed?)")
            self._replace(w)
            return done
        done = 0
        for line in lines:
            if line == b"R":
                w.ready = True
                self._start_failures = 0
            elif w.pending:
                i = w.pending.popleft()
                ok[i] = line == b"1"
                self.num_errors += line == b"E"
                done += 1
        if done:  # the worker has started on its next item
            w.deadline = time.monotonic() + timeout_s
        return done

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self.max_memory_mb)
        self.num_restarts += 1


def _default_num_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


_default: RewardPool | None = None
_default_lock = threading.Lock()


def default_pool() -> RewardPool:
    """The pool `math_reward` uses without `pool=`: created on first use, kept for the process
    (closed at exit), recreated in a forked child."""
    global _default
    with _default_lock:
        if _default is None or _default.closed or _default._pid != os.getpid():
            _default = RewardPool()
        return _default


def math_reward(completions: Sequence[str], answers: Sequence[str], *, mode: str = "math",
                correct: float = 1.0, incorrect: float = -1.0, timeout_s: float | None = None,
                pool: RewardPool | None = None) -> np.ndarray:
    """float32 [len(completions)]: `correct` where the completion's final answer is equivalent to
    its gold answer, `incorrect` otherwise (no answer, parse failure, timeout, any error).

    mode: "math" (Math-Verify) or "choice" (one letter, e.g. GPQA's A-D). timeout_s: per-item
    limit (default: the pool's, 5 s for the default pool). pool: default `default_pool()`.
    """
    if pool is not None:
        ok = pool.grade(completions, answers, mode, timeout_s=timeout_s)
    elif mode == "choice":  # no workers needed, so do not start the default pool for it
        ok, _ = _grade_choice_batch(*_check_batch(completions, answers, mode))
    else:
        ok = default_pool().grade(completions, answers, mode, timeout_s=timeout_s)
    return np.where(ok, np.float32(correct), np.float32(incorrect)).astype(np.float32)
