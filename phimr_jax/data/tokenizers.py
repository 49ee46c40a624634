"""Tokenizers that speak the Phi-4-mini chat format: HF (the real o200k-derived BPE) and
SentencePiece (a small demo tokenizer trained here, so demos need no download).

Chat format (PHI4_MINI.md), no newlines between parts:
  reasoning: <|system|>Your name is Phi, an AI math expert developed by Microsoft.[ {system}]<|end|>
             <|user|>{question}<|end|><|assistant|>
  instruct:  [<|system|>{system}<|end|>]<|user|>{question}<|end|><|assistant|>
and the assistant turn is `{solution}<|end|>`: training on that final <|end|> teaches the model
to stop.

Prompt ids are built by concatenating special-token ids with `encode()` of each text piece. This
equals tokenising the whole formatted string (what HF `apply_chat_template` + tokenise does)
because both tokenizers split on their special tokens before anything else and add nothing
(no BOS, no SentencePiece dummy prefix) to a piece; the tests check the equality. As in that
reference behaviour, a special-token string written inside a question or solution (e.g. a
literal "<|end|>") is encoded as that special token: the data is trusted.
"""

from __future__ import annotations

import abc
import os
from typing import Iterable, Optional, Sequence

ENDOFTEXT, ENDOFPROMPT = "<|endoftext|>", "<|endofprompt|>"
ASSISTANT, END, USER, SYSTEM = "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"
TOOL, END_TOOL = "<|tool|>", "<|/tool|>"
SPECIAL_TOKENS = (ENDOFTEXT, ENDOFPROMPT, ASSISTANT, END, USER, SYSTEM, TOOL, END_TOOL)
DEFAULT_SYSTEM = "Your name is Phi, an AI math expert developed by Microsoft."


class TokenizerError(ValueError):
    """A tokenizer directory/model that cannot serve the Phi chat format."""


def system_text(system: Optional[str], reasoning: bool) -> Optional[str]:
    """The text of the system turn, or None when the prompt has no system turn."""
    if reasoning:
        return DEFAULT_SYSTEM + (f" {system}" if system else "")
    return system or None


def format_prompt(question: str, system: Optional[str] = None, reasoning: bool = True) -> str:
    """The prompt as one string (for inspection and tests; training uses `prompt_ids`)."""
    sys_text = system_text(system, reasoning)
    head = f"{SYSTEM}{sys_text}{END}" if sys_text is not None else ""
    return f"{head}{USER}{question}{END}{ASSISTANT}"


class ChatTokenizer(abc.ABC):
    """Text <-> ids plus the Phi chat format. Subclasses give `encode`, `decode`, `vocab_size`
    and the special ids (`_special`: string -> id for all of SPECIAL_TOKENS, and `pad_id`)."""

    _special: dict[str, int]

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens written out. Ids the tokenizer cannot produce (the
        model's vocab may be padded larger) are skipped."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (the model's vocab may be padded larger)."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Id written into padding (never trained on: loss_mask is 0 there)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text; subclasses may do it in parallel."""
        return [self.encode(t) for t in texts]

    def token_id(self, token: str) -> int:
        return self._special[token]

    @property
    def end_id(self) -> int:
        return self._special[END]

    @property
    def eos_id(self) -> int:
        return self._special[ENDOFTEXT]

    @property
    def user_id(self) -> int:
        return self._special[USER]

    @property
    def assistant_id(self) -> int:
        return self._special[ASSISTANT]

    @property
    def system_id(self) -> int:
        return self._special[SYSTEM]

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Generation stops at either: <|end|> (end of turn) or <|endoftext|>."""
        return (self.end_id, self.eos_id)

    def prompt_ids(self, question: str, system: Optional[str] = None,
                   reasoning: bool = True) -> list[int]:
        """Ids of `format_prompt(question, system, reasoning)`, ending with <|assistant|>."""
        return self._assemble_prompt(self.encode(question), system, reasoning)

    def prompt_ids_batch(self, questions: Sequence[str], system: Optional[str] = None,
                         reasoning: bool = True) -> list[list[int]]:
        return [self._assemble_prompt(q, system, reasoning) for q in self.encode_batch(questions)]

    def completion_ids(self, solution: str) -> list[int]:
        """The assistant turn: solution ids then <|end|>."""
        return self.encode(solution) + [self.end_id]

    def completion_ids_batch(self, solutions: Sequence[str]) -> list[list[int]]:
        return [ids + [self.end_id] for ids in self.encode_batch(solutions)]

    def _assemble_prompt(self, question_ids: list[int], system: Optional[str],
                         reasoning: bool) -> list[int]:
        sys_text = system_text(system, reasoning)
        head = [] if sys_text is None else [self.system_id, *self._encode_cached(sys_text),
                                            self.end_id]
        return head + [self.user_id, *question_ids, self.end_id, self.assistant_id]

    def _encode_cached(self, text: str) -> list[int]:
        """encode() memoised per instance (the system text is the same for every prompt)."""
        cache = self.__dict__.setdefault("_text_cache", {})
        if text not in cache:
            if len(cache) >= 16:
                cache.clear()
            cache[text] = self.encode(text)
        return cache[text]


class HFTokenizer(ChatTokenizer):
    """A `transformers` tokenizer from a local directory (tokenizer.json et al.; never the hub).

    The Phi special tokens are looked up by their strings; each must exist and encode to
    itself as a single id (i.e. be an added token), else TokenizerError names the bad ones.
    `vocab_size` is `len(tokenizer)` (base vocab + added tokens); Phi-4-mini's model vocab
    (200064) is larger than that, padded.
    """

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise TokenizerError(f"tokenizer directory {path!r} does not exist")
        from transformers import AutoTokenizer
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot load a tokenizer from {path!r}: {e}") from e
        self.path = path
        vocab = self._tok.get_vocab()
        self._special = {s: vocab[s] for s in SPECIAL_TOKENS if s in vocab}
        bad = [s for s in SPECIAL_TOKENS
               if s not in self._special or self.encode(s) != [self._special[s]]]
        if bad:
            raise TokenizerError(f"tokenizer {path!r} lacks the Phi special tokens {bad} "
                                 "(each must be an added token that encodes to one id)")
        pad = self._tok.pad_token_id
        self._pad_id = self.eos_id if pad is None else int(pad)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(x) for x in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        n = self.vocab_size
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < n],
                                skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(ChatTokenizer):
    """A SentencePiece model whose Phi special strings are user-defined symbols.

    User-defined symbols are cut out of any text before segmentation, so they behave like HF
    added tokens. The model must not add a dummy prefix ("▁" before each encoded piece), or
    prompt ids assembled from pieces would differ from tokenising the whole string; models
    from `train_sentencepiece` satisfy both and the constructor checks them.
    """

    def __init__(self, model_path: str):
        import sentencepiece as spm
        if not os.path.isfile(model_path):
            raise TokenizerError(f"sentencepiece model {model_path!r} does not exist")
        self.path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self._check_model()
        self._special = {s: self._sp.piece_to_id(s) for s in SPECIAL_TOKENS}
        pad = self._sp.pad_id()
        self._pad_id = self.eos_id if pad < 0 else pad

    def _check_model(self) -> None:
        from sentencepiece import sentencepiece_model_pb2 as pb
        proto = pb.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        kinds = {p.piece: p.type for p in proto.pieces}
        user_defined = pb.ModelProto.SentencePiece.USER_DEFINED
        bad = [s for s in SPECIAL_TOKENS if kinds.get(s) != user_defined]
        if bad:
            raise TokenizerError(f"sentencepiece model {self.path!r} lacks the Phi special "
                                 f"tokens {bad} as user_defined_symbols")
        if proto.normalizer_spec.add_dummy_prefix:
            raise TokenizerError(f"sentencepiece model {self.path!r} adds a dummy prefix; "
                                 "train it with add_dummy_prefix=False")

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        n = self.vocab_size
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < n])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def train_sentencepiece(texts: Iterable[str], out_prefix: str, vocab_size: int) -> str:
    """Train a demo BPE SentencePiece model on `texts`; returns the path of `out_prefix.model`.

    byte_fallback makes any text encodable (unknown characters become byte pieces);
    ids 0..3 are <pad> <unk> <s> </s>, then the 8 Phi special strings as user-defined symbols.
    Identity normalisation, no dummy prefix and kept whitespace make decode(encode(x)) == x and
    piece-wise encoding equal to whole-string encoding; digits are split one per token (as
    o200k-style tokenizers keep numbers short, and it makes arithmetic learnable). Single
    thread, no input sampling or shuffling: the same texts give the same model bytes.
    `vocab_size` is an upper bound (hard_vocab_limit=False): a tiny corpus may give fewer pieces;
    it must exceed 268 (256 byte pieces, 4 control ids, 8 special strings) plus the number of
    distinct characters in `texts`, else SentencePiece raises and says so.
    """
    import sentencepiece as spm
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=out_prefix, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        user_defined_symbols=list(SPECIAL_TOKENS), pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        hard_vocab_limit=False, num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, max_sentence_length=1 << 16, minloglevel=2)
    return out_prefix + ".model"


def load_tokenizer(kind: str, path: str) -> ChatTokenizer:
    """kind "hf": a local HF tokenizer directory; "sentencepiece": a .model file (or a directory
    holding tokenizer.model); "auto": "hf" if `path` is a directory with tokenizer.json or
    tokenizer_config.json, else "sentencepiece" (e.g. a run's copied tokenizer/ directory)."""
    if kind == "auto":
        hf_files = ("tokenizer.json", "tokenizer_config.json")
        is_hf = os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                            for f in hf_files)
        kind = "hf" if is_hf else "sentencepiece"
    if kind == "hf":
        return HFTokenizer(path)
    if kind == "sentencepiece":
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        return SentencePieceTokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'hf', 'sentencepiece' or "
                     "'auto')")
