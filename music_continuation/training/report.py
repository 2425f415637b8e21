"""Rank 0's report of a training run: the first line, the epoch block, checkpoints, MLflow parameters, metrics and
audio samples, settings.yaml, and the last line against the baselines; Progress, what a run carries from epoch to
epoch and across a resume."""
from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from music_continuation.codec import SAMPLE_RATE
from music_continuation.config import settings_text
from music_continuation.evaluation.scoring import BASELINES, LISTENER_FIGURES, predict_audio, reference_audio, skill
from music_continuation.losses.audio import LOSSES, shown_losses
from music_continuation.settings import FLAG_ROLES
from music_continuation.training import watchdog
from music_continuation.training.checkpoint import BEST_NAME, LATEST_NAME, build_checkpoint, save_checkpoint
from music_continuation.training.context import Context
from music_continuation.training.mlflow_logger import JsonlLogger, MlflowLogger, git_commit
from music_continuation.training.step import METRIC_NAMES
from music_continuation.utils import atomic_path, warn

AUDIO_EXAMPLES = 3             # validation examples written as WAV + spectrogram every --log_audio_every epochs
MUSICAL_FIGURES = ("rhythm", "chroma") + LISTENER_FIGURES   # validation with --musical_every only
ARTIFACT_WAIT_SECONDS = 120    # at the end, how long rank 0 waits for background artifact uploads
SETTINGS_NAME = "settings.yaml"  # in CHECKPOINT_DIR and the MLflow run: the launch's resolved flags


def format_epoch_block(epoch: int, epochs: int, train: dict, val: dict, lr: float, components=None) -> str:
    """The epoch block; components: the LossComponents shown (default: the four reference ones). A figure that
    does not exist (no validation result) is 'n/a', never 'nan'."""
    components = components or tuple(c for c in LOSSES if not c.adversarial)

    def figure(value):
        return f"{value:.4f}" if value is not None and math.isfinite(value) else "n/a"

    def line(label, means):
        parts = ", ".join(f"{component.short}: {figure(means[component.name])}" for component in components)
        return f"  {label:<11} {figure(means['loss'])} ({parts})"

    return "\n".join([f"Epoch {epoch}/{epochs}:", line("Train Loss:", train), line("Val Loss:", val),
                      f"  LR: {lr:.2e}"])


@torch.no_grad()
def write_audio_examples(ctx: Context, epoch: int) -> Path:
    """A few validation examples as WAV and, per example, the listening page's figure.

    exampleK_input.wav is the real audio of the input window, exampleK_output.wav the model's
    continuation, exampleK_target.wav what validation scores it against (--target_audio) and, with
    codec targets, exampleK_original.wav the real audio that follows the input. exampleK_spectrogram.png
    is plots.plot_continuations, as on the listening page: the input followed by each of them, the
    seam marked.
    """
    import soundfile

    from music_continuation.evaluation.listening_page import ending_title
    from music_continuation.evaluation.plots import plot_continuations

    folder = Path(ctx.args.checkpoint_dir) / "samples" / f"epoch_{epoch:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    count = min(AUDIO_EXAMPLES, len(ctx.val_set))
    indices = np.linspace(0, len(ctx.val_set) - 1, count).round().astype(int)
    target_audio = ctx.args.target_audio
    endings = {"output": "continuation", "target": "target", "original": "original"}   # clip -> the page's ending
    model = ctx.raw_model
    model.eval()
    for row, index in enumerate(indices):
        watchdog.beat("checkpoint")
        example = {name: tensor.unsqueeze(0).to(ctx.device) for name, tensor in ctx.val_set[int(index)].items()}
        with ctx.autocast():
            references = reference_audio(example, ctx.decoder, ctx.normalizer, target_audio)
            output = predict_audio(model, ctx.normalizer, ctx.decoder, example["input_latent"])
        clips = {"input": example["input_audio"], "output": output, "target": references[1]}
        if target_audio == "codec":
            clips["original"] = example["target_audio"]
        clips = {name: audio[0, 0].float().cpu() for name, audio in clips.items()}
        for name, audio in clips.items():
            soundfile.write(folder / f"example{row}_{name}.wav", audio.clamp(-1, 1).numpy(), SAMPLE_RATE)
        plot_continuations(folder / f"example{row}_spectrogram.png", clips["input"],
                           [(ending_title(ending, target_audio), clips[name]) for name, ending in endings.items()
                            if name in clips], title=f"epoch {epoch}: validation example {index}")
    model.train()
    return folder


def start_logger(ctx: Context, resume_state: dict | None, start_epoch: int) -> MlflowLogger:
    """Rank 0's MLflow run: a new one with every flag as a parameter, or the checkpoint's, reopened."""
    args = ctx.args
    run_id = resume_state.get("mlflow_run_id") if resume_state else None
    tags = dict(tag.split("=", 1) for tag in args.mlflow_tag)
    if getattr(args, "logger", "mlflow") == "jsonl":
        logger = JsonlLogger(Path(args.checkpoint_dir) / "metrics.jsonl", run_id, tags)
    else:
        logger = MlflowLogger(args.mlflow_tracking_uri, args.experiment_name, args.run_name, run_id,
                              args.mlflow_parent_run_id, tags, checkpoint_dir=args.checkpoint_dir,
                              continue_recorded=args.resume == "auto")
    if not logger.resumed:
        logger.log_params({**vars(args), "world_size": ctx.world_size, "device": ctx.device.type,
                           "codec_fingerprint": ctx.train_set.codec_fingerprint, "git_commit": git_commit()})
    logger.log_artifact(write_settings(args))
    if resume_state and args.resume_changes:   # params are write-once: accepted changes become a tag
        logger.set_tag(f"resume_epoch_{start_epoch}_changes",
                       ", ".join(f"{name} {before} -> {now}" for name, (before, now) in args.resume_changes.items()))
    return logger


def write_settings(args) -> Path:
    """CHECKPOINT_DIR/settings.yaml: every flag's value as this launch resolved it (config file, then the
    command line); itself a valid --config. Rewritten at every (re)start, like the checkpoint's args."""
    settings = {flag: value for flag, value in vars(args).items() if flag in FLAG_ROLES and flag != "config"}
    path = Path(args.checkpoint_dir) / SETTINGS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp_path:
        tmp_path.write_text(settings_text(settings))
    return path


def epoch_metrics(train: dict, val: dict | None, nonfinite: int, baselines: dict | None, seconds: float,
                  names: tuple[str, ...] = METRIC_NAMES) -> dict:
    """What MLflow gets for one epoch (never a NaN: an epoch without a validation result logs none)."""
    metrics = {f"train_{name}": train[name] for name in names}
    metrics.update({f"train_{name}": value for name, value in train.get("gradients", {}).items()})
    metrics.update(learning_rate=train["learning_rate"], skipped_steps=train["skipped_steps"],
                   epoch_seconds=seconds, val_nonfinite_examples=nonfinite)
    if val is not None:
        metrics.update({f"val_{name}": val[name] for name in names + ("latent_mse", "level") + MUSICAL_FIGURES
                        if val.get(name) is not None})
        for name, value in musical_skill(val, baselines).items():
            metrics[f"val_skill_{name}"] = value
        val_skill = run_skill(val, baselines)
        if val_skill is not None:
            metrics["val_skill"] = val_skill
    return {name: value for name, value in metrics.items() if math.isfinite(value)}


def musical_skill(val: dict, baselines: dict | None) -> dict:
    """{figure: skill} of the musical figures this validation has (an epoch with --musical_every)."""
    if baselines is None:
        return {}
    result = skill(val, baselines["repeat"], baselines["oracle"])
    return {name: result[name] for name in MUSICAL_FIGURES if result.get(name) is not None}


def run_skill(val: dict | None, baselines: dict | None):
    if val is None or baselines is None:
        return None
    return skill(val, baselines["repeat"], baselines["oracle"])["loss"]


def summary_line(progress: "Progress", baselines: dict | None, checkpoint_dir) -> str:
    """The launcher's last line: the best epoch against the trivial baselines."""
    def figure(value):
        return "n/a" if value is None else f"{value:.4f}"
    best = progress.best
    val = best["val"] or {"level": None}      # a checkpoint from an older version records no figures
    head = (f"done: best val loss {progress.best_val_loss:.4f} (epoch {best['epoch']}), "
            f"skill {figure(run_skill(best['val'], baselines))}, level {figure(val['level'])}")
    if baselines is not None:
        head += "; baselines " + ", ".join(f"{name} {baselines[name]['loss']:.4f}" for name in BASELINES)
    return f"{head}; checkpoints in {checkpoint_dir}"


@dataclass
class Progress:
    """What a run carries from epoch to epoch, and across a resume through the checkpoint."""
    start_epoch: int = 1
    best_val_loss: float = math.inf
    best: dict = field(default_factory=lambda: {"epoch": None, "val": None})   # the best epoch's figures
    skipped_steps: int = 0
    resume_history: list = field(default_factory=list)

    @classmethod
    def of(cls, state: dict | None, changes: dict) -> "Progress":
        if state is None:
            return cls()
        history = list(state.get("resume_history", []))
        if changes:
            history.append({"epoch": state["epoch"] + 1, "changed": changes})
        return cls(state["epoch"] + 1, state["best_val_loss"], state.get("best", {"epoch": None, "val": None}),
                   state.get("skipped_steps", 0), history)

    def record(self, epoch: int, train: dict, val: dict | None) -> bool:
        """Count the epoch; True if it is the best so far (val is reduced: the same answer on every rank)."""
        self.skipped_steps += train["skipped_steps"]
        if val is None or not val["loss"] < self.best_val_loss:
            return False
        self.best_val_loss, self.best = val["loss"], {"epoch": epoch, "val": val}
        return True


class Reporter:
    """Rank 0's end-of-epoch work: the printed block, checkpoints, MLflow metrics and audio samples.

    Artifact uploads run in a background thread, so a slow server never stalls the other ranks (they
    wait for rank 0 at the next collective)."""

    def __init__(self, ctx: Context, logger: MlflowLogger):
        self.ctx, self.logger = ctx, logger
        self.uploader, self.uploads = ThreadPoolExecutor(max_workers=1), []
        self.not_uploaded = []     # epochs whose samples were never sent: that epoch's metric logging failed

    def epoch(self, epoch: int, train: dict, val: dict | None, nonfinite: int, baselines: dict | None,
              progress: Progress, is_best: bool, seconds: float) -> None:
        ctx, args = self.ctx, self.ctx.args
        shown = val if val is not None else dict.fromkeys(ctx.metric_names, float("nan"))
        print(format_epoch_block(epoch, args.epochs, train, shown, train["learning_rate"],
                                 shown_losses(ctx.loss_fn.weights)), flush=True)
        state = build_checkpoint(
            model=ctx.raw_model, optimizer=ctx.optimizer, scheduler=ctx.scheduler, schedule_steps=ctx.schedule_steps,
            epoch=epoch, args=vars(args), resume_history=progress.resume_history,
            normalizer_stats=(ctx.train_set.latent_mean, ctx.train_set.latent_std),
            codec_fingerprint=ctx.train_set.codec_fingerprint, encodec_weights=args.encodec_weights,
            mlflow_run_id=self.logger.run_id, best_val_loss=progress.best_val_loss, best=progress.best,
            val_loss=shown["loss"], segment_frames=args.segment_frames, skipped_steps=progress.skipped_steps,
            world_size=ctx.world_size, balancer=ctx.balancer.state_dict(),
            discriminator=None if ctx.adversary is None else ctx.adversary.state_dict(),
            ema=None if ctx.ema is None else ctx.ema.state_dict())
        watchdog.beat("checkpoint")
        save_checkpoint(Path(args.checkpoint_dir) / LATEST_NAME, state)
        if is_best:
            watchdog.beat("checkpoint")
            save_checkpoint(Path(args.checkpoint_dir) / BEST_NAME, state)
        watchdog.beat("checkpoint")      # MLflow: a few capped retries at most
        sent = self.logger.log_metrics(epoch_metrics(train, val, nonfinite, baselines, seconds, ctx.metric_names),
                                       step=epoch)
        watchdog.beat("checkpoint")
        if args.log_audio_every and epoch % args.log_audio_every == 0:
            with (ctx.ema.swapped(ctx.raw_model) if ctx.ema is not None else contextlib.nullcontext()):
                folder = write_audio_examples(ctx, epoch)    # what validation heard: the averaged weights
            self.samples(epoch, folder, sent)

    def samples(self, epoch: int, folder: Path, sent: bool) -> None:
        """Upload an epoch's sample folder in the background, unless its metrics could not be sent: a server
        that just failed would only make the next uploads wait too. Those epochs are named by close()."""
        if sent:
            self.uploads.append(self.uploader.submit(self.logger.log_artifacts, folder, f"samples/epoch_{epoch:04d}"))
        else:
            self.not_uploaded.append(epoch)

    def close(self, status: str) -> None:
        if wait(self.uploads, timeout=ARTIFACT_WAIT_SECONDS).not_done:
            warn(f"MLflow artifact uploads still running after {ARTIFACT_WAIT_SECONDS} s; the files stay on disk")
        self.uploader.shutdown(wait=False, cancel_futures=True)
        if self.not_uploaded:
            warn(f"the samples of epoch(s) {', '.join(map(str, self.not_uploaded))} were not uploaded to MLflow "
                 f"(their metric logging failed); they stay in {Path(self.ctx.args.checkpoint_dir) / 'samples'}")
        self.logger.finish(status)


def announce(ctx: Context, logger: MlflowLogger, baselines: dict | None, resumed_at: int | None) -> None:
    """Rank 0's first line (and the baselines, once per run, at MLflow step 0)."""
    if baselines is not None and resumed_at is None:
        logger.log_metrics({f"val_baseline_{name}_loss": baselines[name]["loss"] for name in BASELINES}, step=0)
        logger.log_metrics({f"val_baseline_{name}_{figure}": baselines[name][figure] for name in BASELINES
                            for figure in MUSICAL_FIGURES if baselines[name][figure] is not None}, step=0)
    verb = f"resuming at epoch {resumed_at}" if resumed_at else "starting"
    print(f"{verb}: {ctx.raw_model.num_parameters():,} parameters, {len(ctx.train_set)} train / "
          f"{len(ctx.val_set)} val examples of 2 x {ctx.args.segment_frames} frames, {ctx.world_size} x "
          f"{ctx.device.type}, {ctx.steps_per_epoch} steps per epoch, targets: {ctx.args.target_audio} audio; "
          f"MLflow run {logger.run_id} at {logger.tracking_uri}", flush=True)
