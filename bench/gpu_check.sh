#!/usr/bin/env bash
# Check and measure the CUDA path in one command; ends with one JSON line (bench/gpu_check.py documents the steps).
#
#   bash bench/gpu_check.sh --pack       # here, with the venv: pure-Python modules + the demo cache into .gpu_check/
#   bash bench/gpu_check.sh              # on the GPU machine (carry .gpu_check/ with the working tree)
#   bash bench/gpu_check.sh --cpu        # the same path at tiny sizes on the CPU (tests/test_gpu_check.py runs it)
#
# Needs only PyTorch (with numpy) where it runs: .gpu_check/site goes on PYTHONPATH and .gpu_check/cache is the
# default --data_dir; without them it uses what is installed and prepares a demo cache itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
PACK=.gpu_check
if [ "${1:-}" = "--pack" ]; then
    exec "$PYTHON" bench/gpu_check.py --pack "$PACK"
fi
if [ -d "$PACK/site" ]; then
    export PYTHONPATH="$PWD/$PACK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
extra=()
if [ -f "$PACK/cache/manifest.json" ] && [[ " $* " != *" --data_dir "* ]] && [[ " $* " != *" --cpu "* ]]; then
    extra=(--data_dir "$PWD/$PACK/cache")
fi
exec "$PYTHON" bench/gpu_check.py "${extra[@]}" "$@"
