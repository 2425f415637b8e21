"""Saving and loading training checkpoints (atomically), and rebuilding a trained model for inference.

A checkpoint is one torch file holding a dict:

    model             unwrapped state dict (no "module." / "_orig_mod." prefixes)
    model_config      ContinuationTransformer keyword arguments
    optimizer         AdamW state dict
    scheduler         LR scheduler state dict (its step count is the global step, in optimiser steps)
    schedule_steps    the LR schedule's length in optimiser steps (kept when --epochs changes on resume)
    epoch             the last finished epoch (1-based); resuming starts at epoch + 1
    args              every launcher flag (dict), as of the latest (re)start
    resume_history    [{"epoch": E, "changed": {flag: [before, after]}}] flags changed at each resume
    latent_mean, latent_std   [128] float tensors: the cache's normalisation statistics
    codec_fingerprint, encodec_weights   the codec whose latents the model was trained on
    mlflow_run_id     the MLflow run to continue when resuming (None if MLflow was not reachable)
    best_val_loss     the lowest validation loss so far (decides best.pt)
    best              {"epoch": E, "val": {figure: value}}: the best epoch's validation figures
    val_loss          this epoch's validation loss (NaN if some example was non-finite)
    segment_frames    latent frames per input window
    skipped_steps     non-finite steps skipped so far
    world_size        processes that produced it
    balancer          with --loss_balancer: the moving average of the gradient norms at the output audio
                      {"components", "ema_decay", "ema_sum", "ema_count"} (balancer.LossBalancer); else None
    discriminator     with an adversarial weight > 0: {"model", "optimizer"} state dicts of the discriminator
                      and its Adam (adversarial.adversary.Adversary); else None
    ema               with --ema_decay > 0: {"decay", "count", "average"} (optim.ema.ModelEMA); else None
    weights           which weights inference uses by default: "ema" (the `ema` average) or "raw" (`model`,
                      always the training weights, which resuming continues from)

No RNG state is stored: the worker reseeds every process at the start of each epoch from
(seed, rank, epoch) and the DistributedSampler shuffles from (seed, epoch), so the epoch number is
all that a bit-exact resume needs.
"""
from __future__ import annotations

import fcntl
import io
import os
import zipfile
from pathlib import Path

import torch

from music_continuation.utils import UserError, atomic_path, missing_keys, one_line

LOCK_NAME = ".training.lock"   # held (flock) by the run that owns the folder; holds that process's pid
LATEST_NAME = "latest.pt"
BEST_NAME = "best.pt"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")   # added by DistributedDataParallel and torch.compile


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable or not one of ours (message is one line)."""


def lock_checkpoint_dir(folder: str | os.PathLike):
    """Make `folder` (if needed) and take the exclusive lock that makes this process its only trainer.

    The lock is flock(2) on folder/LOCK_NAME: held while the returned file stays open, released on exit and
    by the kernel on a crash or kill -9, so a dead run never blocks the next one. The file records the
    holder's pid, which a refused run names. CheckpointError (one line naming the folder) if the folder
    cannot be written or another run holds it.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"--checkpoint_dir {folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_NAME, "a+")
    except OSError as error:
        raise CheckpointError(f"--checkpoint_dir {folder}: cannot write there ({error.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise CheckpointError(f"--checkpoint_dir {folder} is in use by another training run (pid {holder}); "
                              f"wait for it to end, or pass another --checkpoint_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def unwrapped_state_dict(model: torch.nn.Module) -> dict:
    """The state dict of the bare model, whatever DDP / torch.compile wrappers surround it."""
    state = model.state_dict()
    cleaned = {}
    for name, tensor in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        cleaned[name] = tensor
    return cleaned


def build_checkpoint(*, model, optimizer, scheduler, schedule_steps: int, epoch: int, args: dict,
                     resume_history: list, normalizer_stats: tuple, codec_fingerprint: str, encodec_weights: str,
                     mlflow_run_id, best_val_loss: float, best: dict, val_loss: float, segment_frames: int,
                     skipped_steps: int, world_size: int, balancer: dict | None = None,
                     discriminator: dict | None = None, ema: dict | None = None) -> dict:
    """The checkpoint dict of the module docstring (the one place its contents are assembled)."""
    latent_mean, latent_std = normalizer_stats
    return {"model": unwrapped_state_dict(model), "model_config": model.config,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "schedule_steps": schedule_steps, "epoch": epoch, "args": args, "resume_history": resume_history,
            "latent_mean": latent_mean, "latent_std": latent_std, "codec_fingerprint": codec_fingerprint,
            "encodec_weights": encodec_weights, "mlflow_run_id": mlflow_run_id, "best_val_loss": best_val_loss,
            "best": best, "val_loss": val_loss, "segment_frames": segment_frames,
            "skipped_steps": skipped_steps, "world_size": world_size, "balancer": balancer,
            "discriminator": discriminator, "ema": ema, "weights": "raw" if ema is None else "ema"}


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save atomically: a crash at any moment leaves the previous file or the new one, never a torn one.

    The state is serialised in memory first and written with plain file I/O, so a full disk is an OSError
    with its errno (torch's own writer reports only 'unexpected pos'): CheckpointError('cannot write PATH:
    No space left on device'), and the previous file stays as it was.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp_path:
            with open(tmp_path, "wb") as file:
                file.write(buffer.getbuffer())
    except OSError as error:
        raise CheckpointError(f"cannot write {path}: {error.strerror or one_line(error)}") from None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by save_checkpoint; CheckpointError with a one-line reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    check_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated / foreign / corrupt files raise many types
        raise CheckpointError(f"{path}: not a readable checkpoint ({one_line(error)})") from None
    missing = missing_keys(state, ("model", "model_config", "epoch", "latent_mean", "latent_std", "codec_fingerprint"))
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (missing {', '.join(missing)})")
    return state


def check_archive(path: Path) -> None:
    """torch.save writes a zip archive: say what is wrong with a file that is not one (torch's own errors,
    'pop from empty list' or '[Errno 22] Invalid argument', say nothing a user can act on)."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
        size = path.stat().st_size
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read it ({error.strerror})") from None
    if head != b"PK\x03\x04":
        raise CheckpointError(f"{path}: not a checkpoint (not a file written by torch.save); "
                              f"pass the latest.pt or best.pt of a training run")
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError):
        raise CheckpointError(f"{path}: truncated or damaged checkpoint ({size} bytes, its end is missing): "
                              f"an interrupted copy? copy it again, or use the other of latest.pt / best.pt") from None


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """checkpoint_dir/latest.pt if it exists (what `--resume auto` continues from)."""
    path = Path(checkpoint_dir) / LATEST_NAME
    return path if path.is_file() else None


def describe_latest(checkpoint_dir: str | os.PathLike) -> str:
    """'latest checkpoint is DIR/latest.pt, epoch N; resume with --resume auto', for the line that ends a
    stopped run. Memory-mapped: only the epoch is read, however large the file."""
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return f"no checkpoint in {checkpoint_dir} yet (the first epoch did not finish)"
    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    except Exception as error:  # noqa: BLE001 - the line must come whatever is wrong with the file
        return f"{path} cannot be read ({one_line(error)})"
    return f"latest checkpoint is {path}, epoch {epoch}; resume with --resume auto"


WEIGHT_CHOICES = ("auto", "ema", "raw")   # auto: the EMA weights when the checkpoint has them, else the raw ones


def inference_state_dict(state: dict, weights: str = "auto", path="checkpoint") -> tuple[dict, str]:
    """(the model state dict to run, "ema" or "raw") of a checkpoint; CheckpointError if "ema" is asked of a
    checkpoint trained without --ema_decay."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    ema = state.get("ema")
    if weights == "ema" and ema is None:
        raise CheckpointError(f"{path}: has no EMA weights (trained without --ema_decay); pass --weights raw")
    if ema is None or weights == "raw":
        return state["model"], "raw"
    averaged = dict(state["model"])
    averaged.update({name: tensor.to(averaged[name].dtype) for name, tensor in ema["average"].items()})
    return averaged, "ema"


def load_model_for_inference(path: str | os.PathLike, device="cpu", weights: str = "auto"):
    """(model in eval mode, LatentNormalizer, checkpoint dict) from a training checkpoint.

    weights: "auto" (the EMA weights when present), "ema" or "raw"; the dict's "weights_used" says which."""
    from music_continuation.data.cache import LatentNormalizer
    from music_continuation.model import ContinuationTransformer

    state = load_checkpoint(path)
    model_state, state["weights_used"] = inference_state_dict(state, weights, path)
    try:
        model = ContinuationTransformer(**state["model_config"])
        model.load_state_dict(model_state)
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: model weights do not match its model_config "
                              f"({one_line(error)})") from None
    normalizer = LatentNormalizer(state["latent_mean"], state["latent_std"])
    return model.to(device).eval(), normalizer.to(device), state
