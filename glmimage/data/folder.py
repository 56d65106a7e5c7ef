"""Real image-text data: a folder of images with same-name .txt captions, and WebDataset-style tar shards
(read with the standard library's tarfile; no webdataset dependency).

Both yield {"image": PIL RGB of exactly `size`, "caption": str, "key": str}, resized to cover the size
and center-cropped (size=None keeps each image as stored, in RGB). Shuffling is deterministic: the order
of an epoch depends only on (seed, epoch); call set_epoch(e) between epochs for a new order. Work is split
over ranks (rank, world_size) and DataLoader workers without overlap.

    data = ImageTextFolder("photos/", size=256)              # photos/a.jpg + photos/a.txt, ...
    data = WebDatasetShards("shards/train-{000..099}.tar", size=256)   # a.jpg + a.txt inside each tar
"""

import glob
import io
import math
import random
import re
import tarfile
from pathlib import Path

from PIL import Image, ImageOps
from torch.utils.data import IterableDataset, get_worker_info

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTS = ("txt", "caption")


def _size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    width, height = (size, size) if isinstance(size, int) else tuple(size)
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return width, height


def load_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of an image; transparent areas become white."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size) -> Image.Image:
    """Resize so the image covers `size` (int or (width, height)), then crop the centre to exactly that."""
    if size is None:
        return load_rgb(image)
    return ImageOps.fit(load_rgb(image), _size(size), method=Image.BICUBIC, centering=(0.5, 0.5))


def fit(image: Image.Image, size) -> tuple[Image.Image, tuple[int, int]]:
    """resize_center_crop, and where the crop sits: (top, left) in pixels of the image resized to cover `size`
    (the crop coordinates a decoder is conditioned on, SDXL-style; (0, 0) when nothing was cut away)."""
    width, height = _size(size)
    scale = max(width / image.width, height / image.height)
    top, left = round((image.height * scale - height) / 2), round((image.width * scale - width) / 2)
    return resize_center_crop(image, (width, height)), (max(top, 0), max(left, 0))


# ----------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets: images keep (about) their shape instead of all being cropped to one square.

def aspect_buckets(side: int, unit: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) training sizes: both multiples of `unit`, at most side x side pixels, aspect ratio at most
    max_ratio:1 either way. For each width, the tallest height under the area, so every bucket holds about the
    same number of tokens (a batch's cost does not depend on its shape); tall buckets mirror the wide ones, and
    side x side itself is always one. Sorted from the tallest to the widest."""
    if side % unit:
        raise ValueError(f"the training side {side} is not a multiple of {unit}")
    if not 1 <= max_ratio <= 4:
        raise ValueError(f"the aspect-ratio limit must be between 1 and 4 (GLM-Image's own limit), got {max_ratio}")
    area, wide = side * side, []
    for width in range(side, area // unit + 1, unit):
        height = area // width // unit * unit
        if height >= unit and width / height <= max_ratio:
            wide.append((width, height))
    return sorted({*wide, *((h, w) for w, h in wide)}, key=lambda b: b[0] / b[1])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (in log ratio: 2:1 and 1:2 are as far from 1:1)."""
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(width / height)))


def _split():
    """(index, count) of this DataLoader worker."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ImageTextFolder(IterableDataset):
    """Images under `path` (recursively) that have a caption file of the same name (`a.jpg` + `a.txt`).

    Random access with ds[i]; iteration goes over a seeded permutation per epoch."""

    def __init__(self, path, size=None, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.root = Path(path)
        if not self.root.is_dir():
            raise ValueError(f"not a directory: {self.root}")
        self.size = _size(size)
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self.rank, self.world_size = rank, world_size
        self.items, self.missing_captions = [], 0
        for p in sorted(self.root.rglob("*")):
            if p.suffix.lower().lstrip(".") not in IMAGE_EXTS or not p.is_file():
                continue
            txt = p.with_suffix(".txt")
            if txt.is_file():
                self.items.append((p, txt))
            else:
                self.missing_captions += 1
        if not self.items:
            raise ValueError(f"no images with same-name .txt captions under {self.root} (image types: {', '.join(IMAGE_EXTS)})")

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, i: int) -> str:           # the text alone (no image read)
        return self.items[i][1].read_text(encoding="utf-8").strip()

    def __getitem__(self, i: int) -> dict:
        image_path = self.items[i][0]
        with Image.open(image_path) as im:
            image = resize_center_crop(im, self.size)
        return {"image": image, "caption": self.caption(i),
                "key": str(image_path.relative_to(self.root).with_suffix(""))}

    def __iter__(self):
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        worker, n_workers = _split()
        for i in order[self.rank * n_workers + worker::self.world_size * n_workers]:
            yield self[i]


def expand_shards(pattern_or_list) -> list[str]:
    """Shard paths from a list, a glob, or a brace pattern: 'data-{000..009}.tar', 'data-{a,b}.tar'."""
    if not isinstance(pattern_or_list, (str, Path)):
        return [str(p) for p in pattern_or_list]
    patterns = [str(pattern_or_list)]
    while any("{" in p for p in patterns):
        out = []
        for p in patterns:
            m = re.search(r"\{([^{}]*)\}", p)
            if m is None:
                out.append(p)
                continue
            body, head, tail = m.group(1), p[:m.start()], p[m.end():]
            r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
            if r:
                lo, hi = r.groups()
                out += [f"{head}{i:0{len(lo)}d}{tail}" for i in range(int(lo), int(hi) + 1)]
            else:
                out += [head + part + tail for part in body.split(",")]
        patterns = out
    paths = []
    for p in patterns:
        paths += sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
    if not paths:
        raise ValueError(f"no shards match {pattern_or_list!r}")
    return paths


def _tar_samples(path: str):
    """(key, {extension: bytes}) for each sample of a tar, grouping consecutive files by key (the path up
    to the first dot of the file name, as WebDataset does)."""
    key, sample = None, {}
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, name = member.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            if not dot:
                continue
            k = f"{directory}/{stem}" if directory else stem
            if k != key:
                if sample:
                    yield key, sample
                key, sample = k, {}
            sample[ext.lower()] = tar.extractfile(member).read()
    if sample:
        yield key, sample


class WebDatasetShards(IterableDataset):
    """Image-caption samples from tar shards (`key.jpg`/`key.png`/... + `key.txt`), streamed.

    Shards are shuffled per epoch and split over ranks and workers (over samples instead when there are
    fewer shards than readers); samples pass through a seeded shuffle buffer of `shuffle_buffer`."""

    def __init__(self, pattern_or_list, size=None, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.shards = expand_shards(pattern_or_list)
        self.size = _size(size)
        self.seed, self.shuffle, self.shuffle_buffer, self.epoch = seed, shuffle, shuffle_buffer, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _decode(self, key: str, sample: dict, shard: str) -> dict | None:
        image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        caption_ext = next((e for e in CAPTION_EXTS if e in sample), None)
        if image_ext is None or caption_ext is None:
            return None
        with Image.open(io.BytesIO(sample[image_ext])) as im:
            image = resize_center_crop(im, self.size)
        return {"image": image, "caption": sample[caption_ext].decode("utf-8").strip(), "key": key, "shard": shard}

    def _samples(self):
        worker, n_workers = _split()
        reader, n_readers = self.rank * n_workers + worker, self.world_size * n_workers
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(shards)
        split_shards = len(shards) >= n_readers
        if split_shards:
            shards = shards[reader::n_readers]
        i = 0
        for shard in shards:
            for key, sample in _tar_samples(shard):
                if split_shards or i % n_readers == reader:
                    yield key, sample, shard
                i += 1

    def __iter__(self):
        # the buffer holds the encoded bytes; images are decoded on the way out
        for raw in self._shuffled(self._samples()):
            out = self._decode(*raw)
            if out is not None:
                yield out

    def _shuffled(self, samples):
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from samples
            return
        worker, _ = _split()
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
        buffer = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], sample = sample, buffer[j]
            yield sample
        rng.shuffle(buffer)
        yield from buffer
