#!/usr/bin/env bash
# The wheels the GPU check needs on a GPU machine without network (benchmarks/README.md, "GPU
# check"), downloaded here into .whl/ (ignored by git) at the versions of requirements/lock.txt.
#
# The GPU image has torch, lightning, pandas, pyarrow, xxhash, fsspec, tokenizers, safetensors,
# numpy and pytest. What inspo and TRL need beyond it: hydra-core, omegaconf, antlr4 (configs,
# the FSDP test's inspo-train run), datasets, dill, multiprocess (TRL's DPOTrainer), trl,
# transformers 5.25 with its huggingface_hub 2.4 and that one's HTTP client (the image's
# transformers 5.17 is older than inspo supports), regex (transformers checks its version at
# import), accelerate and peft at the lock's versions. Not carried: wandb (optional for TRL,
# unused: no logger), vLLM (its wheel alone is over the 64 MiB that may travel), flash_attn.
#
#   bash benchmarks/gpu_wheels.sh                     # Python 3.12 (the GPU image's), x86-64
#   GPU_PYTHON_VERSION=3.11 bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON_VERSION:-3.12}
NAMES=(hydra-core omegaconf datasets dill multiprocess trl transformers huggingface_hub
       httpx2 httpcore2 truststore regex accelerate peft)
LIMIT_MIB=64

version() {  # the lock's exact version of a package (names compared case- and -/_-blind)
  local want; want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  while IFS='=' read -r name _ ver; do
    [ "$(echo "$name" | tr 'A-Z_' 'a-z-')" = "$want" ] && { echo "$ver"; return; }
  done < <(grep -v '^#' requirements/lock.txt)
  echo "not in requirements/lock.txt: $1" >&2; exit 1
}

rm -rf .whl && mkdir -p .whl
for name in "${NAMES[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$name==$(version "$name")"
done
# antlr4's runtime 4.9.3 (what omegaconf 2.3 pins) is only an sdist on PyPI: pure Python, built
# into a wheel here so that the GPU machine installs it without a build step.
python3 -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"

echo "wheels in .whl/ (Python $PY, x86-64):"
ls -l .whl | awk 'NR>1 {printf "  %-60s %8.2f MiB\n", $9, $5/1048576}'
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
code=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((wheels + code))
printf "wheels %.1f MiB + tracked files %.1f MiB = %.1f MiB (limit %d MiB)\n" \
  "$(echo "$wheels/1048576" | bc -l)" "$(echo "$code/1048576" | bc -l)" \
  "$(echo "$total/1048576" | bc -l)" "$LIMIT_MIB"
[ "$total" -lt $((LIMIT_MIB * 1048576)) ] || { echo "over the limit" >&2; exit 1; }
