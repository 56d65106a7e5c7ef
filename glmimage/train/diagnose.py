"""Does the decoder generalise or memorise? Its own training examples vs fresh ones, two ways.

    python -m glmimage.train.diagnose --model glmimage/assets/model --run runs/small-v2 --out /tmp/diag.json

* x0 error by noise level: for t2i examples of the decoder's cache (what it trained on) and of a fresh cache built
  the same way from another data seed, the mean squared error of the DiT's clean-latent estimate
  x0_hat = x_sigma - sigma v at fixed schedule positions s (sigma = time_shift(mu, s), as in training and sampling),
  same noise for both sets. At s = 1 the estimate comes from the conditioning alone (prior tokens + glyph): a gap
  there between the two sets is memorisation.
* Scene scores from the tokenizer's ids of the example's own image (the decoder's ceiling, as evaluate's
  --oracle-tokens): n t2i examples without a word from the training stream vs n from the fresh stream.
* Words the same way (--words N): N t2i examples with a word from the training stream (words the decoder saw, drawn
  as it saw them) vs N fresh ones, read back by OCR: exact and normalised edit distance, overall and per kind. A
  decoder that spells its training words but not fresh ones lacks data; one that spells neither has not learnt to
  draw letters (too little training, or capacity: a run overfit on a few examples tells which).

--model is the exported folder (its DiT, glyph encoder, VAE, tokenizer); --run the run folder whose
decoder/cache.pt and vae/tokenizer stages the decoder trained on (synthetic data); for a fine-tune (`--init`, recorded
in its checkpoint), whose run folder has no such stages, the model's own VAE and tokenizer (its init model's).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from glmimage.train.common import load_stage
from glmimage.train.decoder import SCENE_KWARGS, build_cache, schedule_point

S_LEVELS = (0.05, 0.15, 0.3, 0.5, 0.7, 0.9, 1.0)


@torch.no_grad()
def x0_errors(dit, glyph, cache: dict, n: int, size: int, noise_seed: int = 5) -> list[float]:
    """Mean squared x0 error at each of S_LEVELS over the cache's first n t2i examples (normalised latents)."""
    idx = [i for i in range(len(cache["text"])) if i not in cache["src_latents"]][:n]
    B = len(idx)
    x0 = cache["latents"][idx].float()                                          # [B, C, h, w]
    ids = cache["ids"][idx]                                                     # [B, N]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(noise_seed))
    p = dit.cfg.patch_size
    grid = (x0.shape[2] // p, x0.shape[3] // p)
    glyph_emb, txt_len = glyph.encode([cache["text"][i] for i in idx])          # [B, T, Dt], [B]
    ctx = dit.context(glyph_emb, ids, False, grid, txt_len=txt_len)
    size_t = torch.tensor([[size, size]] * B, dtype=torch.float32)
    out = []
    for s0 in S_LEVELS:
        timestep, sigma = schedule_point(torch.full((B,), s0), grid[0] * grid[1])
        sigma = sigma.view(B, 1, 1, 1)
        xt = (1 - sigma) * x0 + sigma * noise
        v = dit.velocity(xt, ctx, dit.embed_vec(timestep, size_t, torch.zeros(B, 2))).float()
        out.append(round(((xt - sigma * v - x0) ** 2).mean().item(), 5))
    return out


def oracle_scores(pipe, source, n: int, steps: int, guidance: float, limit: int | None = None,
                  words: bool = False) -> dict:
    """Scene scores of n t2i examples of `source` (among its first `limit`), each decoded from its own image's token
    ids: word-less examples and their object scores, or (words) examples with a word and its OCR scores."""
    from glmimage.eval_scenes import check_scene, score
    results, i = [], 0
    what = "with a word" if words else "word-less"
    while len(results) < n:
        if limit is not None and i >= limit:
            raise ValueError(f"only {len(results)} {what} t2i examples among the first {limit}: lower --n / --words")
        ex = source.example(i)
        i += 1
        if ex["kind"] != "t2i" or (ex["scene"].word is not None) != words:
            continue
        prior = pipe.encode_references([ex["image"]])[0]
        image = pipe(ex["caption"], height=pipe.native_size, width=pipe.native_size, num_inference_steps=steps,
                     guidance_scale=guidance, seed=i, prior_token_ids=prior)[0]
        results.append(check_scene(image, ex["scene"], ocr=words))
    s = score(results)
    if words:
        return {"n": n, "exact": sum(r["word_right"] for r in results) / n,
                "ned": sum(r["word_ned"] for r in results) / n, "by_kind": s["word"]}
    return {k: s[k] for k in ("n_t2i", "object_accuracy", "scene_exact", "extra_objects_per_image")}


def main(argv=None) -> None:
    from glmimage.pipeline import Pipeline
    from glmimage.train.data import make_source
    from glmimage.train.presets import from_model, get_preset
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="exported model folder")
    ap.add_argument("--run", required=True, help="run folder the decoder trained in (its decoder/cache.pt)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--n", type=int, default=60, help="examples per set (default 60)")
    ap.add_argument("--words", type=int, default=0, metavar="N",
                    help="also N examples with a word per set, read back by OCR (default 0: off)")
    ap.add_argument("--fresh-seed", type=int, default=1, help="data seed of the fresh set (training used 0)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the report here (JSON)")
    args = ap.parse_args(argv)
    if args.n < 1 or args.words < 0:
        raise ValueError(f"--n must be >= 1 and --words >= 0, got {args.n} and {args.words}")
    if args.threads:
        torch.set_num_threads(args.threads)
    preset, run = get_preset(args.preset), Path(args.run)
    identity = load_stage(run, "decoder", {"identity"}).get("identity") or {}
    if identity.get("init"):            # a fine-tune: it trained on the VAE and tokenizer its export holds
        preset = from_model(args.model, preset, identity["size"])
    pipe = Pipeline.from_pretrained(args.model)
    train_cache = torch.load(run / "decoder" / "cache.pt", weights_only=False)
    fresh_cache = build_cache(preset, run, "synthetic", args.fresh_seed, 2 * args.n, progress=False)
    # the training stream (data seed 0, within the cache the decoder trained on) and the fresh one
    streams = {name: (make_source("synthetic", seed, preset.image_size, kinds=("t2i", "t2i", "t2i", "edit"),
                                  **SCENE_KWARGS), limit)
               for name, seed, limit in (("train", 0, len(train_cache["text"])), ("fresh", args.fresh_seed, None))}
    report = {"model": args.model, "run": str(run), "n": args.n, "cache_size": len(train_cache["text"]),
              "s_levels": list(S_LEVELS),
              "x0_error": {"train": x0_errors(pipe.dit, pipe.glyph, train_cache, args.n, preset.image_size),
                           "fresh": x0_errors(pipe.dit, pipe.glyph, fresh_cache, args.n, preset.image_size)},
              "oracle": {name: oracle_scores(pipe, source, args.n, args.steps, args.guidance, limit)
                         for name, (source, limit) in streams.items()}}
    if args.words:
        report["words"] = {name: oracle_scores(pipe, source, args.words, args.steps, args.guidance, limit, words=True)
                           for name, (source, limit) in streams.items()}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
