#!/usr/bin/env bash
# The research result on the embedded task, in one command (issue 5):
#   SFT (plain, and with reflective-layout rows) → the research sweep (DPO/IPO × standard/InSPO
#   × 6 Ψ × {policy_init, sync} × 2 seeds, 96 runs) → the remedies sweep (16 runs per SFT
#   start) → inspo-report on both. Each preference run ends with the evaluation stage.
#
#   benchmarks/research.sh                       # everything, into logs/research/<timestamp>
#   OUT=DIR STAGES="sft sweep report" benchmarks/research.sh seed=0   # a subset; extra
#                                                # Hydra overrides go to every training run
#   SWEEP_ARGS="seed=0 reference=policy_init" ...   # overrides for the two sweeps only
# A grid that fits ~90 min on 2 idle cores (see docs/evaluation.md for the estimate):
#   SWEEP_ARGS="seed=0 reference=policy_init eval.n_prompts=128" \
#     benchmarks/research.sh model.tiny.hidden_size=128
# Wall time: see docs/evaluation.md ("The research preset") for the measured per-run cost.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-logs/research/$(date +%Y-%m-%d_%H-%M-%S)}
STAGES=${STAGES:-"sft sweep remedies report"}
SFT_FRACTION=${SFT_FRACTION:-0.5}
read -r -a SWEEP <<< "${SWEEP_ARGS:-}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
has() { [[ " $STAGES " == *" $1 "* ]]; }
t0=$(date +%s)

if has sft; then
  inspo-train experiment=sft logger=csv hydra.run.dir="$OUT/sft" "$@"
  inspo-train experiment=sft logger=csv reflection.sft_fraction="$SFT_FRACTION" \
    hydra.run.dir="$OUT/sft_reflective" "$@"
fi
if has sweep; then
  inspo-train -m experiment=research logger=csv model.name_or_path="$OUT/sft/policy" \
    hydra.sweep.dir="$OUT/sweep" "$@" ${SWEEP[@]+"${SWEEP[@]}"}
fi
if has remedies; then
  inspo-train -m experiment=research_remedies logger=csv \
    model.name_or_path="$OUT/sft/policy,$OUT/sft_reflective/policy" \
    hydra.sweep.dir="$OUT/remedies" "$@" ${SWEEP[@]+"${SWEEP[@]}"}
fi
if has report; then
  inspo-report "$OUT/sweep"
  inspo-report "$OUT/remedies" --group-by model,standard_weight,distill_weight,reference_context
fi
echo "research: $(( ($(date +%s) - t0) / 60 )) min; outputs in $OUT"
