"""Training: every stage runs on the debug preset, resume reproduces the uninterrupted loss sequence exactly,
and the exported folder loads in the pipeline and generates (t2i and edit)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmimage.train import ar, decoder, glyph, tokenizer, vae
from glmimage.train.common import load_stage, read_log
from glmimage.train.presets import get_preset

STAGES = {"vae": vae.train, "vae_decoder": vae.train_decoder, "tokenizer": tokenizer.train, "ar": ar.train,
          "decoder": decoder.train}
STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each stage twice: uninterrupted (full/), and stopped at step 2 then resumed (parts/)."""
    full, parts = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("parts")
    preset = get_preset("debug")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logs = {}
    try:
        for name, stage in STAGES.items():
            a = stage(preset, full, steps=STEPS, progress=False)
            stage(preset, parts, steps=STEPS, progress=False, stop_at=2)
            assert len(read_log(parts / name / "log.jsonl")) == 2
            b = stage(preset, parts, steps=STEPS, resume=True, progress=False)
            logs[name] = (a, b)
    finally:
        torch.set_num_threads(threads)
    return full, logs


@pytest.mark.parametrize("stage", list(STAGES))
def test_resume_gives_the_same_losses(runs, stage):
    _, logs = runs
    a, b = logs[stage]
    assert [r["step"] for r in a] == list(range(STEPS))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_resume_with_more_steps_recomputes_the_schedule(runs, tmp_path):
    """A finished run trained on with --resume and a larger --steps: the logged steps so far are kept as they were,
    the new ones follow the cosine for the new total from where it resumes (the rate rises, then decays again)."""
    from glmimage.train.common import lr_at
    full, _ = runs
    shutil.copytree(full / "vae", tmp_path / "vae")
    preset = get_preset("debug")
    before = read_log(tmp_path / "vae" / "log.jsonl")
    after = vae.train(preset, tmp_path, steps=STEPS + 2, resume=True, progress=False)
    cfg = preset.stages["vae"]
    assert [r["step"] for r in after] == list(range(STEPS + 2)) and after[:STEPS] == before
    assert [r["lr"] for r in after[STEPS:]] == pytest.approx([lr_at(s, cfg, STEPS + 2) for s in (STEPS, STEPS + 1)])
    assert after[STEPS]["lr"] > before[-1]["lr"] and load_stage(tmp_path, "vae")["step"] == STEPS + 2


@pytest.mark.parametrize("stage", list(STAGES))
def test_checkpoint_and_outputs(runs, stage):
    full, _ = runs
    ck = load_stage(full, stage)
    assert ck["step"] == STEPS and ck["data_position"] > 0
    assert {"models", "optimizer", "rng"} <= set(ck)
    assert (full / stage / "loss.png").exists()


def test_decoder_object_weight(runs):
    """The decoder's object-weighted loss: all-equal weights give the plain MSE (at any scale); weighing one code
    more changes it."""
    full, _ = runs
    preset = get_preset("debug")
    cache = torch.load(full / "decoder" / "cache.pt", weights_only=False)
    dit, glyph = decoder.build_dit(preset, 0), decoder.build_glyph(preset, 0)
    idx = [0, 1, 2, 3]
    n_codes = len(ar.code_is_object(preset, full))

    def loss(w):
        return decoder.velocity_loss(dit, glyph, cache, idx, torch.Generator().manual_seed(0), 64, w)[0].item()

    plain = loss(None)
    assert loss(torch.ones(n_codes)) == pytest.approx(plain, rel=1e-5)
    assert loss(torch.full((n_codes,), 3.0)) == pytest.approx(plain, rel=1e-5)
    heavy = torch.ones(n_codes)
    heavy[cache["ids"][0, 0]] = 10.0
    assert loss(heavy) != pytest.approx(plain, rel=1e-3)


def test_decoder_timesteps(runs, tmp_path, capsys):
    """--timesteps logit-normal: schedule positions drawn as sigmoid(N(0, 1)), most of them mid-schedule; uniform
    (the default) keeps its exact draws; the choice is the checkpoint's identity, so a resume with another is
    refused; other stages and unknown kinds are refused."""
    from glmimage.train.__main__ import main
    g = lambda: torch.Generator().manual_seed(0)
    u = decoder.draw_positions("uniform", 20000, g())
    assert torch.equal(u, torch.rand(20000, generator=g()) * 0.999 + 0.001)
    ln = decoder.draw_positions("logit-normal", 20000, g())
    assert torch.equal(ln, torch.sigmoid(torch.randn(20000, generator=g())).clamp(0.001, 1.0))
    assert 0.001 <= float(ln.min()) and float(ln.max()) <= 1.0
    mid = lambda s: ((s > 0.25) & (s <= 0.75)).float().mean().item()
    assert mid(u) == pytest.approx(0.5, abs=0.02) and mid(ln) == pytest.approx(0.728, abs=0.02)   # P(|z| < ln 3)
    with pytest.raises(ValueError, match="uniform, logit-normal"):
        decoder.draw_positions("cosine", 4, g())
    full, _ = runs
    for stage in ("vae", "vae_decoder", "tokenizer"):
        shutil.copytree(full / stage, tmp_path / stage)
    main(["train", "decoder", "--preset", "debug", "--out", str(tmp_path), "--steps", "2", "--timesteps",
          "logit-normal"])
    assert load_stage(tmp_path, "decoder")["identity"] == {"timesteps": "logit-normal"}
    with pytest.raises(ValueError, match="timesteps"):
        decoder.train(get_preset("debug"), tmp_path, steps=3, resume=True, progress=False)
    with pytest.raises(ValueError, match="timesteps"):                  # uniform is the default: no entry
        decoder.train(get_preset("debug"), tmp_path, steps=3, resume=True, progress=False, timesteps="uniform")
    with pytest.raises(SystemExit):
        main(["train", "ar", "--preset", "debug", "--out", str(tmp_path), "--steps", "1", "--timesteps", "uniform"])
    assert "--timesteps applies to the decoder stage" in capsys.readouterr().err


def test_glyph_stage_resumes_and_the_decoder_uses_it(runs, tmp_path):
    """`train glyph` resumes exactly and its heads read each token's byte and index; a decoder trained in the same
    folder uses that encoder (its checkpoint's glyph weights are the stage's, identity "glyph": "trained", so a
    decoder run started without it cannot resume with it); the CLI runs it."""
    from glmimage.train.__main__ import main
    preset = get_preset("debug")
    a = glyph.train(preset, tmp_path / "full", steps=STEPS, progress=False)
    glyph.train(preset, tmp_path / "parts", steps=STEPS, progress=False, stop_at=2)
    b = glyph.train(preset, tmp_path / "parts", steps=STEPS, resume=True, progress=False)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert {"byte", "prev", "next", "index", "length", "byte_acc", "index_acc"} <= set(a[-1])
    ids, mask, targets = glyph.batch_targets(["AB", ""])
    assert ids.tolist() == [[ord("A") + 3, ord("B") + 3, 1], [1, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert targets["index"].tolist() == [[0, 1, 2], [0, -100, -100]]
    assert targets["length"].tolist() == [[3, 3, 3], [1, -100, -100]]
    assert targets["prev"].tolist()[0] == [0, ord("A") + 3, ord("B") + 3] and targets["next"].tolist()[0][2] == 0
    full, _ = runs
    run = tmp_path / "run"
    for stage in ("vae", "vae_decoder", "tokenizer"):
        shutil.copytree(full / stage, run / stage)
    decoder.train(preset, run, steps=2, progress=False)                 # started with the random encoder
    shutil.copytree(tmp_path / "full" / "glyph", run / "glyph")
    with pytest.raises(ValueError, match="glyph"):
        decoder.train(preset, run, steps=3, resume=True, progress=False)
    shutil.rmtree(run / "decoder")
    decoder.train(preset, run, steps=2, progress=False)
    ck = load_stage(run, "decoder")
    assert ck["identity"] == {"glyph": "trained"}
    trained = glyph.load_glyph(preset, tmp_path / "full").state_dict()
    assert trained.keys() == ck["models"]["glyph"].keys()
    assert all(torch.equal(ck["models"]["glyph"][k], v) for k, v in trained.items())
    assert glyph.load_glyph(preset, tmp_path / "nothing") is None
    main(["train", "glyph", "--preset", "debug", "--out", str(tmp_path / "cli"), "--steps", "2"])
    assert load_stage(tmp_path / "cli", "glyph")["step"] == 2
    # real data: the captions' quoted texts (and ""); captions without any quote are refused
    import random

    from glmimage.glyph import glyph_texts
    from glmimage.data.scenes import WORD_KINDS, sample_word
    (tmp_path / "real").mkdir()
    folder, shard = _write_real_data(tmp_path / "real")
    quoted = {t for f in folder.glob("*.txt") for t in glyph_texts(f.read_text()) if t}
    for data in (folder, shard):
        drawn = {glyph.text_source(str(data), 0)(random.Random(i)) for i in range(100)}
        assert quoted and drawn == quoted | {""}
    mixed = {glyph.text_source(f"synthetic+{folder}", 0)(random.Random(i)) for i in range(200)}
    assert quoted < mixed and len(mixed - quoted - {""}) > 20                 # scene words too
    scenes = glyph.text_source("synthetic", 0)                               # one draw per text, as trained so far
    for i in range(50):
        a, b = random.Random(i), random.Random(i)
        assert scenes(a) == ("" if b.random() < glyph.EMPTY_P else sample_word(b, b.choice(WORD_KINDS)))
    for f in folder.glob("*.txt"):
        f.write_text("a photo of a cat")
    with pytest.raises(ValueError, match="no quoted text"):
        glyph.text_source(str(folder), 0)


def test_decoder_loss_splits_into_row_blocks(runs):
    """What data parallelism relies on: the loss over row blocks, each weighted by its returned weight, is the whole
    batch's loss (the same noise, timesteps and dropout per row whatever the split), plain and object-weighted."""
    full, _ = runs
    preset = get_preset("debug")
    cache = torch.load(full / "decoder" / "cache.pt", weights_only=False)
    dit, glyph = decoder.build_dit(preset, 0), decoder.build_glyph(preset, 0)
    torch.nn.init.normal_(dit.proj_out.weight, std=0.1)                     # a non-zero output
    heavy = torch.ones(len(ar.code_is_object(preset, full)))
    heavy[cache["ids"][0, 0]] = 5.0
    for w in (None, heavy):
        def loss(rows):
            gen = torch.Generator().manual_seed(3)
            return decoder.velocity_loss(dit, glyph, cache, [0, 1, 2, 3], gen, 64, w, rows)

        whole, _, _ = loss(slice(None))
        (a, wa, _), (b, wb, _) = loss(slice(0, 2)), loss(slice(2, 4))
        assert float((a * wa + b * wb) / (wa + wb)) == pytest.approx(float(whole), rel=1e-5)
        assert float(a) != pytest.approx(float(b), rel=1e-3)


def test_export_loads_and_generates(runs, tmp_path):
    from glmimage.pipeline import Pipeline
    from glmimage.train.export import export

    full, _ = runs
    out = export(full, tmp_path / "model", preset="debug")
    index = json.loads((out / "model_index.json").read_text())
    assert index["glmimage"] == {"ar_token_px": 16, "preview_side": 2, "native_size": 64}
    vae_cfg = json.loads((out / "vae" / "config.json").read_text())
    assert len(vae_cfg["latents_mean"]) == 16 and len(vae_cfg["latents_std"]) == 16
    pipe = Pipeline.from_pretrained(out)
    assert (pipe.prompt_tokenizer.token_px, pipe.prompt_tokenizer.preview_side) == (16, 2)   # from model_index.json
    image = pipe("a large red circle in the center, with the word 'SUN' written at the top, on a white background.",
                 height=64, width=64, num_inference_steps=2, seed=0)[0]
    assert image.size == (64, 64)
    edited = pipe("make the red circle blue", height=64, width=64, image=image, num_inference_steps=2, seed=0)[0]
    assert edited.size == (64, 64)

    from glmimage.train.diagnose import S_LEVELS
    from glmimage.train.diagnose import main as diagnose
    diagnose(["--model", str(out), "--run", str(full), "--preset", "debug", "--n", "2", "--steps", "2", "--words", "1",
              "--out", str(tmp_path / "diag.json")])
    report = json.loads((tmp_path / "diag.json").read_text())
    assert report["cache_size"] == 8 and report["oracle"]["train"]["n_t2i"] == 2
    for words in report["words"].values():            # one example with a word per set, read back by OCR
        assert words["n"] == 1 and 0 <= words["ned"] <= 1 and words["exact"] in (0, 1)
        assert sum(k["n"] for k in words["by_kind"].values()) == 1
    for errors in report["x0_error"].values():        # near the data the estimate is nearly exact, whatever the DiT
        assert len(errors) == len(S_LEVELS) and 0 <= errors[0] < errors[-1]
    with pytest.raises(ValueError, match="lower --n"):
        diagnose(["--model", str(out), "--run", str(full), "--preset", "debug", "--n", "8", "--steps", "1"])
    with pytest.raises(ValueError, match="--words >= 0"):
        diagnose(["--model", str(out), "--run", str(full), "--preset", "debug", "--words", "-1"])
    # a fine-tune's run folder has no vae or tokenizer stage: the fresh cache is built with its model's own
    from glmimage.train.__main__ import main
    main(["train", "decoder", "--preset", "debug", "--data", "synthetic", "--init", str(out), "--steps", "2",
          "--out", str(tmp_path / "ft")])
    main(["export", "--out", str(tmp_path / "ft"), "--to", str(tmp_path / "ft-model")])
    diagnose(["--model", str(tmp_path / "ft-model"), "--run", str(tmp_path / "ft"), "--preset", "debug", "--n", "1",
              "--steps", "1", "--out", str(tmp_path / "diag-ft.json")])
    assert json.loads((tmp_path / "diag-ft.json").read_text())["oracle"]["fresh"]["n_t2i"] == 1


def test_unknown_preset():
    with pytest.raises(ValueError, match="valid"):
        get_preset("huge")


# ----------------------------------------------------------------------------------------------------------
# One code path at every scale: data-parallel processes (torchrun, gloo on the CPU) and bf16 autocast.

DRIVER = Path(__file__).with_name("train_all_stages.py")


def _train_all(out: Path, procs: int, *extra: str, timeout: int = 300) -> None:
    launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc-per-node={procs}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, str(DRIVER), str(out), *extra], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory):
    """Every stage in one process, in one process with 2 micro-batches per step, in 2 processes, and in 2 processes
    stopped at step 2 then resumed."""
    root = tmp_path_factory.mktemp("parallel")
    _train_all(root / "one", 1)
    _train_all(root / "accum", 1, "--accum", "2")
    _train_all(root / "two", 2)
    _train_all(root / "two_parts", 2, "--in-two-parts")
    return root


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_train_like_one(parallel_runs, stage):
    """The global batch split over 2 processes or 2 micro-batches gives the losses of one process computing it all
    (float rounding apart: summation order), and a 2-process run stopped and resumed repeats its uninterrupted
    losses exactly."""
    one, accum, two, parts = ([r["loss"] for r in read_log(parallel_runs / run / stage / "log.jsonl")]
                              for run in ("one", "accum", "two", "two_parts"))
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=2e-4)
    assert accum == pytest.approx(one, rel=2e-4)
    assert parts == two
    assert load_stage(parallel_runs / "two", stage)["step"] == 4
    assert not list((parallel_runs / "two" / stage).glob("*.tmp"))
    if stage in ("ar", "decoder"):          # the held-out loss too, over processes and micro-batches
        one, accum, two, parts = ({r["step"]: r["val_loss"] for r in read_log(parallel_runs / run / stage / "log.jsonl")
                                   if "val_loss" in r} for run in ("one", "accum", "two", "two_parts"))
        assert set(one) == set(two) == set(accum) == {1, 3} and set(parts) == {1, 3}
        for k in one:
            assert two[k] == pytest.approx(one[k], rel=2e-4) and accum[k] == pytest.approx(one[k], rel=2e-4)
            assert parts[k] == two[k]


@pytest.fixture(scope="module")
def sharded_runs(parallel_runs):
    """The ar and decoder stages in 2 processes with their weights sharded (FSDP2), whole, stopped at step 2 then
    resumed, and in 2 micro-batches per process with activation checkpointing (--recompute), over the 2-process
    run's VAE and tokenizer."""
    import shutil
    for run in ("shard", "shard_parts", "shard_accum"):
        for stage in ("vae", "vae_decoder", "tokenizer"):
            shutil.copytree(parallel_runs / "two" / stage, parallel_runs / run / stage)
    _train_all(parallel_runs / "shard", 2, "--shard")
    _train_all(parallel_runs / "shard_parts", 2, "--shard", "--in-two-parts")
    _train_all(parallel_runs / "shard_accum", 2, "--shard", "--accum", "2", "--recompute")
    return parallel_runs


@pytest.mark.parametrize("stage", ["ar", "decoder"])
def test_sharded_weights_train_like_whole_ones(sharded_runs, stage):
    """--shard (each process holds half of every trainable weight, gradient and moment) gives the losses of the
    unsharded 2-process run, also with --accum 2 and --recompute, and resumes exactly; its checkpoint is written in
    parts, one per process, and reads back whole in one process, equal to the unsharded run's."""
    two, shard, parts, accum = ([r["loss"] for r in read_log(sharded_runs / run / stage / "log.jsonl")]
                                for run in ("two", "shard", "shard_parts", "shard_accum"))
    assert len(shard) == 4 and shard == pytest.approx(two, rel=2e-4)
    vals = [[r["val_loss"] for r in read_log(sharded_runs / run / stage / "log.jsonl") if "val_loss" in r]
            for run in ("two", "shard")]
    assert len(vals[0]) == 2 and vals[1] == pytest.approx(vals[0], rel=2e-4)       # sharded weights, same loss
    if stage == "decoder":                  # drawn by the sharded DiT (every process runs it, process 0 writes)
        assert [p.name for p in (sharded_runs / "shard" / stage / "samples").iterdir()] == ["step_000004.png"]
    assert parts == shard
    assert accum == pytest.approx(two, rel=2e-4)
    from glmimage.train.common import STAGE_KEYS
    ck = sharded_runs / "shard" / stage / "ckpt.dcp"          # written in parts, one file per process
    assert (ck / ".metadata").exists() and len(list(ck.glob("*.distcp"))) == 2
    assert not (sharded_runs / "shard" / stage / "ckpt.pt").exists()
    want = load_stage(sharded_runs / "two", stage)
    got = load_stage(sharded_runs / "shard", stage, STAGE_KEYS | {"optimizer"})     # read whole, in one process
    assert got["step"] == 4
    for name, sd in want["models"].items():
        assert set(got["models"][name]) == set(sd)
        for k, v in sd.items():
            assert type(got["models"][name][k]) is torch.Tensor and got["models"][name][k].shape == v.shape, k
            assert torch.allclose(got["models"][name][k], v, rtol=1e-3, atol=1e-5), k
    moments = [st["exp_avg"] for st in got["optimizer"]["state"].values()]
    assert moments and all(type(m) is torch.Tensor for m in moments)


def test_lora_with_sharded_frozen_weights(debug_ckpt, tmp_path):
    """--lora --shard: the frozen model and the adapters sharded over 2 processes (FSDP2 units mixing frozen and
    trainable weights) give the unsharded 2-process run's losses, resume from the sharded checkpoint, and export to
    the same merged weights."""
    from safetensors.torch import load_file
    from glmimage.train.__main__ import main

    def run(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "glmimage.train", "decoder", "--init", str(debug_ckpt), "--size", "64", "--lora", "4", "--out",
               str(tmp_path / out), "--steps", "4", "--device", "cpu", *extra]
        done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    run("whole")
    run("shard", "--shard", "--stop-after", "2")
    run("shard", "--shard", "--resume")
    whole, shard = ([r["loss"] for r in read_log(tmp_path / out / "decoder" / "log.jsonl")] for out in ("whole", "shard"))
    assert len(shard) == 4 and shard == pytest.approx(whole, rel=2e-4)
    assert (tmp_path / "shard" / "decoder" / "ckpt.dcp").exists()
    weights = []
    for out in ("whole", "shard"):
        main(["export", "--out", str(tmp_path / out), "--to", str(tmp_path / f"{out}-model")])
        weights.append({k: v for f in sorted((tmp_path / f"{out}-model" / "transformer").glob("*.safetensors"))
                        for k, v in load_file(f).items()})
    assert set(weights[0]) == set(weights[1])
    assert all(torch.allclose(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-6) for k in weights[0])


@pytest.mark.slow
def test_sharded_compiled_blocks_train_like_whole_ones(sharded_runs):
    """--shard --compile (FSDP2 units around compiled blocks): the unsharded 2-process run's losses. Slow (each
    process compiles the blocks of both stages: minutes on 2 cores), so out of CI."""
    for stage in ("vae", "vae_decoder", "tokenizer"):
        shutil.copytree(sharded_runs / "two" / stage, sharded_runs / "shard_compile" / stage)
    _train_all(sharded_runs / "shard_compile", 2, "--shard", "--compile", timeout=900)
    for stage in ("ar", "decoder"):
        two, got = ([r["loss"] for r in read_log(sharded_runs / run / stage / "log.jsonl")]
                    for run in ("two", "shard_compile"))
        assert len(got) == 4 and got == pytest.approx(two, rel=2e-4), stage


@pytest.mark.parametrize("stage", ["ar", "decoder"])
def test_sharded_checkpoint_resumes_in_one_process(sharded_runs, stage, tmp_path):
    """A sharded checkpoint (2 processes) resumed without sharding in one process: its weights and optimizer state
    are the unsharded run's (two more steps give the losses that resuming the 2-process run's whole file gives), and
    the whole file it then writes replaces the sharded one."""
    train = {"ar": ar.train, "decoder": decoder.train}[stage]
    kwargs = {"object_weight": 3.0} if stage == "decoder" else {}
    logs = {}
    for run in ("two", "shard"):
        shutil.copytree(sharded_runs / run, tmp_path / run)
        logs[run] = [r["loss"] for r in train(get_preset("debug"), tmp_path / run, steps=STEPS + 2, resume=True,
                                              progress=False, **kwargs)]
    assert len(logs["shard"]) == STEPS + 2
    # rel 2e-5: float rounding between the runs is ~1e-6; fresh optimizer moments instead of the loaded ones move
    # the last loss by ~5e-4 (measured)
    assert logs["shard"][STEPS:] == pytest.approx(logs["two"][STEPS:], rel=2e-5)
    run = tmp_path / "shard" / stage
    assert (run / "ckpt.pt").exists() and not (run / "ckpt.dcp").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_stage_trains_on_cuda_like_on_the_cpu(parallel_runs, tmp_path):
    """The same step functions on a GPU: fp32 within TF32 rounding of the CPU's losses; bf16 autocast runs."""
    _train_all(tmp_path / "cuda", 1, "--device", "cuda")
    _train_all(tmp_path / "cuda-bf16", 1, "--device", "cuda", "--precision", "bf16")
    for stage in STAGES:
        cpu, gpu, bf16 = ([r["loss"] for r in read_log(root / stage / "log.jsonl")]
                          for root in (parallel_runs / "one", tmp_path / "cuda", tmp_path / "cuda-bf16"))
        assert gpu == pytest.approx(cpu, rel=2e-2), stage
        assert bf16 == pytest.approx(cpu, rel=1e-1), stage


def test_runtime_rejects_uneven_split_and_unknown_precision():
    from glmimage.train.common import Runtime, setup_runtime
    with pytest.raises(ValueError, match="split evenly over 3 processes x 1"):
        Runtime(world=3, rank=1).rows(16)
    assert Runtime(world=4, rank=1).rows(16) == slice(4, 8)
    assert Runtime(world=2, rank=1, accum=2, micro=1).rows(16) == slice(12, 16)
    with pytest.raises(ValueError, match="positive"):
        setup_runtime("cpu", "fp32", accum=0)
    with pytest.raises(ValueError, match="fp32, bf16"):
        setup_runtime("cpu", "fp8")
    with pytest.raises(ValueError, match="torchrun"):
        setup_runtime("cpu", "fp32", shard=True)            # one process: nothing to shard over


def test_decoder_trains_in_bf16_autocast(runs, tmp_path):
    """--precision bf16: the same step in autocast gives nearly the fp32 loss; the weights stay fp32."""
    from glmimage.train.common import Runtime
    full, _ = runs
    preset = get_preset("debug")
    for name in ("a", "b"):
        for stage in ("vae", "tokenizer"):
            shutil.copytree(full / stage, tmp_path / name / stage)
    a = decoder.train(preset, tmp_path / "a", steps=2, progress=False)
    b = decoder.train(preset, tmp_path / "b", steps=2, progress=False, rt=Runtime(autocast=torch.bfloat16))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=3e-2)
    assert [r["loss"] for r in b] != [r["loss"] for r in a]
    assert all(v.dtype == torch.float32 for v in load_stage(tmp_path / "b", "decoder")["models"]["dit"].values())


# ----------------------------------------------------------------------------------------------------------
# Real data: every stage trains on WebDataset tar shards or a folder of captioned images.

def _write_real_data(root: Path, n: int = 8) -> tuple[Path, Path]:
    """n captioned images (rendered scenes standing in for photos, 96x80: resized and cropped to the preset's 64)
    as a folder of a.png + a.txt and as one tar shard holding the same files."""
    import tarfile

    from glmimage.data.scenes import SceneStream
    folder = root / "folder"
    folder.mkdir()
    stream = SceneStream(7, size=96, kinds=("t2i",))
    for i in range(n):
        ex = stream.example(i)
        ex["image"].crop((0, 8, 96, 88)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(ex["caption"])
    shard = root / "train-000.tar"
    with tarfile.open(shard, "w") as tar:
        for f in sorted(folder.iterdir()):
            tar.add(f, arcname=f.name)
    return folder, shard


def test_every_stage_trains_on_real_data(tmp_path):
    from glmimage.train.data import FolderSource, ShardSource, make_source
    folder, shard = _write_real_data(tmp_path)
    src = make_source(str(shard), 0, 64)
    assert isinstance(src, ShardSource) and isinstance(make_source(str(folder), 0, 64), FolderSource)
    a, b = src.example(3), make_source(str(folder), 0, 64).example(3)
    assert a["image"].size == (64, 64) and a["caption"] == b["caption"] and a["caption"].endswith("background.")
    assert a["image"].tobytes() == b["image"].tobytes()
    assert src.example(11)["caption"] == src.example(3)["caption"]           # index i mod the sample count
    preset = get_preset("debug")
    out = tmp_path / "run"
    for name, train in STAGES.items():
        log = train(preset, out, data=str(shard), steps=2, progress=False)
        assert len(log) == 2 and all(r["loss"] == r["loss"] for r in log), name   # finite, logged
    with pytest.raises(ValueError, match="needs --data synthetic"):
        ar.train(preset, out, data=str(shard), steps=2, progress=False, object_weight=4.0)
    with pytest.raises(ValueError, match="no image \\+ caption samples"):
        empty = tmp_path / "empty.tar"
        import tarfile
        tarfile.open(empty, "w").close()
        make_source(str(empty), 0, 64)


def test_mixed_sources(runs, tmp_path):
    """--data A+B interleaves sources (example i is source i mod K's example i // K): synthetic scenes with their
    edits beside real images; the decoder and the AR train on such a mix."""
    from glmimage.train.data import Prefetch, make_source
    full, _ = runs
    folder, _ = _write_real_data(tmp_path)
    mix = make_source(f"synthetic+{folder}", 0, 64, kinds=("t2i", "edit"))
    parts = make_source("synthetic", 0, 64, kinds=("t2i", "edit")), make_source(str(folder), 0, 64)
    for i in range(8):
        got, want = mix.example(i), parts[i % 2].example(i // 2)
        assert got["index"] == i and got["kind"] == want["kind"]
        key = "image" if want["kind"] == "t2i" else "target"
        assert got[key].tobytes() == want[key].tobytes()
    assert {mix.example(i)["kind"] for i in range(0, 40, 2)} == {"t2i", "edit"}
    assert len(make_source(f"{folder}+{folder}", 0, 64)) == 16
    assert Prefetch(mix).pool is None and Prefetch(make_source(f"{folder}+{folder}", 0, 64)).pool is not None
    preset = get_preset("debug")
    for d in ("vae", "vae_decoder", "tokenizer"):
        shutil.copytree(full / d, tmp_path / "run" / d)
    for stage in (decoder.train, ar.train):
        log = stage(preset, tmp_path / "run", data=f"synthetic+{folder}", steps=2, progress=False)
        assert len(log) == 2 and all(r["loss"] == r["loss"] for r in log)
    cache = torch.load(tmp_path / "run" / "decoder" / "cache.pt", weights_only=False)
    assert cache["src_latents"] and cache["crop"].any()                     # scene edits, cropped photos
    with pytest.raises(ValueError, match="needs --data synthetic"):
        decoder.train(preset, tmp_path / "run2", data=f"synthetic+{folder}", steps=1, progress=False,
                      object_weight=4.0)


def test_prefetch_reads_the_same_examples(tmp_path):
    """Reading ahead in threads (tar shards: one open file per thread) returns exactly the examples read in turn."""
    from glmimage.train.data import Prefetch, make_source
    folder, shard = _write_real_data(tmp_path)
    for data in (str(folder), str(shard)):
        plain, fetch = make_source(data, 0, 64), Prefetch(make_source(data, 0, 64), workers=3)
        fetch.ahead(range(4, 20))
        got = fetch.get(range(20))
        assert fetch.pool is not None and not fetch.pending
        for i, e in enumerate(got):
            want = plain.example(i)
            assert (e["caption"], e["image"].tobytes()) == (want["caption"], want["image"].tobytes())
    assert Prefetch(make_source("synthetic", 0, 64)).pool is None      # drawn in Python: read in the step


def test_export_onto_a_base_model(runs, tmp_path):
    """export --base MODEL: a run that trained the AR (or the DiT) anew on MODEL's image tokenizer (and VAE) becomes
    a copy of MODEL with that stage replaced; a run on another tokenizer is refused."""
    from glmimage.pipeline import Pipeline
    from glmimage.train.export import _stored, export
    full, _ = runs
    preset = get_preset("debug")
    base = export(full, tmp_path / "base", preset="debug")
    for stage in ("vae", "tokenizer"):
        shutil.copytree(full / stage, tmp_path / "run" / stage)
    ar.train(preset, tmp_path / "run", steps=2, progress=False, seed=1)         # another AR on the same tokenizer
    out = export(tmp_path / "run", tmp_path / "onto", preset="debug", base=base)
    new, old = _stored(out / "vision_language_encoder"), _stored(base / "vision_language_encoder")
    ar_keys = [k for k in new if k.startswith(("model.language_model.", "lm_head."))]
    assert ar_keys and all(not torch.equal(new[k], old[k]) for k in ar_keys if k.endswith("proj.weight"))
    assert all(torch.equal(new[k], old[k]) for k in new if k not in ar_keys)     # the image tokenizer: base's
    for component in ("transformer", "vae", "text_encoder"):                     # the decoder side: base's files
        assert all(torch.equal(v, _stored(base / component)[k]) for k, v in _stored(out / component).items())
    pipe = Pipeline.from_pretrained(out)
    assert pipe("a large red circle in the center, on a white background.", height=64, width=64,
                num_inference_steps=1, seed=0)[0].size == (64, 64)
    decoder.train(preset, tmp_path / "run", steps=2, progress=False, seed=1)     # a DiT on the VAE without
    with pytest.raises(ValueError, match="VAE is not"):                        # base's decoder fine-tune: refused
        export(tmp_path / "run", tmp_path / "onto2", preset="debug", base=base)
    shutil.copytree(full / "vae_decoder", tmp_path / "run" / "vae_decoder")    # with it: base's VAE
    out = export(tmp_path / "run", tmp_path / "onto2", preset="debug", base=base)
    assert not torch.equal(_stored(out / "transformer")["proj_out.weight"], _stored(base / "transformer")["proj_out.weight"])
    tokenizer.train(preset, tmp_path / "other", steps=2, progress=False, seed=1)  # another tokenizer: refused
    shutil.copytree(tmp_path / "run" / "ar", tmp_path / "other" / "ar")
    with pytest.raises(ValueError, match="image tokenizer is not"):
        export(tmp_path / "other", tmp_path / "refused", preset="debug", base=base)
    assert not (tmp_path / "refused").exists()


def test_export_records_the_ar_guidance(runs, tmp_path):
    """export --ar-guidance S (--ar-guidance-edit S for edits) writes the model's AR guidance defaults (a fresh
    export and one onto a base model); a bad S is refused before anything is written."""
    from glmimage.pipeline import Pipeline
    from glmimage.train.__main__ import main
    from glmimage.train.export import export
    full, _ = runs
    base = export(full, tmp_path / "base", preset="debug")
    assert Pipeline.from_pretrained(base).ar_guidance == 1.0
    main(["export", "--out", str(full), "--to", str(tmp_path / "guided"), "--preset", "debug", "--ar-guidance", "2"])
    assert Pipeline.from_pretrained(tmp_path / "guided").ar_guidance == 2.0
    onto = export(full, tmp_path / "onto", preset="debug", base=tmp_path / "guided", ar_guidance=1.5,
                  ar_guidance_edit=1.0)
    index = json.loads((onto / "model_index.json").read_text())["glmimage"]
    assert (index["ar_guidance"], index["ar_guidance_edit"], index["native_size"]) == (1.5, 1.0, 64)
    assert Pipeline.from_pretrained(onto).ar_guidance_edit == 1.0
    with pytest.raises(ValueError, match="ar_guidance"):
        export(full, tmp_path / "bad", preset="debug", ar_guidance_edit=-1)
    assert not (tmp_path / "bad").exists()


def test_edit_share(runs, tmp_path, monkeypatch, capsys):
    """--edit-share F: the AR's synthetic examples are edits with probability F (SceneStream draws a kind per example
    from the tuple); the default is one in three; a resume with another share is refused."""
    from glmimage.train.__main__ import main
    assert ar.edit_kinds(None) == ("t2i", "t2i", "edit")
    assert sorted(ar.edit_kinds(0.5)) == ["edit", "t2i"] and ar.edit_kinds(0) == ("t2i",)
    assert ar.edit_kinds(0.4).count("edit") == 2 and len(ar.edit_kinds(0.4)) == 5
    for bad in (0.123, 1.5, -0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="--edit-share is a fraction"):
            ar.edit_kinds(bad)
    full, _ = runs
    shutil.copytree(full / "tokenizer", tmp_path / "tokenizer")
    seen = []
    make_source = ar.make_source
    monkeypatch.setattr(ar, "make_source", lambda *a, **k: seen.append(k["kinds"]) or make_source(*a, **k))
    main(["train", "ar", "--preset", "debug", "--out", str(tmp_path), "--steps", "2", "--edit-share", "1"])
    assert seen == [("t2i", "edit"), ("edit",)]          # the caption tokenizer's corpus, then the training stream
    assert load_stage(tmp_path, "ar")["identity"] == {"edit_share": 1.0}
    with pytest.raises(ValueError, match="edit_share"):
        ar.train(get_preset("debug"), tmp_path, steps=3, resume=True, progress=False)
    with pytest.raises(SystemExit):
        main(["train", "decoder", "--preset", "debug", "--out", str(tmp_path), "--steps", "1", "--edit-share", "1"])
    assert "--edit-share applies to the ar stage" in capsys.readouterr().err


def test_text_dropout(runs, tmp_path, monkeypatch, capsys):
    """--text-dropout P: a share P of the AR's training examples is seen with empty text (a caption, or an edit's
    instruction), chosen by example index and seed, so a stopped and resumed run drops the same ones and logs the
    same losses; held-out examples keep their text; a resume with another share and a bad share are refused."""
    from glmimage.train.__main__ import main
    picks = [ar.text_dropped(0, i, 0.25) for i in range(4000)]
    assert abs(sum(picks) / 4000 - 0.25) < 0.03 and picks == [ar.text_dropped(0, i, 0.25) for i in range(4000)]
    assert picks != [ar.text_dropped(1, i, 0.25) for i in range(4000)] and not any(
        ar.text_dropped(0, i, 0.0) for i in range(100))
    assert ar.without_text({"kind": "edit", "instruction": "make it blue", "x": 1}) == {
        "kind": "edit", "instruction": "", "x": 1}
    full, _ = runs
    texts = []
    sequence = ar.sequence
    monkeypatch.setattr(ar, "sequence", lambda cfg, pt, e, *a: texts.append(
        e["caption" if e["kind"] == "t2i" else "instruction"]) or sequence(cfg, pt, e, *a))
    B = get_preset("debug").stages["ar"].batch
    logs = []
    for part, kw in (("whole", dict(steps=4)), ("parts", dict(steps=4, stop_at=2)),
                     ("parts", dict(steps=4, resume=True))):
        shutil.copytree(full / "tokenizer", tmp_path / part / "tokenizer", dirs_exist_ok=True)
        texts.clear()
        logs.append(ar.train(get_preset("debug"), tmp_path / part, progress=False, text_dropout=0.5, val=B,
                             val_every=2, **kw))
        if part == "whole":
            first = list(texts)
    n = 4 * B                                        # training examples; the rest of `first` are held-out ones
    assert sum(t == "" for t in first) == sum(ar.text_dropped(0, i, 0.5) for i in range(n)) > 0   # held-out: kept
    whole, resumed = logs[0], logs[2]                # a resume returns the run's whole log
    assert len(whole) == 4 and [r["loss"] for r in whole] == [r["loss"] for r in resumed]
    assert load_stage(tmp_path / "whole", "ar")["identity"] == {"text_dropout": 0.5}
    with pytest.raises(ValueError, match="text_dropout"):
        ar.train(get_preset("debug"), tmp_path / "whole", steps=5, resume=True, progress=False)
    with pytest.raises(ValueError, match="--text-dropout is the share"):
        ar.train(get_preset("debug"), tmp_path / "bad", steps=1, progress=False, text_dropout=1.0)
    with pytest.raises(SystemExit):
        main(["train", "decoder", "--preset", "debug", "--out", str(tmp_path), "--steps", "1",
              "--text-dropout", "0.1"])
    assert "--text-dropout applies to the ar stage" in capsys.readouterr().err


def test_ema_resumes_exactly_and_is_what_later_stages_use(runs, tmp_path):
    """--ema: the moving average is checkpointed (a stopped and resumed run ends with the same average as an
    uninterrupted one), differs from the trained weights, and is what export and later stages load."""
    from glmimage.train.common import trained_weights
    from glmimage.train.export import load_models
    full, _ = runs
    preset = get_preset("debug")
    preset.stages["decoder"].ema = 0.9
    for name in ("a", "b"):
        for stage in ("vae", "tokenizer", "ar"):
            shutil.copytree(full / stage, tmp_path / name / stage)
    a = decoder.train(preset, tmp_path / "a", steps=STEPS, progress=False)
    decoder.train(preset, tmp_path / "b", steps=STEPS, progress=False, stop_at=2)
    b = decoder.train(preset, tmp_path / "b", steps=STEPS, progress=False, resume=True)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    ck_a, ck_b = load_stage(tmp_path / "a", "decoder"), load_stage(tmp_path / "b", "decoder")
    assert set(ck_a["ema"]) == {"dit"}
    for k, v in ck_a["ema"]["dit"].items():
        assert torch.equal(v, ck_b["ema"]["dit"][k])
    weights = trained_weights(ck_a, "dit")
    assert any(not torch.equal(weights[k], ck_a["models"]["dit"][k]) for k in weights)
    exported = load_models(preset, tmp_path / "a")["dit"].state_dict()
    assert all(torch.equal(exported[k], weights[k]) for k in weights)


def test_held_out_loss_is_logged_and_changes_no_step(runs, tmp_path):
    """--val N: the held-out loss is logged every --val-every steps and at the end of each part, resumes exactly,
    and the training losses are the uninterrupted run's without it."""
    full, logs = runs
    preset = get_preset("debug")
    for run in ("a", "b"):
        for d in ("vae", "vae_decoder", "tokenizer"):
            shutil.copytree(full / d, tmp_path / run / d)
    for name, stage in (("decoder", decoder.train), ("ar", ar.train)):
        log = stage(preset, tmp_path / "a", steps=STEPS, progress=False, val=4, val_every=2)
        assert [r["loss"] for r in log] == [r["loss"] for r in logs[name][0]], name
        vals = {r["step"]: r["val_loss"] for r in log if "val_loss" in r}
        assert set(vals) == {1, 3} and all(0 < v < 100 for v in vals.values()), (name, vals)
        stage(preset, tmp_path / "b", steps=STEPS, progress=False, val=4, val_every=2, stop_at=1)
        parts = stage(preset, tmp_path / "b", steps=STEPS, progress=False, val=4, val_every=2, resume=True)
        again = {r["step"]: r["val_loss"] for r in parts if "val_loss" in r}
        assert set(again) == {0, 1, 3} and {k: again[k] for k in (1, 3)} == vals, name   # a part's end: step 0
    assert (tmp_path / "a" / "decoder" / "val_cache.pt").exists()


def test_decoder_samples(runs, tmp_path):
    """--samples N: every --sample-every steps and at the end, the images drawn from their tokens (with the moving
    average when --ema) go to samples/step_*.png (the images above, the samples below); the weights, the moving
    average and the losses are those of the run without samples."""
    from PIL import Image
    full, _ = runs
    preset = get_preset("debug")
    preset.stages["decoder"].ema = 0.9
    logs = {}
    for run, kw in (("plain", {}), ("drawn", dict(samples=2, sample_every=3))):
        for d in ("vae", "vae_decoder", "tokenizer"):
            shutil.copytree(full / d, tmp_path / run / d)
        logs[run] = decoder.train(preset, tmp_path / run, steps=STEPS, progress=False, **kw)
    assert [r["loss"] for r in logs["plain"]] == [r["loss"] for r in logs["drawn"]]
    a, b = (load_stage(tmp_path / run, "decoder") for run in ("plain", "drawn"))
    for key in ("models", "ema"):
        for name, sd in a[key].items():
            assert all(torch.equal(v, b[key][name][k]) for k, v in sd.items()), (key, name)
    drawn = sorted(p.name for p in (tmp_path / "drawn" / "decoder" / "samples").iterdir())
    assert drawn == ["step_000003.png", "step_000004.png"]
    with Image.open(tmp_path / "drawn" / "decoder" / "samples" / drawn[0]) as im:
        assert im.size == (2 * 64, 2 * 64)
        top, bottom = (im.crop((0, y, 128, y + 64)).tobytes() for y in (0, 64))
        assert top != bottom


def test_ar_keeps_real_images_grids_after_the_first_epoch(finetunes, tmp_path, monkeypatch):
    """On real images the AR reads and tokenizes each image once: from the second epoch on it reuses the caption
    and grid, with the losses of reading and tokenizing every time."""
    _, _, folder, preset, _ = finetunes
    encoded, encode = [], ar.encode_batch
    monkeypatch.setattr(ar, "encode_batch", lambda vq, images, p: encoded.append(len(images)) or encode(vq, images, p))
    kept = ar.train(preset, tmp_path / "kept", data=str(folder), steps=6, progress=False)       # 8 images, batch 4
    assert sum(encoded) == 8
    init = ar.Tokenized.__init__
    monkeypatch.setattr(ar.Tokenized, "__init__", lambda self, fetch, enc, distinct: init(self, fetch, enc, None))
    encoded.clear()
    every = ar.train(preset, tmp_path / "every", data=str(folder), steps=6, progress=False)
    assert sum(encoded) == 24 and [r["loss"] for r in kept] == [r["loss"] for r in every]


def test_ar_samples(runs, finetunes, debug_ckpt, tmp_path):
    """--samples N on the AR: its grids for N captions, painted by the --init model's decoder, every --sample-every
    steps into samples/; the losses are the run's without it; no decoder to paint with, or one that reads other
    tokens, is refused."""
    from PIL import Image
    root, model, folder, preset, logs = finetunes
    log = ar.train(preset, tmp_path / "run", data=str(folder), steps=2, progress=False, samples=2, sample_every=1)
    assert [r["loss"] for r in log] == [r["loss"] for r in logs["full", "glmimage.train.ar"][:2]]
    drawn = sorted((tmp_path / "run" / "ar" / "samples").iterdir())
    assert [p.name for p in drawn] == ["step_000001.png", "step_000002.png"]
    with Image.open(drawn[0]) as im:
        assert im.size == (2 * 64, 64)
    with pytest.raises(ValueError, match="reads 128 codes of 32 px"):
        ar.train(preset, tmp_path / "other", data=str(folder), steps=1, progress=False, samples=1,
                 sample_model=str(debug_ckpt))
    shutil.copytree(runs[0] / "tokenizer", tmp_path / "scratch" / "tokenizer")      # trained from scratch
    with pytest.raises(ValueError, match="give --sample-model"):
        ar.train(get_preset("debug"), tmp_path / "scratch", steps=1, progress=False, samples=1)


def test_held_out_real_images(finetunes, tmp_path, capsys):
    """On real data --val takes held-out images from --val-data (at most N, each once); without it, refused."""
    from glmimage.train.__main__ import main
    _, _, folder, preset, _ = finetunes
    for stage in (decoder.train, ar.train):
        log = stage(preset, tmp_path / "run", data=str(folder), steps=2, progress=False, val=100,
                    val_data=str(folder))
        assert [r["step"] for r in log if "val_loss" in r] == [1]
        with pytest.raises(ValueError, match="needs --val-data"):
            stage(preset, tmp_path / "other", data=str(folder), steps=1, progress=False, val=4)
    assert len(torch.load(tmp_path / "run" / "decoder" / "val_cache.pt", weights_only=False)["text"]) == 8
    for bad, message in ((["--val", "0"], "--val is a number"), (["--val-every", "2"], "go with --val N"),
                         (["--val", "4", "--val-every", "0"], "--val-every must be"),
                         (["--sample-every", "2"], "goes with --samples N"),
                         (["--samples", "0"], "must be a positive number"),
                         (["--workers", "-1"], "reading threads")):
        with pytest.raises(SystemExit) as e:
            main(["train", "decoder", "--preset", "debug", "--out", str(tmp_path / "x"), "--steps", "1", *bad])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_recompute_gives_the_same_losses(runs, tmp_path):
    """Activation checkpointing recomputes each block's forward in the backward pass: the same losses, exactly."""
    full, logs = runs
    preset = get_preset("debug")
    for stage in ("vae", "tokenizer"):
        shutil.copytree(full / stage, tmp_path / stage)
    for name, train in (("ar", ar.train), ("decoder", decoder.train)):
        log = train(preset, tmp_path, steps=STEPS, progress=False, recompute=True)
        assert [r["loss"] for r in log] == [r["loss"] for r in logs[name][0]], name


def test_compiled_blocks_give_the_eager_losses_and_resume(runs, tmp_path):
    """--compile (each block torch.compile'd, dynamic shapes): the eager run's losses, and a stopped compiled run
    resumes exactly."""
    full, logs = runs
    preset = get_preset("debug")
    for name in ("a", "b"):
        for stage in ("vae", "tokenizer"):
            shutil.copytree(full / stage, tmp_path / name / stage)
    from torch._dynamo.utils import counters
    for name, train in (("ar", ar.train), ("decoder", decoder.train)):
        graphs = counters["stats"]["unique_graphs"]
        a = [r["loss"] for r in train(preset, tmp_path / "a", steps=STEPS, progress=False, compile=True)]
        assert counters["stats"]["unique_graphs"] > graphs, name         # the blocks did run compiled
        train(preset, tmp_path / "b", steps=STEPS, progress=False, stop_at=2, compile=True)
        b = [r["loss"] for r in train(preset, tmp_path / "b", steps=STEPS, progress=False, resume=True, compile=True)]
        eager = [r["loss"] for r in logs[name][0]]
        assert a == b and len(a) == STEPS, name
        assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, eager)), (name, a, eager)


def test_train_command_flags(tmp_path, capsys):
    """`glmimage train` passes --ema, --ckpt-every, --precision and --accum through, and refuses bad values."""
    from glmimage.train.__main__ import main
    main(["train", "vae", "--preset", "debug", "--out", str(tmp_path), "--steps", "2", "--ckpt-every", "1",
          "--ema", "0.5", "--precision", "bf16", "--accum", "2", "--device", "cpu"])
    ck = load_stage(tmp_path, "vae")
    assert ck["step"] == 2 and set(ck["ema"]) == {"vae"}
    # --warmup, --schedule, --grad-clip, --weight-decay reach the loop: a constant rate after 1 warmup step, the
    # gradients' norm logged (unclipped with --grad-clip 0: the same steps as a huge clip)
    logs = {}
    for run, clip in (("a", "0"), ("b", "1e9")):
        main(["train", "vae", "--preset", "debug", "--out", str(tmp_path / run), "--steps", "3", "--lr", "0.002",
              "--warmup", "1", "--schedule", "constant", "--grad-clip", clip, "--weight-decay", "0.01"])
        logs[run] = read_log(tmp_path / run / "vae" / "log.jsonl")
    assert [r["lr"] for r in logs["a"]] == [0.002] * 3
    assert all(r["grad_norm"] > 0 for r in logs["a"])
    assert [r["loss"] for r in logs["a"]] == [r["loss"] for r in logs["b"]]
    for bad, message in ((["--ema", "1.5"], "--ema is a decay"), (["--ckpt-every", "0"], "--ckpt-every must be"),
                         (["--accum", "0"], "--accum must be"), (["--precision", "fp16"], "choose one of fp32, bf16"),
                         (["--warmup", "-1"], "--warmup must be >= 0"), (["--schedule", "step"], "invalid choice"),
                         (["--grad-clip", "-1"], "--grad-clip must be >= 0")):
        with pytest.raises(SystemExit) as e:
            main(["train", "vae", "--preset", "debug", "--out", str(tmp_path), "--steps", "2", *bad])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_decoder_cache_size(tmp_path):
    """--cache N: the decoder caches N examples; resuming with another N is refused (the epoch order depends on
    it), bad values are refused before anything is built, and the CLI takes the flag for the decoder only."""
    from glmimage.train.__main__ import main
    preset = get_preset("debug")
    vae.train(preset, tmp_path, steps=1, progress=False)
    tokenizer.train(preset, tmp_path, steps=1, progress=False)
    with pytest.raises(ValueError, match="at least one batch"):
        decoder.train(preset, tmp_path, steps=1, progress=False, cache_size=1)
    assert not (tmp_path / "decoder").exists()
    decoder.train(preset, tmp_path, steps=1, progress=False, cache_size=12)
    cache = torch.load(tmp_path / "decoder" / "cache.pt", weights_only=False)
    assert len(cache["text"]) == len(cache["latents"]) == 12
    with pytest.raises(ValueError, match="holds 12 examples, not --cache 16"):
        decoder.train(preset, tmp_path, steps=2, resume=True, progress=False, cache_size=16)
    log = decoder.train(preset, tmp_path, steps=2, resume=True, progress=False, cache_size=12)
    assert [r["step"] for r in log] == [0, 1]
    with pytest.raises(SystemExit):
        main(["ar", "--preset", "debug", "--out", str(tmp_path), "--cache", "12"])


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning a trained model (--init), whole or through LoRA adapters (--lora)


def test_lora_starts_at_the_base_and_merges_exactly():
    """An adapted layer computes W x + b + B A x: the base's output while B is 0, and after merging, the same
    numbers from a plain Linear holding W + B A."""
    from glmimage.train.lora import LoRALinear, add_lora, merge_lora
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    base = net(x)
    adapters = add_lora(net, rank=2)
    assert set(adapters) == {"0", "2"} and isinstance(net[0], LoRALinear)
    assert not any(p.requires_grad for n, p in net.named_parameters() if ".base." in f".{n}")
    assert torch.equal(net(x), base)
    for a in adapters.values():
        torch.nn.init.normal_(a.b)
    adapted = net(x)
    assert not torch.allclose(adapted, base)
    merge_lora(net)
    assert type(net[0]) is torch.nn.Linear and type(net[2]) is torch.nn.Linear
    torch.testing.assert_close(net(x), adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positive integer"):
        add_lora(torch.nn.Linear(2, 2), rank=0)


@pytest.fixture(scope="module")
def finetunes(runs, tmp_path_factory):
    """The debug run exported as a model, then its decoder and AR fine-tuned on a folder of captioned images:
    whole (full/), through rank-2 LoRA (lora/), and LoRA stopped at step 2 and resumed (parts/)."""
    from glmimage.train.export import export
    from glmimage.train.presets import from_model
    full, _ = runs
    root = tmp_path_factory.mktemp("finetune")
    model = export(full, root / "model", preset="debug")
    folder, _ = _write_real_data(root)
    preset = from_model(model, get_preset("debug"))
    logs = {}
    for name, lora in (("full", None), ("lora", 2)):
        for stage in (decoder.train, ar.train):
            logs[name, stage.__module__] = stage(preset, root / name, data=str(folder), steps=STEPS, progress=False,
                                                 lora=lora)
    for stage in (decoder.train, ar.train):
        stage(preset, root / "parts", data=str(folder), steps=STEPS, progress=False, lora=2, stop_at=2)
        logs["parts", stage.__module__] = stage(preset, root / "parts", data=str(folder), steps=STEPS,
                                                progress=False, lora=2, resume=True)
    return root, model, folder, preset, logs


def test_finetune_starts_from_the_model_and_resumes_exactly(finetunes):
    from glmimage.train.presets import from_model
    root, model, folder, preset, logs = finetunes
    assert (preset.image_size, preset.ar_token_px, preset.preview_side) == (64, 16, 2)   # the model's, not guessed
    cache = torch.load(root / "full" / "decoder" / "cache.pt", weights_only=False)
    assert len(cache["text"]) == 8                       # the folder's 8 images, each cached once
    for stage in ("glmimage.train.decoder", "glmimage.train.ar"):
        whole, lora, parts = (logs[k, stage] for k in ("full", "lora", "parts"))
        assert whole[0]["loss"] == lora[0]["loss"]           # step 0: the same model (LoRA's B starts at 0)
        assert whole[-1]["loss"] != lora[-1]["loss"]
        assert [r["loss"] for r in parts] == [r["loss"] for r in lora]
    # the starting weights are the model's: the DiT the decoder stage builds is the exported one
    from glmimage.loading import load_weights
    from glmimage.dit import DiT, DiTConfig
    dit = decoder.build_dit(preset, 0)
    ref = load_weights(DiT(DiTConfig.from_hf(preset.configs["transformer"])), model / "transformer")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in dit.state_dict().items())
    # a LoRA checkpoint holds the adapters alone, and says what they adapt
    ck = load_stage(root / "lora", "decoder")
    assert set(ck["models"]) == {"lora"} and all(k.endswith((".a", ".b")) for k in ck["models"]["lora"])
    assert ck["identity"] == {"init": str(model.resolve()), "size": 64, "lora": 2}
    with pytest.raises(ValueError, match="resume with the same flags"):
        decoder.train(preset, root / "lora", data=str(folder), steps=STEPS + 1, resume=True, progress=False)
    with pytest.raises(ValueError, match="a fine-tuned model's tokenizer"):
        decoder.train(from_model(model, get_preset("debug")), root / "x", data="synthetic", steps=1,
                      progress=False, object_weight=4.0)


def _write_mixed_shapes(root: Path) -> Path:
    """12 captioned images of three shapes (wide 114x60, square 70x70, tall 60x112), in that order."""
    from glmimage.data.scenes import SceneStream
    folder = root / "shapes"
    folder.mkdir()
    stream = SceneStream(7, size=96, kinds=("t2i",))
    for i, (w, h) in enumerate([(114, 60), (70, 70), (60, 112)] * 4):
        ex = stream.example(i)
        ex["image"].resize((w, h)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(ex["caption"])
    return folder


def test_aspect_buckets(finetunes, tmp_path):
    """--buckets: each real image is fitted to the bucket nearest its shape (not cropped to the square), the
    decoder conditions on that size and the crop, each decoder batch holds one bucket, the AR's sequence is the
    one sampling at that size reads, and both stages resume exactly."""
    from glmimage.data.folder import aspect_buckets
    from glmimage.prompt import PromptTokenizer
    from glmimage.train.data import bucket_sizes, make_source
    from glmimage.train.tokenizer import encode_batch, load_tokenizer
    _, model, _, preset, _ = finetunes
    folder = _write_mixed_shapes(tmp_path)
    assert aspect_buckets(64, 16, 2) == [(48, 80), (64, 64), (80, 48)]
    for side, unit, ratio in ((128, 16, 2), (1024, 32, 2), (1024, 32, 1.5)):
        b = aspect_buckets(side, unit, ratio)
        assert (side, side) in b and {(h, w) for w, h in b} == set(b)
        assert all(w % unit == 0 and h % unit == 0 and w * h <= side * side and max(w / h, h / w) <= ratio
                   for w, h in b)
    src = make_source(str(folder), 0, 64, bucket_sizes(64, 16, 2))
    ex = [src.example(i) for i in range(3)]
    assert [e["image"].size for e in ex] == [(80, 48), (64, 64), (48, 80)]
    # (top, left) in the image scaled to cover the bucket: 114x60 * 0.8 = 91x48, 60x112 * 0.8 = 48x90
    assert [e["crop"] for e in ex] == [(0, 6), (0, 0), (5, 0)]
    assert make_source(str(folder), 0, 64).example(0)["image"].size == (64, 64)      # without: the square

    runs = {}
    for stage in (decoder.train, ar.train):
        runs["whole", stage] = stage(preset, tmp_path / "whole", data=str(folder), steps=STEPS, progress=False,
                                     buckets=2)
        stage(preset, tmp_path / "parts", data=str(folder), steps=STEPS, progress=False, buckets=2, stop_at=2)
        runs["parts", stage] = stage(preset, tmp_path / "parts", data=str(folder), steps=STEPS, progress=False,
                                     buckets=2, resume=True)
        assert [r["loss"] for r in runs["parts", stage]] == [r["loss"] for r in runs["whole", stage]]
        with pytest.raises(ValueError, match="resume with the same flags|built with --buckets, unlike this run"):
            stage(preset, tmp_path / "whole", data=str(folder), steps=STEPS + 1, progress=False, resume=True)

    cache = torch.load(tmp_path / "whole" / "decoder" / "cache.pt", weights_only=False)
    assert cache["size"][:3].tolist() == [[48, 80], [64, 64], [80, 48]]                  # (H, W)
    assert cache["crop"][:3].tolist() == [[0, 6], [0, 0], [5, 0]]
    assert [tuple(z.shape[1:]) for z in cache["latents"][:3]] == [(6, 10), (8, 8), (10, 6)]   # VAE 8x down
    for epoch in range(3):
        batches = decoder.epoch_batches(cache["size"], 12, 4, 0, epoch)
        assert len(batches) == 3 and sorted(i for b in batches for i in b) == list(range(12))
        assert all(len({tuple(cache["size"][i].tolist()) for i in b}) == 1 for b in batches)
    one_size = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 7777 + 1)).tolist()
    assert decoder.epoch_batches(None, 10, 4, 3, 1) == [one_size[:4], one_size[4:8]]   # as before buckets
    # the DiT is conditioned on each example's own size and crop
    dit, glyph, seen = decoder.build_dit(preset, 0), decoder.build_glyph(preset, 0), []
    embed = dit.embed_vec
    dit.embed_vec = lambda t, size, crop: seen.append((size, crop)) or embed(t, size, crop)
    batch = decoder.epoch_batches(cache["size"], 12, 4, 0, 0)[0]
    decoder.velocity_loss(dit, glyph, cache, batch, torch.Generator().manual_seed(0), 64)
    assert seen[0][0].tolist() == cache["size"][batch].float().tolist()
    assert seen[0][1].tolist() == cache["crop"][batch].float().tolist()
    with pytest.raises(ValueError, match="built with --buckets"):     # the cache decides the examples
        shutil.copytree(tmp_path / "whole" / "decoder", tmp_path / "other" / "decoder")
        (tmp_path / "other" / "decoder" / "ckpt.pt").unlink()
        decoder.train(preset, tmp_path / "other", data=str(folder), steps=1, progress=False)

    # the AR learns the sequence that sampling a 80x48 image reads: the t2i prompt at that size, then its grids
    pt = PromptTokenizer.from_dir(model / "processor", preset.ar_token_px, preset.preview_side)
    grid = encode_batch(load_tokenizer(preset, tmp_path), [ex[0]["image"]], preset)[0]
    assert grid.shape == (3, 5)
    seq, pos, targets, _ = ar.sequence(ar.build_ar(preset, 0, 0).cfg, pt, ex[0], {"image": grid})
    prompt = pt.t2i(ex[0]["caption"], 48, 80)
    P = prompt.input_ids.shape[1]
    (ph, pw), _ = prompt.target_grids
    assert torch.equal(seq[:P], prompt.input_ids[0]) and len(seq) == P + ph * pw + 15
    assert torch.equal(seq[P + ph * pw:], grid.flatten())


def test_finetune_with_a_trained_glyph_encoder_exports_it(finetunes, tmp_path):
    """A fine-tune whose run folder has a glyph stage trains its decoder on that encoder, and export writes the
    encoder into text_encoder/ with the tuned DiT (the DiT learned to read it)."""
    from safetensors.torch import load_file

    from glmimage.train.export import export
    root, model, folder, preset, _ = finetunes
    run = tmp_path / "run"
    glyph.train(get_preset("debug"), run, steps=2, progress=False)
    decoder.train(preset, run, data=str(folder), steps=2, progress=False)
    assert load_stage(run, "decoder")["identity"]["glyph"] == "trained"
    out = export(run, tmp_path / "tuned")
    written, base = (load_file(m / "text_encoder" / "model.safetensors") for m in (out, model))
    trained = glyph.load_glyph(preset, run).state_dict()
    assert written.keys() == base.keys() and written.keys() <= trained.keys()
    assert all(torch.equal(written[k], trained[k].to(written[k].dtype)) for k in written)
    assert any(not torch.equal(written[k], base[k]) for k in base)


@pytest.mark.parametrize("run", ["full", "lora"])
def test_finetune_exports_the_model_with_its_tuned_parts(finetunes, run, tmp_path):
    """Export of a fine-tuning run: a copy of the init model whose DiT and AR weights are the run's (LoRA merged,
    equal to the adapted modules' outputs), everything else byte for byte the model's; it loads and generates."""
    from safetensors.torch import load_file

    from glmimage.pipeline import Pipeline
    from glmimage.train.export import export, tuned_module
    from glmimage.vision import VISION_KEY_PREFIXES
    root, model, _, preset, _ = finetunes
    out = export(root / run, tmp_path / "tuned")
    for f in model.rglob("*"):
        if f.is_file() and f.parent.name not in ("transformer", "vision_language_encoder"):
            assert (out / f.relative_to(model)).read_bytes() == f.read_bytes(), f
    assert (out / "vision_language_encoder" / "generation_config.json").exists()
    ck = load_stage(root / run, "decoder")
    dit = decoder.build_dit(preset, 0)
    tuned_module(ck, "dit", dit, dit.transformer_blocks)        # whole weights, or the base + merged adapters
    written = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")
    assert written.keys() == base.keys() and written["proj_out.weight"].dtype == base["proj_out.weight"].dtype
    assert all(torch.equal(written[k], v.to(written[k].dtype)) for k, v in dit.state_dict().items())
    changed = [k for k in base if not torch.equal(base[k], written[k])]
    assert changed and all(k.startswith("transformer_blocks.") for k in changed) == (run == "lora")
    vle, vle_base = (load_file(m / "vision_language_encoder" / "model.safetensors") for m in (out, model))
    assert vle.keys() == vle_base.keys()
    vision = [k for k in vle if k.startswith(tuple(VISION_KEY_PREFIXES))]       # the image tokenizer: untouched
    assert vision and all(torch.equal(vle[k], vle_base[k]) for k in vision)
    assert any(not torch.equal(vle[k], vle_base[k]) for k in vle)
    pipe = Pipeline.from_pretrained(out)
    image = pipe("a large red circle in the center, on a white background.", height=64, width=64,
                 num_inference_steps=2, seed=0)[0]
    assert image.size == (64, 64)


def test_finetune_the_official_layout(debug_ckpt, tmp_path):
    """--init on a checkpoint in zai-org/GLM-Image's own layout (no glmimage entry: 32 px AR tokens, a 16-side
    preview, the GLM text tokenizer) at a --size its processor takes; export writes its layout back."""
    from glmimage.pipeline import Pipeline
    from glmimage.train.__main__ import main
    folder, _ = _write_real_data(tmp_path)
    base = ["--preset", "debug", "--init", str(debug_ckpt), "--data", str(folder), "--out", str(tmp_path / "run"),
            "--steps", "2"]
    main(["train", "decoder", *base, "--size", "64", "--lora", "2", "--lr", "1e-4", "--batch", "2"])
    main(["train", "ar", *base, "--size", "64"])
    ck = load_stage(tmp_path / "run", "decoder")
    assert ck["identity"]["lora"] == 2 and ck["optimizer"]["param_groups"][0]["lr"] <= 1e-4
    main(["export", "--out", str(tmp_path / "run"), "--to", str(tmp_path / "tuned")])
    kept = [f for f in debug_ckpt.rglob("*") if f.is_file() and f.parent.name not in ("transformer",
                                                                                    "vision_language_encoder")]
    assert len(kept) > 5 and all((tmp_path / "tuned" / f.relative_to(debug_ckpt)).read_bytes() == f.read_bytes()
                                 for f in kept)
    pipe = Pipeline.from_pretrained(tmp_path / "tuned")
    assert pipe("a red circle", height=64, width=64, num_inference_steps=2, seed=0)[0].size == (64, 64)


@pytest.mark.parametrize("args, message", [
    (["vae", "--init", "M"], "--init fine-tunes the ar and decoder stages"),
    (["decoder", "--lora", "4"], "give it with --init MODEL"),
    (["decoder", "--size", "64"], "give it with --init MODEL"),
    (["decoder", "--lr", "0"], "--lr must be positive"),
    (["vae", "--recompute"], "--recompute applies to the ar and decoder stages"),
    (["vae", "--lora", "4"], "--lora applies to the ar and decoder stages"),
    (["vae", "--compile"], "--compile applies to the ar and decoder stages"),
    (["decoder", "--init", "DEBUG", "--size", "64", "--lora", "0"], "a positive integer"),
    (["decoder", "--init", "DEBUG", "--size", "72"], "not a multiple of the model's 32-pixel AR tokens"),
    (["decoder", "--buckets", "2"], "--buckets is for real images"),
    (["vae", "--data", "photos", "--buckets", "2"], "--buckets applies to the ar and decoder stages"),
    (["ar", "--data", "photos", "--buckets", "5"], "between 1 and 4"),
])
def test_finetune_flags_refused(debug_ckpt, tmp_path, capsys, args, message):
    from glmimage.train.__main__ import main
    args = [str(debug_ckpt) if a == "DEBUG" else a for a in args]
    with pytest.raises(SystemExit) as e:
        main(["train", *args, "--preset", "debug", "--out", str(tmp_path), "--steps", "1"])
    assert e.value.code == 2 and message in capsys.readouterr().err
