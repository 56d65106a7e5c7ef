"""Peak host memory (RSS) and time of loading one pipeline component, in a fresh process per call.

    python benchmarks/load_memory.py --model ~/.cache/glmimage/random-medium --component ar --dtype float32 --int8 \
        --out benchmarks/results/ar-load-medium-cpu.jsonl

Linux only (reads VmRSS / VmHWM from /proc/self/status). The other components are not loaded (offload=True on the
CPU loads each one on first use), so the peak is this component's load on top of the process's baseline.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time

import torch


def status_gb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1e6
    raise ValueError(f"{field} not in /proc/self/status")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--component", default="ar", choices=["ar", "dit", "image_tokenizer", "glyph", "vae"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--out", default=None, help="JSONL file to append to")
    args = ap.parse_args(argv)
    from glmimage.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(args.model, dtype=getattr(torch, args.dtype), int8=args.int8, offload=True)
    before = status_gb("VmRSS")
    t = time.perf_counter()
    getattr(pipe, args.component)
    rec = {"model": args.model, "component": args.component, "dtype": args.dtype, "int8": args.int8,
           "load_s": round(time.perf_counter() - t, 2), "rss_before_gb": round(before, 3),
           "peak_rss_gb": round(status_gb("VmHWM"), 3), "rss_after_gb": round(status_gb("VmRSS"), 3),
           "revision": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                      text=True).stdout.strip()}
    print(json.dumps(rec))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
