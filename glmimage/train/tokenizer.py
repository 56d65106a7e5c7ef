"""Stage 2: the semantic image tokenizer (vision.ImageTokenizer: ViT + quant_conv + cosine codebook).

What "semantic" means here: a token says what is in its region (which object colour x shape, text, or which
background) and roughly where inside the region it is, not the exact pixels. Training signal, all on the quantized
features (straight-through), through the checkpoint's own `post_quant_conv`:
  * label head: cross-entropy against the renderer's per-region labels (glmimage.data.scenes.label_map at the AR
    token size): forces tokens to separate shapes, colours, text and backgrounds;
  * pixel head (light, weight 1): MSE reconstruction of the region's pixels at 1/4 resolution, so tokens keep
    coverage/position detail (which part of a shape sits in the cell) that the decoder needs;
  * VQ: codebook + 0.25 x commitment losses on unit vectors (the codebook is cosine), and dead-code restarts every
    `RESTART_EVERY` steps from the current batch's features (drawn from the step's generator, so resume is exact).
On real data (--data PATH) there are no region labels: the label loss is left out and the tokenizer learns from
the pixel head and the VQ losses alone, i.e. tokens that keep their region's coarse look, less semantic than with
labels. The heads are training-only and are not exported; the ViT, quant_conv, codebook and post_quant_conv are.
Images go through vision.preprocess (the processor's halving + bicubic resize), as at inference.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glmimage.data.scenes import NUM_LABELS
from glmimage.train.common import Runtime, train_loop
from glmimage.train.data import make_source, to_pixels
from glmimage.train.presets import TrainPreset, model_configs
from glmimage.vision import ImageTokenizer, VisionConfig, preprocess

BETA = 0.25
RESTART_EVERY = 50
PIXEL_DOWN = 4          # the pixel head predicts each token's region at 1/4 resolution


def build_tokenizer(preset: TrainPreset, seed: int) -> ImageTokenizer:
    torch.manual_seed(seed)
    tok = ImageTokenizer(VisionConfig.from_hf(model_configs(preset, 260)["vision_language_encoder"]))
    for m in tok.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(tok.vit.embeddings.position_embedding.weight, std=0.02)
    nn.init.normal_(tok.vq.quantize.embedding.weight)
    return tok


class Heads(nn.Module):
    """Training-only heads on post_quant_conv(quantized): labels and a coarse pixel reconstruction."""

    def __init__(self, dim: int, n_codes: int, token_px: int):
        super().__init__()
        self.out_px = token_px // PIXEL_DOWN
        self.label = nn.Linear(dim, NUM_LABELS)
        self.pixels = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 3 * self.out_px ** 2))
        self.register_buffer("usage", torch.zeros(n_codes))  # code hits since the last restart


def vit_features(tok: ImageTokenizer, pixels: Tensor) -> Tensor:
    """Batched ViT: pixels [B, 3, H, W] -> features [B, N, C] (the same weights and math as ViT.forward)."""
    vit = tok.vit
    p = vit.patch_embed.p
    B, _, H, W = pixels.shape
    h, w = H // p, W // p
    x = vit.patch_embed.proj(pixels).flatten(2).transpose(1, 2) + vit.embeddings(h, w)   # [B, N, C]
    N, C = h * w, x.shape[-1]
    for blk in vit.blocks:
        a = blk.attn
        q, k, v = a.qkv(blk.norm1(x)).view(B, N, 3, a.n_heads, -1).permute(2, 0, 3, 1, 4)   # [B, heads, N, d]
        x = x + a.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        x = x + blk.mlp(blk.norm2(x))
    return x


def quantize(tok: ImageTokenizer, feats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """feats [B, N, C] -> (unit z [B, N, E], ids [B, N], unit codes e[ids] [B, N, E]); ids as VQ.forward."""
    z = F.normalize(F.linear(feats, tok.vq.quant_conv.weight[:, :, 0, 0], tok.vq.quant_conv.bias), dim=-1)
    e = F.normalize(tok.vq.quantize.embedding.weight, dim=-1)                # [n_codes, E]
    ids = (z @ e.T).argmax(-1)
    return z, ids, e[ids]


def post_quant(tok: ImageTokenizer, zq: Tensor) -> Tensor:
    return F.linear(zq, tok.vq.post_quant_conv.weight[:, :, 0, 0], tok.vq.post_quant_conv.bias)


@torch.no_grad()
def encode_batch(tok: ImageTokenizer, images, preset: TrainPreset) -> list[Tensor]:
    """PIL images (sizes multiples of the AR token) -> each one's VQ ids [H / ar_token_px, W / ar_token_px], exactly
    through the inference preprocessing at the image's own size; images of one size run as one batch."""
    from glmimage.train.data import by_size
    grids: list[Tensor] = [None] * len(images)
    for (w, h), members in by_size(images).items():
        px = torch.stack([preprocess(images[i], min(w, h) ** 2, max(w, h) ** 2, preset.vision_patch)
                          for i in members])                                # [b, 3, H/2, W/2]: the processor halves
        _, ids, _ = quantize(tok, vit_features(tok, px.to(tok.vq.quant_conv.weight.device)))
        ids = ids.cpu().view(len(members), px.shape[-2] // preset.vision_patch, px.shape[-1] // preset.vision_patch)
        for k, i in enumerate(members):
            grids[i] = ids[k]
    return grids


def load_tokenizer(preset: TrainPreset, run_dir: Path) -> ImageTokenizer:
    """The run's trained tokenizer (frozen), or the init model's when fine-tuning."""
    from glmimage.train.common import load_stage, trained_weights
    if preset.init is not None:
        from glmimage.ar import AR_KEY_PREFIXES
        from glmimage.loading import load_weights
        from glmimage.vision import VISION_KEY_PREFIXES
        with torch.device("meta"):
            tok = ImageTokenizer(VisionConfig.from_hf(preset.configs["vision_language_encoder"]))
        tok = load_weights(tok, preset.init / "vision_language_encoder", VISION_KEY_PREFIXES, dtype=torch.float32,
                           skip_prefixes=tuple(AR_KEY_PREFIXES))
        return tok.eval().requires_grad_(False)
    tok = build_tokenizer(preset, 0)
    tok.load_state_dict(trained_weights(load_stage(run_dir, "tokenizer"), "tokenizer"))
    return tok.eval().requires_grad_(False)


def train(preset: TrainPreset, out: Path, data: str = "synthetic", steps: int | None = None, resume: bool = False,
          seed: int = 0, progress: bool = True, stop_at: int | None = None, rt: Runtime | None = None) -> list[dict]:
    rt = rt or Runtime()
    labelled = data == "synthetic"      # real images have no region labels: pixel head + VQ only
    cfg = preset.stages["tokenizer"]
    steps = steps or cfg.steps
    tok = build_tokenizer(preset, seed)
    heads = Heads(tok.cfg.dim, tok.cfg.n_codes, preset.ar_token_px)
    source = make_source(data, seed, preset.image_size,
                         **(dict(label_cell_px=preset.ar_token_px, word_p=0.5, unseen_p=0.3) if labelled else {}))
    op = heads.out_px
    state = {}

    def step_fn(step: int, gen: torch.Generator):
        ex = [source.example(i) for i in range(step * cfg.batch, (step + 1) * cfg.batch)[rt.rows(cfg.batch)]]
        images = [e["image"] for e in ex]
        px = torch.stack([preprocess(im, preset.min_pixels, preset.max_pixels, preset.vision_patch)
                          for im in images]).to(rt.device)
        feats = vit_features(tok, px)                                                  # [B, N, C]
        z, ids, zq = quantize(tok, feats)
        vq = F.mse_loss(zq, z.detach()) + BETA * F.mse_loss(z, zq.detach())
        h = post_quant(tok, z + (zq - z).detach())                                     # straight-through
        logits = heads.label(h)                                                       # [B, N, labels]
        if labelled:
            labels = torch.stack([e["labels"] for e in ex]).flatten(1).to(rt.device)   # [b, N], this process's rows
            label_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            acc = logits.detach().argmax(-1).eq(labels).float().mean()
        else:
            label_loss = acc = torch.zeros((), device=rt.device)
        # target: each token's tp x tp region of the full image, average-pooled PIXEL_DOWN x
        full = F.avg_pool2d(to_pixels(images).to(rt.device), PIXEL_DOWN)               # [b, 3, S/4, S/4]
        B, g = full.shape[0], full.shape[-1] // op
        target = full.view(B, 3, g, op, g, op).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, -1)
        pix_loss = F.mse_loss(heads.pixels(h), target)
        hits = rt.sum(torch.bincount(ids.flatten(), minlength=tok.cfg.n_codes))       # summed over processes
        heads.usage += hits
        if rt.micro == 0:
            state["z"] = []
        state["z"].append(z.detach().flatten(0, 1))
        used = (hits > 0).sum()
        return label_loss + pix_loss + vq, len(ex), {"label": label_loss.detach(), "pixel": pix_loss.detach(),
                                                     "vq": vq.detach(), "label_acc": acc, "codes_in_batch": used}

    @torch.no_grad()
    def after_step(step: int, gen: torch.Generator):
        if (step + 1) % RESTART_EVERY:
            return
        dead = (heads.usage == 0).nonzero()[:, 0]
        z = rt.gather(torch.cat(state["z"]))   # the whole batch's features, in batch order
        if len(dead):                     # dead codes restart at random features of this batch
            pick = torch.randint(0, z.shape[0], (len(dead),), generator=gen)
            noise = torch.randn(len(dead), z.shape[1], generator=gen)
            tok.vq.quantize.embedding.weight[dead] = z[pick.to(z.device)] + 0.01 * noise.to(z.device)
        heads.usage.zero_()

    trainable = list(tok.parameters()) + list(heads.parameters())
    return train_loop("tokenizer", out, {"tokenizer": tok, "heads": heads}, trainable, step_fn, cfg, seed, steps,
                      resume, plot_keys=["loss", "label", "pixel", "vq"], after_step=after_step, progress=progress,
                      stop_at=stop_at, rt=rt)
