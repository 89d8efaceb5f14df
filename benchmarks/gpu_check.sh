#!/usr/bin/env bash
# The GPU check: everything the day a GPU is lent should measure, in one run of at most 8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh OUT_DIR                # on a CUDA machine
#   bash benchmarks/gpu_check.sh --cpu-smoke OUT_DIR    # the same code paths on the CPU, about a minute
#
# Writes into OUT_DIR: tests.json (the CUDA test subset), throughput.json (distattr vs Inseq 0.7.1 on the same
# device), memory.json (peak memory of a saliency attribution with block recomputation at 1k-16k tokens vs the
# planner), summary.json (date, machine, GPU, versions, what passed), tests-junit.xml and gpu_check.log (all the
# output). Each section runs under its own time limit (`timeout`), so that a hang leaves the other files; a
# section that did not finish gets a JSON file saying so. See benchmarks/gpu_check.py and benchmarks/README.md.
#
# Python: $GPU_CHECK_PYTHON, else .venv/bin/python when it exists, else python3. Without --cpu-smoke its torch
# must have CUDA: if not (the project's .venv has the CPU build), summary.json says so in one line and the
# script exits 3 without installing anything. Time limits (seconds) can be changed with GPU_CHECK_LIMIT_TESTS,
# GPU_CHECK_LIMIT_THROUGHPUT and GPU_CHECK_LIMIT_MEMORY.
#
# Exit status: 0 every section ran and passed; 1 every section ran, not all passed; 2 a section did not run or
# did not finish (time limit, crash, missing package or model); 3 no CUDA; 64 bad usage.
set -euo pipefail

usage() {
    echo "usage: bash benchmarks/gpu_check.sh [--cpu-smoke] OUT_DIR" >&2
    exit 64
}

smoke=0
out=""
for arg in "$@"; do
    case $arg in
        --cpu-smoke) smoke=1 ;;
        -h | --help) usage ;;
        -*) echo "gpu_check: unknown option $arg" >&2; usage ;;
        *) [[ -z $out ]] || usage; out=$arg ;;
    esac
done
[[ -n $out ]] || usage

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${GPU_CHECK_PYTHON:-}
[[ $py == */* && $py != /* ]] && py=$PWD/$py  # a relative path is relative to where the script was started
cd "$root"
if [[ -z $py ]]; then
    if [[ -x .venv/bin/python ]]; then py=$root/.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # distattr from this tree when it is not installed
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log=$out/gpu_check.log
: >"$log"
rm -f "$out"/{summary,tests,throughput,memory}.json "$out/tests-junit.xml"  # no stale results from an earlier run

declare -A limit
if ((smoke)); then
    flags=(--cpu-smoke)
    limit=([tests]=70 [throughput]=70 [memory]=50)
    export MALLOC_MMAP_THRESHOLD_=65536  # freed tensors go back to the system at once: the RSS tracks them
else
    flags=()
    limit=([tests]=160 [throughput]=160 [memory]=100)  # + ~20 s of start and summary: under 8 minutes
fi
limit[tests]=${GPU_CHECK_LIMIT_TESTS:-${limit[tests]}}
limit[throughput]=${GPU_CHECK_LIMIT_THROUGHPUT:-${limit[throughput]}}
limit[memory]=${GPU_CHECK_LIMIT_MEMORY:-${limit[memory]}}

echo "gpu_check: $(date -u +%FT%TZ) python $py, out $out, smoke $smoke" | tee -a "$log" >&2

# CUDA: one line in summary.json and exit 3 when the interpreter's torch has none (never install anything)
cuda=$(timeout 60 "$py" -c 'import torch; print(torch.cuda.is_available(), torch.__version__, torch.version.cuda)' \
    2>>"$log") || cuda="error"
echo "gpu_check: torch.cuda.is_available(), torch version, CUDA version: $cuda" | tee -a "$log" >&2
if ((!smoke)) && [[ $cuda != True* ]]; then
    if [[ $cuda == error ]]; then
        msg="no CUDA: $py cannot import torch (see gpu_check.log)"
    else
        read -r _ version cuda_version <<<"$cuda"
        msg="no CUDA: torch $version of $py reports torch.cuda.is_available() == False"
        [[ $cuda_version == None ]] && msg+=" (a CPU build of torch, as in the project's .venv)"
        msg+="; run with GPU_CHECK_PYTHON set to a Python whose torch has CUDA, or use --cpu-smoke"
    fi
    echo "gpu_check: $msg" | tee -a "$log" >&2
    timeout 60 "$py" benchmarks/gpu_check.py summary --out "$out" --no-cuda "$msg" >>"$log" 2>&1 || true
    [[ -s $out/summary.json ]] || printf '{"error": "%s"}\n' "${msg//\"/\'}" >"$out/summary.json"
    exit 3
fi

summary_args=()
for section in tests throughput memory; do
    seconds=${limit[$section]}
    started=$SECONDS
    echo "gpu_check: --- $section (limit ${seconds} s)" | tee -a "$log" >&2
    # the section stops itself 10 s before its limit; timeout kills it (and its process group) at the limit
    rc=0
    timeout --kill-after=5 "$seconds" "$py" benchmarks/gpu_check.py "$section" --out "$out" \
        --budget $((seconds - 10)) "${flags[@]}" >>"$log" 2>&1 || rc=$?
    took=$((SECONDS - started))
    echo "gpu_check: $section exit status $rc after ${took} s" | tee -a "$log" >&2
    summary_args+=(--rc "$section=$rc" --seconds "$section=$took" --limit "$section=$seconds")
done

rc=0
timeout 60 "$py" benchmarks/gpu_check.py summary --out "$out" "${flags[@]}" "${summary_args[@]}" 2>>"$log" |
    tee -a "$log" || rc=$?
if ((rc == 0)); then
    echo "gpu_check: every section ran and passed; JSON files in $out" >&2
else
    echo "gpu_check: exit status $rc (1: a check failed, 2: a section did not run or finish); see $out/summary.json" >&2
fi
exit "$rc"
