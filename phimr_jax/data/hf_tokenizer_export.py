"""Write a run's tokenizer as an HF tokenizer directory with the Phi-4-mini-reasoning chat
template, so an exported model loads with `AutoTokenizer` + `AutoModelForCausalLM` and
`apply_chat_template` gives exactly the prompt our trainer used.

- An HF tokenizer directory (the real Phi-4-mini): its files are copied as they are (they carry
  the official chat template).
- A demo SentencePiece model (`train_sentencepiece`): converted to a `tokenizers` BPE with the
  same vocabulary and merges (transformers' SentencePieceExtractor), spaces as "▁", digits split,
  byte fallback and the Phi special strings as added tokens — the same ids for any text (tested)
  — plus `CHAT_TEMPLATE`, our chat format as Jinja.
"""

from __future__ import annotations

import os
import shutil

from phimr_jax.data.tokenizers import DEFAULT_SYSTEM, END, SPECIAL_TOKENS

# Files a tokenizer directory may hold (HF fast/slow tokenizers, sentencepiece, chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")

# The reasoning model's format (tokenizers.format_prompt): the fixed system text (+ " " + a
# user system message), then each turn as <|role|>content<|end|>, then <|assistant|>.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + DEFAULT_SYSTEM + "') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ' ' + m['content'] -%}{%- endfor -%}"
    "{{ '<|system|>' + ns.system + '<|end|>' }}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}")


def sentencepiece_to_hf(model_path: str, out_dir: str) -> list:
    """Write tokenizer.json + tokenizer_config.json for a demo SentencePiece model."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    parts = SentencePieceExtractor(model_path).extract(models.BPE)
    tok = Tokenizer(models.BPE(vocab=parts["vocab"], merges=parts["merges"], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END, pad_token="<pad>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(out_dir)
    return sorted(os.listdir(out_dir))


def copy_tokenizer_files(src: str, dst: str) -> list:
    """Copy the tokenizer files found in `src` to `dst`; returns the names copied."""
    if not src or not os.path.isdir(src):
        return []
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if names:
        os.makedirs(dst, exist_ok=True)
        for name in names:
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    return names


def write_hf_tokenizer(tokenizer_dir: str, out_dir: str) -> list:
    """Tokenizer files for an exported model directory, from a run's tokenizer directory."""
    if os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        return copy_tokenizer_files(tokenizer_dir, out_dir)
    model = os.path.join(tokenizer_dir, "tokenizer.model")
    if os.path.isfile(model):
        return sentencepiece_to_hf(model, out_dir)
    return []


__all__ = ["CHAT_TEMPLATE", "TOKENIZER_FILES", "copy_tokenizer_files", "sentencepiece_to_hf",
           "write_hf_tokenizer"]
