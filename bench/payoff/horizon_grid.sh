#!/usr/bin/env bash
# The payoff at a horizon past the threshold (docs/payoff.md): d 64, E 8 of F 128 top-2 against the dense model of
# equal active FLOPs, 3000 steps of 8 x 128 tokens (11.7 tokens per dense parameter), three rates that bracket both
# models' best, two seeds, and the fine-grained variant (G = 4: E 32 of F 32, top-8, the same active FLOPs).
#   bench/payoff/horizon_grid.sh OUT [CORPUS_DIR]    # CORPUS_DIR: bench/text_corpus.py's output; none: built-in
# About 6 CPU minutes per 3000-step run on an idle core; 30 runs (72,000 optimizer steps). The payoff keeps finished
# runs: rerunning the same command finishes an interrupted grid.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: bench/payoff/horizon_grid.sh OUT [CORPUS_DIR]}
corpus=()
if [ -n "${2:-}" ]; then corpus=(--train_file "$(cat "$2/train_file.txt")"); fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m moe_models.payoff --output_dir "$out" --model_config bench/payoff/d64.json "${corpus[@]}" \
  --max_steps 3000 --eval_steps 250 --logging_steps 250 --max_eval_batches 20 --disable_tqdm \
  --sweep_lrs 1e-3,2e-3,4e-3 --seeds 2 --inference_batch 0 \
  --moe_variant model_config=bench/payoff/d64_f32.json,num_experts=32,top_k=8
