"""Train the continuation model with DistributedDataParallel (spawn, torchrun or Slurm).

The code is in music_continuation.training.launcher; `python train_simple_ddp.py --help` lists the flags."""
from music_continuation.training.launcher import cli

if __name__ == "__main__":
    cli()
