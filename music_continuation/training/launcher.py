"""Train the continuation transformer with DistributedDataParallel: the launcher.

One node, every GPU (or N CPU processes with gloo):
    python train_simple_ddp.py --data_dir data_cache/mymusic
Several nodes: start this same script with torchrun on each node; it then runs the worker directly:
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --rdzv_backend c10d \
        --rdzv_endpoint HOST:29500 train_simple_ddp.py --data_dir ...

Settings are defined here (argparse) and checked; `--config FILE` (YAML or JSON, config.py) sets any of
them from a file, and flags on the command line win. What each flag means to a resumed run and to a study
is settings.FLAG_ROLES. Everything is validated before any process is spawned, so a bad flag costs a
one-line error, not a crashed job. The training loop itself is in worker.py.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import math
import multiprocessing.connection
import os
import signal
import sys
import time
from pathlib import Path

import torch

from music_continuation.adversarial.discriminator import SHORTEST_SECONDS
from music_continuation.codec import HOP_LENGTH, WEIGHT_CHOICES_HELP, CodecLoadError, codec_fingerprint, load_codec
from music_continuation.config import ConfigError, parse_with_config
from music_continuation.evaluation.listeners import BEAT_TRACKERS
from music_continuation.evaluation.scoring import TARGET_AUDIO_CHOICES, resolve_target_audio
from music_continuation.losses.audio import (
    LOSSES,
    CombinedLoss,
    adversarial_weighted,
    check_weights,
    weights_from_flags,
)
from music_continuation.settings import DISCRIMINATOR_DEFAULTS, flags_where, older_run_values
from music_continuation.training import watchdog
from music_continuation.training.checkpoint import describe_latest
from music_continuation.training.watchdog import DEFAULT_STUCK_TIMEOUT, FIRST_STEP_FACTOR, START_UP_SECONDS
from music_continuation.utils import OneLineParser, check_mlflow_server, exit_now, free_port


def parse_bool(text: str) -> bool:
    """'true/false', '1/0', 'yes/no', 'on/off' (any case). Plain bool('False') would be True."""
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON file of flag: value (a preset name such as 'balanced' works too; "
                             "docs/training.md); flags given on the command line win")
    data = parser.add_argument_group("data")
    data.add_argument("--data_dir", default=None,
                      help="cache made by prepare_data.py (default: the built-in demo corpus, prepared on first use)")
    data.add_argument("--references_dir", default=None,
                      help="folder of the decoded references (--target_audio codec); default: DATA_DIR/references if "
                           "the cache is writable, else a per-user folder (~/.cache/music_continuation/references)")
    data.add_argument("--encodec_weights", default=None,
                      help=f"codec whose decoder turns predictions into audio: {WEIGHT_CHOICES_HELP} "
                           f"(default: the weights recorded in the cache; other weights are refused)")
    data.add_argument("--segment_frames", type=int, default=150,
                      help="latent frames per example (75 per second): the model reads this many and predicts as many")
    data.add_argument("--unity_test", type=parse_bool, nargs="?", const=True, default=False,
                      help="sanity check: target = input, so the model only has to learn the identity")
    data.add_argument("--target_audio", choices=TARGET_AUDIO_CHOICES, default="auto",
                      help="what the output is scored against: 'original' audio, or 'codec': the frozen decoder's "
                           "audio of the true latents (reachable: a perfect prediction scores 0); "
                           "'auto': codec with the random codec, original otherwise")
    data.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes per rank")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=200)
    optim.add_argument("--batch_size", type=int, default=8, help="examples per micro-batch per process")
    optim.add_argument("--grad_accum_steps", type=int, default=1,
                       help="micro-batches per optimiser step (effective batch: nproc x batch_size x this)")
    optim.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of AdamW")
    optim.add_argument("--weight_decay", type=float, default=0.01, help="AdamW decoupled weight decay")
    optim.add_argument("--grad_clip", type=float, default=1.0,
                       help="max global gradient norm of the model's parameters (0: no clipping); with "
                            "--loss_balancer the gradient at the output audio has a fixed scale, so this only "
                            "catches spikes of the decoder's and model's Jacobians")
    optim.add_argument("--warmup_steps", type=int, default=500,
                       help="linear LR warm-up steps, then cosine decay to lr/10 at the last step")
    optim.add_argument("--seed", type=int, default=0, help="seeds the model init, data order and dropout")
    optim.add_argument("--compile", type=parse_bool, nargs="?", const=True, default=False,
                       help="torch.compile the model (GPU speed-up; first steps are slow while it compiles)")
    optim.add_argument("--decoder_checkpointing", type=parse_bool, nargs="?", const=True, default=False,
                       help="recompute the frozen decoder's activations in the backward pass, one example at a "
                            "time: much less memory on long segments for one extra decoder forward")

    model = parser.add_argument_group("model")
    model.add_argument("--d_model", type=int, default=512)
    model.add_argument("--num_layers", type=int, default=8)
    model.add_argument("--num_heads", type=int, default=8)
    model.add_argument("--dropout", type=float, default=0.1)

    loss = parser.add_argument_group("loss weights (total = sum of weight x component)")
    for component in LOSSES:
        loss.add_argument(component.flag, type=float, default=component.default, help=component.help)
    loss.add_argument("--loss_balancer", type=parse_bool, nargs="?", const=True, default=False,
                      help="EnCodec/AudioCraft loss balancer: each weight becomes the fraction of the gradient at "
                           "the output audio that its component drives, whatever the component's scale "
                           "(balancer.py); the logged loss stays the weighted sum")
    loss.add_argument("--balancer_ema_decay", type=float, default=0.999,
                      help="decay of the balancer's bias-corrected moving average of the gradient norms, in [0, 1]")

    adversarial = parser.add_argument_group(
        "adversarial training and weight averaging (docs/adversarial.md): on when --loss_weight_adversarial or "
        "--loss_weight_feature_matching is above 0")
    adversarial.add_argument("--discriminator_lr", type=float, default=DISCRIMINATOR_DEFAULTS["discriminator_lr"],
                             help="learning rate of the discriminator's Adam (betas 0.5, 0.9, as AudioCraft's)")
    adversarial.add_argument("--adversarial_start_step", type=int,
                             default=DISCRIMINATOR_DEFAULTS["adversarial_start_step"],
                             help="optimiser steps before the generator's adversarial and feature-matching terms "
                                  "apply (they are measured before; the discriminator trains from the start)")
    adversarial.add_argument("--discriminator_context", type=parse_bool, nargs="?", const=True,
                             default=DISCRIMINATOR_DEFAULTS["discriminator_context"],
                             help="the discriminator also hears the context before the seam, so it judges whether "
                                  "the continuation follows it, not only whether it sounds real")
    adversarial.add_argument("--discriminator_window_seconds", type=float,
                             default=DISCRIMINATOR_DEFAULTS["discriminator_window_seconds"],
                             help="seconds of audio the discriminator hears per example and step, cut at a random "
                                  "place, the same in the output and the reference (0: all of it; its cost grows "
                                  "with this)")
    adversarial.add_argument("--ema_decay", type=float, default=0.0,
                             help="decay of the per-step moving average of the model's weights, used for validation, "
                                  "best.pt and inference (0: off; AudioCraft uses 0.99)")

    run = parser.add_argument_group("processes, checkpoints, logging")
    run.add_argument("--nproc", type=int, default=None,
                     help="processes on this node (default: every visible GPU, else 1 on CPU; any number on CPU)")
    run.add_argument("--checkpoint_dir", default="checkpoints", help="latest.pt and best.pt are written here")
    run.add_argument("--resume", default=None,
                     help="checkpoint to continue from, or 'auto' for CHECKPOINT_DIR/latest.pt if it exists")
    run.add_argument("--mlflow_tracking_uri", default=None,
                     help="MLflow tracking URI (default: MLflow's own: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    run.add_argument("--experiment_name", default="music-continuation")
    run.add_argument("--run_name", default=None)
    run.add_argument("--mlflow_parent_run_id", default=None,
                     help="create this run as a child of that MLflow run (ablate.py groups a study this way)")
    run.add_argument("--mlflow_tag", action="append", default=[], metavar="KEY=VALUE",
                     help="a tag for the MLflow run this job creates (repeatable)")
    run.add_argument("--logger", choices=("mlflow", "jsonl"), default="mlflow",
                     help="jsonl: metrics, parameters and tags as JSON lines in CHECKPOINT_DIR/metrics.jsonl instead "
                          "of MLflow (a machine without MLflow, e.g. bench/gpu_check.sh)")
    run.add_argument("--log_audio_every", type=int, default=10,
                     help="epochs between validation audio + spectrogram artifacts (0: never)")
    run.add_argument("--musical_every", type=int, default=0,
                     help="epochs between validations that also score rhythm, chroma and the pretrained listeners "
                          "(melody_f1, beat_f1, frechet_codec, ...; costly, logged to MLflow only; 0: never)")
    run.add_argument("--beat_tracker", choices=BEAT_TRACKERS, default="librosa",
                     help="beat tracker of the listeners' beat_f1 (madmom: CC BY-NC-SA 4.0 models)")
    run.add_argument("--stuck_timeout", type=float, default=DEFAULT_STUCK_TIMEOUT,
                     help=f"seconds without progress on any rank (a step, a validation batch, a checkpoint) after "
                          f"which the job is stuck: every rank's Python stack goes to CHECKPOINT_DIR/logs, one line "
                          f"names the stuck rank, the job ends; the start-up and first step may take "
                          f"{FIRST_STEP_FACTOR}x this, at least {START_UP_SECONDS:.0f} s")
    return parser


# --------------------------------------------------------------------------------------- validation

def check_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks that need nothing but the flags (cheap, so they come first)."""
    def positive(name):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("epochs", "batch_size", "grad_accum_steps", "d_model", "num_layers", "num_heads"):
        positive(name)
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    for name in ("weight_decay", "grad_clip"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            parser.error(f"--{name} must be a number >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.balancer_ema_decay <= 1.0:
        parser.error(f"--balancer_ema_decay must be in [0, 1], got {args.balancer_ema_decay}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.d_model % args.num_heads or args.d_model % 2:
        parser.error(f"--d_model ({args.d_model}) must be even and divisible by --num_heads ({args.num_heads})")
    if not (math.isfinite(args.stuck_timeout) and args.stuck_timeout >= 1):
        parser.error(f"--stuck_timeout must be at least 1 (seconds), got {args.stuck_timeout}")
    for name in ("num_workers", "log_audio_every", "warmup_steps", "musical_every"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.nproc is not None and args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():     # before --checkpoint_dir is made
        parser.error(f"--data_dir {args.data_dir}: no such directory (make it with prepare_data.py)")
    if args.nproc is not None and torch.cuda.is_available() and args.nproc > torch.cuda.device_count():
        parser.error(f"--nproc {args.nproc}: only {torch.cuda.device_count()} GPUs are visible")
    if args.musical_every:
        from music_continuation.evaluation.listeners import ListenerUnavailable, check_available
        try:
            check_available(args.beat_tracker)
        except ListenerUnavailable as error:
            parser.error(f"--musical_every {args.musical_every}: {error}")

    try:
        weights = check_weights(weights_from_flags(args))
    except ValueError as error:
        parser.error(str(error))
    check_adversarial_flags(args, parser, weights)

    min_length = CombinedLoss().min_length   # the STFT/mel losses are always measured: their FFT sets the minimum
    min_frames = math.ceil(min_length / HOP_LENGTH)
    if args.segment_frames < min_frames:
        parser.error(f"--segment_frames {args.segment_frames} is too short: the spectral losses use a "
                     f"{min_length}-point STFT, which needs at least {min_frames} frames "
                     f"({min_frames * HOP_LENGTH} samples)")
    if not args.experiment_name.strip():
        parser.error("--experiment_name must not be empty")
    for tag in args.mlflow_tag:
        if "=" not in tag or not tag.split("=", 1)[0].strip():
            parser.error(f"--mlflow_tag {tag!r}: expected KEY=VALUE")


def check_adversarial_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, weights: dict) -> None:
    """The discriminator's flags need a discriminator; --ema_decay is in [0, 1)."""
    if not (math.isfinite(args.ema_decay) and 0.0 <= args.ema_decay < 1.0):
        parser.error(f"--ema_decay must be in [0, 1) (0: off), got {args.ema_decay}")
    if not (math.isfinite(args.discriminator_lr) and args.discriminator_lr > 0):
        parser.error(f"--discriminator_lr must be a positive number, got {args.discriminator_lr}")
    if args.adversarial_start_step < 0:
        parser.error(f"--adversarial_start_step must be >= 0, got {args.adversarial_start_step}")
    window = args.discriminator_window_seconds
    if not (math.isfinite(window) and (window == 0 or window >= SHORTEST_SECONDS)):
        parser.error(f"--discriminator_window_seconds must be 0 (all the audio) or at least {SHORTEST_SECONDS:.4f} "
                     f"(the discriminator's largest FFT), got {window}")
    if not adversarial_weighted(weights):
        for name, default in DISCRIMINATOR_DEFAULTS.items():
            if getattr(args, name) != default:
                parser.error(f"--{name} needs a discriminator: give --loss_weight_adversarial or "
                             f"--loss_weight_feature_matching a weight above 0")


def demo_cache_ready(cache_dir: Path) -> bool:
    """Complete, and encoded by this version's random codec."""
    from music_continuation.data.cache import CacheError, read_manifest, require_complete
    from music_continuation.data.prepare import random_codec_fingerprint
    try:
        manifest = read_manifest(cache_dir)
        require_complete(manifest, cache_dir)
    except CacheError:
        return False
    return manifest["codec_fingerprint"] == random_codec_fingerprint()


def ensure_demo_cache() -> Path:
    """The built-in demo corpus, generated and encoded on first use (a file lock keeps torchrun ranks from racing)."""
    from music_continuation.data import prepare as prepare_data
    cache_dir = Path(prepare_data.DEMO_CACHE_DIR)
    if demo_cache_ready(cache_dir):
        return cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir.parent / f".{cache_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not demo_cache_ready(cache_dir):
            print(f"preparing the built-in demo corpus in {cache_dir} (first use only)", file=sys.stderr, flush=True)
            prepare_data.prepare_demo(cache_dir)
    return cache_dir


def check_data_and_codec(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """Resolve --data_dir, --encodec_weights and --target_audio, make sure the cache can feed this configuration;
    return the codec fingerprint."""
    from music_continuation.data.cache import CacheError, ContinuationDataset
    from music_continuation.data.integrity import check_cache_files
    if args.data_dir is None:
        args.data_dir = str(ensure_demo_cache())
    args.data_dir = str(Path(args.data_dir).resolve())
    try:
        train_set = ContinuationDataset(args.data_dir, "train", args.segment_frames, args.unity_test)
        val_set = ContinuationDataset(args.data_dir, "val", args.segment_frames, args.unity_test)
        train_set.check_arrays()     # a broken file is found now, not at the first step of a rank
        val_set.check_arrays()
        # bytes changed in place (size and mtime kept) are found now, not trained on: CRC-32, once per machine
        check_cache_files(args.data_dir, train_set.manifest)
    except (CacheError, ValueError) as error:
        parser.error(f"--data_dir: {error}")
    world_size = world_size_of(args)
    per_step = world_size * args.batch_size * args.grad_accum_steps
    if len(train_set) < per_step:
        parser.error(f"--data_dir {args.data_dir}: the training split has {len(train_set)} examples of "
                     f"2 x {args.segment_frames} frames, fewer than one step needs ({world_size} processes x "
                     f"--batch_size {args.batch_size} x --grad_accum_steps {args.grad_accum_steps})")

    recorded = train_set.encodec_weights
    weights = recorded if args.encodec_weights is None else args.encodec_weights
    try:
        fingerprint = codec_fingerprint(load_codec(weights, "cpu"))
    except CodecLoadError as error:
        parser.error(str(error))
    if fingerprint != train_set.codec_fingerprint:
        parser.error(f"--encodec_weights {weights}: codec {fingerprint} differs from the one that made the cache "
                     f"{args.data_dir} ({recorded!r}, {train_set.codec_fingerprint}); "
                     f"the decoder must match the encoder")
    args.encodec_weights = weights
    args.target_audio = resolve_target_audio(args.target_audio, weights)
    return fingerprint


# Flags a resumed run must share with its checkpoint (settings.FLAG_ROLES): a change would silently make a
# different experiment. --nproc is compared as the world size, which torchrun may set instead.
RESUME_MUST_MATCH = tuple("world_size" if flag == "nproc" else flag for flag in flags_where(resume="must match"))
# Flags that may change on resume: said in one line, recorded in the checkpoint and as an MLflow tag.
# --epochs keeps the LR schedule of the original run (its length is stored in the checkpoint): added epochs
# continue at the schedule's final LR, lr/10, so the LR never jumps.
RESUME_MAY_CHANGE = flags_where(resume="may change")


def resume_changes(saved_args: dict, args: argparse.Namespace, world_size: int) -> tuple[list, dict]:
    """([(flag, saved, now)] that must match but differ, {flag: [saved, now]} accepted changes)."""
    now = dict(vars(args), world_size=world_size)
    saved = dict(saved_args)
    refused = [(name, saved[name], now[name]) for name in RESUME_MUST_MATCH
               if name in saved and saved[name] != now[name]]
    accepted = {name: [saved[name], now[name]] for name in RESUME_MAY_CHANGE
                if name in saved and saved[name] != now[name]}
    return refused, accepted


def epochs_note(change: list | None) -> str:
    """What a changed --epochs does to the LR schedule, whose length the checkpoint keeps."""
    if change is None:
        return ""
    before, now = change
    if now > before:
        return " (the LR schedule keeps its length; added epochs run at lr/10)"
    return (f" (the LR schedule keeps its length of {before} epochs: training stops at epoch {now}, before the "
            f"LR has decayed to lr/10)")


def resolve_resume(args: argparse.Namespace, parser: argparse.ArgumentParser, fingerprint: str) -> str | None:
    """The checkpoint file to continue from (None: start fresh), checked against the flags and the cache."""
    from music_continuation.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = latest_checkpoint(args.checkpoint_dir)
        if path is None:
            print(f"--resume auto: no {Path(args.checkpoint_dir) / 'latest.pt'} yet, starting from scratch",
                  file=sys.stderr)
            return None
    else:
        path = Path(args.resume)
    try:
        state = load_checkpoint(path)
    except CheckpointError as error:
        parser.error(f"--resume: {error}")
    if state["codec_fingerprint"] != fingerprint:
        parser.error(f"--resume {path}: trained on codec {state['codec_fingerprint']}, but the cache "
                     f"{args.data_dir} uses {fingerprint}")
    saved = dict(state.get("args") or {}, **state["model_config"], segment_frames=state.get("segment_frames"))
    if "world_size" in state:
        saved["world_size"] = state["world_size"]
    saved.setdefault("loss_balancer", False)     # checkpoints from before the balancer trained without it
    # ... and those from before the discriminator and the EMA without them
    saved = {**older_run_values(saved), **saved}
    refused, accepted = resume_changes(saved, args, world_size_of(args))
    if refused:
        name, before, now = refused[0]
        flag = "--nproc (world size)" if name == "world_size" else f"--{name}"
        parser.error(f"--resume {path}: the checkpoint has {flag} {before}, this command asks for {now}; "
                     f"pass the same flags as the original run (a change here would be a different experiment)")
    if state["epoch"] >= args.epochs:
        parser.error(f"--resume {path}: the checkpoint has finished epoch {state['epoch']} of --epochs {args.epochs}; "
                     f"pass a larger --epochs to train on")
    if accepted:
        said = ", ".join(f"--{name} {before} -> {now}" for name, (before, now) in accepted.items())
        print(f"--resume {path}: continuing with {said}{epochs_note(accepted.get('epochs'))}", file=sys.stderr)
    args.resume_changes = accepted
    return str(path)


def check_mlflow_reachable(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A remote tracking server must answer /health now, or we refuse to start (better than failing at epoch 1)."""
    if args.logger == "jsonl":
        return
    uri = args.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    try:
        check_mlflow_server(uri)
    except OSError as error:
        parser.error(f"--mlflow_tracking_uri {uri}: {error}")


# ------------------------------------------------------------------------------------------ launch

def under_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def resolve_nproc(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        return args.nproc
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def world_size_of(args: argparse.Namespace) -> int:
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else resolve_nproc(args)


_checkpoint_dir_lock = []     # the open lock file of --checkpoint_dir (checkpoint.lock_checkpoint_dir), kept to exit


def claim_checkpoint_dir(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Rank 0 (the launcher, or torchrun's rank 0) locks --checkpoint_dir for the whole run: two runs on one
    folder would overwrite each other's latest.pt and best.pt. Also proves the folder is writable."""
    from music_continuation.training.checkpoint import CheckpointError, lock_checkpoint_dir
    if int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        _checkpoint_dir_lock.append(lock_checkpoint_dir(args.checkpoint_dir))
    except CheckpointError as error:
        parser.error(str(error))


def parse_and_validate(argv=None, lock: bool = False) -> tuple[argparse.Namespace, str | None]:
    """The checked flags and the checkpoint to resume from; with `lock` (what main does), rank 0 also claims
    --checkpoint_dir, first of all the checks that touch the disk."""
    parser = build_parser()
    try:
        args = parse_with_config(parser, argv)
    except ConfigError as error:
        parser.error(str(error))
    args.resume_changes = {}
    check_flags(args, parser)
    if lock:
        claim_checkpoint_dir(args, parser)
    fingerprint = check_data_and_codec(args, parser)
    resume_path = resolve_resume(args, parser, fingerprint)
    if int(os.environ.get("RANK", "0")) == 0:
        check_mlflow_reachable(args, parser)
    return args, resume_path


STOP_GRACE_SECONDS = 10.0     # after SIGTERM, ranks get this long to exit cleanly before SIGKILL
EXIT_FOR_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
RANK_CLOSED_ITS_RUN = (0, 1, 130, 143)    # rank 0 exits so only after closing its MLflow run (worker.guarded_run)


def main(argv=None) -> int:
    args, resume_path = parse_and_validate(argv, lock=True)
    from music_continuation.training import worker as train_simple_worker

    if under_torchrun():       # torchrun already started one process per GPU and set the rendezvous
        if args.nproc is not None:
            print("note: --nproc is ignored under torchrun (use its --nproc_per_node)", file=sys.stderr)
        train_simple_worker.leave(train_simple_worker.guarded_run(args, resume_path))

    nproc = resolve_nproc(args)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc))
    # Ranks leave with os._exit (worker.leave), so the semaphores of their DataLoader queues
    # are freed by multiprocessing's resource tracker, which would warn about each: it inherits this -W.
    sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    become_subreaper()
    context = torch.multiprocessing.get_context("spawn")
    reports = context.SimpleQueue()
    ranks = [context.Process(target=train_simple_worker.spawned_worker, args=(rank, args, resume_path, reports),
                             name=f"rank{rank}") for rank in range(nproc)]
    board = watchdog.Board(watchdog.board_path(nproc), nproc)     # the ranks' heartbeats (they find it by the env)
    try:
        return supervise(ranks, reports, args.checkpoint_dir, board, args.stuck_timeout)
    finally:
        end_orphans()
        board.remove()


PR_SET_CHILD_SUBREAPER = 36    # prctl(2) option


def become_subreaper() -> None:
    """Linux: orphans of this job (a DataLoader worker whose rank died while it was starting) become the
    launcher's children instead of init's, so end_orphans can find and end them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc: every Linux has it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                # the command name (field 2) is in parentheses and may hold spaces: the parent pid follows ')'
                if int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def end_orphans() -> None:
    """After the ranks: SIGKILL and reap every process of the job still around, but multiprocessing's resource
    tracker, so no process of the job outlives the launcher, whatever the timing. The tracker (it frees the
    semaphores of ranks that left with os._exit) exits on its own with the launcher, once no process holds
    its pipe, which the killed orphans did."""
    from multiprocessing import resource_tracker
    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    for _ in range(10):          # a killed orphan may have had children of its own: they come to us next
        orphans = [pid for pid in children_of(os.getpid()) if pid != tracker]
        if not orphans:
            return
        for pid in orphans:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in orphans:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)


def supervise(ranks: list, reports, checkpoint_dir: str, board=None, stuck_timeout: float = DEFAULT_STUCK_TIMEOUT
              ) -> int:
    """Start the rank processes and wait for them; return the job's exit code, having printed at most one line.

    The first rank to fail (an error report, a stuck job reported by a rank's watchdog, or an exit without
    having reported success) ends the job: the others get SIGTERM, then SIGKILL after STOP_GRACE_SECONDS.
    SIGINT / SIGTERM to the launcher stop every rank the same way and exit 130 / 143. A rank that reported
    success but then died while tearing down (e.g. SIGABRT from a library's exit handler) does not fail a
    finished run. `board`: the ranks' heartbeats; if no rank's own watchdog has acted LAUNCHER_GRACE_SECONDS
    after the limit (every rank stopped), the launcher does what it would have (watchdog.end_stuck).
    """
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in EXIT_FOR_SIGNAL}
    done, errors, dead = set(), [], []
    try:
        for process in ranks:
            process.start()
        while not (received or errors or dead):
            if all(p.exitcode is not None for p in ranks):
                return 0
            multiprocessing.connection.wait([p.sentinel for p in ranks], timeout=0.5)
            drain(reports, done, errors)
            dead = failed(ranks, done)     # before stopping the others, whose exits are not the cause
            if dead and board is not None and board.held_by_another():
                dead = []    # a watchdog ending a stuck job killed it (or its stack dump crashed it): its line follows
            if board is not None and not (errors or dead):
                stuck = watchdog.stuck_slots(board, stuck_timeout, watchdog.LAUNCHER_GRACE_SECONDS)
                if stuck and board.try_lock():
                    what, _ = watchdog.end_stuck(board, stuck, Path(checkpoint_dir) / "logs", stuck_timeout)
                    errors.append((None, f"error: {what}. {describe_latest(checkpoint_dir)}"))
    finally:
        stop(ranks)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    drain(reports, done, errors)       # after the stop too: a rank's own error line beats "it exited"
    # A rank killed without a report is the cause; the others' errors (a collective that lost it) are effects.
    # A stuck job's line (rank None: the watchdog killed the other ranks itself) says why they were killed.
    stuck = bool(errors) and errors[0][0] is None
    lost = [(index, code) for index, code in dead if code < 0 and index not in {rank for rank, _ in errors}]
    if received:
        print(f"interrupted: {describe_latest(checkpoint_dir)}", file=sys.stderr, flush=True)
    elif errors and (stuck or not lost):
        print(errors[0][1], file=sys.stderr, flush=True)
    else:
        index, code = (lost or dead)[0]
        print(lost_rank_line(index, ranks[index].pid, code, [r for r in range(len(ranks)) if r != index],
                             checkpoint_dir), file=sys.stderr, flush=True)
    if ranks and ranks[0].exitcode not in RANK_CLOSED_ITS_RUN:
        from music_continuation.training.mlflow_logger import close_recorded_run
        close_recorded_run(checkpoint_dir, "KILLED" if received else "FAILED")
    return EXIT_FOR_SIGNAL[received[0]] if received else 1


def lost_rank_line(rank: int, pid: int, code: int, others: list, checkpoint_dir: str) -> str:
    """The line for a rank that ended without a report (killed, out of memory): the same words as a survivor's
    under torchrun (worker.peer_loss_line), with the checkpoint to resume from."""
    how = (f"was lost ({signal.Signals(-code).name}): killed, or out of memory (see the system log)" if code < 0
           else f"exited with code {code} without an error report")
    stopped = (f"rank {others[0]} stopped too" if len(others) == 1 else
               f"ranks {', '.join(map(str, others))} stopped too" if others else "the job stopped")
    return f"error: rank {rank} (pid {pid}) {how}; {stopped}. {describe_latest(checkpoint_dir)}"


def drain(reports, done: set, errors: list) -> None:
    """Read the ranks' reports: ("done", rank, None), ("error", rank, one-line message) or ("stuck", rank, the
    watchdog's whole line); errors get (rank, the line to print), a stuck job's first with rank None."""
    while not reports.empty():
        kind, rank, message = reports.get()
        if kind == "done":
            done.add(rank)
        elif kind == "stuck":          # the watchdog killed the other ranks: its line, not theirs, says why
            errors.insert(0, (None, message))
        else:
            errors.append((rank, f"error: training failed on {message}"))


def failed(ranks: list, done: set) -> list:
    """(rank, exit code) of the ranks that exited non-zero without having reported success."""
    return [(index, p.exitcode) for index, p in enumerate(ranks)
            if p.exitcode is not None and p.exitcode != 0 and index not in done]


def stop(ranks: list) -> None:
    """SIGTERM every live rank, wait up to STOP_GRACE_SECONDS for all, then SIGKILL what is left."""
    alive = [p for p in ranks if p.pid is not None and p.exitcode is None]
    for process in alive:
        process.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in alive:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in alive:
        if process.exitcode is None:
            process.kill()
            process.join()


def cli() -> None:
    exit_now(main())     # the ranks are gone and nothing is left to write


if __name__ == "__main__":
    cli()
