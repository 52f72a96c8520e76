#!/usr/bin/env bash
# The iterative research result on the embedded task, in one command:
#   1. sft:     the SFT start (experiment=sft), unless SFT=DIR/policy names one;
#   2. sweep:   experiment=iterative_research (iterative DPO and InSPO-DPO × 3 Ψ × reference
#               initial/previous × seeds), one multirun per seed, two seeds in parallel, one
#               thread each;
#   3. report:  inspo-report by objective × reflection (spread over Ψ, reference and seeds) and
#               by iterate.reference.
#   OUT=logs/iterative_research/main benchmarks/iterative_research.sh [HYDRA OVERRIDES...]
# SEEDS="0 1" (default), STAGES="sft sweep report" (default). Extra arguments are Hydra
# overrides for every run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-logs/iterative_research/$(date +%Y-%m-%d_%H-%M-%S)}
SEEDS=${SEEDS:-0 1}
STAGES=${STAGES:-sft sweep report}
SFT=${SFT:-$OUT/sft/policy}
EXTRA=("$@")
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/iterative_research.log"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if has sft && [[ ! -e $SFT/model.safetensors ]]; then
  log "sft: training the start"
  inspo-train experiment=sft logger=csv hydra.run.dir="$OUT/sft" "${EXTRA[@]+"${EXTRA[@]}"}" \
    >"$OUT/sft.log" 2>&1 || { log "sft failed"; exit 1; }
fi
rc=0
if has sweep; then
  pids=()
  for seed in $SEEDS; do
    log "sweep: seed $seed"
    inspo-iterate -m experiment=iterative_research seed="$seed" model.name_or_path="$SFT" \
      logger=csv hydra.sweep.dir="$OUT/sweep/seed$seed" "${EXTRA[@]+"${EXTRA[@]}"}" \
      >"$OUT/sweep_seed$seed.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  log "sweep done (rc $rc)"
fi
if has report; then
  inspo-report "$OUT/sweep" --no-divergence >"$OUT/report.log" 2>&1 || rc=1
  inspo-report "$OUT/sweep" --no-divergence --group-by iterate_reference \
    --out "$OUT/by_reference" >>"$OUT/report.log" 2>&1 || rc=1
fi
log "outputs in $OUT"
exit $rc
