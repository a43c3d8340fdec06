#!/usr/bin/env bash
# The GPU table of docs/performance.md ("GPU figures"), prepared for one call on a lent GPU machine: each bench
# appends a JSON line to $OUT/gpu.jsonl and its printed table to $OUT/gpu.log, most important first, and the
# script stops starting new benches once its time budget (BUDGET seconds, default 540) is spent.
#
#   bash scripts/gpu_table.sh core    # Table 7 setting: stage 1 / 2 x batch 2 / 16 x images / cache; ours vs diffusers
#   bash scripts/gpu_table.sh sweep   # resolution 224 / 336 / 384, denoiser depth 1..4, the switches
#   bash scripts/gpu_table.sh all     # core, then sweep, as far as the budget goes
#
# The machine's image has torch, transformers, peft and accelerate but not diffusers or webdataset, and it reaches
# no package index: download their wheels here into the ignored folder .whl/ and carry it,
#   pip download --no-deps -d .whl diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7
#   device run: command "bash scripts/gpu_table.sh all", carry [".whl"], timeout_s 600
# They go to /tmp/genhancer-site, beside the image's own packages; the package itself runs from src/ (no install).
# Checked here (2026-12-07) against the image's versions as its package list gives them (transformers 5.17.0,
# huggingface_hub 1.33.0, accelerate 1.15.0, safetensors 0.8.0, tokenizers 0.23.2; torch 2.13 CPU standing in for
# its 2.11 CUDA build): the wheels install and the whole flow runs. The paper preset draws its random weights on
# the GPU (model.init_on_device): on a CPU, whose generator is serial, its head alone took 35-40 s per bench (twice
# that for stage 2 and the cache), most of one 600 s call for `core`. That has not run on a GPU yet: should a bench
# fail, it is run again once with the weights drawn on the CPU, and so are the benches after it.
# A dry run of the whole flow on a CPU, with the tiny preset:
#   PRESET=tiny DEVICE=cpu STEPS=1 WARMUP=1 OUT=/tmp/gpu-table bash scripts/gpu_table.sh core
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in core | sweep | all) part=$1 ;; *) echo "usage: bash scripts/gpu_table.sh core|sweep|all" >&2; exit 2 ;; esac
PRESET=${PRESET:-paper} DEVICE=${DEVICE:-cuda} STEPS=${STEPS:-10} WARMUP=${WARMUP:-3} BUDGET=${BUDGET:-540}
OUT=${OUT:-runs/gpu-table}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
site=/tmp/genhancer-site  # the carried wheels, only where they are missing (the GPU image), beside its packages
if ! "$PY" -c "import diffusers, webdataset" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install --quiet --no-deps --no-index --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # the log fills as it runs
cpu=()
[ "$DEVICE" = cpu ] && cpu=(--cpu)
start=$SECONDS

on_cpu=()  # set to model.init_on_device=false after a failed bench: the rest draw their weights on the CPU
one_bench() {
  echo "== bench $* ${on_cpu[*]}" | tee -a "$OUT/gpu.log"
  "$PY" -m genhancer bench --preset "$PRESET" "${cpu[@]}" --warmup "$WARMUP" --steps "$STEPS" \
    --json "$OUT/gpu.jsonl" "$@" "${on_cpu[@]}" 2>&1 | { grep -v "it/s" || true; } | tee -a "$OUT/gpu.log"
}  # its status is the bench's (pipefail; grep finding no line is not a failure)
bench() {  # one `genhancer bench` on the preset; skipped once the budget is spent
  if (( SECONDS - start > BUDGET )); then echo "skipped (budget): $*" | tee -a "$OUT/gpu.log"; return; fi
  one_bench "$@" && return
  if [ "$PRESET" = paper ] && [ ${#on_cpu[@]} -eq 0 ]; then
    on_cpu=(model.init_on_device=false)
    one_bench "$@" && return
  fi
  echo "failed: $*" | tee -a "$OUT/gpu.log"
}

"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
  | tee -a "$OUT/gpu.log"
core() {  # ours / diffusers first (a stated target), then the Table 7 benches
  if [ "$DEVICE" = cuda ]; then  # the small configurations, then the paper preset
    "$PY" scripts/bench_denoiser.py --device cuda --rounds 10 2>&1 | tee -a "$OUT/gpu.log" \
      || echo "failed: bench_denoiser" | tee -a "$OUT/gpu.log"
  else
    "$PY" scripts/bench_denoiser.py --hidden 64 --heads 2 --double 1 --single 1 --tokens 16 --batch 2 --rounds 2 \
      2>&1 | { grep -v USDT || true; } | tee -a "$OUT/gpu.log" || echo "failed: bench_denoiser" | tee -a "$OUT/gpu.log"
  fi
  for b in 2 16; do for s in stage1 stage2; do bench --stage "$s" --batch-size "$b"; done; done
  for b in 2 16; do bench --stage stage1 --batch-size "$b" --cache; done
  bench --stage stage2 --batch-size 2 --cache
}
sweep() {
  for r in 224 336 384; do bench --batch-size 16 --resolution "$r"; done
  for n in 1 3 4; do bench --batch-size 16 "model.denoiser_arch.depth_double=$n"; done
  for sw in train.compile=true train.grad_checkpointing=true optim.fused=false train.precision=fp32; do
    bench --batch-size 16 "$sw"
  done
  bench --batch-size 16 --attention math
}
case "$part" in
  core) core ;;
  sweep) sweep ;;
  all) core; sweep ;;
esac
echo "done in $((SECONDS - start)) s; results: $OUT/gpu.jsonl" | tee -a "$OUT/gpu.log"
