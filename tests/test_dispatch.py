"""backend="auto": its rules, the policy and its builder, autotuning, explain, torch's flags.

No GPU is needed: a fake device (`dispatch.device_info` replaced) makes CPU tensors look like
tensors on a GPU of a given name and compute capability, the fused kernels run under
TRITON_INTERPRET=1 (tests/conftest.py), and the autotuner's timer is replaced by one that runs
the real workload and returns set times. The autotune cache lives in a temporary folder.
"""

import ast
import io
import json
import pathlib

import pytest
import torch
from torch import nn

import fused_rnn
from fused_rnn import dispatch
from fused_rnn.bench import build_policy, runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAKE = dispatch.DeviceInfo("Fake GPU 80GB", (9, 0))
CPU = torch.device("cpu")
HAS_INTERPRETER = "stepwise" in dispatch.available_backends("cpu")
needs_interpreter = pytest.mark.skipif(not HAS_INTERPRETER, reason="no fused backend on CPU here")
# fp32 under the interpreter: exact products, sums in another order than torch
TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(autouse=True)
def clean(monkeypatch, tmp_path):
    """No environment or state leaks in or out: cache in tmp_path, autotuning off, no policy
    override, TF32 and deterministic mode as torch's defaults."""
    for name in (dispatch.AUTOTUNE_ENV, dispatch.POLICY_ENV, "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(dispatch.CACHE_DIR_ENV, str(tmp_path / "cache"))
    dispatch.set_autotune(None)
    dispatch.forget()
    det = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    tf32 = torch.backends.cudnn.allow_tf32
    yield
    torch.use_deterministic_algorithms(det[0], warn_only=det[1])
    torch.backends.cudnn.allow_tf32 = tf32
    dispatch.set_autotune(None)
    monkeypatch.undo()
    dispatch.forget()


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(dispatch, "device_info", lambda device: FAKE)
    dispatch.forget()
    return FAKE


SIZES = dict(dtype=torch.float16, steps=100, batch=16, input_size=32, hidden=64)


def decide(backend="auto", mode="LSTM", **kw) -> dispatch.Decision:
    """resolve() of a call, with the Decision it recorded (and they agree)."""
    args = {**SIZES, **kw}
    with dispatch.recording() as log:
        which = dispatch.resolve(backend, mode, CPU, **args)
    (d,) = log
    assert d.backend == which
    return d


# ============================================================================ keys


def test_size_classes_and_keys():
    assert [dispatch.size_class(n) for n in (1, 2, 3, 4, 5, 512, 513, 1024)] == [
        1, 2, 4, 4, 8, 512, 1024, 1024,
    ]  # fmt: skip
    p = dispatch.Problem("LSTM", "fp16", 1000, 16, 768, 768, grad=True)
    assert p.key("sm_90") == "LSTM|fp16|sm_90|fwdbwd|T1024|B16|H1024|L1|uni"
    p = dispatch.Problem("LSTM", "bf16", 7, 3, 5, 33, proj=4, layers=3, bidirectional=True,
                         peephole=True, coupled=True)  # fmt: skip
    assert p.key("sm_80") == "LSTM+proj+peephole+coupled|bf16|sm_80|fwd|T8|B4|H64|L4|bi"
    tanh = dispatch.Problem("RNN_TANH", "fp32", 5, 2, 3, 8)
    relu = dispatch.Problem("RNN_RELU", "fp32", 5, 2, 3, 8)
    assert tanh.key("sm_90") == relu.key("sm_90") == "RNN|fp32|sm_90|fwd|T8|B2|H8|L1|uni"
    cell = dispatch.Problem("GRU", "fp16", 1, 2, 3, 8, cell=True)
    assert cell.key("sm_90") == "GRU|fp16|sm_90|fwd|T1|B2|H8|cell"
    assert dispatch.Problem("GRU", "fp16", None, 2, 3, 8).key("sm_90") is None


def test_dtype_classes_follow_the_kernels_tf32_rule():
    from fused_rnn.kernels import _common

    assert dispatch.dtype_class(torch.float16) == "fp16"
    assert dispatch.dtype_class(torch.bfloat16) == "bf16"
    assert dispatch.dtype_class(torch.float64) == "fp64"
    for on in (True, False):
        torch.backends.cudnn.allow_tf32 = on
        assert dispatch.rnn_allows_tf32() == _common._cudnn_rnn_allows_tf32() == on
        assert dispatch.dtype_class(torch.float32) == ("tf32" if on else "fp32")


# ============================================================================ rules


def test_auto_on_cpu_is_torch():
    d = decide()
    assert d.backend == "torch" and "cpu tensor" in d.reason
    assert dispatch.resolve("auto", "LSTM", CPU) == "torch"
    assert decide(peephole=True).backend == "torch"


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwdbwd"])
def test_no_measurement_standard_cells_run_torch(fake_gpu, mode, grad):
    d = decide(mode=mode, grad=grad, layers=2, bidirectional=True)
    assert d.backend == "torch"
    assert d.reason.startswith("no measurement for ") and "cuDNN" in d.reason
    assert d.key.endswith("|L2|bi") and d.key.split("|")[3] == ("fwdbwd" if grad else "fwd")
    d = decide(mode=mode, steps=1, cell=True)
    assert d.backend == "torch" and "cell op" in d.reason


@pytest.mark.parametrize("variant", [{"peephole": True}, {"coupled": True},
                                     {"peephole": True, "coupled": True}])  # fmt: skip
def test_no_measurement_variants_run_stepwise(fake_gpu, variant):
    d = decide(**variant)
    assert d.backend == "stepwise" and d.reason.startswith("variant: torch.nn has no op")
    assert decide(**variant, steps=1, cell=True).backend == "stepwise"
    # sizes unknown (dynamic shapes): the variant rule still applies, the standard cell runs torch
    assert decide(**variant, steps=None).backend == "stepwise"
    d = decide(steps=None)
    assert d.backend == "torch" and d.key is None and "sizes unknown" in d.reason


def test_calls_the_kernels_cannot_run_go_to_torch(fake_gpu, monkeypatch):
    d = decide(dtype=torch.float64, peephole=True)
    assert d.backend == "torch" and "not fp64" in d.reason
    assert decide(batch=0, peephole=True).reason == "empty batch: nothing to launch"
    monkeypatch.setattr(dispatch, "device_info", lambda device: dispatch.DeviceInfo("T4", (7, 5)))
    d = decide(dtype=torch.bfloat16, peephole=True)
    assert d.backend == "torch" and "sm_80" in d.reason
    assert decide(dtype=torch.float16, peephole=True).backend == "stepwise"
    monkeypatch.setattr(dispatch, "device_info", lambda device: dispatch.DeviceInfo("V", (7, 0)))
    d = decide(peephole=True)
    assert d.backend == "torch" and "sm_75" in d.reason


def test_fused_unavailable_goes_to_torch(fake_gpu, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU tensor: no fused backend can run
    d = decide(peephole=True)
    assert d.backend == "torch" and "no fused backend can run" in d.reason
    with pytest.raises(RuntimeError, match="backend='stepwise' is not available"):
        decide("stepwise")


def test_cudnn_disabled_runs_the_torch_path(fake_gpu, tmp_path, monkeypatch):
    _use_policy(monkeypatch, tmp_path, [_row("lstm", "none", "stepwise", 1.0, 2.0)])
    assert decide(steps=1000, hidden=768, batch=16).backend == "stepwise"  # the policy says so
    with torch.backends.cudnn.flags(enabled=False):
        for kw in ({"steps": 1000, "hidden": 768}, {"peephole": True}, {"coupled": True}):
            d = decide(**kw)
            assert d.backend == "torch" and "cudnn.enabled is False" in d.reason
        assert "per-step loop" in decide(peephole=True).reason
        assert "non-cuDNN" in decide().reason
        # torch.nn's cells never run cuDNN: unaffected
        assert decide(peephole=True, steps=1, cell=True).backend == "stepwise"
        # an explicit backend is not overridden
        assert decide("stepwise").backend == "stepwise"
        assert decide("persistent", peephole=True).backend == "persistent"
    assert decide(peephole=True).backend == "stepwise"  # the flag is read on every call


def test_deterministic_mode_keeps_deterministic_backends(fake_gpu, monkeypatch, tmp_path):
    torch.use_deterministic_algorithms(True)
    d = decide(peephole=True)
    assert d.backend == "stepwise" and "all fused backends qualify" in d.reason
    assert decide().backend == "torch"  # as torch.nn: cuDNN stays allowed
    monkeypatch.setattr(dispatch, "DETERMINISTIC", {"stepwise": False, "persistent": True})
    dispatch.forget()
    d = decide(peephole=True)
    assert d.backend == "torch" and "stepwise excluded" in d.reason
    assert decide("stepwise", peephole=True).backend == "stepwise"  # explicit: not overridden
    # a measurement for persistent does not bring a nondeterministic backend back
    monkeypatch.setattr(dispatch, "DETERMINISTIC", {"stepwise": True, "persistent": False})
    _use_policy(monkeypatch, tmp_path, [_row("lstm", "none", "persistent", 1.0, 2.0),
                                        _row("lstm", "none", "stepwise", 1.5, 2.0)])  # fmt: skip
    assert decide(steps=1000, hidden=768).backend == "stepwise"
    torch.use_deterministic_algorithms(False)
    assert decide(steps=1000, hidden=768).backend == "persistent"


def _atomic_calls(tree):
    """(enclosing function, call) of every tl.atomic_* call."""
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr.startswith("atomic_")):  # fmt: skip
                    yield fn.name, node


def test_kernels_use_no_float_atomics():
    """What DETERMINISTIC rests on: the only atomics in the kernels are the grid barrier's, on
    its int32 counter `cnt`; every counter passed to a kernel is allocated int32."""
    seen = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        src = path.read_text()
        for fn, call in _atomic_calls(ast.parse(src)):
            seen.append(fn)
            assert fn == "_grid_barrier", f"{path.name}: {fn} uses {call.func.attr}"
            assert isinstance(call.args[0], ast.Name) and call.args[0].id == "cnt"
        for line in src.splitlines():
            if "cnt=torch." in line.replace(" ", "") or line.strip().startswith("cnt = torch."):
                assert "dtype=torch.int32" in line, f"{path.name}: {line.strip()}"
    assert seen.count("_grid_barrier") == 2  # the release-add and the acquire spin


# ============================================================================ policy


def _row(cell, variant, backend, fused_ms, torch_ms, *, status="ok", dtype="fp16", mode="fwd",
         T=1000, B=16, H=768, layers=1, bidirectional=False, proj=0):  # fmt: skip
    return {
        "suite": "synthetic", "cell": cell, "variant": variant, "seq_len": T, "batch": B,
        "input_size": H, "hidden_size": H, "num_layers": layers, "bidirectional": bidirectional,
        "proj_size": proj, "dtype": dtype, "mode": mode, "device": "cuda:0", "backend": backend,
        "resolved_backend": backend, "status": status, "torch_ms": torch_ms,
        "fused_ms": fused_ms, "error": "",
    }  # fmt: skip


def _results(rows, device="cuda:0", cap="9.0", name="NVIDIA H200", commit="abc123def4567"):
    meta = {"tool": "fused-rnn-bench", "date_utc": "2026-12-01T10:00:00+00:00",
            "device": device, "device_name": name, "compute_capability": cap,
            "torch_version": "2.9.0", "triton_version": "3.5.0", "cudnn_version": 91300,
            "git_commit": commit, "command": "fused-rnn-bench --out x"}  # fmt: skip
    if device == "cpu":
        meta.pop("compute_capability")
    return {"metadata": meta, "rows": rows}


def _use_policy(monkeypatch, tmp_path, rows):
    src, out = tmp_path / "run.json", tmp_path / f"policy{len(list(tmp_path.glob('p*')))}.json"
    src.write_text(json.dumps(_results(rows)))
    assert build_policy.main([str(src), "--out", str(out)]) == 0
    monkeypatch.setenv(dispatch.POLICY_ENV, str(out))
    dispatch.forget()
    return json.loads(out.read_text())


def test_choose():
    c = dispatch.choose
    assert c([{"torch": 2.0, "stepwise": 1.0, "persistent": 1.5}], dispatch.CANDIDATES,
             "torch") == "stepwise"  # fmt: skip
    assert c([{"torch": 2.0, "stepwise": 1.0, "persistent": 1.5}], ("torch", "persistent"),
             "torch") == "persistent"  # fmt: skip
    assert c([{"torch": 2.0, "stepwise": 1.95}], dispatch.CANDIDATES, "torch") == "torch"
    assert c([{"torch": 2.0, "stepwise": 1.95}], dispatch.CANDIDATES, "torch", 1.0) == "stepwise"
    # must win at every shape of the class; then the best geometric mean
    assert c([{"torch": 2, "stepwise": 1}, {"torch": 2, "stepwise": 3}], "torch stepwise".split(),
             "torch") == "torch"  # fmt: skip
    two = [{"torch": 4, "stepwise": 1, "persistent": 1.5}, {"torch": 4, "stepwise": 3.6,
                                                            "persistent": 1.5}]  # fmt: skip
    assert c(two, dispatch.CANDIDATES, "torch") == "persistent"  # (1/4)(3.6/4) > (1.5/4)^2
    two[1]["stepwise"] = 3.9  # not MIN_GAIN faster there: out, however fast elsewhere
    assert c(two, ("torch", "stepwise"), "torch") == "torch"
    # no torch time: the default is the baseline; no baseline at all: no verdict
    assert c([{"stepwise": 4.0, "persistent": 3.0}], dispatch.CANDIDATES, "stepwise") == (
        "persistent"
    )
    assert c([{"stepwise": 1.0}], dispatch.CANDIDATES, "torch") is None
    assert c([], dispatch.CANDIDATES, "torch") is None


def test_build_policy_from_synthetic_results():
    rows = [
        # LSTM fp16 fwd at T1000: persistent wins, stepwise loses
        _row("lstm", "none", "persistent", 1.5, 2.0),
        _row("lstm", "none", "stepwise", 3.0, 2.0),
        _row("lstm", "none", "auto", 1.0, 2.0),  # auto rows time another backend: skipped
        # GRU bf16 fwdbwd: stepwise only 2.5% faster: torch keeps it
        _row("gru", "none", "stepwise", 1.95, 2.0, dtype="bf16", mode="fwdbwd"),
        # a faster backend with wrong outputs, a failed one: no candidates
        _row("rnn", "none", "persistent", 0.5, 2.0, status="mismatch"),
        _row("rnn", "none", "stepwise", None, 2.0, status="error"),
        # peephole: the torch candidate is fused_rnn's torch loop (its fused_ms), not torch.nn
        _row("lstm", "peephole", "torch", 10.0, 2.0),
        _row("lstm", "peephole", "stepwise", 4.0, 2.0),
        _row("lstm", "peephole", "persistent", 6.0, 2.0),
        # coupled without a torch-loop row: stepwise is the baseline
        _row("lstm", "cifg", "stepwise", 4.0, 2.0),
        _row("lstm", "cifg", "persistent", 3.0, 2.0),
        # two shapes of one class (T=600 and T=1024) disagree: torch, conservatively
        _row("lstm", "none", "stepwise", 1.0, 2.0, dtype="bf16", T=600),
        _row("lstm", "none", "stepwise", 3.0, 2.0, dtype="bf16", T=1024),
    ]
    policy = build_policy.build([("bench/results/h200.json", _results(rows))])
    e = policy["entries"]
    assert e["LSTM|fp16|sm_90|fwd|T1024|B16|H1024|L1|uni"]["backend"] == "persistent"
    assert e["LSTM|fp16|sm_90|fwd|T1024|B16|H1024|L1|uni"]["shapes"] == [
        {"shape": "T1000 B16 I768 H768", "run": 0,
         "ms": {"persistent": 1.5, "stepwise": 3.0, "torch": 2.0}},
    ]  # fmt: skip
    assert e["GRU|bf16|sm_90|fwdbwd|T1024|B16|H1024|L1|uni"]["backend"] == "torch"
    assert "RNN|fp16|sm_90|fwd|T1024|B16|H1024|L1|uni" not in e  # no usable row
    peep = e["LSTM+peephole|fp16|sm_90|fwd|T1024|B16|H1024|L1|uni"]
    assert peep["backend"] == "stepwise" and peep["shapes"][0]["ms"]["torch"] == 10.0
    assert e["LSTM+coupled|fp16|sm_90|fwd|T1024|B16|H1024|L1|uni"]["backend"] == "persistent"
    bf = e["LSTM|bf16|sm_90|fwd|T1024|B16|H1024|L1|uni"]
    assert bf["backend"] == "torch" and len(bf["shapes"]) == 2
    assert len(e) == 5
    assert policy["source"] == (
        "bench/results/h200.json: NVIDIA H200 (sm_90), commit abc123def456, "
        "2026-12-01T10:00:00+00:00"
    )
    assert policy["runs"][0]["git_commit"] == "abc123def4567"
    assert policy["min_gain"] == dispatch.MIN_GAIN


def test_build_policy_refuses_cpu_runs_and_unreadable_files(tmp_path, capsys):
    src = tmp_path / "cpu.json"
    src.write_text(json.dumps(_results([_row("lstm", "none", "auto", 1.0, 1.0)], device="cpu")))
    out = tmp_path / "p.json"
    assert build_policy.main([str(src), "--out", str(out)]) == 2
    assert "not a CUDA run" in capsys.readouterr().err and not out.exists()
    committed = ROOT / "bench" / "results" / "cpu-default-2026-11-26.json"
    assert build_policy.main([str(committed), "--out", str(out)]) == 2
    assert build_policy.main([str(tmp_path / "missing.json"), "--out", str(out)]) == 2


def test_shipped_policy_is_the_builders_output():
    """With no GPU results committed the shipped policy is empty, as the script writes it."""
    shipped = (ROOT / "fused_rnn" / "policy.json").read_text()
    assert shipped == build_policy.dumps(build_policy.build([]))
    assert json.loads(shipped)["source"] == "no GPU measurement yet"
    assert dispatch.load_policy()["entries"] == {}
    assert 'fused_rnn" = ["policy.json"]' in (ROOT / "pyproject.toml").read_text()


def test_policy_drives_auto(fake_gpu, monkeypatch, tmp_path):
    _use_policy(monkeypatch, tmp_path, [
        _row("lstm", "none", "persistent", 1.5, 2.0),
        _row("gru", "none", "stepwise", 1.0, 2.0, mode="fwdbwd", layers=2, bidirectional=True),
    ])  # fmt: skip
    d = decide(steps=700, hidden=1000)  # same class as T1000 H768
    assert d.backend == "persistent" and d.reason.startswith("policy: persistent 1.5, torch 2")
    assert "NVIDIA H200 (sm_90), commit abc123def456" in d.reason
    assert decide(steps=700, hidden=1000, grad=True).backend == "torch"  # fwdbwd not measured
    assert decide(steps=2000, hidden=1000).backend == "torch"  # T2048: another class
    assert decide(mode="GRU", steps=1000, hidden=768, grad=True, layers=2,
                  bidirectional=True).backend == "stepwise"  # fmt: skip
    assert decide(mode="GRU", steps=1000, hidden=768, grad=True).backend == "torch"  # L1 uni
    monkeypatch.setattr(dispatch, "device_info", lambda d: dispatch.DeviceInfo("A100", (8, 0)))
    assert decide(steps=700, hidden=1000).backend == "torch"  # sm_80: not measured


def test_unreadable_policy_is_ignored(fake_gpu, monkeypatch, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv(dispatch.POLICY_ENV, str(bad))
    dispatch.forget()
    with pytest.warns(UserWarning, match="ignoring the policy"):
        assert decide(peephole=True).backend == "stepwise"


# ============================================================================ autotuning


class Timer:
    """The autotuner's timer: runs the real workload, checks it ran `backend`, returns a set
    time (or raises for a backend mapped to an exception)."""

    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, backend, run, device):
        self.calls.append(backend)
        with dispatch.recording() as log:
            y = run()
        assert log and {d.backend for d in log} == {backend}, (backend, log)
        assert torch.isfinite(y).all()
        t = self.times[backend]
        if isinstance(t, Exception):
            raise t
        return t


TINY = dict(dtype=torch.float32, steps=3, batch=2, input_size=4, hidden=8)


@pytest.fixture
def tuner(fake_gpu, monkeypatch):
    def install(times):
        timer = Timer(times)
        monkeypatch.setattr(dispatch, "_timer", timer)
        return timer

    dispatch.set_autotune(True)
    return install


@needs_interpreter
@pytest.mark.parametrize("times, winner", [
    ({"torch": 1.0, "stepwise": 0.5, "persistent": 0.8}, "stepwise"),
    ({"torch": 1.0, "stepwise": 0.5, "persistent": 0.3}, "persistent"),
    ({"torch": 1.0, "stepwise": 0.97, "persistent": 0.98}, "torch"),  # within MIN_GAIN
    ({"torch": 1.0, "stepwise": 0.5, "persistent": RuntimeError("no")}, "stepwise"),
    ({"torch": RuntimeError("no"), "stepwise": 0.5, "persistent": 0.4}, "persistent"),
], ids=["stepwise", "persistent", "tie-torch", "failing-persistent", "failing-torch"])  # fmt: skip
def test_autotune_picks_the_fastest(tuner, times, winner):
    timer = tuner(times)
    d = decide(**{**TINY, "mode": "GRU"})
    assert d.backend == winner and d.reason.startswith("autotuned now: ")
    if isinstance(times["torch"], Exception):  # torch cannot run it here: the fastest that can
        assert "torch failed: RuntimeError: no" in d.reason
    assert sorted(timer.calls) == sorted(dispatch.CANDIDATES)
    d = decide(**{**TINY, "mode": "GRU"})
    assert d.reason.startswith("autotune cache: ") and d.backend == winner
    assert len(timer.calls) == 3  # timed once per key


@needs_interpreter
def test_autotune_cache_file_round_trip_keys_and_versions(tuner, tmp_path, monkeypatch):
    timer = tuner({"torch": 2.0, "stepwise": 1.0, "persistent": 1.5})
    assert decide(**TINY, peephole=True).backend == "stepwise"
    path = tmp_path / "cache" / "autotune.json"
    assert dispatch.cache_path() == path
    doc = json.loads(path.read_text())
    (env,) = doc["environments"]
    assert env.startswith("Fake GPU 80GB|torch=" + torch.__version__ + "|triton=")
    assert "|fused_rnn=" in env and "|cudnn=" in env
    key = "LSTM+peephole|tf32|sm_90|fwd|T4|B2|H8|L1|uni"
    entry = doc["environments"][env][key]
    assert entry["shapes"] == [{"shape": "T3 B2 I4 H8", "ms": {"persistent": 1.5, "stepwise": 1.0,
                                                               "torch": 2.0}}]  # fmt: skip

    # a new process: memory dropped, the file read back; the timer must not run
    dispatch.forget()
    monkeypatch.setattr(dispatch, "_timer", lambda *a: pytest.fail("timed again"))
    d = decide(**{**TINY, "steps": 4}, peephole=True)  # T=4: same class
    assert d.backend == "stepwise" and d.reason.startswith("autotune cache: ")
    # another class is another key
    timer = tuner({"torch": 1.0, "stepwise": 2.0, "persistent": 3.0})
    assert decide(**{**TINY, "steps": 5}, peephole=True).backend == "torch"
    assert len(timer.calls) == 3
    # other versions (or another GPU): results of the old ones do not apply
    monkeypatch.setattr(dispatch, "_versions", lambda: "torch=9|triton=9|cudnn=9|fused_rnn=9")
    dispatch.forget()
    assert decide(**TINY, peephole=True).backend == "torch"
    assert len(timer.calls) == 6
    assert len(json.loads(path.read_text())["environments"]) == 2


@needs_interpreter
def test_autotune_times_backward_when_grad_is_needed(tuner, monkeypatch):
    tuner({"torch": 2.0, "stepwise": 1.0, "persistent": 1.5})
    grads = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads.append(1) or real(*a, **k))
    decide(**TINY, mode="RNN_RELU")
    assert grads == []
    d = decide(**TINY, mode="RNN_RELU", grad=True)
    assert grads == [1, 1, 1] and d.key.split("|")[3] == "fwdbwd"
    for kw in ({"steps": 1, "cell": True}, {"layers": 2, "bidirectional": True},
               {"proj": 3, "coupled": True}):  # fmt: skip
        decide(**{**TINY, **kw}, mode="LSTM", grad=True)


def test_autotune_switch_env_and_cache_folder(monkeypatch, tmp_path):
    assert not dispatch.autotune_enabled()
    monkeypatch.setenv(dispatch.AUTOTUNE_ENV, "1")
    assert not dispatch.autotune_enabled()  # read at import and by forget()
    dispatch.forget()
    assert dispatch.autotune_enabled()
    dispatch.set_autotune(False)
    assert not dispatch.autotune_enabled()
    dispatch.set_autotune(None)
    assert dispatch.autotune_enabled()
    monkeypatch.setenv(dispatch.AUTOTUNE_ENV, "0")
    dispatch.forget()
    assert not dispatch.autotune_enabled()
    fused_rnn.set_autotune(True)
    assert dispatch.autotune_enabled()
    with pytest.raises(TypeError):
        dispatch.set_autotune("yes")

    monkeypatch.delenv(dispatch.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    dispatch.forget()
    assert dispatch.cache_path() == tmp_path / "xdg" / "fused_rnn" / "autotune.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    dispatch.forget()
    assert dispatch.cache_path() == tmp_path / "home" / ".cache" / "fused_rnn" / "autotune.json"


def test_autotune_off_never_times(fake_gpu, monkeypatch):
    monkeypatch.setattr(dispatch, "_timer", lambda *a: pytest.fail("timed"))
    assert decide(**TINY, peephole=True).backend == "stepwise"
    assert decide(**TINY).reason.startswith("no measurement")


@needs_interpreter
def test_no_autotuning_while_capturing_or_tracing(tuner, monkeypatch):
    timer = tuner({"torch": 2.0, "stepwise": 1.0, "persistent": 1.5})
    monkeypatch.setattr(dispatch, "_capturing", lambda device: True)
    d = decide(**TINY)
    assert d.backend == "torch" and "not autotuned (a CUDA graph is being captured)" in d.reason
    # compiling: the constant function gets compiling=True from the traced resolve
    assert dispatch._auto_impl("LSTM", CPU, torch.float32, 3, 2, 4, 8, 0, 1, False, False,
                               False, False, False, True) == "torch"  # fmt: skip
    assert timer.calls == []
    monkeypatch.setattr(dispatch, "_capturing", lambda device: False)
    assert decide(**TINY).backend == "stepwise"  # the blocked decision was not remembered
    # a cached winner is used while tracing (it is no tuning)
    with dispatch.recording() as log:
        dispatch._auto_impl("LSTM", CPU, torch.float32, 3, 2, 4, 8, 0, 1, False, False, False,
                            False, False, True)  # fmt: skip
    assert log[0].backend == "stepwise" and log[0].reason.startswith("autotune cache")


@needs_interpreter
def test_autotune_respects_deterministic_mode_from_the_cache(tuner, monkeypatch):
    timer = tuner({"torch": 2.0, "stepwise": 1.5, "persistent": 1.0})
    assert decide(**TINY).backend == "persistent"
    monkeypatch.setattr(dispatch, "DETERMINISTIC", {"stepwise": True, "persistent": False})
    torch.use_deterministic_algorithms(True)
    d = decide(**TINY)
    assert d.backend == "stepwise" and "persistent excluded" in d.reason
    assert len(timer.calls) == 3  # chosen among the cached times, not timed again


@needs_interpreter
def test_autotuned_module_runs_the_winner_and_matches_torch_nn(tuner):
    tuner({"torch": 2.0, "stepwise": 1.0, "persistent": 1.5})
    ref = nn.LSTM(4, 8, num_layers=2)
    ours = fused_rnn.LSTM(4, 8, num_layers=2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 4)
    rows = fused_rnn.explain(ours, x, file=None)
    assert [r.backend for r in rows] == ["stepwise", "stepwise"]
    assert rows[0].reason.startswith("autotuned now")
    out, (h, c) = ours(x)
    out_r, (h_r, c_r) = ref(x)
    for a, b in ((out, out_r), (h, h_r), (c, c_r)):
        torch.testing.assert_close(a, b, **TOL)
    assert fused_rnn.explain(ours, x, file=None)[0].reason.startswith("autotune cache")


# ============================================================================ explain


def test_explain_rows_and_table():
    m = fused_rnn.GRU(4, 8, num_layers=2, bidirectional=True)
    buf = io.StringIO()
    rows = dispatch.explain(m, torch.randn(3, 2, 4), file=buf)
    assert [(r.layer, r.direction, r.backend) for r in rows] == [
        (0, "forward", "torch"), (0, "reverse", "torch"),
        (1, "forward", "torch"), (1, "reverse", "torch"),
    ]  # fmt: skip
    text = buf.getvalue()
    assert text == str(rows) + "\n"
    assert "call 0: T3 B2 I4 H8 L2 bi" in text and "layer 1 reverse" in text
    assert "cpu tensor: the fused kernels run on CUDA" in text
    cell = dispatch.explain(fused_rnn.LSTMCell(4, 8), torch.randn(2, 4), file=None)
    assert [(r.layer, r.direction) for r in cell] == [(None, "cell")]
    explicit = dispatch.explain(fused_rnn.LSTM(4, 8, backend="torch"), torch.randn(3, 2, 4),
                                file=None)  # fmt: skip
    assert "backend='torch' asked for" in explicit[0].reason
    assert str(dispatch.explain(nn.LSTM(4, 8), torch.randn(3, 2, 4), file=None)).startswith(
        "fused_rnn: no fused_rnn recurrent call ran"
    )


@needs_interpreter
def test_explain_agrees_with_what_ran(fake_gpu, monkeypatch):
    """Every layer-direction explain reports is one recurrence run on that backend."""
    from fused_rnn import _ops

    ran = []
    real = _ops.lstm_recurrence
    monkeypatch.setattr(_ops, "lstm_recurrence", lambda *a: ran.append(a[-1]) or real(*a))

    class Two(nn.Module):  # a model with two fused layers: two calls
        def __init__(self):
            super().__init__()
            self.a = fused_rnn.LSTM(4, 8, num_layers=2, bidirectional=True, peephole=True)
            self.b = fused_rnn.LSTM(16, 8)

        def forward(self, x):
            return self.b(self.a(x)[0])

    rows = fused_rnn.explain(Two(), torch.randn(3, 2, 4), file=None)
    assert [(r.call, r.backend) for r in rows] == [(0, "stepwise")] * 4 + [(1, "torch")]
    assert ran == ["stepwise"] * 4  # the torch.nn-able second layer ran torch's op
    assert rows[0].key == "LSTM+peephole|tf32|sm_90|fwdbwd|T4|B2|H8|L2|bi"


@needs_interpreter
def test_bench_reports_what_auto_ran(fake_gpu):
    model = fused_rnn.LSTM(4, 8, peephole=True)
    x = torch.randn(3, 2, 4)
    assert runner.resolved_backend(model, x, "fwd") == "stepwise"
    assert runner.resolved_backend(fused_rnn.LSTM(4, 8), x, "fwdbwd") == "torch"


# ============================================================================ torch.compile


def _fused_nodes(graphs):
    return [str(n.target) for g in graphs for n in g.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("fused_rnn.")]  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_auto_is_a_trace_time_constant(fake_gpu, monkeypatch, dynamic):
    """fullgraph compiles; the decision is made once, at trace time, and not while the compiled
    code runs; a symbolic size has no key; no autotuning while tracing."""
    torch._dynamo.reset()
    dispatch.set_autotune(True)
    monkeypatch.setattr(dispatch, "_timer", lambda *a: pytest.fail("timed while tracing"))
    decisions = []
    real = dispatch._decide_auto
    monkeypatch.setattr(dispatch, "_decide_auto", lambda *a: decisions.append(real(*a))
                        or decisions[-1])  # fmt: skip
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = fused_rnn.LSTM(3, 5, peephole=True)
    x = torch.randn(4, 2, 3)
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=dynamic)
    try:
        with torch.no_grad():
            y = compiled(x)[0]
            n = len(decisions)
            assert n == 1 and decisions[0].backend == "stepwise"
            assert (decisions[0].key is None) == dynamic
            torch.testing.assert_close(compiled(x)[0], y)
            assert len(decisions) == n  # the compiled code does not decide again
            dispatch.set_autotune(False)  # eager now: it would tune
            torch.testing.assert_close(y, model(x)[0], **TOL)
    finally:
        torch._dynamo.reset()
    assert _fused_nodes(graphs) == ["fused_rnn.lstm_fwd"]
