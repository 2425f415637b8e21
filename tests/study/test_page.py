"""The rating page in a real headless Chromium, on a test of 2 cells x 2 trials rendered from a real tiny ablate.py
study: every <audio> loads, sliders moved by keyboard are saved and survive a reload, two raters (one fails the
BS.1534 post-screening), the report against a recomputation from the saved ratings, and the page's layout."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from music_continuation.study.ratings import Test as ListeningTest
from music_continuation.study.server import StudyServer, start_in_thread

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
# The values each rater gives, by condition kind / cell (multiples of 5: few key presses). bob rates the hidden
# reference 60 in both trials: more than 15% of his trials below 90, so the post-screening drops him.
VALUES = {"alice": [{"reference": 100, "original": 90, "target": 35, "spectral": 45, "repeat": 25, "anchor": 15},
                    {"reference": 95, "original": 85, "target": 40, "spectral": 60, "repeat": 20, "anchor": 10}],
          "bob": [{"reference": 60, "original": 70, "target": 80, "spectral": 50, "repeat": 40, "anchor": 30},
                  {"reference": 60, "original": 75, "target": 85, "spectral": 55, "repeat": 45, "anchor": 35}]}


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def study_cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "music_continuation.study", *map(str, argv)], env=environment(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def served(tiny_study):
    done = study_cli("render", "--study", tiny_study["out"], "--trials", 2, "--lead_in_seconds", 0.5,
                     "--continue_seconds", 0.3, "--raters", "alice", "bob", "carol")
    assert done.returncode == 0, done.stderr
    test = ListeningTest.load(tiny_study["out"] / "listening")
    server = StudyServer(test, "127.0.0.1", 0, network=False)
    start_in_thread(server)
    yield {"test": test, "url": f"http://127.0.0.1:{server.server_address[1]}", **tiny_study}
    server.shutdown()
    server.server_close()


def wait(condition, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def open_page(browser, served, rater):
    browser.get(f"{served['url']}/?rater={rater}")
    wait(lambda: browser.execute_script(
        "return !document.getElementById('trial').hidden || !document.getElementById('finished').hidden"),
        what="the page")


def audio_states(browser):
    return browser.execute_script("return [...document.querySelectorAll('audio')].map(a => "
                                  "[a.readyState, a.error && a.error.code, a.networkState, a.currentSrc])")


def group(test, trial_id, stimulus):
    condition = test.condition_of(trial_id, stimulus)
    return condition.split("/")[0]


def set_slider(browser, row, value):
    """Move a row's slider to `value` by keyboard, as a rater would: Home, then PageUp (+10) and Right (+1)."""
    from selenium.webdriver.common.keys import Keys
    slider = row.find_element("css selector", "input[type=range]")
    slider.send_keys(Keys.END, Keys.HOME, *[Keys.PAGE_UP] * (value // 10), *[Keys.ARROW_RIGHT] * (value % 10))


def current_trial(browser):
    return browser.execute_script("return state.session.trials[state.index].id")


def rate_trial(browser, test, values):
    trial_id = current_trial(browser)
    rows = browser.find_elements("css selector", "#stimuli .row")
    for row in rows:
        set_slider(browser, row, values[group(test, trial_id, row.get_attribute("data-stimulus"))])
    wait(lambda: browser.execute_script(
        "return Object.keys(state.session.trials[state.index].ratings).length") == len(rows)
        and browser.find_element("id", "status").text.startswith("saved"), what="the saves")
    return trial_id


def shown_values(browser):
    return {row.get_attribute("data-stimulus"): row.find_element("css selector", ".value").text
            for row in browser.find_elements("css selector", "#stimuli .row")}


def test_rate_reload_two_raters_and_report(browser, served, tmp_path):
    test = served["test"]
    names = [c["name"] for c in test.conditions]
    for rater in ("alice", "bob"):
        open_page(browser, served, rater)
        for number, values in enumerate(VALUES[rater]):
            assert current_trial(browser) == test.trial_ids[number]
            states = wait(lambda: (s := audio_states(browser)) and all(r >= 2 and e is None for r, e, _, _ in s)
                          and s, what="every <audio> to load")
            assert len(states) == len(test.trial(test.trial_ids[number])["stimuli"]) + 1     # + the open reference
            assert all(n != 3 for _, _, n, _ in states)        # NETWORK_NO_SOURCE
            source = browser.page_source
            assert not any(name in source for name in names if "/" in name) and "anchor" not in source
            trial_id = rate_trial(browser, test, values)
            if number == 0:         # reload: the ratings come back, and the page goes on at the next trial
                before = shown_values(browser)
                open_page(browser, served, rater)
                assert current_trial(browser) == test.trial_ids[1]
                browser.find_element("id", "previous").click()
                assert current_trial(browser) == trial_id and shown_values(browser) == before
                assert before == {s: str(values[group(test, trial_id, s)]) for s in before}
                browser.find_element("id", "next").click()
        browser.find_element("id", "next").click()       # "Finish"
        wait(lambda: browser.find_element("id", "finished").is_displayed(), what="the end")
        browser.find_element("id", "reveal").click()
        cells = wait(lambda: browser.find_elements("css selector", "#key td"), what="the key")
        rows = [[c.text for c in cells[i:i + 3]] for i in range(0, len(cells), 3)]
        assert {r[2] for r in rows} == set(names) and len(rows) == len(names) * len(test.trial_ids)

    done = study_cli("report", served["out"] / "listening")
    assert done.returncode == 0, done.stderr
    assert "dropped by the BS.1534 post-screening" in done.stdout and "bob (100% of trials)" in done.stdout

    # Recompute from the saved ratings: the last value per (rater, trial, condition), bob dropped.
    from scipy import stats
    saved = {}
    for path in (served["out"] / "listening" / "ratings").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            saved[(record["rater"], record["trial"], record["condition"])] = record["value"]
    assert {k: v for k, v in saved.items()} == {(r, t, c): VALUES[r][i][c.split("/")[0]] for r in VALUES
                                                 for i, t in enumerate(test.trial_ids) for c in names}
    table = {row["condition"]: row for row in csv.DictReader(open(served["out"] / "listening" / "report" /
                                                                  "ratings.csv"))}
    for name in names:
        values = [v for (r, _, c), v in saved.items() if r == "alice" and c == name]
        mean = sum(values) / len(values)
        half = stats.t.ppf(0.975, len(values) - 1) * stats.tstd(values) / math.sqrt(len(values))
        assert float(table[name]["mean"]) == pytest.approx(mean, abs=1e-9)
        assert float(table[name]["ci95"]) == pytest.approx(half, abs=1e-9)
    best, other = "spectral", "target"         # alice: spectral 45, 60 against target 35, 40
    pairs = [(saved[("alice", t, f"{other}/seed0")], saved[("alice", t, f"{best}/seed0")]) for t in test.trial_ids]
    expected_p = stats.wilcoxon([a for a, _ in pairs], [b for _, b in pairs]).pvalue
    assert float(table[f"{other}/seed0"]["wilcoxon_p_vs_best"]) == pytest.approx(expected_p)
    assert table[f"{best}/seed0"]["best"] == "True"

    results = {row["cell"]: row for row in csv.DictReader(open(served["out"] / "report" / "results.csv"))}
    assert float(results[best]["listening_mean"]) == pytest.approx(52.5)
    assert float(results[other]["listening_wilcoxon_p"]) == pytest.approx(expected_p)
    markdown = (served["out"] / "report" / "results.md").read_text()
    assert "listening (MUSHRA)" in markdown and "**52.5" in markdown
    from mlflow.tracking import MlflowClient
    client = MlflowClient(served["uri"])
    run_id = test.key["study"]["parent_run_id"]
    assert client.get_run(run_id).data.metrics[f"listening_mean_{best}"] == pytest.approx(52.5)
    cell_run = next(c["run_id"] for c in test.conditions if c["name"] == f"{other}/seed0")
    assert client.get_run(cell_run).data.metrics["listening_mean"] == pytest.approx(37.5)

    # More ratings (carol, a careful rater), the report again: everything is updated.
    for trial_id in test.trial_ids:
        for stimulus, condition in test.key["stimuli"][trial_id].items():
            value = {"reference": 100}.get(condition, 50)
            study_post(served, {"rater": "carol", "trial": trial_id, "stimulus": stimulus, "value": value})
    assert study_cli("report", served["out"] / "listening").returncode == 0
    results = {row["cell"]: row for row in csv.DictReader(open(served["out"] / "report" / "results.csv"))}
    assert float(results[best]["listening_mean"]) == pytest.approx((45 + 60 + 50 + 50) / 4)
    assert client.get_run(run_id).data.metrics[f"listening_mean_{best}"] == pytest.approx(51.25)


def study_post(served, body):
    import urllib.request
    request = urllib.request.Request(served["url"] + "/api/rate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_screenshot_nothing_overlaps(browser, served, tmp_path):
    """The page as a rater sees it: labels, buttons, sliders and values within their row, rows apart, text of a
    readable size; the screenshot is kept in the test's folder (docs/listening-study.png is one of these)."""
    served["test"].add_raters(["dana"])
    open_page(browser, served, "dana")
    boxes = browser.execute_script("""
        const box = (e) => { const r = e.getBoundingClientRect();
          return {x: r.left, y: r.top, w: r.width, h: r.height, font: parseFloat(getComputedStyle(e).fontSize),
                  text: e.textContent || e.value || e.tagName}; };
        const rows = [...document.querySelectorAll('#trial .row')];
        return {rows: rows.map(box), parts: rows.map(r => [...r.children].map(box)),
                others: [...document.querySelectorAll('h1, #progress, .instructions, fieldset.loop, nav')].map(box)};
    """)

    def apart(a, b):
        return a["x"] + a["w"] <= b["x"] + 0.5 or b["x"] + b["w"] <= a["x"] + 0.5 or \
            a["y"] + a["h"] <= b["y"] + 0.5 or b["y"] + b["h"] <= a["y"] + 0.5
    everything = boxes["rows"] + boxes["others"]
    for i, a in enumerate(everything):
        assert a["w"] > 0 and a["h"] > 0, a
        for b in everything[i + 1:]:
            assert apart(a, b), (a, b)
    for row, parts in zip(boxes["rows"], boxes["parts"]):
        for i, a in enumerate(parts):
            assert a["font"] >= 12 and a["w"] > 0, a
            assert row["x"] <= a["x"] and a["x"] + a["w"] <= row["x"] + row["w"] + 0.5, (row, a)
            for b in parts[i + 1:]:
                assert apart(a, b), (a, b)
    assert browser.save_screenshot(str(tmp_path / "page.png"))
    print(f"screenshot: {tmp_path / 'page.png'}")
