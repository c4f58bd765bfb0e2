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


def _chart(rows: list[dict[str, Any]], metrics: list[str], family: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(metrics) + 2), 4))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs = [m + (i - (len(rows) - 1) / 2) * width for m in range(len(metrics))]
        ys = [row.get(m) if row.get(m) is not None else 0.0 for m in metrics]
        bars = ax.bar(xs, ys, width, label=f"{row['method']} ({Path(str(row.get('run', ''))).name})")
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
