"""Several encoders on one labelled set: one table (report.md, comparison.json) and one bar
chart, so a lab can choose the model that works on its own images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from histosearch.fileio import atomic_path

COMPARISON_FIGURE = "comparison.png"


def compared_metrics(k: int) -> tuple[str, ...]:
    """The figures the comparison table and chart show."""
    return (f"mMV@{k}", f"mAP@{k}", "eta_tot", "linear probe balanced accuracy")


@dataclass
class EncoderResult:
    """One encoder's row: its name, weights, dimension, patch metrics and report folder."""

    encoder: str
    fingerprint: str
    dim: int
    metrics: dict[str, object]
    report: str


def next_run_folder(out: Path, label: str) -> Path:
    """A new numbered folder `out/NNN-label` (runs into the same `--out` never overwrite)."""
    slug = "".join(c if c.isalnum() or c in "-_.+" else "-" for c in label)[:80]
    taken = [int(p.name[:3]) for p in out.glob("[0-9][0-9][0-9]-*") if p.name[:3].isdigit()]
    return out / f"{max(taken, default=0) + 1:03d}-{slug}"


def write_comparison(
    run: Path, settings: dict[str, object], results: list[EncoderResult], k: int
) -> list[str]:
    """comparison.json, report.md and the bar chart of `results` in `run`; the files written."""
    columns = compared_metrics(k)
    payload = {
        "settings": settings,
        "metrics": list(columns),
        "encoders": [vars(r) for r in results],
    }
    with atomic_path(run / "comparison.json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    lines = [f"# Encoders compared on `{settings['source']}`", ""]
    lines += [f"- {key}: `{value}`" for key, value in settings.items()]
    lines += ["", "| encoder | weights | dim | " + " | ".join(columns) + " | report |"]
    lines += ["|---" * (len(columns) + 4) + "|"]
    for r in results:
        values = " | ".join(f"{float(r.metrics[c]):.4f}" for c in columns)
        lines.append(
            f"| {r.encoder} | {r.fingerprint} | {r.dim} | {values} | [{r.report}]({r.report}) |"
        )
    lines += ["", f"![{COMPARISON_FIGURE}]({COMPARISON_FIGURE})", ""]
    with atomic_path(run / "report.md") as tmp:
        tmp.write_text("\n".join(lines))
    save_comparison_plot(results, columns, run / COMPARISON_FIGURE, str(settings["source"]))
    return ["comparison.json", "report.md", COMPARISON_FIGURE]


def save_comparison_plot(
    results: list[EncoderResult], columns: tuple[str, ...], path: Path, source: str
) -> None:
    """Grouped bars: one group per metric, one bar per encoder, values written on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = 0.8 / len(results)
    figure, axis = plt.subplots(figsize=(2.2 + 2.2 * len(columns), 4.6))
    for index, result in enumerate(results):
        values = [float(result.metrics[c]) for c in columns]
        x = np.arange(len(columns)) + (index - (len(results) - 1) / 2) * width
        bars = axis.bar(x, values, width, label=result.encoder)
        axis.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    axis.set_xticks(np.arange(len(columns)), columns)
    axis.set_ylim(0, 1.08)
    axis.set_ylabel("score")
    axis.set_title(f"Encoders on {Path(source).name}")
    axis.legend(
        fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(len(results), 4)
    )
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
