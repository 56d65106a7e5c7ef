"""Command line: `glmimage generate`, `glmimage edit`, `glmimage make-random`, and the delegated
`glmimage train|export|eval scenes|bench`.

    glmimage make-random /tmp/glm-debug --preset debug
    glmimage generate "a red circle with the word 'SUN'" --model /tmp/glm-debug --height 256 --width 256 -o out.png
    glmimage generate "a red circle" "a blue square" -o out.png     # one batch: out-0.png, out-1.png
    glmimage edit "make the red circle blue" --image in.png --model /tmp/glm-debug -o out.png
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    """'auto' -> the current accelerator (CUDA, NPU, MPS, XPU...) when there is one, else the CPU."""
    if name != "auto":
        return torch.device(name)
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        return acc.current_accelerator()
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    if DTYPES[name] == torch.float16 and device.type == "cpu":
        print("warning: float16 on CPU is ~100x slower than bfloat16; use --dtype bfloat16", file=sys.stderr)
    return DTYPES[name]


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the bundled model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, npu, mps, ...")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 elsewhere), float32, bfloat16")
    p.add_argument("--offload", action="store_true", help="keep only the running stage resident (less memory)")
    p.add_argument("--int8", action="store_true", help="int8 weight-only linears in the AR (faster decode)")
    p.add_argument("--int8-dit", action="store_true",
                   help="int8 weight-only linears in the DiT (half its bf16 memory; slightly slower steps)")
    p.add_argument("--compile", action="store_true", help="torch.compile the AR decode step and the DiT "
                   "(the first image compiles, minutes on a CPU; faster from then on; with --offload on a CPU the "
                   "compiled code is cached on disk for later processes)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="+", help="one or more prompts (several run as one batch; text-to-image)")
    p.add_argument("--height", type=int, default=None, help="multiple of 32 (default: the model's native size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None,
                   help="the decoder's classifier-free guidance (default: the model's own; the official model 1.5)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only the denoising steps whose sigma lies in (LO, HI] (1 = noise, 0 = data), the "
                        "conditional branch alone elsewhere (default: the model's own; the official model 0 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ar-guidance", type=float, default=None, metavar="S",
                   help="classifier-free guidance on the AR's tokens: logits of the prompt against the same layout "
                        "with empty text, S > 1 pushes toward the prompt (default: the model's own; 1 = off, as the "
                        "reference samples)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--step-cache", type=float, default=0.0, metavar="T",
                   help="skip the DiT's blocks after the first at steps whose first-block output moved less than T "
                        "(relative) since the last full step, e.g. 0.1 (faster, approximate; 0 = off)")
    p.add_argument("--speculate", type=int, default=0, metavar="K",
                   help="decode the AR speculatively: K guessed tokens (the preview upsampled, an edit's reference) "
                        "verified per forward; the same tokens, fewer forwards (0 = off)")
    p.add_argument("-o", "--output", default="out.png")
    add_runtime_args(p)


def load_pipeline(args):
    from glmimage.pipeline import Pipeline
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    int8 = {(True, False): "ar", (False, True): "dit", (True, True): "all"}.get((args.int8, args.int8_dit), False)
    pipe = Pipeline.from_pretrained(args.model, device=device, dtype=dtype, offload=args.offload, int8=int8)
    return pipe.compile() if args.compile else pipe


def cmd_generate(args, images=None) -> None:
    from PIL import Image
    pipe = load_pipeline(args)
    height = args.height or pipe.native_size
    width = args.width or pipe.native_size
    t0 = time.perf_counter()
    refs = [Image.open(p).convert("RGB") for p in images] if images else None
    prompt = args.prompt[0] if len(args.prompt) == 1 else args.prompt
    out = pipe(prompt, height=height, width=width, image=refs, num_inference_steps=args.steps,
               guidance_scale=args.guidance, seed=args.seed, temperature=args.temperature, top_p=args.top_p,
               top_k=args.top_k, step_cache=args.step_cache, speculate=args.speculate,
               guidance_interval=args.guidance_interval, keep_unchanged=getattr(args, "keep_unchanged", None),
               ar_guidance=args.ar_guidance)
    path = Path(args.output)
    paths = [path] if len(out) == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(len(out))]
    for im, p in zip(out, paths):
        im.save(p)
    print(f"wrote {', '.join(map(str, paths))} ({width}x{height}, seed {args.seed}+i, "
          f"{time.perf_counter() - t0:.1f} s on {pipe.device})")


def cmd_make_random(args) -> None:
    from glmimage.random_checkpoint import make_random_checkpoint
    device = pick_device(args.device)
    out = make_random_checkpoint(args.out, preset=args.preset, seed=args.seed, device=device,
                                 dtype=pick_dtype(args.dtype, device))
    print(f"wrote a random {args.preset} checkpoint (official layout) to {out}")


# Sub-commands with their own argument parsers, dispatched on the first word.
def _delegate(argv: list[str]) -> bool:
    cmd, rest = argv[0], argv[1:]
    if cmd in ("train", "export"):
        from glmimage.train.__main__ import main as train_main
        train_main(argv)
    elif cmd == "bench":
        from glmimage.bench import main as bench_main
        bench_main(rest)
    elif cmd == "eval":
        if not rest or rest[0] not in ("scenes", "compare"):
            raise SystemExit("usage: glmimage eval scenes --model PATH --n N --seed S [--out DIR]\n"
                             "       glmimage eval compare --a REPORT... [--b REPORT...] [--out JSON]")
        if rest[0] == "compare":
            from glmimage.eval_compare import main as compare_main
            compare_main(rest[1:])
            return True
        from glmimage.train.evaluate import main as eval_main
        rest = rest[1:]
        eval_main(rest if "--out" in rest else rest + ["--out", "eval-scenes"])
    else:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and _delegate(argv):
        return
    parser = argparse.ArgumentParser(
        prog="glmimage", description="GLM-Image: AR prior + diffusion decoder",
        epilog="more: glmimage train {vae,tokenizer,ar,decoder} ... | glmimage export ... | "
               "glmimage eval scenes ... | glmimage bench ... (each takes --help)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="text to image")
    add_generation_args(p)

    p = sub.add_parser("edit", help="image to image: edit or compose reference images")
    add_generation_args(p)
    p.add_argument("--image", action="append", required=True, help="reference image (repeatable)")
    p.add_argument("--keep-unchanged", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the reference's pixels (its VAE latents) wherever the AR left its tokens unchanged and "
                        "draw only the changed regions (one reference, output at its size; default: the model's own, "
                        "off for the official model)")

    from glmimage.random_checkpoint import PRESETS
    p = sub.add_parser("make-random", help="write a random checkpoint in the official layout")
    p.add_argument("out")
    p.add_argument("--preset", default="debug", choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the weights are drawn (cuda: the full preset in seconds)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (the official checkpoint is bf16)")

    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            cmd_generate(args)
        elif args.command == "edit":
            cmd_generate(args, images=args.image)
        elif args.command == "make-random":
            cmd_make_random(args)
    except ValueError as e:
        parser.exit(2, f"glmimage {args.command}: error: {e}\n")


if __name__ == "__main__":
    main()
