"""Score an exported model with glmimage.eval_scenes and draw a sample grid for the model card.

    python -m glmimage.train.evaluate --model glmimage/assets/model --n 50 --out /tmp/eval --steps 20
    python -m glmimage.train.evaluate --model glmimage/assets/model --n 50 --out /tmp/oracle --oracle-tokens

--oracle-tokens replaces the AR by the image tokenizer's ids of a ground-truth render of each prompt (of each
edit's target, the edit still decoding against its source): the score is then the decoder's (+ VAE's) ceiling,
which separates what the AR gets wrong from what the decoder does; --vae-roundtrip scores ground-truth renders (of
prompts and of edit targets) passed through the VAE alone (the ceiling below that one).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

SAMPLE_PROMPTS = [
    "a large red circle in the center, on a white background.",
    "a small blue square at the top left, on a light gray background.",
    "a large green triangle on the right, on a cream background.",
    "a small yellow star at the bottom, on a light blue background.",
    "a large purple square at the top right and a small orange circle at the bottom left, on a white background.",
    "a small pink triangle on the left, a large black circle at the top right and a small green star at the "
    "bottom right, on a cream background.",
    "a large blue circle at the bottom left, with the word 'SUN' written at the top, on a white background.",
    "a small red star at the top, with the word 'CAT' written in blue at the bottom, on a light gray background.",
    "a large orange square at the top left, with the word '\u5b66\u6821' written at the bottom, on a white background.",
    "a large yellow circle in the center, with the word 'QZX' written at the top, on a light blue background.",
]


def load(model: str | None, steps: int, guidance: float | None, oracle_tokens: bool = False,
         vae_roundtrip: bool = False, step_cache: float = 0.0, int8: str | None = None,
         temperature: float | None = None, guidance_interval: tuple[float, float] | None = None,
         keep_unchanged: bool | None = None, ar_guidance: float | None = None):
    from glmimage.eval_scenes import ground_truth_generate_fn
    from glmimage.pipeline import Pipeline
    from glmimage.vae import pil_to_pixels, pixels_to_pil
    pipe = Pipeline.from_pretrained(model, int8=int8 or False)
    size = pipe.native_size                          # model_index.json's "glmimage" entry, as are the grid factors

    render_truth = ground_truth_generate_fn(size)

    def roundtrip(truth: Image.Image) -> Image.Image:   # the VAE's own ceiling: a ground-truth render encoded, decoded
        return pixels_to_pil(pipe.vae.decode(pipe.vae.encode(pil_to_pixels(truth, size, size))))[0]

    settings = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                    guidance_interval=guidance_interval,
                    step_cache=step_cache, temperature=temperature,
                    ar_guidance=ar_guidance)                              # the same for prompts and edits

    def generate(prompt: str, seed: int) -> Image.Image:
        if vae_roundtrip:
            return roundtrip(render_truth(prompt, seed))
        prior = pipe.encode_references([render_truth(prompt, seed)])[0] if oracle_tokens else None
        return pipe(prompt, seed=seed, prior_token_ids=prior, **settings)[0]

    def edit(instruction: str, source: Image.Image, seed: int, truth: Image.Image) -> Image.Image:
        if vae_roundtrip:
            return roundtrip(truth)
        prior = pipe.encode_references([truth])[0] if oracle_tokens else None
        return pipe(instruction, image=source, seed=seed, prior_token_ids=prior, keep_unchanged=keep_unchanged,
                    **settings)[0]

    return pipe, generate, edit, size


def sample_grid(generate, size: int, path: Path, seeds=(0, 1)) -> None:
    tiles = [[generate(p, s) for p in SAMPLE_PROMPTS] for s in seeds]
    sheet = Image.new("RGB", (size * len(SAMPLE_PROMPTS), size * len(seeds)), "white")
    for r, row in enumerate(tiles):
        for c, im in enumerate(row):
            sheet.paste(im, (c * size, r * size))
    sheet.save(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--n-edit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=None,
                    help="the decoder's CFG scale (default: the model's own, model_index.json; else 1.5)")
    ap.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="guide only the steps whose sigma lies in (LO, HI] (default: the model's own; else 0 1)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="the AR's sampling temperature (default: the model's generation_config.json; 0 = greedy)")
    ap.add_argument("--ar-guidance", type=float, default=None,
                    help="the AR's classifier-free guidance scale (default: the model's own; else 1 = off)")
    ap.add_argument("--keep-unchanged", action=argparse.BooleanOptionalAction, default=None,
                    help="edits keep the source's latents where the AR left its tokens unchanged (default: the "
                         "model's own)")
    ap.add_argument("--step-cache", type=float, default=0.0, help="the pipeline's step_cache threshold (0 = off)")
    ap.add_argument("--int8", default=None, choices=["ar", "dit", "all"], help="the pipeline's int8 option")
    ap.add_argument("--out", required=True)
    ap.add_argument("--grid", default=None, help="also write a sample grid PNG here")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--oracle-tokens", action="store_true",
                    help="decode the tokenizer's ids of a ground-truth render (of the prompt, of an edit's target) "
                         "instead of the AR's")
    ap.add_argument("--vae-roundtrip", action="store_true",
                    help="score ground-truth renders passed through the VAE alone (its ceiling)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from glmimage.eval_scenes import evaluate
    pipe, generate, edit, size = load(args.model, args.steps, args.guidance, args.oracle_tokens, args.vae_roundtrip,
                                      args.step_cache, args.int8, args.temperature, args.guidance_interval,
                                      args.keep_unchanged, args.ar_guidance)
    t = time.perf_counter()
    generate(SAMPLE_PROMPTS[0], 0)
    print(f"one {size}x{size} t2i generation ({args.steps} steps): {time.perf_counter() - t:.2f} s")
    if args.grid:
        sample_grid(generate, size, Path(args.grid))
    report = evaluate(generate, args.n, args.seed, args.out, size=size, edit_fn=edit, n_edit=args.n_edit)
    print(json.dumps(report["scores"], indent=1))


if __name__ == "__main__":
    main()
