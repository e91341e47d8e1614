#!/usr/bin/env bash
# quick_start.sh — the whole path in one go: data -> model check -> LoRA training -> generation -> evaluation.
#
#   bash quick_start.sh                       built-in tiny model + synthetic example data; CPU, no network,
#                                             a few minutes; the audio is noise (random model) but every step
#                                             and artifact is real
#   MODEL=facebook/musicgen-small bash quick_start.sh
#                                             the real model (hub id or local folder) on a GPU, with settings
#                                             for a real run (add INPUT_DIR=/path/to/your/audio for your music)
#   bash quick_start.sh --learning_rate 1e-4  extra arguments are passed to train_lora.py
#
# Environment: MODEL (default tiny), INPUT_DIR (your audio; default: the synthetic example set),
# DATA_DIR (default output/quick_start/data), OUTPUT_DIR (default output/quick_start), PROMPT (text for
# the generation step), PYTHON (default python). Run from anywhere; paths are relative to this folder.
# Everything it makes stays in output/quick_start/, so data/ and output/ are free for your own first run
# (the plan's `python train_lora.py ... --output_dir ../output`), and running it again starts over.
set -Eeuo pipefail
case "${1:-}" in -h|--help) sed -n '2,16p' "$0"; exit 0 ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")"

MODEL="${MODEL:-tiny}"
INPUT_DIR="${INPUT_DIR:-}"
DATA_DIR="${DATA_DIR:-output/quick_start/data}"
OUT="${OUTPUT_DIR:-output/quick_start}"
PY="${PYTHON:-python}"
step="start"
trap 'echo; echo "quick_start.sh FAILED at step: ${step}. The messages above say why; fix it and run again." >&2' ERR

banner() { step="$1"; echo; echo "=== [$(date +%H:%M:%S)] ${step} ==="; }
start=$(date +%s)

if [ "$MODEL" = "tiny" ] || [ "$MODEL" = "tiny-stereo" ]; then
  # The plan's training settings (rank 12, alpha 24, lr 3e-4, batch 2 x 4, 5 epochs, fp16 -> bf16/fp32 on a CPU)
  # on the example set (160 clips of 6 s): 90 steps; eval_steps/save_steps auto = every 10 steps.
  PREP=()
  TRAIN=(--num_epochs 5 --batch_size 2 --gradient_accumulation_steps 4 --learning_rate 3e-4 --warmup_steps 100
         --lora_rank 12 --lora_alpha 24 --fp16 --logging_steps 5)
  GEN=(--duration 4 --num_samples 2)
  EVAL=(--num_prompts 4 --eval_duration 4 --eval_seeds 2)
  PROMPT="${PROMPT:-techno drum loop with kick snare and hihat, 128 BPM}"
else
  # A real model on a GPU: the plan's settings (rank 12, alpha 24, lr 3e-4, batch 2 x 4, 5 epochs, warmup 100).
  PREP=()
  TRAIN=(--num_epochs 5 --batch_size 2 --gradient_accumulation_steps 4 --learning_rate 3e-4 --warmup_steps 100
         --lora_rank 12 --lora_alpha 24 --gradient_checkpointing)
  GEN=(--duration 15 --num_samples 2)
  EVAL=(--num_prompts 8 --eval_duration 10 --eval_seeds 2)
  PROMPT="${PROMPT:-hip hop 808 beat with trap drums}"
fi

banner "1/5 data"
if [ -n "$INPUT_DIR" ]; then
  "$PY" lora/prepare_data.py --input_dir "$INPUT_DIR" --output_dir "$DATA_DIR" --metadata_file metadata.json
else
  "$PY" lora/prepare_data.py --create_example --output_dir "$DATA_DIR" "${PREP[@]}"
fi
"$PY" lora/test_dataset.py --data_dir "$DATA_DIR"

banner "2/5 model ($MODEL)"
"$PY" lora/test_model.py --model_path "$MODEL"

# A flag you pass replaces the quick start's own value for it (train_lora.py refuses a flag given twice).
given() { local f="$1" a; shift; for a in "$@"; do [ "$a" = "$f" ] || [[ "$a" == "$f="* ]] && return 0; done; return 1; }
OWN=()
for ((i = 0; i < ${#TRAIN[@]}; i++)); do
  f="${TRAIN[$i]}"; v=()
  if (( i + 1 < ${#TRAIN[@]} )) && [[ "${TRAIN[$((i + 1))]}" != --* ]]; then v=("${TRAIN[$((i + 1))]}"); i=$((i + 1)); fi
  given "$f" "$@" || OWN+=("$f" "${v[@]}")
done

banner "3/5 LoRA training"
"$PY" lora/train_lora.py --model_path "$MODEL" --data_dir "$DATA_DIR" --metadata_file metadata.json \
  --output_dir "$OUT" --overwrite_output_dir "${OWN[@]}" "$@"

banner "4/5 generation"
"$PY" lora/inference_lora.py --base_model_path "$MODEL" --lora_model_path "$OUT/best_model" \
  --prompts "$PROMPT" --output_dir "$OUT/generated" --overwrite "${GEN[@]}"

banner "5/5 evaluation (base vs LoRA)"
"$PY" lora/evaluate.py --base_model_path "$MODEL" --lora_model_path "$OUT/best_model" --data_dir "$DATA_DIR" \
  --output_dir "$OUT/evaluation" --compare "${EVAL[@]}"

step="done"
echo
echo "=== quick start finished in $(( $(date +%s) - start )) s ==="
echo "  generated audio : $OUT/generated/ (manifest.json lists every file)"
echo "  loss plot       : $OUT/logs/loss_curve.png"
echo "  training samples: $OUT/samples/ (step-000000 = the base model; the newest folder = the adapter now)"
echo "  report          : $OUT/evaluation/report.html (open in a browser: players, spectrograms, metrics)"
echo "  adapter         : $OUT/best_model (standard PEFT adapter)"
