"""Shared helpers for the data tests (built once per test session, in a temporary directory)."""

import atexit
import functools
import json
import os
import shutil
import tempfile

from phimr_jax.data import demo_corpus
from phimr_jax.data.tokenizers import SPECIAL_TOKENS, train_sentencepiece

CANONICAL = {k: k for k in ("problem", "solution", "answer", "difficulty", "domain")}


@functools.lru_cache(maxsize=None)
def workdir() -> str:
    path = tempfile.mkdtemp(prefix="phimr_data_tests_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def demo_paths(n_train: int = 240, n_heldout: int = 40) -> dict:
    return demo_corpus.generate(os.path.join(workdir(), f"demo_{n_train}_{n_heldout}"),
                                n_train=n_train, n_heldout=n_heldout, seed=0)


@functools.lru_cache(maxsize=None)
def sp_model(vocab_size: int = 400) -> str:
    texts = demo_corpus.corpus_texts([demo_paths()["train"]])
    return train_sentencepiece(texts, os.path.join(workdir(), f"sp{vocab_size}"), vocab_size)


@functools.lru_cache(maxsize=None)
def hf_tokenizer_dir(specials: tuple = SPECIAL_TOKENS) -> str:
    """A tiny byte-level BPE (GPT-style, like o200k) with the given added special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(demo_corpus.corpus_texts([demo_paths()["train"]]), trainer)
    tok.add_special_tokens(list(specials))
    out = os.path.join(workdir(), f"hf_{len(specials)}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>" if "<|endoftext|>" in specials
                                   else None)
    fast.save_pretrained(out)
    return out


def write_jsonl(path: str, rows) -> str:
    """rows: dicts (written as JSON) or raw strings (written verbatim as a line)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path
