"""Stage 1: the VAE (diffusers AutoencoderKL, 16 latent channels, 8x down), as the pipeline loads it.

Loss: L1 + MSE reconstruction of a posterior sample, plus a small KL (1e-6). Trained on random crops (the model is
fully convolutional, crops cost a quarter of the full image). When done, the per-channel mean/std of the posterior
mode over held-out images go to stats.json and, at export, to vae/config.json latents_mean / latents_std (GLM-Image
normalises latents per channel).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from glmimage.train.common import Runtime, train_loop
from glmimage.train.data import make_source, to_pixels
from glmimage.train.presets import TrainPreset, model_configs

KL_WEIGHT = 1e-6
STATS_IMAGES = 256
STATS_SEED_OFFSET = 10_000  # held-out images for the latent statistics


def build_vae(preset: TrainPreset, seed: int):
    from diffusers import AutoencoderKL
    cfg = dict(model_configs(preset, 260)["vae"])
    cfg.pop("latents_mean"), cfg.pop("latents_std")
    torch.manual_seed(seed)
    return AutoencoderKL(**cfg)


@torch.no_grad()
def latent_stats(vae, source, n: int, batch: int = 16) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior mode over n examples."""
    vae.eval()
    zs = []
    for i in range(0, n, batch):
        x = to_pixels([source.example(j)["image"] for j in range(i, min(n, i + batch))])
        zs.append(vae.encode(x.to(vae.device)).latent_dist.mode().float().cpu())
    z = torch.cat(zs).transpose(0, 1).flatten(1)                     # [C, N*h*w]
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-3).tolist()


def train(preset: TrainPreset, out: Path, data: str = "synthetic", steps: int | None = None, resume: bool = False,
          seed: int = 0, progress: bool = True, stop_at: int | None = None, rt: Runtime | None = None) -> list[dict]:
    rt = rt or Runtime()
    cfg = preset.stages["vae"]
    steps = steps or cfg.steps
    vae = build_vae(preset, seed)
    # more words (including unseen uppercase strings) than the scene default: glyphs are the hard part to reconstruct
    source = make_source(data, seed, preset.image_size, word_p=0.6, unseen_p=0.3)
    crop = preset.image_size // 2

    def step_fn(step: int, gen: torch.Generator):
        rows = rt.rows(cfg.batch)
        idx = range(step * cfg.batch, (step + 1) * cfg.batch)[rows]
        x = to_pixels([source.example(i)["image"] for i in idx])      # [b, 3, S, S], this process's rows
        # one random 8-aligned crop per image (drawn for the whole batch: the same numbers at any process count)
        n = (preset.image_size - crop) // 8 + 1
        offs = (torch.randint(0, n, (cfg.batch, 2), generator=gen) * 8)[rows]
        x = torch.stack([im[:, y:y + crop, xo:xo + crop] for im, (y, xo) in zip(x, offs.tolist())]).to(rt.device)
        post = vae.encode(x).latent_dist
        noise = torch.randn((cfg.batch, *post.mean.shape[1:]), generator=gen)[rows]
        z = post.mean + post.std * noise.to(rt.device)
        rec = vae.decode(z).sample.float()
        l1, mse = F.l1_loss(rec, x), F.mse_loss(rec, x)
        kl = post.kl().float().mean() / x[0].numel()
        loss = l1 + mse + KL_WEIGHT * kl
        return loss, len(idx), {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach()}

    log = train_loop("vae", out, {"vae": vae}, list(vae.parameters()), step_fn, cfg, seed, steps, resume,
                     plot_keys=["loss", "l1", "mse"], progress=progress, stop_at=stop_at, rt=rt)
    if rt.main:
        stats_source = make_source(data, seed + STATS_SEED_OFFSET, preset.image_size)
        n = min(STATS_IMAGES, 4 * cfg.batch) if preset.name == "debug" else STATS_IMAGES
        mean, std = latent_stats(vae, stats_source, n)
        (Path(out) / "vae" / "stats.json").write_text(json.dumps({"latents_mean": mean, "latents_std": std}))
    rt.barrier()
    return log


# ----------------------------------------------------------------------------------------------------------
# Stage 1b (optional): fine-tune the VAE decoder only, with object pixels weighted up. The encoder is frozen, so the
# latents, their statistics and everything trained on them (the decoder stage's cache) stay valid.

OBJECT_WEIGHT = 10.0


def train_decoder(preset: TrainPreset, out: Path, data: str = "synthetic", steps: int | None = None,
                  resume: bool = False, seed: int = 0, progress: bool = True, stop_at: int | None = None,
                  rt: Runtime | None = None) -> list[dict]:
    from glmimage.data.scenes import BACKGROUNDS
    from glmimage.train.common import load_stage, trained_weights
    rt = rt or Runtime()
    cfg = preset.stages["vae_decoder"]
    steps = steps or cfg.steps
    vae = build_vae(preset, seed)
    vae.load_state_dict(trained_weights(load_stage(out, "vae"), "vae"))
    vae.encoder.requires_grad_(False)
    trainable = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters() if vae.post_quant_conv
                                                       else [])
    source = make_source(data, seed + 1, preset.image_size, word_p=0.6, unseen_p=0.3)

    def step_fn(step: int, gen: torch.Generator):
        idx = range(step * cfg.batch, (step + 1) * cfg.batch)[rt.rows(cfg.batch)]
        ex = [source.example(i) for i in idx]
        x = to_pixels([e["image"] for e in ex])                                 # [b, 3, S, S]
        weight = torch.ones_like(x[:, :1])
        if "scene" in ex[0]:                                                    # up-weight non-background pixels
            bg = torch.tensor([BACKGROUNDS[e["scene"].background] for e in ex], dtype=torch.float32) / 127.5 - 1
            weight = 1 + OBJECT_WEIGHT * ((x - bg[:, :, None, None]).abs().amax(1, keepdim=True) > 0.05).float()
        x, weight = x.to(rt.device), weight.to(rt.device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample.float()
        err = rec - x
        l1 = (err.abs() * weight).mean() / weight.mean()
        mse = (err.pow(2) * weight).mean() / weight.mean()
        return l1 + mse, weight.sum(), {"l1": l1.detach(), "mse": mse.detach()}

    return train_loop("vae_decoder", out, {"vae": vae}, trainable, step_fn, cfg, seed, steps, resume,
                      plot_keys=["loss", "l1", "mse"], progress=progress, stop_at=stop_at, rt=rt)
