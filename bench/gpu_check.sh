#!/usr/bin/env bash
# GPU check of the Triton spline kernels (issue 15), ~8 minutes at most on a CUDA machine with this
# repo installed (pip install -e .): the spline tests on the GPU (no TRITON_INTERPRET), then the
# activation and training-step benches on CUDA with few rounds. Prints everything; each step is
# time-limited and a failing step does not stop the others. Goals: shared spline fwd+bwd <= 1.3x
# GELU (bench_activations, "x GELU" of "spline"); spline;att-spline step <= 1.05x the GELU model's
# (bench_train_step, 1 / "vs gelu").
#
#     bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
status=0

step() {  # step SECONDS COMMAND...: run with a time limit, remember a failure
    echo; echo "=== $* ==="
    local limit=$1; shift
    timeout "$limit" "$@" || { echo "=== exit $? ==="; status=1; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
step 150 python -m pytest -q -rs tests/test_spline_triton.py tests/test_spline_kernels.py
step 150 python bench/bench_activations.py --device cuda --rounds 3
step 170 python bench/bench_train_step.py --device cuda --rounds 3
exit $status
