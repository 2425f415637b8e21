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


class _Stub:
    """An HTTP server on a free port whose answers are (status, body) by path: a broken tracking server."""

    def __init__(self, answers: dict):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                status, body = answers.get(self.path.split("?")[0], (404, "not found"))
                self.send_response(status)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


API = "/api/2.0/mlflow/experiments/get-by-name"


@pytest.mark.parametrize("answers, expected", [
    ({"/health": (200, "OK"), API: (500, '{"error_code": "INTERNAL_ERROR", "message": "database is locked"}')},
     f"the server answers /health but its API fails (HTTP 500 on {API}: database is locked); see the server's log "
     f"(its backend store or artifact root)"),
    ({"/health": (500, "Internal Server Error\n<html>...")},
     "the server answered /health with HTTP 500: Internal Server Error: it is up but unhealthy; see the server's log"),
    ({"/health": (200, "OK")},
     f"the server answers /health but not as an MLflow tracking server (HTTP 404 on {API}); check the URI's host, "
     f"port and path"),
])
def test_a_tracking_server_that_answers_but_fails_is_one_short_line(answers, expected):
    stub = _Stub(answers)
    try:
        with pytest.raises(OSError) as error:
            check_mlflow_server(stub.uri, timeout=5.0)
    finally:
        stub.close()
    assert str(error.value) == expected
    assert "does not answer" not in str(error.value)


def test_a_working_api_passes_the_probe():
    stub = _Stub({"/health": (200, "OK"), API: (404, '{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "x"}')})
    try:
        check_mlflow_server(stub.uri, timeout=5.0)
    finally:
        stub.close()


def test_mlflow_client_errors_keep_the_url_and_urllib3s_cause_only():
    from music_continuation.training.mlflow_logger import short
    from music_continuation.training.worker import error_line
    url = "http://127.0.0.1:5000/api/2.0/mlflow/runs/create"
    error = RuntimeError(f"API request to {url} failed with exception HTTPConnectionPool(host='127.0.0.1', port=5000):"
                         f" Max retries exceeded with url: /api/2.0/mlflow/runs/create (Caused by ResponseError('too "
                         f"many 500 error responses'))")
    assert short(error) == error_line(error) == f"API request to {url} failed: too many 500 error responses"
