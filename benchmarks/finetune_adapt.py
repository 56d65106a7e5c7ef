"""Does fine-tuning adapt a model to new data? Held-out flow-matching loss of a model's decoder before and after
`glmimage train decoder --init MODEL` on a domain it never saw.

    python benchmarks/finetune_adapt.py --model glmimage/assets/model --train 64 --held 32 --steps 300 \
        --setups lora16:1e-3,full:2e-4 --out benchmarks/results/finetune-adapt-small-cpu.json

The new domain: synthetic scenes whose objects are drawn as outlines (interiors in the background colour; no
words), captions unchanged, written as folders of .png + .txt (what users pass as --data); --train images to train
on and --held others (another data seed) to judge. (Colour-inverted scenes were tried first: the frozen VAE, trained
on light backgrounds only, turns their dark brown into teal, so no decoder can paint them; outlines it keeps.)
The held-out loss is the decoder's velocity MSE on the held-out images' latents, at the same noise, noise levels
and CFG-dropout draws for every model (decoder.velocity_loss with fixed generators, 8 draws per image). Each
setup (full, or loraR) trains the decoder and then the AR with the commands users run, is exported and judged;
beside --out, a PNG per model shows the first held-out image, the decoder painting that image's own tokens, and
text-to-image from its caption (AR + decoder).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageChops, ImageFilter


def outlined(image: Image.Image) -> Image.Image:
    """A scene with its objects drawn as ~3 px outlines: their interiors painted over in the background colour."""
    image = image.convert("RGB")
    bg = image.getpixel((0, 0))
    mask = ImageChops.difference(image, Image.new("RGB", image.size, bg)).convert("L").point(lambda v: 255 * (v > 40))
    out = image.copy()
    out.paste(bg, mask=mask.filter(ImageFilter.MinFilter(7)))          # the mask eroded by 3 px: the interior
    return out


def write_outlines(folder: Path, n: int, seed: int, size: int) -> None:
    from glmimage.data.scenes import SceneStream
    folder.mkdir(parents=True, exist_ok=True)
    stream = SceneStream(seed, size=size, kinds=("t2i",), word_p=0.0)
    for i in range(n):
        ex = stream.example(i)
        outlined(ex["image"]).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(ex["caption"])


@torch.no_grad()
def held_out_loss(model: Path, held: Path, draws: int = 8) -> float:
    """Mean velocity MSE of `model`'s decoder on the held-out images (fixed noise, levels and dropout)."""
    from glmimage.train import decoder
    from glmimage.train.presets import from_model, get_preset
    preset = from_model(model, get_preset("small"))
    n = len(list(held.glob("*.png")))
    with tempfile.TemporaryDirectory() as tmp:
        cache = decoder.build_cache(preset, Path(tmp), str(held), 0, n, progress=False)
    dit, glyph = decoder.build_dit(preset, 0).eval(), decoder.build_glyph(preset, 0)
    losses = []
    for d in range(draws):
        for i in range(0, n, 8):
            idx = list(range(i, min(n, i + 8)))
            gen = torch.Generator().manual_seed(1000 * d + i)
            loss, _, _ = decoder.velocity_loss(dit, glyph, cache, idx, gen, preset.image_size)
            losses.append(float(loss) * len(idx))
    return sum(losses) / (draws * n)


def sample(model: Path, held: Path, path: Path) -> None:
    """Side by side: the decoder painting the first held-out image's own tokens, and text-to-image (AR + decoder)
    from its caption."""
    from glmimage.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(model)
    image, caption = Image.open(held / "0000.png").convert("RGB"), (held / "0000.txt").read_text()
    grid = pipe.encode_references([image])[0]
    size = image.width
    decoded = pipe.decode_grid(caption, grid, size, size, num_inference_steps=20, guidance_scale=1.5, seed=0)[0]
    tiles = [image, decoded, pipe(caption, height=size, width=size, num_inference_steps=20, seed=0)[0]]
    sheet = Image.new("RGB", (3 * size + 16, size), "white")
    for k, tile in enumerate(tiles):
        sheet.paste(tile, (k * (size + 8), 0))
    sheet.save(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="glmimage/assets/model")
    ap.add_argument("--train", type=int, default=64, help="training images")
    ap.add_argument("--held", type=int, default=32, help="held-out images")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--setups", default="lora16:1e-3,full:2e-4",
                    help="comma-separated full or loraR, each with an optional :LR (default --lr)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="JSON report; sample PNGs are written beside it")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from glmimage.loading import read_json
    model = Path(args.model)
    size = read_json(model / "model_index.json").get("glmimage", {}).get("native_size", 1024)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_outlines(root / "train", args.train, 101, size)
        write_outlines(root / "held", args.held, 202, size)
        report = {"model": str(model), "domain": "synthetic scenes with outlined objects", "train_images": args.train,
                  "held_images": args.held, "steps": args.steps, "lr": args.lr, "threads": args.threads,
                  "held_out_loss": {"before": round(held_out_loss(model, root / "held"), 5)}, "wall_s": {},
                  "sample_caption": (root / "held" / "0000.txt").read_text()}
        sample(model, root / "held", out.with_name(out.stem + "-before.png"))
        for spec in args.setups.split(","):
            setup, _, lr = spec.partition(":")
            run = root / f"run-{setup}"
            cmd = [sys.executable, "-m", "glmimage.train", "decoder", "--init", str(model), "--data",
                   str(root / "train"), "--out", str(run), "--steps", str(args.steps), "--lr", lr or str(args.lr),
                   "--threads", str(args.threads)]
            if setup != "full":
                cmd += ["--lora", setup.removeprefix("lora")]
            t0 = time.time()
            subprocess.run(cmd, check=True, capture_output=True)
            ar_cmd = [c if c != "decoder" else "ar" for c in cmd]         # the AR too, with the same settings
            subprocess.run(ar_cmd, check=True, capture_output=True)
            report["wall_s"][setup] = round(time.time() - t0, 1)
            tuned = root / f"model-{setup}"
            subprocess.run([sys.executable, "-m", "glmimage.train", "export", "--out", str(run), "--to", str(tuned)],
                           check=True, capture_output=True)
            report["held_out_loss"][setup] = round(held_out_loss(tuned, root / "held"), 5)
            report.setdefault("commands", []).extend([" ".join(cmd[1:]), " ".join(ar_cmd[1:])])
            sample(tuned, root / "held", out.with_name(out.stem + f"-{setup}.png"))
            print(json.dumps(report["held_out_loss"]), flush=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
