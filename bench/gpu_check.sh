#!/usr/bin/env bash
# bench/gpu_check.sh — the GPU checks of one session, as one script (a GPU machine is lent only now and then):
#   1. the quick start on the GPU (CUDA training with the seed's --fp16 = fp16 autocast + GradScaler,
#      generation, evaluation) — the user's path end to end;
#   2. bench_train.py on musicgen-small's architecture at 30-s clips, batch 2: bf16, bf16 + gradient
#      checkpointing, fp16, fp32, and the fp32 encode-every-step mode;
#   3. bench_train.py on musicgen-medium and -large architectures, bf16 + gradient checkpointing (peak memory);
#   4. tests/modeling/test_cuda_decoding.py (the CUDA-graph decoder against transformers' forward and generate);
#   5. bench_generate.py on musicgen-small's architecture: base / unmerged / merged with decoding cuda_graph
#      (the GPU default), batch 1 and 8, plus the base model with transformers' own decoder call;
#   6. (not in the default PARTS: about 10 min on its own) bench_train.py at 30-s clips, batch 2, bf16, eager
#      against training.torch_compile (static shapes; the first, compiling steps are warm-up): train_compile_small
#      (small; plus compile_mode reduce-overhead = CUDA graphs, "+compile-ro") and train_compile_medium_large
#      (medium, large).
#      PARTS="train_compile_small train_compile_medium_large" bash bench/gpu_check.sh
#   7. (not in the default PARTS) cold_start: train_lora.py as a whole process on musicgen-small's architecture,
#      12 steps, with bench_train.py --cold_start's breakdown (start-up, load, token cache on the GPU, LoRA set-up,
#      first step, steady step): PARTS=cold_start bash bench/gpu_check.sh
# Each part has its own time limit and writes its own files, so one failing part does not lose the others.
#
#   OUT=/some/folder bash bench/gpu_check.sh          # results and logs go to $OUT
#   PARTS="cuda_tests generate" bash bench/gpu_check.sh   # only some parts
# Python packages the GPU image lacks (or has in other versions) can be put as wheels in .whl/ (see
# BENCHMARKS.md, "GPU"); they are installed into /tmp/site first.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
if [ "${WHEELS:-1}" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHON="$PY"  # quick_start.sh runs "$PYTHON"

part() {  # part NAME SECONDS COMMAND... : run with a time limit, log to $OUT/NAME.log, report the exit status
  local name="$1" limit="$2"; shift 2
  local t0; t0=$(date +%s)
  echo "=== $name (limit ${limit} s) ==="
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 )) s ==="
  tail -n "${TAIL:-40}" "$OUT/$name.log"
}

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, transformers, peft, accelerate, soundfile, soxr, librosa; print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported()); \
print('transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/env.txt"

PARTS="${PARTS:-quick_start train_small train_medium_large cuda_tests generate}"
want() { [[ " $PARTS " == *" $1 "* ]]; }

want quick_start && TAIL=25 part quick_start "${QS_LIMIT:-130}" bash quick_start.sh
want train_small && part train_small "${TS_LIMIT:-150}" "$PY" bench/bench_train.py --models small --seconds 30 --steps 5 --warmup 2 \
  --cases cached-bf16,cached-bf16+ckpt,cached-fp16,cached-fp32,encode-fp32 --json "$OUT/train_small.json"
want train_medium_large && part train_medium_large "${TL_LIMIT:-170}" "$PY" bench/bench_train.py --models medium,large --seconds 30 --steps 4 \
  --warmup 2 --cases cached-bf16+ckpt --no_flop_check --json "$OUT/train_medium_large.json"
want cuda_tests && part cuda_tests "${CT_LIMIT:-90}" "$PY" -m pytest -q -p no:cacheprovider tests/modeling/test_cuda_decoding.py
want generate && part generate "${G_LIMIT:-170}" "$PY" bench/bench_generate.py --models small --rounds 2 \
  --decodings cuda_graph --json "$OUT/generate.json"
want generate && part generate_transformers "${GT_LIMIT:-70}" "$PY" bench/bench_generate.py --models small \
  --variants base --decodings transformers --no_paired --json "$OUT/generate_transformers.json"
RO_CASE=""  # the reduce-overhead case only where bench_train.py sets training.compile_mode from the case's flags
grep -q "cfg.training.compile_mode" bench/bench_train.py && RO_CASE=",cached-bf16+compile-ro"
want train_compile_small && part train_compile_small "${TCS_LIMIT:-240}" "$PY" bench/bench_train.py --models small \
  --seconds 30 --batch 2 --steps 5 --warmup 3 --cases "cached-bf16,cached-bf16+compile$RO_CASE" \
  --json "$OUT/train_compile_small.json"
want cold_start && part cold_start "${CS_LIMIT:-200}" "$PY" bench/bench_train.py --cold_start --models small \
  --steps 12 --json "$OUT/cold_start.json"
want train_compile_medium_large && part train_compile_medium_large "${TCL_LIMIT:-400}" "$PY" bench/bench_train.py \
  --models medium,large --seconds 30 --batch 2 --steps 4 --warmup 3 --cases cached-bf16,cached-bf16+compile \
  --no_flop_check --json "$OUT/train_compile_medium_large.json"
