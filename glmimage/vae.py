"""The VAE: diffusers' AutoencoderKL (16 latent channels, 8x down) with GLM-Image's per-channel latent statistics.

GLM-Image normalises latents per channel, `z = (mode(q(z|x)) - mean) / std`, and decodes `x * std + mean`;
the config's `scaling_factor` is never used. Decoding above `tile_pixels` runs in overlapping tiles (diffusers'
tiled decode), so memory stays bounded at any resolution.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class VAE:
    def __init__(self, model, mean: list[float], std: list[float]):
        self.model = model                                            # diffusers AutoencoderKL
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = 2 ** (len(model.config.block_out_channels) - 1)  # 8 for the official VAE
        self.tile_pixels = 1024 * 1024                                # decode tiled above this many pixels

    @classmethod
    def from_folder(cls, folder: Path, device, dtype) -> "VAE":
        from diffusers import AutoencoderKL
        # low_cpu_mem_usage needs accelerate (diffusers warns when it defaults to it without accelerate installed)
        lazy = importlib.util.find_spec("accelerate") is not None
        model = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, low_cpu_mem_usage=lazy)
        model = model.to(device).eval()
        if torch.device(device).type == "cpu":
            # oneDNN's convolutions run fastest channels-last (measured here: bf16 decode at 256x256 2x faster,
            # fp32 about the same)
            model.to(memory_format=torch.channels_last)
        cfg = model.config
        mean = cfg.latents_mean if cfg.latents_mean is not None else [0.0] * cfg.latent_channels
        std = cfg.latents_std if cfg.latents_std is not None else [1.0] * cfg.latent_channels
        return cls(model, mean, std)

    def to(self, device) -> "VAE":
        self.model.to(device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.device.type == "cpu" else torch.contiguous_format

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,H,W] in [-1,1] -> normalised latents [B,C,H/8,W/8] (the posterior mode, not a sample)."""
        x = pixels.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        z = self.model.encode(x).latent_dist.mode()                                    # [B,C,h,w]
        return (z - self.mean.to(z)) / self.std.to(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents [B,C,h,w] -> pixels [B,3,8h,8w] in [-1,1] (not clamped)."""
        z = latents.to(self.device, self.dtype)
        z = (z * self.std.to(z) + self.mean.to(z)).contiguous(memory_format=self.memory_format)  # [B,C,h,w]
        if z.shape[-2] * z.shape[-1] * self.scale ** 2 > self.tile_pixels:
            # diffusers' tiled decode: 512 px tiles (64 latents) blended over a quarter-tile overlap
            m = self.model
            m.tile_sample_min_size, m.tile_latent_min_size, m.tile_overlap_factor = 512, 512 // self.scale, 0.25
            return m.tiled_decode(z).sample
        return self.model.decode(z).sample


def pil_to_pixels(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL -> [1,3,H,W] in [-1,1], Lanczos-resized to (height, width) like diffusers' VaeImageProcessor."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)                 # [H,W,3]
    return (x.permute(2, 0, 1)[None] * 2 - 1).contiguous()


def pixels_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [-1,1] -> PIL images, rounded like diffusers' postprocess."""
    x = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()     # [B,H,W,3]
    return [Image.fromarray((im * 255).round().astype("uint8")) for im in x]
