#!/usr/bin/env bash
# Train the continuation model with DDP (train_simple_ddp.py) and these loss weights.
#
#   bash run_train_simple.sh --demo                       # small offline demo: built-in corpus, tiny model, 3 epochs
#   bash run_train_simple.sh --data_dir data_cache/mine   # real training (launcher defaults: 200 epochs, GPU-sized model)
#
# Loss weights default to pure continuation (0 input, 1 target, 0 spectral, 0 mel: the original
# behaviour; the demo: the balanced mix 0 / 0.4 / 0.3 / 0.3). Override them with environment variables, or
# with flags, which win because "$@" comes last:
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

if [ "${DEMO:-0}" = "1" ]; then
    # The demo trains the balanced mix: at demo scale pure RMS beats silence only narrowly by turning quiet
    # (measured: val rms_target 0.451 against silence's 0.470, output level 0.31), while the balanced mix keeps
    # the level (0.85) and beats both trivial baselines on its total and on spectral, mel and rhythm.
    # The environment still wins.
    : "${LOSS_WEIGHT_TARGET:=0.4}" "${LOSS_WEIGHT_SPECTRAL:=0.3}" "${LOSS_WEIGHT_MEL:=0.3}"
fi
args=(
    --loss_weight_input "${LOSS_WEIGHT_INPUT:-0.0}"
    --loss_weight_target "${LOSS_WEIGHT_TARGET:-1.0}"
    --loss_weight_spectral "${LOSS_WEIGHT_SPECTRAL:-0.0}"
    --loss_weight_mel "${LOSS_WEIGHT_MEL:-0.0}"
)

if [ "${DEMO:-0}" = "1" ]; then
    # Small enough to finish in minutes on a 2-core CPU; the built-in corpus is used because no --data_dir is given.
    args+=(
        --epochs 3 --d_model 128 --num_layers 2 --num_heads 4 --dropout 0.0
        --segment_frames 16 --batch_size 8 --lr 1e-3 --warmup_steps 10
        --nproc 2 --log_audio_every 1
        --checkpoint_dir checkpoints/demo --experiment_name music-continuation-demo
        --mlflow_tracking_uri sqlite:///mlflow.db
    )
fi

exec "$PYTHON" train_simple_ddp.py "${args[@]}" "$@"
