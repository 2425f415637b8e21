"""inference_sample.py on a tiny untrained model and a tiny demo cache (listening_metrics.py alone:
tests/evaluation/test_listening_metrics.py).

Every comparison is against something computed independently of the code under test: the cache /
the input file for the context audio, a hand-written model -> decoder pass for the continuation,
losses.CombinedLoss on the written WAVs for metrics.json.
"""
from __future__ import annotations

import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import soundfile
import torch

from music_continuation.codec import FRAME_RATE, HOP_LENGTH, SAMPLE_RATE, FrozenDecoder, encode, load_codec
from music_continuation.evaluation import inference as inference_sample
from music_continuation.evaluation import listening_metrics
from music_continuation.utils import free_port

ROOT = Path(__file__).resolve().parents[2]

SEGMENT_FRAMES = 16                       # 0.21 s: the smallest window the 2048-point STFT losses accept
SEGMENT_SAMPLES = SEGMENT_FRAMES * HOP_LENGTH
CONTINUE_SAMPLES = 12_000                 # the cache run's --continue_seconds 0.5: 3 autoregressive windows
LEAD_IN_SAMPLES = 4 * SAMPLE_RATE         # --lead_in_seconds' default
# The page's labels, written out here as a user reads them (listening_page.ending_title makes them).
LABELS = {"continuation": "model: its continuation",
          "codec": "target, what the figures score against: the codec's decoding of the true continuation",
          "original": "target, what the figures score against: the original audio",
          "second": "original audio (a second reference, not scored)"}


# --------------------------------------------------------------------------------------- fixtures
# Every run passes --no_listeners but one: the listeners' warm-up (numba, onnxruntime, the codec's encoder) costs
# 10-50 s per process, and these tests test the page. The default-flags run with the listeners is the slow
# test_mlflow_logs_the_folder_to_the_checkpoint_run, which also checks their rows on the page.

def make_checkpoint(path: Path, manifest: dict, **overrides) -> Path:
    from music_continuation.model import ContinuationTransformer
    from music_continuation.training.checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = ContinuationTransformer(d_model=32, num_layers=1, num_heads=2, dropout=0.0)
    state = dict(model=model.state_dict(), model_config=model.config, optimizer={}, scheduler={}, epoch=1,
                 args={"segment_frames": SEGMENT_FRAMES}, latent_mean=torch.tensor(manifest["latent_mean"]),
                 latent_std=torch.tensor(manifest["latent_std"]), codec_fingerprint=manifest["codec_fingerprint"],
                 encodec_weights="random", mlflow_run_id=None, best_val_loss=1.0, segment_frames=SEGMENT_FRAMES)
    state.update(overrides)
    save_checkpoint(path, state)
    return path


@pytest.fixture(scope="module")
def setup(tiny_cache, tmp_path_factory):
    """conftest's demo cache (4 tracks of 2 s, 1 in val: 8 windows of 2 x 16 frames) and a tiny model."""
    from music_continuation.data.cache import read_manifest
    manifest = read_manifest(tiny_cache)
    root = tmp_path_factory.mktemp("inference")
    val_track = next(track for track in manifest["tracks"] if track["split"] == "val")
    return {"root": root, "cache": tiny_cache, "manifest": manifest, "val_track": val_track,
            "checkpoint": make_checkpoint(root / "model.pt", manifest),       # records no --target_audio: original
            "codec_checkpoint": make_checkpoint(root / "codec.pt", manifest,     # trained against codec audio
                                                args={"segment_frames": SEGMENT_FRAMES, "target_audio": "codec"})}


def run_main(argv: list, capsys) -> tuple[int, str, str]:
    code = inference_sample.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_wav(path: Path) -> np.ndarray:
    samples, rate = soundfile.read(str(path), dtype="float32")
    assert rate == SAMPLE_RATE, path
    assert samples.ndim == 1, f"{path} is not mono"
    return samples


def track_audio(setup) -> np.ndarray:
    """The val track's real audio as the cache stores it, read without inference_sample."""
    from music_continuation.data.cache import audio_to_float, track_paths
    return audio_to_float(np.load(track_paths(setup["cache"], setup["val_track"]["id"])[1]))


def track_latents(setup) -> torch.Tensor:
    from music_continuation.data.cache import track_paths
    return torch.from_numpy(np.load(track_paths(setup["cache"], setup["val_track"]["id"])[0]).astype(np.float32))


@pytest.fixture(scope="module")
def cache_run(setup, tmp_path_factory):
    """--from_cache, codec targets (as the demo trains), 0.5 s autoregressive, the default lead-in."""
    out = tmp_path_factory.mktemp("cache_run") / "samples"
    code = inference_sample.main(["--checkpoint", str(setup["codec_checkpoint"]), "--from_cache", str(setup["cache"]),
                                  "--split", "val", "--num_samples", "2", "--out_dir", str(out),
                                  "--continue_seconds", str(CONTINUE_SAMPLES / SAMPLE_RATE), "--device", "cpu",
                                  "--batch_size", "2", "--no_listeners"])
    return code, out


@pytest.fixture(scope="module")
def blind_run(setup, tmp_path_factory):
    """--from_cache --blind, original targets, one window: the A/B copies and the key."""
    out = tmp_path_factory.mktemp("blind_run") / "samples"
    code = inference_sample.main(["--checkpoint", str(setup["checkpoint"]), "--from_cache", str(setup["cache"]),
                                  "--split", "val", "--num_samples", "2", "--out_dir", str(out), "--blind",
                                  "--seed", "3", "--device", "cpu", "--batch_size", "2", "--no_listeners"])
    return code, out


@pytest.fixture(scope="module")
def file_run(setup, tmp_path_factory):
    """--input with two good files (mixed formats), one too short and one corrupt; autoregressive."""
    folder = tmp_path_factory.mktemp("file_run")
    sources = sorted(p for p in (setup["cache"] / "audio").iterdir() if not p.name.startswith("."))[:2]
    short = folder / "short.wav"
    soundfile.write(str(short), np.zeros(2400, dtype=np.float32), SAMPLE_RATE)   # 0.1 s < start + context
    corrupt = folder / "corrupt.wav"
    corrupt.write_bytes(b"RIFF this is not audio")
    out = folder / "samples"
    argv = ["--checkpoint", setup["checkpoint"], "--input", sources[0], short, corrupt, sources[1],
            "--start", 0.1, "--continue_seconds", 0.5, "--lead_in_seconds", 0.05, "--out_dir", out, "--device", "cpu",
            "--batch_size", 1, "--no_listeners"]
    import io
    from contextlib import redirect_stderr
    err = io.StringIO()
    with redirect_stderr(err):
        code = inference_sample.main([str(arg) for arg in argv])
    return {"code": code, "out": out, "sources": sources, "stderr": err.getvalue(), "short": short,
            "corrupt": corrupt, "start": 0.1, "continue_seconds": 0.5, "lead_in": 1200}


def player_gains(out: Path) -> dict:
    return {entry["name"]: entry["player_gain"] for entry in json.loads((out / "metrics.json").read_text())["examples"]}


def example_dirs(out: Path) -> list[Path]:
    return sorted(path for path in out.iterdir() if path.is_dir())


def expected_context(audio: torch.Tensor, start_seconds: float) -> tuple[int, torch.Tensor]:
    start_frame = int(round(start_seconds * FRAME_RATE))
    return start_frame, audio[:, start_frame * HOP_LENGTH: (start_frame + SEGMENT_FRAMES) * HOP_LENGTH]


# ------------------------------------------------------------------------------ generation: cache

def test_cache_examples_play_lead_in_context_and_each_ending(setup, cache_run):
    """Windows with room for the whole continuation; every player = real lead-in + real context + its ending."""
    code, out = cache_run
    assert code == 0
    audio, frames = track_audio(setup), setup["val_track"]["frames"]
    dirs = example_dirs(out)
    # 8 windows of 2 x 16 frames start at 0, 16, ..., 112; 0.5 s (38 frames) after the context fits up to 96
    starts = [int(folder.name.rsplit("_f", 1)[1]) for folder in dirs]
    assert starts == [0, 96] and 96 + SEGMENT_FRAMES + math.ceil(CONTINUE_SAMPLES / HOP_LENGTH) <= frames
    gains = player_gains(out)
    for folder, start in zip(dirs, starts):
        first, seam = max(0, start * HOP_LENGTH - LEAD_IN_SAMPLES), (start + SEGMENT_FRAMES) * HOP_LENGTH
        assert (folder / "lead_in.wav").exists() == (start > 0)       # the lead-in is clipped at the track start
        lead_in = read_wav(folder / "lead_in.wav") if start > 0 else np.zeros(0, np.float32)
        assert np.array_equal(lead_in, audio[first: start * HOP_LENGTH])
        context = read_wav(folder / "context.wav")
        assert np.array_equal(context, audio[start * HOP_LENGTH: seam])
        assert np.array_equal(read_wav(folder / "original.wav"), audio[seam: seam + CONTINUE_SAMPLES])
        players = {}
        for ending in ("continuation", "target", "original"):
            samples = read_wav(folder / f"{ending}.wav")
            assert samples.shape == (CONTINUE_SAMPLES,), (folder, ending)
            players[ending] = np.concatenate([lead_in, context, samples])
        # one gain for every player of the example: the loudest peaks at 0.99 (a browser clips above 1)
        gain = min(1.0, 0.99 / max(np.abs(samples).max() for samples in players.values()))
        assert gains[folder.name] == pytest.approx(gain, rel=1e-6)
        for ending, samples in players.items():     # float32 products: within one rounding of the gain
            np.testing.assert_allclose(read_wav(folder / f"player_{ending}.wav"), samples * gain, rtol=1e-6, atol=0)
        assert (folder / "spectrogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_codec_target_is_what_is_scored_and_what_is_played(setup, cache_run, hand):
    """target.wav is the true continuation's latents decoded from the seam, and `level` compares it with what
    the model player plays (before, the page played the original audio beside a codec-scored level)."""
    _, out = cache_run
    latents = track_latents(setup)
    report = {entry["name"]: entry for entry in json.loads((out / "metrics.json").read_text())["examples"]}
    for folder in example_dirs(out):
        seam_frame = int(folder.name.rsplit("_f", 1)[1]) + SEGMENT_FRAMES
        true = latents[None, :, seam_frame: seam_frame + math.ceil(CONTINUE_SAMPLES / HOP_LENGTH)]
        with torch.no_grad():
            decoded = hand["decoder"](true)[0, 0, :CONTINUE_SAMPLES].numpy()
        target = read_wav(folder / "target.wav")
        # the same decoder on the same latents, once through the normaliser and back: float32 rounding
        np.testing.assert_allclose(target, decoded, atol=1e-5)
        continuation = read_wav(folder / "continuation.wav")
        rms = lambda x: float(np.sqrt(np.mean(x[:SEGMENT_SAMPLES].astype(np.float64) ** 2)))    # noqa: E731
        # scored: the first target window decoded alone; played: decoded with what follows. The decoder
        # is causal, so the two agree to float32 rounding (measured 1.5e-6 of a peak of 3)
        assert report[folder.name]["metrics"]["level"] == pytest.approx(rms(continuation) / rms(target), rel=1e-4)


def test_cache_continuation_is_the_decoded_prediction(setup, cache_run, hand):
    from music_continuation.data.cache import ContinuationDataset
    dataset = ContinuationDataset(setup["cache"], "val", SEGMENT_FRAMES)
    item = dataset[0]                                      # the first example's window starts at frame 0
    raw = item["input_latent"] * dataset.latent_std[:, None] + dataset.latent_mean[:, None]
    normalise = lambda z: (z[None] - hand["mean"]) / hand["std"]      # noqa: E731
    with torch.no_grad():
        audio = hand["decoder"](hand["model"](normalise(raw)) * hand["std"] + hand["mean"])[0, 0].numpy()
    # the first of 3 windows decoded in one pass against one window alone: causal decoder, float32 rounding
    continuation = read_wav(example_dirs(cache_run[1])[0] / "continuation.wav")
    np.testing.assert_allclose(continuation[:SEGMENT_SAMPLES], audio, atol=1e-5)


def test_metrics_json_matches_recomputation(setup, cache_run, file_run, hand):
    """The figures of metrics.json from the written WAVs: the model's continuation against target.wav (what the
    target player plays) and, for rms_input, the context (with codec targets: its latents decoded)."""
    from music_continuation.losses.audio import CombinedLoss
    combined, latents = CombinedLoss(), track_latents(setup)
    # file_run scores against the original audio: the WAVs are the very tensors scored. cache_run scores
    # against the first target window decoded alone, and target.wav decodes it with what follows: the same to
    # float32 rounding (causal decoder), which moves the losses by ~1e-6 of their value.
    for out, rel in ((file_run["out"], 1e-5), (cache_run[1], 1e-4)):
        report = json.loads((out / "metrics.json").read_text())
        codec_targets = report["settings"]["target_audio"] == "codec"
        assert codec_targets == (out == cache_run[1]) and len(report["examples"]) == 2
        for entry in report["examples"]:
            folder = out / entry["name"]
            load = {role: torch.from_numpy(read_wav(folder / f"{role}.wav"))[None, None]
                    for role in ("context", "continuation", "target")}
            context = load["context"]
            if codec_targets:
                start = int(folder.name.rsplit("_f", 1)[1])
                with torch.no_grad():
                    context = hand["decoder"](latents[None, :, start: start + SEGMENT_FRAMES])
            continuation = load["continuation"][..., :SEGMENT_SAMPLES]     # the first segment is scored
            target = load["target"][..., :SEGMENT_SAMPLES]
            _, components = combined(continuation, context, target)
            for name, value in components.items():
                assert entry["metrics"][name] == pytest.approx(float(value), rel=rel, abs=1e-7), name
            assert entry["metrics"]["rhythm"] == pytest.approx(
                listening_metrics.rhythm_similarity(continuation, target), abs=rel)
            assert entry["metrics"]["chroma"] == pytest.approx(
                listening_metrics.chroma_similarity(continuation, target), abs=rel)
        for name, mean in report["mean"].items():
            values = [e["metrics"][name] for e in report["examples"] if e["metrics"][name] is not None]
            if values:
                assert mean == pytest.approx(np.mean(values), rel=1e-9), name
            else:                          # --no_listeners: their figures are undefined, never NaN
                assert mean is None, name


@pytest.fixture(scope="module")
def hand(setup):
    """The checkpoint's model, its normalisation statistics and the random codec, for recomputing by hand."""
    from music_continuation.training.checkpoint import load_model_for_inference
    model, normalizer, _ = load_model_for_inference(setup["checkpoint"], "cpu")
    codec = load_codec("random")
    return {"model": model, "mean": normalizer.mean, "std": normalizer.std, "codec": codec,
            "decoder": FrozenDecoder(codec)}


def assert_figures(figures: dict, output: torch.Tensor, context: torch.Tensor, target: torch.Tensor) -> None:
    """The audio figures of `output` [1, 1, N] against context and target, recomputed from their definitions."""
    from music_continuation.losses.audio import CombinedLoss
    _, components = CombinedLoss()(output, context, target)
    for name, value in components.items():
        assert figures[name] == pytest.approx(float(value), rel=1e-4, abs=1e-6), name
    assert figures["loss"] == pytest.approx(figures["rms_target"], rel=1e-12)     # default weights: target 1.0
    rms = lambda audio: float(audio.double().square().mean().sqrt())     # noqa: E731
    assert figures["level"] == pytest.approx(rms(output) / rms(target), rel=1e-4, abs=1e-9)
    assert figures["rhythm"] == pytest.approx(listening_metrics.rhythm_similarity(output, target), abs=1e-5)
    assert figures["chroma"] == pytest.approx(listening_metrics.chroma_similarity(output, target), abs=1e-5)


def test_cache_baselines_match_hand_decoding(setup, blind_run, hand):
    """silence = zeros, repeat = the context's latents decoded, oracle = the next window's latents decoded."""
    from music_continuation.data.cache import ContinuationDataset
    dataset = ContinuationDataset(setup["cache"], "val", SEGMENT_FRAMES)
    report = json.loads((blind_run[1] / "metrics.json").read_text())   # one window each: the first and last
    normalise = lambda raw: (raw[None] - hand["mean"]) / hand["std"]      # noqa: E731
    for entry, index in zip(report["examples"], (0, len(dataset) - 1)):
        item = dataset[index]
        raw = {key: item[f"{key}_latent"] * dataset.latent_std[:, None] + dataset.latent_mean[:, None]
               for key in ("input", "target")}
        with torch.no_grad():
            outputs = {"repeat": hand["decoder"](raw["input"][None]), "oracle": hand["decoder"](raw["target"][None])}
            predicted = hand["model"](normalise(raw["input"]))
        outputs["silence"] = torch.zeros_like(outputs["oracle"])
        assert set(entry["baselines"]) == set(outputs)
        for name, output in outputs.items():
            assert_figures(entry["baselines"][name], output, item["input_audio"][None], item["target_audio"][None])
        target = normalise(raw["target"])
        baselines = entry["baselines"]
        assert baselines["silence"]["latent_mse"] is None and baselines["silence"]["level"] == 0.0
        repeat_mse = float((normalise(raw["input"]) - target).square().mean())
        assert baselines["repeat"]["latent_mse"] == pytest.approx(repeat_mse, rel=1e-4)
        assert baselines["oracle"]["latent_mse"] == pytest.approx(0.0, abs=1e-8)
        assert entry["metrics"]["latent_mse"] == pytest.approx(float((predicted - target).square().mean()), rel=1e-4)
    for name in ("silence", "repeat", "oracle"):
        for figure, mean in report["mean_baselines"][name].items():
            values = [e["baselines"][name][figure] for e in report["examples"]]
            values = [value for value in values if value is not None]
            assert mean == (pytest.approx(np.mean(values), rel=1e-9) if values else None), (name, figure)


def test_file_oracle_is_the_encoded_real_continuation(setup, file_run, hand):
    """For an input file the target latents are the real continuation encoded from the file's start."""
    from music_continuation.data.audio_io import load_audio
    report = json.loads((file_run["out"] / "metrics.json").read_text())
    audio = load_audio(file_run["sources"][0])
    start_frame, context = expected_context(audio, file_run["start"])
    target_start, target_end = start_frame + SEGMENT_FRAMES, start_frame + 2 * SEGMENT_FRAMES
    latents = encode(hand["codec"], audio[None, :, : target_end * HOP_LENGTH])[..., target_start:]
    with torch.no_grad():
        oracle = hand["decoder"](latents)
    target = audio[None, :, target_start * HOP_LENGTH: target_end * HOP_LENGTH]
    entry = report["examples"][0]
    assert_figures(entry["baselines"]["oracle"], oracle, context[None], target)
    assert entry["baselines"]["oracle"]["latent_mse"] == pytest.approx(0.0, abs=1e-8)


def test_file_without_a_continuation_has_no_baselines(setup, tmp_path, capsys):
    """A file that ends within one segment after the context: only rms_input, no baselines (nothing to compare)."""
    path = tmp_path / "short_tail.wav"
    samples = (SEGMENT_FRAMES + SEGMENT_FRAMES // 2) * HOP_LENGTH       # context + half a segment
    soundfile.write(str(path), 0.3 * np.sin(np.arange(samples) * 2 * np.pi * 220 / SAMPLE_RATE), SAMPLE_RATE)
    out = tmp_path / "out"
    code, _, err = run_main(["--checkpoint", setup["checkpoint"], "--input", path, "--out_dir", out, "--device", "cpu",
                             "--no_listeners"], capsys)
    assert code == 0, err
    entry = json.loads((out / "metrics.json").read_text())["examples"][0]
    assert entry["baselines"] is None
    assert [name for name, value in entry["metrics"].items() if value is not None] == ["rms_input"]
    page = (out / "index.html").read_text()
    assert "<td>silence</td>" not in page and "<td>model</td>" in page
    check_page(out)


def test_codec_reference_makes_the_oracle_score_zero(setup, tmp_path, capsys):
    """--target_audio codec scores against the true latents decoded, so the oracle is exact."""
    out = tmp_path / "out"
    code, _, err = run_main(base_argv(setup, setup["checkpoint"], out) + ["--target_audio", "codec"], capsys)
    assert code == 0, err
    report = json.loads((out / "metrics.json").read_text())
    assert report["settings"]["target_audio"] == "codec"
    oracle = report["examples"][0]["baselines"]["oracle"]
    for name in ("rms_target", "mel", "latent_mse"):
        assert oracle[name] == pytest.approx(0.0, abs=1e-6), name
    assert oracle["level"] == pytest.approx(1.0) and oracle["chroma"] == pytest.approx(1.0)


def test_the_reference_follows_the_checkpoint_unless_told(setup, tmp_path, capsys):
    """A run trained against codec audio is scored against codec audio; an older checkpoint (no
    --target_audio recorded) against the original audio; the flag overrides either."""
    trained = make_checkpoint(tmp_path / "codec.pt", setup["manifest"],
                              args={"segment_frames": SEGMENT_FRAMES, "target_audio": "codec"})
    for checkpoint, extra, expected in ((trained, [], "codec"), (setup["checkpoint"], [], "original"),
                                        (trained, ["--target_audio", "original"], "original")):
        out = tmp_path / f"out_{expected}_{len(extra)}"
        code, _, err = run_main(base_argv(setup, checkpoint, out) + extra, capsys)
        assert code == 0, err
        assert json.loads((out / "metrics.json").read_text())["settings"]["target_audio"] == expected


class PageParser(HTMLParser):
    """Collects links and checks that every non-void element is closed in order."""
    VOID = {"meta", "img", "br", "hr", "input", "link", "source", "wbr"}

    def __init__(self):
        super().__init__()
        self.links, self.stack, self.problems = [], [], []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def check_page(out: Path) -> list[str]:
    text = (out / "index.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    parser = PageParser()
    parser.feed(text)
    parser.close()
    assert not parser.problems and not parser.stack, (parser.problems, parser.stack)
    assert parser.links
    for link in parser.links:
        parsed = urlparse(link)
        assert not parsed.scheme and not parsed.netloc and not link.startswith("/"), link   # relative only
        assert (out / unquote(parsed.path)).is_file(), link
    return parser.links


def test_blind_page_hides_the_key_and_the_key_maps_back(blind_run):
    code, out = blind_run
    assert code == 0
    links = check_page(out)
    key = json.loads((out / "blind_key.json").read_text())["examples"]
    assert len(key) == 2
    gains = player_gains(out)
    page = (out / "index.html").read_text()
    for name, entry in key.items():
        folder = out / name
        assert {entry["A"], entry["B"]} == {"continuation", "target"}
        for label in ("A", "B"):
            assert np.array_equal(read_wav(folder / f"{label}.wav"), read_wav(folder / f"player_{entry[label]}.wav"))
        model_label = entry["model"]
        np.testing.assert_allclose(read_wav(folder / f"{model_label}.wav")[-SEGMENT_SAMPLES:],
                                   read_wav(folder / "continuation.wav") * gains[name], rtol=1e-6, atol=0)
        assert f"{name}/A.wav" in links and f"{name}/B.wav" in links
    # nothing on the page points at (or names) the files that would give the answer away
    for giveaway in ("player_", "continuation.wav", "target.wav", "original.wav", "spectrogram.png",
                     "blind_key.json\"", LABELS["continuation"], LABELS["original"]):
        assert giveaway not in page, giveaway


class TableRows(HTMLParser):
    """The row labels (first cell of each row with cells) of every table on a page."""

    def __init__(self):
        super().__init__()
        self.tables, self.cell, self.first = [], None, False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.first = True
        elif tag == "td":
            self.cell = "" if self.first else None
            self.first = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.tables[-1].append(self.cell)
            self.cell = None


def test_page_tables_put_the_baselines_beside_the_model(cache_run):
    """Per example and for the mean: rows model / silence / repeat / oracle; arrows from losses.LOSSES."""
    from music_continuation.evaluation import listening_page
    from music_continuation.losses.audio import LOSSES
    page = (cache_run[1] / "index.html").read_text()
    parser = TableRows()
    parser.feed(page)
    assert parser.tables == [["model", "silence", "repeat", "oracle"]] * (1 + 2)   # the mean, then each example
    for component in LOSSES:      # the page scores against the reference: the adversarial terms have no row
        assert (f"{component.name} &darr;" in page) != component.adversarial
    assert "rhythm &uarr;" in page and "chroma &uarr;" in page and "level &rarr;1" in page
    assert set(listening_page.BETTER) == set(listening_page.METRIC_NAMES)


def test_plot_continuations_writes_one_png_atomically(tmp_path):
    from music_continuation.evaluation.plots import plot_continuations
    t = np.arange(SAMPLE_RATE // 2) / SAMPLE_RATE
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    endings = [("numpy [N]", tone), ("tensor [1, N]", torch.from_numpy(tone)[None]), ("shorter", torch.zeros(100))]
    path = plot_continuations(tmp_path / "figure.png", tone[:2400], endings, context_start=1200, window_joins=(600,),
                              title="t")
    assert path == tmp_path / "figure.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]          # no temporary file left
    from PIL import Image
    width, height = Image.open(path).size
    assert width == 800 and height > 3 * 150                               # three stacked rows
    with pytest.raises(ValueError):
        plot_continuations(tmp_path / "empty.png", tone, [])
    assert not (tmp_path / "empty.png").exists()


def test_plot_marks_the_seam_at_its_sample_on_the_frame_centre_axis(tmp_path, monkeypatch):
    """The seam line sits on the sample where the ending begins, and the cell of STFT frame f is centred on
    frame f's centre: torch.stft(center=True) frame f covers samples f * hop -+ n_fft / 2."""
    import matplotlib.pyplot as plt

    from music_continuation.evaluation import plots
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))     # keep the figure to inspect it
    seam, ending = 3 * SEGMENT_SAMPLES + 77, np.ones(SEGMENT_SAMPLES, np.float32)
    plots.plot_continuations(tmp_path / "f.png", np.zeros(seam, np.float32), [("e", ending)], context_start=1000)
    (ax,) = figures[0].axes[:1]
    lines = sorted(float(line.get_xdata()[0]) for line in ax.lines)
    assert lines == [1000 / SAMPLE_RATE, seam / SAMPLE_RATE]
    hop, length = 256, seam + SEGMENT_SAMPLES                                  # the mel loss's STFT (README)
    frames = torch.stft(torch.zeros(length), 1024, hop, window=torch.hann_window(1024), center=True,
                        return_complex=True).shape[-1]
    left, right, _, _ = ax.images[0].get_extent()
    cell = (right - left) / frames
    centres = left + cell * (np.arange(frames) + 0.5)
    np.testing.assert_allclose(centres, np.arange(frames) * hop / SAMPLE_RATE, atol=1e-12)
    close(figures[0])


def test_blind_shuffle_is_seeded():
    examples = [inference_sample.Example(name=f"e{i}", source="", context_latent=torch.zeros(1),
                                         context_audio=torch.zeros(1, 1), lead_in=torch.zeros(1, 0),
                                         original=torch.zeros(1, 1))
                for i in range(40)]
    first = inference_sample.assign_blind_labels(examples, seed=7)
    again = inference_sample.assign_blind_labels(examples, seed=7)
    other = inference_sample.assign_blind_labels(examples, seed=8)
    assert first == again and first != other
    models = [entry["model"] for entry in first.values()]
    assert 5 < models.count("A") < 35        # both orders occur


class FakeSplit:
    """What choose_windows reads of a ContinuationDataset: windows of 2 x T frames every T frames."""

    def __init__(self, frames: list[int], segment_frames: int = SEGMENT_FRAMES):
        self.segment_frames = segment_frames
        self.tracks = [{"id": f"t{i}", "frames": n} for i, n in enumerate(frames)]
        self.windows = [(track["id"], start) for track in self.tracks
                        for start in range(0, track["frames"] - 2 * segment_frames + 1, segment_frames)]

    def __len__(self):
        return len(self.windows)

    def window_location(self, index):
        return self.windows[index]


def test_choose_windows_spreads_examples_over_the_tracks():
    """A long track does not take the examples of the short ones (evenly spaced over all windows it would:
    here windows 0, 60 and 119 of 120 are tracks 0, 0 and 2)."""
    split = FakeSplit([100 * SEGMENT_FRAMES + SEGMENT_FRAMES, 11 * SEGMENT_FRAMES, 11 * SEGMENT_FRAMES])
    assert [track["id"] for track, _ in inference_sample.choose_windows(split, 3, 0, SEGMENT_FRAMES)] == \
        ["t0", "t1", "t2"]
    six = inference_sample.choose_windows(split, 6, 0, SEGMENT_FRAMES)
    assert [track["id"] for track, _ in six] == ["t0", "t0", "t1", "t1", "t2", "t2"]
    assert [start for track, start in six if track["id"] == "t1"] == [0, 9 * SEGMENT_FRAMES]   # first and last
    assert [track["id"] for track, _ in inference_sample.choose_windows(split, 2, 0, SEGMENT_FRAMES)] == ["t0", "t2"]


def test_choose_windows_leaves_room_for_the_continuation_and_the_lead_in():
    split = FakeSplit([20 * SEGMENT_FRAMES])       # windows start at 0, T, ..., 18 T
    before, after = 3 * SEGMENT_FRAMES, 5 * SEGMENT_FRAMES
    chosen = [start for _, start in inference_sample.choose_windows(split, 3, before, after)]
    assert chosen[0] == before and chosen[-1] + SEGMENT_FRAMES + after == 20 * SEGMENT_FRAMES
    # no room for the lead-in anywhere: the continuation still fits; no room for either: every window
    assert [s for _, s in inference_sample.choose_windows(split, 2, 10 ** 6, after)] == [0, 14 * SEGMENT_FRAMES]
    assert [s for _, s in inference_sample.choose_windows(split, 2, 0, 10 ** 6)] == [0, 18 * SEGMENT_FRAMES]
    assert len(inference_sample.choose_windows(split, 50, 0, 0)) == 19          # no more than there are


class Players(HTMLParser):
    """Per <section>: the (src, label) of each player (an <audio> followed by its label <span>)."""

    def __init__(self):
        super().__init__()
        self.sections, self.src, self.label = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.sections.append([])
        elif tag == "audio":
            self.src = unquote(dict(attrs)["src"])
        elif tag == "span" and self.src is not None:
            self.label = ""

    def handle_data(self, data):
        if self.label is not None:
            self.label += data

    def handle_endtag(self, tag):
        if tag == "span" and self.label is not None:
            self.sections[-1].append((self.src, self.label))
            self.src = self.label = None


def page_players(out: Path) -> tuple[str, list[list[tuple[str, str]]]]:
    check_page(out)
    page = (out / "index.html").read_text()
    parser = Players()
    parser.feed(page)
    return page, [players for players in parser.sections if players]


def test_page_plays_the_target_it_scores_against_and_the_original_labelled(cache_run, file_run):
    """Codec targets: model, target (the codec's decoding) and original players; original targets: model and
    target (the original audio). Each points to its WAV; the random codec is explained in one line."""
    for out, expected in ((cache_run[1], [("continuation", LABELS["continuation"]), ("target", LABELS["codec"]),
                                          ("original", LABELS["second"])]),
                          (file_run["out"], [("continuation", LABELS["continuation"]),
                                             ("target", LABELS["original"])])):
        page, sections = page_players(out)
        dirs = example_dirs(out)
        assert len(sections) == len(dirs)
        for folder, players in zip(dirs, sections):
            assert players == [(f"{folder.name}/player_{ending}.wav", label) for ending, label in expected]
            assert all((out / src).is_file() for src, _ in players)
        assert page.count("id=\"random-codec\"") == 1 and "sounds like noise" in page


# ------------------------------------------------------------------------------- generation: files

def test_files_autoregressive_lengths_context_and_continuation(setup, file_run):
    from music_continuation.data.audio_io import load_audio
    from music_continuation.training.checkpoint import load_model_for_inference
    assert file_run["code"] == 1                      # two inputs failed ...
    dirs = example_dirs(file_run["out"])
    assert len(dirs) == 2                             # ... and the other two were written
    continuation_samples = round(file_run["continue_seconds"] * SAMPLE_RATE)
    for folder, source in zip(dirs, file_run["sources"]):
        assert source.stem.replace("#", "_") in folder.name
        context = read_wav(folder / "context.wav")
        audio = load_audio(source)[0].numpy()
        start_frame, expected = expected_context(load_audio(source), file_run["start"])
        assert np.array_equal(context, expected[0].numpy())        # the real audio of the file
        lead_in = read_wav(folder / "lead_in.wav")                 # --lead_in_seconds 0.05 before --start
        assert np.array_equal(lead_in, audio[start_frame * HOP_LENGTH - file_run["lead_in"]: start_frame * HOP_LENGTH])
        continuation = read_wav(folder / "continuation.wav")
        assert continuation.shape == (continuation_samples,)
        gain = player_gains(file_run["out"])[folder.name]
        np.testing.assert_allclose(read_wav(folder / "player_continuation.wav"),
                                   np.concatenate([lead_in, context, continuation]) * gain, rtol=1e-6, atol=0)
        context_end = (start_frame + SEGMENT_FRAMES) * HOP_LENGTH
        real_after = audio[context_end: context_end + continuation_samples]
        assert np.array_equal(read_wav(folder / "target.wav"), real_after)   # original targets: the real audio
        assert not (folder / "original.wav").exists()
    check_page(file_run["out"])

    # Autoregression, by hand: encode the file from its start, then each window is the model's
    # reading of the previous predicted window; decode all windows in one pass.
    model, normalizer, _ = load_model_for_inference(setup["checkpoint"], "cpu")
    codec = load_codec("random")
    audio = load_audio(file_run["sources"][0])
    start_frame, _ = expected_context(audio, file_run["start"])
    latents = encode(codec, audio[None, :, : (start_frame + SEGMENT_FRAMES) * HOP_LENGTH])[..., start_frame:]
    windows = math.ceil(continuation_samples / SEGMENT_SAMPLES)
    assert windows == 3
    with torch.no_grad():
        window, predicted = normalizer.normalize(latents), []
        for _ in range(windows):
            window = model(window)
            predicted.append(normalizer.denormalize(window))
        decoded = FrozenDecoder(codec)(torch.cat(predicted, dim=-1))[0, 0, :continuation_samples].numpy()
    np.testing.assert_allclose(read_wav(dirs[0] / "continuation.wav"), decoded, atol=1e-5)


def test_bad_inputs_are_reported_in_one_line_each(file_run):
    lines = [line for line in file_run["stderr"].splitlines() if line.strip()]
    short_lines = [line for line in lines if str(file_run["short"]) in line]
    corrupt_lines = [line for line in lines if str(file_run["corrupt"]) in line]
    assert len(short_lines) == 1 and "shorter than" in short_lines[0]
    assert len(corrupt_lines) == 1 and "unreadable" in corrupt_lines[0]
    assert "Traceback" not in file_run["stderr"]
    report = json.loads((file_run["out"] / "metrics.json").read_text())
    assert {Path(f["source"]).name for f in report["failed"]} == {"short.wav", "corrupt.wav"}


# ------------------------------------------------------------------------------------------ errors

def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def base_argv(setup, checkpoint, out, listeners: bool = False):
    return ["--checkpoint", checkpoint, "--from_cache", setup["cache"], "--num_samples", 1, "--out_dir", out,
            "--device", "cpu"] + ([] if listeners else ["--no_listeners"])


def test_missing_input_is_refused_up_front(setup, tmp_path, capsys):
    """One line naming the file, before anything loads (it was soundfile's 'System error.')."""
    missing = tmp_path / "nope.flac"
    with pytest.raises(SystemExit) as exit_info:
        inference_sample.main([str(arg) for arg in ["--checkpoint", setup["checkpoint"], "--input", missing,
                                                    "--out_dir", tmp_path / "out"]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith(f"error: --input {missing}: no such file")
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_all_inputs_failed_exits_1_and_writes_no_page(setup, file_run, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_main(["--checkpoint", setup["checkpoint"], "--input", file_run["short"],
                                  file_run["corrupt"], "--out_dir", out, "--device", "cpu", "--no_listeners"],
                                 capsys)
    assert code == 1
    assert not out.exists() and "index.html" not in stdout + err
    lines = err.strip().splitlines()
    assert len(lines) == 3     # one per input, then
    assert lines[-1] == "error: none of the 2 input(s) could be used (listed above); nothing written"


def test_missing_checkpoint(setup, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    code, _, err = run_main(base_argv(setup, missing, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, str(missing))
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint(setup, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage, not a torch file" * 10)
    code, _, err = run_main(base_argv(setup, corrupt, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, str(corrupt))


def test_checkpoint_from_another_codec(setup, tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "other.pt", setup["manifest"], codec_fingerprint="0123456789abcdef")
    code, _, err = run_main(base_argv(setup, checkpoint, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, "0123456789abcdef", setup["manifest"]["codec_fingerprint"])


def test_cache_from_another_codec(setup, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache, ignore=shutil.ignore_patterns("audio"))
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["codec_fingerprint"] = "fedcba9876543210"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    argv = base_argv(setup, setup["checkpoint"], tmp_path / "out")
    argv[argv.index("--from_cache") + 1] = cache
    code, _, err = run_main(argv, capsys)
    assert_one_line_error(code, err, "fedcba9876543210", str(cache))


@pytest.mark.slow
def test_mlflow_logs_the_folder_to_the_checkpoint_run(setup, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.create_run(client.create_experiment(f"inference-test-{tmp_path.name}"))
    checkpoint = make_checkpoint(tmp_path / "tracked.pt", setup["manifest"], mlflow_run_id=run.info.run_id,
                                 args={"segment_frames": SEGMENT_FRAMES, "mlflow_tracking_uri": mlflow_server})
    out = tmp_path / "listen"
    # the default flags: the listeners are on (the suite's one default-flags run of them through a page)
    code, stdout, err = run_main(base_argv(setup, checkpoint, out, listeners=True) + ["--num_samples", 2, "--mlflow"],
                                 capsys)
    assert code == 0, err
    # 2 examples x 16 frames are too few for a full-rank covariance: the Fréchet distance says so, once per set
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings and all("codec frames in a set" in line and "refused" in line for line in warnings), err
    logged = {item.path for item in client.list_artifacts(run.info.run_id, "samples/listen")}
    assert {"samples/listen/index.html", "samples/listen/metrics.json"} <= logged
    # the listeners' figures: on the page beside the baselines, in metrics.json, never NaN
    from music_continuation.evaluation.listeners import LISTENER_FIGURES
    metrics = json.loads((out / "metrics.json").read_text())
    page = (out / "index.html").read_text()
    for name in ("melody_f1", "pitch_class_agreement", "beat_f1"):
        assert f"{name} &uarr;" in page, name
        for figures in [metrics["mean"], *metrics["mean_baselines"].values()]:
            assert 0.0 <= figures[name] <= 1.0, (name, figures[name])
    assert "tempo_ratio &rarr;1" in page and "frechet_codec &darr;" in page
    for entry in metrics["examples"]:
        assert entry["metrics"]["frechet_codec"] is None            # a figure of a set: the mean rows only
    assert metrics["mean"]["frechet_codec"] is None                 # refused above (32 frames < 129)
    parser = TableRows()
    parser.feed(page)
    assert parser.tables == [["model", "silence", "repeat", "oracle"]] * 3
    assert "nan" not in page.lower().replace("nanoseconds", "") and "NaN" not in json.dumps(metrics)
    assert all(name in stdout for name in LISTENER_FIGURES)          # the printed table has their columns


def test_mlflow_failure_is_only_a_warning(setup, tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "tracked.pt", setup["manifest"], mlflow_run_id="0" * 32)
    dead = f"http://127.0.0.1:{free_port()}"           # nothing listens there
    argv = base_argv(setup, checkpoint, tmp_path / "out") + ["--mlflow", "--mlflow_tracking_uri", dead]
    code, _, err = run_main(argv, capsys)
    assert code == 0 and "warning: --mlflow" in err, err
    assert (tmp_path / "out" / "index.html").is_file()


def test_clearing_a_previous_run_removes_only_the_files_it_listed(tmp_path, capsys):
    out = tmp_path / "samples"
    (out / "a").mkdir(parents=True)
    (out / "b").mkdir()
    for name in ("a/input.wav", "a/spectrogram.png", "b/input.wav"):
        (out / name).write_bytes(b"old")
    (out / "b" / "notes.txt").write_text("mine")          # a user's file inside an example folder
    (out / "README.txt").write_text("mine too")
    outside = tmp_path / "outside.wav"
    outside.write_bytes(b"not ours")
    (out / "blind_key.json").write_text("{}")
    (out / "metrics.json").write_text(json.dumps({"examples": [
        {"name": "a", "files": {"input": "a/input.wav", "spectrogram": "a/spectrogram.png"}},
        {"name": "b", "files": {"input": "b/input.wav", "escape": "../outside.wav"}}]}))
    inference_sample.clear_previous_run(out)
    assert not (out / "a").exists() and not (out / "b" / "input.wav").exists() and not (out / "blind_key.json").exists()
    assert (out / "b" / "notes.txt").read_text() == "mine" and (out / "README.txt").exists() and outside.exists()
    assert capsys.readouterr().err.strip() == f"note: removed the 1 example(s) of the previous run in {out}"


@pytest.mark.slow
def test_a_rerun_into_the_same_out_dir_leaves_only_its_own_examples(setup, tmp_path, capsys):
    out = tmp_path / "samples"
    common = ["--checkpoint", setup["checkpoint"], "--from_cache", setup["cache"], "--split", "val", "--out_dir", out,
              "--device", "cpu", "--batch_size", 2]
    assert run_main(common + ["--num_samples", 2], capsys)[0] == 0
    first = [path.name for path in example_dirs(out)]
    code, _, _ = run_main(common + ["--num_samples", 1, "--seed", 5], capsys)
    assert code == 0 and len(first) == 2
    listed = [entry["name"] for entry in json.loads((out / "metrics.json").read_text())["examples"]]
    assert [path.name for path in example_dirs(out)] == listed and len(listed) == 1
