"""The fast engine keeps the numbers: fused/compiled/quantized/offloaded paths against the plain ones."""
import weakref

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch._dynamo.utils import counters

from glmimage import Pipeline, loading
from glmimage.ar import (AR_KEY_PREFIXES, ARConfig, ARModel, Request, SpeculativeDecode, generate_prior,
                         nearest_grid, prefill)
from glmimage.glyph import GlyphEncoder
from glmimage.prompt import collate
from glmimage.quantize import Int8Linear, quantize_int8

PROMPT = "a small blue square at the top left, with the word 'HI' written at the bottom, on a cream background."


@pytest.fixture(scope="module")
def pipe(debug_ckpt):
    return Pipeline.from_pretrained(debug_ckpt)


def _ar(debug_ckpt, fuse: bool) -> ARModel:
    vle = debug_ckpt / "vision_language_encoder"
    with torch.device("meta"):
        m = ARModel(ARConfig.from_hf(loading.read_json(vle / "config.json")))
    m = loading.load_weights(m, vle, AR_KEY_PREFIXES, skip_prefixes=("model.visual.", "model.vqmodel."))
    return m.fuse() if fuse else m


def test_fused_qkv_same_tokens_and_logits(debug_ckpt, pipe):
    plain, fused = _ar(debug_ckpt, False), _ar(debug_ckpt, True)
    assert not hasattr(fused.decoder.layers[0].self_attn, "q_proj")
    req = pipe.prompt_tokenizer.t2i(PROMPT, 64, 64)
    pos = torch.arange(req.input_ids.shape[1]).expand(3, 1, -1)
    with torch.no_grad():
        a, b = plain(req.input_ids, pos), fused(req.input_ids, pos)
    assert (a - b).abs().max() < 1e-5
    ga = generate_prior(plain, req.input_ids, [], req.target_grids, temperature=0.9, seed=3)
    gb = generate_prior(fused, req.input_ids, [], req.target_grids, temperature=0.9, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


@pytest.mark.slow
def test_compiled_decode_matches_eager(debug_ckpt, pipe):
    """The compiled step (and the compiled speculative verify step) gives the eager tokens, for two models in turn:
    on a CPU it freezes the weights into the compiled code, so each model must get its own (a second model must not
    run the first one's weights)."""
    req = pipe.prompt_tokenizer.t2i(PROMPT, 64, 64)
    other = _ar(debug_ckpt, True)
    other.lm_head.weight.data.neg_()                                   # different weights, different tokens
    seen = []
    for model in (pipe.ar, other, pipe.ar):
        for kw in (dict(temperature=0), dict(temperature=0.9, seed=5)):
            eager = generate_prior(model, req.input_ids, [], req.target_grids, **kw)
            compiled = generate_prior(model, req.input_ids, [], req.target_grids, compile=True, **kw)
            assert all(torch.equal(x, y) for x, y in zip(eager, compiled))
            spec = generate_prior(model, req.input_ids, [], req.target_grids, compile=True, speculate=3, **kw)
            assert all(torch.equal(x, y) for x, y in zip(eager, spec))   # the compiled verify step
            seen.append(eager[-1])
    assert not torch.equal(seen[0], seen[2])


@pytest.mark.slow
def test_compiled_pipeline_matches_eager(debug_ckpt, pipe):
    """compile() end to end (on a CPU: the frozen decode step and the whole DiT frozen into one graph): the eager
    pipeline's tokens and image, for text-to-image (CFG batched) and an edit (reference prefix, separate branches)."""
    fast = Pipeline.from_pretrained(debug_ckpt).compile()
    kw = dict(height=64, width=64, num_inference_steps=3, seed=1)
    t2i = [np.asarray(p(PROMPT, **kw)[0], dtype=int) for p in (pipe, fast)]
    ref = Image.fromarray(t2i[0].astype(np.uint8))
    edit = [np.asarray(p("make the background cream", image=ref, **kw)[0], dtype=int) for p in (pipe, fast)]
    assert np.abs(t2i[0] - t2i[1]).max() <= 1 and np.abs(edit[0] - edit[1]).max() <= 1
    assert "velocity" in vars(fast.dit)                         # the DiT did go through the compiled path


def test_compile_with_offload_on_cpu(debug_ckpt, pipe):
    """compile() with offload on a CPU: the weights stay inputs of the compiled code, so the stages read from disk
    again for the next image reuse it (no new graph), each stage is freed as soon as it is released (no reference
    cycle left for the garbage collector), and the image is the eager pipeline's."""
    fast = Pipeline.from_pretrained(debug_ckpt, offload=True).compile()
    kw = dict(height=64, width=64, num_inference_steps=3, seed=1)
    want = np.asarray(pipe(PROMPT, **kw)[0], dtype=int)
    loaded, load = [], fast._load

    def tracked(name, device):
        m = load(name, device)
        loaded.append(weakref.ref(m))
        return m
    fast._load = tracked
    before = counters["stats"]["unique_graphs"]
    got = np.asarray(fast(PROMPT, **kw)[0], dtype=int)                  # compiles
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= before + 2                                         # the decode step and the DiT velocity
    again = np.asarray(fast(PROMPT, **kw)[0], dtype=int)                # new module objects, the same graphs
    assert counters["stats"]["unique_graphs"] == graphs
    # another prompt length and another quoted text: the decode cache and the glyph rows are bucketed, so the same
    # graphs serve it too
    other = "a sign that says 'OPEN 24 HOURS' in green"
    other_images = [np.asarray(p(other, **kw)[0], dtype=int) for p in (pipe, fast)]
    assert counters["stats"]["unique_graphs"] == graphs
    assert np.abs(other_images[0] - other_images[1]).max() <= 1
    assert len(loaded) == 15 and all(r() is None for r in loaded)      # 5 per image: the DiT in two parts
    assert np.abs(got - want).max() <= 1 and np.array_equal(got, again)
    ref = Image.fromarray(want.astype(np.uint8))                        # an edit: the reference KV prefix
    edits = [np.asarray(p("make the background cream", image=ref, **kw)[0], dtype=int) for p in (pipe, fast)]
    assert np.abs(edits[0] - edits[1]).max() <= 1


def test_compiled_int8_dit_on_cpu(debug_ckpt):
    """compile() with an int8 DiT on a CPU: compiled without freezing (freezing would fold the int8 weights back
    into float constants), the eager int8 image from the same tokens."""
    eager = Pipeline.from_pretrained(debug_ckpt, int8="dit")
    fast = Pipeline.from_pretrained(debug_ckpt, int8="dit").compile()
    grid = torch.randint(0, 128, (2, 2), generator=torch.Generator().manual_seed(0))
    kw = dict(height=64, width=64, num_inference_steps=3, seed=1, prior_token_ids=grid)
    before = counters["stats"]["unique_graphs"]
    a, b = (np.asarray(p(PROMPT, **kw)[0], dtype=int) for p in (eager, fast))
    assert counters["stats"]["unique_graphs"] > before and "velocity" not in vars(fast.dit)   # compiled, unfrozen
    assert np.abs(a - b).max() <= 1


def test_static_decode_step_matches_eager(pipe):
    """The step a CUDA graph captures (static cache, mask, sampling and advance on the device), run eagerly here:
    the same tokens as the plain loop, sampled and greedy, for a left-padded batch too."""
    reqs = [pipe.prompt_tokenizer.t2i(p, 64, 96) for p in (PROMPT, "a red circle")]
    ids, mask = collate(reqs, pipe.ar_cfg.pad_id)
    for kw in (dict(temperature=0.9, seed=[3, 4], attention_mask=mask), dict(temperature=0, seed=[0, 0])):
        plain = generate_prior(pipe.ar, ids, [], reqs[0].target_grids, **kw)
        seen = []
        static = generate_prior(pipe.ar, ids, [], reqs[0].target_grids, cuda_graph=True,
                                on_grid=lambda k, g: seen.append(g.clone()), **kw)
        assert all(torch.equal(x, y) for x, y in zip(plain, static))
        assert all(torch.equal(x, y) for x, y in zip(seen, static))      # grids arrive complete


@pytest.fixture(scope="module")
def ar64(pipe):
    """The debug AR in float64: a k+1-token forward rounds differently from a one-token one, and the debug model's
    near-uniform logits have near-ties that a 1e-7 difference reorders (seen in fp32: top-k swapped two codes);
    in float64 the sampler (fp32) sees the same logits."""
    return copy.deepcopy(pipe.ar).double()


@pytest.mark.parametrize("k", [1, 3, 8])
def test_speculative_decode_gives_the_plain_tokens(pipe, ar64, k):
    """Speculative decoding (k guesses verified per forward) keeps the plain loop's tokens whatever the guesses:
    text-to-image (the preview drafts the large grid, the token above drafts the preview; k = 8 is wider than the
    preview) for a left-padded batch with a seed per row, sampled and greedy, grids reaching on_grid complete;
    and an edit, drafted by its reference."""
    reqs = [pipe.prompt_tokenizer.t2i(p, 64, 96) for p in (PROMPT, "a red circle")]
    ids, mask = collate(reqs, pipe.ar_cfg.pad_id)
    for kw in (dict(temperature=0.9, seed=[3, 4], attention_mask=mask), dict(temperature=0, seed=[0, 0])):
        plain = generate_prior(ar64, ids, [], reqs[0].target_grids, **kw)
        seen, timings = [], {}
        spec = generate_prior(ar64, ids, [], reqs[0].target_grids, speculate=k, timings=timings,
                              on_grid=lambda g, grid: seen.append(grid.clone()), **kw)
        assert all(torch.equal(x, y) for x, y in zip(plain, spec)) and len(spec) == 2
        assert all(torch.equal(x, y) for x, y in zip(seen, spec))
        assert 0 < timings["ar_decode_forwards"] <= timings["ar_new_tokens"] - 1
    ref = pipe.encode_references([Image.new("RGB", (96, 64), (200, 30, 30))])
    edit = pipe.prompt_tokenizer.i2i("make it blue", ref, 64, 96)
    for kw in (dict(temperature=0.9, seed=5), dict(temperature=0)):
        plain = generate_prior(ar64, edit.input_ids, edit.ref_grids, edit.target_grids, **kw)
        spec = generate_prior(ar64, edit.input_ids, edit.ref_grids, edit.target_grids, speculate=k, **kw)
        assert torch.equal(plain[0], spec[0])
    with pytest.raises(ValueError, match="speculate"):
        generate_prior(pipe.ar, edit.input_ids, edit.ref_grids, edit.target_grids, speculate=-1)
    with pytest.raises(ValueError, match="speculate"):
        pipe("a red circle", height=64, width=64, speculate=1.5)


def test_speculative_verify_keeps_every_right_guess(pipe, ar64):
    """Guesses equal to the tokens plain decoding gives are all kept: k + 1 tokens per forward. In a batch each row
    advances on its own: row 0 (right guesses) finishes after ceil((n-1)/(k+1)) forwards and waits at its last
    token while row 1 (guesses of 0) goes on; both end with plain decoding's tokens."""
    reqs = [pipe.prompt_tokenizer.t2i(p, 64, 96) for p in (PROMPT, "a red circle")]
    ids, mask = collate(reqs, pipe.ar_cfg.pad_id)
    sampling = dict(temperature=0.9, top_k=50, top_p=0.75)
    plain = torch.cat([g.flatten(1) for g in generate_prior(ar64, ids, [], reqs[0].target_grids, seed=[3, 4],
                                                            attention_mask=mask, **sampling)], dim=1)
    n, k = plain.shape[1], 3
    with torch.inference_mode():
        r = Request(ar64, ids, [], reqs[0].target_grids, mask, slack=k + 1)
        u = torch.cat([torch.rand(1, n, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
        out = torch.zeros(2, n + k + 1, dtype=torch.long)
        out[:, 0] = plain[:, 0]
        prefill(ar64, r, ids)
        draft = F.pad(plain, (0, k + 1))
        draft[1] = 0                                                    # row 1: guesses (almost) always wrong
        spec = SpeculativeDecode(ar64, r, F.pad(u, (0, k + 1)), out, draft, torch.zeros(n + k + 1, dtype=torch.long),
                                 k, *sampling.values())
        fast = math.ceil((n - 1) / (k + 1))
        for _ in range(fast):
            spec.verify()
        assert spec.i[0] == n - 1 and spec.i[1] < n - 1
        while int(spec.i.min()) + 1 < n:
            spec.verify()
    assert torch.equal(out[:, :n], plain) and spec.i.tolist() == [n - 1, n - 1]
    grid = torch.arange(6).view(1, 2, 3)
    assert nearest_grid(grid, 4, 6).tolist() == [[[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2]


def test_speculative_decode_on_the_bundled_model():
    """On the trained bundled model the guesses are often right (its large grid is mostly its preview upsampled):
    the same image in fewer AR forwards."""
    bundled = Pipeline.from_pretrained()
    prompt = "a large red circle at the top left and a small blue star in the center, on a cream background."
    runs = []
    for k in (0, 4):
        timings: dict = {}
        image = bundled(prompt, seed=2, num_inference_steps=4, speculate=k, timings=timings)[0]
        runs.append((np.asarray(image), timings))
    (plain, t0), (spec, t4) = runs
    assert t0["grid"] == t4["grid"] and np.array_equal(plain, spec)
    assert t0["ar_decode_forwards"] == t0["ar_new_tokens"] - 1
    assert t4["ar_decode_forwards"] <= 0.75 * t0["ar_decode_forwards"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager_on_cuda(debug_ckpt):
    """On a GPU: the graph-replayed decode gives the eager loop's tokens, and the pipeline uses it by default."""
    gpu = Pipeline.from_pretrained(debug_ckpt, device="cuda")
    assert gpu.cuda_graph
    req = gpu.prompt_tokenizer.t2i(PROMPT, 64, 96)
    ids = req.input_ids.cuda()
    for kw in (dict(temperature=0.9, seed=3), dict(temperature=0)):
        eager = generate_prior(gpu.ar, ids, [], req.target_grids, **kw)
        graph = generate_prior(gpu.ar, ids, [], req.target_grids, cuda_graph=True, **kw)
        assert all(torch.equal(x, y) for x, y in zip(eager, graph))
        ar64 = copy.deepcopy(gpu.ar).double()                           # as ar64: no near-tie flips
        eager64 = generate_prior(ar64, ids, [], req.target_grids, **kw)
        spec = generate_prior(ar64, ids, [], req.target_grids, cuda_graph=True, speculate=3, **kw)
        assert all(torch.equal(x, y) for x, y in zip(eager64, spec))         # the verify step as a graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_pipeline_matches_eager_on_cuda(debug_ckpt):
    """On a GPU, compile(): the decode step compiled inside its CUDA graph and every DiT block compiled give the
    eager pipeline's tokens and image (fp32), for text-to-image (batched CFG, text padding left out per branch),
    with every stage resident and with offload (stages placed from pinned host memory for each image)."""
    eager, fast = (Pipeline.from_pretrained(debug_ckpt, device="cuda") for _ in range(2))
    fast.compile()
    fast_offload = Pipeline.from_pretrained(debug_ckpt, device="cuda", offload=True).compile()
    kw = dict(height=64, width=96, num_inference_steps=3, seed=1)
    runs = []
    for p in (eager, fast, fast, fast_offload, fast_offload):          # each second run: graphs reused
        timings: dict = {}
        runs.append((np.asarray(p(PROMPT, timings=timings, **kw)[0], dtype=int), timings["grid"]))
    for image, grid in runs[1:]:
        assert grid == runs[0][1] and np.abs(image - runs[0][0]).max() <= 1


def test_pinned_offload_helpers_keep_ties_views_and_outputs(pipe):
    """pin_weights/place_weights (the accelerator offload): tied weights stay one Parameter, the DiT's q/k/v stay
    views of its fused QKV (one copy of each storage), and outputs are unchanged."""
    from glmimage.pipeline import pin_weights, place_weights
    enc = GlyphEncoder.from_folder(pipe.root / "text_encoder")
    want = enc.encode([PROMPT])[0]
    entries = pin_weights(enc)
    assert enc.t5.shared.weight is enc.t5.encoder.embed_tokens.weight
    place_weights(entries, torch.device("cpu"))
    assert torch.equal(enc.encode([PROMPT])[0], want)

    dit = pipe._load("dit", torch.device("cpu"))
    x, ids = torch.randn(1, 16, 8, 8), torch.randint(0, 128, (1, 16))
    glyph = torch.randn(1, 3, dit.cfg.text_embed_dim)
    args = (x, glyph, ids, False, torch.tensor([500.0]), torch.tensor([[64.0, 64.0]]), torch.zeros(1, 2))
    want = dit(*args)
    entries = pin_weights(dit)
    for device in (torch.device("cpu"), None):
        place_weights(entries, device)
        attn = dit.transformer_blocks[0].attn1
        assert attn.to_k.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
        assert torch.equal(dit(*args), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_on_cuda_gives_the_same_image(debug_ckpt):
    """Offload on a GPU: stages placed from pinned host memory and dropped after; same image, less held."""
    full = Pipeline.from_pretrained(debug_ckpt, device="cuda")
    off = Pipeline.from_pretrained(debug_ckpt, device="cuda", offload=True)
    a = full(PROMPT, height=64, width=64, num_inference_steps=2, seed=5)[0]
    b = off(PROMPT, height=64, width=64, num_inference_steps=2, seed=5)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert all(p.device.type == "meta" or (p.device.type == "cpu" and p.is_pinned()) for p in off.dit.parameters())


def test_int8_linear_close_to_float():
    lin = torch.nn.Linear(128, 96)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(5, 128)
    err = (q(x) - lin(x)).abs().max() / lin(x).abs().max()
    assert err < 0.02
    net = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    quantize_int8(net)
    assert isinstance(net[0], Int8Linear) and isinstance(net[2], torch.nn.Linear)  # 8 < min_features


def test_int8_linear_rows_independent_of_the_batch():
    """Up to 16 rows take the int8 kernel, whose rows come out as each alone (a speculative verify of k+1 tokens or a
    small batch rounds as one-token decoding); more rows take the converted GEMM, close to it."""
    q = Int8Linear.from_linear(torch.nn.Linear(96, 80))
    x = torch.randn(20, 96)
    alone = torch.cat([q(x[j:j + 1]) for j in range(20)])
    assert torch.equal(q(x[:16]), alone[:16]) and torch.equal(q(x[:5].view(1, 5, 96))[0], alone[:5])
    assert (q(x) - alone).abs().max() < 0.05 * alone.abs().max()


def test_int8_pipeline_runs_and_stays_close(debug_ckpt, pipe):
    q = Pipeline.from_pretrained(debug_ckpt, int8=True)
    assert isinstance(q.ar.decoder.layers[0].mlp.down_proj, Int8Linear)
    req = pipe.prompt_tokenizer.t2i(PROMPT, 64, 64)
    pos = torch.arange(req.input_ids.shape[1]).expand(3, 1, -1)
    with torch.no_grad():
        a, b = pipe.ar(req.input_ids, pos), q.ar(req.input_ids, pos)
    assert (a - b).abs().max() / a.abs().max() < 0.05
    assert q.prior_tokens(PROMPT, 64, 64, seed=0).shape == (2, 2)


def test_int8_dit(debug_ckpt, pipe):
    """int8="dit": every DiT block linear (the AdaLN ones too) int8, quantized as read, ~1/4 of the fp32 block
    bytes; the image from the same tokens stays close to the float one; with offload (the DiT in two parts) the
    same image; "all" quantizes the AR too; an unknown choice is refused before anything loads."""
    q = Pipeline.from_pretrained(debug_ckpt, int8="dit")
    block = q.dit.transformer_blocks[0]
    assert all(isinstance(m, Int8Linear) for m in (block.attn1.to_q, block.ff.net[2], block.norm1.linear))
    assert not isinstance(q.ar.decoder.layers[0].mlp.down_proj, Int8Linear)
    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert nbytes(q.dit.transformer_blocks) < 0.3 * nbytes(pipe.dit.transformer_blocks)
    timings = {}
    exact = pipe(PROMPT, height=64, width=64, num_inference_steps=4, seed=3, timings=timings)[0]
    grid = torch.tensor(timings["grid"])
    a = q(PROMPT, height=64, width=64, num_inference_steps=4, seed=3, prior_token_ids=grid)[0]
    diff = np.abs(np.asarray(a, dtype=float) - np.asarray(exact, dtype=float))
    assert 0 < diff.mean() < 4
    off = Pipeline.from_pretrained(debug_ckpt, int8="dit", offload=True)
    b = off(PROMPT, height=64, width=64, num_inference_steps=4, seed=3, prior_token_ids=grid)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    both = Pipeline.from_pretrained(debug_ckpt, int8="all")
    assert isinstance(both.ar.decoder.layers[0].mlp.down_proj, Int8Linear)
    assert isinstance(both.dit.transformer_blocks[0].attn1.to_q, Int8Linear)
    with pytest.raises(ValueError, match="int8 must be one of"):
        Pipeline.from_pretrained(debug_ckpt, int8="vae")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_quantized_as_read_equals_quantizing_the_loaded_model(debug_ckpt, dtype):
    """int8=True quantizes each weight as it is read (the AR never exists in floating point): the same int8 rows
    and scales, fused QKV included, as loading in `dtype` and then quantizing."""
    import copy
    q = Pipeline.from_pretrained(debug_ckpt, dtype=dtype, int8=True).ar
    layers = quantize_int8(copy.deepcopy(Pipeline.from_pretrained(debug_ckpt, dtype=dtype).ar.decoder.layers))
    assert isinstance(q.decoder.layers[0].self_attn.qkv_proj, Int8Linear)
    want, got = layers.state_dict(), q.decoder.layers.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_offload_gives_the_same_image(debug_ckpt, pipe):
    off = Pipeline.from_pretrained(debug_ckpt, offload=True)
    assert off._mods == {}
    a = pipe(PROMPT, height=64, width=64, num_inference_steps=2, seed=5)[0]
    b = off(PROMPT, height=64, width=64, num_inference_steps=2, seed=5)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert off._mods == {}                                   # every stage released after it ran


def test_offload_loads_the_dit_in_two_disjoint_parts(debug_ckpt, pipe):
    """With offload the DiT's AdaLN weights and the rest are never resident together: each part holds exactly its
    keys (the others on meta), together they are the whole DiT, and an edit (reference KV at its own AdaLN vectors)
    gives the same image as the whole DiT."""
    from glmimage.dit import adaln_key
    off = Pipeline.from_pretrained(debug_ckpt, offload=True)
    adaln, rest = off._load("dit_adaln", off.device), off._load("dit", off.device)
    whole = pipe.dit.state_dict()
    loaded = {k for m in (adaln, rest) for k, v in m.state_dict().items() if v.device.type != "meta"}
    assert loaded == set(whole)
    assert all(adaln_key(k) == (adaln.state_dict()[k].device.type != "meta") for k in whole)
    assert 0 < sum(adaln_key(k) for k in whole) < len(whole)
    ref = pipe(PROMPT, height=64, width=64, num_inference_steps=2, seed=2)[0]
    a = pipe("make the square red", image=ref, height=64, width=64, num_inference_steps=2, seed=5)[0]
    b = off("make the square red", image=ref, height=64, width=64, num_inference_steps=2, seed=5)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_step_cache_in_the_pipeline(pipe):
    """step_cache: 0 is the exact pipeline; a threshold skips steps (counted in timings), stays deterministic and
    close to the exact image, for t2i (one batched CFG forward) and edits (two branch calls); a bad threshold fails
    before any work."""
    exact = pipe(PROMPT, height=64, width=64, num_inference_steps=8, seed=5)[0]
    for image in (None, exact):
        timings = {}
        args = dict(height=64, width=64, image=image, num_inference_steps=8, seed=5)
        base = pipe(PROMPT, **args)[0]
        a = pipe(PROMPT, **args, step_cache=0.9, timings=timings)[0]
        assert 0 < timings["dit_steps_cached"] < 8
        assert np.array_equal(np.asarray(a), np.asarray(pipe(PROMPT, **args, step_cache=0.9)[0]))
        assert not np.array_equal(np.asarray(a), np.asarray(base))
        assert np.abs(np.asarray(a, dtype=float) - np.asarray(base, dtype=float)).mean() < 40
    assert np.array_equal(np.asarray(pipe(PROMPT, height=64, width=64, num_inference_steps=8, seed=5,
                                          step_cache=0.0)[0]), np.asarray(exact))
    with pytest.raises(ValueError, match="step-cache threshold"):
        pipe(PROMPT, height=64, width=64, num_inference_steps=2, step_cache=2.0, prior_token_ids=None)


def test_preview_arrives_before_the_image_and_timings(pipe):
    seen, timings = [], {}
    out = pipe(PROMPT, height=64, width=96, num_inference_steps=2, seed=1, timings=timings,
               on_preview=lambda im: seen.append(im.size), callback=lambda i, x: seen.append(i))
    ph, pw = pipe.prompt_tokenizer.t2i(PROMPT, 64, 96).target_grids[0]
    assert seen[0] == (pw * 32, ph * 32) and seen[1:] == [0, 1]
    assert out[0].size == (96, 64)
    for key in ("ar_prefill", "ar_decode", "ar_decode_tokens_per_s", "glyph", "dit", "dit_per_step", "vae"):
        assert timings[key] > 0, key


def test_large_images_decode_in_tiles(pipe, monkeypatch):
    vae = pipe.vae
    z = torch.randn(1, 16, 24, 24, generator=torch.Generator().manual_seed(0))
    calls = []
    orig = vae.model.tiled_decode
    monkeypatch.setattr(vae.model, "tiled_decode", lambda x: calls.append(x.shape) or orig(x))
    monkeypatch.setattr(vae, "tile_pixels", 128 * 128)
    out = vae.decode(z)
    assert calls and out.shape == (1, 3, 192, 192) and torch.isfinite(out).all()


def test_bench_without_the_reference_compares_with_the_first_variant(debug_ckpt, tmp_path):
    """--reference-dtype none: the later variants decode the first one's tokens, so an approximate variant (here the
    step cache) is compared with it from the same tokens."""
    import json

    from glmimage.bench import main
    out = tmp_path / "bench.json"
    main(["--model", str(debug_ckpt), "--height", "64", "--width", "64", "--steps", "6", "--warmup", "0",
          "--repeat", "1", "--device", "cpu", "--dtype", "float32,float32+cache0.9", "--reference-dtype", "none",
          "--out", str(out)])
    report = json.loads(out.read_text())
    cached = report["comparisons"]["glmimage-float32+cache0.9"]
    assert 0 < cached["image_vs_our_fp32_same_tokens"]["max_abs"] and cached["ar_tokens_equal_to_our_fp32"] == 1.0
    assert report["results"]["glmimage-float32+cache0.9"]["stages"]["dit_steps_cached"] > 0


def test_bench_runs_both_sides_and_reports(debug_ckpt, tmp_path):
    """`glmimage bench` end to end on the debug checkpoint: reference + two of our variants, each in its own
    process; the report has per-stage timings, floors, comparisons, and our image from the reference's tokens
    matches the reference's image."""
    import json

    from glmimage.bench import main
    out = tmp_path / "bench.json"
    main(["--model", str(debug_ckpt), "--height", "64", "--width", "64", "--steps", "2", "--warmup", "0",
          "--repeat", "1", "--device", "cpu", "--dtype", "float32,float32+batch2+offload", "--bracket",
          "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"reference-float32", "glmimage-float32", "glmimage-float32+batch2+offload"}
    before, after = report["results"]["reference-float32"]["totals_before_after"]      # --bracket: ran twice
    assert 0 < report["results"]["reference-float32"]["stages"]["total"] == min(before, after)
    floors = [report["results"][k]["floor"] for k in ("glmimage-float32", "glmimage-float32+batch2+offload")]
    assert floors[0]["matmul_flops"] == floors[1]["matmul_flops"]     # the machine's best rate, not each worker's
    for r in report["results"].values():
        assert r["stages"]["total"] > 0 and r["stages"]["ar_decode_tokens_per_s"] > 0 and r["peak_rss_gb"] > 0
        # after the warm-up, within the process's (two kernel counters: gVisor's getrusage lags VmHWM by ~0.1%)
        assert 0 < r["peak_rss_measured_gb"] <= r["peak_rss_gb"] * 1.01
    ours, batch = report["comparisons"]["glmimage-float32"], report["comparisons"]["glmimage-float32+batch2+offload"]
    assert ours["image_vs_reference_same_tokens"]["max_abs"] <= 2
    assert ours["speedup_end_to_end"] > 0 and ours["dit_over_floor"] > 0 and 0 < ours["ar_decode_linears_share"]
    assert batch["throughput_vs_reference"] > 0
    assert report["results"]["glmimage-float32+batch2+offload"]["stages"]["s_per_image"] > 0
    assert batch["ar_decode_linears_share"] > 0                    # the floor probe runs with offload too
