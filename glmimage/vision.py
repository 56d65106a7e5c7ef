"""GLM-Image image tokenizer: a ViT + a cosine VQ codebook that turn a reference image into AR ids (i2i only).

  preprocess(PIL) -> pixels (3, H, W) in [-1, 1], H and W multiples of 16 (the clamped image, halved)
  ImageTokenizer.encode([pixels]) -> [ids (h, w)], h = H/16, w = W/16, ids in [0, n_codes)

The ViT is a plain pre-LN transformer (no rope, no final norm) with a learned absolute position table that is
bilinearly resampled to each image's grid. The VQ is a 1x1 conv and a nearest neighbour on the unit sphere.
The features never reach the AR as embeddings: only the ids do.

Legend: N patches (h*w), C ViT width, E codebook dim, P position-table side (image_size / patch_size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn


@dataclass
class VisionConfig:
    dim: int = 1536            # ViT width (= VQ latent channels)
    depth: int = 40
    n_heads: int = 16
    hidden_dim: int = 6144     # MLP width
    patch_size: int = 16
    image_size: int = 2048     # the position table covers (image_size / patch_size)^2 positions
    in_channels: int = 3
    norm_eps: float = 1e-6
    vq_dim: int = 2048         # codebook vector size (quant_conv output)
    n_codes: int = 16384

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}")

    @classmethod
    def from_hf(cls, d: dict) -> VisionConfig:
        """From the official `vision_language_encoder/config.json` (its vision_config and vq_config)."""
        v, q = d["vision_config"], d.get("vq_config") or {}
        if q.get("latent_channels", v["hidden_size"]) != v["hidden_size"]:
            raise ValueError("vq_config.latent_channels must equal vision_config.hidden_size")
        if v.get("spatial_merge_size", 1) != 1:
            raise ValueError("only spatial_merge_size=1 is supported (as in GLM-Image)")
        return cls(dim=v["hidden_size"], depth=v["depth"], n_heads=v["num_heads"], hidden_dim=v["intermediate_size"],
                   patch_size=v["patch_size"], image_size=v["image_size"], in_channels=v.get("in_channels", 3),
                   norm_eps=v.get("layer_norm_eps", 1e-6), vq_dim=q.get("embed_dim", 2048),
                   n_codes=q.get("num_embeddings", 16384))

    @classmethod
    def from_name(cls, name: str) -> VisionConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown vision preset {name!r}; valid: {sorted(PRESETS)}")
        return replace(PRESETS[name])


# ----------------------------------------------------------------------------------------------------------
# Preprocessing, as the reference's PIL image processor (transformers uses it when torchvision is absent;
# the torchvision backend resizes differently, so ids can differ between the two reference backends)

def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Resized (H, W): short side >= sqrt(min_pixels), long side <= sqrt(max_pixels), then *halved*, then
    rounded to multiples of `factor`. So the patch grid is the clamped image at 1/32 resolution."""
    if height < factor or width < factor:
        raise ValueError(f"image {height}x{width} is smaller than {factor} pixels on a side")
    if max(height, width) / min(height, width) > 4:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.2f} is above 4")
    shortest, longest = int(round(math.sqrt(min_pixels))), int(round(math.sqrt(max_pixels)))
    scale = 1.0
    if min(height, width) < shortest:
        scale = shortest / min(height, width)
    if max(height, width) * scale > longest:
        scale = longest / max(height, width)
    height, width = height // 2, width // 2
    h = max(factor, int(round(height * scale / factor)) * factor)
    w = max(factor, int(round(width * scale / factor)) * factor)
    if max(h, w) > longest:
        beta = max(h, w) / longest
        h = max(factor, int(math.floor(h / beta / factor)) * factor)
        w = max(factor, int(math.floor(w / beta / factor)) * factor)
    return h, w


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (as the reference)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, min_pixels: int, max_pixels: int, patch_size: int = 16) -> Tensor:
    """PIL image -> pixels (3, H, W) fp32 in [-1, 1]: smart_resize, PIL bicubic on uint8, /255, (x-0.5)/0.5."""
    image = to_rgb(image)
    h, w = smart_resize(image.height, image.width, patch_size, min_pixels, max_pixels)
    x = np.asarray(image.resize((w, h), resample=Image.Resampling.BICUBIC))     # (H, W, 3) uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)                   # same rounding as the reference
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))         # (3, H, W)


# ----------------------------------------------------------------------------------------------------------
# ViT

class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: Tensor) -> Tensor:
        c, H, W = pixels.shape
        h, w = H // self.p, W // self.p
        # cut into row-major patches and run the conv on each (the reference's layout: same sums, same order)
        patches = pixels.view(c, h, self.p, w, self.p).permute(1, 3, 0, 2, 4).reshape(h * w, c, self.p, self.p)
        return self.proj(patches.to(self.proj.weight.dtype)).flatten(1)          # (N, C)


class PositionEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.side = cfg.image_size // cfg.patch_size
        self.position_embedding = nn.Embedding(self.side ** 2, cfg.dim)

    def forward(self, h: int, w: int) -> Tensor:
        """The P x P table bilinearly resampled (align_corners=False, border) at the centres of an h x w grid."""
        weight = self.position_embedding.weight
        table = weight.view(self.side, self.side, -1).permute(2, 0, 1)[None].float()   # (1, C, P, P)
        rows = torch.arange(h, device=weight.device).repeat_interleave(w)              # (N,)
        cols = torch.arange(w, device=weight.device).repeat(h)
        # divide by full tensors (as the reference): a scalar divisor may become a reciprocal multiply on GPUs
        gx = ((cols + 0.5) / torch.full((h * w,), float(w), device=weight.device)) * 2 - 1  # x = column, [-1, 1]
        gy = ((rows + 0.5) / torch.full((h * w,), float(h), device=weight.device)) * 2 - 1
        grid = torch.stack([gx, gy], dim=-1)[None, :, None, :]                         # (1, N, 1, 2)
        out = F.grid_sample(table, grid, mode="bilinear", align_corners=False, padding_mode="border")
        return out[0, :, :, 0].T.to(weight.dtype)                                      # (N, C)


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=True)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        N, C = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.n_heads, -1).permute(1, 2, 0, 3)[:, None].unbind(0)  # (1, heads, N, d)
        y = F.scaled_dot_product_attention(q, k, v)                     # bidirectional, scale d^-0.5, no rope
        return self.proj(y[0].transpose(0, 1).reshape(N, C))             # (N, C)


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))                            # exact (erf) GELU


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.embeddings = PositionEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))

    def forward(self, pixels: Tensor) -> Tensor:
        """One image (3, H, W) -> features (N, C), row-major over the (H/16, W/16) grid."""
        h, w = pixels.shape[1] // self.patch_embed.p, pixels.shape[2] // self.patch_embed.p
        x = self.patch_embed(pixels) + self.embeddings(h, w)             # (N, C)
        for block in self.blocks:
            x = block(x)
        return x


# ----------------------------------------------------------------------------------------------------------
# VQ

class Codebook(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.n_codes, cfg.vq_dim)


class VQ(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.quant_conv = nn.Conv2d(cfg.dim, cfg.vq_dim, 1)
        self.quantize = Codebook(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.vq_dim, cfg.dim, 1)         # in the checkpoint; unused for encoding

    def forward(self, feats: Tensor) -> Tensor:
        """feats (C, h, w) -> ids (h, w): cosine nearest neighbour, as argmin |z|^2 + |e|^2 - 2 z.e of unit vectors."""
        _, h, w = feats.shape
        z = self.quant_conv(feats[None])[0].permute(1, 2, 0).reshape(h * w, -1)  # (N, E)
        z = F.normalize(z, p=2, dim=-1)
        e = F.normalize(self.quantize.embedding.weight, p=2, dim=-1)             # (n_codes, E)
        # the reference's expanded distance (not just argmax z.e): same rounding, so the same ids on near-ties
        d = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * z @ e.T      # (N, n_codes)
        return d.argmin(dim=-1).view(h, w)


class ImageTokenizer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vit = ViT(cfg)
        self.vq = VQ(cfg)

    @torch.inference_mode()
    def encode(self, pixels: list[Tensor]) -> list[Tensor]:
        """Images (3, H, W) in [-1, 1] (see preprocess) -> VQ ids (H/16, W/16) each, on the weights' device."""
        out = []
        device = self.vq.quant_conv.weight.device
        for px in pixels:
            h, w = px.shape[1] // self.cfg.patch_size, px.shape[2] // self.cfg.patch_size
            feats = self.vit(px.to(device))                              # (N, C), the ViT runs once per image
            out.append(self.vq(feats.T.reshape(-1, h, w)))               # (h, w)
        return out


# checkpoint prefix (official vision_language_encoder keys) -> our prefix
VISION_KEY_PREFIXES = {"model.visual.": "vit.", "model.vqmodel.": "vq."}

# ----------------------------------------------------------------------------------------------------------
# Presets ("debug" matches glmimage.random_checkpoint's debug preset; "glm-image" is zai-org/GLM-Image)

PRESETS: dict[str, VisionConfig] = {
    "debug": VisionConfig(dim=32, depth=2, n_heads=2, hidden_dim=64, image_size=256, vq_dim=24, n_codes=128),
    "glm-image": VisionConfig(),
}
