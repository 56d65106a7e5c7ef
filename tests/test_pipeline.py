"""End-to-end: our Pipeline against diffusers' GlmImagePipeline on the same official-layout checkpoint."""
import numpy as np
import pytest
import torch
from PIL import Image

from glmimage import Pipeline

PROMPT = "a large red circle at the top left, with the word 'SUN' written at the middle, on a white background."


@pytest.fixture(scope="module")
def pipe(debug_ckpt):
    return Pipeline.from_pretrained(debug_ckpt, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def ref_pipe(debug_ckpt):
    from diffusers import GlmImagePipeline
    p = GlmImagePipeline.from_pretrained(str(debug_ckpt), torch_dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def _ref_image(ref_pipe, prompt, grid, height, width, steps, seed, **kw):
    ids = grid.repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(1, -1)        # d32 -> d16, [1, N]
    out = ref_pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=1.5,
                   generator=torch.Generator().manual_seed(seed), prior_token_ids=ids, output_type="pil", **kw)
    return np.asarray(out.images[0], dtype=np.int16)


def _random_grid(pipe, th, tw, seed):
    n = pipe.dit.cfg.prior_vq_quantizer_codebook_size
    return torch.randint(0, n, (th, tw), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("height,width", [(64, 64), (64, 96), (1024, 1024)])
def test_t2i_image_matches_reference_given_prior_tokens(pipe, ref_pipe, height, width):
    """1024x1024 is the official size: a 32x32 grid (larger than the 16x16 preview), 4096 DiT tokens (the schedule's
    shift at that length), the VAE at the largest size it decodes untiled."""
    grid = _random_grid(pipe, height // 32, width // 32, seed=1)
    ours = np.asarray(pipe(PROMPT, height=height, width=width, num_inference_steps=4, seed=7,
                           prior_token_ids=grid)[0], dtype=np.int16)
    ref = _ref_image(ref_pipe, PROMPT, grid, height, width, steps=4, seed=7)
    assert ours.shape == ref.shape == (height, width, 3)
    diff = np.abs(ours - ref).max()
    print(f"t2i {height}x{width}: max abs pixel diff {diff}/255")
    assert diff <= 2


def test_i2i_image_matches_reference_given_prior_tokens(pipe, ref_pipe):
    """The reference crashes on i2i in generate_prior_tokens; fed correct reference ids, its decoder runs."""
    ref = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    grid = _random_grid(pipe, 2, 2, seed=2)
    ours = np.asarray(pipe("make it 'blue'", height=64, width=64, image=ref, num_inference_steps=3, seed=3,
                           prior_token_ids=grid)[0], dtype=np.int16)
    # reference ids from transformers' vision encoder, the way its model.forward gets them
    vle = ref_pipe.vision_language_encoder
    inputs = ref_pipe.processor.image_processor(images=[ref], return_tensors="pt")
    feats = vle.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    h, w = inputs["image_grid_thw"][0, 1:].tolist()
    # (the pipeline's own call, get_image_tokens(torch.cat(feats)), is the reference's i2i crash)
    ref_ids = vle.get_image_tokens(list(feats), inputs["image_grid_thw"]).view(h, w)
    assert torch.equal(ref_ids, pipe.encode_references([ref])[0])
    up = ref_ids.repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(-1)
    theirs = _ref_image(ref_pipe, "make it 'blue'", grid, 64, 64, steps=3, seed=3, image=[ref],
                        prior_token_image_ids=[up], source_image_grid_thw=[torch.tensor([[1, 2 * h, 2 * w]])])
    diff = np.abs(ours - theirs).max()
    print(f"i2i: max abs pixel diff {diff}/255")
    assert diff <= 2


def test_same_seed_same_image_and_seed_matters(pipe):
    a = pipe(PROMPT, height=64, width=64, num_inference_steps=2, seed=11)[0]
    b = pipe(PROMPT, height=64, width=64, num_inference_steps=2, seed=11)[0]
    c = pipe(PROMPT, height=64, width=64, num_inference_steps=2, seed=12)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_batch_of_prompts_equals_each_prompt_alone(pipe):
    # different prompt lengths (left-padded AR batch) and glyph lengths (masked text keys in the DiT)
    prompts = [PROMPT, "a small blue square", "a sign that says 'OPEN 24 HOURS' in green"]
    timings, previews = {}, []
    batch = pipe(prompts, height=64, width=64, num_inference_steps=3, seed=5, timings=timings,
                 on_preview=previews.append)
    assert len(batch) == 3 and len(timings["grid"]) == 3
    ph, pw = pipe.prompt_tokenizer.t2i(PROMPT, 64, 64).target_grids[0]
    assert [p.size for p in previews] == [(pw * 32, ph * 32)] * 3                     # one preview per image
    for b, p in enumerate(prompts):
        t = {}
        alone = pipe(p, height=64, width=64, num_inference_steps=3, seed=5 + b, timings=t)[0]
        assert t["grid"] == timings["grid"][b]                                  # same AR tokens
        diff = np.abs(np.asarray(alone, np.int16) - np.asarray(batch[b], np.int16)).max()
        assert diff <= 1, (b, diff)
    grids = pipe.prior_tokens(prompts, 64, 64, seed=[7, 8, 9])
    assert grids.shape == (3, 2, 2) and torch.equal(grids[1], pipe.prior_tokens(prompts[1], 64, 64, seed=8))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(prompt=[]), "non-empty list"), (dict(prompt=["a", 3]), "list of str"),
    (dict(prompt=["a", "b"], seed=[1]), "list of 2 ints"),
    (dict(prompt=["a", "b"], image=Image.new("RGB", (64, 64))), "one prompt at a time"),
    (dict(prompt=["a", "b"], prior_token_ids=torch.zeros(3, 2, 2, dtype=torch.long)), "2 prompts"),
])
def test_bad_batches_raise(pipe, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        pipe(height=64, width=64, num_inference_steps=1, **kwargs)


def test_guidance_defaults_come_from_the_model(debug_ckpt, tmp_path):
    """model_index.json's "glmimage" entry may set the decoder's guidance (scale, sigma interval); without it the
    reference's 1.5 at every step. An explicit argument overrides the model's; a bad interval fails before any work."""
    import json
    import shutil
    grid = _random_grid(Pipeline.from_pretrained(debug_ckpt), 2, 2, seed=3)
    official = Pipeline.from_pretrained(debug_ckpt)
    assert (official.guidance_scale, official.guidance_interval) == (1.5, (0.0, 1.0))
    model = tmp_path / "model"
    shutil.copytree(debug_ckpt, model)
    index = json.loads((model / "model_index.json").read_text())
    index["glmimage"] = {**index.get("glmimage", {}), "guidance_scale": 3.0, "guidance_interval": [0.0, 0.8]}
    (model / "model_index.json").write_text(json.dumps(index))
    ours = Pipeline.from_pretrained(model)
    run = lambda p, **kw: np.asarray(p(PROMPT, height=64, width=64, num_inference_steps=4, seed=2,
                                       prior_token_ids=grid, **kw)[0], dtype=np.int16)
    default = run(ours)
    assert np.array_equal(default, run(official, guidance_scale=3.0, guidance_interval=(0.0, 0.8)))
    assert np.array_equal(run(ours, guidance_scale=1.5, guidance_interval=(0, 1)), run(official))
    assert np.abs(default - run(official)).max() > 0
    with pytest.raises(ValueError, match="guidance_interval"):
        ours(PROMPT, height=64, width=64, guidance_interval=(0.8, 0.2))
    index["glmimage"]["guidance_interval"] = [1.0, 0.5]
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="guidance_interval"):
        Pipeline.from_pretrained(model)


def test_keep_mask_dilates_changes_and_gives_up_on_large_ones():
    from glmimage.pipeline import keep_mask
    ref = torch.arange(16).reshape(4, 4)
    grid = ref.clone()[None]
    grid[0, 0, 0] = 99                                                   # one changed token in the corner
    m = keep_mask(grid, ref, scale=2)
    assert m.shape == (1, 1, 8, 8) and m.dtype == torch.bool
    want = torch.ones(4, 4, dtype=torch.bool)
    want[:2, :2] = False                                                 # the change and one token around it
    assert torch.equal(m[0, 0, ::2, ::2], want) and torch.equal(m[0, 0, 1::2, 1::2], want)
    assert torch.equal(keep_mask(grid, ref, scale=1, dilate=0)[0, 0], grid[0] == ref)
    half = ref.clone()[None]
    half[0, :2] = -1                                                     # 8 of 16 changed: still kept elsewhere
    assert keep_mask(half, ref, scale=1, dilate=0)[0, 0, 2:].all()
    half[0, 2, 0] = -1                                                   # 9 of 16: the whole image is redrawn
    assert not keep_mask(half, ref, scale=1).any()


def test_keep_unchanged_keeps_the_reference_latents(pipe):
    """An edit with keep_unchanged ends with the reference's VAE latents wherever keep_mask says so (the rest drawn
    by the DiT around them); a grid equal to the reference's gives the reference's VAE round trip, pixel for pixel."""
    from glmimage.pipeline import keep_mask
    from glmimage.vae import pixels_to_pil
    img = Image.fromarray(np.random.default_rng(4).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    ref = pipe.encode_references([img])[0]                                          # [3, 3]
    H, W = ref.shape[0] * pipe.ar_token_px, ref.shape[1] * pipe.ar_token_px
    grid = ref.clone()
    grid[0, 0] = (grid[0, 0] + 1) % pipe.dit.cfg.prior_vq_quantizer_codebook_size
    z = pipe.encode_reference_latents([img], [ref])[0][0].float()                   # [1, C, h, w]
    mask = keep_mask(grid[None], ref, pipe.ar_token_px // 8).expand_as(z)
    assert mask.any() and not mask.all()
    final = {}
    for keep in (True, False):
        seen = []
        pipe("make it 'blue'", height=H, width=W, image=img, num_inference_steps=3, seed=5, prior_token_ids=grid,
             keep_unchanged=keep, callback=lambda i, x: seen.append(x))
        final[keep] = seen[-1]
    assert torch.equal(final[True][mask], z[mask])
    assert not torch.allclose(final[False][mask], z[mask], atol=1e-2)       # without it the DiT draws them
    timings = {}
    same = pipe("make it 'blue'", height=H, width=W, image=img, num_inference_steps=2, seed=5, prior_token_ids=ref,
                keep_unchanged=True, timings=timings)[0]
    assert timings["kept"] == 1.0
    assert np.array_equal(np.asarray(same), np.asarray(pixels_to_pil(pipe.vae.decode(z))[0]))


def test_keep_unchanged_refusals_and_model_default(pipe, debug_ckpt, tmp_path):
    import json
    import shutil
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    run = dict(height=64, width=64, num_inference_steps=2, seed=0)
    for kwargs, msg in [(dict(), "for edits"), (dict(image=[img, img]), "exactly one reference"),
                        (dict(image=img, height=96), "must equal the reference's"),
                        (dict(image=img, keep_unchanged="yes"), "True, False or None")]:
        with pytest.raises(ValueError, match=msg):
            pipe(PROMPT, **{**run, "keep_unchanged": True, **kwargs})
    model = tmp_path / "model"
    shutil.copytree(debug_ckpt, model)
    index = json.loads((model / "model_index.json").read_text())
    index["glmimage"] = {**index.get("glmimage", {}), "keep_unchanged": True}
    (model / "model_index.json").write_text(json.dumps(index))
    ours = Pipeline.from_pretrained(model)
    assert not pipe.keep_unchanged and ours.keep_unchanged
    grid = pipe.encode_references([img])[0]
    edit = lambda p, **kw: np.asarray(p("make it blue", image=img, prior_token_ids=grid, **run, **kw)[0])
    assert np.array_equal(edit(ours), edit(pipe, keep_unchanged=True))        # the model's default applies
    assert np.array_equal(edit(ours, keep_unchanged=False), edit(pipe))
    assert not np.array_equal(edit(ours), edit(pipe))
    assert ours(PROMPT, **run)[0].size == (64, 64)                           # text-to-image: silently off
    index["glmimage"]["keep_unchanged"] = "yes"
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="keep_unchanged"):
        Pipeline.from_pretrained(model)


def test_ar_guidance_wiring_model_default_and_refusals(pipe, debug_ckpt, tmp_path):
    """ar_guidance reaches the AR with each prompt's empty-text twin: scale 0 samples the twin alone (t2i, a batch,
    an edit with its reference); the model's own scales (model_index.json: text-to-image, and edits apart) apply
    when none is given, and from the CLI; bad scales are refused before any work."""
    import json
    import shutil
    run = dict(height=64, width=96, seed=3, temperature=1.0)
    assert pipe.ar_guidance == 1.0
    assert torch.equal(pipe.prior_tokens(PROMPT, ar_guidance=0, **run), pipe.prior_tokens("", **run))
    pair = pipe.prior_tokens([PROMPT, "a blue square"], ar_guidance=2.0, **{**run, "seed": [3, 4]})
    assert torch.equal(pair[1], pipe.prior_tokens("a blue square", ar_guidance=2.0, **{**run, "seed": 4}))
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    edit = dict(run, width=64, image=img)
    assert torch.equal(pipe.prior_tokens("make it blue", ar_guidance=0, **edit), pipe.prior_tokens("", **edit))
    model = tmp_path / "model"
    shutil.copytree(debug_ckpt, model)
    index = json.loads((model / "model_index.json").read_text())
    index["glmimage"] = {**index.get("glmimage", {}), "ar_guidance": 3.0}
    (model / "model_index.json").write_text(json.dumps(index))
    ours = Pipeline.from_pretrained(model)
    assert ours.ar_guidance_edit == 3.0                                   # edits follow unless set apart
    guided = pipe.prior_tokens(PROMPT, ar_guidance=3.0, **run)
    assert torch.equal(ours.prior_tokens(PROMPT, **run), guided)
    index["glmimage"]["ar_guidance_edit"] = 0.0
    (model / "model_index.json").write_text(json.dumps(index))
    ours = Pipeline.from_pretrained(model)                              # t2i at 3, edits at 0 (the twin alone)
    assert torch.equal(ours.prior_tokens("make it blue", **edit), pipe.prior_tokens("", **edit))
    assert torch.equal(ours.prior_tokens("make it blue", ar_guidance=3.0, **edit),
                       pipe.prior_tokens("make it blue", ar_guidance=3.0, **edit))
    assert not torch.equal(guided, pipe.prior_tokens(PROMPT, **run))
    assert torch.equal(ours.prior_tokens(PROMPT, ar_guidance=1, **run), pipe.prior_tokens(PROMPT, **run))
    from glmimage.cli import main
    out = tmp_path / "x.png"
    timings: dict = {}
    main(["generate", PROMPT, "--model", str(debug_ckpt), "--height", "64", "--width", "96", "--steps", "1",
          "--seed", "3", "--temperature", "1", "--ar-guidance", "3", "-o", str(out)])
    a = pipe(PROMPT, num_inference_steps=1, ar_guidance=3.0, timings=timings, **run)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(a)) and timings["grid"] == guided.tolist()
    for bad in (-1.0, "2", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ar_guidance"):
            pipe(PROMPT, num_inference_steps=1, ar_guidance=bad, **run)
    for key in ("ar_guidance", "ar_guidance_edit"):
        (model / "model_index.json").write_text(json.dumps({**index, "glmimage": {**index["glmimage"], key: -2}}))
        with pytest.raises(ValueError, match="ar_guidance"):
            Pipeline.from_pretrained(model)


def test_greedy_prior_is_deterministic_and_full(pipe):
    g1 = pipe.prior_tokens(PROMPT, height=64, width=96, temperature=0, seed=1)
    g2 = pipe.prior_tokens(PROMPT, height=64, width=96, temperature=0, seed=2)
    assert g1.shape == (2, 3) and g1.dtype == torch.long
    assert torch.equal(g1, g2)
    assert int(g1.max()) < pipe.dit.cfg.prior_vq_quantizer_codebook_size


def test_i2i_end_to_end_runs(pipe):
    ref = Image.new("RGB", (64, 64), (220, 40, 40))
    out = pipe("make the red square blue", height=64, width=64, image=[ref, ref], num_inference_steps=2, seed=0)
    assert out[0].size == (64, 64)


@pytest.mark.parametrize("height,width,msg", [(100, 64, "96 or 128"), (64, 70, "64 or 96"), (64, 16, "32")])
def test_bad_sizes_raise_with_nearest_valid(pipe, height, width, msg):
    with pytest.raises(ValueError, match=msg):
        pipe(PROMPT, height=height, width=width, num_inference_steps=1, seed=0)


def test_bad_prior_shape_raises(pipe):
    with pytest.raises(ValueError, match=r"\[2, 2\]"):
        pipe(PROMPT, height=64, width=64, prior_token_ids=torch.zeros(3, 3, dtype=torch.long), seed=0)


def test_cli_generate(debug_ckpt, tmp_path, monkeypatch):
    from glmimage.cli import main
    out = tmp_path / "x.png"
    main(["generate", PROMPT, "--model", str(debug_ckpt), "--height", "64", "--width", "64", "--steps", "2",
          "-o", str(out)])
    assert Image.open(out).size == (64, 64)
    main(["generate", PROMPT, "a blue square", "--model", str(debug_ckpt), "--height", "64", "--width", "64",
          "--steps", "2", "-o", str(out)])                                      # one batch, one file per prompt
    assert Image.open(tmp_path / "x-0.png").size == Image.open(tmp_path / "x-1.png").size == (64, 64)
    main(["generate", "--int8", "--int8-dit", PROMPT, "--model", str(debug_ckpt), "--height", "64", "--width", "64",
          "--steps", "4", "--step-cache", "0.5", "--speculate", "3", "-o", str(out)])   # memory and speed options
    assert Image.open(out).size == (64, 64)
    a = tmp_path / "a.png"
    main(["generate", PROMPT, "--model", str(debug_ckpt), "--height", "64", "--width", "64", "--steps", "4",
          "--guidance", "3", "--guidance-interval", "0", "0.8", "-o", str(a)])
    b = Pipeline.from_pretrained(debug_ckpt)(PROMPT, height=64, width=64, num_inference_steps=4, seed=0,
                                               guidance_scale=3.0, guidance_interval=(0.0, 0.8))[0]
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(b))
    src = tmp_path / "src.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(src)
    seen, real_call = [], Pipeline.__call__
    monkeypatch.setattr(Pipeline, "__call__", lambda self, *a, **k: seen.append(k["keep_unchanged"]) or
                        real_call(self, *a, **k))
    for flag in (["--keep-unchanged"], ["--no-keep-unchanged"], []):
        main(["edit", "make it blue", "--image", str(src), *flag, "--model", str(debug_ckpt), "--height", "64",
              "--width", "64", "--steps", "1", "-o", str(a)])
    assert seen == [True, False, None] and Image.open(a).size == (64, 64)


def test_bundled_model_loads_offline_by_default():
    bundled = Pipeline.from_pretrained()
    assert bundled.native_size == 128 and bundled.ar_token_px == 16 and bundled.upsample == 1
    image = bundled("a large red circle in the center, on a white background.", num_inference_steps=2, seed=0)[0]
    assert image.size == (128, 128)
    assert np.asarray(image).std() > 1                      # not a blank canvas
