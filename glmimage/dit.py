"""GLM-Image diffusion decoder: a single-stream DiT (CogView4 lineage) that predicts the flow velocity.

Conditioning (reference: /work/shared/reference/glm-image.md, Part B §1):
- prior tokens (the AR's VQ ids, upsampled to the 16 px token grid) are embedded, projected and *added* to the
  patch embeddings; the CFG-unconditional branch zeroes the embedding (the projector's bias path still adds);
- glyph tokens (ByT5 embeddings of the quoted prompt substrings) are the only text tokens of the joint attention;
- vec = silu(MLP(sincos(t)) + MLP(sincos(crop_top, crop_left, H_px, W_px))) drives AdaLN-Zero: 12 vectors per
  block, image/text interleaved, text and image sharing every other weight (QKV, out, FFN);
- 2-D rotate-half RoPE on the image tokens only, positions from (0, 0);
- image-to-image: every layer's keys/values of the reference images, computed once at t=0 with no text tokens
  (`DiT.reference_kv`), are prepended to the keys/values of the conditional branch.

State-dict keys are identical to diffusers' `GlmImageTransformer2DModel`; that is why the module names read
`net.0.proj`, `to_out.0`, `norm1.linear`. No buffers: the model builds on the meta device and loads with
`assign=True`. RoPE tables and sinusoids are computed per call in fp32.

Legend: B batch, C latent channels, H×W latent size, p patch size, h×w = (H/p)×(W/p) token grid, N = h·w image
tokens, T glyph tokens, L reference tokens, D = nh·hd model width, nh heads, hd head dim, E time-embedding width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glmimage.quantize import Int8Linear

ROPE_THETA = 10000.0
# Inductor settings for `Pipeline.compile()` on a CPU, where the whole velocity is one compiled graph (ar.cpu_compile).
# benchmarks/dit_step.py, medium preset, fp32, 256², CFG batch 2, s per step: eager 0.71, blocks compiled one by one
# 0.72, whole velocity 0.61, whole with `freezing` (weights become constants: packed GEMMs) 0.50, 86 s to compile and
# 0.8 GB more RSS; adding `cpp_wrapper` cost 60 s more compile for nothing, `max_autotune` 130 s more for 0.56-0.67.
CPU_COMPILE_OPTIONS = {"freezing": True}
KV = tuple[Tensor, Tensor]  # one layer's (k, v), each [B, S, nh, hd], post-QK-LN and post-RoPE


@dataclass
class DiTConfig:
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 30
    attention_head_dim: int = 128
    num_attention_heads: int = 32
    text_embed_dim: int = 1472  # ByT5 d_model
    time_embed_dim: int = 512  # E
    condition_dim: int = 256  # sincos width of each of crop_top, crop_left, H_px, W_px
    prior_vq_quantizer_codebook_size: int = 16384

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_hf(cls, d: dict) -> DiTConfig:
        """From the official `transformer/config.json` (every field required; `_class_name` etc. ignored)."""
        return cls(**{name: d[name] for name in cls.__dataclass_fields__})

    @classmethod
    def from_name(cls, name: str) -> DiTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])


# ----------------------------------------------------------------------------------------------------------
# Helpers


def adaln_key(name: str) -> bool:
    """Is this state-dict key one of the AdaLN weights: the time/condition MLPs, every block's `norm1.linear` and
    `norm_out.linear` (11% of the official DiT, 1.5 GB in bf16; 48% of the medium one)? They only map (t, size,
    crop) to the AdaLN vectors, which are computed for every step at once before denoising, so a memory-bound run
    can hold them and the rest of the DiT one after the other (`Pipeline` with offload)."""
    return name.startswith(("time_condition_embed.", "norm_out.")) or (
        name.startswith("transformer_blocks.") and ".norm1." in name)


def layer_norm(x: Tensor) -> Tensor:
    # every LayerNorm of this model: no affine, eps 1e-5
    return F.layer_norm(x, x.shape[-1:], eps=1e-5)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def sincos(t: Tensor, dim: int) -> Tensor:
    """[M] -> [M, dim] fp32 sinusoids, cos half first (diffusers `Timesteps(flip_sin_to_cos=True, shift=0)`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # [dim/2]
    args = t.float()[:, None] * freqs[None]  # [M, dim/2]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_table(h: int, w: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin [N, hd] fp32 for the h×w grid: per token [row·f | col·f] (hd/4 freqs each), duplicated to hd."""
    d = head_dim // 2  # channels per axis
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))  # [d/2]
    rows = torch.arange(h, dtype=torch.float32, device=device)[:, None] * inv_freq  # [h, d/2]
    cols = torch.arange(w, dtype=torch.float32, device=device)[:, None] * inv_freq  # [w, d/2]
    freqs = torch.cat([rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)], dim=-1).reshape(h * w, d)
    freqs = torch.cat([freqs, freqs], dim=-1)  # [N, hd]
    return freqs.cos(), freqs.sin()


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate-half RoPE in fp32: x [B, N, nh, hd], x = [x1 | x2] -> x·cos + [-x2 | x1]·sin."""
    cos, sin = rope[0][:, None], rope[1][:, None]  # [N, 1, hd]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B, N, C·p·p]; feature index c·p·p + py·p + px (channel-major), tokens row-major."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, p, p]
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x: Tensor, h: int, w: int, p: int) -> Tensor:
    """[B, N, C·p·p] -> [B, C, h·p, w·p], the inverse of `patchify`."""
    B, C = x.shape[0], x.shape[-1] // (p * p)
    x = x.reshape(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5)  # [B, C, h, p, w, p]
    return x.reshape(B, C, h * p, w * p)


def text_key_mask(txt_len: Tensor | None, T: int, N: int, ref_kv: list[KV] | None = None) -> Tensor | None:
    """Key mask [B, 1, 1, L+T+N] bool (True = attend) over [reference prefix (L rows of ref_kv) | text | image]
    keys that hides each sample's right-padded text rows (txt_len [B] valid rows of T). None when nothing is
    padded: no mask, as in the reference, so an unpadded batch runs the same SDPA call as a single prompt."""
    if txt_len is None or bool((txt_len == T).all()):
        return None
    B, L = txt_len.shape[0], 0 if ref_kv is None else ref_kv[0][0].shape[1]
    txt = torch.arange(T, device=txt_len.device)[None] < txt_len[:, None]  # [B, T]
    return torch.cat([txt.new_ones(B, L), txt, txt.new_ones(B, N)], dim=1)[:, None, None]


def text_groups(txt_len: Tensor | None, T: int) -> tuple[tuple[int, int, int], ...] | None:
    """The rows of a padded batch as runs (start, end, valid text rows), when there are at most two (batched CFG:
    the conditional rows, then the unconditional ones). Attention then runs once per run, unmasked, on its keys
    without the padded text rows: the same result as under `text_key_mask`, on the accelerators' flash kernels
    (a masked call falls back to slower ones). None when nothing is padded, or for more runs (prompts of several
    lengths: the mask then)."""
    if txt_len is None or bool((txt_len == T).all()):
        return None
    runs = [[0, 1, int(txt_len[0])]]
    for b, n in enumerate(txt_len.tolist()[1:], start=1):
        if n == runs[-1][2]:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1, n])
    return tuple((r0, r1, n) for r0, r1, n in runs) if len(runs) <= 2 else None


def concat_kv(kvs: list[list[KV]]) -> list[KV]:
    """Join several references' per-layer K/V along the sequence (several reference images for one sample)."""
    return [(torch.cat([kv[i][0] for kv in kvs], dim=1), torch.cat([kv[i][1] for kv in kvs], dim=1))
            for i in range(len(kvs[0]))]


# ----------------------------------------------------------------------------------------------------------
# Blocks. The thin holder classes exist only to reproduce the checkpoint's key names.


class Proj(nn.Module):
    """A Linear stored under the key `proj`."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)


class Modulation(nn.Module):
    """AdaLN projection vec [B, E] -> [B, k·D], stored under the key `linear` (`norm1`, `norm_out`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)


class MLP(nn.Module):
    """Linear -> act -> Linear, in diffusers' FeedForward layout: `net.0.proj`, `net.1` (dropout slot), `net.2`."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, act: Callable[[Tensor], Tensor]):
        super().__init__()
        self.net = nn.ModuleList([Proj(dim_in, hidden), nn.Identity(), nn.Linear(hidden, dim_out)])
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.act(self.net[0].proj(x)))


class SiLUMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection layout)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.linear_2 = nn.Linear(dim_out, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeConditionEmbed(nn.Module):
    """vec = silu(MLP(sincos_E(t)) + MLP(cat[sincos(crop_top), sincos(crop_left), sincos(H_px), sincos(W_px)]))."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.time_dim, self.condition_dim = cfg.time_embed_dim, cfg.condition_dim
        self.timestep_embedder = SiLUMLP(cfg.time_embed_dim, cfg.time_embed_dim)
        self.condition_embedder = SiLUMLP(4 * cfg.condition_dim, cfg.time_embed_dim)

    def forward(self, timestep: Tensor, target_size: Tensor, crop: Tensor) -> Tensor:
        B = timestep.shape[0]
        dtype = self.timestep_embedder.linear_1.weight.dtype
        t = sincos(timestep, self.time_dim)  # [B, E] fp32
        cond = sincos(torch.cat([crop, target_size], dim=1).flatten(), self.condition_dim)  # [B·4, cd]
        cond = cond.view(B, 4 * self.condition_dim)  # [B, 4·cd]
        # the sinusoids are fp32; the MLPs run in the weights' dtype
        return F.silu(self.timestep_embedder(t.to(dtype)) + self.condition_embedder(cond.to(dtype)))  # [B, E]


class Attention(nn.Module):
    """Joint attention over [text | image] with shared weights; QK-LN over hd; RoPE on the image part only."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.dim
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.to_out = nn.ModuleList([nn.Linear(D, D)])

    def fuse_qkv(self) -> None:
        """One [3D, D] GEMM instead of three. to_q/to_k/to_v become views into the fused weight, so the state
        dict keeps its keys and no weight is held twice (offload moves whole storages, so they stay views).
        int8 linears (quantize.Int8Linear) stay three: the DiT's GEMMs are compute-bound, little is won."""
        if isinstance(self.to_q, Int8Linear):
            return
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]).detach()  # [3D, D]
        b = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias]).detach()  # [3D]
        D = w.shape[1]
        for i, lin in enumerate((self.to_q, self.to_k, self.to_v)):
            lin.weight = nn.Parameter(w[i * D:(i + 1) * D], requires_grad=False)
            lin.bias = nn.Parameter(b[i * D:(i + 1) * D], requires_grad=False)
        # buffers, so they move with the module; not persistent, so the state dict keeps the official keys
        self.register_buffer("qkv_weight", w, persistent=False)
        self.register_buffer("qkv_bias", b, persistent=False)

    def qkv(self, h: Tensor, num_txt: int, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        B, S, _ = h.shape  # h: [B, T+N, D], text first
        if getattr(self, "qkv_weight", None) is not None:
            q, k, v = F.linear(h, self.qkv_weight, self.qkv_bias).view(B, S, 3, self.num_heads, self.head_dim).unbind(2)
        else:
            q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        q = layer_norm(q.reshape(B, S, self.num_heads, self.head_dim))  # [B, S, nh, hd]
        k = layer_norm(k.reshape(B, S, self.num_heads, self.head_dim))  # [B, S, nh, hd]
        v = v.reshape(B, S, self.num_heads, self.head_dim)  # [B, S, nh, hd]
        q = torch.cat([q[:, :num_txt], apply_rope(q[:, num_txt:], rope)], dim=1)
        k = torch.cat([k[:, :num_txt], apply_rope(k[:, num_txt:], rope)], dim=1)
        return q, k, v

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                groups: tuple[tuple[int, int, int], ...] | None = None, num_txt: int = 0) -> Tensor:
        # q: [B, S, nh, hd]; k, v: [B, S_kv, nh, hd] (S_kv = L + S with a reference prefix).
        # The reference never masks. Where a batch pads its text: mask [B, 1, 1, S_kv] bool (True = attend,
        # text_key_mask), or groups (text_groups; no prefix): per run of rows (r0, r1, n) one unmasked call over
        # the keys without its padded text rows [n, num_txt).
        if groups is None:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask)  # [B, nh, S, hd]
        else:
            def unpadded(t: Tensor, r0: int, r1: int, n: int) -> Tensor:  # [b, n+N, nh, hd] -> [b, nh, n+N, hd]
                t = t[r0:r1] if n == num_txt else torch.cat([t[r0:r1, :n], t[r0:r1, num_txt:]], dim=1)
                return t.transpose(1, 2)
            o = torch.cat([F.scaled_dot_product_attention(q[r0:r1].transpose(1, 2), unpadded(k, r0, r1, n),
                                                          unpadded(v, r0, r1, n))
                           for r0, r1, n in groups])  # [B, nh, S, hd]
        return self.to_out[0](o.transpose(1, 2).flatten(2))  # [B, S, D]


class DiTBlock(nn.Module):
    """Single-stream block: image and text share QKV/out/FFN weights and differ only in their AdaLN vectors."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.dim
        self.norm1 = Modulation(cfg.time_embed_dim, 12 * D)
        self.attn1 = Attention(cfg)
        self.ff = MLP(D, 4 * D, D, partial(F.gelu, approximate="tanh"))

    def forward(self, x: Tensor, c: Tensor, mod: Tensor, rope: tuple[Tensor, Tensor],
                ref_kv: KV | None = None, mask: Tensor | None = None,
                groups: tuple[tuple[int, int, int], ...] | None = None) -> tuple[Tensor, Tensor, KV]:
        """x [B, N, D] image, c [B, T, D] text, mod [B or 1, 12·D] = norm1.linear(vec) (precomputable per step).

        ref_kv: a reference prefix, either (k, v) [1 or B, L, nh, hd] to prepend, or a preallocated
        [B, L+T+N, nh, hd] buffer pair whose first L rows hold the prefix (this layer's K/V go into the tail: no
        re-concatenation per step). Returns x, c and this layer's own (k, v)."""
        B, T = c.shape[:2]
        (shift, c_shift, scale, c_scale, gate, c_gate,
         shift2, c_shift2, scale2, c_scale2, gate2, c_gate2) = mod[:, None].chunk(12, dim=-1)
        h = torch.cat([modulate(layer_norm(c), c_shift, c_scale), modulate(layer_norm(x), shift, scale)], dim=1)
        q, k, v = self.attn1.qkv(h, T, rope)  # [B, T+N, nh, hd]
        kv = (k, v)
        if ref_kv is not None:  # i2i conditional branch: [reference | text | image] keys and values
            kbuf, vbuf = ref_kv
            S = k.shape[1]
            if kbuf.shape[0] == B and kbuf.shape[1] > S:  # preallocated: write the tail in place
                kbuf[:, -S:], vbuf[:, -S:] = k, v
                k, v = kbuf, vbuf  # [B, L+T+N, nh, hd]
            else:
                k = torch.cat([kbuf.expand(B, -1, -1, -1), k], dim=1)  # [B, L+T+N, nh, hd]
                v = torch.cat([vbuf.expand(B, -1, -1, -1), v], dim=1)
        a = self.attn1(q, k, v, mask, groups, T)  # [B, T+N, D]
        c = c + a[:, :T] * c_gate
        x = x + a[:, T:] * gate
        x = x + self.ff(modulate(layer_norm(x), shift2, scale2)) * gate2
        c = c + self.ff(modulate(layer_norm(c), c_shift2, c_scale2)) * c_gate2
        return x, c, kv

    def kv_only(self, x: Tensor, mod: Tensor, rope: tuple[Tensor, Tensor]) -> KV:
        """(k, v) of image tokens with no text: all that the reference pass needs from the last block."""
        shift, _, scale = mod[:, None].chunk(12, dim=-1)[:3]
        _, k, v = self.attn1.qkv(modulate(layer_norm(x), shift, scale), 0, rope)
        return k, v


# ----------------------------------------------------------------------------------------------------------
# Model


class Context(NamedTuple):
    """Everything of one CFG branch that stays fixed across the denoising steps."""

    txt: Tensor  # [B, T, D] projected glyph tokens
    prior: Tensor  # [B, N, D] projected prior embedding ([1, 1, D] when dropped: the constant bias path)
    rope: tuple[Tensor, Tensor]  # cos, sin [N, hd] fp32
    ref_kv: list[KV] | None  # per layer (k, v) [1 or B, L, nh, hd], prepended to the keys/values; None: no prefix
    mask: Tensor | None = None  # [B, 1, 1, L+T+N] bool key mask (text_key_mask), only where text is padded
    txt_len: Tensor | None = None  # [B] valid text rows (right-padded); None: all T
    groups: tuple[tuple[int, int, int], ...] | None = None  # instead of the mask: text_groups (batched CFG)


class StepModulation(NamedTuple):
    """The AdaLN vectors of one denoising step: per block norm1.linear(vec) [B, 12·D], and norm_out's [B, 2·D]."""

    blocks: list[Tensor]
    out: Tensor


class StepCache:
    """First-block step cache (FBCache, as ParaAttention's for FLUX; TeaCache's idea without its fitted curve).

    In the middle of a schedule consecutive steps change the DiT's hidden states little. Every step runs the first
    block; when its residual (output - input) is within `threshold` of the one at the last fully computed step
    (mean absolute difference relative to that one's mean magnitude: the drift accumulates until it is not), the
    other blocks are skipped and their residual from that step is added instead. threshold 0 never skips. One
    cache per branch call: a batch (both CFG branches, several images) shares each decision, so with a cache a
    batched image can differ from the same image generated alone."""

    def __init__(self, threshold: float):
        if not 0 <= threshold < 1:
            raise ValueError(f"the step-cache threshold is a relative difference in [0, 1) (e.g. 0.1; 0 = off), "
                             f"got {threshold}")
        self.threshold = threshold
        self.first: Tensor | None = None  # [B, N, D] the first block's residual at the last full step
        self.rest: Tensor | None = None   # [B, N, D] the other blocks' residual at that step
        self.skipped = 0                  # steps whose blocks after the first were skipped

    def hit(self, first: Tensor) -> bool:
        """Can this step reuse `rest`? One host sync (the decision is Python control flow)."""
        if self.first is None or self.first.shape != first.shape:
            return False
        diff = (first - self.first).abs().mean() / self.first.abs().mean().clamp_min(1e-12)
        return bool(diff < self.threshold)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.dim, cfg.patch_size
        self.image_projector = Proj(cfg.in_channels * p * p, D)
        self.glyph_projector = MLP(cfg.text_embed_dim, D, D, F.gelu)  # exact (erf) GELU
        self.prior_token_embedding = nn.Embedding(cfg.prior_vq_quantizer_codebook_size, D)
        self.prior_projector = MLP(D, D, D, F.silu)
        self.time_condition_embed = TimeConditionEmbed(cfg)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = Modulation(cfg.time_embed_dim, 2 * D)
        self.proj_out = nn.Linear(D, p * p * cfg.out_channels)

    def fuse(self) -> "DiT":
        """Inference layout: fused QKV GEMMs (state-dict keys unchanged). Call after loading."""
        for block in self.transformer_blocks:
            block.attn1.fuse_qkv()
        return self

    def embed_vec(self, timestep: Tensor, target_size: Tensor, crop: Tensor) -> Tensor:
        """timestep [B] (the DiT's t, i.e. schedule t − 1), target_size [B, 2] (H_px, W_px), crop [B, 2] -> [B, E].

        Identical for both CFG branches of a step."""
        return self.time_condition_embed(timestep, target_size, crop)

    def context(self, glyph: Tensor, prior_ids: Tensor, prior_drop: bool, grid: tuple[int, int],
                ref_kv: list[KV] | None = None, txt_len: Tensor | None = None) -> Context:
        """glyph [B, T, text_embed_dim] (txt_len [B]: valid rows of each, right-padded; None: all), prior_ids
        [B, N] long on the h×w `grid` -> Context (reusable per step)."""
        txt = self.glyph_projector(glyph)  # [B, T, D]
        if prior_drop:  # zero embedding; the projector still adds W2·silu(b1) + b2 to every token
            prior = self.prior_projector(txt.new_zeros(1, 1, self.cfg.dim))  # [1, 1, D]
        else:
            prior = self.prior_projector(self.prior_token_embedding(prior_ids))  # [B, N, D]
        rope = rope_table(*grid, self.cfg.attention_head_dim, glyph.device)
        mask = text_key_mask(txt_len, txt.shape[1], grid[0] * grid[1], ref_kv)
        return Context(txt, prior, rope, ref_kv, mask, txt_len)

    def modulation(self, vec: Tensor) -> StepModulation:
        """vec [M, E] -> every AdaLN vector for those M rows. Depends only on (t, size, crop): the schedule's
        whole set can be computed in one pass over the AdaLN weights (a GEMM instead of 2·steps GEMVs)."""
        return StepModulation([b.norm1.linear(vec) for b in self.transformer_blocks], self.norm_out.linear(vec))

    def velocity(self, x: Tensor, ctx: Context, vec: Tensor | None = None, mod: StepModulation | None = None,
                 cache: StepCache | None = None) -> Tensor:
        """x [B, C, H, W] latents (any float dtype; cast to the weights' dtype), and vec [B, E] or its precomputed
        modulation -> v [B, C, H, W]. cache: this branch's StepCache across the steps (None: every block runs)."""
        H, W = x.shape[-2:]
        p = self.cfg.patch_size
        mod = self.modulation(vec) if mod is None else mod
        x = x.to(self.proj_out.weight.dtype)
        x = self.image_projector.proj(patchify(x, p)) + ctx.prior  # [B, N, D]
        c = ctx.txt  # [B, T, D]
        x_in = x
        for i, block in enumerate(self.transformer_blocks):
            x, c, _ = block(x, c, mod.blocks[i], ctx.rope, None if ctx.ref_kv is None else ctx.ref_kv[i], ctx.mask,
                            ctx.groups)
            if i == 0 and cache is not None:
                first, x_first = x - x_in, x  # [B, N, D] the first block's residual
                if cache.hit(first):  # the other blocks' residual of the last full step stands in for them
                    x = x + cache.rest
                    cache.skipped += 1
                    break
                cache.first = first
        else:
            if cache is not None:
                cache.rest = x - x_first  # [B, N, D]
        scale, shift = mod.out[:, None].chunk(2, dim=-1)  # [B, 1, D] each; scale comes first
        x = self.proj_out(modulate(layer_norm(x), shift, scale))  # [B, N, p·p·C]; the text stream is dropped
        return unpatchify(x, H // p, W // p, p)  # [B, C, H, W]

    @staticmethod
    def batch_cfg(cond: Context, uncond: Context, masked: bool = False) -> Context:
        """Both CFG branches as one batch [cond; uncond] (t2i: neither has a reference prefix).

        The shorter glyph sequences are right-padded with zero rows that attention leaves out (per branch,
        `text_groups`; a key mask where the conditional prompts differ in length, or always with `masked`: a
        compiled DiT then sees a tensor, not text lengths baked into its code), so each row computes exactly what
        its own forward would; with equal lengths (prompts without quotes) nothing is left out."""
        assert cond.ref_kv is None and uncond.ref_kv is None, "batched CFG is for branches without a prefix"
        B, N, D = cond.txt.shape[0], cond.prior.shape[1], cond.txt.shape[2]
        Tc, Tu = cond.txt.shape[1], uncond.txt.shape[1]
        T = max(Tc, Tu)
        txt = cond.txt.new_zeros(2 * B, T, D)
        txt[:B, :Tc], txt[B:, :Tu] = cond.txt, uncond.txt
        prior = torch.cat([cond.prior.expand(B, N, D), uncond.prior.expand(B, N, D)])  # [2B, N, D]

        def lengths(ctx: Context, n: int) -> Tensor:
            return ctx.txt_len if ctx.txt_len is not None else torch.full((B,), n, device=txt.device)

        txt_len = torch.cat([lengths(cond, Tc), lengths(uncond, Tu)])  # [2B]
        groups = None if masked else text_groups(txt_len, T)
        return Context(txt, prior, cond.rope, None, None if groups else text_key_mask(txt_len, T, N), txt_len, groups)

    def prefix_buffers(self, ref_kv: list[KV], batch: int, num_new: int) -> list[KV]:
        """Preallocate per layer [B, L+num_new, nh, hd] K/V buffers holding the reference prefix in their first
        L rows, so every conditional step writes only its own T+N rows (no concatenation per step)."""
        out = []
        for k, v in ref_kv:
            L = k.shape[1]
            kb = k.new_empty(batch, L + num_new, *k.shape[2:])
            vb = v.new_empty(batch, L + num_new, *v.shape[2:])
            kb[:, :L], vb[:, :L] = k, v
            out.append((kb, vb))
        return out

    def forward(self, x: Tensor, glyph: Tensor, prior_ids: Tensor, prior_drop: bool, timestep: Tensor,
                target_size: Tensor, crop: Tensor, ref_kv: list[KV] | None = None) -> Tensor:
        """One denoiser call. x [B, C, H, W], glyph [B, T, Dt], prior_ids [B, N] long, timestep [B] float,
        target_size [B, 2] (H_px, W_px), crop [B, 2], ref_kv from `reference_kv` (conditional branch only)."""
        p = self.cfg.patch_size
        ctx = self.context(glyph, prior_ids, prior_drop, (x.shape[2] // p, x.shape[3] // p), ref_kv)
        return self.velocity(x, ctx, self.embed_vec(timestep, target_size, crop))

    def reference_modulation(self, size: tuple[int, int], device: torch.device) -> StepModulation:
        """The AdaLN vectors [1, ...] of a reference pass: timestep 0, crop 0, target size = the image's
        (H_px, W_px)."""
        size_t = torch.tensor([size], dtype=torch.float32, device=device)  # [1, 2]
        return self.modulation(self.embed_vec(size_t.new_zeros(1), size_t, torch.zeros_like(size_t)))

    def reference_kv(self, latents: list[Tensor], prior_ids: list[Tensor], sizes: list[tuple[int, int]],
                     mods: list[StepModulation] | None = None) -> list[KV]:
        """i2i prefix of one or more reference images, joined along the sequence: per layer (k, v) [B, L, nh, hd].

        Image j: latents [B, C, h·p, w·p], prior ids [B, h·w] long, sizes[j] = its (H_px, W_px). The batch B is
        1 (shared by every sample) or the denoising batch (one reference set per sample). mods: each image's
        `reference_modulation`, when computed beforehand (None: computed here)."""
        mods = mods or [self.reference_modulation(size, x.device) for x, size in zip(latents, sizes)]
        return concat_kv([self.reference_kv_one(x, ids, mod) for x, ids, mod in zip(latents, prior_ids, mods)])

    def reference_kv_one(self, x: Tensor, prior_ids: Tensor, mod: StepModulation) -> list[KV]:
        """One reference image through the DiT with its `reference_modulation` and no text tokens.

        Stops after the last layer's K/V: that layer's attention, FFN and the output head would be unused."""
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        rope = rope_table(H // p, W // p, self.cfg.attention_head_dim, x.device)
        x = x.to(self.proj_out.weight.dtype)
        prior = self.prior_projector(self.prior_token_embedding(prior_ids))  # [B, L, D]
        x = self.image_projector.proj(patchify(x, p)) + prior  # [B, L, D]
        c = x.new_zeros(B, 0, self.cfg.dim)  # no text tokens
        kvs = []
        for i, block in enumerate(self.transformer_blocks[:-1]):
            x, c, kv = block(x, c, mod.blocks[i], rope)
            kvs.append(kv)
        kvs.append(self.transformer_blocks[-1].kv_only(x, mod.blocks[-1], rope))
        return kvs


# ----------------------------------------------------------------------------------------------------------
# Presets (fields of the official transformer/config.json that differ between sizes)

PRESETS: dict[str, dict] = {
    # matches glmimage.random_checkpoint "debug" (tiny T5 d_model 32, codebook 128)
    "debug": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, text_embed_dim=32, time_embed_dim=32,
                  condition_dim=16, prior_vq_quantizer_codebook_size=128),
    # official depth at reduced width, for CPU benchmarks (random_checkpoint "medium")
    "medium": dict(num_layers=30, attention_head_dim=64, num_attention_heads=8, text_embed_dim=256),
    # zai-org/GLM-Image transformer/config.json
    "full": dict(num_layers=30, attention_head_dim=128, num_attention_heads=32, text_embed_dim=1472),
}
