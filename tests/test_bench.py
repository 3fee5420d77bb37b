"""The benchmark CLI (fused_rnn.bench): suites, timers, end-to-end runs on CPU, outputs.

Runs are tiny (T<=6, H<=12, a few reps, one thread) so the file stays well under 30 s.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from fused_rnn import dispatch
from fused_rnn.bench import SUITES, cli, plot, report, runner, suites, timing
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
    """The rows of a bench CSV, read as any CSV reader would: a header, then one line per row."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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


def _timing(p25, median, p75, reps=10):
    return timing.Timing(median, p25, p25, p75, reps)


def test_noise_rule_is_overlap_of_the_interquartile_ranges():
    ref = _timing(9.0, 10.0, 11.0)
    cases = [
        # (new side, within noise): overlapping, touching, nested, disjoint either way
        (_timing(10.5, 12.0, 13.0), True),
        (_timing(11.0, 12.0, 13.0), True),
        (_timing(9.5, 10.0, 10.5), True),
        (_timing(11.5, 12.0, 13.0), False),
        (_timing(5.0, 6.0, 8.9), False),
    ]
    for new, noisy in cases:
        assert timing.within_noise(ref, new) is noisy
        lo, hi = timing.ratio_range(ref, new)
        assert lo == ref.q1_ms / new.q3_ms and hi == ref.q3_ms / new.q1_ms
        assert lo <= ref.median_ms / new.median_ms <= hi
        assert (lo <= 1 <= hi) is noisy  # the rule, read on the ratio
    few = _timing(1.0, 1.0, 1.0, reps=timing.MIN_SPREAD_REPS - 1)
    assert timing.within_noise(ref, few) is None and timing.ratio_range(ref, few) is None
    assert timing.within_noise(few, ref) is None


def _row(backend="auto", resolved="torch", **kw):
    shape = Shape("gru", 50, 16, 128, 128)
    row = runner.Row(suite="s", cell="gru", variant="none", seq_len=50, batch=16, input_size=128,
                     hidden_size=128, num_layers=1, bidirectional=False, proj_size=0,
                     dtype="fp32", mode="fwdbwd", device="cpu", backend=backend,
                     resolved_backend=resolved, shape=shape, **kw)  # fmt: skip
    return row


def test_table_shows_spread_and_marks_noise():
    """A loaded run: GRU fwdbwd at ratio 0.79 with a 4.1 ms IQR on a 7 ms median is noise."""
    noisy, clear, few = _row(), _row(), _row()
    gone, gone_too = (
        _row(backend="stepwise", resolved=None),
        _row(backend="stepwise", resolved=None),
    )
    noisy.set_torch(_timing(4.0, 5.5, 8.1))
    noisy.set_fused(_timing(5.0, 7.0, 9.1))
    clear.set_torch(_timing(5.4, 5.5, 5.6))
    clear.set_fused(_timing(6.9, 7.0, 7.1))
    few.set_torch(_timing(5.4, 5.5, 5.6, reps=1))
    few.set_fused(_timing(6.9, 7.0, 7.1, reps=1))
    for r in (gone, gone_too):
        r.status, r.error = "unavailable", "stepwise: why, and how"
    assert (noisy.within_noise, clear.within_noise, few.within_noise) == (True, False, None)
    assert noisy.ratio == pytest.approx(5.5 / 7.0) and noisy.ratio_lo == pytest.approx(4.0 / 9.1)

    lines = report.format_table([noisy, gone, clear, few, gone_too]).splitlines()
    head = lines.index(next(line for line in lines if line.startswith("suite")))
    cols = lines[head].split()
    assert cols[6:12] == ["torch", "ms", "IQR", "fused", "ms", "IQR"] and "noise" in cols
    noisy_, gone_, clear_, few_ = [line.split() for line in lines[head + 2 : head + 6]]
    # (the size is 4 words) backend, torch ms, IQR, fused ms, IQR, ratio, then the mark: '' for
    # a clear difference, so the next column (torch µs/step) follows
    assert noisy_[8:15] == ["auto->torch", "5.500", "4.100", "7.000", "4.100", "0.79", "~"]
    assert clear_[8:15] == ["auto->torch", "5.500", "0.200", "7.000", "0.200", "0.79", "110.0"]
    assert few_[13:15] == ["0.79", "?"]
    assert gone_[8:15] == ["stepwise", "-", "-", "-", "-", "-", "-"]
    assert "unavailable (rows 2, 5): stepwise: why, and how" in lines  # one note, both rows
    assert sum("why, and how" in line for line in lines) == 1
    assert report.NOISE_NOTE in lines


def test_plot_and_table_name_rows_alike():
    row = _row()
    assert report.backend_label(row) == "auto->torch"
    assert plot.row_label(row).endswith(" fwdbwd auto->torch")
    assert report.backend_label(_row(backend="stepwise", resolved="stepwise")) == "stepwise"
    table = report.format_table([row])
    assert " auto->torch " in table


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

    csv_path = tmp_path / "res" / "run1.csv"
    assert csv_path.read_text().startswith("suite,cell,variant,")  # no metadata lines: JSON only
    csv_rows = _read_csv(csv_path)
    assert len(csv_rows) == 6
    assert list(csv_rows[0]) == list(rows[0])
    for c, j in zip(csv_rows, rows, strict=True):
        assert (c["cell"], c["mode"]) == (j["cell"], j["mode"])
        assert float(c["fused_ms"]) == pytest.approx(j["fused_ms"])
        assert c["within_noise"] == str(j["within_noise"])

    # each side's spread, and the noise verdict it gives, in every row
    for row in rows:
        for side in ("torch", "fused"):
            p25, med, p75 = row[f"{side}_p25_ms"], row[f"{side}_ms"], row[f"{side}_p75_ms"]
            assert p25 <= med <= p75 and row[f"{side}_iqr_ms"] == pytest.approx(p75 - p25)
        assert row["ratio_lo"] <= row["ratio"] <= row["ratio_hi"]
        assert row["within_noise"] == (row["ratio_lo"] <= 1 <= row["ratio_hi"])
    head = next(line for line in r.stdout.splitlines() if line.startswith("suite "))
    assert head.split()[6:12] == ["torch", "ms", "IQR", "fused", "ms", "IQR"]
    assert "ratio  noise" in head and "p25..p75 ranges overlap" in r.stdout


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


def test_regularised_variants(tmp_path):
    """zoneout and recurrent-dropout run for every cell, layernorm for the LSTM and the GRU, in
    training (fwdbwd: the masks are drawn), timed against the plain torch.nn module."""
    out = tmp_path / "r.json"
    args = [*TINY, "--variant", "zoneout,recurrent-dropout,layernorm", "--mode", "fwdbwd",
            "--backend", "torch", "--out", str(out), "-q"]  # fmt: skip
    assert cli.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    got = sorted((r["cell"], r["variant"]) for r in rows)
    assert got == sorted(
        [(c, v) for c in ("lstm", "gru", "rnn") for v in ("zoneout", "recurrent-dropout")]
        + [("lstm", "layernorm"), ("gru", "layernorm")]
    )
    assert all(r["status"] == "ok" and r["fused_ms"] > 0 for r in rows)
    assert all(r["max_abs_diff"] is None for r in rows)


def test_unavailable_and_failing_backends(monkeypatch, tmp_path, capsys):
    """A backend fused_rnn says it cannot run is 'unavailable' (exit 0), with fused_rnn's reason
    and how to enable it, said once; a crash is 'error' (exit 1)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU without the interpreter: no Triton
    out = tmp_path / "u"
    args = [*TINY, "--cell", "rnn", "--mode", "fwd", "--backend", "torch,persistent",
            "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    rows = json.loads((tmp_path / "u.json").read_text())["rows"]
    assert [(r["backend"], r["status"]) for r in rows] == [
        ("torch", "ok"),
        ("persistent", "unavailable"),
    ]
    why = dispatch.unavailable_reason("persistent", "RNN_TANH", torch.device("cpu"))
    assert "CUDA" in why
    gone = rows[1]
    assert gone["fused_ms"] is None and gone["ratio"] is None and gone["within_noise"] is None
    how = "To run them on CPU, set TRITON_INTERPRET=1 in the environment"
    assert gone["error"].startswith(f"persistent: {why}. {how}")
    assert f"unavailable (row 2): persistent: {why}. {how}" in capsys.readouterr().out

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
        (["--variant", "layernorm", "--cell", "rnn"], "variants layernorm do not apply to rnn"),
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
