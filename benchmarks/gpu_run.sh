#!/usr/bin/env bash
# Runs the GPU measurements of one device session and keeps every log under $OUT (or ./gpu_logs).
#   bash benchmarks/gpu_run.sh env tests attention train      # any of: env tests attention train train-levers decode moe
set -u
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
log() { echo "== $(date -u +%FT%TZ) $*" | tee -a "$OUT/summary.log"; }
run() { local name=$1; shift; log "$name: $*"; timeout "${T:-300}" "$@" > "$OUT/$name.log" 2>&1; local rc=$?;
        tail -n 25 "$OUT/$name.log" | tee -a "$OUT/summary.log"; log "$name rc=$rc"; }
for what in "$@"; do case $what in
  env) run env bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit --format=csv;
        $PY -c 'import jax, jaxlib, flax, optax, orbax.checkpoint as o, torch, transformers; from jax._src.lib import cuda_versions as c;
print(\"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__, \"torch\", torch.__version__,
\"transformers\", transformers.__version__, \"cudnn\", c.cudnn_get_version() if c else None, jax.devices())'" ;;
  tests) JAX_PLATFORMS=cuda run tests $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py ;;
  attention) run attention $PY benchmarks/attention.py --json "$OUT/attention.json" ;;
  train) run train_packed_mask $PY benchmarks/train_step.py --json "$OUT/train_packed_mask.json"
         run train_packed_cudnn $PY benchmarks/train_step.py --max-segments 16 --no-torch --json "$OUT/train_packed_cudnn.json"
         run train_causal $PY benchmarks/train_step.py --no-segments --no-torch --json "$OUT/train_causal.json" ;;
  train-levers)  # issue 14's sequence-length targets and the levers table, one row each (no torch: the reference is the train rows)
         run train_remat_full $PY benchmarks/train_step.py --remat full --max-segments 16 --no-torch --json "$OUT/train_remat_full.json"
         run train_seq8k $PY benchmarks/train_step.py --batch 1 --seq 8192 --max-segments 16 --no-torch --json "$OUT/train_seq8k.json"
         run train_seq32k $PY benchmarks/train_step.py --batch 1 --seq 32768 --remat full --loss-chunk 2048 --max-segments 16 --no-torch --json "$OUT/train_seq32k.json" ;;
  decode) T=${T:-600} run decode $PY benchmarks/decode.py --quant 0 8 4 --json "$OUT/decode.json"
          T=${T:-600} run decode_per_block $PY benchmarks/decode.py --per-block --batch-sizes 1 --no-torch --json "$OUT/decode_per_block.json" ;;
  moe) T=${T:-600} run moe_air $PY benchmarks/moe.py --shape glm-4.5-air --json "$OUT/moe_air.json" ;;  # GLM-4.5-Air expert layer
  *) log "unknown step $what" ;;
esac; done
