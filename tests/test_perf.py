"""`make perf` and the fast step: the device-side non-finite guard, the measurement rows on the CPU, open_clip's
trainer driven and read, the ratios and goals. Speeds are printed by `make perf`, never asserted here."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks.perf import lab_overrides, load_spec, plan
from benchmarks.perf_openclip import stand_in, trainer_arguments, windows
from benchmarks.perf_report import goals, markdown, with_ratios
from benchmarks.perf_rows import bare_row, lab_row, resident_batch
from configs import ConfigError
from methods import METHODS
from methods.guard import LaggedRead, NonFiniteSteps

from tests_support import ROOT


def _model_and_optimizer(fused: bool):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused, foreach=None if fused else False)


def _step(model, optimizer, guard, x):
    model(x).sum().backward()
    total, in_a_row = guard.check(optimizer, list(model.parameters()))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total), in_a_row


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_changes_no_weight_and_no_moment(fused):
    model, optimizer = _model_and_optimizer(fused)
    guard = NonFiniteSteps()
    good = torch.ones(2, 4)
    assert _step(model, optimizer, guard, good) == (0.0, 0.0)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {n: optimizer.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    steps = {n: float(optimizer.state[p]["step"]) for n, p in model.named_parameters()}
    bad = torch.full((2, 4), float("nan"))
    assert _step(model, optimizer, guard, bad) == (1.0, 1.0)
    assert _step(model, optimizer, guard, bad) == (2.0, 2.0)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]) and torch.equal(optimizer.state[p]["exp_avg"], moments[n])
        assert float(optimizer.state[p]["step"]) == steps[n]  # AdamW's bias correction did not move on
    assert _step(model, optimizer, guard, good) == (2.0, 0.0)  # a good step ends the run of bad ones
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_lagged_read_on_the_cpu_is_the_value_just_pushed():
    read = LaggedRead()
    assert read.push(torch.tensor(3.0)) == 3.0 and read.push(torch.tensor(0.0)) == 0.0


def test_plan_has_every_registered_method_each_input_and_mode_beside_the_references():
    spec = load_spec(["perf=cpu", "compile=[false,true]"])
    rows = plan(spec)
    for mode in ("eager", "compiled"):
        assert [r["kind"] for r in rows if r["mode"] == mode][:2] == ["openclip", "bare"]
        lab = {(r["method"], r["inputs"]) for r in rows if r["mode"] == mode and r["kind"] == "lab"}
        assert lab == {(m, i) for m in METHODS.names() + ["negclip_captions"] for i in ("data", "resident")}
    assert "model.compile=true" in rows[-1]["overrides"] and "trainer.limit_val_batches=0" in rows[-1]["overrides"]
    # in the order of what the goals need: per mode the references and vanilla CLIP, then the others' resident rows
    first = [(r["kind"], r.get("method"), r.get("inputs"), r["mode"]) for r in rows[:8]]
    assert first == [(k, m, i, mode) for mode in ("eager", "compiled") for k, m, i in
                     [("openclip", None, None), ("bare", None, None), ("lab", "clip", "data"), ("lab", "clip", "resident")]]
    assert {r["inputs"] for r in rows[8:8 + 2 * len(METHODS.names())]} == {"resident"}  # with negclip_captions
    # the GPU file as one budgeted call runs it: every goal's reference rows of both modes before any other row,
    # then the other methods' eager rows before their compiled ones (what a budget cuts is the least needed)
    gpu = plan(load_spec(["perf=gpu"]))
    assert [(r["kind"], r.get("method"), r.get("inputs"), r["mode"]) for r in gpu[:8]] == first
    assert [r["mode"] for r in gpu[8:]] == ["eager"] * 5 + ["compiled"] * 5 and {r["method"] for r in gpu[8:]} == \
        set(METHODS.names()) - {"clip"} | {"negclip_captions"} and {r["inputs"] for r in gpu[8:]} == {"resident"}
    assert gpu[2]["loader_batches"] == 60 and "loader_batches" not in gpu[3]
    with pytest.raises(KeyError, match="unknown method 'nosuch'; available: clip"):
        plan(load_spec(["perf=cpu", "methods=[nosuch]"]))
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        load_spec(["perf=cpu", "stepz=3"])


def test_variants_are_rows_of_their_method_with_their_settings():
    spec = load_spec(["perf=cpu", "methods=[clip,negclip]", "inputs=[resident]",
                      "variants={negclip_captions: [method=negclip, method.hard_images=false]}"])
    row = plan(spec)[-1]
    assert "negclip_captions" not in {r.get("method") for r in plan(load_spec(["perf=cpu", "methods=[clip]"]))}
    assert row["name"] == "negclip_captions · resident · eager" and row["method"] == "negclip_captions"
    assert "method=negclip" in row["overrides"] and row["overrides"][-1] == "method.hard_images=false"
    for bad in ("{x: [method.hard_images=false]}", "{negclip: [method=negclip]}"):
        with pytest.raises(ConfigError, match="one 'method=<name>' among its overrides"):
            plan(load_spec(["perf=cpu", f"variants={bad}"]))
    with pytest.raises(KeyError, match="unknown method 'nosuch'"):
        plan(load_spec(["perf=cpu", "variants={x: [method=nosuch]}"]))


def _fake_clock(monkeypatch, perf):
    """perf's clock made a counter that only a fake row advances, so budgets are tested without waiting."""
    import time as real
    from types import SimpleNamespace

    now = [0.0]
    monkeypatch.setattr(perf, "time", SimpleNamespace(perf_counter=lambda: now[0], strftime=real.strftime))
    return now


def test_a_row_starts_only_with_its_minimum_of_the_budget_left(tmp_path, monkeypatch):
    """No row starts with seconds of the budget left only to be stopped: below perf.min_row_s (eager) or
    perf.min_compiled_row_s (compiled) it is listed as not run (budget), and the rows after it still get their
    chance (an eager row needs less than a compiled one)."""
    import benchmarks.perf as perf

    now = _fake_clock(monkeypatch, perf)
    given: list = []

    def measure(spec, row, folder, left_s=None, **kw):
        given.append((row["name"], left_s))
        now[0] += 30
        return {"samples_per_sec": 10.0, "step_time_s": 0.1, "wall_s": 30.0}

    monkeypatch.setattr(perf, "measure", measure)
    args = ["perf=cpu", "budget_s=100", "min_row_s=40", "min_compiled_row_s=60", "methods=[clip,smartclip]",
            "inputs=[resident]", "compile=[false,true]", "openclip=false", f"out_dir={tmp_path}"]
    assert perf.main(args) == 0
    # bare, clip (eager); bare, clip (compiled); smartclip (eager); smartclip (compiled)
    assert given == [("bare step · resident · eager", 100), ("clip · resident · eager", 70),
                     ("smartclip · resident · eager", 40)]
    info = json.loads(next(tmp_path.glob("perf-*/perf.json")).read_text())
    assert [r.get("not_run") for r in info["rows"]] == [
        None, None, "budget: 40 s of perf.budget_s (100 s) left, under perf.min_compiled_row_s (60 s)",
        "budget: 40 s of perf.budget_s (100 s) left, under perf.min_compiled_row_s (60 s)", None,
        "budget: 10 s of perf.budget_s (100 s) left, under perf.min_compiled_row_s (60 s)"]
    assert perf.budget_refusal(load_spec(["perf=cpu", "budget_s=100"]), {"compile": False}, 0) == \
        "budget: perf.budget_s (100 s) spent"
    table = next(tmp_path.glob("perf-*/perf.md")).read_text()
    assert "| bare step · resident · compiled | not run (budget: 40 s of perf.budget_s (100 s) left" in table


def test_the_files_say_before_each_row_which_runs_and_which_are_not_reached(tmp_path, monkeypatch):
    """perf.json and perf.md are rewritten before and after every row, into out_dir and mirror_dir (a SIGKILL at a
    call's time limit returns what mirror_dir holds), and each row's log is written into mirror_dir as it runs."""
    import benchmarks.perf as perf

    seen: list = []

    def measure(spec, row, folder, left_s=None, *, log=None, stop=None):
        [run] = (tmp_path / "dest").glob("perf-*")
        assert log == run / "rows" / folder.name / "log.txt"
        seen.append([r.get("pending") for r in json.loads((run / "perf.json").read_text())["rows"]])
        seen.append((run / "perf.md").read_text())
        return {"samples_per_sec": 10.0, "step_time_s": 0.1, "wall_s": 1.0}

    monkeypatch.setattr(perf, "measure", measure)
    assert perf.main(["perf=cpu", "methods=[clip]", "inputs=[resident]", f"out_dir={tmp_path / 'out'}",
                      f"mirror_dir={tmp_path / 'dest'}"]) == 0
    assert seen[0][0].startswith("running since ") and seen[0][1:] == ["not reached yet"] * 2
    assert "| bare step · resident · eager | not reached yet |" in seen[1]
    assert seen[4][:2] == [None, None] and seen[4][2].startswith("running since ")  # two measured, one running
    [run] = (tmp_path / "dest").glob("perf-*")
    [out] = (tmp_path / "out").glob("perf-*")
    assert run.name == out.name and (run / "perf.md").read_text() == (out / "perf.md").read_text()
    final = json.loads((run / "perf.json").read_text())["rows"]
    assert all("pending" not in r and r["samples_per_sec"] == 10 for r in final)


def test_sigterm_stops_the_running_row_and_marks_the_rest(tmp_path, monkeypatch):
    import os
    import signal as sig

    import benchmarks.perf as perf

    calls: list = []

    def measure(spec, row, folder, left_s=None, *, log=None, stop=None):
        calls.append(row["name"])
        if len(calls) == 2:
            os.kill(os.getpid(), sig.SIGTERM)  # perf's handler notes it; a real row is then killed (test below)
            assert stop.check() == "SIGTERM"
            return {"error": "stopped after 3 s (SIGTERM): ", "wall_s": 3.0}
        return {"samples_per_sec": 10.0, "step_time_s": 0.1, "wall_s": 1.0}

    monkeypatch.setattr(perf, "measure", measure)
    before = sig.getsignal(sig.SIGTERM)
    assert perf.main(["perf=cpu", "methods=[clip]", "inputs=[resident]", f"out_dir={tmp_path}"]) == 143
    assert sig.getsignal(sig.SIGTERM) == before  # the handler is put back
    rows = json.loads(next(tmp_path.glob("perf-*/perf.json")).read_text())["rows"]
    assert len(calls) == 2 and [r.get("not_run") for r in rows] == [None, None, "stopped: SIGTERM"]
    table = next(tmp_path.glob("perf-*/perf.md")).read_text()
    assert "| clip · resident · eager | not run (stopped: SIGTERM) |" in table


@pytest.mark.parametrize("why", ["signal", "parent gone", "budget"])
def test_measure_kills_a_row_that_ignores_sigterm(tmp_path, monkeypatch, why):
    """A Lightning process answers SIGTERM with "Bypassing SIGTERM" and goes on; the row is killed (SIGKILL) when the
    run is stopped, when the process that started the run is gone (perf_node.sh killed), or at its time limit."""
    import threading

    import benchmarks.perf as perf

    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('Bypassing SIGTERM', flush=True); time.sleep(120)")
    monkeypatch.setattr(perf, "command", lambda spec, row, folder: [sys.executable, "-c", stubborn])
    stop = perf.Stop(watch_parent=why == "parent gone")
    if why == "signal":
        threading.Timer(1.0, stop, args=(15, None)).start()
    elif why == "parent gone":
        parent = stop.parent
        threading.Timer(1.0, lambda: monkeypatch.setattr(perf.os, "getppid", lambda: parent + 1)).start()
    spec = load_spec(["perf=cpu"])
    start = time.perf_counter()
    out = perf.measure(spec, {"name": "x"}, tmp_path / "row", 2.0 if why == "budget" else None,
                       log=tmp_path / "dest" / "log.txt", stop=stop)
    assert time.perf_counter() - start < 10
    expected = {"signal": "(SIGTERM)", "parent gone": "(the process that started the run is gone)",
                "budget": "stopped after 2 s (the rest of perf.budget_s)"}[why]
    assert expected in out["error"] and "Bypassing SIGTERM" in out["error"]
    assert (tmp_path / "dest" / "log.txt").read_text().strip() == "Bypassing SIGTERM"


def test_lab_rows_share_an_absolute_cache_under_the_run_folder(tmp_path, monkeypatch):
    """Each row runs in a working folder of its own: a relative cache_dir (.cache) made NegCLIP find its neighbours
    again in every row."""
    import benchmarks.perf as perf

    spec = load_spec(["perf=cpu", "methods=[clip,negclip]"])
    assert not any("cache_dir=" in o for r in plan(spec) for o in r.get("overrides", []))
    rows: list = []
    monkeypatch.setattr(perf, "measure", lambda spec, row, *a, **k: rows.append(row) or {"error": "x", "wall_s": 0})
    assert perf.main(["perf=cpu", "methods=[clip,negclip]", f"out_dir={tmp_path}"]) == 0
    [run] = tmp_path.glob("perf-*")
    caches = [[o for o in r["overrides"] if o.startswith("cache_dir=")] for r in rows if r["kind"] != "openclip"]
    assert len(caches) == 7 and all(c == [f"cache_dir={run / 'cache'}"] for c in caches)


def test_the_code_measured_heads_the_table(tmp_path, monkeypatch):
    """The git commit where there is a checkout; where there is none (a lent machine's copy of the tree), the
    `commit=` given, taken as written (12e4567 is a float to OmegaConf)."""
    import benchmarks.perf as perf
    from benchmarks.perf_report import code_line

    assert load_spec(["perf=cpu", "commit=12e4567"]).commit == "12e4567"
    assert load_spec(["perf=cpu", "note=a: b"]).note == "a: b"
    assert code_line({"commit": "12e4567"}, {"commit": None}) == \
        "Code: `12e4567` (as given by `commit=`; no git checkout where this ran)."
    assert code_line({}, {"commit": "0123456789abcdef (dirty)"}) == \
        "Code: commit `0123456789` with uncommitted changes to tracked files (git, where this ran)."
    assert code_line({"commit": "0123456-dirty"}, {"commit": "0123456789abcdef"}).endswith("(git, where this ran).")
    assert "`commit=abcdef0` was given" in code_line({"commit": "abcdef0"}, {"commit": "0123456789abcdef"})
    assert code_line({}, {"commit": None}).startswith("Code: unknown")
    monkeypatch.setattr(perf, "measure", lambda *a, **k: {"error": "x", "wall_s": 0})
    monkeypatch.setattr(perf, "environment", lambda: {"commit": None, "gpu": None, "cpu_count": 2, "torch": "t",
                                                      "lightning": "l", "open_clip": "o"})
    assert perf.main(["perf=cpu", "methods=[clip]", "commit=0abc123-dirty", f"out_dir={tmp_path}"]) == 0
    text = next(tmp_path.glob("perf-*/perf.md")).read_text()
    assert text.splitlines()[2] == "Code: `0abc123-dirty` (as given by `commit=`; no git checkout where this ran)."


def test_auto_picks_the_cpu_file_without_a_gpu_and_says_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_spec([]).name == "cpu"
    assert "no GPU: configs/perf/cpu.yaml" in capsys.readouterr().out


def test_the_gpu_file_without_a_gpu_is_refused_before_any_row(tmp_path, capsys, monkeypatch):
    import benchmarks.perf as perf

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert perf.main(["perf=gpu", f"out_dir={tmp_path}"]) == 2
    assert "trainer=gpu (the perf file's) needs a GPU and no CUDA device is visible here" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_ratios_goals_and_table():
    rows = [
        {"kind": "openclip", "name": "oc", "mode": "eager", "samples_per_sec": 100.0, "step_time_s": 0.32},
        {"kind": "bare", "name": "bare", "mode": "eager", "samples_per_sec": 200.0, "step_time_s": 0.16},
        {"kind": "lab", "name": "clip d", "method": "clip", "inputs": "data", "mode": "eager",
         "samples_per_sec": 120.0, "step_time_s": 32 / 120},
        {"kind": "lab", "name": "clip r", "method": "clip", "inputs": "resident", "mode": "eager",
         "samples_per_sec": 160.0, "step_time_s": 0.2},
        {"kind": "lab", "name": "neg r", "method": "negclip", "inputs": "resident", "mode": "eager",
         "samples_per_sec": 80.0, "step_time_s": 0.4, "peak_memory_bytes": 3 * 2**30, "memory_kind": "GPU allocated"},
        {"kind": "lab", "name": "sc r", "method": "structureclip", "inputs": "resident", "mode": "eager",
         "error": "exit status 1: boom"},
    ]
    out = with_ratios(rows)
    assert out[2]["vs_openclip"] == pytest.approx(1.2) and out[3]["vs_bare"] == pytest.approx(0.8)
    assert out[4]["step_vs_clip"] == pytest.approx(2.0) and "vs_openclip" not in out[5]
    checks = {g["goal"]: g for g in goals(out, {"clip_vs_openclip": 1.0, "clip_vs_bare": 0.9,
                                                "step_time_vs_clip": {"negclip": 1.6, "structureclip": 1.6}})}
    assert checks["clip (data path, eager) >= 1.0x open_clip trainer (eager)"]["met"] is True
    assert checks["clip (resident, eager) >= 0.9x bare step (eager)"]["met"] is False
    assert checks["negclip step (resident, eager) <= 1.6x clip's"]["met"] is False
    assert not any("compiled" in g for g in checks)  # no compiled rows, no compiled goals
    spec = {"name": "cpu", "note": "", "model": "tiny", "batch_size": 32, "steps": 16, "warmup": 4, "log_every": 4}
    machine = {"gpu": None, "cpu_count": 2, "torch": "t", "lightning": "l", "open_clip": "o"}
    text = markdown({"spec": spec, "machine": machine, "rows": out, "goals": list(checks.values())})
    assert "| neg r | 80 |  | 400.0 | 0.80x | 0.40x | 2.00x | 3.00 GiB GPU |" in text
    assert "| sc r | failed: exit status 1: boom |" in text and "(NOT met)" in text


def test_open_clip_windows_arguments_and_stand_ins():
    marks = [(0.0, 8), (1.0, 16), (1.5, 32), (2.5, 48)]
    assert windows(marks, skip_samples=0) == [8.0, 32.0, 16.0]
    assert windows(marks, skip_samples=16) == [32.0, 16.0]
    args = trainer_arguments(model="m", quick_gelu=True, batch=8, steps=5, workers=2, precision="amp_bf16",
                             compile=True, device="cuda", log_every=2)
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--train-num-samples"] == "40" and pairs["--log-every-n-steps"] == "2" and pairs["--logs"] == "none"
    assert args[-2:] == ["--force-quick-gelu", "--torchcompile"]
    module = stand_in("webdataset")

    class Stage(module.PipelineStage):  # open_clip_train subclasses it at import time
        pass

    with pytest.raises(ImportError, match="webdataset is not installed"):
        Stage()


def test_open_clip_trainer_row_on_the_cpu(tmp_path):
    """open_clip_train.main really runs on the tiny model and its progress lines are read."""
    from methods.train import compose_train
    from omegaconf import OmegaConf

    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(OmegaConf.to_container(compose_train([]).model.arch)))
    theirs = trainer_arguments(model="clipcomp-tiny", quick_gelu=False, batch=8, steps=6, workers=0, precision="fp32",
                               compile=False, device="cpu", log_every=1)
    result = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "benchmarks.perf_openclip", str(result), "2", str(arch), "--", *theirs]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = json.loads(result.read_text())
    assert out["windows"] == 4 and out["samples_per_sec"] > 0 and out["memory_kind"] == "host RSS"
    assert out["text_tokens"] == compose_train([]).model.arch["text_cfg"]["context_length"]  # padded to full context


@pytest.mark.parametrize("method,inputs", [("clip", "data"), ("structureclip", "resident")])
def test_lab_row_through_the_trainer_on_the_cpu(tmp_path, method, inputs):
    spec = load_spec(["perf=cpu", "batch_size=8", "steps=6", "warmup=2", "log_every=2", "num_workers=0",
                      "data_args=[data.options.train_size=64]"])
    overrides = lab_overrides(spec, method, inputs, False) + [f"cache_dir={tmp_path}", "method.kee_layers=2"
                                                               if method == "structureclip" else "seed=0"]
    out = lab_row({"kind": "lab", "overrides": overrides, "inputs": inputs, "steps": 6, "warmup": 2})
    # 3 timed steps after the warm-up, in windows of log_every (2): one whole window
    assert out["measured_steps"] == 2 and out["windows"] == 1 and out["samples_per_sec"] > 0 and out["clock"] == "host"
    assert out["precision"] == "32-true" and out["syncs_per_step"] is None  # counted on a GPU only
    assert (out["text_tokens"] is None) == (inputs == "data")  # a data row's length varies per batch
    if inputs == "data":  # its loader timed alone too (8 batches: 1 left out, 2 timed), the smaller rate reported
        assert out["loader_batches"] == 2 and out["loader_skipped"] == 1 and out["loader_samples_per_sec"] > 0
        assert out["samples_per_sec"] == min(out["trainer_samples_per_sec"], out["loader_samples_per_sec"])
    else:
        assert "loader_samples_per_sec" not in out


def test_a_loader_slower_than_the_step_shows_in_the_rate_as_between_open_clips_log_lines():
    """12 workers hand batches over in bursts: 11 steps of 20 ms and one that waits 500 ms for data. The median
    single step (20 ms) hides the loader; the rate over windows of the log interval, as open_clip's is measured
    between its log lines, does not."""
    from benchmarks.perf_rows import summarise

    times = ([0.02] * 11 + [0.5]) * 10
    out = summarise(times, batch=256, window=12)
    assert out["step_time_median_s"] == pytest.approx(0.02)
    assert out["samples_per_sec"] == pytest.approx(256 * 12 / (11 * 0.02 + 0.5)) and out["windows"] == 10
    assert out["step_time_s"] == pytest.approx((11 * 0.02 + 0.5) / 12)
    assert summarise([0.1] * 7, batch=8, window=2)["measured_steps"] == 6  # a partial last window is left out


def test_a_loader_slower_than_the_step_behind_a_full_queue_is_found_by_timing_it_alone():
    """12 workers x prefetch_factor 4 = 48 batches made ahead: over 100 measured steps a loader 10% slower than the
    step never empties that queue, so the trainer's rate is the step's. Timed alone, the queued batches left out,
    the loader gives its own rate, and the row reports the smaller."""
    from benchmarks.perf_rows import loader_alone, with_loader

    class Loader:  # `ahead` batches ready at once (the queue), then one every `every` seconds
        def __init__(self, n, ahead, every):
            self.n, self.ahead, self.every = n, ahead, every

        def __len__(self):
            return self.n

        def __iter__(self):
            for k in range(self.n):
                if k >= self.ahead:
                    time.sleep(self.every)
                yield k

    out = loader_alone(Loader(30, ahead=6, every=0.02), 8, ahead=6, batches=12, window=4)
    assert out["loader_batches"] == 12 and out["loader_skipped"] == 6 and out["loader_windows"] == 3
    assert 8 / 0.03 < out["loader_samples_per_sec"] <= 8 / 0.02 * 1.01
    trainer = {"samples_per_sec": 800.0, "step_time_s": 0.01, "measured_steps": 12}
    row = with_loader(trainer, out)
    assert row["samples_per_sec"] == out["loader_samples_per_sec"] and row["bound_by"] == "loader"
    assert row["trainer_samples_per_sec"] == 800 and row["step_time_s"] == pytest.approx(8 / row["samples_per_sec"])
    assert with_loader(trainer | {"samples_per_sec": 100.0, "step_time_s": 0.08}, out)["bound_by"] == "trainer"
    with pytest.raises(ValueError, match="gives 6 batches, not more than the 6 made ahead"):
        loader_alone(Loader(6, ahead=6, every=0), 8, ahead=6, batches=12, window=4)


def test_the_bare_step_runs_on_vanilla_clips_resident_batch(tmp_path):
    """The ceiling does the lab's work: the same images and caption tokens (cut as the loader cuts them), not a
    full-context batch the lab never encodes."""
    from methods.train import build, compose_train

    spec = load_spec(["perf=cpu", "batch_size=8", "steps=5", "warmup=1", "num_workers=0"])
    row = next(r for r in plan(spec) if r["kind"] == "bare")
    overrides = row["overrides"] + [f"cache_dir={tmp_path}"]
    assert row["overrides"] == next(r for r in plan(spec) if r.get("method") == "clip"
                                    and r["inputs"] == "resident")["overrides"]
    out = bare_row(row | {"overrides": overrides})
    assert out["measured_steps"] == 3 and out["samples_per_sec"] > 0 and out["clock"] == "host"
    module, dm = build(compose_train(overrides))
    lab = resident_batch(dm, 8, torch.device("cpu"))
    assert out["text_tokens"] == lab["text"].shape[-1] < module.model.context_length


def test_a_resident_batch_larger_than_the_split_is_refused_not_filled_with_repeats(tmp_path):
    """Repeated items would give MSG-CLIP fewer distinct texts to encode than a real batch, so a faster step."""
    from methods.train import build, compose_train

    _, dm = build(compose_train(["method=msgclip", "data.options.train_size=16", f"cache_dir={tmp_path}"]))
    batch = resident_batch(dm, 16, torch.device("cpu"))
    assert batch["index"].tolist() == list(range(16))
    with pytest.raises(ValueError, match="training split has 16 items, fewer than the batch of 32"):
        resident_batch(dm, 32, torch.device("cpu"))


def test_the_lab_adds_a_fixed_number_of_ops_to_the_bare_step_whatever_the_depth(tmp_path):
    """What the lab dispatches per step beyond open_clip's model, loss and AdamW (the non-finite guard, the
    temperature clamp, a second parameter group) is a constant: nothing runs per layer or per parameter, so at
    ViT-B/32's depth, where eager steps are bound by kernel launches, the overhead stays a few percent."""
    extra = {}
    for layers in (2, 4):
        depth = [f"model.arch.vision_cfg.layers={layers}", f"model.arch.text_cfg.layers={layers}"]
        spec = load_spec(["perf=cpu", "batch_size=4", "steps=4", "warmup=2", "log_every=8", "num_workers=0",
                          f"model_args={depth}", "methods=[clip]", "inputs=[resident]"])
        bare, lab = [r for r in plan(spec) if r["kind"] in ("bare", "lab")]
        own = [f"cache_dir={tmp_path}"]
        b = bare_row(bare | {"overrides": bare["overrides"] + own})
        with_lab = lab_row(lab | {"overrides": lab["overrides"] + own})
        assert b["ops_per_step"] > 100 and b["ops"]["_fused_adamw_"] == 1  # one multi-tensor kernel call per group
        assert with_lab["ops"]["_fused_adamw_"] == 2 and with_lab["ops"]["mm"] == b["ops"]["mm"]  # the same model work
        extra[layers] = with_lab["ops_per_step"] - b["ops_per_step"]
    # a budget, not a figure: the lab's step adds 37 operations to the bare step's (2026-12-05: the non-finite guard,
    # the temperature clamp, logging; the CPU reads the guard's count once); 60 leaves room, and depth adds none
    assert 0 < extra[2] == extra[4] <= 60, extra


@pytest.mark.parametrize("method", ["clip", "negclip", "structureclip", "smartclip", "msgclip"])
def test_training_steps_read_nothing_back_between_logging_steps(make_cfg, method, monkeypatch, tmp_path):
    """A CPU stand-in for the GPU's sync count (torch.cuda.set_sync_debug_mode needs CUDA): with logging and step
    checkpoints out of the way, a training step may not read a tensor back on the host (`.item()`, `float()`,
    `bool()`, `.tolist()`), nor call an op whose output size depends on the values (`unique`, `nonzero`: the
    host must learn the size), nor log a Python number (Lightning makes it a device tensor: a copy). Allowed: the
    non-finite guard's read, lagged and non-blocking on a GPU; the sampler's host-only batch indices. Images and
    the batch's host-side tables (MSG-CLIP's distinct texts) are made in a worker."""
    import traceback

    import lightning as L
    from torch.utils._python_dispatch import TorchDispatchMode

    from methods.train import build, make_trainer

    reads: list[str] = []
    training = {"on": False}
    here = str(ROOT)

    def where() -> str:
        frames = [f for f in traceback.extract_stack()[:-2] if "site-packages" not in f.filename or "lightning" in f.filename]
        return " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-4:])

    def allowed(stack) -> bool:  # the guard's lagged read and the sampler's host-only indices
        return any(f.filename.endswith(("methods/guard.py", "datamodules/sampling.py")) for f in stack)

    def watch(owner, name: str):
        original = getattr(owner, name)

        def read(*args, **kwargs):
            if training["on"]:
                stack = traceback.extract_stack()
                if not allowed(stack) and any(f.filename.startswith(here) or "lightning" in f.filename for f in stack[:-1]):
                    reads.append(f"{name} at {where()}")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, read)

    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "unique", "nonzero"):
        watch(torch.Tensor, name)
    for name in ("unique", "nonzero"):
        watch(torch, name)
    to_tensor = L.LightningModule._LightningModule__to_tensor

    def log_number(self, value, name):
        if training["on"] and not isinstance(value, torch.Tensor):
            reads.append(f"a number logged as {name}")
        return to_tensor(self, value, name)

    monkeypatch.setattr(L.LightningModule, "_LightningModule__to_tensor", log_number)

    class DispatchedReads(TorchDispatchMode):
        """The same below Python, where C++ code reads values too: every op that copies a value to the host
        (`_local_scalar_dense`: `.item()`, `bool()`, and ops that check their inputs' values) or sizes its output
        by the values (`nonzero`, `unique`, `masked_select`, `repeat_interleave` without `output_size`, indexing
        with a boolean mask)."""

        SIZED = {"nonzero", "_unique", "_unique2", "unique_dim", "unique_consecutive", "masked_select"}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            masked = name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or [])
            unsized = func == torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
            if name == "_local_scalar_dense" or name in self.SIZED or masked or unsized:
                if not allowed(traceback.extract_stack()):
                    reads.append(f"aten.{name} at {where()}")
            return func(*args, **kwargs)

    class Window(L.Callback):  # from the third step's start to the last step's end
        def __init__(self):
            self.mode = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            training["on"] = trainer.global_step >= 2
            if training["on"] and self.mode is None:
                self.mode = DispatchedReads()
                self.mode.__enter__()

        def on_train_end(self, trainer, module):
            training["on"] = False
            if self.mode is not None:
                self.mode.__exit__(None, None, None)
                self.mode = None

        def on_exception(self, trainer, module, exception):  # a failed fit leaves no mode behind for later tests
            self.on_train_end(trainer, module)

    cfg = make_cfg(f"method={method}", "data.options.train_size=512", "data.batch_size=32", "trainer.max_steps=6",
                   "trainer.max_epochs=10", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1000",
                   "trainer.checkpoint_every_n_steps=0", "data.num_workers=1", f"cache_dir={tmp_path}")  # data read in a worker
    module, dm = build(cfg)
    trainer = make_trainer(cfg, tmp_path, [Window()], logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 6
    assert not reads, "host reads inside training steps:\n" + "\n".join(sorted(set(reads)))


def test_the_progress_bar_still_shows_the_loss(make_cfg, tmp_path):
    """The loss left the progress-bar metrics (read every step); LossBar shows it when the bar refreshes."""
    import lightning as L

    from methods.callbacks import LossBar
    from methods.train import build, make_trainer

    shown: list[dict] = []

    class Peek(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            bar = next(c for c in trainer.callbacks if isinstance(c, LossBar))
            shown.append(bar.get_metrics(trainer, module))

    cfg = make_cfg("data.options.train_size=64", "data.batch_size=32", "trainer.max_steps=2", "trainer.max_epochs=1",
                   "trainer.limit_val_batches=0", "trainer.enable_progress_bar=true")
    module, dm = build(cfg)
    trainer = make_trainer(cfg, tmp_path, [Peek()], logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    assert "train/loss" not in trainer.progress_bar_metrics
    assert len(shown) == 2 and all(float(m["loss"]) > 0 for m in shown)


def _probe_wheel(folder: Path) -> None:
    """A minimal pure-Python wheel, `clipcomp_probe`, standing in for the wheels of `make perf-wheels`."""
    info = "clipcomp_probe-0.1.dist-info"
    files = {"clipcomp_probe.py": "VALUE = 1\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: clipcomp-probe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "clipcomp_probe-0.1-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
        whl.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]))


def _node(tmp_path: Path, *args: str, wheels: Path) -> subprocess.CompletedProcess:
    """benchmarks/perf_node.sh as a GPU node runs it, its `python3` a wrapper around this Python that notes, for
    each call, whether the probe wheel can be imported there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\n"{sys.executable}" -c "import clipcomp_probe" 2>/dev/null '
                       f'&& echo importable >> "{tmp_path}/calls" || echo absent >> "{tmp_path}/calls"\n'
                       f'exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "WHEELS": str(wheels), "HOME": str(tmp_path)}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "perf_node.sh"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_perf_node_installs_the_wheels_runs_and_keeps_the_results(tmp_path):
    _probe_wheel(tmp_path / "whl")
    kept = tmp_path / "kept"
    # DEST relative: a path from where the script is called, not from the repo it moves to
    done = _node(tmp_path, "kept", "perf=cpu", "methods=[clip]", "inputs=[resident]", "openclip=false",
                 "bare=false", "batch_size=8", "steps=4", "warmup=1", "log_every=1",
                 "resident_args=[data.options.train_size=8]", "commit=0abc123", wheels=tmp_path / "whl")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # pip ran without the wheels on the path; benchmarks.perf with them
    assert (tmp_path / "calls").read_text().split() == ["absent", "importable"]
    [run] = kept.glob("perf-*")
    info = json.loads((run / "perf.json").read_text())
    assert [r["name"] for r in info["rows"]] == ["clip · resident · eager"] and info["rows"][0]["samples_per_sec"] > 0
    assert "| clip · resident · eager |" in (run / "perf.md").read_text() and info["spec"]["commit"] == "0abc123"
    assert "samples_per_sec" in (run / "rows" / "00-clip___resident___eager" / "log.txt").read_text()
    assert sorted(p.name for p in run.iterdir()) == ["perf.json", "perf.md", "rows"]  # no cache, no row configs
    assert f"perf_node: results in {run}" in done.stdout


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_perf_node_stopped_mid_row_has_the_rows_measured_in_dest(tmp_path, how):
    """A lent machine's call limit stops the script with SIGTERM, or with SIGKILL, which no trap sees: DEST already
    holds perf.json, perf.md and the logs of every row measured, and of the row running. On SIGTERM the whole run
    stops within seconds though its Lightning row ignores SIGTERM ("Bypassing SIGTERM"), the files mark the row as
    stopped and the scratch folder is removed; on SIGKILL the run sees its parent gone and stops too."""
    import os

    _probe_wheel(tmp_path / "whl")
    (tmp_path / "tmp").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "WHEELS": str(tmp_path / "whl"), "HOME": str(tmp_path),
           "TMPDIR": str(tmp_path / "tmp")}
    # a quick row, then one that would train for minutes
    args = ["perf=cpu", "methods=[clip]", "inputs=[resident]", "openclip=false", "bare=false", "batch_size=8",
            "steps=4", "warmup=1", "log_every=1", "resident_args=[data.options.train_size=8]",
            "variants={slow: [method=clip, trainer.max_steps=1000000]}"]
    kept = tmp_path / "kept"
    proc = subprocess.Popen(["bash", str(ROOT / "benchmarks" / "perf_node.sh"), str(kept), *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def rows() -> list:
        found = list(kept.glob("perf-*/perf.json"))
        return json.loads(found[0].read_text())["rows"] if found else []

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # the slow row has trained for a few steps
        log = list(kept.glob("perf-*/rows/01-*/log.txt"))
        if rows() and rows()[1].get("pending", "").startswith("running") and log and log[0].stat().st_size > 0:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-2000:]
    time.sleep(3)
    [scratch] = (tmp_path / "tmp").glob("tmp.*")
    group = int((scratch / "pgid").read_text())
    proc.send_signal(getattr(signal, how))
    code = proc.wait(timeout=60)
    [run] = kept.glob("perf-*")
    assert rows()[0]["name"] == "clip · resident · eager" and rows()[0]["samples_per_sec"] > 0
    assert (run / "rows" / "00-clip___resident___eager" / "log.txt").is_file()
    assert (run / "rows" / "01-slow___resident___eager" / "log.txt").is_file()

    def group_gone() -> bool:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        return False

    deadline = time.time() + 30
    while not group_gone() and time.time() < deadline:  # SIGKILL: the run notices its parent is gone
        time.sleep(0.2)
    assert group_gone()
    slow = rows()[1]
    assert slow["name"] == "slow · resident · eager" and "samples_per_sec" not in slow
    if how == "SIGTERM":
        assert code == 143
        assert slow["error"].startswith("stopped after ") and "(SIGTERM)" in slow["error"]
        assert "| slow · resident · eager | failed: stopped after" in (run / "perf.md").read_text()
        assert not list((tmp_path / "tmp").glob("tmp.*"))  # the script's scratch folder is gone
    else:
        assert code == -signal.SIGKILL
        assert "(the process that started the run is gone)" in slow["error"]


def test_perf_wheels_starts_from_an_empty_folder():
    """A wheel of another version left in .whl/ from an earlier `make perf-wheels` would be installed beside the new
    one on the node (pip refuses two versions of one package): the recipe empties the folder first."""
    # under `make test` the outer make's level and flags are in the environment (a nested make would print
    # "Entering directory"): this make is a top-level one
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    done = subprocess.run(["make", "--no-print-directory", "-n", "perf-wheels", "WHEELS=some/wheels"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith('rm -rf "some/wheels"') and lines[1] == 'mkdir -p "some/wheels"'
    assert "pip download" in lines[2] and "-d some/wheels" in "\n".join(lines[2:])


@pytest.mark.parametrize("case", ["no destination", "no wheels"])
def test_perf_node_says_what_is_missing(tmp_path, case):
    (tmp_path / "whl").mkdir()
    args = ["perf=cpu"] if case == "no destination" else [str(tmp_path / "kept"), "perf=cpu"]
    done = _node(tmp_path, *args, wheels=tmp_path / "whl")
    assert done.returncode == 2
    assert ("usage: bash benchmarks/perf_node.sh DEST" if case == "no destination" else
            f"no wheels in {tmp_path / 'whl'}/: run 'make perf-wheels'") in done.stderr
    assert not (tmp_path / "kept").exists()
