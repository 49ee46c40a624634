"""notebooks/phimr_jax_demo.ipynb runs top to bottom (smoke preset, CPU) in a Jupyter kernel of
this Python and displays the recipe's table and its plots."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "phimr_jax_demo.ipynb")
CELL_TIMEOUT_S = 600


def _kernel_manager(tmp_path):
    """A `python3` kernel that is this interpreter: a kernelspec installed into a temp prefix."""
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    prefix = tmp_path / "jupyter"
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix),
                    "--name", "python3"], check=True, capture_output=True)
    specs = KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])
    assert specs.get_kernel_spec("python3").argv[0] == sys.executable
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


@pytest.mark.slow
def test_notebook_runs_and_shows_table_and_plots(tmp_path):
    import nbformat
    from nbclient import NotebookClient
    workdir = tmp_path / "run"
    # The kernel (and the recipe it starts) get a plain CPU environment: not the 8 fake devices
    # that tests/conftest.py puts into XLA_FLAGS for the in-process tests.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTEST_CURRENT_TEST")}
    env.update(JAX_PLATFORMS="cpu", PHIMR_NOTEBOOK_PRESET="smoke",
               PHIMR_NOTEBOOK_WORKDIR=str(workdir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                            allow_errors=False, resources={"metadata": {"path": ROOT}})
    client.execute(env=env)  # Raises CellExecutionError at the first failing cell.

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell did not run"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"python:   {sys.executable}" in text  # The kernel is this interpreter.
    assert "backend cpu" in text
    assert "configs/recipe.py:smoke" in text and f"--config.workdir={workdir}" in text

    table = (workdir / "recipe.md").read_text()
    shown = [o["data"]["text/markdown"] for o in outputs
             if o.output_type == "display_data" and "text/markdown" in o.get("data", {})]
    assert table in shown and "| + dpo |" in table
    rows = json.loads((workdir / "recipe.json").read_text())
    # No start row: the demo's (and smoke's) start is a random init (configs/recipe.py).
    assert [r["stage"] for r in rows] == ["+ midtrain", "+ sft", "+ dpo", "+ rl"]
    assert all(r["problems"] == 8 and r["k"] == 1 for r in rows)
    assert json.dumps(rows, indent=2) in text

    pngs = [o for o in outputs
            if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(pngs) == len(list(workdir.glob("*.png"))) >= 1
    assert "**loss_per_stage.png**" in shown
