#!/usr/bin/env bash
# Every GPU measurement of cxrjax in one call, appended as JSON to benchmarks/results/.
#
#   tools/gpu_check.sh --fetch-wheels   # here, with the package registry: .whl/ for the GPU
#                                       # machine's Python 3.12 (what its image lacks)
#   tools/gpu_check.sh                  # on the GPU machine: installs .whl/ if present, then
#                                       # measures; results in benchmarks/results/
#   tools/gpu_check.sh --dry-run DIR    # any machine, CPU: every measurement at toy size,
#                                       # results in DIR (about 5 minutes on 2 cores)
#   tools/gpu_check.sh --list           # the commands a GPU run makes, one per line
#
# The measurements (tools/bench_train.py and tools/bench_compiled.py, one process each):
# ViT-B/16 (AugReg in21k) and DINOv2 ViT-B/14 at 224 px in bf16 at batch 128, 256 and 512,
# remat off and on, each with timm's same model in the same process (torch.compile, bf16
# autocast) and the full loop from ArrayRecord shards; cuDNN flash attention against XLA's at
# batch 256; the SSL step of configs/ssl_pretrain.py (ViT-B/14, 2 x 224 + 8 x 98 crops).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(grain array-record ml-collections clu pydicom tensorboardx)
mode=${1:-measure}

if [[ $mode == --fetch-wheels ]]; then
  mkdir -p .whl
  for name in "${WHEELS[@]}"; do
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$name"
  done
  exit 0
fi

run() {
  if [[ $mode == --list ]]; then echo "$*"; else "$@"; fi
}

if [[ $mode == --dry-run ]]; then
  results=${2:?usage: tools/gpu_check.sh --dry-run DIR}
  export JAX_PLATFORMS=cpu
  python=${PYTHON:-python}
  # Toy sizes, the same flags: a failure here is a failure there.
  batches=(4) steps=1 size=(--image-size 32) size14=(--image-size 28) remats=("" --remat)
  ssl=(--ssl-config configs/ssl_pretrain_demo.py --ssl-steps 1)
else
  results=benchmarks/results
  python=${PYTHON:-python3}
  if [[ $mode != --list ]] && compgen -G ".whl/*.whl" > /dev/null; then
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
  fi
  batches=(128 256 512) steps=20 size=() size14=() remats=("" --remat)
  ssl=(--ssl-config configs/ssl_pretrain.py --ssl-arg init=scratch,batch=64 --ssl-steps 10)
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
[[ $mode == --list ]] || mkdir -p "$results"
bench=("$python" tools/bench_train.py --dtype bfloat16 --steps "$steps" --save --results "$results")

for model in vit_b16_in21k vit_b14_dinov2; do
  model_size=("${size[@]}")
  [[ $model == vit_b14_dinov2 ]] && model_size=("${size14[@]}")
  for batch in "${batches[@]}"; do
    for remat in "${remats[@]}"; do
      # timm in the same run; the loop only once per model and batch (remat does not change it).
      extra=(--framework torch)
      [[ -n $remat ]] && extra=(--no-loop "$remat")
      run "${bench[@]}" --model "$model" "${model_size[@]}" --batch "$batch" "${extra[@]}"
    done
  done
done
# cuDNN flash attention against XLA's attention, at the middle batch.
middle=${batches[$((${#batches[@]} / 2))]}
for attention in cudnn xla; do
  [[ $mode == --dry-run && $attention == cudnn ]] && continue  # no cuDNN on a CPU
  run "${bench[@]}" --model vit_b16_in21k "${size[@]}" --batch "$middle" --no-loop \
    --attention "$attention"
done
# The SSL step alone on synthetic crops: rate, FLOPs per image, compiled memory.
run "$python" tools/bench_compiled.py --skip dp fsdp loop "${ssl[@]}" \
  --json "$results/ssl-step-$(date -u +%Y%m%dT%H%M%S).json"
[[ $mode == --list ]] || echo "gpu_check: results in $results"
