#!/usr/bin/env bash
# The device check: every experiment's tiny profile on CUDA, then the quick profile for as long as
# $QUICK_SECONDS allows ($ONLY: a comma-separated subset), with per-experiment wall times. Writes its tables under ${OUT:-gpu-check}/.
# Usage (on a machine with a CUDA GPU and PyTorch):  bash benchmarks/gpu_check.sh
set -u
out="${OUT:-gpu-check}"; mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}src" MPLBACKEND=agg PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
{ nvidia-smi -L; $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } > "$out/device.txt" 2>&1
times() { for d in "$1"/*/*/; do [ -f "$d/complete" ] && echo "$(basename "$(dirname "$d")") $(( $(stat -c %Y "$d/complete") - $(stat -c %Y "$d/config.json") )) s"; done; }
( time $py -m bnlab.cli reproduce --profile tiny --device cuda --out /tmp/gpu-tiny --quiet ) > "$out/tiny.txt" 2>&1
times /tmp/gpu-tiny >> "$out/tiny.txt"
( time timeout "${QUICK_SECONDS:-240}" $py -m bnlab.cli reproduce --profile quick --device cuda --out /tmp/gpu-quick \
    ${ONLY:+--only "$ONLY"} --quiet ) > "$out/quick.txt" 2>&1
times /tmp/gpu-quick >> "$out/quick.txt"
tail -n 12 "$out"/*.txt
