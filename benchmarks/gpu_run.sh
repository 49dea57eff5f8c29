#!/usr/bin/env bash
# One device session's checks in one call (a lent GPU's time is short): the CUDA tests, the
# synchronisations of every method's step, then the harness on CUDA. Run from the repository
# root on the GPU machine, with torchjd's wheels (and its solvers') in .whl/ (optional).
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
timeout "${TEST_SECONDS:-180}" python3 -m pytest -q -s -rs tests/test_cuda.py \
    > "$OUT/pytest_cuda.log" 2>&1
grep -E "^FAILED|passed|failed" "$OUT/pytest_cuda.log" | cut -c1-200
grep -o "syncs per step [A-Za-z]*: \[[0-9, ]*\]" "$OUT/pytest_cuda.log" | cut -c16- | tr '\n' ';'
echo
if [ "${SITES_SECONDS:-90}" != 0 ]; then
    timeout "${SITES_SECONDS:-90}" python3 -m benchmarks.sync_sites > "$OUT/sync_sites.txt" 2>&1
    grep -E "^[A-Za-z]" "$OUT/sync_sites.txt" | tr '\n' ';'
fi
timeout "${BENCH_SECONDS:-330}" python3 -m benchmarks.step_time --device cuda \
    --budget "${BUDGET:-6}" --out "$OUT/results_cuda.md" 2>&1 | tee "$OUT/harness.log" | tail -70
