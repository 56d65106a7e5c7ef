"""AR prior, image tokenizer and prompt layout against the reference (transformers' GlmImageForConditionalGeneration
and GlmImageProcessor, loaded from a random checkpoint in the official layout), plus sampling properties.

The random checkpoint's weights are re-drawn at unit scale ("lively"): with the reference's 0.02 init attention is
nearly uniform, and wrong positions or a wrong rotary layout would hardly move the logits.
"""
from __future__ import annotations

import copy
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from glmimage.ar import (AR_KEY_PREFIXES, ARConfig, ARModel, Request, build_positions, decode_step,
                         generate_prior, prefill, sample_token)
from glmimage.prompt import PromptTokenizer, collate, preview_grid, target_grid
from glmimage.vision import VISION_KEY_PREFIXES, ImageTokenizer, VisionConfig, preprocess

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def ckpt(debug_ckpt):  # conftest: make_random_checkpoint(..., preset="debug", seed=0), once per session
    return debug_ckpt


@pytest.fixture(scope="module")
def config_json(ckpt):
    return json.loads((ckpt / "vision_language_encoder" / "config.json").read_text())


@pytest.fixture(scope="module")
def hf(ckpt):
    model = transformers.GlmImageForConditionalGeneration.from_pretrained(ckpt / "vision_language_encoder").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # lively weights: unit-scale matmuls, sharper attention, norms away from 1
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                scale = 4.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * scale / p[0].numel() ** 0.5)
            elif name.endswith("bias"):  # small in the ViT/VQ, whose token-dependent signal is weak at random init
                p.copy_((0.5 if "language_model" in name else 0.02) * torch.randn(p.shape, generator=g))
            else:  # norm weights
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def load_from_reference(module: torch.nn.Module, hf_model, prefixes: dict[str, str]) -> torch.nn.Module:
    state = {ours + k[len(theirs):]: v for k, v in hf_model.state_dict().items()
             for theirs, ours in prefixes.items() if k.startswith(theirs)}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


@pytest.fixture(scope="module")
def ar(hf, config_json):
    with torch.device("meta"):
        model = ARModel(ARConfig.from_hf(config_json))
    return load_from_reference(model, hf, AR_KEY_PREFIXES)


@pytest.fixture(scope="module")
def hf_bf16(hf, tmp_path_factory):
    """The reference as the pipeline loads it: from_pretrained(dtype=bf16) (its rotary inv_freq stays fp32)."""
    d = tmp_path_factory.mktemp("lively")
    hf.save_pretrained(d)
    return transformers.GlmImageForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16).eval()


@pytest.fixture(scope="module")
def vq(hf, config_json):
    with torch.device("meta"):
        model = ImageTokenizer(VisionConfig.from_hf(config_json))
    return load_from_reference(model, hf, VISION_KEY_PREFIXES)


@pytest.fixture(scope="module")
def processor(ckpt):
    return transformers.AutoProcessor.from_pretrained(ckpt / "processor")


@pytest.fixture(scope="module")
def ptok(ckpt):
    return PromptTokenizer.from_dir(ckpt / "processor")


def text_ids(n: int, seed: int, cfg: ARConfig) -> list[int]:
    return torch.randint(cfg.vision_vocab_size, cfg.pad_id, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_prompt(cfg: ARConfig, refs: list[tuple[int, int]], n_text: int, seed: int) -> torch.Tensor:
    """BOI ids EOI per reference, some text, BOI: the layout PromptTokenizer builds, with random ids."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for h, w in refs:
        ids += [cfg.boi_id] + torch.randint(0, cfg.boi_id, (h * w,), generator=g).tolist() + [cfg.eoi_id]
    return torch.tensor([ids + text_ids(n_text, seed, cfg) + [cfg.boi_id]])


def hf_grids(refs, targets):
    """image_grid_thw as the reference processor orders it: references, then the targets large-first."""
    return torch.tensor([[1, h, w] for h, w in refs] + [[1, h, w] for h, w in reversed(targets)])


def blocky_image(rng, h: int, w: int, mode: str = "RGB") -> Image.Image:
    """Random colour blocks with noise: patches differ a lot, so random ViT weights give varied ids."""
    blocks = Image.fromarray(rng.integers(0, 256, (6, 6, len(mode)), dtype=np.uint8), mode)
    noise = rng.integers(-20, 21, (h, w, len(mode)))
    return Image.fromarray(np.clip(np.asarray(blocks.resize((w, h), Image.Resampling.NEAREST)) + noise, 0, 255)
                           .astype(np.uint8), mode)


class MaskNonCodes(transformers.LogitsProcessor):
    """Give the reference the same full-grid guarantee as ours (no BOI/EOI mid-grid)."""

    def __init__(self, n_codes: int):
        self.n_codes = n_codes

    def __call__(self, input_ids, scores):
        scores[:, self.n_codes:] = float("-inf")
        return scores


def hf_generate(hf, cfg, input_ids, attention_mask, refs, targets, **kwargs):
    B = input_ids.shape[0]
    n = sum(h * w for h, w in targets)
    out = hf.generate(input_ids=input_ids, attention_mask=attention_mask,
                      image_grid_thw=hf_grids(refs, targets).repeat(B, 1),
                      images_per_sample=torch.tensor([len(refs) + len(targets)] * B), max_new_tokens=n,
                      do_sample=False, logits_processor=transformers.LogitsProcessorList([MaskNonCodes(cfg.boi_id)]),
                      **kwargs)
    return out[:, input_ids.shape[1]:]


def hf_teacher_forced(hf_model, prompt, refs, targets, forced):
    """The reference's own prefill + decode steps (its positions, DynamicCache), logits (1, N, V)."""
    grids, per_sample = hf_grids(refs, targets), torch.tensor([len(refs) + len(targets)])
    with torch.no_grad():
        mask = torch.ones_like(prompt)
        out = hf_model(input_ids=prompt, attention_mask=mask, image_grid_thw=grids, images_per_sample=per_sample,
                       use_cache=True)
        logits = [out.logits[:, -1]]
        for i in range(forced.shape[1] - 1):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            out = hf_model(input_ids=forced[:, i:i + 1], attention_mask=mask, past_key_values=out.past_key_values,
                           image_grid_thw=grids, images_per_sample=per_sample, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


T2I_SQUARE = ([], [(4, 4), (3, 3)])       # (refs, targets in generation order)
T2I_WIDE = ([], [(2, 5), (3, 7)])
I2I = ([(3, 4), (2, 2)], [(5, 3)])


# ----------------------------------------------------------------------------------------------------------
# configs and construction

def test_configs_from_official_json(config_json):
    assert ARConfig.from_hf(config_json) == ARConfig.from_name("debug")
    assert VisionConfig.from_hf(config_json) == VisionConfig.from_name("debug")
    # the official vision_language_encoder/config.json (values from the model card's files)
    official = {
        "image_start_token_id": 16384, "image_end_token_id": 16385, "image_token_id": 167855,
        "text_config": {"hidden_size": 4096, "num_hidden_layers": 40, "num_attention_heads": 32,
                        "num_key_value_heads": 2, "intermediate_size": 13696, "rms_norm_eps": 1e-05,
                        "vocab_size": 168064, "vision_vocab_size": 16512, "pad_token_id": 167841,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.5,
                                            "mrope_section": [8, 12, 12]}},
        "vision_config": {"depth": 40, "hidden_size": 1536, "num_heads": 16, "intermediate_size": 6144,
                          "patch_size": 16, "image_size": 2048, "in_channels": 3, "layer_norm_eps": 1e-06},
        "vq_config": {"embed_dim": 2048, "in_channels": 3},
    }
    assert ARConfig.from_hf(official) == ARConfig.from_name("glm-image")
    assert VisionConfig.from_hf(official) == VisionConfig.from_name("glm-image")
    with pytest.raises(ValueError, match="debug"):
        ARConfig.from_name("nope")
    with pytest.raises(ValueError, match="glm-image"):
        VisionConfig.from_name("nope")


def test_meta_construction_has_no_buffers():
    with torch.device("meta"):
        models = [ARModel(ARConfig.from_name("glm-image")), ImageTokenizer(VisionConfig.from_name("glm-image"))]
    for m in models:
        assert list(m.buffers()) == []
        assert all(p.is_meta for p in m.parameters())
    n_ar = sum(p.numel() for p in models[0].parameters())
    n_vis = sum(p.numel() for p in models[1].parameters())
    assert abs(n_ar / 1e9 - 8.915) < 0.01 and abs(n_vis / 1e9 - 1.2) < 0.01  # LM+head 8.915 B, ViT+VQ 1.200 B


# ----------------------------------------------------------------------------------------------------------
# parity with the reference

@pytest.mark.parametrize("refs,targets", [T2I_SQUARE, T2I_WIDE, I2I])
def test_positions_match_reference(hf, ar, refs, targets):
    cfg = ar.cfg
    prompts = [make_prompt(cfg, refs, 6, seed=0), make_prompt(cfg, refs, 3, seed=1)]
    S = max(p.shape[1] for p in prompts)
    ids = torch.full((2, S), cfg.pad_id)
    mask = torch.zeros(2, S, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, S - p.shape[1]:], mask[b, S - p.shape[1]:] = p[0], 1
    n = sum(h * w for h, w in targets)
    want, _ = hf.model.get_rope_index(ids, hf_grids(refs, targets).repeat(2, 1),
                                      torch.tensor([len(refs) + len(targets)] * 2), mask)
    want_decode = hf.model._cached_decode_position_ids[:, :, :n].permute(1, 0, 2)   # (3, B, N), no end marker
    got = build_positions(cfg, ids, mask, refs, targets)
    assert torch.equal(got[:, :, :S], want) and torch.equal(got[:, :, S:], want_decode)


def test_positions_reject_prompts_that_do_not_match_ref_grids(ar):
    prompt = make_prompt(ar.cfg, [(3, 4)], 3, seed=0)
    with pytest.raises(ValueError, match="reference image 0"):
        build_positions(ar.cfg, prompt, None, [(4, 4)], [(2, 2)])
    with pytest.raises(ValueError, match="expected 2"):
        build_positions(ar.cfg, prompt, None, [(3, 4), (1, 1)], [(2, 2)])


@pytest.mark.parametrize("refs,targets", [T2I_SQUARE, T2I_WIDE, I2I])
def test_teacher_forced_logits_match_reference(hf, ar, refs, targets):
    """Prefill + decode steps through our static cache vs the reference's own prefill/decode with its own
    positions (DynamicCache, cached decode positions), and our uncached forward on the whole sequence."""
    cfg = ar.cfg
    prompt = make_prompt(cfg, refs, 7, seed=2)
    n = sum(h * w for h, w in targets)
    forced = torch.randint(0, cfg.boi_id, (1, n), generator=torch.Generator().manual_seed(3))
    want = hf_teacher_forced(hf, prompt, refs, targets, forced)         # (1, N, V)
    with torch.no_grad():
        req = Request(ar, prompt, refs, targets)
        got = [prefill(ar, req, prompt)] + [decode_step(ar, req, forced[:, i], i) for i in range(n - 1)]
        got = torch.stack(got, dim=1)

        seq = torch.cat([prompt, forced[:, :-1]], dim=1)
        full = ar(seq, req.pos[:, :, :seq.shape[1]])[:, prompt.shape[1] - 1:]     # no cache, causal
    assert want.abs().max() > 1.0                                         # lively logits
    assert (got - want).abs().max() <= 1e-4
    assert (full - want).abs().max() <= 1e-4


@pytest.mark.parametrize("refs,targets", [T2I_WIDE, I2I])
def test_greedy_matches_reference_generate(hf, ar, refs, targets):
    cfg = ar.cfg
    prompt = make_prompt(cfg, refs, 5, seed=4)
    want = hf_generate(hf, cfg, prompt, torch.ones_like(prompt), refs, targets)
    got = generate_prior(ar, prompt, refs, targets, temperature=0)
    assert [tuple(g.shape[1:]) for g in got] == targets
    assert torch.equal(torch.cat([g.flatten(1) for g in got], dim=1), want)
    assert len(want.unique()) > 3


def test_left_padded_batch_matches_reference_and_single(hf, ar):
    cfg = ar.cfg
    refs, targets = T2I_SQUARE
    prompts = [make_prompt(cfg, refs, 9, seed=5)[0], make_prompt(cfg, refs, 4, seed=6)[0]]
    S = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((S - len(p),), cfg.pad_id), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(S - len(p), dtype=torch.long), torch.ones(len(p), dtype=torch.long)])
                        for p in prompts])
    want = hf_generate(hf, cfg, ids, mask, refs, targets)
    got = torch.cat([g.flatten(1) for g in generate_prior(ar, ids, refs, targets, temperature=0,
                                                          attention_mask=mask)], dim=1)
    single = [torch.cat([g.flatten(1) for g in generate_prior(ar, p[None], refs, targets, temperature=0)], dim=1)
              for p in prompts]
    assert torch.equal(got, want) and torch.equal(got, torch.cat(single))


def test_image_tokens_match_reference(hf, vq, processor, ckpt):
    pp = json.loads((ckpt / "processor" / "preprocessor_config.json").read_text())
    rng = np.random.default_rng(0)
    images = [blocky_image(rng, h, w) for h, w in [(100, 130), (64, 64), (300, 97), (513, 700)]]
    images.append(blocky_image(rng, 90, 120, "RGBA"))                   # alpha composited onto white
    for image in images:
        ref = processor.image_processor(images=[image], return_tensors="pt")
        (_, h, w), = ref["image_grid_thw"].tolist()
        pixels = preprocess(image, pp["min_pixels"], pp["max_pixels"])
        assert pixels.shape == (3, 16 * h, 16 * w)
        patches = pixels.view(3, h, 16, w, 16).permute(1, 3, 0, 2, 4).reshape(h * w, -1)
        assert torch.equal(patches, ref["pixel_values"])                 # bit-exact preprocessing
        with torch.no_grad():
            feats = hf.model.get_image_features(ref["pixel_values"], ref["image_grid_thw"]).pooler_output
            want = hf.model.get_image_tokens(feats).view(h, w)
        got = vq.encode([pixels])[0]
        assert torch.equal(got, want)
        assert h * w < 6 or len(got.unique()) > 2


def test_i2i_end_to_end_matches_reference(hf, ar, vq, processor, ptok, ckpt):
    """Reference images through our preprocess + tokenizer + prompt + greedy vs the reference processor and
    generate (which runs its ViT/VQ on pixel_values)."""
    pp = json.loads((ckpt / "processor" / "preprocessor_config.json").read_text())
    rng = np.random.default_rng(1)
    images = [blocky_image(rng, 90, 70), blocky_image(rng, 64, 96)]
    messages = [[{"role": "user", "content": [{"type": "image", "image": im} for im in images]
                  + [{"type": "text", "text": "make it blue"}]}]]
    inputs = processor.apply_chat_template(messages, tokenize=True, target_h=160, target_w=96, return_dict=True,
                                           return_tensors="pt")
    want = hf.generate(**inputs, max_new_tokens=5 * 3, do_sample=False,
                       logits_processor=transformers.LogitsProcessorList([MaskNonCodes(ar.cfg.boi_id)]))
    want = want[:, inputs["input_ids"].shape[1]:]

    refs = vq.encode([preprocess(im, pp["min_pixels"], pp["max_pixels"]) for im in images])
    prompt = ptok.i2i("make it blue", refs, 160, 96)
    (got,) = generate_prior(ar, prompt.input_ids, prompt.ref_grids, prompt.target_grids, temperature=0)
    assert got.shape == (1, 5, 3) and torch.equal(got.flatten(1), want)


@pytest.mark.parametrize("text,height,width", [("A red cube", 256, 192), ("", 1024, 1024),
                                               ('一只猫 on a mat, "HELLO"', 1152, 768), (" two  spaces ", 33, 2048)])
def test_t2i_prompt_ids_match_reference(processor, ptok, text, height, width):
    want = processor.apply_chat_template([[{"role": "user", "content": [{"type": "text", "text": text}]}]],
                                         tokenize=True, target_h=height, target_w=width, return_dict=True,
                                         return_tensors="pt")
    got = ptok.t2i(text, height, width)
    assert torch.equal(got.input_ids, want["input_ids"])
    assert got.target_grids == [tuple(g) for g in want["image_grid_thw"][:, 1:].tolist()[::-1]]
    assert got.target_grids[1] == target_grid(height, width) and got.target_grids[0] == preview_grid(*got.target_grids[1])


def test_i2i_prompt_ids_match_reference(processor, ptok):
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (100, 130, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))]
    messages = [[{"role": "user", "content": [{"type": "image", "image": im} for im in images]
                  + [{"type": "text", "text": "make it blue"}]}]]
    want = processor.apply_chat_template(messages, tokenize=True, target_h=320, target_w=256, return_dict=True,
                                         return_tensors="pt")
    refs = [torch.randint(0, 128, (h, w)) for _, h, w in want["image_grid_thw"][:-1].tolist()]
    got = ptok.i2i("make it blue", refs, 320, 256)
    ids = want["input_ids"].clone()
    ids[ids == ptok.image_token_id] = torch.cat([r.flatten() for r in refs])
    assert torch.equal(got.input_ids, ids)
    assert got.ref_grids == [(3, 4), (2, 2)] and got.target_grids == [(10, 8)]


def test_special_tokens_rule_matches_reference(ckpt, tmp_path):
    """With a tokenizer post-processor that adds tokens, the reference adds them in t2i (text does not start with
    BOS) but not in i2i; we must do the same."""
    from tokenizers import Tokenizer, processors

    d = tmp_path / "processor"
    d.mkdir()
    for f in (ckpt / "processor").iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> <sop> $A",
                                                       special_tokens=[("<|endoftext|>", 512), ("<sop>", 513)])
    tok.save(str(d / "tokenizer.json"))
    processor = transformers.AutoProcessor.from_pretrained(d)
    ptok = PromptTokenizer.from_dir(d)
    want = processor.apply_chat_template([[{"role": "user", "content": [{"type": "text", "text": "a cat"}]}]],
                                         tokenize=True, target_h=64, target_w=64, return_tensors="pt")
    got = ptok.t2i("a cat", 64, 64).input_ids
    assert torch.equal(got, want) and got[0, :2].tolist() == [512, 513]
    assert ptok.i2i("a cat", [torch.zeros(1, 1, dtype=torch.long)], 64, 64).input_ids[0, 0] == ptok.boi_id


def test_collate_left_pads(ptok):
    a, b = ptok.t2i("a long prompt here", 64, 64), ptok.t2i("x", 64, 64)
    ids, mask = collate([a, b], ptok.pad_id)
    assert ids.shape[1] == a.input_ids.shape[1] and mask[0].all() and not mask[1, 0]
    assert torch.equal(ids[1, mask[1].bool()], b.input_ids[0])
    with pytest.raises(ValueError):
        collate([a, ptok.t2i("x", 64, 96)], ptok.pad_id)


# ----------------------------------------------------------------------------------------------------------
# sampling

def test_sampler_distribution_matches_filtered_probs():
    """Empirical frequencies of sample_token == the reference warpers' temperature/top-k/top-p distribution."""
    n_codes, V = 24, 32
    logits = torch.linspace(-2.0, 3.0, V)[torch.randperm(V, generator=torch.Generator().manual_seed(0))]
    logits[n_codes + 1] = 10.0                          # EOI would dominate: it must never be drawn
    for temperature, top_k, top_p in [(0.9, 50, 0.75), (0.7, 6, 1.0), (1.3, 12, 0.9), (1.0, None, None),
                                      (1.0, None, 1e-6)]:  # tiny top_p: only the argmax
        warped = logits.clone()[None]
        warped[:, n_codes:] = float("-inf")
        warped = transformers.TemperatureLogitsWarper(temperature)(None, warped)
        if top_k:
            warped = transformers.TopKLogitsWarper(top_k)(None, warped)
        if top_p is not None:
            warped = transformers.TopPLogitsWarper(top_p)(None, warped)
        want = torch.softmax(warped[0], dim=-1)

        n = 200_000
        u = torch.rand(n, generator=torch.Generator().manual_seed(1))
        tokens = sample_token(logits.expand(n, V), u, n_codes, temperature, top_k, top_p)
        freq = torch.bincount(tokens, minlength=V).double() / n
        assert (freq[want == 0] == 0).all()
        assert (freq - want.double()).abs().max() < 5e-3, (temperature, top_k, top_p)


def test_greedy_is_argmax_over_codes():
    logits = torch.tensor([[0.0, 2.0, 1.0, 9.0], [3.0, 1.0, 0.0, 9.0]])
    assert sample_token(logits, torch.zeros(2), 3, 0.0, 50, 0.75).tolist() == [1, 0]


# ----------------------------------------------------------------------------------------------------------
# generation properties

def test_greedy_deterministic_and_seeded_sampling_reproducible(ar):
    prompt = make_prompt(ar.cfg, [], 6, seed=7)
    refs, targets = T2I_WIDE
    a = generate_prior(ar, prompt, refs, targets, temperature=0)
    b = generate_prior(ar, prompt, refs, targets, temperature=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    s1 = generate_prior(ar, prompt, refs, targets, temperature=1.0, top_k=None, top_p=None, seed=0)
    s2 = generate_prior(ar, prompt, refs, targets, temperature=1.0, top_k=None, top_p=None, seed=0)
    s3 = generate_prior(ar, prompt, refs, targets, temperature=1.0, top_k=None, top_p=None, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(s1, s2))
    assert not all(torch.equal(x, y) for x, y in zip(s1, s3))


def _guided_naive(ar, cond, uncond, refs, targets, scale, u, sampling):
    """The AR's classifier-free guidance, spelt out: each token from uncond + scale (cond - uncond), the next-token
    logits of the prompt and of its empty-text twin, each from a full forward over its own sequence so far (no
    cache, no padding, no batch); both sequences then take that token."""
    n = sum(h * w for h, w in targets)
    seqs, toks = [cond, uncond], []
    pos = [build_positions(ar.cfg, x, None, refs, targets) for x in seqs]     # (3, 1, S + n) each
    with torch.no_grad():
        for i in range(n):
            c, un = (ar(torch.cat([x, torch.tensor([toks], dtype=torch.long)], 1), p[:, :, :x.shape[1] + i])[:, -1]
                     .float() for x, p in zip(seqs, pos))
            toks.append(int(sample_token(un + scale * (c - un), u[:, i], ar.cfg.boi_id, *sampling.values())))
    return torch.tensor(toks)


@pytest.mark.parametrize("kind", ["t2i", "i2i"])
def test_ar_guidance_samples_the_guided_logits(ar, ptok, kind):
    """generate_prior(guidance=s) on a left-padded batch [prompt, empty-text twin] gives, through the cache, the
    naive loop's tokens (eager, the static step a CUDA graph captures, and speculative decoding); s = 1 is plain
    sampling of the prompt and s = 0 plain sampling of the twin."""
    ar64 = copy.deepcopy(ar).double()          # near-ties: cached and full forwards round alike in float64
    if kind == "t2i":
        prompts = [ptok.t2i("a red circle at the top", 64, 96), ptok.t2i("", 64, 96)]
    else:
        ref = torch.randint(0, ar.cfg.boi_id, (2, 2), generator=torch.Generator().manual_seed(1))
        prompts = [ptok.i2i("make the circle blue", [ref], 64, 64), ptok.i2i("", [ref], 64, 64)]
    refs, targets = prompts[0].ref_grids, prompts[0].target_grids
    ids, mask = collate(prompts, ar.cfg.pad_id)
    sampling = dict(temperature=0.9, top_k=50, top_p=0.9)
    u = torch.rand(1, sum(h * w for h, w in targets), generator=torch.Generator().manual_seed(4))
    naive = _guided_naive(ar64, prompts[0].input_ids, prompts[1].input_ids, refs, targets, 2.5, u, sampling)
    for kw in (dict(), dict(cuda_graph=True), dict(speculate=3)):
        grids = generate_prior(ar64, ids, refs, targets, guidance=2.5, seed=4, attention_mask=mask, **sampling, **kw)
        assert [g.shape[0] for g in grids] == [1] * len(targets)        # the images' rows only
        assert torch.equal(torch.cat([g.flatten() for g in grids]), naive)
    for scale, alone in ((1.0, 0), (0.0, 1)):
        plain = generate_prior(ar64, prompts[alone].input_ids, refs, targets, seed=4, **sampling)
        if scale == 1:
            guided = generate_prior(ar64, prompts[0].input_ids, refs, targets, guidance=1, seed=4, **sampling)
        else:
            guided = generate_prior(ar64, ids, refs, targets, guidance=scale, seed=4, attention_mask=mask, **sampling)
        assert all(torch.equal(x, y) for x, y in zip(plain, guided))
    with pytest.raises(ValueError, match="ar_guidance"):
        generate_prior(ar64, ids, refs, targets, guidance=-1.0)
    with pytest.raises(ValueError, match="unconditional"):
        generate_prior(ar64, prompts[0].input_ids, refs, targets, guidance=2.0)


def test_full_grids_even_when_model_prefers_end(ar):
    """Raise the EOI logit above everything: the reference would stop after one token; we return full grids."""
    cfg = ar.cfg
    prompt = make_prompt(cfg, [], 4, seed=8)
    eoi_heavy = ARModel(cfg)
    eoi_heavy.load_state_dict(ar.state_dict())
    eoi_heavy.lm_head = torch.nn.Linear(cfg.dim, cfg.vision_vocab_size, bias=True)  # same weights + a bias
    with torch.no_grad():
        eoi_heavy.lm_head.weight.copy_(ar.lm_head.weight)
        eoi_heavy.lm_head.bias.zero_()
        eoi_heavy.lm_head.bias[cfg.eoi_id] = 100.0
        eoi_heavy.lm_head.bias[cfg.boi_id + 5] = 90.0
    targets = [(3, 3), (4, 6)]
    with torch.no_grad():
        req = Request(eoi_heavy, prompt, [], targets)
        assert prefill(eoi_heavy, req, prompt).argmax(-1).item() == cfg.eoi_id
    for kw in [dict(temperature=0), dict(seed=0)]:
        grids = generate_prior(eoi_heavy, prompt, [], targets, **kw)
        assert [tuple(g.shape) for g in grids] == [(1, 3, 3), (1, 4, 6)]
        assert all(int(g.max()) < cfg.boi_id and int(g.min()) >= 0 for g in grids)


def test_concurrent_generations_match_sequential(ar):
    """Per-request state lives in the call: two generations in parallel threads, and two requests stepped in
    lockstep by hand, give the sequential results."""
    cfg = ar.cfg
    jobs = [(make_prompt(cfg, I2I[0], 5, seed=9), *I2I, 0), (make_prompt(cfg, [], 8, seed=10), *T2I_SQUARE, 1)]
    sequential = [generate_prior(ar, p, r, t, seed=s) for p, r, t, s in jobs]

    results = [None, None]

    def run(i):
        p, r, t, s = jobs[i]
        results[i] = generate_prior(ar, p, r, t, seed=s)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, got in zip(sequential, results):
        assert all(torch.equal(x, y) for x, y in zip(want, got))

    # lockstep, greedy
    sequential = [torch.cat([g.flatten(1) for g in generate_prior(ar, p, r, t, temperature=0)], 1)
                  for p, r, t, _ in jobs]
    with torch.no_grad():
        reqs = [Request(ar, p, r, t) for p, r, t, _ in jobs]
        logits = [prefill(ar, q, p) for q, (p, *_) in zip(reqs, jobs)]
        outs = [[], []]
        for step in range(max(q.n_new for q in reqs)):
            for i, q in enumerate(reqs):
                if step < q.n_new:
                    tok = sample_token(logits[i], torch.zeros(1), cfg.boi_id, 0.0, None, None)
                    outs[i].append(tok)
                    if step + 1 < q.n_new:
                        logits[i] = decode_step(ar, q, tok, step)
    for want, got in zip(sequential, outs):
        assert torch.equal(torch.stack(got, dim=1), want)


@pytest.mark.parametrize("refs,targets", [T2I_WIDE, I2I])
def test_bf16_bit_identical_to_reference(hf_bf16, ar, refs, targets):
    """In bf16 our ops are the reference's ops in the same order (same SDPA calls): logits match bit for bit,
    so greedy tokens match on any length."""
    cfg = ar.cfg
    model = ARModel(cfg).to(torch.bfloat16)
    model.load_state_dict(ar.state_dict())
    prompt = make_prompt(cfg, refs, 6, seed=11)
    n = sum(h * w for h, w in targets)
    forced = torch.randint(0, cfg.boi_id, (1, n), generator=torch.Generator().manual_seed(12))
    want = hf_teacher_forced(hf_bf16, prompt, refs, targets, forced)
    with torch.no_grad():
        req = Request(model, prompt, refs, targets)
        got = torch.stack([prefill(model, req, prompt)] + [decode_step(model, req, forced[:, i], i)
                                                            for i in range(n - 1)], dim=1)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    greedy = torch.cat([g.flatten(1) for g in generate_prior(model, prompt, refs, targets, temperature=0)], dim=1)
    assert torch.equal(greedy, hf_generate(hf_bf16, cfg, prompt, torch.ones_like(prompt), refs, targets))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sync debug mode)")
def test_decode_step_never_syncs(ar):
    """Sampling and decode steps queue work without waiting on the GPU (setup and prefill may sync)."""
    model = ARModel(ar.cfg).cuda()
    model.load_state_dict(ar.state_dict())
    prompt = make_prompt(ar.cfg, [], 4, seed=12).cuda()
    with torch.inference_mode():
        req = Request(model, prompt, [], [(3, 3)])
        logits = prefill(model, req, prompt)
        u = torch.rand(1, req.n_new).cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(req.n_new - 1):
                token = sample_token(logits, u[:, i], ar.cfg.boi_id, 0.9, 50, 0.75)
                logits = decode_step(model, req, token, i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
