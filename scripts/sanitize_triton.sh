#!/usr/bin/env bash
# The triton backend's kernels under NVIDIA compute-sanitizer: memcheck (out-of-bounds and
# misaligned global/shared accesses) and racecheck (shared-memory hazards), on the small,
# tail-bearing problems of scripts/sanitize_triton.py. Writes DIR/memcheck.log, DIR/racecheck.log
# and DIR/summary.md; exits non-zero if either tool reports an error or a result is wrong.
# Usage, on a machine with a CUDA GPU, after `pip install -e .`:
#   bash scripts/sanitize_triton.sh [DIR]        (DIR defaults to docs/results/<gpu>/sanitizer)
# COMPUTE_SANITIZER and PYTHON override the tools found on PATH (or in /usr/local/cuda/bin);
# SANITIZE_SECONDS (default 240) bounds each sanitizer run (exit status 124 in the summary).
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${1:-docs/results/$(bash scripts/gpu_name.sh)/sanitizer}
mkdir -p "$dir"
python=${PYTHON:-python3}
sanitizer=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
# Without the caching allocator every tensor is its own allocation, so an access past a tensor's
# end lands outside any allocation and memcheck sees it (inside a cached pool block it would not).
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

echo "== compiling the kernels once, outside the sanitizer (Triton caches them)"
"$python" scripts/sanitize_triton.py > "$dir/plain.log" 2>&1
plain=$?
tail -1 "$dir/plain.log"

status=0
for tool in memcheck racecheck; do
    echo "== $tool"
    extra=$([ "$tool" = memcheck ] && echo "--leak-check no --padding 64" || echo "--racecheck-report all")
    timeout "${SANITIZE_SECONDS:-240}" "$sanitizer" --tool "$tool" $extra --error-exitcode 99 --print-limit 200 \
        "$python" scripts/sanitize_triton.py > "$dir/$tool.log" 2>&1
    code=$?
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|mismatches" "$dir/$tool.log" | tail -3
    [ "$code" -ne 0 ] && status=1
    eval "${tool}_code=$code"
done

# The controls: the Hopper kernel's partitions without its data path, one mode per piece of its
# synchronization (scripts/sanitize_control.py says which), each under racecheck on its own.
modes="plain barriers mbarriers"
for mode in $modes; do
    echo "== racecheck, control $mode"
    timeout "${SANITIZE_SECONDS:-240}" "$sanitizer" --tool racecheck --racecheck-report all --print-limit 200 \
        "$python" scripts/sanitize_control.py --mode "$mode" > "$dir/racecheck-control-$mode.log" 2>&1
    eval "control_${mode}_code=$?"
    grep -E "RACECHECK SUMMARY|^control $mode:" "$dir/racecheck-control-$mode.log" | tail -2
done

gpu=$("$python" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, sm{p.major}{p.minor}')" 2>/dev/null)
versions=$("$python" -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}')" 2>/dev/null)
{
    echo "# The triton kernels under compute-sanitizer"
    echo
    echo "Command: \`bash scripts/sanitize_triton.sh\` on $gpu ($versions, $("$sanitizer" --version | tail -1))."
    echo "Workload: \`scripts/sanitize_triton.py\`, every call checked against the reference backend."
    echo
    echo "| run | exit status | summary |"
    echo "|---|---|---|"
    echo "| without sanitizer | $plain | $(tail -1 "$dir/plain.log") |"
    for tool in memcheck racecheck; do
        code_var="${tool}_code"
        echo "| $tool | ${!code_var} | $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$dir/$tool.log" | tail -1 | sed 's/^========= //') |"
    done
    for mode in $modes; do
        log="$dir/racecheck-control-$mode.log" code_var="control_${mode}_code"
        echo "| racecheck, control $mode ($(grep -o "^control $mode:.*" "$log" | tail -1 | sed "s/^control $mode: //")) | ${!code_var} | $(grep -E "RACECHECK SUMMARY" "$log" | tail -1 | sed 's/^========= //') |"
    done
    echo
    echo "The controls, \`scripts/sanitize_control.py --mode MODE\`, are warp-specialized kernels with the Hopper"
    echo "kernel's partition shape and none of its data path: hazards they show come from Triton's lowering."
    echo "Full output: memcheck.log, racecheck.log, racecheck-control-MODE.log and plain.log beside this file."
} > "$dir/summary.md"
cat "$dir/summary.md"
[ "$plain" -ne 0 ] && status=1
exit $status
