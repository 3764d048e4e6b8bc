"""Stage 5, evaluation: the paper's benchmarks on the base, engraved and verbose-cloned models.

    Evaluate (run by runner.run_stage)  ->  <workdir>/evaluate/<model>.json   (one per model in
                                            evaluate.models)

Each model is scored on TruthfulQA MC1/MC2 (lm-evaluation-harness's truthfulqa_mc1/mc2
scoring, :mod:`dromedary_jax.eval.truthfulqa`) and BIG-bench HHH (overall and per category,
:mod:`dromedary_jax.eval.hhh`), read from the files ``evaluate.truthfulqa`` / ``evaluate.hhh``
name: paths, or ``"bigbench"`` for the copies ``python -m dromedary_jax.fetch bigbench`` put in
the cache. ``evaluate.max_truthfulqa`` / ``max_hhh`` (0 = all) score the first N questions of
each, the same N for every model, so the numbers are comparable; each result file records its
question count and fingerprint (the eval modules' ``question_set``, what ``eval compare``
checks). Besides the scores, each model answers the same
``evaluate.num_samples`` red-teaming seed questions (greedy, under the stage-4 distillation
meta-prompt), for the report's side-by-side answers.

Models are evaluated one at a time and each is freed before the next loads. A model's result
file is written (atomically) when it is done, so a killed run resumes with the next model.
Outputs: ``<model>.json`` ({"model", "path", "truthfulqa": {"mc1", "mc2", "n", "fingerprint"},
"hhh": {"overall", "harmless", ..., "n", "fingerprint"}, "samples": [{"question", "answer"}]}),
``manifest.json`` (the score table under ``counts``).
"""
from __future__ import annotations

import gc
import os

from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import read_json, write_json_atomic
from dromedary_jax.pipeline import data_files as D
from dromedary_jax.pipeline.finetune import meta_template
from dromedary_jax.pipeline.records import strip_non_semantic
from dromedary_jax.pipeline.resources import load_run_model, model_kind
from dromedary_jax.pipeline.stage import StageContext, StageResult

STAGE = "evaluate"
MODELS = ("base", "engrave", "verbose_clone")
# the model each name stands for, as a folder under the workdir (base: model.checkpoint)
MODEL_DIRS = {"engrave": ("engrave", "model"), "verbose_clone": ("verbose_clone", "model")}


def benchmark_files(config) -> tuple[str, str]:
    """(TruthfulQA file, HHH folder) from ``evaluate.truthfulqa`` / ``evaluate.hhh``; "" = skip
    that benchmark, "bigbench" = the fetched BIG-bench copies (UserError naming the command
    that fetches them when they are absent)."""
    ev = config.evaluate
    tqa, hhh = str(ev.truthfulqa or ""), str(ev.hhh or "")
    if "bigbench" in (tqa, hhh):
        from dromedary_jax import fetch

        t, h = fetch.bigbench_paths(download=False)
        tqa = t if tqa == "bigbench" else tqa
        hhh = h if hhh == "bigbench" else hhh
    for key, path in (("evaluate.truthfulqa", tqa), ("evaluate.hhh", hhh)):
        if path and not os.path.exists(path):
            raise UserError(f"config.{key}={path}: no such file or folder")
    if not tqa and not hhh:
        raise UserError("config.evaluate: set evaluate.truthfulqa and/or evaluate.hhh (paths, or "
                        "'bigbench' for the copies `python -m dromedary_jax.fetch bigbench` fetches)")
    return tqa, hhh


def _first(records: list, n: int) -> list:
    return records if n <= 0 else records[:n]


def load_benchmarks(config) -> dict[str, list[dict]]:
    """``{"truthfulqa": records, "hhh": records}`` (absent: that benchmark is skipped), each cut
    to its ``max_*`` first questions."""
    from dromedary_jax.eval.hhh import load_hhh
    from dromedary_jax.eval.truthfulqa import load_truthfulqa

    ev = config.evaluate
    tqa, hhh = benchmark_files(config)
    out = {}
    if tqa:
        out["truthfulqa"] = _first(load_truthfulqa(tqa), int(ev.max_truthfulqa))
    if hhh:
        out["hhh"] = _first(load_hhh(hhh), int(ev.max_hhh))
    return out


def question_sets(benchmarks: dict[str, list[dict]]) -> dict[str, dict]:
    """``{benchmark: {"n", "fingerprint"}}`` as the eval CLI records them."""
    from dromedary_jax.eval.hhh import question_set as hhh_set
    from dromedary_jax.eval.truthfulqa import question_set as tqa_set

    sets = {"truthfulqa": tqa_set, "hhh": hhh_set}
    return {k: sets[k](v) for k, v in benchmarks.items()}


def model_path(config, workdir: str, name: str) -> str:
    """Where model ``name`` (one of :data:`MODELS`) comes from: ``model.checkpoint`` for
    "base" (``preset:<name>`` for a randomly initialised preset), else its stage's
    ``<workdir>/<stage>/model`` folder."""
    if name == "base":
        return config.model.checkpoint or f"preset:{config.model.preset}"
    return os.path.join(workdir, *MODEL_DIRS[name])


def check_models(config) -> list[str]:
    """``evaluate.models`` as a list, in config order; UserError naming the key when it is empty
    or names a model not in :data:`MODELS`."""
    models = list(config.evaluate.models)
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise UserError(f"config.evaluate.models={models}: use some of {list(MODELS)}")
    return models


def sample_prompts(config) -> tuple[list[str], list[str]]:
    """(questions, prompts): the first ``evaluate.num_samples`` red-teaming seed questions under
    the stage-4 distillation meta-prompt (what the fine-tuned models were trained on)."""
    n = int(config.evaluate.num_samples)
    if n <= 0:
        return [], []
    questions = [q["question"] for q in D.load_red_team_seeds(config.self_instruct.red_team_seeds)[:n]]
    template = meta_template(config.verbose_clone.distill_template,
                             "verbose_clone.distill_template", D.load_assistant(config.data))
    return questions, [template.replace("{prompt}", q) for q in questions]


def evaluate_model(model, tokenizer, benchmarks: dict, config, progress: bool = False) -> dict:
    """Scores and sample answers of one model (the result file's content, without name/path)."""
    from dromedary_jax.eval.hhh import aggregate as hhh_aggregate, score_hhh
    from dromedary_jax.eval.truthfulqa import aggregate as tqa_aggregate, score_truthfulqa
    from dromedary_jax.sampling.api import generate_text

    ev = config.evaluate
    kw = dict(progress=progress)
    if ev.batch_tokens > 0:
        kw["batch_tokens"] = int(ev.batch_tokens)
    out = {}
    sets = question_sets(benchmarks)
    if "truthfulqa" in benchmarks:
        res = tqa_aggregate(score_truthfulqa(model, tokenizer, benchmarks["truthfulqa"], **kw))
        out["truthfulqa"] = {**res, **sets["truthfulqa"]}
    if "hhh" in benchmarks:
        res = hhh_aggregate(score_hhh(model, tokenizer, benchmarks["hhh"], **kw))
        out["hhh"] = {**res, **sets["hhh"]}
    questions, prompts = sample_prompts(config)
    answers = generate_text(model, tokenizer, prompts, max_new_tokens=int(ev.sample_max_new_tokens),
                            stop=("\nUser:",), progress=False) if prompts else []
    out["samples"] = [{"question": q, "answer": a.strip()} for q, a in zip(questions, answers)]
    return out


def read_results(workdir: str) -> dict[str, dict]:
    """The result files written so far, by model name (in :data:`MODELS` order)."""
    out = {}
    for name in MODELS:
        p = os.path.join(workdir, STAGE, f"{name}.json")
        if os.path.isfile(p):
            out[name] = read_json(p)
    return out


def score_table(results: dict[str, dict]) -> dict[str, dict]:
    """``{model: {"mc1", "mc2", "hhh", "harmless", ...}}`` from :func:`read_results`."""
    table = {}
    for name, r in results.items():
        row = {}
        if "truthfulqa" in r:
            row.update(mc1=r["truthfulqa"]["mc1"], mc2=r["truthfulqa"]["mc2"])
        if "hhh" in r:
            row["hhh"] = r["hhh"]["overall"]
            row.update({k: v for k, v in r["hhh"].items()
                        if k not in ("overall", "n", "fingerprint")})
        table[name] = row
    return table


class Evaluate:
    """Stage 5 (see the module docstring) as a :class:`~dromedary_jax.pipeline.stage.Stage`."""

    name = STAGE

    def default_on(self, config) -> bool:
        """Only when the config names a benchmark (``evaluate.truthfulqa`` / ``evaluate.hhh``)."""
        return bool(config.evaluate.truthfulqa or config.evaluate.hhh)

    def requires(self, config) -> tuple[str, ...]:
        """The stages whose models ``evaluate.models`` names (base needs none)."""
        return tuple(MODEL_DIRS[m][0] for m in check_models(config) if m in MODEL_DIRS)

    def check(self, config, workdir: str) -> None:
        """Known model names, benchmark files there and well-formed, the sample prompts."""
        check_models(config)
        load_benchmarks(config)
        sample_prompts(config)

    def read_inputs(self, config, workdir: str) -> dict:
        """{"models": names, "benchmarks": {name: records}}; UserError for the scripted fake."""
        if model_kind(config.model) == "scripted":
            raise UserError("stage evaluate scores language models; config.model.kind='scripted' has "
                            "none (drop evaluate from --stages)")
        return {"models": check_models(config), "benchmarks": load_benchmarks(config)}

    def fingerprint(self, config, inputs: dict, upstream) -> dict:
        """This section (batch size left out), the evaluated stages' hashes, the base model,
        the question sets' fingerprints."""
        ev = strip_non_semantic(config.evaluate.to_dict())
        ev.pop("batch_tokens", None)
        return {"stage": STAGE, "evaluate": ev,
                "inputs": {name: m["config_hash"] for name, m in upstream.items()},
                "model": config.model.checkpoint or config.model.preset,
                "questions": {k: s["fingerprint"] for k, s in question_sets(inputs["benchmarks"]).items()}}

    def run(self, ctx: StageContext, inputs: dict) -> StageResult:
        """Score each model in turn (one in memory at a time; a scored one is skipped on resume)."""
        import jax

        config, stage, workdir, res = ctx.config, ctx.dir, ctx.workdir, ctx.resources
        models, benchmarks = inputs["models"], inputs["benchmarks"]
        lead = jax.process_index() == 0
        for name in models:
            out_path = stage.file(f"{name}.json")
            if os.path.isfile(out_path):
                continue  # evaluated before a kill
            if name == "base":
                model, tokenizer = res.model_and_tokenizer
            else:
                tokenizer = res.tokenizer
                model = load_run_model(config.model, model_path(config, workdir, name))
            print(f"[{STAGE}] {name}: scoring "
                  + ", ".join(f"{k} ({len(v)} questions)" for k, v in benchmarks.items()), flush=True)
            result = evaluate_model(model, tokenizer, benchmarks, config, progress=lead)
            del model
            gc.collect()
            if stage.hosts.is_main:
                write_json_atomic(out_path, {"model": name, "path": model_path(config, workdir, name),
                                             **result})
            stage.hosts.barrier(f"{STAGE}-{name}-written")
        return StageResult(score_table(read_results(workdir)),
                           {name: stage.file(f"{name}.json") for name in models})
