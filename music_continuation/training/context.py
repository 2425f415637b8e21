"""What the epoch functions of a training process share (built once by worker.build_context)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, DistributedSampler

from music_continuation.adversarial.adversary import Adversary
from music_continuation.codec import FrozenDecoder
from music_continuation.data.cache import ContinuationDataset, LatentNormalizer
from music_continuation.losses.audio import CombinedLoss
from music_continuation.losses.balancer import LossBalancer
from music_continuation.model import ContinuationTransformer
from music_continuation.optim.ema import ModelEMA
from music_continuation.training.step import metric_names


@dataclass
class Context:
    """Everything the epoch functions share."""
    args: object
    rank: int
    world_size: int
    device: torch.device
    autocast: object                      # zero-argument callable -> autocast context (autocast_for)
    train_set: ContinuationDataset
    val_set: ContinuationDataset
    train_sampler: DistributedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    val_indices: list                     # this rank's validation windows, in loader order (padding included)
    decoder: FrozenDecoder
    normalizer: LatentNormalizer
    loss_fn: CombinedLoss
    balancer: LossBalancer                # the gradient at the output audio, measured or balanced
    raw_model: ContinuationTransformer
    model: torch.nn.Module                # DDP(raw_model, possibly compiled)
    optimizer: torch.optim.Optimizer
    scheduler: object
    schedule_steps: int
    steps_per_epoch: int                  # optimiser steps
    global_step: int = 0
    consecutive_skips: int = 0
    listeners: object = None              # listeners.Listeners with --musical_every, else None
    adversary: Adversary | None = None    # the discriminator and its optimiser, when an adversarial weight is > 0
    ema: ModelEMA | None = None           # the moving average of raw_model's weights, with --ema_decay > 0

    @property
    def metric_names(self) -> tuple[str, ...]:
        return metric_names(self.adversary is not None)
