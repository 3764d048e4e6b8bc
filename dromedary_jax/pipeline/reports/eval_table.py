"""The run report's evaluation section: base vs aligned, as the paper reports it.

Reads what stage 5 (:mod:`dromedary_jax.pipeline.stages.evaluate`) wrote and renders the score table
(TruthfulQA MC1/MC2, HHH overall and per category, one row per model), a bar chart
(``evaluation.png``) and each model's answers to the same questions side by side.
"""
from __future__ import annotations

import os

from dromedary_jax.pipeline.stages.evaluate import read_results, score_table
from dromedary_jax.pipeline.reports.funnel import save_figure

LABELS = {"base": "base", "engrave": "engraved (stage 3)", "verbose_clone": "verbose-cloned (stage 4)"}
COLUMNS = (("mc1", "TruthfulQA MC1"), ("mc2", "TruthfulQA MC2"), ("hhh", "HHH"),
           ("harmless", "harmless"), ("helpful", "helpful"), ("honest", "honest"),
           ("other", "other"))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}"


def table_lines(results: dict[str, dict]) -> list[str]:
    """The markdown score table (percentages), with the question counts under it."""
    table = score_table(results)
    cols = [(k, name) for k, name in COLUMNS if any(k in row for row in table.values())]
    lines = ["| model | " + " | ".join(name for _, name in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for model, row in table.items():
        lines.append(f"| {LABELS.get(model, model)} | "
                     + " | ".join(_pct(row.get(k)) for k, _ in cols) + " |")
    counts = []
    first = next(iter(results.values()), {})
    if "truthfulqa" in first:
        counts.append(f"TruthfulQA: {first['truthfulqa']['n']} questions (MC1/MC2 as "
                      "lm-evaluation-harness's truthfulqa_mc1/mc2)")
    if "hhh" in first:
        counts.append(f"HHH: {first['hhh']['n']} examples (BIG-bench hhh_alignment, "
                      "multiple_choice_grade)")
    sets = {(r.get("truthfulqa", {}).get("fingerprint"), r.get("hhh", {}).get("fingerprint"))
            for r in results.values()}
    if len(sets) > 1:
        counts.append("WARNING: the models were scored on different question sets")
    return lines + ["", "Scores in %. " + "; ".join(counts) + "."]


def plot(results: dict[str, dict], out_png: str) -> bool:
    """A grouped bar chart of :func:`score_table` (one group per metric); False if empty."""
    table = score_table(results)
    cols = [(k, name) for k, name in COLUMNS if any(k in row for row in table.values())]
    if not table or not cols:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(table)
    x = np.arange(len(cols))
    for i, (model, row) in enumerate(table.items()):
        vals = [100 * float(row[k]) if row.get(k) is not None else 0.0 for k, _ in cols]
        ax.bar(x + (i - (len(table) - 1) / 2) * width, vals, width, label=LABELS.get(model, model))
    ax.set_xticks(x, [name for _, name in cols], rotation=15)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Base vs aligned")
    save_figure(fig, out_png)
    return True


def sample_lines(results: dict[str, dict]) -> list[str]:
    """Each question once, then every model's answer to it."""
    by_question: dict[str, list[tuple[str, str]]] = {}
    for model, r in results.items():
        for s in r.get("samples", []):
            by_question.setdefault(s["question"], []).append((model, s["answer"]))
    lines = []
    for q, answers in by_question.items():
        lines += [f"**User:** {q}", ""]
        for model, a in answers:
            text = " ".join(a.split()) or "(empty)"
            lines.append(f"- {LABELS.get(model, model)}: {text}")
        lines.append("")
    return lines


def evaluation_section(workdir: str) -> list[str]:
    """The report's markdown lines for stage 5 ([] when it has written nothing)."""
    results = read_results(workdir)
    if not results:
        return []
    lines = ["## Evaluation: base vs aligned", ""] + table_lines(results)
    if plot(results, os.path.join(workdir, "evaluation.png")):
        lines += ["", "![base vs aligned](evaluation.png)"]
    samples = sample_lines(results)
    if samples:
        lines += ["", "### The same questions, every model", "",
                  "Greedy decoding under the stage-4 distillation meta-prompt.", ""] + samples
    return lines
