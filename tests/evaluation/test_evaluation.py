"""evaluation.py and evaluate.py: figures, baselines, skill, reachable targets, the CLI.

Everything runs on the tiny demo cache (conftest.tiny_cache, random codec, 8-frame segments) with
checkpoints of a 1-layer d_model 32 model built here. Figures are checked against independent
computations: RMS by hand, the codec's decoder instantiated separately, hand-made skill inputs.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from music_continuation.evaluation import evaluate
from music_continuation.evaluation import scoring as evaluation
from music_continuation.evaluation.scoring import (
    BASELINES,
    SCORE_NAMES,
    EvaluationError,
    ScoreSums,
    evaluate_checkpoint,
    predict_audio,
    reference_audio,
    resolve_target_audio,
    score_baselines,
    skill,
)

ROOT = Path(__file__).resolve().parents[2]

SEGMENT = 8
TOP_KEYS = {"model", "baselines", "skill", "windows", "checkpoint", "data_dir", "split", "target_audio", "weights",
            "epoch", "weights_used"}


@pytest.fixture(scope="module")
def decoder():
    from music_continuation.codec import FrozenDecoder, load_codec
    return FrozenDecoder(load_codec("random"))


def dataset(cache, unity=False):
    from music_continuation.data.cache import ContinuationDataset
    return ContinuationDataset(cache, "val", SEGMENT, unity_test=unity)


def batch_of(data, indices=(0, 5, 10, 16)) -> dict:
    items = [data[i] for i in indices]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def normalizer_of(data):
    from music_continuation.data.cache import LatentNormalizer
    return LatentNormalizer(data.latent_mean, data.latent_std)


def loss_fn(**weights):
    from music_continuation.losses.audio import CombinedLoss
    return CombinedLoss(**weights)


def hand_rms(audio: torch.Tensor) -> float:
    """mean over examples of sqrt(mean over samples of x^2), in float64."""
    return audio.double().reshape(audio.shape[0], -1).square().mean(dim=1).sqrt().mean().item()


def make_checkpoint(path: Path, cache: Path, seed: int = 0, **args) -> Path:
    from music_continuation.model import ContinuationTransformer
    from music_continuation.training.checkpoint import save_checkpoint
    data = dataset(cache)
    torch.manual_seed(seed)
    model = ContinuationTransformer(d_model=32, num_layers=1, num_heads=2, dropout=0.0)
    flags = {"data_dir": str(cache), "segment_frames": SEGMENT, "encodec_weights": "random", "unity_test": False,
             "loss_weight_input": 0.0, "loss_weight_target": 0.5, "loss_weight_spectral": 0.3,
             "loss_weight_mel": 0.2, **args}
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model.config, "epoch": 3, "args": flags,
                           "latent_mean": data.latent_mean, "latent_std": data.latent_std,
                           "codec_fingerprint": data.codec_fingerprint, "encodec_weights": "random",
                           "segment_frames": SEGMENT})
    return path


# ---------------------------------------------------------------------------------------- units

def test_resolve_target_audio():
    assert resolve_target_audio("auto", "random") == "codec"
    assert resolve_target_audio("auto", "pretrained") == "original"
    assert resolve_target_audio("auto", "/models/encodec") == "original"
    assert resolve_target_audio("original", "random") == "original"
    assert resolve_target_audio("codec", "pretrained") == "codec"
    with pytest.raises(ValueError, match="--target_audio"):
        resolve_target_audio("decoded", "random")


def test_skill_arithmetic_on_hand_made_figures():
    model = dict.fromkeys(SCORE_NAMES, None) | {"loss": 0.4, "rms_target": 0.3, "spectral": 2.0, "mel": 1.0,
                                                "level": 0.9, "rhythm": 0.7, "latent_mse": 0.5}
    repeat = dict.fromkeys(SCORE_NAMES, None) | {"loss": 0.5, "rms_target": 0.3, "spectral": 1.5, "mel": 1.0,
                                                 "level": 1.2, "rhythm": 0.5, "latent_mse": 2.0}
    oracle = dict.fromkeys(SCORE_NAMES, None) | {"loss": 0.1, "rms_target": 0.3, "spectral": 0.5, "mel": 0.0,
                                                 "level": 1.0, "rhythm": 1.0, "latent_mse": 0.0}
    result = skill(model, repeat, oracle)
    assert list(result) == list(SCORE_NAMES)
    assert result["loss"] == pytest.approx(0.25)            # (0.5 - 0.4) / (0.5 - 0.1)
    assert result["spectral"] == pytest.approx(-0.5)        # worse than repeating
    assert result["mel"] == 0.0                             # as good as repeating
    assert result["latent_mse"] == pytest.approx(0.75)
    assert result["rhythm"] == pytest.approx(0.4)           # higher is better: the formula needs no sign
    assert result["rms_target"] is None                     # repeat == oracle: undefined
    assert result["level"] is None                          # never defined for level
    assert result["rms_input"] is None and result["chroma"] is None   # a None figure gives None


def test_level_on_scaled_copies_and_non_finite_is_an_error(tiny_cache):
    batch = batch_of(dataset(tiny_cache))
    references = (batch["input_audio"], batch["target_audio"])
    fn = loss_fn()
    for scale in (0.5, 1.0, 0.0):
        sums = ScoreSums().add(scale * batch["target_audio"], references, fn)
        assert sums.means()["level"] == pytest.approx(scale, rel=1e-6)
    broken = batch["target_audio"].clone()
    broken[1, 0, 7] = float("nan")
    with pytest.raises(EvaluationError, match="not finite"):
        ScoreSums(label="model").add(broken, references, fn).means()


def test_score_sums_vector_round_trip_and_halves_sum_to_the_whole(tiny_cache, decoder):
    data = dataset(tiny_cache)
    normalizer = normalizer_of(data)
    batch = batch_of(data)
    fn = loss_fn(rms_input=0.5, rms_target=0.5)
    output = evaluation.decode_latents(decoder, normalizer, batch["target_latent"] * 0.5)
    prediction = batch["target_latent"] * 0.5

    def sums_of(part):
        return ScoreSums().add(output[part], (batch["input_audio"][part], batch["target_audio"][part]), fn,
                               prediction[part], batch["target_latent"][part], musical=True)

    whole = sums_of(slice(0, 4))
    assert whole.examples == 4
    vector = whole.vector()
    assert vector.dtype == torch.float64 and vector.shape == (evaluation.VECTOR_SIZE,)
    assert ScoreSums.from_vector(vector).means() == whole.means()
    halves = ScoreSums.from_vector(sums_of(slice(0, 2)).vector() + sums_of(slice(2, 4)).vector()).means()
    full = whole.means()
    assert list(full) == list(SCORE_NAMES)
    # per-example figures (and the total, whose weights are on per-example components) add up exactly
    for name in ("loss", "rms_input", "rms_target", "mel", "latent_mse", "level", "rhythm", "chroma"):
        assert halves[name] == pytest.approx(full[name], rel=1e-6), name
    assert all(full[name] is not None for name in SCORE_NAMES if name not in evaluation.LISTENER_FIGURES)
    assert all(full[name] is None for name in evaluation.LISTENER_FIGURES)     # no listeners given


def test_predict_audio_is_model_then_denormalise_then_decode(tiny_cache, decoder):
    from music_continuation.model import ContinuationTransformer
    data = dataset(tiny_cache)
    normalizer = normalizer_of(data)
    torch.manual_seed(0)
    model = ContinuationTransformer(d_model=32, num_layers=1, num_heads=2, dropout=0.0).eval()
    latents = batch_of(data)["input_latent"]
    with torch.no_grad():
        expected = decoder(normalizer.denormalize(model(latents)))
        assert torch.equal(predict_audio(model, normalizer, decoder, latents), expected)


# ------------------------------------------------------------------------------------ baselines

def test_baselines_original_audio_against_independent_figures(tiny_cache, decoder):
    data = dataset(tiny_cache)
    batch = batch_of(data)
    normalizer = normalizer_of(data)
    sums = score_baselines([batch], decoder, normalizer, loss_fn(), "original", musical=True)
    assert list(sums) == list(BASELINES)
    silence, repeat, oracle = (sums[name].means() for name in BASELINES)
    assert silence["rms_target"] == pytest.approx(hand_rms(batch["target_audio"]), rel=1e-5)
    assert silence["rms_input"] == pytest.approx(hand_rms(batch["input_audio"]), rel=1e-5)
    assert silence["loss"] == pytest.approx(silence["rms_target"])        # default weights: rms_target only
    assert silence["level"] == 0.0 and silence["latent_mse"] is None
    expected_mse = (batch["input_latent"].double() - batch["target_latent"].double()).square().mean().item()
    assert repeat["latent_mse"] == pytest.approx(expected_mse, rel=1e-6)
    assert oracle["latent_mse"] == 0.0
    # with the random codec the decoded target is far from the original audio: the oracle is not 0 here
    assert oracle["rms_target"] > 0.01
    decoded_target = decoder(normalizer.denormalize(batch["target_latent"]))
    assert oracle["level"] == pytest.approx(math.sqrt(decoded_target.double().square().mean().item()
                                                      / batch["target_audio"].double().square().mean().item()),
                                            rel=1e-5)
    assert all(0.0 <= figures[name] <= 1.0 for figures in (silence, repeat, oracle) for name in ("chroma",))


def test_codec_target_oracle_scores_exactly_zero_and_silence_matches_decoded_target(tiny_cache, decoder):
    from music_continuation.codec import FrozenDecoder, load_codec
    data = dataset(tiny_cache)
    batch = batch_of(data)
    normalizer = normalizer_of(data)
    fn = loss_fn(rms_input=0.0, rms_target=0.4, spectral=0.3, mel=0.3)
    sums = score_baselines([batch], decoder, normalizer, fn, "codec")
    silence, repeat, oracle = (sums[name].means() for name in BASELINES)
    for name in ("loss", "rms_target", "spectral", "mel", "latent_mse"):
        assert oracle[name] == 0.0, name
    assert oracle["level"] == 1.0
    independent = FrozenDecoder(load_codec("random"))            # a second, separately built decoder
    with torch.no_grad():
        decoded_target = independent(normalizer.denormalize(batch["target_latent"]))
        decoded_input = independent(normalizer.denormalize(batch["input_latent"]))
    assert silence["rms_target"] == pytest.approx(hand_rms(decoded_target), rel=1e-5)
    assert oracle["rms_input"] == pytest.approx(hand_rms(decoded_target - decoded_input), rel=1e-4)
    assert repeat["rms_input"] == 0.0                            # repeat is the (decoded) input itself
    # the references are the decoded windows; the batch's own audio is not used
    references = reference_audio(batch, decoder, normalizer, "codec")
    assert torch.allclose(references[1], decoded_target, atol=1e-6)
    assert reference_audio(batch, decoder, normalizer, "original")[1] is batch["target_audio"]

    unity = batch_of(dataset(tiny_cache, unity=True))
    fn = loss_fn(rms_input=0.25, rms_target=0.25, spectral=0.25, mel=0.25)
    oracle = score_baselines([unity], decoder, normalizer, fn, "codec")["oracle"].means()
    for name in ("loss", "rms_input", "rms_target", "spectral", "mel"):
        assert oracle[name] == 0.0, name


def test_unity_mode_repeat_is_the_oracle_and_skill_is_undefined(tiny_cache, decoder):
    data = dataset(tiny_cache, unity=True)
    normalizer = normalizer_of(data)
    fn = loss_fn(rms_input=0.2, rms_target=0.4, spectral=0.4)
    for target_audio in ("original", "codec"):
        sums = score_baselines([batch_of(data)], decoder, normalizer, fn, target_audio, musical=True)
        repeat, oracle = sums["repeat"].means(), sums["oracle"].means()
        assert repeat == oracle
        model = {name: (None if value is None else value + 0.1) for name, value in repeat.items()}
        assert skill(model, repeat, oracle) == dict.fromkeys(SCORE_NAMES)


# ------------------------------------------------------------------------------------ checkpoints

def test_select_windows_are_even_and_include_the_ends():
    assert evaluation.select_windows(17, None) == list(range(17))
    assert evaluation.select_windows(17, 100) == list(range(17))
    assert evaluation.select_windows(17, 5) == [0, 4, 8, 12, 16]
    assert evaluation.select_windows(17, 1) == [0]
    assert evaluation.select_windows(3, 2) == [0, 2]


def test_two_checkpoints_are_scored_on_the_same_windows(tiny_cache, tmp_path):
    first = make_checkpoint(tmp_path / "a.pt", tiny_cache, seed=0)
    second = make_checkpoint(tmp_path / "b.pt", tiny_cache, seed=1)
    a = evaluate_checkpoint(first, max_windows=5, musical=False, batch_size=3)
    b = evaluate_checkpoint(second, max_windows=5, musical=False, batch_size=3)
    assert a["windows"] == b["windows"] == 5
    assert a["baselines"] == b["baselines"]          # the baselines depend on the windows only
    assert a["model"] != b["model"]
    assert a["target_audio"] == "codec"              # 'auto' with the random codec
    assert a["model"]["rhythm"] is None and a["model"]["chroma"] is None     # musical=False
    assert a["weights"] == {"rms_input": 0.0, "rms_target": 0.5, "spectral": 0.3, "mel": 0.2}
    assert a["baselines"]["oracle"]["loss"] == 0.0 and a["skill"]["level"] is None


@pytest.mark.slow
def test_evaluate_cli_end_to_end(tiny_cache, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "best.pt", tiny_cache)
    out = tmp_path / "scores" / "eval.json"
    # --no_listeners: the listeners' own CLI test is tests/evaluation/listeners (slow: librosa compiles at import)
    completed = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--checkpoint", str(checkpoint),
                                "--max_windows", "4", "--out", str(out), "--device", "cpu", "--batch_size", "2",
                                "--no_listeners"],
                               check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""                    # not a tty: no progress bar
    result = json.loads(out.read_text())
    assert set(result) == TOP_KEYS
    assert list(result["model"]) == list(SCORE_NAMES) and list(result["skill"]) == list(SCORE_NAMES)
    assert list(result["baselines"]) == list(BASELINES)
    assert all(list(figures) == list(SCORE_NAMES) for figures in result["baselines"].values())
    assert result["windows"] == 4 and result["split"] == "val" and result["epoch"] == 3
    assert result["data_dir"] == str(tiny_cache) and result["target_audio"] == "codec"
    assert result["baselines"]["oracle"]["latent_mse"] == 0.0
    lines = completed.stdout.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["loss", "rms_input"])
    assert header.split() == list(SCORE_NAMES)
    for row in ("model", "silence", "repeat", "oracle", "skill"):
        assert any(line.split()[:1] == [row] and len(line.split()) == 1 + len(SCORE_NAMES) for line in lines), row
    assert not list(out.parent.glob(".*tmp*"))       # atomic write left no temporary file


def test_evaluate_cli_bad_inputs_give_one_line_and_exit_2(tiny_cache, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing.pt" in err

    checkpoint = make_checkpoint(tmp_path / "c.pt", tiny_cache)
    assert evaluate.main(["--checkpoint", str(checkpoint), "--data_dir", str(tmp_path / "nocache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "manifest.json" in err

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(checkpoint), "--max_windows", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max_windows") and err.count("\n") == 1


def test_a_cache_with_other_statistics_is_renormalised_for_the_checkpoint(tiny_cache):
    from music_continuation.data.cache import LatentNormalizer
    data = dataset(tiny_cache)
    assert evaluation._renormalizer(data, normalizer_of(data)) is None
    other = LatentNormalizer(data.latent_mean + 0.5, data.latent_std * 2)
    latents = batch_of(data)["input_latent"]
    raw = latents * data.latent_std.reshape(1, -1, 1) + data.latent_mean.reshape(1, -1, 1)
    renormalised = evaluation._renormalizer(data, other)(latents)
    assert torch.allclose(renormalised, (raw - 0.5 - data.latent_mean.reshape(1, -1, 1))
                          / (2 * data.latent_std.reshape(1, -1, 1)), atol=1e-5)
