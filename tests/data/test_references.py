"""references.py: decoded segments on the window grid, equal to on-the-fly decoding, stale/partial sets rebuilt.

A copy of the tiny demo cache (conftest.tiny_cache: random codec, 150-frame tracks) per test, 8-frame segments.
The reference for every comparison is the current on-the-fly path: evaluation.decode_windows on a batch
without stored references.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from music_continuation.data import references
from music_continuation.data.cache import ContinuationDataset, LatentNormalizer, read_manifest
from music_continuation.evaluation.scoring import BASELINES, decode_windows, reference_audio, score_baselines_batch
from music_continuation.losses.audio import CombinedLoss

SEGMENT = 8


@pytest.fixture(scope="module")
def decoder():
    from music_continuation.codec import FrozenDecoder, load_codec
    return FrozenDecoder(load_codec("random"))


@pytest.fixture
def cache(tiny_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy, ignore=shutil.ignore_patterns(references.REFERENCES_DIR))
    return copy


def build(cache, decoder, fingerprint=None, **options):
    manifest = read_manifest(cache)
    return references.build_references(cache, manifest, decoder, fingerprint or manifest["codec_fingerprint"],
                                       SEGMENT, progress=False, **options)


def batch_of(data, indices) -> dict:
    items = [data[i] for i in indices]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def test_segments_lie_on_the_window_grid():
    # S = T: segments 0, T, 2T, ... up to the last full one; window k's input is segment k, its target k + 1
    assert references.segment_starts(150, 8, 8).tolist() == list(range(0, 136 + 1, 8))
    assert len(references.segment_starts(150, 8, 8)) == 150 // 8     # the 6-frame tail is in no window
    assert references.segment_starts(15, 8, 8).tolist() == []        # shorter than one window: nothing
    assert references.segment_starts(24, 8, 4).tolist() == [0, 4, 8, 12, 16]   # another stride: inputs + targets


def test_dataset_windows_are_consecutive_segments(tiny_cache):
    data = ContinuationDataset(tiny_cache, "train", SEGMENT)
    for index in range(len(data)):
        track, start = data.window_location(index)
        frames = next(t["frames"] for t in data.tracks if t["id"] == track)
        starts = references.segment_starts(frames, SEGMENT, SEGMENT).tolist()
        assert start in starts and start + SEGMENT in starts


@pytest.mark.parametrize("unity", [False, True])
def test_stored_references_match_on_the_fly_decoding(cache, decoder, unity, capsys):
    stored = build(cache, decoder)
    assert "decoding" in capsys.readouterr().err
    data = ContinuationDataset(cache, "val", SEGMENT, unity_test=unity)
    indices = list(range(len(data)))
    plain = batch_of(data, indices)
    data.use_references(stored)
    read = batch_of(data, indices)
    normalizer = LatentNormalizer(data.latent_mean, data.latent_std)
    on_the_fly = decode_windows(plain, decoder, normalizer)
    for mine, theirs in zip(decode_windows(read, decoder, normalizer), on_the_fly):
        scale = theirs.square().mean().sqrt()
        assert (mine - theirs).square().mean().sqrt() < 1e-5 * scale
    # the losses of one output against either set of references, every component trained
    loss_fn = CombinedLoss(rms_input=0.25, rms_target=0.25, spectral=0.25, mel=0.25)
    output = on_the_fly[1] + 0.05 * torch.randn_like(on_the_fly[1], generator=torch.Generator().manual_seed(0))
    total_read, parts_read = loss_fn(output, *reference_audio(read, decoder, normalizer, "codec"))
    total, parts = loss_fn(output, *reference_audio(plain, decoder, normalizer, "codec"))
    assert abs(total_read - total) < 1e-4 * total
    for name, value in parts.items():
        assert abs(parts_read[name] - value) < 1e-4 * value, name
    # the oracle is scored against the very references it outputs: exactly 0
    sums = score_baselines_batch(read, decoder, normalizer, loss_fn, "codec")
    oracle = sums["oracle"].means()
    assert oracle["rms_target"] == oracle["spectral"] == oracle["mel"] == oracle["latent_mse"] == 0.0
    assert set(sums) == set(BASELINES)


def test_complete_set_is_reused_and_stale_or_partial_sets_are_rebuilt(cache, decoder, capsys):
    build(cache, decoder)
    folder = references.set_dir(cache, SEGMENT, SEGMENT)
    files = sorted(folder.glob("*.npy"))
    stamps = {path: path.stat().st_mtime_ns for path in files}
    capsys.readouterr()
    build(cache, decoder)                                   # complete and current: nothing decoded, nothing said
    assert capsys.readouterr().err == ""
    assert all(path.stat().st_mtime_ns == stamps[path] for path in files)

    # partial (a killed build): the set is never opened, and a build decodes only the missing track
    files[0].unlink()
    content = json.loads((folder / references.SET_NAME).read_text())
    (folder / references.SET_NAME).write_text(json.dumps({**content, "complete": False}))
    manifest = read_manifest(cache)
    assert references.open_references(cache, manifest, manifest["codec_fingerprint"], SEGMENT) is None
    build(cache, decoder)
    assert "partial (" in capsys.readouterr().err
    assert files[0].is_file() and all(path.stat().st_mtime_ns == stamps[path] for path in files[1:])

    # stale (made by another codec): rebuilt with one line naming what differs, never used
    assert references.open_references(cache, manifest, "another-codec", SEGMENT) is None
    build(cache, decoder, fingerprint="another-codec")
    err = capsys.readouterr().err
    assert "is stale (codec_fingerprint" in err and len([line for line in err.splitlines() if "stale" in line]) == 1
    assert references.open_references(cache, manifest, manifest["codec_fingerprint"], SEGMENT) is None


def test_interrupted_build_resumes(cache, decoder, monkeypatch):
    real, calls = references._decode_track, []

    def dies_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(references, "_decode_track", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        build(cache, decoder)
    folder = references.set_dir(cache, SEGMENT, SEGMENT)
    assert len(list(folder.glob("*.npy"))) == 1 and not list(folder.glob(".*tmp*"))
    manifest = read_manifest(cache)
    assert references.open_references(cache, manifest, manifest["codec_fingerprint"], SEGMENT) is None
    monkeypatch.setattr(references, "_decode_track", real)
    stored = build(cache, decoder)
    assert len(list(folder.glob("*.npy"))) == len(stored.keys)
    segment = stored.segment(next(iter(stored.keys)), 0)
    assert segment.dtype == np.float32 and segment.shape == (SEGMENT * 320,)


def test_unwritable_cache_is_one_line(cache, decoder):
    folder = cache / references.REFERENCES_DIR
    folder.write_text("a file where the folder goes")
    with pytest.raises(references.CacheError, match="cannot write the decoded references"):
        build(cache, decoder)


def test_prepare_data_decodes_references_of_an_existing_cache(cache, capsys):
    from music_continuation.data import prepare as prepare_data
    assert prepare_data.main(["--out_dir", str(cache), "--decode_references", str(SEGMENT), "--device", "cpu"]) == 0
    manifest = read_manifest(cache)
    assert references.open_references(cache, manifest, manifest["codec_fingerprint"], SEGMENT) is not None
    assert "complete" in capsys.readouterr().err


@pytest.fixture
def read_only(cache, tmp_path):
    """The cache seen through a read-only bind mount at tmp_path/ro (as root, as CI runs; elsewhere chmod -R a-w,
    which root would ignore)."""
    view = tmp_path / "ro"
    view.mkdir()
    if os.geteuid() == 0 and shutil.which("mount"):
        subprocess.run(["mount", "--bind", str(cache), str(view)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        yield view
        subprocess.run(["umount", str(view)], check=False)
        return
    if os.geteuid() == 0:
        pytest.skip("needs mount(8) to make a read-only view as root (root ignores chmod)")
    view.rmdir()
    shutil.copytree(cache, view)
    for path in [view, *view.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    yield view
    for path in [view, *view.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)


def test_a_read_only_cache_gets_its_references_in_the_user_folder(read_only, decoder, tmp_path, user_cache, capsys):
    manifest = read_manifest(read_only)
    fingerprint = manifest["codec_fingerprint"]
    stored = build(read_only, decoder)
    root = references.user_root(read_only, manifest, fingerprint)
    assert root.parent == user_cache / "references" and root.name.startswith("ro-")
    assert stored.folder == references.set_dir(read_only, SEGMENT, SEGMENT, root)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[0] == (f"references: {read_only} cannot be written; the decoded references go to {root} "
                        f"(--references_dir puts them elsewhere)")
    assert not (read_only / references.REFERENCES_DIR).exists()
    build(read_only, decoder)                                  # found complete: nothing decoded again
    assert "decoding" not in capsys.readouterr().err
    found = references.find_references(read_only, manifest, fingerprint, SEGMENT)     # what evaluate.py reads
    assert found is not None and found.folder == stored.folder

    moved = tmp_path / "elsewhere"                             # --references_dir: used where it is, not rebuilt
    shutil.move(root, moved)
    assert build(read_only, decoder, references_dir=moved).folder == moved / f"T{SEGMENT}-S{SEGMENT}"
    assert capsys.readouterr().err == ""
    assert references.find_references(read_only, manifest, fingerprint, SEGMENT, references_dir=moved) is not None
    assert references.find_references(read_only, manifest, fingerprint, SEGMENT) is None       # nowhere else


BUILD_SCRIPT = """
import sys, time
from music_continuation.codec import FrozenDecoder, load_codec
from music_continuation.data import references
from music_continuation.data.cache import read_manifest
cache, folder = sys.argv[1], sys.argv[2]
decoder = FrozenDecoder(load_codec("random"))
def slow(latents):
    time.sleep(0.3)
    return decoder(latents)
manifest = read_manifest(cache)
print("ready", file=sys.stderr, flush=True)
references.build_references(cache, manifest, slow, manifest["codec_fingerprint"], 8, progress=False,
                            references_dir=folder)
"""


@pytest.mark.slow       # two interpreters that each load torch and a codec (~20 s on 2 busy cores)
def test_two_runs_sharing_a_references_folder_build_it_once(cache, tmp_path):
    folder = tmp_path / "shared_references"
    first = subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(cache), str(folder)], stderr=subprocess.PIPE,
                             text=True)
    assert first.stderr.readline().strip() == "ready"
    assert first.stderr.readline().startswith("references: decoding ")            # it holds the lock now
    second = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(cache), str(folder)], capture_output=True,
                            text=True, timeout=300)
    rest = first.communicate(timeout=300)[1]
    assert first.returncode == 0 and second.returncode == 0, (rest, second.stderr)
    said = second.stderr.splitlines()
    assert said == ["ready", f"references: another run is building {folder / 'T8-S8'}; waiting for it"], said
    assert rest.strip().endswith("complete")
