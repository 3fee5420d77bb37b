"""fused_rnn.convert / fused_rnn.revert on real model shapes, against the unconverted model.

On CPU both sides run torch's native ops (backend "auto" resolves to "torch"), so outputs and
gradients must be bitwise equal (torch.equal), in training mode with dropout too (the same seed
gives the same masks). Parameters must be the very same objects after a swap.
"""

import copy
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import fused_rnn

SEQ_ATTRS = ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
             "bidirectional", "proj_size", "mode"]  # fmt: skip
ATTRS = {
    "LSTM": SEQ_ATTRS,
    "GRU": SEQ_ATTRS,
    "RNN": [*SEQ_ATTRS, "nonlinearity"],
    "LSTMCell": ["input_size", "hidden_size", "bias"],
    "GRUCell": ["input_size", "hidden_size", "bias"],
    "RNNCell": ["input_size", "hidden_size", "bias", "nonlinearity"],
}


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


def _same_parameter_objects(before: dict, module: nn.Module):
    after = dict(module.named_parameters())
    assert list(after) == list(before)
    for name, p in before.items():
        assert after[name] is p, name


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flat(item)]


def _loss(outs, seed=1):
    """Random weights on every output (final states included) so every gradient counts."""
    gen = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in outs)


def _run(module, inputs, seed=2):
    """Outputs and gradients (of the inputs, then of every parameter that requires grad)."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    torch.manual_seed(seed)  # the same dropout masks on both sides
    outs = _flat(module(*inputs))
    leaves = [t for t in inputs if t.requires_grad]
    leaves += [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(_loss(outs), leaves)
    return [t.detach() for t in outs], list(grads)


def _same_behaviour(module, ref, *inputs):
    outs, grads = _run(module, inputs)
    outs_ref, grads_ref = _run(ref, inputs)
    _equal(outs, outs_ref)
    _equal(grads, grads_ref)


# --- real model shapes --------------------------------------------------------------------------


class WordLM(nn.Module):
    """The shape of PyTorch's examples/word_language_model RNNModel with tied weights: Embedding
    -> dropout -> stacked LSTM with dropout -> dropout -> Linear decoder sharing the embedding."""

    def __init__(self, ntoken=40, nhid=16, nlayers=2, dropout=0.3):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, nhid)
        self.rnn = nn.LSTM(nhid, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.decoder.weight = self.encoder.weight

    def forward(self, input, h0, c0):
        output, hidden = self.rnn(self.drop(self.encoder(input)), (h0, c0))
        return self.decoder(self.drop(output)), hidden


def _lm_batch(T=7, B=3, ntoken=40, nhid=16, nlayers=2):
    tokens = torch.randint(ntoken, (T + 1, B))
    h0, c0 = torch.randn(2, nlayers, B, nhid).unbind(0)
    return tokens[:-1], tokens[1:], h0, c0


def _lm_loss(model, tokens, targets, h0, c0):
    logits, (h, c) = model(tokens, h0, c0)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + 0.1 * (h.sum() + c.sum())


class Seq2Seq(nn.Module):
    """Attention-free encoder-decoder: an LSTM encodes the source; an LSTMCell run in a loop
    decodes, fed its own greedy prediction, from the encoder's last layer state."""

    def __init__(self, vocab=30, emb=8, hidden=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.encoder = nn.LSTM(emb, hidden, batch_first=True)
        self.cell = nn.LSTMCell(emb, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, source, steps=5):
        _, (h, c) = self.encoder(self.embed(source))
        state = (h[-1], c[-1])
        token = source[:, 0]
        logits = []
        for _ in range(steps):
            state = self.cell(self.embed(token), state)
            logits.append(self.out(state[0]))
            token = logits[-1].argmax(-1)
        return torch.stack(logits, 1), state


def test_word_language_model_with_tied_weights():
    model = WordLM()
    ref = copy.deepcopy(model)
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert fused_rnn.convert(model) is model
    assert type(model.rnn) is fused_rnn.LSTM
    assert model.decoder.weight is model.encoder.weight
    _same_parameter_objects(before, model)
    assert list(model.state_dict()) == keys
    tokens, _, h0, c0 = _lm_batch()
    for training in (True, False):  # dropout between the layers, and without
        model.train(training)
        ref.train(training)
        _same_behaviour(model, ref, tokens, h0, c0)


def test_word_language_model_state_dict_loads_strictly_both_ways():
    model, ref = WordLM(), WordLM()
    fused_rnn.convert(model)
    model.load_state_dict(ref.state_dict(), strict=True)
    tokens, _, h0, c0 = _lm_batch()
    model.eval()
    ref.eval()
    _same_behaviour(model, ref, tokens, h0, c0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    other = WordLM().eval()
    other.load_state_dict(model.state_dict(), strict=True)
    _same_behaviour(model, other, tokens, h0, c0)


def test_optimizer_built_before_convert_trains_the_converted_model():
    model = WordLM()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    fused_rnn.convert(model)
    for step in range(2):
        batch = _lm_batch()
        for m, o in ((model, opt), (ref, opt_ref)):
            torch.manual_seed(10 + step)
            o.zero_grad()
            _lm_loss(m, *batch).backward()
            o.step()
    _equal(list(model.parameters()), list(ref.parameters()))
    # the converted LSTM's own weights moved (the step reached them, not copies of them)
    rnn_start = start[len(list(model.encoder.parameters())) :]
    assert all(not torch.equal(p, q) for p, q in zip(model.rnn.parameters(), rnn_start))


def test_seq2seq_decoder_with_lstm_cell_loop():
    model = Seq2Seq()
    ref = copy.deepcopy(model)
    before = dict(model.named_parameters())
    fused_rnn.convert(model)
    assert type(model.encoder) is fused_rnn.LSTM and type(model.cell) is fused_rnn.LSTMCell
    _same_parameter_objects(before, model)
    source = torch.randint(30, (4, 6))
    _same_behaviour(model, ref, source)


def test_convert_then_revert_gives_an_equal_model():
    model = Seq2Seq()
    ref = copy.deepcopy(model)
    before = dict(model.named_parameters())
    fused_rnn.revert(fused_rnn.convert(model, backend="torch"))
    assert type(model.encoder) is nn.LSTM and type(model.cell) is nn.LSTMCell
    assert repr(model) == repr(ref)
    for name in ("encoder", "cell"):
        assert "backend" not in vars(getattr(model, name))
        assert set(vars(getattr(model, name))) == set(vars(getattr(ref, name)))
    _same_parameter_objects(before, model)
    _same_behaviour(model, ref, torch.randint(30, (4, 6)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.ao.quantization's notice
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_dynamic_quantization_after_revert():
    """quantize_dynamic finds modules by type: it skips fused_rnn.LSTM and, after revert, gives
    the model it gives for the never-converted one."""
    model = WordLM().eval()
    ref = copy.deepcopy(model)
    spec = {nn.LSTM, nn.Linear}
    fused_rnn.convert(model)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), spec, torch.qint8)
    assert type(quantized.rnn) is fused_rnn.LSTM  # what revert is for
    fused_rnn.revert(model)
    quantized = torch.ao.quantization.quantize_dynamic(model, spec, torch.qint8)
    quantized_ref = torch.ao.quantization.quantize_dynamic(ref, spec, torch.qint8)
    assert type(quantized.rnn) is torch.ao.nn.quantized.dynamic.LSTM
    tokens, _, h0, c0 = _lm_batch()
    with torch.no_grad():
        _equal(_flat(quantized(tokens, h0, c0)), _flat(quantized_ref(tokens, h0, c0)))


# --- every class and option ---------------------------------------------------------------------

CASES = [
    ("LSTM", {"num_layers": 2, "bidirectional": True, "dropout": 0.4}),
    ("LSTM", {"proj_size": 3}),
    ("LSTM", {"proj_size": 3, "num_layers": 2, "bidirectional": True, "batch_first": True}),
    ("LSTM", {"bias": False, "batch_first": True}),
    ("LSTM", {"dropout": 0.5}),  # one layer: torch warns at construction, the swap does not
    ("GRU", {"num_layers": 2, "bidirectional": True, "dropout": 0.3}),
    ("GRU", {"bias": False, "batch_first": True}),
    ("RNN", {"nonlinearity": "relu", "num_layers": 2}),
    ("RNN", {"bias": False, "bidirectional": True, "batch_first": True}),
    ("LSTMCell", {}),
    ("LSTMCell", {"bias": False}),
    ("GRUCell", {}),
    ("GRUCell", {"bias": False}),
    ("RNNCell", {"nonlinearity": "relu"}),
    ("RNNCell", {"bias": False}),
]
I, H, T, B = 5, 6, 4, 3


def _case_id(case):
    cls, kw = case
    return "-".join([cls] + [f"{k}={v}" for k, v in kw.items()])


def _inputs(cls, kw, batched):
    """(x, initial state...) in float64, batched or not."""
    if cls.endswith("Cell"):
        lead = (B,) if batched else ()
        x = torch.randn(*lead, I, dtype=torch.float64)
        state = [torch.randn(*lead, H, dtype=torch.float64)]
        return [x, tuple(state * 2)] if cls == "LSTMCell" else [x, state[0]]
    D = (2 if kw.get("bidirectional") else 1) * kw.get("num_layers", 1)
    shape = ((B, T) if kw.get("batch_first") else (T, B)) if batched else (T,)
    x = torch.randn(*shape, I, dtype=torch.float64)
    lead = (D, B) if batched else (D,)
    h0 = torch.randn(*lead, kw.get("proj_size") or H, dtype=torch.float64)
    if cls == "LSTM":
        return [x, (h0, torch.randn(*lead, H, dtype=torch.float64))]
    return [x, h0]


def _run_with_state(module, x, state):
    """_run for a (x, state) input: the state tuple's tensors become leaves too."""
    flat = _flat(state)

    class Call(nn.Module):  # so that _run sees the module's parameters
        def __init__(self):
            super().__init__()
            self.m = module

        def forward(self, x, *s):
            return self.m(x, tuple(s) if isinstance(state, tuple) else s[0])

    return Call(), [x, *flat]


def _check_behaviour(module, ref, cls, kw):
    for batched in (True, False):
        x, state = _inputs(cls, kw, batched)
        a, inputs = _run_with_state(module, x, state)
        b, _ = _run_with_state(ref, x, state)
        _same_behaviour(a, b, *inputs)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_class_and_option(case):
    cls, kw = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's one-layer dropout notice
        old = getattr(nn, cls)(I, H, **kw).double()
    old.train(cls != "GRU")  # the training flag is kept either way
    # one frozen weight: requires_grad is the Parameter's own, and it stays False
    frozen = old.weight_hh if cls.endswith("Cell") else old.weight_hh_l0
    frozen.requires_grad_(False)
    ref = copy.deepcopy(old)
    before = dict(old.named_parameters())
    keys = list(old.state_dict())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from the swap itself
        new = fused_rnn.convert(old)
    assert type(new) is getattr(fused_rnn, cls)
    assert new.training == ref.training and new.backend == "auto"
    for name in ATTRS[cls]:
        assert getattr(new, name) == getattr(ref, name), name
    _same_parameter_objects(before, new)
    assert not frozen.requires_grad and all(p.dtype == torch.float64 for p in new.parameters())
    assert list(new.state_dict()) == keys
    _check_behaviour(new, ref, cls, kw)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = fused_rnn.revert(new)
    assert type(back) is getattr(nn, cls)
    assert set(vars(back)) == set(vars(ref)) and back.training == ref.training
    for name in ATTRS[cls]:
        assert getattr(back, name) == getattr(ref, name), name
    _same_parameter_objects(before, back)
    assert list(back.state_dict()) == keys
    _check_behaviour(back, ref, cls, kw)


def test_device_training_flag_and_instance_attributes_are_kept():
    """On the meta device (no data): device and dtype come with the Parameters themselves."""
    gru = nn.GRU(3, 4, device="meta", dtype=torch.float16)
    gru.qconfig = "kept"  # attributes set on the instance travel with it
    model = nn.Sequential(gru).eval()
    weight = gru.weight_ih_l0
    fused_rnn.convert(model)
    assert type(model[0]) is fused_rnn.GRU and not model[0].training
    assert model[0].weight_ih_l0 is weight and weight.device.type == "meta"
    assert model[0].qconfig == "kept"
    fused_rnn.revert(model)
    assert type(model[0]) is nn.GRU and model[0].qconfig == "kept"
    assert model[0]._flat_weights[0] is weight  # torch.nn's weight cache points at the real one


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"peephole": True}, ValueError, "cannot set peephole=True"),
        ({"coupled_gates": True}, ValueError, "cannot set coupled_gates=True"),
        ({"layer_norm": True}, ValueError, "cannot set layer_norm=True"),
        ({"peephole": 1}, TypeError, "peephole should be of type bool"),
        ({"backend": "cudnn"}, ValueError, "backend must be one of"),
        ({"zoneout": 1.5}, ValueError, "zoneout"),
        ({"recurrent_dropout": -0.1}, ValueError, "recurrent_dropout"),
        ({"nonlinearity": "relu"}, TypeError, "unexpected keyword argument 'nonlinearity'"),
    ],
    ids=[
        "peephole",
        "coupled_gates",
        "layer_norm",
        "peephole-not-bool",
        "bad-backend",
        "bad-zoneout",
        "bad-recurrent-dropout",
        "unknown",
    ],  # fmt: skip
)
def test_bad_options_raise_and_leave_the_model_unchanged(options, error, match):
    model = WordLM()
    rnn = model.rnn
    with pytest.raises(error, match=match):
        fused_rnn.convert(model, **options)
    assert model.rnn is rnn


def test_regularisers_reach_the_modules_that_take_them_and_block_revert():
    """zoneout and recurrent_dropout keep the weights, so convert sets them: zoneout on every
    class, recurrent dropout on the layers (cells have none); revert refuses them (torch.nn has
    neither) and leaves the model unchanged."""
    model = Seq2Seq()
    ref = copy.deepcopy(model)
    before = list(model.parameters())
    fused_rnn.convert(model, zoneout=0.1, recurrent_dropout=0.2)
    assert (model.encoder.zoneout, model.encoder.recurrent_dropout) == (0.1, 0.2)
    assert model.cell.zoneout == 0.1 and not hasattr(model.cell, "recurrent_dropout")
    assert all(p is q for p, q in zip(model.parameters(), before, strict=True))
    model.eval()  # evaluation: zoneout is its expectation, dropout off; same weights as before
    ref.eval()
    x = torch.randn(3, 2, 8)
    with torch.no_grad():
        _, (h, _) = model.encoder(x)
        _, (h_ref, _) = ref.encoder(x)
    assert not torch.equal(h, h_ref)  # the expectation of zoneout changes the function
    encoder = model.encoder
    with pytest.raises(ValueError, match="zoneout=0.1, which torch.nn.LSTM does not have"):
        fused_rnn.revert(model)
    assert model.encoder is encoder
    only_cells = nn.Sequential(nn.GRUCell(4, 8))
    with pytest.raises(TypeError, match="none of the recurrent modules in the model takes"):
        fused_rnn.convert(only_cells, recurrent_dropout=0.2)
    assert type(only_cells[0]) is nn.GRUCell


def test_backend_option_reaches_the_new_modules(monkeypatch):
    chosen = []
    resolve = fused_rnn.dispatch.resolve

    def recording_resolve(*args, **kwargs):
        chosen.append(resolve(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(fused_rnn.dispatch, "resolve", recording_resolve)
    model = Seq2Seq()
    ref = copy.deepcopy(model)
    fused_rnn.convert(model, backend="stepwise", peephole=False, coupled_gates=False)
    assert model.encoder.backend == "stepwise" and model.cell.backend == "stepwise"
    assert "backend='stepwise'" in repr(model.encoder)
    # the kernels run (under TRITON_INTERPRET=1 without a GPU): fp32 with another summation
    # order than torch's, so close rather than equal
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        _, (h, c) = model.encoder(x)
        _, (h_ref, c_ref) = ref.encoder(x)
    torch.testing.assert_close((h, c), (h_ref, c_ref), rtol=1e-5, atol=1e-6)
    assert chosen == ["stepwise"]
    fused_rnn.revert(model)
    assert "backend" not in repr(model) and "backend" not in vars(model.encoder)


def test_fused_modules_are_left_alone():
    """convert neither rebuilds nor re-configures modules that are already fused: it is
    idempotent and keeps a backend chosen per module."""
    mine = fused_rnn.LSTM(3, 4, backend="torch")
    model = nn.Sequential(mine, nn.GRU(4, 4))
    fused_rnn.convert(model, backend="stepwise")
    assert model[0] is mine and mine.backend == "torch"
    gru = model[1]
    assert type(gru) is fused_rnn.GRU and gru.backend == "stepwise"
    fused_rnn.convert(model)
    assert model[0] is mine and model[1] is gru
    assert fused_rnn.revert(nn.Sequential(nn.LSTM(3, 4)))[0].__class__ is nn.LSTM


def test_the_model_itself_and_non_modules():
    lstm = nn.LSTM(3, 4)
    new = fused_rnn.convert(lstm)
    assert type(new) is fused_rnn.LSTM and new.weight_hh_l0 is lstm.weight_hh_l0
    assert type(fused_rnn.revert(new)) is nn.LSTM
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fused_rnn.convert([lstm])
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fused_rnn.revert({"rnn": new})


def test_revert_refuses_lstm_variants_and_changes_nothing():
    plain = fused_rnn.LSTM(3, 4)
    model = nn.Sequential(plain, fused_rnn.LSTM(4, 4, peephole=True))
    with pytest.raises(ValueError, match=r"'1' is a fused_rnn.LSTM with peephole=True"):
        fused_rnn.revert(model)
    assert model[0] is plain
    cell = nn.ModuleDict({"cell": fused_rnn.LSTMCell(3, 4, coupled_gates=True)})
    with pytest.raises(ValueError, match=r"'cell' is a fused_rnn.LSTMCell with coupled_gates"):
        fused_rnn.revert(cell)


def test_weights_that_do_not_match_the_attributes_raise():
    good, bad = nn.LSTM(3, 4), nn.LSTM(3, 4)
    bad.hidden_size = 5  # edited after construction: the weights no longer fit
    model = nn.Sequential(good, bad)
    with pytest.raises(ValueError, match=r"'1': weight_ih_l0 has shape \(16, 3\), but"):
        fused_rnn.convert(model)
    assert model[0] is good


# --- what cannot be swapped ---------------------------------------------------------------------


class DoublingLSTM(nn.LSTM):
    def forward(self, input, hx=None):
        output, state = super().forward(input, hx)
        return 2 * output, state


class FusedDoublingLSTM(fused_rnn.LSTM):
    def forward(self, input, hx=None):
        output, state = super().forward(input, hx)
        return 2 * output, state


def test_subclasses_are_skipped_with_a_warning():
    model = nn.Sequential(DoublingLSTM(3, 4), nn.GRU(4, 4))
    sub = model[0]
    with pytest.warns(UserWarning, match="left '0' as it is: DoublingLSTM is a subclass of torch"):
        fused_rnn.convert(model)
    assert model[0] is sub and type(model[1]) is fused_rnn.GRU
    with pytest.warns(UserWarning, match="left the model as it is: DoublingLSTM"):
        assert fused_rnn.convert(sub) is sub
    model = nn.Sequential(FusedDoublingLSTM(3, 4), fused_rnn.GRU(4, 4))
    sub = model[0]
    with pytest.warns(UserWarning, match="FusedDoublingLSTM is a subclass of fused_rnn.LSTM"):
        fused_rnn.revert(model)
    assert model[0] is sub and type(model[1]) is nn.GRU


def test_forward_replaced_on_the_instance_or_compiled_is_skipped_with_a_warning():
    lstm = nn.LSTM(3, 4)
    lstm.forward = lambda x, hx=None: nn.LSTM.forward(lstm, x, hx)
    compiled = nn.GRU(3, 4)
    compiled.compile()  # wraps this module's call; nothing is compiled until it runs
    model = nn.Sequential(lstm, compiled)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused_rnn.convert(model)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and all(w.filename == __file__ for w in caught)
    assert "left '0' as it is: its forward was replaced on the instance" in messages[0]
    assert "left '1' as it is: it was compiled with Module.compile()" in messages[1]
    assert model[0] is lstm and model[1] is compiled


# --- sharing, hooks, parametrizations -----------------------------------------------------------


def test_shared_modules_and_shared_weights_stay_shared():
    lstm = nn.LSTM(3, 4)
    other = nn.LSTM(3, 4)
    other.weight_hh_l0 = lstm.weight_hh_l0  # tied recurrent weights
    model = nn.ModuleDict({"a": lstm, "b": nn.Sequential(lstm, other)})
    count = len(list(model.parameters()))
    fused_rnn.convert(model)
    assert type(model["a"]) is fused_rnn.LSTM and model["a"] is model["b"][0]
    assert model["b"][1].weight_hh_l0 is model["a"].weight_hh_l0 is lstm.weight_hh_l0
    assert len(list(model.parameters())) == count


def test_hooks_move_to_the_new_module():
    lstm = nn.LSTM(3, 4)
    model = nn.Sequential(lstm)
    calls = []

    def record(kind):
        return lambda module, *args: calls.append((kind, module))

    handles = [
        lstm.register_forward_pre_hook(record("forward_pre")),
        lstm.register_forward_hook(record("forward_kwargs"), with_kwargs=True),
        lstm.register_full_backward_hook(record("backward")),
        lstm.register_state_dict_pre_hook(record("state_dict_pre")),
        lstm.register_state_dict_post_hook(record("state_dict_post")),
        lstm.register_load_state_dict_pre_hook(record("load_pre")),
        lstm.register_load_state_dict_post_hook(record("load_post")),
    ]
    fused_rnn.convert(model)
    new = model[0]
    del lstm
    gc.collect()  # the old module is gone: a hook still bound to it would fail

    def use():
        x = torch.randn(2, 1, 3, requires_grad=True)
        model(x)[0].sum().backward()
        model.load_state_dict(model.state_dict())

    use()
    kinds = ["forward_pre", "forward_kwargs", "backward", "state_dict_pre", "state_dict_post",
             "load_pre", "load_post"]  # fmt: skip
    assert sorted(kind for kind, _ in calls) == sorted(kinds)
    assert all(module is new for _, module in calls)
    for handle in handles:  # handles from before the swap still remove the hooks
        handle.remove()
    calls.clear()
    use()
    assert calls == []


def test_weight_norm_parametrization_moves_with_the_module():
    from torch.nn.utils.parametrizations import weight_norm

    model = WordLM()
    weight_norm(model.rnn, "weight_hh_l0")
    weight_norm(model.rnn, "weight_ih_l1")
    ref = copy.deepcopy(model)
    originals = dict(model.named_parameters())
    keys = list(model.state_dict())
    fused_rnn.convert(model)
    assert parametrize.type_before_parametrizations(model.rnn) is fused_rnn.LSTM
    assert isinstance(model.rnn, fused_rnn.LSTM)
    assert parametrize.is_parametrized(model.rnn, "weight_hh_l0")
    _same_parameter_objects(originals, model)
    assert list(model.state_dict()) == keys
    tokens, _, h0, c0 = _lm_batch()
    _same_behaviour(model, ref, tokens, h0, c0)
    with parametrize.cached():
        _same_behaviour(model, ref, tokens, h0, c0)
    model.load_state_dict(ref.state_dict(), strict=True)

    fused_rnn.revert(model)
    assert parametrize.type_before_parametrizations(model.rnn) is nn.LSTM
    _same_parameter_objects(originals, model)
    _same_behaviour(model, ref, tokens, h0, c0)

    fused_rnn.convert(model)  # parametrizations can still be removed after a swap
    for m in (model, ref):
        parametrize.remove_parametrizations(m.rnn, "weight_hh_l0")
        parametrize.remove_parametrizations(m.rnn, "weight_ih_l1")
    assert type(model.rnn) is fused_rnn.LSTM
    _same_behaviour(model, ref, tokens, h0, c0)


def test_orthogonal_parametrization_is_not_recomputed():
    """Moving a parametrization must not run its right_inverse again (orthogonal's would)."""
    from torch.nn.utils.parametrizations import orthogonal

    cell = orthogonal(nn.GRUCell(5, 6), "weight_hh")
    ref = copy.deepcopy(cell)
    new = fused_rnn.convert(cell)
    assert type(new.parametrizations.weight_hh[0]) is type(cell.parametrizations.weight_hh[0])
    _same_behaviour(new, ref, torch.randn(3, 5), torch.randn(3, 6))


def test_hook_based_weight_norm_and_weight_drop():
    """The older torch.nn.utils.weight_norm (a forward pre-hook that sets the weight as a plain
    tensor) and an AWD-LSTM-style weight drop (a wrapper that owns the raw weight and puts a
    dropped copy on the LSTM before each call) both keep working."""

    class WeightDrop(nn.Module):
        def __init__(self, module, name, p):
            super().__init__()
            self.module, self.name, self.p = module, name, p
            raw = module._parameters.pop(name)
            self.register_parameter(f"{name}_raw", nn.Parameter(raw.detach().clone()))
            setattr(module, name, raw.detach())

        def forward(self, *args):
            raw = getattr(self, f"{self.name}_raw")
            setattr(self.module, self.name, F.dropout(raw, self.p, self.training))
            return self.module(*args)

    def build():  # twice from one seed: a hook-based weight_norm module cannot be deep-copied
        torch.manual_seed(3)
        model = nn.Sequential(WeightDrop(nn.LSTM(5, 6), "weight_hh_l0", 0.5), nn.GRU(6, 6))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # this weight_norm is deprecated
            torch.nn.utils.weight_norm(model[1], "weight_hh_l0")
        return model

    model, ref = build(), build()
    keys = list(model.state_dict())
    fused_rnn.convert(model)
    assert type(model[0].module) is fused_rnn.LSTM and type(model[1]) is fused_rnn.GRU
    assert list(model.state_dict()) == keys  # 1.weight_hh_l0_g, 1.weight_hh_l0_v
    x = torch.randn(T, B, 5)

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m[1](self.m[0](x)[0])

    _same_behaviour(Wrap(model), Wrap(ref), x)
    torch.nn.utils.remove_weight_norm(model[1], "weight_hh_l0")  # finds the moved hook
    torch.nn.utils.remove_weight_norm(ref[1], "weight_hh_l0")
    _same_behaviour(Wrap(model), Wrap(ref), x)
    fused_rnn.revert(model)
    assert type(model[0].module) is nn.LSTM
    _same_behaviour(Wrap(model), Wrap(ref), x)
