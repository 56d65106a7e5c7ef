"""LoRA (Hu et al. 2021): fine-tune a frozen model through low-rank adapters on its linear layers.

    y = W x + b + B (A x),   A [r, in] ~ U(-1/sqrt(in), 1/sqrt(in)),  B [out, r] = 0

so at step 0 the adapted model is the base model exactly, and only A and B (r * (in + out) numbers per layer) get
gradients and optimizer state. `--lora R` puts an adapter on every nn.Linear inside the transformer blocks (the
DiT's attention, feed-forward and AdaLN projections; the AR's attention and MLP projections). A stage checkpoint
then holds the adapters alone (the base is the --init model, read again on resume), and `glmimage export` merges
them into the weights (W + B A), so the exported folder is a plain checkpoint in the official layout.

Why not peft: GLM-Image's reference pipeline has no LoRA loader to be compatible with, our blocks are our own
modules, and merging at export leaves nothing for the pipeline to know about; the whole method is the class below.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class Adapter(nn.Module):
    """The trainable low-rank pair of one linear layer."""

    def __init__(self, d_in: int, d_out: int, rank: int, gen: torch.Generator):
        super().__init__()
        bound = 1 / math.sqrt(d_in)
        self.a = nn.Parameter(torch.rand(rank, d_in, generator=gen) * 2 * bound - bound)   # [r, in]
        self.b = nn.Parameter(torch.zeros(d_out, rank))                                     # [out, r]

    def delta(self) -> Tensor:
        return self.b @ self.a                                                               # [out, in]


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus an Adapter; keeps the base's `weight`/`bias` attributes for code that reads them."""

    def __init__(self, base: nn.Linear, adapter: Adapter):
        super().__init__()
        self.base, self.adapter = base.requires_grad_(False), adapter

    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.adapter.a, self.adapter.b
        return self.base(x) + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))    # [..., out]


def add_lora(blocks: nn.Module, rank: int, seed: int = 0) -> nn.ModuleDict:
    """Freeze `blocks` and wrap each nn.Linear in it with an adapter of rank `rank`, created in module order from
    `seed`. Returns the adapters by module path ('.' -> '/'), the part a checkpoint saves."""
    if rank < 1:
        raise ValueError(f"--lora is the adapters' rank, a positive integer (e.g. 16), got {rank}")
    blocks.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 31)
    adapters = nn.ModuleDict()
    for name, module in list(blocks.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            path = f"{name}.{child_name}" if name else child_name
            adapter = Adapter(child.in_features, child.out_features, rank, gen).to(child.weight.device)
            adapters[path.replace(".", "/")] = adapter
            setattr(module, child_name, LoRALinear(child, adapter))
    if not adapters:
        raise ValueError(f"no linear layers to adapt in {type(blocks).__name__}")
    return adapters


@torch.no_grad()
def merge_lora(blocks: nn.Module) -> nn.Module:
    """Replace every LoRALinear in `blocks` by its base with W + B A (in the base's dtype): plain modules again."""
    for module in list(blocks.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                base = child.base
                base.weight += child.adapter.delta().to(base.weight)
                setattr(module, child_name, base)
    return blocks
