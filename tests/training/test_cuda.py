"""The CUDA path: nccl, bf16 autocast with fp32 losses, --compile, --decoder_checkpointing, decoded references.

Marked `cuda`: skipped without a GPU (tests/conftest.py), run by bench/gpu_check.sh. `bash bench/gpu_check.sh
--cpu` runs them on the CPU too (GPU_CHECK_ON_CPU=1) with the CPU's stand-ins, so the code never rots: gloo for
nccl and CPU bf16 autocast for CUDA's. A pass there says nothing about a GPU; the check's JSON says which ran.
Sizes are tiny (1-2 layers, 8-32 frames); the figures that matter are compared with fp32 or eager references.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

from music_continuation.codec import HOP_LENGTH, LATENT_DIM, FrozenDecoder, load_codec
from music_continuation.losses.audio import CombinedLoss
from music_continuation.model import ContinuationTransformer

pytestmark = pytest.mark.cuda
WEIGHTS = {"rms_input": 0.25, "rms_target": 0.25, "spectral": 0.25, "mel": 0.25}


@pytest.fixture(scope="module")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def codec(device):
    return load_codec("random", device)


@pytest.fixture(scope="module")
def decoder(codec):
    return FrozenDecoder(codec)


def autocast(device):
    """The trainer's autocast on CUDA (train_simple_worker.autocast_for); CPU bf16 autocast as the stand-in."""
    from music_continuation.training.step import autocast_for
    if device.type == "cuda":
        return autocast_for(device)()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def latents(batch: int, frames: int, device, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, LATENT_DIM, frames, generator=torch.Generator().manual_seed(seed)).to(device)


def test_process_group_initialises_with_one_rank(device, monkeypatch):
    import torch.distributed as dist

    from music_continuation.training.worker import setup_distributed
    from music_continuation.utils import free_port
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    try:
        rank, local_rank, world_size, got = setup_distributed()
        assert (rank, local_rank, world_size, got.type) == (0, 0, 1, device.type)
        assert dist.get_backend() == ("nccl" if device.type == "cuda" else "gloo")
        value = torch.full((3,), 2.0, device=got)
        dist.all_reduce(value)
        dist.barrier()
        assert value.tolist() == [2.0, 2.0, 2.0]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)


def test_bf16_autocast_model_and_decoder_with_fp32_losses(device, decoder):
    torch.manual_seed(0)
    model = ContinuationTransformer(d_model=64, num_layers=2, num_heads=4, dropout=0.0).to(device)
    loss_fn = CombinedLoss(**WEIGHTS).to(device)
    inputs, frames = latents(2, 16, device), 16
    target_in, target_out = (0.1 * torch.randn(2, 1, frames * HOP_LENGTH, device=device) for _ in range(2))

    def step(ctx):
        model.zero_grad(set_to_none=True)
        with ctx:
            audio = decoder(model(inputs))
        total, parts = loss_fn(audio, target_in, target_out)
        total.backward()
        return audio, total, parts, [p.grad.clone() for p in model.parameters()]

    audio, total, parts, grads = step(autocast(device))
    assert audio.dtype == torch.bfloat16 and audio.shape == (2, 1, frames * HOP_LENGTH)
    assert total.dtype == torch.float32 and all(value.dtype == torch.float32 for value in parts.values())
    assert torch.isfinite(total) and all(torch.isfinite(g).all() for g in grads)
    _, reference, _, reference_grads = step(contextlib.nullcontext())
    # bf16 keeps 8 bits of mantissa: the loss within a few percent of fp32's, the gradient pointing the same way
    assert abs(total.item() - reference.item()) < 0.05 * reference.item()
    flat, flat_ref = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in reference_grads])
    assert torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0) > 0.9


def test_compile_trains_and_checkpoints_the_uncompiled_keys(device):
    from music_continuation.training.checkpoint import unwrapped_state_dict
    torch.manual_seed(0)
    model = ContinuationTransformer(d_model=32, num_layers=1, num_heads=2, dropout=0.0).to(device)
    compiled = torch.compile(model)
    inputs = latents(2, 8, device)
    eager = model(inputs)
    out = compiled(inputs)
    out.square().mean().backward()
    assert torch.allclose(out, eager, rtol=1e-3, atol=1e-4)
    assert all(p.grad is not None for p in model.parameters())
    assert all(key.startswith("_orig_mod.") for key in compiled.state_dict())
    assert set(unwrapped_state_dict(compiled)) == set(model.state_dict())
    fresh = ContinuationTransformer(d_model=32, num_layers=1, num_heads=2, dropout=0.0).to(device)
    fresh.load_state_dict(unwrapped_state_dict(compiled))       # what resuming and inference do
    assert torch.equal(fresh(inputs), eager)


def test_decoder_checkpointing_gives_the_same_gradient(device, codec, decoder):
    checkpointed = FrozenDecoder(codec, checkpointing=True)
    base = latents(2, 16, device)
    grads, peaks = [], []
    for module in (decoder, checkpointed):
        x = base.clone().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        module(x).square().mean().backward()
        grads.append(x.grad)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6 * grads[0].abs().max().item())
    if peaks:     # one example's activations at a time instead of the batch's
        assert peaks[1] < peaks[0]


def test_references_decoded_on_the_device_match_the_cpu(request, tmp_path, device, decoder):
    import shutil

    from music_continuation.data import references
    from music_continuation.data.cache import read_manifest, track_paths
    # bench/gpu_check.sh passes its prepared cache: making the tiny one needs the audio decoders (PyAV, libsndfile)
    source = os.environ.get("GPU_CHECK_DATA_DIR") or request.getfixturevalue("tiny_cache")
    cache = tmp_path / "cache"
    shutil.copytree(source, cache, ignore=shutil.ignore_patterns(references.REFERENCES_DIR))
    manifest = read_manifest(cache)
    manifest["tracks"] = manifest["tracks"][:2]          # two tracks are enough, and fast on the CPU too
    stored = references.build_references(cache, manifest, decoder, manifest["codec_fingerprint"], 8, device=device,
                                         progress=False)
    track = manifest["tracks"][1]
    start = 8 * (len(references.segment_starts(track["frames"], 8, 8)) - 1)      # its last segment
    window = np.array(np.load(track_paths(cache, track["id"])[0], mmap_mode="r")[None, :, start: start + 8],
                      dtype=np.float32)
    cpu_decoder = decoder if device.type == "cpu" else FrozenDecoder(load_codec("random", "cpu"))
    expected = cpu_decoder(torch.from_numpy(window))[0, 0]
    got = torch.from_numpy(stored.segment(track["id"], start).copy())
    assert (got - expected).square().mean().sqrt() < 1e-4 * expected.square().mean().sqrt()
    assert os.path.isfile(references.set_dir(cache, 8, 8) / references.SET_NAME)


def test_adversarial_step_under_bf16_autocast_with_fp32_losses(device, decoder):
    """The discriminator in the trainer's step: bf16 convolutions, float32 STFT and losses, finite, learning;
    compiled on CUDA as --compile does (the CPU stand-in skips compiling: minutes on 2 cores)."""
    from music_continuation.adversarial.adversary import Adversary
    from music_continuation.data.cache import LatentNormalizer
    from music_continuation.losses.balancer import LossBalancer
    from music_continuation.training.step import build_optimizer, train_step
    torch.manual_seed(0)
    model = ContinuationTransformer(d_model=64, num_layers=2, num_heads=4, dropout=0.0).to(device)
    loss_fn = CombinedLoss(**WEIGHTS, adversarial=4.0, feature_matching=4.0).to(device)
    adversary = Adversary(device, lr=3e-4, compile=device.type == "cuda")
    optimizer, scheduler = build_optimizer(model, 1e-4, 0.01, 10, 100)
    frames = 16
    batch = {"input_latent": latents(2, frames, device), "target_latent": latents(2, frames, device, seed=1),
             "input_audio": 0.1 * torch.randn(2, 1, frames * HOP_LENGTH, device=device),
             "target_audio": 0.1 * torch.randn(2, 1, frames * HOP_LENGTH, device=device)}
    normalizer = LatentNormalizer(torch.zeros(LATENT_DIM), torch.ones(LATENT_DIM)).to(device)
    before = torch.cat([p.detach().flatten().clone() for p in adversary.parameters])
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits, _ = adversary.discriminator(batch["target_audio"])
    assert logits[0].dtype == torch.bfloat16 and adversary.discriminator.scales[0].spectrogram(
        batch["target_audio"]).dtype == torch.float32
    balancer = LossBalancer(loss_fn.weights, balance=True)
    applied, total, components = train_step(model, decoder, normalizer, loss_fn, optimizer, scheduler, [batch], 1.0,
                                            lambda: autocast(device), "original", balancer, adversary)
    assert applied and total.dtype == torch.float32
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in components.values())
    assert not torch.equal(torch.cat([p.detach().flatten() for p in adversary.parameters]), before)
