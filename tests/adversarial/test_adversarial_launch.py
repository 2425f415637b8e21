"""The launcher with a discriminator and EMA weights: DDP against one process, and resume after SIGKILL.

References: one process on the same global batch (the losses printed, the model's and the discriminator's
weights), an uninterrupted run for resume (every tensor of the checkpoint, bit for bit). The small demo cache
of tests/losses/test_balancer.py (16 train / 8 val examples of 2 x 8 frames), 1-layer d_model 32 model.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from music_continuation.losses.audio import shown_losses
from music_continuation.training.checkpoint import load_checkpoint, load_model_for_inference
from tests.fault_launcher import fault_environment
from tests.losses.test_balancer import small_cache  # noqa: F401 - fixture
from tests.training.test_training import (
    NUMBER,
    ROOT,
    RUN_TIMEOUT,
    TINY,
    assert_same_training,
    run_launcher,
    sqlite_uri,
)

pytestmark = pytest.mark.slow

WEIGHTS = {"loss_weight_target": 0.6, "loss_weight_adversarial": 0.2, "loss_weight_feature_matching": 0.2}
SHOWN = shown_losses({"adversarial": 0.2})
PARTS = rf"{NUMBER} \(" + ", ".join(rf"{c.short}: {NUMBER}" for c in SHOWN) + r"\)"
BLOCK = re.compile(rf"^Epoch (\d+)/(\d+):\n  Train Loss: {PARTS}\n  Val Loss:   {PARTS}\n  LR: {NUMBER}$",
                   re.MULTILINE)


def blocks(stdout: str) -> dict[int, dict]:
    """{epoch: {"train": [total, rms_in, rms_tgt, spec, mel, adv, feat], "val": [...]}} of the printed blocks."""
    width = len(SHOWN) + 1
    found = {}
    for match in BLOCK.finditer(stdout):
        values = [float(v) for v in match.groups()[2:]]
        found[int(match.group(1))] = {"train": values[:width], "val": values[width:2 * width], "lr": values[-1]}
    return found


# Shorter than the 2560-sample segments: every step hears a window cut from (seed, step), which must be the same
# in 1 and 2 processes and in a resumed run.
WINDOW = ["--discriminator_window_seconds", 0.09]


def flags(cache, extra=(), weights=WEIGHTS) -> list:
    return (["--data_dir", cache, "--dropout", 0.0] + TINY + WINDOW
            + [item for flag, value in weights.items() for item in (f"--{flag}", value)] + list(extra))


def test_two_processes_match_one_process_with_the_discriminator(small_cache, tmp_path):  # noqa: F811
    """Trained on the per-example terms (the hinge losses), so the updates compare; feature matching, a ratio
    over each rank's batch, is measured and printed beside them."""
    weights = {"loss_weight_target": 0.7, "loss_weight_adversarial": 0.3}
    runs = {}
    for nproc, batch in ((1, 4), (2, 2)):
        folder = tmp_path / f"nproc{nproc}"
        result = run_launcher(flags(small_cache, ["--epochs", 1, "--nproc", nproc, "--batch_size", batch,
                                                  "--checkpoint_dir", folder / "ck"], weights), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = (blocks(result.stdout)[1], load_checkpoint(folder / "ck" / "latest.pt"))
    (one, one_state), (two, two_state) = runs[1], runs[2]
    for split in ("train", "val"):
        # total, rms_tgt and adv are per-example means: the same whatever the sharding; feat is a ratio of
        # means over each rank's batch (normalised by the reference maps' magnitude), like spectral convergence
        for index in (0, 2, 5):
            assert one[split][index] == pytest.approx(two[split][index], abs=2e-4), (split, index)
        assert one[split][6] == pytest.approx(two[split][6], rel=0.03), split
    torch.manual_seed(0)
    from music_continuation.model import ContinuationTransformer
    initial = ContinuationTransformer(d_model=32, num_layers=1, num_heads=2, dropout=0.0).state_dict()
    assert_same_training(one_state["model"], two_state["model"], initial)
    torch.manual_seed(1)
    from music_continuation.adversarial.discriminator import MultiScaleSTFTDiscriminator
    assert_same_training(one_state["discriminator"]["model"], two_state["discriminator"]["model"],
                         MultiScaleSTFTDiscriminator().state_dict())


def assert_same_state(a, b, where="checkpoint") -> None:
    """Every tensor and number of two nested checkpoint values equal, bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{index}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_resume_after_sigkill_is_bit_exact_with_the_discriminator_and_the_ema(small_cache, tmp_path):  # noqa: F811
    argv = flags(small_cache, ["--epochs", 2, "--nproc", 1, "--batch_size", 4, "--ema_decay", 0.9,
                               "--adversarial_start_step", 2, "--loss_balancer", "true"])
    full = run_launcher(argv + ["--checkpoint_dir", tmp_path / "full"], cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    command = [sys.executable, str(ROOT / "train_simple_ddp.py"), *map(str, argv),
               "--checkpoint_dir", str(tmp_path / "ck"), "--mlflow_tracking_uri", sqlite_uri(tmp_path)]
    killed = subprocess.Popen(command, cwd=tmp_path, env=fault_environment("slow=0.5", dict(os.environ),
                                                                    everywhere=True),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (tmp_path / "ck" / "latest.pt").exists():
            assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[1][-3000:]
            time.sleep(0.1)
        time.sleep(0.5)                                           # inside epoch 2 (4 steps of >= 0.5 s)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)
    assert load_checkpoint(tmp_path / "ck" / "latest.pt")["epoch"] == 1

    resumed = run_launcher(argv + ["--checkpoint_dir", tmp_path / "ck", "--resume", "auto",
                                   "--mlflow_tracking_uri", sqlite_uri(tmp_path)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch 2" in resumed.stdout
    a, b = load_checkpoint(tmp_path / "full" / "latest.pt"), load_checkpoint(tmp_path / "ck" / "latest.pt")
    for key in ("model", "optimizer", "discriminator", "ema", "balancer", "weights"):
        assert_same_state(a[key], b[key], key)
    assert blocks(resumed.stdout)[2] == blocks(full.stdout)[2]
    assert a["weights"] == "ema" and a["ema"]["count"] == pytest.approx(sum(0.9 ** k for k in range(8)))

    # best.pt and inference hold the averaged weights; --weights raw the training ones
    model, _, state = load_model_for_inference(tmp_path / "full" / "best.pt")
    assert state["weights_used"] == "ema"
    for name, tensor in state["ema"]["average"].items():
        assert torch.equal(model.state_dict()[name], tensor)
    raw, _, state = load_model_for_inference(tmp_path / "full" / "best.pt", weights="raw")
    assert state["weights_used"] == "raw"
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in state["model"].items())
