#!/usr/bin/env bash
# Set up (once) and run the whole nanoseek test suite.
#   scripts/test.sh [pytest args...]
# Creates .venv if missing, installs nanoseek with its test extras (torch pinned to the CPU wheel this machine
# carries), installs the Debian packages some tests use when it can (below), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned: an unpinned resolve could pull a multi-GB CUDA build
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import nanoseek, torch, transformers" # fail early if the install did not work

# Debian packages some tests use, installed when missing (as root with apt-get; the tests skip without them):
# chromium for the chat page; on x86-64 the ARM64 cross compiler and qemu-user, which run the kernels' ARM64
# self-tests, and SIMDe, which runs the AVX-512 kernels' vector code on a CPU without AVX-512.
want=()
command -v chromium >/dev/null 2>&1 || want+=(chromium)
if [ "$(uname -m)" = x86_64 ]; then
  command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || want+=(gcc-aarch64-linux-gnu libgomp1-arm64-cross)
  command -v qemu-aarch64 >/dev/null 2>&1 || want+=(qemu-user)
  [ -e /usr/include/simde/x86/avx512.h ] || want+=(libsimde-dev)
fi
if [ ${#want[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq || true
  for pkg in "${want[@]}"; do
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null \
      || echo "warning: could not install $pkg; the tests that need it will be skipped"
  done
fi

export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q "$@"
