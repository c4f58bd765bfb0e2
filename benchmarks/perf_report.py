"""The figures of `make perf` side by side: ratios to the reference rows, the goals, the Markdown table."""
from __future__ import annotations

from typing import Any


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items()) and "samples_per_sec" in r), None)


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each measured row with `vs_openclip` and `vs_bare` (its samples/s over theirs, same mode) and, for a
    method, `step_vs_clip` (its step time over vanilla CLIP's, same inputs and mode)."""
    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if k not in ("vs_openclip", "vs_bare", "step_vs_clip")}
        if "samples_per_sec" in row:
            for key, ref in (("vs_openclip", _find(rows, kind="openclip", mode=row["mode"])),
                             ("vs_bare", _find(rows, kind="bare", mode=row["mode"]))):
                if ref is not None:
                    row[key] = row["samples_per_sec"] / ref["samples_per_sec"]
            clip = _find(rows, kind="lab", method="clip", inputs=row.get("inputs"), mode=row["mode"])
            if row["kind"] == "lab" and clip is not None:
                row["step_vs_clip"] = row["step_time_s"] / clip["step_time_s"]
        out.append(row)
    return out


def goals(rows: list[dict[str, Any]], targets: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals checked against the measured ratios (reported, never asserted):
    `clip_vs_openclip` (vanilla CLIP with the data path, at least this times open_clip's trainer, per mode),
    `clip_vs_bare` (vanilla CLIP with resident inputs, at least this times the bare step, per mode),
    `step_time_vs_clip` ({method: at most this times vanilla CLIP's step time, resident inputs, per mode})."""
    checks = []

    def check(text: str, row: dict[str, Any] | None, key: str, target: float, at_least: bool) -> None:
        value = row.get(key) if row else None
        met = None if value is None else (value >= target if at_least else value <= target)
        checks.append({"goal": text, "row": row["name"] if row else None, "measured": value, "target": target,
                       "met": met})

    for mode in ("eager", "compiled"):
        if "clip_vs_openclip" in targets:
            t = targets["clip_vs_openclip"]
            check(f"clip (data path, {mode}) >= {t}x open_clip trainer ({mode})",
                  _find(rows, kind="lab", method="clip", inputs="data", mode=mode), "vs_openclip", t, True)
        if "clip_vs_bare" in targets:
            t = targets["clip_vs_bare"]
            check(f"clip (resident, {mode}) >= {t}x bare step ({mode})",
                  _find(rows, kind="lab", method="clip", inputs="resident", mode=mode), "vs_bare", t, True)
        for method, t in targets.get("step_time_vs_clip", {}).items():
            check(f"{method} step (resident, {mode}) <= {t}x clip's",
                  _find(rows, kind="lab", method=method, inputs="resident", mode=mode), "step_vs_clip", t, False)
    return [c for c in checks if c["row"] is not None]


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _memory(row: dict[str, Any]) -> str:
    b = row.get("peak_memory_bytes")
    if b is None:
        return ""
    kind = "GPU" if row.get("memory_kind") == "GPU allocated" else "RSS"
    return f"{b / 2**30:.2f} GiB {kind}"


def _both(row: dict[str, Any]) -> str:
    """A `data` row's two rates, the trainer's and its loader's alone (samples/s is the smaller), the smaller marked."""
    trainer, loader = row.get("trainer_samples_per_sec"), row.get("loader_samples_per_sec")
    if trainer is None or loader is None:
        return ""
    return f"{trainer:.0f} · **{loader:.0f}**" if loader < trainer else f"{trainer:.0f} · {loader:.0f}"


def code_line(spec: dict[str, Any], machine: dict[str, Any]) -> str:
    """Which code was measured: the git commit where the run found a checkout (`machine.commit`, with " (dirty)"
    when tracked files differ from it), and the `commit=` given on the command line (a copy of the tree on a lent
    machine has no .git, so the caller names it)."""
    found, given = machine.get("commit"), spec.get("commit") or ""
    if found:
        head, dirty = found.split(" ")[0], found.endswith("(dirty)")
        text = f"Code: commit `{head[:10]}`" + (" with uncommitted changes to tracked files" if dirty else "") + \
            " (git, where this ran)"
        if given and not head.startswith(given.split("-")[0].split("+")[0]):
            text += f"; `commit={given}` was given"
        return text + "."
    if given:
        return f"Code: `{given}` (as given by `commit=`; no git checkout where this ran)."
    return "Code: unknown (no git checkout where this ran and no `commit=` given)."


def markdown(info: dict[str, Any]) -> str:
    """perf.md: what was measured where, the table, the goals, and the notes a reader needs."""
    spec, m = info["spec"], info["machine"]
    where = m["gpu"] or f"CPU only ({m['cpu_count']} cores{', ' + m['cpu'] if m.get('cpu') else ''})"
    lines = [f"# Training throughput ({spec['name']}: {where})", "", code_line(spec, m), ""]
    if spec.get("note"):
        lines += [spec["note"], ""]
    data_steps = spec.get("data_steps") or spec["steps"]
    steps = f"{spec['steps']} steps" + (f" ({data_steps} for the rows that read data)" if data_steps != spec["steps"]
                                        else "")
    lines += [f"Model `{spec['model']}`, batch {spec['batch_size']}, {steps} of which the first {spec['warmup']} are "
              f"left out; samples/s is the median over windows of {spec['log_every']} steps (the log interval) of "
              f"each window's rate, for every row; torch {m['torch']}, lightning {m['lightning']}, "
              f"open_clip {m['open_clip']}.", "",
              "| row | samples/s | trainer · loader alone | step (ms) | x open_clip trainer | x bare step "
              "| step x clip | peak memory | syncs/step | ops/step | precision | caption tokens |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in info["rows"]:
        if "samples_per_sec" not in r:
            why = r["pending"] if "pending" in r else f"not run ({r['not_run']})" if "not_run" in r else \
                f"failed: {r['error']}"
            lines.append(f"| {r['name']} | {why} |" + " |" * 10)
            continue
        syncs = r.get("syncs_per_step")
        lines.append(f"| {r['name']} | {r['samples_per_sec']:.0f} | {_both(r)} | {1000 * r['step_time_s']:.1f} | "
                     f"{_x(r.get('vs_openclip'))} | {_x(r.get('vs_bare'))} | {_x(r.get('step_vs_clip'))} | "
                     f"{_memory(r)} | {'' if syncs is None else f'{syncs:.2f}'} | {r.get('ops_per_step') or ''} | "
                     f"{r.get('precision', '')} | "
                     f"{r.get('text_tokens') or ''} |")
    if info.get("goals"):
        lines += ["", "Goals (figures, not tests):", ""]
        for g in info["goals"]:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
            lines.append(f"- {g['goal']}: {_x(g['measured']) or '-'} ({verdict})")
    stand_ins = sorted({n for r in info["rows"] for n in r.get("stand_ins", [])})
    lines += ["", "Notes:", "",
              "- `data`: the method's DataModule feeds the step (images made and transformed in DataLoader workers, "
              "pinned memory); `resident`: one batch from that DataModule kept on the device and replayed. The bare "
              "step runs on vanilla CLIP's resident batch, so the two do the same work.",
              "- `data` rows: `trainer · loader alone` are the rate of training with the loader and the rate of the "
              "loader iterated alone (no training; the batches its workers make ahead, num_workers x "
              "prefetch_factor, left out, the rest timed), and samples/s is the smaller (in bold where it is the "
              "loader's). The queue the workers fill ahead can hide, for as many steps as it holds, a loader slower "
              "than the step, so the trainer's rate alone can overstate what the data path sustains.",
              "- `caption tokens`: the text length the step encodes. open_clip's trainer pads every caption to the "
              "model's context; the lab cuts each batch after its longest caption where the method allows it "
              "(`data.trim_text`; a `data` row's length varies per batch), which is part of its lead over that "
              "trainer and none of its ratio to the bare step.",
              "- Lab and bare rows are timed on the device's clock on a GPU (CUDA events), open_clip's trainer between "
              "its log lines (it syncs there). Both trainers log every "
              f"{spec['log_every']} steps and read their logged values back then (the lab rows through `make train`'s "
              "CSV logger). A window's rate includes the waits for data inside it. `syncs/step`: host-device syncs "
              "per measured step that torch's sync debug mode flags (GPU only; a wait on a CUDA event, as the "
              "non-finite guard's one-step-late read, is not among them).",
              "- Optimiser: the lab and the bare step use fused AdamW, open_clip's trainer its default (foreach) AdamW; "
              "the lab and the bare step compute the loss in float32 on the bf16 towers' features, open_clip's "
              "trainer in bf16.",
              "- `ops/step` (eager rows): the operators one warm-up step dispatches below autograd, views left out; "
              "on a GPU each launches one kernel or more, so where a step is bound by launches the lab's count over "
              "the bare step's is its overhead in launches (the Python around them is not counted).",
              "- Memory: the peak of each row's own process, GPU memory allocated by tensors (RSS: host memory, "
              "on a CPU)."]
    if stand_ins:
        lines.append(f"- open_clip_train imported with stand-ins for {', '.join(stand_ins)} (not installed; only its "
                     "webdataset loader uses them; `pip install 'open_clip_torch[training]'` installs them).")
    return "\n".join(lines) + "\n"
