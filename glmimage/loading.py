"""Reading the official checkpoint layout: hub ids, config files and safetensors (single or sharded).

Models are built on the meta device and their weights assigned straight from the file (already cast to the
target dtype and device), so a weight is never held twice. Key matching is strict: a checkpoint that does not
fit the architecture fails with the missing and unexpected keys named.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

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


def load_weights(module: nn.Module, folder: Path, prefixes: dict[str, str] | None = None, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 skip_prefixes: tuple[str, ...] = ()) -> nn.Module:
    """Assign the weights in `folder` to `module` (built on meta), strictly.

    prefixes: checkpoint-key prefix -> module-key prefix (keys that match none are unexpected);
    None keeps keys as they are. skip_prefixes: checkpoint keys to ignore (they belong to another module).
    Floating-point tensors are cast to `dtype`; others keep theirs.
    """
    from safetensors import safe_open

    expected = set(module.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    dev = torch.device(device)
    for file in safetensors_files(folder):
        # safe_open on CPU memory-maps the file: tensors are read one at a time and moved straight on
        with safe_open(str(file), framework="pt", device="cpu") as f:
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
                t = f.get_tensor(key)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                state[name] = t.to(dev)
    missing = sorted(expected - set(state))
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:12]) + (f" ... ({len(keys)} in all)" if len(keys) > 12 else "")
        raise ValueError(f"checkpoint {folder} does not match {type(module).__name__}: "
                         f"missing keys [{show(missing)}]; unexpected keys [{show(sorted(unexpected))}]")
    module.load_state_dict(state, strict=True, assign=True)
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
