"""Reading the official checkpoint layout: hub ids, config files and safetensors (single or sharded).

Models are built on the meta device and their weights assigned straight from the file (already cast to the
target dtype and device), so a weight is never held twice: a tensor used as stored on the CPU is a view of the
memory-mapped file (pages are read when touched: an embedding's unused rows cost nothing); one that is cast or
moved to an accelerator is read with plain file I/O into its new copy, so the file's pages never add to the
process's memory. Key matching is strict: a checkpoint that does not fit the architecture fails with the missing
and unexpected keys named.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

COMPONENTS = ("vision_language_encoder", "processor", "transformer", "text_encoder", "tokenizer", "vae", "scheduler")


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local folder, or a hub id ("zai-org/GLM-Image") downloaded through huggingface_hub."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").exists():
            raise ValueError(f"{p} is not a GLM-Image checkpoint folder: model_index.json is missing "
                             f"(expected sub-folders: {', '.join(COMPONENTS)})")
        return p
    if p.exists() or str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1:
        raise ValueError(f"{path_or_id!s} is neither a checkpoint folder nor a hub id like 'zai-org/GLM-Image'")
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.jinja",
                                                                   "*.txt", "*.model"]))


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of one component folder: a sharded index, or single files. Only safetensors."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        shards = sorted(set(read_json(indexes[0])["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = [f.name for f in folder.glob("*.bin")] + [f.name for f in folder.glob("*.pt*")]
        hint = f" (found {others}: only safetensors are read, never pickles)" if others else ""
        raise FileNotFoundError(f"no .safetensors weights in {folder}{hint}")
    return files


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}


def safetensors_header(fh) -> tuple[int, dict]:
    """(offset of the data section, {key: {"dtype", "shape", "data_offsets"}}) of a safetensors file open in "rb"."""
    fh.seek(0)
    n = int.from_bytes(fh.read(8), "little")            # the format: u64 header length, JSON header, data
    header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


@functools.cache
def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim            # glibc (Linux); elsewhere there is none
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere). glibc keeps freed blocks under
    its (adaptive, up to 32 MB) mmap threshold in the heap, so a load's read buffers and pre-cast or pre-int8
    copies, and a released stage's weights, otherwise stay resident (measured, bf16 + int8 + offload + compile on
    the medium preset: the AR's second load left 1.49 GB resident where the first left 0.66 GB)."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


TRIM_EVERY = 64 << 20  # bytes read and dropped between two trim_heap() calls in load_weights


def read_tensor(fh, data_start: int, info: dict) -> torch.Tensor:
    """One tensor read from an open safetensors file with plain file I/O (no memory map)."""
    begin, end = info["data_offsets"]
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"unsupported safetensors dtype {info['dtype']}; supported: {sorted(SAFETENSORS_DTYPES)}")
    if end == begin:
        return torch.empty(info["shape"], dtype=dtype)
    buf = bytearray(end - begin)
    fh.seek(data_start + begin)
    if fh.readinto(buf) != len(buf):
        raise ValueError(f"{fh.name}: truncated tensor data")
    return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def load_weights(module: nn.Module, folder: Path, prefixes: dict[str, str] | None = None, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 skip_prefixes: tuple[str, ...] = (), select: Callable[[str], bool] | None = None) -> nn.Module:
    """Assign the weights in `folder` to `module` (built on meta), strictly.

    prefixes: checkpoint-key prefix -> module-key prefix (keys that match none are unexpected);
    None keeps keys as they are. skip_prefixes: checkpoint keys to ignore (they belong to another module).
    Floating-point tensors are cast to `dtype`; others keep theirs. A floating-point weight whose module entry is
    int8 (a quantize.Int8Linear laid out on meta) is cast, then quantized as it is read, with its `scales` beside it:
    the module never exists in floating point. select: load only the module keys it accepts (all of them must be in
    the checkpoint); the others stay on meta, and their checkpoint entries are not read (a stage loaded in parts).
    """
    from safetensors import safe_open

    from glmimage.quantize import quantize_rows

    expected = {k: v.dtype for k, v in module.state_dict().items()}
    wanted = {k for k in expected if select is None or select(k)}
    freed = 0
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    dev = torch.device(device)
    for file in safetensors_files(folder):
        # safe_open on CPU memory-maps the file: tensors kept as stored are views of it; the ones cast or moved
        # are read through `fh` instead, so their source pages are never mapped (they would stay resident
        # beside the copy for as long as any view of the file lives)
        with safe_open(str(file), framework="pt", device="cpu") as f, open(file, "rb") as fh:
            data_start, header = safetensors_header(fh)
            for key in f.keys():
                if key.startswith(skip_prefixes):
                    continue
                name = key
                if prefixes is not None:
                    match = next((p for p in prefixes if key.startswith(p)), None)
                    if match is None:
                        unexpected.append(key)
                        continue
                    name = prefixes[match] + key[len(match):]
                if name not in expected:
                    unexpected.append(key)
                    continue
                if name not in wanted:
                    continue
                stored = SAFETENSORS_DTYPES.get(header[key]["dtype"])
                cast = dtype is not None and stored is not None and stored.is_floating_point and stored != dtype
                quantize = expected[name] == torch.int8 and stored is not None and stored.is_floating_point
                copy = cast or quantize or dev.type != "cpu"
                t = read_tensor(fh, data_start, header[key]) if copy else f.get_tensor(key)
                t = t.to(dtype) if cast else t
                if quantize:                                  # [out, in] -> int8 rows + their scales
                    q, scales = quantize_rows(t)
                    state[name], state[name.removesuffix("weight") + "scales"] = q.to(dev), scales.to(dev)
                else:
                    state[name] = t.to(dev)
                if copy:        # read buffers and cast/quantize temporaries go back to the OS every TRIM_EVERY
                    freed += header[key]["data_offsets"][1] - header[key]["data_offsets"][0]
                    del t
                    if freed >= TRIM_EVERY:
                        trim_heap()
                        freed = 0
    missing = sorted(wanted - set(state))
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:12]) + (f" ... ({len(keys)} in all)" if len(keys) > 12 else "")
        raise ValueError(f"checkpoint {folder} does not match {type(module).__name__}: "
                         f"missing keys [{show(missing)}]; unexpected keys [{show(sorted(unexpected))}]")
    module.load_state_dict(state, strict=select is None, assign=True)
    return module


def save_weights(module: nn.Module, path: Path, prefixes: dict[str, str] | None = None) -> None:
    """Write `module`'s state_dict as safetensors under the official key names (inverse of `prefixes`).

    Written to a temporary file and renamed, so a crash never leaves a half-written checkpoint."""
    from safetensors.torch import save_file

    state = {}
    for name, t in module.state_dict().items():
        key = name
        if prefixes is not None:
            inverse = {v: k for k, v in prefixes.items()}
            match = next(p for p in inverse if name.startswith(p))
            key = inverse[match] + name[len(match):]
        state[key] = t.detach().contiguous().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
