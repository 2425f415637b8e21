"""One family of user-facing errors and one Interrupted (music_continuation/utils.py)."""
from __future__ import annotations

import signal

import pytest

from music_continuation.ablation import ablate, executors
from music_continuation.codec import CodecLoadError
from music_continuation.config import ConfigError
from music_continuation.data.audio_io import AudioLoadError
from music_continuation.data.cache import CacheError
from music_continuation.data.scan import NoUsableAudioError
from music_continuation.data.writes import CacheWriteError
from music_continuation.evaluation.inference import InferenceError
from music_continuation.evaluation.scoring import EvaluationError
from music_continuation.training import worker
from music_continuation.training.checkpoint import CheckpointError
from music_continuation.utils import Interrupted, UserError, one_line, write_json


@pytest.mark.parametrize("error", [CodecLoadError, ConfigError, AudioLoadError, CacheError, CacheWriteError,
                                   NoUsableAudioError, InferenceError, EvaluationError, worker.TrainingError,
                                   CheckpointError, executors.ExecutorError, ablate.AblateError])
def test_every_user_error_derives_from_one_base(error):
    assert issubclass(error, UserError)


def test_one_interrupted_for_the_worker_and_the_study():
    assert worker.Interrupted is Interrupted and ablate.Interrupted is Interrupted
    assert not issubclass(Interrupted, Exception)        # an `except Exception` on the way does not swallow it
    assert Interrupted(signal.SIGTERM).signum == signal.SIGTERM and str(Interrupted()) == "SIGINT"


def test_a_disk_error_still_names_its_file():
    assert one_line(CacheWriteError(28, "No space left on device", "/cache/x.npy")) == \
        "/cache/x.npy: No space left on device"


def test_write_json_is_atomic_indented_and_ends_with_a_newline(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "a.json"
    write_json(path, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert path.read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
    import json
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("mid-write")))
    with pytest.raises(RuntimeError):
        write_json(path, {"c": 3})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}      # the old file, whole
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]      # no temporary left behind
