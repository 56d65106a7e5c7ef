"""Optional int8 weight-only linears: a quarter of fp32's weight bytes (half of bf16's).

The AR's decode is bound by streaming its weights, so reading 1 byte per weight instead of 2 or 4 is the win there;
the DiT is compute-bound, so for it int8 saves memory only (its GEMMs run in the activation dtype on the weights
converted per call). Each output row gets one symmetric scale (absmax / 127). Where PyTorch has an int8-weight
matmul kernel for the decode's few rows (CPU, MPS) it is used; elsewhere the weight is converted on the fly and the
scale applied to the output (`linear(x, w) * scales`, the form torch.compile's weight-only-int8 pattern matches).

    from glmimage.quantize import quantize_int8
    quantize_int8(pipe.ar)      # in place; state_dict keys become <name>.weight (int8) and <name>.scales

On the meta device quantize_int8 only lays out the int8 modules; loading.load_weights then quantizes each weight
as it is read (the whole model never exists in floating point: the load's peak is one tensor above the int8 size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """[out, in] weight -> (int8 [out, in], scales [out] in w's dtype): symmetric, one absmax / 127 per row."""
    wf = w.float()
    scales = (wf.abs().amax(dim=1) / 127).clamp(min=1e-12)                       # [out]
    q = torch.round(wf / scales[:, None]).clamp(-127, 127).to(torch.int8)         # [out, in]
    return q, scales.to(w.dtype)


class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor, scales: Tensor, bias: Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)            # [out, in] int8
        self.register_buffer("scales", scales)            # [out], in the activation dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        w = lin.weight.detach()
        if w.is_meta:                      # the layout only (the loader quantizes as it reads): nothing to compute
            q, scales = torch.empty(w.shape, dtype=torch.int8, device="meta"), w.new_empty(w.shape[0])
        else:
            q, scales = quantize_rows(w)
        return cls(q, scales, None if lin.bias is None else lin.bias.detach())

    @classmethod
    def cat(cls, parts: list["Int8Linear"]) -> "Int8Linear":
        """One linear whose output rows are the parts' (fused QKV); per-row scales make this exact."""
        bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
        return cls(torch.cat([p.weight for p in parts]), torch.cat([p.scales for p in parts]), bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                            # [M, in]
        if x.device.type in ("cpu", "mps") and x2.shape[0] <= 16:
            # decode (and a speculative verify, a small batch): the int8 kernel streams 1 byte per weight. On CPU it
            # is fast in bf16 only (measured: fp32 activations are several times slower than a dense fp32 GEMV), so
            # it always runs in bf16 there. Each row's result does not depend on how many rows come with it (so a
            # speculative verify rounds as plain decoding), and up to 16 rows it beats converting the weight for a
            # GEMM (`benchmarks/int8_rows.py`, 2 threads: official 4608x4096 at 5 rows 1.7 ms vs 23 ms).
            y = torch.ops.aten._weight_int8pack_mm(x2.bfloat16(), self.weight, self.scales.bfloat16()).to(x.dtype)
        else:                                                # prefill, DiT, or no kernel: per-row scales after the GEMM
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
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
