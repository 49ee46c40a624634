"""A demo SentencePiece tokenizer exported as an HF tokenizer gives the same ids for any text,
and its chat template renders our chat format."""

import json

from transformers import AutoTokenizer

from phimr_jax.data.hf_tokenizer_export import sentencepiece_to_hf
from phimr_jax.data.tokenizers import format_prompt, load_tokenizer
from tests.data import demo_paths, sp_model

ODD = ["Hello  wörld ∑ 😀 <|end|>x", "  leading and trailing  ", "tabs\tand\nnew lines",
       "12345678901234567890", "<|user|><|assistant|>", "", "\\boxed{3/4}"]


def test_exported_tokenizer_matches_ours_and_renders_the_chat_format(tmp_path):
    ours = load_tokenizer("sentencepiece", sp_model())
    files = sentencepiece_to_hf(sp_model(), str(tmp_path))
    assert "tokenizer.json" in files
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    records = [json.loads(line) for line in open(demo_paths()["train"])]
    texts = [r[k] for r in records for k in ("problem", "solution")] + ODD
    for text in texts:
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
        assert hf.decode(ours.encode(text)) == text
    question = records[0]["problem"]
    for system in (None, "Be brief."):
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": question}]
        rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert rendered == format_prompt(question, system)
        assert hf(rendered, add_special_tokens=False)["input_ids"] == \
            ours.prompt_ids(question, system)
