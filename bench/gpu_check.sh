#!/usr/bin/env bash
# One script for a lent GPU session (one H100/H200, 16 cores; one command <= 600 s): a preflight,
# the `gpu` tests, register_gpu at 128/256/512^3, FBP, XANES, a 64^3 pipeline, the deformable
# registration, the projection alignment and the chemistry chain of issue 26 (normalise + spectral
# denoising + edge map with sigma + LCF + k-means, 60 energies x 128^3). pipeline and align gave 10 s each
# of their 40 to the chemistry step (their inputs take 11 and 9 s of CPU, within half of 30 s; register_gpu's
# 512^3 phantoms need most of its 160 s). bench/write.py (HDF5 compression: CPU and disk
# only) is measured on the CPU machines instead. Each step runs under its own time limit (the table below, 480 s in
# all) and a failed or timed-out step does not stop the others; a failed preflight stops
# everything. Each benchmark writes its JSON into one work folder ($GPUREG_BENCH_OUT) and
# saves after each size; <step>.log holds each step's output and gpu_check.json each step's
# command, exit status and seconds. After every step the work folder is tarred into
# gpu_check.tar.gz in $OUT (the device machine's return folder, which brings back at most
# 8 files), beside gpu_check.json and preflight.log: one tar plus 2 small files.
# Without $OUT: bench/results/gpu_check-<date>/.
#
# How to carry it to the device machine (it has Python 3.12, cupy-cuda13x, numba, scipy,
# scikit-image, h5py, typer, pytest, pytest-timeout, but neither astra-toolbox, hdf5plugin nor
# SimpleITK; gpureg does not import without hdf5plugin, whose newest wheel (46 MB) does not fit
# beside astra's in the 64 MiB carry: take 4.4.0, 42 MB, checked with every codec of gpureg):
#   1. here, from the repository root (about 60 MiB with the repository):
#        bash /work/shared/device/prepare.sh --with hdf5plugin==4.4.0    # fills .device/
#   2. on the device, with .device carried (the run tool: carry [".device"], timeout_s 570: the
#      wheels' install takes ~20 s of it, the steps at most 480 s, leaving time for the tar):
#        source .device/setup.sh && bash bench/gpu_check.sh
#      or only some steps:  bash bench/gpu_check.sh --steps register_gpu,xanes
# --dry-run (CI runs it: tests/core/test_gpu_plumbing.py) runs the same plumbing on the CPU
# in seconds: each benchmark's argument parsing (--help), the collection of the gpu tests,
# the tar, and bench/gpu_budget.py, which prints the step budget table and fails when a
# step's inputs could not be generated within half its limit on 16 cores (estimated from
# CPU timings at small sizes on this machine).
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
only=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1 ;;
    --steps) shift; only=",${1:-},"; [ "$only" = ",," ] && { echo "gpu_check: --steps needs a list" >&2; exit 2; } ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run] [--steps a,b,...]" >&2; exit 2 ;;
  esac
  shift
done
py=${PYTHON:-python3}
# pytest-timeout (on the device image): a test stuck on a kernel fails alone instead of the step.
# --continue-on-collection-errors: a test module importing what the device lacks (dask, napari)
# must not stop the gpu tests of the others.
pertest=()
"$py" -c "import pytest_timeout" 2>/dev/null && pertest=(--timeout=90)

# The steps, one a line: name, time limit (s), command. Add a benchmark here with its budget
# (and, when it generates sizeable inputs on the CPU, an estimator in bench/gpu_budget.py).
# The limits must add up to at most 480 s (gpu_budget.py checks it).
table="
preflight     30  \$py bench/gpu_preflight.py
gpu_tests    100  \$py -m pytest -p no:cacheprovider -m gpu -v -rfE --durations=15 --continue-on-collection-errors ${pertest[*]} tests
register_gpu 160  \$py bench/register_gpu.py --sizes 128 256 512 --repeats 5 --sitk-max 256
recon         25  \$py bench/recon.py --device gpu --quick
xanes         45  \$py bench/xanes.py --device gpu --size 128 256 512 --host-max 128 --repeats 3
pipeline      30  \$py bench/pipeline.py --device gpu --size 64 --energies 6 --no-sitk
deformable    40  \$py bench/deformable.py --device gpu --legacy --sizes 128 --no-elastix
align         30  \$py bench/align.py --device gpu --sizes 128 --parts speed
chemistry     20  \$py bench/chemistry.py --device gpu --size 128 --cases chain
"

date_=$(date +%F)
if [ -n "${OUT:-}" ]; then
  dest=$OUT
  work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")/gpu_check-$date_
else
  dest=bench/results/gpu_check-$date_
  work=$dest/work
fi
mkdir -p "$dest" "$work"
# The phantoms of register_gpu are kept in bench/.cache (ignored by git): a rerun on a warm
# machine (same working tree) skips generating them.
export GPUREG_BENCH_OUT=$work GPUREG_BENCH_CACHE=${GPUREG_BENCH_CACHE:-$PWD/bench/.cache} PYTHONUNBUFFERED=1
summary=()
stopped=0

write_summary() {
  {
    echo "{\"benchmark\": \"gpu_check\", \"dry_run\": $([ $dry = 1 ] && echo true || echo false),"
    echo " \"date\": \"$date_\", \"git_sha\": \"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\","
    echo " \"steps\": ["
    local i sep
    for i in "${!summary[@]}"; do
      sep=","; [ "$i" -eq $((${#summary[@]} - 1)) ] && sep=""
      echo "  ${summary[$i]}$sep"
    done
    echo "]}"
  } >"$work/gpu_check.json"
  cp "$work/gpu_check.json" "$dest/gpu_check.json"
  [ -f "$work/preflight.log" ] && cp "$work/preflight.log" "$dest/preflight.log"
  # Written beside, then renamed: a session cut off mid-tar still returns the previous one.
  tar -czf "$dest/.gpu_check.tar.gz.part" -C "$(dirname "$work")" "$(basename "$work")" \
    && mv "$dest/.gpu_check.tar.gz.part" "$dest/gpu_check.tar.gz"
}

run_step() {  # run_step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local cmd=("$@")
  if [ $dry = 1 ]; then
    if [ "${cmd[1]}" = "-m" ]; then cmd+=(--collect-only -q); else cmd+=(--help); fi
    limit=180  # plumbing only (collect-only, --help): generous, so a loaded CI machine does not stop a step
  fi
  echo "== $name: ${cmd[*]} (limit ${limit} s)"
  local t0=$SECONDS
  timeout -k 5 "$limit" "${cmd[@]}" >"$work/$name.log" 2>&1
  local rc=$?
  [ $rc = 124 ] && echo "gpu_check: $name stopped at its limit of $limit s" | tee -a "$work/$name.log"
  tail -n 5 "$work/$name.log"
  summary+=("{\"step\": \"$name\", \"command\": \"${cmd[*]}\", \"limit_s\": $limit, \"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
  write_summary
  return $rc
}

if [ $dry = 1 ]; then
  printf '%s\n' "$table" >"$work/steps.txt"
  sed -i "s#\\\$py#$py#g" "$work/steps.txt"
  "$py" bench/gpu_budget.py "$work/steps.txt" 2>&1 | tee "$work/budget.log"
  budget_rc=${PIPESTATUS[0]}
  summary+=("{\"step\": \"budget\", \"command\": \"bench/gpu_budget.py\", \"limit_s\": 0, \"rc\": $budget_rc, \"seconds\": 0}")
fi

while read -r name limit rest; do
  [ -z "$name" ] && continue
  case $only in "" | *",$name,"*) ;; *) continue ;; esac
  eval "cmd=($rest)"
  run_step "$name" "$limit" "${cmd[@]}"
  rc=$?
  if [ "$name" = preflight ] && [ $rc != 0 ] && [ $dry = 0 ]; then
    echo "gpu_check: the preflight failed (above); nothing else was run"
    stopped=1
    break
  fi
done <<<"$table"

write_summary
echo "gpu_check: results in $dest (work folder $work)"
ls -l "$dest"
[ $dry = 1 ] && exit "$budget_rc"
exit "$stopped"
