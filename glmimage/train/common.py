"""The training loop every stage shares: AdamW, warmup + cosine, checkpoints, exact resume, JSONL log, loss plot,
on any device, in fp32 or bf16 autocast, in one process or data-parallel over many (torchrun).

Exact resume: all randomness of step s (which examples, crops, noise, dropout, codebook restarts) comes from
`step_generator(seed, s)` and the example indices [s * batch, (s + 1) * batch) of a deterministic stream, so a
checkpoint only needs the weights, the optimizer state and the step. The torch/python RNG states are saved too, for
anything that still reads the global generators. Resuming truncates the log to the checkpoint's step, so the log of
an interrupted-and-resumed run is the same as an uninterrupted one.

One code path at every scale (`Runtime`): the same step functions run on a laptop CPU, one accelerator or N
processes under torchrun (one per device or CPU share). A step's global batch of B examples is split into equal
contiguous row blocks, one per process (and micro-batch); every block draws the whole batch's randomness from the
same step generator (on the CPU, then moves it) and keeps its rows, so a run's numbers do not depend on the device
or the number of processes beyond float rounding. Each step function returns its loss as a weighted mean together with
its weight (rows, or the sum of its loss weights); the gradients of loss * weight are summed over blocks and
processes and divided by the total weight, which is exactly the gradient of the whole batch's loss. The same
split into micro-batches within a process (--accum) trades speed for activation memory. Process 0 writes the log,
plots and checkpoints; every process loads the checkpoint on --resume.

Models larger than one device (--shard, the ar and decoder stages): each process holds 1/N of every trainable
weight, its gradient and its optimizer state (FSDP2 `fully_shard`, ZeRO-3 style; the weights of one block are
gathered just for its forward and backward). The numbers are the same as without sharding. Its checkpoint is
sharded too (torch.distributed.checkpoint): every process writes the parts it holds, so none ever holds the whole
state; the same entries as a whole file, and any number of processes, sharded or not, resumes from it (each reads
the parts it needs), and later stages and export read it whole in one process.

Run folder layout (one folder per model, one sub-folder per stage):
  DIR/<stage>/ckpt.pt        model(s) + optimizer + step + RNG states (written atomically every ckpt_every steps),
                             and the weights' moving average when the stage keeps one (cfg.ema > 0)
  DIR/<stage>/ckpt.dcp/      the same, sharded (--shard): one .distcp file per process + .metadata, written into
                             ckpt.dcp.tmp/ and renamed into place
  DIR/<stage>/log.jsonl      one line per step: {"step", "loss", <stage metrics>, "lr", "time"}, and on an
                             accelerator "peak_mem_gib" (the most memory allocated so far)
  DIR/<stage>/loss.png       the loss curve (PIL), redrawn at every checkpoint
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch import Tensor, nn

from glmimage.train.presets import StageConfig, TrainPreset

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class Runtime:
    """Where a stage trains and which share of each global batch this process computes.

    device: the models' and batches' device; autocast: the matmul dtype under torch.autocast (None: fp32);
    rank / world: this process and the number of data-parallel processes (1: no torch.distributed);
    accum: micro-batches per process and step (gradient accumulation: 1/accum of the activations at a time);
    micro: the micro-batch being computed (set by train_loop); shard: split the trainable weights over the
    processes (FSDP2) instead of holding them whole in every one."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: torch.dtype | None = None
    rank: int = 0
    world: int = 1
    accum: int = 1
    micro: int = 0
    shard: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This process's (and micro-batch's) block of a global batch."""
        blocks = self.world * self.accum
        if batch % blocks:
            raise ValueError(f"the global batch ({batch}) must split evenly over {self.world} processes x "
                             f"{self.accum} micro-batches; choose counts whose product divides it")
        n = batch // blocks
        k = self.rank * self.accum + self.micro
        return slice(k * n, (k + 1) * n)

    def autocast_context(self):
        return torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                              enabled=self.autocast is not None)

    def sum(self, x: Tensor | float) -> Tensor:
        """Sum over processes (a float32 tensor on this device)."""
        t = torch.as_tensor(x, dtype=torch.float32).detach().to(self.device).clone()
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather(self, x: Tensor) -> Tensor:
        """Concatenate every process's equally shaped x along dim 0, in rank order (= the whole batch's order)."""
        if self.world == 1:
            return x
        out = x.new_empty((self.world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    def reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Sum the gradients over processes. A parameter that got a gradient in any process gets one in all
        (zeros where it had none), as in one process computing the whole batch."""
        if self.world == 1:
            return
        has = self.sum(torch.tensor([p.grad is not None for p in params], dtype=torch.float32))
        for p, h in zip(params, has.tolist()):
            if h and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.flatten().float() for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def fully_shard(self, units: list[nn.Module], methods: list[tuple[nn.Module, str]] = ()) -> None:
        """Shard each unit's weights over the processes (inner units before the ones that hold them). A unit's
        weights are gathered around its forward (and, by `methods`, around other methods called from outside a
        unit's forward) and its gradients reduce-scattered in its backward."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        mesh = init_device_mesh(self.device.type, (self.world,))
        for m in units:
            fully_shard(m, mesh=mesh)
        for m, name in methods:
            register_fsdp_forward_method(m, name)


def recompute(blocks) -> None:
    """Activation checkpointing: each block keeps only its inputs for the backward pass and runs its forward again
    there (torch.utils.checkpoint, non-reentrant), so a step holds one block's activations instead of all of them,
    for about one more forward of compute. The same numbers (the blocks draw no randomness); module names and
    checkpoints are unchanged (the instance's forward is wrapped, not the module)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint
    for block in blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(blocks) -> None:
    """torch.compile each block (regional, as torchtitan does: one compiled graph, forward and backward, that every
    block of the same shapes reuses; the glue between blocks stays eager). Dynamic shapes from the start: a batch of
    another length reuses the graph instead of compiling a static one per length, and a resumed run replays the
    kernels of the run it continues. The first steps pay the compile."""
    for block in blocks:
        block.compile(dynamic=True)


def wrap_blocks(name: str, model: nn.Module, blocks: nn.ModuleList, rt: Runtime, seed: int, lora: int | None = None,
                recompute_: bool = False, compile_: bool = False) -> tuple[dict[str, nn.Module], list[nn.Parameter]]:
    """A stage's training-time wrappers of its model's blocks, in the order they go on: LoRA adapters (the model
    frozen in the autocast dtype: half the memory in bf16; adapters fp32), activation checkpointing (`recompute`),
    compiled blocks (`compile_blocks`). Returns train_loop's (models, trainable): {name: model} and its weights, or
    {"lora": adapters} and theirs."""
    from glmimage.train.lora import add_lora
    models, trainable = {name: model}, list(model.parameters())
    if lora:
        model.requires_grad_(False).to(rt.device, rt.autocast or torch.float32)
        adapters = add_lora(blocks, lora, seed)
        models, trainable = {"lora": adapters}, list(adapters.parameters())
    if recompute_:
        recompute(blocks)
    if compile_:
        compile_blocks(blocks)
    return models, trainable


class ShardRoot(nn.Module):
    """A training step that calls several parts of a model (not only its forward) runs inside this module's forward
    (`root(lambda: loss(...))`), so that with --shard FSDP sees one root that gathers and schedules every unit;
    without sharding it is a plain call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable):
        return fn()


def placed_like(value: Tensor, p: Tensor) -> Tensor:
    """A whole tensor (e.g. from a checkpoint) laid out like parameter p: p's shard of it when p is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    value = value.to(p.device, p.dtype)
    return distribute_tensor(value, p.device_mesh, p.placements) if isinstance(p, DTensor) else value


def setup_runtime(device: str = "auto", precision: str = "fp32", accum: int = 1, shard: bool = False) -> Runtime:
    """The entry point's choice of device and precision; under torchrun (WORLD_SIZE > 1) also the process group:
    one process per accelerator (LOCAL_RANK), or CPU processes over gloo. shard: FSDP2 over those processes."""
    from glmimage.cli import pick_device
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if accum < 1:
        raise ValueError(f"--accum must be a positive number of micro-batches, got {accum}")
    dev = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shard and world == 1:
        raise ValueError("--shard splits the weights over processes: launch 2 or more with torchrun "
                         "(torchrun --nproc-per-node N -m glmimage.train STAGE --shard ...)")
    if world == 1:
        return Runtime(dev, PRECISIONS[precision], accum=accum)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type != "cpu":
        dev = torch.device(dev.type, local)
        getattr(torch, dev.type).set_device(local)          # torch.cuda / torch.npu / torch.xpu
    if not dist.is_initialized():
        backend = {"cuda": "nccl", "npu": "hccl", "xpu": "xccl"}.get(dev.type, "gloo")
        dist.init_process_group(backend)
    return Runtime(dev, PRECISIONS[precision], dist.get_rank(), dist.get_world_size(), accum, shard=shard)


def finetune_identity(preset: TrainPreset, lora: int | None, buckets: float | None = None) -> dict:
    """What a checkpoint's weights are relative to and what its data was ({} for a plain run from scratch): the
    --init model, the training size, the LoRA rank, the aspect-ratio limit of --buckets. Export and --resume read
    it."""
    if lora is not None and lora < 1:
        raise ValueError(f"--lora is the adapters' rank, a positive integer (e.g. 16), got {lora}")
    if lora is not None and preset.init is None:
        raise ValueError("--lora adapts a trained model: give it with --init MODEL")
    data = {"buckets": buckets} if buckets else {}
    if preset.init is None:
        return data
    return {"init": str(preset.init), "size": preset.image_size, **({"lora": lora} if lora else {}), **data}


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, salt)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1))


def lr_at(step: int, cfg: StageConfig, total: int) -> float:
    """Linear warmup, then cosine down to 10% at `total` (cfg.schedule "cosine") or constant ("constant")."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    t = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


STAGE_KEYS = {"stage", "step", "models", "ema", "extra", "identity", "seed", "data_position"}


def checkpoint_path(run_dir: Path, stage: str) -> Path | None:
    """A stage's checkpoint: DIR/<stage>/ckpt.pt (one whole file) or DIR/<stage>/ckpt.dcp/ (sharded; or the
    previous one, ckpt.dcp.old, if a crash came between the two renames that replace it), or None."""
    for name in ("ckpt.pt", "ckpt.dcp", "ckpt.dcp.old"):
        path = Path(run_dir) / stage / name
        if path.exists():
            return path
    return None


def load_stage(run_dir: Path, stage: str, keys: set[str] | None = None) -> dict:
    """A finished (or in-progress) stage's checkpoint as whole CPU tensors: {"models": {name: state_dict},
    "extra": {...}, ...}. keys: the top-level entries wanted; default everything of a whole file, and everything
    but the optimizer and RNG states of a sharded one (STAGE_KEYS; it is read without the processes that wrote
    it, each entry gathered from their shard files)."""
    path = checkpoint_path(run_dir, stage)
    if path is None:
        raise ValueError(f"no {stage} checkpoint in {Path(run_dir) / stage}; run `glmimage train {stage} --out "
                         f"{run_dir}` first")
    if path.suffix == ".pt":
        ck = torch.load(path, map_location="cpu", weights_only=False, mmap=keys is not None)
        return ck if keys is None else {k: v for k, v in ck.items() if k in keys}
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    with single_process_read():
        return _load_state_dict_from_keys(keys or STAGE_KEYS, checkpoint_id=str(path))


@contextmanager
def single_process_read():
    """Quiets torch.distributed.checkpoint's warning that, with no process group, it loads in a single process:
    reading a sharded checkpoint in one process is what is meant wherever this is used."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        yield


def dcp_keys(path: Path) -> set[str]:
    """The flattened entry names ("models.dit.proj_out.weight", ...) of a sharded checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def trained_weights(ck: dict, name: str) -> dict:
    """One model's weights in a stage checkpoint, as later stages and export use them: the moving average where
    the stage kept one (--ema), the trained weights otherwise."""
    return {**ck["models"][name], **ck.get("ema", {}).get(name, {})}


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict], path: Path, title: str, keys: list[str] | None = None) -> None:
    """Loss curves (log-scale y, moving average) drawn with PIL: no plotting library needed."""
    keys = keys or ["loss"]
    W, H, ml, mr, mt, mb = 640, 360, 60, 16, 28, 36
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((ml, 8), title, fill="black")
    series = {}
    for k in keys:
        pts = [(r["step"], r[k]) for r in records if k in r and r[k] is not None and r[k] > 0]
        if len(pts) < 2:
            continue
        win = max(1, len(pts) // 100)
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        sm = [sum(ys[max(0, i - win + 1):i + 1]) / len(ys[max(0, i - win + 1):i + 1]) for i in range(len(ys))]
        series[k] = (xs, sm)
    if not series:
        im.save(path)
        return
    x0 = min(min(s[0]) for s in series.values())
    x1 = max(max(s[0]) for s in series.values())
    y0 = math.log10(min(min(s[1]) for s in series.values()))
    y1 = math.log10(max(max(s[1]) for s in series.values()))
    y1 = y1 if y1 > y0 else y0 + 1

    def xy(x, y):
        return (ml + (x - x0) / max(1, x1 - x0) * (W - ml - mr),
                H - mb - (math.log10(y) - y0) / (y1 - y0) * (H - mt - mb))

    d.rectangle([ml, mt, W - mr, H - mb], outline="black")
    for i in range(5):
        yv = 10 ** (y0 + (y1 - y0) * i / 4)
        _, py = xy(x0, yv)
        d.line([ml - 4, py, ml, py], fill="black")
        d.text((4, py - 6), f"{yv:.3g}", fill="black")
    for i in range(5):
        xv = x0 + (x1 - x0) * i / 4
        px, _ = xy(xv, 10 ** y0)
        d.text((px - 10, H - mb + 6), f"{int(xv)}", fill="black")
    d.text((W // 2 - 10, H - 16), "step", fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    for j, (k, (xs, ys)) in enumerate(series.items()):
        c = colours[j % len(colours)]
        d.line([xy(x, y) for x, y in zip(xs, ys)], fill=c, width=2)
        d.text((W - mr - 150, mt + 6 + 14 * j), k, fill=c)
    im.save(path)


StepFn = Callable[[int, torch.Generator], tuple[Tensor, Tensor | float, dict]]


class Validation(NamedTuple):
    """A held-out loss logged as `val_loss` every `every` steps and at the end of each part: fn(b) -> (loss, weight,
    metrics) of this process's rows of held-out batch b (as a step_fn, with fixed randomness), for b < batches.
    cache: the stage's held-out examples, when it keeps them (the decoder's latents, which its samples reuse)."""

    batches: int
    every: int
    fn: Callable[[int], tuple[Tensor, Tensor | float, dict]]
    cache: dict | None = None


class Sampling(NamedTuple):
    """Images drawn every `every` steps and at the end of each part: fn(step) draws them (every process calls it,
    as a sharded model needs) and process 0 writes them (save_samples)."""

    every: int
    fn: Callable[[int], None]


SAMPLE_STEPS, SAMPLE_GUIDANCE = 20, 1.5     # how samples drawn during training are denoised (Euler, CFG)


def save_samples(rows: list[list[Image.Image]], out_dir: Path, step: int) -> Path:
    """Rows of equally sized images as one sheet: out_dir/samples/step_<step>.png."""
    w, h = rows[0][0].size
    sheet = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            sheet.paste(im, (x * w, y * h))
    path = Path(out_dir) / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def train_loop(stage: str, out_dir: Path, models: dict[str, nn.Module], trainable: list[nn.Parameter],
               step_fn: StepFn, cfg: StageConfig, seed: int, steps: int, resume: bool,
               extra: Callable[[], dict] | None = None, plot_keys: list[str] | None = None,
               after_step: Callable[[int, torch.Generator], None] | None = None,
               progress: bool = True, stop_at: int | None = None, rt: Runtime | None = None,
               shard_units: Callable[[], tuple[list, list]] | None = None,
               identity: dict | None = None, val: Validation | None = None,
               sample: Sampling | None = None) -> list[dict]:
    """Run steps [start, min(steps, stop_at)) of one stage (stop_at: end this part early, checkpointed, so that a
    later --resume continues the same `steps`-long schedule).

    step_fn(step, gen) -> (loss, weight, metrics) for this process's rows of the step's batch: loss a weighted mean,
    weight its denominator (the row count for a plain mean over equal rows). models: everything saved in the
    checkpoint (trainable or frozen), by name; moved to rt.device here. extra(): more picklable state saved next to
    them (e.g. latent statistics). shard_units() -> (units, methods) for Runtime.fully_shard, when the stage can be
    sharded (rt.shard). identity: what the checkpoint's weights mean (e.g. the --init model, the LoRA rank), saved
    with them; resuming with another identity is refused. val: a held-out loss (Validation); sample: images drawn
    (Sampling). Both run under no_grad with the moving average of the weights when there is one (what later stages
    and export use), else the weights, and draw from no generator the steps use: the training losses are the same
    with or without them. Returns this stage's full log."""
    from tqdm import tqdm

    rt = rt or Runtime()
    out_dir = Path(out_dir) / stage
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, dcp_path, log_path = out_dir / "ckpt.pt", out_dir / "ckpt.dcp", out_dir / "log.jsonl"
    if rt.shard and shard_units is None:
        raise ValueError(f"--shard is for the stages with large models (ar, decoder), not {stage}")
    for m in models.values():
        m.to(rt.device)
    names = {id(p): (mn, pn) for mn, m in models.items() for pn, p in m.named_parameters()}
    assert all(id(p) in names for p in trainable), "every trainable parameter belongs to a saved model"
    trainable_names = [names[id(p)] for p in trainable]
    ck = sharded_ck = None
    found_path = checkpoint_path(out_dir.parent, stage) if resume else None
    if found_path == ckpt_path:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    elif found_path is not None:                            # sharded: its tensors are loaded below, in place
        sharded_ck = load_stage(out_dir.parent, stage, {"step", "rng", "identity"})
    found = ck if ck is not None else sharded_ck
    if found is not None and found.get("identity", {}) != (identity or {}):
        plain = "no --init/--lora/--buckets/--edit-share"
        raise ValueError(f"{out_dir} was trained with {found.get('identity') or plain}, not {identity or plain}: "
                         f"resume with the same flags, or use a new run folder")
    if ck is not None:
        for name, m in models.items():
            m.load_state_dict(ck["models"][name])          # whole weights, before any sharding
    if rt.shard:            # sharding replaces the parameters (same names): the trainable list is looked up again
        rt.fully_shard(*shard_units())
        params = {mn: dict(m.named_parameters()) for mn, m in models.items()}
        trainable = [params[mn][pn] for mn, pn in trainable_names]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start, saved_ema = 0, {}
    if ck is not None:
        opt.load_state_dict(ck["optimizer"])
        if rt.shard:                                        # the checkpoint's whole moments -> this process's shard
            for p in trainable:
                for k, v in opt.state[p].items():
                    if torch.is_tensor(v) and v.shape == p.shape and v.dim():
                        opt.state[p][k] = placed_like(v, p)
        start, saved_ema = ck["step"], ck.get("ema", {})
    elif sharded_ck is not None:
        start = sharded_ck["step"]
    if found is not None:
        torch.set_rng_state(found["rng"]["torch"])
        random.setstate(found["rng"]["python"])
        if rt.main:
            kept = [r for r in read_log(log_path) if r["step"] < start]
            log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    elif resume and rt.main:
        print(f"[{stage}] --resume: no checkpoint at {ckpt_path}, starting from step 0")
    if start == 0 and rt.main:
        log_path.write_text("")
    for m in models.values():       # a frozen model (the glyph encoder) stays in eval mode: no dropout
        m.train(any(p.requires_grad for p in m.parameters()))
    # the moving average of the trainable weights (from the checkpoint's when resuming, else from the weights now)
    ema = [p.detach().clone() for p in trainable] if cfg.ema else []
    if ema and saved_ema:
        ema = [placed_like(saved_ema[mn][pn], p) for p, (mn, pn) in zip(trainable, trainable_names)]
    holder = nn.ModuleDict(models)          # names the optimizer state "<model>.<param>" in sharded checkpoints

    def tensors() -> dict:
        """Weights, optimizer state and moving average as this process holds them (its shards when sharded)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        state = {"models": {n: m.state_dict() for n, m in models.items()},
                 "optimizer": get_optimizer_state_dict(holder, opt)}
        if ema:
            state["ema"] = {}
            for e, (mn, pn) in zip(ema, trainable_names):
                state["ema"].setdefault(mn, {})[pn] = e
        return state

    if sharded_ck is not None:              # in place, each process reading the parts it holds (any process count)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        state = tensors()
        saved_has_ema = any(k.startswith("ema.") for k in dcp_keys(found_path))
        if not saved_has_ema:               # --ema newly given: the average starts from the loaded weights
            state.pop("ema", None)
        with single_process_read():
            dcp.load(state, checkpoint_id=str(found_path), no_dist=rt.world == 1)
        set_optimizer_state_dict(holder, opt, state["optimizer"])
        if ema and not saved_has_ema:
            ema = [p.detach().clone() for p in trainable]

    def save_sharded(step: int) -> None:
        """--shard: every process writes its own shards (torch.distributed.checkpoint) into ckpt.dcp.tmp/, which
        then replaces ckpt.dcp/; no process ever holds more than its part."""
        import torch.distributed.checkpoint as dcp
        state = {"stage": stage, "step": step, **tensors(),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                 "data_position": step * cfg.batch, "seed": seed, "extra": extra() if extra else {}}
        if identity:
            state["identity"] = identity
        tmp, old = out_dir / "ckpt.dcp.tmp", out_dir / "ckpt.dcp.old"
        if rt.main and tmp.exists():
            shutil.rmtree(tmp)
        rt.barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        rt.barrier()
        if rt.main:
            if dcp_path.exists():
                os.replace(dcp_path, old)
            os.replace(tmp, dcp_path)
            shutil.rmtree(old, ignore_errors=True)
            ckpt_path.unlink(missing_ok=True)           # a whole file from before a sharded resume is now stale
            plot_losses(read_log(log_path), out_dir / "loss.png", f"{stage}: training loss", plot_keys)
        rt.barrier()

    def save(step: int) -> None:
        """Every process calls it; sharded: each writes its parts, else process 0 writes one whole file."""
        if rt.shard:
            return save_sharded(step)
        if not rt.main:
            return
        models_sd = {n: m.state_dict() for n, m in models.items()}
        opt_sd = opt.state_dict()
        ema_sd = {}
        for e, (mn, pn) in zip(ema, trainable_names):
            ema_sd.setdefault(mn, {})[pn] = e
        state = {"stage": stage, "step": step, "models": models_sd,
                 "optimizer": opt_sd, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                 "data_position": step * cfg.batch, "seed": seed, "extra": extra() if extra else {}}
        if ema:
            state["ema"] = ema_sd
        if identity:
            state["identity"] = identity
        atomic_save(state, ckpt_path)
        for stale in (dcp_path, out_dir / "ckpt.dcp.old"):  # a sharded run resumed unsharded: the file replaces it
            shutil.rmtree(stale, ignore_errors=True)
        plot_losses(read_log(log_path), out_dir / "loss.png", f"{stage}: training loss", plot_keys)

    # on an accelerator the log also records the peak memory allocated so far (torch.cuda / torch.npu / torch.xpu)
    peak_memory = getattr(getattr(torch, rt.device.type, None), "max_memory_allocated", None)
    peak_memory = peak_memory if rt.device.type != "cpu" else None
    end = steps if stop_at is None else min(steps, stop_at)

    def swap_ema() -> None:
        for p, e in zip(trainable, ema):
            held = p.detach().clone()
            p.copy_(e), e.copy_(held)

    @contextmanager
    def averaged():
        """The moving average in the trainable weights for a while (swapped in place, then back)."""
        with torch.no_grad():
            swap_ema()
            try:
                yield
            finally:
                swap_ema()

    def validate() -> float:
        """The held-out loss: sum(loss * weight) / sum(weight) over every batch, micro-batch and process."""
        num = den = torch.zeros((), device=rt.device)
        with averaged(), rt.autocast_context():
            for b in range(val.batches):
                for rt.micro in range(rt.accum):
                    loss, weight, _ = val.fn(b)
                    w = torch.as_tensor(weight, dtype=torch.float32).to(rt.device)
                    num, den = num + loss.float() * w, den + w
        rt.micro = 0
        return float(rt.sum(num) / rt.sum(den))

    bar = tqdm(range(start, end), initial=start, total=steps, desc=stage, disable=not (progress and rt.main),
               mininterval=2)
    t0 = time.time()
    with open(log_path, "a") if rt.main else open(os.devnull, "w") as log:
        for step in bar:
            lr = lr_at(step, cfg, steps)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            if rt.world == 1 and rt.accum == 1:             # the plain step
                gen = step_generator(seed, step)
                with rt.autocast_context():
                    loss, _, metrics = step_fn(step, gen)
                loss.backward()
            else:   # row blocks (micro-batches, processes): gradients of sum(loss * weight), summed, / sum(weight)
                num, den, sums = 0.0, 0.0, {}
                for rt.micro in range(rt.accum):
                    gen = step_generator(seed, step)        # each block draws the whole batch's numbers again
                    with rt.autocast_context():
                        loss, weight, metrics = step_fn(step, gen)
                    w = torch.as_tensor(weight, dtype=torch.float32).to(rt.device)
                    (loss * w).backward()
                    num, den = num + loss.detach() * w, den + w
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32).to(rt.device) / rt.accum
                rt.micro = 0
                total = rt.sum(den)
                if not rt.shard:            # FSDP already reduce-scattered them, as their mean over processes
                    rt.reduce_grads(trainable)
                denom = float(total) / rt.world if rt.shard else total
                for p in trainable:
                    if p.grad is not None:
                        p.grad.div_(denom)
                loss = rt.sum(num) / total
                metrics = {k: rt.sum(v) / rt.world for k, v in sums.items()}   # means over equal row blocks
            # the gradients' global norm, logged; clipped to cfg.grad_clip (0: not clipped, the norm still logged)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or float("inf"))
            opt.step()
            if ema:                                         # the decay ramps up: (1 + step) / (10 + step) early on
                w = 1 - min(cfg.ema, (1 + step) / (10 + step))
                for p, e in zip(trainable, ema):
                    e.lerp_(p.detach(), w)
            if after_step is not None:
                after_step(step, gen)
            if hasattr(grad_norm, "full_tensor"):           # sharded: a DTensor
                grad_norm = grad_norm.full_tensor()
            rec = {"step": step, "loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()},
                   "lr": lr, "grad_norm": float(grad_norm), "time": round(time.time() - t0, 2)}
            if peak_memory is not None:
                rec["peak_mem_gib"] = round(peak_memory(rt.device) / 2**30, 3)
            if val is not None and ((step + 1) % val.every == 0 or step + 1 == end):
                rec["val_loss"] = validate()
            if sample is not None and ((step + 1) % sample.every == 0 or step + 1 == end):
                with averaged(), rt.autocast_context():
                    sample.fn(step + 1)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == end:
                save(step + 1)
    if start >= steps and checkpoint_path(out_dir.parent, stage) is None:
        save(start)
    rt.barrier()
    return read_log(log_path)
