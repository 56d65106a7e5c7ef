"""The GLM-Image pipeline: prompt (+ reference images) -> AR prior grid -> DiT flow matching -> VAE -> PIL.

    from glmimage import Pipeline
    pipe = Pipeline.from_pretrained("zai-org/GLM-Image", device="cuda", dtype=torch.bfloat16)
    image = pipe("a red circle with the word 'SUN'", height=1024, width=1024, seed=0)[0]

Stages, in order (each a plain call you can run alone):
  1. reference images (edits): ViT + cosine VQ -> ids, once per image                (vision.py)
  2. AR: [refs][prompt]<sop>th tw<eop>[<sop>ph pw<eop>]<BOI> -> preview grid, grid  (prompt.py, ar.py)
  3. glyph: quoted text -> ByT5 embeddings                                          (glyph.py)
  4. DiT: noise -> latents with Euler + CFG, prior ids added to the patches          (dit.py, schedule.py)
  5. VAE decode                                                                      (vae.py)
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from glmimage import loading
from glmimage.ar import AR_KEY_PREFIXES, ARConfig, ARModel, generate_prior
from glmimage.dit import DiT, DiTConfig
from glmimage.glyph import GlyphEncoder
from glmimage.prompt import PromptTokenizer
from glmimage.schedule import denoise, make_schedule
from glmimage.vae import VAE, pil_to_pixels, pixels_to_pil
from glmimage.vision import VISION_KEY_PREFIXES, ImageTokenizer, VisionConfig, preprocess

BUNDLED_MODEL = Path(__file__).parent / "assets" / "model"


def default_model() -> Path:
    """The model that ships inside the package (see glmimage/assets/model/README.md)."""
    if not (BUNDLED_MODEL / "model_index.json").exists():
        raise ValueError("this install has no bundled model; pass a checkpoint folder or hub id, or create a random "
                         "one with `glmimage make-random DIR --preset debug`")
    return BUNDLED_MODEL


def nearest_multiples(x: int, m: int) -> str:
    lo = max(m, (x // m) * m)
    hi = lo + m if lo < x else lo
    return f"{lo}" if lo == hi else f"{lo} or {hi}"


@dataclass
class SamplingDefaults:
    temperature: float = 0.9
    top_p: float = 0.75
    top_k: int = 50            # transformers applies top_k=50 when generation_config.json sets none


class Pipeline:
    def __init__(self, *, ar: ARModel, image_tokenizer: ImageTokenizer, prompt_tokenizer: PromptTokenizer,
                 dit: DiT, glyph: GlyphEncoder, vae: VAE, scheduler_config: dict, sampling: SamplingDefaults,
                 min_pixels: int, max_pixels: int, ar_token_px: int = 32, native_size: int = 1024):
        self.ar = ar
        self.image_tokenizer = image_tokenizer
        self.prompt_tokenizer = prompt_tokenizer
        self.dit = dit
        self.glyph = glyph
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.sampling = sampling
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.ar_token_px = ar_token_px                      # pixels per AR token (official: 32)
        self.native_size = native_size                      # default height and width (official: 1024)
        self.dit_token_px = vae.scale * dit.cfg.patch_size  # pixels per DiT token (official: 16)
        assert ar_token_px % self.dit_token_px == 0, (ar_token_px, self.dit_token_px)
        self.upsample = ar_token_px // self.dit_token_px    # AR grid -> DiT grid (official: 2x nearest)

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "Pipeline":
        """Load the official folder layout (a local folder or a hub id); None loads the bundled model."""
        device = torch.device(device)
        root = loading.resolve(path if path is not None else default_model())
        index = loading.read_json(root / "model_index.json")
        vle_dir = root / "vision_language_encoder"
        vle_cfg = loading.read_json(vle_dir / "config.json")
        with torch.device("meta"):
            ar = ARModel(ARConfig.from_hf(vle_cfg))
            image_tokenizer = ImageTokenizer(VisionConfig.from_hf(vle_cfg))
            dit = DiT(DiTConfig.from_hf(loading.read_json(root / "transformer" / "config.json")))
        loading.load_weights(ar, vle_dir, AR_KEY_PREFIXES, device=device, dtype=dtype,
                             skip_prefixes=tuple(VISION_KEY_PREFIXES))
        loading.load_weights(image_tokenizer, vle_dir, VISION_KEY_PREFIXES, device=device, dtype=dtype,
                             skip_prefixes=tuple(AR_KEY_PREFIXES))
        loading.load_weights(dit, root / "transformer", None, device=device, dtype=dtype)

        gen_file = vle_dir / "generation_config.json"
        gen = loading.read_json(gen_file) if gen_file.exists() else {}
        sampling = SamplingDefaults(temperature=gen.get("temperature", 1.0), top_p=gen.get("top_p", 1.0),
                                    top_k=gen.get("top_k", 50))
        proc = loading.read_json(root / "processor" / "preprocessor_config.json")
        return cls(
            ar=ar.eval(), image_tokenizer=image_tokenizer.eval(), dit=dit.eval().fuse(),
            prompt_tokenizer=PromptTokenizer.from_dir(root / "processor"),
            glyph=GlyphEncoder.from_folder(root / "text_encoder", device=device, dtype=dtype),
            vae=VAE.from_folder(root / "vae", device=device, dtype=dtype),
            scheduler_config=loading.read_json(root / "scheduler" / "scheduler_config.json"),
            sampling=sampling, min_pixels=proc.get("min_pixels", 512 * 512),
            max_pixels=proc.get("max_pixels", 2048 * 2048),
            # our own models record their grid factor and native size; the official checkpoint has neither
            ar_token_px=index.get("glmimage", {}).get("ar_token_px", 32),
            native_size=index.get("glmimage", {}).get("native_size", 1024),
        )

    @property
    def device(self) -> torch.device:
        return self.ar.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.ar.lm_head.weight.dtype

    # ------------------------------------------------------------------------------------------------------
    def check_size(self, height: int, width: int) -> tuple[int, int]:
        """Both sides must be multiples of the AR token size (32 px officially); returns the AR grid."""
        m = self.ar_token_px
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
            if v % m:
                raise ValueError(f"{name}={v} is not a multiple of {m}; nearest valid {name}: "
                                 f"{nearest_multiples(v, m)}")
        return height // m, width // m

    @staticmethod
    def _as_images(image) -> list[Image.Image]:
        if image is None:
            return []
        images = [image] if isinstance(image, Image.Image) else list(image)
        for im in images:
            if not isinstance(im, Image.Image):
                raise ValueError(f"image must be a PIL.Image or a list of them, got {type(im).__name__}")
        return images

    @torch.no_grad()
    def encode_references(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """Each reference image -> its VQ id grid [h,w] (the ViT runs once per image)."""
        pixels = [preprocess(im, self.min_pixels, self.max_pixels).to(self.device, self.dtype) for im in images]
        return self.image_tokenizer.encode(pixels)

    @torch.no_grad()
    def prior_tokens(self, prompt: str, height: int, width: int, image=None, seed: int | None = None,
                     temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                     ref_ids: list[torch.Tensor] | None = None,
                     on_preview: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """The AR's large grid, LongTensor [th, tw]. temperature=0 decodes greedily."""
        th, tw = self.check_size(height, width)
        images = self._as_images(image)
        if ref_ids is None:
            ref_ids = self.encode_references(images) if images else []
        s = self.sampling
        temperature = s.temperature if temperature is None else temperature
        top_p = s.top_p if top_p is None else top_p
        top_k = s.top_k if top_k is None else top_k
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 "
                             f"(got {temperature}, {top_p}, {top_k})")
        if ref_ids:
            req = self.prompt_tokenizer.i2i(prompt, ref_ids, height, width)
        else:
            req = self.prompt_tokenizer.t2i(prompt, height, width)
        grids = generate_prior(self.ar, req.input_ids.to(self.device), req.ref_grids, req.target_grids,
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed if seed is not None else random.randrange(2**31))
        if on_preview is not None and len(grids) > 1:
            on_preview(grids[0][0])
        return grids[-1][0]                                             # [th, tw]

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str, height: int = 1024, width: int = 1024, image=None,
                 num_inference_steps: int = 50, guidance_scale: float = 1.5, seed: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 prior_token_ids: torch.Tensor | None = None,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None) -> list[Image.Image]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        th, tw = self.check_size(height, width)
        seed = seed if seed is not None else random.randrange(2**31)
        images = self._as_images(image)
        ref_ids = self.encode_references(images) if images else []

        # 1. AR prior grid [th, tw] -> DiT token grid [B, N]
        if prior_token_ids is None:
            grid = self.prior_tokens(prompt, height, width, seed=seed, temperature=temperature, top_p=top_p,
                                     top_k=top_k, ref_ids=ref_ids)[None]
        else:
            grid = prior_token_ids if prior_token_ids.dim() == 3 else prior_token_ids[None]
            if tuple(grid.shape[1:]) != (th, tw):
                raise ValueError(f"prior_token_ids must be [{th}, {tw}] (or [B, {th}, {tw}]) for "
                                 f"{height}x{width}, got {list(prior_token_ids.shape)}")
        B = grid.shape[0]
        prior = self.upsample_ids(grid.to(self.device))                                    # [B, N]

        # 2. glyph embeddings of the quoted text; the unconditional branch always gets ""
        glyph = self.glyph.encode([prompt] * B)                                            # [B, T, D]
        glyph_neg = self.glyph.encode([""] * B)                                            # [B, 1, D]

        # 3. reference images -> DiT KV prefix, written once at t=0, read by the conditional branch only
        ref_kv = self.reference_kv(images, ref_ids) if images else None

        # 4. flow matching from seeded fp32 noise; per-branch context and per-step conditioning computed once
        C, s = self.dit.cfg.in_channels, self.vae.scale
        noise = torch.randn((B, C, height // s, width // s), generator=torch.Generator("cpu").manual_seed(seed))
        grid_hw = (height // self.dit_token_px, width // self.dit_token_px)
        timesteps, sigmas = make_schedule(num_inference_steps, grid_hw[0] * grid_hw[1], self.scheduler_config)
        size = torch.tensor([[height, width]] * B, dtype=torch.float32, device=self.device)
        crop = torch.zeros(B, 2, dtype=torch.float32, device=self.device)
        ctx_c = self.dit.context(glyph, prior, False, grid_hw)
        ctx_u = self.dit.context(glyph_neg, prior, True, grid_hw) if guidance_scale > 1 else None
        if ref_kv is not None:                # conditional branch only; prefix preallocated, tail written per step
            num_new = ctx_c.txt.shape[1] + grid_hw[0] * grid_hw[1]
            ctx_c = ctx_c._replace(ref_kv=self.dit.prefix_buffers(ref_kv, B, num_new))
        batch_cfg = ctx_u is not None and ref_kv is None          # t2i: both branches in one forward
        ctx_cfg = self.dit.batch_cfg(ctx_c, ctx_u) if batch_cfg else None
        # every step's AdaLN vectors at once: they depend only on (t, size, crop), the same for both branches
        n = len(timesteps)
        vec = self.dit.embed_vec(timesteps.to(self.device), size[:1].expand(n, 2), crop[:1].expand(n, 2))  # [n, E]
        mods = self.dit.modulation(vec)

        def velocity(x: torch.Tensor, i: int, cond: bool | None) -> torch.Tensor:
            mod = type(mods)([m[i:i + 1] for m in mods.blocks], mods.out[i:i + 1])
            ctx = ctx_cfg if cond is None else ctx_c if cond else ctx_u
            return self.dit.velocity(x, ctx, mod=mod).float()

        latents = denoise(velocity, noise.to(self.device), timesteps, sigmas, guidance_scale, callback=callback,
                          batch_cfg=batch_cfg)

        # 5. decode
        return pixels_to_pil(self.vae.decode(latents))

    def upsample_ids(self, grid: torch.Tensor) -> torch.Tensor:
        """AR grid [B, th, tw] -> DiT grid ids [B, N] by nearest upsampling (official: 2x)."""
        u = self.upsample
        return grid.repeat_interleave(u, dim=1).repeat_interleave(u, dim=2).flatten(1)

    def reference_kv(self, images: list[Image.Image], ref_ids: list[torch.Tensor]):
        """Encode each reference with the VAE at its VQ grid's pixel size and write the DiT's KV prefix."""
        latents, ids, sizes = [], [], []
        for im, g in zip(images, ref_ids):
            h, w = g.shape[0] * self.ar_token_px, g.shape[1] * self.ar_token_px  # the processor's clamped size
            latents.append(self.vae.encode(pil_to_pixels(im, h, w)))             # [1, C, h/8, w/8]
            ids.append(self.upsample_ids(g[None].to(self.device)))                 # [1, N_ref]
            sizes.append((h, w))
        return self.dit.reference_kv(latents, ids, sizes)
