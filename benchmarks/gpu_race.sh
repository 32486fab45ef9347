#!/usr/bin/env bash
# autoseg against nnU-Net v2 on one CUDA GPU without internet, in under 9 minutes.
#
#   bash benchmarks/gpu_race.sh WHEELS OUT            # the race (CUDA)
#   bash benchmarks/gpu_race.sh --tiny OUT            # dry run on the CPU: tiny data, no install, no nnU-Net
#
# WHEELS is a folder of wheels made beforehand on a machine with internet access, for the GPU machine's Python
# version and platform, e.g.:
#   pip download -d wheels nnunetv2 .                         # nnU-Net v2 and autoseg with their dependencies
#   pip download -d wheels torch --index-url <the PyTorch CUDA wheel index>    # when the machine has no torch
# The script makes a virtualenv OUT/venv (seeing the system's packages, so a preinstalled CUDA torch is used),
# installs autoseg and nnunetv2 from WHEELS only (pip --no-index), then runs benchmarks/gpu_race.py, which writes
# OUT/results.json and OUT/results.md after every phase (data, autoseg GPU-only, autoseg with its data pipeline,
# bf16 check, nnU-Net with 12 workers and torch.compile). A phase that fails leaves the earlier results.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ "${1:-}" == "--tiny" ]]; then
    out="${2:?usage: gpu_race.sh --tiny OUT}"
    mkdir -p "$out"
    exec "${PYTHON:-python}" "$here/gpu_race.py" --out "$out" --device cpu --tiny
fi
wheels="${1:?usage: gpu_race.sh WHEELS OUT}"
out="${2:?usage: gpu_race.sh WHEELS OUT}"
mkdir -p "$out"
"${PYTHON:-python3}" -m venv --system-site-packages "$out/venv"
py="$out/venv/bin/python"
"$py" -m pip install --no-index --find-links "$wheels" --quiet nnunetv2 "$here/.."
"$py" -c "import torch, nnunetv2; assert torch.cuda.is_available(), 'no CUDA GPU visible'"
timeout 510 "$py" "$here/gpu_race.py" --out "$out" --device cuda --nnunet-python "$py"
