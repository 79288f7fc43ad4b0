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

The Last.fm key comes from LASTFM_API_KEY or a git-ignored .env; it never reaches logs, errors or files.
Every API response is committed to a SQLite cache as it arrives, so a killed crawl resumes where it stopped.
"""
import argparse
import collections
import hashlib
import io
import json
import os
import random
import re
import sqlite3
import sys
import tarfile
import tempfile
import time
import unicodedata
import zipfile
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

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
RETRY_CODES = {8, 11, 16, 29}   # operation failed, service offline, temporarily unavailable, rate limit
SKIP_CODES = {6, 17}            # not found, private (login required)
ITEM_COLS = ["item", "artist", "track", "tag", "title", "summary", "lyrics"]
NO_KEY_HELP = ("no Last.fm API key: set LASTFM_API_KEY (or put LASTFM_API_KEY=... in .env); get a free key at "
               "https://www.last.fm/api/account/create. Offline alternatives: "
               "make data SOURCE=hetrec FROM=PATH_OR_URL, or make data SOURCE=lastfm1k FROM=PATH_OR_URL")


class UserError(Exception):
    """A problem the user can fix (bad path, unknown schema, no key): one line on stderr, exit code 2."""


def log(msg):
    from tqdm import tqdm
    tqdm.write(str(msg), file=sys.stderr)

# -----------------------------------------------------------------------------
# writing datasets: sorted, utf-8, atomic per file


def write_csv(df, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            df.to_csv(f, index=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_dataset(out_dir, users, items, inter):
    """users/items/inter: DataFrames in the dataset format; every value written as text."""
    users = users[["user", "country"]].astype(str).sort_values("user", kind="stable")
    extra = [c for c in items.columns if c not in ITEM_COLS]
    items = items[ITEM_COLS + extra].astype(str).sort_values("item", kind="stable")
    inter = inter[["user", "item", "timestamp"]].astype(str).sort_values(["user", "item"], kind="stable")
    assert users.user.is_unique and items.item.is_unique and not inter.duplicated(["user", "item"]).any()
    for name, df in [("users.csv", users), ("items.csv", items), ("interactions.csv", inter)]:
        write_csv(df, Path(out_dir) / name)
    print(f"wrote {out_dir}: {len(users):,} users, {len(items):,} items, {len(inter):,} interactions")

# -----------------------------------------------------------------------------
# normalization: items are keyed by normalized (artist, track), never by title alone

_BRACKETS = re.compile(r"\s*(\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\})")
_DASH_SUFFIX = re.compile(r"\s+[-\u2013\u2014]\s+.*$")
_FEAT = re.compile(r"\s+(feat\.?|ft\.?|featuring)\s.*$", re.I)
_ARTIST_SPLIT = re.compile(r"\s*(?:;|,|&|\+|/|\band\b|\bx\b|\u00d7|\bvs\.?|\bfeat\.?|\bft\.?|\bfeaturing\b|\bwith\b)\s*", re.I)


def _norm(s):
    s = unicodedata.normalize("NFKC", s).casefold()
    s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
    s = s.replace("&", " and ")
    s = re.sub(r"['\u2019\u2018`\u00b4]", "", s)            # don't == dont (apostrophes vanish)
    s = re.sub(r"[^\w\s]|_", " ", s)
    return " ".join(s.split())


@lru_cache(maxsize=1 << 20)
def norm_artist(a):
    return _norm(_FEAT.sub("", a)) or _norm(a)


@lru_cache(maxsize=1 << 20)
def norm_track(t):
    s = t
    for _ in range(3):                                       # nested brackets, innermost first
        s = _BRACKETS.sub("", s)
    s = _FEAT.sub("", _DASH_SUFFIX.sub("", s))
    return _norm(s) or _norm(t)


def artist_parts(a):
    """Each listed artist of 'A & B', 'A feat. B', 'A, B', 'A x B' (normalized, in order)."""
    return [p for p in (_norm(x) for x in _ARTIST_SPLIT.split(a)) if p]


def item_id(nartist, ntrack):
    return hashlib.sha1(f"{nartist}\t{ntrack}".encode()).hexdigest()[:16]

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
    items = pd.DataFrame({"item": artists.id, "artist": artists.name, "track": artists.name,
                          "title": artists.name, "summary": "", "lyrics": ""})
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
    items = pd.DataFrame([(i, a, t, "", t, "", "") for i, (a, t) in names.items()], columns=ITEM_COLS)
    print(f"lastfm1k: {len(seen_users):,} users in events, {bad:,} malformed lines skipped, min plays {min_plays}")
    write_dataset(out_dir, users, items, inter)

# -----------------------------------------------------------------------------
# Last.fm client: params=, rate limit, retries with backoff + jitter, SQLite response cache


def load_key(env_file=".env"):
    key = os.environ.get("LASTFM_API_KEY", "").strip()
    if not key and Path(env_file).is_file():
        for line in Path(env_file).read_text().splitlines():
            k, _, v = line.partition("=")
            if k.strip().removeprefix("export ").strip() == "LASTFM_API_KEY":
                key = v.strip().strip("'\"")
    if not key:
        raise UserError(NO_KEY_HELP)
    return key


class LastfmError(Exception):
    pass


class Lastfm:
    def __init__(self, key, cache_path, base_url=None, rate=5.0, retries=8, backoff=1.0, max_backoff=60.0,
                 timeout=30.0):
        import requests
        self.key, self.base_url = key, base_url or os.environ.get("LASTFM_BASE_URL") or API_URL
        self.rate, self.retries, self.backoff, self.max_backoff, self.timeout = rate, retries, backoff, max_backoff, timeout
        self.http = requests.Session()
        self.next_t, self.jitter = 0.0, random.Random()
        self.stats = collections.Counter()
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(cache_path)
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, body TEXT NOT NULL)")
        self.db.commit()

    def scrub(self, text):
        text = str(text).replace(self.key, "***")
        return re.sub(r"(api_key=)[^&\s'\"]+", r"\1***", text)

    def _wait(self):
        if self.rate > 0:
            now = time.monotonic()
            if self.next_t > now:
                time.sleep(self.next_t - now)
            self.next_t = max(now, self.next_t) + 1.0 / self.rate

    def _get(self, method, params):
        """One HTTP request -> (parsed JSON or None, fault description or None)."""
        import requests
        self._wait()
        self.stats["requests"] += 1
        try:
            r = self.http.get(self.base_url, timeout=self.timeout,
                              params={"method": method, **params, "api_key": self.key, "format": "json"})
        except requests.RequestException as e:
            return None, type(e).__name__
        if r.status_code == 429 or r.status_code >= 500:
            return None, f"HTTP {r.status_code}"
        try:
            data = r.json()
        except ValueError:
            return None, f"malformed JSON (HTTP {r.status_code})"
        if not isinstance(data, dict):
            return None, "malformed JSON"
        if "error" in data:
            code = data.get("error")
            if code in RETRY_CODES:
                return None, f"Last.fm error {code}"
            if code not in SKIP_CODES:
                raise LastfmError(self.scrub(f"{method}: Last.fm error {code}: {data.get('message', '')}"))
        elif r.status_code != 200:
            return None, f"HTTP {r.status_code}"
        return data, None

    def call(self, method, **params):
        """Cached API call: the response dict, or None for not found/private (6/17)."""
        params = {k: str(v) for k, v in params.items()}
        key = json.dumps([method, sorted(params.items())], ensure_ascii=False)
        row = self.db.execute("SELECT body FROM responses WHERE key = ?", (key,)).fetchone()
        if row:
            self.stats["cached"] += 1
            data = json.loads(row[0])
        else:
            for attempt in range(self.retries + 1):
                data, fault = self._get(method, params)
                if fault is None:
                    break
                self.stats["faults"] += 1
                if attempt == self.retries:
                    raise LastfmError(self.scrub(f"{method} failed {self.retries + 1} times (last: {fault}); "
                                                 "rerun the same command to resume"))
                delay = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + self.jitter.random())
                time.sleep(delay)
            self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(data, ensure_ascii=False)))
            self.db.commit()                               # persisted before anything else happens
        if "error" in data:
            self.stats["skipped"] += 1
            log(f"skipped {method} {params}: Last.fm error {data['error']} ({data.get('message', '')})")
            return None
        return data

    def pages(self, method, root, item, limit, **params):
        """All pages of a paginated method -> list of entries (None if not found/private)."""
        out, page, total_pages = [], 1, 1
        while page <= total_pages:
            data = self.call(method, **params, limit=limit, page=page)
            if data is None:
                return None if page == 1 else out
            body = data.get(root) or {}
            entries = body.get(item) or []
            out += [entries] if isinstance(entries, dict) else entries
            total_pages = int((body.get("@attr") or {}).get("totalPages") or 1)
            page += 1
        return out

# -----------------------------------------------------------------------------
# snowball crawl: breadth-first over friends, users with a country and >= min_loved loved tracks


def crawl(api, out_dir, seeds=("RJ",), max_users=1000, min_loved=5):
    import pandas as pd
    from tqdm import tqdm
    queue, seen = collections.deque(seeds), set(seeds)
    users, loved, stats = [], [], collections.Counter()
    bar = tqdm(total=max_users, unit=" users", desc="crawl", disable=None, file=sys.stderr)
    while queue and len(users) < max_users:
        name = queue.popleft()
        info = api.call("user.getInfo", user=name)
        country = ((info or {}).get("user") or {}).get("country") or ""
        if info is None:
            stats["missing"] += 1
            continue
        if country.strip() in ("", "None"):
            stats["no_country"] += 1
            continue
        tracks = api.pages("user.getLovedTracks", "lovedtracks", "track", 1000, user=name) or []
        rows = []
        for t in tracks:
            artist = t.get("artist") or {}
            artist = (artist.get("name") or artist.get("#text") or "") if isinstance(artist, dict) else str(artist)
            uts = (t.get("date") or {}).get("uts", "")
            if artist and t.get("name"):
                rows.append((name, artist, t["name"], str(uts)))
        if len(rows) >= min_loved:
            users.append((name, country.strip()))
            loved += rows
            bar.update(1)
        else:
            stats["few_loved"] += 1
        for f in api.pages("user.getFriends", "friends", "user", 200, user=name) or []:
            fname = f.get("name") if isinstance(f, dict) else None
            if fname and fname not in seen:
                seen.add(fname)
                queue.append(fname)
        bar.set_postfix(loved=len(loved), faults=api.stats["faults"], skipped=api.stats["skipped"])
    bar.close()
    users = pd.DataFrame(users, columns=["user", "country"]).sort_values("user")
    loved = pd.DataFrame(loved, columns=["user", "artist", "track", "timestamp"])
    loved = loved.drop_duplicates().sort_values(["user", "timestamp", "artist", "track"], kind="stable")
    write_csv(users, Path(out_dir) / "users.csv")
    write_csv(loved, Path(out_dir) / "loved.csv")
    print(f"crawl: {len(users):,} users, {len(loved):,} loved tracks -> {out_dir}; skipped: "
          f"{stats['no_country']} without country, {stats['few_loved']} with < {min_loved} loved, "
          f"{stats['missing']} not found/private; requests {api.stats['requests']}, cached {api.stats['cached']}, "
          f"faults retried {api.stats['faults']}")
    return users, loved

# -----------------------------------------------------------------------------
# catalogs: schema auto-detection, then one item per normalized (artist, track)

SCHEMAS = {  # name: (artist column, track column, genre column, artist separator)
    "apple-music-10k": ("artistName", "trackName", "primaryGenreName", None),
    "spotify-tracks": ("artists", "track_name", "track_genre", ";"),
    "spotify-tidytuesday": ("track_artist", "track_name", "playlist_genre", None),
}


def load_catalog(path, artist_col=None, track_col=None, genre_col=None):
    """-> DataFrame(artist, track, genre, artists: list of names), 'Music' rows and duplicates dropped."""
    import pandas as pd
    if not Path(path).is_file():
        raise UserError(f"{path}: catalog file not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
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
    cat = cat[(cat.artist != "") & (cat.track != "") & (cat.track.str.casefold() != "music")].drop_duplicates()
    cat["artists"] = [[x.strip() for x in s.split(sep) if x.strip()] if sep else [s] for s in cat.artist]
    cat["artist"] = [x[0] for x in cat.artists]
    return cat.reset_index(drop=True)


def catalog_index(cat):
    """-> (items DataFrame, {(norm artist, norm track): item id}). Full-name keys win over artist-part keys."""
    import pandas as pd
    items, index, extra = {}, {}, []
    for artist, track, genre, names in cat[["artist", "track", "genre", "artists"]].itertuples(index=False):
        nt = norm_track(track)
        iid = item_id(norm_artist(artist), nt)
        if iid not in items:
            items[iid] = (iid, artist, track, genre, track, "", "")
        for n in names:
            index.setdefault((norm_artist(n), nt), iid)
            extra += [((p, nt), iid) for p in artist_parts(n)]
    for k, iid in extra:
        index.setdefault(k, iid)
    return pd.DataFrame(list(items.values()), columns=ITEM_COLS), index


def match_loved(loved, index):
    """-> (loved row positions, item ids) of the matched rows."""
    rows, ids = [], []
    for i, (artist, track) in enumerate(zip(loved.artist, loved.track)):
        nt = norm_track(track)
        for na in [norm_artist(artist)] + artist_parts(artist):
            iid = index.get((na, nt))
            if iid:
                rows.append(i)
                ids.append(iid)
                break
    return rows, ids


def match(crawl_dir, catalog, out_dir, api=None, artist_col=None, track_col=None, genre_col=None, top=10):
    import pandas as pd
    users = pd.read_csv(Path(crawl_dir) / "users.csv", dtype=str, keep_default_na=False)
    loved = pd.read_csv(Path(crawl_dir) / "loved.csv", dtype=str, keep_default_na=False)
    cat = load_catalog(catalog, artist_col, track_col, genre_col)
    items, index = catalog_index(cat)
    rows, ids = match_loved(loved, index)
    rate = len(rows) / max(len(loved), 1)
    print(f"match {Path(catalog).name}: {len(cat):,} catalog rows -> {len(items):,} items; "
          f"matched {len(rows):,} / {len(loved):,} loved rows ({100 * rate:.1f}%)")
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
            data = api.call("track.getTopTags", artist=artist, track=track, autocorrect=1)
            tags = ((data or {}).get("toptags") or {}).get("tag") or []
            tags = [tags] if isinstance(tags, dict) else tags
            tag = (tags[0].get("name") or "").strip().lower() if tags else ""
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
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
    api_opts.add_argument("--retries", type=int, default=8)
    api_opts.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each time")
    api_opts.add_argument("--max-backoff", type=float, default=60.0)
    api_opts.add_argument("--timeout", type=float, default=30.0)
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
    api = None
    try:
        if args.cmd == "hetrec":
            import_hetrec(args.src, data / "hetrec", cache)
        elif args.cmd == "lastfm1k":
            import_lastfm1k(args.src, data / "lastfm1k", cache, args.min_plays)
        else:
            catalogs = []
            if args.cmd == "match":
                catalogs = [(args.name, args.catalog)]
            elif args.cmd == "all":
                for c in args.catalog:
                    name, _, path = c.partition("=")
                    if not path:
                        raise UserError(f"--catalog {c}: expected NAME=PATH")
                    catalogs.append((name, path))
            for name, path in catalogs:           # check catalogs before any network traffic
                load_catalog(path, args.artist_col, args.track_col, args.genre_col)
            if args.cmd == "match" and not (data / "lastfm" / "loved.csv").is_file():
                raise UserError(f"{data / 'lastfm' / 'loved.csv'} not found: run `python collect.py crawl` first")
            if args.cmd != "match" or not args.no_tags:
                api = Lastfm(load_key(), cache / "lastfm.sqlite", rate=args.rate, retries=args.retries,
                             backoff=args.backoff, max_backoff=args.max_backoff, timeout=args.timeout)
            if args.cmd in ("crawl", "all"):
                crawl(api, data / "lastfm", args.seed_users, args.max_users, args.min_loved)
            for name, path in catalogs:
                match(data / "lastfm", path, data / name, None if args.no_tags else api,
                      args.artist_col, args.track_col, args.genre_col)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except LastfmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
