#!/usr/bin/env bash
# The paper-scale device check (issue 15), three things with --device cuda, tables under ${OUT:-paper-gpu}/:
#   1. every paper profile, smoke-sized:      bnlab reproduce --profile paper --smoke
#   2. the throughput benchmark:              benchmarks/paper_throughput.py
#   3. one full paper experiment (${EXPERIMENT:-large-lr}) for at most $FULL_SECONDS (default 300), when
#      CIFAR-10 is in $CIFAR_ROOT (nothing is downloaded); a cut-off run resumes from its checkpoints
#      when the same command runs again.
# Usage (on a machine with a CUDA GPU and PyTorch):  CIFAR_ROOT=~/data/cifar10 bash benchmarks/paper_gpu.sh
set -u
out="${OUT:-paper-gpu}"; mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}src" MPLBACKEND=agg PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
{ nvidia-smi -L; $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } > "$out/device.txt" 2>&1
( time timeout "${SMOKE_SECONDS:-300}" $py -m bnlab.cli reproduce --profile paper --smoke --device cuda \
    --out /tmp/paper-gpu-smoke --quiet ) > "$out/smoke.txt" 2>&1
( time timeout "${BENCH_SECONDS:-240}" $py benchmarks/paper_throughput.py --device cuda ) > "$out/throughput.txt" 2>&1
if [ -n "${CIFAR_ROOT:-}" ]; then
  ( time timeout "${FULL_SECONDS:-300}" $py -m bnlab.cli run "${EXPERIMENT:-large-lr}" --profile paper --device cuda \
      --root "$CIFAR_ROOT" --out /tmp/paper-gpu-full --quiet ) > "$out/full.txt" 2>&1
else
  echo "no CIFAR_ROOT: the full paper experiment was not run" > "$out/full.txt"
fi
tail -n 25 "$out"/*.txt
