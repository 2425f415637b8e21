"""Fréchet codec distance: how far the set of continuations lies from the set of real continuations.

Both sets of audio are re-encoded with the codec's own encoder (codec.encode: the continuous 128-dim frames at
75 Hz, before quantisation; fadtk calls this embedding `encodec-emb`). Each set is summarised by a Gaussian
(mean mu, covariance S over all its frames) and

    frechet_codec = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr( (S_a^1/2 S_b S_a^1/2)^1/2 )

(the Fréchet / 2-Wasserstein distance of the two Gaussians, as in FAD). 0 for identical sets, up to float64
rounding. It lives in EnCodec's latent space, so it is NOT comparable to VGGish FAD figures in papers.

Sets are kept as sums (frame count n, sum x, sum x x^T, float64), so they add across batches and ranks:
mu = sum x / n, S = (sum x x^T - n mu mu^T) / (n - 1). A full-rank 128 x 128 covariance needs n >= 129
frames; with fewer the distance is refused (FrechetError, one line).
"""
from __future__ import annotations

import torch

from music_continuation.codec import LATENT_DIM, encode

STATS_SIZE = 1 + LATENT_DIM + LATENT_DIM * LATENT_DIM    # n, sum x, sum x x^T
MIN_FRAMES = LATENT_DIM + 1


class FrechetError(ValueError):
    """The distance cannot be computed (too few frames); the message is one line."""


def frame_stats(frames: torch.Tensor) -> torch.Tensor:
    """frames [N, D] -> the float64 vector [n, sum x (D), sum x x^T (D*D)] of STATS_SIZE."""
    x = frames.detach().to(torch.float64)
    return torch.cat([torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device),
                      x.sum(dim=0), (x.T @ x).reshape(-1)])


@torch.no_grad()
def embed(codec, audio: torch.Tensor) -> torch.Tensor:
    """Codec frames of audio [B, 1, N] -> [B * T, 128] (every frame of every example)."""
    with torch.autocast(audio.device.type, enabled=False):    # float32 frames, also inside a bf16 validation
        latents = encode(codec, audio.float())                 # [B, 128, T]
    return latents.transpose(1, 2).reshape(-1, latents.shape[1])


def gaussian(stats: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(n, mu [D], S [D, D]) of a stats vector."""
    count = int(round(float(stats[0])))
    total = stats[1: 1 + LATENT_DIM]
    outer = stats[1 + LATENT_DIM:].reshape(LATENT_DIM, LATENT_DIM)
    mean = total / max(count, 1)
    covariance = (outer - count * torch.outer(mean, mean)) / max(count - 1, 1)
    return count, mean, (covariance + covariance.T) / 2


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(stats_a: torch.Tensor, stats_b: torch.Tensor, what: str = "frechet_codec") -> float:
    """The Fréchet distance of two stats vectors (module docstring); FrechetError with too few frames.

    tr((S_a^1/2 S_b S_a^1/2)^1/2) is the sum of the square roots of the eigenvalues of a symmetric PSD matrix
    (eigh, negative rounding clamped to 0): exact for singular covariances too, where scipy's sqrtm of the
    non-symmetric S_a S_b needs an epsilon offset.
    """
    (n_a, mu_a, s_a), (n_b, mu_b, s_b) = gaussian(stats_a.cpu()), gaussian(stats_b.cpu())
    if min(n_a, n_b) < MIN_FRAMES:
        raise FrechetError(f"{what}: refused, {min(n_a, n_b)} codec frames in a set but a full-rank "
                           f"{LATENT_DIM}x{LATENT_DIM} covariance needs at least {MIN_FRAMES}: score more windows")
    root_a = _sqrt_psd(s_a)
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross
    return max(float(distance), 0.0)    # clamp the rounding of identical sets just below 0
