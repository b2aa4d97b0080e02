#!/usr/bin/env bash
# One GPU session's checks in one command, on a bare machine with torch + triton and no
# network (the package is not installed there): the kernel tests on CUDA tensors, then the
# benchmark. Each step has its own time limit so the whole run ends in about 9 minutes;
# outputs land in $OUT (or ./gpu-session) for docs/benchmarks.md.
#
#     bash benchmarks/gpu_session.sh              # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-session}
mkdir -p "$out"

# `import denoised.*` without installing: the package layout of pyproject.toml, by symlinks.
site=$(mktemp -d)
mkdir "$site/denoised"
touch "$site/denoised/__init__.py"
for part in kernels models server; do ln -s "$PWD/$part" "$site/denoised/$part"; done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$python" -c 'import denoised.kernels, torch, triton; print(denoised.kernels.__file__,
        torch.__version__, triton.__version__, torch.cuda.is_available())'
} 2>&1 | tee "$out/device.txt"

timeout 240 "$python" -m pytest tests/kernels -q -x -p no:cacheprovider 2>&1 \
    | tee "$out/kernel-tests.txt"
tests=$?
timeout 300 "$python" benchmarks/gpu_kernels.py "$@" 2>&1 | tee "$out/gpu_kernels.txt"
bench=$?
echo "kernel tests exit $tests, benchmark exit $bench" | tee -a "$out/device.txt"
exit $((tests || bench))
