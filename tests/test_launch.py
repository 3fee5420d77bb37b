"""The lean launches of the stepwise loops (kernels/_launch.py) and the host-cost script.

Under the interpreter (this process) the lean path cannot be set up: every loop must fall back
to `kernel[grid](...)`, visibly (STATS), with the same results. The lean path itself is checked
in a subprocess with the compiled kernels under the stub CUDA driver of bench/host_cost.py: its
raw launches must equal, call for call, those of the plain path (kernel, grid, metadata, every
argument; tensors by buffer), and it must actually be the path taken.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from fused_rnn.bench.host_cost import compare_records
from fused_rnn.kernels import _launch, gru, lstm
from fused_rnn.kernels._common import is_interpreter


def _lstm_case(T=4, B=3, H=20, P=0):
    R = P or H
    gx, h0, c0 = torch.randn(T, B, 4 * H), torch.randn(B, R), torch.randn(B, H)
    w_hh = torch.randn(4 * H, R) * 0.3
    w_hr = torch.randn(P, H) * 0.3 if P else None
    return gx, h0, c0, w_hh, w_hr


@pytest.mark.skipif(not is_interpreter(), reason="checks the interpreter's fallback")
@pytest.mark.parametrize("P", [0, 12], ids=["LSTM", "LSTM-proj"])
def test_interpreter_falls_back_to_plain_launches(P):
    gx, h0, c0, w_hh, w_hr = _lstm_case(P=P)
    before = _launch.STATS.copy()
    out = lstm.lstm_fwd(gx, h0, c0, w_hh, w_hr, None, None, False, False, True)
    used = _launch.STATS - before
    loops = 2 if P else 1  # the cell kernel, and the projection's
    assert used["plain:interpreter"] == loops and used["lean"] == 0
    # the same launches with the switch off: identical results, bit for bit
    with _launch.lean_launches(False):
        ref = lstm.lstm_fwd(gx, h0, c0, w_hh, w_hr, None, None, False, False, True)
    used = _launch.STATS - before
    assert used["plain:switched off"] == loops
    for a, b in zip(out, ref):
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.skipif(not is_interpreter(), reason="checks the interpreter's fallback")
def test_interpreter_fallback_gru_backward():
    T, B, H = 4, 3, 20
    gx, h0, w_hh = torch.randn(T, B, 3 * H), torch.randn(B, H), torch.randn(3 * H, H) * 0.3
    _, hs, ws = gru.gru_fwd(gru.CELL_GRU, gx, h0, w_hh, None, None, False, True)
    dy, dhT = torch.randn(T, B, H), torch.randn(B, H)
    before = _launch.STATS.copy()
    out = gru.gru_bwd(gru.CELL_GRU, dy, dhT, hs, ws, w_hh, None, False, (True, True, True, False))
    assert (_launch.STATS - before)["plain:interpreter"] == 1
    with _launch.lean_launches(False):
        ref = gru.gru_bwd(
            gru.CELL_GRU, dy, dhT, hs, ws, w_hh, None, False, (True, True, True, False)
        )
    for a, b in zip(out, ref):
        if a is not None:
            assert torch.equal(a, b)


def test_step_arguments_must_not_be_specialized():
    # B is specialized (divisibility by 16): one compiled kernel could not serve every value
    with pytest.raises(ValueError, match="do_not_specialize"):
        _launch.step_launcher(lstm._lstm_fwd_proj_kernel, (1, 1), ("t", "B"))
    _launch.step_launcher(lstm._lstm_fwd_proj_kernel, (1, 1), ("t",))  # builds, launches nothing


def test_switch_from_environment(monkeypatch):
    assert _launch.lean_enabled()
    monkeypatch.setenv("FUSED_RNN_LEAN_LAUNCH", "0")
    assert not _launch.lean_enabled()
    monkeypatch.delenv("FUSED_RNN_LEAN_LAUNCH")
    with _launch.lean_launches(False):
        assert not _launch.lean_enabled()
    assert _launch.lean_enabled()


def test_compare_records_finds_differences():
    """The lean == plain check of host_cost must see a wrong step value, a swapped buffer and a
    missing launch (else a passing subprocess check below would prove nothing)."""
    a, b = torch.zeros(4), torch.zeros(4)
    meta = (4, 1, 0)

    def call(x, y, t):  # Triton 3.9's layout: the kernel's arguments as one tuple at the end
        return (2, 1, 1, 0, 7, False, False, meta, None, None, None, None, None, (x, y, 16, t))

    plain = [call(a, b, 0), call(a, b, 1)]
    assert compare_records(plain, [call(a, b, 0), call(a.data_ptr(), b.data_ptr(), 1)]) is None
    assert "argument" in compare_records(plain, [call(a, b, 0), call(a, b, 2)])
    assert "buffer" in compare_records(plain, [call(a, b, 0), call(b.data_ptr(), b, 1)])
    assert "launches" in compare_records(plain, [call(a, b, 0)])
    # 3.6's layout: everything flat
    flat = [(2, 1, 1, a, b, 16, t) for t in (0, 1)]
    assert (
        compare_records(flat, [(2, 1, 1, a.data_ptr(), b.data_ptr(), 16, t) for t in (0, 1)])
        is None
    )


def _compiled_env():
    env = dict(os.environ, TRITON_INTERPRET="0", FUSED_RNN_POISON="0")
    env.pop("FUSED_RNN_LEAN_LAUNCH", None)
    return env


@pytest.mark.slow
def test_host_cost_script_end_to_end(tmp_path):
    """The script runs on CPU (compiled kernels, stub driver), checks lean == plain launches for
    every case and reports figures for both paths; the lean rows really took the lean path.
    No timing is asserted."""
    out = tmp_path / "hc.json"
    cmd = [sys.executable, "-m", "fused_rnn.bench.host_cost", "-T", "8", "--repeat", "1"]
    proc = subprocess.run(
        cmd + ["--warmup", "1", "--json", str(out)],
        env=_compiled_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert set(res["checks"]) == {"lstm", "lstm-proj", "gru"}
    for name, c in res["checks"].items():
        assert c["identical"], (name, c["difference"])
        assert c["launches"] > 0
    rows = {(r["case"], r["path"]): r for r in res["rows"]}
    per_step = {"lstm": 1, "lstm-proj": 2, "gru": 1}  # launches per step and direction
    # plain launches in one forward and backward call on the lean path: each loop's first step,
    # each backward's first-step variant, the GRU's dh0 launch
    first = {"lstm": 1 + 2, "lstm-proj": 2 + 4, "gru": 1 + 3}
    for (case, path), r in rows.items():
        assert r["launches_fwd"] == 8 * per_step[case]
        for k in ("fwd_us_per_step", "fwd_us_per_launch", "fwdbwd_us_per_step"):
            assert 0 < r[k] < 1e6, (case, path, k, r[k])
        if path == "plain":
            assert r["plain_launches"] == r["launches_fwd"] + r["launches_bwd"]
            assert r["lean_loops"] == 0 and r["plain_loops"] == 2 * per_step[case]
        else:
            assert r["plain_launches"] == first[case]
            assert r["lean_loops"] == 2 * per_step[case] and r["plain_loops"] == 0
    assert res["env"]["triton"] and res["env"]["torch"]


_HOOK_SCRIPT = """
import json
from triton import knobs
from fused_rnn.bench.host_cost import make_case, stub_cuda_driver
from fused_rnn.kernels._launch import STATS
import torch
seen_by_hook = []
hook = lambda metadata: seen_by_hook.append(1)
with stub_cuda_driver() as seen:
    case = make_case("gru", 5, 16, 64, torch.float32)
    case.fwd()
    lean = dict(STATS); raw = seen.raw
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
    else:
        knobs.runtime.launch_enter_hook = hook
    seen.reset()
    case.fwd()
print(json.dumps({"lean": lean, "after": dict(STATS), "raw": seen.raw, "plain": seen.plain}))
"""


@pytest.mark.slow
def test_launch_hooks_force_plain_launches():
    """A profiler's launch hook wants every launch: with one set, the loop launches the plain way.
    (The hook itself is called by the raw launch, a no-op in the stub.)"""
    proc = subprocess.run(
        [sys.executable, "-c", _HOOK_SCRIPT], env=_compiled_env(), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["lean"].get("lean") == 1
    assert res["after"].get("plain:launch hooks") == 1
    assert res["raw"] == 5 and res["plain"] == 5
