"""Optional int8 weight-only linears: a quarter of fp32's weight bytes (half of bf16's).

The AR's decode is bound by streaming its weights, so reading 1 byte per weight instead of 2 or 4 is the win.
Each output row gets one symmetric scale (absmax / 127). Where PyTorch has an int8-weight matmul kernel (CPU, MPS)
it is used; elsewhere the weight is dequantized on the fly (portable, not faster).

    from glmimage.quantize import quantize_int8
    quantize_int8(pipe.ar)      # in place; state_dict keys become <name>.weight (int8) and <name>.scales
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor, scales: Tensor, bias: Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)            # [out, in] int8
        self.register_buffer("scales", scales)            # [out], in the activation dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        w = lin.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)                    # [out]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)     # [out, in]
        bias = None if lin.bias is None else lin.bias.detach()
        return cls(q, scales.to(lin.weight.dtype), bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                            # [M, in]
        if x.device.type in ("cpu", "mps") and x2.shape[0] <= 4:
            # decode: the int8 kernel streams 1 byte per weight. On CPU it is fast in bf16 only (measured: fp32
            # activations are several times slower than a dense fp32 GEMV), so it always runs in bf16 there.
            y = torch.ops.aten._weight_int8pack_mm(x2.bfloat16(), self.weight, self.scales.bfloat16()).to(x.dtype)
        else:                                                                    # prefill, or no kernel: dequantize
            y = F.linear(x2, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def quantize_int8(module: nn.Module, min_features: int = 64) -> nn.Module:
    """Replace every nn.Linear of `module` (with both dims >= min_features) by an Int8Linear, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and min(child.in_features, child.out_features) >= min_features:
            setattr(module, name, Int8Linear.from_linear(child))
        else:
            quantize_int8(child, min_features)
    return module
