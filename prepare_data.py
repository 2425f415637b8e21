"""Encode a folder of audio into a latent cache (or the built-in demo corpus with --demo).

The code is in music_continuation.data.prepare; `python prepare_data.py --help` lists the flags."""
from music_continuation.data.prepare import cli

if __name__ == "__main__":
    cli()
