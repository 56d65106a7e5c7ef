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

import functools
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from glmimage import loading
from glmimage.ar import (AR_KEY_PREFIXES, ARConfig, ARModel, check_ar_guidance, check_speculate, cpu_compile,
                         generate_prior, sync)
from glmimage.dit import CPU_COMPILE_OPTIONS as DIT_CPU_COMPILE_OPTIONS
from glmimage.dit import DiT, DiTConfig, StepCache, adaln_key
from glmimage.glyph import GlyphEncoder
from glmimage.prompt import PromptTokenizer, collate
from glmimage.quantize import quantize_int8
from glmimage.schedule import check_guidance_interval, denoise, make_schedule
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


def pin_weights(component) -> list:
    """A host-resident component's weights, page-locked (device copies then run at full bus speed, asynchronously)
    -> [(module, kind, name, host tensor)] for `place_weights`. Each storage is pinned once and its tensors stay
    views of it: tied weights and views (the DiT's fused QKV and its to_q/to_k/to_v slices) keep sharing memory."""
    root = component.model if isinstance(component, VAE) else component      # the VAE wraps diffusers' model
    entries, storages = [], {}
    for mod in root.modules():
        for kind, tensors in (("param", mod._parameters), ("buffer", mod._buffers)):
            for name, t in tensors.items():
                if t is not None and t.device.type != "meta":      # meta: loaded by another part of the stage
                    entries.append((mod, kind, name, t.data))
    for i, (mod, kind, name, t) in enumerate(entries):
        key = t.untyped_storage().data_ptr()
        if key not in storages:
            raw = _storage_bytes(t)
            try:
                storages[key] = raw.pin_memory()
            except RuntimeError:                   # no pinned memory on this backend: pageable copies still work
                storages[key] = raw
        entries[i] = (mod, kind, name, _view_of(storages[key], t))
    place_weights(entries, None)
    return entries


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under `t` as a uint8 tensor (views and tied weights share one)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _view_of(raw: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`t`'s dtype, shape, strides and offset over the bytes in `raw` (a uint8 tensor holding a whole storage)."""
    return torch.empty(0, dtype=t.dtype, device=raw.device).set_(raw.untyped_storage(), t.storage_offset(),
                                                                  t.size(), t.stride())


def place_weights(entries: list, device: torch.device | None) -> None:
    """Point each weight at a device copy of its pinned host tensor, one copy per storage (device None: back at
    the host tensors; the device copies are freed and nothing is copied back, since inference never changes a
    weight)."""
    copies = {}
    for mod, kind, name, host in entries:
        t = host
        if device is not None:
            key = host.untyped_storage().data_ptr()
            if key not in copies:
                copies[key] = _storage_bytes(host).to(device, non_blocking=True)
            t = _view_of(copies[key], host)
        if kind == "param":
            mod._parameters[name].data = t
        else:
            mod._buffers[name] = t


@dataclass
class SamplingDefaults:
    temperature: float = 0.9
    top_p: float = 0.75
    top_k: int = 50            # transformers applies top_k=50 when generation_config.json sets none


@functools.cache
def _shared_velocity() -> Callable:
    """DiT.velocity compiled with the weights as inputs: one compiled function for every DiT object of the same
    shapes and dtype (offload on a CPU reads the DiT from disk again for each image)."""
    return torch.compile(DiT.velocity, dynamic=False)


def glyph_rows(T: int) -> int:
    """A compiled DiT's glyph rows for T of them: T when at most one (no quoted text: nothing to pad, the most
    common case), else T rounded up to a multiple of 16 (a quoted word or two: one shape; at most 15 padding rows,
    6% more tokens at 256², 0.4% at 1024²)."""
    return T if T <= 1 else T + -T % 16



def int8_parts(int8: bool | str | None) -> frozenset[str]:
    """Pipeline's int8 option -> the stages quantized: False/None none, True or "ar" the AR, "dit", or "all"."""
    if not int8:
        return frozenset()
    if int8 is True or int8 == "ar":
        return frozenset({"ar"})
    if int8 in ("dit", "all"):
        return frozenset({"dit"} if int8 == "dit" else {"ar", "dit"})
    raise ValueError(f"int8 must be one of 'ar' (or True), 'dit', 'all', or False; got {int8!r}")


def keep_mask(grid: torch.Tensor, ref_grid: torch.Tensor, scale: int, dilate: int = 1,
              max_changed: float = 0.5) -> torch.Tensor:
    """An edit's AR grids [B, th, tw] against its reference's grid [th, tw] -> bool [B, 1, th·scale, tw·scale], set
    where the latents (scale per AR token) may be kept from the reference: the tokens the AR wrote unchanged, less
    `dilate` tokens around every changed one (room for the change's edges). An image with more than `max_changed` of
    its tokens changed keeps nothing (a new background or a restyle: the whole image is redrawn)."""
    changed = (grid != ref_grid).float()[:, None]                                   # [B, 1, th, tw]
    spread = F.max_pool2d(changed, 2 * dilate + 1, stride=1, padding=dilate) if dilate else changed
    keep = (spread == 0) & (changed.mean((1, 2, 3), keepdim=True) <= max_changed)   # [B, 1, th, tw]
    return keep.repeat_interleave(scale, 2).repeat_interleave(scale, 3)


def sample_latents(dit: DiT, noise: torch.Tensor, glyph: torch.Tensor, glyph_len: torch.Tensor | None,
                   glyph_neg: torch.Tensor, prior: torch.Tensor, grid_hw: tuple[int, int], mods, timesteps, sigmas,
                   guidance: float, ref_kv=None, callback=None, step_cache: float = 0.0,
                   forward: Callable | None = None, masked: bool = False,
                   guidance_interval: tuple[float, float] = (0.0, 1.0),
                   keep: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    """Flow matching from noise [B, C, h, w] to fp32 latents with the DiT: glyph [B, T, Dt] (glyph_len [B]) and the
    prior ids [B, N] condition the first branch, glyph_neg and the dropped prior the CFG one (guidance > 1); mods
    every step's StepModulation ([steps, ...], DiT.modulation); ref_kv an edit's reference prefix (the conditional
    branch only; t2i runs both branches as one batch). step_cache > 0: dit.StepCache per branch call. forward: the
    velocity to call (default dit.velocity; a compiled form). masked: padded text always under a key mask
    (DiT.batch_cfg), for compiled code. guidance_interval: the sigmas (lo, hi] that get guidance; keep: (latents,
    mask) held on their noisy path where the mask is set (both schedule.denoise).
    Returns (latents, steps skipped by the cache)."""
    B = noise.shape[0]
    ctx_c = dit.context(glyph, prior, False, grid_hw, ref_kv, txt_len=glyph_len)   # (a text mask spans the prefix)
    ctx_u = dit.context(glyph_neg, prior, True, grid_hw) if guidance > 1 else None
    if ref_kv is not None:                # conditional branch only; prefix preallocated, tail written per step
        num_new = ctx_c.txt.shape[1] + grid_hw[0] * grid_hw[1]
        ctx_c = ctx_c._replace(ref_kv=dit.prefix_buffers(ref_kv, B, num_new))
    batch_cfg = ctx_u is not None and ref_kv is None          # t2i: both branches in one forward
    ctx_cfg = dit.batch_cfg(ctx_c, ctx_u, masked) if batch_cfg else None
    forward = forward or dit.velocity
    caches = {}                           # per branch call (None: both in one batch; True / False)
    if step_cache > 0:
        # the cache's decision is Python control flow between the blocks: on a CPU the compiled whole-velocity
        # graph has no branch, so the velocity runs eagerly (on an accelerator its blocks stay compiled)
        forward = functools.partial(DiT.velocity, dit)
        caches = {cond: StepCache(step_cache) for cond in (None, True, False)}

    def velocity(x: torch.Tensor, i: int, cond: bool | None) -> torch.Tensor:
        mod = type(mods)([m[i:i + 1] for m in mods.blocks], mods.out[i:i + 1])
        ctx = ctx_cfg if cond is None else ctx_c if cond else ctx_u
        return forward(x, ctx, mod=mod, cache=caches.get(cond)).float()

    x = denoise(velocity, noise, timesteps, sigmas, guidance, callback=callback, batch_cfg=batch_cfg,
                guidance_interval=guidance_interval, keep=keep)
    return x, max((c.skipped for c in caches.values()), default=0)


class Pipeline:
    """The stages of GLM-Image over one checkpoint folder. Components load on first use.

    offload=True keeps a stage resident only while it runs: on an accelerator the others wait in pinned host
    memory (copied in when their stage starts, dropped when it ends: nothing is copied back); on a CPU a finished
    stage is released and read again from disk (memory-mapped safetensors) when next needed. The DiT then runs in
    two parts: its AdaLN weights ("dit_adaln": every step's AdaLN vectors at once), then the rest ("dit"), never
    both resident.
    """

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, offload: bool = False,
                 int8: bool = False, cuda_graph: bool = True):
        self.root, self.device, self.dtype, self.offload = root, device, dtype, offload
        self.int8 = int8_parts(int8)                # the stages whose linears are int8: {"ar"}, {"dit"}, both
        index = loading.read_json(root / "model_index.json")
        self.vle_dir = root / "vision_language_encoder"
        vle_cfg = loading.read_json(self.vle_dir / "config.json")
        self.ar_cfg, self.vision_cfg = ARConfig.from_hf(vle_cfg), VisionConfig.from_hf(vle_cfg)
        self.dit_cfg = DiTConfig.from_hf(loading.read_json(root / "transformer" / "config.json"))
        vae_cfg = loading.read_json(root / "vae" / "config.json")
        self.scheduler_config = loading.read_json(root / "scheduler" / "scheduler_config.json")
        gen_file = self.vle_dir / "generation_config.json"
        gen = loading.read_json(gen_file) if gen_file.exists() else {}
        self.sampling = SamplingDefaults(temperature=gen.get("temperature", 1.0), top_p=gen.get("top_p", 1.0),
                                         top_k=gen.get("top_k", 50))
        proc = loading.read_json(root / "processor" / "preprocessor_config.json")
        self.min_pixels = proc.get("min_pixels", 512 * 512)
        self.max_pixels = proc.get("max_pixels", 2048 * 2048)
        # the processor halves the image and patches it: one AR token per 2·patch_size pixels (official: 32)
        self.ar_token_px = 2 * self.vision_cfg.patch_size
        ours = index.get("glmimage", {})          # our own models record these; the official checkpoint has none
        self.native_size = ours.get("native_size", 1024)                  # default height and width
        self.preview_side = ours.get("preview_side", 16)                  # t2i preview grid ~ side x side
        # the decoder's CFG: the reference's 1.5 at every step, unless the model records its own
        self.guidance_scale = float(ours.get("guidance_scale", 1.5))
        self.guidance_interval = check_guidance_interval(ours.get("guidance_interval", (0.0, 1.0)))
        # the AR's classifier-free guidance (off in the reference: 1), for text-to-image and for edits
        self.ar_guidance = check_ar_guidance(ours.get("ar_guidance", 1.0))
        self.ar_guidance_edit = check_ar_guidance(ours.get("ar_guidance_edit", self.ar_guidance))
        # edits: keep the reference's latents where the AR left its tokens unchanged (off in the reference)
        self.keep_unchanged = ours.get("keep_unchanged", False)
        if not isinstance(self.keep_unchanged, bool):
            raise ValueError(f"model_index.json glmimage.keep_unchanged must be true or false, "
                             f"got {self.keep_unchanged!r}")
        vae_scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        self.dit_token_px = vae_scale * self.dit_cfg.patch_size           # pixels per DiT token (official: 16)
        if self.ar_token_px % self.dit_token_px:
            raise ValueError(f"AR tokens of {self.ar_token_px} px cannot be upsampled to DiT tokens of "
                             f"{self.dit_token_px} px")
        self.upsample = self.ar_token_px // self.dit_token_px             # AR grid -> DiT grid (official: 2x)
        self.prompt_tokenizer = PromptTokenizer.from_dir(root / "processor", token_px=self.ar_token_px,
                                                         preview_side=self.preview_side)
        self._mods: dict[str, object] = {}
        self._host: dict[str, list] = {}          # offload on an accelerator: each component's pinned host weights
        self.compiled = False
        self.cuda_graph = cuda_graph

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, offload: bool = False,
                        int8: bool | str = False, cuda_graph: bool = True) -> "Pipeline":
        """Load the official folder layout (a local folder or a hub id); None loads the bundled model.

        offload: keep only the running stage resident. int8: int8 weight-only linears (quantize.py) in the AR's
        layers ("ar" or True: its decode is bound by reading weights, so it also runs faster where an int8 kernel
        exists), in the DiT's blocks ("dit": half of bf16's memory, a quarter of fp32's; its compute-bound GEMMs run
        in `dtype`, slower by the per-call conversion), or both ("all"). cuda_graph: on a CUDA
        device, replay each AR decode step as one CUDA graph (elsewhere the eager loop runs)."""
        root = loading.resolve(path if path is not None else default_model())
        pipe = cls(root, torch.device(device), dtype, offload, int8, cuda_graph)
        # load everything now, so errors surface at once (offload on an accelerator: into pinned host memory;
        # offload on a CPU reads each stage from disk when it runs)
        if not offload or pipe.device.type != "cpu":
            for name in ("ar", "image_tokenizer", "dit", "glyph", "vae") + (("dit_adaln",) if offload else ()):
                getattr(pipe, name)
        return pipe

    # ------------------------------------------------------------------------------------------------------
    # Components: built on the meta device, weights assigned straight from the files in the target dtype.

    def _load(self, name: str, device: torch.device):
        if name == "ar":
            with torch.device("meta"):
                m = ARModel(self.ar_cfg)
            if "ar" in self.int8:   # the decode streams these weights: 1 byte each instead of 2 or 4; quantized as read
                quantize_int8(m.decoder.layers)
            m = loading.load_weights(m, self.vle_dir, AR_KEY_PREFIXES, device=device, dtype=self.dtype,
                                     skip_prefixes=tuple(VISION_KEY_PREFIXES))
            return m.eval().fuse()
        if name == "image_tokenizer":
            with torch.device("meta"):
                m = ImageTokenizer(self.vision_cfg)
            return loading.load_weights(m, self.vle_dir, VISION_KEY_PREFIXES, device=device, dtype=self.dtype,
                                        skip_prefixes=tuple(AR_KEY_PREFIXES)).eval()
        if name in ("dit", "dit_adaln"):
            with torch.device("meta"):
                m = DiT(self.dit_cfg)
            if "dit" in self.int8:  # every block's linears (the AdaLN ones too), quantized as read
                quantize_int8(m.transformer_blocks, min_features=1)
            # offload: "dit_adaln" holds only the AdaLN weights and "dit" everything else (the other part on meta)
            select = (adaln_key if name == "dit_adaln" else lambda k: not adaln_key(k)) if self.offload else None
            m = loading.load_weights(m, self.root / "transformer", None, device=device, dtype=self.dtype,
                                     select=select).eval()
            if name == "dit":
                m.fuse()
                if self.compiled:
                    self._compile_dit(m)
            return m
        if name == "glyph":
            return GlyphEncoder.from_folder(self.root / "text_encoder", device=device, dtype=self.dtype).eval()
        if name == "vae":
            return VAE.from_folder(self.root / "vae", device=device, dtype=self.dtype)
        raise AssertionError(name)

    def _get(self, name: str):
        if name not in self._mods:
            host = self.offload and self.device.type != "cpu"
            if self.offload and not host:
                loading.trim_heap()                       # what earlier stages freed goes back before this one loads
            self._mods[name] = self._load(name, torch.device("cpu") if host else self.device)
            loading.trim_heap()                           # and the load's own temporaries (read buffers, pre-cast copies)
            if host:
                self._host[name] = pin_weights(self._mods[name])
        return self._mods[name]

    @contextmanager
    def _stage(self, name: str, timings: dict | None = None):
        """Run a stage: its component on the device for the duration, and its wall time recorded."""
        m = self._get(name)
        t0 = time.perf_counter()
        if self.offload and self.device.type != "cpu":
            place_weights(self._host[name], self.device)        # pinned host -> device, asynchronous
        try:
            yield m
        finally:
            if timings is not None:
                sync(self.device)
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            if self.offload:
                if self.device.type == "cpu":
                    del self._mods[name]          # released; read again from disk when next needed
                    loading.trim_heap()
                else:
                    place_weights(self._host[name], None)       # back to the host copies: no copy, device freed

    ar = property(lambda self: self._get("ar"))
    image_tokenizer = property(lambda self: self._get("image_tokenizer"))
    dit = property(lambda self: self._get("dit"))
    glyph = property(lambda self: self._get("glyph"))
    vae = property(lambda self: self._get("vae"))

    def compile(self) -> "Pipeline":
        """torch.compile the AR decode step and the DiT (on an accelerator its blocks: one graph reused 30x).

        On a CPU the decode step compiles with inductor's C++ wrapper, frozen weights and its own GEMV kernels
        (`ar.CPU_COMPILE_OPTIONS`), and the DiT's whole velocity with frozen weights (`dit.CPU_COMPILE_OPTIONS`):
        the first image of each size pays the compile (minutes on 2 cores; an on_preview decode is one more size),
        and frozen weights are held a second time in packed form (more memory). With offload on a CPU nothing is
        frozen: the weights stay inputs of the compiled code, so the stages read from disk again for each image
        reuse it (slower steps than frozen, no packed copies)."""
        self.compiled = True
        if "dit" in self._mods:
            self._compile_dit(self.dit)
        return self

    def _compile_dit(self, dit: DiT) -> None:
        if self.device.type != "cpu":       # regional: one compiled block reused 30x
            for block in dit.transformer_blocks:
                block.compile()
        elif not self._dit_compiled_unfrozen:   # one graph, weights frozen in: 0.71 -> 0.50 s per step (dit.py)
            dit.velocity = cpu_compile(dit.velocity, DIT_CPU_COMPILE_OPTIONS)
        # offload or an int8 DiT on a CPU: _denoise calls _shared_velocity() with the DiT as an argument (an attribute
        # referring back to the DiT would be a reference cycle, holding each released DiT until the garbage collector
        # runs); an int8 DiT is not frozen, as freezing would fold its weights back into floating-point constants

    @property
    def _dit_compiled_unfrozen(self) -> bool:
        return self.compiled and self.device.type == "cpu" and (self.offload or "dit" in self.int8)

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
    def encode_references(self, images: list[Image.Image], timings: dict | None = None) -> list[torch.Tensor]:
        """Each reference image -> its VQ id grid [h,w] (the ViT runs once per image)."""
        with self._stage("image_tokenizer", timings) as tokenizer:
            pixels = [preprocess(im, self.min_pixels, self.max_pixels, self.vision_cfg.patch_size)
                      .to(self.device, self.dtype) for im in images]
            return tokenizer.encode(pixels)

    def _guidance_interval(self, interval) -> tuple[float, float]:
        return self.guidance_interval if interval is None else check_guidance_interval(interval)

    def _sampling(self, temperature, top_p, top_k) -> tuple[float, float, int]:
        s = self.sampling
        temperature = s.temperature if temperature is None else temperature
        top_p = s.top_p if top_p is None else top_p
        top_k = s.top_k if top_k is None else top_k
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 "
                             f"(got {temperature}, {top_p}, {top_k})")
        return temperature, top_p, top_k

    @staticmethod
    def _prompts(prompt) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r:.80}")
        return list(prompts)

    @staticmethod
    def _seeds(seed, n: int) -> list[int]:
        """One seed per image: an int s gives s, s+1, ..., s+n-1 (image b of a batch = that prompt alone with
        seed s+b); a list is taken as is; None draws a random base seed."""
        if seed is None:
            seed = random.randrange(2**31)
        if isinstance(seed, int):
            return [seed + b for b in range(n)]
        if not isinstance(seed, (list, tuple)) or len(seed) != n or not all(isinstance(x, int) for x in seed):
            raise ValueError(f"seed must be an int or a list of {n} ints (one per image), got {seed!r:.80}")
        return list(seed)

    @torch.no_grad()
    def prior_tokens(self, prompt: str | list[str], height: int, width: int, image=None,
                     seed: int | list[int] | None = None, temperature: float | None = None,
                     top_p: float | None = None, top_k: int | None = None,
                     ref_ids: list[torch.Tensor] | None = None,
                     on_grid: Callable[[int, torch.Tensor], None] | None = None, speculate: int = 0,
                     ar_guidance: float | None = None, timings: dict | None = None) -> torch.Tensor:
        """The AR's large grid: LongTensor [th, tw] for a str prompt, [B, th, tw] for a list of B prompts (one
        left-padded batch; row b is what prompt b gives alone with seed[b]). temperature=0 decodes greedily.
        speculate: k > 0 verifies k guessed tokens per AR forward (the preview upsampled for the large grid, the
        reference for an edit; ar.SpeculativeDecode): the same tokens (up to rounding), fewer forwards.
        ar_guidance: classifier-free guidance on the AR's logits (ar.guide), the unconditional branch being the same
        prompt with empty text (the same reference images for an edit), decoded in the same batch; 1 = off (the
        reference's sampling); None takes the model's own (model_index.json's "glmimage" entry: "ar_guidance", and
        for edits "ar_guidance_edit", which defaults to it; else 1).

        on_grid(k, grid) is called as soon as generated grid k is complete (t2i: 0 = preview, 1 = large), with
        [h, w] for a str prompt and [B, h, w] for a list."""
        prompts = self._prompts(prompt)
        B = len(prompts)
        self.check_size(height, width)
        temperature, top_p, top_k = self._sampling(temperature, top_p, top_k)
        seeds = self._seeds(seed, B)
        images = self._as_images(image)
        if (images or ref_ids) and B > 1:
            raise ValueError("a list of prompts is for text-to-image; edit with one prompt at a time")
        if ar_guidance is None:
            ar_guidance = self.ar_guidance_edit if (images or ref_ids) else self.ar_guidance
        ar_guidance = check_ar_guidance(ar_guidance)
        if ref_ids is None:
            ref_ids = self.encode_references(images, timings) if images else []
        texts = prompts + [""] * B if ar_guidance != 1 else prompts       # then each prompt's unconditional row
        if ref_ids:
            reqs = [self.prompt_tokenizer.i2i(t, ref_ids, height, width) for t in texts]
        else:
            reqs = [self.prompt_tokenizer.t2i(t, height, width) for t in texts]
        input_ids, mask = collate(reqs, self.ar_cfg.pad_id)                          # left-padded (B or 2B, S)
        single = isinstance(prompt, str)
        with self._stage("ar", timings) as ar:
            grids = generate_prior(ar, input_ids.to(self.device), reqs[0].ref_grids, reqs[0].target_grids,
                                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seeds,
                                   guidance=ar_guidance,
                                   attention_mask=mask.to(self.device) if len(reqs) > 1 else None,
                                   compile=self.compiled, freeze=not self.offload, timings=timings,
                                   cuda_graph=self.cuda_graph and self.device.type == "cuda",
                                   speculate=speculate, on_grid=None if on_grid is None else
                                   lambda k, g: on_grid(k, g[0] if single else g))
        return grids[-1][0] if single else grids[-1]                    # [th, tw] or [B, th, tw]

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], height: int | None = None, width: int | None = None, image=None,
                 num_inference_steps: int = 50, guidance_scale: float | None = None,
                 seed: int | list[int] | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 prior_token_ids: torch.Tensor | None = None,
                 callback: Callable[[int, torch.Tensor], None] | None = None,
                 on_preview: Callable[[Image.Image], None] | None = None, preview_steps: int = 4,
                 step_cache: float = 0.0, speculate: int = 0, guidance_interval: tuple[float, float] | None = None,
                 keep_unchanged: bool | None = None, ar_guidance: float | None = None,
                 timings: dict | None = None) -> list[Image.Image]:
        """prompt (+ reference images for edits) -> images. height/width default to the model's native size.

        A list of prompts runs as one batch through every stage (text-to-image) and returns one image per
        prompt; seed s gives image b the seed s+b, so each image equals that prompt generated alone with it
        (or pass one seed per prompt). guidance_scale: the decoder's classifier-free guidance; guidance_interval
        (lo, hi): guide only the steps whose sigma lies in (lo, hi] (1 = noise, 0 = data; the others run the
        conditional branch alone, which also saves its forward); both default to the model's own
        (model_index.json's "glmimage" entry; the official model: 1.5 at every step, (0, 1)).
        callback(step, latents) runs after every denoising step. on_preview(image) receives a low-resolution
        preview decoded from the t2i preview grid (`preview_steps` Euler steps, no CFG) as soon as the AR has
        written it, before the large grid exists (once per image, in order).
        step_cache > 0 skips the DiT's blocks after the first at steps whose first-block output has moved less than
        that (relative) since the last full step (dit.StepCache; e.g. 0.1; 0 = off, exact). speculate: k > 0
        decodes the AR speculatively, k guessed tokens verified per forward (see prior_tokens). ar_guidance:
        classifier-free guidance on the AR's tokens (see prior_tokens; None: the model's own, 1 = off).
        keep_unchanged (edits with one reference image at the output's size): where the AR wrote the reference's
        own tokens, its VAE latents are kept (held on their noisy path at every step, so the rest is drawn around
        them) and only the changed tokens, one token around them, are generated; an image with more than half
        of its tokens changed is redrawn whole (keep_mask). None takes the model's own (model_index.json; off in
        the official model, as in the reference).
        timings, if a dict, is filled with per-stage seconds (and "kept": the share of latents kept)."""
        prompts = self._prompts(prompt)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        StepCache(step_cache)                           # a bad threshold fails here, before any work
        guidance_interval = self._guidance_interval(guidance_interval)   # so does a bad interval
        check_speculate(speculate)                      # so does a bad speculate
        if ar_guidance is not None:
            check_ar_guidance(ar_guidance)              # and a bad AR guidance
        height = self.native_size if height is None else height
        width = self.native_size if width is None else width
        th, tw = self.check_size(height, width)
        images = self._as_images(image)
        if images and len(prompts) > 1:
            raise ValueError("a list of prompts is for text-to-image; edit with one prompt at a time")
        ref_ids = self.encode_references(images, timings) if images else []
        keep = self._keep_unchanged(keep_unchanged, ref_ids, th, tw)    # a bad request fails before the AR

        # 1. AR prior grids [B, th, tw]
        if prior_token_ids is None:
            seeds = self._seeds(seed, len(prompts))
            on_grid = None
            if on_preview is not None:
                def on_grid(k: int, g: torch.Tensor) -> None:
                    if k == 0 and not ref_ids:   # the t2i preview grids: decode them small, at once
                        ph, pw = g.shape[1:]
                        for im in self.decode_grid(prompts, g, ph * self.ar_token_px, pw * self.ar_token_px,
                                                   preview_steps, 1.0, seeds):
                            on_preview(im)
            grid = self.prior_tokens(prompts, height, width, seed=seeds, temperature=temperature, top_p=top_p,
                                     top_k=top_k, ref_ids=ref_ids, on_grid=on_grid, speculate=speculate,
                                     ar_guidance=ar_guidance,
                                     timings=timings)
        else:
            grid = prior_token_ids if prior_token_ids.dim() == 3 else prior_token_ids[None]
            if tuple(grid.shape[1:]) != (th, tw):
                raise ValueError(f"prior_token_ids must be [{th}, {tw}] (or [B, {th}, {tw}]) for "
                                 f"{height}x{width}, got {list(prior_token_ids.shape)}")
            if len(prompts) not in (1, grid.shape[0]):
                raise ValueError(f"{len(prompts)} prompts but prior_token_ids for {grid.shape[0]} images")
            n = self.dit_cfg.prior_vq_quantizer_codebook_size
            if int(grid.min()) < 0 or int(grid.max()) >= n:
                raise ValueError(f"prior_token_ids must be VQ code ids in [0, {n})")
            prompts = prompts * (grid.shape[0] // len(prompts))
            seeds = self._seeds(seed, len(prompts))
        if timings is not None:
            timings["grid"] = grid[0].tolist() if isinstance(prompt, str) else grid.tolist()
        return self.decode_grid(prompts, grid, height, width, num_inference_steps, guidance_scale, seeds,
                                images=images, ref_ids=ref_ids, callback=callback, step_cache=step_cache,
                                guidance_interval=guidance_interval, keep_unchanged=keep, timings=timings)

    def _keep_unchanged(self, keep_unchanged: bool | None, ref_ids: list[torch.Tensor], th: int, tw: int) -> bool:
        """Whether an edit keeps its unchanged latents: asked (True) where it cannot is an error; the model's own
        default (None) applies where it can and is silently off elsewhere (text-to-image, several references)."""
        if keep_unchanged not in (None, True, False):
            raise ValueError(f"keep_unchanged must be True, False or None (the model's default), "
                             f"got {keep_unchanged!r}")
        if not (self.keep_unchanged if keep_unchanged is None else keep_unchanged):
            return False
        reason = ("it is for edits: pass the image to keep from" if not ref_ids else
                  f"it needs exactly one reference image, got {len(ref_ids)}" if len(ref_ids) > 1 else
                  f"the output's token grid ({th}x{tw}, {th * self.ar_token_px}x{tw * self.ar_token_px} px) must "
                  f"equal the reference's ({ref_ids[0].shape[0]}x{ref_ids[0].shape[1]}): pass height and width "
                  f"{ref_ids[0].shape[0] * self.ar_token_px}x{ref_ids[0].shape[1] * self.ar_token_px}"
                  if tuple(ref_ids[0].shape) != (th, tw) else None)
        if reason is not None and keep_unchanged:
            raise ValueError(f"keep_unchanged: {reason}")
        return reason is None

    @torch.no_grad()
    def decode_grid(self, prompt: str | list[str], grid: torch.Tensor, height: int, width: int,
                    num_inference_steps: int, guidance_scale: float | None, seed: int | list[int],
                    images: list[Image.Image] = (), ref_ids: list[torch.Tensor] = (), callback=None,
                    step_cache: float = 0.0, guidance_interval: tuple[float, float] | None = None,
                    keep_unchanged: bool | None = None, timings: dict | None = None) -> list[Image.Image]:
        """The decoder half: AR grid [th, tw] or [B, th, tw] -> B images, through glyph, DiT and VAE. prompt: one
        for all, or one per image; seed: an int (image b gets seed + b) or one per image (its noise's seed).
        guidance_scale / guidance_interval / keep_unchanged: None takes the model's own (see __call__)."""
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        guidance_interval = self._guidance_interval(guidance_interval)
        grid = grid if grid.dim() == 3 else grid[None]
        B = grid.shape[0]
        keep_unchanged = self._keep_unchanged(keep_unchanged, list(ref_ids), *grid.shape[1:])
        prompts = self._prompts(prompt)
        prompts = prompts * B if len(prompts) == 1 else prompts
        assert len(prompts) == B, (len(prompts), B)
        prior = self.upsample_ids(grid.to(self.device))                                    # [B, N]

        # 2. glyph embeddings of the quoted text; the unconditional branch always gets ""
        with self._stage("glyph", timings) as glyph_encoder:
            glyph, glyph_len = glyph_encoder.encode(prompts)                                # [B, T, D], [B]
            if self.compiled:         # compiled code is specialised to shapes: T rounded up (the rows masked)
                glyph = F.pad(glyph, (0, 0, 0, glyph_rows(glyph.shape[1]) - glyph.shape[1]))  # [B, T', D]
            glyph_neg, _ = glyph_encoder.encode([""] * B)                                   # [B, 1, D]
        del glyph_encoder             # with offload this was the last reference: the encoder is freed here

        # 3-4. the reference images' KV prefix, then flow matching from seeded fp32 noise (one generator per image)
        C, s = self.dit_cfg.in_channels, self.dit_token_px // self.dit_cfg.patch_size
        noise = torch.cat([torch.randn((1, C, height // s, width // s), generator=torch.Generator("cpu").manual_seed(x))
                           for x in self._seeds(seed, B)])                                 # [B, C, h, w]
        grid_hw = (height // self.dit_token_px, width // self.dit_token_px)
        ref_latents = self.encode_reference_latents(images, ref_ids, timings) if len(images) else None
        keep = None
        if keep_unchanged:                # the reference's latents where the AR kept its tokens (scale per token)
            mask = keep_mask(grid.to(self.device), ref_ids[0].to(self.device), self.ar_token_px // s)
            keep = (ref_latents[0][0].float().expand(B, -1, -1, -1), mask)            # [B, C, h, w], [B, 1, h, w]
            if timings is not None:
                timings["kept"] = mask.float().mean().item()
        timesteps, sigmas = make_schedule(num_inference_steps, grid_hw[0] * grid_hw[1], self.scheduler_config)
        # every step's AdaLN vectors at once (they depend only on t, size and crop; the same for both CFG branches)
        # and the reference passes': with offload from the DiT's AdaLN part, freed before the rest loads
        with self._stage("dit_adaln" if self.offload else "dit", timings) as adaln:
            n = len(timesteps)
            size = torch.tensor([[height, width]], dtype=torch.float32, device=self.device).expand(n, 2)
            mods = adaln.modulation(adaln.embed_vec(timesteps.to(self.device), size, torch.zeros_like(size)))
            ref_mods = [adaln.reference_modulation(hw, self.device) for hw in ref_latents[2]] if ref_latents else None
        del adaln
        with self._stage("dit", timings) as dit:
            ref_kv = dit.reference_kv(*ref_latents, mods=ref_mods) if ref_latents is not None else None
            latents = self._denoise(dit, noise, (glyph, glyph_len), glyph_neg, prior, ref_kv, grid_hw, mods,
                                    timesteps, sigmas, guidance_scale, callback, step_cache, timings,
                                    guidance_interval, keep)
        del dit, ref_kv               # with offload the DiT is freed before the VAE loads (not held through it)
        if timings is not None:
            timings["dit"] += timings.pop("dit_adaln", 0.0)
            timings["dit_per_step"] = timings["dit"] / num_inference_steps

        # 5. decode
        with self._stage("vae", timings) as vae:
            return pixels_to_pil(vae.decode(latents))

    def _denoise(self, dit: DiT, noise, glyph, glyph_neg, prior, ref_kv, grid_hw, mods, timesteps, sigmas, guidance,
                 callback, step_cache=0.0, timings=None, guidance_interval=(0.0, 1.0), keep=None):
        shared = self._dit_compiled_unfrozen
        x, skipped = sample_latents(dit, noise.to(self.device), *glyph, glyph_neg, prior, grid_hw, mods, timesteps,
                                    sigmas, guidance, ref_kv, callback, step_cache,
                                    functools.partial(_shared_velocity(), dit) if shared else dit.velocity,
                                    masked=self.compiled, guidance_interval=guidance_interval, keep=keep)
        if timings is not None and step_cache > 0:
            timings["dit_steps_cached"] = skipped
        return x

    def upsample_ids(self, grid: torch.Tensor) -> torch.Tensor:
        """AR grid [B, th, tw] -> DiT grid ids [B, N] by nearest upsampling (official: 2x)."""
        u = self.upsample
        return grid.repeat_interleave(u, dim=1).repeat_interleave(u, dim=2).flatten(1)

    @torch.no_grad()
    def encode_reference_latents(self, images, ref_ids, timings=None):
        """Each reference through the VAE at its VQ grid's pixel size -> (latents, prior ids, sizes) lists."""
        latents, ids, sizes = [], [], []
        with self._stage("vae", timings) as vae:
            for im, g in zip(images, ref_ids):
                h, w = g.shape[0] * self.ar_token_px, g.shape[1] * self.ar_token_px  # the processor's clamped size
                latents.append(vae.encode(pil_to_pixels(im, h, w)))                  # [1, C, h/8, w/8]
                ids.append(self.upsample_ids(g[None].to(self.device)))                 # [1, N_ref]
                sizes.append((h, w))
        return latents, ids, sizes
