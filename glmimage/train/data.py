"""Training examples by index: synthetic scenes (glmimage.data.scenes) or a folder of real images.

Example i of a source depends only on (seed, i), so step s of a stage reads the indices [s*B, (s+1)*B) and a resumed
run sees exactly the examples an uninterrupted one would.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor


class SyntheticSource:
    """Scenes from glmimage.data.scenes.SceneStream; `kinds` weights t2i vs edit (e.g. ("t2i", "t2i", "edit"))."""

    def __init__(self, seed: int, size: int, kinds=("t2i",), label_cell_px: int | None = None, **scene_kwargs):
        from glmimage.data.scenes import SceneStream
        self.stream = SceneStream(seed, size=size, kinds=tuple(kinds), label_cell_px=label_cell_px, **scene_kwargs)

    def example(self, i: int) -> dict:
        return self.stream.example(i)


class FolderSource:
    """Real images with captions (glmimage.data.folder.ImageTextFolder), center-cropped and resized to `size`.

    t2i only: {"kind": "t2i", "image", "caption"}. Example i is image i mod len(folder)."""

    def __init__(self, path: str, size: int):
        from glmimage.data.folder import ImageTextFolder  # written by the data owner
        self.folder = ImageTextFolder(path)
        self.size = size

    def example(self, i: int) -> dict:
        item = self.folder[i % len(self.folder)]
        image, text = (item["image"], item.get("caption", item.get("text", ""))) if isinstance(item, dict) else item
        image = image.convert("RGB")
        s = min(image.size)
        left, top = (image.width - s) // 2, (image.height - s) // 2
        image = image.crop((left, top, left + s, top + s)).resize((self.size, self.size), Image.Resampling.BICUBIC)
        return {"kind": "t2i", "index": i, "image": image, "caption": text}


def make_source(data: str, seed: int, size: int, **kwargs):
    if data == "synthetic":
        return SyntheticSource(seed, size, **kwargs)
    return FolderSource(data, size)


def to_pixels(images: list[Image.Image]) -> Tensor:
    """PIL images (same size) -> [B, 3, H, W] fp32 in [-1, 1] (as vae.pil_to_pixels)."""
    x = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy(x).permute(0, 3, 1, 2) * 2 - 1
