"""Drop-in replacements for torch.nn.RNN, LSTM, GRU, RNNCell, LSTMCell and GRUCell.

Same constructor arguments, validation and exception types, parameter names, shapes,
registration order and initialisation as torch.nn (so the same seed gives the same weights and
`load_state_dict` works both ways), the same inputs (batched, unbatched, batch_first,
PackedSequence) and outputs. Extra behaviour is keyword-only and off by default:

    backend="auto" | "torch" | "stepwise" | "persistent"    which kernels run (fused_rnn.dispatch)
    peephole=True, coupled_gates=True                       LSTM variants (LSTM and LSTMCell)
    zoneout=z (LSTM: z or (z_c, z_h))                       zoneout of the states (all six)
    recurrent_dropout=p                                     variational dropout of h into W_hh
                                                            (LSTM, GRU, RNN)
    layer_norm=True                                         layer-normalised LSTM, GRU, LSTMCell,
                                                            GRUCell (adds parameters)

Weights are read again on every forward: in-place edits, `load_state_dict`, re-assigned
Parameters, `functional_call` and parametrizations all take effect on the next call.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import dispatch, functional
from .reference import CellWeights

__all__ = ["RNNBase", "RNN", "LSTM", "GRU", "RNNCellBase", "RNNCell", "LSTMCell", "GRUCell"]

_MODE_NAME = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN"}


def _check_variants(peephole, coupled_gates, layer_norm=False):
    for name, value in (("peephole", peephole), ("coupled_gates", coupled_gates),
                        ("layer_norm", layer_norm)):  # fmt: skip
        if not isinstance(value, bool):
            raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")


def _ln_shapes(gate_size: int, hidden_size: int, lstm: bool) -> list[tuple[str, tuple]]:
    """(stem, shape) of the layer-norm parameters of one layer-direction (or cell), in their
    registration order: gains and biases of LN_ih, LN_hh (gate_size,) and the LSTM's LN_c (H,)."""
    shapes = [("weight_ln_ih", (gate_size,)), ("bias_ln_ih", (gate_size,)),
              ("weight_ln_hh", (gate_size,)), ("bias_ln_hh", (gate_size,))]  # fmt: skip
    if lstm:
        shapes += [("weight_ln_c", (hidden_size,)), ("bias_ln_c", (hidden_size,))]
    return shapes


def _is_ln(name: str) -> bool:
    return name.startswith(("weight_ln_", "bias_ln_"))


def _reset(module: nn.Module, hidden_size: int) -> None:
    """torch.nn's init, U(-1/sqrt(H), 1/sqrt(H)) for every parameter in registration order, but
    the layer-norm parameters are skipped (so the other parameters get the same draws as in
    torch.nn for a seed) and set to gain 1, bias 0."""
    stdv = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0
    for name, weight in module.named_parameters():
        if not _is_ln(name.rpartition(".")[2]):
            nn.init.uniform_(weight, -stdv, stdv)
    with torch.no_grad():
        for name, weight in module.named_parameters():
            if _is_ln(name.rpartition(".")[2]):
                weight.fill_(1.0 if name.rpartition(".")[2].startswith("weight") else 0.0)


class RNNBase(nn.Module):
    """The shared body of RNN, LSTM and GRU (see torch.nn.RNNBase)."""

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
        peephole: bool = False,
        coupled_gates: bool = False,
        zoneout=0.0,
        recurrent_dropout: float = 0.0,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.backend = dispatch.check_backend(backend)
        self.peephole = peephole
        self.coupled_gates = coupled_gates
        self.zoneout = zoneout
        self.recurrent_dropout = recurrent_dropout
        self.layer_norm = layer_norm
        num_directions = 2 if bidirectional else 1

        if (
            not isinstance(dropout, numbers.Number)
            or not 0 <= dropout <= 1
            or isinstance(dropout, bool)
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] "
                "representing the probability of an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                stacklevel=2,
            )
        for name, value in (("bias", bias), ("batch_first", batch_first)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
        if not isinstance(input_size, int):
            raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError(
                "proj_size should be a positive integer or zero to disable projections"
            )
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        _check_variants(peephole, coupled_gates, layer_norm)
        if (peephole or coupled_gates) and mode != "LSTM":
            name = "peephole" if peephole else "coupled_gates"
            raise TypeError(f"RNNBase.__init__() got an unexpected keyword argument '{name}'")
        if layer_norm and mode not in ("LSTM", "GRU"):
            raise TypeError("RNNBase.__init__() got an unexpected keyword argument 'layer_norm'")
        functional.check_zoneout(mode, zoneout)
        functional.check_recurrent_dropout(recurrent_dropout)

        gate_size = functional.gate_count(mode, coupled_gates) * hidden_size
        real_hidden_size = proj_size if proj_size > 0 else hidden_size
        factory = {"device": device, "dtype": dtype}
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_input_size = input_size if layer == 0 else real_hidden_size * num_directions
                shapes = [
                    ("weight_ih", (gate_size, layer_input_size)),
                    ("weight_hh", (gate_size, real_hidden_size)),
                ]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                if peephole:
                    shapes += [("weight_ch", ((2 if coupled_gates else 3) * hidden_size,))]
                if layer_norm:
                    shapes += _ln_shapes(gate_size, hidden_size, mode == "LSTM")
                suffix = "_reverse" if direction == 1 else ""
                names = []
                for stem, shape in shapes:
                    name = f"{stem}_l{layer}{suffix}"
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset(self, self.hidden_size)

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name, None) for name in self._flat_weights_names]

    @_flat_weights.setter
    def _flat_weights(self, value) -> None:
        # torch.nn keeps a cached list here that some third-party code reassigns to refresh it;
        # this list is derived from the attributes at every access, so there is nothing to
        # refresh and the assignment is accepted without effect
        pass

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"torch.jit.script does not support fused_rnn.{type(self).__name__}; use "
            "torch.compile or torch.export instead"
        )

    @property
    def all_weights(self) -> list[list[Tensor]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """A no-op: weights are read in place on every forward (kept for API compatibility)."""
        return None

    def _cell_weights(self) -> list[CellWeights]:
        return functional._layer_weights(
            self.all_weights, self.bias, self.proj_size > 0, self.peephole,
            layer_norm=self.layer_norm, mode=self.mode,
        )  # fmt: skip

    # --- input checks (torch's order and exception types) -----------------------------------

    def _real_hidden_size(self) -> int:
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _check_input(self, input: Tensor, batch_sizes) -> None:
        weight_dtype = self.weight_ih_l0.dtype if hasattr(self, "weight_ih_l0") else None
        if (
            weight_dtype is not None
            and input.dtype != weight_dtype
            and not torch._C._is_any_autocast_enabled()
        ):
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight_dtype}). "
                f"Convert input: input.to({weight_dtype}), or convert model: "
                f"model.to({input.dtype})"
            )
        expected_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {input.size(-1)}"
            )

    def _expected_hidden(self, input: Tensor, batch_sizes, width: int) -> tuple[int, int, int]:
        if batch_sizes is not None:
            mini_batch = int(batch_sizes[0])
        else:
            mini_batch = input.size(0) if self.batch_first else input.size(1)
        num_directions = 2 if self.bidirectional else 1
        return (self.num_layers * num_directions, mini_batch, width)

    @staticmethod
    def _check_hidden(hx: Tensor, expected: tuple, input: Tensor, msg: str) -> None:
        if hx.size() != expected:
            raise RuntimeError(msg.format(expected, list(hx.size())))
        if hx.dtype != input.dtype and not torch._C._is_any_autocast_enabled():
            raise RuntimeError(
                f"hidden state dtype ({hx.dtype}) does not match input dtype ({input.dtype})"
            )
        if hx.device != input.device:
            raise RuntimeError(
                f"Input and hidden tensors are not at the same device, found input tensor at "
                f"{input.device} and hidden tensor at {hx.device}"
            )

    # --- forward ----------------------------------------------------------------------------

    def forward(self, input, hx=None):
        is_lstm = self.mode == "LSTM"
        name = _MODE_NAME[self.mode]
        R = self._real_hidden_size()
        is_packed = isinstance(input, PackedSequence)
        is_batched = True
        batch_sizes = None
        if is_packed:
            data, batch_sizes = input.data, input.batch_sizes
        else:
            data = input
            if input.dim() not in (2, 3):
                tensor = " tensor" if name == "RNN" else ""
                raise ValueError(
                    f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} instead"
                )
            is_batched = input.dim() == 3
            if not is_batched:
                data = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = self._check_hx_rank(hx, is_batched, is_lstm)
        self._check_input(data, batch_sizes)
        if hx is None:
            pass  # zeros of the input's dtype and device, made by the functional stack
        elif is_lstm:
            self._check_hidden(hx[0], self._expected_hidden(data, batch_sizes, R), data,
                               "Expected hidden[0] size {}, got {}")  # fmt: skip
            self._check_hidden(hx[1], self._expected_hidden(data, batch_sizes, self.hidden_size),
                               data, "Expected hidden[1] size {}, got {}")  # fmt: skip
            hx = (hx[0], hx[1])
        else:
            self._check_hidden(hx, self._expected_hidden(data, batch_sizes, R), data,
                               "Expected hidden size {}, got {}")  # fmt: skip
        output, hn, cn = functional._generic(
            self.mode, input if is_packed else data, hx, self.all_weights, bias=self.bias,
            num_layers=self.num_layers, dropout=self.dropout, training=self.training,
            bidirectional=self.bidirectional, batch_first=self.batch_first,
            proj_size=self.proj_size, peephole=self.peephole, coupled=self.coupled_gates,
            backend=self.backend, zoneout=self.zoneout, recurrent_dropout=self.recurrent_dropout,
            layer_norm=self.layer_norm,
        )  # fmt: skip
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hn = hn.squeeze(1)
            cn = None if cn is None else cn.squeeze(1)
        return (output, (hn, cn)) if is_lstm else (output, hn)

    def _check_hx_rank(self, hx, is_batched: bool, is_lstm: bool):
        want = 3 if is_batched else 2
        kind = "batched 3-D" if is_batched else "unbatched 2-D"
        if is_lstm:
            h, c = hx
            if h.dim() != want or c.dim() != want:
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {want}-D but got "
                    f"({h.dim()}-D, {c.dim()}-D) tensors"
                )
            return hx if is_batched else (h.unsqueeze(1), c.unsqueeze(1))
        if hx.dim() != want:
            raise RuntimeError(
                f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor"
            )
        return hx if is_batched else hx.unsqueeze(1)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.peephole:
            s += ", peephole=True"
        if self.coupled_gates:
            s += ", coupled_gates=True"
        s += _options_repr(self)
        if self.backend != "auto":
            s += ", backend={backend!r}"
        return s.format(**self.__dict__)


def _options_repr(module) -> str:
    s = ""
    if getattr(module, "zoneout", 0) not in (0, 0.0, (0, 0), [0, 0], (0.0, 0.0)):
        s += f", zoneout={module.zoneout!r}"
    if getattr(module, "recurrent_dropout", 0):
        s += f", recurrent_dropout={module.recurrent_dropout!r}"
    if getattr(module, "layer_norm", False):
        s += ", layer_norm=True"
    return s


class RNN(RNNBase):
    """Elman RNN, ``h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)``: a drop-in for torch.nn.RNN.

    Args as torch.nn.RNN (input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None), plus the
    keyword-only ``backend``, ``zoneout`` and ``recurrent_dropout`` (as fused_rnn.LSTM).
    Input (L, N, H_in) / (N, L, H_in) / (L, H_in) or a PackedSequence,
    h_0 (D*num_layers, N, H); returns (output, h_n).

    Example:
        >>> rnn = fused_rnn.RNN(10, 20, 2)
        >>> output, h_n = rnn(torch.randn(5, 3, 10))
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        nonlinearity="tanh",
        bias=True,
        batch_first=False,
        dropout=0.0,
        bidirectional=False,
        device=None,
        dtype=None,
        *,
        backend="auto",
        **kwargs,
    ):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(
                f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        # other unknown keywords reach RNNBase, which rejects them after this check, as in torch
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend=backend, **kwargs)  # fmt: skip
        self.nonlinearity = nonlinearity


class LSTM(RNNBase):
    """Long short-term memory: a drop-in for torch.nn.LSTM, with two optional variants.

    Args as torch.nn.LSTM (input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None), plus keyword-only:

        backend: "auto" (default), "torch", "stepwise" or "persistent".
        peephole: gates see the cell state through diagonal weights (Gers & Schmidhuber):
            i = σ(.. + p_i⊙c_{t-1}), f = σ(.. + p_f⊙c_{t-1}), o = σ(.. + p_o⊙c_t). Adds
            ``weight_ch_l{k}[_reverse]`` of shape (3*hidden_size,) in the order (i, f, o).
        coupled_gates: coupled input and forget gate (CIFG), i = 1 - f. The input gate has no
            weights: weight_ih/weight_hh/biases have 3*hidden_size rows in the order (f, g, o),
            and with peephole ``weight_ch`` is (2*hidden_size,) in the order (f, o).
        zoneout: a float z in [0, 1) or a pair (z_c, z_h) (Krueger et al. 2016). In training,
            each unit of c (h) keeps its previous value with probability z_c (z_h) at each step,
            row and unit: c_t = d ⊙ c_{t-1} + (1 - d) ⊙ c̃_t, h_t likewise with its own d, where
            c̃_t, h̃_t = o ⊙ tanh(c̃_t) are the usual cell outputs; y_t is h_t. In evaluation the
            expectation, c_t = z_c c_{t-1} + (1 - z_c) c̃_t. Masks from torch's generator (one
            draw per forward, fused_rnn._rng): reproducible under torch.manual_seed.
        recurrent_dropout: p in [0, 1) (Gal & Ghahramani 2016): in training, h_{t-1} ⊙ m
            enters W_hh, m (B, R) one mask per sequence, layer and direction, 0 with probability
            p, else 1/(1-p). One bernoulli draw of torch's generator per layer-direction.
        layer_norm: Ba, Kiros & Hinton (2016): gates = LN_ih(x W_ih^T) + b_ih +
            LN_hh(h W_hh^T) + b_hh, each LN over the row's G*hidden_size values (nn.LayerNorm:
            biased variance, eps 1e-5), and h = o ⊙ tanh(LN_c(c)) (c carried unnormalised;
            with proj_size before the projection). Adds, after the other parameters of each
            layer and direction, ``weight_ln_ih_l{k}``, ``bias_ln_ih_l{k}``,
            ``weight_ln_hh_l{k}``, ``bias_ln_hh_l{k}`` (G*hidden_size,) and ``weight_ln_c_l{k}``,
            ``bias_ln_c_l{k}`` (hidden_size,) (suffix ``_reverse``), gains 1 and biases 0.

    With all of these off (the default) parameters, state_dict and outputs are those of
    torch.nn.LSTM.
    Gate order (i, f, g, o). Input as torch.nn.LSTM; hx = (h_0 (D*num_layers, N, H_out),
    c_0 (D*num_layers, N, H)); returns (output, (h_n, c_n)).

    Example:
        >>> lstm = fused_rnn.LSTM(10, 20, 2, batch_first=True)
        >>> output, (h_n, c_n) = lstm(torch.randn(3, 5, 10))
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        bias=True,
        batch_first=False,
        dropout=0.0,
        bidirectional=False,
        proj_size=0,
        device=None,
        dtype=None,
        *,
        backend="auto",
        peephole=False,
        coupled_gates=False,
        zoneout=0.0,
        recurrent_dropout=0.0,
        layer_norm=False,
    ):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype, backend=backend,
                         peephole=peephole, coupled_gates=coupled_gates, zoneout=zoneout,
                         recurrent_dropout=recurrent_dropout,
                         layer_norm=layer_norm)  # fmt: skip


class GRU(RNNBase):
    """Gated recurrent unit: a drop-in for torch.nn.GRU.

    ``n = tanh(x W_in^T + b_in + r ⊙ (h W_hn^T + b_hn))``, ``h' = (1 - z) ⊙ n + z ⊙ h``, gate
    order (r, z, n). Args as torch.nn.GRU plus the keyword-only ``backend``, ``zoneout`` (a
    float), ``recurrent_dropout`` (the dropped h feeds all three products W_hr h, W_hz h,
    W_hn h; the carry z ⊙ h keeps the undropped h) and ``layer_norm`` (the n block of LN_hh's
    output plus b_hn is what r multiplies; parameters as fused_rnn.LSTM's without LN_c), all as
    fused_rnn.LSTM.

    Example:
        >>> gru = fused_rnn.GRU(10, 20, bidirectional=True)
        >>> output, h_n = gru(torch.randn(5, 3, 10))
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        bias=True,
        batch_first=False,
        dropout=0.0,
        bidirectional=False,
        device=None,
        dtype=None,
        *,
        backend="auto",
        **kwargs,
    ):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend=backend, **kwargs)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# cells


class RNNCellBase(nn.Module):
    """The shared body of the cells (see torch.nn.RNNCellBase): no argument validation."""

    def __init__(self, input_size, hidden_size, bias, num_chunks, device=None, dtype=None, *,
                 backend="auto"):  # fmt: skip
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.backend = dispatch.check_backend(backend)
        self.weight_ih = nn.Parameter(
            torch.empty((num_chunks * hidden_size, input_size), **factory)
        )
        self.weight_hh = nn.Parameter(
            torch.empty((num_chunks * hidden_size, hidden_size), **factory)
        )
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)

    def reset_parameters(self) -> None:
        _reset(self, self.hidden_size)

    def _add_options(self, mode: str, zoneout, layer_norm: bool, num_chunks: int, factory):
        """Validates and keeps `zoneout`; with `layer_norm`, registers its parameters after the
        others (names as the layers' without the _l{k} suffix)."""
        functional.check_zoneout(mode, zoneout)
        self.zoneout = zoneout
        self.layer_norm = layer_norm
        if layer_norm:
            for stem, shape in _ln_shapes(num_chunks * self.hidden_size, self.hidden_size,
                                          mode == "LSTM"):  # fmt: skip
                self.register_parameter(stem, nn.Parameter(torch.empty(shape, **factory)))

    def _ln_weights(self):
        if not getattr(self, "layer_norm", False):
            return None
        names = ["weight_ln_ih", "bias_ln_ih", "weight_ln_hh", "bias_ln_hh"]
        names += ["weight_ln_c", "bias_ln_c"] if hasattr(self, "weight_ln_c") else []
        return tuple(getattr(self, n) for n in names)

    __prepare_scriptable__ = RNNBase.__prepare_scriptable__

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if "bias" in self.__dict__ and self.bias is not True:
            s += ", bias={bias}"
        if "nonlinearity" in self.__dict__ and self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity}"
        if getattr(self, "peephole", False):
            s += ", peephole=True"
        if getattr(self, "coupled_gates", False):
            s += ", coupled_gates=True"
        s += _options_repr(self)
        if self.backend != "auto":
            s += ", backend={backend!r}"
        return s.format(**self.__dict__)

    def _prepare(self, name: str, input: Tensor, hxs: list[Tensor | None]):
        """torch's rank checks, unbatching and default zeros; then ATen's size checks."""
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        for idx, h in enumerate(hxs):
            if h is not None and h.dim() not in (1, 2):
                what = f"hx[{idx}]" if len(hxs) > 1 else "hidden"
                raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {h.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        out = []
        for h in hxs:
            if h is None:
                h = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype,
                                device=input.device)  # fmt: skip
            elif not is_batched:
                h = h.unsqueeze(0)
            out.append(h)
        if input.size(1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}"
            )
        for idx, h in enumerate(out):
            if h.dim() != 2 or input.size(0) != h.size(0):
                raise RuntimeError(
                    f"Input batch size {input.size(0)} doesn't match hidden{idx} batch size "
                    f"{h.size(0) if h.dim() == 2 else h.size()}"
                )
            if h.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{idx} has inconsistent hidden_size: got {h.size(1)}, expected "
                    f"{self.hidden_size}"
                )
            if h.dtype != input.dtype and not torch._C._is_any_autocast_enabled():
                raise RuntimeError(f"expected hidden{idx} dtype {input.dtype} but got {h.dtype}")
        if self.weight_ih.dtype != input.dtype and not torch._C._is_any_autocast_enabled():
            raise RuntimeError(
                f"expected input dtype {self.weight_ih.dtype} (the weights' dtype) but got "
                f"{input.dtype}"
            )
        return input, out, is_batched


class RNNCell(RNNCellBase):
    """An Elman RNN cell: a drop-in for torch.nn.RNNCell (note: bias comes before nonlinearity).

    Keyword-only extras: ``backend``, ``zoneout`` (a float: h' = d ⊙ h + (1 - d) ⊙ h̃, as
    fused_rnn.LSTM's, a fresh mask per call in training).

    Example:
        >>> cell = fused_rnn.RNNCell(10, 20)
        >>> h = cell(torch.randn(3, 10))
    """

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None,
                 dtype=None, *, backend="auto", zoneout=0.0):  # fmt: skip
        super().__init__(input_size, hidden_size, bias, 1, device, dtype, backend=backend)
        self.nonlinearity = nonlinearity
        self._add_options("RNN_TANH", zoneout, False, 1, None)
        self.reset_parameters()

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        input, (h,), is_batched = self._prepare("RNNCell", input, [hx])
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        ret = functional.rnn_cell(input, h, self.weight_ih, self.weight_hh, self.bias_ih,
                                  self.bias_hh, nonlinearity=self.nonlinearity,
                                  backend=self.backend, zoneout=self.zoneout,
                                  training=self.training)  # fmt: skip
        return ret if is_batched else ret.squeeze(0)


class GRUCell(RNNCellBase):
    """A GRU cell: a drop-in for torch.nn.GRUCell. Gate order (r, z, n).

    Keyword-only extras: ``backend``, ``zoneout`` (a float) and ``layer_norm`` (adds
    ``weight_ln_ih``, ``bias_ln_ih``, ``weight_ln_hh``, ``bias_ln_hh`` of shape (3*hidden_size,)),
    as fused_rnn.GRU's; zoneout draws a fresh mask per call in training.

    Example:
        >>> cell = fused_rnn.GRUCell(10, 20)
        >>> h = cell(torch.randn(3, 10))
    """

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *,
                 backend="auto", zoneout=0.0, layer_norm=False):  # fmt: skip
        _check_variants(False, False, layer_norm)
        super().__init__(input_size, hidden_size, bias, 3, device, dtype, backend=backend)
        self._add_options("GRU", zoneout, layer_norm, 3, {"device": device, "dtype": dtype})
        self.reset_parameters()

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        input, (h,), is_batched = self._prepare("GRUCell", input, [hx])
        ret = functional.gru_cell(input, h, self.weight_ih, self.weight_hh, self.bias_ih,
                                  self.bias_hh, backend=self.backend, zoneout=self.zoneout,
                                  training=self.training,
                                  layer_norm=self._ln_weights())  # fmt: skip
        return ret if is_batched else ret.squeeze(0)


class LSTMCell(RNNCellBase):
    """An LSTM cell: a drop-in for torch.nn.LSTMCell, with the LSTM variants.

    Keyword-only extras as fused_rnn.LSTM: ``backend``, ``peephole`` (adds ``weight_ch`` of shape
    (3*hidden_size,), order (i, f, o)), ``coupled_gates`` (i = 1 - f; 3*hidden_size weight
    rows in the order (f, g, o); ``weight_ch`` (2*hidden_size,) in the order (f, o)),
    ``zoneout`` (a float or (z_c, z_h); a fresh mask per call in training) and ``layer_norm``
    (adds ``weight_ln_ih``, ``bias_ln_ih``, ``weight_ln_hh``, ``bias_ln_hh`` (G*hidden_size,),
    ``weight_ln_c``, ``bias_ln_c`` (hidden_size,), after the other parameters).

    Example:
        >>> cell = fused_rnn.LSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10))
    """

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *,
                 backend="auto", peephole=False, coupled_gates=False, zoneout=0.0,
                 layer_norm=False):  # fmt: skip
        _check_variants(peephole, coupled_gates, layer_norm)
        chunks = 3 if coupled_gates else 4
        super().__init__(input_size, hidden_size, bias, chunks, device, dtype,
                         backend=backend)  # fmt: skip
        self.peephole = peephole
        self.coupled_gates = coupled_gates
        if peephole:
            n = (2 if coupled_gates else 3) * hidden_size
            self.weight_ch = nn.Parameter(torch.empty(n, device=device, dtype=dtype))
        self._add_options("LSTM", zoneout, layer_norm, chunks, {"device": device, "dtype": dtype})
        self.reset_parameters()

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        hxs = [None, None] if hx is None else list(hx)
        input, (h, c), is_batched = self._prepare("LSTMCell", input, hxs)
        h, c = functional.lstm_cell(input, (h, c), self.weight_ih, self.weight_hh, self.bias_ih,
                                    self.bias_hh, w_ch=getattr(self, "weight_ch", None),
                                    coupled_gates=self.coupled_gates, backend=self.backend,
                                    zoneout=self.zoneout, training=self.training,
                                    layer_norm=self._ln_weights())  # fmt: skip
        return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))
