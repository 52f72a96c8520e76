#!/usr/bin/env bash
# The research result on the embedded task, in one command (issue 5):
#   SFT → the research sweep (DPO/IPO × standard/InSPO
#   × 6 Ψ × REFERENCES × SEEDS) → the remedies (InSPO-DPO with one SPEC §6 remedy at a time,
#   against InSPO-DPO and DPO, × SEEDS; the sft_fraction remedy first trains its own SFT start
#   with reflective-layout rows) → inspo-report on both. Each preference run ends with
#   the evaluation stage.
#
#   benchmarks/research.sh                 # the README's grid, 2 workers, logs/research/<time>
#   REFERENCES="policy_init sync" SEEDS="0 1 2" benchmarks/research.sh   # a bigger grid
#   OUT=DIR STAGES="sweep report" benchmarks/research.sh eval.n_prompts=256
#                                          # a subset of stages; extra Hydra overrides go to
#                                          # every training run
# JOBS=2 splits each sweep across two processes with one thread each (on 2 cores this is
# ~1.6× the throughput of one 2-thread process); JOBS=1 runs everything in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-logs/research/$(date +%Y-%m-%d_%H-%M-%S)}
STAGES=${STAGES:-"sft sweep remedies report"}
SEEDS=${SEEDS:-"0 1"}
REFERENCES=${REFERENCES:-policy_init}
SFT_FRACTION=${SFT_FRACTION:-0.5}
JOBS=${JOBS:-2}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
has() { [[ " $STAGES " == *" $1 "* ]]; }
csv() { echo "$*" | tr ' ' ','; }
t0=$(date +%s)
if [[ $JOBS -gt 1 ]]; then export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1; fi

# Run the given functions, JOBS at a time, each started as soon as a slot frees; report the
# ones that failed (their logs are in OUT) and fail at the end.
parallel() {
  local job failed=()
  rm -f "$OUT"/.failed_*
  for job in "$@"; do
    while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do wait -n || true; done
    { "$job" || touch "$OUT/.failed_$job"; } &
  done
  wait
  for job in "$@"; do [[ -e $OUT/.failed_$job ]] && failed+=("$job"); done
  if [[ ${#failed[@]} -gt 0 ]]; then echo "failed: ${failed[*]}" >&2; return 1; fi
}
log() { echo "[research $(( ($(date +%s) - t0) / 60 )) min] $*"; }

sft_plain() {
  inspo-train experiment=sft logger=csv hydra.run.dir="$OUT/sft" "${EXTRA[@]+"${EXTRA[@]}"}" >"$OUT/sft.log" 2>&1
}
sft_reflective() {
  inspo-train experiment=sft logger=csv reflection.sft_fraction="$SFT_FRACTION" \
    hydra.run.dir="$OUT/sft_reflective" "${EXTRA[@]+"${EXTRA[@]}"}" >"$OUT/sft_reflective.log" 2>&1
}
# One process per objective; each sweeps forms × Ψ × references, a seed at a time, so a run
# stopped early still holds whole seeds.
sweep_objective() {
  local obj=$1 seed
  shift
  for seed in $SEEDS; do
    inspo-train -m experiment=research logger=csv objective="$obj" seed="$seed" \
      reference="$(csv $REFERENCES)" model.name_or_path="$OUT/sft/policy" \
      hydra.sweep.dir="$OUT/sweep/${obj}_seed$seed" "$@" >"$OUT/sweep_${obj}_seed$seed.log" 2>&1
    log "sweep: $obj seed $seed done"
  done
}
sweep_dpo() { sweep_objective dpo "${EXTRA[@]+"${EXTRA[@]}"}"; }
sweep_ipo() { sweep_objective ipo "${EXTRA[@]+"${EXTRA[@]}"}"; }

# Remedies one at a time (a full factorial is 4× the runs): each variant × SEEDS, plus the two
# baselines it is judged against (InSPO-DPO without remedies, and DPO) at the same settings.
remedy() {
  local name=$1
  shift
  inspo-train -m experiment=research logger=csv objective=dpo objective.scalarization=logistic \
    reference=policy_init seed="$(csv $SEEDS)" hydra.sweep.dir="$OUT/remedies/$name" \
    "$@" "${EXTRA[@]+"${EXTRA[@]}"}" >"$OUT/remedies_$name.log" 2>&1
  log "remedies: $name done"
}
plain_sft="model.name_or_path=$OUT/sft/policy"
remedy_dpo() { remedy dpo reflection=off "$plain_sft"; }
remedy_inspo() { remedy inspo reflection=inspo "$plain_sft"; }
remedy_plain_context() { remedy plain_context reflection=inspo reference.context=plain "$plain_sft"; }
remedy_standard_weight() { remedy standard_weight reflection=inspo reflection.standard_weight=0.5 "$plain_sft"; }
remedy_distill_weight() { remedy distill_weight reflection=inspo reflection.distill_weight=0.1 "$plain_sft"; }
remedy_sft_fraction() {  # its own SFT start first (3× the plain SFT's time: longer rows)
  [[ -d $OUT/sft_reflective/policy ]] || sft_reflective
  remedy sft_fraction reflection=inspo model.name_or_path="$OUT/sft_reflective/policy"
}

EXTRA=("$@")
if has sft; then
  sft_plain
  log "sft done"
fi
rc=0  # a failed run is reported; the other stages and the report still run
if has sweep; then parallel sweep_dpo sweep_ipo || rc=1; fi
if has remedies; then
  parallel remedy_sft_fraction remedy_inspo remedy_plain_context remedy_standard_weight \
    remedy_distill_weight remedy_dpo || rc=1
fi
if has report; then
  inspo-report "$OUT/sweep"
  inspo-report "$OUT/remedies" --group-by model,standard_weight,distill_weight,reference_context
fi
log "outputs in $OUT"
exit $rc
