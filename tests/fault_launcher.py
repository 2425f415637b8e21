"""The training launcher with faults injected, for the tests and bench/fault_trials.py.

    TEST_FAULTS="fail=1:5" python tests/fault_launcher.py LAUNCHER FLAGS...

TEST_FAULTS holds one or more faults separated by ';':

    fail=R:S           rank R raises at global step S (a crashing rank must end the job)
    nan=R:S1,S2 | R:all  rank R's batch holds a NaN at those steps (the ranks skip the update together)
    slow=SECONDS       every step sleeps this long (time to interrupt a run)
    hold=EPOCH:PATH    epoch EPOCH and later wait at their start while the file PATH exists (a safe point:
                       SIGINT / SIGTERM still stop the rank there); the test removes PATH to let them go on

The launcher spawns its ranks, and a spawned process imports the main file again (as __mp_main__), so the
patch is made at import, in every process; under torchrun every rank runs this file itself. Where the tests do
not start the launcher themselves (ablate.py's cells under Slurm run `-m music_continuation.training.launcher`),
fault_environment(..., everywhere=True) puts tests/faults_everywhere on PYTHONPATH: its sitecustomize makes the
same patch in every Python process that imports the worker. The faults wrap worker.train_step, which
train_one_epoch looks up at each step, and worker.train_one_epoch, which the epoch loop looks up at each epoch.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from music_continuation.training import launcher, worker

FAULTS_VARIABLE = "TEST_FAULTS"
FAULT_LAUNCHER = Path(__file__).resolve()
ROOT = FAULT_LAUNCHER.parents[1]
EVERYWHERE = FAULT_LAUNCHER.parent / "faults_everywhere"     # its sitecustomize.py installs the faults
HOLD_POLL_SECONDS = 0.1


def fault_environment(faults: str, base: dict, everywhere: bool = False) -> dict:
    """`base` with TEST_FAULTS set, and the checkout on PYTHONPATH (this file's folder is not the package's);
    `everywhere`: also in launchers started as `-m music_continuation.training.launcher` (EVERYWHERE)."""
    inherited = [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
    path = [str(EVERYWHERE)] * everywhere + [str(ROOT)] + inherited
    return {**base, FAULTS_VARIABLE: faults, "PYTHONPATH": os.pathsep.join(path)}


def parse_faults(text: str) -> dict:
    """{"fail": (rank, step), "nan": (rank, steps or "all"), "slow": seconds, "hold": (epoch, path)} from the
    TEST_FAULTS text."""
    faults = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, value = item.partition("=")
        if kind == "fail":
            rank, step = value.split(":")
            faults["fail"] = (int(rank), int(step))
        elif kind == "nan":
            rank, steps = value.split(":")
            faults["nan"] = (int(rank), "all" if steps == "all" else {int(s) for s in steps.split(",")})
        elif kind == "slow":
            faults["slow"] = float(value)
        elif kind == "hold":
            epoch, path = value.split(":", 1)
            faults["hold"] = (int(epoch), Path(path))
        else:
            raise ValueError(f"{FAULTS_VARIABLE}: unknown fault {item!r}")
    return faults


def inject(faults: dict, rank: int, step: int, batch: dict) -> None:
    if "fail" in faults and faults["fail"] == (rank, step):
        raise RuntimeError(f"test-only failure injected on rank {rank} at step {step}")
    if "nan" in faults:
        nan_rank, steps = faults["nan"]
        if nan_rank == rank and (steps == "all" or step in steps):
            batch["input_latent"][0, 0, 0] = float("nan")
    if "slow" in faults:
        time.sleep(faults["slow"])


def hold(path: Path) -> None:
    """Wait while `path` exists, stopping at once (Interrupted) if SIGINT / SIGTERM arrives meanwhile."""
    while path.exists():
        worker.stop_if_signalled()
        time.sleep(HOLD_POLL_SECONDS)


def install(faults: dict) -> None:
    """Wrap worker.train_step: the scheduler has stepped once per optimiser step, so its count is the global step;
    and worker.train_one_epoch for a hold."""
    if "hold" in faults:
        first_epoch, path = faults["hold"]
        original_epoch = worker.train_one_epoch

        @functools.wraps(original_epoch)
        def train_one_epoch(ctx, epoch):
            if epoch >= first_epoch:
                hold(path)
            return original_epoch(ctx, epoch)

        worker.train_one_epoch = train_one_epoch
    original = worker.train_step

    @functools.wraps(original)
    def train_step(model, decoder, normalizer, loss_fn, optimizer, scheduler, group, *args, **kwargs):
        inject(faults, int(os.environ.get("RANK", "0")), scheduler.last_epoch, group[0])
        return original(model, decoder, normalizer, loss_fn, optimizer, scheduler, group, *args, **kwargs)

    worker.train_step = train_step


if __name__ in ("__main__", "__mp_main__"):      # the program, or a rank it spawned; not an import by a test
    install(parse_faults(os.environ.get(FAULTS_VARIABLE, "")))

if __name__ == "__main__":
    launcher.cli()
