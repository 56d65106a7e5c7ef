"""One DiT denoising step alone, five ways, each in this process: eager, eager under the text-key mask (what
batched CFG did before it left each branch's padding out per branch), blocks compiled one by one (what
`compile()` does on an accelerator), the whole velocity compiled, and the whole velocity compiled with frozen
weights (what `compile()` does on a CPU). Text-to-image with CFG batched (batch 2), random latents and tokens.

    python benchmarks/dit_step.py --model ~/.cache/glmimage/random-medium --mode frozen   # `glmimage bench` makes it
    python benchmarks/dit_step.py --model PATH --mode eager --dtype bfloat16

One mode per run (a compiled graph and its packed weights stay in the process): peak RSS is this mode's.
"""
import argparse
import json
import resource
import time

import torch

from glmimage.ar import cpu_compile
from glmimage.dit import CPU_COMPILE_OPTIONS, text_key_mask
from glmimage.pipeline import Pipeline
from glmimage.schedule import make_schedule

MODES = ("eager", "masked", "blocks", "whole", "frozen")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="an official-layout checkpoint folder")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--steps", type=int, default=8, help="timed steps per repeat")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    pipe = Pipeline.from_pretrained(args.model, dtype=dtype)
    dit = pipe.dit
    g = torch.Generator().manual_seed(0)
    side = args.size // pipe.dit_token_px
    grid, latent = (side, side), args.size // (pipe.dit_token_px // dit.cfg.patch_size)
    glyph = torch.randn(1, 5, dit.cfg.text_embed_dim, generator=g).to(dtype)
    glyph_neg = torch.randn(1, 1, dit.cfg.text_embed_dim, generator=g).to(dtype)
    prior = torch.randint(0, dit.cfg.prior_vq_quantizer_codebook_size, (1, side * side), generator=g)
    x = torch.randn(2, dit.cfg.in_channels, latent, latent, generator=g)
    velocity = dit.velocity
    if args.mode == "blocks":
        for block in dit.transformer_blocks:
            block.compile()
    elif args.mode == "whole":
        velocity = torch.compile(dit.velocity, dynamic=False)
    elif args.mode == "frozen":
        velocity = cpu_compile(dit.velocity, CPU_COMPILE_OPTIONS)
    with torch.no_grad():
        ctx = dit.batch_cfg(dit.context(glyph, prior, False, grid), dit.context(glyph_neg, prior, True, grid))
        if args.mode == "masked":
            ctx = ctx._replace(groups=None, mask=text_key_mask(ctx.txt_len, glyph.shape[1], side * side))
        ts, _ = make_schedule(args.steps, side * side, pipe.scheduler_config)
        n = len(ts)
        mods = dit.modulation(dit.embed_vec(ts, torch.tensor([[float(args.size)] * 2]).expand(n, 2),
                                            torch.zeros(n, 2)))

        def step(i: int) -> torch.Tensor:
            mod = type(mods)([m[i:i + 1] for m in mods.blocks], mods.out[i:i + 1])
            return velocity(x, ctx, mod=mod)

        t = time.perf_counter()
        step(0)
        first = time.perf_counter() - t
        per_step = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            for i in range(args.steps):
                step(i)
            per_step.append((time.perf_counter() - t) / args.steps)
    print(json.dumps({"mode": args.mode, "dtype": args.dtype, "size": args.size, "first_call_s": round(first, 1),
                      "s_per_step": [round(s, 3) for s in per_step], "best_s_per_step": round(min(per_step), 3),
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}))


if __name__ == "__main__":
    main()
