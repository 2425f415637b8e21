"""The discriminator's side of a training step: its terms for the generator, its own loss, its update.

Per micro-batch (training.step.train_step), with y the output audio as a leaf that requires grad, x the
reference (target) audio and c the context's audio before the seam:

    D sees          fake = y, real = x            or, with --discriminator_context, fake = [c, y], real = [c, x]
                    (one forward of the two stacked on the batch axis: every layer runs once)
    generator       adversarial = HingeGeneratorLoss(D(fake)),  feature_matching = FeatureMatchingLoss(D(fake), D(real))
                    graphs to y only: the balancer differentiates them at y like the other components
    discriminator   L_D = HingeDiscriminatorLoss(D(real), D(fake)) x (micro-batch share), backward into D's
                    parameters only (`inputs=`), from the same forward (y enters it as a constant for D)

After the step's micro-batches, `reduce_gradients` averages D's gradients over the ranks by hand, in one
all_reduce of one flat buffer: the same collective on every rank in the same order, whatever the
accumulation, and never the DDP reducer that a second parameter backward in one step would set off. D is
updated only when the whole step is applied (`step`), a decision every rank shares. The generator's terms
use D as it was before this step's update (AudioCraft updates D first; here one forward serves both).

D's convolutions may run under autocast; its STFT and all its losses are float32.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from music_continuation.adversarial.discriminator import MultiScaleSTFTDiscriminator
from music_continuation.adversarial.losses import FeatureMatchingLoss, HingeDiscriminatorLoss, HingeGeneratorLoss

BETAS = (0.5, 0.9)       # AudioCraft's Adam betas for the compression solver (and its adversaries)
# Figures of the discriminator, logged as train_<name> / val_<name> beside the loss components.
DISCRIMINATOR_FIGURES = ("discriminator_loss", "discriminator_real", "discriminator_fake")


class Adversary:
    """The MS-STFT discriminator, its Adam, and the adversarial terms of a step (module docstring)."""

    def __init__(self, device, lr: float, context: bool = False, start_step: int = 0, compile: bool = False):
        self.discriminator = MultiScaleSTFTDiscriminator().to(device)
        self.network = torch.compile(self.discriminator) if compile else self.discriminator
        self.parameters = list(self.discriminator.parameters())
        self.optimizer = torch.optim.Adam(self.parameters, lr=lr, betas=BETAS)
        self.context, self.start_step = bool(context), int(start_step)
        self.generator_loss = HingeGeneratorLoss()
        self.discriminator_loss = HingeDiscriminatorLoss()
        self.feature_matching = FeatureMatchingLoss()

    @property
    def min_length(self) -> int:
        return self.discriminator.min_length

    def trains_generator(self, step: int) -> bool:
        """Whether the generator's adversarial terms are applied at this optimiser step (after the warm-up)."""
        return step >= self.start_step

    def _judge(self, fake: torch.Tensor, real: torch.Tensor, context: torch.Tensor, autocast_ctx):
        """(fake logits, real logits, fake maps, real maps) of one forward of [fake; real]."""
        if self.context:
            fake, real = torch.cat([context, fake], -1), torch.cat([context, real], -1)
        size = fake.shape[0]
        with autocast_ctx():
            logits, maps = self.network(torch.cat([fake, real]).reshape(2 * size, 1, -1))
        split = lambda tensors: ([t[:size] for t in tensors], [t[size:] for t in tensors])   # noqa: E731
        fake_logits, real_logits = split(logits)
        fake_maps, real_maps = zip(*(split(scale) for scale in maps)) if maps else ((), ())
        return fake_logits, real_logits, list(fake_maps), list(real_maps)

    def terms(self, output: torch.Tensor, input_audio: torch.Tensor, target_audio: torch.Tensor,
              autocast_ctx=contextlib.nullcontext) -> dict:
        """{adversarial, feature_matching: graphs to `output`; discriminator_loss: graph to D's parameters;
        discriminator_real, discriminator_fake: mean logits, detached} for float32 audio [B, 1, N]."""
        fake_logits, real_logits, fake_maps, real_maps = self._judge(
            output, target_audio.detach().float(), input_audio.detach().float(), autocast_ctx)
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
