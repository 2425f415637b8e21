"""inference_sample.py on a tiny untrained model and a tiny demo cache (listening_metrics.py alone:
tests/test_listening_metrics.py).

Every comparison is against something computed independently of the code under test: the cache /
the input file for the context audio, a hand-written model -> decoder pass for the continuation,
losses.CombinedLoss on the written WAVs for metrics.json.
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
from codec import FRAME_RATE, HOP_LENGTH, SAMPLE_RATE, FrozenDecoder, encode, load_codec  # noqa: E402
from utils import free_port  # noqa: E402

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
            load = {role: torch.from_numpy(read_wav(folder / f"{role}.wav"))[None, None]
                    for role in ("context", "continuation", "target")}
            continuation = load["continuation"][..., :SEGMENT_SAMPLES]     # the first segment is scored
            target = load["target"][..., :SEGMENT_SAMPLES]
            _, components = combined(continuation, load["context"], target)
            for name, value in components.items():
                assert entry["metrics"][name] == pytest.approx(float(value), rel=1e-5, abs=1e-7), name
            assert entry["metrics"]["rhythm"] == pytest.approx(
                listening_metrics.rhythm_similarity(continuation, target), abs=1e-9)
            assert entry["metrics"]["chroma"] == pytest.approx(
                listening_metrics.chroma_similarity(continuation, target), abs=1e-9)
        for name, mean in report["mean"].items():
            assert mean == pytest.approx(np.mean([e["metrics"][name] for e in report["examples"]]), rel=1e-9)


@pytest.fixture(scope="module")
def hand(setup):
    """The checkpoint's model, its normalisation statistics and the random codec, for recomputing by hand."""
    from checkpoint import load_model_for_inference
    model, normalizer, _ = load_model_for_inference(setup["checkpoint"], "cpu")
    codec = load_codec("random")
    return {"model": model, "mean": normalizer.mean, "std": normalizer.std, "codec": codec,
            "decoder": FrozenDecoder(codec)}


def assert_figures(figures: dict, output: torch.Tensor, context: torch.Tensor, target: torch.Tensor) -> None:
    """The audio figures of `output` [1, 1, N] against context and target, recomputed from their definitions."""
    from losses import CombinedLoss
    _, components = CombinedLoss()(output, context, target)
    for name, value in components.items():
        assert figures[name] == pytest.approx(float(value), rel=1e-4, abs=1e-6), name
    assert figures["loss"] == pytest.approx(figures["rms_target"], rel=1e-12)     # default weights: target 1.0
    rms = lambda audio: float(audio.double().square().mean().sqrt())     # noqa: E731
    assert figures["level"] == pytest.approx(rms(output) / rms(target), rel=1e-4, abs=1e-9)
    assert figures["rhythm"] == pytest.approx(listening_metrics.rhythm_similarity(output, target), abs=1e-5)
    assert figures["chroma"] == pytest.approx(listening_metrics.chroma_similarity(output, target), abs=1e-5)


def test_cache_baselines_match_hand_decoding(setup, cache_run, hand):
    """silence = zeros, repeat = the context's latents decoded, oracle = the next window's latents decoded."""
    from data import ContinuationDataset
    dataset = ContinuationDataset(setup["cache"], "val", SEGMENT_FRAMES)
    report = json.loads((cache_run[1] / "metrics.json").read_text())
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
    from audio_io import load_audio
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
    code, _, err = run_main(["--checkpoint", setup["checkpoint"], "--input", path, "--out_dir", out, "--device", "cpu"],
                            capsys)
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
    import listening_page
    from losses import LOSSES
    page = (cache_run[1] / "index.html").read_text()
    parser = TableRows()
    parser.feed(page)
    assert parser.tables == [["model", "silence", "repeat", "oracle"]] * (1 + 2)   # the mean, then each example
    for component in LOSSES:
        assert f"{component.name} &darr;" in page
    assert "rhythm &uarr;" in page and "chroma &uarr;" in page and "level &rarr;1" in page
    assert set(listening_page.BETTER) == set(listening_page.METRIC_NAMES)


def test_plot_spectrograms_writes_one_png_atomically(tmp_path):
    from plots import plot_spectrograms
    t = np.arange(SAMPLE_RATE // 2) / SAMPLE_RATE
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    rows = [("numpy [N]", tone), ("tensor [1, N]", torch.from_numpy(tone)[None]),
            ("shorter", torch.zeros(SAMPLE_RATE // 4))]
    path = plot_spectrograms(tmp_path / "figure.png", rows, seam_seconds=0.25, window_marks=(0.3,), title="t")
    assert path == tmp_path / "figure.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]          # no temporary file left
    from PIL import Image
    width, height = Image.open(path).size
    assert width == 800 and height > 3 * 150                               # three stacked rows
    with pytest.raises(ValueError):
        plot_spectrograms(tmp_path / "empty.png", [])
    assert not (tmp_path / "empty.png").exists()


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
    from audio_io import load_audio
    from checkpoint import load_model_for_inference
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
