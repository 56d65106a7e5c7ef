"""The scripts a GPU session runs (benchmarks/) work, dry-run here on the debug sizes: a broken one would cost
device minutes."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


def test_dit_parity_script_finds_our_dit_equal_to_the_reference(tmp_path):
    out = tmp_path / "parity.json"
    _run("dit_parity.py", "--preset", "debug", "--dtype", "float32", "--size", "64", "--steps", "3", "--out", str(out))
    report = json.loads(out.read_text())
    assert len(report["velocity_per_step"]) == 3
    assert report["latents"]["max_abs"] < 1e-5           # fp32: the same numbers up to summation order


def test_gpu_probe_dry_run(tmp_path):
    out = tmp_path / "probe.json"
    _run("gpu_probe.py", "--out", str(out), "--device", "cpu", "--preset", "debug", "--side", "64",
         "--parts", "dit,lora,spec")
    report = json.loads(out.read_text())
    assert not any(k.endswith("_error") for k in report), report
    steps = report["dit_step_s"]
    assert set(steps) == {"batched_split", "batched_masked", "two_calls", "batched_split_compiled"}
    assert report["dit_split_vs_masked_max_abs"] < 0.05                  # bf16: the same step up to rounding
    assert set(report["lora64_step"]) == {"recompute", "plain"}
    assert set(report["ar_speculative"]) == {"k0", "k2", "k4", "k8"}
    assert report["ar_speculative"]["k4"]["forward_cost_vs_plain_step"] > 0


def test_step_cache_script(debug_ckpt, tmp_path):
    out = tmp_path / "cache.json"
    _run("step_cache.py", "--model", str(debug_ckpt), "--size", "64", "--steps", "6", "--n", "2", "--repeat", "1",
         "--thresholds", "0.9", "--out", str(out))
    results = json.loads(out.read_text())["results"]
    assert results["0.0"]["steps_cached"] == 0 and results["0.0"]["max_abs"] == 0      # the exact pipeline
    assert 0 < results["0.9"]["steps_cached"] < 6 and results["0.9"]["max_abs"] > 0


def test_compile_reuse_script(debug_ckpt, tmp_path):
    """A compiled pipeline (frozen weights on a CPU) serves prompts of other lengths and quoted texts without
    compiling again: after a prompt without quoted text and one with, the next two (one of each, other lengths)
    compile nothing."""
    out = tmp_path / "reuse.json"
    _run("compile_reuse.py", "--model", str(debug_ckpt), "--size", "64", "--steps", "2", "--out", str(out))
    prompts = json.loads(out.read_text())["prompts"]
    assert prompts[0]["new_graphs"] >= 2 and [p["new_graphs"] for p in prompts[2:]] == [0, 0]


def test_speculate_script(tmp_path):
    """On the bundled model: every grid equal to plain decoding's, in fewer forwards."""
    out = tmp_path / "speculate.json"
    _run("speculate.py", "--n", "4", "--edits", "2", "--ks", "4", "--repeat", "1", "--out", str(out))
    results = json.loads(out.read_text())["results"]
    assert results["t2i:4"]["same_grid"] == "4/4" and results["edit:4"]["same_grid"] == "2/2"
    assert results["t2i:0"]["tokens_per_forward"] == 1 and results["t2i:4"]["tokens_per_forward"] > 1.2
