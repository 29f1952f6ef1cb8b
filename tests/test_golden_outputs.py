"""Outputs do not change under refactoring: each case of ``golden_cases.py`` rerun against the
reference kept in ``tests/golden/`` (made before the seams refactor of issue 10).

Final latents must agree within 1e-5 relative (max |ours - ref| / max |ref|), the uint8 frames
within 1 level. A refactoring that changes what is computed moves them by far more; float32 sums
taken in another order move them by ~2e-6 (one torch thread, as the suite runs, against the two
the references were made with).
"""

import numpy as np
import pytest
import torch

from golden_cases import GOLDEN, cases, run_case, write_lora
from wan.engine import Engine
from wan.testing.tiny_family import ensure_tiny_checkpoints

LATENT_TOL = 1e-5
FRAME_TOL = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    ensure_tiny_checkpoints(root / "ckpts")
    (root / "loras").mkdir()
    write_lora(root / "loras" / "sched.safetensors")
    engine = Engine(checkpoint_dir=root / "ckpts", device="cpu", dtype=torch.float32, lora_dir=root / "loras")
    return engine, cases(root / "loras")


@pytest.mark.parametrize("name", ["t2v", "i2v", "vace", "a14b", "teacache", "lora_schedule"])
def test_output_equals_the_reference(setup, name):
    engine, all_cases = setup
    ref = np.load(GOLDEN / f"{name}.npz")
    latent, frames = run_case(engine, *all_cases[name])
    assert latent.shape == ref["latent"].shape and frames.shape == ref["frames"].shape
    rel = np.abs(latent - ref["latent"]).max() / np.abs(ref["latent"]).max()
    assert rel <= LATENT_TOL, f"{name}: latent differs by {rel:.2e} relative"
    diff = np.abs(frames.astype(np.int16) - ref["frames"].astype(np.int16)).max()
    assert diff <= FRAME_TOL, f"{name}: frames differ by up to {diff} levels"


@pytest.mark.parametrize("name,feature", [("teacache", "profile_overrides"), ("lora_schedule", "loras")])
def test_the_feature_changes_the_output(setup, name, feature):
    """Each feature case differs from the same run without its feature: a case that silently ran
    without its LoRA or its cache would prove nothing."""
    engine, all_cases = setup
    fields, savers = all_cases[name]
    plain, _ = run_case(engine, {k: v for k, v in fields.items() if k != feature}, savers)
    ref = np.load(GOLDEN / f"{name}.npz")["latent"]
    assert np.abs(plain - ref).max() > 1e-3
