"""One basic-pitch session (onnxruntime) for every listener test of the session: loading it costs about a second."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def transcriber():
    pytest.importorskip("onnxruntime", reason="the listeners' packages: pip install -r requirements-listeners.txt")
    from music_continuation.evaluation.listeners import melody
    return melody.Transcriber()
