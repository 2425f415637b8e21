"""Render a checkpoint's continuations, their figures and a listening page.

The code is in music_continuation.evaluation.inference; `python inference_sample.py --help` lists the flags."""
from music_continuation.evaluation.inference import cli

if __name__ == "__main__":
    cli()
