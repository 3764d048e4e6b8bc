"""Compare evaluation results across checkpoints (base, engraved, final, each ablation): one
Markdown table and one PNG bar chart from the result JSON files ``python -m dromedary_jax.eval``
writes.

A result file is ``{"task", "variant"?, "label", "model", "n"?, "fingerprint"?, "metrics":
{name: float|null}, ...}``. Rows are checkpoints (``label``, else the model path's last part);
columns are ``task/metric`` (``hhh[ab]/...`` for the A/B variant). Values are shown as
percentages.

Results of one task must have been scored on the same questions: the question count ``n`` and
``fingerprint`` (a hash of the question set, :func:`dromedary_jax.eval.data.fingerprint`) that
the eval CLI records must agree (a file without them agrees only with others without them).
Otherwise :func:`compare` refuses, naming the files, unless ``force=True``: then the table
carries a warning line and the mismatching cells are marked.
"""
from __future__ import annotations

import io
import os
from typing import Mapping, Sequence

from dromedary_jax.errors import UserError
from dromedary_jax.output_paths import check_out_folder
from dromedary_jax.jsonl import read_json, write_bytes_atomic, write_text_atomic

OUT_FILES = ("comparison.md", "comparison.png")


def load_result(path: str) -> dict:
    """A result file as a dict. UserError naming ``path`` when it is missing, not JSON, lacks
    ``task`` or a ``metrics`` object, or has a metric value that is not a number or null."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: result file not found")
    res = read_json(path)
    if not isinstance(res, Mapping) or not isinstance(res.get("metrics"), Mapping) \
            or "task" not in res:
        raise UserError(f"{path}: not an eval result (needs 'task' and a 'metrics' object; "
                        f"write it with `python -m dromedary_jax.eval ... --out FILE`)")
    for metric, value in res["metrics"].items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise UserError(f"{path}: metric {metric!r} is {shown} ({type(value).__name__}); "
                            f"metric values must be numbers (or null)")
    return dict(res)


def result_label(res: Mapping, path: str = "") -> str:
    """A result's row label: its ``label``, else the last part of its ``model`` path, else the
    result file's name without extension."""
    if res.get("label"):
        return str(res["label"])
    if res.get("model"):
        return os.path.basename(os.path.normpath(str(res["model"])))
    return os.path.splitext(os.path.basename(path))[0]


def task_name(res: Mapping) -> str:
    """A result's column prefix: ``task``, or ``task[variant]`` for a variant other than the
    default ``harness`` (e.g. ``hhh[ab]``)."""
    v = res.get("variant")
    return f"{res['task']}[{v}]" if v and v != "harness" else str(res["task"])


def question_key(res: Mapping) -> tuple:
    """(n, fingerprint) of a result's question set; (None, None) for files written before
    they were recorded."""
    return (res.get("n"), res.get("fingerprint"))


def _show_key(key: tuple) -> str:
    n, fp = key
    return "unknown question set" if n is None and fp is None else f"{n} questions, {fp}"


def question_set_mismatches(results: Sequence[tuple[str, Mapping]]) -> dict[str, list]:
    """{task column name: [(path, (n, fingerprint)), ...]} for every task whose results were
    not all scored on the same question set."""
    by_task: dict[str, list] = {}
    for path, res in results:
        by_task.setdefault(task_name(res), []).append((path, question_key(res)))
    return {t: v for t, v in by_task.items() if len({k for _, k in v}) > 1}


def build_table(results: Sequence[tuple[str, Mapping]]) -> tuple[list[str], list[str], dict]:
    """(row labels, column names, {(row, col): value}) in first-seen order."""
    rows, cols, cells = [], [], {}
    for path, res in results:
        row = result_label(res, path)
        if row not in rows:
            rows.append(row)
        for metric, value in res["metrics"].items():
            col = f"{task_name(res)}/{metric}"
            if col not in cols:
                cols.append(col)
            cells[(row, col)] = value
    return rows, cols, cells


def markdown_table(rows, cols, cells, warnings: Sequence[str] = ()) -> str:
    """The Markdown table (one row per checkpoint, one column per ``task/metric``; values as
    percentages with one decimal, ``–`` for a missing / null cell), after a bold line per
    warning. ``rows, cols, cells`` as :func:`build_table` returns them."""
    fmt = lambda v: "–" if v is None else f"{100 * float(v):.1f}"  # noqa: E731
    lines = [f"**WARNING: {w}**\n" for w in warnings]
    lines += ["| checkpoint | " + " | ".join(cols) + " |",
              "|---|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(fmt(cells.get((r, c))) for c in cols) + " |")
    return "\n".join(lines) + "\n\nValues are percentages (MC2: normalised probability mass).\n"


def bar_chart(rows, cols, cells, path: str) -> None:
    """Write a grouped bar chart PNG (120 dpi, matplotlib Agg) to ``path``, atomically: one
    group per column, one bar per row, in percent (0-100; a null cell is drawn as 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(cols))
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cols) * max(1, len(rows)) ** 0.5), 4.0))
    for i, r in enumerate(rows):
        vals = [cells.get((r, c)) for c in cols]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width,
               [100 * v if v is not None else 0.0 for v in vals], width, label=r)
    ax.set_xticks(x)
    ax.set_xticklabels(cols, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Evaluation across checkpoints")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def compare(result_paths: Sequence[str], out_dir: str, force: bool = False) -> dict[str, str]:
    """Write ``comparison.md`` and ``comparison.png`` into ``out_dir``; returns their paths.

    Refuses (UserError) results of one task scored on different question sets unless
    ``force``; then ``comparison.md`` starts with a warning naming them, and the returned dict
    has ``"warnings"``."""
    if not result_paths:
        raise UserError("compare needs at least one result JSON file")
    check_out_folder(out_dir, "--out", OUT_FILES)
    results = [(p, load_result(p)) for p in result_paths]
    warnings = []
    for task, items in question_set_mismatches(results).items():
        sets = "; ".join(f"{os.path.basename(p)}: {_show_key(k)}" for p, k in items)
        if not force:
            raise UserError(f"{task} results were scored on different question sets ({sets}); "
                            f"score them on the same data, or pass --force to compare anyway")
        warnings.append(f"{task} results were scored on different question sets ({sets}); "
                        f"their numbers are not comparable")
    rows, cols, cells = build_table(results)
    os.makedirs(out_dir, exist_ok=True)
    md, png = (os.path.join(out_dir, name) for name in OUT_FILES)
    write_text_atomic(md, markdown_table(rows, cols, cells, warnings))
    bar_chart(rows, cols, cells, png)
    out = {"markdown": md, "png": png}
    if warnings:
        out["warnings"] = warnings
    return out
