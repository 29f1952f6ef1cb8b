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
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled = model(x, t, ctx)
    assert rel_err(compiled, eager) <= 1e-5  # inductor may fuse and reorder float operations
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before  # the forward went through dynamo
    assert not hasattr(model.patch_embedding, "_compiled_call_impl") or model.patch_embedding._compiled_call_impl is None


def test_only_the_blocks_run_through_the_compiler():
    """A recording backend sees what was compiled: graphs of the block's layers (attention, FFN), and
    never the embeddings or the head, which stay eager."""
    cfg = DiTConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, freq_dim=32, text_dim=24)
    model = randomize_(WanDiT(cfg), seed=2, std=0.1).eval()
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 5, 24, generator=g), torch.tensor([400.0])
    compile_blocks_(model, backend=recording)
    with torch.no_grad():
        model(x, t, ctx)
    code = "\n".join(gm.code for gm in graphs)
    assert graphs and "self_attn" in code and "ffn" in code
    assert "patch_embedding" not in code and "head" not in code.replace("heads", "")
