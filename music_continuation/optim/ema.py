"""An exponential moving average of a model's weights (AudioCraft `optim/ema.py`, from Demucs), bias-corrected.

After every applied optimiser step t, for every floating-point parameter and persistent buffer w:

    c_t = decay c_{t-1} + 1,     c_0 = 0
    e_t = (1 - 1 / c_t) e_{t-1} + (1 / c_t) w_t

so e_1 = w_1, and e_t is the average of w_1..w_t with weights decay^(t - s), normalised to sum 1 (the same
correction as the loss balancer's). The average lives in float32 on the model's device; `swapped(model)`
puts it into the model for a while (validation, export) and restores the training weights exactly.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def _averaged_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of the model's floating-point parameters and persistent buffers (what the EMA averages)."""
    state = model.state_dict(keep_vars=True)
    return {name: tensor for name, tensor in state.items() if tensor.is_floating_point()}


class ModelEMA:
    """The bias-corrected moving average of `model`'s weights (module docstring); decay in (0, 1)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.count = 0.0
        self.average = {name: tensor.detach().float().clone() for name, tensor in _averaged_tensors(model).items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average with the model's current weights (after an applied optimiser step)."""
        self.count = self.decay * self.count + 1.0
        weight = 1.0 / self.count
        for name, tensor in _averaged_tensors(model).items():
            self.average[name].mul_(1.0 - weight).add_(tensor.detach().float(), alpha=weight)

    def state_dict_for(self, model: nn.Module) -> dict:
        """A full state dict of `model` holding the average (non-float buffers from the model itself)."""
        state = model.state_dict()
        return {name: self.average[name].to(tensor.dtype) if name in self.average else tensor
                for name, tensor in state.items()}

    @contextlib.contextmanager
    def swapped(self, model: nn.Module):
        """Inside: `model` holds the average. After: exactly its own weights again."""
        tensors = _averaged_tensors(model)
        saved = {name: tensor.detach().clone() for name, tensor in tensors.items()}
        with torch.no_grad():
            for name, tensor in tensors.items():
                tensor.copy_(self.average[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, tensor in tensors.items():
                    tensor.copy_(saved[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "count": self.count,
                "average": {name: tensor.cpu() for name, tensor in self.average.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["average"]) != set(self.average):
            raise ValueError("EMA state of another model (its tensors have other names)")
        self.decay, self.count = float(state["decay"]), float(state["count"])
        for name, tensor in state["average"].items():
            self.average[name].copy_(tensor)
