"""The cache's train/val split (by whole track, from a seed) and per-channel latent statistics, merged from each
track's stored moments in float64."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from music_continuation.codec import LATENT_DIM
from music_continuation.data.cache import CacheError, track_paths, track_stats_path

STD_FLOOR = 1e-5             # latent std is clamped to this so normalising never divides by ~0


def split_tracks(track_ids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Assign whole tracks to 'train' or 'val', reproducibly from the seed.

    Each track gets a key u = hash(seed, id); the n_val tracks with the smallest keys are validation,
    n_val = round(val_fraction * n) clamped to [1, n - 1] when val_fraction > 0 and n >= 2 (else 0).
    The choice depends only on the ids, not on the order files were found, and adding files to the
    folder moves few existing tracks between the splits.
    """
    count = len(track_ids)
    num_val = 0
    if val_fraction > 0 and count >= 2:
        num_val = min(max(1, round(val_fraction * count)), count - 1)
    ranked = sorted(track_ids, key=lambda tid: hashlib.sha1(f"{seed}:{tid}".encode()).hexdigest())
    val_ids = set(ranked[:num_val])
    return {tid: ("val" if tid in val_ids else "train") for tid in track_ids}


class Moments:
    """Per-channel count, mean and sum of squared deviations (M2) in float64, merged part by part.

    A part's own mean and M2 are computed in two passes; parts merge with Chan et al.'s update
    (M2 = M2_a + M2_b + delta^2 n_a n_b / n), which is as exact as two passes over all the data and
    needs only one part in memory at a time.
    """

    def __init__(self):
        self.count, self.mean, self.m2 = 0, np.zeros(LATENT_DIM), np.zeros(LATENT_DIM)

    def add_frames(self, latents: np.ndarray) -> None:
        """Merge the frames of latents [LATENT_DIM, n]."""
        values = latents.astype(np.float64)
        mean = values.mean(axis=1)
        self.merge(values.shape[1], mean, ((values - mean[:, None]) ** 2).sum(axis=1))

    def merge(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        total = self.count + count
        if count == 0:
            return
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * count / total)
        self.mean = self.mean + delta * (count / total)
        self.count = total

    def as_array(self) -> np.ndarray:
        return np.stack([self.mean, self.m2])        # the .stats.npy layout: [2, LATENT_DIM]


def latent_statistics(cache_dir: Path, tracks: list[dict]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over every frame of `tracks`, in float64:
    mean_c = sum_t x[c,t] / N,  std_c = max(sqrt(sum_t (x[c,t] - mean_c)^2 / N), STD_FLOOR),
    from each track's stored moments of its unrounded latents (.stats.npy); a track without them
    (a float32 cache of format version 1) is read memory-mapped, one at a time.
    Raises CacheError naming the track if a statistic is not finite, so a manifest never holds NaN.
    """
    total = Moments()
    for track in tracks:
        part = _track_moments(cache_dir, track)
        if not (np.isfinite(part.mean).all() and np.isfinite(part.m2).all()):
            raise CacheError(f"{track_paths(cache_dir, track['id'])[0]} ({track.get('source', track['id'])}): "
                             f"its latents are not finite; delete the file and re-run prepare_data.py")
        total.merge(part.count, part.mean, part.m2)
    std = np.maximum(np.sqrt(total.m2 / max(total.count, 1)), STD_FLOOR)
    if not (np.isfinite(total.mean).all() and np.isfinite(std).all()):
        raise CacheError(f"{cache_dir}: the latent statistics overflow float64; the latents are far too large")
    return total.mean.tolist(), std.tolist()


def _track_moments(cache_dir: Path, track: dict) -> Moments:
    moments = Moments()
    latent_path = track_paths(cache_dir, track["id"])[0]
    stats_path = track_stats_path(cache_dir, track["id"])
    if stats_path.is_file():
        mean, m2 = np.load(stats_path)
        moments.merge(int(track["frames"]), mean, m2)
        return moments
    latents = np.load(latent_path, mmap_mode="r")
    if latents.dtype != np.float32:
        raise CacheError(f"{stats_path}: missing, and the {latents.dtype} latents are rounded; "
                         f"delete {latent_path.name} and re-run prepare_data.py to re-encode the track")
    moments.add_frames(latents)
    return moments
