"""Does a compiled pipeline serve new prompts without compiling again? Per prompt: new dynamo graphs and seconds.

Compiled code is specialised to shapes; the AR's static decode cache is rounded up to `ar.DECODE_BUCKET` slots and
the DiT's glyph rows to `pipeline.glyph_rows`, so prompts of other lengths (and other quoted text) reuse it.

    python benchmarks/compile_reuse.py --model ~/.cache/glmimage/random-medium --size 256 --steps 8
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch._dynamo.utils import counters

PROMPTS = [
    "a red circle",
    "a small blue square at the top left, with the word 'HI' written at the bottom, on a cream background.",
    "a sign that says 'OPEN 24 HOURS' in green",
    "a large purple triangle on the right and a small yellow star at the bottom left, on a light gray background.",
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from glmimage.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(args.model, offload=args.offload).compile()
    size = args.size or pipe.native_size
    rows = []
    for k, prompt in enumerate(PROMPTS):
        before = counters["stats"]["unique_graphs"]
        t = time.perf_counter()
        pipe(prompt, height=size, width=size, num_inference_steps=args.steps, seed=k)
        rows.append({"prompt_chars": len(prompt), "new_graphs": counters["stats"]["unique_graphs"] - before,
                     "seconds": round(time.perf_counter() - t, 2)})
        print(rows[-1], flush=True)
    if args.out:
        json.dump({"model": str(pipe.root), "size": size, "steps": args.steps, "offload": args.offload,
                   "threads": torch.get_num_threads(), "prompts": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
