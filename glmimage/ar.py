"""GLM-Image autoregressive prior: a GLM-4-style decoder that writes VQ ids, and its sampling loop.

The decoder is GLM-4-9B-0414's: GQA with q/k/v biases, a fused gate_up MLP, and "sandwich" RMSNorms (four per
layer: input, post_self_attn, post_attention, post_mlp; branch outputs are normalised before the residual add).
It differs from GLM-4 in two ways that matter for numerics and weights:
  * split-half ("NeoX") rotary on the first rotary_dim dims of each head (GLM-4 interleaves pairs), with 3-axis
    mRoPE: frequency i takes its position from the t, h or w axis according to mrope_section
  * lm_head only spans the vision vocabulary (VQ codes, BOI, EOI, unused slots): the model can only emit image ids

Generation (`generate_prior`) samples one grid per target grid, in order: t2i = [preview, large], i2i = [large].
The whole request (positions, KV cache, uniforms) is laid out once at prefill; the decode loop never syncs with the
host. Ids >= BOI are masked while a grid is incomplete, so the grids always come back full.

Legend: B batch, S prompt (or chunk) length, T cache length (prompt + generated), L cache slots attended,
N generated tokens, D head dim, H query heads, K kv heads, R rotary dims, V vision vocab.
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glmimage.quantize import Int8Linear


@dataclass
class ARConfig:
    vocab_size: int = 168064        # embedding rows: vision ids [0, vision_vocab_size), then text ids
    vision_vocab_size: int = 16512  # lm_head rows: VQ codes, BOI, EOI, unused slots
    dim: int = 4096
    n_layers: int = 40
    n_heads: int = 32
    n_kv_heads: int = 2
    head_dim: int = 128
    hidden_dim: int = 13696         # MLP width (gate_up_proj has 2 * hidden_dim rows: gate first)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_dim: int = 64            # head_dim * partial_rotary_factor
    mrope_section: list[int] = field(default_factory=lambda: [8, 12, 12])  # t/h/w frequencies, sums to rotary_dim/2
    boi_id: int = 16384             # image start; also the number of VQ codes (codes are ids 0..boi_id-1)
    eoi_id: int = 16385             # image end (= eos)
    image_token_id: int = 167855    # `<|image|>` placeholder in the prompt (replaced by reference VQ ids)
    pad_id: int = 167841

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and <= head_dim={self.head_dim}")
        if sum(self.mrope_section) != self.rotary_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to rotary_dim/2 = {self.rotary_dim // 2}")
        if not self.boi_id < self.vision_vocab_size <= self.vocab_size:
            raise ValueError("expected boi_id < vision_vocab_size <= vocab_size")

    @classmethod
    def from_hf(cls, d: dict) -> ARConfig:
        """From the official `vision_language_encoder/config.json` (GlmImageConfig as a dict)."""
        t = d["text_config"]
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
        # transformers' defaults when a key is absent: partial_rotary_factor 1.0, mrope_section [8, 12, 12]
        partial = rope.get("partial_rotary_factor", t.get("partial_rotary_factor", 1.0))
        return cls(
            vocab_size=t["vocab_size"], vision_vocab_size=t["vision_vocab_size"], dim=t["hidden_size"],
            n_layers=t["num_hidden_layers"], n_heads=t["num_attention_heads"],
            n_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"], head_dim=head_dim,
            hidden_dim=t["intermediate_size"], norm_eps=t["rms_norm_eps"],
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
            rotary_dim=int(head_dim * partial), mrope_section=list(rope.get("mrope_section", [8, 12, 12])),
            boi_id=d["image_start_token_id"], eoi_id=d["image_end_token_id"], image_token_id=d["image_token_id"],
            pad_id=t["pad_token_id"],
        )

    @classmethod
    def from_name(cls, name: str) -> ARConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown AR preset {name!r}; valid: {sorted(PRESETS)}")
        return replace(PRESETS[name])


# ----------------------------------------------------------------------------------------------------------
# Helpers: RMSNorm, mRoPE

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one fused kernel (measured equal to x·rsqrt(mean(x²) + eps)·w in fp32)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in fp32, cast back, then multiply by the weight in the activation dtype (as the reference)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def mrope_cos_sin(cfg: ARConfig, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """pos (3, B, S) t/h/w positions -> cos, sin (B, S, R), computed in fp32 then cast to `dtype`."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.rotary_dim, 2, dtype=torch.float32,
                                                      device=pos.device) / cfg.rotary_dim))  # (R/2,)
    freqs = pos[..., None].float() * inv_freq                            # (3, B, S, R/2)
    # frequency i takes the t, h or w row: the first mrope_section[0] from t, the next from h, the rest from w
    # (built with device ops only: a host list -> device copy here would sync every decode step)
    i = torch.arange(cfg.rotary_dim // 2, device=pos.device)
    t_end, h_end = cfg.mrope_section[0], cfg.mrope_section[0] + cfg.mrope_section[1]
    axis = (i >= t_end).long() + (i >= h_end).long()                    # (R/2,) in {0, 1, 2}
    freqs = freqs.gather(0, axis.expand(1, *freqs.shape[1:3], -1))[0]  # (B, S, R/2)
    emb = torch.cat([freqs, freqs], dim=-1)                              # (B, S, R)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_tables(cos: Tensor, sin: Tensor, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """(cos, sin) (B, S, R) -> full-width tables (B, S, 1, D) and a permutation (D,) such that
    x·cos_f + x[..., perm]·sin_f is split-half rotary on the first R dims of heads laid out (B, S, N, D),
    x·cos + rotate_half(x)·sin with rotate_half(x) = [−x2 | x1] (−x2·s is x2·(−s) exactly), and x·1 + x·0 = x on
    the pass-through dims: four ops per call, q and k rotated together."""
    B, S, R = cos.shape
    half = R // 2
    pad = head_dim - R
    cos_f = torch.cat([cos, cos.new_ones(B, S, pad)], dim=-1)[:, :, None]                   # (B, S, 1, D)
    sin_f = torch.cat([-sin[..., :half], sin[..., half:], sin.new_zeros(B, S, pad)], dim=-1)[:, :, None]
    i = torch.arange(head_dim, device=cos.device)          # built on the device: no host copy inside a decode step
    perm = torch.where(i < half, i + half, torch.where(i < R, i - half, i))     # [half..R) [0..half) [R..D)
    return cos_f, sin_f, perm


def rotate(x: Tensor, cos_f: Tensor, sin_f: Tensor, perm: Tensor) -> Tensor:
    """x (B, S, N, D) with the tables of `rope_tables` -> rotated x (B, S, N, D)."""
    return x * cos_f + x.index_select(-1, perm) * sin_f


# ----------------------------------------------------------------------------------------------------------
# Blocks

class KVCache:
    """Preallocated keys/values for one request: k[l], v[l] (B, K, T, D) per layer. Plain tensors, never on the
    model. A forward over cache slots [start, start+S) writes there and attends over slots [0, start+S).
    One tensor per layer, not views of one (L, ...) tensor: under torch.compile a write into a view is replayed
    as a copy of the whole base tensor, once per layer (measured on CPU: 29 ms per decode step)."""

    def __init__(self, cfg: ARConfig, batch: int, length: int, device: torch.device, dtype: torch.dtype):
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]


class Attention(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def fuse_qkv(self) -> None:
        """Inference layout: one (H+2K)·D x dim GEMM (`qkv_proj`) replaces q_proj, k_proj and v_proj (their
        weights move into it; none is held twice). The state dict then has qkv_proj instead of the official keys."""
        if isinstance(self.q_proj, Int8Linear):           # quantized as loaded: int8 rows and their scales
            qkv = Int8Linear.cat([self.q_proj, self.k_proj, self.v_proj])
        else:
            qkv = nn.Linear(self.q_proj.in_features, 1, bias=True, device="meta")
            qkv.weight = nn.Parameter(torch.cat([self.q_proj.weight, self.k_proj.weight,
                                                 self.v_proj.weight]).detach(), requires_grad=False)
            qkv.bias = nn.Parameter(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]).detach(),
                                    requires_grad=False)
            qkv.out_features = qkv.weight.shape[0]
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = qkv

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor, Tensor], mask: Tensor | None,
                kv: tuple[Tensor, Tensor] | None = None, write_at: Tensor | None = None) -> Tensor:
        """rope: `rope_tables` output. mask (B, 1, S, L) bool, True = attend; None = causal (a prompt from slot 0,
        or one new token). kv: this layer's cache slots [0, L), the last S of which are this chunk's; or, with
        write_at (S,) slot ids (or (B, S): each row's own), the whole static-length cache (the mask then says which
        slots count)."""
        B, S, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        if hasattr(self, "qkv_proj"):
            qkv = self.qkv_proj(x).view(B, S, H + 2 * K, D)                            # (B, S, H+2K, D)
            qk = rotate(qkv[:, :, :H + K], *rope)                                      # q and k in one go
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + K:]
        else:
            q = rotate(self.q_proj(x).view(B, S, H, D), *rope)                         # (B, S, H, D)
            k = rotate(self.k_proj(x).view(B, S, K, D), *rope)                         # (B, S, K, D)
            v = self.v_proj(x).view(B, S, K, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)             # (B, H|K, S, D)
        if kv is not None:
            k_cache, v_cache = kv                                                      # (B, K, L, D)
            if write_at is None:
                k_cache[:, :, -S:], v_cache[:, :, -S:] = k, v
            elif write_at.dim() == 1:                                                  # the same slots per row
                k_cache.index_copy_(2, write_at, k)
                v_cache.index_copy_(2, write_at, v)
            else:                                                                      # (B, S): its own per row
                at = write_at[:, None, :, None].expand(B, K, S, D)
                k_cache.scatter_(2, at, k)
                v_cache.scatter_(2, at, v)
            k, v = k_cache, v_cache
        # GQA: kv head j serves query heads j*H/K .. (j+1)*H/K - 1; scale 1/sqrt(D). Without padding no mask is
        # built, as in the reference: the same SDPA call, bit-identical results (and flash kernels on GPUs)
        if write_at is not None and S == 1:
            # static decode: kv head j's H/K query heads are H/K query rows against its keys, so no backend has to
            # expand K/V to H heads (the masked GQA call falls back to the math kernel, which copies them)
            y = F.scaled_dot_product_attention(q.reshape(B, K, H // K, D), k, v, attn_mask=mask)  # (B, K, H/K, D)
            y = y.reshape(B, H, 1, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and S > 1,
                                               enable_gqa=True)                        # (B, H, S, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))                        # (B, S, dim)


class MLP(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)                 # (B, S, hidden_dim) each; gate rows first
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_self_attn_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.post_mlp_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor, Tensor], mask: Tensor | None,
                kv: tuple[Tensor, Tensor] | None = None, write_at: Tensor | None = None) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), rope, mask, kv, write_at)
        x = x + self.post_self_attn_layernorm(h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + self.post_mlp_layernorm(h)                            # (B, S, dim)


class Decoder(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, ids: Tensor, pos: Tensor | None, mask: Tensor | None = None, cache: KVCache | None = None,
                start: int = 0, rope: tuple[Tensor, Tensor] | None = None,
                write_at: Tensor | None = None) -> Tensor:
        """ids (B, S) at cache slots [start, start+S), pos (3, B, S) or its precomputed rope (cos, sin (B, S, R)),
        mask (B, 1, S, start+S) bool or None (causal) -> hidden (B, S, dim). With write_at (S,) slot ids (or
        (B, S) per row) the cache is used at its full static length (for torch.compile) and mask covers all of it."""
        assert mask is not None or start == 0 or ids.shape[1] == 1, "a causal chunk after slot 0 needs a mask"
        x = self.embed_tokens(ids)                                       # (B, S, dim)
        cos, sin = mrope_cos_sin(self.cfg, pos, x.dtype) if rope is None else rope  # (B, S, R)
        tables = rope_tables(cos, sin, self.cfg.head_dim)                # built once, used by every layer
        end = start + ids.shape[1]
        for i, layer in enumerate(self.layers):
            if cache is None:
                kv = None
            elif write_at is None:
                kv = (cache.k[i][:, :, :end], cache.v[i][:, :, :end])  # views
            else:
                kv = (cache.k[i], cache.v[i])
            x = layer(x, tables, mask, kv, write_at)
        return self.norm(x)


class ARModel(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vision_vocab_size, bias=False)

    def forward(self, ids: Tensor, pos: Tensor, mask: Tensor | None = None, cache: KVCache | None = None,
                start: int = 0) -> Tensor:
        return self.lm_head(self.decoder(ids, pos, mask, cache, start))  # (B, S, V)

    def fuse(self) -> "ARModel":
        """Inference layout (fused QKV GEMMs; gate_up is fused in the checkpoint already). Call after loading."""
        for layer in self.decoder.layers:
            layer.self_attn.fuse_qkv()
        return self


# checkpoint prefix (official vision_language_encoder keys) -> our prefix
AR_KEY_PREFIXES = {"model.language_model.": "decoder.", "lm_head.": "lm_head."}


# ----------------------------------------------------------------------------------------------------------
# Positions (3-axis mRoPE): text is sequential; an image grid with base p is (p, p+row, p+col) and uses max(h, w)
# positions. A reference image's BOI is p-1 and its EOI p+max(h, w). Generated grids follow in generation order.

def grid_positions(start: int, h: int, w: int) -> Tensor:
    """(3, h*w) positions (start, start+row, start+col) of an h x w grid in row-major order."""
    row = torch.arange(h).repeat_interleave(w)
    col = torch.arange(w).repeat(h)
    return torch.stack([torch.full((h * w,), start), start + row, start + col])


def sample_positions(cfg: ARConfig, ids: list[int], ref_grids: list[tuple[int, int]],
                     target_grids: list[tuple[int, int]]) -> Tensor:
    """Positions (3, len(ids) + N) of one unpadded prompt followed by its N generated grid tokens."""
    chunks, p, i, n_ref = [], 0, 0, 0
    while i < len(ids):
        if ids[i] == cfg.boi_id and n_ref < len(ref_grids) and i + 1 < len(ids):  # a reference image
            h, w = ref_grids[n_ref]
            end = i + 1 + h * w
            if end >= len(ids) or ids[end] != cfg.eoi_id:
                raise ValueError(f"reference image {n_ref}: expected BOI, {h}x{w} ids, EOI at token {i}")
            chunks += [torch.tensor([[p]] * 3), grid_positions(p + 1, h, w)]
            p, i, n_ref = p + 1 + max(h, w), end, n_ref + 1  # the EOI is the next text token, at p
            continue
        chunks.append(torch.tensor([[p]] * 3))
        p, i = p + 1, i + 1
    if n_ref != len(ref_grids):
        raise ValueError(f"found {n_ref} reference images (BOI ... EOI) in the prompt, expected {len(ref_grids)}")
    for h, w in target_grids:                                           # generation order: preview, then large
        chunks.append(grid_positions(p, h, w))
        p += max(h, w)
    return torch.cat(chunks, dim=1)


def build_positions(cfg: ARConfig, input_ids: Tensor, attention_mask: Tensor | None,
                    ref_grids: list[tuple[int, int]], target_grids: list[tuple[int, int]]) -> Tensor:
    """(3, B, S + N) positions of a left-padded batch and its generated tokens; pads get 1 (as the reference)."""
    B, S = input_ids.shape
    n = sum(h * w for h, w in target_grids)
    ids = input_ids.tolist()                                            # one host copy per request
    valid = [[True] * S] * B if attention_mask is None else attention_mask.bool().tolist()
    pos = torch.ones(3, B, S + n, dtype=torch.long)
    for b in range(B):
        keep = [j for j in range(S) if valid[b][j]] + list(range(S, S + n))
        pos[:, b, keep] = sample_positions(cfg, [ids[b][j] for j in keep[:len(keep) - n]], ref_grids, target_grids)
    return pos.to(input_ids.device)


# ----------------------------------------------------------------------------------------------------------
# Sampling: temperature -> top-k -> top-p (keeping the boundary token) -> inverse-CDF with a pre-drawn uniform

def sample_token(logits: Tensor, u: Tensor, n_codes: int, temperature: float, top_k: int | None,
                 top_p: float | None) -> Tensor:
    """logits (B, V), u (B,) uniforms in [0, 1) -> token ids (B,), always < n_codes. No host sync."""
    logits = logits[:, :n_codes].float()                                # BOI/EOI/unused are never candidates
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k < n_codes:                                       # top-k first: k values to sort, not V
        logits, idx = torch.topk(logits, top_k, dim=-1)                 # (B, k) descending (exact ties at the
    else:                                                               # k-th value are cut; HF keeps them)
        logits, idx = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = torch.softmax(logits, dim=-1)                               # renormalised over the kept tokens
    if top_p is not None and top_p < 1.0:                               # keep while the mass before it is < top_p
        keep = probs.cumsum(dim=-1) - probs < top_p
        keep[:, 0] = True                                               # and always the most likely token
        probs = torch.where(keep, probs, 0.0)
    cdf = probs.cumsum(dim=-1)                                          # (B, n_codes), flat after the last kept
    j = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # (B, 1)
    j = torch.minimum(j, (probs > 0).sum(dim=-1, keepdim=True) - 1)     # rounding at u ~ 1 stays on a kept token
    return idx.gather(1, j)[:, 0]


def guide(logits: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on the AR's logits. Rows [0, B) are the prompts, rows [B, 2B) the same prompts
    without their text (the unconditional branch): (2B, ..., V) -> (2B, ..., V) float, both halves holding
    uncond + scale * (cond - uncond), so that with the same uniforms both halves sample the same token and stay one
    sequence each. scale 1: the logits unchanged (no unconditional rows)."""
    if scale == 1:
        return logits
    cond, uncond = logits.float().chunk(2)                              # (B, ..., V) each
    mix = uncond + scale * (cond - uncond)
    return torch.cat([mix, mix])


def check_ar_guidance(scale) -> float:
    """User input: the AR's guidance scale, a number >= 0 (1 = off, the reference's sampling)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < math.inf:
        raise ValueError(f"ar_guidance must be a number >= 0 (1 = off; > 1 pushes the AR's tokens toward the "
                         f"prompt's text), got {scale!r}")
    return float(scale)


# ----------------------------------------------------------------------------------------------------------
# Generation

class Request:
    """Everything one generation needs beyond the weights: positions, padding mask, KV cache. Built once."""

    def __init__(self, model: ARModel, input_ids: Tensor, ref_grids: list[tuple[int, int]],
                 target_grids: list[tuple[int, int]], attention_mask: Tensor | None = None, bucket: int = 1,
                 slack: int = 0):
        """bucket: the cache, rope tables and masks hold T (+ slack) rounded up to a multiple of it (the slots past
        T are never attended by a kept token): compiled decode code, specialised to shapes, then serves prompts of
        other lengths. slack: slots a speculative forward may write past the last token (`SpeculativeDecode`)."""
        cfg, weight = model.cfg, model.lm_head.weight
        B, S = input_ids.shape
        if attention_mask is not None and not attention_mask[:, -1].bool().all():
            raise ValueError("only left padding is supported: every prompt must end at the last column")
        self.prompt_len, self.n_new = S, sum(h * w for h, w in target_grids)
        T = S + self.n_new
        L = T + slack + -(T + slack) % bucket                           # slots held
        self.pos = build_positions(cfg, input_ids, attention_mask, ref_grids, target_grids)  # (3, B, T)
        self.key_valid = None                                           # (B, L) bool, only for padded batches
        if attention_mask is not None and not attention_mask.bool().all():
            self.key_valid = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
            self.key_valid[:, :S] = attention_mask.bool()
        self.cache = KVCache(cfg, B, L, weight.device, weight.dtype)
        cos, sin = mrope_cos_sin(cfg, self.pos, weight.dtype)          # (B, T, R) each: once per request
        self.rope = (F.pad(cos, (0, 0, 0, L - T)), F.pad(sin, (0, 0, 0, L - T)))   # (B, L, R)

    def prefill_mask(self) -> Tensor | None:
        """(B, 1, S, S): causal over valid keys, and a pad row sees itself so it stays finite. None: causal."""
        if self.key_valid is None:
            return None
        S = self.prompt_len
        i = torch.arange(S, device=self.key_valid.device)
        causal = (i[None, :] <= i[:, None]) & self.key_valid[:, None, :S]            # (B, S, S)
        return (causal | torch.eye(S, dtype=torch.bool, device=causal.device))[:, None]

    def decode_mask(self, t: int) -> Tensor | None:
        """(B, 1, 1, t+1) for the token at slot t (it sees slots 0..t). None: no padding, every slot is valid."""
        return None if self.key_valid is None else self.key_valid[:, None, None, :t + 1]


def prefill(model: ARModel, req: Request, input_ids: Tensor) -> Tensor:
    """Run the prompt through the model, filling the cache. Returns the next-token logits (B, V)."""
    S = req.prompt_len
    rope = (req.rope[0][:, :S], req.rope[1][:, :S])
    h = model.decoder(input_ids, None, req.prefill_mask(), req.cache, start=0, rope=rope)
    return model.lm_head(h[:, -1])


def decode_step(model: ARModel, req: Request, token: Tensor, step: int) -> Tensor:
    """Feed generated token number `step` (B,); returns the logits (B, V) for the next one."""
    t = req.prompt_len + step
    rope = (req.rope[0][:, t:t + 1], req.rope[1][:, t:t + 1])
    h = model.decoder(token[:, None], None, req.decode_mask(t), req.cache, start=t, rope=rope)
    return model.lm_head(h[:, -1])


class StaticDecode:
    """The decode loop's body on fixed buffers, for torch.compile and CUDA graphs. `step()` feeds generated token
    i (read from out[:, i]; i lives in a device tensor), writes its K/V at its cache slot, attends over the whole
    static-length cache under a mask, samples token i+1 into out[:, i+1] and advances i: device work only, the
    same shapes every call, so one call (or one graph replay) per token and no host sync."""

    def __init__(self, model: ARModel, req: Request, u: Tensor, out: Tensor, temperature: float,
                 top_k: int | None, top_p: float | None, guidance: float = 1.0):
        B, L, dev = out.shape[0], req.cache.k[0].shape[2], out.device
        self.model, self.req, self.u, self.out = model, req, u, out
        self.sampling, self.guidance = (temperature, top_k, top_p), guidance
        self.i = torch.zeros(1, dtype=torch.long, device=dev)           # (1,) index of the token being fed
        self.start = torch.tensor([req.prompt_len], device=dev)           # (1,) a tensor: no code per prompt length
        self.slots = torch.arange(L, device=dev)                          # (L,)
        self.valid = torch.ones(B, L, dtype=torch.bool, device=dev) if req.key_valid is None else req.key_valid

    def step(self) -> None:
        t = self.i + self.start                                           # (1,) the fed token's cache slot
        token = self.out.index_select(1, self.i)                          # (B, 1)
        rope = (self.req.rope[0].index_select(1, t), self.req.rope[1].index_select(1, t))  # (B, 1, R) each
        mask = (self.valid & (self.slots <= t))[:, None, None, :]          # (B, 1, 1, L)
        h = self.model.decoder(token, None, mask, self.req.cache, rope=rope, write_at=t)  # (B, 1, dim)
        logits = guide(self.model.lm_head(h[:, -1]), self.guidance)       # (B, V)
        u = self.u.index_select(1, self.i + 1)[:, 0]                      # (B,)
        nxt = sample_token(logits, u, self.model.cfg.boi_id, *self.sampling)
        self.out.index_copy_(1, self.i + 1, nxt[:, None])
        self.i.add_(1)


class SpeculativeDecode(StaticDecode):
    """Speculative decoding against a draft: token p is guessed as draft[:, p] (e.g. the preview grid upsampled
    where the large grid is generated) or, where lag[p] > 0, as the kept token lag[p] before it (the token above,
    in a grid with no other guess: lag = its width, known while k <= it). Each row b has its own i[b], the token it
    feeds next. `verify()` feeds token i and the k guesses of tokens i+1..i+k in one forward (cache slots t..t+k),
    samples tokens i+1..i+k+1 from its k+1 logits, each with the token's own pre-drawn uniform, keeps the leading
    run of samples that equal the guesses plus the first one after it, and advances i by that count, row by row,
    on the device (no host sync). A row that has all n tokens stays at i = n-1.

    A kept token is sampled from the logits of the true prefix with the same uniform that decoding token by token
    gives it, so the tokens are exactly those of plain decoding (up to the rounding of a k+1-token forward),
    whatever the draft; a good draft only makes it faster: each forward reads the weights once for up to k+1
    tokens per row. out, u, draft and the cache hold k+1 slots of slack past the last token (written, never kept)."""

    def __init__(self, model: ARModel, req: Request, u: Tensor, out: Tensor, draft: Tensor, lag: Tensor, k: int,
                 temperature: float, top_k: int | None, top_p: float | None, guidance: float = 1.0):
        super().__init__(model, req, u, out, temperature, top_k, top_p, guidance)
        self.draft, self.lag, self.k = draft, lag, k                      # (B, N + k+1), (N + k+1,), int
        self.i = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)  # (B,) per row
        self.offsets = torch.arange(k + 1, device=out.device)            # (k+1,)

    def verify(self) -> None:
        (B, R), k, last = self.req.rope[0].shape[::2], self.k, self.req.n_new - 1
        fed_at = self.i[:, None] + self.offsets                            # (B, k+1) tokens fed: i..i+k
        t = fed_at + self.start                                            # (B, k+1) their cache slots
        p = fed_at[:, 1:]                                                  # (B, k) the guessed tokens
        lag = self.lag[p]                                                  # (B, k)
        guess = torch.where(lag > 0, self.out.gather(1, p - lag), self.draft.gather(1, p))  # (B, k)
        fed = torch.cat([self.out.gather(1, fed_at[:, :1]), guess], dim=1)  # (B, k+1)
        idx = t[..., None].expand(B, k + 1, R)
        rope = (self.req.rope[0].gather(1, idx), self.req.rope[1].gather(1, idx))  # (B, k+1, R) each
        mask = (self.valid[:, None, :] & (self.slots <= t[..., None]))[:, None]  # (B, 1, k+1, L)
        h = self.model.decoder(fed, None, mask, self.req.cache, rope=rope, write_at=t)  # (B, k+1, dim)
        logits = guide(self.model.lm_head(h), self.guidance)              # (B, k+1, V)
        u = self.u.gather(1, fed_at + 1)                                   # (B, k+1)
        x = sample_token(logits.flatten(0, 1), u.flatten(), self.model.cfg.boi_id, *self.sampling)
        x = x.view(B, k + 1)                                               # samples of tokens i+1..i+k+1
        run = (x[:, :k] == guess).long().cumprod(dim=1).sum(dim=1)         # (B,) guesses confirmed in a row
        self.out.scatter_(1, fed_at + 1, x)                                # those past the kept ones: rewritten
        self.i.copy_(torch.clamp(self.i + run + 1, max=last))              # kept: 1..k+1 tokens per row


def check_speculate(k) -> None:
    """User input: speculate must be an int >= 0 (0: plain decoding)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"speculate must be an int >= 0 (guessed tokens verified per AR forward; 0 = off), got {k!r}")


def nearest_grid(src: Tensor, h: int, w: int) -> Tensor:
    """(B, hs, ws) ids -> (B, h, w), nearest neighbour: the preview grid as a guess of the large one."""
    rows = torch.arange(h, device=src.device) * src.shape[1] // h
    cols = torch.arange(w, device=src.device) * src.shape[2] // w
    return src[:, rows][:, :, cols]


def reference_ids(cfg: ARConfig, input_ids: Tensor, ref_grids: list[tuple[int, int]]) -> Tensor:
    """(B, h, w) ids of the last reference image of each prompt (its BOI is the len(ref_grids)-th BOI)."""
    h, w = ref_grids[-1]
    rows = []
    for row in input_ids:
        boi = (row == cfg.boi_id).nonzero()[:, 0]
        start = int(boi[len(ref_grids) - 1]) + 1
        rows.append(row[start:start + h * w].view(h, w))
    return torch.stack(rows)


DECODE_BUCKET = 128     # compile: the static cache holds prompt + new tokens rounded up to this (one code per bucket)
_frozen: "weakref.WeakKeyDictionary[ARModel, dict[str, Callable]]" = weakref.WeakKeyDictionary()
_shared: dict[tuple[str, str], Callable] = {}

# Inductor settings for the decode step on a CPU, measured on the medium preset (2-core Sapphire Rapids, ms per token,
# eager -> compiled, interleaved in one process): plain compile fp32 47 -> 39 (Python launches ~300 kernels a step);
# `cpp_wrapper` (launched from C++) fp32 46 -> 32; + `freezing` and `max_autotune` (weights become constants, packed
# once for inductor's own AVX-512/AMX GEMV kernels) fp32 44 -> 28, bf16 47 -> 17 (eager bf16 GEMVs run at 6 GB/s).
# Freezing keeps a packed copy of the linear weights beside the module's (more memory) and bakes them in, hence one
# compiled step per model object.
CPU_COMPILE_OPTIONS = {"cpp_wrapper": True, "freezing": True, "max_autotune": True,
                       "max_autotune_gemm_backends": "CPP,ATEN", "autotune_num_choices_displayed": 0,
                       "max_autotune_report_choices_stats": False}
# Without freezing the weights stay inputs of the compiled code: one compiled step serves every model object of the
# same shapes and dtype (offload reads the AR from disk again for each image) and no packed copy is held.
CPU_SHARED_OPTIONS = {"cpp_wrapper": True}


def cpu_compile(fn: Callable, options: dict) -> Callable:
    """torch.compile(fn) for a CPU with inductor `options` patched around every call, not passed as
    torch.compile(options=...): inductor reads `freezing` outside those options (measured: with options= the weights
    were not frozen), and a recompile (new shapes) needs them too. With freezing the weights of the modules `fn`
    uses are baked into the compiled code: one compiled function per model object."""
    compiled = torch.compile(fn, dynamic=False)

    def call(*args, **kwargs):
        with torch._inductor.config.patch(options):
            return compiled(*args, **kwargs)
    return call


def compiled_step(static: StaticDecode, freeze: bool = True, method: str = "step"):
    """torch.compile'd `static.<method>` (StaticDecode.step, or SpeculativeDecode.verify; recompiles only on new
    shapes). freeze (CPU only): weights frozen in, one compiled function per model object; otherwise one shared
    by every model object."""
    device, fn = static.out.device.type, getattr(type(static), method)
    if device == "cpu" and freeze:
        compiled = _frozen.setdefault(static.model, {})
        if method not in compiled:
            compiled[method] = cpu_compile(fn, CPU_COMPILE_OPTIONS)
        fn = compiled[method]
    else:
        if (device, method) not in _shared:
            _shared[device, method] = (cpu_compile(fn, CPU_SHARED_OPTIONS) if device == "cpu"
                                       else torch.compile(fn, dynamic=False))
        fn = _shared[device, method]
    return lambda: fn(static)


def capture_graph(fn: Callable[[], None]) -> Callable[[], None]:
    """Capture `fn` (device work only) into a CUDA graph and return its replay. `fn` runs once first, eagerly on a
    side stream (lazy initialisations cannot happen inside a capture); the caller resets whatever that run
    advanced. One replay launches the whole decode step: ~900 kernels for the official AR, a launch each in
    eager mode, which otherwise leaves the GPU waiting on Python."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def sync(device: torch.device) -> None:
    """Wait for the device (timings only); torch.accelerator raises on a CPU."""
    if device.type != "cpu":
        torch.accelerator.synchronize()


@torch.inference_mode()
def generate_prior(model: ARModel, input_ids: Tensor, ref_grids: list[tuple[int, int]],
                   target_grids: list[tuple[int, int]], *, temperature: float = 0.9, top_k: int | None = 50,
                   top_p: float | None = 0.75, seed: int | list[int] | None = None,
                   attention_mask: Tensor | None = None, compile: bool = False, freeze: bool = True,
                   cuda_graph: bool = False, speculate: int = 0, guidance: float = 1.0,
                   on_grid: Callable[[int, Tensor], None] | None = None,
                   timings: dict | None = None) -> list[Tensor]:
    """Sample one (B, h, w) grid of VQ ids per target grid, in generation order (t2i: [preview, large]; i2i: [large]).

    input_ids (B, S): the full prompt, ending with BOI, reference VQ ids already in place (left-padded batches:
    pass attention_mask). ref_grids: (h, w) of each reference image in the prompt, in order.
    seed: a CPU generator draws one uniform per generated token up front, so a seed gives the same tokens on any
    device (up to logit rounding); a list gives row b its own generator (seed[b]: row b then samples what it would
    alone with that seed); None draws from torch's global CPU generator. temperature=0 is greedy.
    compile: run the decode step through torch.compile (static shapes: the whole cache with a mask, its length
    rounded up to DECODE_BUCKET so that prompts of other lengths reuse the compiled step). freeze (CPU):
    weights frozen into it (faster, a packed copy held per model object) or left as inputs (one compiled step for
    every model object of these shapes: an AR read from disk again reuses it).
    cuda_graph: run the decode step on static buffers (`StaticDecode`), captured as one CUDA graph replayed per
    token on a CUDA device (elsewhere the same step runs eagerly: the work the graph holds, testable anywhere).
    speculate: k > 0 verifies k drafted tokens per forward (`SpeculativeDecode`) in every grid that has a draft: a
    grid after the first is drafted by the grid before it (t2i: the preview, upsampled, drafts the large grid), the
    first grid of an edit by the last reference image (resized): the same tokens, fewer forwards when the draft is
    often right; in a batch each row advances by its own count. Each forward is one host sync (to know how far the
    slowest row got).
    guidance != 1: classifier-free guidance on the logits (`guide`): rows [B/2, B) of input_ids are the
    unconditional prompts of rows [0, B/2) (the same layout without the text); seeds, on_grid and the returned
    grids are the first half's (B/2 rows), and each unconditional row decodes its own row's tokens.
    on_grid(k, grid (B, h, w)) runs as soon as target grid k is complete (t2i: the preview, before the large grid).
    timings, if a dict, gets ar_prefill, ar_decode (seconds), ar_new_tokens, ar_decode_tokens_per_s and
    ar_decode_forwards (one per token without speculate).
    """
    check_speculate(speculate)
    B, device = input_ids.shape[0], input_ids.device
    guidance = check_ar_guidance(guidance)
    n_out = B if guidance == 1 else B // 2                              # rows that are images
    if guidance != 1 and B % 2:
        raise ValueError(f"guidance needs B conditional rows then their B unconditional ones, got {B} rows")
    t0 = time.perf_counter()
    slack = speculate + 1 if speculate else 0                           # a finished row's forward writes past n
    req = Request(model, input_ids, ref_grids, target_grids, attention_mask, DECODE_BUCKET if compile else 1,
                  slack=slack)
    if isinstance(seed, (list, tuple)):
        if len(seed) != n_out:
            raise ValueError(f"seed: need one per prompt ({n_out}), got {len(seed)}")
        u = torch.cat([torch.rand(1, req.n_new, generator=torch.Generator().manual_seed(s)) for s in seed])
    else:
        u = torch.rand(n_out, req.n_new, generator=None if seed is None else torch.Generator().manual_seed(seed))
    u = u.repeat(B // n_out, 1)                                         # an unconditional row: its image's draws
    u = F.pad(u, (0, slack)).to(device)                                 # (B, N + slack), row b = sample b's draws
    out = torch.zeros(B, req.n_new + slack, dtype=torch.long, device=device)
    ends = [sum(h * w for h, w in target_grids[:k + 1]) for k in range(len(target_grids))]
    logits = prefill(model, req, input_ids)
    out[:, 0] = sample_token(guide(logits, guidance), u[:, 0], model.cfg.boi_id, temperature, top_k, top_p)
    if timings is not None:
        sync(device)
        t1 = time.perf_counter()
    sampling = (temperature, top_k, top_p)
    step = None
    if speculate:       # every grid goes through verify (one compiled function / graph)
        draft = torch.zeros_like(out)                                   # (B, N + slack), filled grid by grid
        lag = torch.zeros(out.shape[1], dtype=torch.long)              # (N + slack,) 0: read draft
        for g, (h, w) in enumerate(target_grids):                       # no other guess: the token above
            if g == 0 and not ref_grids and speculate <= w:
                lag[ends[g] - h * w + w:ends[g]] = w
        static = SpeculativeDecode(model, req, u, out, draft, lag.to(device), speculate, *sampling, guidance)
        step = compiled_step(static, freeze, "verify") if compile else static.verify
    elif compile or cuda_graph:
        static = StaticDecode(model, req, u, out, *sampling, guidance)
        step = compiled_step(static, freeze) if compile else static.step
    if cuda_graph and device.type == "cuda" and req.n_new > 1:
        # the warm-up run fed token 0 and wrote from token 1 on; rewind i (the replays rewrite the same slots)
        step = capture_graph(step)
        static.i.zero_()
    n, forwards = 1, 0                                                  # tokens written, decode forwards
    for g, (h, w) in enumerate(target_grids):
        start, end = ends[g] - h * w, ends[g]
        if speculate and (g > 0 or ref_grids) and n < end:                # the guesses for this grid
            if g > 0:                                                   # the grid before it (t2i: the preview)
                hs, ws = target_grids[g - 1]
                src = out[:, start - hs * ws:start].view(B, hs, ws)
            else:                                                       # an edit's: its (last) reference
                src = reference_ids(model.cfg, input_ids, ref_grids)
            draft[:, start:end] = nearest_grid(src, h, w).flatten(1)
        while n < end:                                                  # feeds token n-1, writes token n (on)
            if speculate:
                step()
                n = int(static.i.min()) + 1                             # the host sync of a speculative forward
            elif step is not None:
                step()
                n += 1
            else:
                logits = decode_step(model, req, out[:, n - 1], n - 1)
                out[:, n] = sample_token(guide(logits, guidance), u[:, n], model.cfg.boi_id, *sampling)
                n += 1
            forwards += 1
        if on_grid is not None:
            on_grid(g, out[:n_out, start:end].view(n_out, h, w))
    grids = [out[:n_out, e - h * w:e].view(n_out, h, w) for e, (h, w) in zip(ends, target_grids)]
    if timings is not None:
        sync(device)
        t2 = time.perf_counter()
        timings.update(ar_prefill=t1 - t0, ar_decode=t2 - t1, ar_new_tokens=req.n_new,
                       ar_decode_tokens_per_s=(req.n_new - 1) / max(t2 - t1, 1e-9), ar_decode_forwards=forwards)
    return grids


# ----------------------------------------------------------------------------------------------------------
# Presets ("debug" matches glmimage.random_checkpoint's debug preset; "glm-image" is zai-org/GLM-Image)

PRESETS: dict[str, ARConfig] = {
    "debug": ARConfig(vocab_size=516, vision_vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=32, hidden_dim=192, rotary_dim=16, mrope_section=[2, 3, 3], boi_id=128, eoi_id=129,
                      image_token_id=515, pad_id=512),
    "glm-image": ARConfig(),
}
