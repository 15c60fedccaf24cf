#!/usr/bin/env bash
# Train, on a lent GPU, the two ablation models of the explanation study (docs/results.md, 2026-11-26):
# shapes-fusion-pretrain with 8-px patches (an 8 x 8 map instead of 4 x 4) and shapes-clip with a class
# token (pool: cls) instead of mean pooling.  Each run comes back as a tar of its final weights, recipe,
# tokenizer, preprocessing and figures (the device returns at most 8 files).
set -u
export GLIMPSE_CACHE=/tmp/gcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "from glimpse.config import load_recipe; from glimpse.train.trainer import data_root; data_root(load_recipe('shapes-clip'), False)"
pack() {  # run folder -> $OUT/NAME.tar holding a one-checkpoint run
    local run=$1 name=$2 last
    last=$(ls -d "$run"/checkpoints/step_* | sort | tail -n 1) || return
    mkdir -p "/tmp/pack/$name/checkpoints/$(basename "$last")"
    cp "$last/model.safetensors" "$last/state.json" "/tmp/pack/$name/checkpoints/$(basename "$last")/"
    cp "$run"/{recipe.yaml,tokenizer.json,preprocess.json,run.json,eval.json} "/tmp/pack/$name/" 2>/dev/null
    tar -C /tmp/pack -cf "$OUT/$name.tar" "$name"
}
start=$(date +%s)
timeout 170 python3 -m glimpse train shapes-fusion-pretrain --out /tmp/fusion8 --set model.vision.patch_size=8 \
    --set data.num_workers=8 > "$OUT/fusion8.log" 2>&1
echo "fusion8 exit $? at $(( $(date +%s) - start )) s"; pack /tmp/fusion8 fusion8
timeout 240 python3 -m glimpse train shapes-clip --out /tmp/clipcls --set model.vision.pool=cls \
    --set model.vision.class_token=true --set data.num_workers=8 > "$OUT/clipcls.log" 2>&1
echo "clipcls exit $? at $(( $(date +%s) - start )) s"; pack /tmp/clipcls clipcls
tail -c 1500 "$OUT/fusion8.log"; tail -c 1500 "$OUT/clipcls.log"
