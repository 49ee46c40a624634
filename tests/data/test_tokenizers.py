"""Chat-format tokenizers: piece-wise prompt ids == tokenising the whole formatted string."""

import os
import shutil

import pytest

from phimr_jax.data import (DEFAULT_SYSTEM, SPECIAL_TOKENS, HFTokenizer, SentencePieceTokenizer,
                            TokenizerError, format_prompt, load_tokenizer, train_sentencepiece)
from phimr_jax.data import demo_corpus
from tests.data import demo_paths, hf_tokenizer_dir, sp_model, workdir

QUESTIONS = ["What is 7 + 5?",
             "Ana has 12 apples.\nShe eats 3. How many are left?  ",
             " leading space, unicode é × ÷ 🙂 and \\boxed{}"]
CASES = [(q, system, reasoning) for q in QUESTIONS
         for system, reasoning in [(None, True), ("Be brief.", True), (None, False),
                                   ("Be brief.", False)]]


def test_format_layout_exact():
    q = "What is 2 + 2?"
    assert format_prompt(q) == (
        "<|system|>Your name is Phi, an AI math expert developed by Microsoft.<|end|>"
        "<|user|>What is 2 + 2?<|end|><|assistant|>")
    assert format_prompt(q, "Answer in English.") == (
        "<|system|>Your name is Phi, an AI math expert developed by Microsoft. Answer in "
        "English.<|end|><|user|>What is 2 + 2?<|end|><|assistant|>")
    assert format_prompt(q, reasoning=False) == "<|user|>What is 2 + 2?<|end|><|assistant|>"
    assert format_prompt(q, "Be brief.", reasoning=False) == (
        "<|system|>Be brief.<|end|><|user|>What is 2 + 2?<|end|><|assistant|>")


@pytest.fixture(scope="module")
def hf():
    return load_tokenizer("hf", hf_tokenizer_dir())


@pytest.fixture(scope="module")
def sp():
    return load_tokenizer("sentencepiece", sp_model())


@pytest.mark.parametrize("question,system,reasoning", CASES)
def test_hf_prompt_equals_whole_string_tokenisation(hf, question, system, reasoning):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(hf_tokenizer_dir(), local_files_only=True)
    text = format_prompt(question, system, reasoning)
    ids = hf.prompt_ids(question, system, reasoning)
    assert ids == ref(text)["input_ids"]
    assert hf.decode(ids) == text
    assert hf.prompt_ids_batch([question], system, reasoning) == [ids]


@pytest.mark.parametrize("question,system,reasoning", CASES)
def test_sp_prompt_equals_whole_string_tokenisation(sp, question, system, reasoning):
    import sentencepiece as spm
    ref = spm.SentencePieceProcessor(model_file=sp_model())
    text = format_prompt(question, system, reasoning)
    ids = sp.prompt_ids(question, system, reasoning)
    assert ids == ref.encode(text)
    assert sp.decode(ids) == text
    assert sp.prompt_ids_batch([question], system, reasoning) == [ids]


@pytest.mark.parametrize("kind", ["hf", "sp"])
def test_special_ids_and_completion(kind, hf, sp):
    tok = {"hf": hf, "sp": sp}[kind]
    ids = {s: tok.token_id(s) for s in SPECIAL_TOKENS}
    assert len(set(ids.values())) == 8
    assert (tok.end_id, tok.eos_id) == (ids["<|end|>"], ids["<|endoftext|>"])
    assert (tok.user_id, tok.assistant_id, tok.system_id) == (
        ids["<|user|>"], ids["<|assistant|>"], ids["<|system|>"])
    assert tok.stop_ids == (tok.end_id, tok.eos_id)
    assert max(ids.values()) < tok.vocab_size and 0 <= tok.pad_id < tok.vocab_size
    solution = "5 + 7 = 12. The answer is \\boxed{12}."
    completion = tok.completion_ids(solution)
    assert completion[-1] == tok.end_id and tok.decode(completion) == solution + "<|end|>"
    assert completion == tok.completion_ids_batch([solution])[0]
    assert tok.encode("") == [] and tok.decode(tok.encode(solution)) == solution
    assert tok.encode_batch(QUESTIONS) == [tok.encode(q) for q in QUESTIONS]
    prompt = tok.prompt_ids("q")
    assert prompt[0] == tok.system_id and prompt[-1] == tok.assistant_id
    assert tok.decode(prompt).count(DEFAULT_SYSTEM) == 1


def test_hf_pad_is_endoftext(hf):
    assert hf.pad_id == hf.eos_id  # as Phi-4-mini: <|endoftext|> is bos, eos and pad


def test_hf_missing_special_tokens_named():
    path = hf_tokenizer_dir(specials=("<|endoftext|>", "<|end|>", "<|user|>"))
    with pytest.raises(TokenizerError) as e:
        HFTokenizer(path)
    for missing in ("<|endofprompt|>", "<|assistant|>", "<|system|>", "<|tool|>", "<|/tool|>"):
        assert missing in str(e.value)
    assert "'<|end|>'" not in str(e.value)
    with pytest.raises(TokenizerError, match="does not exist"):
        HFTokenizer(os.path.join(workdir(), "no_such_dir"))


def _model_bytes(path):
    """The serialized model without the one field that names the output file."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    assert proto.trainer_spec.model_prefix.endswith(os.path.basename(path)[:-len(".model")])
    proto.trainer_spec.model_prefix = ""
    return proto.SerializeToString()


def test_sentencepiece_training_is_deterministic_and_byte_complete():
    texts = list(demo_corpus.corpus_texts([demo_paths()["train"]]))
    a = train_sentencepiece(texts, os.path.join(workdir(), "det_a"), 400)
    b = train_sentencepiece(iter(texts), os.path.join(workdir(), "det_b"), 400)
    assert _model_bytes(a) == _model_bytes(b)
    tok = SentencePieceTokenizer(a)
    weird = "日本語 ∑ 🙂\ttabs\n\nand  spaces "
    assert tok.decode(tok.encode(weird)) == weird  # byte fallback: no <unk>
    assert 1 not in tok.encode(weird)  # unk id


def test_sentencepiece_without_specials_is_refused():
    import sentencepiece as spm
    prefix = os.path.join(workdir(), "plain")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(demo_corpus.corpus_texts([demo_paths()["heldout"]])),
        model_prefix=prefix, vocab_size=400, byte_fallback=True, hard_vocab_limit=False,
        user_defined_symbols=["<|end|>"], minloglevel=2, num_threads=1)
    with pytest.raises(TokenizerError) as e:
        SentencePieceTokenizer(prefix + ".model")
    assert "lacks the Phi special tokens ['<|endoftext|>', '<|endofprompt|>'" in str(e.value)


def test_load_tokenizer_kinds(tmp_path):
    assert isinstance(load_tokenizer("sentencepiece", sp_model()), SentencePieceTokenizer)
    assert isinstance(load_tokenizer("auto", sp_model()), SentencePieceTokenizer)
    assert isinstance(load_tokenizer("auto", hf_tokenizer_dir()), HFTokenizer)
    shutil.copy(sp_model(), tmp_path / "tokenizer.model")  # a run's copied tokenizer/ dir
    tok = load_tokenizer("auto", str(tmp_path))
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.prompt_ids("q") == load_tokenizer("sentencepiece", sp_model()).prompt_ids("q")
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer("tiktoken", sp_model())
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer("sentencepiece", sp_model() + ".missing")
