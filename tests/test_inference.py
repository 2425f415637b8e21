"""inference_sample.py and listening_metrics.py on a tiny untrained model and a tiny demo cache.

Every comparison is against something computed independently of the code under test: librosa for
the listening metrics, the cache / the input file for the context audio, a hand-written
model -> decoder pass for the continuation, losses.CombinedLoss on the written WAVs for metrics.json.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import soundfile
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import inference_sample  # noqa: E402
import listening_metrics  # noqa: E402
from utils import free_port  # noqa: E402
from codec import FRAME_RATE, HOP_LENGTH, SAMPLE_RATE, FrozenDecoder, encode, load_codec  # noqa: E402

SEGMENT_FRAMES = 16                       # 0.21 s: the smallest window the 2048-point STFT losses accept
SEGMENT_SAMPLES = SEGMENT_FRAMES * HOP_LENGTH
PLAYED = ("context_plus_continuation", "context_plus_target")


# --------------------------------------------------------------------------------------- fixtures

def make_checkpoint(path: Path, manifest: dict, **overrides) -> Path:
    from checkpoint import save_checkpoint
    from model import ContinuationTransformer
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
    from data import read_manifest
    manifest = read_manifest(tiny_cache)
    root = tmp_path_factory.mktemp("inference")
    return {"root": root, "cache": tiny_cache, "manifest": manifest,
            "checkpoint": make_checkpoint(root / "model.pt", manifest)}


def run_main(argv: list, capsys) -> tuple[int, str, str]:
    code = inference_sample.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_wav(path: Path) -> np.ndarray:
    samples, rate = soundfile.read(str(path), dtype="float32")
    assert rate == SAMPLE_RATE, path
    assert samples.ndim == 1, f"{path} is not mono"
    return samples


@pytest.fixture(scope="module")
def cache_run(setup, tmp_path_factory):
    """--from_cache --blind: writes every per-example file plus the A/B copies and the key."""
    out = tmp_path_factory.mktemp("cache_run") / "samples"
    code = inference_sample.main(["--checkpoint", str(setup["checkpoint"]), "--from_cache", str(setup["cache"]),
                                  "--split", "val", "--num_samples", "2", "--out_dir", str(out), "--blind",
                                  "--seed", "3", "--device", "cpu", "--batch_size", "2"])
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
            "--start", 0.1, "--continue_seconds", 0.5, "--out_dir", out, "--device", "cpu", "--batch_size", 1]
    import io
    from contextlib import redirect_stderr
    err = io.StringIO()
    with redirect_stderr(err):
        code = inference_sample.main([str(arg) for arg in argv])
    return {"code": code, "out": out, "sources": sources, "stderr": err.getvalue(), "short": short,
            "corrupt": corrupt, "start": 0.1, "continue_seconds": 0.5}


def example_dirs(out: Path) -> list[Path]:
    return sorted(path for path in out.iterdir() if path.is_dir())


def expected_context(audio: torch.Tensor, start_seconds: float) -> tuple[int, torch.Tensor]:
    start_frame = int(round(start_seconds * FRAME_RATE))
    return start_frame, audio[:, start_frame * HOP_LENGTH: (start_frame + SEGMENT_FRAMES) * HOP_LENGTH]


# ------------------------------------------------------------------------------- listening metrics

def drum_loop(seconds=3.0, bpm=120, seed=0):
    rng = np.random.default_rng(seed)
    audio = np.zeros(int(seconds * SAMPLE_RATE))
    step = int(60 / bpm * SAMPLE_RATE / 2)
    for hit, start in enumerate(range(0, audio.size, step)):
        length = min(3000, audio.size - start)
        envelope = np.exp(-np.arange(length) / 300)
        sound = rng.standard_normal(length) * 0.5 if hit % 2 else np.sin(2 * np.pi * 60 * np.arange(length) / SAMPLE_RATE)
        audio[start: start + length] += sound * envelope
    return audio.astype(np.float32)


def chord(frequencies=(261.63, 329.63, 392.0), seconds=3.0):   # C major, sustained
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (sum(np.sin(2 * np.pi * f * t) for f in frequencies) / 4).astype(np.float32)


def test_chroma_of_a4_peaks_at_a():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    chroma = listening_metrics.mean_chroma(np.sin(2 * np.pi * 440.0 * t)).numpy()
    assert listening_metrics.PITCH_CLASSES[int(chroma.argmax())] == "A"
    assert chroma[9] > 10 * np.delete(chroma, 9).max()


def test_chroma_matches_librosa():
    librosa = pytest.importorskip("librosa")
    for audio in (chord(), chord((293.66, 369.99, 440.0)), drum_loop()):
        ours = listening_metrics.mean_chroma(audio).numpy()
        reference = librosa.feature.chroma_stft(y=audio, sr=SAMPLE_RATE, n_fft=4096, hop_length=1024,
                                                tuning=0.0).mean(axis=1)
        cosine = ours @ reference / (np.linalg.norm(ours) * np.linalg.norm(reference))
        assert cosine > 0.9, cosine


def test_onset_envelope_matches_librosa():
    librosa = pytest.importorskip("librosa")
    audio = drum_loop()
    ours = listening_metrics.onset_strength(audio).numpy()
    reference = librosa.onset.onset_strength(y=audio, sr=SAMPLE_RATE, n_fft=1024, hop_length=256, n_mels=80,
                                             fmax=8000.0)
    # librosa puts the flux of frames (t-1, t) at index t + n_fft // (2 * hop); ours is at t - 1.
    offset = 1 + 1024 // (2 * 256)
    count = min(ours.size, reference.size - offset)
    assert np.corrcoef(ours[:count], reference[offset: offset + count])[0, 1] > 0.85


def test_identical_audio_scores_one_and_unrelated_lower():
    drums, sustained = drum_loop(), chord()
    for audio in (drums, sustained):
        assert listening_metrics.rhythm_similarity(audio, audio) == pytest.approx(1.0, abs=1e-9)
        assert listening_metrics.chroma_similarity(audio, audio) == pytest.approx(1.0, abs=1e-9)
    assert listening_metrics.rhythm_similarity(drums, sustained) < 0.5
    assert listening_metrics.chroma_similarity(drums, sustained) < 0.8
    # rhythm: a 20 ms late copy still matches (lag tolerance), another tempo does not
    assert listening_metrics.rhythm_similarity(drums, np.roll(drums, 480)) > 0.9
    assert listening_metrics.rhythm_similarity(drums, drum_loop(bpm=90, seed=1)) < 0.5
    # chroma: C major against D major (shares no pitch class) is far from 1
    assert listening_metrics.chroma_similarity(sustained, chord((293.66, 369.99, 440.0))) < 0.3
    # both bounded by their maximum
    assert listening_metrics.rhythm_similarity(drums, drum_loop(seed=5)) <= 1.0


def test_silence_convention():
    silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
    assert listening_metrics.rhythm_similarity(silence, silence) == 1.0
    assert listening_metrics.chroma_similarity(silence, silence) == 1.0
    assert listening_metrics.chroma_similarity(silence, chord(seconds=1.0)) == 0.0


# ------------------------------------------------------------------------------ generation: cache

def test_cache_outputs_have_rate_and_lengths(cache_run):
    code, out = cache_run
    assert code == 0
    dirs = example_dirs(out)
    assert len(dirs) == 2
    expected = {"context": SEGMENT_SAMPLES, "continuation": SEGMENT_SAMPLES, "target": SEGMENT_SAMPLES,
                "context_plus_continuation": 2 * SEGMENT_SAMPLES, "context_plus_target": 2 * SEGMENT_SAMPLES}
    for folder in dirs:
        for role, length in expected.items():
            assert read_wav(folder / f"{role}.wav").shape == (length,), (folder, role)
        assert (folder / "spectrogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        context, continuation = read_wav(folder / "context.wav"), read_wav(folder / "continuation.wav")
        joined = read_wav(folder / "context_plus_continuation.wav")
        assert np.array_equal(joined[:SEGMENT_SAMPLES], context)
        assert np.array_equal(joined[SEGMENT_SAMPLES:], continuation)
        assert np.array_equal(read_wav(folder / "context_plus_target.wav")[SEGMENT_SAMPLES:],
                              read_wav(folder / "target.wav"))


def test_cache_context_is_real_audio_and_continuation_is_the_decoded_prediction(setup, cache_run):
    from checkpoint import load_model_for_inference
    from data import ContinuationDataset
    _, out = cache_run
    dataset = ContinuationDataset(setup["cache"], "val", SEGMENT_FRAMES)
    first, last = example_dirs(out)[0], example_dirs(out)[-1]     # evenly spaced: windows 0 and len - 1
    for folder, index in ((first, 0), (last, len(dataset) - 1)):
        item = dataset[index]
        assert np.array_equal(read_wav(folder / "context.wav"), item["input_audio"][0].numpy())
        assert np.array_equal(read_wav(folder / "target.wav"), item["target_audio"][0].numpy())
    model, normalizer, _ = load_model_for_inference(setup["checkpoint"], "cpu")
    decoder = FrozenDecoder(load_codec("random"))
    item = dataset[0]
    raw = item["input_latent"] * dataset.latent_std[:, None] + dataset.latent_mean[:, None]
    with torch.no_grad():
        audio = decoder(normalizer.denormalize(model(normalizer.normalize(raw[None]))))[0, 0].numpy()
    np.testing.assert_allclose(read_wav(first / "continuation.wav"), audio, atol=1e-5)


def test_metrics_json_matches_recomputation(cache_run, file_run):
    from losses import CombinedLoss
    combined = CombinedLoss()
    for out in (cache_run[1], file_run["out"]):
        report = json.loads((out / "metrics.json").read_text())
        assert len(report["examples"]) == 2
        for entry in report["examples"]:
            folder = out / entry["name"]
            load = lambda role: torch.from_numpy(read_wav(folder / f"{role}.wav"))[None, None]   # noqa: E731
            continuation = load("continuation")[..., :SEGMENT_SAMPLES]     # the first segment is scored
            target = load("target")[..., :SEGMENT_SAMPLES]
            _, components = combined(continuation, load("context"), target)
            for name, value in components.items():
                assert entry["metrics"][name] == pytest.approx(float(value), rel=1e-5, abs=1e-7), name
            assert entry["metrics"]["rhythm"] == pytest.approx(
                listening_metrics.rhythm_similarity(continuation, target), abs=1e-9)
            assert entry["metrics"]["chroma"] == pytest.approx(
                listening_metrics.chroma_similarity(continuation, target), abs=1e-9)
        for name, mean in report["mean"].items():
            assert mean == pytest.approx(np.mean([e["metrics"][name] for e in report["examples"]]), rel=1e-9)


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


def test_blind_page_hides_the_key_and_the_key_maps_back(cache_run):
    _, out = cache_run
    links = check_page(out)
    key = json.loads((out / "blind_key.json").read_text())["examples"]
    assert len(key) == 2
    page = (out / "index.html").read_text()
    for name, entry in key.items():
        folder = out / name
        assert {entry["A"], entry["B"]} == set(PLAYED)
        for label in ("A", "B"):
            assert np.array_equal(read_wav(folder / f"{label}.wav"), read_wav(folder / f"{entry[label]}.wav"))
        model_label = entry["model"]
        assert np.array_equal(read_wav(folder / f"{model_label}.wav")[SEGMENT_SAMPLES:],
                              read_wav(folder / "continuation.wav"))
        assert f"{name}/A.wav" in links and f"{name}/B.wav" in links
    # nothing on the page points at (or names) the files that would give the answer away
    for giveaway in ("context_plus_continuation", "context_plus_target", "continuation.wav", "target.wav",
                     "spectrogram.png", "blind_key.json\"", "(model)", "(real)"):
        assert giveaway not in page, giveaway


def test_blind_shuffle_is_seeded():
    examples = [inference_sample.Example(name=f"e{i}", source="", context_latent=torch.zeros(1),
                                         context_audio=torch.zeros(1, 1), target_audio=torch.zeros(1, 1))
                for i in range(40)]
    first = inference_sample.assign_blind_labels(examples, seed=7)
    again = inference_sample.assign_blind_labels(examples, seed=7)
    other = inference_sample.assign_blind_labels(examples, seed=8)
    assert first == again and first != other
    models = [entry["model"] for entry in first.values()]
    assert 5 < models.count("A") < 35        # both orders occur


# ------------------------------------------------------------------------------- generation: files

def test_files_autoregressive_lengths_context_and_continuation(setup, file_run):
    from checkpoint import load_model_for_inference
    from data import load_audio
    assert file_run["code"] == 1                      # two inputs failed ...
    dirs = example_dirs(file_run["out"])
    assert len(dirs) == 2                             # ... and the other two were written
    continuation_samples = round(file_run["continue_seconds"] * SAMPLE_RATE)
    for folder, source in zip(dirs, file_run["sources"]):
        assert source.stem.replace("#", "_") in folder.name
        context = read_wav(folder / "context.wav")
        start_frame, expected = expected_context(load_audio(source), file_run["start"])
        assert np.array_equal(context, expected[0].numpy())        # the real audio of the file
        continuation = read_wav(folder / "continuation.wav")
        assert continuation.shape == (continuation_samples,)
        joined = read_wav(folder / "context_plus_continuation.wav")
        assert joined.shape == (SEGMENT_SAMPLES + continuation_samples,)
        assert np.array_equal(joined[:SEGMENT_SAMPLES], context)
        context_end = (start_frame + SEGMENT_FRAMES) * HOP_LENGTH
        real_after = load_audio(source)[0, context_end: context_end + continuation_samples].numpy()
        assert np.array_equal(read_wav(folder / "target.wav"), real_after)
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


def base_argv(setup, checkpoint, out):
    return ["--checkpoint", checkpoint, "--from_cache", setup["cache"], "--num_samples", 1, "--out_dir", out,
            "--device", "cpu"]


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


def test_mlflow_logs_the_folder_to_the_checkpoint_run(setup, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.create_run(client.create_experiment(f"inference-test-{tmp_path.name}"))
    checkpoint = make_checkpoint(tmp_path / "tracked.pt", setup["manifest"], mlflow_run_id=run.info.run_id,
                                 args={"segment_frames": SEGMENT_FRAMES, "mlflow_tracking_uri": mlflow_server})
    out = tmp_path / "listen"
    code, _, err = run_main(base_argv(setup, checkpoint, out) + ["--mlflow"], capsys)
    assert code == 0, err
    assert "warning" not in err, err
    logged = {item.path for item in client.list_artifacts(run.info.run_id, "samples/listen")}
    assert {"samples/listen/index.html", "samples/listen/metrics.json"} <= logged


def test_mlflow_failure_is_only_a_warning(setup, tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "tracked.pt", setup["manifest"], mlflow_run_id="0" * 32)
    dead = f"http://127.0.0.1:{free_port()}"           # nothing listens there
    argv = base_argv(setup, checkpoint, tmp_path / "out") + ["--mlflow", "--mlflow_tracking_uri", dead]
    code, _, err = run_main(argv, capsys)
    assert code == 0 and "warning: --mlflow" in err, err
    assert (tmp_path / "out" / "index.html").is_file()
