"""Test-wide settings: nothing may reach for the network, and runs are deterministic."""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process: the suite runs two workers on two cores, and the processes the tests start
# (servers, CLI runs, torchrun ranks) inherit this. With torch's default (a thread per core) each
# process's OpenMP threads spin while they wait for one another, and the same tests took 2.7x longer.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
