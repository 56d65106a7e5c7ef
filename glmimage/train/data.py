"""Training examples by index: synthetic scenes (glmimage.data.scenes), a folder of real images with captions, or
WebDataset tar shards (`key.jpg`/`key.png` + `key.txt`).

Example i of a source depends only on (seed, i), so step s of a stage reads the indices [s*B, (s+1)*B) and a resumed
run sees exactly the examples an uninterrupted one would.

Real images are resized to cover the training size and center-cropped to it: one square (size x size), or with
`buckets` (glmimage.data.folder.aspect_buckets) the bucket nearest each image's aspect ratio, so a wide photo stays
wide. Their examples carry "crop": (top, left) of the cut, the decoder's crop conditioning.
"""
from __future__ import annotations

import threading
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


def fit_image(image: Image.Image, size: int, buckets: list[tuple[int, int]] | None) -> tuple[Image.Image, tuple]:
    """(the image resized and center-cropped to size x size or to its nearest bucket, (top, left) of the crop)."""
    from glmimage.data.folder import fit, nearest_bucket
    return fit(image, nearest_bucket(*image.size, buckets) if buckets else size)


class FolderSource:
    """Real images with same-name captions (glmimage.data.folder.ImageTextFolder), fitted by fit_image.

    t2i only: {"kind": "t2i", "image", "caption", "crop"}. Example i is image i mod len(folder)."""

    def __init__(self, path: str, size: int, buckets: list[tuple[int, int]] | None = None):
        from glmimage.data.folder import ImageTextFolder
        self.folder, self.size, self.buckets = ImageTextFolder(path), size, buckets     # images as stored

    def __len__(self) -> int:                   # distinct examples
        return len(self.folder)

    def caption(self, i: int) -> str:           # the text alone (no image read)
        return self.folder.caption(i % len(self.folder))

    def example(self, i: int) -> dict:
        item = self.folder[i % len(self.folder)]
        image, crop = fit_image(item["image"], self.size, self.buckets)
        return {"kind": "t2i", "index": i, "image": image, "caption": item["caption"], "key": item["key"], "crop": crop}


class ShardSource:
    """Image-caption samples of tar shards (a path, glob or brace pattern: 'shards/train-{000..099}.tar'), by index.

    The shards' member lists are read once (tar headers only) into an index of samples, so example i is one seek
    and read, and a resumed run sees the same examples. t2i only; example i is sample i mod the sample count."""

    def __init__(self, pattern: str, size: int, buckets: list[tuple[int, int]] | None = None):
        import tarfile

        from glmimage.data.folder import CAPTION_EXTS, IMAGE_EXTS, expand_shards
        self.size, self.buckets, self.items = size, buckets, []
        self.local = threading.local()          # each reading thread its own open tar files (Prefetch)
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

    def _tar(self, shard: str):
        import tarfile
        tars = self.local.__dict__.setdefault("tars", {})
        if shard not in tars:
            tars[shard] = tarfile.open(shard)
        return tars[shard]

    def caption(self, i: int) -> str:           # the text alone (no image read)
        shard, _, _, caption_member = self.items[i % len(self.items)]
        return self._tar(shard).extractfile(caption_member).read().decode("utf-8").strip()

    def example(self, i: int) -> dict:
        import io

        from glmimage.data.folder import load_rgb
        shard, key, image_member, _ = self.items[i % len(self.items)]
        tar = self._tar(shard)
        with Image.open(io.BytesIO(tar.extractfile(image_member).read())) as im:
            image, crop = fit_image(load_rgb(im), self.size, self.buckets)
        return {"kind": "t2i", "index": i, "image": image, "caption": self.caption(i), "key": key, "crop": crop}


def bucket_sizes(size: int, unit: int, max_ratio: float | None) -> list[tuple[int, int]] | None:
    """--buckets R: the (width, height) buckets of about size x size pixels, multiples of the AR token (`unit`),
    aspect ratio up to R:1 (None: no buckets, every image cropped to the square)."""
    from glmimage.data.folder import aspect_buckets
    return aspect_buckets(size, unit, max_ratio) if max_ratio else None


class MixedSource:
    """Several sources interleaved (`--data synthetic+photos/`): example i is source (i mod K)'s example i // K, so
    each source gives every K-th example (name one twice to give it twice the share)."""

    def __init__(self, parts: list):
        self.parts = parts

    def __len__(self) -> int:                   # distinct examples (real sources only: scenes never run out)
        return len(self.parts) * max(len(p) for p in self.parts)

    def example(self, i: int) -> dict:
        K = len(self.parts)
        return {**self.parts[i % K].example(i // K), "index": i}


def parts_of(data: str) -> list[str]:
    """The sources a --data value names: 'synthetic', a folder, tar shards, or several joined by '+'."""
    return data.split("+")


def has_synthetic(data: str) -> bool:
    return "synthetic" in parts_of(data)


def make_source(data: str, seed: int, size: int, buckets: list[tuple[int, int]] | None = None, **kwargs):
    """'synthetic', tar shards (a path, glob or brace pattern ending in .tar), a folder of captioned images, or
    several of them joined by '+' (MixedSource). buckets: aspect-ratio buckets for real images (synthetic scenes
    are square); kwargs: the scenes' settings (SceneStream)."""
    if "+" in data:
        return MixedSource([make_source(part, seed, size, None if part == "synthetic" else buckets, **kwargs)
                            for part in parts_of(data)])
    if data == "synthetic":
        if buckets:
            raise ValueError("aspect-ratio buckets (--buckets) are for real images: synthetic scenes are square")
        return SyntheticSource(seed, size, **kwargs)
    if ".tar" in Path(data).name:
        return ShardSource(data, size, buckets)
    return FolderSource(data, size, buckets)


class Prefetch:
    """Examples of a real-image source read ahead in background threads (file reads, decoding and resizing release
    the GIL), so that a step's images are ready when it starts. Example i depends only on i, so reading ahead
    changes no number. Synthetic scenes are drawn in Python (the GIL): they are read in the step, as without it."""

    def __init__(self, source, workers: int = 4):
        from concurrent.futures import ThreadPoolExecutor
        self.source = source
        parts = source.parts if isinstance(source, MixedSource) else [source]
        threaded = workers > 0 and not any(isinstance(p, SyntheticSource) for p in parts)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="prefetch") if threaded else None
        self.pending: dict = {}                 # index -> Future

    def ahead(self, indices) -> None:
        """Start reading these examples (a later step's)."""
        if self.pool is not None:
            for i in indices:
                if i not in self.pending:
                    self.pending[i] = self.pool.submit(self.source.example, i)

    def get(self, indices) -> list[dict]:
        """These examples, read ahead or now."""
        return [f.result() if (f := self.pending.pop(i, None)) is not None else self.source.example(i)
                for i in indices]


VAL_SEED_OFFSET = 50_000        # synthetic held-out scenes: another stream than any training seed's


def held_out(n: int, data: str, val_data: str | None, seed: int, size: int,
             buckets: list[tuple[int, int]] | None = None, **kwargs):
    """--val N: (the held-out source, how many of its examples to use). val_data: a folder or tar shards of images
    no step trains on (each used once, at most N of them); without it, synthetic training validates on N fresh
    scenes of another seed."""
    if n < 1:
        raise ValueError(f"--val is a number of held-out examples, got {n}")
    if val_data is None:
        if data != "synthetic":                 # (a mix with real images too)
            raise ValueError("--val on real data needs --val-data PATH: held-out images (a folder or tar shards) "
                             "that no step trains on")
        return make_source("synthetic", seed + VAL_SEED_OFFSET, size, **kwargs), n
    if has_synthetic(val_data):
        raise ValueError("--val-data names held-out real images (a folder or tar shards), not synthetic scenes")
    source = make_source(val_data, seed, size, buckets)
    return source, min(n, len(source))


def by_size(images: list[Image.Image]) -> dict[tuple[int, int], list[int]]:
    """Indices of the images of each (width, height), in order: the groups a batched encoder can stack."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.size, []).append(i)
    return groups


def to_pixels(images: list[Image.Image]) -> Tensor:
    """PIL images (same size) -> [B, 3, H, W] fp32 in [-1, 1] (as vae.pil_to_pixels)."""
    x = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy(x).permute(0, 3, 1, 2) * 2 - 1
