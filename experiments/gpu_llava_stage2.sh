#!/usr/bin/env bash
# Train the shapes-llava-stage2 recipe on a lent GPU (the device tool), from runs/shapes-llava-stage1 carried
# along, and bring the run back flat under $OUT/llava (the device returns files at most two folders down).
# Used on 2026-11-26 to get a fully trained LLaVA for the explanation measurements (docs/results.md).
set -u
export GLIMPSE_CACHE=/tmp/gcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
timeout "${TRAIN_SECONDS:-420}" python3 -m glimpse train shapes-llava-stage2 --out /tmp/llava \
    --set data.num_workers=8 "$@" 2>&1 | grep -v "it/s\]$" | tail -n 40
echo "train exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
last=$(ls -d /tmp/llava/checkpoints/step_* | sort | tail -n 1)
mkdir -p "$OUT/llava"
cp "$last/model.safetensors" "$last/state.json" "$OUT/llava/"
cp /tmp/llava/{recipe.yaml,tokenizer.json,preprocess.json,metrics.jsonl} "$OUT/llava/"
cp /tmp/llava/run.json /tmp/llava/eval.json "$OUT/llava/" 2>/dev/null
echo "checkpoint $(basename "$last")"
