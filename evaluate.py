"""Score a checkpoint against the silence, repeat and oracle baselines.

The code is in music_continuation.evaluation.evaluate; `python evaluate.py --help` lists the flags."""
from music_continuation.evaluation.evaluate import cli

if __name__ == "__main__":
    cli()
