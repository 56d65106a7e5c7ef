"""The AR prompt: text -> input ids in the exact layout of the reference processor (GlmImageProcessor).

  t2i: {prompt}<sop>{th} {tw}<eop><sop>{ph} {pw}<eop><BOI>                     -> grids [(ph, pw), (th, tw)]
  i2i: (<BOI><|image|>x(h*w)<EOI>) x n  {prompt}<sop>{th} {tw}<eop><BOI>        -> grids [(th, tw)]

(th, tw) is the target at 1/32 resolution, (ph, pw) the ~16x16 preview the AR samples first in t2i. In i2i the
`<|image|>` slots hold the reference images' VQ ids. The official chat template adds no roles or system text.

The string is tokenized in one call with the official `processor/tokenizer.json`, as the reference does, including its
quirk: special tokens (the tokenizer's post-processor, if any) are added unless the text starts with the BOS token
(`<BOI>`), i.e. in t2i but not in i2i.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


def target_grid(height: int, width: int, factor: int = 32) -> tuple[int, int]:
    """(th, tw): the large grid the AR generates for a height x width image (one token per 32x32 pixels)."""
    if height < factor or width < factor:
        raise ValueError(f"target {height}x{width} is below the minimum of {factor}x{factor} pixels")
    return height // factor, width // factor


def preview_grid(th: int, tw: int, side: int = 16) -> tuple[int, int]:
    """(ph, pw): the t2i preview grid, about side x side tokens (official 16) with the target's aspect ratio
    (as _get_target_shape)."""
    ratio = th / tw
    return int(math.sqrt(ratio) * side), int(math.sqrt(1 / ratio) * side)


@dataclass
class Prompt:
    input_ids: Tensor                       # (1, S) long, ends with BOI; reference VQ ids in place
    ref_grids: list[tuple[int, int]]        # (h, w) of each reference image, in prompt order
    target_grids: list[tuple[int, int]]     # grids to generate, in generation order; the last is the large one


class PromptTokenizer:
    def __init__(self, tokenizer, image_token: str, grid_bos_token: str, grid_eos_token: str, bos_token: str,
                 eos_token: str, pad_token: str | None = None, token_px: int = 32, preview_side: int = 16):
        self.tok = tokenizer                # a `tokenizers.Tokenizer`
        self.token_px = token_px            # pixels per AR token (official 32; model_index.json "glmimage" entry)
        self.preview_side = preview_side    # t2i preview grid side (official 16)
        self.image_token, self.grid_bos, self.grid_eos = image_token, grid_bos_token, grid_eos_token
        self.bos, self.eos = bos_token, eos_token
        self.image_token_id = self._id(image_token)
        self.boi_id, self.eoi_id = self._id(bos_token), self._id(eos_token)
        self.pad_id = self._id(pad_token) if pad_token else self.eoi_id

    def _id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return i

    @classmethod
    def from_dir(cls, processor_dir: str | os.PathLike, token_px: int = 32, preview_side: int = 16) -> PromptTokenizer:
        """From the official `processor/` folder: tokenizer.json + tokenizer_config.json."""
        from tokenizers import Tokenizer

        d = Path(processor_dir)
        conf = json.loads((d / "tokenizer_config.json").read_text())
        extra = conf.get("extra_special_tokens")
        extra = extra if isinstance(extra, dict) else {}

        def token(name: str, default: str | None = None) -> str | None:
            t = conf.get(name) or extra.get(name) or default
            return t["content"] if isinstance(t, dict) else t  # older configs store AddedToken dicts

        return cls(Tokenizer.from_file(str(d / "tokenizer.json")), image_token=token("image_token", "<|image|>"),
                   grid_bos_token=token("grid_bos_token", "<sop>"), grid_eos_token=token("grid_eos_token", "<eop>"),
                   bos_token=token("bos_token"), eos_token=token("eos_token"), pad_token=token("pad_token"),
                   token_px=token_px, preview_side=preview_side)

    def encode(self, text: str) -> list[int]:
        # the reference (apply_chat_template) tokenizes with add_special_tokens=False only when text starts with BOS
        return self.tok.encode(text, add_special_tokens=not text.startswith(self.bos)).ids

    def t2i(self, prompt: str, height: int, width: int) -> Prompt:
        th, tw = target_grid(height, width, self.token_px)
        ph, pw = preview_grid(th, tw, self.preview_side)
        text = f"{prompt}{self.grid_bos}{th} {tw}{self.grid_eos}{self.grid_bos}{ph} {pw}{self.grid_eos}{self.bos}"
        ids = self.encode(text)
        if ids.count(self.image_token_id):
            raise ValueError(f"the prompt contains the image placeholder {self.image_token!r}")
        return Prompt(torch.tensor([ids]), [], [(ph, pw), (th, tw)])

    def i2i(self, prompt: str, ref_ids: list[Tensor], height: int, width: int) -> Prompt:
        """ref_ids: each reference image's VQ ids (h, w) (ImageTokenizer.encode), placed before the prompt."""
        if not ref_ids:
            raise ValueError("i2i needs at least one reference image")
        th, tw = target_grid(height, width, self.token_px)
        text = (f"{self.bos}{self.image_token}{self.eos}" * len(ref_ids)
                + f"{prompt}{self.grid_bos}{th} {tw}{self.grid_eos}{self.bos}")
        ids = self.encode(text)
        if ids.count(self.image_token_id) != len(ref_ids):
            raise ValueError(f"the prompt contains the image placeholder {self.image_token!r}")
        out, refs = [], iter(ref_ids)
        for i in ids:                                     # each placeholder becomes its image's h*w ids (row-major)
            out += next(refs).flatten().tolist() if i == self.image_token_id else [i]
        return Prompt(torch.tensor([out]), [tuple(r.shape) for r in ref_ids], [(th, tw)])


def collate(prompts: list[Prompt], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad prompts into (input_ids, attention_mask), both (B, S). All must share ref and target grids."""
    if any(p.ref_grids != prompts[0].ref_grids or p.target_grids != prompts[0].target_grids for p in prompts):
        raise ValueError("a batch needs the same reference grids and target size for every prompt")
    S = max(p.input_ids.shape[1] for p in prompts)
    ids = torch.full((len(prompts), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), S, dtype=torch.long)
    for b, p in enumerate(prompts):
        n = p.input_ids.shape[1]
        ids[b, S - n:], mask[b, S - n:] = p.input_ids[0], 1
    return ids, mask
