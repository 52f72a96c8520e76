#!/usr/bin/env bash
# The tuned head-to-head of DPO and InSPO-DPO on the built-in task, in one command:
#   sft:     one SFT start per seed (experiment=sft seed=S). Seeds differ in the start, the data
#            order and the sampling; DPO and InSPO-DPO share each seed's start.
#   tune:    each method's Optuna search (experiment=tune_dpo, tune_inspo: the same sampler,
#            seed and number of trials) from the first seed's start, every trial scored on the
#            tuning prompts, never on the test prompts;
#   tuned:   each method's best trial (OUT/tune/METHOD/optimization_results.yaml) rerun with
#            every seed from that seed's start, scored on the test prompts (experiment=fair);
#   untuned: both methods with DPO's demo hyperparameters (experiment=fair as it is);
#   report:  inspo-report OUT --head-to-head (OUT/head_to_head.md: trials, best configurations,
#            paired differences with t and bootstrap intervals), and the invariance report of
#            the tuned runs (OUT/tuned/report.md).
#
#   OUT=logs/fair/main benchmarks/fair.sh [HYDRA OVERRIDES for every run]
#   SEEDS="0 1 2" (default), N_TRIALS (default: the sweep file's), JOBS=2,
#   STAGES="sft tune tuned untuned report" (default), LOOP=offline (default) | iterative
# LOOP=iterative runs the same with inspo-iterate (experiment=tune_iterative_dpo,
# tune_iterative_inspo, fair_iterative). JOBS=2 runs two processes with one thread each.
# Rerunning the command continues where it stopped, and more SEEDS add only their runs:
# finished runs and searches are kept; a search without its optimization_results.yaml starts
# again with ckpt_path=last (its finished trials are re-evaluated, not retrained, and lead to
# the same next trials).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-logs/fair/$(date +%Y-%m-%d_%H-%M-%S)}
SEEDS=${SEEDS:-0 1 2}
STAGES=${STAGES:-sft tune tuned untuned report}
JOBS=${JOBS:-2}
LOOP=${LOOP:-offline}
EXTRA=("$@")
mkdir -p "$OUT/logs" "$OUT/sft" "$OUT/tune"
OUT=$(cd "$OUT" && pwd)
read -r -a seeds <<<"$SEEDS"
FIRST=${seeds[0]}
TRIALS=()
if [[ -n ${N_TRIALS:-} ]]; then TRIALS=("hydra.sweeper.n_trials=$N_TRIALS"); fi
case $LOOP in
  offline) ENTRY=inspo-train SETTING=fair TUNE=tune ;;
  iterative) ENTRY=inspo-iterate SETTING=fair_iterative TUNE=tune_iterative ;;
  *) echo "LOOP must be offline or iterative, not $LOOP" >&2; exit 2 ;;
esac
if [[ $JOBS -gt 1 ]]; then export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1; fi
# The SFT starts are inspo-train runs: the loop's own settings (iterate, generation, judge,
# pairing), which an iterative head-to-head passes to every run, are not theirs to take.
SFT_EXTRA=()
for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  case ${arg#"${arg%%[!+~]*}"} in  # the key, without a leading + or ~
    iterate[.=/]* | generation[.=/]* | judge[.=/]* | pairing[.=/]*) ;;
    *) SFT_EXTRA+=("$arg") ;;
  esac
done
t0=$(date +%s)
log() { echo "[fair $(( ($(date +%s) - t0) / 60 )) min] $*" | tee -a "$OUT/fair.log"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
# shellcheck source=benchmarks/parallel.sh
source benchmarks/parallel.sh
finished() { [[ -e $1/summary.json ]] && grep -q '"status": "finished"' "$1/summary.json"; }
reflection() { if [[ $1 == inspo ]]; then echo inspo; else echo off; fi; }

# Each job starts what it needs: a run trains its seed's SFT start if no job has (one job per
# seed at a time, under a lock); a tuned run waits for its method's search (under the search's
# lock). So one queue keeps both workers busy, whichever job ends first.
sft() {  # sft SEED
  local dir=$OUT/sft/seed$1
  {
    flock 7
    if [[ -e $dir/policy/model.safetensors ]]; then return; fi
    inspo-train experiment=sft seed="$1" ckpt_path=last logger=csv hydra.run.dir="$dir" \
      "${SFT_EXTRA[@]+"${SFT_EXTRA[@]}"}" >"$OUT/logs/sft_seed$1.log" 2>&1 && log "sft: seed $1 done"
  } 7>"$OUT/sft/.lock_seed$1"
}
best() {  # best METHOD: the best trial's overrides, one word each
  python -c 'import sys; from omegaconf import OmegaConf as C
print(" ".join(f"{k}={v}" for k, v in C.load(sys.argv[1]).best_params.items()))' \
    "$OUT/tune/$1/optimization_results.yaml"
}
search() {  # search METHOD (dpo | inspo)
  local dir=$OUT/tune/$1
  {
    flock 8
    if [[ -e $dir/optimization_results.yaml ]]; then return; fi
    sft "$FIRST" || return 1
    # -m first: Hydra's parser takes it only before the overrides
    $ENTRY -m experiment="${TUNE}_$1" seed="$FIRST" \
      model.name_or_path="$OUT/sft/seed$FIRST/policy" ckpt_path=last logger=csv \
      hydra.sweep.dir="$dir" "${TRIALS[@]+"${TRIALS[@]}"}" "${EXTRA[@]+"${EXTRA[@]}"}" \
      >"$OUT/logs/tune_$1.log" 2>&1 && log "tune: $1 done, best trial: $(best "$1")"
  } 8>"$OUT/tune/.lock_$1"
}
evaluate() {  # evaluate SETTING METHOD SEED [OVERRIDES...]: one run on the test prompts
  local dir=$OUT/$1/$2/seed$3 name=$1_$2_seed$3 method=$2 seed=$3
  shift 3
  if finished "$dir"; then return; fi
  sft "$seed" || return 1
  $ENTRY experiment="$SETTING" reflection="$(reflection "$method")" seed="$seed" \
    model.name_or_path="$OUT/sft/seed$seed/policy" ckpt_path=last logger=csv \
    hydra.run.dir="$dir" "$@" "${EXTRA[@]+"${EXTRA[@]}"}" >"$OUT/logs/$name.log" 2>&1 &&
    log "$name done"
}
tuned() {  # tuned METHOD SEED: the method's best trial on the test prompts
  { flock 8; } 8>"$OUT/tune/.lock_$1"  # waits while the search runs
  if [[ ! -e $OUT/tune/$1/optimization_results.yaml ]]; then
    log "tuned: no finished search for $1 in $OUT/tune/$1"
    return 1
  fi
  # shellcheck disable=SC2046  # one word per override
  evaluate tuned "$1" "$2" $(best "$1")
}

{
  echo "command: OUT=$OUT SEEDS=\"$SEEDS\" N_TRIALS=${N_TRIALS:-} LOOP=$LOOP STAGES=\"$STAGES\" benchmarks/fair.sh ${EXTRA[*]}"
  echo "commit: $(git rev-parse HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo ' with uncommitted changes')"
  echo "started: $(date -Is) on$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
} >>"$OUT/fair.log"
# One queue: the first two SFT starts, the searches (InSPO's, the longer, first), the other
# starts, DPO's tuned runs, the untuned runs, and InSPO's tuned runs last: a job waiting for a
# search holds a worker, and InSPO's search (4 × DPO's cost per trial) ends last.
jobs_=()
if has sft; then for seed in "${seeds[@]:0:2}"; do jobs_+=("sft $seed"); done; fi
if has tune; then jobs_+=("search inspo" "search dpo"); fi
if has sft; then for seed in "${seeds[@]:2}"; do jobs_+=("sft $seed"); done; fi
if has tuned; then for seed in "${seeds[@]}"; do jobs_+=("tuned dpo $seed"); done; fi
if has untuned; then
  for method in inspo dpo; do
    for seed in "${seeds[@]}"; do jobs_+=("evaluate untuned $method $seed"); done
  done
fi
if has tuned; then for seed in "${seeds[@]}"; do jobs_+=("tuned inspo $seed"); done; fi
rc=0
if [[ ${#jobs_[@]} -gt 0 ]]; then parallel "${jobs_[@]}" || rc=1; fi
if has report; then
  inspo-report "$OUT" --head-to-head >"$OUT/logs/report.log" 2>&1 || rc=1
  if [[ -d $OUT/tuned ]]; then
    inspo-report "$OUT/tuned" --no-divergence >>"$OUT/logs/report.log" 2>&1 || rc=1
  fi
fi
times >"$OUT/.times"  # in this shell, not a subshell: the CPU time of every waited-for run
cpu=$(tail -n 1 "$OUT/.times" | awk '{for (i = 1; i <= 2; i++) { split($i, a, "m");
  sub("s", "", a[2]); s += a[1] * 60 + a[2] } printf "%.0f", s}')
log "finished (rc $rc) $(date -Is); CPU time of this invocation's runs: $cpu s"
log "outputs in $OUT"
exit $rc
