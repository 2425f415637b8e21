"""Not collected by default (no test_ prefix): tests/test_fixtures.py runs it in a pytest of its own and kills that
pytest, to see the fixtures' servers go with it."""
from __future__ import annotations

import os
import time
from pathlib import Path


def test_hold_the_mlflow_server(mlflow_server):
    Path(os.environ["FIXTURE_PROBE_OUT"]).write_text(mlflow_server)
    time.sleep(600)
