"""Evaluation: TruthfulQA MC1/MC2, BIG-bench HHH, open-ended answers, run comparison.

    import dromedary_jax as dj
    from dromedary_jax import fetch
    questions_json, hhh_dir = fetch.bigbench_paths()  # BIG-bench's files, as the sdist ships them
    dj.eval.truthfulqa_mc(model, tok, dj.eval.load_truthfulqa(questions_json))  # {"mc1", "mc2"}
    dj.eval.hhh(model, tok, dj.eval.load_hhh(hhh_dir))  # {"harmless", ..., "overall"}
    dj.eval.answer_questions(model, tok, dj.eval.load_questions("question.jsonl"), meta_prompt=...)
    dj.eval.loglikelihoods(model, [(context_ids, continuation_ids), ...])

Contexts get BOS as the tokenizer's own rule says (``add_bos=None``), as lm-evaluation-harness
does. CLI: ``python -m dromedary_jax.eval --help`` (and ``python -m dromedary_jax.eval compare
--help``). docs/eval.md has the details and the measured numbers.
"""
from dromedary_jax.eval.answers import answer_questions, build_prompt, load_questions, write_answers
from dromedary_jax.eval.compare import compare
from dromedary_jax.eval.hhh import AB_TEMPLATE, hhh, load_hhh, score_hhh
from dromedary_jax.eval.scorer import encode_pair, loglikelihoods, score_texts
from dromedary_jax.eval.truthfulqa import (
    QA_PREAMBLE,
    load_truthfulqa,
    mc1_score,
    mc2_score,
    score_truthfulqa,
    truthfulqa_mc,
)

__all__ = ["AB_TEMPLATE", "QA_PREAMBLE", "answer_questions", "build_prompt", "compare",
           "encode_pair", "hhh", "load_hhh", "load_questions", "load_truthfulqa",
           "loglikelihoods", "mc1_score", "mc2_score", "score_hhh", "score_texts",
           "score_truthfulqa", "truthfulqa_mc", "write_answers"]
