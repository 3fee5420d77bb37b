"""Bad arguments raise what torch.nn raises (TORCH_NN_SPEC.md §1, §4, §7).

Every row runs the same call on torch.nn and on fused_rnn: both must raise, with exactly the same
exception class, and ours must carry the key text of torch's message (the exact text where the
spec gives one and it comes from Python rather than ATen). Forward checks run on both the native
and the generic path. Then the extras: backend names, the CPU fallback rules, LSTM variants.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from fused_rnn import dispatch

I, H = 3, 5


def raise_alike(call, exc, key=None, exact=False):
    """call(lib) must raise `exc` (the exact class) for torch.nn and for fused_rnn.

    key: text ours must contain (and torch's too, so the table stays honest). exact: our message
    must equal torch's.
    """
    with pytest.raises(Exception) as ref_info:
        call(nn)
    with pytest.raises(Exception) as our_info:
        call(fused_rnn)
    assert type(ref_info.value) is exc, f"torch raised {type(ref_info.value)!r}: table is wrong"
    assert type(our_info.value) is type(ref_info.value), (
        f"torch raised {type(ref_info.value).__name__}({ref_info.value}), "
        f"ours {type(our_info.value).__name__}({our_info.value})"
    )
    ref_msg, our_msg = str(ref_info.value), str(our_info.value)
    if key is not None:
        assert key in ref_msg, f"key text not in torch's message {ref_msg!r}"
        assert key in our_msg, f"{our_msg!r} lacks {key!r}"
    if exact:
        assert our_msg == ref_msg


# ------------------------------------------------------------------------------------------------
# constructors (sequence modules): every row of the validation table, in torch's order

PROJ_MSG = "proj_size argument is only supported for LSTM, not RNN or GRU"
DROP_MSG = ("dropout should be a number in range [0, 1] representing the probability of an "
            "element being zeroed")  # fmt: skip

CTOR = [
    # (id, class name, args, kwargs, exception, key text)
    ("RNN-proj0", "RNN", (I, H), dict(proj_size=0), ValueError, PROJ_MSG),
    ("RNN-proj2", "RNN", (I, H), dict(proj_size=2), ValueError, PROJ_MSG),
    ("GRU-proj0", "GRU", (I, H), dict(proj_size=0), ValueError, PROJ_MSG),
    ("GRU-proj2-baddrop", "GRU", (I, H), dict(proj_size=2, dropout=3), ValueError, PROJ_MSG),
    ("RNN-Tanh", "RNN", (I, H), dict(nonlinearity="Tanh"), ValueError,
     "Unknown nonlinearity 'Tanh'. Select from 'tanh' or 'relu'."),
    ("RNN-RELU-positional", "RNN", (I, H, 1, "RELU"), {}, ValueError,
     "Unknown nonlinearity 'RELU'. Select from 'tanh' or 'relu'."),
    ("RNN-sigmoid-baddrop", "RNN", (I, H), dict(nonlinearity="sigmoid", dropout=2), ValueError,
     "Unknown nonlinearity 'sigmoid'"),
    ("LSTM-drop-bool", "LSTM", (I, H), dict(dropout=True), ValueError, DROP_MSG),
    ("GRU-drop-False", "GRU", (I, H), dict(dropout=False), ValueError, DROP_MSG),
    ("RNN-drop-str", "RNN", (I, H), dict(dropout="0.5"), ValueError, DROP_MSG),
    ("LSTM-drop-None", "LSTM", (I, H), dict(dropout=None), TypeError,  # float(None) comes first
     "float() argument must be a string or a real number, not 'NoneType'"),
    ("LSTM-drop-neg", "LSTM", (I, H), dict(dropout=-0.1), ValueError, DROP_MSG),
    ("GRU-drop-1.5", "GRU", (I, H, 2), dict(dropout=1.5), ValueError, DROP_MSG),
    ("LSTM-drop-before-bias", "LSTM", (I, H), dict(dropout=2, bias=1), ValueError, DROP_MSG),
    ("LSTM-bias-int", "LSTM", (I, H), dict(bias=1), TypeError,
     "bias should be of type bool, got: int"),
    ("RNN-bias-None", "RNN", (I, H), dict(bias=None), TypeError,
     "bias should be of type bool, got: NoneType"),
    ("GRU-batch_first-int", "GRU", (I, H), dict(batch_first=1), TypeError,
     "batch_first should be of type bool, got: int"),
    ("LSTM-bias-before-size", "LSTM", (3.0, H), dict(bias=0), TypeError,
     "bias should be of type bool, got: int"),
    ("LSTM-input_size-float", "LSTM", (3.0, H), {}, TypeError,
     "input_size should be of type int, got: float"),
    ("GRU-input_size-0", "GRU", (0, H), {}, ValueError, "input_size must be greater than zero"),
    ("RNN-input_size-neg", "RNN", (-2, H), {}, ValueError, "input_size must be greater than zero"),
    ("LSTM-hidden_size-float", "LSTM", (I, 5.0), {}, TypeError,
     "hidden_size should be of type int, got: float"),
    ("GRU-hidden_size-0", "GRU", (I, 0), {}, ValueError, "hidden_size must be greater than zero"),
    ("LSTM-input-before-hidden", "LSTM", (0, 0), {}, ValueError,
     "input_size must be greater than zero"),
    ("LSTM-layers-0", "LSTM", (I, H, 0), {}, ValueError, "num_layers must be greater than zero"),
    ("RNN-layers-neg", "RNN", (I, H, -1), {}, ValueError, "num_layers must be greater than zero"),
    ("LSTM-layers-before-proj", "LSTM", (I, H, 0), dict(proj_size=H), ValueError,
     "num_layers must be greater than zero"),
    ("LSTM-proj-neg", "LSTM", (I, H), dict(proj_size=-1), ValueError,
     "proj_size should be a positive integer or zero to disable projections"),
    ("LSTM-proj-eq-hidden", "LSTM", (I, H), dict(proj_size=H), ValueError,
     "proj_size has to be smaller than hidden_size"),
    ("LSTM-proj-gt-hidden", "LSTM", (I, H), dict(proj_size=H + 3), ValueError,
     "proj_size has to be smaller than hidden_size"),
    ("LSTM-layers-1.5", "LSTM", (I, H, 1.5), {}, TypeError,
     "'float' object cannot be interpreted as an integer"),
    ("GRU-layers-2.0", "GRU", (I, H, 2.0), {}, TypeError,
     "'float' object cannot be interpreted as an integer"),
    ("RNN-layers-2.0", "RNN", (I, H), dict(num_layers=2.0), TypeError,
     "'float' object cannot be interpreted as an integer"),
    ("LSTM-kwarg-nonlinearity", "LSTM", (I, H), dict(nonlinearity="tanh"), TypeError,
     "got an unexpected keyword argument 'nonlinearity'"),
    ("GRU-kwarg-foo", "GRU", (I, H), dict(foo=1), TypeError,
     "got an unexpected keyword argument 'foo'"),
    ("RNN-kwarg-foo", "RNN", (I, H), dict(foo=1), TypeError,
     "got an unexpected keyword argument 'foo'"),
    ("RNN-nonlinearity-before-kwarg", "RNN", (I, H), dict(nonlinearity="x", foo=1), ValueError,
     "Unknown nonlinearity 'x'"),
]  # fmt: skip


@pytest.mark.parametrize("cls,args,kwargs,exc,key", [r[1:] for r in CTOR], ids=[r[0] for r in CTOR])
def test_constructor_validation(cls, args, kwargs, exc, key):
    # exact text, except Python's own unexpected-kwarg message, which names the class whose
    # __init__ rejected it (torch's RNNBase, our LSTM/GRU/RNN)
    exact = "unexpected keyword" not in key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        raise_alike(lambda lib: getattr(lib, cls)(*args, **kwargs), exc, key, exact=exact)


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_dropout_with_one_layer_only_warns(cls):
    expect = (
        "dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
        "expects num_layers greater than 1, but got dropout=0.5 and num_layers=1"
    )
    for lib in (nn, fused_rnn):
        with pytest.warns(UserWarning) as rec:
            m = getattr(lib, cls)(I, H, dropout=0.5)
        assert [str(w.message) for w in rec] == [expect], lib.__name__
        assert m.dropout == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: dropout 0, or more than one layer
        getattr(fused_rnn, cls)(I, H)
        getattr(fused_rnn, cls)(I, H, 2, dropout=0.5)


def test_accepted_odd_arguments():
    """bidirectional is not type-checked, dropout=1 (int) and dropout=0 are valid."""
    for lib in (nn, fused_rnn):
        m = lib.GRU(I, H, 2, dropout=1, bidirectional=1)
        assert m.dropout == 1.0 and m.bidirectional == 1
        assert len(m.all_weights) == 4
        lib.LSTM(I, H, 2, dropout=0)


# ------------------------------------------------------------------------------------------------
# sequence-module forward checks


def _mk(lib, cls, **kw):
    kw.setdefault("dtype", torch.float64)
    return getattr(lib, cls)(I, H, **kw)


def _hx(cls, h, c=None):
    return (h, c if c is not None else h) if cls == "LSTM" else h


def z(*shape, dtype=torch.float64):
    return torch.zeros(*shape, dtype=dtype)


FWD = [
    # (id, class, ctor kwargs, input, hx (built by a function of the class), exception, key)
    ("RNN-input-1D", "RNN", {}, lambda: z(I), None, ValueError,
     "RNN: Expected input to be 2D or 3D, got 1D tensor instead"),
    ("RNN-input-4D", "RNN", {}, lambda: z(2, 4, 3, I), None, ValueError,
     "RNN: Expected input to be 2D or 3D, got 4D tensor instead"),
    ("LSTM-input-4D", "LSTM", {}, lambda: z(2, 4, 3, I), None, ValueError,
     "LSTM: Expected input to be 2D or 3D, got 4D instead"),
    ("GRU-input-1D", "GRU", {}, lambda: z(I), None, ValueError,
     "GRU: Expected input to be 2D or 3D, got 1D instead"),
    ("GRU-rank-before-dtype", "GRU", {}, lambda: torch.zeros(2, 2, 2, I, dtype=torch.int64), None,
     ValueError, "GRU: Expected input to be 2D or 3D, got 4D instead"),
    ("RNN-hx-2D-batched", "RNN", {}, lambda: z(4, 2, I), lambda: z(1, H), RuntimeError,
     "For batched 3-D input, hx should also be 3-D but got 2-D tensor"),
    ("GRU-hx-3D-unbatched", "GRU", {}, lambda: z(4, I), lambda: z(1, 1, H), RuntimeError,
     "For unbatched 2-D input, hx should also be 2-D but got 3-D tensor"),
    ("LSTM-hx-batched", "LSTM", {}, lambda: z(4, 2, I), lambda: (z(1, 2, H), z(1, H)),
     RuntimeError,
     "For batched 3-D input, hx and cx should also be 3-D but got (3-D, 2-D) tensors"),
    ("LSTM-hx-unbatched", "LSTM", {}, lambda: z(4, I), lambda: (z(1, 1, H), z(1, H)),
     RuntimeError,
     "For unbatched 2-D input, hx and cx should also be 2-D but got (3-D, 2-D) tensors"),
    ("RNN-hx-rank-before-dtype", "RNN", {}, lambda: torch.zeros(4, 2, I), lambda: z(2, H),
     RuntimeError, "hx should also be 3-D"),
    ("RNN-dtype", "RNN", {}, lambda: torch.zeros(4, 2, I), None, ValueError,
     "RNN input dtype (torch.float32) does not match weight dtype (torch.float64). Convert "
     "input: input.to(torch.float64), or convert model: model.to(torch.float32)"),
    ("LSTM-dtype-int", "LSTM", {}, lambda: torch.zeros(4, 2, I, dtype=torch.int64), None,
     ValueError, "RNN input dtype (torch.int64) does not match weight dtype (torch.float64)"),
    ("GRU-dtype-unbatched", "GRU", {}, lambda: torch.zeros(4, I, dtype=torch.float32), None,
     ValueError, "RNN input dtype (torch.float32) does not match weight dtype (torch.float64)"),
    ("LSTM-dtype-before-features", "LSTM", {}, lambda: torch.zeros(4, 2, 7), None, ValueError,
     "does not match weight dtype"),
    ("RNN-features", "RNN", {}, lambda: z(4, 2, 7), None, RuntimeError,
     "input.size(-1) must be equal to input_size. Expected 3, got 7"),
    ("LSTM-features-unbatched", "LSTM", {}, lambda: z(4, 2), None, RuntimeError,
     "input.size(-1) must be equal to input_size. Expected 3, got 2"),
    ("GRU-features-before-hx", "GRU", {}, lambda: z(4, 2, 7), lambda: z(9, 2, H), RuntimeError,
     "input.size(-1) must be equal to input_size. Expected 3, got 7"),
    ("GRU-hx-batch", "GRU", dict(num_layers=2), lambda: z(4, 3, I), lambda: z(2, 4, H),
     RuntimeError, "Expected hidden size (2, 3, 5), got [2, 4, 5]"),
    ("RNN-hx-rows", "RNN", dict(bidirectional=True), lambda: z(4, 3, I), lambda: z(1, 3, H),
     RuntimeError, "Expected hidden size (2, 3, 5), got [1, 3, 5]"),
    ("RNN-hx-bf", "RNN", dict(batch_first=True), lambda: z(3, 4, I), lambda: z(1, 4, H),
     RuntimeError, "Expected hidden size (1, 3, 5), got [1, 4, 5]"),
    ("GRU-hx-unbatched", "GRU", dict(num_layers=2), lambda: z(4, I), lambda: z(2, 4),
     RuntimeError, "Expected hidden size (2, 1, 5), got [2, 1, 4]"),
    ("LSTM-h0-shape", "LSTM", {}, lambda: z(4, 3, I), lambda: (z(1, 3, 4), z(1, 3, H)),
     RuntimeError, "Expected hidden[0] size (1, 3, 5), got [1, 3, 4]"),
    ("LSTM-c0-shape", "LSTM", {}, lambda: z(4, 3, I), lambda: (z(1, 3, H), z(1, 2, H)),
     RuntimeError, "Expected hidden[1] size (1, 3, 5), got [1, 2, 5]"),
    ("LSTM-proj-h0-is-P", "LSTM", dict(proj_size=2), lambda: z(4, 3, I),
     lambda: (z(1, 3, H), z(1, 3, H)), RuntimeError,
     "Expected hidden[0] size (1, 3, 2), got [1, 3, 5]"),
    ("LSTM-proj-c0-is-H", "LSTM", dict(proj_size=2), lambda: z(4, 3, I),
     lambda: (z(1, 3, 2), z(1, 3, 2)), RuntimeError,
     "Expected hidden[1] size (1, 3, 5), got [1, 3, 2]"),
    ("LSTM-unbatched-c0", "LSTM", dict(num_layers=2), lambda: z(4, I),
     lambda: (z(2, H), z(2, 4)), RuntimeError,
     "Expected hidden[1] size (2, 1, 5), got [2, 1, 4]"),
    ("RNN-packed-hx", "RNN", {}, lambda: pack_padded_sequence(z(4, 3, I), [4, 2, 1]),
     lambda: z(1, 2, H), RuntimeError, "Expected hidden size (1, 3, 5), got [1, 2, 5]"),
    ("GRU-packed-features", "GRU", {}, lambda: pack_padded_sequence(z(4, 3, 7), [4, 2, 1]),
     None, RuntimeError, "input.size(-1) must be equal to input_size. Expected 3, got 7"),
    ("LSTM-seq0", "LSTM", {}, lambda: z(0, 3, I), None, RuntimeError,
     "Expected sequence length to be larger than 0 in RNN"),
    ("GRU-seq0-bf", "GRU", dict(batch_first=True), lambda: z(3, 0, I), None, RuntimeError,
     "Expected sequence length to be larger than 0 in RNN"),
    ("RNN-seq0-unbatched", "RNN", {}, lambda: z(0, I), None, RuntimeError,
     "Expected sequence length to be larger than 0 in RNN"),
    ("RNN-seq0-hx", "RNN", {}, lambda: z(0, 3, I), lambda: z(1, 3, H), RuntimeError,
     "Expected sequence length to be larger than 0 in RNN"),
    ("GRU-hx-dtype", "GRU", {}, lambda: z(4, 3, I), lambda: z(1, 3, H, dtype=torch.float32),
     RuntimeError, None),
    ("LSTM-h0-dtype", "LSTM", {}, lambda: z(4, 3, I),
     lambda: (z(1, 3, H, dtype=torch.float32), z(1, 3, H)), RuntimeError, None),
    ("RNN-packed-hx-dtype", "RNN", {}, lambda: pack_padded_sequence(z(4, 3, I), [4, 2, 1]),
     lambda: z(1, 3, H, dtype=torch.float32), RuntimeError, None),
]  # fmt: skip


@pytest.mark.parametrize(
    "cls,kw,make_x,make_hx,exc,key", [r[1:] for r in FWD], ids=[r[0] for r in FWD]
)
def test_forward_validation(cls, kw, make_x, make_hx, exc, key, path):
    x = make_x()
    hx = None if make_hx is None else make_hx()
    # messages that come from Python checks in torch.nn are compared exactly; ATen's (the
    # sequence-length and hx-dtype ones) only by key text
    exact = key is not None and "sequence length" not in key
    raise_alike(lambda lib: _mk(lib, cls, **kw)(x, hx), exc, key, exact=exact)


def test_lstm_c0_dtype_mismatch_raises(path):
    """Spec §4.7: an hx whose dtype differs from the input's is a RuntimeError. (torch's CPU LSTM
    happens to promote a float32 c_0 under a float64 input without error; cuDNN and every other
    mismatch raise. We raise for c_0 as for h_0.)"""
    m = _mk(fused_rnn, "LSTM")
    with pytest.raises(RuntimeError, match="dtype"):
        m(z(4, 3, I), (z(1, 3, H), z(1, 3, H, dtype=torch.float32)))


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_batch_zero_is_not_an_error(cls, path):
    for lib in (nn, fused_rnn):
        out = _mk(lib, cls)(z(4, 0, I))[0]
        assert out.shape == (4, 0, H)


# ------------------------------------------------------------------------------------------------
# cells: construction accepts anything torch accepts; forward errors


@pytest.mark.parametrize(
    "cls,args,exc,key",
    [
        ("RNNCell", (I, -1), RuntimeError, "negative dimension"),
        ("GRUCell", (-2, H), RuntimeError, "negative dimension"),
        ("LSTMCell", (I, 5.0), TypeError, None),
        ("GRUCell", (3.5, H), TypeError, None),
    ],
    ids=["RNNCell-H-neg", "GRUCell-I-neg", "LSTMCell-H-float", "GRUCell-I-float"],
)
def test_cell_constructor_errors(cls, args, exc, key):
    raise_alike(lambda lib: getattr(lib, cls)(*args), exc, key)


def test_cells_validate_nothing_at_construction():
    for lib in (nn, fused_rnn):
        assert lib.LSTMCell(I, H, bias=1).bias_ih is not None
        assert lib.GRUCell(I, 0).weight_hh.shape == (0, 0)
        assert lib.RNNCell(0, H, nonlinearity="sigmoid").weight_ih.shape == (H, 0)


def c(*shape, dtype=torch.float64):
    return torch.zeros(*shape, dtype=dtype)


CELL_FWD = [
    # (id, class, input, hx, exception, key)
    ("RNNCell-input-3D", "RNNCell", lambda: c(2, 4, I), None, ValueError,
     "RNNCell: Expected input to be 1D or 2D, got 3D instead"),
    ("GRUCell-input-0D", "GRUCell", lambda: torch.zeros((), dtype=torch.float64), None, ValueError,
     "GRUCell: Expected input to be 1D or 2D, got 0D instead"),
    ("LSTMCell-input-3D", "LSTMCell", lambda: c(2, 4, I), None, ValueError,
     "LSTMCell: Expected input to be 1D or 2D, got 3D instead"),
    ("RNNCell-hx-3D", "RNNCell", lambda: c(4, I), lambda: c(1, 4, H), ValueError,
     "RNNCell: Expected hidden to be 1D or 2D, got 3D instead"),
    ("GRUCell-hx-3D", "GRUCell", lambda: c(4, I), lambda: c(1, 4, H), ValueError,
     "GRUCell: Expected hidden to be 1D or 2D, got 3D instead"),
    ("LSTMCell-c-3D", "LSTMCell", lambda: c(4, I), lambda: (c(4, H), c(1, 4, H)), ValueError,
     "LSTMCell: Expected hx[1] to be 1D or 2D, got 3D instead"),
    ("LSTMCell-h-3D", "LSTMCell", lambda: c(4, I), lambda: (c(1, 4, H), c(4, H)), ValueError,
     "LSTMCell: Expected hx[0] to be 1D or 2D, got 3D instead"),
    ("RNNCell-features", "RNNCell", lambda: c(2, 7), None, RuntimeError,
     "input has inconsistent input_size: got 7 expected 3"),
    ("LSTMCell-features-unbatched", "LSTMCell", lambda: c(7), None, RuntimeError,
     "input has inconsistent input_size: got 7 expected 3"),
    ("GRUCell-batch", "GRUCell", lambda: c(2, I), lambda: c(3, H), RuntimeError,
     "Input batch size 2 doesn't match hidden0 batch size 3"),
    ("LSTMCell-c-batch", "LSTMCell", lambda: c(2, I), lambda: (c(2, H), c(3, H)), RuntimeError,
     "Input batch size 2 doesn't match hidden1 batch size 3"),
    ("RNNCell-hidden", "RNNCell", lambda: c(2, I), lambda: c(2, 4), RuntimeError,
     "hidden0 has inconsistent hidden_size: got 4, expected 5"),
    ("LSTMCell-c-hidden", "LSTMCell", lambda: c(2, I), lambda: (c(2, H), c(2, 4)), RuntimeError,
     "hidden1 has inconsistent hidden_size: got 4, expected 5"),
    ("GRUCell-hx-batch1-no-broadcast", "GRUCell", lambda: c(3, I), lambda: c(1, H),
     RuntimeError, None),
    ("RNNCell-2D-input-1D-hx", "RNNCell", lambda: c(2, I), lambda: c(H), RuntimeError, None),
    ("LSTMCell-1D-input-2D-hx", "LSTMCell", lambda: c(I), lambda: (c(1, H), c(1, H)),
     RuntimeError, None),
    ("GRUCell-dtype", "GRUCell", lambda: c(2, I, dtype=torch.float32), None, RuntimeError, None),
    ("RNNCell-hx-dtype", "RNNCell", lambda: c(2, I), lambda: c(2, H, dtype=torch.float32),
     RuntimeError, None),
    ("LSTMCell-dtype", "LSTMCell", lambda: c(2, I, dtype=torch.float32), None, RuntimeError,
     None),
]  # fmt: skip


@pytest.mark.parametrize("cls,make_x,make_hx,exc,key", [r[1:] for r in CELL_FWD],
                         ids=[r[0] for r in CELL_FWD])  # fmt: skip
def test_cell_forward_validation(cls, make_x, make_hx, exc, key, path):
    x = make_x()
    hx = None if make_hx is None else make_hx()
    # rank errors come from torch.nn's Python code: compared exactly; the rest are ATen's
    exact = exc is ValueError
    raise_alike(
        lambda lib: getattr(lib, cls)(I, H, dtype=torch.float64)(x, hx), exc, key, exact=exact
    )


# ------------------------------------------------------------------------------------------------
# fused_rnn's own arguments


def _ours_all(**kw):
    return [fused_rnn.LSTM(I, H, **kw), fused_rnn.GRU(I, H, **kw), fused_rnn.RNN(I, H, **kw),
            fused_rnn.LSTMCell(I, H, **kw), fused_rnn.GRUCell(I, H, **kw),
            fused_rnn.RNNCell(I, H, **kw)]  # fmt: skip


@pytest.mark.parametrize("backend", ["nope", "Torch", "", None, 1])
def test_unknown_backend(backend):
    for cls in (fused_rnn.LSTM, fused_rnn.GRU, fused_rnn.RNN, fused_rnn.LSTMCell,
                fused_rnn.GRUCell, fused_rnn.RNNCell):  # fmt: skip
        with pytest.raises(ValueError, match="backend must be one of"):
            cls(I, H, backend=backend)
    w = [[torch.zeros(4 * H, I), torch.zeros(4 * H, H)]]
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_rnn.functional.lstm(torch.zeros(2, 1, I), None, w, bias=False, backend=backend)


def test_backend_is_keyword_only():
    with pytest.raises(TypeError):
        fused_rnn.LSTM(I, H, 1, True, False, 0.0, False, 0, None, None, "torch")
    with pytest.raises(TypeError):
        fused_rnn.GRUCell(I, H, True, None, None, "torch")


def _x_for(m):
    return torch.zeros(2, I) if isinstance(m, fused_rnn.RNNCellBase) else torch.zeros(4, 2, I)


@pytest.mark.parametrize("backend", ["stepwise", "persistent"])
def test_fused_backend_on_cpu_without_interpreter(backend, monkeypatch):
    """Asking for a Triton backend on a CPU tensor without TRITON_INTERPRET=1 is an error that
    says why; the decision follows the environment at call time (nothing cached)."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    why = dispatch.unavailable_reason(backend, "LSTM", cpu)  # may populate import caches
    assert why is None or "CUDA" not in why

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.interpreter_enabled()
    for m in _ours_all(backend=backend):
        with pytest.raises(RuntimeError) as info:
            m(_x_for(m))
        msg = str(info.value)
        assert f"backend={backend!r}" in msg and "TRITON_INTERPRET=1" in msg and "CUDA" in msg

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    why = dispatch.unavailable_reason(backend, "GRU", cpu)
    assert why is None or "CUDA" not in why, "the CPU decision was cached"


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_auto_backend_never_raises_on_cpu(interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert dispatch.resolve("auto", "LSTM", torch.device("cpu")) == "torch"
    torch.manual_seed(0)
    for m in _ours_all():
        assert m.backend == "auto"
        out = m(_x_for(m))
        out = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(out).all()


def test_lstm_variants_only_on_lstm():
    for cls in (fused_rnn.GRU, fused_rnn.RNN, fused_rnn.GRUCell, fused_rnn.RNNCell):
        for kw in (dict(peephole=True), dict(coupled_gates=True)):
            with pytest.raises(TypeError, match="unexpected keyword argument"):
                cls(I, H, **kw)
    for mode in ("GRU", "RNN_TANH"):  # RNNBase itself: the variants are not its mode's options
        with pytest.raises(TypeError, match="unexpected keyword argument 'peephole'"):
            fused_rnn.RNNBase(mode, I, H, peephole=True)
        with pytest.raises(TypeError, match="unexpected keyword argument 'coupled_gates'"):
            fused_rnn.RNNBase(mode, I, H, coupled_gates=True)
    for cls in (fused_rnn.LSTM, fused_rnn.LSTMCell):
        with pytest.raises(TypeError, match="peephole should be of type bool"):
            cls(I, H, peephole=1)
        with pytest.raises(TypeError, match="coupled_gates should be of type bool"):
            cls(I, H, coupled_gates="yes")


# ------------------------------------------------------------------------------------------------
# fused_rnn.functional: weight layouts. The weights are one list per layer and direction in
# torch's order (what torch.nn's all_weights holds); any other layout names the expected one.

LSTM_LAYOUT = (
    "weights must be a list of num_layers*num_directions (= 4) lists [w_ih, w_hh, b_ih, b_hh], "
    "one per layer and direction in torch's order (as torch.nn's all_weights holds them)"
)


def _flat(groups):
    return [w for g in groups for w in g]


# (id, weights from the all_weights of an nn.LSTM(I, H, num_layers=2, bidirectional=True),
#  exception, the text after the layout)
LAYOUTS = [
    ("flat-list", _flat, TypeError,
     "got a flat list of 16 tensors: group them per layer and direction, "
     "[[w_ih_l0, w_hh_l0, ...], [w_ih_l1, w_hh_l1, ...]]"),
    ("tensor", lambda g: g[0][0], TypeError, f"got a Tensor of shape ({4 * H}, {I})"),
    ("state_dict", lambda g: {"weight_ih_l0": g[0][0]}, TypeError,
     "got a dict (a state_dict?): pass the module's all_weights"),
    ("not-iterable", lambda g: 3, TypeError, "got int"),
    ("missing-bias", lambda g: [ws[:2] for ws in g], ValueError,
     "weights[0] holds 2 tensors, expected 4 (no biases? pass bias=False)"),
    ("too-few-groups", lambda g: g[:2], ValueError, "got 2 lists"),
    ("one-group", lambda g: g[:1], ValueError, "got 1 list"),
    ("too-many-groups", lambda g: g + g[:1], ValueError, "got 5 lists"),
    ("group-is-tensor", lambda g: [g[0][0], *g[1:]], TypeError,
     f"weights[0] is a Tensor of shape ({4 * H}, {I})"),
    ("group-is-dict", lambda g: [*g[:3], {"w": g[3][0]}], TypeError, "weights[3] is a dict"),
    ("bias-none", lambda g: [[ws[0], ws[1], None, ws[3]] for ws in g], TypeError,
     "weights[0][2] (b_ih) is None, not a Tensor"),
    ("bias-before-w_hh", lambda g: [[ws[0], ws[2], ws[1], ws[3]] for ws in g], ValueError,
     f"weights[0][1] (w_hh) must be 2-D, got shape ({4 * H},)"),
]  # fmt: skip


@pytest.mark.parametrize("make, exc, got", [r[1:] for r in LAYOUTS], ids=[r[0] for r in LAYOUTS])
def test_functional_weight_layout_errors(make, exc, got):
    ref = nn.LSTM(I, H, num_layers=2, bidirectional=True)
    x = torch.zeros(2, 1, I)
    with pytest.raises(exc) as info:
        fused_rnn.functional.lstm(x, None, make(ref.all_weights), num_layers=2, bidirectional=True)
    assert str(info.value) == f"{LSTM_LAYOUT}; {got}"


def test_functional_weight_layout_names_the_options():
    """The expected layout follows bias, proj_size and peephole; the right one runs."""
    x = torch.zeros(2, 1, I)
    nobias = nn.GRU(I, H, bias=False)
    with pytest.raises(ValueError) as info:
        fused_rnn.functional.gru(x, None, [ws * 2 for ws in nobias.all_weights], bias=False)
    assert "lists [w_ih, w_hh], one per layer" in str(info.value)
    assert "weights[0] holds 4 tensors, expected 2 (with biases, pass bias=True)" in str(info.value)
    with pytest.raises(TypeError, match=r"\(= 1\) lists \[w_ih, w_hh\].*flat list of 2 tensors"):
        fused_rnn.functional.rnn(x, None, nn.RNN(I, H, bias=False).all_weights[0], bias=False)

    proj = nn.LSTM(I, H, proj_size=2)
    with pytest.raises(ValueError, match=r"\[w_ih, w_hh, b_ih, b_hh, w_hr\].*holds 4 tensors"):
        fused_rnn.functional.lstm(x, None, [ws[:4] for ws in proj.all_weights], proj_size=2)
    peep = fused_rnn.LSTM(I, H, peephole=True, proj_size=2)
    w = peep.all_weights
    assert len(w[0]) == 6
    fused_rnn.functional.lstm(x, None, w, proj_size=2, peephole=True)
    with pytest.raises(ValueError, match=r"\[w_ih, w_hh, b_ih, b_hh, w_hr, w_ch\].*holds 5"):
        fused_rnn.functional.lstm(x, None, [ws[:5] for ws in w], proj_size=2, peephole=True)
    swapped = [[*ws[:4], ws[5], ws[4]] for ws in w]  # w_ch before w_hr
    with pytest.raises(ValueError, match=r"weights\[0\]\[4\] \(w_hr\) must be 2-D, got shape"):
        fused_rnn.functional.lstm(x, None, swapped, proj_size=2, peephole=True)


# ----------------------------------------------------------------------------- devices and names

BACKENDS_HERE = [
    "torch",
    *(b for b in ("stepwise", "persistent") if b in dispatch.available_backends()),
]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_parameters_on_another_device_raise_like_torch(cls, backend):
    """Weights on another device than the input (here "meta", a device every machine has): the
    class and message torch.nn gives, on every backend and for the LSTM variants too."""
    cell = cls.endswith("Cell")
    x = torch.randn(2, I) if cell else torch.randn(4, 2, I)
    raise_alike(lambda lib: getattr(lib, cls)(I, H).to("meta")(x), RuntimeError, exact=True)
    if cls.startswith("LSTM"):  # the variants (no torch.nn op) say what torch.nn.LSTM would
        ours = getattr(fused_rnn, cls)(I, H, peephole=True, backend=backend).to("meta")
        with pytest.raises(RuntimeError) as info:
            ours(x)
        with pytest.raises(RuntimeError) as ref_info:
            getattr(nn, cls)(I, H).to("meta")(x)
        assert str(info.value) == str(ref_info.value)


def test_operator_errors_name_the_layer():
    """A dtype mix reaching the operators names the layer that was called (the RNN runs on the
    GRU's operators)."""
    from fused_rnn.recurrence import gru_recurrence, lstm_recurrence, rnn_recurrence

    gx, h0, w_hh = torch.randn(3, 2, 4), torch.randn(2, 4).double(), torch.randn(4, 4)
    for fn, args, name in [
        (rnn_recurrence, (gx, h0, w_hh), "RNN"),
        (gru_recurrence, (torch.randn(3, 2, 12), h0, torch.randn(12, 4)), "GRU"),
        (lstm_recurrence, (torch.randn(3, 2, 16), h0, h0.float(), torch.randn(16, 4)), "LSTM"),
    ]:
        with pytest.raises(TypeError, match=rf"^fused_rnn {name}: expected all tensors"):
            fn(*args, backend="torch")
