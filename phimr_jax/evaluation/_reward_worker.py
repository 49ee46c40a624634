"""What a reward worker computes (`verify_one`, `extract_answer`), and its process main loop.

This file is run as a script (`python .../_reward_worker.py`) by `rewards.RewardPool`, so a
worker is a fresh interpreter that imports only the standard library, then math_verify and sympy:
not the phimr_jax package (its `__init__` imports JAX) and not the parent's `__main__` (the
multiprocessing "spawn" and "forkserver" contexts re-import it in every child; for
`python -m phimr_jax.main` that is JAX and the whole trainer, per worker). Hence no phimr_jax
imports here, and math_verify is imported lazily, so the parent can use the pure string helpers
(`extract_answer`, choice grading) without ever loading sympy.

Grading (mode "math"):
- prediction: the content of the last complete, non-empty `\\boxed{...}` (or `\\fbox{...}`),
  braces matched with escaped `\\{ \\}` ignored, parsed by Math-Verify's LaTeX extraction. Only if
  the completion has no such box, Math-Verify's own LaTeX + plain-expression extraction runs on the
  whole completion. A box that fails to parse is a wrong answer; it does not fall back.
- gold: parsed as `\\boxed{gold}` (LaTeX), else `$gold$`, else as a plain expression; the first
  attempt that yields a sympy object wins, else the string itself (Math-Verify then compares
  strings). Parsed golds are cached per worker (RL groups share one gold).
- `math_verify.verify(gold, pred)`, gold first (it is not symmetric).
Mode "choice" (GPQA): the last box, with `\\text{}`-style wrappers, `$`, brackets and a trailing
`.`/`:` removed, must be exactly one letter, equal (case-insensitively) to the gold letter.

Math-Verify's own timeouts are disabled here (`parsing_timeout=None`, `timeout_seconds=None`):
they use `signal.alarm`, which raises outside the main thread and whose outcome depends on where
the interpreter happens to be when it fires. The only time limit is the parent's hard one: it
SIGKILLs a worker that has not answered in time and starts a new one (no soft inner timeout).

Protocol on the worker's stdin/stdout (stray prints of libraries are sent to stderr):
  worker -> parent  b"R\\n" once math_verify is imported and warmed up;
  parent -> worker  8-byte big-endian length + pickle of (timeout_s, [(completion, answer, mode)]);
  worker -> parent  one line per item, in order, as soon as it is graded: b"1\\n" correct,
                    b"0\\n" wrong, b"E\\n" an exception escaped `verify_one` (scored wrong);
  EOF on stdin: the worker exits.
Resource limits a worker sets on itself: an address-space cap (a huge power raises MemoryError
instead of swapping the host), and per item a CPU-time limit of 2 * timeout + 5 s, so a worker
stuck in a computation dies by itself (SIGXCPU) even if its parent was SIGKILLed and cannot.
"""

from __future__ import annotations

import functools
import re

MODES = ("math", "choice")

# One token per regex match, left to right: a box opening, `\\` (a LaTeX line break, so that
# `\\{` is not read as an escaped brace), an escaped brace, or a plain brace. Linear time.
_BOX_TOKENS = re.compile(r"(\\(?:boxed|fbox)\s*\{)|\\\\|\\[{}]|([{}])")
# Formatting wrappers a model puts around a choice letter: \text{B}, \textbf{(B)}, \mathrm{B}.
_WRAPPER = re.compile(
    r"\\(?:text|textbf|textrm|textit|textsf|texttt|mathrm|mathbf|mathit|mathsf|mbox)\s*"
    r"\{([^{}]*)\}")
_LETTER = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:]?")
_NON_SPACE = re.compile(r"\S")
_GOLD_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty \\boxed{...} / \\fbox{...} (stripped), or None.

    "Last" is the box that closes last, so of nested boxes the outer one counts. An unclosed box
    (a completion cut off at the length limit) is skipped, and so is an empty one (a model
    restating "put your answer within \\boxed{}").
    """
    stack: list[int] = []  # per open brace: content start of a box, or -1 for a plain brace
    best = None
    for m in _BOX_TOKENS.finditer(text):
        if m.group(1):
            stack.append(m.end())
        elif m.group(2) == "{":
            stack.append(-1)
        elif m.group(2) == "}" and stack:  # an unmatched "}" is ignored
            start = stack.pop()
            # search, not a slice: nested boxes must not make this quadratic
            if start >= 0 and _NON_SPACE.search(text, start, m.start()):
                best = (start, m.start())
    return None if best is None else text[best[0]:best[1]].strip()


def normalize_choice(text: str | None) -> str | None:
    """"B", "(b)", "B.", "\\text{B}", "\\textbf{(B)}", "$B$" -> "B"; anything else -> None."""
    if text is None or len(text) > 100:  # bounds the regexes' work on adversarial input
        return None
    for _ in range(4):  # nested wrappers, e.g. \text{\textbf{B}}
        stripped = _WRAPPER.sub(r"\1", text)
        if stripped == text:
            break
        text = stripped
    m = _LETTER.fullmatch(text.replace("$", "").strip())
    return m.group(1).upper() if m else None


def extract_answer(completion: str, mode: str = "math") -> str | None:
    """The answer a completion gives, for logging: the last box's content ("math"), or its
    letter ("choice"); None if there is none. Without a box, "math" grading still tries
    Math-Verify's other extraction, which this helper does not run (it never imports sympy)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    boxed = last_boxed(completion)
    return boxed if mode == "math" else normalize_choice(boxed)


def grade_choice(completion: str, answer: str) -> bool:
    gold = normalize_choice(answer)
    if gold is None:
        raise ValueError(f"a choice answer must be one letter, got {answer[:50]!r}")
    return normalize_choice(last_boxed(completion)) == gold


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify
    return math_verify


@functools.lru_cache(maxsize=2048)
def _parse_gold(answer: str) -> tuple:
    mv = _math_verify()
    gold = answer.strip()
    for lo, hi in _GOLD_DELIMITERS:  # "$\frac{1}{2}$" -> "\frac{1}{2}"
        if len(gold) > len(lo) + len(hi) and gold.startswith(lo) and gold.endswith(hi):
            gold = gold[len(lo):-len(hi)].strip()
            break
    if not gold:
        return ()
    latex = [mv.LatexExtractionConfig()]
    attempts = [(gold if "\\boxed" in gold else "\\boxed{" + gold + "}", latex),
                ("$" + gold + "$", latex),
                (gold, [mv.ExprExtractionConfig()])]
    strings: tuple = ()
    for text, config in attempts:
        parsed = mv.parse(text, config, parsing_timeout=None)
        if any(not isinstance(p, str) for p in parsed):
            return tuple(parsed)
        strings = strings or tuple(parsed)
    return strings or (gold,)


def _parse_prediction(completion: str) -> list:
    mv = _math_verify()
    boxed = last_boxed(completion)
    if boxed is not None:
        return mv.parse("\\boxed{" + boxed + "}", [mv.LatexExtractionConfig()],
                        parsing_timeout=None)
    return mv.parse(completion, [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()],
                    parsing_timeout=None)


def verify_one(completion: str, answer: str, mode: str = "math") -> bool:
    """Whether `completion`'s final answer is equivalent to the gold `answer`.

    Pure and unbounded in time: the worker runs it; call it directly only on trusted input.
    Math-Verify's internal parse/compare failures give False; anything else raises.
    """
    if mode == "choice":
        return grade_choice(completion, answer)
    if mode != "math":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    gold = _parse_gold(answer)
    if not gold:
        return False
    prediction = _parse_prediction(completion)
    if not prediction:
        return False
    return bool(_math_verify().verify(list(gold), prediction, timeout_seconds=None))


# ----------------------------------------------------------------------------- worker process

def _limit_resources(max_memory_mb: int) -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU must not write core files
    if max_memory_mb > 0:
        cap = max_memory_mb << 20
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _limit_cpu(seconds: float) -> None:
    """Let the next item use at most `seconds` more CPU time, then SIGXCPU ends the process."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime + seconds) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _read_exactly(stream, n: int) -> bytes | None:
    data = stream.read(n)
    return data if data is not None and len(data) == n else None


def main(argv: list[str]) -> None:
    import logging
    import os
    import pickle
    import signal
    import struct
    import sys

    out_fd = os.dup(1)
    os.dup2(2, 1)  # a library's print() goes to stderr, never into the protocol
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _limit_resources(int(argv[0]) if argv else 0)
    # Math-Verify warns once that its timeouts are off, and logs every swallowed parse error.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # Pay the imports and the first parse (the LaTeX grammar loads lazily) before saying ready.
    verify_one("\\boxed{\\frac{1}{2}}", "0.5")
    os.write(out_fd, b"R\n")

    stdin = sys.stdin.buffer
    while True:
        header = _read_exactly(stdin, 8)
        if header is None:
            return
        payload = _read_exactly(stdin, struct.unpack(">Q", header)[0])
        if payload is None:
            return
        timeout_s, items = pickle.loads(payload)
        for completion, answer, mode in items:
            _limit_cpu(2 * timeout_s + 5)
            try:
                line = b"1\n" if verify_one(completion, answer, mode) else b"0\n"
            except Exception as e:  # noqa: BLE001 - any failure is a wrong answer
                line = b"E\n"
                print(f"reward worker: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            os.write(out_fd, line)


if __name__ == "__main__":
    import os
    import sys

    # Running as a script puts this file's folder (phimr_jax/train) first on sys.path, where
    # e.g. `metrics.py` could shadow a top-level module; the worker needs nothing from there.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    main(sys.argv[1:])
