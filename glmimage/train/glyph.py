"""Stage 0 (optional, before the decoder): the glyph encoder, the ByT5-shaped T5 of `text_encoder/`.

    python -m glmimage.train glyph --preset small --out runs/small
    python -m glmimage.train.glyph glmimage/assets/model runs/small    # how much each encoder's outputs say "where"

Why train it: the decoder reads a prompt's quoted text only through this encoder's outputs, and the DiT gives glyph
tokens no position (its RoPE covers image tokens only), so each output must itself say which character it is and
where in the text it stands. A randomly initialised T5 does not say where: in the bundled model's (2 x 64, random,
frozen) a letter's output is 0.999 cosine-similar wherever it stands in the word (C in 'CAT' and in 'ACT') and ~0.2
to any other letter, a bag of letters from which no decoder can spell ('CAT' drawn as 'CAC', 'HOUSE' as 'HUUSE').
GLM-Image itself uses Glyph-ByT5, a ByT5 trained against rendered glyphs, for the same reason.

Objective (self-supervised, on text alone: 38 s for the small preset on a 2-core CPU): linear heads read, from each
output token, its byte, its index in its text, the text's length in tokens and the bytes before and after it
(cross-entropy each, averaged). The outputs then carry identity, position and neighbours linearly: what the DiT's
glyph projector and attention need to place each character. The heads are training-only; the T5 is what the decoder
stage then uses (frozen, as before; `train decoder` reads DIR/glyph/ when it exists and records that in its
checkpoint) and what export writes to `text_encoder/`.

Texts: the quoted words the scene data draws (glmimage.data.scenes.sample_word: the training list, random
uppercase strings, the Chinese list) and "" (the CFG negative branch), each tokenized exactly as the pipeline does
(glyph.glyph_token_ids: bytes + 3, `</s>`), one text per prompt. On real data (--data PATH) the quoted substrings of
its captions (read without their images) are used instead, with ""; a mix (`synthetic+PATH`) draws from both.
"""
from __future__ import annotations

import argparse
import itertools
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glmimage.data.scenes import WORD_KINDS, sample_word
from glmimage.glyph import PAD, GlyphEncoder, glyph_texts, glyph_token_ids
from glmimage.train.common import Runtime, checkpoint_path, load_stage, train_loop, trained_weights
from glmimage.train.presets import TrainPreset, model_configs

MAX_INDEX = 32          # positions the index / length heads tell apart (longer texts share the last class)
EMPTY_P = 0.1           # share of "" texts (the CFG negative branch's single </s>)


def build_t5(preset: TrainPreset, seed: int) -> nn.Module:
    """A fresh ByT5-shaped T5 encoder of the preset's text_encoder config."""
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed + 1)
    return T5EncoderModel(T5Config(**model_configs(preset, 260)["text_encoder"]))


def load_glyph(preset: TrainPreset, run_dir: Path) -> nn.Module | None:
    """The run's trained glyph T5 (frozen, eval; the moving average with --ema), or None when the run has no glyph
    stage."""
    if checkpoint_path(run_dir, "glyph") is None:
        return None
    t5 = build_t5(preset, 0)
    t5.load_state_dict(trained_weights(load_stage(run_dir, "glyph"), "t5"))
    return t5.eval().requires_grad_(False)


class Heads(nn.Module):
    """Training-only linear read-outs of each output token: byte, index, text length, previous and next byte."""

    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.byte, self.prev, self.next = nn.Linear(dim, vocab), nn.Linear(dim, vocab), nn.Linear(dim, vocab)
        self.index, self.length = nn.Linear(dim, MAX_INDEX), nn.Linear(dim, MAX_INDEX)


def text_source(data: str, seed: int):
    """data -> draw(rng) -> one glyph text per call, as the decoder will see them: "" (EMPTY_P), else a scene word
    (synthetic data) or a quoted substring of a real source's captions (half each when --data mixes them)."""
    from glmimage.train.data import make_source, parts_of
    parts = parts_of(data)
    quoted = sorted({t for part in parts if part != "synthetic" for src in [make_source(part, seed, 64)]
                     for i in range(len(src)) for t in glyph_texts(src.caption(i)) if t})
    synthetic = "synthetic" in parts
    if not quoted and not synthetic:
        raise ValueError(f"no quoted text in the captions of {data}: the glyph stage learns from quoted text "
                         f"('...', \u201c...\u201d, \"...\", \u300c...\u300d); train the decoder without it")

    def draw(rng: random.Random) -> str:
        if rng.random() < EMPTY_P:
            return ""
        if synthetic and (not quoted or rng.random() < 0.5):
            return sample_word(rng, rng.choice(WORD_KINDS))
        return rng.choice(quoted)
    return draw


def batch_targets(texts: list[str]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Texts -> ids [B, S] (right-padded), mask [B, S], and each head's target [B, S] (-100 where padded)."""
    ids = [glyph_token_ids([t])[0] for t in texts]
    S = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [PAD] * (S - len(i)) for i in ids])                 # [B, S]
    mask = torch.tensor([[1] * len(i) + [0] * (S - len(i)) for i in ids])             # [B, S]
    ignore = torch.full_like(input_ids, -100)
    n = mask.sum(1, keepdim=True)                                                       # [B, 1]
    pos = torch.arange(S)[None].expand_as(input_ids)                                    # [B, S]
    valid = mask.bool()
    prev = torch.cat([torch.full_like(input_ids[:, :1], PAD), input_ids[:, :-1]], 1)   # PAD before the first
    nxt = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], PAD)], 1)     # PAD after </s>
    targets = {"byte": input_ids, "prev": prev, "next": nxt, "index": pos.clamp(max=MAX_INDEX - 1),
               "length": n.expand_as(input_ids).clamp(max=MAX_INDEX - 1)}
    return input_ids, mask, {k: torch.where(valid, v, ignore) for k, v in targets.items()}


def train(preset: TrainPreset, out: Path, data: str = "synthetic", steps: int | None = None, resume: bool = False,
          seed: int = 0, progress: bool = True, stop_at: int | None = None, rt: Runtime | None = None) -> list[dict]:
    rt = rt or Runtime()
    if preset.init is not None:
        raise ValueError("the glyph stage trains a fresh encoder; a fine-tune (--init) keeps the model's own")
    cfg = preset.stages["glyph"]
    t5 = build_t5(preset, seed)
    heads = Heads(t5.config.d_model, t5.config.vocab_size)
    draw = text_source(data, seed)
    rows = rt.rows(cfg.batch)

    def step_fn(step: int, gen: torch.Generator):
        rng = random.Random(f"glyph:{seed}:{step}")                   # the step's texts, whatever the process count
        texts = [draw(rng) for _ in range(cfg.batch)][rows]
        input_ids, mask, targets = batch_targets(texts)
        with rt.autocast_context():
            h = t5(input_ids=input_ids.to(rt.device), attention_mask=mask.to(rt.device)).last_hidden_state  # [B,S,D]
        targets = {k: t.to(rt.device) for k, t in targets.items()}
        logits = {k: getattr(heads, k)(h.float()) for k in targets}                      # [B, S, classes] each
        losses = {k: F.cross_entropy(logits[k].flatten(0, 1), t.flatten()) for k, t in targets.items()}
        valid = mask.to(rt.device).bool()
        acc = {f"{k}_acc": (logits[k].detach().argmax(-1) == targets[k])[valid].float().mean()
               for k in ("byte", "index")}
        metrics = {**{k: v.detach() for k, v in losses.items()}, **acc}
        return sum(losses.values()) / len(losses), int(mask.sum()), metrics     # a mean over valid tokens

    return train_loop("glyph", out, {"t5": t5, "heads": heads}, list(t5.parameters()) + list(heads.parameters()),
                      step_fn, cfg, seed, steps or cfg.steps, resume,
                      plot_keys=["loss", "index", "length"], progress=progress, stop_at=stop_at, rt=rt)



@torch.no_grad()
def letter_similarity(encoder: GlyphEncoder, letters: str = "CAT") -> dict[str, float]:
    """How much an encoder's outputs say where a character stands: over every ordering of `letters` as a quoted
    word, the mean cosine similarity of one letter's outputs at two different positions, and of two different
    letters' outputs at one position. A position-blind encoder has the first near 1."""
    words = ["".join(p) for p in itertools.permutations(letters)]
    out = {w: encoder.encode_one(f"'{w}'").float() for w in words}                       # [len + 1, D] each
    same, other = [], []
    for w1, w2 in itertools.combinations(words, 2):
        for i, j in itertools.product(range(len(letters)), repeat=2):
            c = F.cosine_similarity(out[w1][i], out[w2][j], dim=0).item()
            if w1[i] == w2[j] and i != j:
                same.append(c)
            elif w1[i] != w2[j] and i == j:
                other.append(c)
    return {"same_letter_other_position": sum(same) / len(same),
            "other_letter_same_position": sum(other) / len(other)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="letter_similarity of model folders' or run folders' glyph encoders")
    ap.add_argument("paths", nargs="+", help="a model folder (its text_encoder/) or a run folder (its glyph stage)")
    ap.add_argument("--preset", default="small", help="the training preset of run folders")
    ap.add_argument("--letters", default="CAT")
    args = ap.parse_args(argv)
    from glmimage.train.presets import get_preset
    for path in args.paths:
        path = Path(path)
        if (path / "text_encoder").exists():
            encoder = GlyphEncoder.from_folder(path / "text_encoder", dtype=torch.float32)
        else:
            t5 = load_glyph(get_preset(args.preset), path)
            if t5 is None:
                raise SystemExit(f"{path}: neither a model folder (text_encoder/) nor a run folder with a glyph stage")
            encoder = GlyphEncoder(t5)
        sim = letter_similarity(encoder, args.letters)
        print(f"{path}: one letter at two positions {sim['same_letter_other_position']:.3f}, two letters at one "
              f"position {sim['other_letter_same_position']:.3f}")


if __name__ == "__main__":
    main()
