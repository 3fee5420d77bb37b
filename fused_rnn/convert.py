"""Swap the torch.nn recurrent modules inside a model for fused_rnn's, and back.

    model = fused_rnn.convert(model)                      # nn.LSTM -> fused_rnn.LSTM, ...
    model = fused_rnn.convert(model, backend="stepwise")  # with fused_rnn's keyword-only options
    model = fused_rnn.revert(model)                       # fused_rnn.LSTM -> nn.LSTM, ...

For a model whose code builds nn.LSTM (a third-party one, or one you would rather not edit), and
for tools that dispatch on ``isinstance(m, nn.LSTM)`` (dynamic quantization, some weight-drop
wrappers), which fused_rnn's classes are not. The rules are in `convert`'s docstring.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import dispatch, modules

__all__ = ["convert", "revert"]

_PAIRS = (
    (nn.RNN, modules.RNN),
    (nn.LSTM, modules.LSTM),
    (nn.GRU, modules.GRU),
    (nn.RNNCell, modules.RNNCell),
    (nn.LSTMCell, modules.LSTMCell),
    (nn.GRUCell, modules.GRUCell),
)
_TO_FUSED = dict(_PAIRS)
_TO_TORCH = {fused: torch_cls for torch_cls, fused in _PAIRS}
_TORCH_FAMILY = (nn.RNNBase, nn.RNNCellBase)
_FUSED_FAMILY = (modules.RNNBase, modules.RNNCellBase)

# options with parameters of their own: torch.nn's weights have no place in them
_VARIANTS = ("peephole", "coupled_gates", "layer_norm")
# options that keep the weights as they are: convert may set them (on the new modules that take
# them); revert refuses a module using them, as torch.nn has no such option
_REGULARISERS = {"zoneout": 0.0, "recurrent_dropout": 0.0}


def convert(model: nn.Module, **options) -> nn.Module:
    """Replace every torch.nn RNN, LSTM, GRU, RNNCell, LSTMCell and GRUCell in `model`.

    Each becomes its fused_rnn namesake. `model` is changed in place and returned; when `model`
    itself is one of those classes, the replacement is returned.

    What a swap keeps. The replacement is a new module object holding the old one's state:
        * the same Parameter objects (never copies): an optimizer built before the swap goes
          on updating the model, weights shared between modules stay shared, and device,
          dtype and requires_grad are those of the Parameters themselves;
        * the same buffers, child modules, training flag, and attributes set on the instance
          (e.g. ``qconfig``, or a weight a weight-drop wrapper stores as a plain tensor);
        * every constructor attribute, so ``state_dict`` keys are the same, in the same order:
          a strict ``load_state_dict`` works both ways;
        * hooks: forward, forward pre-, backward and state_dict hooks move with the module
          (the same dictionaries, so handles returned before the swap still remove them);
          hooks get the new module as their ``module`` argument;
        * parametrizations (torch.nn.utils.parametrize, parametrizations.weight_norm, ...):
          the same parametrization modules and original tensors, re-attached to the new
          module; the older hook-based torch.nn.utils.weight_norm through its pre-hook.
    A module that appears at several places in the model is replaced by one new module
    everywhere. References held outside the module tree (a Python list, a closure) still see
    the old module, which should not be used after the swap.

    What a swap refuses or skips.
        * ``peephole=True`` / ``coupled_gates=True`` / ``layer_norm=True``: ValueError, those
          have other parameters, so torch.nn's weights have no place in them. Unknown options,
          or an option that none of the new modules takes (``recurrent_dropout`` with only
          cells): TypeError; a bad value: the new module's own error. Every module is checked
          before any is replaced: on an error the model is unchanged.
        * A subclass of a recurrent class (``class MyLSTM(nn.LSTM)``), a module whose
          ``forward`` was replaced on the instance, or one compiled with ``Module.compile()``:
          left as it is, with a UserWarning naming it, because its own code would be lost (the
          rest of the model is still swapped). ``warnings.simplefilter("error")`` makes this an
          error.
        * Modules already of the target kind are left as they are: convert does not change the
          backend of fused_rnn modules already in the model (set ``module.backend`` for that).

    Args:
        model: any nn.Module.
        **options: fused_rnn's keyword-only extras for the new modules, each given to those
            that take it: ``backend`` ("auto", "torch", "stepwise", "persistent"), ``zoneout``
            (every class; a pair only for LSTM/LSTMCell) and ``recurrent_dropout`` (RNN, LSTM,
            GRU). ``peephole``, ``coupled_gates`` and ``layer_norm`` are accepted only as False
            (they change the parameters).

    Raises:
        TypeError: `model` is not an nn.Module, or an unknown option.
        ValueError: a bad backend or option value, peephole/coupled_gates/layer_norm=True, or a
            module whose weights do not have the shapes its attributes imply. The model is
            unchanged.

    Example:
        >>> model = nn.Sequential(nn.Embedding(100, 16), nn.LSTM(16, 32, 2, batch_first=True))
        >>> model = fused_rnn.convert(model, backend="auto")
        >>> type(model[1])
        <class 'fused_rnn.modules.LSTM'>
    """
    kwargs = _check_options(options)
    return _swap_all(model, "convert", _TO_FUSED, _TORCH_FAMILY, _FUSED_FAMILY, kwargs)


def _takes(cls, name: str) -> bool:
    """Whether fused_rnn class `cls` has option `name` (recurrent dropout: the layers only)."""
    return name != "recurrent_dropout" or issubclass(cls, modules.RNNBase)


def revert(model: nn.Module) -> nn.Module:
    """Replace every fused_rnn recurrent module in `model` with its torch.nn namesake.

    The inverse of `convert`, with the same rules (see its docstring); ``backend`` is dropped,
    as torch.nn has none. `model` is changed in place and returned (the replacement when `model`
    itself is a fused_rnn module).

    Raises:
        TypeError: `model` is not an nn.Module.
        ValueError: a module uses peephole, coupled_gates, layer_norm, zoneout or
            recurrent_dropout, which torch.nn lacks. The model is unchanged.

    Example:
        >>> model = fused_rnn.revert(model)
        >>> model = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM, nn.Linear})
    """
    return _swap_all(model, "revert", _TO_TORCH, _FUSED_FAMILY, _TORCH_FAMILY, {})


def _check_options(options: dict) -> dict:
    for name in options:
        if name != "backend" and name not in _VARIANTS and name not in _REGULARISERS:
            raise TypeError(f"convert() got an unexpected keyword argument '{name}'")
    for name in _VARIANTS:
        if name not in options:
            continue
        value = options[name]
        if not isinstance(value, bool):
            raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
        if value:
            raise ValueError(
                f"convert() cannot set {name}=True: it adds parameters that torch.nn's modules "
                f"do not have, so the existing weights do not map onto it; build the fused_rnn "
                f"module with {name}=True and train it instead"
            )
    kwargs = {k: v for k, v in options.items() if k in _REGULARISERS}
    if "backend" in options:
        kwargs["backend"] = dispatch.check_backend(options["backend"])
    return kwargs


# --- walking the model --------------------------------------------------------------------------


def _swap_all(model, verb, table, source_family, target_family, kwargs):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{verb}() expects an nn.Module, got {type(model).__name__}")
    plan: dict[int, tuple[nn.Module, str]] = {}  # id(old) -> (old, first path)
    sites: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, child name, old)
    seen: set[int] = set()
    skipped: dict[int, str] = {}  # id(module) -> why, for the warnings

    def visit(module, path, parent, name):
        what = _classify(module, table, source_family, target_family)
        if what == "swap":
            plan.setdefault(id(module), (module, path))
            if parent is not None:
                sites.append((parent, name, module))
        elif what == "descend":
            if id(module) in seen:
                return
            seen.add(id(module))
            for child_name, child in module._modules.items():
                if child is not None:
                    visit(child, f"{path}.{child_name}" if path else child_name, module, child_name)
        elif what != "keep" and id(module) not in skipped:
            where = f"'{path}'" if path else "the model"
            skipped[id(module)] = f"{verb}: left {where} as it is: {what}"

    visit(model, "", None, None)
    # build and check every replacement before touching the model, so that an error leaves it
    # unchanged; building reads the old modules and never writes them
    built = {key: _build(old, path, table, kwargs) for key, (old, path) in plan.items()}
    for name in kwargs:
        if name != "backend" and built and not any(_takes(type(m), name) for m in built.values()):
            raise TypeError(
                f"{verb}(): none of the recurrent modules in the model takes {name} (it is for "
                "the RNN, LSTM and GRU layers)"
            )
    for new in built.values():
        _rebind_module_hooks(new)
    for parent, name, old in sites:
        parent._modules[name] = built[id(old)]
    for message in skipped.values():
        warnings.warn(message, UserWarning, stacklevel=3)  # at the caller of convert / revert
    return built.get(id(model), model)


def _classify(module, table, source_family, target_family) -> str:
    """What to do with `module`: "swap", "keep", "descend", or why it is skipped."""
    cls = parametrize.type_before_parametrizations(module)
    if cls in table:
        if "forward" in vars(module):
            return (
                f"its forward was replaced on the instance, and a {_name(table[cls])} would "
                "not run it"
            )
        if getattr(module, "_compiled_call_impl", None) is not None:
            return (
                "it was compiled with Module.compile(), which holds on to this module; swap "
                "first, then compile"
            )
        return "swap"
    if isinstance(module, source_family):
        base = next((c for c in cls.__mro__ if c in table), None)
        instead = f"a {_name(table[base])}" if base is not None else "the swapped module"
        parent = _name(base) if base is not None else f"{_name(source_family[0])}"
        return (
            f"{cls.__qualname__} is a subclass of {parent} whose own code (forward or other "
            f"methods) {instead} would not have"
        )
    if isinstance(module, target_family):
        return "keep"
    return "descend"


def _name(cls) -> str:
    return f"{'torch.nn' if cls.__module__.startswith('torch') else 'fused_rnn'}.{cls.__name__}"


# --- one module ---------------------------------------------------------------------------------


@functools.cache
def _module_state() -> frozenset[str]:
    """The attributes nn.Module itself keeps on an instance (parameters, hooks, training...)."""
    return frozenset(vars(nn.Module()))


@functools.cache
def _class_attributes(cls) -> frozenset[str]:
    """The instance attributes `cls`'s constructor sets beyond nn.Module's own."""
    return frozenset(vars(cls(3, 4, device="meta"))) - _module_state()


def _constructor_args(module, cls) -> dict:
    names = ["input_size", "hidden_size", "bias"]
    if issubclass(cls, (nn.RNNBase, modules.RNNBase)):
        names += ["num_layers", "batch_first", "dropout", "bidirectional"]
    args = {name: getattr(module, name) for name in names}
    if cls in (nn.LSTM, modules.LSTM):
        args["proj_size"] = module.proj_size
    elif cls in (nn.RNN, modules.RNN):
        # both forwards pick the cell by mode ("RNN_TANH"/"RNN_RELU"), not by nonlinearity
        args["nonlinearity"] = "relu" if module.mode == "RNN_RELU" else "tanh"
    elif cls in (nn.RNNCell, modules.RNNCell):
        args["nonlinearity"] = module.nonlinearity
    return args


def _build(old, path, table, kwargs):
    """A new module of the target class that holds `old`'s state (see `convert`)."""
    cls = parametrize.type_before_parametrizations(old)
    target = table[cls]
    where = f"'{path}'" if path else "the model"
    for name in _VARIANTS:
        if getattr(old, name, False):
            raise ValueError(
                f"revert: {where} is a {_name(cls)} with {name}=True, which {_name(target)} does "
                "not have"
            )
    for name, off in _REGULARISERS.items():
        if getattr(old, name, off) != off:
            raise ValueError(
                f"revert: {where} is a {_name(cls)} with {name}={getattr(old, name)!r}, which "
                f"{_name(target)} does not have"
            )
    args = _constructor_args(old, cls)
    kwargs = {k: v for k, v in kwargs.items() if _takes(target, k)}
    with warnings.catch_warnings():
        # the "dropout expects num_layers greater than 1" warning was given when `old` was built
        warnings.filterwarnings(
            "ignore", message="dropout option adds dropout", category=UserWarning
        )
        new = target(**args, **kwargs, device="meta")  # no memory, no initialisation cost

    with torch.no_grad():
        for name, placeholder in new.named_parameters(recurse=False):
            weight = getattr(old, name, None)
            if not isinstance(weight, torch.Tensor):
                raise ValueError(f"{where} has no tensor {name}, which a {_name(target)} needs")
            if weight.shape != placeholder.shape:
                raise ValueError(
                    f"{where}: {name} has shape {tuple(weight.shape)}, but its attributes "
                    f"({args}) make it {tuple(placeholder.shape)}"
                )

    old_state, new_state = vars(old), vars(new)
    for key in _module_state():
        if key not in old_state:
            continue
        value = old_state[key]
        # the containers are copied (the same tensors and modules in a new dict); the hook
        # dictionaries are shared, because the handles returned when the hooks were registered
        # hold a reference to these very dictionaries
        if key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            value = value.copy()
        new_state[key] = value
    own = _class_attributes(cls)
    for key, value in old_state.items():
        if key not in own and key not in new_state:
            new_state[key] = value  # attributes set on the instance, e.g. qconfig

    if parametrize.is_parametrized(old):
        _reattach_parametrizations(new, where)
    if hasattr(new, "_init_flat_weights"):
        # torch.nn's RNNBase caches its weights in a list (and flattens them for cuDNN): point it
        # at the real tensors, as torch.nn does after .to() / _apply
        new._init_flat_weights()
    return new


def _reattach_parametrizations(new, where) -> None:
    """Make `new` (which now holds the `parametrizations` ModuleDict) a parametrized module.

    register_parametrization cannot be used: it would run each parametrization's right_inverse
    again (which may change its state, e.g. orthogonal's base) and make new originals. The
    parametrization modules and their original tensors are kept; only the class with the
    properties is made anew, with torch's own helpers, so that caching keys on the new module.
    """
    inject_class = getattr(parametrize, "_inject_new_class", None)
    inject_property = getattr(parametrize, "_inject_property", None)
    if inject_class is None or inject_property is None:
        raise ValueError(
            f"{where} has parametrized weights, which cannot be moved to a new module with this "
            "torch version; remove the parametrizations (parametrize.remove_parametrizations), "
            "swap, then register them again"
        )
    inject_class(new)
    for name in new.parametrizations:
        inject_property(new, name)


def _rebind_module_hooks(new) -> None:
    """load_state_dict pre-hooks registered with `module=True` hold a weak reference to the module
    they were registered on; point them at `new` (the other hooks get the module at call time)."""
    hooks = new._load_state_dict_pre_hooks
    for key, hook in list(hooks.items()):
        if getattr(hook, "with_module", False):
            hooks[key] = type(hook)(hook.hook, new)
