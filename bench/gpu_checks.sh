#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one call of a lent GPU machine (its torch and transformers,
# glimpse from the working tree): the CUDA tests, then issue 25's MFU and bandwidth figures (eager, then
# compiled), then the captioner against transformers with a compiled step, then a short bf16 training run.
# Each step has its own time limit, so that one slow step cannot take the others' time.
#   bash bench/gpu_checks.sh [OUTDIR]
out=${1:-${OUT:-/tmp/gpu_checks}}
mkdir -p "$out"
export PYTHONPATH=$PWD:$PWD/bench PYTHONUNBUFFERED=1
step() {  # step SECONDS NAME COMMAND...: the command's output in $out/NAME.log and on stdout
    local limit=$1 name=$2; shift 2
    echo "=== $name ($(date -u +%T), limit ${limit}s): $*"
    local t=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(|^\s*$" | tee "$out/$name.log" | tail -n 25
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step 90 cuda-tests python3 -m pytest -q -p no:cacheprovider tests/test_generate.py tests/test_explain_use.py -k "cuda"
step 100 hw-eager python3 bench/hw_efficiency.py --size base
step 200 hw-compiled python3 bench/hw_efficiency.py --size base --compile --compile-decode
step 110 captioner python3 bench/captioner_vs_transformers.py --size base --precision bf16 --steps 6 --new-tokens 32 --compile
step 40 train-smoke python3 -m glimpse train shapes-clip-demo --out /tmp/gx --set train.max_steps=30 \
    --set data.train_size=600 --set data.test_size=100 --set train.precision=bf16 --set train.eval_every=30 \
    --set train.save_every=30
