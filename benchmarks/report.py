"""The report writer: results.md, results.csv and one PNG chart per benchmark family, never over old ones."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

ID_COLUMNS = ("method", "run", "seed")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table, numbers with 3 decimals, missing values as '–'."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _chart(rows: list[dict[str, Any]], metrics: list[str], family: str, path: Path,
           errors: list[dict[str, float]] | None = None) -> None:
    """A grouped bar chart: one group per metric, one bar per row; `errors` (per row) draws error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(metrics) + 2), 4))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs = [m + (i - (len(rows) - 1) / 2) * width for m in range(len(metrics))]
        ys = [row.get(m) if row.get(m) is not None else 0.0 for m in metrics]
        err = [errors[i].get(m, 0.0) for m in metrics] if errors else None
        label = row.get("label") or f"{row['method']} ({Path(str(row.get('run', ''))).name})"
        bars = ax.bar(xs, ys, width, yerr=err, capsize=3 if err else 0, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(metrics)), [m.split("/")[-1] for m in metrics])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy / recall")
    ax.set_title(family)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, *, families: dict[str, list[str]],
                 title: str = "clipcomp results", notes: list[str] | None = None) -> dict[str, Path]:
    """Write results.md, results.csv and `<family>.png` into out_dir; an existing report is never replaced."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / "results.md", out / "results.csv"
    if md.exists() or csv_path.exists():
        raise FileExistsError(f"{md}: a report is already there; results are never overwritten")
    metrics = [m for ms in families.values() for m in ms]
    ids = [c for c in ID_COLUMNS if any(c in r for r in rows)]
    columns = ids + metrics
    text = f"# {title}\n\n{format_table(rows, columns)}\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    with open(md, "x") as f:
        f.write(text)
    with open(csv_path, "x", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths = {"md": md, "csv": csv_path}
    for family, ms in families.items():
        paths[family] = out / f"{family}.png"
        _chart(rows, ms, family, paths[family])
    return paths


def latex_table(rows: list[dict[str, Any]], columns: list[str], caption: str = "") -> str:
    """A booktabs LaTeX table of the same rows and columns (values already formatted as text or numbers)."""
    esc = lambda t: str(t).replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$")  # noqa: E731
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{" + "l" * len(columns) + "}", r"\toprule",
             " & ".join(esc(c) for c in columns) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(_fmt(r.get(c))) for c in columns) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"] + ([rf"\caption{{{esc(caption)}}}"] if caption else []) + [r"\end{table}"]
    return "\n".join(lines) + "\n"


def curves_chart(runs: dict[str, Path], path: Path) -> None:
    """Training loss per step and held-out loss per validation, one line per run, from each run's metrics.csv."""
    plt = _pyplot()
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    for label, run in runs.items():
        with open(Path(run) / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        train = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
        val = [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]
        if train:
            ax_train.plot(*zip(*train), label=label, linewidth=1)
        if val:
            ax_val.plot(*zip(*val), marker="o", label=label)
    ax_train.set(title="training loss", xlabel="step")
    ax_val.set(title="validation loss (contrastive, held out)", xlabel="step")
    ax_train.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
