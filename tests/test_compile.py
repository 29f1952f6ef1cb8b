"""torch.compile of the repeated blocks: same outputs as eager, only the blocks compiled."""
import torch

from helpers import randomize_, rel_err
from wan.models.dit import DiTConfig, WanDiT
from wan.optim.compile import compile_blocks_


def test_compiled_blocks_give_the_eager_output():
    cfg = DiTConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, freq_dim=32, text_dim=24)
    model = randomize_(WanDiT(cfg), seed=2, std=0.1).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 5, 24, generator=g), torch.tensor([400.0])
    with torch.no_grad():
        eager = model(x, t, ctx)
        assert compile_blocks_(model) == 2
        compiled = model(x, t, ctx)
    assert rel_err(compiled, eager) <= 1e-5  # inductor may fuse and reorder float operations
    assert not hasattr(model.patch_embedding, "_compiled_call_impl") or model.patch_embedding._compiled_call_impl is None
