"""The discriminator in the training step, the flags, and the defaults (no discriminator: nothing changes).

Tiny sizes: a 1-layer d_model 32 model, the frozen random decoder, 4 examples of 2560 samples. References:
a plain step without the discriminator (warm-up, defaults), the frozen decoder's own weights, the text the
epoch block printed before the adversarial components existed.
"""
from __future__ import annotations

import pytest
import torch

from music_continuation.adversarial.adversary import Adversary
from music_continuation.losses.audio import LOSSES, CombinedLoss, shown_losses
from music_continuation.losses.balancer import LossBalancer
from music_continuation.training import launcher, worker
from music_continuation.training import report as training_report
from music_continuation.training import step as training_step
from tests.training.test_training import TINY, step_parts, validation_error  # noqa: F401 - fixture

ADVERSARIAL = dict(rms_input=0.0, rms_target=0.5, spectral=0.0, mel=0.0, adversarial=0.3, feature_matching=0.2)


def make_sgd(seed: int = 0):
    """SGD at lr 1: the update is the gradient, so two steps compare to float rounding."""
    from music_continuation.model import ContinuationTransformer
    torch.manual_seed(seed)
    model = ContinuationTransformer(d_model=32, num_layers=1, num_heads=2, dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def run_step(parts, loss_fn, model, optimizer, scheduler, batches, adversary=None, step=0, balance=False):
    balancer = LossBalancer(loss_fn.weights, balance=balance)
    result = training_step.train_step(model, parts["decoder"], parts["normalizer"], loss_fn, optimizer, scheduler,
                                      batches, 1e9, balancer=balancer, adversary=adversary, step=step)
    return result, balancer


def small(batch: dict) -> dict:
    """Two examples: the discriminator's five scales are most of a step on CPU."""
    return {name: tensor[:2] for name, tensor in batch.items()}


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


@pytest.mark.slow     # several training steps through the discriminator: too long for the inner loop
def test_the_discriminator_learns_while_the_frozen_decoder_never_changes(step_parts):  # noqa: F811
    loss_fn = CombinedLoss(**ADVERSARIAL)
    model, optimizer, scheduler = make_sgd()
    torch.manual_seed(1)
    adversary = Adversary("cpu", lr=1e-3)
    decoder_before = [t.clone() for t in step_parts["decoder"].state_dict().values()]
    disc_before, model_before = flat(adversary.discriminator), flat(model)
    (applied, total, components), balancer = run_step(step_parts, loss_fn, model, optimizer, scheduler,
                                                      [small(step_parts["batches"][0])], adversary, balance=True)
    assert applied
    assert not torch.equal(flat(adversary.discriminator), disc_before)
    assert not torch.equal(flat(model), model_before)
    assert all(torch.equal(a, b) for a, b in zip(decoder_before, step_parts["decoder"].state_dict().values()))
    assert all(p.grad is None for p in step_parts["decoder"].parameters())
    assert list(components) == ["rms_input", "rms_target", "spectral", "mel", "adversarial", "feature_matching",
                                "discriminator_loss", "discriminator_real", "discriminator_fake"]
    # the balancer measures and applies all three trained components: their shares are the step's split
    assert balancer.names == ["rms_target", "adversarial", "feature_matching"]
    shares = balancer.figures[4:7]
    assert shares.sum().item() == pytest.approx(1.0) and (shares > 0).all()


@pytest.mark.slow     # several training steps through the discriminator: too long for the inner loop
def test_before_the_start_step_the_generator_gets_only_the_reference_gradient(step_parts):  # noqa: F811
    """During --adversarial_start_step the model's update is exactly that of the run without a discriminator,
    while the discriminator trains."""
    batch = small(step_parts["batches"][0])
    plain_model, plain_opt, plain_sched = make_sgd()
    plain_loss = CombinedLoss(**{**ADVERSARIAL, "adversarial": 0.0, "feature_matching": 0.0})
    run_step(step_parts, plain_loss, plain_model, plain_opt, plain_sched, [batch])
    model, optimizer, scheduler = make_sgd()
    torch.manual_seed(1)
    adversary = Adversary("cpu", lr=1e-3, start_step=3)
    disc_before = flat(adversary.discriminator)
    (applied, _, components), balancer = run_step(step_parts, CombinedLoss(**ADVERSARIAL), model, optimizer,
                                                  scheduler, [batch], adversary, step=2)
    assert applied and components["adversarial"].item() != 0.0
    torch.testing.assert_close(flat(model), flat(plain_model), rtol=0, atol=1e-6)
    assert not torch.equal(flat(adversary.discriminator), disc_before)
    assert balancer.figures[5:7].tolist() == [0.0, 0.0]        # held: no share of the gradient
    assert balancer.figures[1:3].min().item() > 0               # ... but measured


@pytest.mark.slow     # several training steps through the discriminator: too long for the inner loop
def test_a_non_finite_discriminator_skips_the_whole_step(step_parts):  # noqa: F811
    model, optimizer, scheduler = make_sgd()
    torch.manual_seed(1)
    adversary = Adversary("cpu", lr=1e-3)
    with torch.no_grad():
        adversary.parameters[-1].fill_(float("nan"))            # the last layer's bias: NaN logits
    disc_before, model_before = flat(adversary.discriminator), flat(model)
    (applied, _, _), _ = run_step(step_parts, CombinedLoss(**ADVERSARIAL), model, optimizer, scheduler,
                                  [small(step_parts["batches"][0])], adversary)
    assert not applied
    assert torch.equal(flat(model), model_before)
    assert torch.equal(flat(adversary.discriminator).nan_to_num(), disc_before.nan_to_num())   # no Adam step
    assert all(p.grad is None for p in adversary.parameters)


def test_defaults_print_and_log_exactly_what_they_did_before():
    args = launcher.build_parser().parse_args(["--data_dir", "x"])
    weights = CombinedLoss(**{c.name: getattr(args, c.flag[2:]) for c in LOSSES}).weights
    assert [c.name for c in shown_losses(weights)] == ["rms_input", "rms_target", "spectral", "mel"]
    assert training_step.metric_names(False) == training_step.METRIC_NAMES == (
        "loss", "rms_input", "rms_target", "spectral", "mel")
    assert worker.build_adversary(args, weights, "cpu", None) is None and args.ema_decay == 0.0
    figures = dict(zip(training_step.METRIC_NAMES, (0.5, 0.0, 0.5, 1.25, 2.0)))
    block = training_report.format_epoch_block(3, 10, figures, figures, 1e-4, shown_losses(weights))
    line = "0.5000 (rms_in: 0.0000, rms_tgt: 0.5000, spec: 1.2500, mel: 2.0000)"
    assert block == f"Epoch 3/10:\n  Train Loss: {line}\n  Val Loss:   {line}\n  LR: 1.00e-04"
    assert block == training_report.format_epoch_block(3, 10, figures, figures, 1e-4)
    train = {**figures, "gradients": {"grad_norm_rms_target": 1.0, "grad_share_rms_target": 1.0},
             "learning_rate": 1e-4, "skipped_steps": 0}
    val = {**figures, "latent_mse": 1.0, "level": 0.5}
    assert set(training_report.epoch_metrics(train, val, 0, None, 1.0)) == {
        "train_loss", "train_rms_input", "train_rms_target", "train_spectral", "train_mel",
        "train_grad_norm_rms_target", "train_grad_share_rms_target", "learning_rate", "skipped_steps",
        "epoch_seconds", "val_nonfinite_examples", "val_loss", "val_rms_input", "val_rms_target",
        "val_spectral", "val_mel", "val_latent_mse", "val_level"}


def test_with_a_discriminator_the_block_adds_its_components_after_the_four():
    names = training_step.metric_names(True)
    figures = dict(zip(names, [0.5, 0.0, 0.5, 1.25, 2.0, -0.1, 0.3, 1.9, 0.2, -0.1]))
    block = training_report.format_epoch_block(1, 2, figures, figures, 1e-4, shown_losses(ADVERSARIAL))
    assert "(rms_in: 0.0000, rms_tgt: 0.5000, spec: 1.2500, mel: 2.0000, adv: -0.1000, feat: 0.3000)" in block
    train = {**figures, "gradients": {}, "learning_rate": 1e-4, "skipped_steps": 0}
    metrics = training_report.epoch_metrics(train, {**figures, "latent_mse": 1.0, "level": 1.0}, 0, None, 1.0, names)
    assert {"train_adversarial", "val_feature_matching", "train_discriminator_loss", "val_discriminator_real",
            "train_discriminator_fake"} <= set(metrics)


@pytest.mark.parametrize("extra, expected", [
    (["--loss_weight_adversarial", -1], "--loss_weight_adversarial must be a number >= 0, got -1.0"),
    (["--loss_weight_feature_matching", "nan"], "--loss_weight_feature_matching must be a number >= 0"),
    (["--discriminator_context", "true"], "--discriminator_context needs a discriminator: give "
                                          "--loss_weight_adversarial or --loss_weight_feature_matching"),
    (["--adversarial_start_step", 5], "--adversarial_start_step needs a discriminator"),
    (["--discriminator_lr", 1e-3], "--discriminator_lr needs a discriminator"),
    (["--loss_weight_adversarial", 1, "--discriminator_lr", 0], "--discriminator_lr must be a positive number"),
    (["--ema_decay", 1.0], "--ema_decay must be in [0, 1)"),
    (["--discriminator_window_seconds", 0.5], "--discriminator_window_seconds needs a discriminator"),
    (["--loss_weight_adversarial", 1, "--discriminator_window_seconds", 0.05],
     "--discriminator_window_seconds must be 0 (all the audio) or at least 0.0853 (the discriminator's largest "
     "FFT), got 0.05"),
])
def test_each_bad_adversarial_flag_is_a_one_line_error(extra, expected, tiny_cache, capsys):
    assert expected in validation_error(["--data_dir", tiny_cache] + TINY + extra, capsys)


def test_the_ablation_identity_keeps_earlier_hashes_and_knows_the_new_flags(tmp_path):
    from music_continuation.ablation import ablate
    from music_continuation.settings import LATER_FLAG_DEFAULTS, older_run_values
    parser = launcher.build_parser()
    assert {name: parser.get_default(name) for name in LATER_FLAG_DEFAULTS} == LATER_FLAG_DEFAULTS
    assert set(launcher.DISCRIMINATOR_DEFAULTS) | {"ema_decay"} <= set(launcher.RESUME_MUST_MATCH)
    assert {"loss_weight_adversarial", "loss_weight_feature_matching"} <= set(launcher.RESUME_MUST_MATCH)
    # the first discriminators heard all the audio: an adversarial run from before the window had window 0
    assert older_run_values({"loss_weight_adversarial": 4.0})["discriminator_window_seconds"] == 0.0
    assert older_run_values({"loss_weight_target": 1.0}) == LATER_FLAG_DEFAULTS

    def identity(flags: dict) -> dict:
        return ablate.build_cells([{"name": "cell", "flags": flags}], {}, 1, tmp_path)[0].settings
    # a cell without the discriminator keeps its hash; one with it names the window it trains with
    assert "discriminator_window_seconds" not in identity({"loss_weight_target": 1.0})
    assert identity({"loss_weight_adversarial": 4.0})["discriminator_window_seconds"] == 0.2
    assert "discriminator_window_seconds" not in identity({"loss_weight_adversarial": 4.0,
                                                             "discriminator_window_seconds": 0.0})


@pytest.mark.slow     # several training steps through the discriminator: too long for the inner loop
def test_accumulated_micro_batches_match_one_batch(step_parts):  # noqa: F811
    """Batch 2 in one micro-batch == 2 micro-batches of 1: the same gradients for the model and the discriminator
    (both on SGD at lr 1, so the update is the gradient). Trained on the per-example hinge term; feature matching
    is a ratio over each micro-batch."""
    weights = {**ADVERSARIAL, "feature_matching": 0.0}
    batch = small(step_parts["batches"][0])
    results = []
    for groups in ([batch], [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]):
        model, optimizer, scheduler = make_sgd()
        torch.manual_seed(1)
        adversary = Adversary("cpu", lr=1e-3)
        adversary.optimizer = torch.optim.SGD(adversary.parameters, lr=1.0)
        (applied, total, _), _ = run_step(step_parts, CombinedLoss(**weights), model, optimizer, scheduler, groups,
                                          adversary)
        assert applied
        results.append((model.state_dict(), adversary.discriminator.state_dict(), total))
    (model_a, disc_a, total_a), (model_b, disc_b, total_b) = results
    assert total_a.item() == pytest.approx(total_b.item(), rel=1e-5)
    for state_a, state_b in ((model_a, model_b), (disc_a, disc_b)):
        for name, tensor in state_a.items():
            torch.testing.assert_close(tensor, state_b[name], rtol=1e-4, atol=1e-6)


def hearing(adversary) -> list:
    """What the adversary's discriminator hears, call by call."""
    heard, network = [], adversary.network
    adversary.network = lambda x: heard.append(x.detach().clone()) or network(x)
    return heard


def test_with_context_the_discriminator_hears_the_context_then_the_audio(step_parts):  # noqa: F811
    adversary = Adversary("cpu", lr=1e-3, context=True)
    heard = hearing(adversary)
    batch = small(step_parts["batches"][0])
    output = torch.randn(2, 1, 2560)
    adversary.measure(output, batch["input_audio"], batch["target_audio"])
    fake, real = heard
    assert fake.shape == real.shape == (2, 1, 5120)           # context + continuation
    assert torch.equal(fake[..., :2560], batch["input_audio"]) and torch.equal(real[..., :2560], batch["input_audio"])
    assert torch.equal(fake[..., 2560:], output) and torch.equal(real[..., 2560:], batch["target_audio"])


@pytest.mark.parametrize("context", [False, True])
def test_the_window_is_cut_at_one_place_per_step_from_the_seed(context):
    """Output and reference cut at the same place; the place a function of (seed, step) only; with the context
    at least half the window is continuation; validation (step None) hears the first allowed window."""
    window, length = 2400, 6000
    seam = length if context else 0
    ramp = torch.arange(seam + length, dtype=torch.float32).view(1, 1, -1)   # sample value = its position
    context_audio, output = ramp[..., :length], ramp[..., seam:]
    reference = output + 0.5

    def starts(seed: int, steps: list) -> list:
        adversary = Adversary("cpu", lr=1e-3, context=context, window_seconds=window / 24000, seed=seed)
        heard, found = hearing(adversary), []
        for step in steps:
            adversary.terms(output, context_audio, reference, step=step)
            fake, real = heard[-2:]
            start = int(fake[0, 0, 0])
            assert torch.equal(fake, ramp[..., start:start + window])
            assert torch.equal(real - fake, (torch.arange(start, start + window) >= seam).float().view(1, 1, -1) / 2)
            found.append(start)
        return found

    steps = list(range(16)) + [None]
    first = starts(0, steps)
    assert first == starts(0, steps) and first != starts(1, steps)
    lowest = seam - window // 2 if context else 0
    assert all(lowest <= start <= seam + length - window for start in first)
    assert first[-1] == lowest and len(set(first[:-1])) > 4
