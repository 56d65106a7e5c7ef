"""Train every stage of the debug preset for a few steps in one run folder, alone or under torchrun:

    python tests/train_all_stages.py DIR [--in-two-parts] [--accum K] [--device D] [--precision P]
    torchrun --nproc-per-node N tests/train_all_stages.py DIR ... [--shard] [--recompute] [--compile]

--in-two-parts stops each stage at step 2 and resumes it; --accum K computes each step in K micro-batches;
--shard trains the ar and decoder stages only, their weights sharded over the processes (FSDP2);
--recompute checkpoints their blocks' activations; --compile compiles their blocks.
test_train.py compares the runs. Dead-code restarts of the tokenizer run every 2 steps here, so the
multi-process path of the restarts is exercised too. The ar and decoder stages always log a held-out loss
(--val 4, every 2 steps) and the decoder draws 2 samples at the end of each part."""
import argparse
from pathlib import Path

import torch

from glmimage.train import ar, decoder, tokenizer, vae
from glmimage.train.common import setup_runtime
from glmimage.train.presets import get_preset

STEPS = 4

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--in-two-parts", action="store_true")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--shard", action="store_true")
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokenizer.RESTART_EVERY = 2
    rt = setup_runtime(args.device, args.precision, args.accum, args.shard)
    preset = get_preset("debug")
    stages = {"vae": vae.train, "vae_decoder": vae.train_decoder, "tokenizer": tokenizer.train, "ar": ar.train,
              "decoder": decoder.train}
    for name, train in stages.items():
        if args.shard and name not in ("ar", "decoder"):
            continue
        kwargs = {"object_weight": 3.0, "samples": 2, "sample_every": STEPS} if name == "decoder" else {}
        if name in ("ar", "decoder"):
            kwargs.update(val=4, val_every=2)
        if args.recompute and name in ("ar", "decoder"):
            kwargs["recompute"] = True
        if args.compile and name in ("ar", "decoder"):
            kwargs["compile"] = True
        if args.in_two_parts:
            train(preset, Path(args.out), steps=STEPS, progress=False, rt=rt, stop_at=2, **kwargs)
        train(preset, Path(args.out), steps=STEPS, progress=False, rt=rt, resume=args.in_two_parts, **kwargs)
    if rt.world > 1:
        torch.distributed.destroy_process_group()
