"""Ratings storage, validation and statistics, and the server's file and token rules, on a hand-made test folder
(no rendering, no browser): fast."""
from __future__ import annotations

import json
import math
import os
import threading
import urllib.error
import urllib.request

import pytest

from music_continuation.study import ratings
from music_continuation.study.ratings import StudyError
from music_continuation.study.ratings import Test as ListeningTest

CONDITIONS = ["a/seed0", "b/seed0", "reference", "repeat", "anchor"]


def make_test(folder, trials=("t01", "t02", "t03")) -> ListeningTest:
    stimuli = {t: {f"s{i}{t}": c for i, c in enumerate(CONDITIONS)} for t in trials}
    public_trials = []
    for t in trials:
        (folder / "audio" / t).mkdir(parents=True)
        files = {s: f"audio/{t}/{s}.wav" for s in stimuli[t]}
        for relative in [*files.values(), f"audio/{t}/reference.wav"]:
            (folder / relative).write_bytes(b"RIFF" + bytes(range(64)))
        public_trials.append({"id": t, "source": t, "reference": f"audio/{t}/reference.wav", "stimuli": files,
                              "seam_seconds": 1.0, "context_start_seconds": 0.5, "duration_seconds": 2.0})
    digest = ratings.test_hash(public_trials, stimuli)
    conditions = [{"name": c, "kind": "model" if "/" in c else c, "cell": c.split("/")[0] if "/" in c else None,
                   "seed": 0 if "/" in c else None, "checkpoint": None, "run_id": None} for c in CONDITIONS]
    ratings.write_json(folder / "key.json", {"test_hash": digest, "conditions": conditions, "stimuli": stimuli,
                                             "study": {}})
    ratings.write_json(folder / "test.json", {"test_hash": digest, "title": "t", "settings": {},
                                              "trials": public_trials})
    (folder / ".token").write_text("secret-token\n")
    test = ListeningTest.load(folder)
    test.add_raters(["ann", "ben", "cy"])
    return test


def rate(test, rater, trial, condition, value):
    stimulus = next(s for s, c in test.key["stimuli"][trial].items() if c == condition)
    ratings.append_rating(test, ratings.validate(test, rater, trial, stimulus, value))


@pytest.mark.parametrize("field, value, expected", [
    ("rater", "zed", "unknown rater 'zed'"), ("trial", "t09", "unknown trial 't09'"),
    ("stimulus", "nope", "has no stimulus 'nope'"), ("value", 101, "from 0 to 100"), ("value", -1, "from 0 to 100"),
    ("value", float("nan"), "from 0 to 100"), ("value", True, "from 0 to 100"), ("value", "50", "from 0 to 100")])
def test_every_rating_is_validated(tmp_path, field, value, expected):
    test = make_test(tmp_path)
    given = {"rater": "ann", "trial": "t01", "stimulus": "s0t01", "value": 50, field: value}
    with pytest.raises(StudyError, match=expected):
        ratings.validate(test, given["rater"], given["trial"], given["stimulus"], given["value"])


def test_concurrent_saves_lose_nothing(tmp_path):
    test = make_test(tmp_path)

    def save(rater):
        for i in range(40):
            rate(test, rater, "t01", CONDITIONS[i % len(CONDITIONS)], i)
    threads = [threading.Thread(target=save, args=(r,)) for r in ("ann", "ben", "cy", "ann")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ratings.read_ratings(test)) == 160


def test_statistics_against_a_recomputation(tmp_path):
    from scipy import stats
    test = make_test(tmp_path)
    given = {}
    for r, rater in enumerate(("ann", "ben", "cy")):
        for t, trial in enumerate(test.trial_ids):
            for c, condition in enumerate(CONDITIONS):
                value = {"reference": 95 - r}.get(condition, (17 * r + 11 * t + 23 * c) % 90)
                if rater == "cy" and condition == "reference" and t < 2:
                    value = 70          # 2 of 3 trials below 90: cy is dropped
                rate(test, rater, trial, condition, value + 5)       # overwritten: the last rating counts
                rate(test, rater, trial, condition, value)
                given[(rater, trial, condition)] = value
    summary = ratings.summarise(test, ratings.read_ratings(test))
    assert summary["raters"] == ["ann", "ben"] and summary["dropped"] == {"cy": pytest.approx(2 / 3)}
    kept = {k: v for k, v in given.items() if k[0] != "cy"}
    for condition in CONDITIONS:
        values = [v for (_, _, c), v in kept.items() if c == condition]
        half = stats.t.ppf(0.975, len(values) - 1) * stats.tstd(values) / math.sqrt(len(values))
        assert summary["conditions"][condition]["mean"] == pytest.approx(sum(values) / len(values))
        assert summary["conditions"][condition]["ci95"] == pytest.approx(half)
    means = {cell: summary["cells"][cell]["mean"] for cell in ("a", "b")}
    best = max(means, key=means.get)
    other = "a" if best == "b" else "b"
    pairs = sorted((r, t) for r, t, c in kept if c == "a/seed0")
    expected = stats.wilcoxon([kept[(r, t, f"{other}/seed0")] for r, t in pairs],
                              [kept[(r, t, f"{best}/seed0")] for r, t in pairs]).pvalue
    assert summary["best"] == best and summary["cells"][other]["wilcoxon_p"] == pytest.approx(expected)


def test_ratings_of_a_changed_test_are_refused_in_one_line(tmp_path):
    test = make_test(tmp_path)
    rate(test, "ann", "t01", "reference", 100)
    key = json.loads((tmp_path / "key.json").read_text())
    public = json.loads((tmp_path / "test.json").read_text())
    key["stimuli"]["t01"]["s0t01"] = "b/seed0"             # a condition changed: another test
    key["test_hash"] = public["test_hash"] = ratings.test_hash(public["trials"], key["stimuli"])
    ratings.write_json(tmp_path / "key.json", key)
    ratings.write_json(tmp_path / "test.json", public)
    with pytest.raises(StudyError) as error:
        ratings.read_ratings(ListeningTest.load(tmp_path))
    assert "its conditions changed" in str(error.value) and "\n" not in str(error.value)


@pytest.fixture
def server(tmp_path, request):
    from music_continuation.study.server import StudyServer, start_in_thread
    test = make_test(tmp_path / "test")
    (tmp_path / "outside.wav").write_bytes(b"secret")
    os.symlink(tmp_path / "outside.wav", tmp_path / "test" / "audio" / "t01" / "link.wav")
    network = getattr(request, "param", False)
    server = StudyServer(test, "127.0.0.1", 0, network=network)
    start_in_thread(server)
    yield f"http://127.0.0.1:{server.server_address[1]}", test
    server.shutdown()
    server.server_close()


def status(url, headers=None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.slow
def test_server_serves_only_the_tests_own_files(server):
    base, test = server
    assert status(base + "/") == 200 and status(base + "/page.js") == 200
    assert status(base + "/audio/t01/s0t01.wav") == 200
    assert status(base + "/audio/t01/s0t01.wav", {"Range": "bytes=4-9"}) == 206
    for path in ("/key.json", "/test.json", "/.token", "/ratings/ann.jsonl", "/audio/t01/link.wav",
                 "/audio/../key.json", "/audio/%2e%2e/key.json", "/audio/t01/..%2f..%2fkey.json",
                 "//etc/passwd", "/audio//etc/passwd", "/audio/t01/%2fetc%2fpasswd", "/../../etc/passwd"):
        assert status(base + path) == 404, path
    assert status(base + "/api/reveal?rater=ann") == 403          # not before every trial is rated


@pytest.mark.slow
@pytest.mark.parametrize("server", [True], indirect=True)
def test_a_network_server_needs_the_token(server):
    base, _ = server
    assert status(base + "/") == 403 and status(base + "/audio/t01/s0t01.wav") == 403
    assert status(base + "/?token=wrong") == 403
    with urllib.request.urlopen(base + "/?rater=ann&token=secret-token", timeout=5) as response:
        cookie = response.headers["Set-Cookie"].split(";")[0]
    assert status(base + "/audio/t01/s0t01.wav", {"Cookie": cookie}) == 200


def test_the_host_needs_network_to_leave_loopback(tmp_path):
    from music_continuation.study.server import StudyServer
    with pytest.raises(StudyError, match="needs --network"):
        StudyServer(make_test(tmp_path), "0.0.0.0", 0, network=False)
