#!/usr/bin/env bash
# Download the Python wheels that the GPU machine lacks into .whl/ (ignored by git).
#
# The lent GPU machines have Python 3.12 with PyTorch, numpy, pytest, Pillow and tqdm,
# but no cffi and no internet. Run this once on a machine with pip and internet, then
# let the device call carry `.whl`; dev/gpu_check.sh installs from it when
# `python3 -c 'import cffi'` fails. Pinned versions: one of each, or pip refuses.
set -euo pipefail
cd "$(dirname "$0")/.."

CFFI_VERSION=${CFFI_VERSION:-2.0.0}
PYCPARSER_VERSION=${PYCPARSER_VERSION:-2.23}
PY=${PYTHON:-python3}

grep -qx '/.whl/' .gitignore 2>/dev/null || grep -qx '/.whl/' .git/info/exclude 2>/dev/null \
    || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
rm -f .whl/cffi-*.whl .whl/pycparser-*.whl
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "cffi==$CFFI_VERSION" "pycparser==$PYCPARSER_VERSION"
echo "wheels for Python 3.12 x86_64 in $(pwd)/.whl:"
ls -1 .whl
