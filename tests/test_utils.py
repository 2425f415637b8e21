"""The shared helpers: atomic writes keep the old file on failure, one-line errors, the MLflow probe."""
from __future__ import annotations

import pytest

from music_continuation.utils import atomic_path, check_mlflow_server, free_port, one_line


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".") and tmp.suffix == ".json"
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_one_line_takes_the_first_line_or_the_type_name():
    assert one_line(ValueError("first\nsecond")) == "first"
    assert one_line(KeyError()) == "KeyError"


@pytest.mark.slow
def test_mlflow_probe_passes_local_stores_and_names_why_a_server_is_dead():
    for uri in (None, "sqlite:///mlflow.db", "file:///tmp/mlruns"):
        check_mlflow_server(uri, timeout=1.0)
    with pytest.raises(OSError, match="refused"):
        check_mlflow_server(f"http://127.0.0.1:{free_port()}", timeout=2.0)
