#!/usr/bin/env bash
# Installs the toolkit (and, with --test, what the test suite needs) into the current Python.
# torch is chosen first and then pinned, so no later dependency can swap it for a multi-GB build:
#   - a torch that is already installed is kept;
#   - with an NVIDIA driver present, pip's default (CUDA) torch is installed;
#   - otherwise torch==2.13.0, which on CPU-only machines with a local wheel is the small CPU build.
# Override with TORCH_SPEC="torch==X.Y.Z" (or a wheel path / index options in PIP_EXTRA).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_SPEC:-}" ]; then spec="$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then spec="torch"
  else spec="torch==2.13.0"
  fi
  echo "install.sh: installing $spec"
  "$PY" -m pip install -q ${PIP_EXTRA:-} "$spec"
fi
torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" >"$constraints"
"$PY" -m pip install -q -c "$constraints" -e ".$extras"
