"""Command line:

    python -m dromedary_jax.eval --model PATH [--tokenizer PATH] --task truthfulqa_mc|hhh|answers \\
        --data FILE [--out FILE] [--label NAME] [--batch-tokens 4096] ...
    python -m dromedary_jax.eval compare RESULT.json ... --out DIR [--force]

``--model`` is an HF / Meta / dromedary_jax folder or a ``.gguf`` file (which carries its own
tokenizer). ``--data`` takes BIG-bench's files as the bigbench sdist ships them
(``truthful_qa/questions.json``, the ``hhh_alignment/`` folder or its ``task.json``; see
``python -m dromedary_jax.fetch bigbench``) or the HF dataset's records. Contexts get BOS as
the tokenizer's own rule says (``--bos`` / ``--no-bos`` force it on / off).

truthfulqa_mc / hhh print one JSON line of metrics and, with ``--out``, write the result file
(model, data file, question count and fingerprint, the BOS rule used, metrics, settings,
per-example scores) that ``compare`` reads. ``answers`` writes FastChat's answer JSONL to
``--out`` (required). ``compare`` writes ``DIR/comparison.md`` and ``DIR/comparison.png`` and
refuses results of one task scored on different question sets (``--force``: compare anyway,
flagged in the table). Bad input prints one ``error: ...`` line and exits with status 2.

Every task also runs multi-host (a model sharded over several processes): start the same
command on every host with ``DROMEDARY_DISTRIBUTED=auto`` (TPU pods) or ``DROMEDARY_COORDINATOR``
/ ``DROMEDARY_NUM_PROCESSES`` / ``DROMEDARY_PROCESS_ID``, and a ``--mesh`` over all devices;
process 0 prints and writes ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from dromedary_jax.errors import UserError, cli_main

TASKS = ("truthfulqa_mc", "hhh", "answers")


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dromedary_jax.eval",
                                description="Evaluate a checkpoint (TruthfulQA MC, BIG-bench HHH, "
                                            "open-ended answers). See also the 'compare' command.")
    p.add_argument("--model", required=True,
                   help="HF folder, Meta folder, our checkpoint, or a .gguf file")
    p.add_argument("--tokenizer", help="tokenizer .model / tokenizer.json / .gguf / folder "
                                       "(default: the model folder or .gguf file)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True,
                   help="truthfulqa_mc: BIG-bench truthful_qa/questions.json or HF-style "
                        "JSON/JSONL records; hhh: BIG-bench hhh_alignment folder or a task.json; "
                        "answers: questions JSONL")
    p.add_argument("--out", help="result JSON (truthfulqa_mc, hhh) or answer JSONL (answers)")
    p.add_argument("--label", help="checkpoint name shown by 'compare' (default: model folder)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mesh", help="mesh shape data,fsdp,tensor (one -1 allowed), e.g. 1,-1,1 "
                                  "(default: one device)")
    p.add_argument("--batch-size", type=int, default=32, help="answers: prompts per batch")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="truthfulqa_mc / hhh: tokens scored per step (rows x row length)")
    p.add_argument("--row-length", type=int, default=512,
                   help="truthfulqa_mc / hhh: tokens of a packed scoring row")
    bos = p.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="bos", action="store_const", const=True, default=None,
                     help="encode contexts with BOS (default: as the tokenizer's own rule says)")
    bos.add_argument("--no-bos", dest="bos", action="store_const", const=False,
                     help="encode contexts without BOS")
    p.add_argument("--mc1-max-false", type=int, default=4,
                   help="truthfulqa_mc on BIG-bench's questions.json: false answers among MC1's "
                        "choices (default 4, as TruthfulQA's mc_task.json; 0: all)")
    p.add_argument("--preamble-file", help="truthfulqa_mc: few-shot preamble text "
                                           "(default: the harness's 6-shot QA prompt)")
    p.add_argument("--variant", default="harness", choices=("harness", "ab"),
                   help="hhh: harness scoring, or the paper's A/B question in both orders")
    p.add_argument("--meta-prompt", help="text file; answers: the meta-prompt; hhh: text put "
                                         "before every HHH prompt (e.g. for --variant ab)")
    p.add_argument("--model-id", help="answers: model_id in the answer file (default: label)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--share-meta-prompt", action="store_true",
                   help="answers: prefill the meta-prompt once (sampler shared_prefix)")
    return p


def _compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dromedary_jax.eval compare",
                                description="Markdown table + PNG chart across checkpoints.")
    p.add_argument("results", nargs="+", help="result JSON files written with --out")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true",
                   help="compare results of one task scored on different question sets anyway "
                        "(the table says so)")
    return p


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def _parse_mesh(text):
    if not text:
        return None
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise UserError(f"--mesh {text!r}: expected three integers data,fsdp,tensor, e.g. 1,-1,1")
    return shape


def _check_numbers(args) -> None:
    """Every numeric argument, before anything is read or loaded."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.batch_tokens < 1:
        raise UserError(f"--batch-tokens must be >= 1, got {args.batch_tokens}")
    if args.row_length < 2:
        raise UserError(f"--row-length must be >= 2, got {args.row_length}")
    if args.mc1_max_false < 0:
        raise UserError(f"--mc1-max-false must be >= 0 (0: all), got {args.mc1_max_false}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature < math.inf:
        raise UserError(f"--temperature must be a number >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")


def _check_model_folder(args) -> str:
    """The model folder holds a checkpoint and, unless --tokenizer is given, a tokenizer (a
    .gguf file carries its own). Returns the checkpoint format."""
    from dromedary_jax.checkpoint import detect_format
    from dromedary_jax.tokenizer import tokenizer_file_in

    try:
        kind = detect_format(args.model)
    except UserError as e:
        raise UserError(f"--model {e}") from None
    if kind == "gguf":
        return kind
    if not args.tokenizer and tokenizer_file_in(args.model) is None:
        raise UserError(f"--model {args.model}: no tokenizer.model or tokenizer.json in the model "
                        f"folder; pass --tokenizer PATH (a tokenizer .model / tokenizer.json file "
                        f"or a folder holding one)")
    return kind


def _default_label(model: str) -> str:
    base = os.path.basename(os.path.normpath(model))
    return base[:-5] if base.endswith(".gguf") else base


def run_eval(args) -> dict:
    from dromedary_jax import eval as ev
    from dromedary_jax.eval import truthfulqa as tqa
    from dromedary_jax.eval.data import read_text
    from dromedary_jax.output_paths import check_out_file
    from dromedary_jax.eval.hhh import aggregate as hhh_aggregate
    from dromedary_jax.eval.hhh import question_set as hhh_question_set
    from dromedary_jax.eval.scorer import resolve_add_bos
    from dromedary_jax.tokenizer import load_tokenizer

    # Check the arguments, the output path and the data before the (slow) model load.
    _check_numbers(args)
    if args.task == "answers" and not args.out:
        raise UserError("--task answers needs --out FILE (the FastChat answer JSONL to write)")
    mesh = _parse_mesh(args.mesh)
    # Multi-host (DROMEDARY_DISTRIBUTED=auto on a TPU pod, or DROMEDARY_COORDINATOR & co.): every
    # process runs the same scoring calls over the mesh and gets every score, or answers its
    # share of the questions and gets every answer; process 0 prints and writes.
    from dromedary_jax.distributed import maybe_initialize

    multi = maybe_initialize()
    import jax

    lead = not multi or jax.process_index() == 0
    if lead and args.out:
        check_out_file(args.out, "--out")
    if args.task == "truthfulqa_mc":
        records = ev.load_truthfulqa(args.data, mc1_max_false=args.mc1_max_false or None)
    elif args.task == "hhh":
        records = ev.load_hhh(args.data)
    else:
        records = ev.load_questions(args.data)
    meta = read_text(args.meta_prompt, "--meta-prompt") if args.meta_prompt else ""
    preamble = (read_text(args.preamble_file, "--preamble-file").strip()
                if args.preamble_file else None)
    _check_model_folder(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    from dromedary_jax.checkpoint import load_model

    model = load_model(args.model, dtype=args.dtype, mesh=mesh)
    label = args.label or _default_label(args.model)
    add_bos = resolve_add_bos(tokenizer, args.bos)
    bos_rule = {None: "tokenizer", True: "forced on (--bos)", False: "forced off (--no-bos)"}
    common = dict(add_bos=add_bos, progress=lead)
    scoring = dict(batch_tokens=args.batch_tokens, row_length=args.row_length)
    result = {"task": args.task, "label": label, "model": os.path.abspath(args.model),
              "tokenizer": os.path.abspath(args.tokenizer or args.model),
              "data": os.path.abspath(args.data), "n": len(records),
              "bos": {"add_bos": add_bos, "rule": bos_rule[args.bos]}}
    if args.task == "truthfulqa_mc":
        result.update(tqa.question_set(records))
        per = ev.score_truthfulqa(model, tokenizer, records, preamble=preamble, **common,
                                  **scoring)
        used = preamble if preamble is not None else records[0].get("preamble", ev.QA_PREAMBLE)
        result.update(metrics=tqa.aggregate(per),
                      settings={"preamble": used, "mc1_max_false": args.mc1_max_false or None,
                                "dtype": args.dtype, **common, **scoring},
                      per_example=per)
    elif args.task == "hhh":
        result.update(hhh_question_set(records))
        per = ev.score_hhh(model, tokenizer, records, variant=args.variant, prompt_prefix=meta,
                           **common, **scoring)
        result.update(variant=args.variant, metrics=hhh_aggregate(per),
                      settings={"variant": args.variant, "prompt_prefix": meta,
                                "dtype": args.dtype, **common, **scoring},
                      per_example=per)
    else:
        answers = ev.answer_questions(
            model, tokenizer, records, meta_prompt=meta, model_id=args.model_id or label,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            seed=args.seed, batch_size=args.batch_size, share_meta_prompt=args.share_meta_prompt)
        if lead:
            ev.write_answers(answers, args.out)
            print(json.dumps({"task": "answers", "answers": len(answers), "out": args.out}))
        return result
    result["settings"].pop("progress", None)
    if not lead:
        return result
    if args.out:
        _write_json(args.out, result)
    print(json.dumps({"task": result["task"], "variant": result.get("variant"), "label": label,
                      "n": result["n"], **result["metrics"]}))
    return result


@cli_main
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from dromedary_jax.eval.compare import compare

        args = _compare_parser().parse_args(argv[1:])
        paths = compare(args.results, args.out, force=args.force)
        for w in paths.get("warnings", ()):
            print(f"WARNING: {w}", file=sys.stderr)
        print(f"wrote {paths['markdown']} and {paths['png']}")
        return
    run_eval(_eval_parser().parse_args(argv))


if __name__ == "__main__":
    main()
