"""Training presets: the model sizes (as official config.json fields) and the per-stage training settings.

A preset's `model` entry has the same fields as glmimage.random_checkpoint's presets, so `hf_configs` turns it into
the official config.json of every component; the extra fields fix the grid factors of our smaller models:

  image_size   native square size (pixels)
  ar_token_px  pixels per AR token (official 32); the vision patch is ar_token_px / 2 (the processor halves images)
  preview_side the t2i preview grid side (official 16)

The structure is the official one at every scale: [caption][preview grid][full grid], ids upsampled to the DiT grid
(ar_token_px / (8 * patch_size) times), the same modules and the same loader.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StageConfig:
    batch: int
    lr: float
    steps: int              # default number of steps (--steps overrides)
    warmup: int = 100
    ckpt_every: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.0        # decay of an exponential moving average of the weights (0: none; --ema overrides)
    schedule: str = "cosine"  # after the warmup: "cosine" down to 10% of lr at the last step, or "constant"


@dataclass
class TrainPreset:
    name: str
    model: dict             # random_checkpoint-style preset (hf_configs input)
    image_size: int
    ar_token_px: int
    preview_side: int
    text_merges: int        # BPE merges of the caption tokenizer trained in the AR stage
    rope_theta: float = 10000.0  # AR mRoPE base (official 10000)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    init: Path | None = None     # fine-tuning: the model folder every component starts from (from_model)
    configs: dict | None = None  # its config.json contents, which model_configs then returns

    @property
    def vision_patch(self) -> int:
        return self.ar_token_px // 2

    @property
    def grid(self) -> int:
        return self.image_size // self.ar_token_px

    @property
    def min_pixels(self) -> int:
        return self.model["min_pixels"]

    @property
    def max_pixels(self) -> int:
        return self.model["max_pixels"]


PRESETS: dict[str, TrainPreset] = {
    "debug": TrainPreset(
        name="debug",
        model=dict(
            codebook=32,
            ar=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=128),
            mrope_section=[2, 3, 3],            # head_dim 32 -> 16 rotary dims
            vit=dict(hidden_size=32, depth=1, num_heads=2, intermediate_size=64, image_size=32),
            vq_embed_dim=8,
            min_pixels=64 * 64, max_pixels=64 * 64,
            dit=dict(num_layers=1, attention_head_dim=16, num_attention_heads=2, time_embed_dim=32,
                     condition_dim=16),
            t5=dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2),
            vae=dict(block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4),
        ),
        image_size=64, ar_token_px=16, preview_side=2, text_merges=50,
        stages={
            "vae": StageConfig(batch=2, lr=1e-3, steps=4, warmup=1, ckpt_every=2),
            "vae_decoder": StageConfig(batch=2, lr=1e-3, steps=4, warmup=1, ckpt_every=2),
            "tokenizer": StageConfig(batch=4, lr=1e-3, steps=4, warmup=1, ckpt_every=2),
            "ar": StageConfig(batch=4, lr=1e-3, steps=4, warmup=1, ckpt_every=2),
            "decoder": StageConfig(batch=4, lr=1e-3, steps=4, warmup=1, ckpt_every=2),
            "glyph": StageConfig(batch=4, lr=1e-3, steps=4, warmup=1, ckpt_every=2),
        },
    ),
    "small": TrainPreset(
        name="small",
        model=dict(
            codebook=256,
            ar=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=704),
            mrope_section=[4, 6, 6],            # head_dim 64 -> 32 rotary dims
            vit=dict(hidden_size=128, depth=3, num_heads=4, intermediate_size=512, image_size=64),
            vq_embed_dim=32,
            min_pixels=128 * 128, max_pixels=128 * 128,
            dit=dict(num_layers=6, attention_head_dim=64, num_attention_heads=4, time_embed_dim=128,
                     condition_dim=64),
            t5=dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
            vae=dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=8),
        ),
        # rope_theta 10: with 16 rotary frequencies split t/h/w = 4/6/6, the w (column) axis gets the lowest
        # frequencies; at base 10000 an 8-wide grid spans < 0.03 rad there and the AR cannot tell columns apart
        image_size=128, ar_token_px=16, preview_side=4, text_merges=600, rope_theta=10.0,
        stages={
            "vae": StageConfig(batch=8, lr=1e-3, steps=1800, warmup=50, ckpt_every=100),
            "vae_decoder": StageConfig(batch=4, lr=3e-4, steps=600, warmup=50, ckpt_every=100),
            "tokenizer": StageConfig(batch=32, lr=1e-3, steps=1500, warmup=100, ckpt_every=100),
            "ar": StageConfig(batch=16, lr=1e-3, steps=3000, warmup=100, ckpt_every=100, weight_decay=0.05),
            "decoder": StageConfig(batch=16, lr=5e-4, steps=1800, warmup=100, ckpt_every=100),
            "glyph": StageConfig(batch=64, lr=1e-3, steps=2000, warmup=100, ckpt_every=500),
        },
    ),
}


def get_preset(name: str) -> TrainPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown training preset {name!r}; valid: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def from_model(path, preset: TrainPreset, size: int | None = None) -> TrainPreset:
    """Fine-tuning: `preset`'s stage settings (batch, lr, steps, ...) on the sizes and grid factors of a trained
    model folder in the official layout (ours, or zai-org/GLM-Image: a local folder or a hub id). The stages then
    start from its weights (preset.init) instead of random ones; size: the training image side (default the
    model's native size: 128 for our small model, 1024 for the official one)."""
    from glmimage.loading import read_json, resolve

    root = resolve(path).resolve()          # absolute: runs record it, and export may run from elsewhere
    vle = read_json(root / "vision_language_encoder" / "config.json")
    ours = read_json(root / "model_index.json").get("glmimage", {})
    ar_token_px = 2 * vle["vision_config"]["patch_size"]            # the processor halves images, then patches
    what = "--size" if size else "the model's native size (set another with --size)"
    size = size or ours.get("native_size", 1024)
    if size % ar_token_px:
        raise ValueError(f"{what} {size} is not a multiple of the model's {ar_token_px}-pixel AR tokens")
    side = size * size      # training images are tokenized at exactly this size: the grid t2i at it generates
    cfgs = {"vision_language_encoder": vle,
            "transformer": read_json(root / "transformer" / "config.json"),
            "text_encoder": read_json(root / "text_encoder" / "config.json"),
            "vae": read_json(root / "vae" / "config.json")}
    out = copy.deepcopy(preset)
    out.name = f"{preset.name}@{root.name}"
    out.model = {"codebook": vle["vq_config"]["num_embeddings"], "min_pixels": side, "max_pixels": side}
    out.image_size, out.ar_token_px, out.preview_side = size, ar_token_px, ours.get("preview_side", 16)
    out.init, out.configs = root, cfgs
    return out


def model_configs(preset: TrainPreset, text_vocab: int) -> dict:
    """The official config.json contents of every component (random_checkpoint.hf_configs + our grid factors), or
    the init model's own (text_vocab is then ignored: the model's vocabulary is fixed)."""
    from glmimage.random_checkpoint import hf_configs

    if preset.configs is not None:
        return copy.deepcopy(preset.configs)
    cfgs = hf_configs(preset.model, text_vocab)
    cfgs["vision_language_encoder"]["vision_config"]["patch_size"] = preset.vision_patch
    cfgs["vision_language_encoder"]["text_config"]["rope_parameters"]["rope_theta"] = preset.rope_theta
    return cfgs
