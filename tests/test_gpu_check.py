"""The device check script (fused_rnn.bench.gpu_check), run here as a device session would run it.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 with --tiny sizes. Each run is a
subprocess with its own worker processes, so what is tested is the whole path: the plan, the
workers, the float64 reference and torch.nn baseline, the watchdog, the files and the table
printed last. About 45 s on 2 cores, most of it the first test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from fused_rnn.bench import SUITES, gpu_check

FUSED = ("stepwise", "persistent")


def _run(out, *args, timeout=300):
    env = {**os.environ, "TRITON_INTERPRET": "1", "FUSED_RNN_POISON": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fused_rnn.bench.gpu_check", "--device", "cpu", "--tiny",
           "--out", str(out), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=out)


def _why(proc) -> str:
    return (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-3000:]}")  # fmt: skip


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _assert_summary_last(proc, result: str) -> list[str]:
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1].startswith(f"RESULT: {result}"), _why(proc)
    head = max(i for i, line in enumerate(lines) if "gpu_check summary" in line)
    progress = [i for i, line in enumerate(lines) if line.startswith("[") and "/" in line[:12]]
    assert progress and max(progress) < head  # every check's line came before the table
    return lines[head:]


def test_plan_covers_the_matrix():
    """The full plan has every cell kind in every dtype and every awkward configuration."""
    plan = gpu_check.correctness_plan("full")
    assert {k for k, _, _ in plan} == set(gpu_check.KINDS)
    for kind in gpu_check.KINDS:
        assert {d for k, _, d in plan if k == kind} == {"fp32", "tf32", "fp16", "bf16"}, kind
    sizes = {s.name: s for _, s, _ in plan}
    assert {"layers2", "bidir", "batch_first", "nobias", "packed", "B1", "T1", "H33", "medium",
            "flashrnn"} <= set(sizes)  # fmt: skip
    assert sizes["H33"].H % 16 and sizes["B1"].B == 1 and sizes["T1"].T == 1
    assert sizes["layers2"].layers == 2 and sizes["packed"].packed and not sizes["nobias"].bias
    flash = sizes["flashrnn"]
    assert (flash.T, flash.B, flash.I, flash.H, flash.mode) == (1024, 16, 768, 768, "fwd")
    assert all(s.mode == "fwdbwd" for n, s in sizes.items() if n != "flashrnn")
    for dtype, (tol, why) in gpu_check.TOLERANCES.items():
        assert 0 < tol < 0.1 and len(why) > 40, dtype
    # the quick plan is a subset; the bench plans name real suites
    assert set(gpu_check.correctness_plan("quick")) <= set(plan)
    full = dict(gpu_check.BENCH_PLAN["full"])
    assert set(full) == {"fastrnns", "flashrnn", "deepbench", "small-batch", "large", "stack"}
    assert all({"bf16", "fp16"} <= set(d) for d in full.values())
    assert any({"fp32", "tf32"} <= set(d) for d in full.values())
    assert gpu_check.BENCH_PLAN["quick"] == [("fastrnns", ("bf16",)), ("flashrnn", ("bf16",))]
    assert set(full) <= set(SUITES)


def _messages(text: str) -> list[dict]:
    return [json.loads(line[len(gpu_check._MSG) :]) for line in text.splitlines()
            if line.startswith(gpu_check._MSG)]  # fmt: skip


def test_bench_warmup_task_in_process(capsys):
    """The task that compiles a bench config's kernels ahead (a GPU-only lane) runs one pass."""
    import torch

    shape = {"cell": "gru", "seq_len": 3, "batch": 2, "input_size": 4, "hidden_size": 8}
    check = {"id": "warm/x/gru/fp32/fwdbwd/stepwise", "backend": "stepwise"}
    task = {"type": "warm", "id": check["id"], "shape": shape, "dtype": "fp32",
            "mode": "fwdbwd", "checks": [check]}  # fmt: skip
    gpu_check._run_warm(task, {}, torch.device("cpu"))
    msgs = _messages(capsys.readouterr().out)
    assert msgs[0] == {"ev": "start", "check": check["id"]}
    assert msgs[1]["kind"] == "warm" and msgs[1]["row"]["status"] == "ok", msgs


def test_tiny_run_passes(tmp_path):
    """Every cell kind on the stepwise kernels passes against float64 with finite errors, every
    fused backend has a row for every check, and the summary table is printed last."""
    out = tmp_path / "ok"
    proc = _run(out, "--no-bench")
    assert proc.returncode == 0, _why(proc)

    doc = json.loads((out / "correctness.json").read_text())
    rows = doc["rows"]
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows)
    for kind in gpu_check.KINDS:
        mine = [r for r in rows if r["cell"] == kind and r["backend"] == "stepwise"]
        assert mine, kind
        for r in mine:
            assert r["status"] == "pass", r
            assert _finite(r["max_rel_err"]) and r["max_rel_err"] <= r["tol"], r
            assert _finite(r["baseline_max_rel_err"]), r
            assert r["errors"] and all(_finite(f) for f, _ in r["errors"].values()), r
    # no check silently missing: each task has a row per fused backend
    tasks = {r["id"].rsplit("/", 1)[0] for r in rows}
    for task in tasks:
        for b in FUSED:
            r = by_id[f"{task}/{b}"]
            assert r["status"] in ("pass", "unavailable"), r
    # outputs, final states and the gradients of the input, the states and every parameter
    errs = by_id["lstm/base/fp32/stepwise"]["errors"]
    assert {"output", "h_n", "c_n", "grad_x", "grad_h0", "grad_c0", "grad_weight_ih_l0",
            "grad_weight_hh_l0", "grad_bias_ih_l0", "grad_bias_hh_l0"} <= set(errs)  # fmt: skip
    assert "grad_weight_hr_l0" in by_id["lstm-proj/base/fp32/stepwise"]["errors"]
    assert "grad_weight_ch_l0" in by_id["lstm-peephole/base/fp32/stepwise"]["errors"]
    assert by_id["lstm-peephole/base/fp32/stepwise"]["baseline"] == "fused_rnn backend=torch"
    assert by_id["gru/base/fp32/stepwise"]["baseline"] == "torch.nn"
    for r in rows:
        if r["backend"] == "persistent" and r["status"] == "pass":
            assert r["repeats"] >= 2 and r["repeat_max_abs_diff"] == 0.0, r
    assert {r["id"]: r["status"] for r in doc["extras"]}.keys() >= {
        f"ddp/lstm/{b}" for b in FUSED if by_id["lstm/base/fp32/" + b]["status"] == "pass"
    }
    assert all(r["status"] in ("pass", "unavailable") for r in doc["extras"]), doc["extras"]

    env = json.loads((out / "env.json").read_text())
    for key in ("device_name", "torch_version", "triton_version", "python_version", "date_utc"):
        assert env[key], key
    assert env["poison"] is True and env["level"] == "tiny"

    table = _assert_summary_last(proc, "PASS")
    assert any(line.startswith("stepwise") and "fp32" in line for line in table)
    log = (out / "gpu_check.log").read_text()
    assert "gpu_check summary" in log and log.rstrip().splitlines()[-1].startswith("RESULT: PASS")
    assert not (out / "bench.json").exists()


def test_failures_hangs_and_crashes_are_reported(tmp_path):
    """A tolerance of 0 fails real checks; a worker that dies is a crash and one that stops is a
    hang (both injected), and the run goes on with fresh workers; exit status 1. The bench part
    writes fused_rnn.bench's JSON and CSV."""
    out = tmp_path / "bad"
    proc = _run(
        out, "--no-extras", "--only", "^(lstm|gru)/base/fp32/|^custom/rnn/fp32/fwd/",
        "--tolerance-scale", "0", "--hang-timeout", "8",
        "--inject", "crash:lstm/base/fp32/stepwise", "--inject", "hang:gru/base/fp32/persistent",
    )  # fmt: skip
    assert proc.returncode == 1, _why(proc)
    rows = {r["id"]: r for r in json.loads((out / "correctness.json").read_text())["rows"]}
    assert rows["lstm/base/fp32/stepwise"]["status"] == "crash"
    assert "exited" in rows["lstm/base/fp32/stepwise"]["message"]
    assert rows["gru/base/fp32/persistent"]["status"] == "hang"
    # the checks after the crash ran in a new worker, against a tolerance nothing can meet
    for cid in ("lstm/base/fp32/persistent", "gru/base/fp32/stepwise"):
        assert rows[cid]["status"] == "fail" and "> tol" in rows[cid]["message"], rows[cid]
        assert _finite(rows[cid]["max_rel_err"]) and rows[cid]["max_rel_err"] > 0

    bench = json.loads((out / "bench.json").read_text())
    assert [(r["suite"], r["cell"], r["mode"], r["backend"]) for r in bench["rows"]] == [
        ("custom", "rnn", "fwd", b) for b in FUSED
    ]
    assert all(r["status"] in ("ok", "unavailable") for r in bench["rows"])
    assert bench["metadata"]["tool"] == "fused_rnn.bench.gpu_check"
    assert (out / "bench.csv").read_text().count("\ncustom,rnn,") == 2
    table = _assert_summary_last(proc, "FAIL")
    assert any("hang" in line and "gru/base/fp32/persistent" in line for line in table)
