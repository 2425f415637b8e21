"""Run a loss ablation: a grid of training runs on MLflow, then one comparison report.

The code is in music_continuation.ablation.ablate; `python ablate.py --help` lists the flags."""
from music_continuation.ablation.ablate import cli

if __name__ == "__main__":
    cli()
