#!/usr/bin/env bash
# Train the continuation model with DDP (train_simple_ddp.py).
#
#   bash run_train_simple.sh --demo                       # small offline demo: configs/demo.yaml
#   bash run_train_simple.sh --data_dir data_cache/mine   # real training (launcher defaults: 200 epochs, GPU-sized model)
#   bash run_train_simple.sh --data_dir data_cache/mine --config configs/balanced.yaml
#
# The loss weights come from the launcher's defaults (pure continuation), from the demo's preset, or from
# --config. The environment variables LOSS_WEIGHT_INPUT / _TARGET / _SPECTRAL / _MEL override them, and
# flags override those, because "$@" comes last:
#   LOSS_WEIGHT_TARGET=0.5 LOSS_WEIGHT_SPECTRAL=0.5 bash run_train_simple.sh --data_dir data_cache/mine
#   bash run_train_simple.sh --data_dir data_cache/mine --loss_weight_mel 0.3
# DEMO=1 is the same as --demo (it must then be the first argument).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=python3
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi

if [ "${1:-}" = "--demo" ]; then
    DEMO=1
    shift
fi

args=()
if [ "${DEMO:-0}" = "1" ]; then
    args+=(--config configs/demo.yaml)
fi
if [ -n "${LOSS_WEIGHT_INPUT:-}" ]; then args+=(--loss_weight_input "$LOSS_WEIGHT_INPUT"); fi
if [ -n "${LOSS_WEIGHT_TARGET:-}" ]; then args+=(--loss_weight_target "$LOSS_WEIGHT_TARGET"); fi
if [ -n "${LOSS_WEIGHT_SPECTRAL:-}" ]; then args+=(--loss_weight_spectral "$LOSS_WEIGHT_SPECTRAL"); fi
if [ -n "${LOSS_WEIGHT_MEL:-}" ]; then args+=(--loss_weight_mel "$LOSS_WEIGHT_MEL"); fi

exec "$PYTHON" train_simple_ddp.py "${args[@]}" "$@"
