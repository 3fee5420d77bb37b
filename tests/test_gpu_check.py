"""The device check script (fused_rnn.bench.gpu_check), run here as it runs on a GPU machine.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 with --tiny sizes. Each run is a
subprocess with its own worker processes, so what is tested is the whole path: the plan, the
workers, the float64 reference and torch.nn baseline, the watchdog, the phases and their
budget, the files and the table printed last. One tiny run of every stage (about two minutes on
2 busy cores) is shared by the tests that read its files; a run with injected faults and a run
cut short by its budget are the others. The barrier micro-benchmark kernel is also run here with
several programs (a thread each) and, compiled for sm_90, up to its launch under a stub driver.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl  # noqa: F401 (Triton asks for it in the module of a jit function)

from fused_rnn.bench import SUITES, build_policy, gpu_check
from fused_rnn.kernels._common import _grid_barrier

FUSED = ("stepwise", "persistent")
# what a GPU machine's output folder returns: at most 8 files of at most 16 MiB, named with
# letters, digits, '.', '_' and '-'
MAX_FILES, MAX_BYTES, NAME = 8, 16 * 2**20, re.compile(r"^[A-Za-z0-9._-]+$")


def _run(out, *args, timeout=900):
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


def _assert_summary_last(proc, out, result: str) -> list[str]:
    """The summary table is the last thing printed, after every check's line, and summary.txt
    holds the same table."""
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1].startswith(f"RESULT: {result}"), _why(proc)
    head = max(i for i, line in enumerate(lines) if "gpu_check summary" in line)
    progress = [i for i, line in enumerate(lines) if line.startswith("[") and "/" in line[:12]]
    assert progress and max(progress) < head  # every check's line came before the table
    table = lines[head:]
    assert (out / "summary.txt").read_text().strip().splitlines()[-len(table) :] == table
    log = (out / "gpu_check.log").read_text()
    assert log.rstrip().splitlines()[-1] == lines[-1]
    return table


def _args():
    """The options of a plain run."""
    return gpu_check.build_parser().parse_args([])


# ----------------------------------------------------------------------------- the plan


def test_plan_covers_the_matrix():
    """The full plan has every cell kind in every dtype and every awkward configuration, cheapest
    first; the graph size sits at the graph cache's threshold."""
    from fused_rnn import _ops

    plan = gpu_check.correctness_plan("full")
    assert {k for k, _, _ in plan} == set(gpu_check.KINDS)
    for kind in gpu_check.KINDS:
        assert {d for k, _, d in plan if k == kind} == {"fp32", "tf32", "fp16", "bf16"}, kind
    sizes = {s.name: s for _, s, _ in plan}
    assert {"layers2", "bidir", "batch_first", "nobias", "packed", "B1", "T1", "H33", "medium",
            "flashrnn", "graphs"} <= set(sizes)  # fmt: skip
    assert sizes["H33"].H % 16 and sizes["B1"].B == 1 and sizes["T1"].T == 1
    assert sizes["layers2"].layers == 2 and sizes["packed"].packed and not sizes["nobias"].bias
    assert sizes["graphs"].T == _ops.GRAPH_MIN_STEPS and sizes["medium"].T > _ops.GRAPH_MIN_STEPS
    flash = sizes["flashrnn"]
    assert (flash.T, flash.B, flash.I, flash.H, flash.mode) == (1024, 16, 768, 768, "fwd")
    assert all(s.mode == "fwdbwd" for n, s in sizes.items() if n != "flashrnn")
    costs = [gpu_check._cost(e) for e in plan]
    assert costs == sorted(costs) and plan[-1][1].name == "flashrnn"  # fast configs first
    for dtype, (tol, why) in gpu_check.TOLERANCES.items():
        assert 0 < tol < 0.1 and len(why) > 40, dtype
    assert set(gpu_check.correctness_plan("quick")) <= set(plan)


def test_bench_plan_order_and_coverage():
    """Every suite in fp16, bf16, fp32 with TF32 on and off, fwd and fwdbwd, both fused
    backends; the flashrnn size in fp16/bf16 first, then fastrnns, then the rest."""
    configs = gpu_check._bench_configs("full")
    suites = {"fastrnns", "flashrnn", "deepbench", "small-batch", "large", "stack"}
    assert suites <= set(SUITES)
    for suite in suites:
        for shape in SUITES[suite].shapes:
            for dtype in ("fp16", "bf16", "tf32", "fp32"):
                for mode in ("fwd", "fwdbwd"):
                    assert configs.count((suite, shape, dtype, mode)) == 1, (suite, dtype, mode)
    assert len(configs) == sum(len(SUITES[s].shapes) for s in suites) * 4 * 2
    order = [(s, d) for s, _, d, _ in configs]
    assert set(order[:12]) == {("flashrnn", "fp16"), ("flashrnn", "bf16")}
    assert {s for s, _ in order[12:36]} == {"fastrnns"}
    quick = gpu_check._bench_configs("quick")
    assert {(s, d) for s, _, d, _ in quick} == {("flashrnn", "fp16"), ("flashrnn", "bf16"),
                                                ("fastrnns", "bf16")}  # fmt: skip


def test_gpu_plan_has_every_stage_and_fits_the_budget():
    """The GPU plan (planned for CUDA on any machine) has a check of every path and every
    micro-benchmark, a bench task per config with both fused backends and a compile warm-up
    each; its estimate (a model) stays within the budget and 8 minutes."""
    plan = gpu_check.plan_tasks(_args(), torch.device("cuda"), "full", 0)
    ids = {c["id"] for t in plan.paths for c in t["checks"]}
    assert ids == {"auto/auto", "autotune/auto"} | {
        f"{w}/{b}" for w in ("convert", "hvp", "compile", "compile-ro", "schedules") for b in FUSED
    }
    assert {c["id"] for t in plan.extras for c in t["checks"]} == {
        f"{w}/{b}" for w in ("ddp", "autocast") for b in FUSED
    }
    micro = [c["id"] for t in plan.micro for c in t["checks"]]
    assert micro == [f"barrier/p{p}" for p in (1, 8, 32, 66, 132)] + [
        f"launch/{p}" for p in ("eager", "lean", "graph")
    ]
    assert len(plan.bench) == len(gpu_check._bench_configs("full"))
    assert all([c["backend"] for c in t["checks"]] == list(FUSED) for t in plan.bench)
    assert len(plan.warm) == 2 * len(plan.bench) and not plan.pre
    stages = gpu_check.estimate(plan, "full", 6, 4, 2)
    assert [s for s, *_ in stages] == ["startup", "correctness", "micro", "bench", "extras"]
    assert all(n > 0 and sec > 0 for _, n, sec, _ in stages)
    total = sum(sec for _, _, sec, _ in stages)
    assert total <= min(gpu_check.BUDGET_S["full"], 8 * 60), stages
    # each phase, as estimated, ends before its share of the budget stops new work
    t = 0.0
    for stage, _, sec, _ in stages:
        t += sec
        if stage in gpu_check.PHASE_END:
            assert t <= gpu_check.PHASE_END[stage] * gpu_check.BUDGET_S["full"], (stage, t)


def test_plan_option_prints_the_estimate(capsys):
    assert gpu_check.main(["--plan"]) == 0
    out = capsys.readouterr().out
    assert "a model, not a measurement" in out and "of a 450 s budget" in out
    for stage in ("startup", "correctness", "micro", "bench", "extras"):
        assert re.search(rf"^\s+{stage}\s+\d+ items\s+~\s*\d+ s", out, re.M), out


def test_balance_keeps_the_order_and_evens_the_load():
    tasks = [{"type": "path", "what": w, "id": w} for w in
             ("auto", "convert", "hvp", "autotune", "compile", "compile-ro")]  # fmt: skip
    queues = gpu_check._balance(tasks, 2)
    assert sorted(t["id"] for q in queues for t in q) == sorted(t["id"] for t in tasks)
    order = [t["id"] for t in tasks]
    for q in queues:
        assert [t["id"] for t in q] == [i for i in order if i in {t["id"] for t in q}]
    loads = [sum(map(gpu_check.task_cost, q)) for q in queues]
    assert max(loads) - min(loads) <= max(map(gpu_check.task_cost, tasks))


def _messages(text: str) -> list[dict]:
    return [json.loads(line[len(gpu_check._MSG) :]) for line in text.splitlines()
            if line.startswith(gpu_check._MSG)]  # fmt: skip


def test_bench_warmup_task_in_process(capsys):
    """The task that compiles a bench config's kernels ahead (a GPU-only lane) runs one pass."""
    shape = {"cell": "gru", "seq_len": 3, "batch": 2, "input_size": 4, "hidden_size": 8}
    check = {"id": "warm/x/gru/fp32/fwdbwd/stepwise", "backend": "stepwise"}
    task = {"type": "warm", "id": check["id"], "shape": shape, "dtype": "fp32",
            "mode": "fwdbwd", "checks": [check]}  # fmt: skip
    gpu_check._run_warm(task, {}, torch.device("cpu"))
    msgs = _messages(capsys.readouterr().out)
    assert msgs[0] == {"ev": "start", "check": check["id"]}
    assert msgs[1]["kind"] == "warm" and msgs[1]["row"]["status"] == "ok", msgs


def test_graph_and_launch_verdicts():
    """What the graph cache and the launch counters must show, by device and length."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    n = gpu_check._graph_min_steps()
    want = gpu_check._graph_expectation(cuda, n)
    assert want == "capture and replay"
    ok = {"calls": 3, "captures": 2, "hits": 2, "eager": 2}
    assert gpu_check._graph_verdict(want, ok) is None
    assert "expected a capture and a replay" in gpu_check._graph_verdict(want, {**ok, "hits": 0})
    for device, T in ((cuda, n - 1), (cpu, n)):
        eager = gpu_check._graph_expectation(device, T)
        assert eager.startswith("eager")
        assert gpu_check._graph_verdict(eager, {**ok, "captures": 0, "hits": 0}) is None
        assert "expected none" in gpu_check._graph_verdict(eager, ok)
    plain = {"plain": 2, "plain:interpreter": 2}
    assert gpu_check._launch_verdict(cpu, plain) is None
    assert "lean launches not used" in gpu_check._launch_verdict(cuda, plain)
    assert gpu_check._launch_verdict(cuda, {"lean": 3}) is None


# ----------------------------------------------------------------------------- one tiny run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Every stage of the --tiny plan on the CPU: (process, output folder)."""
    out = tmp_path_factory.mktemp("tiny") / "out"
    return _run(out), out


def test_tiny_run_passes(tiny):
    """Every cell kind on the stepwise kernels passes against float64 with finite errors, every
    fused backend has a row for every check, and the summary table is printed last."""
    proc, out = tiny
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
    for task in {r["id"].rsplit("/", 1)[0] for r in rows}:
        for b in FUSED:
            assert by_id[f"{task}/{b}"]["status"] in ("pass", "unavailable"), by_id[f"{task}/{b}"]
    # outputs, final states and the gradients of the input, the states and every parameter
    errs = by_id["lstm/base/fp32/stepwise"]["errors"]
    assert {"output", "h_n", "c_n", "grad_x", "grad_h0", "grad_c0", "grad_weight_ih_l0",
            "grad_weight_hh_l0", "grad_bias_ih_l0", "grad_bias_hh_l0"} <= set(errs)  # fmt: skip
    assert "grad_weight_hr_l0" in by_id["lstm-proj/base/fp32/stepwise"]["errors"]
    assert "grad_weight_ch_l0" in by_id["lstm-peephole/base/fp32/stepwise"]["errors"]
    assert by_id["lstm-peephole/base/fp32/stepwise"]["baseline"] == "fused_rnn backend=torch"
    assert by_id["gru/base/fp32/stepwise"]["baseline"] == "torch.nn"

    env = json.loads((out / "env.json").read_text())
    for key in ("device_name", "torch_version", "triton_version", "python_version", "date_utc",
                "source_sha256_16"):  # fmt: skip
        assert env[key], key
    for key in ("driver_version", "cuda_version", "cudnn_version", "git_commit", "budget_s"):
        assert key in env, key  # None on a CPU-only machine
    assert env["poison"] is True and env["level"] == "tiny"
    assert set(env["runtime_s"]) == {"correctness", "micro", "bench", "extras", "total"}

    table = _assert_summary_last(proc, out, "PASS")
    assert any(line.startswith("stepwise") and "fp32" in line for line in table)
    for part in ("paths (fp32, TF32 off):", "micro-benchmarks:", "bench: x = ", "extras:",
                 "policy: not built"):  # fmt: skip
        assert any(line.startswith(part) for line in table), part


def test_tiny_graphs_launches_and_persistent_repeats(tiny):
    """The stepwise check at the graph cache's threshold: graphs off once, then 3 calls on (off
    CUDA all eager, as the cache must do there); each stepwise check records its loops' launch
    path (plain under the interpreter); persistent checks repeat bit for bit and are compared
    with the stepwise result."""
    _, out = tiny
    rows = {r["id"]: r for r in json.loads((out / "correctness.json").read_text())["rows"]}
    g = rows["lstm/graphs/fp32/stepwise"]
    assert g["status"] == "pass" and g["repeats"] == 4, g
    assert g["graphs"] == {"calls": 3, "captures": 0, "hits": 0, "eager": 0,
                           "expected": "eager: the cache replays on CUDA only"}  # fmt: skip
    assert g["graphs_vs_off_max_abs"] == 0.0
    short = rows["lstm/base/fp32/stepwise"]
    assert short["repeats"] == 1 and short["graphs"]["expected"].startswith("eager: T=4")
    for r in rows.values():
        if r["backend"] == "stepwise" and r["status"] == "pass":
            assert r["launch"] and set(r["launch"]) == {"plain", "plain:interpreter"}, r
        if r["backend"] == "persistent" and r["status"] == "pass":
            assert r["repeats"] >= 2 and r["repeat_max_abs_diff"] == 0.0, r
            assert r["ran_as"] == "persistent", r  # one program: the interpreter's grid
            assert _finite(r["vs_stepwise_max_rel"]) and r["vs_stepwise_max_rel"] <= 2 * r["tol"]


def test_tiny_paths(tiny):
    """auto follows a written policy and torch's flags; autotuning times once, writes the cache
    file and hits it; second-order gradients and convert/revert on both fused backends;
    torch.compile as one graph; reduce-overhead is CUDA only; the stack schedules (forced) match
    the serial order."""
    _, out = tiny
    doc = json.loads((out / "correctness.json").read_text())
    paths = {r["id"]: r for r in doc["paths"]}
    both = [f"{w}/{b}" for w in ("hvp", "convert") for b in FUSED]
    for cid in ("auto/auto", "autotune/auto", "compile/stepwise", *both):
        r = paths[cid]
        assert r["status"] == "pass" and _finite(r["max_rel_err"]), r
        assert r["max_rel_err"] <= r["tol"] and r["details"], r
    auto = paths["auto/auto"]["details"]
    assert "rehearsal" in auto  # CPU: dispatch saw a fake sm_90 device
    assert [row[2] for row in auto["written_policy"]] == ["stepwise", "persistent", "torch"]
    assert all(row[3].startswith("policy") for row in auto["written_policy"])
    assert [row[1] for row in auto["flags"]] == ["torch", "stepwise"]
    for shape in paths["autotune/auto"]["details"]["shapes"]:
        first, second, third = shape["calls"]
        assert len(first[2]) == 3 and not second[2] and not third[2], shape  # timed once
        assert shape["stored"] and shape["cache_file"] == "autotune.json"
    comp = paths["compile/stepwise"]["details"]
    assert (
        comp["graphs"] == 1 and comp["fused_op_nodes"] == 2 and comp["compile_backend"] == "eager"
    )
    conv = paths["convert/stepwise"]["details"]
    assert conv["revert_bitwise_equal"] is True
    for b in FUSED:
        r = paths[f"compile-ro/{b}"]
        assert r["status"] == "unavailable" and "needs CUDA" in r["message"], r
        # the schedules, forced off CUDA: the wavefront and both directions at once vs serial
        r = paths[f"schedules/{b}"]
        assert r["status"] == "pass" and r["max_rel_err"] <= r["tol"], r
        sched = r["details"]
        assert sched["lstm-L2"]["schedules"]["wavefront"] == "wavefront (K=2): forced"
        assert sched["gru-L1-bi"]["schedules"]["directions"] == "directions: forced"
        assert sched["lstm-L2"]["schedules"]["chosen"].startswith("serial: cpu tensors")
        assert sched["lstm-L2"]["vs_serial"]["wavefront"] <= r["tol"]
        assert sched["lstm-L2-train"]["wavefront_vs_serial"] <= r["tol"]
    extras = {r["id"]: r for r in doc["extras"]}
    assert (
        extras["ddp/stepwise"]["status"] == "pass"
        and extras["autocast/stepwise"]["status"] == "pass"
    )


def test_tiny_micro(tiny):
    """The barrier kernel runs on one program under the interpreter; the bigger grids and CUDA
    graphs report that they need CUDA; eager and lean launches are timed (lean falls back to
    plain launches under the interpreter, visibly)."""
    _, out = tiny
    rows = {r["id"]: r for r in json.loads((out / "micro.json").read_text())["rows"]}
    assert rows["barrier/p1"]["status"] == "ok"
    assert rows["barrier/p1"]["interpreter_ns_per_crossing"] > 0
    for p in (8, 32, 66, 132):
        r = rows[f"barrier/p{p}"]
        assert r["status"] == "unavailable" and r["reason"].startswith("skipped on CPU: needs CUDA")
    assert rows["launch/eager"]["status"] == "ok" and rows["launch/eager"]["host_us"] > 0
    lean = rows["launch/lean"]
    assert lean["status"] == "ok" and lean["launch_path"] == "plain"
    assert lean["stats"] == {"plain": 1, "plain:interpreter": 1}
    assert rows["launch/graph"]["status"] == "unavailable"


def test_tiny_bench_feeds_build_policy(tiny):
    """bench.json is fused_rnn.bench.report's format with medians and quartiles, rows in plan
    order, and build_policy makes a policy of it (as of a GPU run: the CPU run itself is
    refused, and said so in the table)."""
    _, out = tiny
    doc = json.loads((out / "bench.json").read_text())
    rows = doc["rows"]
    assert [(r["suite"], r["cell"], r["mode"], r["backend"]) for r in rows] == [
        ("custom", "lstm", m, b) for m in ("fwd", "fwdbwd") for b in FUSED
    ]
    for r in rows:
        assert r["status"] == "ok", r
        for k in ("torch_ms", "fused_ms", "torch_p25_ms", "fused_p75_ms", "ratio"):
            assert _finite(r[k]), (k, r)
    assert doc["metadata"]["tool"] == "fused_rnn.bench.gpu_check"
    ids = {f"custom/lstm/fp32/{m}/{b}" for m in ("fwd", "fwdbwd") for b in FUSED}
    assert set(doc["metadata"]["graph_stats"]) == ids
    assert (out / "bench.csv").read_text().count("\ncustom,lstm,") == 4
    with pytest.raises(build_policy.PolicyError):
        build_policy.build([("bench.json", doc)])
    assert not (out / "policy.json").exists()
    doc["metadata"].update(device="cuda:0", compute_capability="9.0")
    policy = build_policy.build([("bench.json", doc)])
    keys = set(policy["entries"])
    assert keys == {"LSTM|fp32|sm_90|fwd|T4|B2|H8|L1|uni", "LSTM|fp32|sm_90|fwdbwd|T4|B2|H8|L1|uni"}


def test_output_files_fit_the_limits(tiny):
    _, out = tiny
    files = list(out.iterdir())
    assert len(files) <= MAX_FILES and all(f.is_file() for f in files), files
    assert {f.name for f in files} <= set(gpu_check.FILES)
    for f in files:
        assert NAME.match(f.name) and f.stat().st_size <= MAX_BYTES, f


# ----------------------------------------------------------------------------- runs that go wrong


def test_cut_short_run_still_writes_the_table_and_files(tmp_path):
    """A budget too small for the plan: no phase starts new work past its share, what ran is
    kept, everything else is reported "skipped", and the files and the table come out anyway
    (exit 1, INCOMPLETE)."""
    out = tmp_path / "short"
    proc = _run(out, "--budget-s", "5", timeout=300)
    assert proc.returncode == 1, _why(proc)
    table = _assert_summary_last(proc, out, "INCOMPLETE")
    assert any("skipped" in line for line in table)
    doc = json.loads((out / "correctness.json").read_text())
    rows = doc["rows"] + doc["paths"] + doc["extras"]
    micro = json.loads((out / "micro.json").read_text())["rows"]
    bench = json.loads((out / "bench.json").read_text())["rows"]
    assert any(r["status"] == "skipped" for r in rows)
    assert micro and all(r["status"] == "skipped" for r in micro)
    assert bench and all(r["status"] == "skipped" for r in bench)
    # every planned check has a row
    plan = gpu_check.plan_tasks(_args(), torch.device("cpu"), "tiny", 0)
    planned = {c["id"] for ph in ("correctness", "paths", "extras") for t in getattr(plan, ph)
               for c in t["checks"]} | {row["id"] for _, row, _ in plan.pre}  # fmt: skip
    assert {r["id"] for r in rows} == planned
    files = list(out.iterdir())
    assert len(files) <= MAX_FILES and all(NAME.match(f.name) for f in files)


def test_failures_hangs_and_crashes_are_reported(tmp_path):
    """A tolerance of 0 fails real checks; a worker that dies is a crash and one that stops is a
    hang (both injected), and the run goes on with fresh workers; exit status 1."""
    out = tmp_path / "bad"
    proc = _run(
        out, "--no-paths", "--no-micro", "--no-bench", "--no-extras",
        "--only", "^(lstm|gru)/base/fp32/", "--tolerance-scale", "0", "--hang-timeout", "8",
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
    table = _assert_summary_last(proc, out, "FAIL")
    assert any("hang" in line and "gru/base/fp32/persistent" in line for line in table)


# ----------------------------------------------------------------------------- the barrier kernel


@triton.jit
def _one_arrival_too_many(cnt, target):
    """A broken barrier: waits for one arrival more than the grid makes."""
    _grid_barrier(cnt, target + 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's threads; GPU: the script")
def test_barrier_kernel_on_several_programs(monkeypatch):
    """With a thread per program (tests/mp_interpreter.py) the barrier kernel crosses its grid
    barrier on 4 programs and the counter ends at steps x programs; a barrier that waits for
    one arrival too many is a hang (so the kernel really waits at `_grid_barrier`); without the
    threads a grid of several programs is refused rather than left to hang."""
    from mp_interpreter import GridHangError, threaded_programs

    from fused_rnn.bench import barrier_bench as bb

    with threaded_programs() as grid:
        row = bb.measure_barrier(4, "cpu", steps=3, reps=1)
    assert row["status"] == "ok", row
    assert [(ln.kernel, ln.grid) for ln in grid.launches] == [("_barrier_kernel", (4, 1, 1))]
    assert grid.launches[0].atomics >= 3 * 4 * 2  # an arrival and at least one poll each

    monkeypatch.setattr(bb, "_grid_barrier", _one_arrival_too_many)
    with threaded_programs(stall_s=2.0) as grid, pytest.raises(GridHangError):
        bb.launch_barrier(4, 3, "cpu")
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="one after"):
        bb.launch_barrier(4, 3, "cpu")


_STUB = r"""
import torch
from fused_rnn.bench.host_cost import stub_cuda_driver
from fused_rnn.bench import barrier_bench as bb
from fused_rnn.kernels import _launch

with stub_cuda_driver() as seen:
    seen.record = []
    bb.launch_barrier(132, 5, "cpu", stamp=True)
    call = seen.record[0]
    compiled = bb._barrier_kernel.warmup(torch.zeros(1, dtype=torch.int32),
                                         torch.zeros(6, dtype=torch.int64), 5, STAMP=True,
                                         grid=(132,), num_warps=8, launch_cooperative_grid=True)
    ptx = compiled.asm["ptx"]
    before = _launch.STATS.copy()
    seen.reset()
    launch = _launch.step_launcher(bb._empty_kernel, (1,), ("t",), x=torch.zeros(1))
    for i in range(4):
        launch(i)
    print(call[:3], call[5], seen.raw, seen.plain, dict(_launch.STATS - before),
          "globaltimer" in ptx, "red.global.gpu.release" in ptx, "ld.global.gpu.acquire" in ptx)
"""


def test_barrier_and_launch_floor_reach_the_cuda_launch():
    """The CUDA side, up to the launch: compiled for sm_90 under a stub driver whose raw launch
    does nothing (bench/host_cost.py), the barrier kernel launches once on 132 programs,
    cooperatively, its PTX holding the %globaltimer stamps and the barrier's release add and
    acquire load; the empty kernel's loop takes the lean launch path."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _STUB], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    line = res.stdout.strip().splitlines()[-1]
    # grid, the cooperative flag, raw launches (1 plain + 3 lean), launches through the plain
    # launcher, the loops prepared per path, and what the PTX holds
    assert line == "(132, 1, 1) True 4 1 {'lean': 1} True True True", line


def test_print_plan_runs_on_any_machine():
    """--dry-run lists the tasks of every phase of the GPU plan."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert gpu_check.main(["--dry-run", "--quick"]) == 0
    text = buf.getvalue()
    for phase in ("correctness", "paths", "micro", "bench", "extras"):
        assert f"  {phase}: " in text, phase
