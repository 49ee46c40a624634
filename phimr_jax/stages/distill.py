"""What stages 1 (mid-training) and 2 (SFT) share: records, tokenizer, held-out accuracy.

Both train next-token cross-entropy on the assistant part of verified teacher rollouts
(`losses.cross_entropy`); they differ only in how rows are built (packed vs one example per
row) and in the subset of records used.

Held-out accuracy: greedy decoding of each held-out problem in the chat format, the answer taken
from the last \\boxed{...} and compared to the gold answer after whitespace normalisation.
Simplification: exact match, which is right for the demo's integer answers; Math-Verify grading
(equivalent forms) replaces it with the rewards issue.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile

import jax
from ml_collections import ConfigDict

from phimr_jax.data import demo_corpus
from phimr_jax.data.pipelines import eval_examples
from phimr_jax.data.sources import open_records
from phimr_jax.data.tokenizers import load_tokenizer, train_sentencepiece
from phimr_jax.model.sampling import generate
from phimr_jax.train import losses
from phimr_jax.train.trainer import Stage

log = logging.getLogger(__name__)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def publish(out_dir: str, names: tuple, make) -> None:
    """`make(tmp_dir)` writes files `names`; they are then renamed into `out_dir` one by one
    (atomic), so processes sharing a workdir (multi-host) never read a half-written file. Every
    process that finds them missing makes its own copy: the demo data and tokenizer are
    deterministic, so the last rename leaves the same bytes as the first."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=out_dir)
    try:
        make(tmp)
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def demo_paths(config: ConfigDict) -> dict:
    """Generate (once, deterministically) the demo corpus: under workdir/demo_data, or with
    `data.demo_dir` under DIR/<digest of the generation settings and seed>, where every run
    with the same settings finds it (the recipe's stages: one corpus instead of four copies,
    3-6 s each)."""
    settings = dict(n_train=config.data.demo_train, n_heldout=config.data.demo_heldout,
                    n_fresh=config.data.get("demo_fresh", 0), seed=config.seed,
                    shortcut_fraction=config.data.get("demo_shortcut_fraction", 0.0),
                    shortcut_mode=config.data.get("demo_shortcut_mode", "replace"),
                    max_level=config.data.get("demo_max_level", 5),
                    train_level_weights=tuple(config.data.get("demo_train_level_weights", ())))
    shared = config.data.get("demo_dir", "")
    if shared:
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        out = os.path.join(os.path.abspath(shared), digest[:12])
    else:
        out = os.path.join(os.path.abspath(config.workdir), "demo_data")
    paths = {split: os.path.join(out, f"{split}.jsonl") for split in ("train", "heldout", "fresh")}
    if not all(os.path.exists(p) for p in paths.values()):
        publish(out, ("heldout.jsonl", "train.jsonl", "fresh.jsonl"),
                lambda tmp: demo_corpus.generate(tmp, **settings))
    return paths


def data_files(config: ConfigDict) -> tuple[str, str]:
    """(train files, eval files): the configured ones, or the demo corpus."""
    train, heldout = config.data.train_files, config.data.eval_files
    if config.data.demo:
        paths = demo_paths(config)
        train, heldout = train or paths["train"], heldout or paths["heldout"]
    if not train:
        raise ValueError("no training data: set --config.data.train_files=... (or data.demo)")
    return train, heldout


def _tokenizer_in(directory: str):
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return "hf", directory
    model = os.path.join(directory, "tokenizer.model")
    if os.path.isfile(model):
        return "sentencepiece", model
    return None


def resolve_tokenizer(config: ConfigDict, inherited_dir: str):
    """(tokenizer, its directory): configured path > the init checkpoint's > the demo's."""
    tok = config.data.tokenizer
    if tok.path:
        path = tok.path
        return load_tokenizer(tok.kind, path), path if os.path.isdir(path) else \
            os.path.dirname(os.path.abspath(path))
    found = _tokenizer_in(inherited_dir) if inherited_dir else None
    if found:
        return load_tokenizer(*found), inherited_dir
    if config.data.demo:
        out = os.path.join(os.path.abspath(config.workdir), "tokenizer")
        model = os.path.join(out, "tokenizer.model")
        if not os.path.exists(model):
            train, _ = data_files(config)
            publish(out, ("tokenizer.vocab", "tokenizer.model"), lambda tmp: train_sentencepiece(
                demo_corpus.corpus_texts(train), os.path.join(tmp, "tokenizer"),
                config.data.demo_vocab_size))
        return load_tokenizer("sentencepiece", model), out
    raise ValueError("no tokenizer: set --config.data.tokenizer.path=... (or initialise from a "
                     "checkpoint / HF directory that has one)")


def open_train_source(config: ConfigDict):
    train, _ = data_files(config)
    return open_records(train, fields=dict(config.data.fields), required=("problem", "solution"),
                        skip_malformed=config.data.skip_malformed)


def shard_args(config: ConfigDict) -> dict:
    """This process's slice of the global batch and of the data."""
    count = jax.process_count()
    if config.data.global_batch_size % count:
        raise ValueError(f"data.global_batch_size {config.data.global_batch_size} is not "
                         f"divisible by {count} processes")
    # The data repeats (each epoch reshuffled) and the run's length is total_steps, derived
    # from data.num_epochs when -1: every process then takes the same number of steps, where
    # finite per-process shards of unequal size would leave some hosts waiting in collectives.
    return dict(batch_size=config.data.global_batch_size // count, seed=config.seed,
                num_epochs=None, shard_index=jax.process_index(),
                shard_count=count, shuffle=config.data.shuffle,
                read_threads=config.data.read_threads)


def boxed_answer(text: str):
    """Content of the last \\boxed{...} (one level of nested braces), or None."""
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


@functools.lru_cache(maxsize=4)
def _heldout(eval_files: str, fields: tuple, n: int, tokenizer) -> list:
    source = open_records(eval_files, fields=dict(fields), required=("problem", "answer"))
    return eval_examples(source, tokenizer, n)


def heldout_accuracy(model, tokenizer, config: ConfigDict) -> dict:
    """Greedy-decoded accuracy on the held-out problems (see module docstring)."""
    _, eval_files = data_files(config)
    if not eval_files or config.data.eval_problems <= 0:
        return {}
    examples = _heldout(eval_files, tuple(sorted(config.data.fields.items())),
                        config.data.eval_problems, tokenizer)
    completions = generate(model, [e["prompt_ids"] for e in examples],
                           max_new_tokens=config.data.eval_max_new_tokens, top_k=1,
                           stop_tokens=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                           vocab_limit=tokenizer.vocab_size).tokens
    correct = finished = 0
    for e, toks in zip(examples, completions):
        stopped = bool(toks) and toks[-1] in tokenizer.stop_ids
        finished += stopped
        pred = boxed_answer(tokenizer.decode(toks[:-1] if stopped else toks))
        correct += pred is not None and pred.replace(" ", "") == e["answer"].replace(" ", "")
    n = len(examples)
    return {"eval/accuracy": correct / n, "eval/finished": finished / n,
            "eval/mean_new_tokens": sum(len(t) for t in completions) / n}


def make_stage(name: str, config: ConfigDict, make_data) -> Stage:
    chunk = int(config.loss.chunk_size)
    return Stage(name=name, make_data=make_data,
                 loss_fn=functools.partial(losses.cross_entropy, chunk_size=chunk),
                 weight_fn=losses.cross_entropy_weight, evaluate=heldout_accuracy,
                 tokenizer_fn=resolve_tokenizer)
