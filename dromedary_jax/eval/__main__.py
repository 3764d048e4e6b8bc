"""Command line:

    python -m dromedary_jax.eval --model PATH [--tokenizer PATH] --task truthfulqa_mc|hhh|answers \\
        --data FILE [--out FILE] [--label NAME] [--batch-size 32] ...
    python -m dromedary_jax.eval compare RESULT.json ... --out DIR

truthfulqa_mc / hhh print one JSON line of metrics and, with ``--out``, write the result file
(metrics, settings, per-example scores) that ``compare`` reads. ``answers`` writes FastChat's
answer JSONL to ``--out`` (required). ``compare`` writes ``DIR/comparison.md`` and
``DIR/comparison.png``. Bad input prints one ``error: ...`` line and exits with status 2.

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
    p.add_argument("--model", required=True, help="HF folder, Meta folder or our checkpoint")
    p.add_argument("--tokenizer", help="tokenizer .model / tokenizer.json / folder "
                                       "(default: the model folder)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True,
                   help="truthfulqa_mc: JSON/JSONL records; hhh: task.json or folder; "
                        "answers: questions JSONL")
    p.add_argument("--out", help="result JSON (truthfulqa_mc, hhh) or answer JSONL (answers)")
    p.add_argument("--label", help="checkpoint name shown by 'compare' (default: model folder)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mesh", help="mesh shape data,fsdp,tensor (one -1 allowed), e.g. 1,-1,1 "
                                  "(default: one device)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="(context, continuation) rows per scoring step; answers: rows per batch")
    p.add_argument("--no-bos", action="store_true", help="encode contexts without BOS")
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
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature < math.inf:
        raise UserError(f"--temperature must be a number >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")


def _check_model_folder(args) -> None:
    """The model folder holds a checkpoint and, unless --tokenizer is given, a tokenizer."""
    from dromedary_jax.checkpoint import detect_format
    from dromedary_jax.tokenizer import tokenizer_file_in

    try:
        detect_format(args.model)
    except UserError as e:
        raise UserError(f"--model {e}") from None
    if not args.tokenizer and tokenizer_file_in(args.model) is None:
        raise UserError(f"--model {args.model}: no tokenizer.model or tokenizer.json in the model "
                        f"folder; pass --tokenizer PATH (a tokenizer .model / tokenizer.json file "
                        f"or a folder holding one)")


def run_eval(args) -> dict:
    from dromedary_jax import eval as ev
    from dromedary_jax.eval import truthfulqa as tqa
    from dromedary_jax.eval.data import read_text
    from dromedary_jax.output_paths import check_out_file
    from dromedary_jax.eval.hhh import aggregate as hhh_aggregate
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
        records = ev.load_truthfulqa(args.data)
    elif args.task == "hhh":
        records = ev.load_hhh(args.data)
    else:
        records = ev.load_questions(args.data)
    meta = read_text(args.meta_prompt, "--meta-prompt") if args.meta_prompt else ""
    preamble = (read_text(args.preamble_file, "--preamble-file").strip()
                if args.preamble_file else ev.QA_PREAMBLE)
    _check_model_folder(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    from dromedary_jax.checkpoint import load_model

    model = load_model(args.model, dtype=args.dtype, mesh=mesh)
    label = args.label or os.path.basename(os.path.normpath(args.model))
    common = dict(batch_size=args.batch_size, add_bos=not args.no_bos, progress=lead)
    result = {"task": args.task, "label": label, "model": args.model, "data": args.data,
              "n": len(records)}
    if args.task == "truthfulqa_mc":
        per = ev.score_truthfulqa(model, tokenizer, records, preamble=preamble, **common)
        result.update(metrics=tqa.aggregate(per),
                      settings={"preamble": preamble, **common}, per_example=per)
    elif args.task == "hhh":
        per = ev.score_hhh(model, tokenizer, records, variant=args.variant, prompt_prefix=meta,
                           **common)
        result.update(variant=args.variant, metrics=hhh_aggregate(per),
                      settings={"variant": args.variant, "prompt_prefix": meta, **common},
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
                      **result["metrics"]}))
    return result


@cli_main
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from dromedary_jax.eval.compare import compare

        args = _compare_parser().parse_args(argv[1:])
        paths = compare(args.results, args.out)
        print(f"wrote {paths['markdown']} and {paths['png']}")
        return
    run_eval(_eval_parser().parse_args(argv))


if __name__ == "__main__":
    main()
