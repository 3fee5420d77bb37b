"""README.md's code runs as written.

Every ```python block runs on CPU in a fresh namespace, with a time limit, in an interpreter that
has none of the test suite's environment and sees no GPU: as a new user would run it. The blocks
share that one interpreter (a torch import costs seconds on a busy machine), each exec'd in its
own globals. Every command in a ```sh block is a real one: a make target the Makefile defines,
or a CLI invocation whose options the CLI's own parser accepts (parsed and checked, never run).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_rnn.bench import cli, gpu_check

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# a fenced block: ```lang at the start of a line, its body, the closing ``` at the start of a line
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
# seconds per python block: layers of a few hundred units on CPU take well under one; the first
# block also pays the torch import (seconds on a busy machine)
BLOCK_TIMEOUT_S = 60
# the environment a new user has: the test suite's settings (TRITON_INTERPRET, NaN poisoning)
# stripped, no GPU visible so the CPU path runs
STRIP_ENV = ("TRITON_INTERPRET", "FUSED_RNN_POISON", "PYTEST_CURRENT_TEST")


def _blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, body) of each ```lang block of the README."""
    text = README.read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) == lang
    ]


PYTHON_BLOCKS = _blocks("python")
SH_BLOCKS = _blocks("sh")


def test_readme_has_the_examples():
    """The blocks below are found (a parsing slip cannot make this file pass on nothing)."""
    assert len(PYTHON_BLOCKS) >= 2 and SH_BLOCKS
    code = "\n".join(body for _, body in PYTHON_BLOCKS)
    assert "fused_rnn.LSTM(" in code and "load_state_dict" in code
    assert "fused_rnn.functional" in code and ".all_weights" in code
    commands = "\n".join(body for _, body in SH_BLOCKS)
    assert "fused-rnn-bench" in commands and "make test" in commands


_RUNNER = """
import json, signal, sys, traceback

blocks, limit, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def timeout(signum, frame):
    raise TimeoutError(f"over {limit} s")


signal.signal(signal.SIGALRM, timeout)
results = {}
for line, code in blocks:
    signal.alarm(limit)
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})
        results[line] = None
    except BaseException:
        results[line] = traceback.format_exc()
    finally:
        signal.alarm(0)
with open(out, "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def python_results(tmp_path_factory):
    """{line: None (ran) or the traceback} for every ```python block, from one interpreter."""
    tmp = tmp_path_factory.mktemp("readme")
    env = {k: v for k, v in os.environ.items() if k not in STRIP_ENV}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = tmp / "results.json"
    args = [json.dumps(PYTHON_BLOCKS), str(BLOCK_TIMEOUT_S), str(out)]
    r = subprocess.run([sys.executable, "-c", _RUNNER, *args], cwd=tmp, env=env,
                       capture_output=True, text=True,
                       timeout=60 + BLOCK_TIMEOUT_S * len(PYTHON_BLOCKS))  # fmt: skip
    assert r.returncode == 0 and out.exists(), r.stderr[-3000:]
    return {int(k): v for k, v in json.loads(out.read_text()).items()}


@pytest.mark.parametrize(
    "line, code", PYTHON_BLOCKS, ids=[f"README.md:{n}" for n, _ in PYTHON_BLOCKS]
)
def test_python_block_runs(line, code, python_results):
    assert line in python_results
    assert python_results[line] is None, f"README.md:{line} failed:\n{python_results[line]}"


def test_python_blocks_fail_when_they_should(tmp_path):
    """The runner reports an error and a block over the time limit, each on its own line."""
    blocks = [(1, "x = 1"), (2, "print(x)"), (3, "while True: pass")]
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(blocks), "1", str(out)],
                   check=True, timeout=60)  # fmt: skip
    results = json.loads(out.read_text())
    assert results["1"] is None
    assert "NameError" in results["2"]  # a fresh namespace: block 1's x is gone
    assert "TimeoutError" in results["3"]


# --------------------------------------------------------------------------------------------
# ```sh blocks


def _commands(body: str) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", body)
    return [args for line in joined.splitlines() if (args := shlex.split(line, comments=True))]


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, re.M))


def _scripts() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, re.M))


def _check_bench(args: list[str]) -> None:
    parser = cli.build_parser()
    parsed = parser.parse_args(args)  # SystemExit(2) on an unknown option or a bad number
    cli.selection(parser, parsed)  # unknown suite, cell, dtype, mode, backend or variant names
    cli._suites(parser, parsed, torch.device("cpu"))  # custom sizes that cannot be built


def _check_gpu_check(args: list[str]) -> None:
    gpu_check.build_parser().parse_args(args)


def _check(args: list[str]) -> None:
    cmd, rest = args[0], args[1:]
    if cmd == "make":
        targets = [a for a in rest if "=" not in a]
        assert targets and set(targets) <= _make_targets(), f"not a make target: {targets}"
        for a in rest:
            if a.startswith("BENCH_ARGS="):
                _check_bench(shlex.split(a.split("=", 1)[1]))
        return
    if cmd in ("python", "python3") and rest[:2] == ["-m", "fused_rnn.bench"]:
        cmd, rest = "fused-rnn-bench", rest[2:]
    if cmd in ("python", "python3") and rest[:2] == ["-m", "fused_rnn.bench.gpu_check"]:
        cmd, rest = "fused-rnn-gpu-check", rest[2:]
    checks = {"fused-rnn-bench": _check_bench, "fused-rnn-gpu-check": _check_gpu_check}
    assert cmd in checks, f"a command this test does not know how to check: {cmd}"
    assert cmd in _scripts(), f"{cmd} is not a script in pyproject.toml"
    checks[cmd](rest)


@pytest.mark.parametrize("line, body", SH_BLOCKS, ids=[f"README.md:{n}" for n, _ in SH_BLOCKS])
def test_sh_block_commands_are_real(line, body, capsys):
    commands = _commands(body)
    assert commands, f"README.md:{line}: an empty sh block"
    for args in commands:
        try:
            _check(args)
        except SystemExit as exc:  # argparse's parser.error()
            err = capsys.readouterr().err
            pytest.fail(f"README.md:{line}: {shlex.join(args)}: exit {exc.code}\n{err}")


@pytest.mark.parametrize(
    "command",
    [
        "fused-rnn-bench --suite nope",
        "fused-rnn-bench --no-such-flag",
        "fused-rnn-bench --backend cudnn",
        "make benchmark",
        "make bench BENCH_ARGS='--dtype fp8'",
        "fused-rnn-gpu-check --no-such-flag",
        "pip install fused-rnn-extra",
    ],
)
def test_the_sh_check_catches_a_wrong_command(command):
    """The checker is not a pass-through: each of these fails it."""
    with pytest.raises((SystemExit, AssertionError)):
        _check(shlex.split(command))
