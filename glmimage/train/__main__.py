"""`glmimage train {vae,tokenizer,ar,glyph,decoder}` and `glmimage export`; also `python -m glmimage.train ...`.

    python -m glmimage.train vae --preset small --data synthetic --steps 3000 --out runs/small
    python -m glmimage.train vae_decoder --preset small --out runs/small   # optional: decoder-only fine-tune
    python -m glmimage.train tokenizer --preset small --out runs/small
    python -m glmimage.train ar --preset small --out runs/small
    python -m glmimage.train glyph --preset small --out runs/small       # optional: a glyph encoder that spells
    python -m glmimage.train decoder --preset small --out runs/small
    python -m glmimage.train export --out runs/small --to glmimage/assets/model

Any stage runs on any device (--device, default: the accelerator when there is one) in fp32 or bf16 autocast
(--precision), and data-parallel under torchrun, one process per device (or CPU share), with the same global batch
and the same numbers up to float rounding:

    torchrun --nproc-per-node 8 -m glmimage.train decoder --preset small --out runs/small
    torchrun --nproc-per-node 8 -m glmimage.train ar --shard ...    # weights, grads, optimizer split 8 ways (FSDP2)

Every stage writes DIR/<stage>/{ckpt.pt,log.jsonl,loss.png}; later stages read the earlier ones from the same DIR
(ar and decoder need the tokenizer; decoder needs the vae, and uses the glyph stage when it ran). --resume continues
from DIR/<stage>/ckpt.pt exactly.

Fine-tuning a trained model (ours or the official one) on your own data, all of it or through LoRA adapters:

    python -m glmimage.train decoder --init zai-org/GLM-Image --data my-images/ --lr 1e-5 --out runs/ft --lora 64
    python -m glmimage.train export --out runs/ft --to my-glm-image    # the model with the tuned parts merged in
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

STAGES = ("vae", "vae_decoder", "tokenizer", "ar", "glyph", "decoder")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--preset", default="small", help="training preset: small or debug")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic', a folder of images with same-name .txt captions, or tar shards "
                        "('shards/train-{000..099}.tar'); several joined by '+' interleave ('synthetic+photos/')")
    p.add_argument("--steps", type=int, default=None, help="total steps (default: the preset's)")
    p.add_argument("--out", required=True, help="run folder (one sub-folder per stage)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/<stage>/ckpt.pt")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this part at that step (checkpointed); --resume later continues the same schedule")
    p.add_argument("--object-weight", type=float, default=None,
                   help="ar and decoder: loss weight of object/text regions vs background ones (default: ar 4, "
                        "decoder 1; needs --data synthetic)")
    p.add_argument("--cache", type=int, default=None,
                   help="decoder: how many examples' VAE latents and token ids to cache (default: the preset's, "
                        "small 4000); more unique examples, built once (~22 ms each on a 2-core CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto (the accelerator if any, else cpu), cpu, cuda, npu, mps, ...")
    p.add_argument("--precision", default="fp32", help="fp32, or bf16 (autocast; weights and optimizer stay fp32)")
    p.add_argument("--ema", type=float, default=None,
                   help="keep a moving average of the weights with this decay (e.g. 0.999); later stages and export "
                        "use it (default: the preset's, 0 = none)")
    p.add_argument("--ckpt-every", type=int, default=None,
                   help="write the checkpoint every N steps (default: the preset's; always at the end)")
    p.add_argument("--accum", type=int, default=1,
                   help="micro-batches per step and process (same global batch, 1/accum of the activation memory)")
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="ar and decoder: fine-tune a trained model (a folder in the official layout, ours or "
                        "zai-org/GLM-Image, or a hub id) instead of training from scratch; every other component "
                        "(VAE, image tokenizer, glyph encoder, text tokenizer) is read from it")
    p.add_argument("--size", type=int, default=None,
                   help="with --init: the training image side in pixels (default: the model's native size)")
    p.add_argument("--buckets", type=float, default=None, metavar="R",
                   help="ar and decoder on real images: aspect-ratio buckets up to R:1 (e.g. 2) of about the training "
                        "size's area, sides multiples of the AR token, each image fitted to the bucket nearest its "
                        "shape instead of cropped to the square (a decoder batch holds one bucket)")
    p.add_argument("--val", type=int, default=None, metavar="N",
                   help="ar and decoder: log the loss of N held-out examples as val_loss (fresh synthetic scenes, or "
                        "--val-data) every --val-every steps (default: the checkpoint interval)")
    p.add_argument("--val-data", default=None, metavar="PATH",
                   help="with --val: held-out images (a folder or tar shards) that no step trains on")
    p.add_argument("--val-every", type=int, default=None, metavar="K", help="with --val: the interval in steps")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="every --sample-every steps (default: the checkpoint interval), images of N held-out (with "
                        "--val) or training examples into DIR/<stage>/samples/: decoder: drawn from their tokens and "
                        "captions (the images above, the samples below); ar: its grids for their captions, painted "
                        "by --sample-model's decoder")
    p.add_argument("--sample-model", default=None, metavar="MODEL",
                   help="ar with --samples: the model whose decoder paints the grids (default: the --init model)")
    p.add_argument("--sample-every", type=int, default=None, metavar="K", help="with --samples: the interval in steps")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="ar and decoder on real images: threads reading the next batch's images while a step runs "
                        "(default 4; 0: read in the step)")
    p.add_argument("--edit-share", type=float, default=None, metavar="F",
                   help="ar on synthetic data: the share of examples that are edits (default 1/3; e.g. 0.5)")
    p.add_argument("--text-dropout", type=float, default=None, metavar="P",
                   help="ar: the share of examples trained with empty text (caption or instruction), so that the "
                        "model can be sampled with classifier-free guidance (--ar-guidance; default 0)")
    p.add_argument("--timesteps", default=None, choices=["uniform", "logit-normal"],
                   help="decoder: how training draws schedule positions: uniform (the default) or logit-normal "
                        "(SD3's: most mid-schedule)")
    p.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="with --init: train rank-RANK LoRA adapters on the frozen model's blocks instead of every "
                        "weight (checkpoints hold the adapters; export merges them)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, metavar="N",
                   help="steps of linear learning-rate warmup (default: the preset's)")
    p.add_argument("--schedule", default=None, choices=["cosine", "constant"],
                   help="the learning rate after the warmup: cosine down to 10%% at the last step (the default), or "
                        "constant")
    p.add_argument("--weight-decay", type=float, default=None, metavar="W", help="AdamW's (default: the preset's)")
    p.add_argument("--grad-clip", type=float, default=None, metavar="C",
                   help="clip the gradients' global norm to C (default: the preset's, 1; 0: no clipping; the norm "
                        "is logged as grad_norm either way)")
    p.add_argument("--recompute", action="store_true",
                   help="ar and decoder: activation checkpointing (each block's forward runs again in the backward "
                        "pass: one block's activations held instead of all, same numbers, ~1 more forward of compute)")
    p.add_argument("--compile", action="store_true",
                   help="ar and decoder: torch.compile each block (regional, dynamic shapes; the first steps compile)")
    p.add_argument("--shard", action="store_true",
                   help="ar and decoder under torchrun: each process holds 1/N of the weights, gradients and optimizer "
                        "state (FSDP2), for models larger than one device")


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder written by `glmimage train`")
    p.add_argument("--to", required=True, help="checkpoint folder to write (official layout)")
    p.add_argument("--preset", default="small", help="the training preset the run used")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="storage dtype (auto: float32 if the model fits in 40 MB, else bfloat16 for big tensors)")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="write a copy of MODEL with the ar and/or decoder stage of this run in place of its own "
                        "(the run trained them on MODEL's image tokenizer, checked)")
    p.add_argument("--ar-guidance", type=float, default=None, metavar="S",
                   help="record S as the model's AR guidance default (model_index.json; an AR trained with "
                        "--text-dropout)")
    p.add_argument("--ar-guidance-edit", type=float, default=None, metavar="S",
                   help="record S as the model's AR guidance default for edits (default: --ar-guidance's)")


def run_train(args) -> None:
    import torch
    from glmimage.train import ar, decoder, glyph, tokenizer, vae
    from glmimage.train.common import setup_runtime
    from glmimage.train.presets import from_model, get_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    if args.init is not None:
        if args.stage not in ("ar", "decoder"):
            raise ValueError(f"--init fine-tunes the ar and decoder stages, not {args.stage} (the others are read "
                             f"from the model)")
        preset = from_model(args.init, preset, args.size)
    elif args.size is not None:             # (--lora without --init: refused by the stage, before any work)
        raise ValueError("--size is the training size of a fine-tune: give it with --init MODEL")
    for name, value in (("lr", args.lr), ("batch", args.batch)):
        if value is not None:
            if value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}")
            setattr(preset.stages[args.stage], name, value)
    for name, value in (("warmup", args.warmup), ("weight_decay", args.weight_decay), ("grad_clip", args.grad_clip)):
        if value is not None:
            if value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
            setattr(preset.stages[args.stage], name, value)
    if args.schedule is not None:
        preset.stages[args.stage].schedule = args.schedule
    rt = setup_runtime(args.device, args.precision, args.accum, args.shard)
    if args.ema is not None:
        if not 0 <= args.ema < 1:
            raise ValueError(f"--ema is a decay in [0, 1), e.g. 0.999; got {args.ema}")
        preset.stages[args.stage].ema = args.ema
    if args.ckpt_every is not None:
        if args.ckpt_every < 1:
            raise ValueError(f"--ckpt-every must be a positive number of steps, got {args.ckpt_every}")
        preset.stages[args.stage].ckpt_every = args.ckpt_every
    fn = {"vae": vae.train, "vae_decoder": vae.train_decoder, "tokenizer": tokenizer.train, "ar": ar.train,
          "glyph": glyph.train, "decoder": decoder.train}[args.stage]
    kwargs = {"object_weight": args.object_weight} if args.object_weight is not None else {}
    if kwargs and args.stage not in ("ar", "decoder"):
        raise ValueError(f"--object-weight applies to the ar and decoder stages, not {args.stage}")
    if args.cache is not None:
        if args.stage != "decoder":
            raise ValueError(f"--cache applies to the decoder stage, not {args.stage}")
        kwargs["cache_size"] = args.cache
    if args.buckets is not None and args.data == "synthetic":
        raise ValueError("--buckets is for real images (a folder or tar shards): synthetic scenes are square")
    if (args.val_data is not None or args.val_every is not None) and args.val is None:
        raise ValueError("--val-data and --val-every go with --val N (the number of held-out examples)")
    if (args.samples is not None or args.sample_every is not None) and args.stage not in ("ar", "decoder"):
        raise ValueError(f"--samples applies to the ar and decoder stages, not {args.stage}")
    if args.sample_model is not None and (args.stage != "ar" or args.samples is None):
        raise ValueError("--sample-model goes with --samples N on the ar stage")
    if args.sample_every is not None and args.samples is None:
        raise ValueError("--sample-every goes with --samples N")
    for flag, value in (("--samples", args.samples), ("--sample-every", args.sample_every)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive number, got {value}")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers is a number of reading threads (0: none), got {args.workers}")
    if args.val is not None and args.val < 1:
        raise ValueError(f"--val is a number of held-out examples, got {args.val}")
    if args.val_every is not None and args.val_every < 1:
        raise ValueError(f"--val-every must be a positive number of steps, got {args.val_every}")
    if args.edit_share is not None:
        if args.stage != "ar":
            raise ValueError(f"--edit-share applies to the ar stage, not {args.stage}")
        kwargs["edit_share"] = args.edit_share
    if args.text_dropout is not None:
        if args.stage != "ar":
            raise ValueError(f"--text-dropout applies to the ar stage, not {args.stage}")
        kwargs["text_dropout"] = args.text_dropout
    if args.timesteps is not None:
        if args.stage != "decoder":
            raise ValueError(f"--timesteps applies to the decoder stage, not {args.stage}")
        kwargs["timesteps"] = args.timesteps
    stage_flags = (("--lora", "lora", args.lora), ("--recompute", "recompute", args.recompute or None),
                   ("--compile", "compile", args.compile or None), ("--buckets", "buckets", args.buckets),
                   ("--val", "val", args.val), ("--val-data", "val_data", args.val_data),
                   ("--val-every", "val_every", args.val_every), ("--workers", "workers", args.workers),
                   ("--samples", "samples", args.samples), ("--sample-every", "sample_every", args.sample_every),
                   ("--sample-model", "sample_model", args.sample_model))
    for flag, name, value in stage_flags:
        if value is not None:
            if args.stage not in ("ar", "decoder"):
                raise ValueError(f"{flag} applies to the ar and decoder stages, not {args.stage}")
            kwargs[name] = value
    try:
        log = fn(preset, Path(args.out), data=args.data, steps=args.steps, resume=args.resume, seed=args.seed,
                 stop_at=args.stop_after, rt=rt, **kwargs)
    finally:
        if rt.world > 1:
            torch.distributed.destroy_process_group()
    if log and rt.main:
        print(f"[{args.stage}] step {log[-1]['step'] + 1}: loss {log[-1]['loss']:.4f}; log, curve and checkpoint "
              f"in {Path(args.out) / args.stage}")


def run_export(args) -> None:
    from glmimage.train.export import export
    path = export(Path(args.out), Path(args.to), preset=args.preset, dtype=args.dtype, base=args.base,
                  ar_guidance=args.ar_guidance, ar_guidance_edit=args.ar_guidance_edit)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="glmimage-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_args(sub.add_parser("train", help="train one stage"))
    add_export_args(sub.add_parser("export", help="write the official folder layout from a run folder"))
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGES:             # `python -m glmimage.train vae ...`
        argv = ["train"] + argv
    args = parser.parse_args(argv)
    try:
        run_train(args) if args.command == "train" else run_export(args)
    except ValueError as e:
        parser.exit(2, f"glmimage {args.command}: error: {e}\n")


if __name__ == "__main__":
    main()
