"""
collect.py: real data for RecSetters.

  python collect.py hetrec   PATH_OR_URL        # HetRec 2011 Last.fm 2K   -> data/hetrec/
  python collect.py lastfm1k PATH_OR_URL        # Last.fm Dataset 1K users -> data/lastfm1k/
  python collect.py crawl                       # Last.fm snowball crawl   -> data/lastfm/{users,loved}.csv
  python collect.py match CATALOG --name apple  # loved tracks x catalog   -> data/apple/
  python collect.py all --catalog apple=A.csv --catalog spotify=S.csv   # crawl, then match each

Dataset format (read by recsetters.py), one folder per dataset:
  users.csv         user, country
  items.csv         item, artist, track, tag, title, summary, lyrics [, extra text columns]
  interactions.csv  user, item, timestamp (Unix seconds, empty when unknown)
A rerun keeps every column of items.csv it does not make (summary, lyrics: enrich.py's; columns a user added) for
the items it keeps. One process writes a dataset at a time (a lock in the folder): a second one, collect.py or
enrich.py, stops with one line naming the first (exit 2).

The Last.fm key comes from LASTFM_API_KEY or a git-ignored .env; it never reaches logs, errors or files.
Every API response is committed to a SQLite cache as it arrives, so a killed crawl resumes where it stopped.

Network faults: 429, 5xx, Last.fm's temporary error codes, timeouts, answers that cannot be read (not JSON, HTML,
empty, truncated, undecodable bytes, over 4 MB, nested over 64 levels) and answers of the wrong shape (a list that
is a string, a number or null) are retried with backoff (--retries, --backoff); if they outlast every retry the run
stops with exit 1 and a rerun of the same command resumes and asks again. What Last.fm itself says is final for one
resource (error 6 not found, 7, 17 private, other 4xx): cached, skipped on reruns unless --retry-failed. Every retry
backs off (--backoff doubled each time, jittered, at most --max-backoff). A Retry-After (seconds, HTTP date or
retry-after-ms) also pauses every process sharing the cache, up to --max-wait seconds (default 300); a longer one
stops the run at once (exit 1) saying when to rerun; one that is no wait (0 or less, NaN, empty, unreadable) is
ignored: the usual backoff. Waits over 3 s print a line. --timeout bounds a whole request (connect and every read);
redirects to another host are not followed. Exit codes: 0 done, 1 rerun to resume, 2 usage error.
"""
import argparse
import collections
import contextlib
import hashlib
import io
import json
import os
import random
import re
import socket
import sqlite3
import stat
import sys
import tarfile
import tempfile
import threading
import time
import unicodedata
import zipfile
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

try:
    import fcntl                                     # file locks (POSIX); elsewhere: threads only
except ImportError:
    fcntl = None

API_URL = "https://ws.audioscrobbler.com/2.0/"
HETREC_URL = "https://files.grouplens.org/datasets/hetrec2011/hetrec2011-lastfm-2k.zip"
LASTFM1K_URL = "http://mtg.upf.edu/static/datasets/last.fm/lastfm-dataset-1K.tar.gz"
EVENTS_TSV = "userid-timestamp-artid-artname-traid-traname.tsv"
PROFILE_TSV = "userid-profile.tsv"
# checksums of the files inside the published archives (lastfm-1K: its official README)
KNOWN_MD5 = {
    "user_artists.dat": "f1a4e4b774c63509e64c716e11c94793",
    PROFILE_TSV: "c53608b6b445db201098c1489ea497df",
    EVENTS_TSV: "64747b21563e3d2aa95751e0ddc46b68",
}
ITEM_COLS = ["item", "artist", "track", "tag", "title", "summary", "lyrics"]
MADE_COLS = ITEM_COLS[:5]   # what collect makes of an item; summary and lyrics are enrich.py's (kept on a rerun)
NO_KEY_HELP = ("no Last.fm API key: set LASTFM_API_KEY (or put LASTFM_API_KEY=... in .env); get a free key at "
               "https://www.last.fm/api/account/create. Offline alternatives: "
               "make data SOURCE=hetrec FROM=PATH_OR_URL, or make data SOURCE=lastfm1k FROM=PATH_OR_URL")


class UserError(Exception):
    """A problem the user can fix (bad path, unknown schema, no key): one line on stderr, exit code 2."""


def log(*a):
    """print(*a) on stderr, flushed, above a progress bar when one is showing."""
    from tqdm import tqdm
    tqdm.write(" ".join(map(str, a)), file=sys.stderr)
    sys.stderr.flush()

# -----------------------------------------------------------------------------
# small helpers, also used by enrich.py and recsetters.py (UserError, log, atomic write, .env, text cleaning, names)

DOTENV = Path(__file__).resolve().parent / ".env"   # the one .env: next to the scripts, git-ignored
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")                                # -> a space
_INVISIBLE = re.compile("[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]+")   # zero-width, bidi: removed


def read_dotenv(path=DOTENV):
    """NAME=value lines (optionally `export `, quotes stripped); {} when the file does not exist."""
    values = {}
    if not Path(path).is_file():
        return values
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = line.removeprefix("export ").split("=", 1)
        values[name.strip()] = value.strip().strip("'\"")
    return values


def atomic_write(path, data: bytes):
    """Replace path with data all at once: temp file in the same folder, fsync, the old file's mode kept (a new file
    gets the umask's mode, not mkstemp's 0600). Readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(os.stat(path).st_mode) if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)                                # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str):
    """atomic_write of text as UTF-8."""
    atomic_write(path, text.encode("utf-8"))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def clean_text(s):
    """Text from the network: NFC, control characters a space, zero-width and bidi-override ones removed."""
    return _CONTROL.sub(" ", _INVISIBLE.sub("", unicodedata.normalize("NFC", s))).strip()


def norm_name(s):
    """For comparing names: NFKC, case and accents folded, & = and, apostrophes dropped, other punctuation a space."""
    s = unicodedata.normalize("NFKC", s).casefold()
    s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
    s = s.replace("&", " and ")
    s = re.sub(r"['\u2019\u2018`\u00b4]", "", s)            # don't == dont (apostrophes vanish)
    s = re.sub(r"[^\w\s]|_", " ", s)
    return " ".join(s.split())

# -----------------------------------------------------------------------------
# writing datasets: sorted, utf-8, atomic per file


def write_csv(df, path):
    atomic_write(path, df.to_csv(index=False, lineterminator="\n").encode("utf-8"))


def write_dataset(out_dir, users, items, inter):
    """users/items/inter: DataFrames in the dataset format; every value written as text. `items` holds the columns
    collect makes (item, artist, track, tag, title; extras such as hetrec's tags). Every other column of the items.csv
    already there (summary and lyrics, which enrich.py writes, or a column a user added) is kept for the items kept,
    empty for new ones: a rerun never blanks a text it does not make. Call it holding dataset_lock(out_dir)."""
    items = keep_texts(items.astype(str), Path(out_dir) / "items.csv")
    users = users[["user", "country"]].astype(str).sort_values("user", kind="stable")
    extra = [c for c in items.columns if c not in ITEM_COLS]
    items = items[ITEM_COLS + extra].sort_values("item", kind="stable")
    inter = inter[["user", "item", "timestamp"]].astype(str).sort_values(["user", "item"], kind="stable")
    assert users.user.is_unique and items.item.is_unique and not inter.duplicated(["user", "item"]).any()
    for name, df in [("users.csv", users), ("items.csv", items), ("interactions.csv", inter)]:
        write_csv(df, Path(out_dir) / name)
    print(f"wrote {out_dir}: {len(users):,} users, {len(items):,} items, {len(inter):,} interactions")


def keep_texts(items, path):
    """items with the columns it lacks taken from the items.csv at path (by item; "" for new items and when there is
    none), and ITEM_COLS it still lacks empty; a line says how many non-empty texts were kept."""
    old = read_table(path, "items list already there (its texts are kept; move it away to start afresh)") \
        if path.is_file() else None
    kept = [c for c in old.columns if c not in items.columns] if old is not None else []
    if kept:
        if "item" not in old.columns:
            raise UserError(f"{path}: no item column, so its texts cannot be kept; move it away to start afresh")
        items = items.join(old.drop_duplicates("item").set_index("item")[kept], on="item").fillna("")
        n = {c: int((items[c] != "").sum()) for c in kept}
        print(f"kept from {path}: " + ", ".join(f"{c} of {v:,} items" for c, v in n.items()))
    return items.assign(**{c: "" for c in ITEM_COLS if c not in items.columns})

# -----------------------------------------------------------------------------
# normalization: items are keyed by normalized (artist, title), never by title alone
#
# One item per recording. Decorations of a title that name the same recording are dropped: featuring credits,
# remaster / year / mono / stereo / single / album / radio-edit / explicit / "from <film>" / bonus-track notes.
# Decorations that name a different recording stay part of the key, so these never merge with the original:
# live, remix (and named mixes and edits), reprise, acoustic, instrumental, demo, karaoke, unplugged, extended and club
# versions, other languages, and "Part N" (a part is its own song). Any other bracket ("Sweet Dreams (Are Made
# of This)") is kept in the first key and dropped in the second, tried only when the first finds nothing; items are
# keyed by the second.
# Artists are compared in a spelling-free form: P!nk = Pink, Ke$ha = Kesha, AC/DC = ACDC, The Beatles = Beatles,
# Röyksopp = Royksopp, Dan + Shay = Dan and Shay; a row with several artists (or "feat. X" in its title) is found
# under each of them.

_BRACKET = re.compile(r"\s*(\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\})")
_DASH = re.compile(r"\s+[-\u2013\u2014]\s+")
_FEAT = re.compile(r"\s+(feat\.?|ft\.?|featuring)\s.*$", re.I)
_ARTIST_SPLIT = re.compile(r"\s*(?:;|,|&|\+|/|\band\b|\bx\b|\u00d7|\bvs\.?|\bfeat\.?|\bft\.?|\bfeaturing\b|\bwith\b)\s*", re.I)
_PART = re.compile(r"(?:^|[\s,(\[])(?:part|pt)\.?\s*(\d+|[ivx]+)\b[)\]]?", re.I)
_CREDIT = re.compile(r"^(?:feat\.?|ft\.?|featuring|with)\s+(.*)$", re.I)
_DIFFERENT = re.compile(r"\b(?:live|ao vivo|en vivo|en directo|unplugged|session|sessions|remix|rmx|reprise|acoustic|"
                        r"acustico|instrumental|demo|karaoke|a ?cappella|acapella|extended|club|dub|bootleg|mashup|cover|"
                        r"sped up|slowed|orchestral|rework|remake|spanish|english|french|german|italian|portuguese)\b", re.I)
_SAME = re.compile(r"^(?:from|prod)\b|\b(?:feat|ft)\.|\b(?:remaster|remastered|remasterizado|mono|stereo|single|album|"
                   r"explicit|clean|radio|edit|original|bonus|deluxe|version|edition|anniversary|digital|soundtrack|"
                   r"taylor s version|\d{4})\b", re.I)
_PLAIN_MIX = re.compile(r"(?:\d{4} |original |radio |album |single |stereo |mono )?mix(?: version)?|\d{4} (?:stereo |mono )?mix")
_PLAIN_EDIT = re.compile(r"(?:(?:radio|single|video|album|clean|explicit|short|original) )?edit(?: version)?")
_SAME_WORDS = re.compile(r"\b(?:radio edit|single edit|edit|version|remaster(?:ed)?|\d{4})\b")
_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4, "v": 5, "vi": 6, "vii": 7, "viii": 8, "ix": 9, "x": 10}
_LETTERS = str.maketrans({"ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ß": "ss", "đ": "d", "ł": "l",
                          "Ł": "L", "ı": "i"})


def _spell(s):
    """Spellings that mean the same name: T.N.T. = TNT, Ke$ha = Kesha, P!nk = Pink, + = and, ø = o."""
    s = re.sub(r"\b\w(?:\.\w)+\b\.?", lambda m: m.group(0).replace(".", ""), s.translate(_LETTERS))
    s = re.sub(r"(?<=\w)\$|\$(?=\w)", "s", s)
    s = re.sub(r"(?<=\w)!(?=\w)", "i", s)
    return s.replace("+", " and ")


@lru_cache(maxsize=1 << 20)
def norm_artist(a):
    """Compact artist key: spelling, case, accents, punctuation, spaces and a leading 'the' do not count."""
    n = norm_name(_spell(_FEAT.sub("", a))) or norm_name(_spell(a)) or a.strip().casefold()
    return (n[4:] if n.startswith("the ") and len(n) > 4 else n).replace(" ", "")


@lru_cache(maxsize=1 << 20)
def title_parts(t):
    """-> (base, kept decorations, tags that make another recording, featured artists) of a title."""
    base, decorations = t, []
    for _ in range(3):                                       # nested brackets, innermost first
        decorations += [m[1:-1] for m in _BRACKET.findall(base) for m in [m.strip()]]
        base = _BRACKET.sub("", base)
    base, *dashed = _DASH.split(base)
    decorations += [p for d in dashed for p in re.split(r"\s+/\s+", d)]
    tags, kept, featured = set(), [], []
    base = _FEAT.sub(lambda m: featured.append(m.group(0).split(None, 1)[1]) or "", base)

    def part(m):
        tags.add(f"part {_ROMAN.get(m.group(1).lower(), m.group(1).lower())}")
        return " "
    base = _PART.sub(part, base)
    for d in decorations:
        if credit := _CREDIT.match(d.strip()):
            featured.append(credit.group(1))
            continue
        d = _PART.sub(part, " " + d).strip()
        n = norm_name(_spell(d))
        if not n:
            continue
        words = n.split()
        if (_DIFFERENT.search(n) or "mix" in words and not _PLAIN_MIX.fullmatch(n)
                or "edit" in words and not _PLAIN_EDIT.fullmatch(n)):   # "Kygo Remix", "Club Mix", "Blasterjaxx Edit"
            tags.add(" ".join(_SAME_WORDS.sub(" ", n).split()) or n)
        elif not _SAME.search(n):
            kept.append(n)
    return norm_name(_spell(base)) or norm_name(_spell(t)), tuple(kept), tuple(sorted(tags)), tuple(featured)


@lru_cache(maxsize=1 << 20)
def norm_track(t):
    """The title key of one recording: base, unknown decorations and recording tags."""
    base, kept, tags, _ = title_parts(t)
    return " | ".join([" ".join((base,) + kept)] + list(tags))


@lru_cache(maxsize=1 << 20)
def title_base(t):
    """The looser title key: without the unknown decorations, still with the recording tags."""
    base, _, tags, _ = title_parts(t)
    return " | ".join([base] + list(tags))


def artist_parts(a):
    """Each listed artist of 'A & B', 'A feat. B', 'A, B', 'A x B' (compact keys, in order)."""
    return [p for p in (norm_artist(x) for x in _ARTIST_SPLIT.split(a) if norm_name(x)) if p]


def item_id(nartist, ntrack):
    return hashlib.sha1(f"{nartist}\t{ntrack}".encode()).hexdigest()[:16]


def unrepeat(artist):
    """Apple writes some names twice: "Macklemore & Ryan Lewis, Macklemore & Ryan Lewis" -> once."""
    parts = artist.split(", ")
    return parts[0] if len(parts) > 1 and len(set(parts)) == 1 else artist


def catalog_item(artist, track):
    """The item id of a catalog row (artist: its first listed artist). Unknown brackets do not count: "You Make My
    Dreams (Come True)" and "You Make My Dreams" by one artist are one item."""
    return item_id(norm_artist(unrepeat(artist)), title_base(track))

# -----------------------------------------------------------------------------
# sources: local path (file, folder, .zip, .tar.gz) or URL downloaded once into a cache


def md5_file(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url, cache_dir, md5=None):
    """Download url once into cache_dir (progress bar, .part then rename); verify md5 when given."""
    import requests
    from tqdm import tqdm
    path = Path(cache_dir) / (Path(urlparse(url).path).name or "download")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        try:
            with requests.get(url, stream=True, timeout=60) as r:
                r.raise_for_status()
                total = int(r.headers.get("content-length") or 0) or None
                with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=path.name,
                                                 disable=None, file=sys.stderr) as bar:
                    for block in r.iter_content(1 << 20):
                        f.write(block)
                        bar.update(len(block))
        except requests.RequestException as e:
            raise UserError(f"download of {url} failed: {type(e).__name__}") from None
        os.replace(part, path)
    if md5 and md5_file(path) != md5.lower():
        raise UserError(f"checksum mismatch for {path} (expected md5 {md5}); delete it and retry")
    return path


def resolve(src, cache_dir, md5=None):
    """-> (local path, downloaded?) for a path or http(s) URL."""
    if re.match(r"https?://", str(src)):
        return fetch(src, cache_dir, md5), True
    p = Path(src)
    if not p.exists():
        raise UserError(f"{src}: no such file or folder")
    return p, False


class Archive:
    """Named members of a folder or a .zip, looked up by base name at any depth."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_dir():
            self.files = {}
            for f in sorted(self.path.rglob("*"), key=lambda f: (len(f.parts), str(f))):
                self.files.setdefault(f.name, f)
            self.zip = None
        elif zipfile.is_zipfile(self.path):
            self.zip = zipfile.ZipFile(self.path)
            self.files = {}
            for n in sorted(self.zip.namelist(), key=lambda n: (n.count("/"), n)):
                self.files.setdefault(n.rsplit("/", 1)[-1], n)
        else:
            raise UserError(f"{path}: expected a folder or a .zip archive")

    def read(self, name, verify=False):
        if name not in self.files:
            raise UserError(f"{self.path}: {name} not found")
        f = self.files[name]
        data = self.zip.read(f) if self.zip else Path(f).read_bytes()
        if verify and name in KNOWN_MD5 and hashlib.md5(data).hexdigest() != KNOWN_MD5[name]:
            raise UserError(f"{self.path}: {name} does not match its published md5 {KNOWN_MD5[name]}")
        return data

# -----------------------------------------------------------------------------
# importer: HetRec 2011 Last.fm 2K (items are artists, no timestamps, no country)


def import_hetrec(src, out_dir, cache_dir, top_tags=5):
    import pandas as pd
    path, downloaded = resolve(src, cache_dir)
    ar = Archive(path)

    def table(name, encoding="utf-8"):
        return pd.read_csv(io.BytesIO(ar.read(name, verify=downloaded)), sep="\t", encoding=encoding,
                           quoting=3, dtype=str, keep_default_na=False)
    ua, artists = table("user_artists.dat"), table("artists.dat")
    tags, uta = table("tags.dat", "latin-1"), table("user_taggedartists.dat")
    print(f"hetrec: {len(ua):,} user-artist pairs, {ua.userID.nunique():,} users, {ua.artistID.nunique():,} artists")
    known = set(artists.id)
    # most used tags per artist: count assignments, ties broken by tag name
    uta = uta[uta.artistID.isin(known)].merge(tags, on="tagID")
    counts = uta.groupby(["artistID", "tagValue"]).size().reset_index(name="n")
    counts = counts.sort_values(["artistID", "n", "tagValue"], ascending=[True, False, True], kind="stable")
    top = counts.groupby("artistID").head(top_tags).groupby("artistID", sort=False).tagValue.agg(list)
    items = pd.DataFrame({"item": artists.id, "artist": artists.name, "track": artists.name, "title": artists.name})
    tl = items.item.map(top)
    items["tag"] = [t[0] if isinstance(t, list) else "" for t in tl]
    items["tags"] = [", ".join(t) if isinstance(t, list) else "" for t in tl]
    inter = ua[ua.artistID.isin(known)].rename(columns={"userID": "user", "artistID": "item"})
    inter = inter.assign(timestamp="")
    users = pd.DataFrame({"user": sorted(inter.user.unique(), key=int), "country": ""})
    items["_n"] = items.item.astype(int)
    items = items.sort_values("_n").drop(columns="_n")
    print(f"hetrec: {(items.tag == '').sum():,} artists without tags; {len(ua) - len(inter):,} pairs with unknown artists dropped")
    write_dataset(out_dir, users, items, inter)
    # the raw per-user tag assignments, so recsetters.py can rebuild an artist's tags without the held-out
    # listeners' own tagging (the cold-items protocol's leak-free text; README, Experiments)
    ta = uta.rename(columns={"userID": "user", "artistID": "item", "tagValue": "tag"})[["user", "item", "tag"]]
    write_csv(ta.sort_values(["user", "item", "tag"], kind="stable"), Path(out_dir) / "tag_assignments.csv")
    print(f"wrote {Path(out_dir) / 'tag_assignments.csv'}: {len(ta):,} tag assignments")

# -----------------------------------------------------------------------------
# importer: Last.fm Dataset 1K users (streams the 19M-line TSV, one user at a time)


def _lines(binary, h):
    for raw in binary:
        h.update(raw)
        yield raw.decode("utf-8", errors="replace")


def _iso_to_unix(s):
    import datetime as dt
    return int(dt.datetime.strptime(s[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc).timestamp())


def import_lastfm1k(src, out_dir, cache_dir, min_plays=3):
    import pandas as pd
    from tqdm import tqdm
    path, downloaded = resolve(src, cache_dir)
    profile, seen_users, bad = {}, set(), 0
    inter, names = [], {}                      # (user, item, first ISO time); item -> (artist, track)

    def flush(user, plays):
        merged = {}
        for (a, t), (n, first) in plays.items():
            key = (norm_artist(a), norm_track(t))
            m = merged.setdefault(key, [0, first, (a, t)])
            m[0] += n
            m[1] = min(m[1], first)
            m[2] = min(m[2], (a, t))
        for key, (n, first, raw) in merged.items():
            if n >= min_plays:
                iid = item_id(*key)
                inter.append((user, iid, first))
                names[iid] = min(names.get(iid, raw), raw)

    def read_profile(f):
        h = hashlib.md5()
        for line in _lines(f, h):
            parts = line.rstrip("\r\n").split("\t")
            if parts[0].startswith("#") or len(parts) < 4:
                continue
            profile[parts[0]] = parts[3].strip()
        return h.hexdigest()

    def read_events(f):
        nonlocal bad
        h, user, plays = hashlib.md5(), None, {}
        for line in tqdm(_lines(f, h), unit=" lines", unit_scale=True, desc="events", disable=None, file=sys.stderr):
            p = line.rstrip("\r\n").split("\t")
            if len(p) != 6 or not p[3] or not p[5]:
                bad += 1
                continue
            if p[0] != user:
                if user is not None:
                    flush(user, plays)
                if p[0] in seen_users:
                    raise UserError(f"{EVENTS_TSV} is not grouped by user ({p[0]} reappears)")
                user, plays = p[0], {}
                seen_users.add(user)
            rec = plays.get((p[3], p[5]))
            if rec is None:
                plays[(p[3], p[5])] = [1, p[1]]
            else:
                rec[0] += 1
                rec[1] = min(rec[1], p[1])      # ISO-8601 UTC strings sort like times
        if user is not None:
            flush(user, plays)
        return h.hexdigest()

    digests = {}
    if path.is_dir():
        found = {f.name: f for f in sorted(path.rglob("*.tsv"), key=lambda f: -len(f.parts))}
        for name in (PROFILE_TSV, EVENTS_TSV):
            if name not in found:
                raise UserError(f"{path}: {name} not found")
        with open(found[PROFILE_TSV], "rb") as f:
            digests[PROFILE_TSV] = read_profile(f)
        with open(found[EVENTS_TSV], "rb") as f:
            digests[EVENTS_TSV] = read_events(f)
    elif tarfile.is_tarfile(path):
        with tarfile.open(path, "r|*") as tar:          # streaming: members in archive order
            for m in tar:
                name = m.name.rsplit("/", 1)[-1]
                if name == PROFILE_TSV:
                    digests[name] = read_profile(tar.extractfile(m))
                elif name == EVENTS_TSV:
                    digests[name] = read_events(tar.extractfile(m))
        if set(digests) != {PROFILE_TSV, EVENTS_TSV}:
            raise UserError(f"{path}: expected {PROFILE_TSV} and {EVENTS_TSV} inside")
    else:
        raise UserError(f"{path}: expected the extracted folder or lastfm-dataset-1K.tar.gz")
    if downloaded:
        for name, d in digests.items():
            if d != KNOWN_MD5[name]:
                raise UserError(f"{path}: {name} does not match its published md5 {KNOWN_MD5[name]}")
    if not inter:
        raise UserError(f"{path}: no (user, track) played at least {min_plays} times")
    inter = pd.DataFrame(inter, columns=["user", "item", "timestamp"])
    inter["timestamp"] = inter.timestamp.map(_iso_to_unix)
    users = pd.DataFrame({"user": sorted(inter.user.unique())})
    users["country"] = users.user.map(profile).fillna("")
    items = pd.DataFrame([(i, a, t, "", t) for i, (a, t) in names.items()], columns=MADE_COLS)
    print(f"lastfm1k: {len(seen_users):,} users in events, {bad:,} malformed lines skipped, min plays {min_plays}")
    write_dataset(out_dir, users, items, inter)

# -----------------------------------------------------------------------------
# rate limits, waits and HTTP shared by threads and processes (enrich.py uses all of it too)
#
# What a server can make us do is bounded: every retry backs off; a Retry-After is honoured up to --max-wait seconds
# (a longer one stops the run with one line, exit 1; one that is no wait, 0 or less or unreadable, changes nothing);
# every request has a total deadline (connect and all reads), a body cap and a JSON nesting cap; redirects stay on
# the same host; the URL path goes on the wire exactly as we encoded it; bodies are decoded with their declared
# charset (a BOM dropped) and undecodable bytes are a temporary failure.

MAX_WAIT = 300.0           # default --max-wait: the longest Retry-After honoured, in seconds
MAX_BACKOFF = 60.0         # default --max-backoff: the longest delay between two attempts, in seconds
VISIBLE_WAIT = 3.0         # a wait longer than this prints a line (a countdown on a terminal)
MAX_BODY = 4 << 20         # bytes; a Last.fm page of 1,000 loved tracks is about 0.5 MB
MAX_DEPTH = 64             # JSON nesting; real answers nest 5 levels
MAX_REDIRECTS = 5


class RetryLater(Exception):
    """Temporary failures that outlast this run: it stops, a rerun resumes (exit code 1)."""


class WaitTooLong(RetryLater):
    """A server asked for a longer wait than --max-wait."""

    def __init__(self, api, seconds, max_wait):
        if seconds == seconds and seconds < float("inf"):
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() + min(seconds, 1e10)))
            why = f"asked to wait {seconds:,.0f} s (Retry-After), more than --max-wait {max_wait:g}: rerun after {when}"
        else:
            why = f"asked for an endless wait (Retry-After), more than --max-wait {max_wait:g}: rerun later"
        super().__init__(f"{api} {why} (stopped; answers so far are cached)")


class Transient(Exception):
    """A failure worth retrying (429, 5xx, timeout, a body that cannot be read)."""

    def __init__(self, reason, retry_after=None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


def parse_retry_after(headers):
    """A server's wait from retry-after-ms or Retry-After (seconds or an HTTP date): None when it sends none, the
    seconds when they are a wait (finite, > 0), 0.0 when the header is no wait: 0 or less, NaN, infinite, empty, text,
    a date without a zone or in the past (back_off then backs off as usual: never no wait, never a stop)."""
    from email.utils import parsedate_to_datetime
    ms, value = headers.get("retry-after-ms"), headers.get("retry-after")
    if ms is None and value is None:
        return None
    try:
        seconds = float(ms) / 1000 if ms is not None else float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
            seconds = when.timestamp() - time.time() if when.tzinfo else 0.0
        except (TypeError, ValueError, OverflowError, IndexError, AttributeError):
            return 0.0
    return seconds if 0 < seconds < float("inf") else 0.0


def back_off(attempt, retry_after, backoff, max_backoff, why, hold=None, sleep=None, rand=random.random):
    """The wait after a passing fault, before retry number attempt + 1 (attempt counts from 0). It always backs off:
    backoff * 2**attempt, jittered x0.5-1.5, at most max_backoff, whatever the server said. A Retry-After that is a
    wait (parse_retry_after > 0) also holds every thread and process sharing the rate limit for that long (hold; one
    beyond --max-wait stops the run: WaitTooLong), so this request waits the longer of the two (without hold: it
    sleeps the longer one itself). One that is no wait (0.0: 0 or less, NaN, empty, unreadable) is named in the wait's
    line (printed when over VISIBLE_WAIT) and changes nothing else. sleep(seconds, why): pause by default.
    -> the seconds slept"""
    delay = min(max_backoff, backoff * 2 ** attempt * (0.5 + rand()))
    if retry_after and hold:
        hold(retry_after)
    elif retry_after:
        delay = max(delay, retry_after)
    elif retry_after is not None:
        why += "; its Retry-After is no wait (0 or less, or unreadable): backing off as usual"
    (sleep or pause)(delay, why)
    return delay


def pause(seconds, why, stop=None, quiet=False):
    """Sleep `seconds`, at once on Ctrl-C or when `stop` is set (KeyboardInterrupt); a wait over VISIBLE_WAIT
    prints one line saying why and until when, and a countdown when stderr is a terminal."""
    end = time.monotonic() + seconds
    shown = seconds > VISIBLE_WAIT and not quiet
    if shown:
        log(f"waiting {seconds:.0f} s ({why}), until {time.strftime('%H:%M:%S', time.localtime(time.time() + seconds))}")
    tty = shown and sys.stderr.isatty()
    stop = stop or threading.Event()
    while (left := end - time.monotonic()) > 0:
        if tty:
            sys.stderr.write(f"\r  {left:5.0f} s left ")
            sys.stderr.flush()
        if stop.wait(min(left, 1.0)):
            raise KeyboardInterrupt
    if tty:
        sys.stderr.write("\r" + " " * 20 + "\r")


class RateLimiter:
    """At most `rate` requests sent in any 1-second window by every thread and process that uses the same state file
    (JSON under an exclusive flock), and a server's Retry-After (`hold`) holds all of them back.
    A request counts from the moment it is allowed (wait) until it has left (sent): allowed but not yet sent, it is
    "pending" and takes a place in every window from now on, whenever it goes out (a thread or process delayed between
    the two cannot slip past a later check); sent, it is recorded at the moment it has left, on the monotonic clock
    (one clock for every process of the machine). A request is allowed when the sends of the last WINDOW seconds and
    the pending ones are fewer than `rate`, and 1/rate after the previous one: then no window holds more than `rate`
    sends. Pending places of a process that died (kill -9 between the two) are dropped.
    A saved hold carries when it was set and the cap it obeyed; one beyond the cap, set in the future or in an
    older format is ignored with a note (it can never hold a later run for longer than --max-wait)."""
    WINDOW = 1.01          # the 1-second window, and 10 ms for the server to stamp one request later than another
    POLL = 0.02            # seconds between two looks while every place is taken by a pending request

    def __init__(self, path, rate, stop=None, max_wait=MAX_WAIT, api="the server"):
        self.path, self.rate, self.stop = Path(path), float(rate), stop or threading.Event()
        self.max_wait, self.api, self.shown = float(max_wait), api, None
        self.lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _update(self, change):
        with self.lock, open(self.path, "a+", encoding="utf-8") as f:
            if fcntl:
                fcntl.flock(f, fcntl.LOCK_EX)              # released when the file is closed
            f.seek(0)
            try:
                state = json.loads(f.read() or "{}")
            except ValueError:
                state = {}
            state = state if isinstance(state, dict) else {}
            result = change(state)
            f.seek(0)
            f.truncate()
            f.write(json.dumps(state))
            return result

    def hold(self, seconds):
        """Nobody starts a request for `seconds` (a server's Retry-After); longer than max_wait: WaitTooLong."""
        if not 0 <= seconds <= self.max_wait:
            raise WaitTooLong(self.api, seconds, self.max_wait)
        now = time.time()

        def change(state):
            old = self._hold_left(state, now)
            if seconds > old:
                state["hold"] = {"until": now + seconds, "set": now, "cap": self.max_wait, "by": self.api}
        self._update(change)

    def _hold_left(self, state, now):
        """Seconds left of the saved hold (0 when none); a hold that breaks its own rules is dropped with a note."""
        h, legacy = state.get("hold"), state.pop("until", None)
        try:
            until, since, cap = (float(h[k]) for k in ("until", "set", "cap"))
            valid = since <= now + 1 and until - since <= min(cap, self.max_wait) + 1
        except (TypeError, KeyError, ValueError):
            until, valid = (legacy if isinstance(legacy, (int, float)) else 0.0), False
        if until <= now or not valid:
            if until > now:
                log(f"note: ignoring a saved wait of {until - now:,.0f} s in {self.path} (beyond --max-wait "
                    f"{self.max_wait:g}, or saved by an older version)")
            state.pop("hold", None)
            return 0.0
        return until - now

    def wait(self):
        """Block until this thread may send one request -> (seconds waited, its place: pass it to sent() once the
        request has left or failed to; None when there is no limit)."""
        n, began, me = max(1, int(self.rate)), time.monotonic(), os.getpid()

        def start(state):
            now, mono = time.time(), time.monotonic()
            held = self._hold_left(state, now)
            if held > 0:
                return held, "hold"
            if self.rate <= 0:
                return 0.0, None
            sent = sorted(t for t in state.get("times", []) if _number(t) and mono - self.WINDOW < t <= mono)[-n:]
            pending = [p for p in state.get("pending", []) if _alive(p, mono)]
            state["times"], state["pending"] = sent, pending
            last = max(sent + [t for _, t in pending], default=None)
            delay = 0.0 if last is None else last + 1 / self.rate - mono
            leave = len(sent) + len(pending) - n + 1           # sends that must leave the window first
            if leave > 0:
                delay = max(delay, sent[leave - 1] + self.WINDOW - mono if leave <= len(sent) else self.POLL)
            if delay > 0:
                return delay, "rate"
            place = [me, mono]
            pending.append(place)
            return 0.0, place
        while True:
            delay, what = self._update(start)          # what: "hold", "rate", or the place taken
            if delay <= 0:
                return time.monotonic() - began, what
            held = what == "hold"
            quiet = not held or self.shown is not None and self.shown > time.monotonic()   # one line per hold
            if held and not quiet:
                self.shown = time.monotonic() + delay
            pause(delay, f"{self.api} asked for a pause (Retry-After)", self.stop, quiet=quiet)

    def sent(self, place):
        """The request that took `place` has left (or failed to): it is recorded as sent now, an upper bound of its
        departure. -> that moment (None for no place, or one already given back)"""
        if not place:
            return None
        n = max(1, int(self.rate))

        def change(state):
            pending = [p for p in state.get("pending", []) if isinstance(p, list)]
            if list(place) not in pending:
                return None
            now = time.monotonic()
            state["pending"] = [p for p in pending if p != list(place)]
            state["times"] = sorted([t for t in state.get("times", []) if _number(t)] + [now])[-n:]
            return now
        return self._update(change)


PENDING_MAX = 600.0        # seconds: a place allowed this long ago and never sent is dropped (a reused pid)


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _alive(place, mono):
    """Whether a pending place [pid, monotonic time] still counts: its process lives and it is not too old."""
    try:
        pid, t = place
        if not (isinstance(pid, int) and _number(t) and mono - PENDING_MAX < t <= mono):
            return False
        if pid != os.getpid():
            os.kill(pid, 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except OSError:                                        # e.g. another user's process: alive
        pass
    return True


def add_retry_options(parser, retries, failed):
    """The options of every client here that retries (collect.py, enrich.py): one definition, its own default number
    of retries, `failed`: what --retry-failed asks again for."""
    parser.add_argument("--retries", type=int, default=retries,
                        help="retries of a request after a passing fault: 429, 5xx, a timeout, a body that cannot be "
                             f"read or has the wrong shape (default {retries})")
    parser.add_argument("--backoff", type=float, default=1.0,
                        help="first retry delay in seconds, doubled each retry, jittered x0.5-1.5 (default 1)")
    parser.add_argument("--max-backoff", type=float, default=MAX_BACKOFF,
                        help=f"longest retry delay in seconds (default {MAX_BACKOFF:g})")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds for one request in all: connect, send and every read (default 30)")
    parser.add_argument("--max-wait", type=float, default=MAX_WAIT,
                        help=f"honour a server's Retry-After up to this many seconds (default {MAX_WAIT:g}); a longer "
                             "one stops the run (exit 1) with the time to rerun")
    parser.add_argument("--retry-failed", action="store_true", help=f"ask again for {failed}")


RETRY_NUMBERS = ("retries", "backoff", "max_backoff", "timeout", "max_wait")


def check_numbers(args, names, positive=()):
    """UserError naming the flag unless each of args' `names` (those it has) is a finite number >= 0 (> 0 for
    `positive`); NaN fails."""
    for name in names:
        v = getattr(args, name, None)
        if v is not None and not ((v > 0 if name in positive else v >= 0) and v < float("inf")):
            bound = "> 0" if name in positive else ">= 0"
            raise UserError(f"--{name.replace('_', '-')} {v}: expected a finite number {bound}")


def check_base_url(url, name):
    p = urlparse(url)
    try:
        p.port
    except ValueError:
        raise UserError(f"{name} {url!r} has an invalid port") from None
    if p.scheme not in ("http", "https") or not p.hostname:
        raise UserError(f"{name} {url!r} is not an http(s) URL")
    return url


class Response:
    """status, headers (case-insensitive) and the raw body of one HTTP answer."""

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def text(self):
        """The body decoded with its declared charset (UTF-8 when none), without a BOM; Transient when it does not
        decode (never U+FFFD)."""
        import codecs
        try:
            codec = codecs.lookup(self.headers.get_content_charset() or "utf-8").name
        except LookupError:
            raise Transient("unknown charset") from None
        try:
            return self.body.decode("utf-8-sig" if codec == "utf-8" else codec).lstrip("\ufeff")
        except UnicodeDecodeError:
            raise Transient("undecodable bytes") from None

    def json(self):
        """The body as JSON; Transient when it is empty, too deeply nested or not JSON."""
        text = self.text()
        if not text.strip():
            raise Transient("empty body")
        depth = 0
        for c in _JSON_BRACKETS.findall(_JSON_STRING.sub('""', text)):
            depth += 1 if c in "[{" else -1
            if depth > MAX_DEPTH:
                raise Transient(f"JSON nested over {MAX_DEPTH} levels")
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise Transient("malformed JSON") from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_JSON_BRACKETS = re.compile(r"[\[\]{}]")


_IDLE = threading.local()   # per thread: the one kept-alive connection, {(scheme, host, port): connection}


def http_request(method, url, timeout, headers=None, body=None, limiter=None, max_body=MAX_BODY):
    """One HTTP exchange -> Response, following redirects on the same scheme, host and port only. Each hop
    connects (or reuses this thread's kept-alive connection), then waits for the limiter, which counts the request
    from then until it has left (or failed to), and has `timeout` seconds in all for connect, send and every read; the
    path is sent exactly as given ('%2E' stays). Transient for what a retry may fix (timeout, connection, a body
    over max_body, a redirect elsewhere); the messages never contain the URL or headers (they may hold a key)."""
    import http.client
    from urllib.parse import urljoin, urlsplit
    origin = urlsplit(url)[:2]
    for _ in range(MAX_REDIRECTS + 1):
        p = urlsplit(url)
        if p[:2] != origin:
            raise Transient("redirect to another host")
        cls = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        idle = _IDLE.__dict__.setdefault("idle", {})
        conn = idle.pop((p.scheme, p.hostname, p.port), None)
        for other in idle.values():
            other.close()
        idle.clear()
        expired, sock, timer, keep = threading.Event(), [], None, False

        def expire(expired=expired, sock=sock):         # the deadline: a blocked read ends now
            expired.set()
            for s in sock:                              # (the response keeps reading it after conn lets go)
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def connect():
            started, c = time.monotonic(), cls(p.hostname, p.port, timeout=timeout)
            c.connect()
            sock.append(c.sock)
            return c, time.monotonic() - started

        place = []                                      # the limiter's place of the request about to be sent

        def take_place():
            waited, slot = limiter.wait() if limiter else (0.0, None)
            place.extend([slot] if slot else [])
            return waited

        def leave():                                    # the request has left, or never will: counted as sent now
            if place:
                limiter.sent(place.pop())

        def send(c):
            try:
                c.request(method, (p.path or "/") + (f"?{p.query}" if p.query else ""), body=body,
                          headers={"User-Agent": "RecSetters", **(headers or {})})
            finally:
                leave()
        try:
            reused, connecting = conn is not None, 0.0
            if not reused:
                conn, connecting = connect()            # first: the limiter's place covers the sending, not this
            waited = take_place()
            if waited > 2:                              # a long wait: the server may have dropped us meanwhile
                conn.close()
                conn, connecting = connect()
                reused = False
            sock.append(conn.sock)
            timer = threading.Timer(max(0.0, timeout - connecting), expire)   # the wait itself does not count
            timer.daemon = True
            timer.start()
            try:
                send(conn)
                r = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused or expired.is_set():      # a kept-alive connection the server had closed: once more
                    raise
                conn.close()
                conn = connect()[0]
                take_place()                            # a second request: a place of its own
                send(conn)
                r = conn.getresponse()
            length = r.getheader("content-length", "")
            if length.isdigit() and int(length) > max_body:
                raise Transient(f"body over {max_body >> 20} MB")
            data = r.read(max_body + 1)
            if len(data) > max_body:
                raise Transient(f"body over {max_body >> 20} MB")
            if expired.is_set():
                raise TimeoutError
            keep = r.isclosed() and not r.will_close    # read to the end, and the server keeps it open
        except Transient:
            raise
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise Transient("timeout" if expired.is_set() or isinstance(e, TimeoutError) else "connection") from None
        finally:
            leave()
            if timer:
                timer.cancel()
            if keep:
                idle[(p.scheme, p.hostname, p.port)] = conn
            elif conn is not None:
                conn.close()
        location = r.getheader("location")
        if r.status in (301, 302, 303, 307, 308) and location:
            url = urljoin(url, location)
            if r.status == 303 or r.status in (301, 302) and method == "POST":
                method, body = "GET", None
            continue
        return Response(r.status, r.headers, data)
    raise Transient("too many redirects")


def check_folder(path, flag):
    """UserError unless path is a folder or can be made one (no file in the way)."""
    for p in [Path(path), *Path(path).parents]:
        if p.exists():
            if not p.is_dir():
                raise UserError(f"{flag} {path}: {p} is a file, not a folder")
            return


def lock_folder(path, what, command=None):
    """Hold an exclusive lock on the file at path until the returned file is closed, or stop with one line naming the
    holder (its pid and command) if another process has it. The lock is the kernel's (flock): a holder that dies, even
    by kill -9, lets go of it, and the next run takes it. The file says who holds it (command: the process's command
    line by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        f = open(path, "a+", encoding="utf-8")
        if not fcntl:
            return f
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = clean_text(f.read())[:300] or "another process"
            f.close()
            raise UserError(f"another run is using {what}: {holder} holds {path}; rerun when it has finished") from None
        try:
            ours = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            ours = False
        if ours:
            command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} ({command})")
            f.flush()
            return f                                       # keep a reference: closing it releases the lock
        f.close()                                          # its holder removed the file as we locked it: again
    raise UserError(f"could not lock {path}: it keeps disappearing")


WRITER_LOCK = ".writer.lock"   # in a dataset folder while one process writes it
DATASET_FILES = ("users.csv", "items.csv", "interactions.csv")


@contextlib.contextmanager
def dataset_lock(folder, command=None):
    """The one writer of a dataset folder: every command that writes one (collect.py's crawl, match and importers,
    enrich.py, recsetters.py's demo generator) holds this while it reads what it will change and writes; a second
    one stops with one line naming the holder (UserError: exit 2) instead of waiting. A holder killed (-9) lets go
    (lock_folder). The lock file is removed when the block ends, and the folders it made if they are still empty, so
    a command that fails before writing leaves nothing behind."""
    folder = Path(folder)
    made = [p for p in [folder, *folder.parents] if not p.exists()]
    f = lock_folder(folder / WRITER_LOCK, f"dataset {folder}", command)
    try:
        yield
    finally:
        (folder / WRITER_LOCK).unlink(missing_ok=True)   # still ours: removed before we let go
        f.close()
        for p in made:
            try:
                p.rmdir()
            except OSError:
                break


def check_dataset_consistent(folder, users=None, items=None, inter=None):
    """UserError (one line) unless the three files of a dataset agree: every interaction's user is in users.csv and
    its item in items.csv. For readers (recsetters.py's load_dataset): frames not given are read from folder. Files
    that disagree come from different writes (a writer without the lock, an older version, a hand edit, or a file
    read while a writer replaced another); the line names a writer at work if there is one."""
    folder = Path(folder)
    given = {"users.csv": users, "items.csv": items, "interactions.csv": inter}
    for name in DATASET_FILES:
        if given[name] is None:
            if not (folder / name).is_file():
                raise UserError(f"{folder / name} does not exist")
            given[name] = read_table(folder / name, name)
    users, items, inter = (given[name] for name in DATASET_FILES)
    problems = []
    for col, df, name in (("user", users, "users.csv"), ("item", items, "items.csv")):
        missing = ~inter[col].astype(str).isin(set(df[col].astype(str)))
        if missing.any():
            article = "an" if col == "item" else "a"
            problems.append(f"{int(missing.sum()):,} of {len(inter):,} interactions name {article} {col} not in "
                            f"{name} (e.g. {str(inter[col][missing].iloc[0])!r})")
    if problems:
        holder = lock_holder(folder / WRITER_LOCK)
        why = (f"{holder} is writing it: rerun when it has finished" if holder else
               "rerun the command that made it (collect.py; enrich.py changes only items.csv's texts)")
        raise UserError(f"{folder}: the dataset's files disagree: {'; '.join(problems)}; {why}")


def lock_holder(path):
    """Who holds the lock file at path ("pid N (command)"), or None when nobody does."""
    try:
        f = open(path, encoding="utf-8")
    except OSError:
        return None
    with f:
        if not fcntl:
            return None
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)    # let go when f closes
            return None
        except BlockingIOError:
            return clean_text(f.read())[:300] or "another process"

# -----------------------------------------------------------------------------
# Last.fm client: params=, shared rate limit, retries with backoff + jitter, SQLite cache of answers and failures
#
# Last.fm error codes: temporary ones are retried with backoff; 10 and 26 (bad or suspended key) stop the run;
# every other code (6 not found, 7 invalid resource, 17 private, unknown codes) and another 4xx are a permanent
# failure of that one resource (user, page, track): what Last.fm said, recorded with its reason, skipped on reruns
# unless --retry-failed. A body that cannot be read (not JSON, HTML, empty, truncated, undecodable bytes, too large
# or too deep) and a JSON object of the wrong shape (an object that is not one, a list that is a string, a number or
# null) are temporary like a 5xx: retried, and if they outlast every retry the run stops (exit 1) and a rerun asks
# again. A wrong shape is never a fact: never cached as an answer ("no loved tracks") nor as a failure; one an older
# version cached is asked again.

TEMPORARY_CODES = {8, 11, 16, 29}  # operation failed, service offline, temporarily unavailable, rate limit
FATAL_CODES = {10, 26}             # invalid API key, suspended API key
FACTS = ("Last.fm error ", "HTTP ")                # the recorded failures that are what Last.fm said


def load_key(env_file=DOTENV):
    key = os.environ.get("LASTFM_API_KEY", "").strip() or read_dotenv(env_file).get("LASTFM_API_KEY", "")
    if not key:
        raise UserError(NO_KEY_HELP)
    return key


class LastfmError(RetryLater):
    """Temporary failures that outlasted every retry: the run stops, a rerun resumes (exit code 1)."""


class Malformed(Exception):
    """A response whose shape cannot be understood."""


PARSE_ERRORS = (Malformed, ValueError, TypeError, AttributeError, KeyError, IndexError)


def as_int(x):
    if isinstance(x, bool):
        return None
    try:
        return int(str(x).strip())
    except (TypeError, ValueError):
        return None


def as_text(x):
    """A name from a response: strings cleaned, numbers as digits (a tag named 1980), anything else None."""
    if isinstance(x, str):
        return clean_text(x) or None
    if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf"):
        return str(int(x)) if float(x).is_integer() else str(x)
    return None


def as_list(body, field, where):
    """The list-valued field of a Last.fm object: a list; the one object Last.fm sends instead of a one-element list;
    [] when the field is absent (an empty list is left out). Anything else (a string, a number, null, an empty
    object) is a wrong shape: Malformed, a passing fault like an unreadable body, never "none"."""
    if field not in body:
        return []
    x = body[field]
    if isinstance(x, list):
        return x
    if isinstance(x, dict) and x:
        return [x]
    raise Malformed(f"{where}.{field} is {_shape(x)}, not a list")


def _shape(x):
    """What a JSON value is, in words: null, a string, a number, a boolean, a list, an empty object."""
    names = {type(None): "null", str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list"}
    return names.get(type(x), "an empty object" if x == {} else "an object")


def parse_country(data):
    user = data.get("user")
    if not isinstance(user, dict):
        raise Malformed(f"user is {_shape(user)}, not an object")
    c = user.get("country")
    c = clean_text(c) if isinstance(c, str) else ""
    return "" if c in ("", "None") else c


def parse_loved(t):
    """-> (artist, track, uts or '') or None for an entry that is not a loved track."""
    if not isinstance(t, dict):
        return None
    a = t.get("artist")
    artist = as_text(a.get("name") or a.get("#text")) if isinstance(a, dict) else as_text(a)
    d = t.get("date")
    uts = as_int(d.get("uts")) if isinstance(d, dict) else as_int(d)
    track = as_text(t.get("name"))
    return (artist, track, str(uts) if uts and 0 < uts < 1 << 32 else "") if artist and track else None


def parse_friend(f):
    return as_text(f.get("name")) if isinstance(f, dict) else as_text(f)


def parse_page(data, root, item, entry):
    """-> (parsed entries, number of raw entries, claimed total pages, claimed total items); numbers may be None."""
    body = data.get(root)
    if not isinstance(body, dict):
        raise Malformed(f"{root} is {_shape(body)}, not an object")
    raw = as_list(body, item, root)
    attr = body.get("@attr") if isinstance(body.get("@attr"), dict) else {}
    return [e for e in map(entry, raw) if e], len(raw), as_int(attr.get("totalPages")), as_int(attr.get("total"))


def parse_top_tag(data):
    body = data.get("toptags")
    if not isinstance(body, dict):
        raise Malformed(f"toptags is {_shape(body)}, not an object")
    for t in as_list(body, "tag", "toptags"):
        name = as_text(t.get("name")) if isinstance(t, dict) else as_text(t)
        if name:
            return name.lower().lstrip("=+-@ ")
    return ""


def cache_key(method, params):
    """The cache's key of one API call: its method and parameters as strings (no api_key, no format)."""
    return json.dumps([method, sorted((k, str(v)) for k, v in params.items())], ensure_ascii=False)


class Lastfm:
    def __init__(self, key, cache_path, base_url=None, rate=5.0, retries=8, backoff=1.0, max_backoff=MAX_BACKOFF,
                 timeout=30.0, retry_failed=False, max_pages=200, max_wait=MAX_WAIT):
        self.key = key
        self.base_url = check_base_url(base_url or os.environ.get("LASTFM_BASE_URL") or API_URL, "LASTFM_BASE_URL")
        self.retries, self.backoff, self.max_backoff, self.timeout = retries, backoff, max_backoff, timeout
        self.max_pages = max_pages
        self.jitter = random.Random()
        self.stats, self.failures = collections.Counter(), collections.Counter()
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        self.limiter = RateLimiter(Path(cache_path).with_name(Path(cache_path).name + ".rate"), rate,
                                   max_wait=max_wait, api="Last.fm")
        self.db = sqlite3.connect(cache_path)
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, body TEXT NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS failed (key TEXT PRIMARY KEY, reason TEXT NOT NULL)")
        # an older version recorded wrong shapes as failures ("unexpected response: ...", "no user object"): asked again
        self.db.execute("DELETE FROM failed WHERE " + " AND ".join(["substr(reason, 1, ?) != ?"] * len(FACTS)),
                        [x for f in FACTS for x in (len(f), f)])
        if retry_failed:       # also answers that hold U+FFFD: an older version stored undecodable bytes so
            self.stats["retried failures"] = (self.db.execute("DELETE FROM failed").rowcount
                                              + self.db.execute("DELETE FROM responses WHERE instr(body, ?)",
                                                                ("\ufffd",)).rowcount)
        self.db.commit()

    def scrub(self, text):
        """The key's value (also percent-encoded) -> ***; nothing else is touched."""
        from urllib.parse import quote
        return str(text).replace(self.key, "***").replace(quote(self.key, safe=""), "***")

    def _get(self, method, params):
        """One HTTP request -> (kind, data or reason, retry-after seconds or None); kind is ok, temporary,
        permanent or fatal."""
        from urllib.parse import quote, urlencode
        query = urlencode({"method": method, **params, "api_key": self.key, "format": "json"}, quote_via=quote)
        self.stats["requests"] += 1
        try:
            r = http_request("GET", f"{self.base_url}{'&' if '?' in self.base_url else '?'}{query}", self.timeout,
                             limiter=self.limiter)
        except Transient as e:
            return "temporary", e.reason, None
        retry_after = parse_retry_after(r.headers)
        try:
            data, unreadable = r.json(), None
        except Transient as e:
            data, unreadable = None, e.reason
        code = as_int(data.get("error")) if isinstance(data, dict) and "error" in data else None
        if code is not None or isinstance(data, dict) and "error" in data:
            msg = data.get("message") if isinstance(data.get("message"), str) else ""
            reason = clean_text(self.scrub(f"Last.fm error {data.get('error')}: {msg}"))[:200]
            kind = ("temporary" if code in TEMPORARY_CODES or r.status == 429 or r.status >= 500
                    else "fatal" if code in FATAL_CODES else "permanent")
            return kind, reason, retry_after
        if r.status == 429 or r.status >= 500:
            return "temporary", f"HTTP {r.status}", retry_after
        if r.status != 200:
            return "permanent", f"HTTP {r.status}", None
        if not isinstance(data, dict):
            return "temporary", unreadable or "not a JSON object", None
        return "ok", data, None

    def _fail(self, key, reason):
        self.db.execute("DELETE FROM responses WHERE key = ?", (key,))
        self.db.execute("INSERT OR REPLACE INTO failed VALUES (?, ?)", (key, reason))
        self.db.commit()
        self.failures[reason.split(":")[0]] += 1
        return None, reason

    def call(self, method, parse, **params):
        """Cached API call -> (parse(response), None), or (None, reason) for a permanent failure of this resource
        (what Last.fm said: recorded, and answered from the cache on reruns unless retry_failed). Raises LastfmError
        when temporary failures (wrong shapes included: parse raises) outlast every retry, UserError when Last.fm
        refuses the key."""
        params = {k: str(v) for k, v in params.items()}
        key = cache_key(method, params)
        row = self.db.execute("SELECT reason FROM failed WHERE key = ?", (key,)).fetchone()
        if row:
            self.stats["cached"] += 1
            self.failures[row[0].split(":")[0]] += 1
            return None, row[0]
        row = self.db.execute("SELECT body FROM responses WHERE key = ?", (key,)).fetchone()
        if row:
            try:
                data = json.loads(row[0])
            except ValueError:
                data = None
            if isinstance(data, dict) and "error" in data:           # a cache from before failures were kept apart
                self.stats["cached"] += 1
                return self._fail(key, clean_text(self.scrub(f"Last.fm error {data.get('error')}: "
                                                             f"{data.get('message', '')}"))[:200])
            try:
                value = parse(data)
                self.stats["cached"] += 1
                return value, None
            except PARSE_ERRORS:                                     # a wrong shape an older version kept: ask again
                self.db.execute("DELETE FROM responses WHERE key = ?", (key,))
                self.db.commit()
                self.stats["wrong shapes asked again"] += 1
        for attempt in range(self.retries + 1):
            kind, data, retry_after = self._get(method, params)
            if kind == "fatal":
                raise UserError(f"Last.fm refused the API key ({data}); check LASTFM_API_KEY")
            if kind == "permanent":
                return self._fail(key, data)
            if kind == "ok":
                body = self.scrub(json.dumps(data, ensure_ascii=False))
                try:
                    value = parse(json.loads(body))                # what a rerun reads from the cache
                except PARSE_ERRORS as e:                          # a wrong shape: a passing fault, never cached
                    kind, data = "temporary", f"wrong shape: {self.scrub(clean_text(str(e)))[:150]}"
                else:
                    self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, body))
                    self.db.commit()                               # persisted before anything else happens
                    return value, None
            self.stats["faults"] += 1
            if attempt == self.retries:
                break
            back_off(attempt, retry_after, self.backoff, self.max_backoff,
                     f"{method}: {data}, retry {attempt + 1} of {self.retries}", self.limiter.hold,
                     rand=self.jitter.random)
        raise LastfmError(self.scrub(f"{method} failed {self.retries + 1} times (last: {data}); "
                                     "rerun the same command to resume"))

    def pages(self, method, root, item, limit, entry, **params):
        """Every page of a paginated method -> (entries, None), or (None, reason) when page 1 failed for good.
        Stops at the first empty page, at a page repeating the previous one, at the claimed page count, at the
        count the claimed total and the first page's size make plausible, and at max_pages."""
        out, page, last, prev = [], 1, self.max_pages, None
        parse = lambda d: parse_page(d, root, item, entry)
        while page <= last:
            value, why = self.call(method, parse, **params, limit=limit, page=page)
            if why:
                return (None, why) if page == 1 else (out, None)
            entries, n, total_pages, total = value
            if n == 0 or entries == prev:
                break
            if page == 1:
                plausible = [p for p in (total_pages, -(-total // n) if total else None) if p and p > 0]
                last = min([self.max_pages] + plausible)
                if len(plausible) < 2:
                    self.stats["pages without totals"] += 1
            out += entries
            prev, page = entries, page + 1
        return out, None

# -----------------------------------------------------------------------------
# snowball crawl: breadth-first over friends, users with a country and >= min_loved loved tracks
# (Last.fm user names are case-insensitive: "h" and "H" are one user, kept as first seen)


def crawl(api, out_dir, seeds=("RJ",), max_users=1000, min_loved=5):
    import pandas as pd
    from tqdm import tqdm
    queue, seen = collections.deque(), set()
    for s in seeds:
        if s.casefold() not in seen:
            seen.add(s.casefold())
            queue.append(s)
    users, loved, stats = [], [], collections.Counter()
    bar = tqdm(total=max_users, unit=" users", desc="crawl", disable=None, file=sys.stderr)
    while queue and len(users) < max_users:
        name = queue.popleft()
        country, why = api.call("user.getInfo", parse_country, user=name)
        if why:
            stats["failed"] += 1
            continue
        if not country:
            stats["no_country"] += 1
            continue
        tracks, why = api.pages("user.getLovedTracks", "lovedtracks", "track", 1000, parse_loved, user=name)
        rows = [(name, a, t, uts) for a, t, uts in tracks or []]
        if len(rows) >= min_loved:
            users.append((name, country))
            loved += rows
            bar.update(1)
        else:
            stats["few_loved"] += 1
        friends, why = api.pages("user.getFriends", "friends", "user", 200, parse_friend, user=name)
        for f in friends or []:
            if f.casefold() not in seen:
                seen.add(f.casefold())
                queue.append(f)
        bar.set_postfix(loved=len(loved), faults=api.stats["faults"], failed=sum(api.failures.values()))
    bar.close()
    if not users:
        raise UserError(f"crawl: no user kept (seeds {', '.join(seeds)}: {stats['failed']} failed for good, "
                        f"{stats['no_country']} without country, {stats['few_loved']} with < {min_loved} loved); "
                        "nothing written; try other --seed-users")
    users = pd.DataFrame(users, columns=["user", "country"]).sort_values("user")
    loved = pd.DataFrame(loved, columns=["user", "artist", "track", "timestamp"])
    loved = loved.drop_duplicates().sort_values(["user", "timestamp", "artist", "track"], kind="stable")
    write_csv(users, Path(out_dir) / "users.csv")
    write_csv(loved, Path(out_dir) / "loved.csv")
    print(f"crawl: {len(users):,} users, {len(loved):,} loved tracks -> {out_dir}; skipped: "
          f"{stats['no_country']} without country, {stats['few_loved']} with < {min_loved} loved, "
          f"{stats['failed']} failed for good; requests {api.stats['requests']}, cached {api.stats['cached']}, "
          f"faults retried {api.stats['faults']}")
    return users, loved


def failure_report(api):
    """One line: the permanent failures of this run by reason (skipped on reruns unless --retry-failed)."""
    if not api.failures:
        return "permanent failures: none"
    why = ", ".join(f"{r} {n}" for r, n in api.failures.most_common(8))
    return (f"permanent failures: {sum(api.failures.values())} resources ({why}); cached, skipped on reruns "
            "(--retry-failed asks again)")

# -----------------------------------------------------------------------------
# catalogs: schema auto-detection, then one item per normalized (artist, track)

SCHEMAS = {  # name: (artist column, track column, genre column, artist separator)
    "apple-music-10k": ("artistName", "trackName", "primaryGenreName", None),
    "spotify-tracks": ("artists", "track_name", "track_genre", ";"),
    "spotify-tidytuesday": ("track_artist", "track_name", "playlist_genre", None),
}


def load_catalog(path, artist_col=None, track_col=None, genre_col=None):
    """-> DataFrame(artist, track, genre, artists: list of names), without duplicates and rows that are not songs.
    Only a `kind` column says what is not a song (Apple: one music video among 9,999 songs); a title proves nothing:
    the Apple catalog's 11 rows titled "Music" are real songs (Madonna, Erick Sermon, Leela James...)."""
    import pandas as pd
    if not Path(path).is_file():
        raise UserError(f"{path}: catalog file not found")
    df = read_table(path, "catalog")
    if artist_col or track_col:
        if not (artist_col and track_col):
            raise UserError("give both --artist-col and --track-col")
        schema, sep = (artist_col, track_col, genre_col), None
    else:
        hit = [s for s in SCHEMAS.values() if set(s[:3]) <= set(df.columns)]
        if not hit:
            raise UserError(f"{path}: unknown catalog schema; columns found: {', '.join(df.columns)}; "
                            "pass --artist-col, --track-col (and --genre-col)")
        *schema, sep = hit[0]
    missing = [c for c in schema if c and c not in df.columns]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)}; columns found: {', '.join(df.columns)}")
    a, t, g = schema
    cat = pd.DataFrame({"artist": df[a].str.strip(), "track": df[t].str.strip(), "genre": df[g].str.strip() if g else ""})
    song = df.kind.str.strip().isin(["song", ""]) if "kind" in df.columns and not artist_col else True   # iTunes kind
    cat = cat[(cat.artist != "") & (cat.track != "") & song].drop_duplicates()
    cat["artists"] = [[x.strip() for x in s.split(sep) if x.strip()] if sep else [s] for s in cat.artist]
    cat["artists"] = [list(dict.fromkeys(a)) if sep else [unrepeat(s)] for s, a in zip(cat.artist, cat.artists)]
    cat["artist"] = [x[0] for x in cat.artists]
    if cat.empty:
        raise UserError(f"{path}: no songs in the catalog ({len(df)} rows, none with an artist and a track)")
    return cat.reset_index(drop=True)


def read_table(path, what):
    """A UTF-8 CSV as text columns; UserError naming the file when it is empty, not UTF-8 or not CSV."""
    import pandas as pd
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: the {what} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: the {what} is empty")
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as e:
        raise UserError(f"{path}: cannot read the {what}: {str(e).splitlines()[0]}") from None


MATCH_RULES = ("same names", "artist spelling", "one of the artists", "title without extra words")


def catalog_index(cat):
    """-> (items DataFrame, {rule: {(artist key, title key): item id}}), one dict per rule of MATCH_RULES, tried in
    that order: the full artist name as written; its spelling-free form; any one artist of the row (listed, part
    of 'A & B', or featured in the title); and any of those with the title's unknown brackets dropped."""
    import pandas as pd
    items, index = {}, {rule: {} for rule in MATCH_RULES}
    for artist, track, genre, names in cat[["artist", "track", "genre", "artists"]].itertuples(index=False):
        nt, base = norm_track(track), title_base(track)
        iid = catalog_item(artist, track)
        if iid not in items:
            items[iid] = (iid, artist, track, genre, track)
        everyone = list(names) + list(title_parts(track)[3])
        keys = {norm_artist(n) for n in names} | {p for n in everyone for p in [norm_artist(n)] + artist_parts(n)}
        index["same names"].setdefault((norm_name(artist), nt), iid)
        for n in names:
            index["artist spelling"].setdefault((norm_artist(n), nt), iid)
        for k in sorted(keys):
            index["one of the artists"].setdefault((k, nt), iid)
            index["title without extra words"].setdefault((k, base), iid)
    return pd.DataFrame(list(items.values()), columns=MADE_COLS), index


def match_loved(loved, index):
    """-> (loved row positions, item ids, rule that matched) of the matched rows."""
    rows, ids, rules = [], [], []
    for i, (artist, track) in enumerate(zip(loved.artist, loved.track)):
        nt, base = norm_track(track), title_base(track)
        names = [norm_artist(artist)] + artist_parts(artist) + [p for f in title_parts(track)[3] for p in artist_parts(f)]
        tries = [("same names", (norm_name(_FEAT.sub("", artist)), nt)), ("artist spelling", (names[0], nt))]
        tries += [("one of the artists", (n, nt)) for n in names] + [("title without extra words", (n, base)) for n in names]
        for rule, key in tries:
            iid = index[rule].get(key)
            if iid:
                rows.append(i)
                ids.append(iid)
                rules.append(rule)
                break
    return rows, ids, rules


def match(crawl_dir, catalog, out_dir, api=None, artist_col=None, track_col=None, genre_col=None, top=10):
    import pandas as pd
    users = read_table(Path(crawl_dir) / "users.csv", "crawl's user list")
    loved = read_table(Path(crawl_dir) / "loved.csv", "crawl's loved tracks")
    cat = load_catalog(catalog, artist_col, track_col, genre_col)
    items, index = catalog_index(cat)
    rows, ids, rules = match_loved(loved, index)
    if not rows:
        raise UserError(f"{catalog}: none of the {len(loved):,} loved tracks matches this catalog; "
                        f"nothing written to {out_dir}")
    rate = len(rows) / max(len(loved), 1)
    print(f"match {Path(catalog).name}: {len(cat):,} catalog rows -> {len(items):,} items; "
          f"matched {len(rows):,} / {len(loved):,} loved rows ({100 * rate:.1f}%)")
    by_rule = collections.Counter(rules)
    print("matched by rule: " + "; ".join(f"{r} {by_rule[r]:,}" for r in MATCH_RULES))
    unmatched = loved.drop(index=loved.index[rows]).artist.value_counts().head(top)
    if len(unmatched):
        print("top unmatched artists: " + "; ".join(f"{a} ({n})" for a, n in unmatched.items()))
    inter = loved.iloc[rows][["user", "timestamp"]].assign(item=ids)
    inter["ts"] = pd.to_numeric(inter.timestamp, errors="coerce")
    inter = inter.sort_values(["user", "item", "ts"], kind="stable").drop_duplicates(["user", "item"])  # first love
    inter["timestamp"] = inter.ts.map(lambda x: "" if pd.isna(x) else str(int(x)))
    items = items[items.item.isin(set(inter.item))].sort_values("item").reset_index(drop=True)
    fallback = 0
    for i, (artist, track, genre) in enumerate(zip(items.artist, items.track, items.tag)):
        tag = ""
        if api is not None:
            tag = api.call("track.getTopTags", parse_top_tag, artist=artist, track=track, autocorrect=1)[0] or ""
        if not tag:
            fallback += 1
            tag = genre.strip().lower()
        items.loc[i, "tag"] = tag
    print(f"tags: {len(items) - fallback:,} from track.getTopTags, {fallback:,} fell back to the catalog genre")
    users = users[users.user.isin(set(inter.user))]
    write_dataset(out_dir, users, items, inter[["user", "item", "timestamp"]])
    return rate

# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog=__doc__.strip().split("\n\n")[-1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="data", help="datasets go to DATA_DIR/<name>/")
    ap.add_argument("--cache-dir", default=None, help="downloads and API cache (default DATA_DIR/cache)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("hetrec", help="import HetRec 2011 Last.fm 2K (folder, .zip or URL)")
    p.add_argument("src", nargs="?", default=HETREC_URL)
    p = sub.add_parser("lastfm1k", help="import Last.fm Dataset 1K users (folder, .tar.gz or URL)")
    p.add_argument("src", nargs="?", default=LASTFM1K_URL)
    p.add_argument("--min-plays", type=int, default=3)
    api_opts = argparse.ArgumentParser(add_help=False)
    api_opts.add_argument("--rate", type=float, default=5.0, help="max requests per second (0: no limit)")
    add_retry_options(api_opts, 8, "what Last.fm answered was final before (not found, private, other 4xx)")
    api_opts.add_argument("--max-pages", type=int, default=200, help="at most this many pages of one list")
    crawl_opts = argparse.ArgumentParser(add_help=False)
    crawl_opts.add_argument("--seed-users", nargs="+", default=["RJ"])
    crawl_opts.add_argument("--max-users", type=int, default=1000)
    crawl_opts.add_argument("--min-loved", type=int, default=5)
    match_opts = argparse.ArgumentParser(add_help=False)
    match_opts.add_argument("--artist-col")
    match_opts.add_argument("--track-col")
    match_opts.add_argument("--genre-col")
    match_opts.add_argument("--no-tags", action="store_true", help="catalog genre as tag, no track.getTopTags")
    sub.add_parser("crawl", parents=[api_opts, crawl_opts], help="snowball crawl of Last.fm users and loved tracks")
    p = sub.add_parser("match", parents=[api_opts, match_opts], help="match crawled loved tracks to a catalog")
    p.add_argument("catalog")
    p.add_argument("--name", required=True, help="dataset name, e.g. apple or spotify")
    p = sub.add_parser("all", parents=[api_opts, crawl_opts, match_opts], help="crawl, then match each catalog")
    p.add_argument("--catalog", action="append", required=True, metavar="NAME=PATH")
    args = ap.parse_args(argv)
    data = Path(args.data_dir)
    cache = Path(args.cache_dir) if args.cache_dir else data / "cache"
    try:
        with contextlib.ExitStack() as held:       # the locks, let go when the command ends in any way
            command(args, data, cache, held)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RetryLater as e:                       # something is still retryable: exit 1
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def command(args, data, cache, held):
    """Run the parsed command: every dataset folder it writes (and the crawl it reads) locked for the whole run
    (dataset_lock, taken after the input is checked and before any network traffic), and the Last.fm cache too."""
    check_numbers(args, RETRY_NUMBERS + ("rate", "max_pages", "max_users", "min_loved", "min_plays"),
                  positive=("timeout", "max_pages", "max_users", "min_plays"))
    for flag, folder in (("--data-dir", data), ("--cache-dir", cache)):
        check_folder(folder, flag)
    if args.cmd in ("hetrec", "lastfm1k"):
        held.enter_context(dataset_lock(data / args.cmd))
        if args.cmd == "hetrec":
            import_hetrec(args.src, data / "hetrec", cache)
        else:
            import_lastfm1k(args.src, data / "lastfm1k", cache, args.min_plays)
        return
    catalogs = []
    if args.cmd == "match":
        catalogs = [(args.name, args.catalog)]
    elif args.cmd == "all":
        for c in args.catalog:
            name, _, path = c.partition("=")
            if not path:
                raise UserError(f"--catalog {c}: expected NAME=PATH")
            catalogs.append((name, path))
    names = [name for name, _ in catalogs]
    for name in names:
        if name in ("", "lastfm", "cache") or names.count(name) > 1:
            raise UserError(f"dataset name {name!r}: expected one name per catalog, not lastfm or cache (the crawl's "
                            "and the cache's folders)")
    for name, path in catalogs:           # check catalogs before any network traffic
        load_catalog(path, args.artist_col, args.track_col, args.genre_col)
    if args.cmd == "match" and not (data / "lastfm" / "loved.csv").is_file():
        raise UserError(f"{data / 'lastfm' / 'loved.csv'} not found: run `python collect.py crawl` first")
    api = None
    if args.cmd != "match" or not args.no_tags:
        key = load_key()
        check_base_url(os.environ.get("LASTFM_BASE_URL") or API_URL, "LASTFM_BASE_URL")
    for folder in [data / "lastfm"] + [data / name for name, _ in catalogs]:
        held.enter_context(dataset_lock(folder))
    if args.cmd != "match" or not args.no_tags:
        cache_lock = lock_folder(cache / "lastfm.sqlite.lock", f"the Last.fm cache in {cache}")
        held.enter_context(contextlib.closing(cache_lock))
        api = Lastfm(key, cache / "lastfm.sqlite", rate=args.rate, retries=args.retries,
                     backoff=args.backoff, max_backoff=args.max_backoff, timeout=args.timeout,
                     retry_failed=args.retry_failed, max_pages=args.max_pages, max_wait=args.max_wait)
    if args.cmd in ("crawl", "all"):
        crawl(api, data / "lastfm", args.seed_users, args.max_users, args.min_loved)
    for name, path in catalogs:
        match(data / "lastfm", path, data / name, None if args.no_tags else api,
              args.artist_col, args.track_col, args.genre_col)
    if api is not None:
        print(failure_report(api))


if __name__ == "__main__":
    main()
