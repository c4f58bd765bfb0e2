"""The report writer: results.md, results.csv and one PNG chart per benchmark family, never over old ones.
matplotlib is imported only when a chart is drawn, so `import benchmarks.report` stays fast."""
from __future__ import annotations

import csv
import math
import numbers
from pathlib import Path
from typing import Any

ID_COLUMNS = ("method", "run", "seed")
# `label` names a chart bar (sweeps set it), `chance` holds the metrics' chance levels for the charts: no table columns
NOT_METRICS = {*ID_COLUMNS, "label", "chance"}


def _fmt(value: Any) -> str:
    """A table cell: non-integer numbers with 3 decimals, missing values (None, NaN) as '–', '|' escaped."""
    if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
        return "–"
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{float(value):.3f}"
    return str(value).replace("|", r"\|")


def labelled_notes(sources: list[tuple[str, list[str]]]) -> list[str]:
    """The notes of several sources (runs, sweep cells), each once: a note every source has as it is, one only some
    have (a run's own figures, a method's own caveat) followed by the labels of those that have it."""
    holders: dict[str, list[str]] = {}
    for label, notes in sources:
        for n in notes:
            if label not in holders.setdefault(n, []):
                holders[n].append(label)
    return [n if len(labels) == len(sources) else f"{n} [{'; '.join(labels)}]" for n, labels in holders.items()]


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of `columns` (in that order), one line per row, numbers with 3 decimals, missing as '–'."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, numbers.Real) and math.isnan(value))


def y_limits(values: list[float]) -> tuple[float, float]:
    """A chart's y range: 0 to 1.05 (headroom for the value labels of bars at 1.0), lower where a value is
    negative (a score margin can be)."""
    low = min([0.0, *values])
    return (low - 0.05 if low < 0 else 0.0), 1.05


def _chart(rows: list[dict[str, Any]], metrics: list[str], family: str, path: Path,
           errors: list[dict[str, float]] | None = None) -> None:
    """A grouped bar chart into a new file `path`: one group per metric, one bar per row (a missing value draws
    no bar), y from 0 to 1 (lower where a value is negative, as a score margin can be); `errors` (one dict per row)
    draws error bars."""
    from matplotlib.figure import Figure  # renders with Agg; no pyplot, so no global backend state is touched

    fig = Figure(figsize=(max(5.0, 1.6 * len(metrics) + 3), 4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(rows))
    labelled = len(rows) * len(metrics) <= 24  # value labels only while they stay readable
    for i, row in enumerate(rows):
        xs = [m + (i - (len(rows) - 1) / 2) * width for m in range(len(metrics))]
        ys = [math.nan if _missing(row.get(m)) else float(row[m]) for m in metrics]
        err = [errors[i].get(m, 0.0) for m in metrics] if errors else None
        label = row.get("label") or f"{row.get('method', '?')} ({Path(str(row.get('run', ''))).name})"
        bars = ax.bar(xs, ys, width, yerr=err, capsize=3 if err else 0, label=label)
        if labelled:
            ax.bar_label(bars, labels=["" if math.isnan(y) else f"{y:.2f}" for y in ys], fontsize=7)
    chance = {m: v for r in rows for m, v in (r.get("chance") or {}).items()}
    for k, m in enumerate(metrics):  # a dashed line across a metric's bars at its chance level
        if m in chance:
            ax.hlines(chance[m], k - 0.45, k + 0.45, colors="grey", linestyles="dashed", linewidth=1, zorder=3,
                      label="chance" if not any(n in chance for n in metrics[:k]) else None)
    ax.set_xticks(range(len(metrics)), [m.split("/")[-1] for m in metrics])
    low, high = y_limits([float(r[m]) for r in rows for m in metrics if not _missing(r.get(m))])
    ax.set_ylim(low, high)
    ax.set_yticks([t / 5 for t in range(math.ceil(low * 5), 6)])  # none below low: a tick would widen the axis
    ax.set_ylabel("value")  # accuracies and recalls, or a diagnosis's cosines and margins: the ticks name them
    ax.set_title(family)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, never over a bar
    fig.tight_layout()
    with open(path, "xb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")


def _columns(rows: list[dict[str, Any]], families: dict[str, list[str]]) -> list[str]:
    """method, run (and seed when any row has one), the families' metrics in order, then any other row keys."""
    ids = [c for c in ID_COLUMNS if c in ("method", "run") or any(c in r for r in rows)]
    metrics = list(dict.fromkeys(m for ms in families.values() for m in ms))
    extra = [k for r in rows for k in r if k not in NOT_METRICS and k not in metrics]
    return ids + metrics + list(dict.fromkeys(extra))


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, *, families: dict[str, list[str]],
                 title: str = "clipcomp results", notes: list[str] | None = None) -> dict[str, Path]:
    """Write results.md, results.csv and `<family>.png` into out_dir and return their paths ("md", "csv", and one
    key per family); a folder that already holds any of them is refused, so no result is ever overwritten."""
    if not rows:
        raise ValueError("no rows to report")
    for family in families:
        if family in ("md", "csv") or not family or family in (".", "..") or "/" in family or "\\" in family:
            raise ValueError(f"family name {family!r} cannot name a chart file (or clashes with 'md'/'csv')")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "results.md", "csv": out / "results.csv"} | {f: out / f"{f}.png" for f in families}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]}: a report is already there; results are never overwritten")
    columns = _columns(rows, families)
    text = f"# {title}\n\n{format_table(rows, columns)}\n"
    if notes:
        text += "\n" + "".join(f"- {n}\n" for n in notes)
    with open(paths["md"], "x") as f:
        f.write(text)
    with open(paths["csv"], "x", newline="") as f:  # floats are written in full (repr) precision
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    for family, metrics in families.items():
        _chart(rows, metrics, family, paths[family])
    return paths


def latex_table(rows: list[dict[str, Any]], columns: list[str], caption: str = "") -> str:
    """A booktabs LaTeX table of the same rows and columns (values already formatted as text or numbers)."""
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
               "}": r"\}", "~": r"$\sim$", "^": r"\textasciicircum{}", "±": r"$\pm$"}
    esc = lambda t: "".join(special.get(c, c) for c in str(t))  # noqa: E731
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{" + "l" * len(columns) + "}", r"\toprule",
             " & ".join(esc(c) for c in columns) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(_fmt(r.get(c))) for c in columns) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"] + ([rf"\caption{{{esc(caption)}}}"] if caption else [])
    lines += [r"\end{table}"]
    return "\n".join(lines) + "\n"


def run_curve(run: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of one logged metric over a run's whole history: a continued run keeps the metrics of its
    earlier attempts in metrics.part<k>.csv, and its own rows replace theirs from the step it continued at."""
    parts = sorted(run.glob("metrics.part*.csv"), key=lambda p: int(p.stem.removeprefix("metrics.part") or 0))
    points: dict[int, float] = {}
    for path in [*parts, run / "metrics.csv"]:
        if path.is_file():
            with open(path) as f:
                points |= {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}
    return sorted(points.items())


def curves_chart(runs: dict[str, Path], path: Path) -> None:
    """Training loss per step and held-out loss per validation, one line per run, from each run's metrics.csv;
    and where the runs logged them, the validation images' relation and attribute swap accuracies (chance 0.5)."""
    from matplotlib.figure import Figure

    swap_keys = ("val/relation_swap_acc", "val/attribute_swap_acc")
    curves = {label: {k: run_curve(Path(run), k) for k in ("train/loss", "val/loss", *swap_keys)}
              for label, run in runs.items()}
    swaps = any(c[k] for c in curves.values() for k in swap_keys)
    fig = Figure(figsize=(15 if swaps else 10, 4))
    ax_train, ax_val, *ax_swap = fig.subplots(1, 3 if swaps else 2)
    for i, (label, c) in enumerate(curves.items()):
        colour = f"C{i % 10}"  # one colour per run in every panel
        if c["train/loss"]:
            ax_train.plot(*zip(*c["train/loss"]), label=label, linewidth=1, color=colour)
        if c["val/loss"]:
            ax_val.plot(*zip(*c["val/loss"]), marker="o", label=label, color=colour)
        for key, style in zip(swap_keys, ("-", ":")):
            if c[key]:  # any run's swap curve means `swaps`: the panel exists
                ax_swap[0].plot(*zip(*c[key]), style, marker=".", color=colour)
    ax_train.set(title="training loss", xlabel="step")
    ax_val.set(title="validation loss (contrastive, held out)", xlabel="step")
    ax_train.legend(fontsize=6, loc="upper right")
    if swaps:
        ax_swap[0].axhline(0.5, color="grey", linewidth=0.5)
        ax_swap[0].set(title="validation: caption above its swap\n(relation -, attribute :; chance 0.5)", xlabel="step", ylim=(0, 1))
    fig.tight_layout()
    with open(path, "xb") as f:  # a new file: a chart is never written over another
        fig.savefig(f, format="png", dpi=120)
