"""Random checkpoints in the official zai-org/GLM-Image folder layout.

The folders written here are byte-for-byte the layout the official checkpoint uses (`model_index.json`,
`vision_language_encoder/`, `processor/`, `transformer/`, `text_encoder/`, `tokenizer/`, `vae/`,
`scheduler/`), with random weights. The reference libraries (transformers' GlmImageForConditionalGeneration,
diffusers' GlmImageTransformer2DModel/AutoencoderKL) write them, so the reference can load them too: that is
what makes them a parity oracle for our own loader and models.

Presets:
  debug   tiny, for tests (seconds on a CPU)
  medium  the official depths (40 AR layers, 30 DiT layers) at reduced width, for CPU benchmarks
  wide    the official widths at depth 2 (AR, ViT, DiT), full T5 and VAE: full-size shapes, checkable on a CPU
  full    the official sizes (17.7 B parameters), for a GPU benchmark (drawn on the GPU, stored in bf16)

    glmimage make-random DIR --preset debug
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------------------
# The official scheduler config (FlowMatchEulerDiscreteScheduler with linear dynamic shifting).

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.25,
    "max_shift": 0.75,
    "time_shift_type": "linear",
}

# Per-channel latent statistics of the official VAE (vae/config.json latents_mean / latents_std).
OFFICIAL_LATENTS_MEAN = [-0.2080078125, 1.875, -0.470703125, -1.265625, -1.421875, 0.77734375, -0.3671875,
                         -0.9453125, 0.318359375, 0.7734375, -0.1884765625, -0.022216796875, -0.220703125,
                         -1.59375, -0.81640625, -0.255859375]
OFFICIAL_LATENTS_STD = [3.0625, 2.203125, 2.265625, 4.84375, 2.5, 3.9375, 2.203125, 3.03125, 2.1875, 2.046875,
                        2.71875, 2.390625, 2.390625, 2.453125, 2.25, 2.15625]

# ----------------------------------------------------------------------------------------------------------
# Presets. Each is the set of official config.json fields that differ between sizes.

PRESETS: dict[str, dict] = {
    "debug": dict(
        codebook=128,                       # VQ codes; BOI = codebook, EOI = codebook + 1
        ar=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=192),
        mrope_section=[2, 3, 3],            # head_dim 32 -> 16 rotary dims -> 8 frequencies
        vit=dict(hidden_size=32, depth=2, num_heads=2, intermediate_size=64, image_size=256),
        vq_embed_dim=24,
        min_pixels=64 * 64, max_pixels=512 * 512,
        dit=dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, time_embed_dim=32, condition_dim=16),
        t5=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
        vae=dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, norm_num_groups=8),
    ),
    "medium": dict(
        codebook=16384,
        ar=dict(hidden_size=512, num_hidden_layers=40, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1712),
        mrope_section=[4, 6, 6],            # head_dim 64
        vit=dict(hidden_size=256, depth=8, num_heads=4, intermediate_size=1024, image_size=512),
        vq_embed_dim=256,
        min_pixels=512 * 512, max_pixels=2048 * 2048,
        dit=dict(num_layers=30, attention_head_dim=64, num_attention_heads=8, time_embed_dim=512, condition_dim=256),
        t5=dict(d_model=256, d_kv=32, d_ff=512, num_layers=4, num_heads=8),
        vae=dict(block_out_channels=[64, 128, 256, 256], layers_per_block=2, norm_num_groups=32),
    ),
    "full": dict(
        codebook=16384,
        ar=dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
                intermediate_size=13696),
        mrope_section=[8, 12, 12],          # head_dim 128 (official)
        vit=dict(hidden_size=1536, depth=40, num_heads=16, intermediate_size=6144, image_size=2048),
        vq_embed_dim=2048,
        min_pixels=512 * 512, max_pixels=2048 * 2048,
        dit=dict(num_layers=30, attention_head_dim=128, num_attention_heads=32, time_embed_dim=512, condition_dim=256),
        t5=dict(d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6),
        vae=dict(block_out_channels=[128, 512, 1024, 1024], layers_per_block=3, norm_num_groups=32),
    ),
}

# the official widths at depth 2 (AR, ViT, DiT) with the full T5 and VAE: every full-size shape, checkable on a CPU
_full = PRESETS["full"]
PRESETS["wide"] = {**_full, "ar": {**_full["ar"], "num_hidden_layers": 2}, "vit": {**_full["vit"], "depth": 2},
                   "dit": {**_full["dit"], "num_layers": 2}}

TEXT_SPECIALS = ["<|endoftext|>", "<sop>", "<eop>", "<|image|>"]
UNUSED_VISION_SLOTS = 128  # official: vision vocab = 16384 codes + 128 (BOI, EOI, 126 unused)


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# ----------------------------------------------------------------------------------------------------------
# The AR's tokenizer: ids 0..V-1 are `<|dit_token_i|>` (VQ codes, BOI, EOI, unused), then text tokens.
# The official one is GLM-4's BPE shifted by 16512; ours is byte-level BPE with no merges (or trained merges,
# see glmimage.train), so any text tokenizes.

def build_text_tokenizer(vision_vocab: int, merges_from: list[str] | None = None, vocab_size: int = 0):
    """A byte-level BPE tokenizer whose first `vision_vocab` ids are the `<|dit_token_i|>` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, AddedToken

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_alphabet.sort()
    vocab = {f"<|dit_token_{i}|>": i for i in range(vision_vocab)}
    for ch in byte_alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if merges_from:  # train merges on a corpus, keeping the id layout
        from tokenizers import trainers
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=byte_alphabet,
                                      special_tokens=list(vocab)[:vision_vocab], show_progress=False)
        tok.train_from_iterator(merges_from, trainer=trainer)
    # `<|dit_token_i|>` and the text specials are "special" added tokens: matched before BPE, never split
    tok.add_special_tokens([AddedToken(f"<|dit_token_{i}|>", special=True, normalized=False)
                            for i in range(vision_vocab)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in TEXT_SPECIALS])
    return tok


def write_processor(out: Path, tok, codebook: int, min_pixels: int, max_pixels: int) -> None:
    """processor/: tokenizer.json + tokenizer_config.json + preprocessor_config.json + chat_template.jinja."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    boi, eoi = f"<|dit_token_{codebook}|>", f"<|dit_token_{codebook + 1}|>"
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TokenizersBackend",
        "bos_token": boi, "eos_token": eoi, "pad_token": eoi,
        "image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>",
        "extra_special_tokens": {"image_token": "<|image|>", "grid_bos_token": "<sop>",
                                 "grid_eos_token": "<eop>"},
        "padding_side": "left", "model_max_length": 65536, "clean_up_tokenization_spaces": False,
    }, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "GlmImageImageProcessor", "processor_class": "GlmImageProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "patch_size": 16, "temporal_patch_size": 1, "merge_size": 1, "resample": 3,
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
    }, indent=2))
    template = ("{%- for message in messages -%}{%- if message['content'] is string -%}{{ message['content'] }}"
                "{%- else -%}{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}"
                + boi + "<|image|>" + eoi +
                "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}"
                "{%- endfor -%}")
    (out / "chat_template.jinja").write_text(template)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "GlmImageProcessor"}, indent=2))


def hf_configs(preset: dict, text_vocab: int) -> dict:
    """The official config.json contents of every component, for one preset."""
    codebook = preset["codebook"]
    vision_vocab = codebook + UNUSED_VISION_SLOTS
    vocab = vision_vocab + text_vocab
    pad_id = vision_vocab + text_vocab - len(TEXT_SPECIALS)       # <|endoftext|>
    image_token_id = pad_id + 3                                   # <|image|>
    ar = preset["ar"]
    vit = preset["vit"]
    vle = {
        "architectures": ["GlmImageForConditionalGeneration"], "model_type": "glm_image",
        "image_start_token_id": codebook, "image_end_token_id": codebook + 1, "image_token_id": image_token_id,
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "glm_image_text", **ar, "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "max_position_embeddings": 131072, "vocab_size": vocab, "vision_vocab_size": vision_vocab,
            "eos_token_id": codebook + 1, "pad_token_id": pad_id, "attention_bias": True, "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                "mrope_section": preset["mrope_section"]},
        },
        "vision_config": {"model_type": "glm_image_vision", **vit, "patch_size": 16, "in_channels": 3,
                          "hidden_act": "gelu", "attention_bias": True, "layer_norm_eps": 1e-6,
                          "spatial_merge_size": 1},
        "vq_config": {"model_type": "glm_image_vqmodel", "embed_dim": preset["vq_embed_dim"],
                      "num_embeddings": codebook, "latent_channels": vit["hidden_size"], "in_channels": 3},
    }
    # Random weights put mass on BOI/EOI/unused ids mid-grid, where the reference stops early and crashes
    # (glm-image.md 3.3); suppress_tokens keeps transformers' generate on code ids so the reference can run on
    # these checkpoints. The official file has no such entry; glmimage masks those ids itself.
    generation = {"do_sample": True, "temperature": 0.9, "top_p": 0.75, "eos_token_id": codebook + 1,
                  "pad_token_id": image_token_id, "suppress_tokens": list(range(codebook, vision_vocab))}
    t5 = preset["t5"]
    text_encoder = dict(vocab_size=384, d_model=t5["d_model"], d_kv=t5["d_kv"], d_ff=t5["d_ff"],
                        num_layers=t5["num_layers"], num_heads=t5["num_heads"], feed_forward_proj="gated-gelu",
                        relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        layer_norm_epsilon=1e-6, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
                        pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    dit = dict(patch_size=2, in_channels=16, out_channels=16, text_embed_dim=t5["d_model"],
               prior_vq_quantizer_codebook_size=codebook, **preset["dit"])
    vae_cfg = preset["vae"]
    nb = len(vae_cfg["block_out_channels"])
    vae = dict(in_channels=3, out_channels=3, latent_channels=16,
               down_block_types=["DownEncoderBlock2D"] * nb, up_block_types=["UpDecoderBlock2D"] * nb,
               mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
               force_upcast=True, scaling_factor=0.18215, shift_factor=None,
               latents_mean=OFFICIAL_LATENTS_MEAN, latents_std=OFFICIAL_LATENTS_STD, **vae_cfg)
    return dict(vision_language_encoder=vle, generation=generation, text_encoder=text_encoder, transformer=dit,
                vae=vae, vision_vocab=vision_vocab)


def _fill_zeros(module: torch.nn.Module, std: float, generator: torch.Generator) -> None:
    """Reference inits zero some projections (e.g. AdaLN); random checkpoints need every term to matter."""
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() > 1 and p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=generator, device=generator.device) * std)


MODEL_INDEX = {
    "_class_name": "GlmImagePipeline",
    "_diffusers_version": "0.42.1",
    "processor": ["transformers", "GlmImageProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "ByT5Tokenizer"],
    "transformer": ["diffusers", "GlmImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "vision_language_encoder": ["transformers", "GlmImageForConditionalGeneration"],
}


def write_common(out: Path, cfgs: dict, tok, preset: dict) -> None:
    """Files that are not weights: model_index.json, scheduler/, tokenizer/ (ByT5), processor/."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {**SCHEDULER_CONFIG, "_diffusers_version": "0.42.1"}, indent=2))
    (out / "tokenizer").mkdir(exist_ok=True)
    (out / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ByT5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "extra_ids": 0, "model_max_length": 1000000000000000019884624838656}, indent=2))
    write_processor(out / "processor", tok, preset["codebook"], preset["min_pixels"], preset["max_pixels"])


def make_random_checkpoint(out_dir: str | os.PathLike, preset: str = "debug", seed: int = 0,
                           dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Path:
    """Write a random GLM-Image checkpoint in the official layout and return its path. `device` is where the
    weights are drawn (a GPU draws the full preset's 17.7 B in seconds; a seed's weights differ per device)."""
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration, T5Config, T5EncoderModel
    from transformers import GenerationConfig
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel

    p = get_preset(preset)
    out = Path(out_dir)
    tok = build_text_tokenizer(p["codebook"] + UNUSED_VISION_SLOTS)
    text_vocab = tok.get_vocab_size() - (p["codebook"] + UNUSED_VISION_SLOTS)
    cfgs = hf_configs(p, text_vocab)
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    write_common(out, cfgs, tok, p)

    torch.manual_seed(seed)
    with device:
        vle = GlmImageForConditionalGeneration(GlmImageConfig(**cfgs["vision_language_encoder"])).to(dtype)
    _fill_zeros(vle, 0.02, gen)
    vle.generation_config = GenerationConfig(**cfgs["generation"])
    vle.save_pretrained(out / "vision_language_encoder")
    del vle

    torch.manual_seed(seed + 1)
    with device:
        dit = GlmImageTransformer2DModel(**cfgs["transformer"]).to(dtype)
    _fill_zeros(dit, 0.02, gen)
    dit.save_pretrained(out / "transformer")
    del dit

    torch.manual_seed(seed + 2)
    with device:
        t5 = T5EncoderModel(T5Config(**cfgs["text_encoder"])).to(dtype)
    t5.save_pretrained(out / "text_encoder")
    del t5

    torch.manual_seed(seed + 3)
    with device:
        vae = AutoencoderKL(**cfgs["vae"]).to(dtype)
    vae.save_pretrained(out / "vae")
    return out
