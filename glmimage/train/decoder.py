"""Stage 4: the DiT decoder (dit.DiT), flow matching on the trained VAE's normalised latents.

  x_sigma = (1 - sigma) x0 + sigma noise,  v = noise - x0  (schedule.py), MSE on v.
  s ~ U(0, 1] (or logit-normal: `timesteps`), sigma = time_shift(mu(N), s) and the DiT sees s * 1000 - 1: the same
  (timestep, sigma) pairs the inference schedule (make_schedule) produces, including its unshifted-timestep quirk.

Conditioning, as the pipeline feeds it:
  * prior ids: the tokenizer's ids of the target image (ground truth), nearest-upsampled to the DiT grid;
  * glyph: GlyphEncoder of the caption (t2i) or the instruction (edit), frozen: the run's trained one when
    `glmimage train glyph` ran first (train/glyph.py: its outputs say which character and where), else a random
    ByT5-shaped T5 (injective, but a letter's output barely depends on its position: see train/glyph.py);
  * size (H, W) and crop (top, left): the image's own (aspect-ratio buckets), and where a real image was cut
    when it was fitted to that size ((0, 0) for synthetic scenes; sampling asks for (0, 0): an uncropped look);
  * edits: the source image's reference KV prefix (dit.reference_kv, with gradients) on the conditional branch;
  * 10% of samples are unconditional, exactly the pipeline's CFG negative branch: glyph of "", prior dropped,
    no reference prefix.

object_weight (default 1: plain MSE) weighs the latent pixels under DiT tokens whose prior code the tokenizer labels
as an object or text (ar.code_is_object) that much more than background ones: flat background dominates the
latent, and shapes are what the decoder gets wrong.

VAE latents and token ids are computed once for a fixed set of examples (CACHE_SIZE by preset, or `cache_size`:
--cache N; rendering, the VAE encoder and the tokenizer cost ~22 ms per small-preset example on 2 CPU cores,
about a training step's ~27 ms per example) and stored in DIR/decoder/cache.pt; each epoch reads a seeded
permutation of that set, each batch of one size (epoch_batches: with aspect-ratio buckets, a bucket's batches fill
in the order the permutation reaches its examples). A larger cache costs its build time once and sees each example
fewer times: for the small model 16000 instead of 4000 narrowed the gap between training and fresh examples but did
not improve fresh ones (model card, History: "v3").
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glmimage.dit import Context, DiT, DiTConfig, rope_table, text_key_mask
from glmimage.glyph import GlyphEncoder
from glmimage.schedule import shift_mu, time_shift
from glmimage.train.common import (SAMPLE_GUIDANCE, SAMPLE_STEPS, Runtime, Sampling, ShardRoot, Validation,
                                   atomic_save, checkpoint_path, finetune_identity, load_stage, save_samples,
                                   train_loop, trained_weights, wrap_blocks)
from glmimage.train.data import (VAL_SEED_OFFSET, Prefetch, bucket_sizes, by_size, has_synthetic, held_out,
                                 make_source, to_pixels)
from glmimage.train.presets import TrainPreset, model_configs
from glmimage.train.tokenizer import encode_batch, load_tokenizer

DROP_P = 0.1
TIMESTEPS = ("uniform", "logit-normal")     # how training draws schedule positions (draw_positions)
CACHE_SIZE = {"debug": 8, "small": 4000}
SCENE_KWARGS = dict(paraphrase_p=0.3, word_p=0.5, chinese_p=0.3, unseen_p=0.3)


def build_glyph(preset: TrainPreset, seed: int, run_dir: Path | None = None) -> GlyphEncoder:
    """The run's trained glyph encoder when it has one (`glmimage train glyph`, train/glyph.py), else the init
    model's when fine-tuning, else a random ByT5-shaped one; frozen in every case."""
    from glmimage.train.glyph import build_t5, load_glyph
    t5 = load_glyph(preset, run_dir) if run_dir is not None else None
    if t5 is None and preset.init is not None:
        return GlyphEncoder.from_folder(preset.init / "text_encoder", dtype=torch.float32).requires_grad_(False)
    t5 = build_t5(preset, seed) if t5 is None else t5
    return GlyphEncoder(t5).eval().requires_grad_(False)


def build_dit(preset: TrainPreset, seed: int) -> DiT:
    """adaLN-Zero initialisation, or the init model's weights (fp32) when fine-tuning."""
    if preset.init is not None:
        from glmimage.loading import load_weights
        with torch.device("meta"):
            dit = DiT(DiTConfig.from_hf(preset.configs["transformer"]))
        return load_weights(dit, preset.init / "transformer", dtype=torch.float32)
    torch.manual_seed(seed + 2)
    dit = DiT(DiTConfig.from_hf(model_configs(preset, 260)["transformer"]))
    with torch.no_grad():                        # adaLN-Zero: every block starts as the identity, output 0
        for block in dit.transformer_blocks:
            block.norm1.linear.weight.zero_(), block.norm1.linear.bias.zero_()
        dit.norm_out.linear.weight.zero_(), dit.norm_out.linear.bias.zero_()
        dit.proj_out.weight.zero_(), dit.proj_out.bias.zero_()
        torch.nn.init.normal_(dit.prior_token_embedding.weight, std=0.02)
    return dit


def load_vae(preset: TrainPreset, run_dir: Path):
    """The run's trained VAE (frozen) and its latent statistics, or the init model's when fine-tuning."""
    from glmimage.train.vae import build_vae
    if preset.init is not None:
        from glmimage.vae import VAE
        vae = VAE.from_folder(preset.init / "vae", "cpu", torch.float32)
        return vae.model.to(memory_format=torch.contiguous_format).requires_grad_(False), vae.mean, vae.std
    vae = build_vae(preset, 0)
    vae.load_state_dict(trained_weights(load_stage(run_dir, "vae"), "vae"))
    stats = json.loads((Path(run_dir) / "vae" / "stats.json").read_text())
    mean = torch.tensor(stats["latents_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(stats["latents_std"]).view(1, -1, 1, 1)
    return vae.eval().requires_grad_(False), mean, std


@torch.no_grad()
def build_cache(preset: TrainPreset, run_dir: Path, data: str, seed: int, n: int | None,
                progress: bool = True, buckets: list[tuple[int, int]] | None = None, source=None,
                workers: int = 4) -> dict:
    """Normalised latents, upsampled prior ids, texts, pixel sizes and crops of n fixed examples (and the edit
    sources); n None: the preset's cache size (4000 unless named in CACHE_SIZE), or for a folder or shards of fewer
    images each once (their examples are deterministic, so repeats would only cost memory), but at least one batch.
    One size: "latents" [n, C, h, w] and "ids" [n, N]; several (buckets): lists of each example's tensors.
    source: the examples' source when it is not make_source(data, seed, ...) (the held-out ones)."""
    from tqdm import tqdm
    vae, mean, std = load_vae(preset, run_dir)
    vq = load_tokenizer(preset, run_dir)
    kinds = ("t2i", "t2i", "t2i", "edit") if has_synthetic(data) else ("t2i",)    # (real images: t2i)
    source = source or make_source(data, seed, preset.image_size, buckets, kinds=kinds, **SCENE_KWARGS)
    fetch = Prefetch(source, workers)
    if n is None:
        n = CACHE_SIZE.get(preset.name, 4000)
        if not has_synthetic(data):           # real images only: each once
            n = min(n, max(preset.stages["decoder"].batch, len(source)))
    u = preset.ar_token_px // (vae_scale(vae) * 2)

    def encode(images) -> list[tuple[Tensor, Tensor]]:
        """Each image's (latent [C, h, w] bf16, prior ids upsampled to the DiT grid [N]); one batch per size."""
        out = [None] * len(images)
        grids = encode_batch(vq, images, preset)
        for members in by_size(images).values():
            z = (vae.encode(to_pixels([images[i] for i in members])).latent_dist.mode() - mean) / std
            for k, i in enumerate(members):
                out[i] = z[k].to(torch.bfloat16), grids[i].repeat_interleave(u, 0).repeat_interleave(u, 1).flatten()
        return out

    cache = {"latents": [], "ids": [], "text": [], "size": [], "crop": [], "src_latents": {}, "src_ids": {}}
    B = 16
    for i in tqdm(range(0, n, B), desc="decoder cache", disable=not progress):
        ex = fetch.get(range(i, min(n, i + B)))
        fetch.ahead(range(i + B, min(n, i + 2 * B)))
        images = [e["image"] if e["kind"] == "t2i" else e["target"] for e in ex]
        for z, ids in encode(images):
            cache["latents"].append(z), cache["ids"].append(ids)
        cache["text"] += [e["caption"] if e["kind"] == "t2i" else e["instruction"] for e in ex]
        cache["size"] += [(im.height, im.width) for im in images]
        cache["crop"] += [e.get("crop", (0, 0)) for e in ex]
        edits = [k for k, e in enumerate(ex) if e["kind"] == "edit"]
        for k, (z, ids) in zip(edits, encode([ex[k]["source"] for k in edits])):
            cache["src_latents"][i + k], cache["src_ids"][i + k] = z, ids
    if len(set(cache["size"])) == 1:              # one size: one tensor each (what a cache has always held)
        cache["latents"], cache["ids"] = torch.stack(cache["latents"]), torch.stack(cache["ids"])
    cache["size"], cache["crop"] = torch.tensor(cache["size"]), torch.tensor(cache["crop"])
    cache["buckets"] = buckets
    return cache


def epoch_batches(sizes: Tensor | None, n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches of cached examples: a seeded permutation, cut into batches of one size each. sizes [n, 2]
    (None: one size) ; each size's batch fills in the order the permutation reaches its examples, and a size's last
    partial batch waits for no one (dropped this epoch; another permutation next). With one size these are the
    permutation's consecutive chunks. The count per epoch, sum over sizes of n_size // batch, never changes."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7777 + epoch)).tolist()
    keys = [None] * n if sizes is None else list(map(tuple, sizes.tolist()))
    pending: dict[tuple, list[int]] = {}
    out = []
    for i in perm:
        fill = pending.setdefault(keys[i], [])
        fill.append(i)
        if len(fill) == batch:
            out.append(fill)
            pending[keys[i]] = []
    return out


def vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def schedule_point(s: Tensor, n_tokens: int) -> tuple[Tensor, Tensor]:
    """Position s in (0, 1] -> (the DiT's timestep, sigma) for n_tokens image tokens: the pairs make_schedule makes."""
    return s * 1000 - 1, time_shift(shift_mu(n_tokens), s)


def draw_positions(kind: str, B: int, gen: torch.Generator) -> Tensor:
    """B schedule positions s in (0.001, 1]: "uniform", or "logit-normal", sigmoid of a standard normal (SD3, Esser
    et al. 2024: most draws mid-schedule, where an image's layout and shapes form; few at either end)."""
    if kind == "uniform":
        return torch.rand(B, generator=gen) * 0.999 + 0.001
    if kind == "logit-normal":
        return torch.sigmoid(torch.randn(B, generator=gen)).clamp(0.001, 1.0)
    raise ValueError(f"timesteps must be one of {', '.join(TIMESTEPS)}; got {kind!r}")


def velocity_loss(dit: DiT, glyph_enc: GlyphEncoder, cache: dict, idx: list[int], gen: torch.Generator,
                  size: int, code_weights: Tensor | None = None, rows: slice = slice(None),
                  every_call: bool = False, timesteps: str = "uniform") -> tuple[Tensor, Tensor | int, dict]:
    """The batch idx's flow-matching loss over its `rows` (this process's block): (loss, weight, metrics). The batch's
    examples share one size (epoch_batches); size: the square side of caches that hold no per-example sizes.

    Randomness is drawn for the whole batch and then sliced, so the rows' numbers do not depend on the split.
    code_weights: [n_codes] loss weight of the latent pixels under each prior code (None: plain MSE).
    every_call: run both row groups (plain, with a reference) even when one is empty, so that every process makes
    the same module calls whatever its rows (sharded weights are gathered by collectives around each call).
    timesteps: how the schedule positions are drawn (draw_positions)."""
    B = len(idx)
    device = dit.proj_out.weight.device
    drop_all = torch.rand(B, generator=gen) < DROP_P
    s_all = draw_positions(timesteps, B, gen)                                   # (0.001, 1]
    noise_all = torch.randn((B, *cache["latents"][idx[0]].shape), generator=gen)  # (a batch has one size)
    idx, drop, s, noise = idx[rows], drop_all[rows].tolist(), s_all[rows].to(device), noise_all[rows].to(device)
    B = len(idx)
    x0 = torch.stack([cache["latents"][i] for i in idx]).to(device).float()   # [B, C, h, w]
    ids = torch.stack([cache["ids"][i] for i in idx]).to(device)               # [B, N]
    texts = ["" if d else cache["text"][i] for i, d in zip(idx, drop)]
    p = dit.cfg.patch_size
    grid = (x0.shape[2] // p, x0.shape[3] // p)
    timestep, sigma = schedule_point(s, grid[0] * grid[1])                    # the inference mapping
    xt = (1 - sigma.view(B, 1, 1, 1)) * x0 + sigma.view(B, 1, 1, 1) * noise
    target = noise - x0
    if "size" in cache:                       # (caches written before buckets: square, uncropped)
        size_t, crop = cache["size"][idx].float().to(device), cache["crop"][idx].float().to(device)   # [B, 2] each
    else:
        size_t, crop = torch.tensor([[size, size]] * B, dtype=torch.float32, device=device), x0.new_zeros(B, 2)
    vec = dit.embed_vec(timestep, size_t, crop)                                 # [B, E]
    glyph, txt_len = glyph_enc.encode(texts)                                    # [B, T, Dt] (frozen), [B]
    txt = dit.glyph_projector(glyph)
    prior = dit.prior_projector(dit.prior_token_embedding(ids))                 # [B, N, D]
    empty = dit.prior_projector(txt.new_zeros(1, 1, dit.cfg.dim))               # the dropped prior
    prior = torch.where(torch.tensor(drop, device=device).view(B, 1, 1), empty.expand_as(prior), prior)
    rope = rope_table(*grid, dit.cfg.attention_head_dim, device)
    with_ref = [b for b, i in enumerate(idx) if i in cache["src_latents"] and not drop[b]]
    plain = [b for b in range(B) if b not in with_ref]
    v = torch.zeros_like(x0)
    for group in (plain, with_ref):
        if not group and not every_call:
            continue
        g = torch.tensor(group, dtype=torch.long, device=device)
        ref_kv = None
        if group is with_ref:
            src = x0.new_zeros(0, *x0.shape[1:])                                  # [0, C, h, w] when empty
            src_ids = ids.new_zeros(0, ids.shape[1])
            if group:
                src = torch.stack([cache["src_latents"][idx[b]] for b in group]).to(device).float()
                src_ids = torch.stack([cache["src_ids"][idx[b]] for b in group]).to(device)
            ref_kv = dit.reference_kv([src], [src_ids], [(size, size)])       # (edits: synthetic, square)
        mask = text_key_mask(txt_len[g], txt.shape[1], grid[0] * grid[1], ref_kv)  # hide each text's padding
        ctx = Context(txt[g], prior[g], rope, ref_kv, mask, txt_len[g])
        v = v.index_put((g,), dit.velocity(xt[g], ctx, vec[g]).float())
    metrics = {"edit_frac": len(with_ref) / B}
    if code_weights is None:
        return F.mse_loss(v, target), B, metrics
    w = code_weights[ids].view(B, 1, *grid)                                    # [B, 1, gh, gw] per DiT token
    w = w.repeat_interleave(p, 2).repeat_interleave(p, 3)                       # [B, 1, h, w] per latent pixel
    err = (v - target).pow(2)                                                   # [B, C, h, w]
    loss = (err * w).sum() / (w.sum() * err.shape[1])                           # = MSE when every weight is 1
    return loss, w.sum(), {**metrics, "mse": err.mean().detach()}


def train(preset: TrainPreset, out: Path, data: str = "synthetic", steps: int | None = None, resume: bool = False,
          seed: int = 0, progress: bool = True, stop_at: int | None = None, object_weight: float | None = None,
          rt: Runtime | None = None, cache_size: int | None = None, lora: int | None = None,
          recompute: bool = False, compile: bool = False, buckets: float | None = None, val: int = 0,
          val_data: str | None = None, val_every: int | None = None, workers: int = 4, samples: int = 0,
          sample_every: int | None = None, timesteps: str | None = None) -> list[dict]:
    """object_weight: loss weight of object/text regions vs background (see the model card).
    cache_size: examples whose latents and ids are cached (default: build_cache's).
    lora: train rank-`lora` adapters on the blocks of a frozen DiT (fine-tuning, preset.init) instead of every
    weight. recompute: activation checkpointing per DiT block (common.recompute). compile: each DiT block
    torch.compile'd (common.compile_blocks). buckets: aspect-ratio buckets up to buckets:1 for real images
    (data.bucket_sizes); each batch holds one bucket (epoch_batches). val: log the loss of `val` held-out examples
    (data.held_out; val_data for real data; cached in DIR/decoder/val_cache.pt) every val_every steps (default: the
    checkpoint interval) as val_loss, each at fixed noise and times. workers: threads reading real images ahead
    while the cache is built (data.Prefetch; 0: in turn). samples: every sample_every steps (default: the
    checkpoint interval) draw that many held-out (else training) examples from their tokens and captions into
    DIR/decoder/samples/ (sample_images). timesteps: how the schedule positions are drawn (draw_positions; default
    "uniform"); another is recorded in the checkpoint's identity, so that a resume with another choice is refused;
    the held-out loss keeps uniform positions, comparable across runs."""
    from glmimage.train.ar import check_object_weight, weight_of_code
    rt = rt or Runtime()
    object_weight = check_object_weight(preset, data, object_weight, 1.0)
    identity = finetune_identity(preset, lora, buckets)
    if timesteps is not None:
        draw_positions(timesteps, 1, torch.Generator())         # an unknown kind fails here, before any work
    if timesteps not in (None, "uniform"):                      # (uniform: the default, no identity entry)
        identity = {**identity, "timesteps": timesteps}
    sizes = bucket_sizes(preset.image_size, preset.ar_token_px, buckets)
    cfg = preset.stages["decoder"]
    steps = steps or cfg.steps
    if cache_size is not None and cache_size < cfg.batch:
        raise ValueError(f"--cache must hold at least one batch ({cfg.batch} examples), got {cache_size}")
    cache_path = Path(out) / "decoder" / "cache.pt"
    if not cache_path.exists() and rt.main:          # one process builds the cache, the others read it
        atomic_save(build_cache(preset, out, data, seed, cache_size, progress, sizes, workers=workers), cache_path)
    rt.barrier()
    cache = torch.load(cache_path, weights_only=False)
    n = len(cache["text"])
    if cache_size is not None and n != cache_size:
        raise ValueError(f"{cache_path} holds {n} examples, not --cache {cache_size}: pass --cache {n} to continue "
                         f"with it, or use a new run folder")
    if cache.get("buckets") != sizes and (sizes or cache.get("buckets")):
        raise ValueError(f"{cache_path} was built {'with --buckets' if cache.get('buckets') else 'without --buckets'}"
                         f", unlike this run: give the flags it was built with, or use a new run folder")
    batches = {}                        # epoch -> its batches (epoch_batches)
    per_epoch = len(epoch_batches(cache.get("size"), n, cfg.batch, seed, 0))
    if per_epoch == 0:
        sizes_held = sorted({tuple(x) for x in cache["size"].tolist()}) if "size" in cache else "one"
        raise ValueError(f"no image size (aspect bucket) holds a whole batch of {cfg.batch} among the {n} cached "
                         f"examples (sizes {sizes_held}): give a smaller --batch, more images, or fewer buckets")
    glyph = build_glyph(preset, seed, out)
    if checkpoint_path(out, "glyph") is not None:     # a trained glyph encoder: a resume must keep it
        identity = {**identity, "glyph": "trained"}
    glyph.memo = {}                     # frozen: each quoted-text tuple is encoded once, then looked up
    dit = build_dit(preset, seed)
    models, trainable = wrap_blocks("dit", dit, dit.transformer_blocks, rt, seed, lora, recompute, compile)
    if lora:                    # the frozen glyph encoder is not saved with the adapters: placed here
        glyph.to(rt.device)
    else:
        models["glyph"] = glyph.t5
    code_weights = None
    if object_weight != 1:
        code_weights = weight_of_code(preset, out, object_weight).to(rt.device)

    root = ShardRoot(dit)               # the loss calls the DiT's parts one by one: one forward around them all
    validation = None
    if val:
        validation = held_out_loss(preset, out, data, val_data, val, val_every or cfg.ckpt_every, seed, sizes, rt,
                                   progress, workers, lambda vcache, idx, gen: root(lambda: velocity_loss(
                                       dit, glyph, vcache, idx, gen, preset.image_size, code_weights,
                                       rt.rows(cfg.batch), every_call=rt.shard)))

    def step_fn(step: int, gen: torch.Generator):
        epoch, k = divmod(step, per_epoch)
        if epoch not in batches:
            batches.clear()
            batches[epoch] = epoch_batches(cache.get("size"), n, cfg.batch, seed, epoch)
        idx = batches[epoch][k]
        return root(lambda: velocity_loss(dit, glyph, cache, idx, gen, preset.image_size, code_weights,
                                          rt.rows(cfg.batch), every_call=rt.shard,
                                          timesteps=timesteps or "uniform"))

    sampling = None
    if samples:
        sampling = Sampling(sample_every or cfg.ckpt_every, sample_images(
            preset, out, dit, glyph, validation.cache if val else cache, samples, rt, root))

    return train_loop("decoder", out, models, trainable, step_fn, cfg, seed, steps, resume,
                      plot_keys=["loss", "mse", "val_loss"], progress=progress, stop_at=stop_at, rt=rt,
                      shard_units=lambda: shard_units(root), identity=identity, val=validation, sample=sampling)


def held_out_loss(preset: TrainPreset, out: Path, data: str, val_data: str | None, n: int, every: int, seed: int,
                  sizes, rt: Runtime, progress: bool, workers: int, loss_fn) -> Validation:
    """The decoder's Validation: n held-out examples (data.held_out) cached like the training ones (val_cache.pt,
    built again when --val or --val-data changes), in whole batches of one size; batch b draws its noise, times
    and dropped conditions from a generator seeded by b alone, so every evaluation sees the same ones."""
    cfg = preset.stages["decoder"]
    path = Path(out) / "decoder" / "val_cache.pt"
    key = {"n": n, "val_data": val_data, "buckets": sizes}
    if rt.main:
        cache = torch.load(path, weights_only=False) if path.exists() else None
        if cache is None or cache.get("key") != key:
            kinds = ("t2i", "t2i", "t2i", "edit") if val_data is None else ("t2i",)
            source, count = held_out(n, data, val_data, seed, preset.image_size, sizes, kinds=kinds, **SCENE_KWARGS)
            cache = build_cache(preset, out, data, seed, count, progress, sizes, source=source, workers=workers)
            cache["key"] = key
            atomic_save(cache, path)
    rt.barrier()
    cache = torch.load(path, weights_only=False)
    batches = epoch_batches(cache.get("size"), len(cache["text"]), cfg.batch, VAL_SEED_OFFSET, 0)
    if not batches:
        raise ValueError(f"--val must hold at least one batch of {cfg.batch} examples of one size, got "
                         f"{len(cache['text'])}")
    return Validation(len(batches), every,
                      lambda b: loss_fn(cache, batches[b], torch.Generator().manual_seed(VAL_SEED_OFFSET + b)),
                      cache)


def sample_images(preset: TrainPreset, out: Path, dit: DiT, glyph: GlyphEncoder, cache: dict, n: int, rt: Runtime,
                  call: Callable[[Callable], object]) -> Callable[[int], None]:
    """fn(step): the first n text-to-image examples of `cache` (of its first example's size) drawn by the DiT from
    their prior tokens and captions, as the pipeline samples (Euler, SAMPLE_STEPS steps, CFG SAMPLE_GUIDANCE, the
    noise of seeds 0..n-1), decoded by the run's VAE; process 0 writes samples/step_<step>.png: the cached images
    (through the VAE) above, the samples below. call(fn): runs fn inside the training root (sharded weights)."""
    from glmimage.loading import read_json
    from glmimage.pipeline import sample_latents
    from glmimage.random_checkpoint import SCHEDULER_CONFIG
    from glmimage.schedule import make_schedule
    from glmimage.vae import VAE, pixels_to_pil
    vae_model, mean, std = load_vae(preset, out)
    vae = VAE(vae_model.to(rt.device), mean.flatten().tolist(), std.flatten().tolist())
    shape = cache["latents"][0].shape
    idx = [i for i in range(len(cache["text"])) if i not in cache["src_latents"]
           and cache["latents"][i].shape == shape][:n]
    if len(idx) < n:
        raise ValueError(f"--samples {n}: only {len(idx)} text-to-image examples of one size to draw from")
    scheduler = (read_json(preset.init / "scheduler" / "scheduler_config.json") if preset.init is not None
                 else SCHEDULER_CONFIG)
    x0 = torch.stack([cache["latents"][i] for i in idx]).to(rt.device).float()          # [n, C, h, w]
    ids = torch.stack([cache["ids"][i] for i in idx]).to(rt.device)                     # [n, N]
    texts = [cache["text"][i] for i in idx]
    size = cache["size"][idx].float() if "size" in cache else torch.tensor([[preset.image_size] * 2] * n).float()
    noise = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(k)) for k in range(n)])
    p = dit.cfg.patch_size
    grid = (shape[1] // p, shape[2] // p)
    truth = pixels_to_pil(vae.decode(x0))

    def fn(step: int) -> None:
        def draw():
            timesteps, sigmas = make_schedule(SAMPLE_STEPS, grid[0] * grid[1], scheduler)
            n_t = len(timesteps)
            sz = size[:1].to(rt.device).expand(n_t, 2)
            mods = dit.modulation(dit.embed_vec(timesteps.to(rt.device), sz, torch.zeros_like(sz)))
            g, g_len = glyph.encode(texts)
            g_neg, _ = glyph.encode([""] * n)
            return sample_latents(dit, noise.to(rt.device), g, g_len, g_neg, ids, grid, mods, timesteps, sigmas,
                                  SAMPLE_GUIDANCE)[0]
        latents = call(draw)
        if rt.main:
            save_samples([truth, pixels_to_pil(vae.decode(latents.float()))], Path(out) / "decoder", step)

    return fn


def shard_units(root: ShardRoot) -> tuple[list[nn.Module], list[tuple[nn.Module, str]]]:
    """The DiT's FSDP units: every module the loss calls from outside a block (the projectors, the time embedding,
    each block's AdaLN linear, the output head), each block with its `kv_only` (the reference pass), then the root."""
    dit = root.model
    blocks = list(dit.transformer_blocks)
    units = [b.norm1.linear for b in blocks] + blocks
    units += [dit.image_projector.proj, dit.glyph_projector, dit.prior_token_embedding, dit.prior_projector,
              dit.time_condition_embed, dit.norm_out.linear, dit.proj_out]
    assert {id(p) for m in units for p in m.parameters()} == {id(p) for p in dit.parameters()}
    return units + [root], [(b, "kv_only") for b in blocks]
