# Sourced by the research scripts. parallel CMD...: run the given commands (each one string,
# word-split), JOBS at a time, each started as soon as a slot frees; name the ones that failed
# (their logs are in OUT) and return 1 at the end if any did. The failure marks carry this
# shell's PID, so two invocations on one OUT do not clear each other's.
parallel() {
  local i failed=()
  rm -f "$OUT"/.failed_$$_*
  i=0
  for job in "$@"; do
    while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do wait -n || true; done
    # shellcheck disable=SC2086
    { $job || touch "$OUT/.failed_$$_$i"; } &
    i=$((i + 1))
  done
  wait
  i=0
  for job in "$@"; do
    [[ -e $OUT/.failed_$$_$i ]] && failed+=("$job")
    i=$((i + 1))
  done
  if [[ ${#failed[@]} -gt 0 ]]; then printf 'failed: %s\n' "${failed[@]}" >&2; return 1; fi
}
