"""The package layout: imports run one way, and no file grows past 400 lines.

Tiers, lowest first: model/ and data/ (each self-contained) <- train/ (the shared trainer) <-
evaluation/ (grading, the eval harness, sampling from a run) <- stages/ <- tools/. A module may
import its own tier and the tiers below it, never above; `main.py` and the package
`__init__` (the public API) sit on top. Function-level (lazy) imports count too.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "phimr_jax")
# subpackage -> the subpackages it may import
ALLOWED = {
    "model": {"model"},
    "data": {"data"},
    "train": {"model", "data", "train"},
    "evaluation": {"model", "data", "train", "evaluation"},
    "stages": {"model", "data", "train", "evaluation", "stages"},
    "tools": {"model", "data", "train", "evaluation", "stages", "tools"},
}
MAX_LINES = 400


def _python_files(*dirs: str) -> list[str]:
    out = []
    for d in dirs:
        for base, _, names in os.walk(os.path.join(ROOT, d)):
            out += [os.path.join(base, n) for n in names if n.endswith(".py")]
    return sorted(out)


def _imported_subpackages(path: str) -> set[tuple[str, int]]:
    """(phimr_jax subpackage, line) of every import in the file, top-level or not."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "phimr_jax" and len(parts) > 1 and parts[1] in ALLOWED:
                found.add((parts[1], node.lineno))
    return found


def test_every_subpackage_has_a_tier():
    subpackages = {d for d in os.listdir(PACKAGE)
                   if os.path.isfile(os.path.join(PACKAGE, d, "__init__.py"))}
    assert subpackages == set(ALLOWED)


@pytest.mark.parametrize("tier", sorted(ALLOWED))
def test_imports_run_one_way(tier):
    wrong = []
    for path in _python_files(os.path.join("phimr_jax", tier)):
        for target, line in sorted(_imported_subpackages(path)):
            if target not in ALLOWED[tier]:
                wrong.append(f"{os.path.relpath(path, ROOT)}:{line} imports phimr_jax.{target}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_lazy_and_from_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import phimr_jax.model.phi3\nfrom phimr_jax import stages\n"
                    "def f():\n    from phimr_jax.train.trainer import train\n")
    assert {t for t, _ in _imported_subpackages(str(path))} == {"model", "stages", "train"}


def test_no_file_over_400_lines():
    long = []
    for path in _python_files("phimr_jax", "tests", "configs", "tpu_scripts"):
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long.append(f"{os.path.relpath(path, ROOT)}: {n} lines")
    assert not long, "\n".join(long)
