#!/usr/bin/env bash
# Do token-level budgets beat whole-step schedules on a trained model? On one GPU, for reference
# model v2: its cost table, a search at each speedup target over the dense schedule, each again
# with whole steps only (--levels 0,1: dense or skipped), then benchmarks/peers.py with every
# schedule found against diffusers' caches, eager and regionally compiled.
#
#   benchmarks/reference_v2_verdict.sh [TAG] [STEPS]          # the shipped weights
#   WEIGHTS=run/reference_latent.safetensors SPEEDUPS="2 3" benchmarks/reference_v2_verdict.sh h200 30
#
# Each search writes its schedule as it ends, and peers.py its table after every method, so a
# run cut short keeps what it finished.
set -euo pipefail
tag=${1:-h200}
steps=${2:-30}
results=benchmarks/results
model=(--model reference-v2 --steps "$steps" --device cuda ${WEIGHTS:+--weights "$WEIGHTS"})
stem=$results/search_reference-v2_${steps}steps_${tag}
for speedup in ${SPEEDUPS:-2 3 1.5 2.5}; do
  astraea search "${model[@]}" --costs "${stem}_costs.json" --speedup "$speedup" -o "${stem}_${speedup}x.json" --no-progress
  astraea search "${model[@]}" --costs "${stem}_costs.json" --speedup "$speedup" --levels 0,1 \
    -o "${stem}_whole-${speedup}x.json" --no-progress
done
python benchmarks/peers.py "${model[@]}" --prompts "${PROMPTS:-8}" --tag "$tag"
