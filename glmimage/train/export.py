"""Write the official GLM-Image folder layout from a run folder (DIR/{vae,tokenizer,ar,decoder}/ckpt.pt, or the
sharded ckpt.dcp/ of a --shard run).

    glmimage export --out runs/small --to glmimage/assets/model

A fine-tuning run (`--init MODEL`, with or without `--lora`) exports as a copy of MODEL whose fine-tuned
components (transformer/ for the decoder, the AR half of vision_language_encoder/ for ar) hold the run's weights,
LoRA adapters merged, stored in the dtype MODEL stores them in; text_encoder/ too when the run's decoder read a glyph
encoder trained in the run (`train glyph`) instead of MODEL's.

A run that trained some stages from scratch on another model's image tokenizer (`--base MODEL`: e.g. a new AR for
the bundled model, trained on its tokenizer reproduced in the run folder) exports the same way: a copy of MODEL with
the run's ar (AR + caption tokenizer) and/or decoder (DiT + glyph encoder) in place of MODEL's. Both read the image
tokenizer's ids, so the run's tokenizer must be MODEL's (checked, weight for weight at MODEL's storage dtype), and a
decoder must have been trained on MODEL's VAE (checked too).

model_index.json gets a "glmimage" entry with the grid factors the pipeline reads:
  {"ar_token_px": 16, "preview_side": 4, "native_size": 128}
Storage dtype "auto": float32, unless the whole folder would exceed 40 MB; then the two big components
(vision_language_encoder, transformer) are stored in bfloat16 (the loader casts to the runtime dtype).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from glmimage.ar import AR_KEY_PREFIXES
from glmimage.random_checkpoint import MODEL_INDEX, write_common
from glmimage.train.common import checkpoint_path, load_stage, trained_weights
from glmimage.train.presets import TrainPreset, from_model, get_preset, model_configs
from glmimage.vision import VISION_KEY_PREFIXES

MAX_BYTES = 40 * 1024 * 1024
# sampling defaults written to generation_config.json (the pipeline reads temperature/top_p/top_k). Temperature 0.4
# was chosen for the bundled small model on selection seed 999 (20 t2i prompts + 12 edits; object accuracy 0.40 vs
# 0.37 at 0.7 and 0.34 greedy), never on the reported evaluation seed.
GENERATION = {"do_sample": True, "temperature": 0.4, "top_p": 0.9, "top_k": 20}


def _inverse(prefixes: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in prefixes.items()}


def _state(module: torch.nn.Module, prefixes: dict[str, str] | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    inv = _inverse(prefixes) if prefixes else None
    for name, t in module.state_dict().items():
        key = name
        if inv is not None:
            match = next(p for p in inv if name.startswith(p))
            key = inv[match] + name[len(match):]
        t = t.detach().cpu()
        out[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return out


def _save(state: dict, path: Path) -> None:
    from safetensors.torch import save_file
    import os
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def run_vae(preset: TrainPreset, run_dir: Path):
    """A run's VAE (its decoder-only fine-tune applied, when run) and latent mean / std."""
    from glmimage.train import decoder
    vae, mean, std = decoder.load_vae(preset, run_dir)
    if checkpoint_path(run_dir, "vae_decoder") is not None:
        vae.load_state_dict(trained_weights(load_stage(run_dir, "vae_decoder"), "vae"))
    return vae, mean, std


def run_ar(preset: TrainPreset, ck: dict):
    """An ar stage checkpoint's AR (eval mode) and caption tokenizer."""
    from tokenizers import Tokenizer
    from glmimage.train import ar
    tok = Tokenizer.from_str(ck["extra"]["text_tokenizer"])
    model = ar.build_ar(preset, ar.text_vocab_size(tok, preset), 0)
    model.load_state_dict(trained_weights(ck, "ar"))
    return model.eval(), tok


def run_decoder(preset: TrainPreset, ck: dict):
    """A decoder stage checkpoint's DiT (eval mode) and glyph encoder."""
    from glmimage.train import decoder
    dit = decoder.build_dit(preset, 0)
    dit.load_state_dict(trained_weights(ck, "dit"))
    glyph = decoder.build_glyph(preset, 0)
    glyph.t5.load_state_dict(ck["models"]["glyph"])
    return dit.eval(), glyph


def load_models(preset: TrainPreset, run_dir: Path) -> dict:
    """Every trained module of a run folder, in eval mode."""
    from glmimage.train import tokenizer

    vae, mean, std = run_vae(preset, run_dir)
    model, tok = run_ar(preset, load_stage(run_dir, "ar"))
    dit, glyph = run_decoder(preset, load_stage(run_dir, "decoder"))
    return dict(vae=vae, latents_mean=mean.flatten().tolist(), latents_std=std.flatten().tolist(),
                vq=tokenizer.load_tokenizer(preset, run_dir), ar=model, text_tokenizer=tok, dit=dit, glyph=glyph)


def export(run_dir: Path, to: Path, preset: str = "small", dtype: str = "auto", base: Path | None = None,
           ar_guidance: float | None = None, ar_guidance_edit: float | None = None) -> Path:
    """The run's model in the official layout at `to` (see the module docstring). ar_guidance, ar_guidance_edit:
    recorded in model_index.json's "glmimage" entry as the model's AR guidance defaults for text-to-image and for
    edits (pipeline.Pipeline.ar_guidance / ar_guidance_edit; None: left as the base model has them, else off)."""
    from glmimage.ar import check_ar_guidance
    scales = {k: check_ar_guidance(v) for k, v in (("ar_guidance", ar_guidance),    # before anything is written
                                                    ("ar_guidance_edit", ar_guidance_edit)) if v is not None}
    to = export_files(run_dir, to, preset, dtype, base)
    if scales:
        index = json.loads((to / "model_index.json").read_text())
        index["glmimage"] = {**index.get("glmimage", {}), **scales}
        (to / "model_index.json").write_text(json.dumps(index, indent=2))
    return to


def export_files(run_dir: Path, to: Path, preset: str, dtype: str, base: Path | None) -> Path:
    if base is not None:
        return export_onto(Path(run_dir), Path(to), Path(base), get_preset(preset), dtype)
    identities = {}
    for stage in ("ar", "decoder"):
        if checkpoint_path(run_dir, stage) is not None:
            identities[stage] = load_stage(run_dir, stage, {"identity"}).get("identity")
    inits = {(i or {}).get("init") for i in identities.values()}
    if inits != {None} and inits:
        if len(inits) > 1:
            raise ValueError(f"{run_dir}: the ar and decoder stages start from different models "
                             f"({sorted(map(str, inits))}); export each from its own run folder")
        return export_finetuned(Path(run_dir), Path(to), list(identities), dtype)
    p = get_preset(preset)
    m = load_models(p, Path(run_dir))
    tok = m["text_tokenizer"]
    from glmimage.train.ar import text_vocab_size
    cfgs = model_configs(p, text_vocab_size(tok, p))
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)

    n_params = sum(sum(t.numel() for t in mod.state_dict().values())
                   for mod in (m["ar"], m["vq"], m["dit"], m["glyph"].t5, m["vae"]))
    big = torch.float32 if dtype == "float32" or (dtype == "auto" and 4 * n_params < MAX_BYTES) else torch.bfloat16
    small = torch.bfloat16 if dtype == "bfloat16" else torch.float32

    write_common(to, cfgs, tok, p.model)
    index = {**MODEL_INDEX, "glmimage": {"ar_token_px": p.ar_token_px, "preview_side": p.preview_side,
                                         "native_size": p.image_size}}
    (to / "model_index.json").write_text(json.dumps(index, indent=2))
    proc = to / "processor" / "preprocessor_config.json"
    proc_cfg = json.loads(proc.read_text())
    proc_cfg["patch_size"] = p.vision_patch
    proc.write_text(json.dumps(proc_cfg, indent=2))

    vle = to / "vision_language_encoder"
    vle.mkdir(exist_ok=True)
    (vle / "config.json").write_text(json.dumps(cfgs["vision_language_encoder"], indent=2))
    gen = {**cfgs["generation"], **GENERATION}
    gen.pop("suppress_tokens", None)                # the trained model needs no masking help
    (vle / "generation_config.json").write_text(json.dumps(gen, indent=2))
    _save({**_state(m["ar"], AR_KEY_PREFIXES, big), **_state(m["vq"], VISION_KEY_PREFIXES, big)},
          vle / "model.safetensors")

    tr = to / "transformer"
    (tr).mkdir(exist_ok=True)
    (tr / "config.json").write_text(json.dumps({"_class_name": "GlmImageTransformer2DModel",
                                                "_diffusers_version": "0.42.1", **cfgs["transformer"]}, indent=2))
    _save(_state(m["dit"], None, big), tr / "diffusion_pytorch_model.safetensors")

    t5 = copy.deepcopy(m["glyph"].t5).to(small)
    t5.save_pretrained(to / "text_encoder")

    vae = copy.deepcopy(m["vae"]).to(small)
    vae.register_to_config(latents_mean=m["latents_mean"], latents_std=m["latents_std"])
    vae.save_pretrained(to / "vae")

    total = sum(f.stat().st_size for f in to.rglob("*") if f.is_file())
    if total > MAX_BYTES and dtype == "auto":
        raise ValueError(f"exported model is {total / 2**20:.1f} MB, over the 40 MB budget")
    return to


def tuned_module(ck: dict, name: str, module: torch.nn.Module, blocks: torch.nn.Module) -> torch.nn.Module:
    """A fine-tuning checkpoint's weights in `module` (built with the init model's weights): its whole trained
    weights, or its LoRA adapters on `blocks` merged in."""
    from glmimage.train.lora import add_lora, merge_lora
    rank = ck["identity"].get("lora")
    if not rank:
        module.load_state_dict(trained_weights(ck, name))
        return module
    add_lora(blocks, rank).load_state_dict(trained_weights(ck, "lora"))
    merge_lora(blocks)
    return module


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype a component folder stores its (first) floating-point weights in."""
    from glmimage.loading import SAFETENSORS_DTYPES, safetensors_files, safetensors_header
    with open(safetensors_files(folder)[0], "rb") as fh:
        _, header = safetensors_header(fh)
    dtypes = [SAFETENSORS_DTYPES[v["dtype"]] for k, v in header.items() if k != "__metadata__"]
    return next((d for d in dtypes if d.is_floating_point), torch.float32)


def replace_weights(folder: Path, filename: str, state: dict) -> None:
    """A component folder's weights become `state` in one file (the copied base's shards and index removed)."""
    for f in list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json")):
        f.unlink()
    _save(state, folder / filename)


def export_finetuned(run_dir: Path, to: Path, stages: list[str], dtype: str = "auto") -> Path:
    """A copy of the run's --init model with its fine-tuned components replaced (see the module docstring)."""
    from glmimage.train import ar, decoder, tokenizer
    cks = {stage: load_stage(run_dir, stage) for stage in stages}
    identity = next(iter(cks.values()))["identity"]
    init = Path(identity["init"])
    if to.resolve() == init.resolve():
        raise ValueError(f"--to {to} is the fine-tuned model's own folder; export to a new one")
    p = from_model(init, get_preset("debug"), identity["size"])       # sizes only: no stage setting is used
    replaced = {init / "transformer"} if "decoder" in cks else set()
    replaced |= {init / "vision_language_encoder"} if "ar" in cks else set()
    new_glyph = "decoder" in cks and cks["decoder"]["identity"].get("glyph") == "trained"   # (train glyph)
    replaced |= {init / "text_encoder"} if new_glyph else set()

    def weights_to_replace(folder: str, names: list[str]) -> list[str]:     # not copied only to be deleted
        return [n for n in names if ".safetensors" in n] if Path(folder) in replaced else []

    # hub caches hold links: copied as files
    shutil.copytree(init, to, ignore=weights_to_replace, dirs_exist_ok=True)
    explicit = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if "decoder" in cks:
        dit = decoder.build_dit(p, 0)
        tuned_module(cks["decoder"], "dit", dit, dit.transformer_blocks)
        dt = explicit or stored_dtype(init / "transformer")
        replace_weights(to / "transformer", "diffusion_pytorch_model.safetensors", _state(dit, None, dt))
    if new_glyph:                       # the decoder learned to read the run's glyph encoder: it goes with it
        from glmimage.train.glyph import load_glyph
        t5 = load_glyph(p, run_dir)     # (a LoRA checkpoint does not hold the frozen encoder: read from its stage)
        if t5 is None:
            raise ValueError(f"{run_dir}'s decoder read the run's glyph stage, which is gone from {run_dir / 'glyph'}")
        t5.to(explicit or stored_dtype(init / "text_encoder")).save_pretrained(to / "text_encoder")
    if "ar" in cks:
        model = ar.build_ar(p, 0, 0)
        tuned_module(cks["ar"], "ar", model, model.decoder.layers)
        vq = tokenizer.load_tokenizer(p, run_dir)
        dt = explicit or stored_dtype(init / "vision_language_encoder")
        replace_weights(to / "vision_language_encoder", "model.safetensors",
                        {**_state(model, AR_KEY_PREFIXES, dt), **_state(vq, VISION_KEY_PREFIXES, dt)})
    return to


def _stored(folder: Path, keys=None) -> dict[str, torch.Tensor]:
    """A component folder's stored tensors (those named in `keys` only, when given: the rest is never read)."""
    from safetensors import safe_open
    from glmimage.loading import safetensors_files
    out = {}
    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys() if keys is None or k in keys})
    return out


def _check_same(run: dict[str, torch.Tensor], folder: Path, what: str, base: Path) -> None:
    """Every tensor of `run` (cast to the stored dtype) equals the one of the same name stored in `folder`."""
    stored = _stored(folder, set(run))
    differ = [k for k, t in run.items() if k not in stored or not torch.equal(t, stored[k])]
    if differ:
        raise ValueError(f"the run's {what} is not {base}'s ({len(differ)} of {len(run)} tensors differ, e.g. "
                         f"{differ[0]}): its stages read other ids or latents than {base}'s; export the whole run "
                         f"without --base, or train on {base}'s {what}")


def export_onto(run_dir: Path, to: Path, base: Path, p: TrainPreset, dtype: str = "auto") -> Path:
    """A copy of `base` with the ar and/or decoder stage this run trained from scratch (see the module docstring)."""
    from glmimage.loading import resolve
    from glmimage.train import ar, tokenizer
    base = resolve(base)
    stages = [s for s in ("ar", "decoder") if checkpoint_path(run_dir, s) is not None]
    if not stages:
        raise ValueError(f"{run_dir} holds no ar or decoder stage to put into {base}")
    cks = {s: load_stage(run_dir, s) for s in stages}
    if any((ck.get("identity") or {}).get("init") for ck in cks.values()):
        raise ValueError(f"{run_dir} fine-tunes a model (--init): export it without --base")
    if to.resolve() == base.resolve():
        raise ValueError(f"--to {to} is --base's own folder; export to a new one")
    explicit = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    base_vle_dt = stored_dtype(base / "vision_language_encoder")
    vle_dt = explicit or base_vle_dt
    vq_model = tokenizer.load_tokenizer(p, run_dir)
    _check_same(_state(vq_model, VISION_KEY_PREFIXES, base_vle_dt), base / "vision_language_encoder",
                "image tokenizer", base)
    vq = _state(vq_model, VISION_KEY_PREFIXES, vle_dt)      # the run's own numbers, stored at the export's dtype
    if "decoder" in cks:
        vae, _, _ = run_vae(p, run_dir)
        _check_same(_state(vae, None, stored_dtype(base / "vae")), base / "vae", "VAE", base)
    replaced = {base / "vision_language_encoder"} if "ar" in cks else set()
    replaced |= {base / "transformer", base / "text_encoder"} if "decoder" in cks else set()

    def weights_to_replace(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if ".safetensors" in n] if Path(folder) in replaced else []

    shutil.copytree(base, to, ignore=weights_to_replace, dirs_exist_ok=True)
    if "ar" in cks:
        model, tok = run_ar(p, cks["ar"])
        cfg = model_configs(p, ar.text_vocab_size(tok, p))["vision_language_encoder"]
        (to / "vision_language_encoder" / "config.json").write_text(json.dumps(cfg, indent=2))
        replace_weights(to / "vision_language_encoder", "model.safetensors",
                        {**_state(model, AR_KEY_PREFIXES, vle_dt), **vq})
        tok.save(str(to / "processor" / "tokenizer.json"))
    if "decoder" in cks:
        dit, glyph = run_decoder(p, cks["decoder"])
        dt = explicit or stored_dtype(base / "transformer")
        replace_weights(to / "transformer", "diffusion_pytorch_model.safetensors", _state(dit, None, dt))
        copy.deepcopy(glyph.t5).to(explicit or stored_dtype(base / "text_encoder")).save_pretrained(to / "text_encoder")
    return to
