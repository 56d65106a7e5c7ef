"""AR decode speed alone, on random weights built in memory (no checkpoint): tokens/s with and without the
CUDA-graph decode step, against the weight-streaming floor.

    python benchmarks/ar_decode.py --preset glm-image --device cuda --dtype bfloat16    # the official AR (9 B)
    python benchmarks/ar_decode.py --preset debug --device cpu
"""
import argparse
import json
import time

import torch

from glmimage.ar import ARConfig, ARModel, generate_prior, sync


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="glm-image")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--grid", type=int, default=32, help="large grid side (1024 px: 32); the preview is half")
    p.add_argument("--eager-grid", type=int, default=8, help="grid side for the eager run (it is slow)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = ARConfig.from_name(args.preset)
    torch.manual_seed(0)
    with device:
        model = ARModel(cfg).to(dtype).eval().fuse()
    nbytes = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if "embed_tokens" not in n)
    prompt = torch.randint(cfg.boi_id + 200, cfg.vocab_size - 100, (1, 60), device=device)
    prompt[0, -1] = cfg.boi_id
    report = {"preset": args.preset, "device": str(device), "dtype": args.dtype, "weight_bytes": nbytes}
    for name, side, graph in (("cuda_graph", args.grid, True), ("eager", args.eager_grid, False)):
        grids = [(side // 2, side // 2), (side, side)]
        timings: dict = {}
        for _ in range(2):                                   # the second run is timed
            timings = {}
            generate_prior(model, prompt, [], grids, seed=0, cuda_graph=graph, timings=timings)
            sync(device)
        report[name] = {"tokens": timings["ar_new_tokens"], "prefill_s": timings["ar_prefill"],
                        "decode_s": timings["ar_decode"], "tokens_per_s": timings["ar_decode_tokens_per_s"],
                        "ms_per_token": 1e3 / timings["ar_decode_tokens_per_s"],
                        "weight_GB_per_s": nbytes * timings["ar_decode_tokens_per_s"] / 1e9}
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
