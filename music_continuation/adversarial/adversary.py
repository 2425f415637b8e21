"""The discriminator's side of a training step: its terms for the generator, its own loss, its update.

Per micro-batch (training.step.train_step), with y the output audio as a leaf that requires grad, x the
reference (target) audio and c the context's audio before the seam:

    D hears         a window of W = --discriminator_window_seconds of the judged audio, y and x (or, with
                    --discriminator_context, [c, y] and [c, x]) cut at the same place; 0: all of it
    generator       adversarial = HingeGeneratorLoss(D(y)),  feature_matching = FeatureMatchingLoss(D(y), D(x))
                    graphs to y only: the balancer differentiates them at y like the other components
    discriminator   L_D = HingeDiscriminatorLoss(D(x), D(y)) x (micro-batch share), backward into D's
                    parameters only (`inputs=`), from the same forwards (y enters them as a constant for D)

The window's start is drawn once per optimiser step from (--seed, step), the same for every example,
micro-batch and rank: 1 or N processes, any accumulation and a resumed run cut the same windows. With the
context, a window holds at least W / 2 of the continuation (a window of context alone is the same audio for y
and x). Validation uses the first allowed window: the start of the continuation, or with the context the
window centred on the seam. D is fully convolutional and its logits are means over the frames, so W only sets
how much audio each step judges; D's cost grows linearly with it (docs/benchmarks.md). y and x go through D as
two forwards, so the generator's input-gradient passes cross y's graph only.

After the step's micro-batches, `reduce_gradients` averages D's gradients over the ranks by hand, in one
all_reduce of one flat buffer: the same collective on every rank in the same order, whatever the
accumulation, and never the DDP reducer that a second parameter backward in one step would set off. D is
updated only when the whole step is applied (`step`), a decision every rank shares. The generator's terms
use D as it was before this step's update (AudioCraft updates D first and runs it again; here the same two
forwards serve both).

D's convolutions may run under autocast (channels-last: faster on CPU and cuDNN alike); its STFT and all
its losses are float32.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from music_continuation.adversarial.discriminator import MultiScaleSTFTDiscriminator
from music_continuation.adversarial.losses import FeatureMatchingLoss, HingeDiscriminatorLoss, HingeGeneratorLoss
from music_continuation.codec import SAMPLE_RATE

BETAS = (0.5, 0.9)       # AudioCraft's Adam betas for the compression solver (and its adversaries)
# Figures of the discriminator, logged as train_<name> / val_<name> beside the loss components.
DISCRIMINATOR_FIGURES = ("discriminator_loss", "discriminator_real", "discriminator_fake")


class Adversary:
    """The MS-STFT discriminator, its Adam, and the adversarial terms of a step (module docstring)."""

    def __init__(self, device, lr: float, context: bool = False, start_step: int = 0, compile: bool = False,
                 window_seconds: float = 0.0, seed: int = 0):
        self.discriminator = MultiScaleSTFTDiscriminator().to(device, memory_format=torch.channels_last)
        self.network = torch.compile(self.discriminator) if compile else self.discriminator
        self.parameters = list(self.discriminator.parameters())
        self.optimizer = torch.optim.Adam(self.parameters, lr=lr, betas=BETAS)
        self.context, self.start_step = bool(context), int(start_step)
        self.window, self.seed = round(window_seconds * SAMPLE_RATE), int(seed)   # window: samples, 0 = all
        self.generator_loss = HingeGeneratorLoss()
        self.discriminator_loss = HingeDiscriminatorLoss()
        self.feature_matching = FeatureMatchingLoss()

    @property
    def min_length(self) -> int:
        return self.discriminator.min_length

    def trains_generator(self, step: int) -> bool:
        """Whether the generator's adversarial terms are applied at this optimiser step (after the warm-up)."""
        return step >= self.start_step

    def window_start(self, length: int, seam: int, step: int | None) -> int:
        """Where the window starts in judged audio of `length` samples whose continuation starts at `seam`:
        drawn from (seed, step), or the first allowed start when step is None (module docstring)."""
        first, last = max(0, seam - self.window // 2), length - self.window
        if step is None or last <= first:
            return first
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return first + int(torch.randint(last - first + 1, (), generator=generator))

    def _judged(self, fake: torch.Tensor, real: torch.Tensor, context: torch.Tensor, step: int | None):
        """The audio D hears: the same window of [context,] fake and [context,] real."""
        seam = 0
        if self.context:
            fake, real, seam = torch.cat([context, fake], -1), torch.cat([context, real], -1), context.shape[-1]
        if 0 < self.window < fake.shape[-1]:
            start = self.window_start(fake.shape[-1], seam, step)
            fake, real = fake[..., start:start + self.window], real[..., start:start + self.window]
        return fake, real

    def terms(self, output: torch.Tensor, input_audio: torch.Tensor, target_audio: torch.Tensor,
              autocast_ctx=contextlib.nullcontext, step: int | None = None) -> dict:
        """{adversarial, feature_matching: graphs to `output`; discriminator_loss: graph to D's parameters;
        discriminator_real, discriminator_fake: mean logits, detached} for float32 audio [B, 1, N], judged in
        the window of optimiser step `step` (None: validation's window)."""
        fake, real = self._judged(output, target_audio.detach().float(), input_audio.detach().float(), step)
        with autocast_ctx():
            fake_logits, fake_maps = self.network(fake)
            real_logits, real_maps = self.network(real)
        mean = lambda logits: torch.stack([t.float().mean() for t in logits]).mean().detach()   # noqa: E731
        return {"adversarial": self.generator_loss(fake_logits),
                "feature_matching": self.feature_matching(fake_maps, real_maps),
                "discriminator_loss": self.discriminator_loss(real_logits, fake_logits),
                "discriminator_real": mean(real_logits), "discriminator_fake": mean(fake_logits)}

    def backward(self, discriminator_loss: torch.Tensor, share: float) -> None:
        """Accumulate share x dL_D/dD into D's gradients only; the graph stays for the generator's terms."""
        (discriminator_loss * share).backward(inputs=self.parameters, retain_graph=True)

    def reduce_gradients(self) -> torch.Tensor:
        """Average D's gradients over the ranks (one all_reduce); True where they are all finite."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        flat = torch.cat([grad.flatten() for grad in grads])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= dist.get_world_size()
        offset = 0
        for parameter, grad in zip(self.parameters, grads):
            parameter.grad = flat[offset:offset + grad.numel()].view_as(parameter)
            offset += grad.numel()
        return torch.isfinite(flat).all()

    def step(self, applied: bool) -> None:
        """D's Adam step if the whole step is applied; its gradients are cleared either way."""
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def measure(self, output: torch.Tensor, input_audio: torch.Tensor, target_audio: torch.Tensor,
                autocast_ctx=contextlib.nullcontext) -> dict:
        """The same figures without any graph (validation)."""
        return {name: value.detach() for name, value in
                self.terms(output.float(), input_audio, target_audio, autocast_ctx).items()}

    def state_dict(self) -> dict:
        return {"model": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.discriminator.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
