#!/usr/bin/env bash
# The CUDA checks of MoBA in one go, for a machine with an NVIDIA GPU and a PyTorch that sees it:
#
#     bash bench/cuda_check.sh [RESULTS_DIR]
#
# 1. tests: the CUDA tests (flex, gather and tiles against the reference: fp32 outputs and
#    gradients, the bf16 forward, a ViT-shaped layer) and the CPU tests of flex
#    (tests/test_attention.py -k "cuda or flex");
# 2. bench-128k: bench/attention.py in bf16 at 131072 tokens, the length of the GPU goal
#    (MoBA >= 10x dense), first, so that it is measured even if the rest runs out of time;
# 3. bench: the same at 32K and 64K (REST_LENGTHS; add 1024,4096,16384 for the short ones);
# 4. bench-block: per-query-block routing (`tiles`, non-causal) at 32K-128K.
#
# Each step is held to its own time limit (seconds: TESTS_LIMIT 150, LONG_LIMIT 150, REST_LIMIT
# 130, BLOCK_LIMIT 80 by default, under 9 minutes in all; FlexAttention compiles once per
# shape and pass, which takes most of a step's time), so one slow compile cannot take the
# others' time. Logs and tables go to RESULTS_DIR (default: cuda-check). The package is used
# from src/ (PYTHONPATH), so nothing is installed; PYTHON picks the interpreter (default:
# python3). Exits 2 without CUDA, 1 if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-cuda-check}
python=${PYTHON:-python3}
mkdir -p "$results"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "cuda_check: torch sees no CUDA device with $python; run this on a machine with an NVIDIA GPU" >&2
    exit 2
fi
"$python" -c 'import torch; print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")' | tee "$results/device.txt"

failed=()
step() {  # step NAME LIMIT COMMAND...: run it under its time limit, log in RESULTS_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$results/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s$([ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo ' (time limit)')"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

step tests "${TESTS_LIMIT:-150}" "$python" -m pytest -q -p no:cacheprovider tests/test_attention.py -k "cuda or flex"
step bench-128k "${LONG_LIMIT:-150}" "$python" bench/attention.py --device cuda --lengths 131072 \
    --out "$results/attention_128k.md"
step bench "${REST_LIMIT:-130}" "$python" bench/attention.py --device cuda --lengths "${REST_LENGTHS:-32768,65536}" \
    --out "$results/attention.md"
step bench-block "${BLOCK_LIMIT:-80}" "$python" bench/attention.py --device cuda --routing block \
    --lengths 32768,65536,131072 --out "$results/attention_block.md"

if [ ${#failed[@]} -gt 0 ]; then
    echo "cuda_check: failed: ${failed[*]} (logs in $results)" >&2
    exit 1
fi
echo "cuda_check: all steps passed (logs and tables in $results)"
