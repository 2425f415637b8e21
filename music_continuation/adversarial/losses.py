"""Adversarial losses of EnCodec / AudioCraft: hinge losses and a normalised feature-matching L1.

With D_k the k-th of K sub-discriminators (scales), D_k^l its l-th of L feature maps, x the reference
audio and y the generated audio (AudioCraft `adversarial/losses.py`, Defossez et al. 2022, eq. 2-3):

    HingeGeneratorLoss      L_adv  = (1 / K) sum_k mean( -D_k(y) )
    HingeDiscriminatorLoss  L_D    = (1 / K) sum_k [ mean( relu(1 - D_k(x)) ) + mean( relu(1 + D_k(y)) ) ]
    FeatureMatchingLoss     L_feat = (1 / K L) sum_k sum_l mean|D_k^l(y) - D_k^l(x)| / mean|D_k^l(x)|

The reference's feature maps are constants in L_feat (detached). Every loss is computed in float32, also
under autocast. The denominator of L_feat is floored at FEATURE_FLOOR so that an all-zero map cannot divide
by zero.
"""
from __future__ import annotations

import torch
from torch import nn

FEATURE_FLOOR = 1e-8


def _float(tensors):
    return [tensor.float() for tensor in tensors]


class _MeanAbsDifference(torch.autograd.Function):
    """mean|a - b|, differentiated at a only: d/da = sign(a - b) / numel. The same value and gradient as
    (a - b).abs().mean(), written by hand because autograd's version of that is 2.5x slower on these maps (its
    backward multiplies an expanded scalar into a channels-last map)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        difference = a - b
        ctx.save_for_backward(torch.sign(difference))
        return difference.abs_().mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sign, = ctx.saved_tensors
        return sign * (grad / sign.numel()), None


class HingeGeneratorLoss(nn.Module):
    """L_adv = (1 / K) sum_k mean(-D_k(y)): the generator raises the logits of its audio."""

    def forward(self, fake_logits: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([-logits.mean() for logits in _float(fake_logits)]).mean()


class HingeDiscriminatorLoss(nn.Module):
    """L_D = (1 / K) sum_k [mean relu(1 - D_k(x)) + mean relu(1 + D_k(y))]: real above +1, generated below -1."""

    def forward(self, real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
        terms = [torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
                 for real, fake in zip(_float(real_logits), _float(fake_logits), strict=True)]
        return torch.stack(terms).mean()


class FeatureMatchingLoss(nn.Module):
    """L_feat = (1 / K L) sum_k sum_l mean|D_k^l(y) - D_k^l(x)| / mean|D_k^l(x)| (x's maps are constants)."""

    def forward(self, fake_maps: list[list[torch.Tensor]], real_maps: list[list[torch.Tensor]]) -> torch.Tensor:
        terms = []
        for fake_scale, real_scale in zip(fake_maps, real_maps, strict=True):
            for fake, real in zip(_float(fake_scale), _float(real_scale), strict=True):
                real = real.detach()
                terms.append(_MeanAbsDifference.apply(fake, real) / real.abs().mean().clamp(min=FEATURE_FLOOR))
        return torch.stack(terms).mean()
