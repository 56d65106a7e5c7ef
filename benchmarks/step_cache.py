"""The DiT step cache (`pipe(..., step_cache=T)`, dit.StepCache): time saved against the image it changes.

For each prompt the exact pipeline runs first; then, from the same AR tokens and seed, the decoder runs again at each
threshold. Reported per threshold: DiT seconds per image, steps whose later blocks were skipped, and the image's
PSNR / max difference against the exact one (means over the prompts; the DiT times are each the best of --repeat).

    python benchmarks/step_cache.py --model glmimage/assets/model --steps 20 --n 20 \\
        --thresholds 0.05,0.1,0.2,0.3 --out benchmarks/results/step-cache-small-cpu.json  # --steps 50: ...-50steps-cpu.json
"""
from __future__ import annotations

import argparse
import platform

import numpy as np
import torch

from glmimage.bench import write_report


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--n", type=int, default=20, help="prompts (the evaluation's fresh scenes, seed 0)")
    ap.add_argument("--thresholds", default="0.05,0.1,0.2,0.3")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per image and threshold (best kept)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from glmimage.eval_scenes import caption, t2i_cases
    from glmimage.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    size = args.size or pipe.native_size
    thresholds = [0.0] + [float(t) for t in args.thresholds.split(",")]
    rows = {t: {"dit_s": [], "steps_cached": [], "psnr_db": [], "max_abs": []} for t in thresholds}
    pipe(caption(t2i_cases(1, 0)[0][1]), height=size, width=size, num_inference_steps=2, seed=0)   # warm-up
    for i, (_, scene) in enumerate(t2i_cases(args.n, 0)):
        prompt = caption(scene)
        timings: dict = {}
        pipe(prompt, height=size, width=size, num_inference_steps=1, seed=i, timings=timings)
        grid = torch.tensor(timings["grid"])                          # the AR's tokens, decoded at every threshold
        exact = None
        for t in thresholds:
            best = None
            for _ in range(args.repeat):
                tm: dict = {}
                image = pipe(prompt, height=size, width=size, num_inference_steps=args.steps,
                             guidance_scale=args.guidance, seed=i, prior_token_ids=grid, step_cache=t, timings=tm)[0]
                best = tm["dit"] if best is None else min(best, tm["dit"])
            exact = image if t == 0 else exact
            diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(exact, dtype=np.int16)).max()
            for key, v in (("dit_s", best), ("steps_cached", tm.get("dit_steps_cached", 0)),
                           ("psnr_db", psnr(image, exact)), ("max_abs", int(diff))):
                rows[t][key].append(v)
    report = {"model": str(pipe.root), "size": size, "steps": args.steps, "guidance": args.guidance, "n": args.n,
              "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                        f"{args.dtype}",
              "results": {}}
    base = float(np.mean(rows[0.0]["dit_s"]))
    print(f"{'threshold':>10} {'DiT s/image':>12} {'speedup':>8} {'steps cached':>13} {'PSNR dB':>8} {'max diff':>9}")
    for t, r in rows.items():
        finite = [p for p in r["psnr_db"] if np.isfinite(p)]
        summary = {"dit_s": float(np.mean(r["dit_s"])), "dit_speedup": base / float(np.mean(r["dit_s"])),
                   "steps_cached": float(np.mean(r["steps_cached"])),
                   "psnr_db_mean": float(np.mean(finite)) if finite else float("inf"),
                   "psnr_db_min": float(min(r["psnr_db"])), "max_abs": int(max(r["max_abs"]))}
        report["results"][str(t)] = summary
        print(f"{t:>10} {summary['dit_s']:>12.3f} {summary['dit_speedup']:>8.2f} "
              f"{summary['steps_cached']:>10.1f}/{args.steps:<2} {summary['psnr_db_mean']:>8.1f} "
              f"{summary['max_abs']:>9}")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
