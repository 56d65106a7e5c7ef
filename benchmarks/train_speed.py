"""Training throughput of one stage under several runtimes: processes x threads, fp32 or bf16 autocast, micro-batches.

    python benchmarks/train_speed.py --run runs/small --stage decoder --steps 40 \
        --setups 1x2:fp32,1x2:bf16,2x1:fp32,2x1:bf16 --out benchmarks/results/train-speed-small-cpu.jsonl

A setup is PxT:PRECISION[:ACCUM][:compile] (P processes under torchrun with T torch threads each; `compile` adds
`--compile`, each block torch.compile'd); --args adds the same flags to every setup (e.g. the shipped recipe's
"--object-weight 4 --ema 0.999"). Each one trains the stage
from scratch for --steps steps in a scratch folder that links the run's earlier stages (read only; the decoder's
latent cache too), with `python -m glmimage.train`, the command users run. Seconds per step is the median step time
of process 0 after the first --warmup steps; one JSON line per setup is appended to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

UPSTREAM = {"vae": [], "vae_decoder": ["vae"], "tokenizer": [], "ar": ["tokenizer"],
            "decoder": ["vae", "tokenizer"]}


def parse_setup(text: str) -> tuple[int, int, str, int, bool]:
    parts = text.split(":")
    compiled = parts[-1] == "compile"
    parts = parts[:-1] if compiled else parts
    procs, threads = (int(v) for v in parts[0].split("x"))
    return procs, threads, parts[1] if len(parts) > 1 else "fp32", int(parts[2]) if len(parts) > 2 else 1, compiled


def scratch_run(run: Path, stage: str, root: Path) -> Path:
    out = Path(tempfile.mkdtemp(dir=root))
    for name in UPSTREAM[stage]:
        (out / name).symlink_to((run / name).resolve())
    if stage == "decoder" and (run / "decoder" / "cache.pt").exists():
        (out / "decoder").mkdir()
        (out / "decoder" / "cache.pt").symlink_to((run / "decoder" / "cache.pt").resolve())
    return out


def measure(run: Path, stage: str, preset: str, steps: int, warmup: int, setup: str, root: Path,
            extra: list[str] = ()) -> dict:
    procs, threads, precision, accum, compiled = parse_setup(setup)
    out = scratch_run(run, stage, root)
    launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc-per-node={procs}"]
    cmd = [*launch, "-m", "glmimage.train", stage, "--preset", preset, "--out", str(out), "--steps", str(steps),
           "--threads", str(threads), "--precision", precision, "--accum", str(accum), "--device", "cpu",
           *(["--compile"] if compiled else []), *extra]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    log = [json.loads(line) for line in (out / stage / "log.jsonl").read_text().splitlines()]
    times = [b["time"] - a["time"] for a, b in zip(log, log[1:])][warmup:]
    s = statistics.median(times)
    import torch
    from glmimage.bench import machine_name
    from glmimage.train.presets import get_preset
    batch = get_preset(preset).stages[stage].batch
    return {"stage": stage, "preset": preset, "setup": setup, "processes": procs, "threads": threads,
            "precision": precision, "accum": accum, "compile": compiled, "batch": batch, "steps": steps,
            "s_per_step": round(s, 4),
            "samples_per_s": round(batch / s, 2), "final_loss": log[-1]["loss"],
            "machine": machine_name(torch.device("cpu")).split(",")[0], "cpus": os.cpu_count(),
            "torch": torch.__version__, "command": " ".join(cmd[len(launch):])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run folder with the earlier stages (glmimage train ...)")
    ap.add_argument("--stage", default="decoder", choices=list(UPSTREAM))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--setups", default="1x2:fp32,1x2:bf16,2x1:fp32,2x1:bf16")
    ap.add_argument("--args", default="", help="extra `glmimage.train` flags for every setup, one string")
    ap.add_argument("--out", required=True, help="JSONL file to append to")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        for setup in args.setups.split(","):
            rec = measure(Path(args.run), args.stage, args.preset, args.steps, args.warmup, setup, Path(root),
                          args.args.split())
            print(json.dumps(rec), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
