"""The rating page's server: the standard library's ThreadingHTTPServer, serving one test folder.

Hand-written rather than gradio: the page is one HTML file, one script and one style sheet with no
third-party code, so it works offline with nothing fetched from a CDN, and the server is ~200 lines whose
every route is listed here and tested (gradio would add a large dependency whose front end and its assets'
offline behaviour we would have to audit).

    GET  /                      the page (package data: page/index.html, page.js, page.css)
    GET  /api/session?rater=R   the rater's trials: per trial the open reference and the stimuli, shuffled per
                                rater and trial and labelled A, B, ... (no condition names), and their ratings
    POST /api/rate              {"rater", "trial", "stimulus", "value"}: validated, appended (ratings.py)
    GET  /api/reveal?rater=R    the conditions behind the rater's letters, only once the rater rated everything
    GET  /audio/<trial>/<file>  a player, from the test's audio/ folder only (Range requests for seeking)
Anything else is 404: key.json, ratings/ and .token are never served. On 127.0.0.1 (the default) no token is
asked; listening on a network (--network) needs the test's token in the link (?token=...), which the page keeps
in a cookie for its audio and API requests.
"""
from __future__ import annotations

import hmac
import json
import random
import re
import string
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from music_continuation.study.ratings import (
    AUDIO_DIR,
    TOKEN_FILE,
    StudyError,
    Test,
    append_rating,
    rater_done,
    rater_state,
    read_ratings,
    validate,
)

PAGE_DIR = Path(__file__).resolve().parent / "page"
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/page.js": ("page.js", "text/javascript; charset=utf-8"),
              "/page.css": ("page.css", "text/css; charset=utf-8")}
TOKEN_COOKIE = "study_token"
MAX_BODY = 4096            # bytes: one rating is ~100
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]+$")


def letters(count: int) -> list[str]:
    return list(string.ascii_uppercase[:count]) if count <= 26 else [f"S{i + 1}" for i in range(count)]


def shuffled_stimuli(test: Test, rater: str, trial: dict) -> list[dict]:
    """The trial's stimuli in this rater's order (seeded by the test, rater and trial: the same on every
    visit), labelled A, B, ..."""
    names = sorted(trial["stimuli"])
    random.Random(f"{test.hash}/{rater}/{trial['id']}").shuffle(names)
    return [{"id": name, "letter": letter, "url": "/" + trial["stimuli"][name]}
            for name, letter in zip(names, letters(len(names)))]


def session(test: Test, rater: str) -> dict:
    records = read_ratings(test)
    state = rater_state(test, records, rater)
    trials = [{"id": t["id"], "reference": "/" + t["reference"], "stimuli": shuffled_stimuli(test, rater, t),
               "seam_seconds": t["seam_seconds"], "context_start_seconds": t["context_start_seconds"],
               "duration_seconds": t["duration_seconds"], "ratings": state.get(t["id"], {})}
              for t in test.public["trials"]]
    return {"title": test.public["title"], "rater": rater, "trials": trials,
            "done": rater_done(test, records, rater)}


def audio_file(test: Test, path: str) -> Path | None:
    """The file under the test's audio/ folder that a URL path names, or None: '..', absolute paths, odd
    characters and anything that resolves (through a symlink) outside audio/ are refused."""
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "" or parts[1] != AUDIO_DIR:
        return None
    if not all(SAFE_SEGMENT.match(part) and part not in (".", "..") for part in parts[2:]):
        return None
    root = (test.folder / AUDIO_DIR).resolve()
    candidate = (root / "/".join(parts[2:])).resolve()
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    return candidate


class Handler(BaseHTTPRequestHandler):
    server: "StudyServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    # ---- plumbing
    def send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, data, headers: dict | None = None) -> None:
        self.send(status, json.dumps(data).encode(), "application/json", headers)

    def error(self, status: int, message: str) -> None:
        self.send_json(status, {"error": message})

    def authorised(self, query: dict) -> tuple[bool, dict]:
        """(may this request go on?, headers to add): the token from the link (then set as a cookie) or the
        cookie; always yes on loopback."""
        token = self.server.token
        if token is None:
            return True, {}
        given = (query.get("token") or [""])[0]
        if given and hmac.compare_digest(given, token):
            return True, {"Set-Cookie": f"{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"}
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == TOKEN_COOKIE and hmac.compare_digest(value, token):
                return True, {}
        return False, {}

    def parsed(self):
        url = urllib.parse.urlsplit(self.path)
        return urllib.parse.unquote(url.path), urllib.parse.parse_qs(url.query)

    # ---- routes
    def do_HEAD(self):  # noqa: N802 - http.server's names
        self.do_GET()

    def do_GET(self):  # noqa: N802
        path, query = self.parsed()
        allowed, headers = self.authorised(query)
        if not allowed:
            return self.error(HTTPStatus.FORBIDDEN, "this test needs its token: open the link you were given")
        if path in PAGE_FILES:
            name, content_type = PAGE_FILES[path]
            return self.send(HTTPStatus.OK, (PAGE_DIR / name).read_bytes(), content_type, headers)
        if path == "/api/session":
            rater = (query.get("rater") or [""])[0]
            if rater not in self.server.test.raters:
                return self.send_json(HTTPStatus.OK, {"title": self.server.test.public["title"],
                                                      "raters": self.server.test.raters, "rater": None})
            try:
                return self.send_json(HTTPStatus.OK, session(self.server.test, rater), headers)
            except StudyError as error:
                return self.error(HTTPStatus.CONFLICT, str(error))
        if path == "/api/reveal":
            return self.reveal((query.get("rater") or [""])[0])
        if path.startswith(f"/{AUDIO_DIR}/"):
            file = audio_file(self.server.test, path)
            if file is not None:
                return self.send_file(file)
        return self.error(HTTPStatus.NOT_FOUND, "not found")

    def reveal(self, rater: str):
        test = self.server.test
        if rater not in test.raters:
            return self.error(HTTPStatus.NOT_FOUND, f"unknown rater {rater!r}")
        records = read_ratings(test)
        if not rater_done(test, records, rater):
            return self.error(HTTPStatus.FORBIDDEN, "the key is shown once every trial is rated")
        key = {t["id"]: {s["letter"]: test.condition_of(t["id"], s["id"]) for s in shuffled_stimuli(test, rater, t)}
               for t in test.public["trials"]}
        return self.send_json(HTTPStatus.OK, key)

    def send_file(self, file: Path) -> None:
        """The file, or the byte range asked for (a browser seeks in an <audio> by Range requests)."""
        data = file.read_bytes()
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if not match or not (match.group(1) or match.group(2)):
            return self.send(HTTPStatus.OK, data, "audio/wav", {"Accept-Ranges": "bytes"})
        first, last = match.groups()
        if first:
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        else:
            start, end = max(0, len(data) - int(last)), len(data) - 1
        if start > end or start >= len(data):
            return self.send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", "audio/wav",
                             {"Content-Range": f"bytes */{len(data)}"})
        return self.send(HTTPStatus.PARTIAL_CONTENT, data[start:end + 1], "audio/wav",
                         {"Accept-Ranges": "bytes", "Content-Range": f"bytes {start}-{end}/{len(data)}"})

    def do_POST(self):  # noqa: N802
        path, query = self.parsed()
        allowed, _ = self.authorised(query)
        if not allowed:
            return self.error(HTTPStatus.FORBIDDEN, "this test needs its token: open the link you were given")
        if path != "/api/rate":
            return self.error(HTTPStatus.NOT_FOUND, "not found")
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            return self.error(HTTPStatus.BAD_REQUEST, f"a rating is a JSON body of at most {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise StudyError("the body must be a JSON object")
            record = validate(self.server.test, body.get("rater"), body.get("trial"), body.get("stimulus"),
                              body.get("value"))
            append_rating(self.server.test, record)
        except json.JSONDecodeError:
            return self.error(HTTPStatus.BAD_REQUEST, "the body is not JSON")
        except StudyError as error:
            return self.error(HTTPStatus.BAD_REQUEST, str(error))
        return self.send_json(HTTPStatus.OK, {"saved": True})


class StudyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, test: Test, host: str, port: int, network: bool, verbose: bool = False):
        if not network and host not in LOOPBACK:
            raise StudyError(f"--host {host}: serving beyond this machine needs --network (the link then "
                             f"carries the test's token)")
        self.test, self.verbose = test, verbose
        self.token = (test.folder / TOKEN_FILE).read_text().strip() if network else None
        try:
            super().__init__((host, port), Handler)
        except OSError as error:
            raise StudyError(f"--port {port}: cannot listen on {host} ({error.strerror or error})") from None

    def links(self, host_name: str | None = None) -> list[str]:
        host, port = self.server_address[:2]
        shown = host_name or ("127.0.0.1" if host in ("0.0.0.0", "") else host)
        token = f"&token={self.token}" if self.token else ""
        return [f"http://{shown}:{port}/?rater={urllib.parse.quote(r)}{token}" for r in self.test.raters] or \
               [f"http://{shown}:{port}/" + (f"?token={self.token}" if self.token else "")]


def start_in_thread(server: StudyServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread
