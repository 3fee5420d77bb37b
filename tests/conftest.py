"""Test setup: on a machine without CUDA the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before triton is imported, so it is set here, before any test
module imports fused_rnn.kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# every output buffer a kernel allocates starts as NaN, so an unwritten element fails a test
os.environ.setdefault("FUSED_RNN_POISON", "1")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def native_off(monkeypatch):
    """Run backend="torch" through the generic stack (torch loop) instead of torch's native ops."""
    import fused_rnn.functional as F

    monkeypatch.setattr(F, "USE_NATIVE", False)
    yield


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test tensors are tiny: intra-op threads only add synchronisation, and on a busy 2-core
    machine their spin-waits made the suite many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["native", "generic"])
def path(request):
    """Both CPU paths of backend="torch": torch's native ops, and the generic stack (torch loop)."""
    if request.param == "generic":
        request.getfixturevalue("native_off")
    return request.param
