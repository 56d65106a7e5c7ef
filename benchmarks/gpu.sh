#!/usr/bin/env bash
# The GPU check, as one prepared script for a rented machine (the device tool; its files come back from $OUT).
#
#   bash benchmarks/gpu.sh smoke   # CUDA tests + the medium preset side by side on the GPU      (~3 min)
#   bash benchmarks/gpu.sh full    # official sizes, random weights, 1024², 50 steps: ours, then the reference (~9 min)
#   bash benchmarks/gpu.sh finetune  # fine-tuning the official-size DiT and AR (LoRA, bf16): device memory, s/step
#   bash benchmarks/gpu.sh parity  # the official-size DiT against the reference's, bf16 and fp32, 1024², 50 steps (~4 min)
#   bash benchmarks/gpu.sh extras  # official sizes: the speculative AR's verify forward (probe, ~1.5 min), then int8
#                                  # AR + DiT compiled (memory without offload) and the step cache (~7 min)
#
# The machine has PyTorch but no diffusers and an older transformers: the reference versions this repo tests
# against travel as wheels in .whl/, fetched where pip works with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.23.0 diffusers==0.42.1 importlib_metadata regex
# Logs and JSON land in $OUT (default: ./gpu-out).
set -uo pipefail
mode=${1:-smoke}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 GLMIMAGE_CACHE=${GLMIMAGE_CACHE:-/tmp/glmimage-cache} HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
df -h /tmp | tail -1; free -g | head -2

if [ "$mode" = smoke ]; then
  # the official AR alone (random weights in memory): decode tokens/s with and without the CUDA-graph step
  timeout 150 python3 benchmarks/ar_decode.py --preset glm-image --device cuda --dtype bfloat16 \
    --out "$OUT/ar-decode-full.json" 2>&1 | tail -22
  # the CUDA-only tests (graph decode, no host syncs, pinned offload) and the parity/engine suites on this box
  # (not -x: test_image_tokens_match_reference fails there on its Pillow/torchvision, not on CUDA)
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_ar.py tests/test_engine.py 2>&1 \
    | tee "$OUT/pytest.txt" | tail -15
  # training on CUDA (every stage of the debug preset, fp32 and bf16 autocast, against the CPU's losses)
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_train.py -k cuda 2>&1 \
    | tee "$OUT/pytest-train.txt" | tail -5
  # the medium preset on the GPU: reference fp32 vs ours fp32 (image parity), bf16, bf16 without CUDA graphs,
  # bf16 with offload
  timeout 300 python3 -m glmimage.bench --preset medium --device cuda --warmup 1 --repeat 1 \
    --dtype float32,bfloat16,bfloat16+eager,bfloat16+offload --out "$OUT/medium-cuda.json" 2>&1 \
    | tee "$OUT/medium-bench.txt" | grep -v Warning | tail -45
  # disk and GPU->host speed, to size the full run
  dd if=/dev/zero of=/tmp/ddtest bs=64M count=32 oflag=direct 2>&1 | tail -1; rm -f /tmp/ddtest
elif [ "$mode" = full ]; then
  # official sizes with random weights, bf16, 1024², 50 steps, CFG 1.5. Ours first: compiled with offload (one
  # stage resident at a time: the speed and memory targets at once), then compiled with every stage resident (each
  # compiled variant's first image, compile included, is reported apart as first_image_s; the timed image is the
  # next one), one measured image each; then the CUDA tests; then the reference (bf16, ~3 min) with the time left
  # of BUDGET seconds, in its own report (--dtype none).
  t0=$(date +%s)
  export TMPDIR=/tmp/bench-work; mkdir -p $TMPDIR
  timeout ${FULL_TIMEOUT:-370} python3 -m glmimage.bench --preset full --device cuda --height 1024 --width 1024 \
    --steps 50 --guidance 1.5 --warmup 0 --repeat 1 --reference-dtype none \
    --dtype ${VARIANTS:-bfloat16+offload+compile,bfloat16+compile} --out "$OUT/full-cuda.json" 2>&1 \
    | tee "$OUT/full-bench.txt" | grep -v Warning | tail -40
  # if the bench was cut short, keep each finished worker's own JSON
  [ -f "$OUT/full-cuda.json" ] || for f in $TMPDIR/glmimage-bench-*/*.json; do cp "$f" "$OUT/partial-$(basename $f)"; done
  echo "ours: $(( $(date +%s) - t0 )) s"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_ar.py tests/test_engine.py -k "cuda or sync" 2>&1 \
    | tee "$OUT/pytest-cuda.txt" | tail -4
  left=$(( ${BUDGET:-575} - ($(date +%s) - t0) ))
  if [ $left -gt 200 ]; then
    timeout $left python3 -m glmimage.bench --preset full --device cuda --height 1024 --width 1024 --steps 50 \
      --guidance 1.5 --warmup 0 --repeat 1 --reference-dtype bfloat16 --dtype none \
      --out "$OUT/full-cuda-reference.json" 2>&1 | grep -v Warning | tail -15
  else
    echo "reference skipped: ${left} s left"
  fi
  echo "full run: $(( $(date +%s) - t0 )) s"
elif [ "$mode" = finetune ]; then
  # official sizes, random weights, 1024², batch 1: LoRA 64 on the bf16 DiT (with and without --recompute) and on
  # the bf16 AR with --recompute; each run's peak allocated device memory and seconds per step (README arithmetic:
  # ~13.9 GB of frozen DiT weights + ~3.8 GB of adapters and their AdamW state, before activations)
  export TMPDIR=/tmp/finetune-work; mkdir -p $TMPDIR
  timeout ${FINETUNE_TIMEOUT:-540} python3 benchmarks/finetune.py --preset full --device cuda --size 1024     --images 8 --steps 6 --warmup 2 --batch 1 --threads 8     --setups decoder:lora64:bf16:recompute,decoder:lora64:bf16,ar:lora64:bf16:recompute     --out "$OUT/finetune-full-cuda.jsonl" 2>&1 | grep -v Warning | tail -20
elif [ "$mode" = parity ]; then
  # the official-size DiT against the reference's on shared random weights, 1024², 50 steps, CFG 1.5: in bf16, then
  # in fp32 (does the full-size image difference of the bf16 bench come from the DiT?)
  timeout 120 python3 benchmarks/dit_parity.py --preset full --device cuda --dtype bfloat16 --size 1024 --steps 50 \
    --out "$OUT/dit-parity-full-bf16-cuda.json" 2>&1 | grep -v Warning | tail -8
  timeout 300 python3 benchmarks/dit_parity.py --preset full --device cuda --dtype float32 --size 1024 --steps 50 \
    --out "$OUT/dit-parity-full-fp32-cuda.json" 2>&1 | grep -v Warning | tail -8
elif [ "$mode" = extras ]; then
  # official sizes, random weights, 1024², 50 steps: everything resident with int8 AR and DiT linears (does it fit
  # 24 GB without offload, and does compile fuse the int8 conversion into the decode's GEMV?), and the step cache
  # at T = 0.1 (random weights do not have a trained DiT's step dynamics: this measures what a skipped step saves);
  # first, what a speculative verify forward of K+1 tokens costs against a plain decode step (random weights guess
  # nothing right, so the ratio is the cost side; a trained model's tokens per forward are the gain side)
  timeout 180 python3 benchmarks/gpu_probe.py --parts spec --out "$OUT/gpu-probe-spec.json" 2>&1 | tail -6
  export TMPDIR=/tmp/bench-work; mkdir -p $TMPDIR
  timeout ${EXTRAS_TIMEOUT:-400} python3 -m glmimage.bench --preset full --device cuda --height 1024 --width 1024 \
    --steps 50 --guidance 1.5 --warmup 0 --repeat 1 --reference-dtype none \
    --dtype ${VARIANTS:-bfloat16+int8all+compile,bfloat16+compile+cache0.1} --out "$OUT/full-cuda-extras.json" 2>&1 \
    | grep -v Warning | tail -30
else
  echo "usage: bash benchmarks/gpu.sh smoke|full|finetune|parity|extras" >&2; exit 2
fi
