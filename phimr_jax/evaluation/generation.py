"""Stage `generate`: completions for a JSONL of questions, in the chat format, as JSONL.

Each output line: {"index", "sample", "question", "completion", "num_tokens", "finish_reason",
"logprob"} where logprob is the completion's summed log-probability under the model.
"""

from __future__ import annotations

import json
import logging
import os

import jax
from ml_collections import ConfigDict

from phimr_jax.data.sources import open_records
from phimr_jax.evaluation.inference import load_model_and_tokenizer, sample_questions
from phimr_jax.model.sharding import axis_rules

log = logging.getLogger(__name__)


def run(config: ConfigDict) -> str:
    if not config.prompts:
        raise ValueError("missing required option --config.prompts=FILE.jsonl")
    model, tokenizer, mesh, rules = load_model_and_tokenizer(config)
    source = open_records(config.prompts, fields={"question": config.prompt_field},
                          required=("question",))
    questions = [source[i]["question"] for i in range(len(source))]
    out_path = config.output or os.path.join(config.workdir or ".", "completions.jsonl")
    with jax.set_mesh(mesh), axis_rules(rules):
        res = sample_questions(model, tokenizer, questions, config)
    if jax.process_index() != 0:
        return out_path
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for row, toks in enumerate(res.tokens):  # prompt-major, in question order
            q = row // config.num_samples
            body = toks[:-1] if res.finish_reasons[row] == "stop" else toks
            f.write(json.dumps({
                "index": q, "sample": row % config.num_samples, "question": questions[q],
                "completion": tokenizer.decode(body), "num_tokens": int(res.lengths[row]),
                "finish_reason": res.finish_reasons[row],
                "logprob": float(res.logprobs[row].sum())}) + "\n")
    log.info("wrote %d completions of %d prompts to %s", len(questions) * config.num_samples,
             len(questions), out_path)
    return out_path
