#!/usr/bin/env bash
# The GPU checks of the grouped expert path, as one run (written for one H200; not yet run on a GPU):
#   1. the dropless and capacity paths never synchronise with the host (tests/moe/test_grouped_layer.py, set_sync_debug_mode "error");
#   2. bench/moe_layer.py --gpu: the three layer shapes of the design notes, bf16, 16384 tokens;
#   3. tests/training/test_bf16.py, tests/moe/test_compile.py: a bf16 run through train.py, its exact resume and
#      its export; the MoE layer traced by torch.compile without a graph break;
#   4. bench/train_step.py --gpu: the reference LM step (d1024 f3584 L8 E8 k2, 8 x 2048 tokens), tokens/s and MFU;
#   5. the compiled path: train.py --compile beside the same eager run (20 steps, bf16 by the shipped JSON's "auto"),
#      their logged losses side by side, and bench/compile_step.py --gpu, the compiled / eager step time.
# Logs go to $OUT (default: gpu_checks/); the tables are printed last. On a machine without deepspeed installed,
# put its wheels in .whl/ first (see the device notes of the workplace) and this script installs them to /tmp/site.
set -uo pipefail
OUT=${OUT:-gpu_checks}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
python3 -m pytest -q -p no:cacheprovider tests/moe/test_grouped_layer.py -k "no_host_sync or equals_stock" > "$OUT/sync_test.log" 2>&1
echo "sync + equality tests: exit $?" | tee -a "$OUT/versions.txt"
python3 -m pytest -q -p no:cacheprovider tests/training/test_bf16.py tests/moe/test_compile.py > "$OUT/bf16_test.log" 2>&1
echo "bf16 + compile tests: exit $?" | tee -a "$OUT/versions.txt"
python3 bench/moe_layer.py --gpu > "$OUT/moe_layer.log" 2>&1; echo "moe_layer: exit $?"
python3 bench/train_step.py --gpu --rounds 3 --steps 5 > "$OUT/train_step.log" 2>&1; echo "train_step: exit $?"
RUN=(--max_steps 20 --logging_steps 5 --eval_steps 0 --max_eval_batches 2 --disable_tqdm --overwrite_output_dir)
python3 train.py "${RUN[@]}" --output_dir "$OUT/eager_run" > "$OUT/eager_run.log" 2>&1; echo "eager train.py run: exit $?"
python3 train.py "${RUN[@]}" --compile --output_dir "$OUT/compiled_run" > "$OUT/compiled_run.log" 2>&1
echo "compiled train.py run: exit $?"
python3 bench/compile_step.py --gpu > "$OUT/compile_step.log" 2>&1; echo "compile_step: exit $?"
tail -n 3 "$OUT/sync_test.log" "$OUT/bf16_test.log"; grep '^|\|^torch' "$OUT/moe_layer.log" "$OUT/train_step.log" \
    "$OUT/compile_step.log"
for run in eager_run compiled_run; do  # the losses of the two runs, step by step
    echo "$run: $(python3 -c "import json, sys; print([round(r['loss'], 4) for r in map(json.loads, open(sys.argv[1]))
if 'loss' in r])" "$OUT/$run/metrics.jsonl" 2>/dev/null)"
done
