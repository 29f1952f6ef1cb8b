"""Small helpers shared by the tests."""
import time

import torch


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the parity measure written in the issue."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Fills every parameter with seeded noise, so zero-initialised layers also get tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return module


# -- the small DiT the LoRA tests apply LoRAs to ------------------------------------------------

LORA_DIT = dict(dim=64, ffn_dim=96, num_heads=2, num_layers=2, freq_dim=32, text_dim=24)


def lora_test_dit() -> torch.nn.Module:
    """A two-block DiT (width 64, FFN 96, text width 24) with seeded random weights, in eval mode."""
    from wan.models.dit import DiTConfig, WanDiT
    return randomize_(WanDiT(DiTConfig(**LORA_DIT)), seed=3, std=0.1).eval()


def run_lora_probe(model: torch.nn.Module) -> torch.Tensor:
    """One forward of ``lora_test_dit`` on fixed seeded inputs."""
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([300.0]), torch.randn(1, 5, 24, generator=g)
    with torch.no_grad():
        return model(x, t, ctx)


def wait_until(check, timeout: float, what: str = "the condition", interval: float = 0.05):
    """Polls ``check`` until it returns something true, and returns that; past ``timeout`` seconds
    the test fails, naming ``what`` it waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
