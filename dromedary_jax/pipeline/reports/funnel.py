"""Funnel reports: generated -> kept after each filter, principle citation counts, as a Markdown
table (``funnel.md``) and a bar chart (``funnel.png``, matplotlib Agg backend)."""
from __future__ import annotations

import io
import os
from collections import Counter
from typing import Iterable, Mapping, Sequence

from dromedary_jax.jsonl import write_bytes_atomic, write_text_atomic

Steps = list[tuple[str, int]]


def funnel_steps(first_label: str, total: int, reasons: Iterable[str | None], order: Sequence[str]) -> Steps:
    """[(first_label, total), ("- <reason>", remaining), ...]: one step per filter reason in
    ``order``, then any other reason found (sorted), each with the count left after dropping
    that reason's items; ``reasons`` holds one filter reason (or None when kept) per item."""
    counts = Counter(r for r in reasons if r is not None)
    unknown = set(counts) - set(order)
    order = list(order) + sorted(unknown)
    steps, left = [(first_label, total)], total
    for reason in order:
        left -= counts.get(reason, 0)
        steps.append((f"- {reason}", left))
    return steps


def _table(steps: Steps) -> list[str]:
    first = steps[0][1] if steps else 0
    out = ["| step | count | % of first |", "|---|---:|---:|"]
    for label, n in steps:
        pct = f"{100.0 * n / first:.1f}%" if first else "-"
        out.append(f"| {label} | {n} | {pct} |")
    return out


def markdown(title: str, sections: Sequence[tuple[str, Steps]],
             citations: Mapping[str, int] | None = None, notes: Sequence[str] = ()) -> str:
    """The text of ``funnel.md``: a ``# Funnel: <title>`` heading, each note as a paragraph, one
    table per (name, steps) section (step, count, % of the section's first count) and, when
    ``citations`` (principle key -> count) is given, a citation table, most cited first."""
    lines = [f"# Funnel: {title}", ""]
    for note in notes:
        lines += [note, ""]
    for name, steps in sections:
        lines += [f"## {name}", "", "Each '- reason' row is what is left after dropping that filter's rejects.", ""]
        lines += _table(steps) + [""]
    if citations is not None:
        lines += ["## Principle citations (kept and dropped records)", "", "| principle | count |", "|---|---:|"]
        for k, n in sorted(citations.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"| {k} | {n} |")
        lines.append("")
    return "\n".join(lines)


def save_figure(fig, path: str, dpi: int = 100) -> None:
    """A matplotlib figure as PNG at ``path`` (atomically), then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def bar_chart(path: str, title: str, sections: Sequence[tuple[str, Steps]],
              citations: Mapping[str, int] | None = None) -> None:
    """Write ``funnel.png`` to ``path`` (atomically): one horizontal bar panel per section (its
    steps top to bottom), plus a principle-citation panel when ``citations`` is non-empty;
    rendered with matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = list(sections) + ([("principle citations", sorted(citations.items(), key=lambda kv: -kv[1]))]
                               if citations else [])
    if not panels:
        panels = [("empty", [("nothing", 0)])]
    heights = [max(1.5, 0.35 * len(steps) + 0.8) for _, steps in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (name, steps) in zip(axes[:, 0], panels):
        labels = [s[0] for s in steps][::-1]
        values = [s[1] for s in steps][::-1]
        ax.barh(range(len(values)), values, color="#4C72B0")
        ax.set_yticks(range(len(values)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_title(name, fontsize=10)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v}", va="center", fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path, dpi=80)


def write_funnel(stage_dir: str, title: str, sections: Sequence[tuple[str, Steps]],
                 citations: Mapping[str, int] | None = None, notes: Sequence[str] = ()) -> dict[str, str]:
    """Write ``funnel.md`` and ``funnel.png`` into ``stage_dir``; returns their paths."""
    md_path = os.path.join(stage_dir, "funnel.md")
    png_path = os.path.join(stage_dir, "funnel.png")
    write_text_atomic(md_path, markdown(title, sections, citations, notes))
    bar_chart(png_path, title, sections, citations)
    return {"funnel_md": md_path, "funnel_png": png_path}
