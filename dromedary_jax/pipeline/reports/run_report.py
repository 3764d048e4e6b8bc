"""The run report: ``<workdir>/report.md`` (written by the runner after the stages) with each
stage's status and counts, links to the funnels, each stage's wall time and peak RSS, the
evaluation table (``reports/eval_table.py``), the training curves of stages 3 and 4
(``training_curves.png``) and sample answers of the base and the final model to the same
questions under the same short meta-prompt (before/after alignment)."""
from __future__ import annotations

import os

from dromedary_jax.jsonl import read_log, write_text_atomic
from dromedary_jax.pipeline.reports.funnel import save_figure
from dromedary_jax.pipeline import data_files as D
from dromedary_jax.pipeline.finetune import meta_template
from dromedary_jax.pipeline.records import stage_done

STAGES = ("self_instruct", "self_align", "engrave", "verbose_clone", "evaluate")
TRAINED = ("engrave", "verbose_clone")


def _metrics(workdir: str, stage: str) -> list[dict]:
    """A stage's training metrics (a line cut short by a kill is skipped; any other bad line is
    a UserError naming the file and line)."""
    return read_log(os.path.join(workdir, stage, "train", "metrics.jsonl"))


def plot_curves(workdir: str, out_png: str) -> bool:
    """Plot the training ``loss`` and ``eval_loss`` against step of stages 3 and 4 (from each
    ``<stage>/train/metrics.jsonl``), one panel per stage, into ``out_png``; False (nothing
    written) when neither stage has metrics. UserError for a corrupt metrics line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {s: _metrics(workdir, s) for s in TRAINED}
    if not any(series.values()):
        return False
    fig, axes = plt.subplots(1, len(TRAINED), figsize=(10, 3.5))
    for ax, (stage, rows) in zip(axes, series.items()):
        for key, style in (("loss", "-"), ("eval_loss", "o--")):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if ax.has_data():
            ax.legend()
    save_figure(fig, out_png)
    return True


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in sorted(v.items())) or "-"
    return str(v)


def sample_answers(config, workdir: str, res) -> list[tuple[str, str, str]]:
    """(question, base answer, final answer) for a few red-teaming seed questions (both models'
    weights held as sampling holds them: ``resources.sampling_param_dtype``)."""
    from dromedary_jax.pipeline.resources import model_kind, sampling_param_dtype

    n = int(config.report.num_samples)
    final_dir = os.path.join(workdir, "verbose_clone", "model")
    if n <= 0 or model_kind(config.model) == "scripted" or not os.path.isdir(final_dir):
        return []
    import jax

    if jax.process_count() > 1:  # only process 0 writes the report; sampling needs every host
        return []
    from dromedary_jax.checkpoint import load_model
    from dromedary_jax.sampling.api import generate_text

    questions = D.load_red_team_seeds(config.self_instruct.red_team_seeds)[:n]
    assistant = D.load_assistant(config.data)
    template = meta_template(config.verbose_clone.distill_template,
                             "verbose_clone.distill_template", assistant)
    prompts = [template.replace("{prompt}", q["question"]) for q in questions]
    base, tok = res.model_and_tokenizer
    final = load_model(final_dir, dtype=config.model.dtype,
                          param_dtype=sampling_param_dtype(config.model, final_dir))
    kw = dict(max_new_tokens=int(config.report.max_new_tokens), stop=("\nUser:",), progress=False)
    before = generate_text(base, tok, prompts, **kw)
    after = generate_text(final, tok, prompts, **kw)
    return [(q["question"], b.strip(), a.strip()) for q, b, a in zip(questions, before, after)]


def resource_lines(workdir: str) -> list[str]:
    """A table of each stage's wall time and peak RSS (``<stage>/run_stats.json``, written by
    the runner for the run that did the stage's work)."""
    from dromedary_jax.jsonl import read_json

    rows = []
    for stage in STAGES:
        p = os.path.join(workdir, stage, "run_stats.json")
        if os.path.isfile(p):
            st = read_json(p)
            peak = st.get("peak_rss_bytes")
            rows.append(f"| {stage} | {st.get('wall_s', 0):.0f} | "
                        f"{'-' if peak is None else f'{peak / 2**30:.2f}'} |")
    if not rows:
        return []
    return ["", "## Time and memory", "",
            "Each stage's wall time and peak resident memory (its own peak: the high-water mark "
            "is reset when it starts), from the run that did its work.", "",
            "| stage | wall (s) | peak RSS (GiB) |", "|---|---:|---:|"] + rows


def write_report(config, workdir: str, res) -> str:
    """Write ``report.md`` (and ``training_curves.png``); returns the report path."""
    lines = [f"# SELF-ALIGN run report: {os.path.abspath(workdir)}", ""]
    if config.model.get("kind") == "scripted":
        lines += ["_Generations in this run come from the scripted fake model (config.model.kind="
                  "'scripted'), not from a language model._", ""]
    if config.get("notice"):
        lines += [f"_Note: {config.notice}_", ""]
    lines += ["## Stages", "", "| stage | status | numbers |", "|---|---|---|"]
    for stage in STAGES:
        m = stage_done(workdir, stage)
        counts = m.get("counts", {}) if m else {}
        shown = {k: v for k, v in counts.items() if k not in ("citations", "cleaning")}
        lines.append(f"| {stage} | {'done' if m else 'not run'} | "
                     f"{'; '.join(f'{k}: {_fmt(v)}' for k, v in shown.items()) or '-'} |")
    lines.append("")
    for stage in STAGES:
        if os.path.exists(os.path.join(workdir, stage, "funnel.md")):
            lines.append(f"- {stage} funnel: [{stage}/funnel.md]({stage}/funnel.md), "
                         f"chart [{stage}/funnel.png]({stage}/funnel.png)")
    lines += resource_lines(workdir)
    from dromedary_jax.pipeline.reports.eval_table import evaluation_section

    evaluation = evaluation_section(workdir)
    if evaluation:
        lines += [""] + evaluation
    png = os.path.join(workdir, "training_curves.png")
    if plot_curves(workdir, png):
        lines += ["", "## Training curves", "", "![training curves](training_curves.png)"]
    samples = sample_answers(config, workdir, res)
    if samples:
        lines += ["", "## Before / after alignment", "",
                  "The same questions, the same short meta-prompt, greedy decoding: the base model "
                  "first, the final (verbose-cloned) model second.", ""]
        for q, before, after in samples:
            lines += [f"**User:** {q}", "", f"- base: {before or '(empty)'}",
                      f"- final: {after or '(empty)'}", ""]
    path = os.path.join(workdir, "report.md")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
