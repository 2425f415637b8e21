"""One rank's training loop. The launcher (train_simple_ddp.py) starts it in every process; it is not run alone.

The code is in music_continuation.training.worker (and its step.py, context.py and report.py).
"""
import sys

# the worker's names, for code that imports this file (the worker's step, shared state and report included)
from music_continuation.training.context import *  # noqa: F401,F403
from music_continuation.training.report import *  # noqa: F401,F403
from music_continuation.training.step import *  # noqa: F401,F403
from music_continuation.training.worker import *  # noqa: F401,F403

if __name__ == "__main__":
    print("error: train_simple_worker.py is started by train_simple_ddp.py in every rank; run that instead",
          file=sys.stderr)
    sys.exit(2)
