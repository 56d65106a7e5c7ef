"""Training examples by index: synthetic scenes (glmimage.data.scenes), a folder of real images with captions, or
WebDataset tar shards (`key.jpg`/`key.png` + `key.txt`).

Example i of a source depends only on (seed, i), so step s of a stage reads the indices [s*B, (s+1)*B) and a resumed
run sees exactly the examples an uninterrupted one would.
"""
from __future__ import annotations

from pathlib import Path

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
    """Real images with same-name captions (glmimage.data.folder.ImageTextFolder), resized to cover `size` and
    center-cropped to it.

    t2i only: {"kind": "t2i", "image", "caption"}. Example i is image i mod len(folder)."""

    def __init__(self, path: str, size: int):
        from glmimage.data.folder import ImageTextFolder
        self.folder = ImageTextFolder(path, size=size)

    def __len__(self) -> int:                   # distinct examples
        return len(self.folder)

    def example(self, i: int) -> dict:
        item = self.folder[i % len(self.folder)]
        return {"kind": "t2i", "index": i, "image": item["image"], "caption": item["caption"], "key": item["key"]}


class ShardSource:
    """Image-caption samples of tar shards (a path, glob or brace pattern: 'shards/train-{000..099}.tar'), by index.

    The shards' member lists are read once (tar headers only) into an index of samples, so example i is one seek
    and read, and a resumed run sees the same examples. t2i only; example i is sample i mod the sample count."""

    def __init__(self, pattern: str, size: int):
        import tarfile

        from glmimage.data.folder import CAPTION_EXTS, IMAGE_EXTS, expand_shards
        self.size, self.tars, self.items = size, {}, []
        for shard in expand_shards(pattern):
            groups: dict[str, dict] = {}
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    directory, _, name = m.name.rpartition("/")
                    stem, dot, ext = name.partition(".")
                    if m.isfile() and dot:
                        groups.setdefault(f"{directory}/{stem}" if directory else stem, {})[ext.lower()] = m
            for key, members in groups.items():
                image = next((members[e] for e in IMAGE_EXTS if e in members), None)
                caption = next((members[e] for e in CAPTION_EXTS if e in members), None)
                if image is not None and caption is not None:
                    self.items.append((shard, key, image, caption))
        if not self.items:
            raise ValueError(f"no image + caption samples (e.g. a.jpg + a.txt) in the shards {pattern!r}")

    def __len__(self) -> int:                   # distinct examples
        return len(self.items)

    def example(self, i: int) -> dict:
        import io
        import tarfile

        from glmimage.data.folder import resize_center_crop
        shard, key, image_member, caption_member = self.items[i % len(self.items)]
        if shard not in self.tars:
            self.tars[shard] = tarfile.open(shard)
        tar = self.tars[shard]
        with Image.open(io.BytesIO(tar.extractfile(image_member).read())) as im:
            image = resize_center_crop(im, self.size)
        caption = tar.extractfile(caption_member).read().decode("utf-8").strip()
        return {"kind": "t2i", "index": i, "image": image, "caption": caption, "key": key}


def make_source(data: str, seed: int, size: int, **kwargs):
    """'synthetic', tar shards (a path, glob or brace pattern ending in .tar), or a folder of captioned images."""
    if data == "synthetic":
        return SyntheticSource(seed, size, **kwargs)
    if ".tar" in Path(data).name:
        return ShardSource(data, size)
    return FolderSource(data, size)


def to_pixels(images: list[Image.Image]) -> Tensor:
    """PIL images (same size) -> [B, 3, H, W] fp32 in [-1, 1] (as vae.pil_to_pixels)."""
    x = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy(x).permute(0, 3, 1, 2) * 2 - 1
