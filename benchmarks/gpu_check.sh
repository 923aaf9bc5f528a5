#!/usr/bin/env bash
# The device check: the probes and curvature tools on tiny transformers (benchmarks/gpu_probe_check.py:
# double backward through SDPA, every probe bit-identical; skipped without transformers) and each probe's
# cost on ResNet-18 (benchmarks/probe_overhead.py --device cuda, $PROBE_ROUNDS rounds); then every
# experiment's tiny profile on CUDA, then the quick profile for as long as $QUICK_SECONDS allows ($ONLY:
# a comma-separated subset), with per-experiment wall times. $SKIP_PROBES=1 skips the first part.
# Writes its tables under ${OUT:-gpu-check}/.
# Usage (on a machine with a CUDA GPU and PyTorch):  bash benchmarks/gpu_check.sh
set -u
out="${OUT:-gpu-check}"; mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}src" MPLBACKEND=agg PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
{ nvidia-smi -L; $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } > "$out/device.txt" 2>&1
if [ "${SKIP_PROBES:-0}" != 1 ]; then
  ( time $py benchmarks/gpu_probe_check.py --device cuda ) > "$out/probes.txt" 2>&1
  ( time timeout "${PROBE_SECONDS:-300}" $py benchmarks/probe_overhead.py --device cuda --rounds "${PROBE_ROUNDS:-6}" ) \
    > "$out/probe_overhead.txt" 2>&1
fi
times() { for d in "$1"/*/*/; do [ -f "$d/complete" ] && echo "$(basename "$(dirname "$d")") $(( $(stat -c %Y "$d/complete") - $(stat -c %Y "$d/config.json") )) s"; done; }
( time $py -m bnlab.cli reproduce --profile tiny --device cuda --out /tmp/gpu-tiny --quiet ) > "$out/tiny.txt" 2>&1
times /tmp/gpu-tiny >> "$out/tiny.txt"
( time timeout "${QUICK_SECONDS:-240}" $py -m bnlab.cli reproduce --profile quick --device cuda --out /tmp/gpu-quick \
    ${ONLY:+--only "$ONLY"} --quiet ) > "$out/quick.txt" 2>&1
times /tmp/gpu-quick >> "$out/quick.txt"
tail -n 12 "$out"/*.txt
