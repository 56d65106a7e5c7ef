"""Stage 3: the AR prior (ar.ARModel), next-token loss on the exact inference layout.

  t2i:  PromptTokenizer.t2i(caption)  = [caption]<sop>th tw<eop><sop>ph pw<eop><BOI>  then [preview grid][full grid]
  edit: PromptTokenizer.i2i(instruction, [source ids]) = <BOI>[source ids]<EOI>[instruction]<sop>th tw<eop><BOI>
        then [target grid]

Grids are the trained tokenizer's ids of the rendered image; the preview is the nearest downsample of the full grid.
Positions come from ar.sample_positions, the function generation uses, so training and sampling agree exactly.
The loss covers the generated grid tokens only (the lm_head spans the vision vocabulary); preview tokens weigh
PREVIEW_WEIGHT x. Sequences are right-padded: causal attention never lets a real token see a pad.

With --text-dropout P an example's caption (an edit's instruction) is emptied with probability P, decided by the
example's index and the seed (so a resume drops the same ones): the AR also learns the empty-text prompt that
classifier-free guidance on its logits (ar.guide, `--ar-guidance`) uses as its unconditional branch.

The caption tokenizer is byte-level BPE trained here on the synthetic captions and instructions
(random_checkpoint.build_text_tokenizer: ids 0..vision_vocab-1 stay `<|dit_token_i|>`, then text, then the four
text specials), so any text still tokenizes.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glmimage.ar import ARConfig, ARModel, sample_positions
from glmimage.prompt import PromptTokenizer
from glmimage.random_checkpoint import UNUSED_VISION_SLOTS, build_text_tokenizer
from glmimage.train.common import (SAMPLE_GUIDANCE, SAMPLE_STEPS, Runtime, Sampling, Validation, checkpoint_path,
                                   finetune_identity, load_stage, save_samples, train_loop, trained_weights,
                                   wrap_blocks)
from glmimage.train.data import Prefetch, bucket_sizes, has_synthetic, held_out, make_source
from glmimage.train.presets import TrainPreset, model_configs
from glmimage.train.tokenizer import encode_batch, load_tokenizer

PREVIEW_WEIGHT = 2.0
OBJECT_WEIGHT = 4.0     # tokens whose code the tokenizer labels as an object or text (not background) weigh more
CORPUS_SIZE = 4000
CORPUS_SEED_OFFSET = 20_000
SCENE_KWARGS = dict(paraphrase_p=0.3, word_p=0.4, chinese_p=0.3, unseen_p=0.15)


def edit_kinds(share: float | None) -> tuple[str, ...]:
    """The t2i/edit mix of synthetic examples (SceneStream draws one kind per example uniformly from the tuple):
    None is the default, one edit in three; else the share as a fraction of denominator <= 12 (0.5, 0.25, 2/3)."""
    from fractions import Fraction
    if share is None:
        return ("t2i", "t2i", "edit")
    f = Fraction(share).limit_denominator(12) if 0 <= share <= 1 else None
    if f is None or abs(float(f) - share) > 1e-6:
        raise ValueError(f"--edit-share is a fraction of the examples in [0, 1] with a denominator up to 12 "
                         f"(e.g. 0.5, 0.25, 0.4), got {share}")
    return ("edit",) * f.numerator + ("t2i",) * (f.denominator - f.numerator)


def text_dropped(seed: int, index: int, p: float) -> bool:
    """Whether training example `index` has its text emptied (--text-dropout p): the same answer on every run."""
    return p > 0 and random.Random(f"text-dropout/{seed}/{index}").random() < p


def without_text(example: dict) -> dict:
    """The example with its caption (t2i) or instruction (edit) emptied: the unconditional prompt's layout."""
    return {**example, "caption" if example["kind"] == "t2i" else "instruction": ""}


def train_text_tokenizer(preset: TrainPreset, seed: int):
    """Byte-level BPE merges learned from captions and edit instructions of a held-out synthetic stream."""
    source = make_source("synthetic", seed + CORPUS_SEED_OFFSET, preset.image_size, kinds=("t2i", "edit"),
                         paraphrase_p=0.5, unseen_p=0.15)
    corpus = []
    for i in range(CORPUS_SIZE if preset.name != "debug" else 50):
        e = source.example(i)
        corpus += [e["caption"]] if e["kind"] == "t2i" else [e["instruction"], e["source_caption"]]
    vision_vocab = preset.model["codebook"] + UNUSED_VISION_SLOTS
    return build_text_tokenizer(vision_vocab, merges_from=corpus, vocab_size=vision_vocab + 256 + preset.text_merges)


def prompt_tokenizer(tok, preset: TrainPreset) -> PromptTokenizer:
    codebook = preset.model["codebook"]
    boi, eoi = f"<|dit_token_{codebook}|>", f"<|dit_token_{codebook + 1}|>"
    return PromptTokenizer(tok, image_token="<|image|>", grid_bos_token="<sop>", grid_eos_token="<eop>",
                           bos_token=boi, eos_token=eoi, pad_token=eoi, token_px=preset.ar_token_px,
                           preview_side=preset.preview_side)


def text_vocab_size(tok, preset: TrainPreset) -> int:
    return tok.get_vocab_size() - (preset.model["codebook"] + UNUSED_VISION_SLOTS)


def build_ar(preset: TrainPreset, text_vocab: int, seed: int) -> ARModel:
    """Random init (normal 0.02), or the init model's weights (fp32) when fine-tuning."""
    if preset.init is not None:
        from glmimage.ar import AR_KEY_PREFIXES
        from glmimage.loading import load_weights
        from glmimage.vision import VISION_KEY_PREFIXES
        with torch.device("meta"):
            model = ARModel(ARConfig.from_hf(preset.configs["vision_language_encoder"]))
        return load_weights(model, preset.init / "vision_language_encoder", AR_KEY_PREFIXES, dtype=torch.float32,
                            skip_prefixes=tuple(VISION_KEY_PREFIXES))
    torch.manual_seed(seed)
    model = ARModel(ARConfig.from_hf(model_configs(preset, text_vocab)["vision_language_encoder"]))
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return model


def preview_of(grid: Tensor, ph: int, pw: int) -> Tensor:
    """Nearest downsample of a [th, tw] id grid to [ph, pw]."""
    return F.interpolate(grid[None, None].float(), size=(ph, pw), mode="nearest")[0, 0].long()


def code_is_object(preset: TrainPreset, run_dir: Path) -> Tensor:
    """[n_codes] bool: the tokenizer's label head reads the code as an object or text region, not background."""
    from glmimage.data.scenes import NUM_BACKGROUND_LABELS
    from glmimage.train.tokenizer import Heads, post_quant
    vq = load_tokenizer(preset, run_dir)
    heads = Heads(vq.cfg.dim, vq.cfg.n_codes, preset.ar_token_px)
    heads.load_state_dict(trained_weights(load_stage(run_dir, "tokenizer"), "heads"))
    with torch.no_grad():
        e = F.normalize(vq.vq.quantize.embedding.weight, dim=-1)
        return heads.label(post_quant(vq, e)).argmax(-1) >= NUM_BACKGROUND_LABELS


def check_object_weight(preset: TrainPreset, data: str, object_weight: float | None, default: float) -> float:
    """Object weighting reads the region labels of a tokenizer trained here on synthetic data."""
    if object_weight is None:
        return default if data == "synthetic" and preset.init is None else 1.0
    if object_weight != 1 and data != "synthetic":
        raise ValueError("--object-weight needs --data synthetic: it reads the tokenizer's region labels, and a "
                         "tokenizer trained on real images has none")
    if object_weight != 1 and preset.init is not None:
        raise ValueError("--object-weight reads the label head of a tokenizer trained in this run folder; a "
                         "fine-tuned model's tokenizer (--init) has none")
    return object_weight


def weight_of_code(preset: TrainPreset, run_dir: Path, object_weight: float) -> Tensor:
    """[n_codes] loss weight per code: object_weight for object/text codes, 1 for background ones."""
    return 1 + (object_weight - 1) * code_is_object(preset, run_dir).float()


def sequence(cfg: ARConfig, pt: PromptTokenizer, example: dict, grids: dict,
             object_weight: Tensor | None = None) -> tuple[Tensor, ...]:
    """One example -> (ids [L], positions [3, L], targets [L] (-100 = no loss), weights [L]). The image size the
    prompt asks for is the target grid's (any aspect ratio: buckets).

    object_weight: [n_codes] loss weight of each target code (None: 1)."""
    px = pt.token_px
    if example["kind"] == "t2i":
        full = grids["image"]                                                   # [th, tw]
        prompt = pt.t2i(example["caption"], full.shape[0] * px, full.shape[1] * px)
        (ph, pw), _ = prompt.target_grids
        gen = [preview_of(full, ph, pw).flatten(), full.flatten()]
        w = [torch.full((ph * pw,), PREVIEW_WEIGHT), torch.ones(full.numel())]
    else:
        target = grids["target"]
        prompt = pt.i2i(example["instruction"], [grids["source"]], target.shape[0] * px, target.shape[1] * px)
        gen, w = [target.flatten()], [torch.ones(target.numel())]
    ids = prompt.input_ids[0]
    gen, w = torch.cat(gen), torch.cat(w)
    if object_weight is not None:
        w = w * object_weight[gen]
    P = len(ids)
    seq = torch.cat([ids, gen])
    pos = sample_positions(cfg, ids.tolist(), prompt.ref_grids, prompt.target_grids)   # [3, P + N]
    targets = torch.full_like(seq, -100)
    weights = torch.zeros(len(seq))
    targets[P - 1:-1], weights[P - 1:-1] = gen, w            # logits at j predict token j + 1
    return seq, pos, targets, weights


def collate(items: list[tuple[Tensor, ...]], pad_id: int) -> tuple[Tensor, ...]:
    L = max(len(s) for s, *_ in items)
    B = len(items)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.ones(3, B, L, dtype=torch.long)
    targets = torch.full((B, L), -100, dtype=torch.long)
    weights = torch.zeros(B, L)
    for b, (s, p, t, w) in enumerate(items):
        n = len(s)
        ids[b, :n], pos[:, b, :n], targets[b, :n], weights[b, :n] = s, p, t, w
    return ids, pos, targets, weights


def ar_loss(model: ARModel, ids: Tensor, pos: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, dict]:
    L = ids.shape[1]
    mask = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()[None, None]
    logits = model(ids, pos, mask)                                               # [B, L, V]
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().clamp_min(0), reduction="none")
    w = weights.flatten()
    loss = (ce * w).sum() / w.sum()
    with torch.no_grad():
        sel = targets.flatten() >= 0
        acc = logits.flatten(0, 1)[sel].argmax(-1).eq(targets.flatten()[sel]).float().mean()
    return loss, {"token_acc": acc, "ce": ce[targets.flatten() >= 0].mean().detach()}


class Tokenized:
    """A source's examples with their VQ grids (t2i: {"image": grid}; edits: {"target", "source"}). Real images
    repeat every `distinct` indices (example i is image i mod the image count), so their caption and grid are kept
    after the first read: from the second epoch on a step reads and tokenizes nothing (a grid depends only on the
    fitted image, so the numbers are the same). Synthetic scenes (distinct None) never repeat: read and tokenized
    every time."""

    def __init__(self, fetch: Prefetch, encode: Callable[[list], list[Tensor]], distinct: int | None):
        self.fetch, self.encode, self.distinct = fetch, encode, distinct
        self.kept: dict[int, tuple[dict, Tensor]] = {}  # i mod distinct -> (caption-only example, int32 grid)

    def ahead(self, indices) -> None:
        self.fetch.ahead([i for i in indices if self.distinct is None or i % self.distinct not in self.kept])

    def get(self, indices) -> list[tuple[dict, dict]]:
        out: dict[int, tuple[dict, dict]] = {}
        todo = [i for i in indices if self.distinct is None or i % self.distinct not in self.kept]
        ex = self.fetch.get(todo)
        images = [e["image"] if e["kind"] == "t2i" else e["target"] for e in ex]
        sources = [e["source"] for e in ex if e["kind"] == "edit"]
        grids = self.encode(images + sources)
        src_iter = iter(grids[len(images):])
        for i, e, g in zip(todo, ex, grids[:len(images)]):
            out[i] = (e, {"image": g} if e["kind"] == "t2i" else {"target": g, "source": next(src_iter)})
            if self.distinct is not None:                 # real images: t2i
                self.kept[i % self.distinct] = ({"kind": "t2i", "caption": e["caption"]}, g.to(torch.int32))
        for i in indices:
            if i not in out:
                e, g = self.kept[i % self.distinct]
                out[i] = (e, {"image": g.long()})
        return [out[i] for i in indices]


def train(preset: TrainPreset, out: Path, data: str = "synthetic", steps: int | None = None, resume: bool = False,
          seed: int = 0, progress: bool = True, stop_at: int | None = None,
          object_weight: float | None = None, rt: Runtime | None = None, lora: int | None = None,
          recompute: bool = False, compile: bool = False, buckets: float | None = None, val: int = 0,
          val_data: str | None = None, val_every: int | None = None, workers: int = 4, samples: int = 0,
          sample_every: int | None = None, sample_model: str | None = None,
          edit_share: float | None = None, text_dropout: float = 0.0) -> list[dict]:
    """object_weight: loss weight of object/text tokens relative to background ones (default OBJECT_WEIGHT on
    synthetic data, 1 on real data; the shipped model: 1.0 for the first 1000 steps, then 4.0 on --resume; see the
    model card). lora: train rank-`lora` adapters on the decoder layers of a frozen AR (fine-tuning, preset.init).
    recompute: activation checkpointing per decoder layer (common.recompute). compile: each decoder layer
    torch.compile'd (common.compile_blocks). buckets: aspect-ratio buckets up to buckets:1 for real images
    (data.bucket_sizes); a batch may mix them (its sequences are padded to the longest). val: log the loss of
    `val` held-out examples (data.held_out; val_data for real data) every val_every steps (default: the
    checkpoint interval) as val_loss. workers: threads reading real images ahead of the steps (data.Prefetch; 0:
    read in the step). samples: every sample_every steps (default: the checkpoint interval) the AR writes the
    grids of that many held-out (else training) captions, decoded by sample_model's decoder (default: the --init
    model) into DIR/ar/samples/ (sample_grids). edit_share: the share of synthetic examples that are edits
    (edit_kinds; default one in three). text_dropout: the share of training examples whose text is emptied
    (text_dropped), so that the AR can be sampled with classifier-free guidance (0: none, as the shipped model)."""
    rt = rt or Runtime()
    object_weight = check_object_weight(preset, data, object_weight, OBJECT_WEIGHT)
    identity = finetune_identity(preset, lora, buckets)
    kinds = edit_kinds(edit_share) if has_synthetic(data) else ("t2i",)     # (real images: t2i)
    if edit_share is not None:
        if not has_synthetic(data):
            raise ValueError("--edit-share mixes synthetic edit examples in: it needs synthetic data in --data")
        identity = {**identity, "edit_share": edit_share}
    if not 0 <= text_dropout < 1:
        raise ValueError(f"--text-dropout is the share of examples trained with empty text, in [0, 1), got "
                         f"{text_dropout}")
    if text_dropout:
        identity = {**identity, "text_dropout": text_dropout}
    sizes = bucket_sizes(preset.image_size, preset.ar_token_px, buckets)
    cfg = preset.stages["ar"]
    steps = steps or cfg.steps
    vq = load_tokenizer(preset, out).to(rt.device)
    if preset.init is not None:                 # fine-tuning keeps the model's own text tokenizer
        pt = PromptTokenizer.from_dir(preset.init / "processor", preset.ar_token_px, preset.preview_side)
        tok = pt.tok
    else:
        if resume and checkpoint_path(out, "ar") is not None:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_str(load_stage(out, "ar")["extra"]["text_tokenizer"])
        else:
            tok = train_text_tokenizer(preset, seed)
        pt = prompt_tokenizer(tok, preset)
    model = build_ar(preset, text_vocab_size(tok, preset), seed)
    models, trainable = wrap_blocks("ar", model, model.decoder.layers, rt, seed, lora, recompute, compile)

    def encode(images):
        return encode_batch(vq, images, preset)

    raw = make_source(data, seed, preset.image_size, sizes, kinds=kinds, **SCENE_KWARGS)
    source = Tokenized(Prefetch(raw, workers), encode, None if has_synthetic(data) else len(raw))
    code_weights = weight_of_code(preset, out, object_weight) if object_weight != 1 else None
    validation = None
    if val:
        held, n_val = held_out(val, data, val_data, seed, preset.image_size, sizes, kinds=kinds, **SCENE_KWARGS)
        if n_val < cfg.batch:
            raise ValueError(f"--val must hold at least one batch ({cfg.batch} examples), got {n_val}")
        held = Tokenized(Prefetch(held, workers), encode, None if val_data is None else n_val)
        validation = Validation(n_val // cfg.batch, val_every or cfg.ckpt_every,
                                lambda b: batch_loss(held, range(b * cfg.batch, (b + 1) * cfg.batch)))

    def batch_loss(source: Tokenized, indices: range, ahead: range | None = None, dropout: float = 0.0):
        """This process's rows of the examples `indices` of `source`: (loss, weight, metrics). ahead: the next
        batch's indices, read while this one runs. dropout: the text dropout (training examples only)."""
        rows = indices[rt.rows(cfg.batch)]
        pairs = source.get(rows)
        if ahead is not None:
            source.ahead(ahead[rt.rows(cfg.batch)])
        items = [sequence(model.cfg, pt, without_text(e) if text_dropped(seed, i, dropout) else e, grids,
                          code_weights) for i, (e, grids) in zip(rows, pairs)]
        ids, pos, targets, weights = (t.to(rt.device) for t in collate(items, pt.pad_id))
        loss, metrics = ar_loss(model, ids, pos, targets, weights)
        return loss, weights.sum(), metrics

    sampling = None
    if samples:
        if rt.shard:
            raise ValueError("--samples with --shard: the AR's sampling loop calls its layers one by one, which "
                             "sharded weights do not allow; sample from an exported checkpoint instead")
        decoder_model = sample_model or preset.init
        if decoder_model is None:
            raise ValueError("--samples for the AR decodes its grids with a trained decoder: give --sample-model "
                             "MODEL (an exported model whose decoder matches this run's tokenizer), or train with "
                             "--init")
        texts = []
        for i in range(10 * samples):                       # the first t2i examples' captions
            e = (held if val else source).fetch.get([i])[0]
            if e["kind"] == "t2i":
                texts.append(e["caption"])
            if len(texts) == samples:
                break
        sampling = Sampling(sample_every or cfg.ckpt_every,
                            sample_grids(model, pt, texts, preset.image_size, decoder_model, rt, Path(out) / "ar"))

    def step_fn(step: int, gen: torch.Generator):
        B = cfg.batch
        return batch_loss(source, range(step * B, (step + 1) * B), ahead=range((step + 1) * B, (step + 2) * B),
                          dropout=text_dropout)

    return train_loop("ar", out, models, trainable, step_fn, cfg, seed, steps, resume,
                      extra=lambda: {"text_tokenizer": tok.to_str()}, plot_keys=["loss", "ce", "val_loss"],
                      progress=progress, stop_at=stop_at, rt=rt,
                      shard_units=lambda: ([*model.decoder.layers, model], []), identity=identity, val=validation,
                      sample=sampling)


def sample_grids(model: ARModel, pt: PromptTokenizer, prompts: list[str], size: int, decoder_model, rt: Runtime,
                 out_dir: Path) -> Callable[[int], None]:
    """fn(step): the AR in training samples the t2i grids of `prompts` (seeds 0..n-1, the decoder model's sampling
    settings, generation_config.json) and `decoder_model`'s decoder (glyph, DiT, VAE; held on the host between
    uses) paints them (SAMPLE_STEPS Euler steps, CFG SAMPLE_GUIDANCE); process 0 writes samples/step_<step>.png."""
    from glmimage.ar import generate_prior
    from glmimage.pipeline import Pipeline
    from glmimage.prompt import collate
    dtype = rt.autocast or torch.float32
    pipe = Pipeline.from_pretrained(decoder_model, device=rt.device, dtype=dtype, offload=True)
    codes = pipe.dit_cfg.prior_vq_quantizer_codebook_size
    if pipe.ar_token_px != pt.token_px or codes != model.cfg.boi_id:
        raise ValueError(f"--sample-model {decoder_model}: its decoder reads {codes} codes of {pipe.ar_token_px} px, "
                         f"this AR writes {model.cfg.boi_id} codes of {pt.token_px} px: give a model exported with "
                         f"this run's tokenizer")
    temperature, top_p, top_k = pipe._sampling(None, None, None)
    seeds = list(range(len(prompts)))

    def fn(step: int) -> None:
        reqs = [pt.t2i(p, size, size) for p in prompts]
        ids, mask = collate(reqs, model.cfg.pad_id)                                 # left-padded [n, S]
        grid = generate_prior(model, ids.to(rt.device), [], reqs[0].target_grids, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seeds,
                              attention_mask=mask.to(rt.device) if len(prompts) > 1 else None)[-1]   # [n, th, tw]
        images = pipe.decode_grid(prompts, grid, size, size, SAMPLE_STEPS, SAMPLE_GUIDANCE, seeds)
        if rt.main:
            save_samples([images], out_dir, step)

    return fn
