"""The benchmark CLI (fused_rnn.bench): suites, timers, end-to-end runs on CPU, outputs.

Runs are tiny (T<=6, H<=12, a few reps, one thread) so the file stays well under 30 s.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from fused_rnn.bench import SUITES, cli, report, runner, suites, timing
from fused_rnn.bench.suites import Shape

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# tiny custom suite on CPU (one thread: the CPU default)
TINY = ["--device", "cpu", "--seq-len", "5", "--batch", "3", "--input-size", "7",
        "--hidden-size", "9", "--warmup", "1", "--reps", "3"]  # fmt: skip
META_KEYS = {
    "device_name", "torch_version", "triton_version", "cuda_version", "python_version",
    "date_utc", "host", "command",
}  # fmt: skip
# fp32 on CPU, H=9: fused_rnn's CPU path and torch.nn agree to rounding
FP32_TOL = 1e-4


def _read_csv(path):
    """(metadata lines, rows) of a bench CSV: '# key: value' lines, then a normal CSV."""
    meta, body = {}, []
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("# "):
            k, v = line[2:].rstrip("\n").split(": ", 1)
            meta[k] = v
        else:
            body.append(line)
    return meta, list(csv.DictReader(io.StringIO("".join(body))))


def _run_module(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fused_rnn.bench", *args], capture_output=True,
                          text=True, timeout=120, env=env, **kw)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# suites


def test_suite_sizes_are_the_published_ones():
    def sizes(name):
        return {(s.cell, s.seq_len, s.batch, s.input_size, s.hidden_size, s.num_layers,
                 s.bidirectional, s.proj_size) for s in SUITES[name].shapes}  # fmt: skip

    def every_cell(*size):
        return {(c, *size) for c in ("lstm", "gru", "rnn")}

    assert sizes("fastrnns") == every_cell(100, 64, 512, 512, 1, False, 0)
    assert sizes("flashrnn") == every_cell(1024, 16, 768, 768, 1, False, 0)
    assert sizes("deepbench") == {
        ("lstm", 25, 128, 1024, 1024, 1, False, 0),
        ("gru", 187, 32, 1024, 1024, 1, False, 0),
        ("rnn", 50, 16, 1760, 1760, 1, False, 0),
    }
    assert sizes("small-batch") == every_cell(1000, 1, 256, 256, 1, False, 0)
    assert sizes("large") == every_cell(100, 256, 1024, 1024, 1, False, 0)
    assert sizes("stack") == every_cell(200, 32, 512, 512, 2, True, 0)
    cpu = SUITES["cpu-default"]
    assert set(cpu.cells) == {"lstm", "gru", "rnn"}
    assert set(cpu.modes) == {"fwd", "fwdbwd"}
    assert len({s.label() for s in cpu.shapes}) >= 2
    assert all(s.seq_len * s.batch * s.hidden_size <= 100 * 32 * 256 for s in cpu.shapes)
    for suite in SUITES.values():
        assert suite.modes == ("fwd", "fwdbwd")


def test_custom_suite_and_defaults():
    s = suites.custom_suite(seq_len=7, hidden_size=12)
    assert s.name == "custom"
    assert [(x.cell, x.seq_len, x.batch, x.input_size, x.hidden_size) for x in s.shapes] == [
        ("lstm", 7, 16, 12, 12), ("gru", 7, 16, 12, 12), ("rnn", 7, 16, 12, 12),
    ]  # fmt: skip
    proj = suites.custom_suite(hidden_size=12, proj_size=5, num_layers=2, bidirectional=True)
    assert [(x.cell, x.proj_size, x.num_layers, x.bidirectional) for x in proj.shapes] == [
        ("lstm", 5, 2, True)
    ]
    with pytest.raises(ValueError, match="proj_size"):
        Shape("gru", 1, 1, 1, 4, proj_size=2)
    with pytest.raises(ValueError, match="proj_size"):
        Shape("lstm", 1, 1, 1, 4, proj_size=4)
    assert suites.default_suite_names("cpu") == ("cpu-default",)
    assert suites.default_suite_names("cuda") == ("fastrnns", "flashrnn")
    assert cli.default_dtypes("cuda") == ["bf16"] and cli.default_dtypes("cpu") == ["fp32"]
    parser = cli.build_parser()
    no_args = parser.parse_args([])
    assert [x.name for x in cli._suites(parser, no_args, torch.device("cpu"))] == ["cpu-default"]
    assert [x.name for x in cli._suites(parser, no_args, torch.device("cuda"))] == [
        "fastrnns", "flashrnn",
    ]  # fmt: skip
    every = parser.parse_args(["--suite", "all", "--seq-len", "3"])
    assert [x.name for x in cli._suites(parser, every, torch.device("cpu"))] == [
        *SUITES, "custom",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# timing


def test_summarize_statistics():
    t = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.min_ms, t.q1_ms, t.q3_ms, t.reps) == (3.0, 1.0, 2.0, 4.0, 5)
    assert t.iqr_ms == 2.0
    one = timing.summarize([0.5])
    assert (one.median_ms, one.iqr_ms, one.reps) == (0.5, 0.0, 1)
    with pytest.raises(ValueError):
        timing.summarize([])


def test_measure_counts_warmup_and_reps():
    calls = []
    t = timing.measure(lambda: calls.append(1), "cpu", warmup=2, reps=7, budget_s=None)
    assert len(calls) == 9 and t.reps == 7
    assert 0 <= t.min_ms <= t.median_ms

    # A budget far below one run's cost still leaves MIN_REPS runs (or reps, if fewer).
    calls.clear()
    slow = lambda: (calls.append(1), sum(range(20000)))
    t = timing.measure(slow, "cpu", warmup=1, reps=50, budget_s=1e-9)
    assert t.reps == timing.MIN_REPS and len(calls) == 1 + timing.MIN_REPS
    t = timing.measure(slow, "cpu", warmup=1, reps=3, budget_s=1e-9)
    assert t.reps == 3


def test_precision_sets_and_restores_tf32_flags():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    with runner.precision("tf32"):
        assert matmul.allow_tf32 and cudnn.allow_tf32
    assert (matmul.allow_tf32, cudnn.allow_tf32) == before
    with pytest.raises(RuntimeError), runner.precision("fp32"):
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
        raise RuntimeError
    assert (matmul.allow_tf32, cudnn.allow_tf32) == before


def test_fwdbwd_step_returns_input_and_parameter_grads():
    model = torch.nn.LSTM(4, 6)
    x = torch.randn(3, 2, 4, requires_grad=True)
    grads = runner.step_fn(model, x, "fwdbwd")()
    params = list(model.parameters())
    assert len(grads) == 1 + len(params)
    assert grads[0].shape == x.shape
    assert all(g.shape == p.shape for g, p in zip(grads[1:], params, strict=True))
    assert all(p.grad is None for p in params) and x.grad is None  # nothing accumulates
    out = runner.step_fn(model, x, "fwd")()
    assert out.shape == (3, 2, 6) and not out.requires_grad


# ---------------------------------------------------------------------------------------------
# end to end


def test_module_entry_point_end_to_end(tmp_path):
    """`python -m fused_rnn.bench` on a tiny custom suite: table, JSON, CSV and PNG."""
    out, png = tmp_path / "res" / "run1", tmp_path / "ratios.png"
    r = _run_module([*TINY, "--out", str(out), "--plot", str(png)])
    assert r.returncode == 0, r.stderr
    assert "torch_ms / fused_ms" in r.stdout and "fused_rnn is faster" in r.stdout
    table = [line for line in r.stdout.splitlines() if line.startswith("custom ")]
    assert len(table) == 6  # 3 cells x 2 modes
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 1000

    doc = json.loads((tmp_path / "res" / "run1.json").read_text())
    assert META_KEYS <= doc["metadata"].keys()
    assert doc["metadata"]["command"].startswith("fused-rnn-bench --device cpu")
    assert doc["metadata"]["torch_version"] == torch.__version__
    rows = doc["rows"]
    assert {(r["cell"], r["mode"]) for r in rows} == {
        (c, m) for c in ("lstm", "gru", "rnn") for m in ("fwd", "fwdbwd")
    }
    for row in rows:
        assert row["status"] == "ok", row
        assert (row["seq_len"], row["batch"], row["input_size"], row["hidden_size"]) == (5, 3, 7, 9)
        assert row["torch_ms"] > 0 and row["fused_ms"] > 0
        assert row["ratio"] == pytest.approx(row["torch_ms"] / row["fused_ms"])
        assert row["fused_us_per_step"] == pytest.approx(row["fused_ms"] * 1e3 / 5)
        assert row["max_abs_diff"] < FP32_TOL
        if row["mode"] == "fwdbwd":
            assert row["grad_max_abs_diff"] < FP32_TOL
        else:
            assert row["grad_max_abs_diff"] is None

    meta, csv_rows = _read_csv(tmp_path / "res" / "run1.csv")
    assert META_KEYS <= meta.keys()
    assert len(csv_rows) == 6
    assert set(csv_rows[0]) == set(rows[0])
    for c, j in zip(csv_rows, rows, strict=True):
        assert (c["cell"], c["mode"]) == (j["cell"], j["mode"])
        assert float(c["fused_ms"]) == pytest.approx(j["fused_ms"])


def test_main_in_process(tmp_path, capsys):
    """main([...]) returns 0, filters by cell/mode/dtype, writes into a folder given as --out."""
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    args = [*TINY, "--cell", "lstm", "--cell", "gru", "--mode", "fwdbwd", "--dtype", "fp32,tf32",
            "--layers", "2", "--bidirectional", "--out", str(outdir)]  # fmt: skip
    threads = torch.get_num_threads()
    assert cli.main(args) == 0
    assert torch.get_num_threads() == threads  # the thread count is put back
    captured = capsys.readouterr()
    assert "T5 B3 I7 H9 L2 bi" in captured.out
    assert "tf32 only changes CUDA" in captured.err
    assert "[" in captured.err and "4/4" in captured.err  # progress bar reached the end

    (json_path,) = outdir.glob("*.json")
    (csv_path,) = outdir.glob("*.csv")
    assert json_path.stem == csv_path.stem
    doc = json.loads(json_path.read_text())
    rows = doc["rows"]
    assert sorted((r["cell"], r["dtype"]) for r in rows) == [
        ("gru", "fp32"), ("gru", "tf32"), ("lstm", "fp32"), ("lstm", "tf32"),
    ]  # fmt: skip
    assert all(r["mode"] == "fwdbwd" and r["num_layers"] == 2 and r["bidirectional"] for r in rows)
    assert all(r["status"] == "ok" and r["grad_max_abs_diff"] < FP32_TOL for r in rows)
    assert doc["metadata"]["options"]["dtypes"] == ["fp32", "tf32"]
    assert doc["metadata"]["torch_threads"] == 1


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_projection_and_variants(tmp_path, capsys):
    """proj_size runs LSTM only; a variant is timed against plain torch.nn.LSTM, not compared."""
    out = tmp_path / "v.json"  # the .json suffix is not doubled
    args = [*TINY, "--proj-size", "4", "--variant", "none,peephole,cifg,peephole-cifg",
            "--mode", "fwd", "--out", str(out), "-q", "--threads", "2"]  # fmt: skip
    threads = torch.get_num_threads()
    assert cli.main(args) == 0
    assert torch.get_num_threads() == threads
    assert "/4" not in capsys.readouterr().err  # -q: no progress bar
    doc = json.loads(out.read_text())
    assert doc["metadata"]["torch_threads"] == 2
    rows = doc["rows"]
    assert (tmp_path / "v.csv").exists()
    assert [r["variant"] for r in rows] == ["none", "peephole", "cifg", "peephole-cifg"]
    assert all(r["cell"] == "lstm" and r["proj_size"] == 4 and r["status"] == "ok" for r in rows)
    assert rows[0]["max_abs_diff"] < FP32_TOL
    assert all(r["max_abs_diff"] is None for r in rows[1:])
    assert len({r["torch_ms"] for r in rows}) == 1  # one torch.nn measurement shared


def test_unavailable_and_failing_backends(monkeypatch, tmp_path, capsys):
    """A backend fused_rnn says it lacks is 'unavailable' (exit 0); a crash is 'error' (exit 1)."""
    monkeypatch.setattr(runner, "available_backends", lambda device, cell="lstm": {"auto", "torch"})
    out = tmp_path / "u"
    args = [*TINY, "--cell", "rnn", "--mode", "fwd", "--backend", "torch,persistent",
            "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    rows = json.loads((tmp_path / "u.json").read_text())["rows"]
    assert [(r["backend"], r["status"]) for r in rows] == [
        ("torch", "ok"),
        ("persistent", "unavailable"),
    ]
    assert (
        rows[1]["fused_ms"] is None
        and rows[1]["ratio"] is None
        and "persistent" in rows[1]["error"]
    )
    capsys.readouterr()

    def broken(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(runner, "build_fused", broken)
    assert (
        cli.main([*TINY, "--cell", "gru", "--mode", "fwd", "--plot", str(tmp_path / "e.png")]) == 1
    )
    captured = capsys.readouterr()
    assert "kernel exploded" in captured.out and "1 of 1 rows failed" in captured.err
    assert (tmp_path / "e.png").read_bytes()[:8] == PNG_SIGNATURE  # a plot even with no bars


def test_output_mismatch_is_flagged(monkeypatch, tmp_path, capsys):
    """Fused outputs that disagree with torch.nn (here: NaN) are timed but marked, exit 1."""
    monkeypatch.setattr(runner, "compare", lambda *a: (float("nan"), None))
    out = tmp_path / "m"
    assert cli.main([*TINY, "--cell", "lstm", "--mode", "fwd", "-q", "--out", str(out)]) == 1
    (row,) = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert row["status"] == "mismatch" and row["max_abs_diff"] == "nan"
    assert row["fused_ms"] > 0 and "outputs differ from torch.nn" in row["error"]
    assert "mismatch" in capsys.readouterr().out


def test_list(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in SUITES:
        assert f"{name}:" in out
    assert "T1024 B16 I768 H768" in out and "T50 B16 I1760 H1760" in out


def test_no_triton_or_matplotlib_needed_and_module_exit_code():
    """With triton and matplotlib unimportable the bench still imports and lists; --plot says
    what is missing; `python -m fused_rnn.bench` exits 2 on a bad argument. One subprocess."""
    code = """
import runpy, sys
sys.modules["triton"] = None
sys.modules["matplotlib"] = None
from fused_rnn.bench import cli, plot, report, runner, timing
assert cli.main(["--list"]) == 0
assert cli.main(["--plot", "x.png"]) == 2
sys.argv = ["fused-rnn-bench", "--device", "cpu", "--suite", "nope"]
runpy.run_module("fused_rnn.bench", run_name="__main__")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "flashrnn:" in r.stdout
    assert "--plot needs matplotlib" in r.stderr
    assert "unknown value 'nope'" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--suite", "nope"], "unknown value 'nope'"),
        (["--cell", "lstm,cnn"], "unknown value 'cnn'"),
        (["--dtype", "fp8"], "unknown value 'fp8'"),
        (["--mode", "bwd"], "unknown value 'bwd'"),
        (["--backend", "cudnn"], "unknown value 'cudnn'"),
        (["--variant", "peephole", "--cell", "gru"], "variants other than none apply to LSTM"),
        (["--seq-len", "0"], "expected an integer >= 1"),
        (["--reps", "many"], "expected an integer"),
        (["--hidden-size", "8", "--proj-size", "8"], "proj_size must be"),
        (["--proj-size", "4", "--cell", "rnn"], "--proj-size makes the custom suite LSTM only"),
        (["--device", "tpu"], "--device"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) else None,
)
def test_bad_arguments(args, message, capsys):
    assert cli.main(["--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert "usage: fused-rnn-bench" in err and message in err


def test_output_paths(tmp_path):
    assert report.output_paths(tmp_path / "a" / "r.csv", "S") == (
        tmp_path / "a" / "r.json", tmp_path / "a" / "r.csv",
    )  # fmt: skip
    assert (tmp_path / "a").is_dir()
    assert report.output_paths(str(tmp_path / "new") + os.sep, "S") == (
        tmp_path / "new" / "fused_rnn_bench_S.json", tmp_path / "new" / "fused_rnn_bench_S.csv",
    )  # fmt: skip


def test_cuda_device_refused_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    assert cli.main(["--device", "cuda", "--list"]) == 0  # --list needs no device
    assert cli.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
