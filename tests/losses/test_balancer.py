"""Gradient shares and the loss balancer (music_continuation/losses/balancer.py).

References: EnCodec's own check of the formula (by hand), autograd through the whole graph for the per-
component gradients at the output audio, a plain backward of the weighted sum for the unbalanced update,
one process for DDP and accumulation, an uninterrupted run for resume. Tiny sizes throughout (CPU, gloo).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from music_continuation.losses.balancer import LossBalancer
from music_continuation.training import step as training_step
from music_continuation.training.checkpoint import load_checkpoint, save_checkpoint
from music_continuation.utils import free_port
from tests.training.test_training import (
    TINY,
    assert_same_training,
    assert_same_weights,
    epoch_blocks,
    make_trainable,
    run_launcher,
    steps_per_epoch,
    validation_error,
)

ROOT = Path(__file__).resolve().parents[2]

WEIGHTS = {"rms_input": 0.2, "rms_target": 0.5, "spectral": 0.3, "mel": 0.0}
SHARDABLE = {"rms_input": 0.3, "rms_target": 0.7, "spectral": 0.0, "mel": 0.0}   # per-example terms only


# ----------------------------------------------------------------------------------------- formula

def test_encodec_check_99_without_and_0_with_the_balancer():
    """EnCodec's test of its balancer: x = 0, l1 = |x - 1|, l2 = 100 |x + 1|, weights 1:1."""
    for balance, expected in ((False, 99.0), (True, 0.0)):
        x = torch.zeros(1, 1, requires_grad=True)
        losses = {"l1": (x - 1).abs().mean(), "l2": 100 * (x + 1).abs().mean()}
        gradient = LossBalancer({"l1": 1.0, "l2": 1.0}, balance=balance).gradient(losses, x)
        assert gradient.item() == pytest.approx(expected, abs=1e-6)


def test_balancer_formula_and_moving_average_by_hand():
    """s_i = (w_i / sum w) / (eps + avg n_i), avg the bias-corrected EMA of the step means (flashy.averager)."""
    balancer = LossBalancer({"a": 3.0, "b": 1.0, "off": 0.0}, balance=True, ema_decay=0.5)
    assert balancer.names == ["a", "b"]
    history = {"a": [], "b": []}
    for step, (ka, kb) in enumerate(((2.0, 10.0), (4.0, 30.0), (1.0, 20.0))):
        x = torch.zeros(2, 3, requires_grad=True)
        target = torch.ones(2, 3)
        balancer.start_step()
        losses = {"a": ka * (x - target).abs().mean(), "b": kb * (x + target).abs().mean()}
        gradient = balancer.gradient(losses, x)
        # per-example norm of one example's loss gradient: k * ||sign|| / 3 elements, times ... = k / sqrt(3)
        history["a"].append(ka / math.sqrt(3))
        history["b"].append(kb / math.sqrt(3))
        averages = {}
        for name in ("a", "b"):
            weights = [0.5 ** (step - t) for t in range(step + 1)]
            averages[name] = sum(w * n for w, n in zip(weights, history[name])) / sum(weights)
        expected = (-ka / 6 * 0.75 / averages["a"] + kb / 6 * 0.25 / averages["b"])   # d(mean)/dx = k/6 each
        assert torch.allclose(gradient, torch.full_like(gradient, expected), rtol=1e-6)
        balancer.end_step(applied=True)
        assert balancer.ema_count.item() == pytest.approx(sum(0.5 ** t for t in range(step + 1)))


def test_a_skipped_step_never_enters_the_average():
    balancer = LossBalancer({"a": 1.0}, balance=True)
    x = torch.zeros(1, 2, requires_grad=True)
    balancer.start_step()
    balancer.gradient({"a": (x - 1).abs().mean()}, x)
    balancer.end_step(applied=True)
    state = {k: v.clone() for k, v in ((k, getattr(balancer, k)) for k in ("ema_sum", "ema_count"))}
    balancer.start_step()
    y = torch.zeros(1, 2, requires_grad=True)
    gradient = balancer.gradient({"a": (y * float("nan")).abs().mean()}, y)
    assert not bool(balancer.finite) and not torch.isfinite(gradient).all()
    balancer.end_step(applied=False)
    assert torch.equal(balancer.ema_sum, state["ema_sum"]) and torch.equal(balancer.ema_count, state["ema_count"])


# -------------------------------------------------------------------------------- the training step

@pytest.fixture(scope="module")
def parts():
    from music_continuation.codec import FrozenDecoder, load_codec
    from music_continuation.data.cache import LatentNormalizer
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_latent": torch.randn(4, 128, 8, generator=generator),
                "input_audio": torch.randn(4, 1, 2560, generator=generator) * 0.1,
                "target_audio": torch.randn(4, 1, 2560, generator=generator) * 0.1} for _ in range(3)]
    return {"decoder": FrozenDecoder(load_codec("random")), "batches": batches,
            "normalizer": LatentNormalizer(torch.zeros(128), torch.ones(128))}


def make_sgd(seed: int = 0):
    """Plain SGD at lr 1: the update IS the gradient, so two gradients compare to float rounding (Adam's first
    step divides each gradient by its own size, which amplifies rounding in near-zero entries)."""
    torch.manual_seed(seed)
    from music_continuation.model import ContinuationTransformer
    model = ContinuationTransformer(d_model=32, num_layers=1, num_heads=2, dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def step(model, parts, loss_fn, optimizer, scheduler, batches, balancer):
    return training_step.train_step(model, parts["decoder"], parts["normalizer"], loss_fn, optimizer,
                                    scheduler, batches, 1.0, balancer=balancer)


def reference_gradients_at_y(model, parts, loss_fn, batch) -> dict:
    """{component: dl_i/dy} by autograd through the whole graph (y.retain_grad), one backward per component."""
    from music_continuation.evaluation.scoring import predict_audio
    grads = {}
    for name in (n for n, w in loss_fn.weights.items() if w > 0):
        model.zero_grad()
        audio = predict_audio(model, parts["normalizer"], parts["decoder"], batch["input_latent"])
        audio.retain_grad()
        loss_fn.terms(audio, batch["input_audio"], batch["target_audio"])[name].backward()
        grads[name] = audio.grad.clone()
    model.zero_grad()
    return grads


def test_measured_norms_and_shares_match_autograd_and_the_update_is_the_weighted_sum(parts):
    from music_continuation.losses.audio import CombinedLoss
    loss_fn = CombinedLoss(**WEIGHTS)
    batch = parts["batches"][0]
    model, optimizer, scheduler = make_sgd()
    grads = reference_gradients_at_y(model, parts, loss_fn, batch)
    norms = {name: g.flatten(1).norm(dim=1).mean().item() * 4 for name, g in grads.items()}
    expected_shares = {name: WEIGHTS[name] * n / sum(WEIGHTS[k] * norms[k] for k in norms) for name, n in norms.items()}

    balancer = LossBalancer(loss_fn.weights)
    assert balancer.names == ["rms_input", "rms_target", "spectral"]        # mel has weight 0: measured-only
    applied, _, _ = step(model, parts, loss_fn, optimizer, scheduler, batch, balancer)
    assert applied
    figures = balancer.epoch_figures(balancer.figures)
    for name in norms:
        assert figures[f"grad_norm_{name}"] == pytest.approx(norms[name], rel=1e-5), name
        assert figures[f"grad_share_{name}"] == pytest.approx(expected_shares[name], rel=1e-5), name
    assert sum(figures[f"grad_share_{name}"] for name in norms) == pytest.approx(1.0, abs=1e-12)
    assert "grad_norm_mel" not in figures

    # without the balancer the update is exactly that of a plain backward of the weighted sum
    reference, ref_optimizer, ref_scheduler = make_sgd()
    from music_continuation.evaluation.scoring import predict_audio
    audio = predict_audio(reference, parts["normalizer"], parts["decoder"], batch["input_latent"])
    total, _ = loss_fn(audio, batch["input_audio"], batch["target_audio"])
    total.backward()
    assert training_step.optimizer_update(reference, ref_optimizer, ref_scheduler, total.detach(), 1.0)
    assert_same_training(model.state_dict(), reference.state_dict(), make_sgd()[0].state_dict(), rel=1e-5)


def test_balanced_step_is_the_backward_of_the_rescaled_sum(parts):
    """At the first step the balancer's gradient is that of sum_i (w_i / sum w) / n_i x l_i, n_i measured."""
    from music_continuation.evaluation.scoring import predict_audio
    from music_continuation.losses.audio import CombinedLoss
    loss_fn = CombinedLoss(**WEIGHTS)
    batch = parts["batches"][1]
    model, optimizer, scheduler = make_sgd()
    grads = reference_gradients_at_y(model, parts, loss_fn, batch)
    scales = {name: WEIGHTS[name] / 1.0 / (g.flatten(1).norm(dim=1).mean().item() * 4) for name, g in grads.items()}
    assert step(model, parts, loss_fn, optimizer, scheduler, batch, LossBalancer(loss_fn.weights, True))[0]

    reference, ref_optimizer, ref_scheduler = make_sgd()
    audio = predict_audio(reference, parts["normalizer"], parts["decoder"], batch["input_latent"])
    terms = loss_fn.terms(audio, batch["input_audio"], batch["target_audio"])
    sum(scale * terms[name] for name, scale in scales.items()).backward()
    assert training_step.optimizer_update(reference, ref_optimizer, ref_scheduler, torch.tensor(0.0), 1.0)
    assert_same_training(model.state_dict(), reference.state_dict(), make_sgd()[0].state_dict(), rel=1e-5)


def test_settled_shares_equal_the_weights(parts):
    """After steps on other batches, one fixed batch again and again (the model held still, lr 0): once the
    average has settled on that batch's norms, the applied shares are w_i / sum w; before, they are not."""
    from music_continuation.losses.audio import CombinedLoss
    loss_fn = CombinedLoss(**WEIGHTS)
    model = make_trainable()[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    balancer = LossBalancer(loss_fn.weights, balance=True, ema_decay=0.3)
    fixed = parts["batches"][2]
    other = {**fixed, "target_audio": fixed["target_audio"] * 0.01}    # other spectral gradients
    shares = []
    for index in range(12):
        batch = other if index < 2 else fixed
        assert step(model, parts, loss_fn, optimizer, scheduler, batch, balancer)[0]
        figures = balancer.epoch_figures(balancer.figures)
        shares.append({name: figures[f"grad_share_{name}"] for name in balancer.names})
        assert sum(shares[-1].values()) == pytest.approx(1.0, abs=1e-12)
    # an RMS loss's gradient has norm 1 / sqrt(samples) per example, whatever the audio
    assert figures["grad_norm_rms_target"] == pytest.approx(1 / math.sqrt(2560), rel=1e-5)
    assert max(abs(shares[2][name] - WEIGHTS[name]) for name in balancer.names) > 1e-2    # not settled yet
    for name in balancer.names:
        assert shares[0][name] == pytest.approx(WEIGHTS[name], abs=1e-9), name   # step 1: its own norms
        assert shares[-1][name] == pytest.approx(WEIGHTS[name], abs=1e-3), name


# ------------------------------------------------------------------------------- DDP, accumulation

def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str, parts: dict, accumulate: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    from music_continuation.losses.audio import CombinedLoss
    loss_fn = CombinedLoss(**SHARDABLE)
    model, optimizer, scheduler = make_trainable()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    balancer = LossBalancer(loss_fn.weights, balance=True)
    per_rank = 4 // world_size
    for batch in parts["batches"]:
        shard = {k: v[rank * per_rank: (rank + 1) * per_rank] for k, v in batch.items()}
        if accumulate:       # micro-batches of 1 example per rank
            shard = [{k: v[i: i + 1] for k, v in shard.items()} for i in range(per_rank)]
        assert step(ddp, parts, loss_fn, optimizer, scheduler, shard, balancer)[0]
    torch.save({"model": model.state_dict(), "balancer": balancer.state_dict()}, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_one_rank_batch_4_equals_two_ranks_and_accumulation(parts, tmp_path):
    """1 rank x batch 4 == 2 ranks x batch 2 == batch 2 x accum 2 (and 2 ranks x batch 1 x accum 2), balanced."""
    from music_continuation.losses.audio import CombinedLoss
    loss_fn = CombinedLoss(**SHARDABLE)
    initial = make_trainable()[0].state_dict()

    def single(accumulate: int):
        model, optimizer, scheduler = make_trainable()
        balancer = LossBalancer(loss_fn.weights, balance=True)
        for batch in parts["batches"]:
            size = 4 // accumulate
            group = [{k: v[i * size: (i + 1) * size] for k, v in batch.items()} for i in range(accumulate)]
            assert step(model, parts, loss_fn, optimizer, scheduler, group, balancer)[0]
        return model.state_dict(), balancer.state_dict()

    big, big_state = single(1)
    accumulated, accumulated_state = single(2)
    assert_same_training(big, accumulated, initial)
    for accumulate in (False, True):
        folder = tmp_path / f"accumulate{accumulate}"
        folder.mkdir()
        torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), str(folder), parts, accumulate),
                                    nprocs=2, join=True)
        ranks = [torch.load(folder / f"rank{r}.pt") for r in range(2)]
        assert_same_weights(ranks[0]["model"], ranks[1]["model"], atol=0.0)    # replicas never diverge
        assert torch.equal(ranks[0]["balancer"]["ema_sum"], ranks[1]["balancer"]["ema_sum"])
        assert_same_training(big, ranks[0]["model"], initial)
        reference_state = accumulated_state if accumulate else big_state
        # the committed averages are the same means over the same 4 examples per step
        assert torch.allclose(ranks[0]["balancer"]["ema_sum"], reference_state["ema_sum"], rtol=1e-5)
    assert torch.allclose(accumulated_state["ema_sum"], big_state["ema_sum"], rtol=1e-5)
    assert big_state["ema_count"].item() == pytest.approx(1 + 0.999 + 0.999 ** 2)   # once per optimiser step


# ---------------------------------------------------------------------------------------- launcher

def test_balancer_flags_are_checked(tiny_cache, capsys):
    assert "--balancer_ema_decay must be in [0, 1]" in validation_error(
        ["--data_dir", tiny_cache, "--balancer_ema_decay", 1.5] + TINY, capsys)
    assert "expected true or false" in validation_error(
        ["--data_dir", tiny_cache, "--loss_balancer", "maybe"] + TINY, capsys)


def test_resume_refuses_turning_the_balancer_on_or_off(tiny_cache, tmp_path, capsys):
    from music_continuation.data.cache import read_manifest
    from music_continuation.model import ContinuationTransformer
    fingerprint = read_manifest(tiny_cache)["codec_fingerprint"]
    model = ContinuationTransformer(d_model=32, num_layers=1, num_heads=2)
    for saved, asked in (({"loss_balancer": True}, "false"), ({}, "true")):   # {}: a checkpoint from before it
        save_checkpoint(tmp_path / "latest.pt", dict(model=model.state_dict(), model_config=model.config, epoch=1,
                                                     latent_mean=torch.zeros(128), latent_std=torch.ones(128),
                                                     codec_fingerprint=fingerprint, segment_frames=8, args=saved))
        message = validation_error(["--data_dir", tiny_cache, "--checkpoint_dir", tmp_path, "--resume", "auto",
                                    "--loss_balancer", asked] + TINY, capsys)
        assert f"the checkpoint has --loss_balancer {not asked == 'true'}, this command asks for {asked == 'true'}" \
            in message


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    """3 tracks of 1 s (2 train, 1 val): 16 train / 8 val examples of 2 x 8 frames, a third of tiny_cache."""
    from music_continuation.data import prepare as prepare_data
    cache = tmp_path_factory.mktemp("small_cache") / "demo"
    prepare_data.prepare_demo(cache, num_tracks=3, seconds=1.0, val_fraction=0.34, device="cpu", progress=False)
    return cache


@pytest.mark.slow
def test_balanced_run_logs_shares_and_resumes_bit_exactly(small_cache, mlflow_server, tmp_path):
    """The launcher with --loss_balancer true: MLflow gets the shares, and a run that crashed in epoch 2 and
    was resumed ends with the weights and moving average of an uninterrupted one."""
    from mlflow.tracking import MlflowClient
    argv = ["--data_dir", small_cache, "--nproc", 1, "--batch_size", 4, "--epochs", 2, "--dropout", 0.0,
            "--mlflow_tracking_uri", mlflow_server, "--experiment_name", "balancer", "--loss_balancer", "true",
            "--loss_weight_target", 0.6, "--loss_weight_mel", 0.4] + TINY
    full = run_launcher(argv + ["--checkpoint_dir", tmp_path / "full"], cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    crash_step = steps_per_epoch(small_cache, nproc=1, batch_size=4) + 1
    crashed = run_launcher(argv + ["--checkpoint_dir", tmp_path / "ck"], cwd=tmp_path,
                           faults=f"fail=0:{crash_step}")
    assert crashed.returncode != 0 and load_checkpoint(tmp_path / "ck" / "latest.pt")["epoch"] == 1
    resumed = run_launcher(argv + ["--checkpoint_dir", tmp_path / "ck", "--resume", "auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "full" / "latest.pt"), load_checkpoint(tmp_path / "ck" / "latest.pt")
    assert_same_weights(a["model"], b["model"], atol=0.0)
    assert torch.equal(a["balancer"]["ema_sum"], b["balancer"]["ema_sum"])
    assert torch.equal(a["balancer"]["ema_count"], b["balancer"]["ema_count"])
    assert a["balancer"]["components"] == ["rms_target", "mel"]
    assert epoch_blocks(resumed.stdout)[2] == epoch_blocks(full.stdout)[2]    # the print: the weighted sum

    client = MlflowClient(mlflow_server)
    metrics = client.get_run(a["mlflow_run_id"]).data.metrics
    shares = [metrics[f"train_grad_share_{name}"] for name in ("rms_target", "mel")]
    assert sum(shares) == pytest.approx(1.0, abs=1e-9)
    assert shares[0] == pytest.approx(0.6, abs=0.05)        # the balancer holds the weights (its average lags)
    assert metrics["train_grad_norm_rms_target"] == pytest.approx(1 / math.sqrt(2560), rel=1e-4)
    assert metrics["train_grad_norm_mel"] > 0
    assert not {"train_grad_norm_spectral", "train_grad_share_rms_input"} & set(metrics)   # weight 0: not trained
