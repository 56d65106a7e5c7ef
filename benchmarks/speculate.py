"""Speculative AR decoding (`pipe(..., speculate=K)`, ar.SpeculativeDecode): forwards saved and time, same tokens.

For each prompt the AR runs plainly (K = 0), then at each K; every run must give the plain run's grid (the report
counts those that do). Text-to-image prompts are the evaluation's fresh scenes (seed 0): the large grid is guessed as
the preview upsampled, the preview as the token above. Edits (--edits N) are the evaluation's edit cases, each on a
render of its source scene: the grid is guessed as the reference's. --batch B runs the text-to-image prompts B at a
time (one left-padded batch; each row advances on its own). Reported per K: AR decode forwards per call and tokens per
forward (per row), AR decode seconds per prompt (best of --repeat) and the speedup over K = 0.

    python benchmarks/speculate.py --n 40 --edits 24 --ks 2,4,8 --out benchmarks/results/speculate-small-cpu.json
"""
from __future__ import annotations

import argparse
import platform

import numpy as np
import torch

from glmimage.bench import write_report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    ap.add_argument("--n", type=int, default=40, help="text-to-image prompts")
    ap.add_argument("--edits", type=int, default=24, help="edits")
    ap.add_argument("--batch", type=int, default=1, help="text-to-image prompts per call")
    ap.add_argument("--ks", default="2,4,8", help="guesses verified per forward (K = 0 always runs first)")
    ap.add_argument("--temperature", type=float, default=None, help="default: the model's generation_config")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per prompt and K (best kept)")
    ap.add_argument("--compile", action="store_true", help="compile the decode and verify steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--int8", default=None, choices=["ar", "dit", "all"], help="the pipeline's int8 option")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from glmimage.data.scenes import caption, render
    from glmimage.eval_scenes import edit_cases, t2i_cases
    from glmimage.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                                    int8=args.int8 or False)
    if args.compile:
        pipe.compile()
    size = args.size or pipe.native_size
    ks = [0] + [int(k) for k in args.ks.split(",")]
    prompts = [caption(scene) for _, scene in t2i_cases(args.n, 0)]
    cases = [("t2i", prompts[j:j + args.batch] if args.batch > 1 else prompts[j], None)
             for j in range(0, args.n, args.batch)]
    cases += [("edit", instruction, render(source, size, size)) for _, source, instruction, _ in
              edit_cases(args.edits, 0)]
    for k in ks:                                                    # warm-up (and compile) every K
        for kind in ("t2i", "edit"):
            case = next((c for c in cases if c[0] == kind), None)
            if case:
                pipe.prior_tokens(case[1], size, size, image=case[2], seed=0, speculate=k)
    rows = {(kind, k): {"ar_decode_s": [], "forwards": [], "tokens": [], "same": []}
            for kind in ("t2i", "edit") for k in ks}
    for i, (kind, prompt, image) in enumerate(cases):
        plain = None
        for k in ks:
            best, grid, tm = None, None, {}
            for _ in range(args.repeat):
                tm = {}
                grid = pipe.prior_tokens(prompt, size, size, image=image, seed=i, temperature=args.temperature,
                                         speculate=k, timings=tm)
                best = tm["ar_decode"] if best is None else min(best, tm["ar_decode"])
            plain = grid if k == 0 else plain
            r = rows[kind, k]
            r["ar_decode_s"].append(best / (len(prompt) if isinstance(prompt, list) else 1))
            r["forwards"].append(tm["ar_decode_forwards"])
            r["tokens"].append(tm["ar_new_tokens"] - 1)
            r["same"].append(bool(torch.equal(grid, plain)))
    report = {"model": str(pipe.root), "size": size, "n_t2i": args.n, "n_edit": args.edits, "batch": args.batch,
              "compiled": args.compile, "temperature": args.temperature or pipe.sampling.temperature,
              "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                        f"{args.dtype}{', int8 ' + args.int8 if args.int8 else ''}",
              "results": {}}
    print(f"{'kind':>5} {'K':>3} {'forwards':>9} {'tok/fwd':>8} {'AR decode s':>12} {'speedup':>8} {'same grid':>10}")
    for (kind, k), r in rows.items():
        if not r["forwards"]:
            continue
        base = float(np.mean(rows[kind, 0]["ar_decode_s"]))
        summary = {"forwards": float(np.mean(r["forwards"])),
                   "tokens_per_forward": float(np.sum(r["tokens"]) / np.sum(r["forwards"])),
                   "ar_decode_s": float(np.mean(r["ar_decode_s"])),
                   "ar_decode_speedup": base / float(np.mean(r["ar_decode_s"])),
                   "same_grid": f"{sum(r['same'])}/{len(r['same'])}"}
        report["results"][f"{kind}:{k}"] = summary
        print(f"{kind:>5} {k:>3} {summary['forwards']:>9.1f} {summary['tokens_per_forward']:>8.2f} "
              f"{summary['ar_decode_s']:>12.4f} {summary['ar_decode_speedup']:>8.2f} {summary['same_grid']:>10}")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
