"""One rank's training loop. The launcher (train_simple_ddp.py) starts it in every process; it is not run alone.

The code is in music_continuation.training.worker.
"""
import sys

from music_continuation.training.worker import *  # noqa: F401,F403  (the worker's names, for code that imports this file)

if __name__ == "__main__":
    print("error: train_simple_worker.py is started by train_simple_ddp.py in every rank; run that instead",
          file=sys.stderr)
    sys.exit(2)
