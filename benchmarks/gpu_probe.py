"""Where the official-size stages spend their time on a GPU: random weights built in memory (no checkpoint on
disk), one process, each part timed with the device synchronised.

    python benchmarks/gpu_probe.py --out probe.json [--parts dit,lora,ar,spec]
    python benchmarks/gpu_probe.py --out /tmp/p.json --device cpu --preset debug --side 64   # a dry run here

- dit: one 1024² denoising step (N = 4096 image tokens, CFG) of the bf16 DiT: both branches in one batch with the
  text padding left out per branch (the pipeline's default), the same under a key mask (the earlier default), the
  two branches as two calls (as the reference runs them), and with every block torch.compile'd; plus the
  profiler's top kernels of the default step.
- lora: one fine-tuning step of the DiT (LoRA rank 64 on every block linear, frozen bf16 base, fp32 adapters,
  bf16 autocast, AdamW), with and without activation checkpointing: peak allocated memory and seconds per step.
- ar: the AR's 1281-token 1024² decode with the CUDA-graph step, and with the step torch.compile'd inside the
  graph (compile time reported apart; tokens compared).
- spec: the same decode with speculative decoding (the verify step as a CUDA graph) at K = 2, 4, 8: random weights
  guess (almost) nothing right, so this measures what one K+1-token verify forward costs against a plain step;
  with it, a trained model's tokens per forward (`benchmarks/speculate.py`) give its decode time.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

from glmimage.ar import ARConfig, ARModel, generate_prior
from glmimage.dit import DiT, DiTConfig, text_key_mask

report: dict = {}
DEV = torch.device("cuda")
PRESET, AR_PRESET, SIDE = "full", "glm-image", 1024  # --preset debug: the debug DiT and AR (a dry run on a CPU)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if DEV.type == "cuda" else float("nan")


def timed(fn, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n


def build_dit(dtype: torch.dtype) -> DiT:
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with DEV:
        dit = DiT(DiTConfig.from_name(PRESET)).eval()
    torch.set_default_dtype(torch.float32)
    return dit


def dit_inputs(dit: DiT, T: int = 8):
    g = torch.Generator(DEV).manual_seed(0)
    D, n = dit.cfg.text_embed_dim, SIDE // 16
    glyph = torch.randn(1, T, D, device=DEV, generator=g, dtype=torch.bfloat16)
    ids = torch.randint(0, dit.cfg.prior_vq_quantizer_codebook_size, (1, n * n), device=DEV, generator=g)
    x = torch.randn(1, 16, 2 * n, 2 * n, device=DEV, generator=g)
    size = torch.tensor([[float(SIDE), float(SIDE)]], device=DEV)
    vec = dit.embed_vec(torch.tensor([500.0], device=DEV), size, torch.zeros_like(size))
    return glyph, ids, x, vec, (n, n)


@torch.inference_mode()
def probe_dit() -> None:
    dit = build_dit(torch.bfloat16).fuse()
    glyph, ids, x, vec, grid = dit_inputs(dit)
    mod = dit.modulation(vec)
    ctx_c = dit.context(glyph, ids, False, grid)
    ctx_u = dit.context(glyph[:, :1], ids, True, grid)
    batched = DiT.batch_cfg(ctx_c, ctx_u)
    assert batched.groups is not None
    masked = batched._replace(groups=None, mask=text_key_mask(batched.txt_len, glyph.shape[1], grid[0] * grid[1]))
    x2, mod2 = x.expand(2, -1, -1, -1), type(mod)([m.expand(2, -1) for m in mod.blocks], mod.out.expand(2, -1))
    out = report.setdefault("dit_step_s", {})
    out["batched_split"] = timed(lambda: dit.velocity(x2, batched, mod=mod2), 5)
    out["batched_masked"] = timed(lambda: dit.velocity(x2, masked, mod=mod2), 5)
    out["two_calls"] = timed(lambda: (dit.velocity(x, ctx_c, mod=mod), dit.velocity(x, ctx_u, mod=mod)), 5)
    a, b = dit.velocity(x2, batched, mod=mod2), dit.velocity(x2, masked, mod=mod2)
    report["dit_split_vs_masked_max_abs"] = (a.float() - b.float()).abs().max().item()
    print("dit eager", out, flush=True)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA if DEV.type == "cuda" else ProfilerActivity.CPU]) as prof:
        dit.velocity(x2, batched, mod=mod2)
        sync()
    table = prof.key_averages().table(sort_by=f"{DEV.type}_time_total", row_limit=18, max_name_column_width=70)
    report["dit_profile_top"] = table
    print(table, flush=True)
    t = time.perf_counter()
    for block in dit.transformer_blocks:
        block.compile()
    dit.velocity(x2, batched, mod=mod2)
    sync()
    report["dit_compile_first_call_s"] = time.perf_counter() - t
    out["batched_split_compiled"] = timed(lambda: dit.velocity(x2, batched, mod=mod2), 5)
    c = dit.velocity(x2, batched, mod=mod2)
    report["dit_compiled_vs_eager_max_abs"] = (a.float() - c.float()).abs().max().item()
    report["dit_out_abs_max"] = a.float().abs().max().item()
    print("dit compiled", out, report["dit_compile_first_call_s"], flush=True)


def lora_step(with_recompute: bool) -> dict:
    """Seconds per step and peak allocated memory of one LoRA 64 configuration (its model freed on return)."""
    from glmimage.train.common import recompute
    from glmimage.train.lora import add_lora
    dit = build_dit(torch.bfloat16).requires_grad_(False)
    adapters = add_lora(dit.transformer_blocks, 64)
    adapters.float()
    if with_recompute:
        recompute(dit.transformer_blocks)
    opt = torch.optim.AdamW(adapters.parameters(), lr=1e-4)
    glyph, ids, x, vec, grid = dit_inputs(dit)
    target = torch.randn_like(x)

    def step():
        with torch.autocast(DEV.type, torch.bfloat16):
            ctx = dit.context(glyph, ids, False, grid)
            loss = F.mse_loss(dit.velocity(x, ctx, vec).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    s = timed(step, 3, warmup=1)
    return {"s_per_step": s, "peak_allocated_gb": peak_gb(),
            "adapter_params": sum(p.numel() for p in adapters.parameters())}


def probe_lora() -> None:
    out = report.setdefault("lora64_step", {})
    for with_recompute in (True, False):
        name = "recompute" if with_recompute else "plain"
        out[name] = lora_step(with_recompute)
        print("lora", name, out[name], flush=True)


@torch.inference_mode()
def random_ar() -> tuple[ARModel, torch.Tensor, list[tuple[int, int]]]:
    """The AR with random bf16 weights, a 60-token t2i prompt and its grids (preview, large) at SIDE²."""
    cfg = ARConfig.from_name(AR_PRESET)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with DEV:
        model = ARModel(cfg).eval().fuse()
    torch.set_default_dtype(torch.float32)
    prompt = torch.randint(cfg.boi_id + 200, cfg.vocab_size - 100, (1, 60), device=DEV)
    prompt[0, -1] = cfg.boi_id
    return model, prompt, [(SIDE // 64, SIDE // 64), (SIDE // 32, SIDE // 32)]


def probe_ar() -> None:
    model, prompt, grids = random_ar()
    out = report.setdefault("ar_decode", {})
    tokens = {}
    for name, compile in (("cuda_graph", False), ("compiled_cuda_graph", True)):
        t = time.perf_counter()
        generate_prior(model, prompt, [], grids, seed=0, cuda_graph=True, compile=compile)  # compiles these shapes
        sync()
        first = time.perf_counter() - t
        timings: dict = {}
        tokens[name] = torch.cat([g.flatten() for g in generate_prior(
            model, prompt, [], grids, seed=0, cuda_graph=True, compile=compile, timings=timings)])
        out[name] = {"warmup_call_s": first, "decode_s": timings["ar_decode"],
                     "ms_per_token": 1e3 / timings["ar_decode_tokens_per_s"], "prefill_s": timings["ar_prefill"]}
        print("ar", name, out[name], flush=True)
    report["ar_compiled_same_tokens"] = (tokens["cuda_graph"] == tokens["compiled_cuda_graph"]).float().mean().item()


def probe_spec() -> None:
    model, prompt, grids = random_ar()
    out = report.setdefault("ar_speculative", {})
    for k in (0, 2, 4, 8):
        generate_prior(model, prompt, [], grids, seed=0, cuda_graph=True, speculate=k)     # warm-up
        timings: dict = {}
        generate_prior(model, prompt, [], grids, seed=0, cuda_graph=True, speculate=k, timings=timings)
        out[f"k{k}"] = {"decode_s": timings["ar_decode"], "forwards": timings["ar_decode_forwards"],
                        "ms_per_forward": 1e3 * timings["ar_decode"] / timings["ar_decode_forwards"]}
        print("spec", k, out[f"k{k}"], flush=True)
    for k in (2, 4, 8):
        out[f"k{k}"]["forward_cost_vs_plain_step"] = out[f"k{k}"]["ms_per_forward"] / out["k0"]["ms_per_forward"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="dit,lora,ar")
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="full", choices=["full", "debug"])
    p.add_argument("--side", type=int, default=1024, help="image side in pixels (a multiple of 64)")
    args = p.parse_args()
    global DEV, PRESET, AR_PRESET, SIDE
    DEV, PRESET, AR_PRESET, SIDE = (torch.device(args.device), args.preset,
                                    "glm-image" if args.preset == "full" else "debug", args.side)
    report.update(device=torch.cuda.get_device_name() if DEV.type == "cuda" else args.device, torch=torch.__version__,
                  preset=args.preset, side=args.side)
    for part in args.parts.split(","):
        t = time.perf_counter()
        try:
            {"dit": probe_dit, "lora": probe_lora, "ar": probe_ar, "spec": probe_spec}[part]()
        except Exception as e:  # keep what the other parts measure
            report[f"{part}_error"] = repr(e)
            print(part, "failed:", repr(e), flush=True)
        report[f"{part}_wall_s"] = time.perf_counter() - t
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
