"""
enrich.py: fill the `summary` and `lyrics` columns of data/<DATASET>/items.csv.

    python enrich.py DATASET [--what both|summary|lyrics] [--model M] [--workers N] ...

summary  A 25-word description of the song's meaning, asked of a Groq chat model with the
         study's prompt (the important meaning of the song by the artist in 25 words without
         naming the song or the artist), temperature 0. Answers are cleaned (quotes,
         "Here is a summary:" preambles, cut to 25 words); an answer that names the song or
         the artist is asked again once with a stricter prompt, then the title is kept.
         --summary-from lyrics asks about the 25-word lyrics excerpt instead (the study's
         future work).
lyrics   The first 25 words of the lyrics from lyrics.ovh, without section markers ([Chorus]),
         blank lines and the site's boilerplate. Full lyrics are never stored, not even in
         the cache. Not found -> the title is kept.

Model: the study used `llama3-8b-8192`, which Groq has retired. The default here is
`llama-3.1-8b-instant`: the same Llama 3 family and size (8B), Groq's current small and
cheapest chat model, so it is the closest stand-in. Any other model: --model.

Every answer (also "not found") is cached in data/<DATASET>/.enrich-cache.sqlite under
(kind, artist, track, model, prompt version) the moment it arrives, so a killed run resumes
without repeating a successful request, and items.csv is a pure function of the cache. Answers
from a non-default GROQ_BASE_URL / LYRICS_BASE_URL (e.g. the test fakes) are kept apart: that
URL becomes part of the model field of the key.
429, 5xx, timeouts and bodies that cannot be read (not JSON, HTML, empty, truncated, undecodable
bytes, over 4 MB or nested over 64 levels, lyrics that are not text, a Groq body that is not a
completion) are passing faults: retried with exponential backoff and jitter (--retries, --backoff,
--max-backoff: the retry options of collect.py); every retry backs off. A retry-after (seconds,
HTTP date or retry-after-ms) also holds every worker and every run on the same --data-dir, up to
--max-wait seconds (default 300); a longer one stops the run at once (exit 1) with the time to
rerun; one that is no wait (0 or less, NaN, empty, unreadable) is ignored. Waits over 3 s print a
line. Answers a rerun cannot change are cached with their reason and keep the title: other 4xx,
404/empty lyrics, a Groq completion without text, a summary that names the song twice
(--retry-failed asks again). A request whose temporary failures outlast every attempt keeps the
title, is NOT cached (a rerun asks again) and makes the exit code 1; exit 0 means only permanent
fallbacks remain.
Titles that clean to the same name ("Music", "Music (feat. X)") are asked once.
Every request has --timeout seconds in all (connect and every read); redirects to another host
are not followed; bodies are decoded with their declared charset, a BOM dropped.

Requests per second are limited per API (--groq-rate, default 0.5: Groq's free tier allows 30
requests/minute for llama-3.1-8b-instant; --lyrics-rate, default 2: lyrics.ovh publishes no
limit, so a conservative one), for all workers together and for every run on the same --data-dir
(a locked state file data/.enrich-rate-<api>). A run holds the dataset's writer lock
(collect.dataset_lock): a second writer of it (enrich.py, collect.py) refuses with one line naming
this one, and this one refuses while another writes it.

Everything written to items.csv is cleaned: NFC, no control, zero-width or bidi-override
characters, at most 25 words and 300 characters, never starting with = + - @ (spreadsheet
formulas). Path segments of lyrics.ovh URLs are fully percent-encoded ('.' and '..' too); the
key is scrubbed from model answers. items.csv is read again before it is written and replaced
atomically (fsync, mode kept); only the columns asked for (--what) change, other columns and the
row order are kept as they are. Ctrl-C stops at once (exit 130), answers so far stay cached.

Environment: GROQ_API_KEY (or a line GROQ_API_KEY=... in the git-ignored .env next to this
file), GROQ_BASE_URL, LYRICS_BASE_URL (default https://api.lyrics.ovh).
"""

import argparse
import hashlib
import json
import os
import random
import re
import sqlite3
import sys
import threading
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from urllib.parse import quote

import pandas as pd
from tqdm import tqdm

from collect import (DOTENV, _INVISIBLE, MAX_BACKOFF, RETRY_NUMBERS, RateLimiter, Response, RetryLater, Transient,
                     UserError, add_retry_options, atomic_write, back_off, check_base_url, check_numbers, clean_text,
                     dataset_lock, http_request, norm_name, parse_retry_after, pause, read_dotenv)

# -----------------------------------------------------------------------------
# settings

DEFAULT_MODEL = "llama-3.1-8b-instant"
DEFAULT_LYRICS_BASE_URL = "https://api.lyrics.ovh"
DEFAULT_GROQ_BASE_URL = "https://api.groq.com"
PROMPT_VERSION = "p1"   # bump when the prompts below change: old cache entries are then ignored
LYRICS_VERSION = "l1"   # bump when lyrics_excerpt() changes (only excerpts are cached)
MAX_WORDS = 25
MAX_CHARS = 300         # ... and at most this many characters (a "word" can be 10,000 characters long)
RATES = {"groq": 0.5, "lyrics": 2.0}   # default requests/second: Groq's free tier allows 30 requests/minute for
                        # llama-3.1-8b-instant; lyrics.ovh publishes no limit, 2/s is a conservative guess
REQUIRED_COLUMNS = ("item", "artist", "track", "title")

PROMPT = ('Describe the important meaning of the song "{track}" by {artist} in {n} words '
          'without naming the song or the artist.')
PROMPT_LYRICS = ('These are the first words of the song "{track}" by {artist}: "{excerpt}"\n'
                 'Describe the important meaning of the song in {n} words '
                 'without naming the song or the artist.')
STRICT = (' Do not use the words "{track}" or "{artist}" anywhere. '
          'Reply with the description only.')


class Permanent(Exception):
    """An answer a rerun cannot change (a 4xx other than 429 or 404 from lyrics.ovh, a Groq completion without a
    usable answer): cached with its reason, the title is kept. A body that cannot be read is Transient instead."""
    def __init__(self, status):
        self.reason = f"http {status}" if isinstance(status, int) else status
        super().__init__(self.reason)

# -----------------------------------------------------------------------------
# text post-processing (pure functions)

_VERSIONISH = r"(?:feat|ft|featuring|with|remaster|remastered|live|version|edit|mix|remix|mono|stereo|demo|acoustic|radio|bonus|deluxe)"
_PAREN_VERSION = re.compile(rf"\s*[(\[][^)\]]*\b{_VERSIONISH}\b[^)\]]*[)\]]", re.I)
_DASH_VERSION = re.compile(rf"\s+-\s+[^-]*\b{_VERSIONISH}\b.*$", re.I)
_PREAMBLE = re.compile(r"^(?:(?:sure|okay|ok|certainly|of course)\b[,.!]*\s*)?"
                       r"(?:here(?:'s| is| are)\b[^:\n]*:|(?:the |a )?(?:summary|description|answer)\b[^:\n]{0,30}:)\s*", re.I)
_CHATTY_LINE = re.compile(r"^(?:sure|okay|ok|certainly|of course)\b[^\n]{0,60}[.!:]?$", re.I)
_WORD_COUNT = re.compile(r"\s*\(?\b\d+ words\)?\.?$", re.I)
_SECTION_INLINE = re.compile(r"\[[^\]\n]*\]")
_SECTION_LINE = re.compile(r"^\(?(?:verse|chorus|pre-chorus|post-chorus|bridge|intro|outro|hook|refrain|interlude)"
                           r"(?:\s*\d+)?\)?:?$", re.I)
_BOILERPLATE = re.compile(r"^(?:paroles de la chanson\b.*\bpar\b.*|.*\blyrics\.ovh\b.*|\*+.*not for commercial use.*"
                          r"|(?:source|writer\(s\)|songwriters?)\s*:.*)$", re.I)


def clean_track(track):
    """Song name without '(feat. X)', '(2011 Remaster)', ' - Live' decorations (for lookups and name checks)."""
    cleaned = _DASH_VERSION.sub("", _PAREN_VERSION.sub("", track)).strip()
    return cleaned or track.strip()


def names_song(text, artist, track):
    """True when the text contains the artist or the song name as whole words."""
    padded = f" {norm_name(text)} "
    names = {norm_name(artist), norm_name(clean_track(track))}
    names |= {n[4:] for n in names if n.startswith("the ")}   # "The Beatles" -> also "beatles"
    return any(n and f" {n} " in padded for n in names)


def truncate_words(text, n=MAX_WORDS):
    words = text.split()
    return " ".join(words) if len(words) <= n else " ".join(words[:n]).rstrip(",;:-")


def cell_text(text):
    """What goes into items.csv: clean_text, single spaces, at most MAX_WORDS words and MAX_CHARS characters,
    never starting with = + - @ (a spreadsheet would run it as a formula)."""
    text = truncate_words(" ".join(clean_text(text).split()))
    if len(text) > MAX_CHARS:
        cut = text[:MAX_CHARS + 1].rsplit(" ", 1)[0] if " " in text[:MAX_CHARS + 1] else text[:MAX_CHARS]
        text = cut[:MAX_CHARS].rstrip(",;:- ")
    return text.lstrip("=+-@ ")


def clean_summary(raw):
    """Model answer -> one line of at most 25 words, without preambles, quotes or markdown."""
    raw = _INVISIBLE.sub("", unicodedata.normalize("NFC", raw))
    lines = [clean_text(l).strip("*#>- ").strip() for l in raw.replace("\r", "\n").split("\n")]
    lines = [l for l in lines if l]
    while lines and (lines[0].endswith(":") or _CHATTY_LINE.match(lines[0])) and len(lines) > 1:
        lines.pop(0)   # "Sure!" / "Here is a 25-word summary:" on a line of its own
    text = _PREAMBLE.sub("", " ".join(lines)).strip()
    text = re.sub(r'["\u201c\u201d\u00ab\u00bb*]', "", text).strip()
    if len(text) > 1 and text[0] in "'\u2018" and text[-1] in "'\u2019":
        text = text[1:-1].strip()
    text = _WORD_COUNT.sub("", text).strip()
    return truncate_words(text)


def lyrics_excerpt(raw, n=MAX_WORDS):
    """Full lyrics -> their first n words, without section markers, blank lines and boilerplate."""
    kept = []
    raw = _INVISIBLE.sub("", unicodedata.normalize("NFC", raw))
    for line in raw.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = clean_text(_SECTION_INLINE.sub(" ", line))
        if line and not _SECTION_LINE.match(line) and not _BOILERPLATE.match(line):
            kept.append(line)
    return truncate_words(" ".join(kept), n)


def summary_prompt(artist, track, excerpt=None, strict=False):
    track = clean_track(track)
    base = PROMPT_LYRICS if excerpt else PROMPT
    prompt = base.format(track=track, artist=artist, excerpt=excerpt, n=MAX_WORDS)
    return prompt + (STRICT.format(track=track, artist=artist) if strict else "")

# -----------------------------------------------------------------------------
# small helpers shared with collect.py (one copy: atomic write, .env, text cleaning, names, rate limits, locks)

def find_api_key():
    key = os.environ.get("GROQ_API_KEY") or read_dotenv(DOTENV).get("GROQ_API_KEY")
    if not key:
        raise UserError("GROQ_API_KEY is not set; summaries need it. Run `export GROQ_API_KEY=...` or put a line "
                        f"GROQ_API_KEY=... in {DOTENV} (git-ignored), or use --what lyrics.")
    return key


# -----------------------------------------------------------------------------
# cache (SQLite, one committed row per answer) and counters shared by the workers

class Stats:
    def __init__(self):
        self.counts, self.lock = Counter(), threading.Lock()

    def add(self, name, n=1):
        with self.lock:
            self.counts[name] += n


class Cache:
    def __init__(self, path):
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)  # autocommit
        self.db.execute("PRAGMA journal_mode=WAL")       # a committed row survives a killed process
        self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            row = self.db.execute("SELECT value FROM answers WHERE key = ?", (json.dumps(key),)).fetchone()
        value = None if row is None else json.loads(row[0])
        return None if value == {"status": "malformed"} else value   # older versions cached passing faults

    def forget_failures(self):
        """--retry-failed: drop the cached permanent answers (statuses, lyrics not found, texts with U+FFFD that
        an older version decoded from bad bytes) -> how many."""
        with self.lock:
            rows = self.db.execute("SELECT key, value FROM answers").fetchall()
            drop = [(k,) for k, v in rows for v in [json.loads(v)]
                    if v.get("status") != "ok" or not v.get("text") or "\ufffd" in v.get("text", "")]
            self.db.executemany("DELETE FROM answers WHERE key = ?", drop)
        return len(drop)

    def put(self, key, value):
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (json.dumps(key), json.dumps(value)))

    def close(self):
        with self.lock:
            self.db.close()


def cached(cache, stats, key, call):
    """The cached answer for key, or call() -> {"status": "ok", "text": ...}, stored at once.
    Permanent errors are stored too; Transient ones (retries exhausted) propagate, uncached."""
    value = cache.get(key)
    if value is not None:
        stats.add(f"{key[0].split('-')[0]} cached")
        return value
    try:
        value = {"status": "ok", "text": call()}
    except Permanent as e:
        value = {"status": e.reason}
    cache.put(key, value)
    stats.add(f"{key[0].split('-')[0]} requests")
    return value

# -----------------------------------------------------------------------------
# HTTP: retries, lyrics.ovh, Groq

def with_retries(call, retries, backoff, stats, max_backoff=MAX_BACKOFF, sleep=None, rand=random.random, hold=None):
    """call() until it does not raise Transient, at most retries + 1 times, backing off between tries as collect.py
    does (back_off: backoff * 2**k with jitter, at most max_backoff; a server's retry-after holds every worker through
    hold(seconds), and stops the run with WaitTooLong beyond --max-wait). The last Transient propagates (not cached:
    a rerun asks again)."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Transient as e:
            stats.add(f"transient {e.reason}")
            if attempt == retries:
                raise
            back_off(attempt, e.retry_after, backoff, max_backoff, f"{e.reason}, retry {attempt + 1} of {retries}",
                     hold, sleep, rand)


def path_segment(text):
    """Percent-encode one URL path segment, '.' included: an artist named '..' must not climb the path."""
    return quote(text, safe="").replace(".", "%2E")


def fetch_lyrics(base_url, artist, track, timeout, limiter=None):
    """lyrics.ovh -> the 25-word excerpt ('' when not found: a 404). The full text never leaves here.
    Only the 404 and other 4xx are answers; a body without a lyrics string is a passing fault."""
    url = f"{base_url.rstrip('/')}/v1/{path_segment(artist)}/{path_segment(clean_track(track))}"
    r = http_request("GET", url, timeout, limiter=limiter)
    if r.status == 404:
        return ""
    check_status(r)
    data = r.json()
    lyrics = data.get("lyrics") if isinstance(data, dict) else None
    if not isinstance(lyrics, str):
        raise Transient("no lyrics text")
    return lyrics_excerpt(lyrics)


def check_status(r):
    """429 and 5xx (and a redirect left over) are Transient, another 4xx Permanent, 200 passes."""
    if r.status == 429:
        raise Transient("429", parse_retry_after(r.headers))
    if r.status >= 500:
        raise Transient("5xx")
    if r.status >= 400:
        raise Permanent(r.status)
    if r.status != 200:
        raise Transient(f"http {r.status}")


def groq_asker(api_key, model, timeout, base_url=DEFAULT_GROQ_BASE_URL, limiter=None):
    """prompt -> the model's raw answer (the key scrubbed from it), through the `groq` client. Its HTTP goes through
    collect.http_request (a transport of its httpx client), so Groq is bounded like every API here: one deadline
    per request, a body cap, no redirect to another host, bodies decoded by their charset and checked for depth
    before the client parses them. One request per call (the client's own retries are off): with_retries()
    retries, so that the behaviour is explicit and tested. A completion with no choices or a content that is
    not text is a (permanent) answer; a body that is not a completion is a passing fault."""
    import groq
    import httpx

    class Bounded(httpx.BaseTransport):
        def handle_request(self, request):
            r = http_request(request.method, str(request.url), timeout, headers=dict(request.headers),
                             body=request.read(), limiter=limiter)
            # a 200 reaches the client as checked JSON; an error as its status and headers only (Retry-After)
            body = json.dumps(r.json()).encode() if r.status == 200 else b""
            headers = {k: v for k, v in r.headers.items() if k.lower() in ("retry-after", "retry-after-ms")}
            return httpx.Response(r.status, headers={**headers, "content-type": "application/json"}, content=body,
                                  request=request)

    client = groq.Groq(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout,
                       http_client=httpx.Client(transport=Bounded(), follow_redirects=False))

    def ask(prompt):
        try:
            completion = client.chat.completions.create(model=model, temperature=0, max_tokens=100,
                                                        messages=[{"role": "user", "content": prompt}])
        except groq.APIStatusError as e:       # never show e itself: keep messages short and key-free
            status = e.status_code
            if status in (401, 403):
                raise UserError(f"Groq refused the API key (HTTP {status}); check GROQ_API_KEY.")
            if status == 404:
                raise UserError(f"Groq answered 404 for model {model!r}: unknown model (see --model) or wrong "
                                "GROQ_BASE_URL.")
            check_status(Response(status, e.response.headers, b""))
            raise Transient(f"http {status}")
        except groq.APIConnectionError as e:   # the transport's Transient (deadline, cap, bad body), or the network
            raise e.__cause__ if isinstance(e.__cause__, Transient) else Transient(type(e).__name__)
        except (groq.APIResponseValidationError, ValueError, TypeError, AttributeError):
            raise Transient("not a completion")
        choices = getattr(completion, "choices", None)
        if not isinstance(choices, list):
            raise Transient("not a completion")
        if not choices:
            raise Permanent("no answer")
        text = getattr(getattr(choices[0], "message", None), "content", None)
        if not isinstance(text, str):
            raise Permanent("no text answer")
        return text.replace(api_key, "***")
    return ask


# -----------------------------------------------------------------------------
# one (artist, track) -> (text or None, status)

def lyrics_job(artist, track, fetch, source, cache, stats, retry):   # (artist, track) from request_pair()
    key = ("lyrics", artist, track, source, LYRICS_VERSION)
    value = cached(cache, stats, key, lambda: retry(lambda: fetch(artist, track)))
    if value["status"] != "ok":
        return None, value["status"]
    return (value["text"], "ok") if value["text"] else (None, "not found")


def summary_job(artist, track, ask, source, cache, stats, retry, excerpt=None):
    kind = "summary-from-lyrics" if excerpt else "summary"
    version = PROMPT_VERSION + (f"+{hashlib.sha1(excerpt.encode()).hexdigest()[:12]}" if excerpt else "")
    status = "empty"
    for strict in (False, True):   # one retry with a stricter prompt when the answer is unusable
        prompt = summary_prompt(artist, track, excerpt, strict)
        key = (kind + ("-strict" if strict else ""), artist, track, source, version)
        value = cached(cache, stats, key, lambda: retry(lambda: ask(prompt)))
        if value["status"] != "ok":
            return None, value["status"]
        text = clean_summary(value["text"])
        if text and not names_song(text, artist, track):
            return text, "ok"
        status = "names song/artist" if text else "empty"
    return None, status

# -----------------------------------------------------------------------------
# dataset in and out

def load_items(folder):
    path = Path(folder) / "items.csv"
    if not Path(folder).is_dir():
        raise UserError(f"no dataset folder {folder} (collect.py makes one; `make train` makes data/demo).")
    if not path.is_file():
        raise UserError(f"{path} does not exist.")
    try:   # everything as text, empty stays empty: untouched columns come back unchanged
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)} (needs {', '.join(REQUIRED_COLUMNS)}).")
    return df, path


# -----------------------------------------------------------------------------
# running the jobs and reporting

def run_jobs(name, pairs, job, workers, stop):
    """{(artist, track): (text, status)} with a progress bar; retries exhausted -> 'failed'.
    Ctrl-C sets `stop` and returns at once: queued jobs are cancelled, none is waited for. Any other error of a
    job (a refused key, a Retry-After beyond --max-wait) stops the others (requests in flight end within
    --timeout) and propagates."""
    results = {}
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(job, a, t): (a, t) for a, t in pairs}
        for f in tqdm(as_completed(futures), total=len(futures), desc=name, unit="track", file=sys.stderr, disable=None):
            try:
                results[futures[f]] = f.result()
            except Transient:
                results[futures[f]] = (None, "failed")
    except KeyboardInterrupt:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def request_pair(artist, track):
    """The (artist, track) a request is made for: titles that clean to the same name are asked once."""
    return artist.strip(), clean_track(track.strip())


def fill(df, rows, column, results):
    """Write texts into df[column] for rows (cleaned by cell_text); the title (else the track) where there is none."""
    statuses = Counter()
    if column not in df.columns:
        df[column] = ""
    for i in rows:
        text, status = results.get(request_pair(df.at[i, "artist"], df.at[i, "track"]), (None, "no artist/track"))
        df.at[i, column] = cell_text(text if text else (df.at[i, "title"] or df.at[i, "track"]))
        statuses[status] += 1
    return statuses


def report_line(name, kind, statuses, stats):
    real = statuses.pop("ok", 0)
    why = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) or "-"
    return (f"  {name:9s}: {real} real, {sum(statuses.values())} title fallback ({why}); "
            f"{stats.counts[kind + ' requests']} new answers, {stats.counts[kind + ' cached']} from cache")

# -----------------------------------------------------------------------------
# main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0].split(": ", 1)[1],
                                epilog="Environment: GROQ_API_KEY (or .env), GROQ_BASE_URL, LYRICS_BASE_URL. "
                                       "Exit codes: 0 done, 1 some requests still failing (rerun), 2 usage error.")
    p.add_argument("dataset", help="name of the folder data/<DATASET>/ holding items.csv")
    p.add_argument("--data-dir", default="data", help="folder holding the datasets (default: data)")
    p.add_argument("--what", choices=("both", "summary", "lyrics"), default="both", help="columns to fill (default: both)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"Groq chat model (default: {DEFAULT_MODEL})")
    p.add_argument("--summary-from", choices=("title", "lyrics"), default="title",
                   help="ask about artist and title (the study) or about the lyrics excerpt (default: title)")
    p.add_argument("--workers", type=int, default=4, help="requests in flight at once (default: 4)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of items.csv")
    add_retry_options(p, 5, "the answers cached as final: lyrics not found, other 4xx, empty model answers")
    for api, what in (("groq", "Groq (30 requests/minute on its free tier)"), ("lyrics", "lyrics.ovh (no published limit)")):
        p.add_argument(f"--{api}-rate", type=float, default=RATES[api], metavar="PER_SECOND",
                       help=f"requests per second to {what}, shared by all workers and by other runs on the same "
                            f"--data-dir; 0: no limit (default: {RATES[api]})")
    return p.parse_args(argv)


def run(args):
    check_numbers(args, RETRY_NUMBERS + ("workers", "limit", "groq_rate", "lyrics_rate"),
                  positive=("workers", "limit", "timeout"))
    folder = Path(args.data_dir) / args.dataset
    df, path = load_items(folder)
    want_summary = args.what in ("both", "summary")
    api_key = find_api_key() if want_summary else None
    lyrics_base = check_base_url(os.environ.get("LYRICS_BASE_URL") or DEFAULT_LYRICS_BASE_URL, "LYRICS_BASE_URL")
    check_base_url(os.environ.get("GROQ_BASE_URL") or DEFAULT_GROQ_BASE_URL, "GROQ_BASE_URL")
    rows = list(df.index[: args.limit]) if args.limit is not None else list(df.index)
    pairs = list(dict.fromkeys(request_pair(df.at[i, "artist"], df.at[i, "track"]) for i in rows))
    pairs = [(a, t) for a, t in pairs if a and t]
    if not rows:
        raise UserError(f"{path} has no rows: nothing to enrich.")

    with dataset_lock(folder):        # the one writer of this dataset: a second enrich, a collect, refuses
        return enrich(args, path, set(df.loc[rows, "item"]), pairs, api_key, lyrics_base)


def enrich(args, path, items, pairs, api_key, lyrics_base):
    """Ask for the texts of `pairs`, then write them into the rows of `items` of items.csv as it is now."""
    want_summary, want_lyrics = args.what in ("both", "summary"), args.what in ("both", "lyrics")
    stop = threading.Event()
    limiters = {api: RateLimiter(Path(args.data_dir) / f".enrich-rate-{api}", rate, stop, args.max_wait, name)
                for api, rate, name in (("groq", args.groq_rate, "Groq"), ("lyrics", args.lyrics_rate, "lyrics.ovh"))}
    cache, stats = Cache(path.parent / ".enrich-cache.sqlite"), Stats()
    if args.retry_failed:
        print(f"asking again for {cache.forget_failures()} answer(s) cached as final", file=sys.stderr)
    retry = lambda api: lambda call: with_retries(call, args.retries, args.backoff, stats, args.max_backoff,
                                                  hold=limiters[api].hold,
                                                  sleep=lambda s, why: pause(s, f"{limiters[api].api}: {why}", stop))
    lyrics, summaries = {}, {}
    if want_lyrics or (want_summary and args.summary_from == "lyrics"):
        fetch = lambda a, t: fetch_lyrics(lyrics_base, a, t, args.timeout, limiters["lyrics"])
        source = "lyrics.ovh" if lyrics_base == DEFAULT_LYRICS_BASE_URL else lyrics_base
        lyrics = run_jobs("lyrics", pairs, lambda a, t: lyrics_job(a, t, fetch, source, cache, stats, retry("lyrics")),
                          args.workers, stop)
    if want_summary:
        groq_base = os.environ.get("GROQ_BASE_URL") or DEFAULT_GROQ_BASE_URL
        ask = groq_asker(api_key, args.model, args.timeout, groq_base, limiters["groq"])
        source = args.model + (f"@{os.environ['GROQ_BASE_URL']}" if os.environ.get("GROQ_BASE_URL") else "")
        retry_groq = retry("groq")

        def job(a, t):
            excerpt = lyrics[(a, t)][0] if args.summary_from == "lyrics" else None
            return summary_job(a, t, ask, source, cache, stats, retry_groq, excerpt)
        summaries = run_jobs("summaries", pairs, job, args.workers, stop)
    cache.close()

    # items.csv read again: its rows and other columns as they are now, only the columns asked for written
    df, path = load_items(path.parent)
    rows = [i for i in df.index if df.at[i, "item"] in items]
    lines = [f"coverage of {len(rows)} rows in {path}:"]
    for column, results, wanted in (("summary", summaries, want_summary), ("lyrics", lyrics, want_lyrics)):
        if wanted:
            lines.append(report_line(column, column, fill(df, rows, column, results), stats))
    atomic_write(path, df.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    retries = ", ".join(f"{k.split(' ', 1)[1]} {v}" for k, v in sorted(stats.counts.items()) if k.startswith("transient"))
    lines.append(f"  transient errors retried: {retries or 'none'}")
    failed = sum(s == "failed" for r in (summaries, lyrics) for _, s in r.values())
    if failed:
        lines.append(f"  {failed} request(s) still failing after {args.retries + 1} attempts kept the title; rerun to retry them")
    print("\n".join(lines))
    return 1 if failed else 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RetryLater as e:     # a Retry-After beyond --max-wait: answers so far are cached, items.csv untouched
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # answers so far are in the cache; worker threads are not waited for
        print("interrupted; rerun the same command to resume (answers so far are cached)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
