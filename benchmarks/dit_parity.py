"""Our DiT against the reference's (diffusers GlmImageTransformer2DModel) at any size, the decoder alone: both
share one set of random weights (ours are the reference's tensors, so the official size needs its memory once),
run the same Euler schedule with CFG 1.5 from the same noise, glyph embeddings and prior tokens, ours with both
CFG branches in one batch (the pipeline's way), the reference with two calls (its pipeline's way). Reports how far
the velocities and the final latents drift apart, step by step.

    python benchmarks/dit_parity.py --preset full --dtype bfloat16 --size 256 --steps 10 --out r.json  # CPU: ~15 GB
    python benchmarks/dit_parity.py --preset full --device cuda --dtype float32 --size 1024 --steps 50

It isolates the decoder from the AR, the VAE and the pipelines: where full-size images differ, this says whether the
DiT does (and how the difference grows over the steps).
"""
import argparse
import json
import math
import time

import torch
from diffusers import GlmImageTransformer2DModel

from glmimage.dit import DiT, DiTConfig
from glmimage.random_checkpoint import _fill_zeros
from glmimage.schedule import denoise, make_schedule

SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_image_seq_len=256,
                 base_shift=0.25, max_shift=0.75, time_shift_type="linear")


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """max |a-b|, and the difference's RMS relative to b's (dB: 20 log10 of the ratio's inverse)."""
    a, b = a.float(), b.float()
    rel = ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()
    return {"max_abs": (a - b).abs().max().item(), "rel_rms": rel,
            "snr_db": 20 * math.log10(1 / rel) if rel > 0 else None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="full", help="DiT preset (debug, medium, full)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (a multiple of 32)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--glyph-tokens", type=int, default=8, help="glyph rows of the conditional branch (uncond: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = DiTConfig.from_name(args.preset)
    fields = {k: getattr(cfg, k) for k in DiTConfig.__dataclass_fields__}

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_default_dtype(dtype)                      # built in its dtype: the official size never exists in fp32
    with device:
        ref = GlmImageTransformer2DModel(**fields).eval()
    torch.set_default_dtype(torch.float32)
    _fill_zeros(ref, 0.02, torch.Generator(device).manual_seed(args.seed))
    with torch.device("meta"):
        ours = DiT(cfg)
    ours.load_state_dict(ref.state_dict(), assign=True)  # the same tensors
    ours.eval().fuse()
    build_s = time.perf_counter() - t0

    g = torch.Generator().manual_seed(args.seed + 1)
    n = args.size // 16                                 # DiT token grid side (16 px per token)
    glyph = torch.randn(1, args.glyph_tokens, cfg.text_embed_dim, generator=g).to(device, dtype)
    glyph_neg = torch.randn(1, 1, cfg.text_embed_dim, generator=g).to(device, dtype)
    ids = torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (1, n * n), generator=g).to(device)
    noise = torch.randn(1, cfg.in_channels, 2 * n, 2 * n, generator=g).to(device)
    timesteps, sigmas = make_schedule(args.steps, n * n, SCHEDULER)
    size = torch.tensor([[float(args.size)] * 2], device=device)
    crop = torch.zeros_like(size)

    velocities: dict[str, list] = {"ours": [], "reference": []}

    @torch.inference_mode()
    def ours_fn(x, i, cond):
        mod = ours.modulation(ours.embed_vec(timesteps[i:i + 1].to(device), size, crop))
        mod = type(mod)([m.expand(2, -1) for m in mod.blocks], mod.out.expand(2, -1))
        v = ours.velocity(x, ctx, mod=mod).float()
        velocities["ours"].append(v)
        return v

    @torch.inference_mode()
    def ref_fn(x, i, cond):
        v = ref(hidden_states=x.to(dtype), encoder_hidden_states=glyph if cond else glyph_neg, prior_token_id=ids,
                prior_token_drop=torch.full_like(ids, not cond, dtype=torch.bool),
                timestep=timesteps[i:i + 1].to(device), target_size=size, crop_coords=crop, return_dict=False)[0]
        velocities["reference"].append(v.float())
        return v.float()

    with torch.inference_mode():
        ctx = DiT.batch_cfg(ours.context(glyph, ids, False, (n, n)), ours.context(glyph_neg, ids, True, (n, n)))
    report = {"preset": args.preset, "device": str(device), "dtype": args.dtype, "size": args.size,
              "steps": args.steps, "build_s": build_s}
    latents = {}
    for name, fn, batch in (("reference", ref_fn, False), ("ours", ours_fn, True)):
        t = time.perf_counter()
        latents[name] = denoise(fn, noise, timesteps, sigmas, 1.5, batch_cfg=batch)
        report[f"{name}_s"] = time.perf_counter() - t
    ref_v = velocities["reference"]                     # [cond, uncond] per step
    ours_v = [v for pair in velocities["ours"] for v in pair.chunk(2)]
    report["velocity_per_step"] = [compare(a, b) for a, b in zip(ours_v[0::2], ref_v[0::2])]
    report["latents"] = compare(latents["ours"], latents["reference"])
    print(json.dumps({k: v for k, v in report.items() if k != "velocity_per_step"}, indent=1))
    for i, c in enumerate(report["velocity_per_step"]):
        snr = "identical" if c["snr_db"] is None else f"SNR {c['snr_db']:.1f} dB"
        print(f"step {i}: conditional velocity (each on its own trajectory) max diff {c['max_abs']:.4g}, {snr}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
