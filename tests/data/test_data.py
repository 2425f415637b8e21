"""Tests of audio loading, cache preparation, the continuation dataset and the demo corpus.

Everything runs on tiny files written into tmp_path with the fixed-seed 'random' codec on CPU.
References are computed independently (soundfile + codec.encode + numpy), never by the code under test.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio
from torch.utils.data import DataLoader, DistributedSampler

from music_continuation import codec
from music_continuation.codec import HOP_LENGTH, LATENT_DIM, SAMPLE_RATE
from music_continuation.data import audio_io, demo_corpus, scan, stats
from music_continuation.data import cache as data
from music_continuation.data import encode as encoding
from music_continuation.data import prepare as prepare_data
from music_continuation.data.journal import read_journal, read_skipped

REPO = Path(__file__).resolve().parents[2]
MIN_SECONDS = 0.5          # tiny tracks: 0.5 s is one example of 2 x 18 frames
SEGMENT = 10               # frames per input window in the dataset tests


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_good_files(folder: Path) -> None:
    """Mixed formats, rates and channel counts, one in a sub-folder."""
    left, right = sine(440, 1.0, 44_100, 0.5), sine(440, 1.0, 44_100, 0.25)
    soundfile.write(folder / "stereo44.wav", np.stack([left, right], axis=1), 44_100, subtype="FLOAT")
    (folder / "sub").mkdir()
    soundfile.write(folder / "sub" / "mono16.flac", sine(300, 1.2, 16_000, 0.4), 16_000)
    plan = demo_corpus.plan_track(0, seed=7)
    music = demo_corpus.render_track(plan, 2.0, SAMPLE_RATE, seed=7).mean(axis=1)
    soundfile.write(folder / "music.wav", music.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    soundfile.write(folder / "extra.ogg", sine(660, 1.0, SAMPLE_RATE), SAMPLE_RATE, format="OGG", subtype="VORBIS")
    soundfile.write(folder / "extra.mp3", sine(220, 1.0, SAMPLE_RATE), SAMPLE_RATE, format="MP3",
                    subtype="MPEG_LAYER_III")


BAD_FILES = {   # name -> a word the skip reason must contain
    "corrupt.wav": "unreadable",
    "empty.wav": "empty",
    "noframes.wav": "empty",
    "short.wav": "too short",
    "notes.txt": "not an audio file",
    "fake.flac": "unreadable",
}


def write_bad_files(folder: Path) -> None:
    rng = np.random.default_rng(0)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + rng.bytes(300))
    (folder / "empty.wav").write_bytes(b"")
    soundfile.write(folder / "noframes.wav", np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    soundfile.write(folder / "short.wav", sine(440, 0.1, SAMPLE_RATE), SAMPLE_RATE)
    (folder / "notes.txt").write_text("not audio\n")
    (folder / "fake.flac").write_text("this is text pretending to be a flac file\n" * 20)


@pytest.fixture(scope="module", autouse=True)
def single_threaded_torch():
    """The reference encodes here are tiny; one intra-op thread is much faster on shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A cache made from five good files and six bad ones (prepared once for the whole module)."""
    root = tmp_path_factory.mktemp("corpus")
    audio_dir = root / "audio"
    audio_dir.mkdir()
    write_good_files(audio_dir)
    write_bad_files(audio_dir)
    cache = root / "cache"
    # float32, so the assertions below compare the stored arrays exactly; `compact` checks the default layout
    manifest = prepare_data.prepare(audio_dir, cache, encodec_weights="random", val_fraction=0.34, seed=0,
                                    device="cpu", min_seconds=MIN_SECONDS, workers=2, progress=False,
                                    cache_dtype="float32")
    return audio_dir, cache, manifest


@pytest.fixture(scope="module")
def random_codec():
    return codec.load_codec("random", "cpu")


def track_by_source(manifest: dict, source: str) -> dict:
    return next(track for track in manifest["tracks"] if track["source"] == source)


def cached_arrays(cache: Path, track: dict) -> tuple[np.ndarray, np.ndarray]:
    folder = cache / "tracks"
    return np.load(folder / f"{track['id']}.latents.npy"), np.load(folder / f"{track['id']}.audio.npy")


# --------------------------------------------------------------------------------------- loading

def test_load_audio_mixes_to_mono_and_resamples_to_24k(tmp_path):
    left, right = sine(440, 1.0, 44_100, 0.5), sine(440, 1.0, 44_100, 0.25)
    soundfile.write(tmp_path / "s.wav", np.stack([left, right], axis=1), 44_100, subtype="FLOAT")
    soundfile.write(tmp_path / "m.wav", sine(300, 1.2, 16_000, 0.4), 16_000, subtype="FLOAT")

    stereo = audio_io.load_audio(tmp_path / "s.wav")
    mono = audio_io.load_audio(tmp_path / "m.wav")
    assert stereo.shape == (1, 24_000) and stereo.dtype == torch.float32
    assert mono.shape == (1, 28_800)
    # the mean of the channels is a 440 Hz sine of amplitude 0.375; compare away from the edges
    middle = slice(2_000, -2_000)
    np.testing.assert_allclose(stereo[0, middle].numpy(), sine(440, 1.0, SAMPLE_RATE, 0.375)[middle], atol=2e-3)
    np.testing.assert_allclose(mono[0, middle].numpy(), sine(300, 1.2, SAMPLE_RATE, 0.4)[middle], atol=2e-3)


def test_load_audio_errors_name_the_file(tmp_path):
    with pytest.raises(audio_io.AudioLoadError, match="missing.wav: unreadable"):
        audio_io.load_audio(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("hello")
    with pytest.raises(audio_io.AudioLoadError, match="text.wav: "):
        audio_io.load_audio(tmp_path / "text.wav")


def test_cached_tracks_are_24k_mono_with_whole_frames(prepared):
    _, cache, manifest = prepared
    expected_samples = {"stereo44.wav": 24_000, "sub/mono16.flac": 28_800, "music.wav": 48_000,
                        "extra.ogg": 24_000}
    assert {t["source"] for t in manifest["tracks"]} == set(expected_samples) | {"extra.mp3"}
    for track in manifest["tracks"]:
        latents, audio = cached_arrays(cache, track)
        frames = track["frames"]
        if track["source"] in expected_samples:
            assert frames == expected_samples[track["source"]] // HOP_LENGTH
        else:  # an MP3 decodes to about its length (encoder padding varies): within 0.1 s
            assert abs(frames - 75) <= 8
        assert latents.shape == (LATENT_DIM, frames) and latents.dtype == np.float32
        assert audio.shape == (frames * HOP_LENGTH,) and audio.dtype == np.float32
        assert track["duration"] == pytest.approx(frames / codec.FRAME_RATE)
    assert manifest["complete"] and manifest["sample_rate"] == SAMPLE_RATE
    assert manifest["hop_length"] == HOP_LENGTH and manifest["latent_dim"] == LATENT_DIM
    assert manifest["settings"]["min_seconds"] == MIN_SECONDS and manifest["encodec_weights"] == "random"
    # the stored audio of the 24 kHz file is exactly its samples (no resampling applied)
    track = track_by_source(manifest, "music.wav")
    reference, _ = soundfile.read(prepared[0] / "music.wav", dtype="float32")
    np.testing.assert_array_equal(cached_arrays(cache, track)[1], reference[: track["frames"] * HOP_LENGTH])


# --------------------------------------------------------------------------------------- dataset

def reference_latents(random_codec, audio: np.ndarray) -> np.ndarray:
    return codec.encode(random_codec, torch.from_numpy(audio).reshape(1, 1, -1))[0].numpy()


def normalise(latents: np.ndarray, manifest: dict) -> np.ndarray:
    mean = np.asarray(manifest["latent_mean"], dtype=np.float32)[:, None]
    std = np.asarray(manifest["latent_std"], dtype=np.float32)[:, None]
    return (latents - mean) / std


def test_target_window_follows_input_window(prepared, random_codec):
    audio_dir, cache, manifest = prepared
    track = track_by_source(manifest, "music.wav")
    dataset = data.ContinuationDataset(cache, track["split"], SEGMENT)
    samples, _ = soundfile.read(audio_dir / "music.wav", dtype="float32")
    whole = normalise(reference_latents(random_codec, samples), manifest)

    starts = []
    for index in range(len(dataset)):
        track_id, start = dataset.window_location(index)
        if track_id != track["id"]:
            continue
        starts.append(start)
        item = dataset[index]
        n, first = SEGMENT * HOP_LENGTH, start * HOP_LENGTH
        np.testing.assert_array_equal(item["input_audio"][0].numpy(), samples[first: first + n])
        np.testing.assert_array_equal(item["target_audio"][0].numpy(), samples[first + n: first + 2 * n])
        np.testing.assert_allclose(item["input_latent"].numpy(), whole[:, start: start + SEGMENT], atol=1e-3)
        np.testing.assert_allclose(item["target_latent"].numpy(), whole[:, start + SEGMENT: start + 2 * SEGMENT],
                                   atol=1e-3)
        if start == 0:
            # the encoder is causal: encoding just input+target audio gives the same frames
            both = torch.cat([item["input_audio"], item["target_audio"]], dim=-1).numpy()[0]
            joint = normalise(reference_latents(random_codec, both), manifest)
            np.testing.assert_allclose(item["input_latent"].numpy(), joint[:, :SEGMENT], atol=1e-3)
            np.testing.assert_allclose(item["target_latent"].numpy(), joint[:, SEGMENT:], atol=1e-3)
    assert starts == list(range(0, track["frames"] - 2 * SEGMENT + 1, SEGMENT))


def test_unity_mode_target_is_input(prepared):
    _, cache, _ = prepared
    real = data.ContinuationDataset(cache, "train", SEGMENT)
    unity = data.ContinuationDataset(cache, "train", SEGMENT, unity_test=True)
    assert len(unity) == len(real)
    for index in range(0, len(unity), 3):
        item, reference = unity[index], real[index]
        assert torch.equal(item["target_latent"], item["input_latent"])
        assert torch.equal(item["target_audio"], item["input_audio"])
        assert torch.equal(item["input_latent"], reference["input_latent"])
        assert not torch.equal(reference["target_latent"], reference["input_latent"])


def test_windows_stride_and_track_boundaries(prepared):
    _, cache, manifest = prepared
    stride = 7
    dataset = data.ContinuationDataset(cache, "train", SEGMENT, stride_frames=stride)
    frames = {t["id"]: t["frames"] for t in manifest["tracks"] if t["split"] == "train"}
    expected = sorted((tid, s) for tid, f in frames.items() for s in range(0, f - 2 * SEGMENT + 1, stride))
    found = sorted(dataset.window_location(i) for i in range(len(dataset)))
    assert found == expected
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_split_is_by_track_without_leakage(prepared):
    _, cache, manifest = prepared
    splits = {t["id"]: t["split"] for t in manifest["tracks"]}
    assert set(splits.values()) == {"train", "val"}
    assert sum(s == "val" for s in splits.values()) == 2          # round(0.34 * 5)
    for split in ("train", "val"):
        dataset = data.ContinuationDataset(cache, split, SEGMENT)
        used = {dataset.window_location(i)[0] for i in range(len(dataset))}
        assert used == {tid for tid, s in splits.items() if s == split}
    # reproducible from the seed and independent of the order the files were found in
    ids = sorted(splits)
    assert stats.split_tracks(ids[::-1], 0.34, 0) == splits
    assert stats.split_tracks(ids, 0.0, 0) == {tid: "train" for tid in ids}
    assert list(stats.split_tracks(ids[:2], 0.01, 3).values()).count("val") == 1   # at least one


def test_normalisation_statistics_match_numpy(prepared):
    _, cache, manifest = prepared
    train = [t for t in manifest["tracks"] if t["split"] == "train"]
    frames = np.concatenate([cached_arrays(cache, t)[0].astype(np.float64) for t in train], axis=1)
    np.testing.assert_allclose(manifest["latent_mean"], frames.mean(axis=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(manifest["latent_std"], frames.std(axis=1), rtol=1e-9)

    dataset = data.ContinuationDataset(cache, "train", SEGMENT)
    torch.testing.assert_close(dataset.latent_mean, torch.tensor(frames.mean(axis=1), dtype=torch.float32))
    track_id, start = dataset.window_location(5)
    raw = cached_arrays(cache, next(t for t in train if t["id"] == track_id))[0][:, start: start + SEGMENT]
    normaliser = data.LatentNormalizer(dataset.latent_mean, dataset.latent_std)
    expected = (raw - frames.mean(axis=1)[:, None]) / frames.std(axis=1)[:, None]
    np.testing.assert_allclose(dataset[5]["input_latent"].numpy(), expected, atol=1e-4)
    torch.testing.assert_close(normaliser.normalize(torch.from_numpy(raw)[None])[0], dataset[5]["input_latent"])
    torch.testing.assert_close(normaliser.denormalize(dataset[5]["input_latent"][None])[0], torch.from_numpy(raw),
                               rtol=1e-5, atol=1e-7)


def test_std_is_clamped_away_from_zero(tmp_path):
    (tmp_path / "tracks").mkdir()
    latents = np.random.default_rng(0).standard_normal((LATENT_DIM, 40)).astype(np.float32)
    latents[3] = 0.25                                   # a constant channel
    np.save(tmp_path / "tracks" / "t.latents.npy", latents)
    mean, std = stats.latent_statistics(tmp_path, [{"id": "t"}])
    assert mean[3] == pytest.approx(0.25) and std[3] == stats.STD_FLOOR
    assert std[0] == pytest.approx(latents[0].astype(np.float64).std())


def test_reading_is_memory_mapped_and_lazy(prepared):
    _, cache, _ = prepared
    dataset = data.ContinuationDataset(cache, "train", SEGMENT)
    assert not dataset._open_tracks                       # nothing is opened before the first item
    for index in range(len(dataset)):
        dataset[index]
    maps = list(dataset._open_tracks.values())
    assert maps and all(isinstance(array, np.memmap) for pair in maps for array in pair)
    # no attribute holds track data: only small index arrays / statistics
    for value in vars(dataset).values():
        if isinstance(value, (np.ndarray, torch.Tensor)):
            size = value.size if isinstance(value, np.ndarray) else value.numel()
            assert size <= LATENT_DIM
    clone = pickle.loads(pickle.dumps(dataset))            # what a DataLoader worker receives
    assert not clone._open_tracks and len(pickle.dumps(dataset)) < 200_000
    torch.testing.assert_close(clone[1], dataset[1])


def test_dataloader_workers_with_distributed_sampler(prepared):
    _, cache, _ = prepared
    dataset = data.ContinuationDataset(cache, "train", SEGMENT)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        loader = DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=2)
        indices = list(sampler)
        batches = list(loader)
        assert sum(len(b["input_latent"]) for b in batches) == len(indices)
        for batch_number, batch in enumerate(batches):
            chunk = indices[batch_number * 3: batch_number * 3 + 3]
            assert batch["input_latent"].shape == (len(chunk), LATENT_DIM, SEGMENT)
            assert batch["target_audio"].shape == (len(chunk), 1, SEGMENT * HOP_LENGTH)
            for row, index in enumerate(chunk):
                torch.testing.assert_close(batch["target_latent"][row], dataset[index]["target_latent"])
        seen.extend(indices)
    assert set(seen) == set(range(len(dataset)))


def test_dataset_errors_are_clear(prepared, tmp_path):
    _, cache, _ = prepared
    with pytest.raises(ValueError, match="no window of 2 x 1000 frames"):
        data.ContinuationDataset(cache, "val", 1000)
    with pytest.raises(data.CacheError, match="manifest.json: no such file"):
        data.ContinuationDataset(tmp_path, "train", SEGMENT)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(data.CacheError, match="manifest.json: not a readable JSON"):
        data.read_manifest(tmp_path)
    with pytest.raises(ValueError, match="split"):
        data.ContinuationDataset(cache, "test", SEGMENT)


# --------------------------------------------------------------------------------------- bad input

def test_bad_files_are_skipped_and_reported(prepared):
    _, cache, manifest = prepared
    reasons = {entry["source"]: entry["reason"] for entry in read_skipped(cache)}
    assert set(reasons) == set(BAD_FILES)
    for name, word in BAD_FILES.items():
        assert word in reasons[name], (name, reasons[name])
        assert "\n" not in reasons[name]
    assert sum(manifest["skipped_files"].values()) == len(BAD_FILES)


def test_no_usable_audio_is_one_line_and_training_says_why(tmp_path, capsys):
    """Nothing usable: one summary line and one error line (each file's reason only with --verbose, and in
    CACHE/skipped.tsv); the cache is then refused by training with what happened, not with 'resume it'."""
    audio_dir, cache = tmp_path / "bad", tmp_path / "cache"
    audio_dir.mkdir()
    write_bad_files(audio_dir)
    argv = ["--audio_dir", str(audio_dir), "--out_dir", str(cache), "--encodec_weights", "random", "--device",
            "cpu", "--min_seconds", "0.5"]
    code = prepare_data.main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if "%|" not in line and line.strip()]
    assert code != 0 and len(lines) == 2, lines
    assert lines[0].startswith(f"skipped {len(BAD_FILES)} of {len(BAD_FILES)} files: ")
    assert lines[0].endswith(f"each file and why: {cache / 'skipped.tsv'}; --verbose names each as it is skipped")
    assert lines[1].startswith(f"error: --audio_dir {audio_dir}: no usable audio ({len(BAD_FILES)} files found: ")
    assert {row["source"] for row in read_skipped(cache)} == set(BAD_FILES)
    with pytest.raises(data.CacheError) as error:
        data.ContinuationDataset(cache, "train", SEGMENT)
    assert f"prepare_data.py found no usable audio in {audio_dir}" in str(error.value)
    assert "resume" not in str(error.value) and "put audio files there" in str(error.value)

    (cache / "skipped.tsv").unlink()       # --verbose: one warning per file, read again (nothing to carry)
    assert prepare_data.main([*argv, "--verbose"]) != 0
    err = capsys.readouterr().err
    for name in BAD_FILES:   # one warning line per file: "PATH: reason"
        assert any(line.startswith(f"warning: {audio_dir / name}: ") for line in err.splitlines()), name
    assert prepare_data.main(["--audio_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "c2"),
                              "--encodec_weights", "random"]) != 0
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main(["--out_dir", str(tmp_path / "c3")])
    assert exit_info.value.code != 0 and "--audio_dir is required" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_data, "prepare", interrupted)
    assert prepare_data.main(["--audio_dir", str(tmp_path), "--out_dir", str(tmp_path / "cache")]) == 130
    assert capsys.readouterr().err.splitlines() == [
        "interrupted: the tracks finished so far are kept; run the same command again to resume"]


# --------------------------------------------------------------------------------------- resume

class CountingEncode:
    """Wraps codec.encode, counting calls; optionally raises KeyboardInterrupt at call number `fail_at`."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, model, audio):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return codec.encode(model, audio)


def small_prepare(audio_dir: Path, cache: Path) -> dict:
    # one worker: the interrupted run then stops at a known track
    return prepare_data.prepare(audio_dir, cache, encodec_weights="random", device="cpu",
                                min_seconds=MIN_SECONDS, workers=1, progress=False)


def test_interrupted_run_resumes_and_new_files_are_picked_up(tmp_path, monkeypatch):
    audio_dir, cache = tmp_path / "audio", tmp_path / "cache"
    audio_dir.mkdir()
    for number, freq in enumerate((200, 300, 400)):
        soundfile.write(audio_dir / f"t{number}.wav", sine(freq, 0.6, SAMPLE_RATE), SAMPLE_RATE)

    crash = CountingEncode(fail_at=2)                      # Ctrl-C while encoding the second track
    monkeypatch.setattr(encoding, "encode", crash)
    with pytest.raises(KeyboardInterrupt):
        small_prepare(audio_dir, cache)
    partial = read_journal(data.shard_progress_path(cache, 0, 1))     # no manifest before the merge
    assert [t["source"] for t in partial["tracks"]] == ["t0.wav"] and not partial["complete"]
    with pytest.raises(data.CacheError, match="preparation has not finished"):
        data.ContinuationDataset(cache, "train", SEGMENT)

    resumed = CountingEncode()
    monkeypatch.setattr(encoding, "encode", resumed)
    manifest = small_prepare(audio_dir, cache)
    assert resumed.calls == 2 and manifest["complete"] and len(manifest["tracks"]) == 3
    arrays = sorted((cache / "tracks").iterdir())
    # latents, audio and moments of each track, and no temporary files left behind
    assert [path.name for path in arrays] == sorted(f"{track['id']}.{kind}.npy" for track in manifest["tracks"]
                                                    for kind in ("latents", "audio", "stats"))
    mtimes = {path: path.stat().st_mtime_ns for path in arrays}

    again = CountingEncode()
    monkeypatch.setattr(encoding, "encode", again)
    assert small_prepare(audio_dir, cache)["tracks"] == manifest["tracks"]
    assert again.calls == 0 and {p: p.stat().st_mtime_ns for p in arrays} == mtimes

    soundfile.write(audio_dir / "t3.wav", sine(500, 0.6, SAMPLE_RATE), SAMPLE_RATE)
    new = CountingEncode()
    monkeypatch.setattr(encoding, "encode", new)
    grown = small_prepare(audio_dir, cache)
    assert new.calls == 1 and len(grown["tracks"]) == 4
    assert {p: p.stat().st_mtime_ns for p in arrays} == mtimes


def test_cache_from_another_codec_is_refused_and_kept(tmp_path, monkeypatch):
    audio_dir, cache = tmp_path / "audio", tmp_path / "cache"
    audio_dir.mkdir()
    soundfile.write(audio_dir / "a.wav", sine(200, 0.6, SAMPLE_RATE), SAMPLE_RATE)
    small_prepare(audio_dir, cache)
    before = (cache / "manifest.json").read_bytes()
    files_before = {path.name: path.read_bytes() for path in (cache / "tracks").iterdir()}
    assert len(files_before) == 3                              # latents, audio, moments of a.wav

    def other_codec(weights, device):
        model = codec.load_codec("random", device)
        with torch.no_grad():
            next(iter(model.encoder.parameters())).add_(1e-3)   # different weights, same architecture
        return model

    monkeypatch.setattr(prepare_data, "load_codec", other_codec)
    soundfile.write(audio_dir / "b.wav", sine(300, 0.6, SAMPLE_RATE), SAMPLE_RATE)
    with pytest.raises(codec.CodecLoadError, match="made with EnCodec weights"):
        small_prepare(audio_dir, cache)
    assert (cache / "manifest.json").read_bytes() == before
    assert {path.name: path.read_bytes() for path in (cache / "tracks").iterdir()} == files_before


@pytest.mark.slow
def test_random_codec_is_identical_across_processes(prepared, random_codec):
    script = "from music_continuation import codec; print(codec.codec_fingerprint(codec.load_codec('random')))"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": "123"})
    other_process = result.stdout.strip().splitlines()[-1]
    assert other_process == codec.codec_fingerprint(random_codec) == prepared[2]["codec_fingerprint"]


# --------------------------------------------------------------------------------------- demo corpus

def test_demo_corpus_is_deterministic_and_not_rewritten(tmp_path):
    first = demo_corpus.write_corpus(tmp_path / "a", num_tracks=2, seconds=1.0, seed=0)
    second = demo_corpus.write_corpus(tmp_path / "b", num_tracks=2, seconds=1.0, seed=0)
    assert [p.name for p in first] == [p.name for p in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))
    assert first[0].read_bytes() != first[1].read_bytes()
    other_seed = demo_corpus.write_corpus(tmp_path / "c", num_tracks=2, seconds=1.0, seed=1)
    assert other_seed[0].read_bytes() != first[0].read_bytes()
    mtimes = [p.stat().st_mtime_ns for p in first]
    demo_corpus.write_corpus(tmp_path / "a", num_tracks=2, seconds=1.0, seed=0)
    assert [p.stat().st_mtime_ns for p in first] == mtimes
    info = soundfile.info(first[1])                           # the second file is 44.1 kHz stereo
    assert (info.samplerate, info.channels) == (44_100, 2)
    audio, _ = soundfile.read(first[0])
    assert 0.5 < np.abs(audio).max() <= 1.0


@pytest.mark.parametrize("index", [0, 3, 7])
def test_demo_rhythm_repeats_every_bar_at_the_track_tempo(index):
    """Onset-strength autocorrelation: within 0.6..1.4 bars its peak is at one bar (4 beats at plan.bpm)."""
    plan = demo_corpus.plan_track(index, seed=0)
    audio = demo_corpus.render_track(plan, 6.0, SAMPLE_RATE, seed=0).mean(axis=1)
    hop = 120                                                   # 5 ms envelope frames
    envelope = np.sqrt(np.mean(audio[: len(audio) // hop * hop].reshape(-1, hop) ** 2, axis=1))
    onset = np.maximum(np.diff(envelope), 0)
    onset -= onset.mean()
    correlation = np.correlate(onset, onset, mode="full")[len(onset) - 1:]
    bar = 4 * 60.0 / plan.bpm * SAMPLE_RATE / hop              # one bar in envelope frames
    low, high = int(0.6 * bar), int(1.4 * bar)
    peak = low + int(np.argmax(correlation[low:high]))
    assert abs(peak - bar) <= 0.01 * bar


def test_prepare_demo_makes_a_usable_cache(tmp_path):
    manifest = prepare_data.prepare_demo(tmp_path / "demo", num_tracks=2, seconds=1.0, device="cpu", progress=False)
    assert manifest["complete"] and len(manifest["tracks"]) == 2 and not manifest["skipped_files"]
    assert manifest["encodec_weights"] == "random"
    assert {t["split"] for t in manifest["tracks"]} == {"train", "val"}
    assert all(t["frames"] == 75 for t in manifest["tracks"])
    item = data.ContinuationDataset(tmp_path / "demo", "train", 30)[0]
    assert item["input_latent"].shape == (LATENT_DIM, 30)


def test_demo_cache_of_another_random_codec_is_rebuilt(tmp_path):
    out = tmp_path / "demo"
    prepare_data.prepare_demo(out, num_tracks=2, seconds=1.0, device="cpu", progress=False)
    manifest_file = data.manifest_path(out)
    stale = json.loads(manifest_file.read_text())
    stale["codec_fingerprint"] = "0" * 16                  # as if encoded by an older random codec
    manifest_file.write_text(json.dumps(stale))
    rebuilt = prepare_data.prepare_demo(out, num_tracks=2, seconds=1.0, device="cpu", progress=False)
    assert rebuilt["codec_fingerprint"] == prepare_data.random_codec_fingerprint()
    assert rebuilt["complete"] and len(rebuilt["tracks"]) == 2
    assert rebuilt["settings"]["last_run"]["encoded_tracks"] == 2      # re-encoded, not reused


# --------------------------------------------------------------------------------------- input robustness

def test_symlink_loops_and_links_reach_each_real_file_once(tmp_path, capsys):
    audio_dir = tmp_path / "audio"
    (audio_dir / "a").mkdir(parents=True)
    (audio_dir / "b").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    for number, path in enumerate([audio_dir / "a" / "x.wav", audio_dir / "b" / "y.wav", outside / "o.wav"]):
        soundfile.write(path, sine(200 + 100 * number, 0.6, SAMPLE_RATE), SAMPLE_RATE)
    (audio_dir / "a" / "loop").symlink_to("..")                  # a loop back to the root
    (audio_dir / "aaa").symlink_to(audio_dir)                     # walked first (sorted), yet not used
    (audio_dir / "b" / "up").symlink_to("../a")                   # a folder of the tree again
    (audio_dir / "z_link.wav").symlink_to("a/x.wav")              # a file of the tree again
    os.link(audio_dir / "b" / "y.wav", audio_dir / "b" / "y_hard.wav")
    (audio_dir / "ext").symlink_to(outside)                       # outside the tree: followed once...
    (audio_dir / "ext2").symlink_to(outside)                      # ...not twice
    (outside / "back").symlink_to(audio_dir)                      # and a loop through it

    files, duplicates = scan.find_files(audio_dir)
    assert [p.relative_to(audio_dir).as_posix() for p in files] == ["a/x.wav", "b/y.wav", "ext/o.wav"]
    skipped = ["aaa", "ext2", "z_link.wav", "a/loop", "b/up", "b/y_hard.wav", "ext/back"]
    assert duplicates == len(skipped)

    manifest = small_prepare(audio_dir, tmp_path / "cache")
    assert sorted(t["source"] for t in manifest["tracks"]) == ["a/x.wav", "b/y.wav", "ext/o.wav"]
    assert manifest["duplicates_skipped"] == len(skipped) and not manifest["skipped_files"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "already found" in line]
    assert len(warnings) == 1 and f"skipped {len(skipped)} paths" in warnings[0]


def test_huge_finite_samples_are_skipped_and_statistics_stay_finite(tmp_path, capsys):
    """3e38 is a finite float32, but mixing, resampling or the encoder overflow it to inf/NaN."""
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    soundfile.write(audio_dir / "good.wav", sine(200, 0.6, SAMPLE_RATE), SAMPLE_RATE)
    huge = np.full(int(0.6 * SAMPLE_RATE), 3e38, dtype=np.float32)
    huge[::2] *= -1
    soundfile.write(audio_dir / "huge_mono.wav", huge, SAMPLE_RATE, subtype="FLOAT")          # encoder overflows
    soundfile.write(audio_dir / "huge_stereo.wav", np.stack([huge, huge], 1), SAMPLE_RATE, subtype="FLOAT")  # mix
    soundfile.write(audio_dir / "huge_44k.wav", np.full(26_460, 3e38, np.float32), 44_100, subtype="FLOAT")
    manifest = small_prepare(audio_dir, tmp_path / "cache")
    assert [t["source"] for t in manifest["tracks"]] == ["good.wav"]
    reasons = {entry["source"]: entry["reason"] for entry in read_skipped(tmp_path / "cache")}
    assert set(reasons) == {"huge_mono.wav", "huge_stereo.wav", "huge_44k.wav"}
    assert "latents are not finite" in reasons["huge_mono.wav"]
    assert "infinite samples after mixing the channels" in reasons["huge_stereo.wav"]
    assert f"infinite samples after resampling to {SAMPLE_RATE} Hz" in reasons["huge_44k.wav"]
    assert np.isfinite(manifest["latent_mean"]).all() and np.isfinite(manifest["latent_std"]).all()
    assert not list((tmp_path / "cache" / "tracks").glob(".*"))          # no temporaries of the skipped tracks
    # load_audio (used on --input files by inference) refuses them the same way
    with pytest.raises(audio_io.AudioLoadError, match="huge_stereo.wav: corrupt"):
        audio_io.load_audio(audio_dir / "huge_stereo.wav")


def test_statistics_never_hold_nan(tmp_path, prepared):
    (tmp_path / "tracks").mkdir()
    latents = np.ones((LATENT_DIM, 40), dtype=np.float32)
    latents[5, 7] = np.nan
    np.save(tmp_path / "tracks" / "t.latents.npy", latents)
    with pytest.raises(data.CacheError, match="t.latents.npy.*not finite"):
        stats.latent_statistics(tmp_path, [{"id": "t", "frames": 40}])
    # a manifest with NaN statistics (written by an older version) is refused with one line
    _, cache, manifest = prepared
    manifest = dict(manifest, latent_std=[float("nan")] * LATENT_DIM)
    with pytest.raises(data.CacheError, match="statistics are not finite"):
        data.require_complete(manifest, cache)


def test_stale_temporaries_of_a_killed_run_are_deleted(reuse_random_codec, tmp_path, capsys):
    """A run holds its shard's lock, so every temporary of its own tracks and progress file is a killed run's, whatever
    process or host wrote it (the PID in the name is not looked at); another shard's temporaries are kept."""
    audio_dir, cache = tmp_path / "audio", tmp_path / "cache"
    audio_dir.mkdir()
    soundfile.write(audio_dir / "a.wav", sine(200, 0.6, SAMPLE_RATE), SAMPLE_RATE)
    small_prepare(audio_dir, cache)
    pid = os.getpid()                                         # a running process: still stale
    ours, theirs = "0" * 16, "0" * 15 + "1"                   # track ids of shard 0 and shard 1 of 2
    stale = [cache / "tracks" / f".{ours}.latents.tmp-{pid}.npy", cache / "tracks" / f".{ours}.audio.tmp-1.npy",
             cache / "shards" / f".shard-0-of-2.tmp-{pid}.json"]
    kept = [cache / "tracks" / f".{theirs}.latents.tmp-{pid}.npy", cache / "shards" / ".shard-1-of-2.tmp-1.json",
            cache / "tracks" / ".notes"]                       # another shard's, and not a temporary
    for path in (*stale, *kept):
        path.write_bytes(b"partial")
    capsys.readouterr()
    assert prepare_data.prepare(audio_dir, cache, encodec_weights="random", device="cpu", min_seconds=MIN_SECONDS,
                                workers=1, progress=False, shard=(0, 2)) is None        # shard 1 has not run
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
    assert "deleted 3 temporary files" in capsys.readouterr().err
    # the merge deletes a killed merge's manifest temporary (the merge lock makes it the only manifest writer)
    manifest_tmp = cache / f".manifest.tmp-{pid}.json"
    manifest_tmp.write_bytes(b"partial")
    prepare_data.prepare(audio_dir, cache, encodec_weights="random", device="cpu", min_seconds=MIN_SECONDS,
                         workers=1, progress=False, shard=(1, 2))
    assert not manifest_tmp.exists() and data.read_manifest(cache)["complete"]


def test_long_tracks_stream_in_blocks_like_whole_files(tmp_path, monkeypatch, random_codec):
    """Tracks longer than a block are read, resampled and encoded block by block; the result matches the
    whole-file path: resampling within float32 rounding, encoding exactly codec.encode's chunked result."""
    block, context = 30, 10                                     # frames: 0.4 s blocks, 0.13 s warm-up
    monkeypatch.setattr(encoding, "BLOCK_FRAMES", block)
    monkeypatch.setattr(encoding, "ENCODER_CONTEXT_FRAMES", context)
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    rng = np.random.default_rng(3)
    sources = {"s44.wav": (44_100, 2), "m16.wav": (16_000, 1), "m24.wav": (SAMPLE_RATE, 1)}
    for name, (rate, channels) in sources.items():
        noise = 0.1 * rng.standard_normal((int(3.1 * rate), channels))
        soundfile.write(audio_dir / name, (noise + sine(330, 3.1, rate)[:, None]).astype(np.float32), rate,
                        subtype="FLOAT")
    manifest = prepare_data.prepare(audio_dir, tmp_path / "cache", encodec_weights="random", device="cpu",
                                    min_seconds=MIN_SECONDS, workers=1, progress=False, cache_dtype="float32")
    for name, (rate, _) in sources.items():
        samples, _ = soundfile.read(audio_dir / name, dtype="float32", always_2d=True)
        whole = torch.from_numpy(samples.mean(axis=1, dtype=np.float32))[None]
        if rate != SAMPLE_RATE:
            whole = torchaudio.functional.resample(whole, rate, SAMPLE_RATE)
        track = track_by_source(manifest, name)
        assert track["frames"] == whole.shape[-1] // HOP_LENGTH > 5 * block
        latents, audio = cached_arrays(tmp_path / "cache", track)
        whole = whole[:, : track["frames"] * HOP_LENGTH]
        # conv1d may sum a filter's taps (at most 2 x width + period = 16 here, weights summing to ~1.2) in
        # another order per block: at most taps * eps32 * peak apart; exact at 24 kHz (no resampling)
        taps = 16
        tolerance = 0.0 if rate == SAMPLE_RATE else taps * np.finfo(np.float32).eps * float(whole.abs().max())
        np.testing.assert_allclose(audio, whole[0].numpy(), rtol=0, atol=tolerance)
        # the encoder sees exactly what codec.encode's own chunking gives it, on the stored audio
        reference = codec.encode(random_codec, torch.from_numpy(audio).view(1, 1, -1),
                                 chunk_seconds=(block + 0.5) / codec.FRAME_RATE,
                                 context_seconds=(context + 0.5) / codec.FRAME_RATE)[0].numpy()
        np.testing.assert_array_equal(latents, reference)
        mean, m2 = np.load(tmp_path / "cache" / "tracks" / f"{track['id']}.stats.npy")
        np.testing.assert_allclose(mean, latents.astype(np.float64).mean(axis=1), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m2, ((latents - mean[:, None]) ** 2).sum(axis=1), rtol=1e-9)


def test_reading_in_blocks_holds_one_block_at_a_time(tmp_path):
    rate, seconds, block_seconds = 44_100, 5.0, 0.25
    soundfile.write(tmp_path / "a.wav", sine(440, seconds, rate), rate, subtype="FLOAT")
    with audio_io.open_audio(tmp_path / "a.wav") as handle:
        sizes = [len(block) for block in audio_io.iter_mono_blocks(handle, block_seconds)]
    assert sum(sizes) == audio_io.load_audio(tmp_path / "a.wav").shape[-1] == 120_000
    assert len(sizes) == seconds / block_seconds and max(sizes) == block_seconds * SAMPLE_RATE


# --------------------------------------------------------------------------------------- header lengths

MP3_RATE = 22_050              # like the Debian soundtrack MP3s of the issue: stereo at 22.05 kHz
MP3_FRAME = 576                # samples per MPEG-2 layer III frame (rates below 32 kHz)


def write_mp3(path: Path, seconds: float, freq: float) -> Path:
    """A real stereo MP3 (libmp3lame through PyAV, no ID3 tag); LAME writes an Info header counting its frames."""
    import av
    rng = np.random.default_rng(int(freq))
    samples = np.stack([sine(freq, seconds, MP3_RATE, 0.4), sine(freq * 1.5, seconds, MP3_RATE, 0.2)])
    samples += 0.02 * rng.standard_normal(samples.shape).astype(np.float32)
    with av.open(str(path), "w", format="mp3", options={"id3v2_version": "0"}) as container:
        stream = container.add_stream("libmp3lame", rate=MP3_RATE, layout="stereo")
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="stereo")
        frame.sample_rate = MP3_RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def add_xing_frames(path: Path, extra: int) -> None:
    """Make the MP3's Xing/Info header promise `extra` more MPEG frames than the file holds."""
    data = bytearray(path.read_bytes())
    tag = max(data.find(b"Xing", 0, 200), data.find(b"Info", 0, 200))
    assert tag > 0 and int.from_bytes(data[tag + 4: tag + 8], "big") & 1      # the frame-count field is present
    count = int.from_bytes(data[tag + 8: tag + 12], "big")
    data[tag + 8: tag + 12] = (count + extra).to_bytes(4, "big")
    path.write_bytes(data)


def pyav_decode(path: Path) -> np.ndarray:
    """The whole file decoded by FFmpeg with PyAV's own conversion (not audio_io's reader). [C, N] float32."""
    import av
    with av.open(str(path)) as container:
        return np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)


def whole_file_mono_24k(path: Path) -> np.ndarray:
    """The reference of the stored audio: the whole MP3 decoded at once by FFmpeg (PyAV's own conversion, not
    audio_io's reader), mixed, resampled whole."""
    samples = pyav_decode(path)
    mono = torch.from_numpy(samples.mean(axis=0, dtype=np.float32))[None]
    mono = torchaudio.functional.resample(mono, MP3_RATE, SAMPLE_RATE)
    return mono[0].numpy()


def whole_frames(samples: int, rate: int) -> int:
    return audio_io.resampled_length(samples, rate) // HOP_LENGTH


def test_mp3_whose_header_over_promises_stores_what_decodes(reuse_random_codec, tmp_path, capsys):
    """The issue's real MP3s promise 0.25 s more than decodes. What decodes is stored (its whole frames), quietly when
    the header is less than a block too long, with one warning line when it is more (a truncated file)."""
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    add_xing_frames(write_mp3(audio_dir / "over.mp3", 1.5, 330), 40)             # +1 s: an ordinary estimate
    add_xing_frames(write_mp3(audio_dir / "very_over.mp3", 1.3, 440), 1000)      # +26 s: more than a block
    capsys.readouterr()
    manifest = prepare_data.prepare(audio_dir, tmp_path / "cache", encodec_weights="random", device="cpu",
                                    min_seconds=MIN_SECONDS, workers=2, progress=False, cache_dtype="float32")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "very_over.mp3: 1.3" in warnings[0] and "header promises 2" in warnings[0]
    assert not manifest["skipped_files"]
    for name in ("over.mp3", "very_over.mp3"):
        frames = whole_frames(pyav_decode(audio_dir / name).shape[1], MP3_RATE)
        assert whole_frames(soundfile.info(audio_dir / name).frames, MP3_RATE) > frames + 70    # the header lies
        track = track_by_source(manifest, name)
        latents, audio = cached_arrays(tmp_path / "cache", track)
        assert track["frames"] == frames and latents.shape == (LATENT_DIM, frames)
        # streamed blocks against the whole file resampled at once: conv1d sums the filter's taps in another order
        # (see test_long_tracks_stream_in_blocks_like_whole_files for the bound); the last partial frame is dropped
        reference = whole_file_mono_24k(audio_dir / name)
        assert frames * HOP_LENGTH <= len(reference) < (frames + 1) * HOP_LENGTH
        np.testing.assert_allclose(audio, reference[: frames * HOP_LENGTH], rtol=0,
                                   atol=16 * np.finfo(np.float32).eps * float(np.abs(reference).max()))
    # "too short" is decided on the decoded length: 1.3 s decode, though the header promises 27 s
    manifest = prepare_data.prepare(audio_dir, tmp_path / "cache2", encodec_weights="random", device="cpu",
                                    min_seconds=1.4, workers=2, progress=False)
    assert [t["source"] for t in manifest["tracks"]] == ["over.mp3"]
    assert read_skipped(tmp_path / "cache2")[0]["reason"].startswith("too short (1.3")


class UnderPromisingReader:
    """A reader (audio_io.open_audio's) whose header estimate is `fraction` of the real length (0: unknown), as FFmpeg's
    container durations can be; everything else is the real reader's. It has no libsndfile format: a header of
    WAV, FLAC or AIFF states the exact length, which preparation trusts to skip a short file unread."""
    format = None

    def __init__(self, reader, fraction: float):
        self._reader, self.frames = reader, int(reader.frames * fraction)

    def __getattr__(self, name):
        return getattr(self._reader, name)


def test_header_that_under_promises_loses_no_audio(reuse_random_codec, tmp_path, monkeypatch):
    """Memory stays streaming and no audio is dropped when the header's length is too short or unknown: the cache
    equals the one made with the true header, and the decoded length decides --min_seconds."""
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    soundfile.write(audio_dir / "a44.wav", np.stack([sine(300, 1.3, 44_100), sine(450, 1.3, 44_100)], 1), 44_100)
    soundfile.write(audio_dir / "b24.wav", sine(500, 1.2, SAMPLE_RATE), SAMPLE_RATE)
    settings = dict(encodec_weights="random", device="cpu", min_seconds=1.0, workers=1, progress=False)
    truth = prepare_data.prepare(audio_dir, tmp_path / "truth", **settings)
    real_open = encoding.open_audio

    @contextlib.contextmanager
    def under_promising(path):
        with real_open(path) as reader:
            yield UnderPromisingReader(reader, 0.3 if Path(path).name == "a44.wav" else 0.0)

    monkeypatch.setattr(encoding, "open_audio", under_promising)
    lied = prepare_data.prepare(audio_dir, tmp_path / "lied", **settings)
    assert not lied["skipped_files"] and len(lied["tracks"]) == 2
    for track in truth["tracks"]:
        name = track["source"]
        samples, rate = soundfile.read(audio_dir / name, always_2d=True)
        assert track_by_source(lied, name)["frames"] == track["frames"] == whole_frames(len(samples), rate)
        for reference, stored in zip(cached_arrays(tmp_path / "truth", track), cached_arrays(tmp_path / "lied", track)):
            np.testing.assert_array_equal(stored, reference)


def test_concatenated_mp3_streams_are_stored_whole(reuse_random_codec, tmp_path):
    """Two MP3 streams in one file: the first stream's Info header counts only its own frames (under-promises)."""
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    first, second = write_mp3(tmp_path / "first.mp3", 1.0, 330), write_mp3(tmp_path / "second.mp3", 1.0, 550)
    (audio_dir / "both.mp3").write_bytes(first.read_bytes() + second.read_bytes())
    manifest = prepare_data.prepare(audio_dir, tmp_path / "cache", encodec_weights="random", device="cpu",
                                    min_seconds=MIN_SECONDS, workers=1, progress=False)
    decoded = pyav_decode(audio_dir / "both.mp3").shape[1]
    assert decoded > 1.9 * MP3_RATE                                             # FFmpeg decodes both streams
    assert manifest["tracks"][0]["frames"] == whole_frames(decoded, MP3_RATE)


def test_inference_input_mp3_whose_header_over_promises(tmp_path, capsys):
    """inference_sample.py --input reads what decodes: the context is the decoded audio, and a --start that only the
    header's length would allow is a one-line failure giving the decoded length."""
    from music_continuation.evaluation import inference as inference_sample
    from music_continuation.model import ContinuationTransformer
    from music_continuation.training.checkpoint import save_checkpoint
    good, short = write_mp3(tmp_path / "good.mp3", 1.6, 330), write_mp3(tmp_path / "short.mp3", 1.3, 440)
    for path in (good, short):
        add_xing_frames(path, 80)                                               # both promise 2 s more
    torch.manual_seed(0)
    model = ContinuationTransformer(d_model=32, num_layers=1, num_heads=2, dropout=0.0)
    fingerprint = codec.codec_fingerprint(codec.load_codec("random"))
    save_checkpoint(tmp_path / "model.pt", dict(
        model=model.state_dict(), model_config=model.config, optimizer={}, scheduler={}, epoch=1,
        args={"segment_frames": 16}, latent_mean=torch.zeros(LATENT_DIM), latent_std=torch.ones(LATENT_DIM),
        codec_fingerprint=fingerprint, encodec_weights="random", mlflow_run_id=None, best_val_loss=1.0,
        segment_frames=16))
    start = 1.2                                                   # context 1.2 .. 1.41 s: within good.mp3 only
    code = inference_sample.main(["--checkpoint", str(tmp_path / "model.pt"), "--input", str(good), str(short),
                                  "--start", str(start), "--out_dir", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    failure = [line for line in err.splitlines() if str(short) in line]
    decoded_seconds = pyav_decode(short).shape[1] / MP3_RATE
    assert len(failure) == 1 and f"{short}: {decoded_seconds:.2f} s of audio, shorter than" in failure[0]
    context, rate = soundfile.read(tmp_path / "out" / "00_good" / "context.wav", dtype="float32")
    first = int(round(start * codec.FRAME_RATE)) * HOP_LENGTH
    reference = whole_file_mono_24k(good)[first: first + 16 * HOP_LENGTH]
    np.testing.assert_allclose(context, reference, rtol=0, atol=1e-6)   # the same whole-file read and resampling


# --------------------------------------------------------------------------------------- verified writes

def test_short_writes_are_completed(reuse_random_codec, tmp_path, monkeypatch):
    """On a nearly full disk os.pwrite may store part of its bytes without raising; every write must go on until
    all are stored, or the file keeps a hole of zeros."""
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    soundfile.write(audio_dir / "a.wav", sine(200, 0.6, SAMPLE_RATE), SAMPLE_RATE)
    small_prepare(audio_dir, tmp_path / "whole")
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real_pwrite(fd, memoryview(data)[:1000], offset))
    small_prepare(audio_dir, tmp_path / "short")
    assert files_of(tmp_path / "short") == files_of(tmp_path / "whole")


def files_of(cache: Path) -> dict[str, bytes]:
    """{name: bytes} of every file in the cache's tracks folder."""
    return {path.name: path.read_bytes() for path in (cache / "tracks").iterdir()}


def test_a_done_track_whose_files_changed_is_re_encoded(reuse_random_codec, tmp_path, monkeypatch, capsys):
    """Finished tracks are verified on resume: a file of another size, or modified with another CRC-32, is
    re-encoded with one line naming it; one merely touched (or copied) is kept without re-encoding."""
    audio_dir, cache = tmp_path / "audio", tmp_path / "cache"
    audio_dir.mkdir()
    for number, freq in enumerate((200, 300, 400)):
        soundfile.write(audio_dir / f"t{number}.wav", sine(freq, 0.6, SAMPLE_RATE), SAMPLE_RATE)
    manifest = small_prepare(audio_dir, cache)
    clean = files_of(cache)
    tracks = {t["source"]: t["id"] for t in manifest["tracks"]}
    overwritten = cache / "tracks" / f"{tracks['t0.wav']}.audio.npy"
    with open(overwritten, "r+b") as file:                       # zeros in place: same size, a new mtime
        file.seek(1000)
        file.write(bytes(2000))
    truncated = cache / "tracks" / f"{tracks['t1.wav']}.latents.npy"
    os.truncate(truncated, truncated.stat().st_size - 64)
    touched = cache / "tracks" / f"{tracks['t2.wav']}.stats.npy"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    calls = CountingEncode()
    monkeypatch.setattr(encoding, "encode", calls)
    capsys.readouterr()
    resumed = small_prepare(audio_dir, cache)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert calls.calls == 2 and len(warnings) == 2
    assert f"{overwritten}: changed since it was written (its CRC-32 differs); re-encoding t0.wav" in warnings[0]
    assert f"{truncated}: " in warnings[1] and "were written; re-encoding t1.wav" in warnings[1]
    assert files_of(cache) == clean
    assert track_by_source(resumed, "t2.wav")["files"]["stats"]["mtime_ns"] == touched.stat().st_mtime_ns
    again = CountingEncode()
    monkeypatch.setattr(encoding, "encode", again)
    small_prepare(audio_dir, cache)
    assert again.calls == 0


# --------------------------------------------------------------------------------------- compact cache

@pytest.fixture(scope="module")
def compact(prepared, tmp_path_factory):
    """The `prepared` corpus again, in the default (compact) layout."""
    audio_dir = prepared[0]
    cache = tmp_path_factory.mktemp("compact") / "cache"
    manifest = prepare_data.prepare(audio_dir, cache, encodec_weights="random", val_fraction=0.34, seed=0,
                                    device="cpu", min_seconds=MIN_SECONDS, workers=2, progress=False)
    return cache, manifest


FLOAT16_HALF_STEP = 2.0 ** -11         # float16 keeps 11 significant bits: rounding moves x by <= |x| 2^-11
FLOAT16_SUBNORMAL_HALF_STEP = 2.0 ** -25


def test_compact_cache_is_the_float32_cache_rounded(prepared, compact):
    _, cache32, manifest32 = prepared
    cache16, manifest16 = compact
    assert (manifest16["format_version"], manifest16["cache_dtype"]) == (2, "compact")
    assert manifest32["cache_dtype"] == "float32"
    assert [(t["id"], t["frames"], t["split"]) for t in manifest16["tracks"]] == \
           [(t["id"], t["frames"], t["split"]) for t in manifest32["tracks"]]
    for track in manifest32["tracks"]:
        latents32, audio32 = cached_arrays(cache32, track)
        latents16, audio16 = cached_arrays(cache16, track)
        assert latents16.dtype == np.float16 and audio16.dtype == np.int16
        bound = np.maximum(np.abs(latents32) * FLOAT16_HALF_STEP, FLOAT16_SUBNORMAL_HALF_STEP)
        assert np.all(np.abs(latents16.astype(np.float32) - latents32) <= bound)
        np.testing.assert_array_equal(audio16, np.rint(np.clip(audio32, -1, 1) * 32767).astype(np.int16))
    # statistics from the unrounded latents: equal to the float32 cache's, not to the rounded arrays'
    np.testing.assert_allclose(manifest16["latent_mean"], manifest32["latent_mean"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(manifest16["latent_std"], manifest32["latent_std"], rtol=1e-9)
    train = [t for t in manifest16["tracks"] if t["split"] == "train"]
    rounded = np.concatenate([cached_arrays(cache16, t)[0].astype(np.float64) for t in train], axis=1)
    assert not np.allclose(rounded.std(axis=1), manifest16["latent_std"], rtol=1e-9, atol=0)


def test_compact_cache_takes_at_most_60_percent_of_the_bytes(prepared, compact):
    def bytes_per_second(cache, manifest):
        size = sum(path.stat().st_size for track in manifest["tracks"] for path in data.track_paths(cache, track["id"]))
        return size / sum(track["duration"] for track in manifest["tracks"])
    full, small = bytes_per_second(prepared[1], prepared[2]), bytes_per_second(*compact)
    payload = LATENT_DIM * codec.FRAME_RATE * 4 + SAMPLE_RATE * 4           # 134400 B/s of float32
    assert full == pytest.approx(payload, rel=0.01)                          # plus the .npy headers
    assert small <= 0.6 * full and small == pytest.approx(payload / 2, rel=0.01)


def test_compact_dataset_gives_float32_close_to_the_float32_cache(prepared, compact):
    full = data.ContinuationDataset(prepared[1], "train", SEGMENT)
    small = data.ContinuationDataset(compact[0], "train", SEGMENT)
    assert len(full) == len(small) and small.cache_dtype == "compact"
    std = full.latent_std.numpy()[:, None]
    for index in range(0, len(full), 2):
        a, b = full[index], small[index]
        assert all(value.dtype == torch.float32 for value in b.values())
        for key in ("input_audio", "target_audio"):                    # int16 rounding: half a step
            np.testing.assert_allclose(b[key].numpy(), a[key].numpy(), rtol=0, atol=0.5 / 32767 + 1e-7)
        for key in ("input_latent", "target_latent"):                  # float16 rounding, over std
            raw = a[key].numpy() * std + full.latent_mean.numpy()[:, None]
            bound = np.maximum(np.abs(raw) * FLOAT16_HALF_STEP, FLOAT16_SUBNORMAL_HALF_STEP) / std
            assert np.all(np.abs(b[key].numpy() - a[key].numpy()) <= bound * 1.01 + 1e-6)
    clone = pickle.loads(pickle.dumps(small))                           # still safe for DataLoader workers
    torch.testing.assert_close(clone[1], small[1])


def test_format_version_1_cache_is_read_as_float32_and_resumes(prepared, tmp_path, monkeypatch, capsys):
    import shutil
    audio_dir, cache32, manifest32 = prepared
    old = tmp_path / "old"
    shutil.copytree(cache32, old)
    for path in (old / "tracks").glob("*.stats.npy"):            # version 1 had no moments files
        path.unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 1
    del manifest["cache_dtype"]
    for track in manifest["tracks"]:                              # nor the records of the files
        del track["files"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    current = data.ContinuationDataset(old, "train", SEGMENT)
    reference = data.ContinuationDataset(cache32, "train", SEGMENT)
    assert current.cache_dtype == "float32"
    torch.testing.assert_close(current[3], reference[3], rtol=0, atol=0)

    calls = CountingEncode()
    monkeypatch.setattr(encoding, "encode", calls)
    resumed = prepare_data.prepare(audio_dir, old, encodec_weights="random", val_fraction=0.34, device="cpu",
                                   min_seconds=MIN_SECONDS, workers=1, progress=False, cache_dtype="float32")
    assert calls.calls == 0 and (resumed["format_version"], resumed["cache_dtype"]) == (2, "float32")
    np.testing.assert_allclose(resumed["latent_std"], manifest32["latent_std"], rtol=1e-9)
    capsys.readouterr()
    code = prepare_data.main(["--audio_dir", str(audio_dir), "--out_dir", str(old), "--encodec_weights", "random",
                              "--device", "cpu", "--min_seconds", str(MIN_SECONDS)])       # default: compact
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1 and "made with --cache_dtype float32" in err[0]
    assert calls.calls == 0


@pytest.mark.parametrize("change, message", [({"format_version": 3}, "format_version 3; this code reads versions 1, 2"),
                                             ({"cache_dtype": "bfloat16"}, "unknown cache_dtype 'bfloat16'")])
def test_unknown_cache_format_is_one_line_error(compact, tmp_path, change, message):
    manifest = dict(compact[1], **change)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(data.CacheError, match=message) as error:
        data.read_manifest(tmp_path)
    assert "\n" not in str(error.value)


def test_latents_beyond_float16_are_refused_in_compact_caches(tmp_path, monkeypatch):
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    soundfile.write(audio_dir / "a.wav", sine(200, 0.6, SAMPLE_RATE), SAMPLE_RATE)
    loud = codec.encode(codec.load_codec("random"), torch.from_numpy(sine(200, 0.6, SAMPLE_RATE)).view(1, 1, -1))
    scale = 1e5 / float(loud.abs().max())                         # the largest latent becomes 1e5 > 65504
    monkeypatch.setattr(encoding, "encode", lambda model, audio: codec.encode(model, audio) * scale)
    with pytest.raises(scan.NoUsableAudioError):
        prepare_data.prepare(audio_dir, tmp_path / "c16", encodec_weights="random", device="cpu",
                             min_seconds=MIN_SECONDS, workers=1, progress=False)
    reason = read_skipped(tmp_path / "c16")[0]["reason"]
    assert "beyond float16's 65504" in reason and "--cache_dtype float32" in reason
    manifest = prepare_data.prepare(audio_dir, tmp_path / "c32", encodec_weights="random", device="cpu",
                                    min_seconds=MIN_SECONDS, workers=1, progress=False, cache_dtype="float32")
    assert len(manifest["tracks"]) == 1


def test_bench_scale_simulated_manifest(prepared, tmp_path, capsys):
    """The manifest-scale part of bench/bench_scale.py at a small size (a whole run takes minutes, so the
    script itself is not run here): N entries over hard links of one track, read by a fresh dataset."""
    import argparse
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "bench" / "bench_scale.py")
    bench_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_scale)
    _, cache, manifest = prepared
    bench_scale.simulated_manifest(cache, tmp_path / "many", 300)
    dataset = data.ContinuationDataset(tmp_path / "many", "train", SEGMENT)
    real = manifest["tracks"][0]
    per_track = (real["frames"] - 2 * SEGMENT) // SEGMENT + 1
    assert len(dataset.tracks) == 300 and len(dataset) == 300 * per_track
    torch.testing.assert_close(dataset[299 * per_track], dataset[0], rtol=0, atol=0)     # the same file
    bench_scale.rss_child(argparse.Namespace(rss_child=str(tmp_path / "many"), touch=50, segment_frames=SEGMENT))
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["touched_tracks"] == 50 and figures["touched"] >= figures["imports"] > 0
    assert len(dataset._open_tracks) <= data.MAX_OPEN_TRACKS
