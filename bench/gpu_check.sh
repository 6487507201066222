#!/usr/bin/env bash
# One script for a lent GPU session (<= 8 minutes on one H100/H200): the `gpu` tests,
# register_gpu at 128/256/512^3 (with SimpleITK when it is importable), FBP, XANES and a
# 16-energy 256^3 pipeline. Every JSON goes to one folder: $OUT when set (the device
# machine's return folder), else bench/results/gpu_check-<date>/; gpu_check.json there
# lists each step's command, exit status and seconds, and <step>.log its output.
#
# How to carry it to the device machine (it has Python 3.12, cupy-cuda13x, numpy, scipy,
# h5py, typer, pytest, rich, matplotlib, but neither this package nor astra-toolbox,
# scikit-image, numba, SimpleITK):
#   1. here, from the repository root:
#        bash /work/shared/device/prepare.sh [--simpleitk --no-astra]    # fills .device/
#      (astra for FBP and the pipeline; SimpleITK for the >= 1000x ratio: both together
#      exceed the 64 MiB carry, so pick one per session, or --with more wheels)
#   2. on the device, with .device carried:
#        source .device/setup.sh && bash bench/gpu_check.sh
# Each step runs under its own time limit (seconds below, 470 s in all) and a failed step
# does not stop the others. --dry-run runs the same plumbing on the CPU in seconds: each
# benchmark's argument parsing (--help) and the collection of the gpu tests.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
out=${OUT:-bench/results/gpu_check-$(date +%F)}
mkdir -p "$out"
export GPUREG_BENCH_OUT=$out PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
summary=()

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local cmd=("$@")
  if [ $dry = 1 ]; then
    if [ "${cmd[1]}" = "-m" ]; then cmd+=(--collect-only -q); else cmd+=(--help); fi
    limit=60
  fi
  echo "== $name: ${cmd[*]} (limit ${limit} s)"
  local t0=$SECONDS
  timeout "$limit" "${cmd[@]}" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 5 "$out/$name.log"
  summary+=("{\"step\": \"$name\", \"command\": \"${cmd[*]}\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
}

step gpu_tests 120 "$py" -m pytest -p no:cacheprovider -m gpu tests/core/test_gpu.py tests/core/test_gpu_plumbing.py tests/xanes/test_xanes.py tests/core/test_gpu_solver.py tests/register/test_deformable.py tests/xanes/test_chemistry.py
step register_gpu 150 "$py" bench/register_gpu.py --sizes 128 256 512 --repeats 5 --sitk-max 256
step recon 60 "$py" bench/recon.py --device gpu --quick
step xanes 45 "$py" bench/xanes.py --device gpu --size 256 --repeats 3
step pipeline 95 "$py" bench/pipeline.py --device gpu --size 256 --energies 16 --no-sitk

{
  echo "{\"benchmark\": \"gpu_check\", \"dry_run\": $([ $dry = 1 ] && echo true || echo false),"
  echo " \"date\": \"$(date +%F)\", \"git_sha\": \"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\","
  echo " \"steps\": ["
  for i in "${!summary[@]}"; do
    sep=","; [ "$i" -eq $((${#summary[@]} - 1)) ] && sep=""
    echo "  ${summary[$i]}$sep"
  done
  echo "]}"
} >"$out/gpu_check.json"
echo "gpu_check: results in $out"
ls "$out"
