"""Data: lazy JSONL/Parquet record sources, Phi chat-format tokenizers, grain pipelines for
mid-training (packed) and SFT (padded), and a synthetic demo math corpus."""

from phimr_jax.data.pipelines import (DataStats, eval_examples, example_arrays, midtrain_dataset,
                                      sft_dataset)
from phimr_jax.data.sources import DataError, RecordSource, open_records
from phimr_jax.data.tokenizers import (DEFAULT_SYSTEM, SPECIAL_TOKENS, ChatTokenizer,
                                       HFTokenizer, SentencePieceTokenizer, TokenizerError,
                                       format_prompt, load_tokenizer, train_sentencepiece)

__all__ = ["open_records", "RecordSource", "DataError", "ChatTokenizer", "HFTokenizer",
           "SentencePieceTokenizer", "TokenizerError", "load_tokenizer", "train_sentencepiece",
           "format_prompt", "DEFAULT_SYSTEM", "SPECIAL_TOKENS", "midtrain_dataset",
           "sft_dataset", "eval_examples", "example_arrays", "DataStats"]
