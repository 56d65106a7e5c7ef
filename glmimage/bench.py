"""glmimage bench: our pipeline and the reference (diffusers GlmImagePipeline + transformers), side by side.

Both run on the same official-layout checkpoint with the same prompt, seed and sampling settings, each in a
fresh process, and report per stage (AR prefill, AR decode tokens/s, glyph, DiT per step, VAE) and end to end,
plus peak memory (RSS on CPU: the whole process's, and on Linux the measured runs' alone, after the warm-up; max
allocated on an accelerator). The machine's own floor is measured first (matmul rate and weight-streaming
bandwidth), and each stage's distance to it is reported.

    glmimage bench --preset medium                     # random checkpoint with the official depths, CPU fp32
    glmimage bench --preset medium --dtype bfloat16    # ours in bf16 vs the reference's best CPU setting (fp32)
    glmimage bench --preset medium --dtype bfloat16+batch4   # throughput: 4 prompts in one call
    glmimage bench --preset full --device cuda --height 1024 --width 1024 --steps 50
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from glmimage.ar import sync

PROMPT = "a large red circle at the top left and a small blue square at the bottom right, with the word 'SUN' " \
         "written at the middle, on a white background."


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM; Linux only; False elsewhere), so that peak_memory(measured=True)
    also gives the peak of the runs after this call alone: the warm-up's one-time costs (a compile) excluded."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device, measured: bool = False) -> dict:
    """peak_rss_gb: the whole process's peak; measured: also the peak since reset_peak_rss()."""
    out = {}
    if measured:                    # read first: reading it allocates, and the whole peak read after includes that
        with open("/proc/self/status") as f:
            out["peak_rss_measured_gb"] = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) * 1024 / 1e9
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9      # Linux reports KiB
    if device.type == "cuda":
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    return out


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------------------------------------
# The floor: what this machine can do at best, measured, and what it implies per stage.

def best_time(fn, device: torch.device, reps: int = 5) -> float:
    fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return min(ts)


def measure_floor(device: torch.device, dtype: torch.dtype, hidden: int, n_tokens: int) -> dict:
    """Best matmul rate at the DiT's shapes and best weight-streaming bandwidth (a GEMV over a big matrix)."""
    def best(fn):
        return best_time(fn, device)

    a = torch.randn(n_tokens, hidden, device=device, dtype=dtype)
    w = torch.randn(4 * hidden, hidden, device=device, dtype=dtype)
    flops = 2 * n_tokens * hidden * 4 * hidden
    matmul = flops / best(lambda: a @ w.T)
    nbytes = 256 * 2**20 if device.type == "cpu" else 2 * 2**30  # well above the caches (a GPU's L2 is ~50 MB)

    def stream(dt: torch.dtype) -> float:
        rows = max(nbytes // (torch.finfo(dt).bits // 8) // hidden, 1)
        big = torch.randn(rows, hidden, device=device, dtype=dt)
        x = torch.randn(1, hidden, device=device, dtype=dt)
        return big.numel() * big.element_size() / best(lambda: x @ big.T)

    # bytes are bytes: the best GEMV in either dtype (eager bf16 GEMVs stream at half fp32's rate on this CPU; that
    # is a kernel's limit, not the machine's)
    bandwidth = max(stream(dtype), stream(torch.float32))
    return {"matmul_flops": matmul, "stream_bytes_per_s": bandwidth}


@torch.inference_mode()
def time_ar_linears(ar: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
    """One decode token's worth of the AR's own linear layers (every layer's, int8 ones included, and lm_head)
    at batch 1, best of 5: the decode's cost with this library's GEMV kernels and nothing else. The rest of a
    decode step (norms, rotary, attention, sampling, Python) is the measured step minus this."""
    from glmimage.quantize import Int8Linear
    mods = [m for m in ar.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    xs = [torch.randn(1, 1, m.in_features, device=device, dtype=dtype) for m in mods]
    nbytes = sum(sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m in mods)
    s = best_time(lambda: [m(x) for m, x in zip(mods, xs)], device)
    return {"ar_linears_s_per_token": s, "ar_linears_bytes_per_s": nbytes / s}


def stage_floors(pipe, floor: dict, height: int, width: int, steps: int, guidance: float, n_new: int) -> dict:
    """Lower bounds per stage on this machine: decode streams the AR weights once per token; a DiT step does its
    FLOPs (x2 with CFG) at the best matmul rate."""
    # state_dict, not parameters: int8 weights are buffers
    ar_bytes = sum(t.numel() * t.element_size() for n, t in pipe.ar.state_dict().items() if "embed_tokens" not in n)
    decode = ar_bytes / floor["stream_bytes_per_s"]
    cfg = pipe.dit.cfg
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    n = (height // 16) * (width // 16)
    t = 8                                                                     # a few glyph tokens
    per_layer = 2 * (n + t) * (4 * inner * inner + 2 * inner * 4 * inner) + 4 * (n + t) ** 2 * inner
    step = per_layer * cfg.num_layers * (2 if guidance > 1 else 1) / floor["matmul_flops"]
    return {"ar_decode_s_per_token": decode, "ar_decode": decode * n_new, "dit_per_step": step,
            "dit": step * steps}


def best_floor_rates(results: dict, dtypes: dict) -> None:
    """The floor is the machine's: each worker measures it once, and a shared VM can hand one of them half its
    rate (measured: 136 vs 271 GFLOP/s in two workers of one run). Every worker's stage floors are rescaled to the
    best matmul rate seen in its dtype and the best streaming rate seen in the run."""
    floors = {k: r["floor"] for k, r in results.items() if r.get("floor")}
    if not floors:
        return
    stream = max(f["stream_bytes_per_s"] for f in floors.values())
    for k, f in floors.items():
        mm = max(g["matmul_flops"] for j, g in floors.items() if dtypes.get(j) == dtypes.get(k))
        for key in ("dit", "dit_per_step"):
            f[key] *= f["matmul_flops"] / mm
        for key in ("ar_decode", "ar_decode_s_per_token"):
            f[key] *= f["stream_bytes_per_s"] / stream
        f["matmul_flops"], f["stream_bytes_per_s"] = mm, stream


# ----------------------------------------------------------------------------------------------------------
# Workers: one implementation, one fresh process, JSON out.

class Timer:
    """Wrap a callable to accumulate its wall time (synchronising the device) and count calls. The wrapper keeps
    the callable's signature (transformers' generate inspects the model's forward)."""

    def __init__(self, fn, device):
        self.fn, self.device, self.total, self.calls, self.first = fn, device, 0.0, 0, None

        @functools.wraps(fn)
        def wrapped(*a, **k):
            sync(self.device)
            t = time.perf_counter()
            out = fn(*a, **k)
            sync(self.device)
            dt = time.perf_counter() - t
            self.total += dt
            self.calls += 1
            self.first = dt if self.first is None else self.first
            return out
        self.wrapped = wrapped


def worker_reference(args, device, dtype) -> dict:
    from diffusers import GlmImagePipeline
    t0 = time.perf_counter()
    pipe = GlmImagePipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    vle, dit = pipe.vision_language_encoder, pipe.transformer

    def run():
        hooks = {"ar": (vle, "generate"), "ar_forward": (vle, "forward"), "glyph": (pipe, "encode_prompt"),
                 "dit": (dit, "forward"), "vae": (pipe.vae, "decode")}
        timers = {name: Timer(getattr(obj, attr), device) for name, (obj, attr) in hooks.items()}
        for name, (obj, attr) in hooks.items():
            setattr(obj, attr, timers[name].wrapped)
        captured = {}
        orig_up = pipe._upsample_token_ids

        def capture(ids, h, w):
            captured["grid"] = ids.view(h, w).clone()
            return orig_up(ids, h, w)
        pipe._upsample_token_ids = capture
        sync(device)
        t = time.perf_counter()
        image = pipe(PROMPT, height=args.height, width=args.width, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed)).images[0]
        sync(device)
        total = time.perf_counter() - t
        for name, (obj, attr) in hooks.items():   # unwrap
            setattr(obj, attr, timers[name].fn)
        pipe._upsample_token_ids = orig_up
        n_new = timers["ar_forward"].calls
        prefill = timers["ar_forward"].first
        stages = {"ar": timers["ar"].total, "ar_prefill": prefill,
                  "ar_decode": timers["ar"].total - prefill,
                  "ar_decode_tokens_per_s": (n_new - 1) / max(timers["ar"].total - prefill, 1e-9),
                  "glyph": timers["glyph"].total, "dit": timers["dit"].total,
                  "dit_per_step": timers["dit"].total / args.steps, "vae": timers["vae"].total, "total": total}
        return image, captured["grid"], stages, n_new

    for _ in range(args.warmup):
        run()
    measured = reset_peak_rss()
    image, grid, stages, n_new = min((run() for _ in range(args.repeat)), key=lambda r: r[2]["total"])
    return {"impl": "reference (diffusers GlmImagePipeline + transformers)", "load_s": load_s, "stages": stages,
            "ar_new_tokens": n_new, "grid": grid.tolist(), "image": image, **peak_memory(device, measured)}


def worker_ours(args, device, dtype) -> dict:
    from glmimage.pipeline import Pipeline
    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model, device=device, dtype=dtype, offload=args.offload, int8=args.int8,
                                    cuda_graph=not args.eager)
    if args.compile:
        pipe.compile()
    load_s = time.perf_counter() - t0

    def run(prior=None, batch=args.batch):
        timings: dict = {}
        sync(device)
        t = time.perf_counter()
        image = pipe(PROMPT if batch == 1 else [PROMPT] * batch, height=args.height, width=args.width,
                     num_inference_steps=args.steps, guidance_scale=args.guidance,
                     guidance_interval=(0.0, 1.0), seed=args.seed,    # the reference's sampler: CFG at every step
                     prior_token_ids=prior, step_cache=args.step_cache, speculate=args.speculate,
                     timings=timings)[0]
        sync(device)
        timings["total"] = time.perf_counter() - t
        if batch > 1:                                # one batch of `batch` images (seeds seed..seed+batch-1)
            timings["grid"] = timings["grid"][0]
            timings["s_per_image"] = timings["total"] / batch
        return image, timings

    first = [run()[1]["total"] for _ in range(args.warmup)]   # a compiled pipeline's first image compiles
    measured = reset_peak_rss()
    image, stages = min((run() for _ in range(args.repeat)), key=lambda r: r[1]["total"])
    int8 = {"ar": ", int8 AR", "dit": ", int8 DiT", "all": ", int8 AR and DiT"}.get(args.int8, "")
    impl = (f"glmimage ({dtype}{int8}{', offload' if args.offload else ''}"
            f"{', no CUDA graph' if args.eager and device.type == 'cuda' else ''}{', compiled' if args.compile else ''}"
            f"{f', batch of {args.batch}' if args.batch > 1 else ''}"
            f"{f', step cache {args.step_cache:g}' if args.step_cache else ''}"
            f"{f', speculate {args.speculate}' if args.speculate else ''})")
    out = {"impl": impl, "load_s": load_s, "first_image_s": first[0] if first else None, "stages": stages,
           "image": image, "batch": args.batch,
           "grid": stages.pop("grid"), **peak_memory(device, measured)}    # before the floor probe allocates its own
    n_new = stages.get("ar_new_tokens", 0)
    floor = measure_floor(device, dtype, pipe.dit.cfg.num_attention_heads * pipe.dit.cfg.attention_head_dim,
                          (args.height // 16) * (args.width // 16))
    with pipe._stage("ar") as ar:                    # on the device for the probe (offload keeps it on the host)
        linears = time_ar_linears(ar, device, dtype)
    out["floor"] = {**floor, **stage_floors(pipe, floor, args.height, args.width, args.steps, args.guidance, n_new),
                    **linears}
    if args.tokens:                                  # the reference's tokens, decoded by us: image parity
        grid = torch.tensor(json.loads(Path(args.tokens).read_text()))
        out["image_from_reference_tokens"], _ = run(grid, batch=1)
    return out


def worker_main(args) -> None:
    from glmimage.cli import pick_device, pick_dtype
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = (worker_reference if args.worker == "reference" else worker_ours)(args, device, dtype)
    result["device"] = machine_name(device)
    out = Path(args.json_out)
    for key in ("image", "image_from_reference_tokens"):
        if key in result:
            path = out.with_name(out.stem + f"_{key}.png")
            result.pop(key).save(path)
            result[key] = str(path)
    out.write_text(json.dumps(result, indent=2, default=str))


# ----------------------------------------------------------------------------------------------------------

def spawn(args, worker: str, dtype: str, json_out: Path, tokens: Path | None = None, int8: str | None = None,
          offload: bool = False, batch: int = 1, eager: bool = False, compile: bool = False,
          step_cache: float = 0.0, speculate: int = 0) -> dict:
    """Run one worker in a fresh process. A failed worker is reported ({"error": ...}), not fatal: the other
    implementations still run (on a rented GPU, one crash should not cost the whole run)."""
    cmd = [sys.executable, "-m", "glmimage.bench", "--worker", worker, "--model", str(args.model),
           "--height", str(args.height), "--width", str(args.width), "--steps", str(args.steps),
           "--guidance", str(args.guidance), "--seed", str(args.seed), "--device", args.device, "--dtype", dtype,
           "--warmup", str(max(args.warmup, 1) if args.compile or compile else args.warmup),
           "--repeat", str(args.repeat), "--json-out", str(json_out)]
    if tokens is not None:
        cmd += ["--tokens", str(tokens)]
    if args.compile or compile:
        cmd += ["--compile"]
    if args.offload or offload:
        cmd += ["--offload"]
    if int8:
        cmd += ["--int8", int8]
    if batch > 1:
        cmd += ["--batch", str(batch)]
    if step_cache:
        cmd += ["--step-cache", str(step_cache)]
    if speculate:
        cmd += ["--speculate", str(speculate)]
    if eager:
        cmd += ["--eager"]
    print("$", " ".join(cmd[1:]), flush=True)
    t = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    if rc != 0 or not json_out.exists():
        return {"error": f"worker exited with code {rc} after {time.perf_counter() - t:.0f} s (its log is above)"}
    return json.loads(json_out.read_text())


def write_report(report: dict, path: str | None) -> None:
    """A benchmark script's JSON report to `path` (its folders made; None: not written), and where it went."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")


def image_diff(a: str, b: str) -> dict:
    import numpy as np
    from PIL import Image
    x = np.asarray(Image.open(a), dtype=np.float64)
    y = np.asarray(Image.open(b), dtype=np.float64)
    mse = ((x - y) ** 2).mean()
    return {"max_abs": float(np.abs(x - y).max()), "psnr_db": float(10 * np.log10(255 ** 2 / mse)) if mse else None}


def table(results: dict) -> str:
    rows = ["ar_prefill", "ar_decode", "ar_decode_tokens_per_s", "ar_decode_forwards", "glyph", "dit",
            "dit_per_step", "dit_steps_cached", "vae", "total", "s_per_image"]
    names = list(results)
    lines = [f"{'stage':<24}" + "".join(f"{n:>22}" for n in names)]
    for r in rows:
        vals = [results[n]["stages"].get(r) for n in names]
        lines.append(f"{r:<24}" + "".join(f"{v:>22.3f}" if isinstance(v, (int, float)) else f"{'-':>22}"
                                          for v in vals))
    if any(results[n].get("first_image_s") for n in names):
        lines.append(f"{'first_image_s':<24}" + "".join(
            f"{results[n].get('first_image_s') or float('nan'):>22.3f}" for n in names))
    for key in ("peak_rss_gb", "peak_rss_measured_gb"):
        lines.append(f"{key:<24}" + "".join(f"{results[n].get(key, float('nan')):>22.2f}" for n in names))
    if any("peak_allocated_gb" in results[n] for n in names):
        lines.append(f"{'peak_allocated_gb':<24}" + "".join(
            f"{results[n].get('peak_allocated_gb', float('nan')):>22.2f}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="glmimage bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="medium", help="random checkpoint preset (debug, medium, wide, full)")
    p.add_argument("--model", default=None, help="an existing checkpoint folder instead of a random one")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="our dtype (several: comma-separated, e.g. float32,bfloat16; "
                                                   "'+int8' adds int8 AR weights ('+int8dit' the DiT's, "
                                                   "'+int8all' both), '+offload' stage residency, "
                                                   "'+batchN' N prompts in one call (throughput), '+eager' no CUDA "
                                                   "graph for the AR decode, '+compile' torch.compile (as "
                                                   "--compile), '+cacheT' the DiT step cache at threshold T, '+specK' "
                                                   "speculative AR decoding, K guesses per forward, e.g. "
                                                   "float32+offload,bfloat16+int8,bfloat16+batch4,bfloat16+compile; a compiled "
                                                   "variant always gets a warm-up, its first image reported as "
                                                   "first_image_s; 'none': the reference alone)")
    p.add_argument("--reference-dtype", default="float32", help="the reference's dtype ('none' skips it)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2, help="measured runs per implementation; the fastest is kept "
                                                          "(a shared machine is noisy)")
    p.add_argument("--bracket", action="store_true",
                   help="run the reference again after ours and keep its faster run: a shared machine that slows "
                        "down between the two would otherwise skew the ratios in our favour")
    p.add_argument("--compile", action="store_true", help="torch.compile our AR decode step and the DiT")
    p.add_argument("--offload", action="store_true", help="keep only the running stage resident")
    p.add_argument("--out", default=None, help="JSON report path (default benchmarks/results/<preset>-<device>.json)")
    p.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    p.add_argument("--int8", default=None, choices=["ar", "dit", "all"], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--step-cache", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--speculate", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)

    variants = []                                    # checked before anything runs
    for variant in ([] if args.dtype == "none" else args.dtype.split(",")):
        dt, *flags = variant.split("+")
        batch = [int(f[5:]) for f in flags if f.startswith("batch") and f[5:].isdigit() and int(f[5:]) > 0]
        cache = [f for f in flags if re.fullmatch(r"cache(0?\.\d+)", f)]
        spec = [f for f in flags if re.fullmatch(r"spec[1-9]\d*", f)]
        int8 = {"int8": "ar", "int8dit": "dit", "int8all": "all"}
        unknown = (set(flags) - {"offload", "eager", "compile"} - set(int8) - {f"batch{b}" for b in batch}
                   - set(cache) - set(spec))
        if unknown:
            raise ValueError(f"unknown variant flags {sorted(unknown)}; valid: int8, int8dit, int8all, offload, "
                             "eager, compile, batchN (N >= 1), cacheT (0 < T < 1, e.g. cache0.1), specK (K >= 1)")
        variants.append((variant, dt, dict(int8=next((int8[f] for f in flags if f in int8), None),
                                           offload="offload" in flags,
                                           batch=batch[0] if batch else 1, eager="eager" in flags,
                                           compile="compile" in flags,
                                           step_cache=float(cache[0][5:]) if cache else 0.0,
                                           speculate=int(spec[0][4:]) if spec else 0)))
    if args.model is None:
        from glmimage.cli import pick_device
        from glmimage.random_checkpoint import make_random_checkpoint
        cache = Path(os.environ.get("GLMIMAGE_CACHE", Path.home() / ".cache" / "glmimage")) / f"random-{args.preset}"
        if not (cache / "model_index.json").exists():
            # the full preset is drawn on the benchmark's device and stored in bf16, as the official checkpoint
            full = args.preset == "full"
            print(f"writing a random {args.preset} checkpoint to {cache}", flush=True)
            make_random_checkpoint(cache, preset=args.preset, seed=0, dtype=torch.bfloat16 if full else torch.float32,
                                   device=pick_device(args.device) if full else "cpu")
        args.model = str(cache)
    tmp = Path(tempfile.mkdtemp(prefix="glmimage-bench-"))
    results, tokens = {}, None
    ref_name = f"reference-{args.reference_dtype}"
    if args.reference_dtype != "none":
        ref = spawn(args, "reference", args.reference_dtype, tmp / "reference.json")
        if "grid" in ref:
            tokens = tmp / "reference_tokens.json"
            tokens.write_text(json.dumps(ref["grid"]))
        results[ref_name] = ref
    for variant, dt, flags in variants:
        r = results[f"glmimage-{variant}"] = spawn(args, "ours", dt, tmp / f"ours-{variant}.json", tokens, **flags)
        if tokens is None and "grid" in r and flags["batch"] == 1:
            # no reference: the later variants decode this first one's tokens, so approximate variants (int8, a
            # step cache, another dtype) are compared with it from the same tokens (its own image is from them)
            tokens = tmp / "first_variant_tokens.json"
            tokens.write_text(json.dumps(r["grid"]))
            r["image_from_reference_tokens"] = r["image"]
    if args.bracket and "stages" in results.get(ref_name, {}):
        after = spawn(args, "reference", args.reference_dtype, tmp / "reference-after.json")
        totals = [results[ref_name]["stages"]["total"], after["stages"]["total"] if "stages" in after else None]
        if totals[1] is not None and totals[1] < totals[0]:   # same seed: same tokens and image, other timings
            results[ref_name] = after
        results[ref_name]["totals_before_after"] = totals
    report = {"config": {k: getattr(args, k) for k in ("preset", "model", "height", "width", "steps", "guidance",
                                                         "seed", "device", "warmup", "repeat", "compile",
                                                         "offload")},
              "prompt": PROMPT, "results": results, "comparisons": {}}
    ok = {k: r for k, r in results.items() if "error" not in r}
    best_floor_rates(ok, {f"glmimage-{v}": dt for v, dt, _ in variants})
    ref_key = ref_name if ref_name in ok else None
    fp32_key = "glmimage-float32" if "glmimage-float32" in ok else None
    for k, r in ok.items():
        if not k.startswith("glmimage"):
            continue
        cmp = {}
        s = r["stages"]
        if ref_key:
            rs = results[ref_key]["stages"]
            cmp["speedup_end_to_end"] = rs["total"] / s["total"]
            if r.get("batch", 1) > 1:                # the reference makes one image per call
                cmp["throughput_vs_reference"] = rs["total"] / s["s_per_image"]
            cmp["speedup_ar_decode"] = s["ar_decode_tokens_per_s"] / rs["ar_decode_tokens_per_s"]
            cmp["speedup_dit"] = rs["dit"] / s["dit"]
            cmp["peak_rss_ratio"] = r["peak_rss_gb"] / results[ref_key]["peak_rss_gb"]
            if "peak_rss_measured_gb" in r and "peak_rss_measured_gb" in results[ref_key]:
                cmp["peak_rss_measured_ratio"] = r["peak_rss_measured_gb"] / results[ref_key]["peak_rss_measured_gb"]
            if "peak_allocated_gb" in r and "peak_allocated_gb" in results[ref_key]:
                cmp["peak_allocated_ratio"] = r["peak_allocated_gb"] / results[ref_key]["peak_allocated_gb"]
            if "image_from_reference_tokens" in r:
                cmp["image_vs_reference_same_tokens"] = image_diff(r["image_from_reference_tokens"],
                                                                   results[ref_key]["image"])
        first = next(x for x in ok if x.startswith("glmimage"))
        if first not in (k, fp32_key) and "image_from_reference_tokens" in r and "image_from_reference_tokens" in ok[first]:
            cmp[f"image_vs_{first}_same_tokens"] = image_diff(r["image_from_reference_tokens"],
                                                              ok[first]["image_from_reference_tokens"])
        if fp32_key and fp32_key != k and "image_from_reference_tokens" in r:
            cmp["image_vs_our_fp32_same_tokens"] = image_diff(r["image_from_reference_tokens"],
                                                              results[fp32_key]["image_from_reference_tokens"])
            # same seed, same uniforms: how often does this variant's AR pick our fp32 AR's token?
            a, b = torch.tensor(r["grid"]), torch.tensor(ok[fp32_key]["grid"])
            cmp["ar_tokens_equal_to_our_fp32"] = float((a == b).float().mean())
        f = r.get("floor", {})
        if f:
            cmp["ar_decode_over_floor"] = s["ar_decode"] / f["ar_decode"] if f.get("ar_decode") else None
            if f.get("ar_linears_s_per_token") and s.get("ar_decode_tokens_per_s"):
                # the share of a decode step spent in the linear layers (the rest: everything else per token)
                cmp["ar_decode_linears_share"] = f["ar_linears_s_per_token"] * s["ar_decode_tokens_per_s"]
            cmp["dit_over_floor"] = s["dit"] / f["dit"]
        report["comparisons"][k] = cmp
    out = Path(args.out or f"benchmarks/results/{args.preset}-{'-'.join(args.dtype.split(','))}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in results.values():
        r.pop("grid", None)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(table(ok))
    for k, r in results.items():
        if "error" in r:
            print(f"{k}: {r['error']}")
    print(json.dumps(report["comparisons"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
