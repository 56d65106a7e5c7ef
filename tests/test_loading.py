"""Loading the official layout: full-size architecture on meta, strict keys, sharded safetensors."""
import json

import pytest
import torch

from glmimage import loading
from glmimage.ar import AR_KEY_PREFIXES, ARConfig, ARModel
from glmimage.dit import DiT, DiTConfig
from glmimage.random_checkpoint import PRESETS, hf_configs
from glmimage.vision import VISION_KEY_PREFIXES, ImageTokenizer, VisionConfig

OFFICIAL = hf_configs(PRESETS["full"], text_vocab=168064 - 16512)


def _shapes(module, prefixes=None):
    out = {}
    for k, v in module.state_dict().items():
        if prefixes is not None:
            inverse = {b: a for a, b in prefixes.items()}
            p = next(p for p in inverse if k.startswith(p))
            k = inverse[p] + k[len(p):]
        out[k] = tuple(v.shape)
    return out


def test_full_size_ar_matches_official_architecture():
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration
    cfg = OFFICIAL["vision_language_encoder"]
    with torch.device("meta"):
        ref = GlmImageForConditionalGeneration(GlmImageConfig(**cfg))
        ar, vis = ARModel(ARConfig.from_hf(cfg)), ImageTokenizer(VisionConfig.from_hf(cfg))
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = {**_shapes(ar, AR_KEY_PREFIXES), **_shapes(vis, VISION_KEY_PREFIXES)}
    assert ours == theirs
    # the tables in glm-image.md
    assert theirs["model.language_model.embed_tokens.weight"] == (168064, 4096)
    assert theirs["model.language_model.layers.39.mlp.gate_up_proj.weight"] == (27392, 4096)
    assert theirs["lm_head.weight"] == (16512, 4096)
    assert theirs["model.vqmodel.quantize.embedding.weight"] == (16384, 2048)
    n = sum(v.numel() for v in ref.state_dict().values())
    assert abs(n / 1e9 - 10.114) < 0.01


def test_full_size_dit_matches_official_architecture():
    from diffusers import GlmImageTransformer2DModel
    cfg = OFFICIAL["transformer"]
    with torch.device("meta"):
        ref = GlmImageTransformer2DModel(**cfg)
        ours = DiT(DiTConfig.from_hf(cfg))
    assert _shapes(ours) == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sum(v.numel() for v in ours.state_dict().values()) == 6_926_882_880
    assert _shapes(ours)["transformer_blocks.29.norm1.linear.weight"] == (49152, 512)


def test_strict_loading_names_missing_and_unexpected(debug_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "transformer"
    folder.mkdir()
    cfg = json.loads((debug_ckpt / "transformer" / "config.json").read_text())
    sd = load_file(str(debug_ckpt / "transformer" / "diffusion_pytorch_model.safetensors"))
    sd.pop("proj_out.bias")
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    with torch.device("meta"):
        dit = DiT(DiTConfig.from_hf(cfg))
    with pytest.raises(ValueError, match=r"missing keys \[proj_out.bias\]; unexpected keys \[extra.weight\]"):
        loading.load_weights(dit, folder)


def test_sharded_safetensors_with_index(debug_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file
    cfg = json.loads((debug_ckpt / "transformer" / "config.json").read_text())
    sd = load_file(str(debug_ckpt / "transformer" / "diffusion_pytorch_model.safetensors"))
    keys = sorted(sd)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
        weight_map.update({k: name for k in ks})
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with torch.device("meta"):
        dit = DiT(DiTConfig.from_hf(cfg))
    loading.load_weights(dit, tmp_path, dtype=torch.bfloat16)
    got = dit.state_dict()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], sd[k].bfloat16()) for k in keys)
    assert not any(t.is_meta for t in got.values())


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        loading.resolve(tmp_path)
    with pytest.raises(ValueError, match="hub id"):
        loading.resolve(tmp_path / "does" / "not" / "exist")


def test_read_tensor_matches_safetensors(tmp_path):
    """The plain-I/O reader (for tensors that are cast or moved to an accelerator, so the file is never mapped for
    them) gives safetensors' own tensors, for every dtype, empty and 0-d ones included."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    tensors = {"f32": x, "bf16": x.bfloat16(), "f16": x.half(), "f64": x.double(), "f8": x.to(torch.float8_e4m3fn),
               "i64": torch.arange(7), "i8": torch.arange(-3, 3, dtype=torch.int8), "bool": x > 0,
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    file = tmp_path / "t.safetensors"
    save_file(tensors, str(file))
    with open(file, "rb") as fh, safe_open(str(file), framework="pt") as f:
        start, header = loading.safetensors_header(fh)
        for k in tensors:
            got, want = loading.read_tensor(fh, start, header[k]), f.get_tensor(k)
            assert got.dtype == want.dtype and got.shape == want.shape, k
            assert torch.equal(got.double(), want.double()), k
