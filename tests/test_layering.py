"""Imports run one way: modules -> functional -> dispatch / ops -> kernels.

Read from the source (every import statement, at any depth, lazy ones included), so a test
fails as soon as a module reaches upward, whether or not that import has run yet.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# the layer of each module: a module may import only from its own layer or lower ones
# (same-layer imports are allowed: dispatch and _ops sit side by side)
LAYERS = {
    "fused_rnn": 5,  # the package's __init__ re-exports the public names
    "fused_rnn.convert": 5,
    "fused_rnn.modules": 4,
    "fused_rnn.functional": 3,
    "fused_rnn.recurrence": 3,
    "fused_rnn._tuning": 3,  # the autotuner's workload (functional calls), registered in dispatch
    "fused_rnn.dispatch": 2,
    "fused_rnn._ops": 2,
    "fused_rnn._graphs": 2,
    "fused_rnn._schedule": 2,  # which layer-directions of a stack run at once, on which streams
    "fused_rnn._loop": 1,
    "fused_rnn._rng": 1,  # the zoneout masks' generator, shared by _loop and functional
    "fused_rnn.reference": 1,
    "fused_rnn.kernels": 0,
}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "kernels":
        parts = ["fused_rnn", "kernels", *rel.parts[1:]]
    elif rel.parts[0] == "bench":
        parts = ["fused_rnn", "bench", *rel.parts[1:]]
    else:
        parts = list(rel.parts)
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int | None:
    best = None
    for name, layer in LAYERS.items():
        if (module == name or module.startswith(name + ".")) and (
            best is None or len(name) > len(best[0])
        ):
            best = (name, layer)
    return None if best is None else best[1]


def _imports(source: str, module: str, is_package: bool = False):
    """Absolute names of the fused_rnn modules the source of `module` imports."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("fused_rnn"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("fused_rnn"):
                continue
            if node.module is None:  # `from . import x`: x is a module
                yield from (f"{target}.{a.name}" for a in node.names)
            else:
                yield target


SOURCES = sorted(p for d in ("fused_rnn", "kernels") for p in (ROOT / d).rglob("*.py"))


def _imports_of(path: pathlib.Path):
    module = _module_name(path)
    return module, list(_imports(path.read_text(), module, path.name == "__init__.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    module, targets = _imports_of(path)
    own = _layer(module)
    assert own is not None, f"{module} has no layer in LAYERS: add it"
    for target in targets:
        layer = _layer(target)
        if layer is None:  # fused_rnn.bench: tools on top, never imported by the library
            raise AssertionError(f"{module} imports {target}")
        assert layer <= own, f"{module} (layer {own}) imports {target} (layer {layer})"


def test_kernels_import_nothing_of_fused_rnn():
    for path in (ROOT / "kernels").rglob("*.py"):
        module, targets = _imports_of(path)
        outside = [t for t in targets if not t.startswith("fused_rnn.kernels")]
        assert not outside, f"{module} imports {outside}"


def test_the_check_sees_upward_imports():
    """The checker itself: relative, absolute and lazy upward imports are all caught."""
    module = "fused_rnn.kernels.lstm"
    src = "from .. import _ops\ndef f():\n    import fused_rnn.functional\nfrom ._common import x\n"
    names = sorted(_imports(src, module))
    assert names == ["fused_rnn._ops", "fused_rnn.functional", "fused_rnn.kernels._common"]
    assert [_layer(n) > _layer(module) for n in names] == [True, True, False]
