#!/usr/bin/env bash
# The research result on the embedded task, in one command:
#   1. sft:      the SFT start, and a second one with reflective-layout rows (sft_fraction)
#   2. sweep:    DPO and IPO × standard/InSPO × the six Ψ × REFERENCES × SWEEP_SEEDS
#   3. remedies: InSPO-DPO (logistic Ψ, policy_init) with one remedy at a time, and the
#                two baselines it is judged against (InSPO-DPO and DPO), × SEEDS; a baseline
#                run that the sweep already made (same config, same seed) is copied, not rerun
#   4. report:   inspo-report on the sweep and on the remedies
# Every preference run ends with the evaluation stage (gold win rate vs the SFT start, LC win
# rate, lengths, KL).
#
#   benchmarks/research.sh                 # the README's grid, 2 workers, logs/research/<time>
#   SWEEP_SEEDS="0 1" REFERENCES="policy_init sync" benchmarks/research.sh   # the full grid
#   OUT=DIR STAGES="remedies report" SECONDARY_SEEDS=0 benchmarks/research.sh eval.n_prompts=256
#                       # a subset of stages; extra Hydra overrides go to every training run
#   SWEEP_ARGS="objective.scalarization=logistic,hinge" benchmarks/research.sh   # sweep only
# JOBS=2 runs two processes with one thread each (on 2 cores, more throughput than one process
# with two threads); JOBS=1 runs one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-logs/research/$(date +%Y-%m-%d_%H-%M-%S)}
STAGES=${STAGES:-"sft sweep remedies report"}
SWEEP_SEEDS=${SWEEP_SEEDS:-0}
SEEDS=${SEEDS:-"0 1"}
SECONDARY_SEEDS=${SECONDARY_SEEDS:-$SEEDS}  # for standard_weight and distill_weight
read -r -a SWEEP_ARGS <<<"${SWEEP_ARGS:-}"   # Hydra overrides for the sweep stage only
REFERENCES=${REFERENCES:-policy_init}
SFT_FRACTION=${SFT_FRACTION:-0.5}
JOBS=${JOBS:-2}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
EXTRA=("$@")
has() { [[ " $STAGES " == *" $1 "* ]]; }
log() { echo "[research $(( ($(date +%s) - t0) / 60 )) min] $*"; }
t0=$(date +%s)
if [[ $JOBS -gt 1 ]]; then export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1; fi

# shellcheck source=benchmarks/parallel.sh
source benchmarks/parallel.sh

train() {  # train LOG ARGS...: one inspo-train call, its output in OUT/LOG
  local out=$1
  shift
  # "$@" first: it may start with -m, which Hydra's parser takes only before the overrides
  inspo-train "$@" logger=csv "${EXTRA[@]+"${EXTRA[@]}"}" >"$OUT/$out" 2>&1
}
sft() {  # sft NAME [FRACTION]: with a fraction, that share of rows laid out reflectively
  local layout=()
  if [[ -n ${2:-} ]]; then layout=(reflection=sft_layout reflection.sft_fraction="$2"); fi
  train "$1.log" experiment=sft "${layout[@]+"${layout[@]}"}" hydra.run.dir="$OUT/$1"
}
# One process per objective; forms × Ψ × references in one multirun per seed.
sweep() {  # sweep OBJECTIVE
  local seed
  for seed in $SWEEP_SEEDS; do
    train "sweep_$1_seed$seed.log" -m experiment=research objective="$1" seed="$seed" \
      reference="$(echo $REFERENCES | tr ' ' ,)" model.name_or_path="$OUT/sft/policy" \
      hydra.sweep.dir="$OUT/sweep/$1_seed$seed" "${SWEEP_ARGS[@]+"${SWEEP_ARGS[@]}"}"
    log "sweep: $1 seed $seed done"
  done
}
# remedy NAME SEED ARGS...: InSPO-DPO/DPO, logistic Ψ, policy_init reference, one seed.
remedy() {
  local name=$1 seed=$2 dir="$OUT/remedies/$1/seed$2"
  shift 2
  if [[ -e $dir/summary.json ]]; then return; fi
  train "remedies_${name}_seed$seed.log" experiment=research objective=dpo \
    objective.scalarization=logistic reference=policy_init seed="$seed" \
    hydra.run.dir="$dir" "$@"
  log "remedies: $name seed $seed done"
}
# A baseline the sweep already ran (same settings and seed) is copied instead of rerun.
baseline() {  # baseline NAME SEED REFLECTION
  local run
  run=$(python - "$OUT/sweep" "$2" "$3" <<'EOF'
import json, pathlib, sys
root, seed, reflection = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for p in sorted(root.glob("dpo_seed*/*/summary.json")):
    c = json.loads(p.read_text())["choices"]
    if (c["seed"], c["reflection"], c["scalarization"], c["reference"]) == (
        seed, reflection, "logistic", "policy_init"
    ) and not c["standard_weight"] and not c["distill_weight"]:
        print(p.parent)
        break
EOF
)
  if [[ -n $run && ! -e $OUT/remedies/$1/seed$2 ]]; then
    mkdir -p "$OUT/remedies/$1"
    cp -r "$run" "$OUT/remedies/$1/seed$2"
    log "remedies: $1 seed $2 copied from $run"
  fi
  remedy "$1" "$2" reflection="$3" model.name_or_path="$OUT/sft/policy"
}

rc=0  # a failed run is named; the other stages and the report still run
if has sft; then
  parallel "sft sft" "sft sft_reflective $SFT_FRACTION" || rc=1
  log "sft done"
fi
if has sweep; then parallel "sweep dpo" "sweep ipo" || rc=1; fi
if has remedies; then
  plain="model.name_or_path=$OUT/sft/policy"
  jobs_=()
  # The remedies that the first look (README) left open first, then the rest, so that a run
  # cut short still answers the main question.
  for seed in $SEEDS; do
    jobs_+=(
      "remedy sft_fraction $seed reflection=inspo model.name_or_path=$OUT/sft_reflective/policy"
      "remedy plain_context $seed reflection=inspo reflection.reference_context=plain $plain"
      "baseline inspo $seed inspo"
      "baseline dpo $seed off"
    )
  done
  for seed in $SECONDARY_SEEDS; do
    jobs_+=(
      "remedy standard_weight $seed reflection=inspo reflection.standard_weight=0.5 $plain"
      "remedy distill_weight $seed reflection=inspo reflection.distill_weight=0.1 $plain"
    )
  done
  parallel "${jobs_[@]}" || rc=1
fi
if has report; then
  inspo-report "$OUT/sweep"
  inspo-report "$OUT/remedies" --group-by model,standard_weight,distill_weight,reference_context
fi
log "outputs in $OUT"
exit $rc
