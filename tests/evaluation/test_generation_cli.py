"""configs/generate.py through the CLI: an HF directory + questions JSONL -> completions JSONL."""

import json
import os
import shutil
import subprocess
import sys

from phimr_jax.model import config as mc
from tests.data import hf_tokenizer_dir, write_jsonl
from tests.hf_reference import make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_generate_cli_writes_completions(tmp_path, torch_cpu):
    hf_dir = str(tmp_path / "hf")
    make_hf_model(mc.tiny(), seed=0).save_pretrained(hf_dir)
    for name in os.listdir(hf_tokenizer_dir()):
        shutil.copy(os.path.join(hf_tokenizer_dir(), name), hf_dir)
    prompts = write_jsonl(str(tmp_path / "q.jsonl"),
                          [{"question": q} for q in ("What is 2 + 3?", "Compute 7 * 6.", "1+1?")])
    out = str(tmp_path / "out.jsonl")
    res = subprocess.run(
        [sys.executable, "-m", "phimr_jax.main", "--config=configs/generate.py",
         f"--config.hf_dir={hf_dir}", f"--config.prompts={prompts}", "--config.prompt_field=question",
         f"--config.output={out}", "--config.num_samples=2", "--config.max_new_tokens=12",
         "--config.batch_size=2", "--config.dtype=float32"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), capture_output=True,
        text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(ln) for ln in open(out)]
    assert [(r["index"], r["sample"]) for r in rows] == [(i, s) for i in range(3) for s in range(2)]
    assert rows[4]["question"] == "1+1?"
    for r in rows:
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["num_tokens"] <= 12
        assert r["logprob"] <= 0 and isinstance(r["completion"], str)
