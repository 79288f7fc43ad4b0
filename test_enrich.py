"""
Tests for enrich.py against local fake Groq and lyrics.ovh servers (127.0.0.1, no internet).

The fakes inject 429 (retry-after: 0), 500, slow answers (client timeouts) and malformed bodies
at a chosen rate; whether a request is faulty depends only on (seed, request key, attempt number),
so a run is reproducible whatever the thread timing. They count the successful answers per key,
which is how "no successful request is ever repeated" is checked.

Run enrich.py itself against the fakes (what `make enrich FAKE=1` does):
    python test_enrich.py fake DATASET [enrich.py options]      (FAKE_FAULT_RATE=0.2 by default)
"""

import csv
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import pytest

import collect
import enrich
from test_collect import (CATALOG, RawServer, deadline, drip, http_date, raw_answer, send_raw,
                          tiny_crawl)  # deadline: autouse, 150 s a test

HERE = Path(__file__).resolve().parent
KEY = "gsk_FAKE_7f3c9e_never_leak_0451"
VOCAB = ("love loss night city road fire river heart dream summer rain freedom youth war home light "
         "dance storm memory faith ocean shadow morning silence hope").split()
NOT_FOUND = "Nobody Knows"      # artist without lyrics: 404
NAMES_ONCE = "Narcissus"        # the fake model names this artist unless told strictly not to
NAMES_ALWAYS = "Echo Chamber"   # ... and this one always: the title is kept

# (item, artist, track, tag); titles are the track names
TRACKS = [
    ("i01", "The Beatles", "Hey Jude - Remastered 2015", "rock"),
    ("i02", "AC/DC", "Back In Black", "rock"),               # '/' must be URL-encoded
    ("i03", "Beyoncé", "Halo", "pop"),
    ("i04", "Sigur Rós", "Hoppípolla", "post-rock"),
    ("i05", "Guns N' Roses", "Sweet Child O' Mine", "rock"),
    ("i06", "Simon & Garfunkel", "The Sound of Silence", "folk"),
    ("i07", "Erick Sermon", "Music (feat. Marvin Gaye)", "hip-hop"),
    ("i08", NOT_FOUND, "Lost Tapes #1?", "indie"),           # '#' and '?' too
    ("i09", NAMES_ONCE, "Mirror Song", "pop"),
    ("i10", NAMES_ALWAYS, "Reverb 50%", "electronic"),
    ("i11", "The Beatles", "Hey Jude - Remastered 2015", "rock"),   # same song: one request for both rows
    ("i12", "Journey", "Don't Stop Believin' (2024 Remaster)", "rock"),
    ("i13", "", "Untitled", "misc"),                          # no artist: no request, title kept
]

# -----------------------------------------------------------------------------
# fake servers


def fake_words(text, n):
    digest = hashlib.sha256(text.encode()).digest() * 4
    return [VOCAB[b % len(VOCAB)] for b in digest[:n]]


def fake_lyrics(artist, track):
    """Site boilerplate, section markers and blank lines around 60 words; the excerpt is words[:25]."""
    words = fake_words(f"{artist}/{track}", 60)
    lines = [" ".join(words[i:i + 6]) for i in range(0, 60, 6)]
    return (f"Paroles de la chanson {track} par {artist}\r\n[Verse 1]\r\n" + "\r\n".join(lines[:2])
            + "\r\n\r\n[Chorus: Someone]\r\n" + "\n".join(lines[2:5]) + "\n\n\nVerse 2:\n" + "\n".join(lines[5:]))


def fake_answer(prompt):
    """A chatty model: preamble, quotes, 30 words (too many), and sometimes the artist's name."""
    words = fake_words(prompt, 30)
    if NAMES_ALWAYS in prompt or (NAMES_ONCE in prompt and "Do not use" not in prompt):
        words[3] = NAMES_ALWAYS if NAMES_ALWAYS in prompt else NAMES_ONCE
    return 'Here is a 25-word summary:\n\n"' + " ".join(words).capitalize() + '."'


def completion(model, content):
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 40, "total_tokens": 80}}


class Fakes:
    def __init__(self, fault_rate=0.0, seed=0, slow=1.0, key=KEY):
        self.fault_rate, self.seed, self.slow, self.key = fault_rate, seed, slow, key
        self.lock = threading.Lock()
        self.tries, self.successes, self.faults = Counter(), Counter(), Counter()
        self.prompts = []
        self.hang_after = None   # after this many successes, hold new requests until released
        self.arrivals, self.retry_after = [], "0"   # (time, server) of every request; the 429s' retry-after
        self.hung, self.released = threading.Event(), threading.Event()
        self.paths = []          # every request's path as it came over the wire
        self.garbled = True      # False: the GARBLED artists answer like any other (a passing fault is over)
        self.raw, self.raw_left, self.raw_on = None, 0, None   # raw(handler): the next raw_left requests for
        # "Artist 0" to the server of handler class raw_on

    def start(self):
        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for handler in (GroqHandler, LyricsHandler)]
        for server in self.servers:
            server.fakes, server.daemon_threads = self, True
            server.handle_error = lambda *a: None   # clients that timed out: broken pipes are expected
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        self.groq_url, self.lyrics_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers)
        return self

    def stop(self):
        self.released.set()
        for server in self.servers:
            server.shutdown()
            server.server_close()

    def env(self):
        return {"GROQ_API_KEY": self.key, "GROQ_BASE_URL": self.groq_url, "LYRICS_BASE_URL": self.lyrics_url}

    def fault(self, key):
        with self.lock:
            attempt = self.tries[key]
            self.tries[key] += 1
            hang = self.hang_after is not None and sum(self.successes.values()) >= self.hang_after
        if hang:
            self.hung.set()
            self.released.wait()
            return "dropped"
        rng = random.Random(f"{self.seed}/{key}/{attempt}")
        if rng.random() >= self.fault_rate:
            return None
        kind = rng.choice(["429", "500", "slow", "malformed"])
        with self.lock:
            self.faults[kind] += 1
        return kind


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, status, body, headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def raw_fault(self, chosen):
        """Record the raw path; when chosen, on the server fakes.raw_on and some are left, answer with fakes.raw:
        bytes as they go on the wire, or byte chunks sent one by one."""
        fakes = self.server.fakes
        with fakes.lock:
            fakes.paths.append(self.path)
            fakes.arrivals.append((time.time(), "raw")) if chosen else None
            use = chosen and fakes.raw is not None and fakes.raw_left > 0 and isinstance(self, fakes.raw_on)
            fakes.raw_left -= use
        if use:
            send_raw(self, fakes.raw(self))
        return use

    def answer(self, key, status, body, malformed):
        fakes = self.server.fakes
        with fakes.lock:
            fakes.arrivals.append((time.time(), key[0]))
        fault = fakes.fault(key)
        if fault == "dropped":
            return self.send(503, {"error": "dropped"})
        if fault == "429":
            with fakes.lock:
                fakes.arrivals.append((time.time(), "429"))
            return self.send(429, {"error": {"message": "Rate limit reached", "type": "requests"}},
                             [("retry-after", fakes.retry_after)])
        if fault == "500":
            return self.send(500, {"error": {"message": "Internal Server Error"}})
        if fault == "slow":   # longer than the client's timeout, then no usable answer anyway
            time.sleep(fakes.slow)
            return self.send(504, {"error": "gateway timeout"})
        if fault == "malformed":
            return self.send(200, random.Random(str(key)).choice(malformed))
        with fakes.lock:
            fakes.successes[key] += 1
        self.send(status, body)


class GroqHandler(Handler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path != "/openai/v1/chat/completions":
            return self.send(404, {"error": {"message": f"Unknown request URL: {self.path}"}})
        if self.headers.get("authorization") != f"Bearer {self.server.fakes.key}":
            return self.send(401, {"error": {"message": "Invalid API Key", "type": "invalid_request_error",
                                             "code": "invalid_api_key"}})
        prompt = body["messages"][-1]["content"]
        with self.server.fakes.lock:
            self.server.fakes.prompts.append(prompt)
        if self.raw_fault("by Artist 0 in" in prompt):
            return
        hostile = [v for k, v in HOSTILE_GROQ.items() if (f"by {k} in" in prompt or f"by {k}:" in prompt)
                   and (self.server.fakes.garbled or k not in GARBLED)]
        if hostile:
            status, answer = hostile[0](self.server.fakes.key)
            return self.answer(("chat", body["model"], prompt), status,
                               completion(body["model"], answer) if status == 200 and not isinstance(answer, bytes)
                               and not isinstance(answer, dict) else answer, [b"{}"])
        self.answer(("chat", body["model"], prompt), 200, completion(body["model"], fake_answer(prompt)),
                    [b'{"id": "chatcmpl-fake", "choices": [{"ind', b'{"id": "chatcmpl-fake", "object": "chat.completion"}',
                     b"<html>Bad gateway</html>"])


class LyricsHandler(Handler):
    def do_GET(self):
        parts = self.path.split("/")
        if len(parts) != 4 or parts[1] != "v1":   # an unencoded '/' or '?' breaks the path
            return self.send(400, {"error": "bad path"})
        artist, track = unquote(parts[2]), unquote(parts[3])
        if self.raw_fault(artist == "Artist 0"):
            return
        if artist in HOSTILE_LYRICS and (self.server.fakes.garbled or artist not in GARBLED):
            return self.answer(("lyrics", artist, track), 200, HOSTILE_LYRICS[artist], [b"{}"])
        if artist == NOT_FOUND:
            return self.answer(("lyrics", artist, track), 404, {"error": "No lyrics found"}, [b"{}"])
        self.answer(("lyrics", artist, track), 200, {"lyrics": fake_lyrics(artist, track)},
                    [b'{"lyrics": "Paroles', b'{"lyric": "typo"}', b'{"lyrics": null}'])


# hostile answers (artist -> what the server sends), each one seen from real services or plausible
HOSTILE_LYRICS = {
    "L list": {"lyrics": ["la", "la"]}, "L null": {"lyrics": None}, "L missing": {"error": "?"},
    "L html": b"<html><body>Lyrics</body></html>", "L long": {"lyrics": "x" * 10_000 + " and more words"},
    "L evil": {"lyrics": '=HYPERLINK("http://evil")\x00 evil \u202eright to left\u202c text'},
    "L empty": {"lyrics": ""},
}
GARBLED = {"L list", "L null", "L missing", "L html", "G html"}   # unreadable: passing faults, retried, not cached
HOSTILE_GROQ = {   # key -> (status, content, or a whole body when bytes/dict)
    "G null": lambda key: (200, None), "G number": lambda key: (200, 42),
    "G no choices": lambda key: (200, {"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": []}),
    "G html": lambda key: (200, b"<html>Bad gateway</html>"),
    "G echo": lambda key: (200, f"A song about the secret {key} and the night."),
    "G echo 400": lambda key: (400, {"error": {"message": f"Invalid request for key {key}"}}),
    "G evil": lambda key: (200, "@SUM(1+1)\x07 dreams \u202eof the road\u2066 home"),
}


@pytest.fixture
def fakes():
    fakes = Fakes().start()
    yield fakes
    fakes.stop()

# -----------------------------------------------------------------------------
# helpers

COLUMNS = ["item", "artist", "track", "tag", "title", "summary", "lyrics", "year"]
FAST = ["--backoff", "0.001", "--timeout", "0.5", "--workers", "4", "--groq-rate", "0", "--lyrics-rate", "0"]


def make_dataset(root, name="demo", tracks=TRACKS):
    folder = Path(root) / name
    folder.mkdir(parents=True)
    with open(folder / "items.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)   # odd values that pandas would mangle if read carelessly: NA, 007, ""
        for n, (item, artist, track, tag) in enumerate(tracks):
            w.writerow([item, artist, track, tag, track, "", "old, text" if n == 0 else "", ["NA", "007", ""][n % 3]])
    (folder / "users.csv").write_text("user,country\nalice,FR\n")
    (folder / "interactions.csv").write_text("user,item,timestamp\nalice,i01,1700000000\n")
    return folder / "items.csv"


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def run_inprocess(monkeypatch, fakes, root, *args):
    for name, value in fakes.env().items():
        monkeypatch.setenv(name, value)
    return enrich.main(["demo", "--data-dir", str(root), *FAST, *args])


def run_subprocess(fakes, root, *args, key=KEY):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROQ")} | fakes.env() | {"GROQ_API_KEY": key}
    return subprocess.run([sys.executable, str(HERE / "enrich.py"), "demo", "--data-dir", str(root), *FAST, *args],
                          env=env, capture_output=True, text=True, timeout=60)

# -----------------------------------------------------------------------------
# post-processing


@pytest.mark.parametrize("raw, expected", [
    ('Here is a summary: "A lonely soul searches for meaning."', "A lonely soul searches for meaning."),
    ('Sure! Here is a 25-word summary:\n\n"Love lost and found again."', "Love lost and found again."),
    ("Summary: **Hope after a long night.** (6 words)", "Hope after a long night."),
    ("\u201cYouth, freedom and the open road.\u201d", "Youth, freedom and the open road."),
    ("'Quiet hope in hard times.'", "Quiet hope in hard times."),
    ("Don't give up, keep rockin'", "Don't give up, keep rockin'"),
    (" ".join(f"w{i}" for i in range(40)) + ".", " ".join(f"w{i}" for i in range(25))),
    ("", ""),
])
def test_clean_summary(raw, expected):
    assert enrich.clean_summary(raw) == expected
    assert len(enrich.clean_summary(raw).split()) <= 25


def test_names_song():
    assert enrich.names_song("The Beatles sing about healing", "The Beatles", "Hey Jude")
    assert enrich.names_song("what the beatles meant", "The Beatles", "Hey Jude")   # without "The"
    assert enrich.names_song("hey, jude! a ballad of comfort", "The Beatles", "Hey Jude - Remastered 2015")
    assert enrich.names_song("Beyonce finds her halo", "Beyoncé", "Halo")          # accents ignored
    assert not enrich.names_song("A ballad of comfort for a friend", "The Beatles", "Hey Jude")
    assert not enrich.names_song("a haloed saint", "Beyoncé", "Halo")              # whole words only


def test_clean_track():
    assert enrich.clean_track("Music (feat. Marvin Gaye)") == "Music"
    assert enrich.clean_track("Don't Stop Believin' (2024 Remaster)") == "Don't Stop Believin'"
    assert enrich.clean_track("Hey Jude - Remastered 2015") == "Hey Jude"
    assert enrich.clean_track("Reverb 50%") == "Reverb 50%"
    assert enrich.clean_track("(Live)") == "(Live)"   # nothing left: keep as is


def test_lyrics_excerpt():
    raw = ("Paroles de la chanson Hey Jude par The Beatles\r\n[Verse 1]\r\nHey Jude, don't make it bad\r\n\r\n\r\n"
           "[Chorus: Paul]\nTake a sad song and make it better\nChorus:\n(Verse 2)\nRemember to [x2] let her into your heart\n"
           + "na " * 50)
    excerpt = enrich.lyrics_excerpt(raw)
    assert excerpt.startswith("Hey Jude, don't make it bad Take a sad song and make it better Remember to let her")
    assert len(excerpt.split()) == 25 and "[" not in excerpt and "Paroles" not in excerpt
    assert enrich.lyrics_excerpt("\n\n[Instrumental]\n\n") == ""
    assert enrich.lyrics_excerpt(fake_lyrics("A", "B")) == " ".join(fake_words("A/B", 60)[:25])


def test_read_dotenv(tmp_path):
    (tmp_path / ".env").write_text("# secrets\nexport GROQ_API_KEY='abc'\nOTHER = x=y\n\nnonsense\n")
    assert enrich.read_dotenv(tmp_path / ".env") == {"GROQ_API_KEY": "abc", "OTHER": "x=y"}
    assert enrich.read_dotenv(tmp_path / "missing") == {}


def test_retries_backoff_and_retry_after():
    stats, sleeps, calls = enrich.Stats(), [], []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise enrich.Transient("429", retry_after=0.25)
        if len(calls) < 4:
            raise enrich.Transient("5xx")
        return "ok"
    sleep = lambda seconds, why: sleeps.append(seconds)
    assert enrich.with_retries(flaky, 4, 0.1, stats, sleep=sleep, rand=lambda: 0.5) == "ok"
    assert sleeps == [0.25, 0.2, 0.4]   # retry-after honoured (longer than the backoff), then 0.1 * 2**k (jitter 1.0)
    assert stats.counts == {"transient 429": 1, "transient 5xx": 2}
    with pytest.raises(enrich.Transient):   # bounded
        enrich.with_retries(lambda: (_ for _ in ()).throw(enrich.Transient("timeout")), 2, 0.1, stats, sleep=sleep)
    assert stats.counts["transient timeout"] == 3
    with pytest.raises(enrich.Permanent):   # other 4xx: not retried
        enrich.with_retries(lambda: (_ for _ in ()).throw(enrich.Permanent(400)), 2, 0.1, stats, sleep=sleep)
    # a retry-after that is no wait (0.0: 0 or less, NaN, empty, unreadable) backs off as usual and says so; one that
    # is a wait holds every worker (hold) and this request still backs off; max_backoff caps the backoff
    for retry_after, held in ((0.0, []), (0.05, [0.05, 0.05, 0.05])):
        waits, holds = [], []
        with pytest.raises(enrich.Transient):
            enrich.with_retries(lambda: (_ for _ in ()).throw(enrich.Transient("429", retry_after)), 3, 0.1, stats,
                                max_backoff=0.3, sleep=lambda s, why: waits.append((s, why)), rand=lambda: 0.5,
                                hold=holds.append)
        assert [s for s, _ in waits] == [0.1, 0.2, 0.3] and holds == held
        assert all(("Retry-After is no wait" in why) == (retry_after == 0) for _, why in waits)
    assert enrich.parse_retry_after({"retry-after": "2"}) == 2.0
    assert enrich.parse_retry_after({"retry-after-ms": "150", "retry-after": "9"}) == 0.15
    assert enrich.parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0   # in the past
    assert enrich.parse_retry_after({}) is None


def test_summary_retries_once_then_falls_back(tmp_path):
    cache, stats = enrich.Cache(tmp_path / "c.sqlite"), enrich.Stats()
    retry = lambda call: enrich.with_retries(call, 1, 0, stats)
    asked = []

    def model(answers):
        return lambda prompt: asked.append(prompt) or answers[len(asked) - 1]
    ask = model(["Here is one: Prince sings of purple rain.", "A storm that washes old love away."])
    assert enrich.summary_job("Prince", "Purple Rain", ask, "m", cache, stats, retry) == \
        ("A storm that washes old love away.", "ok")
    assert "Do not use" in asked[1] and "Do not use" not in asked[0]
    asked.clear()
    ask = model(["Prince wrote this about loss.", "A song by prince."])
    assert enrich.summary_job("Prince", "Purple Rain 2", ask, "m", cache, stats, retry) == (None, "names song/artist")
    assert len(asked) == 2
    asked.clear()   # both answers are cached: asking again costs nothing
    assert enrich.summary_job("Prince", "Purple Rain 2", ask, "m", cache, stats, retry) == (None, "names song/artist")
    assert asked == []
    ask = lambda prompt: (_ for _ in ()).throw(enrich.Permanent(400))
    assert enrich.summary_job("X", "Y", ask, "m", cache, stats, retry) == (None, "http 400")
    cache.close()

# -----------------------------------------------------------------------------
# end to end against the fakes


def test_end_to_end(tmp_path, fakes, monkeypatch, capsys):
    items = make_dataset(tmp_path)
    before = read_rows(items)
    assert run_inprocess(monkeypatch, fakes, tmp_path) == 0
    out = capsys.readouterr().out
    after = read_rows(items)
    assert [r["item"] for r in after] == [r["item"] for r in before]
    for b, a in zip(before, after):   # nothing but summary and lyrics changes
        assert {k: v for k, v in a.items() if k not in ("summary", "lyrics")} == \
               {k: v for k, v in b.items() if k not in ("summary", "lyrics")}
    rows = {r["item"]: r for r in after}
    for item, artist, track, _ in TRACKS:
        row = rows[item]
        assert row["summary"] and len(row["summary"].split()) <= 25 and '"' not in row["summary"]
        assert not row["summary"].startswith("Here")
        if artist and artist not in (NOT_FOUND,):
            assert row["lyrics"] == " ".join(fake_words(f"{artist}/{enrich.clean_track(track)}", 60)[:25]), item
    assert rows["i08"]["lyrics"] == "Lost Tapes #1?"           # 404 -> title
    assert rows["i10"]["summary"] == "Reverb 50%"              # names the artist twice -> title
    assert NAMES_ONCE not in rows["i09"]["summary"]            # named once, the strict retry was clean
    assert rows["i13"]["summary"] == rows["i13"]["lyrics"] == "Untitled"
    assert rows["i01"] == rows["i11"] | {"item": "i01", "year": rows["i01"]["year"]}
    assert "summary  : 11 real, 2 title fallback (names song/artist 1, no artist/track 1)" in out
    assert "lyrics   : 11 real, 2 title fallback (no artist/track 1, not found 1)" in out
    # the two songs named by the model were asked twice; the duplicate song once; the artist-less row never
    assert len(fakes.prompts) == 11 + 2 and max(fakes.successes.values()) == 1

    first = items.read_bytes()   # a rerun: everything from the cache, same bytes
    tries = sum(fakes.tries.values())
    assert run_inprocess(monkeypatch, fakes, tmp_path) == 0
    assert items.read_bytes() == first and sum(fakes.tries.values()) == tries
    assert "0 new answers, 13 from cache" in capsys.readouterr().out


def test_twenty_percent_faults_lose_nothing(tmp_path, monkeypatch, capsys):
    tracks = TRACKS + [(f"x{n:02d}", f"Artist {n}", f"Song {n}", "pop") for n in range(20)]
    clean, faulty = Fakes().start(), Fakes(fault_rate=0.2, seed=7).start()
    try:
        make_dataset(tmp_path / "a", tracks=tracks)
        make_dataset(tmp_path / "b", tracks=tracks)
        assert run_inprocess(monkeypatch, clean, tmp_path / "a") == 0
        t0 = time.time()
        assert run_inprocess(monkeypatch, faulty, tmp_path / "b") == 0
        out = capsys.readouterr().out.split("coverage of")[-1]   # the faulty run
    finally:
        clean.stop(), faulty.stop()
    assert (tmp_path / "a/demo/items.csv").read_bytes() == (tmp_path / "b/demo/items.csv").read_bytes()
    assert set(faulty.faults) == {"429", "500", "slow", "malformed"}, faulty.faults
    assert sum(faulty.faults.values()) >= 10
    assert max(faulty.successes.values()) == 1 and set(faulty.successes) == set(clean.successes)
    assert "still failing" not in out and "transient errors retried: none" not in out
    print(f"faults injected {dict(faulty.faults)}; {time.time() - t0:.1f}s\n{out}")


def test_exhausted_retries_are_not_cached(tmp_path, monkeypatch, capsys):
    items = make_dataset(tmp_path)
    down = Fakes(fault_rate=1.0).start()   # everything fails
    try:
        assert run_inprocess(monkeypatch, down, tmp_path, "--what", "lyrics", "--retries", "1") == 1
    finally:
        down.stop()
    assert "still failing after 2 attempts" in capsys.readouterr().out
    assert {r["lyrics"] for r in read_rows(items)} <= {t[2] for t in TRACKS}   # titles kept
    up = Fakes().start()
    try:
        assert run_inprocess(monkeypatch, up, tmp_path, "--what", "lyrics") == 0
    finally:
        up.stop()
    assert read_rows(items)[1]["lyrics"] == " ".join(fake_words("AC/DC/Back In Black", 60)[:25])


@pytest.mark.parametrize("fraction", [0.3, 0.7])
@pytest.mark.slow
def test_kill_and_resume(tmp_path, fraction, monkeypatch, capsys):
    reference = Fakes(fault_rate=0.2, seed=3, slow=0.3).start()   # an uninterrupted run
    try:
        make_dataset(tmp_path / "ref")
        assert run_inprocess(monkeypatch, reference, tmp_path / "ref") == 0
    finally:
        reference.stop()
    expected = (tmp_path / "ref/demo/items.csv").read_bytes()
    total = sum(reference.successes.values())

    fakes = Fakes(fault_rate=0.2, seed=3, slow=0.3).start()
    try:
        items = make_dataset(tmp_path / "run")
        original = items.read_bytes()
        fakes.hang_after = int(total * fraction)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GROQ")} | fakes.env()
        cmd = [sys.executable, str(HERE / "enrich.py"), "demo", "--data-dir", str(tmp_path / "run"),
               "--backoff", "0.001", "--timeout", "2", "--workers", "4", "--groq-rate", "0", "--lyrics-rate", "0"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert fakes.hung.wait(30), "the run never reached the kill point"
        time.sleep(0.5)   # answers already sent reach the cache
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert items.read_bytes() == original   # killed before the end: items.csv untouched
        done = sum(fakes.successes.values())
        assert 0 < done < total
        fakes.hang_after = None
        fakes.released.set()
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
    finally:
        fakes.stop()
    assert items.read_bytes() == expected
    assert max(fakes.successes.values()) == 1, "a successful request was repeated after the kill"
    assert set(fakes.successes) == set(reference.successes)
    cached = sum(int(n) for n in re.findall(r"(\d+) from cache", second.stdout))
    fresh = sum(int(n) for n in re.findall(r"(\d+) new answers", second.stdout))
    assert (cached, fresh) == (done, total - done)   # the rerun asked only for what the killed run lacked


@pytest.mark.slow
def test_api_key_never_leaks(tmp_path, fakes):
    fakes.fault_rate = 0.2
    make_dataset(tmp_path)
    result = run_subprocess(fakes, tmp_path)
    assert result.returncode == 0, result.stderr
    wrong = run_subprocess(fakes, tmp_path, "--what", "summary", "--model", "other", key=KEY[::-1])
    assert wrong.returncode == 2 and "refused the API key" in wrong.stderr and "Traceback" not in wrong.stderr
    for text in (result.stdout, result.stderr, wrong.stdout, wrong.stderr):
        assert KEY not in text and KEY[::-1] not in text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == ".enrich-cache.sqlite" for p in files)
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


def test_user_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GROQ_API_KEY", raising=False)
    monkeypatch.setattr(enrich, "DOTENV", tmp_path / "no.env")
    assert enrich.main(["nope", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no dataset folder" in err

    items = make_dataset(tmp_path)
    original = items.read_bytes()
    assert enrich.main(["demo", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "GROQ_API_KEY is not set" in err and "export GROQ_API_KEY=" in err and err.count("\n") == 1
    assert items.read_bytes() == original and not (items.parent / ".enrich-cache.sqlite").exists()

    (items.parent / "items.csv").write_text("item,artist\ni1,x\n")
    assert enrich.main(["demo", "--data-dir", str(tmp_path), "--what", "lyrics"]) == 2
    assert "lacks column(s) track, title" in capsys.readouterr().err
    assert not (items.parent / ".enrich-cache.sqlite").exists()

    (items.parent / "items.csv").write_text("item,artist,track,title\n")          # header only: nothing to do
    assert enrich.main(["demo", "--data-dir", str(tmp_path), "--what", "lyrics"]) == 2
    assert "has no rows" in capsys.readouterr().err

    for flag, value in (("--workers", "0"), ("--retries", "-1"), ("--limit", "0"), ("--timeout", "inf"),
                        ("--max-wait", "nan"), ("--lyrics-rate", "-1"), ("--backoff", "inf"), ("--max-backoff", "-1")):
        assert enrich.main(["demo", "--data-dir", str(tmp_path), flag, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} {value}") and err.count("\n") == 1, err


def test_one_definition_of_the_retry_options():
    """collect.py and enrich.py take the same retry options from one place (collect.add_retry_options)."""
    import argparse
    assert enrich.add_retry_options is collect.add_retry_options and enrich.check_numbers is collect.check_numbers
    flags = ["--retries", "3", "--backoff", "0.5", "--max-backoff", "7", "--timeout", "9", "--max-wait", "11",
             "--retry-failed"]
    e = enrich.parse_args(["demo", *flags])
    p = argparse.ArgumentParser()
    collect.add_retry_options(p, 8, "x")
    c = p.parse_args(flags)
    assert {k: getattr(e, k) for k in vars(c)} == vars(c) == {"retries": 3, "backoff": 0.5, "max_backoff": 7.0,
                                                           "timeout": 9.0, "max_wait": 11.0, "retry_failed": True}


def test_lyrics_only_needs_no_key_and_limit(tmp_path, fakes, monkeypatch, capsys):
    items = make_dataset(tmp_path)
    monkeypatch.setattr(enrich, "DOTENV", tmp_path / "no.env")
    fakes.key = "unused"
    monkeypatch.delenv("GROQ_API_KEY", raising=False)
    monkeypatch.setenv("LYRICS_BASE_URL", fakes.lyrics_url)
    assert enrich.main(["demo", "--data-dir", str(tmp_path), "--what", "lyrics", "--limit", "3", *FAST]) == 0
    before, after = read_rows(make_dataset(tmp_path / "fresh")), read_rows(items)
    assert [r["lyrics"] != "" for r in after] == [True] * 3 + [False] * (len(TRACKS) - 3)
    assert [r["summary"] for r in after] == [r["summary"] for r in before]
    assert "coverage of 3 rows" in capsys.readouterr().out


def test_summary_from_lyrics(tmp_path, fakes, monkeypatch):
    items = make_dataset(tmp_path)
    assert run_inprocess(monkeypatch, fakes, tmp_path, "--what", "summary", "--summary-from", "lyrics") == 0
    excerpt = " ".join(fake_words("Journey/Don't Stop Believin'", 60)[:25])
    assert any(excerpt in p and "first words" in p for p in fakes.prompts)
    assert not any("first words" in p and NOT_FOUND in p for p in fakes.prompts)   # no lyrics: asked from the title
    assert [r["lyrics"] for r in read_rows(items)][:2] == ["old, text", ""]        # lyrics column left alone


def test_real_catalog_names(tmp_path, fakes, monkeypatch):
    """Artist and track names from the Apple Music sample survive URL-encoding and the CSV round trip."""
    source = HERE.parent / "shared/data/apple-music-10k/apple_music_dataset.csv"
    if not source.is_file():
        pytest.skip("../shared/data/apple-music-10k not present")
    with open(source, newline="", encoding="utf-8") as f:
        rows = [r for _, r in zip(range(12), csv.DictReader(f))]
    tracks = [(f"a{n}", r["artistName"], r["trackName"], r["primaryGenreName"]) for n, r in enumerate(rows)]
    items = make_dataset(tmp_path, tracks=tracks)
    assert run_inprocess(monkeypatch, fakes, tmp_path, "--what", "lyrics") == 0
    for (_, artist, track, _), row in zip(tracks, read_rows(items)):
        assert row["lyrics"] == " ".join(fake_words(f"{artist}/{enrich.clean_track(track)}", 60)[:25])

# -----------------------------------------------------------------------------
# hostile answers, Ctrl-C, rate limits


HOSTILE_TRACKS = [(f"h{n:02d}", artist, "Zyx", "x") for n, artist in enumerate(list(HOSTILE_LYRICS) + list(HOSTILE_GROQ))
                  if artist not in GARBLED] + [
    ("h50", ".", "..", "x"), ("h51", "..", "Zyx", "x"), ("h52", "Erick Sermon", "Music", "x"),
    ("h53", "Erick Sermon", "Music (feat. Marvin Gaye)", "x"), ("h54", NOT_FOUND, "-Title-", "x"),
    ("h55", NOT_FOUND, '=HYPERLINK("http://x")', "x")]


def clean_cell(text):
    return (len(text) <= enrich.MAX_CHARS and len(text.split()) <= enrich.MAX_WORDS and (not text or text[0] not in "=+-@")
            and not re.search("[\x00-\x1f\x7f\u202a-\u202e\u2066-\u2069]", text))


def test_hostile_answers_finish_with_permanent_fallbacks(tmp_path, fakes, monkeypatch, capsys):
    items = make_dataset(tmp_path, tracks=HOSTILE_TRACKS)
    assert run_inprocess(monkeypatch, fakes, tmp_path) == 0          # only permanent fallbacks: done
    out, err = capsys.readouterr()
    rows = {r["item"]: r for r in read_rows(items)}
    first, tries = items.read_bytes(), sum(fakes.tries.values())
    assert "Traceback" not in err and "still failing" not in out
    assert "no text answer 2" in out and "no answer 1" in out and "http 400" in out
    for r in rows.values():
        assert clean_cell(r["summary"]) and clean_cell(r["lyrics"]), r
    by_artist = {r["artist"]: r for r in rows.values()}
    assert by_artist["L evil"]["lyrics"].startswith('HYPERLINK("http://evil") evil right to left text')
    assert len(by_artist["L long"]["lyrics"]) <= enrich.MAX_CHARS
    assert by_artist["G evil"]["summary"] == "SUM(1+1) dreams of the road home"
    assert by_artist["G echo"]["summary"] == "A song about the secret and the night."   # key scrubbed
    assert by_artist["."]["lyrics"] != ".." and by_artist[".."]["lyrics"] != "Zyx"    # found, not a 400
    assert {"/v1/%2E/%2E%2E", "/v1/%2E%2E/Zyx"} <= set(fakes.paths)                 # '.' stays encoded on the wire
    assert rows["h55"]["lyrics"] == 'HYPERLINK("http://x")' and rows["h54"]["lyrics"] == "Title-"
    music = [k for k in fakes.tries if "Erick Sermon" in str(k)]
    assert len(music) == 2 and max(fakes.tries[k] for k in music) == 1     # Music and Music (feat. ...): once each
    for kind in ("lyrics", "chat"):   # a final answer is cached at once: never asked twice
        assert max(n for k, n in fakes.tries.items() if k[0] == kind) == 1
    assert run_inprocess(monkeypatch, fakes, tmp_path) == 0          # rerun: nothing asked, same bytes
    assert items.read_bytes() == first and sum(fakes.tries.values()) == tries
    files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert KEY.encode() not in files and KEY not in out + err + "".join(capsys.readouterr())


@pytest.mark.slow
def test_ctrl_c_stops_within_two_seconds(tmp_path):
    fakes = Fakes().start()
    fakes.hang_after = 0                           # every request hangs until released
    try:
        make_dataset(tmp_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GROQ")} | fakes.env()
        # the child gets SIGINT's default disposition: a test run started in the background of a non-interactive
        # shell (CI runners do this) inherits SIGINT ignored, and Python then keeps ignoring it
        proc = subprocess.Popen([sys.executable, str(HERE / "enrich.py"), "demo", "--data-dir", str(tmp_path),
                                 "--timeout", "30", "--lyrics-rate", "0"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert fakes.hung.wait(30)
        time.sleep(0.3)
        t = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        took = time.monotonic() - t
    finally:
        fakes.stop()
    print(f"Ctrl-C -> exit {proc.returncode} after {took:.2f}s")
    assert proc.returncode == 130 and took < 2, (took, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted")
    assert len([l for l in err.splitlines() if "interrupted" in l or "rror" in l]) == 1


def test_bad_base_url_and_second_run(tmp_path, fakes, monkeypatch, capsys):
    make_dataset(tmp_path)
    monkeypatch.setenv("GROQ_BASE_URL", "localhost:8000")
    monkeypatch.setenv("GROQ_API_KEY", KEY)
    assert enrich.main(["demo", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: GROQ_BASE_URL 'localhost:8000' is not an http(s) URL"
    monkeypatch.setenv("GROQ_BASE_URL", "http://127.0.0.1:notaport")
    assert enrich.main(["demo", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: GROQ_BASE_URL 'http://127.0.0.1:notaport' has an invalid port"
    assert not (tmp_path / "demo" / ".enrich-cache.sqlite").exists()
    with collect.dataset_lock(tmp_path / "demo", "collect.py match x"):   # as if another writer held it
        assert run_inprocess(monkeypatch, fakes, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"another run is using dataset {tmp_path / 'demo'}: pid {os.getpid()} " \
        "(collect.py match x) holds" in err


def max_per_window(times, window=1.0):
    """The most events in any window [t, t + `window`) seconds (a limiter at rate r spaces starts 1 / r apart: r
    in every such window of 1 s, r + 1 in a closed one)."""
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u - t < window) for i, t in enumerate(times)), default=0)


def test_rate_limit_shared_by_workers_with_retry_after(tmp_path, monkeypatch, capsys):
    """8 workers at --lyrics-rate 5 with 429s (Retry-After 1): every request the server saw went through the limiter,
    whose departures (sent(): a bound taken after the request has left) keep 5 in any second; the server's arrivals
    show no burst, and nobody sends during a hold."""
    tracks = [(f"r{n:02d}", f"Artist {n}", f"Song {n}", "pop") for n in range(16)]
    departures, sent = [], collect.RateLimiter.sent
    monkeypatch.setattr(collect.RateLimiter, "sent", lambda self, start: departures.append(sent(self, start)) or
                        departures[-1])
    fakes = Fakes(fault_rate=0.15, seed=11).start()
    fakes.retry_after = "1"
    fakes.fault = lambda key, f=fakes.fault: "429" if f(key) else None   # every injected fault is a 429
    try:
        make_dataset(tmp_path, tracks=tracks)
        for name, value in fakes.env().items():
            monkeypatch.setenv(name, value)
        assert enrich.main(["demo", "--data-dir", str(tmp_path), "--what", "lyrics", "--workers", "8",
                            "--lyrics-rate", "5", "--backoff", "0.001"]) == 0
    finally:
        fakes.stop()
    arrivals = [t for t, kind in fakes.arrivals if kind == "lyrics"]
    limited = [t for t, kind in fakes.arrivals if kind == "429"]
    assert len(arrivals) >= 16 and limited and len(departures) == len(arrivals)
    assert max_per_window(departures, 1.0) <= 5, sorted(departures)
    # the server stamps an arrival when its handler thread runs: on a loaded machine that lags the departure by
    # up to a tenth of a second or more (a fresh-clone make test once saw 6 arrivals in 0.9 s while the limiter
    # kept 5 a second), so the arrivals are only checked for a burst (8 workers unlimited send 8 at once)
    assert max_per_window(arrivals, 0.9) <= 6, sorted(arrivals)
    for t in limited:   # after a 429 with retry-after 1, nobody sends for a second (requests in flight aside)
        assert not [u for u in arrivals if t + 0.3 < u < t + 0.95], (t, arrivals)


@pytest.mark.slow
def test_rate_limiter_across_processes(tmp_path):
    """Two processes x 3 threads on one state file, each request sent a random while (up to 0.3 s) after it was
    allowed: never more than --rate sends in a second. The sends are the limiter's own records (sent(): monotonic
    clock, one for every process of the machine, taken under the lock after the request has left)."""
    code = (f"import random, sys, threading, time; sys.path.insert(0, {str(HERE)!r}); import collect as m\n"
            f"lim, out = m.RateLimiter({str(tmp_path / 'state')!r}, 8), []\n"
            "def work():\n    for _ in range(5):\n        place = lim.wait()[1]\n"
            "        time.sleep(random.uniform(0, 0.3))\n        out.append(lim.sent(place))\n"
            "ts = [threading.Thread(target=work) for _ in range(3)]\n[t.start() for t in ts]; [t.join() for t in ts]\n"
            "print(' '.join(map(repr, out)))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    times = [float(x) for p in procs for x in p.communicate(timeout=60)[0].split()]
    assert len(times) == 30 and max_per_window(times) <= 8


def test_helpers_behave_alike_in_collect_and_enrich(tmp_path):
    import inspect
    import collect
    for name in ("RateLimiter", "dataset_lock", "read_dotenv", "atomic_write", "clean_text", "norm_name", "check_base_url"):
        assert inspect.getsource(getattr(collect, name)) == inspect.getsource(getattr(enrich, name)), name
    for s in ["AC/DC", "Beyoncé & Jay-Z", "Don\u2019t Stop", "P!nk", "  The  Beatles ", "Sigur Rós", "x\u202ey\x00z"]:
        assert collect.norm_name(s) == enrich.norm_name(s) and collect.clean_text(s) == enrich.clean_text(s)
    env = tmp_path / ".env"
    env.write_text("export LASTFM_API_KEY='a'\nGROQ_API_KEY=b\n")
    assert collect.read_dotenv(env) == enrich.read_dotenv(env) == {"LASTFM_API_KEY": "a", "GROQ_API_KEY": "b"}
    assert collect.DOTENV == enrich.DOTENV == HERE / ".env"
    import recsetters
    for m, write in ((collect, collect.atomic_write), (enrich, enrich.atomic_write), (recsetters, recsetters.atomic_write)):
        f = tmp_path / f"{m.__name__}.csv"
        f.write_text("old")
        f.chmod(0o640)
        write(f, b"new")
        assert f.read_bytes() == b"new" and (f.stat().st_mode & 0o777) == 0o640
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    old = os.umask(0o027)
    try:
        collect.atomic_write_text(tmp_path / "new.txt", "Zoë\n")             # a new file: the umask's mode
    finally:
        os.umask(old)
    assert (tmp_path / "new.txt").read_bytes() == "Zoë\n".encode() and (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o640


def test_log_prints_like_print(capsys):
    collect.log("a", 1, None)
    collect.log()
    collect.log("x\ny")
    assert capsys.readouterr() == ("", "a 1 None\n\nx\ny\n")


def test_collect_and_enrich_output_loads_in_recsetters(tmp_path, fakes, monkeypatch):
    """What collect.write_dataset writes, and what an enrich pass makes of it, is read back by
    recsetters.load_dataset as written: no value mangled (NA, 007, empty), texts filled."""
    import pandas as pd
    import collect
    import recsetters
    names = [("u1", "NA"), ("007", ""), ("Zoë", "Chile"), ("None", "Peru")]
    tracks = [(item, artist, track, tag) for item, artist, track, tag in TRACKS if artist] + [("NA", "Nan", "null", "")]
    users = pd.DataFrame(names, columns=["user", "country"])
    items = pd.DataFrame([(i, a, t, g, t, "", "") for i, a, t, g in tracks], columns=collect.ITEM_COLS)
    inter = pd.DataFrame([(u, i, str(1_600_000_000 + k) if k % 3 else "") for k, ((u, _), (i, *_)) in
                          enumerate((n, t) for n in names for t in tracks)], columns=["user", "item", "timestamp"])
    collect.write_dataset(tmp_path / "rt", users, items, inter)
    ds = recsetters.load_dataset(tmp_path, "rt")
    assert sorted(ds.users.user) == sorted(users.user) and list(ds.users.set_index("user").country.loc[["u1", "007"]]) == ["NA", ""]
    assert sorted(ds.items.item) == sorted(items.item) and ds.items.set_index("item").track["NA"] == "null"
    assert len(ds.inter) == len(inter) and ds.inter.timestamp.isna().sum() == sum(inter.timestamp == "")
    for name, value in fakes.env().items():
        monkeypatch.setenv(name, value)
    assert enrich.main(["rt", "--data-dir", str(tmp_path), *FAST]) == 0
    ds2 = recsetters.load_dataset(tmp_path, "rt")
    assert (ds2.items.summary != "").all() and (ds2.items.lyrics != "").all()
    assert ds2.items.drop(columns=["summary", "lyrics"]).equals(ds.items.drop(columns=["summary", "lyrics"]))
    assert ds2.inter.equals(ds.inter) and ds2.users.equals(ds.users)

def test_enrich_collect_enrich_loses_no_text(tmp_path, fakes, monkeypatch, capsys):
    """enrich, then a collect rerun whose crawl dropped one track and found two more, then enrich again: the texts of
    every item kept survive the rerun (summary, lyrics, and a column a user added), the dropped item is gone, the new
    ones are filled by the second enrich without asking again for the others, and the three files agree throughout
    (at b25c7b3 the collect rerun wrote 0 summaries)."""
    data = tmp_path / "data"
    cat = tiny_crawl(data, loved=CATALOG[:4])
    match = ["--data-dir", str(data), "match", str(cat), "--name", "apple", "--no-tags"]
    collect.main(match)
    for name, value in fakes.env().items():
        monkeypatch.setenv(name, value)
    items = data / "apple" / "items.csv"
    assert enrich.main(["apple", "--data-dir", str(data), *FAST]) == 0
    first = pd.read_csv(items, dtype=str, keep_default_na=False).assign(note=lambda d: "mine " + d.track)
    first.to_csv(items, index=False)                                          # a column the user added
    assert (first.summary != "").all() and (first.lyrics != "").all() and len(first) == 4
    tiny_crawl(data, loved=CATALOG[1:])                                       # the crawl changed
    collect.main(match)
    second = pd.read_csv(items, dtype=str, keep_default_na=False).set_index("item")
    collect.check_dataset_consistent(data / "apple")
    kept = first.set_index("item").drop(index=first.item[first.artist == "Björk"])
    assert len(second) == 5 and "Björk" not in set(second.artist)
    assert second.loc[kept.index, ["summary", "lyrics", "note"]].equals(kept[["summary", "lyrics", "note"]])
    new = second.index.difference(kept.index)
    assert len(new) == 2 and (second.loc[new, ["summary", "lyrics", "note"]] == "").all().all()
    assert enrich.main(["apple", "--data-dir", str(data), *FAST]) == 0
    third = pd.read_csv(items, dtype=str, keep_default_na=False).set_index("item")
    collect.check_dataset_consistent(data / "apple")
    assert third.drop(index=new).equals(second.drop(index=new))               # kept texts untouched
    assert (third.summary != "").all() and (third.lyrics != "").all() and max(fakes.successes.values()) == 1
    assert "kept from" in capsys.readouterr().out


def test_enrich_writes_into_items_csv_as_it_is_at_the_end(tmp_path, fakes, monkeypatch):
    """enrich reads items.csv again before it writes: a change made while it asked (here a column added and a row's
    tag edited by hand) stays, and only the columns asked for (--what lyrics: no summary column appears) change."""
    items = make_dataset(tmp_path)
    rows = read_rows(items)
    items.write_text("item,artist,track,tag,title\n" + "".join(f"{r['item']},\"{r['artist']}\",\"{r['track']}\","
                                                             f"{r['tag']},\"{r['title']}\"\n" for r in rows))
    edited = []

    def edit(key, fault=fakes.fault):
        if not edited:
            edited.append(key)
            df = pd.read_csv(items, dtype=str, keep_default_na=False).assign(note="n")
            df.loc[0, "tag"] = "edited"
            collect.atomic_write_text(items, df.to_csv(index=False))
        return fault(key)
    fakes.fault = edit
    assert run_inprocess(monkeypatch, fakes, tmp_path, "--what", "lyrics") == 0
    after = read_rows(items)
    assert edited and list(after[0]) == ["item", "artist", "track", "tag", "title", "note", "lyrics"]
    assert after[0]["tag"] == "edited" and {r["note"] for r in after} == {"n"} and all(r["lyrics"] for r in after)

# -----------------------------------------------------------------------------
# the wire: raw answers (bytes as they go out) and what a server can make us do


GOOD_LYRICS = json.dumps({"lyrics": fake_lyrics("Artist 0", "Song 0")}).encode()
WIRE_TRACKS = [("w0", "Artist 0", "Song 0", "pop"), ("w1", "Artist 1", "Song 1", "pop")]
WIRE_FAULTS = {   # name: (raw answer to the requests for Artist 0, how many get it, exit code of the first run)
    "html 200": (lambda h: raw_answer(200, b"<html>Bad gateway</html>", [("Content-Type", "text/html")]), 2, 1),
    "empty 200": (lambda h: raw_answer(200), 2, 1),
    "Latin-1 bytes, no charset": (lambda h: raw_answer(200, '{"lyrics": "Paroles \u00e9t\u00e9"}'.encode("latin-1")), 2, 1),
    "truncated body": (lambda h: raw_answer(200, GOOD_LYRICS[:30], [("Content-Length", len(GOOD_LYRICS))]), 2, 1),
    "nested 100k levels": (lambda h: raw_answer(200, b"[" * 100_000 + b"]" * 100_000), 2, 1),
    "5 MB body": (lambda h: raw_answer(200, b'{"lyrics": "' + b"la " * (5 << 19) + b'"}'), 2, 1),
    "302 to another host": (lambda h: raw_answer(302, headers=[("Location", h.server.fakes.other.url + "/v1/a/b")]), 2, 1),
    "Retry-After 999999999": (lambda h: raw_answer(429, b"{}", [("Retry-After", "999999999")]), 1, 1),
    "Groq retry-after-ms 1e15": (lambda h: raw_answer(429, b"{}", [("retry-after-ms", "1e15")]), 1, 1),
    "Groq 307 to another host": (lambda h: raw_answer(307, headers=[("Location", h.server.fakes.other.url + "/x")]), 2, 1),
    # passing faults the same run gets over
    "UTF-8 BOM": (lambda h: raw_answer(200, b"\xef\xbb\xbf" + GOOD_LYRICS), 1, 0),
    "byte drip": (lambda h: drip(raw_answer(200, headers=[("Content-Length", len(GOOD_LYRICS))]), GOOD_LYRICS), 1, 0),
    "Retry-After: HTTP date in 2 s": (lambda h: raw_answer(429, b"{}", [("Retry-After", http_date(2))]), 1, 0),
}


@pytest.fixture(scope="module")
def wire_reference(tmp_path_factory):
    d, fakes, mp = tmp_path_factory.mktemp("wire"), Fakes().start(), pytest.MonkeyPatch()
    try:
        make_dataset(d, tracks=WIRE_TRACKS)
        assert run_inprocess(mp, fakes, d) == 0
    finally:
        mp.undo()
        fakes.stop()
    return (d / "demo" / "items.csv").read_bytes()


@pytest.mark.parametrize("name", list(WIRE_FAULTS))
def test_wire_faults_are_bounded_and_a_rerun_completes(name, wire_reference, tmp_path, monkeypatch, capsys):
    """Each raw answer: no hang, no traceback, the right class of failure (a passing fault is retried and never
    cached; a Retry-After beyond --max-wait stops the run with one line naming the API), and a plain rerun
    against the healthy server writes the fault-free items.csv."""
    fault, n, code = WIRE_FAULTS[name]
    fakes, other = Fakes().start(), RawServer(lambda h: raw_answer(200, b"{}"))
    fakes.other, fakes.raw, fakes.raw_left = other, fault, n
    fakes.raw_on = GroqHandler if name.startswith("Groq") else LyricsHandler
    items = make_dataset(tmp_path, tracks=WIRE_TRACKS)
    try:
        t = time.monotonic()
        assert run_inprocess(monkeypatch, fakes, tmp_path, "--retries", "1") == code
        took, first = time.monotonic() - t, capsys.readouterr()
        if code:
            assert fakes.raw_left <= 0
            assert run_inprocess(monkeypatch, fakes, tmp_path, "--retries", "1") == 0
    finally:
        fakes.stop()
        other.stop()
    print(f"{name}: first run exit {code} after {took:.2f}s; {first.err.strip()[-150:]}")
    assert took < 6 and "Traceback" not in first.err and other.paths == []
    errors = [line for line in first.err.splitlines() if line.startswith("error:")]
    if "retry-after" in name.lower() and code:
        api = "Groq" if name.startswith("Groq") else "lyrics.ovh"
        assert len(errors) == 1 and errors[0].startswith(f"error: {api} asked to wait") and "rerun after" in errors[0]
    elif code:
        assert not errors and "1 request(s) still failing after 2 attempts" in first.out
    if "HTTP date" in name:   # the date was honoured: Artist 0 asked again >= 1 s later (whole seconds: 1-2 s)
        again = [t for t, kind in fakes.arrivals if kind == "raw"]
        assert len(again) >= 2 and again[1] - again[0] >= 1.0
    assert items.read_bytes() == wire_reference
    for state in tmp_path.glob(".enrich-rate-*"):
        assert "hold" not in json.loads(state.read_text() or "{}")


def test_garbled_answers_are_passing_faults_and_retry_failed(tmp_path, monkeypatch, capsys):
    """Answers that cannot be read (lyrics that are not text, HTML) are retried, not cached: exit 1, and a rerun
    once the server is well gets the real texts. --retry-failed asks again for what was cached as final."""
    tracks = [(f"g{n}", artist, "Zyx", "x") for n, artist in enumerate(sorted(GARBLED))] + [("n", NOT_FOUND, "Song", "x")]
    fakes = Fakes().start()
    try:
        make_dataset(tmp_path / "ref", tracks=tracks)
        fakes.garbled = False
        assert run_inprocess(monkeypatch, fakes, tmp_path / "ref") == 0
        fakes.garbled = True
        items = make_dataset(tmp_path / "run", tracks=tracks)
        assert run_inprocess(monkeypatch, fakes, tmp_path / "run", "--retries", "1") == 1
        assert "5 request(s) still failing" in capsys.readouterr().out
        fakes.garbled = False
        tries = Counter(fakes.tries)
        assert run_inprocess(monkeypatch, fakes, tmp_path / "run", "--retries", "1") == 0
        assert items.read_bytes() == (tmp_path / "ref/demo/items.csv").read_bytes()
        asked = {k for k in fakes.tries if fakes.tries[k] > tries[k]}
        assert len(asked) >= len(GARBLED) and not [k for k in asked if NOT_FOUND in str(k) and k[0] == "lyrics"]
        assert run_inprocess(monkeypatch, fakes, tmp_path / "run", "--retry-failed") == 0
        again = [k for k in fakes.tries if k[0] == "lyrics" and k[1] == NOT_FOUND]
        assert again and fakes.tries[again[0]] == 3                   # ref, run, and --retry-failed: asked again
        assert "asking again for" in capsys.readouterr().err
    finally:
        fakes.stop()


def test_cache_forgets_passing_faults_and_final_answers_on_request(tmp_path):
    cache = enrich.Cache(tmp_path / "c.sqlite")
    for key, value in [("old", {"status": "malformed"}), ("404", {"status": "ok", "text": ""}),
                       ("400", {"status": "http 400"}), ("bad bytes", {"status": "ok", "text": "P\ufffdroles"}),
                       ("good", {"status": "ok", "text": "Paroles"})]:
        cache.put([key], value)
    assert cache.get(["old"]) is None                  # an older version cached a passing fault: asked again
    assert cache.get(["404"]) == {"status": "ok", "text": ""}
    assert cache.forget_failures() == 4 and cache.get(["good"]) and not cache.get(["bad bytes"])
    cache.close()


def test_a_poisoned_saved_hold_is_ignored(tmp_path, fakes, monkeypatch, capsys):
    make_dataset(tmp_path, tracks=WIRE_TRACKS)
    (tmp_path / ".enrich-rate-lyrics").write_text(json.dumps({"times": [], "until": time.time() + 1e9}))
    t = time.monotonic()
    assert run_inprocess(monkeypatch, fakes, tmp_path, "--what", "lyrics") == 0
    assert time.monotonic() - t < 5 and "ignoring a saved wait" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# python test_enrich.py fake DATASET [options]: enrich.py against the fakes


def fake_main(argv):
    fakes = Fakes(fault_rate=float(os.environ.get("FAKE_FAULT_RATE", "0.2")), seed=0, slow=1.0).start()
    os.environ.update(fakes.env())   # always the fake key: a real one is never sent anywhere
    print(f"fake Groq at {fakes.groq_url}, fake lyrics.ovh at {fakes.lyrics_url}, "
          f"fault rate {fakes.fault_rate:.0%}", file=sys.stderr)
    try:
        return enrich.main(["--backoff", "0.01", "--timeout", "0.5", "--groq-rate", "0", "--lyrics-rate", "0", *argv])
    finally:
        print(f"faults injected: {dict(fakes.faults) or 'none'}", file=sys.stderr)
        fakes.stop()


if __name__ == "__main__":
    if sys.argv[1:2] != ["fake"]:
        sys.exit("usage: python test_enrich.py fake DATASET [enrich.py options]   (tests: pytest test_enrich.py)")
    sys.exit(fake_main(sys.argv[2:]))
