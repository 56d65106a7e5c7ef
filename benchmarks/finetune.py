"""Fine-tuning cost: peak memory, seconds per step, trainable numbers and checkpoint size, whole vs LoRA.

    python benchmarks/finetune.py --preset medium --size 256 --steps 12 --batch 2 \
        --setups decoder:full:fp32,decoder:lora16:fp32,decoder:lora16:bf16,ar:full:fp32,ar:lora16:fp32 \
        --out benchmarks/results/finetune-medium-cpu.jsonl

The model is a random checkpoint in the official layout (--preset, glmimage.random_checkpoint: `medium` has the
official depths, 40 AR and 30 DiT layers, at reduced width), or --model PATH. The data is --images rendered scenes
with captions, written as a folder of .png + .txt (what users pass as --data). A setup is
STAGE:full|loraR:PRECISION[:recompute][:compile] (activation checkpointing, compiled blocks); each runs
`python -m glmimage.train STAGE --init MODEL ...` (the command users run) in its own process, and its peak RSS is
read with os.wait4 (with --device on an accelerator, also the peak device memory its training log records). A
child's peak counts the memory of its parent at the fork, so this script keeps torch out of the parent until every
run is done (the model, images and cache are made by a child, `--prepare`).
The decoder's latent cache is built once beforehand and linked into every decoder run, so the numbers are the
training loop's. One JSON line per setup is appended to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_images(folder: Path, n: int, size: int) -> None:
    from glmimage.data.scenes import SceneStream
    folder.mkdir(parents=True, exist_ok=True)
    stream = SceneStream(11, size=size, kinds=("t2i",))
    for i in range(n):
        ex = stream.example(i)
        ex["image"].save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(ex["caption"])


def build_cache(model: Path, size: int, data: Path, cache: Path) -> None:
    from glmimage.train.common import atomic_save
    from glmimage.train.decoder import build_cache as build
    from glmimage.train.presets import from_model, get_preset
    preset = from_model(model, get_preset("small"), size)
    atomic_save(build(preset, cache.parent, str(data), 0, len(os.listdir(data)) // 2, progress=False), cache)


def run(cmd: list[str], threads: int) -> tuple[int, float, str]:
    """(exit code, peak RSS in GiB, stderr tail) of one child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return child.returncode, usage.ru_maxrss / 2**20, err.read()[-3000:]


def prepare(args) -> None:
    """In a child: the model (unless --model), the image folder and the decoder's cache under --root."""
    import torch
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    model = Path(args.model) if args.model else None
    if model is None:
        from glmimage.random_checkpoint import make_random_checkpoint
        on_gpu = args.device != "cpu"         # an accelerator draws the full preset's weights in seconds, in bf16
        model = make_random_checkpoint(root / "model", preset=args.preset, seed=0, device=args.device,
                                       dtype=torch.bfloat16 if on_gpu else torch.float32)
    write_images(root / "images", args.images, args.size)
    if any(s.startswith("decoder:") for s in args.setups.split(",")):
        build_cache(model, args.size, root / "images", root / "cache.pt")


def measure(model: Path, data: Path, cache: Path, setup: str, args, root: Path) -> dict:
    stage, kind, precision, *more = setup.split(":")
    out = Path(tempfile.mkdtemp(dir=root))
    if stage == "decoder":
        (out / "decoder").mkdir()
        (out / "decoder" / "cache.pt").symlink_to(cache)
    cmd = [sys.executable, "-m", "glmimage.train", stage, "--init", str(model), "--size", str(args.size),
           "--data", str(data), "--out", str(out), "--steps", str(args.steps), "--batch", str(args.batch),
           "--lr", "1e-5", "--threads", str(args.threads), "--precision", precision, "--device", args.device]
    if kind != "full":
        cmd += ["--lora", kind.removeprefix("lora")]
    if set(more) - {"recompute", "compile"}:
        raise SystemExit(f"setup {setup!r}: STAGE:full|loraR:PRECISION[:recompute][:compile]")
    cmd += [f"--{flag}" for flag in more]
    t0 = time.time()
    code, peak, err = run(cmd, args.threads)
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    log = [json.loads(line) for line in (out / stage / "log.jsonl").read_text().splitlines()]
    times = [b["time"] - a["time"] for a, b in zip(log, log[1:])][args.warmup:]
    device_peak = [r["peak_mem_gib"] for r in log if "peak_mem_gib" in r]
    return {"stage": stage, "setup": setup, "precision": precision, "size": args.size, "batch": args.batch,
            "steps": args.steps, "s_per_step": round(statistics.median(times), 3), "peak_rss_gib": round(peak, 3),
            "device": args.device, **({"peak_device_gib": max(device_peak)} if device_peak else {}),
            "ckpt": str(out / stage / "ckpt.pt"),
            "ckpt_mib": round((out / stage / "ckpt.pt").stat().st_size / 2**20, 1),
            "wall_s": round(time.time() - t0, 1), "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
            "model": args.model or f"random {args.preset}", "threads": args.threads, "cpus": os.cpu_count(),
            "command": " ".join(cmd[1:])}


def finish(rec: dict) -> dict:
    """After every run (torch may now load in this process): the numbers trained, and the machine."""
    import torch

    from glmimage.bench import machine_name
    ck = torch.load(rec.pop("ckpt"), map_location="cpu", mmap=True, weights_only=False)
    trained = sum(v.numel() for name, sd in ck["models"].items() if name in ("dit", "ar", "lora")
                  for v in sd.values() if v.is_floating_point())
    return {**rec, "trained_numbers": trained, "machine": machine_name(torch.device("cpu")).split(",")[0],
            "torch": torch.__version__}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: a random --preset checkpoint)")
    ap.add_argument("--preset", default="medium", help="glmimage.random_checkpoint preset when no --model")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (on an accelerator the runs also report "
                                                   "their peak allocated device memory)")
    ap.add_argument("--setups", default="decoder:full:fp32,decoder:lora16:fp32,decoder:lora16:bf16")
    ap.add_argument("--out", required=True, help="JSONL file to append to")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prepare:
        return prepare(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--prepare",
                        "--root", str(root)], check=True)
        model = Path(args.model) if args.model else root / "model"
        records = [measure(model, root / "images", root / "cache.pt", setup, args, root)
                   for setup in args.setups.split(",")]
        for rec in map(finish, records):
            print(json.dumps(rec), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
