"""Fixtures the training tests share: one thread for tiny matmuls, and the TEST model files written
once per test session."""

import pytest
import torch

from wan.testing.tiny_family import ensure_tiny_checkpoints


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared machine run far faster on one thread than on several. Imported into a
    test module, it applies to each of its tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The TEST model files (the registry's ``test-tiny-*`` models), written once for the session."""
    root = tmp_path_factory.getbasetemp() / "tiny_ckpts"
    ensure_tiny_checkpoints(root)
    return root
