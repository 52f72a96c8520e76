#!/usr/bin/env bash
# The prepared GPU check (benchmarks/README.md, "GPU check"), for one GPU and no network:
# installs the wheels of .whl/ offline (made beforehand by benchmarks/gpu_wheels.sh), then runs
# benchmarks/gpu_check.py: the CUDA-marked tests, packed = padded per attention kernel, and
# inspo's DPO step against TRL's DPOTrainer on Qwen2.5-0.5B's shape in bf16. Under 8 minutes
# on one H100; prints one table (also written, with the raw records, to $OUT or logs/).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu        # the same steps on the tiny model, here
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-logs/gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ " $* " != *" --cpu "* ]] && compgen -G ".whl/*.whl" >/dev/null; then
  site=${INSPO_GPU_SITE:-/tmp/inspo-site}
  # --no-deps: each wheel is named in benchmarks/gpu_wheels.sh; the rest is the image's.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PYTHONPATH"
fi
python3 - <<'PY' | tee "$out/versions.txt"
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
names = ["transformers", "lightning", "trl", "datasets", "hydra", "omegaconf", "peft",
         "accelerate", "huggingface_hub", "pyarrow", "flash_attn", "vllm"]
found = []
for name in names:
    try:
        found.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as e:
        found.append(f"{name} missing ({type(e).__name__})")
print("; ".join(found))
PY
status=0
PYTHONUNBUFFERED=1 timeout 460 python3 benchmarks/gpu_check.py --out "$out/records.jsonl" \
  --table "$out/table.md" "$@" >"$out/log.txt" 2>&1 || status=$?
grep '^# ' "$out/log.txt" || true
[ -f "$out/table.md" ] && cat "$out/table.md" || { echo "no table (exit $status):"; tail -40 "$out/log.txt"; }
exit "$status"
