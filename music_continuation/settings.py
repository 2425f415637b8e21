"""Facts that several jobs share, as pure data: the loss components, the baselines, and the role of every
launcher flag.

This module imports nothing heavy (no torch), so ablate.py can read it at start-up. The launcher, the worker,
the losses, the scoring and the ablation report all take these names from here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossComponent:
    """One training-loss component and every name it goes by."""
    name: str        # metric key (train_<name>, val_<name>) and CombinedLoss keyword
    flag: str        # launcher flag holding its weight
    short: str       # name in the printed epoch block
    default: float   # default weight
    help: str
    adversarial: bool = False   # measured by the discriminator (music_continuation.adversarial), not CombinedLoss


# The loss components in their canonical order: flags, logs, prints and tests derive from it.
LOSSES = (
    LossComponent("rms_input", "--loss_weight_input", "rms_in", 0.0, "RMS(output, input): reconstruction"),
    LossComponent("rms_target", "--loss_weight_target", "rms_tgt", 1.0, "RMS(output, target): continuation"),
    LossComponent("spectral", "--loss_weight_spectral", "spec", 0.0, "multi-resolution STFT(output, target)"),
    LossComponent("mel", "--loss_weight_mel", "mel", 0.0, "log-mel L1(output, target)"),
    LossComponent("adversarial", "--loss_weight_adversarial", "adv", 0.0,
                  "hinge adversarial loss of the multi-scale STFT discriminator on the output", adversarial=True),
    LossComponent("feature_matching", "--loss_weight_feature_matching", "feat", 0.0,
                  "discriminator feature-matching L1(output, target), normalised per feature map", adversarial=True),
)
# The components CombinedLoss measures against the reference audio (every run, every scorer, the total).
LOSS_COMPONENTS = tuple(component.name for component in LOSSES if not component.adversarial)
ADVERSARIAL_COMPONENTS = tuple(component.name for component in LOSSES if component.adversarial)


def adversarial_weighted(weights: dict) -> bool:
    """Whether a run with these weights trains a discriminator (either adversarial component above 0)."""
    return any(float(weights.get(name, 0.0)) > 0 for name in ADVERSARIAL_COMPONENTS)


def shown_losses(weights: dict) -> tuple[LossComponent, ...]:
    """The components a run prints and logs: the four reference ones, then the adversarial ones if trained."""
    return tuple(c for c in LOSSES if not c.adversarial or adversarial_weighted(weights))


LOSS_WEIGHT_FLAGS = tuple(component.flag[2:] for component in LOSSES)

# The discriminator's own flags and their defaults (AudioCraft's Adam lr for the compression solver; the window
# is docs/adversarial.md's trade of cost against context); a value other than these is an error in a run
# without a discriminator.
DISCRIMINATOR_DEFAULTS = {"discriminator_lr": 3e-4, "adversarial_start_step": 0, "discriminator_context": False,
                          "discriminator_window_seconds": 0.2}
# Flags added after runs and studies existed, with the value every older run had: a checkpoint without them
# resumes as having these, and a study cell that leaves them at these keeps its identity hash.
LATER_FLAG_DEFAULTS = {**{component.flag[2:]: 0.0 for component in LOSSES if component.adversarial},
                       **DISCRIMINATOR_DEFAULTS, "ema_decay": 0.0}


def older_run_values(flags: dict) -> dict:
    """LATER_FLAG_DEFAULTS for a run with these flags (launcher flag names): the first discriminators heard all
    the audio, so an adversarial run from before --discriminator_window_seconds had window 0."""
    adversarial = any(float(flags.get(c.flag[2:]) or 0.0) > 0 for c in LOSSES if c.adversarial)
    return {**LATER_FLAG_DEFAULTS, **({"discriminator_window_seconds": 0.0} if adversarial else {})}

# The trivial continuations every model is read against (evaluation.scoring scores them).
BASELINES = ("silence", "repeat", "oracle")


@dataclass(frozen=True)
class Role:
    """What a launcher flag means to a resumed run and to a loss study.

    resume:   "must match" (a change would be another experiment: refused), "may change" (said in one
              line and recorded), or None (not compared: where the run is stored and logged).
    identity: part of a study cell's identity hash (ablate.py skips a cell whose hash finished).
    ablate:   "cell" (a grid cell may set it), "study" (one value for the whole study), or "ablate"
              (ablate.py sets it per cell and refuses it from the user).
    """
    resume: str | None
    identity: bool
    ablate: str
    means: str


ROLES = {
    "experiment": Role("must match", True, "cell", "the model, the data it sees and the objective"),
    "seed": Role("must match", True, "ablate", "init, data order and dropout; a study runs seeds 0..N-1"),
    "length": Role("may change", True, "cell", "added epochs continue at the schedule's final LR"),
    "data": Role("may change", True, "study", "the cache (and its codec): one per study"),
    "runtime": Role("may change", False, "cell", "speed, memory and logging cadence, not the result"),
    "derived": Role("may change", False, "study", "where files derived from the cache go (decoded references)"),
    "tracking": Role(None, False, "study", "where MLflow keeps the runs: one per study"),
    "logger": Role("must match", True, "ablate", "a study's cells log to MLflow, where ablate.py reads them"),
    "bookkeeping": Role(None, False, "ablate", "where a run is written and how it is named"),
    "preset": Role(None, False, "cell", "a settings file; what it sets is recorded flag by flag"),
}

# Every launcher flag (its argparse dest) and its one role (a test checks the launcher has no other flag).
FLAG_ROLES = {
    "data_dir": "data", "encodec_weights": "data", "references_dir": "derived",
    "segment_frames": "experiment", "unity_test": "experiment", "target_audio": "experiment",
    "num_workers": "runtime",
    "epochs": "length",
    "batch_size": "experiment", "grad_accum_steps": "experiment", "lr": "experiment", "weight_decay": "experiment",
    "grad_clip": "experiment", "warmup_steps": "experiment",
    "seed": "seed",
    "compile": "runtime", "decoder_checkpointing": "runtime",
    "d_model": "experiment", "num_layers": "experiment", "num_heads": "experiment", "dropout": "experiment",
    **{flag: "experiment" for flag in LOSS_WEIGHT_FLAGS},
    "loss_balancer": "experiment", "balancer_ema_decay": "experiment",
    "discriminator_lr": "experiment", "adversarial_start_step": "experiment", "discriminator_context": "experiment",
    "discriminator_window_seconds": "experiment",
    "ema_decay": "experiment",
    # On resume the world size (--nproc, or torchrun's) must match: it sets the data order and the batch.
    "nproc": "experiment",
    "checkpoint_dir": "bookkeeping", "resume": "bookkeeping", "run_name": "bookkeeping",
    "mlflow_parent_run_id": "bookkeeping", "mlflow_tag": "bookkeeping",
    "mlflow_tracking_uri": "tracking", "experiment_name": "tracking",
    "logger": "logger",
    "log_audio_every": "runtime", "musical_every": "runtime", "beat_tracker": "runtime",
    "stuck_timeout": "runtime",
    "config": "preset",
}

def flags_where(**wanted) -> tuple:
    """The flags whose role has every given property, in table order: flags_where(resume="must match")."""
    return tuple(flag for flag, role in FLAG_ROLES.items()
                 if all(getattr(ROLES[role], key) == value for key, value in wanted.items()))
