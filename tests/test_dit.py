"""Parity of glmimage.dit / glyph / schedule against the installed reference (diffusers GLM-Image), CPU fp32.

The references are tiny randomly initialised diffusers/transformers modules built here; every weight is
re-drawn (nothing stays zero-initialised) so that every term of the forward matters.
"""

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from glmimage.dit import DiT, DiTConfig
from glmimage.glyph import GlyphEncoder, glyph_texts, glyph_token_ids
from glmimage.schedule import denoise, make_schedule, shift_mu, time_shift

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, GlmImageTransformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache  # noqa: E402
from diffusers.pipelines.glm_image.pipeline_glm_image import (  # noqa: E402
    GlmImagePipeline,
    calculate_shift,
    retrieve_timesteps,
)

ATOL = 1e-4
TINY = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            text_embed_dim=32, time_embed_dim=32, condition_dim=16, prior_vq_quantizer_codebook_size=64)
OFFICIAL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_image_seq_len=256,
                          base_shift=0.25, max_shift=0.75, time_shift_type="linear")


def randomize_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "embedding" in name:
            std = 1.0
        elif p.dim() == 2:
            std = 1.0 / math.sqrt(p.shape[1])
        else:
            std = 0.3
        p.data.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = GlmImageTransformer2DModel(**TINY).eval()
    randomize_(ref, 0)
    ours = DiT(DiTConfig.from_hf(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def ref_forward(ref, x, glyph, ids, drop, t, size, crop, kv_caches=None):
    return ref(hidden_states=x, encoder_hidden_states=glyph, prior_token_id=ids,
               prior_token_drop=torch.full_like(ids, drop, dtype=torch.bool), timestep=t, target_size=size,
               crop_coords=crop, kv_caches=kv_caches, return_dict=False)[0]


def inputs(B, H, W, T, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, H, W, generator=g)
    glyph = torch.randn(B, T, 32, generator=g)
    ids = torch.randint(0, 64, (B, (H // 2) * (W // 2)), generator=g)
    t = torch.rand(B, generator=g) * 999
    size = torch.tensor([[H * 8, W * 8]] * B, dtype=torch.float32)
    crop = torch.tensor([[0, 0]] + [[16, 8]] * (B - 1), dtype=torch.float32)
    return x, glyph, ids, t, size, crop


# ----------------------------------------------------------------------------------------------------------
# DiT


def test_config_presets_and_meta():
    with pytest.raises(ValueError, match="debug"):
        DiTConfig.from_name("nope")
    full = DiTConfig.from_name("full")
    assert full == DiTConfig.from_hf({**TINY, **{k: getattr(full, k) for k in TINY}, "_class_name": "x"})
    with torch.device("meta"):
        ours = DiT(full)
        ref = GlmImageTransformer2DModel(**{k: getattr(full, k) for k in TINY})
    assert list(ours.buffers()) == []
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert len(our_sd) == 443 and list(ref_sd) == list(our_sd)
    assert all(ref_sd[k].shape == v.shape for k, v in our_sd.items())
    assert sum(p.numel() for p in ours.parameters()) == 6_926_882_880


@torch.no_grad()
def test_dit_conditional_batched_nonsquare(pair):
    ref, ours = pair
    x, glyph, ids, t, size, crop = inputs(B=2, H=8, W=12, T=5, seed=1)
    want = ref_forward(ref, x, glyph, ids, False, t, size, crop)
    got = ours(x, glyph, ids, False, t, size, crop)
    assert got.shape == (2, 16, 8, 12)
    assert (got - want).abs().max() <= ATOL, (got - want).abs().max()


@torch.no_grad()
def test_dit_unconditional(pair):
    ref, ours = pair
    x, glyph, ids, t, size, crop = inputs(B=1, H=12, W=8, T=1, seed=2)
    want = ref_forward(ref, x, glyph, ids, True, t, size, crop)
    got = ours(x, glyph, ids, True, t, size, crop)
    assert (got - want).abs().max() <= ATOL
    # the dropped prior still contributes its bias path, and dropping changes the output
    assert (ours(x, glyph, ids, False, t, size, crop) - got).abs().max() > 1e-2


@torch.no_grad()
def test_dit_bf16(pair):
    # the checkpoint's dtype: same op order and casts as the reference (measured bit-identical on CPU)
    ref, ours = (copy.deepcopy(m).to(torch.bfloat16) for m in pair)
    for drop, T in ((False, 5), (True, 1)):
        x, glyph, ids, t, size, crop = inputs(B=1, H=8, W=12, T=T, seed=6)
        want = ref_forward(ref, x.bfloat16(), glyph.bfloat16(), ids, drop, t, size, crop)
        got = ours(x, glyph.bfloat16(), ids, drop, t, size, crop)  # fp32 latents are cast to the weights' dtype
        assert got.dtype == torch.bfloat16
        assert (got.float() - want.float()).abs().max() <= 0.05


@torch.no_grad()
def test_dit_split_api_matches_forward(pair):
    _, ours = pair
    x, glyph, ids, t, size, crop = inputs(B=1, H=8, W=8, T=3, seed=3)
    ctx = ours.context(glyph, ids, False, (4, 4))
    got = ours.velocity(x, ctx, ours.embed_vec(t, size, crop))
    assert torch.equal(got, ours(x, glyph, ids, False, t, size, crop))


@torch.no_grad()
def test_batched_cfg_equals_each_branch_alone(pair):
    # t2i CFG in one forward: the conditional rows (5 glyph tokens) and the unconditional ones (1) attend per
    # branch, unmasked (text_groups); a batch of prompts of two glyph lengths falls back to the key mask
    _, ours = pair
    x, glyph, ids, t, size, crop = inputs(B=3, H=8, W=8, T=5, seed=4)
    vec = ours.embed_vec(t[:1], size[:1], crop[:1])
    uncond = ours.context(glyph[:1, :1], ids[:1], True, (4, 4))
    for B, txt_len, groups in ((1, None, ((0, 1, 5), (1, 2, 1))), (2, torch.tensor([5, 3]), None)):
        cond = ours.context(glyph[:B], ids[:B], False, (4, 4), txt_len=txt_len)
        ctx = DiT.batch_cfg(cond, ours.context(glyph[:1, :1].expand(B, -1, -1), ids[:B], True, (4, 4)))
        assert ctx.groups == groups and (ctx.mask is None) == (groups is not None)
        got = ours.velocity(x[:1].repeat(2 * B, 1, 1, 1), ctx, vec.expand(2 * B, -1))
        for b in range(B):
            n = 5 if txt_len is None else int(txt_len[b])
            alone = ours.velocity(x[:1], ours.context(glyph[b:b + 1, :n], ids[b:b + 1], False, (4, 4)), vec)
            assert (got[b] - alone[0]).abs().max() <= 1e-5
        assert (got[B:] - ours.velocity(x[:1], uncond, vec)).abs().max() <= 1e-5


@torch.no_grad()
def test_step_cache_skips_exactly_the_blocks_after_the_first(pair):
    """StepCache: threshold 0 never skips (the uncached velocity, bit for bit); a skipped step is the first block
    plus the other blocks' residual of the last full step (so the same input gives the same velocity again), and
    the drift is measured against that full step, not the previous one."""
    from glmimage.dit import StepCache
    _, ours = pair
    x, glyph, ids, t, size, crop = inputs(B=2, H=8, W=8, T=3, seed=6)
    ctx, vec = ours.context(glyph, ids, False, (4, 4)), ours.embed_vec(t, size, crop)
    plain = ours.velocity(x, ctx, vec)
    off = StepCache(0.0)
    assert all(torch.equal(ours.velocity(x, ctx, vec, cache=off), plain) for _ in range(2)) and off.skipped == 0
    cache = StepCache(0.5)
    first = ours.velocity(x, ctx, vec, cache=cache)
    assert torch.equal(first, plain) and cache.skipped == 0          # nothing to reuse yet: a full step
    stored = cache.first
    again = ours.velocity(x, ctx, vec, cache=cache)                  # same first-block output: skipped
    assert cache.skipped == 1 and (again - plain).abs().max() <= 1e-5 and cache.first is stored
    other = inputs(B=2, H=8, W=8, T=3, seed=7)[0]
    far = ours.velocity(other, ctx, vec, cache=cache)                # moved too far: every block runs again
    assert cache.skipped == 1 and torch.equal(far, ours.velocity(other, ctx, vec)) and cache.first is not stored
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="step-cache threshold"):
            StepCache(bad)


@torch.no_grad()
def test_dit_image_to_image_kv(pair):
    ref, ours = pair
    g = torch.Generator().manual_seed(4)
    refs = [(torch.randn(1, 16, 6, 10, generator=g), torch.randint(0, 64, (15,), generator=g)),
            (torch.randn(1, 16, 4, 4, generator=g), torch.randint(0, 64, (4,), generator=g))]
    x, glyph, ids, t, size, crop = inputs(B=2, H=8, W=12, T=4, seed=5)

    # reference protocol: write (timestep 0, 0 text tokens, unbatched ref ids), then read (cond) / skip (uncond)
    caches = GlmImageKVCache(num_layers=TINY["num_layers"])
    caches.set_mode("write")
    for lat, rid in refs:
        ref(hidden_states=lat, encoder_hidden_states=glyph[:1, :0], prior_token_id=rid,
            prior_token_drop=torch.zeros_like(rid, dtype=torch.bool), timestep=torch.zeros(1),
            target_size=torch.tensor([[lat.shape[-2] * 8, lat.shape[-1] * 8]]), crop_coords=torch.zeros(1, 2),
            kv_caches=caches)
    caches.next_sample()
    caches.set_mode("read")
    want_cond = ref_forward(ref, x, glyph, ids, False, t, size, crop, caches)
    caches.set_mode("skip")
    want_uncond = ref_forward(ref, x, glyph[:, :1], ids, True, t, size, crop, caches)

    kv = ours.reference_kv([lat for lat, _ in refs], [rid[None] for _, rid in refs],
                           [(lat.shape[-2] * 8, lat.shape[-1] * 8) for lat, _ in refs])
    assert len(kv) == TINY["num_layers"]
    for (k, v), layer in zip(kv, caches.caches):
        assert k.shape == (1, 15 + 4, 2, 16)
        assert (k - layer.k_caches[0]).abs().max() <= ATOL and (v - layer.v_caches[0]).abs().max() <= ATOL
    got_cond = ours(x, glyph, ids, False, t, size, crop, ref_kv=kv)
    got_uncond = ours(x, glyph[:, :1], ids, True, t, size, crop)
    assert (got_cond - want_cond).abs().max() <= ATOL, (got_cond - want_cond).abs().max()
    assert (got_uncond - want_uncond).abs().max() <= ATOL
    assert (got_cond - ours(x, glyph, ids, False, t, size, crop)).abs().max() > 1e-2  # the prefix matters


# ----------------------------------------------------------------------------------------------------------
# Glyph


GLYPH_PROMPTS = [
    'A sign "OPEN 24h" with \u201c你好\u201d, a \'Cafe\' logo and 「世界」 and "🙂 ok"',  # all quote types, odd count
    "a cat sitting on a mat",  # no quotes
    "it's John's 'car'",  # apostrophes count as quotes
    'two: "HELLO" and "World "',  # even count -> leading pad on every text
    '"   spaced  "',
]


def test_glyph_texts_match_reference():
    assert glyph_texts("it's John's 'car'") == ["s John", "car"]
    assert glyph_texts("no quotes") == [""]
    assert glyph_texts(GLYPH_PROMPTS[0]) == ["Cafe", "你好", "OPEN 24h", "🙂 ok", "世界"]
    for p in GLYPH_PROMPTS:
        assert glyph_texts(p) == (GlmImagePipeline.get_glyph_texts(None, p)[0] or [""])


def test_glyph_token_ids_match_byt5_tokenizer():
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    for p in GLYPH_PROMPTS + ['"' + "é" * 1500 + '"']:  # 3000 bytes -> truncated
        texts = glyph_texts(p)
        want = tok(texts, max_length=2048, truncation=True).input_ids
        want = [[tok.pad_token_id] * ((len(want) + 1) % 2) + w for w in want]
        assert glyph_token_ids(texts) == want
    assert glyph_token_ids([""]) == [[1]] and glyph_token_ids(["", ""]) == [[0, 1], [0, 1]]


@torch.no_grad()
def test_glyph_embeddings_match_reference():
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False)).eval()
    stub = SimpleNamespace(tokenizer=ByT5Tokenizer(), text_encoder=t5, _execution_device=torch.device("cpu"),
                           get_glyph_texts=lambda p: GlmImagePipeline.get_glyph_texts(None, p))
    enc = GlyphEncoder(t5)
    for prompts in (GLYPH_PROMPTS, [GLYPH_PROMPTS[3]], [""]):
        want = GlmImagePipeline._get_glyph_embeds(stub, prompts, 2048, torch.device("cpu"), torch.float32)
        got, lengths = enc.encode(prompts)
        assert got.shape == want.shape
        T = want.shape[1]
        for b, n in enumerate(lengths.tolist()):  # the reference left-pads a batch (unmasked); we right-pad + mask
            assert (got[b, :n] - want[b, T - n:]).abs().max() <= 1e-5
            assert not got[b, n:].any() and not want[b, :T - n].any()
    assert enc.encode([""])[0].shape == (1, 1, 32)  # the CFG-negative branch: one </s> token
    assert enc.encode([GLYPH_PROMPTS[3]])[0].shape[1] == (1 + 5 + 1) + (1 + 6 + 1)  # pad + bytes + </s> per text
    # memo (decoder training): each quoted-text tuple runs the encoder once; the outputs are the same tensors
    prompts = GLYPH_PROMPTS + ["a red 'SUN'", "a blue 'SUN'", "no quotes", "none either"]
    plain = enc.encode(prompts)
    calls = []
    t5.register_forward_hook(lambda *a: calls.append(1))
    enc.memo = {}
    for _ in range(2):
        got = enc.encode(prompts)
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    assert len(calls) == len({tuple(glyph_texts(p)) for p in prompts}) == len(prompts) - 3   # 3 repeats


# ----------------------------------------------------------------------------------------------------------
# Schedule


def reference_schedule(num_steps, height, width):
    """What GlmImagePipeline.__call__ hands to FlowMatchEulerDiscreteScheduler (steps 7 of the pipeline)."""
    sched = FlowMatchEulerDiscreteScheduler(**OFFICIAL_SCHEDULER)
    seq_len = ((height // 8) * (width // 8)) // 4
    t = np.linspace(1000, 1.0, num_steps + 1)[:-1].astype(np.int64).astype(np.float32)
    mu = calculate_shift(seq_len, 256, 0.25, 0.75)
    retrieve_timesteps(sched, num_steps, "cpu", t, t / 1000, mu=mu)
    return sched, seq_len


@pytest.mark.parametrize("num_steps,height,width", [(50, 1024, 1024), (8, 256, 256), (30, 768, 1344)])
def test_schedule_matches_reference(num_steps, height, width):
    sched, seq_len = reference_schedule(num_steps, height, width)
    timesteps, sigmas = make_schedule(num_steps, seq_len, OFFICIAL_SCHEDULER)
    assert torch.equal(timesteps, sched.timesteps - 1)
    assert torch.equal(sigmas, sched.sigmas)
    assert sigmas.dtype == timesteps.dtype == torch.float32 and sigmas[-1] == 0 and sigmas[0] == 1
    if num_steps == 50 and height == 1024:
        assert shift_mu(4096) == 3.25 and timesteps[0] == 999 and timesteps[-1] == 19


def test_schedule_linspace_truncation_and_shift_kinds():
    for n in range(1, 120):
        want = np.linspace(1000, 1.0, n + 1)[:-1].astype(np.int64).astype(np.float32) - 1
        assert torch.equal(make_schedule(n, 256, OFFICIAL_SCHEDULER)[0], torch.from_numpy(want))
    s = torch.tensor([1.0, 0.5, 0.1])
    assert torch.allclose(time_shift(1.0, s, "exponential"), math.e / (math.e + (1 / s - 1)))
    with pytest.raises(ValueError):
        time_shift(1.0, s, "cosine")


def test_denoise_matches_scheduler_step():
    seq_len = (128 // 16) * (192 // 16)
    timesteps, sigmas = make_schedule(6, seq_len, OFFICIAL_SCHEDULER)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 16, 24, generator=g).to(torch.bfloat16)
    a, b = torch.randn(1, 16, 16, 24, generator=g), torch.randn(1, 16, 16, 24, generator=g)

    def cond(x, t):  # stand-ins for the DiT branches (bf16 model: input cast, output bf16)
        return (x.to(torch.bfloat16) * 0.5 + a * (t[:, None, None, None] / 1000)).to(torch.bfloat16)

    def uncond(x, t):
        return (x.to(torch.bfloat16) * -0.25 + b).to(torch.bfloat16)

    def model(x, i, is_cond):
        calls.append(is_cond)
        t = timesteps[i].expand(x.shape[0])
        if is_cond is None:  # batched CFG: [cond; uncond]
            B = x.shape[0] // 2
            return torch.cat([cond(x[:B], t[:B]), uncond(x[B:], t[B:])])
        return cond(x, t) if is_cond else uncond(x, t)

    for g_scale in (1.5, 1.0):
        sched, _ = reference_schedule(6, 128, 192)
        want = noise
        for t in sched.timesteps:
            t_dit = t.expand(1) - 1
            v = cond(want, t_dit).float()
            if g_scale > 1:
                v_u = uncond(want, t_dit).float()
                v = v_u + g_scale * (v - v_u)
            want = sched.step(v, t, want, return_dict=False)[0]
        seen, calls = [], []
        got = denoise(model, noise, timesteps, sigmas, g_scale, callback=lambda i, x: seen.append(i))
        assert seen == list(range(6)) and got.dtype == torch.float32
        assert calls == ([True, False] * 6 if g_scale > 1 else [True] * 6)
        assert torch.equal(got, want)
        calls = []
        got = denoise(model, noise, timesteps, sigmas, g_scale, batch_cfg=True)
        assert calls == ([None] * 6 if g_scale > 1 else [True] * 6)
        assert torch.equal(got, want)


def test_guidance_interval_guides_only_its_steps():
    """CFG only where sigma lies in (lo, hi]; elsewhere the conditional branch alone, its unconditional forward not
    run. Equal to a hand-written loop that switches the scale per step; (0, 1) is the plain sampler."""
    timesteps, sigmas = make_schedule(8, 64, OFFICIAL_SCHEDULER)
    g = torch.Generator().manual_seed(1)
    noise, a, b = (torch.randn(1, 4, 6, 6, generator=g) for _ in range(3))

    def model(x, i, is_cond):
        calls.append(is_cond)
        if is_cond is None:                                       # batched: [x; x] -> [v_cond; v_uncond]
            return torch.cat([x[:1] * 0.5 + a * (i + 1), x[1:] * -0.25 + b])
        return x * 0.5 + a * (i + 1) if is_cond else x * -0.25 + b

    lo, hi = 0.2, 0.8
    inside = [lo < s <= hi for s in sigmas[:-1].tolist()]
    assert 0 < sum(inside) < len(inside)                          # the test's interval splits the schedule
    want = noise.clone()
    for i, guided in enumerate(inside):
        c, u = want * 0.5 + a * (i + 1), want * -0.25 + b
        want = want + (sigmas[i + 1] - sigmas[i]) * (u + 3.0 * (c - u) if guided else c)
    for batch_cfg in (False, True):
        calls = []
        got = denoise(model, noise, timesteps, sigmas, 3.0, batch_cfg=batch_cfg, guidance_interval=(lo, hi))
        both = [None] if batch_cfg else [True, False]
        assert calls == [c for guided in inside for c in (both if guided else [True])]
        assert torch.allclose(got, want, atol=1e-5)
        calls = []
        full = denoise(model, noise, timesteps, sigmas, 3.0, batch_cfg=batch_cfg, guidance_interval=(0.0, 1.0))
        assert calls == both * 8
        assert torch.equal(full, denoise(model, noise, timesteps, sigmas, 3.0, batch_cfg=batch_cfg))
    for bad in [(0.5, 0.5), (-0.1, 1.0), (0.9, 0.1), (1.0,), "ab", None]:
        with pytest.raises(ValueError, match="guidance_interval"):
            denoise(model, noise, timesteps, sigmas, 3.0, guidance_interval=bad)



def test_denoise_keep_holds_the_masked_latents_on_their_noisy_path():
    """keep=(x0, mask): after every step the masked latents are (1 - sigma') x0 + sigma' noise, ending as x0 exactly;
    the rest follows the model, which sees the pinned values; an empty mask is the plain sampler."""
    timesteps, sigmas = make_schedule(6, 64, OFFICIAL_SCHEDULER)
    g = torch.Generator().manual_seed(2)
    noise, x0, a = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(3))
    model = lambda x, i, cond: x.roll(1, -2) * 0.5 + a * (i + 1)        # mixes rows: the pins are seen
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    mask[0, :, :3] = True                                                # image 0: top half kept; image 1: nothing
    seen = []
    got = denoise(model, noise, timesteps, sigmas, 1.0, keep=(x0, mask), callback=lambda i, x: seen.append(x))
    m = mask.expand_as(x0)
    assert torch.equal(got[m], x0[m])
    for i, x in enumerate(seen):
        s = sigmas[i + 1]
        assert torch.equal(x[m], ((1 - s) * x0 + s * noise)[m])
    plain = denoise(model, noise, timesteps, sigmas, 1.0)
    assert torch.equal(got[1], plain[1])                                 # image 1 kept nothing
    assert not torch.allclose(got[0][~m[0]], plain[0][~m[0]])          # the kept half steers the rest
    assert torch.equal(denoise(model, noise, timesteps, sigmas, 1.0, keep=(x0, torch.zeros_like(mask))), plain)


# ----------------------------------------------------------------------------------------------------------
# The official folder layout (tiny random checkpoint)


@torch.no_grad()
def test_debug_checkpoint_folders(debug_ckpt):
    import json

    from safetensors.torch import load_file

    cfg = DiTConfig.from_hf(json.loads((debug_ckpt / "transformer" / "config.json").read_text()))
    assert cfg == DiTConfig.from_name("debug")
    with torch.device("meta"):
        ours = DiT(cfg)
    sd = {}
    for f in sorted((debug_ckpt / "transformer").glob("*.safetensors")):
        sd.update(load_file(f))
    ours.load_state_dict(sd, strict=True, assign=True)
    ref = GlmImageTransformer2DModel.from_pretrained(debug_ckpt / "transformer").eval()
    x, _, ids, t, size, crop = inputs(B=1, H=8, W=8, T=1, seed=7)
    glyph_enc = GlyphEncoder.from_folder(debug_ckpt / "text_encoder", dtype=torch.float32)
    glyph, _ = glyph_enc.encode(['a "SALE" sign'])
    assert glyph.shape == (1, 5, 32)  # one text: 4 bytes + </s>
    ids = ids % cfg.prior_vq_quantizer_codebook_size
    want = ref_forward(ref, x, glyph.to(ref.dtype), ids, False, t, size, crop)
    got = ours(x, glyph.to(ref.dtype), ids, False, t, size, crop)
    assert (got.float() - want.float()).abs().max() <= 1e-2  # checkpoint dtype may be bf16
    scheduler_config = json.loads((debug_ckpt / "scheduler" / "scheduler_config.json").read_text())
    assert torch.equal(make_schedule(8, 256, scheduler_config)[1], make_schedule(8, 256, OFFICIAL_SCHEDULER)[1])
