"""Command line:

    python -m dromedary_jax.eval --model PATH [--tokenizer PATH] --task truthfulqa_mc|hhh|answers \\
        --data FILE [--out FILE] [--label NAME] [--mesh 1,-1,1] [--batch_tokens 4096] ...
    python -m dromedary_jax.eval compare RESULT.json ... --out DIR [--force]

Flags are absl's (``--name value`` or ``--name=value``; ``--bos`` / ``--nobos``); ``--help``
lists them (``compare --help``: those of ``compare``). ``--mesh`` is data,fsdp,tensor (one -1
allowed) as ``config.model.mesh`` is.

``--model`` is an HF / Meta / dromedary_jax folder or a ``.gguf`` file (which carries its own
tokenizer). ``--data`` takes BIG-bench's files as the bigbench sdist ships them
(``truthful_qa/questions.json``, the ``hhh_alignment/`` folder or its ``task.json``; see
``python -m dromedary_jax.fetch bigbench``) or the HF dataset's records. Contexts get BOS as
the tokenizer's own rule says (``--bos`` / ``--nobos`` force it on / off).

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

import json
import math
import os
import sys

from dromedary_jax.errors import UserError, absl_cli_args, absl_cli_flags, cli_main

TASKS = ("truthfulqa_mc", "hhh", "answers")


PROG = "python -m dromedary_jax.eval"


def _define_eval_flags(fv, argv) -> None:
    from absl import flags

    def define(kind, name, default, help_text, *args):
        getattr(flags, f"DEFINE_{kind}")(name, default, *args, help_text, flag_values=fv)

    define("string", "model", None, "HF folder, Meta folder, our checkpoint, or a .gguf file "
           "(required)")
    define("string", "tokenizer", None, "tokenizer .model / tokenizer.json / .gguf / folder "
           "(default: the model folder or .gguf file)")
    define("enum", "task", None, "what to run (required)", list(TASKS))
    define("string", "data", None, "truthfulqa_mc: BIG-bench truthful_qa/questions.json or "
           "HF-style JSON/JSONL records; hhh: BIG-bench hhh_alignment folder or a task.json; "
           "answers: questions JSONL (required)")
    define("string", "out", None, "result JSON (truthfulqa_mc, hhh) or answer JSONL (answers)")
    define("string", "label", None, "checkpoint name shown by 'compare' (default: model folder)")
    define("enum", "dtype", "float32", "compute dtype", ["float32", "bfloat16"])
    define("string", "mesh", None, "mesh data,fsdp,tensor (one -1 allowed), e.g. 1,-1,1 "
           "(default: one device)")
    define("integer", "batch_size", 32, "answers: prompts per batch")
    define("integer", "batch_tokens", 4096, "truthfulqa_mc / hhh: tokens scored per step "
           "(rows x row length)")
    define("integer", "row_length", 512, "truthfulqa_mc / hhh: tokens of a packed scoring row")
    define("bool", "bos", None, "--bos / --nobos: encode contexts with / without BOS (default: "
           "as the tokenizer's own rule says)")
    define("integer", "mc1_max_false", 4, "truthfulqa_mc on BIG-bench's questions.json: false "
           "answers among MC1's choices (default 4, as TruthfulQA's mc_task.json; 0: all)")
    define("string", "preamble_file", None, "truthfulqa_mc: few-shot preamble text (default: the "
           "harness's 6-shot QA prompt)")
    define("enum", "variant", "harness", "hhh: harness scoring, or the paper's A/B question in "
           "both orders", ["harness", "ab"])
    define("string", "meta_prompt", None, "text file; answers: the meta-prompt; hhh: text put "
           "before every HHH prompt (e.g. for --variant ab)")
    define("string", "model_id", None, "answers: model_id in the answer file (default: label)")
    define("integer", "max_new_tokens", 512, "answers: new tokens per answer")
    define("float", "temperature", 0.0, "answers: sampling temperature (0: greedy)")
    define("float", "top_p", 1.0, "answers: nucleus sampling mass")
    define("integer", "seed", 0, "answers: sampling seed")
    define("bool", "share_meta_prompt", False, "answers: prefill the meta-prompt once (sampler "
           "shared_prefix)")


def _define_compare_flags(fv, argv) -> None:
    from absl import flags

    flags.DEFINE_string("out", None, "output folder (required)", flag_values=fv)
    flags.DEFINE_bool("force", False, "compare results of one task scored on different question "
                      "sets anyway (the table says so)", flag_values=fv)


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
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.batch_tokens < 1:
        raise UserError(f"--batch_tokens must be >= 1, got {args.batch_tokens}")
    if args.row_length < 2:
        raise UserError(f"--row_length must be >= 2, got {args.row_length}")
    if args.mc1_max_false < 0:
        raise UserError(f"--mc1_max_false must be >= 0 (0: all), got {args.mc1_max_false}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature < math.inf:
        raise UserError(f"--temperature must be a number >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")


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
    """Run one eval task from the parsed flags ``args`` (``--task`` truthfulqa_mc | hhh |
    answers) and return its result dict (task, label, model, data, n, bos rule, and for the two
    scoring tasks metrics, settings and per-example scores). Process 0 prints the one JSON line
    and writes ``--out`` (the result JSON, or FastChat answers for ``answers``). Arguments, the
    output path and the data are checked before the model loads; bad ones raise UserError."""
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
    meta = read_text(args.meta_prompt, "--meta_prompt") if args.meta_prompt else ""
    preamble = (read_text(args.preamble_file, "--preamble_file").strip()
                if args.preamble_file else None)
    _check_model_folder(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    from dromedary_jax.checkpoint import load_model
    from dromedary_jax.checkpoint.dtypes import sampling_param_dtype, stored_param_dtype

    # weights in bf16 for a bf16 eval or a bf16 checkpoint (the matmuls read the same values)
    model = load_model(args.model, dtype=args.dtype, mesh=mesh,
                       param_dtype=sampling_param_dtype(args.dtype, stored_param_dtype(args.model)))
    label = args.label or _default_label(args.model)
    add_bos = resolve_add_bos(tokenizer, args.bos)
    bos_rule = {None: "tokenizer", True: "forced on (--bos)", False: "forced off (--nobos)"}
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


COMPARE_USAGE = """Markdown table + PNG chart of result files across checkpoints.

    python -m dromedary_jax.eval compare RESULT.json ... --out DIR [--force]

RESULT.json: files written by ``python -m dromedary_jax.eval ... --out``. Writes
``DIR/comparison.md`` and ``DIR/comparison.png``; results of one task scored on different
question sets are refused unless ``--force`` (the table says so).
"""


@cli_main
def main(argv=None) -> None:
    """Run the eval CLI with ``argv``: the arguments after the program name (default
    ``sys.argv[1:]``), e.g. ``main(["--model", m, "--task", "hhh", "--data", d])`` or
    ``main(["compare", "a.json", "b.json", "--out", "cmp"])``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from dromedary_jax.eval.compare import compare

        fv, results = absl_cli_args([f"{PROG} compare", *argv[1:]], _define_compare_flags,
                                    cli="eval compare", usage=COMPARE_USAGE, positional=True)
        if not results:
            raise UserError("compare needs RESULT.json files (written with --out)")
        if not fv.out:
            raise UserError("compare needs --out DIR (the folder to write the table and chart to)")
        paths = compare(results, fv.out, force=fv.force)
        for w in paths.get("warnings", ()):
            print(f"WARNING: {w}", file=sys.stderr)
        print(f"wrote {paths['markdown']} and {paths['png']}")
        return
    args = absl_cli_flags([PROG, *argv], _define_eval_flags, cli="eval", usage=__doc__)
    for name in ("model", "task", "data"):
        if args[name].value is None:
            raise UserError(f"--{name} is required (see --help)")
    run_eval(args)


if __name__ == "__main__":
    main()
