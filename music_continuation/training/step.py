"""One optimiser step of the trainer: the LR schedule, AdamW, autocast, and train_step (model -> frozen decoder ->
audio losses -> one backward per micro-batch -> clip -> a skip agreed by every rank when anything is non-finite).

Learning-rate schedule (per optimiser step s of S = epochs x optimiser steps per epoch, fixed when the
run starts and kept on resume): linear warm-up over W = --warmup_steps, then cosine decay to lr/10:
    lr(s) = lr * (s + 1) / W                                          for s < W
    lr(s) = lr * (0.1 + 0.9 * 0.5 * (1 + cos(pi * (s - W) / (S - W))))  for W <= s < S, lr/10 after S
An optimiser step averages the gradients of --grad_accum_steps micro-batches of --batch_size per rank.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.distributed as dist

from music_continuation.adversarial.adversary import DISCRIMINATOR_FIGURES, Adversary
from music_continuation.evaluation.scoring import predict_audio, reference_audio
from music_continuation.losses.audio import ADVERSARIAL_COMPONENTS, LOSS_COMPONENTS
from music_continuation.losses.balancer import LossBalancer

METRIC_NAMES = ("loss",) + LOSS_COMPONENTS     # order of the accumulated training sums


def metric_names(adversarial: bool) -> tuple[str, ...]:
    """The figures of a run, in the order they are summed: METRIC_NAMES, and with a discriminator its two loss
    components and its own figures (loss, mean logits on real and generated audio)."""
    return METRIC_NAMES + (ADVERSARIAL_COMPONENTS + DISCRIMINATOR_FIGURES if adversarial else ())


def lr_factor(step: int, warmup_steps: int, total_steps: int, final_factor: float = 0.1) -> float:
    """Multiplier of the peak LR at optimiser step `step` (0-based): linear warm-up, then cosine to final_factor."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model, lr: float, weight_decay: float, warmup_steps: int, total_steps: int):
    """AdamW and its per-step LR schedule (lr_factor)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps))
    return optimizer, scheduler


def autocast_for(device: torch.device):
    """A zero-argument callable returning the step's autocast context: bf16 on CUDA (no loss scaling
    needed; the losses cast to fp32 themselves), nothing on CPU (plain fp32, also what makes tests exact)."""
    if device.type == "cuda":
        return functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def train_step(model, decoder, normalizer, loss_fn, optimizer, scheduler, batches, grad_clip: float,
               autocast_ctx=contextlib.nullcontext, target_audio: str = "original", balancer: LossBalancer = None,
               adversary: Adversary | None = None, step: int = 0):
    """One optimiser step on one batch, or a list of micro-batches, already on the device.

    Returns (applied, total, components): the loss figures as example-weighted means over the micro-batches.
    Per micro-batch: model -> de-normalise -> frozen decoder -> output audio y -> CombinedLoss terms on a
    detached copy of y -> the balancer's gradient at y (balancer.py: sum_i s_i dl_i/dy, s_i = w_i unless
    --loss_balancer) -> ONE y.backward of it x (its size / all sizes), so the gradient is that of the mean over
    every example and DDP sees one parameter backward per micro-batch. DDP all-reduces the gradients on the
    last micro-batch only (no_sync before). Then clip and AdamW. The step's gradient figures are left in
    balancer.figures. A non-finite loss or gradient on ANY rank skips the update on every rank (one
    all_reduce of a flag), so the replicas never diverge. The scheduler advances either way: the LR is a
    function of the step.

    With an adversary (adversarial/adversary.py), each micro-batch's y also goes through the discriminator:
    its adversarial and feature-matching terms join the balancer's (held back before --adversarial_start_step,
    `step` being this optimiser step's index), the discriminator's loss is backpropagated into its own
    parameters only, its gradients are averaged over the ranks once per step, and it is updated exactly when
    the model is (a non-finite discriminator value skips the step on every rank like a non-finite loss).
    """
    batches = [batches] if isinstance(batches, dict) else list(batches)
    sizes = [batch["input_latent"].shape[0] for batch in batches]
    balancer = balancer if balancer is not None else LossBalancer(loss_fn.weights)
    balancer.start_step()
    optimizer.zero_grad(set_to_none=True)
    names = metric_names(adversary is not None)[1:]
    held = () if adversary is None or adversary.trains_generator(step) else ADVERSARIAL_COMPONENTS
    total, components = 0.0, dict.fromkeys(names, 0.0)
    for index, (batch, size) in enumerate(zip(batches, sizes)):
        last = index == len(batches) - 1
        # DDP decides in the forward whether the backward all-reduces: both go inside no_sync
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        share = size / sum(sizes)
        with sync:
            with autocast_ctx():
                references = reference_audio(batch, decoder, normalizer, target_audio)   # no autograd inside
                output_audio = predict_audio(model, normalizer, decoder, batch["input_latent"])
            audio = output_audio.detach().float().requires_grad_(True)    # the loss graph starts here
            terms = loss_fn.terms(audio, *references)                     # fp32 inside
            if adversary is not None:
                terms.update(adversary.terms(audio, *references, autocast_ctx, step))
                adversary.backward(terms["discriminator_loss"], share)   # before the balancer frees the graph
            gradient = balancer.gradient({name: terms[name] for name in balancer.names}, audio, held)
            # every rank always runs backward, so DDP's gradient all-reduce stays in lock-step
            output_audio.backward((gradient * share).to(output_audio.dtype))
        micro_total = loss_fn.weighted_sum(terms).detach()
        total = total + micro_total * share
        components = {name: components[name] + terms[name].detach() * share for name in names}
    also_finite = balancer.finite
    if adversary is not None:
        adversary_finite = adversary.reduce_gradients() & torch.isfinite(components["discriminator_loss"])
        also_finite = adversary_finite if also_finite is None else also_finite & adversary_finite
    applied = optimizer_update(model, optimizer, scheduler, total, grad_clip, also_finite)
    if adversary is not None:
        adversary.step(applied)
    balancer.end_step(applied)
    return applied, total, components


def optimizer_update(model, optimizer, scheduler, total: torch.Tensor, grad_clip: float,
                     also_finite: torch.Tensor | None = None) -> bool:
    """The step's tail, after backward: clip, agree across ranks whether everything is finite, AdamW, LR.

    also_finite: a further condition (the balancer's reduced norms, the discriminator's values). Returns whether
    the update was applied (False: a non-finite loss or gradient on some rank)."""
    max_norm = grad_clip if grad_clip > 0 else float("inf")   # inf: measure the norm without clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    finite = torch.isfinite(total) & torch.isfinite(grad_norm)
    if also_finite is not None:
        finite = finite & also_finite.to(finite.device)
    finite = finite.to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    applied = bool(finite.item())   # the one host sync per step: skipping the update needs the decision here
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return applied


def to_device(batch: dict, device: torch.device) -> dict:
    # non_blocking: with pinned host memory the copy overlaps with the previous step's GPU work.
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def stack_metrics(total: torch.Tensor, components: dict) -> torch.Tensor:
    """The step's figures in metric_names order (the components dict holds exactly those after the total)."""
    return torch.stack([total.float()] + [value.float() for value in components.values()])
