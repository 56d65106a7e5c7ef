"""Glyph conditioning: the quoted substrings of a prompt, byte-tokenized and encoded by ByT5.

The DiT's only text input is this sequence (reference: /work/shared/reference/glm-image.md, Part B §1.6):
1. `glyph_texts`: four regexes grouped by quote type, not by position ('…', “…”, "…", 「…」). Apostrophes count
   as quotes, so `it's John's 'car'` yields ['s John', 'car']. No quotes: [""].
2. Each text -> utf-8 bytes + 3, then `</s>` = 1 (truncated to 2048 ids including `</s>`). Quirk kept: when the
   prompt has an *even* number of texts, every text gets one leading pad (0), which is attended to.
3. One ByT5 pass per prompt over its right-padded texts; the valid tokens of all texts are concatenated into one
   sequence [ΣLi, D]. A batch is left-padded with zero vectors (no mask reaches the DiT).
The CFG-negative branch is always `encode([""])`: one `</s>` token.

Deviation: literal special-token strings inside quotes ("</s>", "<pad>", "<unk>", "<extra_id_N>") are encoded as
plain bytes here; the HF ByT5Tokenizer would map them to their special ids.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

PAD, EOS, BYTE_OFFSET = 0, 1, 3  # ByT5: ids 0-2 are <pad>, </s>, <unk>; byte b -> b + 3

QUOTE_PATTERNS = [r"'([^']*)'", r"\u201c([^\u201c\u201d]*)\u201d", r'"([^"]*)"', r"「([^「」]*)」"]


def glyph_texts(prompt: str) -> list[str]:
    """Quoted substrings, grouped by quote type (all '…' first, then “…”, "…", 「…」); [""] when there are none."""
    texts = [t for pattern in QUOTE_PATTERNS for t in re.findall(pattern, prompt)]
    return texts or [""]


def glyph_token_ids(texts: list[str], max_length: int = 2048) -> list[list[int]]:
    """ByT5 ids per text, with the leading pad that every text gets when len(texts) is even."""
    lead = [PAD] * ((len(texts) + 1) % 2)
    return [lead + [b + BYTE_OFFSET for b in t.encode("utf-8")[: max_length - 1]] + [EOS] for t in texts]


class GlyphEncoder(nn.Module):
    """Wraps a transformers `T5EncoderModel` (the official `text_encoder/` folder)."""

    def __init__(self, t5: nn.Module, max_length: int = 2048):
        super().__init__()
        self.t5 = t5
        self.max_length = max_length
        self.memo: dict[tuple[str, ...], Tensor] | None = None  # a dict: encode_one remembers each text tuple's
        # output (for a frozen encoder run many times over the same texts, as decoder training does; exact)

    @classmethod
    def from_folder(cls, folder, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> GlyphEncoder:
        """From the official `text_encoder/` folder (config.json + safetensors)."""
        from transformers import T5EncoderModel

        t5 = T5EncoderModel.from_pretrained(folder, dtype=dtype).eval()
        return cls(t5 if device is None else t5.to(device))

    @torch.no_grad()
    def encode_one(self, prompt: str) -> Tensor:
        """One prompt -> [ΣLi, D] valid-token hidden states of all its glyph texts, concatenated."""
        texts = tuple(glyph_texts(prompt))
        if self.memo is not None and texts in self.memo:
            return self.memo[texts]
        ids = glyph_token_ids(list(texts), self.max_length)
        S = max(len(i) for i in ids)
        device = next(self.t5.parameters()).device
        input_ids = torch.tensor([i + [PAD] * (S - len(i)) for i in ids], device=device)  # [n_texts, S]
        mask = torch.tensor([[1] * len(i) + [0] * (S - len(i)) for i in ids], device=device)  # [n_texts, S]
        hidden = self.t5(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [n_texts, S, D]
        out = hidden[mask.bool()]  # [ΣLi, D]
        if self.memo is not None:
            self.memo[texts] = out
        return out

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> glyph [B, T, D] in the encoder's dtype, right-padded with zero vectors, and lengths [B] long
        (the valid rows of each; `DiT.context(..., txt_len=lengths)` hides the padding from attention)."""
        seqs = [self.encode_one(p) for p in prompts]
        T = max(s.shape[0] for s in seqs)
        glyph = torch.stack([torch.cat([s, s.new_zeros(T - s.shape[0], s.shape[1])]) for s in seqs])
        return glyph, torch.tensor([s.shape[0] for s in seqs], device=glyph.device)
