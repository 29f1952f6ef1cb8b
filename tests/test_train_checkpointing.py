"""Gradient checkpointing from outside (wan.train.checkpointing): the reentrant form records no graph in
the forward pass, and tensors that need a gradient where that form cannot see them still get one."""

from dataclasses import dataclass

import torch
from torch import nn

from wan.train.checkpointing import GradientCheckpointing


@dataclass
class Context:
    rows: torch.Tensor


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.seen_grad_mode: list[bool] = []

    def forward(self, x, ctx: Context, scale: float = 1.0):
        self.seen_grad_mode.append(torch.is_grad_enabled())
        return torch.tanh(self.lin(x) + ctx.rows) * scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x, ctx):
        for block in self.blocks:
            x = block(x, ctx, scale=0.5)
        return x


def _grads(net, x, ctx):
    out = net(x, ctx)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    return grads


def test_the_forward_records_no_graph_and_the_gradients_equal_the_plain_ones():
    torch.manual_seed(0)
    net, x, ctx = Net(), torch.randn(3, 8), Context(torch.randn(3, 8))
    plain = _grads(net, x, ctx)  # x and ctx need no grad: only the weights do (as a frozen DiT's LoRA)
    for block in net.blocks:
        block.seen_grad_mode.clear()
    gc = GradientCheckpointing()
    gc.attach({"transformer": net})
    checkpointed = _grads(net, x, ctx)
    for block in net.blocks:
        assert block.seen_grad_mode == [False, True]  # forward unrecorded; the recomputation records
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=0)
    gc.detach({"transformer": net})
    assert all("forward" not in block.__dict__ for block in net.blocks)


def test_a_tensor_needing_grad_inside_an_argument_gets_its_gradient():
    """The text rows come out of a trained layer (a LoRA on the text embedding, say) and reach the blocks
    inside a dataclass: its gradient must flow back through them, which the reentrant form cannot do."""
    torch.manual_seed(1)
    net, embed, x, text = Net(), nn.Linear(8, 8), torch.randn(3, 8), torch.randn(3, 8)

    def grads():
        out = net(x, Context(embed(text)))
        out.square().sum().backward()
        result = {n: p.grad.clone() for n, p in [*net.named_parameters(), *embed.named_parameters(prefix="embed")]}
        net.zero_grad()
        embed.zero_grad()
        return result
    plain = grads()
    gc = GradientCheckpointing()
    gc.attach({"transformer": net})
    checkpointed = grads()
    gc.detach({"transformer": net})
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=0)
