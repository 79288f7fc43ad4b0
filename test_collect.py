"""Tests for collect.py: importers on real data, matching on real catalogs, and a fake Last.fm server
(loopback only) that injects faults, for the crawl, its resume after SIGKILL and the key's secrecy."""
import collections
import contextlib
import hashlib
import http.server
import io
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import pandas as pd
import pytest

import collect

ROOT = Path(__file__).parent
SHARED = ROOT.parent / "shared" / "data"
HETREC = SHARED / "hetrec2011-lastfm-2k"
LFM1K = SHARED / "lastfm-1k-sample"
APPLE = SHARED / "apple-music-10k" / "apple_music_dataset.csv"
SPOTIFY = SHARED / "spotify-songs-tidytuesday" / "spotify_songs.csv"
KEY = "TESTKEY-0123456789abcdef-SECRET"
needs = lambda *paths: pytest.mark.skipif(not all(p.exists() for p in paths), reason="../shared/data not available")


def read(d, name):
    return pd.read_csv(Path(d) / name, dtype=str, keep_default_na=False)


def cli(*args, env=None, cwd=ROOT, timeout=120):
    e = {k: v for k, v in os.environ.items() if k not in ("LASTFM_API_KEY", "LASTFM_BASE_URL")}
    e.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "collect.py"), *map(str, args)], env=e, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)

# -----------------------------------------------------------------------------
# importers on real data


@needs(HETREC)
def test_hetrec_folder_zip_and_url(tmp_path):
    collect.import_hetrec(HETREC, tmp_path / "a", tmp_path / "cache")
    users, items, inter = (read(tmp_path / "a", f) for f in ("users.csv", "items.csv", "interactions.csv"))
    assert (len(inter), len(users), len(items)) == (92834, 1892, 17632)
    assert list(items.columns) == collect.ITEM_COLS + ["tags"] and (inter.timestamp == "").all() and (users.country == "").all()
    mm = items.set_index("item").loc["1"]                 # MALICE MIZER
    assert mm.artist == mm.track == mm.title == "MALICE MIZER" and mm.tag == "j-rock" and mm.tags.startswith("j-rock, ")
    collect.import_hetrec(HETREC, tmp_path / "all", tmp_path / "cache", top_tags=10_000)
    every = read(tmp_path / "all", "items.csv").tags
    assert every.str.contains("tropicália").any()   # Latin-1 tags.dat
    assert not every.str.contains("Ã").any()
    # the same from a .zip and from a URL (downloaded once, published md5 of user_artists.dat verified)
    z = tmp_path / "hetrec2011-lastfm-2k.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in HETREC.iterdir():
            zf.write(f, f.name)
    collect.import_hetrec(z, tmp_path / "b", tmp_path / "cache")
    srv, hits = serve_dir(tmp_path)
    try:
        for _ in range(2):
            collect.import_hetrec(f"{srv}/hetrec2011-lastfm-2k.zip", tmp_path / "c", tmp_path / "cache")
    finally:
        srv.shutdown()
    assert hits["/hetrec2011-lastfm-2k.zip"] == 1
    for f in ("users.csv", "items.csv", "interactions.csv"):
        a = (tmp_path / "a" / f).read_bytes()
        assert a == (tmp_path / "b" / f).read_bytes() == (tmp_path / "c" / f).read_bytes()


def serve_dir(folder):
    hits = collections.Counter()

    class H(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(folder), **k)

        def do_GET(self):
            hits[self.path] += 1
            super().do_GET()

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    class S(str):
        shutdown = srv.shutdown
    return S(f"http://127.0.0.1:{srv.server_address[1]}"), hits


@needs(LFM1K)
def test_lastfm1k_folder_and_tar(tmp_path):
    collect.import_lastfm1k(LFM1K, tmp_path / "a", tmp_path / "cache", min_plays=3)
    users, items, inter = (read(tmp_path / "a", f) for f in ("users.csv", "items.csv", "interactions.csv"))
    # oracle straight from the TSV with pandas
    ev = pd.read_csv(LFM1K / collect.EVENTS_TSV, sep="\t", header=None, quoting=3, dtype=str, keep_default_na=False)
    ev["key"] = [collect.item_id(collect.norm_artist(a), collect.norm_track(t)) for a, t in zip(ev[3], ev[5])]
    g = ev.groupby([0, "key"]).agg(n=(1, "size"), first=(1, "min")).reset_index()
    g = g[g.n >= 3]
    assert len(inter) == len(g) == len(items) and set(inter.item) == set(g.key)
    first = g.set_index("key")["first"].map(collect._iso_to_unix).astype(str)
    assert (inter.set_index("item").timestamp == first.loc[inter.item].values).all()
    assert users.set_index("user").country.to_dict() == {"user_000001": "Japan"}   # user_000002: < 3 plays each
    tgz = tmp_path / "lastfm-dataset-1K.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        for f in (collect.EVENTS_TSV, collect.PROFILE_TSV):   # events first: order must not matter
            tar.add(LFM1K / f, f"lastfm-dataset-1K/{f}")
    collect.import_lastfm1k(tgz, tmp_path / "b", tmp_path / "cache", min_plays=3)
    for f in ("users.csv", "items.csv", "interactions.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


@pytest.mark.slow
def test_user_errors_exit_2_and_write_nothing(tmp_path):
    bad = tmp_path / "weird.csv"
    bad.write_text("foo,bar\n1,2\n")
    for args, words in [(["hetrec", tmp_path / "nope"], "no such file"),
                        (["lastfm1k", bad], "expected"),
                        (["match", bad, "--name", "x", "--no-tags"], "columns found: foo, bar"),
                        (["crawl"], "last.fm/api/account/create")]:
        r = cli("--data-dir", tmp_path / "data", *args, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert "SOURCE=hetrec" in r.stderr and not (tmp_path / "data").exists()
    (tmp_path / ".env").write_text("LASTFM_API_KEY=abc\n")
    assert collect.load_key(tmp_path / ".env") == "abc"

# -----------------------------------------------------------------------------
# catalogs and matching on the real Apple and Spotify (TidyTuesday) catalogs


def lookup(index, artist, track):
    rows, ids, rules = collect.match_loved(pd.DataFrame({"artist": [artist], "track": [track]}), index)
    return ids[0] if ids else None


@needs(APPLE, SPOTIFY)
def test_matching_real_catalogs(tmp_path):
    apple = collect.load_catalog(APPLE)
    assert (apple.track == "Music").sum() == 6 and len(apple) == 8307    # real songs titled "Music"; a video dropped
    items, index = collect.catalog_index(apple)
    title = items.set_index("item").track
    hit = lookup(index, "Journey", "Don\u2019t Stop Believin\u2019")          # curly apostrophes vs "(2024 Remaster)"
    assert title[hit] == "Don't Stop Believin' (2024 Remaster)"
    assert lookup(index, "journey", "Separate Ways (Worlds Apart) - Remastered 2011") is not None
    assert title[lookup(index, "Shakira feat. Wyclef Jean", "Hips Don't Lie")] == "Hips Don't Lie (feat. Wyclef Jean)"
    assert lookup(index, "Shakira", "Hips Dont Lie") == lookup(index, "SHAKIRA", "hips don't lie (Radio Edit)")
    assert lookup(index, "Shakira", "Hips Don't Lie (Live)") is None           # a live recording is another one
    assert lookup(index, "Journey", "Hips Don't Lie") is None                 # never title alone
    spot = collect.load_catalog(SPOTIFY)
    items, index = collect.catalog_index(spot)
    title = items.set_index("item").track
    # TidyTuesday "I Don't Care (with Justin Bieber) - Loud Luxury Remix" by Ed Sheeran; Last.fm lists both artists
    assert "I Don't Care" in title[lookup(index, "Ed Sheeran & Justin Bieber", "I Don't Care")]
    assert lookup(index, "Ed Sheeran", "I Don't Care (feat. Justin Bieber)") is not None
    # same title by two artists stays two items
    dup = spot.assign(nt=spot.track.map(collect.norm_track)).groupby("nt").artist.nunique()
    t = dup[dup > 1].index[0]
    two = spot[spot.track.map(collect.norm_track) == t].drop_duplicates("artist").head(2)
    a, b = (lookup(index, r.artist, r.track) for r in two.itertuples())
    assert a and b and a != b
    # Kaggle "Spotify Tracks" schema: ';' between artists, any listed artist matches
    k = tmp_path / "kaggle.csv"
    pd.DataFrame({"track_id": ["1", "2", "2", "3"], "artists": ["Daft Punk;Pharrell Williams", "Music", "Music", "Adele"],
                  "track_name": ["Get Lucky - Radio Edit", "x", "x", "Music"], "track_genre": ["dance", "pop", "pop", "pop"]}
                 ).to_csv(k, index=False)
    kc = collect.load_catalog(k)
    assert len(kc) == 3                                   # duplicate row dropped, a song titled "Music" kept
    items, index = collect.catalog_index(kc)
    g = lookup(index, "Pharrell Williams", "Get Lucky")
    assert g and g == lookup(index, "Daft Punk feat. Pharrell Williams", "Get Lucky (Radio Edit)")
    # any CSV with explicit columns; unknown schema lists the columns found
    o = tmp_path / "other.csv"
    pd.DataFrame({"who": ["Björk"], "what": ["Jóga"], "kind": ["art pop"]}).to_csv(o, index=False)
    items, index = collect.catalog_index(collect.load_catalog(o, "who", "what", "kind"))
    assert lookup(index, "bjork", "Joga") and items.tag[0] == "art pop"
    with pytest.raises(collect.UserError, match="columns found: who, what, kind"):
        collect.load_catalog(o)

# -----------------------------------------------------------------------------
# the matcher against hand-labelled loved tracks on the real Apple and Spotify catalogs
#
# What counts as one song for this study: the same recording. A remaster, a year, mono/stereo, a single, album or
# radio edit, explicit/clean and a featuring credit do not change the recording (nor its lyrics or meaning); live,
# remix, reprise, acoustic, instrumental, demo versions and "Part N" are other recordings (or songs) and stay apart.

A, S, N = "apple", "spotify", None
# (catalog, loved artist, loved track, catalog artist, catalog track); None: no row of the catalog is that recording
MATCH_CASES = [
    # spellings of artists: P!nk, Ke$ha, AC/DC, a leading "The", accents, & / and / +, $ and ! inside names
    (A, "Pink", "So What", "P!nk", "So What"), (A, "P!nk", "Try", "P!nk", "Try"),
    (A, "Pink", "Just Give Me a Reason", "P!nk", "Just Give Me a Reason (feat. Nate Ruess)"),
    (A, "P!nk feat. Nate Ruess", "Just Give Me A Reason", "P!nk", "Just Give Me a Reason (feat. Nate Ruess)"),
    (S, "Pink", "Raise Your Glass", "P!nk", "Raise Your Glass"), (S, "Pink", "Who Knew", "P!nk", "Who Knew"),
    (S, "P!nk", "What About Us", "P!nk", "What About Us"),
    (S, "P!nk", "What About Us (Cash Cash Remix)", "P!nk", "What About Us - Cash Cash Remix"),
    (S, "Pink", "Can We Pretend", "P!nk", "Can We Pretend (feat. Cash Cash)"),
    (A, "Ke$ha", "Praying", "Kesha", "Praying"), (A, "Kesha", "Rainbow", "Kesha", "Rainbow"),
    (S, "Ke$ha", "TiK ToK", "Kesha", "TiK ToK"), (S, "Ke$ha", "Tik Tok", "Kesha", "TiK ToK"),
    (S, "Kesha", "Die Young", "Kesha", "Die Young"), (S, "Ke$ha", "Blah Blah Blah", "Kesha", "Blah Blah Blah (feat. 3OH!3)"),
    (A, "ACDC", "Back in Black", "AC/DC", "Back In Black"), (A, "AC/DC", "Thunderstruck", "AC/DC", "Thunderstruck"),
    (A, "AC-DC", "Highway to Hell", "AC/DC", "Highway to Hell"), (A, "AC/DC", "TNT", "AC/DC", "T.N.T."),
    (S, "ACDC", "T.N.T", "AC/DC", "T.N.T."), (S, "AC/DC", "Hells Bells", "AC/DC", "Hells Bells"),
    (S, "Beatles", "Hey Jude", "The Beatles", "Hey Jude - Remastered 2009"),
    (S, "The Beatles", "Come Together", "The Beatles", "Come Together - Remastered 2009"),
    (S, "Beatles", "In My Life", "The Beatles", "In My Life - Remastered 2009"),
    (S, "The Beatles", "Back in the USSR", "The Beatles", "Back In The U.S.S.R. - 2018 Mix"),
    (S, "Beatles", "A Day in the Life", "The Beatles", "A Day In The Life - Remastered 2009"),
    (A, "Weeknd", "Blinding Lights", "The Weeknd", "Blinding Lights"), (A, "Lumineers", "Ophelia", "The Lumineers", "Ophelia"),
    (A, "Chainsmokers", "Closer", "The Chainsmokers", "Closer (feat. Halsey)"),
    (S, "The Chainsmokers", "Call You Mine", "The Chainsmokers", "Call You Mine"),
    (S, "Chainsmokers", "Call You Mine (Keanu Silva Remix)", "The Chainsmokers", "Call You Mine - Keanu Silva Remix"),
    (A, "Cure", "Just Like Heaven", "The Cure", "Just Like Heaven"), (A, "The Cure", "Just Like Heaven", "The Cure", "Just Like Heaven"),
    (A, "Beyonce", "Partition", "Beyoncé", "Partition"), (A, "Beyoncé", "Drunk in Love", "Beyoncé", "Drunk in Love (feat. Jay Z)"),
    (A, "Beyonce feat. Jay-Z", "Drunk In Love", "Beyoncé", "Drunk in Love (feat. Jay Z)"),
    (S, "Beyonce", "Halo", "Beyoncé", "Halo"), (S, "Beyoncé", "Crazy in Love", "Beyoncé", "Crazy In Love (feat. Jay-Z)"),
    (S, "Beyonce", "Run the World", "Beyoncé", "Run the World (Girls)"),
    (A, "Beyonce & Shakira", "Beautiful Liar", "Beyoncé & Shakira", "Beautiful Liar"),
    (A, "Shakira", "Beautiful Liar", "Beyoncé & Shakira", "Beautiful Liar"),
    (S, "Tiesto", "BLUE", "Tiësto", "BLUE"), (S, "Tiësto", "Jackie Chan", "Tiësto", "Jackie Chan"),
    (A, "Tiesto", "Carpe Noctum", "Tiësto", "Carpe Noctum"), (S, "Royksopp", "In the End", "Röyksopp", "In the End (Lost Tapes)"),
    (A, "Daryl Hall and John Oates", "Maneater", "Daryl Hall & John Oates", "Maneater"),
    (A, "Hall & Oates", "Rich Girl", "Daryl Hall & John Oates", "Rich Girl"),
    (A, "Daryl Hall & John Oates", "You Make My Dreams", "Daryl Hall & John Oates", "You Make My Dreams (Come True)"),
    (A, "Daryl Hall & John Oates", "I Can't Go for That", "Daryl Hall & John Oates", "I Can't Go for That (No Can Do)"),
    (S, "Daryl Hall & John Oates", "You Make My Dreams", "Daryl Hall & John Oates", "You Make My Dreams"),
    (A, "Dan and Shay", "Speechless", "Dan + Shay", "Speechless"), (A, "Dan + Shay", "Tequila", "Dan + Shay", "Tequila"),
    (A, "Florence and the Machine", "Heavy in Your Arms", "Florence + the Machine", "Heavy In Your Arms"),
    (S, "Dan + Shay", "10,000 Hours", "Dan + Shay", "10,000 Hours (with Justin Bieber)"),
    (S, "Dan + Shay & Justin Bieber", "10,000 Hours", "Dan + Shay", "10,000 Hours (with Justin Bieber)"),
    (A, "Panic! at the Disco", "High Hopes", "Panic! At the Disco", "High Hopes"),
    (A, "Panic at the Disco", "High Hopes", "Panic! At the Disco", "High Hopes"),
    (A, "fun.", "Some Nights", "Fun.", "Some Nights"), (A, "Fun", "We Are Young", "Fun.", "We Are Young (feat. Janelle Monáe)"),
    (A, "A$AP Rocky", "L$D", "A$AP Rocky", "L$D"), (A, "ASAP Rocky", "LSD", "A$AP Rocky", "L$D"),
    (S, "Ty Dolla Sign", "Wavy", "Ty Dolla $ign", "Wavy (feat. Joe Moses)"), (S, "Pink Sweats", "Honesty", "Pink Sweat$", "Honesty"),
    # feat. / ft. / with, on either side; several artists in one row
    (A, "Shakira", "Hips Don't Lie", "Shakira", "Hips Don't Lie (feat. Wyclef Jean)"),
    (A, "Shakira feat. Wyclef Jean", "Hips Dont Lie", "Shakira", "Hips Don't Lie (feat. Wyclef Jean)"),
    (A, "Mark Ronson feat. Bruno Mars", "Uptown Funk", "Mark Ronson", "Uptown Funk (feat. Bruno Mars)"),
    (A, "Mark Ronson", "Uptown Funk!", "Mark Ronson", "Uptown Funk (feat. Bruno Mars)"),
    (A, "Bruno Mars", "Uptown Funk", "Mark Ronson", "Uptown Funk (feat. Bruno Mars)"),
    (S, "Ed Sheeran", "I Don't Care", "Ed Sheeran", "I Don't Care (with Justin Bieber)"),
    (S, "Ed Sheeran & Justin Bieber", "I Don't Care", "Ed Sheeran", "I Don't Care (with Justin Bieber)"),
    (S, "Ed Sheeran", "I Don't Care (Loud Luxury Remix)", "Ed Sheeran", "I Don't Care (with Justin Bieber) - Loud Luxury Remix"),
    (S, "Nicky Romero", "My Way", "Nicky Romero", "My Way (ft. Alice Berg)"),
    (S, "Nicky Romero ft. Alice Berg", "My Way", "Nicky Romero", "My Way (ft. Alice Berg)"),
    (A, "Miranda Lambert", "Somethin' Bad", "Miranda Lambert", "Somethin' Bad (with Carrie Underwood)"),
    (A, "Carrie Underwood", "Somethin' Bad", "Miranda Lambert", "Somethin' Bad (with Carrie Underwood)"),
    (A, "Macklemore & Ryan Lewis", "Can't Hold Us", "Macklemore & Ryan Lewis, Macklemore & Ryan Lewis", "Can't Hold Us (feat. Ray Dalton)"),
    (A, "Macklemore", "Can't Hold Us", "Macklemore & Ryan Lewis, Macklemore & Ryan Lewis", "Can't Hold Us (feat. Ray Dalton)"),
    (A, "JAY-Z & Linkin Park", "Numb / Encore", "JAY-Z & LINKIN PARK", "Numb / Encore"),
    (A, "Jay-Z", "Numb/Encore", "JAY-Z & LINKIN PARK", "Numb / Encore"),
    (A, "Linkin Park", "Numb / Encore", "JAY-Z & LINKIN PARK", "Numb / Encore"),
    (A, "The Chainsmokers & Coldplay", "Something Just Like This", "The Chainsmokers & Coldplay", "Something Just Like This"),
    (A, "Coldplay", "Something Just Like This", "The Chainsmokers & Coldplay", "Something Just Like This"),
    # Part N / Pt. N in any spelling; a part is its own song
    (A, "Christina Perri", "A Thousand Years (Part 2)", "Christina Perri", "A Thousand Years, Pt. 2 (feat. Steve Kazee)"),
    (A, "Plies", "Bust It Baby Part 2", "Plies", "Bust It Baby, Pt. 2 (feat. Ne-Yo)"),
    (A, "Plies", "Bust It Baby", N, N),
    (S, "Pink Floyd", "Another Brick in the Wall (Part 2)", "Pink Floyd", "Another Brick in the Wall, Pt. 2"),
    (S, "Pink Floyd", "Another Brick in the Wall Part II", "Pink Floyd", "Another Brick in the Wall, Pt. 2"),
    (S, "Billy Idol", "White Wedding (Part 1)", "Billy Idol", "White Wedding - Pt. 1"),
    (S, "EMMA WAHLIN", "Make A Move Pt. 2", "EMMA WAHLIN", "Make A Move - Pt. 2"),
    (S, "Emma Wahlin", "Make a Move", "EMMA WAHLIN", "Make A Move"),
    (S, "Alan Walker", "Alone Pt. 2", "Alan Walker", "Alone, Pt. II"),
    (S, "Pink Sweat$", "Coke & Henny Part 2", "Pink Sweat$", "Coke & Henny Pt. 2"),
    (A, "Michael Jackson", "Another Part of Me", "Michael Jackson", "Another Part of Me"),
    # remasters, years, single / radio edits: the same recording for this study
    (A, "Journey", "Don't Stop Believin'", "Journey", "Don't Stop Believin' (2024 Remaster)"),
    (A, "Journey", "Faithfully", "Journey", "Faithfully (2024 Remaster)"),
    (A, "Journey", "Open Arms - Remastered 2011", "Journey", "Open Arms (2024 Remaster)"),
    (S, "Queen", "Don't Stop Me Now", "Queen", "Don't Stop Me Now - 2011 Mix"),
    (S, "Pet Shop Boys", "Go West", "Pet Shop Boys", "Go West - 2003 Remaster"),
    (S, "Lana Del Rey", "Video Games", "Lana Del Rey", "Video Games - Remastered"),
    (S, "Ace of Base", "All That She Wants", "Ace of Base", "All That She Wants - Remastered"),
    (A, "David Bowie", "Let's Dance", "David Bowie", "Let's Dance (Single Version)"),
    (S, "Michael Jackson", "Beat It", "Michael Jackson", "Beat It - Single Version"),
    (S, "Darude", "Sandstorm", "Darude", "Sandstorm - Radio Edit"),
    (S, "Real McCoy", "Come and Get Your Love", "Real McCoy", "Come and Get Your Love - Radio Edit"),
    (A, "Spice Girls", "Wannabe", "Spice Girls", "Wannabe (Radio Edit)"),
    (A, "Michael Jackson", "Smooth Criminal", "Michael Jackson", "Smooth Criminal"),
    (A, "Michael Jackson", "Smooth Criminal (Radio Edit)", "Michael Jackson", "Smooth Criminal"),
    (S, "Swedish House Mafia", "Don't You Worry Child", "Swedish House Mafia", "Don't You Worry Child - Radio Edit"),
    (S, "Tiësto", "Secrets", "Tiësto", "Secrets - Radio Edit"),
    (S, "OMI", "Cheerleader (Felix Jaehn Remix)", "OMI", "Cheerleader (Felix Jaehn Remix) - Radio Edit"),
    # different recordings stay apart: reprise, live, remix, acoustic, instrumental, demo
    (A, "Frank Ocean", "Solo", "Frank Ocean", "Solo"), (A, "Frank Ocean", "Solo (Reprise)", "Frank Ocean", "Solo (Reprise)"),
    (S, "Coldplay", "O", "Coldplay", "O"), (S, "Coldplay", "O (Reprise)", "Coldplay", "O - Reprise"),
    (A, "Loren Allred", "Never Enough", "Loren Allred", "Never Enough"),
    (A, "Loren Allred", "Never Enough (Reprise)", "Loren Allred", "Never Enough (Reprise)"),
    (A, "Metallica", "Fade to Black", "Metallica", "Fade to Black"),
    (A, "Metallica", "Ride the Lightning", "Metallica", "Ride the Lightning"),
    (A, "Stone Temple Pilots", "Plush", "Stone Temple Pilots", "Plush"),
    (A, "Stone Temple Pilots", "Plush (Acoustic)", "Stone Temple Pilots", "Plush (Acoustic)"),
    (A, "Fleetwood Mac", "Landslide", "Fleetwood Mac", "Landslide"),
    (A, "Gnarls Barkley", "Crazy", "Gnarls Barkley", "Crazy"),
    (A, "Gnarls Barkley", "Crazy (Instrumental)", "Gnarls Barkley", "Crazy (Instrumental)"),
    (A, "Sleeping At Last", "Turning Page", "Sleeping At Last", "Turning Page"),
    (A, "Skrillex", "Kill Everybody", "Skrillex", "Kill Everybody"),
    (A, "Skrillex", "Scary Monsters and Nice Sprites", "Skrillex", "Scary Monsters and Nice Sprites"),
    (A, "Skrillex", "Scary Monsters and Nice Sprites (Zedd Remix)", "Skrillex", "Scary Monsters and Nice Sprites (Zedd Remix)"),
    (A, "Bruno Mars", "Finesse", "Bruno Mars", "Finesse"),
    (A, "Bruno Mars feat. Cardi B", "Finesse (Remix)", "Bruno Mars", "Finesse (Remix) [feat. Cardi B]"),
    (A, "John Legend", "All of Me", "John Legend", "All of Me"), (A, "The Lumineers", "Cleopatra", "The Lumineers", "Cleopatra"),
    (S, "Maroon 5", "Memories", "Maroon 5", "Memories"),
    (S, "Maroon 5", "Memories (Dillon Francis Remix)", "Maroon 5", "Memories - Dillon Francis Remix"),
    (S, "Zara Larsson", "All the Time", "Zara Larsson", "All the Time"),
    (S, "Lewis Capaldi", "Someone You Loved", "Lewis Capaldi", "Someone You Loved"),
    (S, "You Me At Six", "Loverboy", "You Me At Six", "Loverboy"),
    (S, "You Me At Six", "Loverboy (Acoustic)", "You Me At Six", "Loverboy - Acoustic Version"),
    (S, "St. Lucia", "Dancing on Glass", "St. Lucia", "Dancing On Glass"),
    (S, "Imagine Dragons", "Demons", "Imagine Dragons", "Demons"),
    (S, "Guns N' Roses", "Sweet Child O' Mine", "Guns N' Roses", "Sweet Child O' Mine"),
    (S, "Guns N' Roses", "Knockin' on Heaven's Door", "Guns N' Roses", "Knockin' On Heaven's Door"),
    (S, "Bob Dylan", "Like a Rolling Stone", "Bob Dylan", "Like a Rolling Stone"),
    (S, "50 Cent", "Disco Inferno", "50 Cent", "Disco Inferno"), (S, "Avicii", "SOS", "Avicii", "SOS"),
    (S, "Alok", "All The Lies", "Alok", "All The Lies"),
    (S, "Florence + the Machine", "Delilah", N, N), (S, "Avicii", "Tough Love", N, N),
    (S, "AJ Mitchell", "All My Friends", N, N), (S, "Ryn Weaver", "Reasons Not To Die", N, N),
    (S, "The xx", "Blood Red Moon", N, N), (A, "Colin Hay", "Overkill", N, N), (A, "Lin-Manuel Miranda", "Valley Forge", N, N),
    (A, "Journey", "Hips Don't Lie", N, N), (A, "Madonna", "Hips Don't Lie", N, N),
    (A, "Kris Allen", "Live Like We're Dying", "Kris Allen", "Live Like We're Dying"),
    (A, "Tim McGraw", "Live Like You Were Dying", "Tim McGraw", "Live Like You Were Dying"),
    (A, "One Direction", "Live While We're Young", "One Direction", "Live While We're Young"),
    # real songs titled "Music"
    (A, "Madonna", "Music", "Madonna", "Music"), (A, "Erick Sermon", "Music", "Erick Sermon", "Music"),
    (A, "Erick Sermon feat. Marvin Gaye", "Music", "Erick Sermon", "Music"), (A, "Leela James", "Music", "Leela James", "Music"),
]
MUST_STAY_APART = [   # two rows of one catalog that are different recordings: never one item
    (A, ("Frank Ocean", "Solo"), ("Frank Ocean", "Solo (Reprise)")), (S, ("Coldplay", "O"), ("Coldplay", "O - Reprise")),
    (A, ("Loren Allred", "Never Enough"), ("Loren Allred", "Never Enough (Reprise)")),
    (A, ("Metallica", "Fade to Black"), ("Metallica", "Fade to Black (Live at Rasputin Music, Berkeley, CA - Apr. 16th, 2016)")),
    (A, ("Stone Temple Pilots", "Plush"), ("Stone Temple Pilots", "Plush (Acoustic)")),
    (A, ("Gnarls Barkley", "Crazy"), ("Gnarls Barkley", "Crazy (Instrumental)")),
    (A, ("Skrillex", "Scary Monsters and Nice Sprites"), ("Skrillex", "Scary Monsters and Nice Sprites (Zedd Remix)")),
    (A, ("Bruno Mars", "Finesse"), ("Bruno Mars", "Finesse (Remix) [feat. Cardi B]")),
    (A, ("The Lumineers", "Cleopatra"), ("The Lumineers", "Cleopatra [Acoustic Demo] (Bonus Track)")),
    (S, ("Maroon 5", "Memories"), ("Maroon 5", "Memories - Dillon Francis Remix")),
    (S, ("You Me At Six", "Loverboy"), ("You Me At Six", "Loverboy - Acoustic Version")),
    (S, ("Imagine Dragons", "Demons"), ("Imagine Dragons", "Demons - Live London Sessions / 2013")),
    (S, ("Guns N' Roses", "Sweet Child O' Mine"), ("Guns N' Roses", "Sweet Child O' Mine - Live In Paris / 1992")),
    (S, ("EMMA WAHLIN", "Make A Move"), ("EMMA WAHLIN", "Make A Move - Pt. 2")),
]
ONE_ITEM = [          # two rows of one catalog that are the same recording for this study: one item
    (A, ("Michael Jackson", "Smooth Criminal"), ("Michael Jackson", "Smooth Criminal (Radio Edit)")),
    (S, ("Pink Floyd", "Another Brick in the Wall, Pt. 2"), ("Pink Floyd", "Another Brick In The Wall, Pt. 2 - 2011 Remastered Version")),
    (S, ("Billy Idol", "White Wedding - Pt. 1"), ("Billy Idol", "White Wedding - Part 1 - 2001- Remaster")),
    (S, ("Daryl Hall & John Oates", "You Make My Dreams"), ("Daryl Hall & John Oates", "You Make My Dreams - Remastered")),
    (A, ("Daryl Hall & John Oates", "You Make My Dreams"), ("Daryl Hall & John Oates", "You Make My Dreams (Come True)")),
    (A, ("Macklemore & Ryan Lewis", "Can't Hold Us (feat. Ray Dalton)"),
     ("Macklemore & Ryan Lewis, Macklemore & Ryan Lewis", "Can't Hold Us (feat. Ray Dalton)")),
]


def evaluate_matcher(mod, cases, paths, apart=(), together=()):
    """-> (precision, recall, per-rule {rule: Counter(tp, fp, fn)}, wrong cases)."""
    def row_item(artist, track):
        if hasattr(mod, "catalog_item"):
            return mod.catalog_item(artist, track)
        return mod.item_id(mod.norm_artist(artist), mod.norm_track(track))   # collect.py before ca6ae59's successor
    per_rule, wrong, pairs_bad = collections.defaultdict(collections.Counter), [], 0
    for name, path in paths.items():
        items, index = mod.catalog_index(mod.load_catalog(path))
        mine = [c for c in cases if c[0] == name]
        loved = pd.DataFrame({"artist": [c[1] for c in mine], "track": [c[2] for c in mine]})
        res = mod.match_loved(loved, index)
        got = dict(zip(res[0], res[1]))
        rules = dict(zip(res[0], res[2])) if len(res) > 2 else {}
        for i, c in enumerate(mine):
            want = row_item(c[3], c[4]) if c[3] is not None else None
            g, rule = got.get(i), rules.get(i, "-")
            if g == want:
                per_rule[rule]["tp"] += g is not None      # both None: rightly unmatched
            else:
                if g is not None:
                    per_rule[rule]["fp"] += 1
                if want is not None:
                    per_rule["(missed)"]["fn"] += 1
                wrong.append((c, "wrong" if g is not None else "missed"))
        for cat, a, b in apart:
            if cat == name and row_item(*a) == row_item(*b):
                per_rule["(merged in catalog)"]["fp"] += 1
                wrong.append(((cat, a, b), "merged"))
        for cat, a, b in together:
            if cat == name and row_item(*a) != row_item(*b):
                per_rule["(split in catalog)"]["fn"] += 1
                wrong.append(((cat, a, b), "split"))
    tot = sum(per_rule.values(), collections.Counter())
    p = tot["tp"] / max(tot["tp"] + tot["fp"], 1)
    r = tot["tp"] / max(tot["tp"] + tot["fn"], 1)
    return p, r, dict(per_rule), wrong


@needs(APPLE, SPOTIFY)
def test_matcher_precision_and_recall_on_labelled_cases():
    paths = {"apple": APPLE, "spotify": SPOTIFY}
    raw = {"apple": pd.read_csv(APPLE, dtype=str, keep_default_na=False)[["artistName", "trackName"]],
           "spotify": pd.read_csv(SPOTIFY, dtype=str, keep_default_na=False)[["track_artist", "track_name"]]}
    rows = {name: set(map(tuple, df.values)) for name, df in raw.items()}
    for c in MATCH_CASES:                                         # every label names a real catalog row
        assert c[3] is None or (c[3], c[4]) in rows[c[0]], c
    for c, a, b in MUST_STAY_APART + ONE_ITEM:
        assert a in rows[c] and b in rows[c], (a, b)
    p, r, per_rule, wrong = evaluate_matcher(collect, MATCH_CASES, paths, MUST_STAY_APART, ONE_ITEM)
    print(f"matcher on {len(MATCH_CASES)} labelled cases + {len(MUST_STAY_APART) + len(ONE_ITEM)} catalog pairs: "
          f"precision {p:.3f}, recall {r:.3f}")
    for rule, n in per_rule.items():
        print(f"  {rule}: {dict(n)}")
    assert len(MATCH_CASES) >= 120 and p >= 0.98 and r >= 0.95, wrong


# -----------------------------------------------------------------------------
# a fake Last.fm: real JSON shapes, @attr pagination, error bodies, injected faults, success counts


def fake_world(seed=0, n_users=80):
    """Users (1K-dataset ids and countries), friends and loved tracks (artist, track from 1K events)."""
    rng = random.Random(seed)
    prof = pd.read_csv(LFM1K / collect.PROFILE_TSV, sep="\t", dtype=str, keep_default_na=False)
    ev = pd.read_csv(LFM1K / collect.EVENTS_TSV, sep="\t", header=None, quoting=3, dtype=str, keep_default_na=False)
    pairs = sorted(set(zip(ev[3], ev[5])))
    people = {"RJ": "United Kingdom", "Zoë & Co #1+/x": "Brazil", "private_one": "Peru"}
    people.update(zip(prof["#id"][:n_users], prof.country[:n_users]))
    names = list(people)
    world = {}
    for n in names:
        k = rng.choice([0, 3, 20, 60, 130, 260])          # several pages at 50 per page
        world[n] = {"country": people[n], "friends": rng.sample([m for m in names if m != n], rng.randint(1, 5)),
                    "loved": [(a, t, 1_100_000_000 + rng.randrange(200_000_000)) for a, t in rng.sample(pairs, k)]}
    world["RJ"]["friends"] = ["Zoë & Co #1+/x", "private_one"] + world["RJ"]["friends"]
    return world


class FakeLastfm:
    def __init__(self, world, fault_rate=0.0, seed=0, slow_s=1.2, page_cap=50, cache=None):
        self.world, self.fault_rate, self.rng, self.slow_s, self.page_cap = world, fault_rate, random.Random(seed), slow_s, page_cap
        self.served, self.faults, self.lock = collections.Counter(), collections.Counter(), threading.Lock()
        self.cache, self.answered, self.refetched, self.unsaved = cache, set(), [], []
        self.freeze_after, self.blocked, self.release = None, threading.Event(), threading.Event()
        self.keys_seen = set()
        fake = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                try:
                    fake.handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *a):
                pass
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/2.0/"

    def stop(self):
        self.release.set()
        self.srv.shutdown()

    def handle(self, h):
        q = {k: v[0] for k, v in parse_qs(urlparse(h.path).query, keep_blank_values=True).items()}
        self.keys_seen.add(q.pop("api_key", None))
        key = json.dumps(sorted(q.items()))
        with self.lock:
            ckey = self.check_cache(q)
            if self.freeze_after is not None and len(self.served) >= self.freeze_after:
                frozen = True
            else:
                frozen = False
                fault = self.rng.choice(["429", "500", "e29", "json", "slow", "late"]) if self.rng.random() < self.fault_rate else None
                status, body = self.answer(q)
                if fault:
                    self.faults[fault] += 1
                if fault in (None, "late"):                # "late": a good answer sent after the client gave up
                    self.served[key] += 1
                    self.answered.add(ckey)
        if frozen:                                   # hold the request: the client is idle, its cache committed
            self.blocked.set()
            self.release.wait(30)
            h.close_connection = True
            return
        if fault == "429":
            status, body = 429, {"error": 29, "message": "Rate Limit Exceeded"}
        elif fault == "500":
            status, body = 500, "<html>Internal Server Error</html>"
        elif fault == "e29":
            status, body = 200, {"error": 29, "message": "Rate Limit Exceeded - Your IP has made too many requests"}
        elif fault == "json":
            body = json.dumps(body)[: 20]
        elif fault in ("slow", "late"):
            time.sleep(self.slow_s)
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def check_cache(self, q):
        """The client asks one thing at a time and commits each answer it gets before asking the next, so when a
        request arrives: its resource is not in the client's cache (else a committed resource is fetched again),
        and every other resource answered so far is (else an answer was used but not committed). The one answer
        that may be repeated is the one the client never got: sent after its timeout, or in flight at a kill."""
        if self.cache is None:
            return None
        ckey = collect.cache_key(q["method"], {k: v for k, v in q.items() if k not in ("method", "format")})
        db = sqlite3.connect(f"file:{self.cache}?mode=ro", uri=True, timeout=30)
        try:
            saved = {k for (k,) in db.execute("SELECT key FROM responses UNION SELECT key FROM failed")}
        finally:
            db.close()
        if ckey in saved:
            self.refetched.append(ckey)
        self.unsaved += sorted(self.answered - saved - {ckey})
        return ckey

    def page(self, entries, q, attr):
        limit, page = min(int(q.get("limit", 50)), self.page_cap), int(q.get("page", 1))
        pages = (len(entries) + limit - 1) // limit
        return entries[(page - 1) * limit: page * limit], {**attr, "page": str(page), "perPage": str(limit),
                                                          "totalPages": str(pages), "total": str(len(entries))}

    def answer(self, q):
        m, u = q.get("method"), self.world.get(q.get("user", ""))
        if m.startswith("user.") and u is None:
            return 404, {"error": 6, "message": "User not found", "links": []}
        if m == "user.getInfo":
            return 200, {"user": {"name": q["user"], "realname": "", "country": u["country"] or "None", "playcount": "0",
                                  "url": "https://www.last.fm/user/" + q["user"], "type": "user"}}
        if m == "user.getFriends":
            friends = [{"name": f, "country": self.world[f]["country"], "realname": ""} for f in u["friends"]]
            entries, attr = self.page(friends, q, {"for": q["user"]})
            return 200, {"friends": {"user": entries, "@attr": attr}}
        if m == "user.getLovedTracks":
            if q["user"] == "private_one":
                return 403, {"error": 17, "message": "Login: User required to be logged in"}
            tracks = [{"name": t, "mbid": "", "url": "", "artist": {"name": a, "mbid": "", "url": ""},
                       "date": {"uts": str(ts), "#text": "01 Jan 2010, 00:00"}, "streamable": {"fulltrack": "0", "#text": "0"}}
                      for a, t, ts in sorted(u["loved"], key=lambda x: -x[2])]
            entries, attr = self.page(tracks, q, {"user": q["user"]})
            return 200, {"lovedtracks": {"track": entries, "@attr": attr}}
        if m == "track.getTopTags":
            h = int(hashlib.md5(f"{q['artist']}|{q['track']}".encode()).hexdigest(), 16)
            if h % 4 == 0:
                return 200, {"error": 6, "message": "Track not found", "links": []}
            tags = [] if h % 4 == 1 else [{"count": 100 - i, "name": f"tag{(h >> i) % 7}", "url": ""} for i in range(3)]
            return 200, {"toptags": {"tag": tags, "@attr": {"artist": q["artist"], "track": q["track"]}}}
        return 400, {"error": 3, "message": "Invalid Method"}


API_OPTS = ["--rate", "0", "--backoff", "0.01", "--max-backoff", "0.05", "--timeout", "0.5", "--retries", "12"]


def crawl_args(data, extra=()):
    return ["--data-dir", data, "all", "--catalog", f"apple={APPLE}", "--catalog", f"spotify={SPOTIFY}",
            "--max-users", "30", *API_OPTS, *extra]


def run_inproc(monkeypatch, fake, args):
    monkeypatch.setenv("LASTFM_API_KEY", KEY)
    monkeypatch.setenv("LASTFM_BASE_URL", fake.url)
    collect.main([str(a) for a in args])


def tree_bytes(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*.csv"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted, fault-free crawl + match of both catalogs."""
    if not (LFM1K.exists() and APPLE.exists() and SPOTIFY.exists()):
        pytest.skip("../shared/data not available")
    d = tmp_path_factory.mktemp("ref")
    fake = FakeLastfm(fake_world(), cache=d / "cache" / "lastfm.sqlite")
    mp = pytest.MonkeyPatch()
    try:
        run_inproc(mp, fake, crawl_args(d))
    finally:
        mp.undo()
        fake.stop()
    return d, fake


def test_crawl_is_complete_and_matches(reference, capsys):
    d, fake = reference
    world = fake.world
    users, loved = read(d / "lastfm", "users.csv"), read(d / "lastfm", "loved.csv")
    assert len(users) == 30 and "RJ" in set(users.user) and "Zoë & Co #1+/x" in set(users.user)
    assert "private_one" not in set(users.user) and all(world[u]["country"] for u in users.user)
    for u in users.user:                                           # every page of every user's loved tracks
        want = sorted((a, t, str(ts)) for a, t, ts in world[u]["loved"])
        got = sorted(map(tuple, loved[loved.user == u][["artist", "track", "timestamp"]].values))
        assert got == want and len(want) >= 5
    assert fake.answered and not fake.refetched and not fake.unsaved and KEY in fake.keys_seen
    for name in ("apple", "spotify"):
        inter, items = read(d / name, "interactions.csv"), read(d / name, "items.csv")
        assert len(inter) > 0 and set(inter.item) <= set(items.item) and (items.tag != "").all()
        print(f"fake crawl match rate {name}: {len(inter)}/{len(loved)} = {100 * len(inter) / len(loved):.1f}%")


@needs(LFM1K, APPLE, SPOTIFY)
def test_crawl_survives_20pct_faults(reference, tmp_path, monkeypatch):
    fake = FakeLastfm(fake_world(), fault_rate=0.2, seed=1, cache=tmp_path / "cache" / "lastfm.sqlite")
    try:
        run_inproc(monkeypatch, fake, crawl_args(tmp_path))
    finally:
        fake.stop()
    print(f"20% faults: {dict(fake.faults)} injected, {sum(fake.served.values())} successful responses")
    assert sum(fake.faults.values()) > 20 and set(fake.faults) == {"429", "500", "e29", "json", "slow", "late"}
    assert tree_bytes(tmp_path) == tree_bytes(reference[0])        # nothing lost, nothing changed
    assert not fake.refetched and not fake.unsaved                 # only answers the client never got were asked again
    assert set(fake.served) == set(reference[1].served) and sum(fake.served.values()) > len(fake.served)


@needs(LFM1K, APPLE, SPOTIFY)
@pytest.mark.slow
def test_kill_and_resume_byte_identical(reference, tmp_path):
    fake = FakeLastfm(fake_world(), fault_rate=0.2, seed=2, cache=tmp_path / "cache" / "lastfm.sqlite")
    env = {"LASTFM_API_KEY": KEY, "LASTFM_BASE_URL": fake.url}
    outs = []
    try:
        for kill_at in (3, 40, 120, 185):                         # crawl early, mid, late; tags phase
            fake.freeze_after = kill_at
            p = subprocess.Popen([sys.executable, str(ROOT / "collect.py"), *map(str, crawl_args(tmp_path))],
                                 env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            while not fake.blocked.wait(0.05) and p.poll() is None:
                pass
            assert p.poll() is None, p.stdout.read().decode()     # still mid-run when killed
            p.send_signal(signal.SIGKILL)
            outs.append(p.communicate()[0])
            fake.freeze_after = None
            fake.release.set()
            time.sleep(0.05)
            fake.blocked.clear()
            fake.release.clear()
        assert (tmp_path / "lastfm" / "loved.csv").exists()        # the last kill came in the tags phase
        r = cli(*crawl_args(tmp_path), env=env)
        outs.append((r.stdout + r.stderr).encode())
        assert r.returncode == 0, r.stderr
    finally:
        fake.stop()
    print(f"kill/resume: 4 SIGKILLs, {dict(fake.faults)} faults, {sum(fake.served.values())} successful responses, "
          f"{sum(fake.served.values()) - len(fake.served)} of them repeats of an answer the client never got")
    assert tree_bytes(tmp_path) == tree_bytes(reference[0])
    assert not fake.refetched and not fake.unsaved                 # no committed resource asked again, none lost
    assert set(fake.served) == set(reference[1].served) and fake.faults["late"] > 0
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()) + b"".join(outs)
    assert KEY.encode() not in written and b"TESTKEY" not in written


@pytest.mark.slow
def test_key_scrubbed_from_connection_errors(tmp_path):
    api = collect.Lastfm(KEY, tmp_path / "c.sqlite", base_url="http://127.0.0.1:9/2.0/", rate=0, retries=1,
                         backoff=0.01, timeout=0.5)
    with pytest.raises(collect.LastfmError) as e:
        api.call("user.getInfo", collect.parse_country, user="RJ")
    assert KEY not in str(e.value) and "rerun" in str(e.value)
    r = cli("--data-dir", tmp_path, "crawl", "--retries", "0", "--rate", "0",
            env={"LASTFM_API_KEY": KEY, "LASTFM_BASE_URL": "http://127.0.0.1:9/2.0/"})
    assert r.returncode == 1 and KEY not in r.stdout + r.stderr and "Traceback" not in r.stderr


@needs(LFM1K)
def test_rate_limit_and_special_names(tmp_path):
    fake = FakeLastfm(fake_world())
    try:
        api = collect.Lastfm(KEY, tmp_path / "c.sqlite", base_url=fake.url, rate=20, backoff=0.01)
        t = time.monotonic()
        name = lambda d: d["user"]["name"]
        for u in ["RJ", "Zoë & Co #1+/x", "user_000001", "user_000002", "user_000003", "user_000004"]:
            assert api.call("user.getInfo", name, user=u) == (u, None)          # &, #, +, /, non-ASCII survive
        assert time.monotonic() - t >= 5 / 20 - 0.01                         # 6 requests at <= 20/s
        assert api.call("user.getInfo", name, user="nobody") == (None, "Last.fm error 6: User not found")
        assert api.call("user.getInfo", name, user="RJ")[0] and api.stats["cached"] == 1 and api.stats["requests"] == 7
    finally:
        fake.stop()

# -----------------------------------------------------------------------------
# hostile answers: every field of the wrong type, error codes of every class, pages that never end, a key echo


class HostileLastfm(FakeLastfm):
    """The fake Last.fm, with some users (and tracks) answering in every broken way seen in the wild."""
    USERS = ["track_str", "date_str", "country_num", "pages_many", "html404", "err7", "err6str",
             "empty_pages", "echo_key", "html200", "Hcase", "hcase", "err99", "single_friend", ".", "echo6"]

    def __init__(self, world, **kw):
        super().__init__(world, **kw)
        self.hits = collections.Counter()

    def answer(self, q):
        m, user = q.get("method"), q.get("user", "")
        self.hits[(m, user)] += 1
        status, body = super().answer(q)
        if m == "track.getTopTags" and status == 200 and "toptags" in body:
            h = int(hashlib.md5(q["track"].encode()).hexdigest(), 16) % 5
            body = [body, {"toptags": {"tag": {"name": "Solo", "count": 1}}}, {"toptags": {"tag": [{"name": 1980}]}},
                    {"toptags": {"@attr": {}}}, {"toptags": {"tag": {"name": "=HYPERLINK(x)"}}}][h]
        if user not in self.USERS or status != 200:
            return status, body
        if user in ("country_num", "html404", "err6str", "err99", "echo6") and m == "user.getInfo":
            return {"country_num": (200, {"user": {"country": 42}}),
                    "echo6": (200, {"error": 6, "message": f"User not found (api_key={KEY})"}),
                    "html404": (404, "<html><body>Not Found</body></html>"),
                    "err6str": (200, {"error": "6", "message": "User not found"}),
                    "err99": (200, {"error": 99, "message": "Something new"})}[user]
        if m == "user.getLovedTracks":
            lt = body["lovedtracks"]
            if user == "track_str":
                lt["track"] = ["just a string", 7, None] + lt["track"]
            elif user == "date_str":
                for t in lt["track"]:
                    t["date"] = "01 Jan 2010, 00:00"
            elif user == "pages_many":
                lt["@attr"].update(totalPages="many", total="lots")
            elif user == "empty_pages":
                lt["@attr"].update(totalPages="1000", total="50000")
                if q.get("page") != "1":
                    lt["track"] = []
        if m == "user.getFriends":
            if user == "err7":
                return 200, {"error": 7, "message": "Invalid resource specified"}
            if user == "echo_key":
                return 400, {"error": 7, "message": f"Invalid resource for api_key={KEY} ({KEY})"}
            if user == "html200" and self.hits[(m, user)] <= 2:      # a passing fault: HTML twice, then the answer
                return 200, "<html>Hello</html>"
            if user == "single_friend":
                body["friends"]["user"] = {"name": "Hcase", "country": "x"}
        return status, body


def hostile_world():
    world = fake_world(n_users=20)
    extra = HostileLastfm.USERS
    pool = sorted(t for u in world.values() for t in u["loved"])
    for i, name in enumerate(extra):
        world[name] = {"country": "Chile", "friends": ["RJ"], "loved": pool[60 * i: 60 * i + 60]}
    world["RJ"]["friends"] = extra + world["RJ"]["friends"]
    return world


@needs(LFM1K, APPLE)
def test_hostile_answers_fail_per_resource_and_rerun_identically(tmp_path, monkeypatch, capsys):
    world = hostile_world()
    loved = world["track_str"]["loved"] + world["date_str"]["loved"]
    cat = tmp_path / "cat.csv"
    pd.DataFrame({"a": [a for a, t, _ in loved], "t": [t for a, t, _ in loved], "g": "Rock"}).to_csv(cat, index=False)
    args = ["--data-dir", tmp_path / "data", "all", "--catalog", f"x={cat}", "--artist-col", "a", "--track-col", "t",
            "--genre-col", "g", "--max-users", "40", *API_OPTS]
    fake = HostileLastfm(world)
    try:
        run_inproc(monkeypatch, fake, args)                       # no exception: every failure stays local
        first = capsys.readouterr()
        out = tree_bytes(tmp_path / "data")
        hits, after_first = sum(fake.hits.values()), collections.Counter(fake.hits)
        run_inproc(monkeypatch, fake, args)                       # rerun: everything from the cache
        second = capsys.readouterr()
        assert sum(fake.hits.values()) == hits and tree_bytes(tmp_path / "data") == out
        run_inproc(monkeypatch, fake, args + ["--retry-failed"])  # asks the failures again, nothing else
        third = capsys.readouterr()
        assert tree_bytes(tmp_path / "data") == out
        again = {k for k, n in fake.hits.items() if n > after_first[k]}
    finally:
        fake.stop()
    db = sqlite3.connect(tmp_path / "data" / "cache" / "lastfm.sqlite")
    failed = dict(db.execute("SELECT key, reason FROM failed").fetchall())
    by_user = {json.loads(k)[1][-1][1] if json.loads(k)[0].startswith("user.") else "": r for k, r in failed.items()}
    assert by_user["html404"] == "HTTP 404" and all(r.startswith(collect.FACTS) for r in failed.values())
    assert by_user["err7"].startswith("Last.fm error 7") and by_user["err6str"].startswith("Last.fm error 6")
    assert by_user["err99"].startswith("Last.fm error 99") and "***" in by_user["echo_key"] and "***" in by_user["echo6"]
    assert "html200" not in by_user and by_user["private_one"].startswith("Last.fm error 17")
    assert after_first[("user.getFriends", "html200")] == 3                 # HTML is temporary: retried, then answered
    assert after_first[("user.getLovedTracks", "empty_pages")] == 2         # not 1000 pages
    assert {("user.getInfo", "html404"), ("user.getFriends", "err7")} <= again and len(again) <= len(failed)
    assert after_first[("user.getInfo", "Hcase")] + after_first[("user.getInfo", "hcase")] == 1   # one user
    users = read(tmp_path / "data" / "lastfm", "users.csv")
    lv = read(tmp_path / "data" / "lastfm", "loved.csv")
    assert {"track_str", "date_str", "pages_many", "err7", "echo_key", "html200", "."} <= set(users.user)
    assert not {"country_num", "html404", "err6str", "err99"} & set(users.user)
    assert (lv[lv.user == "date_str"].timestamp == "").all() and (lv[lv.user == "track_str"].track != "").all()
    tags = set(read(tmp_path / "data" / "x", "items.csv").tag)
    assert {"solo", "1980", "hyperlink(x)"} & tags and not any(t.startswith("=") for t in tags)
    for o in (first, second, third):
        assert "Traceback" not in o.err and KEY not in o.out + o.err
        assert "permanent failures:" in o.out
    assert KEY.encode() not in (tmp_path / "data" / "cache" / "lastfm.sqlite").read_bytes()


# -----------------------------------------------------------------------------
# wrong shapes: every list-valued field the crawl reads (and the objects holding them) as a string, number or null


class WrongShapes(FakeLastfm):
    """The fake Last.fm; while `bad` is set, the answers of `method` for RJ (for every track: track.getTopTags) go out
    as bad(good body)."""

    def __init__(self, world, **kw):
        super().__init__(world, **kw)
        self.method = self.bad = None

    def answer(self, q):
        status, body = super().answer(q)
        ours = q["method"] == self.method and q.get("user", "RJ") == "RJ"
        if self.bad and ours and status == 200 and "error" not in body:
            body = self.bad(body)
        return status, body


SHAPES = {   # field: (method, good body -> body with the field set to v)
    "user": ("user.getInfo", lambda b, v: {**b, "user": v}),
    "lovedtracks": ("user.getLovedTracks", lambda b, v: {**b, "lovedtracks": v}),
    "lovedtracks.track": ("user.getLovedTracks", lambda b, v: {**b, "lovedtracks": {**b["lovedtracks"], "track": v}}),
    "friends": ("user.getFriends", lambda b, v: {**b, "friends": v}),
    "friends.user": ("user.getFriends", lambda b, v: {**b, "friends": {**b["friends"], "user": v}}),
    "toptags": ("track.getTopTags", lambda b, v: {**b, "toptags": v}),
    "toptags.tag": ("track.getTopTags", lambda b, v: {**b, "toptags": {**b["toptags"], "tag": v}}),
}


def shapes_args(d):
    world = fake_world(n_users=8)
    cat = Path(d).parent / "cat.csv"
    if not cat.exists():                      # a few of RJ's loved tracks: a small catalog
        loved = sorted({(a, t) for a, t, _ in world["RJ"]["loved"][:6]})
        cat.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"a": [a for a, _ in loved], "t": [t for _, t in loved], "g": "Rock"}).to_csv(cat, index=False)
    return world, ["--data-dir", d, "all", "--catalog", f"x={cat}", "--artist-col", "a", "--track-col", "t",
                   "--genre-col", "g", "--max-users", "1", *API_OPTS[:-1], "2"]


@pytest.fixture(scope="module")
def shapes_reference(tmp_path_factory):
    if not LFM1K.exists():
        pytest.skip("../shared/data not available")
    d = tmp_path_factory.mktemp("shapes") / "data"
    world, args = shapes_args(d)
    fake, mp = FakeLastfm(world), pytest.MonkeyPatch()
    try:
        run_inproc(mp, fake, args)
    finally:
        mp.undo()
        fake.stop()
    assert len(read(d / "x", "items.csv")) == 6 and any(m.startswith('[["artist"') for m in fake.served)
    return tree_bytes(d)


@needs(LFM1K)
@pytest.mark.parametrize("field", list(SHAPES))
def test_a_wrong_shape_is_a_passing_fault_and_a_rerun_converges(field, shapes_reference, tmp_path, monkeypatch, capsys):
    """Each list-valued field the crawl reads (lovedtracks.track, friends.user, toptags.tag) and each object holding
    one, sent as a string, a number or null: retried like a 5xx, never cached as "none" (no loved tracks, no friends,
    no tag) nor as a failure; the run stops with exit 1 and one line; a plain rerun against the healthy server (no
    --retry-failed) asks again and ends with the fault-free dataset."""
    method, change = SHAPES[field]
    for value in ("a string", 7, None):
        d = tmp_path / repr(value) / "data"
        world, args = shapes_args(d)
        fake = WrongShapes(world, cache=d / "cache" / "lastfm.sqlite")
        fake.method, fake.bad = method, lambda body: change(body, value)
        try:
            with pytest.raises(SystemExit) as e:
                run_inproc(monkeypatch, fake, args)
            first = capsys.readouterr()
            db = sqlite3.connect(d / "cache" / "lastfm.sqlite")
            failed = [r for (r,) in db.execute("SELECT reason FROM failed")]
            db.close()
            fake.bad, asked = None, sum(n for k, n in fake.served.items() if method in k)
            run_inproc(monkeypatch, fake, args)                  # a plain rerun, the server healthy again
            capsys.readouterr()
        finally:
            fake.stop()
        errors = [line for line in first.err.splitlines() if line.startswith("error:")]
        assert e.value.code == 1 and len(errors) == 1 and "wrong shape" in errors[0] and "rerun" in errors[0], first.err
        assert all(r.startswith(collect.FACTS) for r in failed), failed         # not recorded as a failure either
        assert tree_bytes(d) == shapes_reference, (field, value)
        assert sum(n for k, n in fake.served.items() if method in k) > asked and not fake.refetched


def test_as_list_takes_lists_and_one_object_only():
    assert collect.as_list({"t": [1, "x"]}, "t", "r") == [1, "x"] and collect.as_list({"t": {"a": 1}}, "t", "r") == [{"a": 1}]
    assert collect.as_list({}, "t", "r") == [] and collect.as_list({"t": []}, "t", "r") == []
    for wrong, shape in (("x", "a string"), ("", "a string"), (7, "a number"), (1.5, "a number"), (None, "null"),
                         ({}, "an empty object"), (True, "a boolean")):
        with pytest.raises(collect.Malformed, match=f"r.t is {shape}, not a list"):
            collect.as_list({"t": wrong}, "t", "r")


@needs(LFM1K)
@pytest.mark.slow
def test_bad_key_is_one_line(tmp_path):
    fake = FakeLastfm(fake_world(n_users=5))
    fake.answer = lambda q: (403, {"error": 10, "message": f"Invalid API key {KEY} - You must be granted a valid key"})
    try:
        r = cli("--data-dir", tmp_path, "crawl", *API_OPTS, env={"LASTFM_API_KEY": KEY, "LASTFM_BASE_URL": fake.url})
    finally:
        fake.stop()
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "refused the API key" in r.stderr
    assert KEY not in r.stderr + r.stdout
    r = cli("--data-dir", tmp_path, "crawl", env={"LASTFM_API_KEY": KEY, "LASTFM_BASE_URL": "localhost:1/x"})
    assert r.returncode == 2 and "not an http(s) URL" in r.stderr and "Traceback" not in r.stderr


def test_second_crawl_on_the_same_cache_refuses(tmp_path, monkeypatch, capsys):
    lock = collect.lock_folder(tmp_path / "cache" / "lastfm.sqlite.lock", "x")     # as if a crawl were running
    monkeypatch.setenv("LASTFM_API_KEY", KEY)
    try:
        with pytest.raises(SystemExit) as e:
            collect.main(["--data-dir", str(tmp_path), "crawl"])
    finally:
        lock.close()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "another run is using the Last.fm cache" in err

# -----------------------------------------------------------------------------
# one writer per dataset: the lock, and what readers check


CATALOG = [("Björk", "Jóga", "Electronic"), ("Radiohead", "Karma Police", "Alternative"), ("Adele", "Hello", "Pop"),
           ("Daft Punk", "One More Time", "Dance"), ("Queen", "Bohemian Rhapsody", "Rock"), ("Sade", "Smooth Operator", "R&B")]


def tiny_crawl(data, loved=CATALOG[:4], users=("ann", "bob")):
    """data/lastfm/{users,loved}.csv as a crawl writes them (each user loves every track of `loved`), and an
    Apple-shaped catalog of CATALOG -> its path."""
    (Path(data) / "lastfm").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"user": list(users), "country": "Chile"}).to_csv(Path(data) / "lastfm" / "users.csv", index=False)
    rows = [(u, a, t, str(1_600_000_000 + k)) for u in users for k, (a, t, _) in enumerate(loved)]
    pd.DataFrame(rows, columns=["user", "artist", "track", "timestamp"]).to_csv(Path(data) / "lastfm" / "loved.csv",
                                                                               index=False)
    cat = Path(data).parent / "catalog.csv"
    pd.DataFrame(CATALOG, columns=["artistName", "trackName", "primaryGenreName"]).to_csv(cat, index=False)
    return cat


def test_a_second_writer_refuses_naming_the_holder(tmp_path, capsys):
    """While one process writes a dataset (here: as if enrich.py were running on it), collect's match, crawl and
    importers on it stop with one error: line naming the holder (pid, command), exit 2, and change nothing."""
    data = tmp_path / "data"
    cat = tiny_crawl(data)
    assert collect.main(["--data-dir", str(data), "match", str(cat), "--name", "apple", "--no-tags"]) is None
    capsys.readouterr()
    runs = {data / "apple": ["match", str(cat), "--name", "apple", "--no-tags"],
            data / "lastfm": ["match", str(cat), "--name", "apple", "--no-tags"],     # match reads the crawl
            data / "hetrec": ["hetrec", str(tmp_path / "nothing-there")]}
    for folder, args in runs.items():
        before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
        with collect.dataset_lock(folder, "enrich.py apple --what summary"):
            with pytest.raises(SystemExit) as e:
                collect.main(["--data-dir", str(data), *args])
            assert (folder / collect.WRITER_LOCK).is_file()
        err = capsys.readouterr().err
        holder = f"pid {os.getpid()} (enrich.py apple --what summary) holds"
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: another run is using dataset {folder}: {holder}"), err
        assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before     # lock file gone, nothing else
    assert not (data / "hetrec").exists()


def test_a_killed_writer_does_not_block_the_next(tmp_path):
    """The lock is the kernel's: a holder killed with -9 lets go, and the next writer takes it (the file left behind
    still names the dead holder until then)."""
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import collect\n"
            f"held = collect.dataset_lock({str(tmp_path / 'd')!r}, 'collect.py crawl')\nheld.__enter__()\n"
            "print('locked', flush=True); time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(collect.UserError, match=f"pid {holder.pid} \\(collect.py crawl\\) holds"):
            with collect.dataset_lock(tmp_path / "d"):
                pass
    finally:
        holder.kill()                                   # SIGKILL: no cleanup of its own
        holder.wait()
    assert f"pid {holder.pid}" in (tmp_path / "d" / collect.WRITER_LOCK).read_text()
    with collect.dataset_lock(tmp_path / "d", "enrich.py d"):
        assert (tmp_path / "d" / collect.WRITER_LOCK).read_text() == f"pid {os.getpid()} (enrich.py d)"
    assert not (tmp_path / "d" / collect.WRITER_LOCK).exists()


def test_check_dataset_consistent(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "users.csv").write_text("user,country\nann,Chile\nbob,\n")
    (d / "items.csv").write_text("item,artist,track,tag,title,summary,lyrics\n1,a,t,x,t,,\n2,b,u,y,u,,\n")
    (d / "interactions.csv").write_text("user,item,timestamp\nann,1,\nbob,2,5\n")
    assert collect.check_dataset_consistent(d) is None
    (d / "interactions.csv").write_text("user,item,timestamp\nann,1,\nbob,2,5\ncy,9,\ncy,2,\nann,8,\n")
    with pytest.raises(collect.UserError) as e:
        collect.check_dataset_consistent(d)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{d}: the dataset's files disagree: ")
    assert "2 of 5 interactions name a user not in users.csv (e.g. 'cy')" in msg
    assert "2 of 5 interactions name an item not in items.csv (e.g. '9')" in msg and "rerun the command" in msg
    with collect.dataset_lock(d, "collect.py match ds"):                  # a writer at work: named
        with pytest.raises(collect.UserError, match=r"pid \d+ \(collect.py match ds\) is writing it"):
            collect.check_dataset_consistent(d)
    users, items, inter = (read(d, f) for f in ("users.csv", "items.csv", "interactions.csv"))
    assert collect.check_dataset_consistent(d, users, items, inter[inter.user != "cy"].head(2)) is None   # frames given

# -----------------------------------------------------------------------------
# the wire: raw answers a server can send (bytes as they go out), against a client that must stay bounded


@pytest.fixture(autouse=True)
def deadline():
    """No test hangs: each fails after 150 s (SIGALRM interrupts sleeps and socket reads in the main thread)."""
    def expire(*_):
        raise TimeoutError("the test ran past its 150 s deadline")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(150)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def raw_answer(status, body=b"", headers=()):
    head = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in headers), "Connection: close"]
    if not any(k.lower() == "content-length" for k, _ in headers):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def send_raw(h, out):
    """Write a raw answer (bytes, or byte chunks sent one by one) on a request handler's socket, then close it."""
    h.close_connection = True
    try:
        for chunk in [out] if isinstance(out, bytes) else out:
            h.wfile.write(chunk)
            h.wfile.flush()
    except (BrokenPipeError, ConnectionResetError):
        pass


def drip(head, body, pause=0.2, at_most=40):
    """Headers, then the body one byte at a time (the fake stops by itself after at_most bytes)."""
    yield head
    for i in range(min(len(body), at_most)):
        time.sleep(pause)
        yield body[i:i + 1]


class RawFaults(FakeLastfm):
    """The fake Last.fm; the next `left` requests for RJ's friends get fault(fake, query, good answer) instead:
    bytes, or an iterable of byte chunks sent one by one."""

    def __init__(self, world, **kw):
        super().__init__(world, **kw)
        self.fault, self.left, self.arrivals = None, 0, []

    def handle(self, h):
        q = {k: v[0] for k, v in parse_qs(urlparse(h.path).query, keep_blank_values=True).items()}
        mine = q.get("method") == "user.getFriends" and q.get("user") == "RJ"
        with self.lock:
            self.arrivals += [time.time()] if mine else []
            use = mine and self.fault is not None and self.left > 0
            self.left -= use
        if not use:
            return super().handle(h)
        send_raw(h, self.fault(self, q, json.dumps(self.answer(q)[1], ensure_ascii=False)))


def http_date(seconds_from_now):
    from email.utils import formatdate
    return formatdate(time.time() + seconds_from_now, usegmt=True)


OTHER_HOST_HITS = collections.Counter()
RETRIES = 2                 # the fault runs below: 3 attempts per request
WIRE_FAULTS = {   # name: (fault, how many requests get it, exit code of the first run)
    "html 200": (lambda f, q, good: raw_answer(200, b"<html>Hello</html>", [("Content-Type", "text/html")]), 3, 1),
    "empty 200": (lambda f, q, good: raw_answer(200), 3, 1),
    "truncated body": (lambda f, q, good: raw_answer(200, good.encode()[:20], [("Content-Length", "900")]), 3, 1),
    "Latin-1 bytes, no charset": (lambda f, q, good: raw_answer(200, good.replace("Zoë", "Zoé").encode("latin-1")), 3, 1),
    "nested 100k levels": (lambda f, q, good: raw_answer(200, b"[" * 100_000 + b"]" * 100_000), 3, 1),
    "5 MB body": (lambda f, q, good: raw_answer(200, b'{"friends": "' + b"x" * (5 << 20) + b'"}'), 3, 1),
    "302 to another port": (lambda f, q, good: raw_answer(302, headers=[("Location", f"{f.other}/2.0/?x=1")]), 3, 1),
    "Retry-After 999999999": (lambda f, q, good: raw_answer(429, b"{}", [("Retry-After", "999999999")]), 1, 1),
    "retry-after-ms 1e15": (lambda f, q, good: raw_answer(429, b"{}", [("retry-after-ms", "1e15")]), 1, 1),
    # passing faults a retry (or nothing) gets over in the same run
    "byte drip": (lambda f, q, good: drip(raw_answer(200, headers=[("Content-Length", len(good.encode()))]),
                                          good.encode()), 1, 0),
    "UTF-8 BOM": (lambda f, q, good: raw_answer(200, b"\xef\xbb\xbf" + good.encode()), 1, 0),
    "declared charset latin-1": (lambda f, q, good: raw_answer(200, good.encode("latin-1"),
                                 [("Content-Type", "application/json; charset=iso-8859-1")]), 1, 0),
    "302 to the same host": (lambda f, q, good: raw_answer(302, headers=[("Location", f"{f.url}?{urlencode(q)}")]), 1, 0),
    "Retry-After: HTTP date in 2 s": (lambda f, q, good: raw_answer(429, b"{}", [("Retry-After", http_date(2))]), 1, 0),
    # a Retry-After that is no wait: the usual backoff (test_a_retry_after_that_is_no_wait_backs_off_as_usual)
    **{f"Retry-After {v!r}": (lambda f, q, good, v=v: raw_answer(429, b"{}", [("Retry-After", v)]), RETRIES, 0)
       for v in ("-5", "0", "nan", "", "inf", "soon")},
}
SMALL = ["crawl", "--max-users", "4", "--rate", "0", "--backoff", "0.01", "--max-backoff", "0.05", "--timeout", "1",
         "--retries", str(RETRIES)]


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory):
    """A fault-free small crawl: what every faulty run below must end with."""
    if not LFM1K.exists():
        pytest.skip("../shared/data not available")
    d = tmp_path_factory.mktemp("small")
    fake, mp = FakeLastfm(fake_world(n_users=8)), pytest.MonkeyPatch()
    try:
        run_inproc(mp, fake, ["--data-dir", d, *SMALL])
    finally:
        mp.undo()
        fake.stop()
    return tree_bytes(d)


@needs(LFM1K)
@pytest.mark.parametrize("name", list(WIRE_FAULTS))
def test_wire_faults_are_bounded_and_a_rerun_completes(name, small_reference, tmp_path, monkeypatch, capsys):
    """Each raw answer: no hang, no traceback, the right class of failure (a passing fault is retried and never
    recorded; a Retry-After beyond --max-wait stops the run with one line), and a plain rerun against the healthy
    server ends with the fault-free crawl."""
    fault, n, code = WIRE_FAULTS[name]
    fake, other = RawFaults(fake_world(n_users=8)), FakeLastfm(fake_world(n_users=8))   # other: another host
    fake.other, fake.fault, fake.left = other.url.rsplit("/2.0/", 1)[0], fault, n
    args = ["--data-dir", tmp_path, *SMALL]
    try:
        t = time.monotonic()
        with pytest.raises(SystemExit) if code else contextlib.nullcontext() as e:
            run_inproc(monkeypatch, fake, args)
        took, first = time.monotonic() - t, capsys.readouterr()
        if code:
            assert e.value.code == code and fake.left == 0
            run_inproc(monkeypatch, fake, args)          # a plain rerun, the server healthy again
    finally:
        fake.stop()
        other.stop()
    print(f"{name}: first run exit {code} after {took:.2f}s; {first.err.strip()[-160:]}")
    assert took < 6 and "Traceback" not in first.err and not other.keys_seen
    errors = [line for line in first.err.splitlines() if line.startswith("error:")]
    assert len(errors) == (1 if code else 0) and all("rerun" in line and KEY not in line for line in errors)
    if "retry-after" in name.lower() and code:
        assert "Last.fm" in errors[0] and (re.search(r"rerun after \d{4}-\d\d-\d\d \d\d:\d\d UTC", errors[0])
                                      or "cannot be read" in errors[0])
    if "HTTP date" in name:
        assert fake.arrivals[1] - fake.arrivals[0] >= 1.0   # the date was honoured (whole seconds: >= 1 s of 2)
    assert tree_bytes(tmp_path) == small_reference
    db = sqlite3.connect(tmp_path / "cache" / "lastfm.sqlite")
    failed = [r for (r,) in db.execute("SELECT reason FROM failed")]
    assert failed == ["Last.fm error 17: Login: User required to be logged in"]            # only what Last.fm said
    assert not [b for (b,) in db.execute("SELECT body FROM responses") if "\ufffd" in b]   # nothing garbled
    assert "hold" not in json.loads((tmp_path / "cache" / "lastfm.sqlite.rate").read_text() or "{}")


def test_deadline_bounds_a_dripping_answer():
    """--timeout is the whole request: a server sending one byte every 0.2 s is cut at the deadline."""
    body = json.dumps({"x": "y" * 50}).encode()
    srv = RawServer(lambda h: drip(raw_answer(200, headers=[("Content-Length", len(body))]), body))
    try:
        t = time.monotonic()
        with pytest.raises(collect.Transient, match="timeout"):
            collect.http_request("GET", srv.url + "/x", 0.8)
        assert 0.7 < time.monotonic() - t < 1.5
    finally:
        srv.stop()


class RawServer:
    """A loopback server answering every GET and POST with answer(handler) (bytes or byte chunks)."""

    def __init__(self, answer):
        import http.server
        self.paths = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.paths.append(self.path)
                send_raw(self, answer(self))
            do_POST = do_GET

            def log_message(self, *a):
                pass
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        threading.Thread(target=self.srv.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()


def test_retry_after_forms_and_saved_holds(tmp_path, capsys):
    """Retry-After in seconds, as an HTTP date and retry-after-ms; a hold beyond --max-wait stops the run and is
    never saved; a saved hold a later run cannot trust (old format, beyond the cap, set in the future) is ignored
    with a note; a valid one holds another process's limiter."""
    p = collect.parse_retry_after
    assert p({"retry-after": "2"}) == 2.0 and p({"retry-after-ms": "150", "retry-after": "9"}) == 0.15
    assert 1.0 <= p({"retry-after": http_date(3)}) <= 3.0 and p({"retry-after": http_date(-60)}) == 0.0
    assert p({}) is None and p({"retry-after": "999999999"}) == 999999999.0 and p({"retry-after-ms": "1e15"}) == 1e12
    no_wait = ("inf", "nan", "soon", "1e999", "-5", "0", "", " ", "Wed, 21 Oct 2015 07:28:00", "-inf")
    assert all(p({"retry-after": v}) == 0.0 for v in no_wait) and p({"retry-after-ms": "-1"}) == 0.0
    state = tmp_path / "state"
    lim = collect.RateLimiter(state, 0, max_wait=10, api="X")
    for seconds in (11, float("inf"), float("nan")):
        with pytest.raises(collect.WaitTooLong, match="^X "):
            lim.hold(seconds)
    assert not state.exists()                               # nothing saved
    now = time.time()
    for poisoned in ({"until": now + 1e9}, {"hold": {"until": now + 50, "set": now, "cap": 60}},
                     {"hold": {"until": now + 5, "set": now + 100, "cap": 10}}, {"hold": "junk"}):
        state.write_text(json.dumps(poisoned))
        t = time.monotonic()
        lim.wait()
        assert time.monotonic() - t < 0.5
    assert "ignoring a saved wait" in capsys.readouterr().err
    lim.hold(0.6)
    t = time.monotonic()
    collect.RateLimiter(state, 0, max_wait=10).wait()      # another limiter on the same file: held too
    assert 0.4 < time.monotonic() - t < 1.5


@pytest.mark.parametrize("value", ["-5", "0", "nan", "", "soon", "inf", "Wed, 21 Oct 2015 07:28:00"])
def test_a_retry_after_that_is_no_wait_backs_off_as_usual(value, tmp_path, monkeypatch):
    """A server that answers every request 429 with a Retry-After that is no wait: each retry waits the usual
    exponential backoff (1, 2, 4, 8 s jittered x0.5-1.5; the waits are recorded, not slept), the wait's line says
    why, nothing is saved as a hold, and the run ends as for any passing fault (LastfmError: exit 1, rerun)."""
    srv = RawServer(lambda h: raw_answer(429, b"{}", [("Retry-After", value)]))
    waits = []
    monkeypatch.setattr(collect, "pause", lambda seconds, why, *a, **k: waits.append((seconds, why)))
    api = collect.Lastfm(KEY, tmp_path / "c.sqlite", base_url=srv.url + "/2.0/", rate=0, retries=4, backoff=1.0)
    try:
        with pytest.raises(collect.LastfmError, match="failed 5 times .*rerun"):
            api.call("user.getInfo", collect.parse_country, user="RJ")
    finally:
        srv.stop()
    assert len(srv.paths) == 5 and len(waits) == 4
    assert all(0.5 * 2 ** k <= s <= 1.5 * 2 ** k and "Retry-After is no wait" in why for k, (s, why) in enumerate(waits))
    assert "hold" not in json.loads((tmp_path / "c.sqlite.rate").read_text() or "{}")


def max_per_window(times, window=1.0):
    """The most events in any window [t, t + `window`) seconds."""
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u - t < window) for i, t in enumerate(times)), default=0)


def test_a_delayed_send_cannot_slip_past_the_limit(tmp_path):
    """A request sent 1.1 s after the limiter allowed it (a thread a loaded machine left waiting), and 6 others sent
    at once at --rate 5: a request counts from when it is allowed until it has left, so no second holds more than 5
    sends (counted when allowed, the late one and the others made 6 in a second: the 6th was allowed 1.01 s after the
    late one's start, which was sent 0.1 s later)."""
    lim, sends, allowed = collect.RateLimiter(tmp_path / "state", 5), [], threading.Event()

    def late():
        place = lim.wait()[1]
        allowed.set()
        time.sleep(1.1)
        sends.append(lim.sent(place))
    t = threading.Thread(target=late)
    t.start()
    allowed.wait()
    for _ in range(6):
        sends.append(lim.sent(lim.wait()[1]))
    t.join()
    assert len(sends) == 7 and max_per_window(sends) <= 5, sorted(sends)
    assert json.loads((tmp_path / "state").read_text())["pending"] == []


def test_a_place_of_a_dead_process_is_given_back(tmp_path):
    """A process killed (-9) after the limiter allowed it and before it sent leaves a pending place: it is dropped
    at the next look, it does not hold the limit forever."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "state").write_text(json.dumps({"times": [], "pending": [[dead.pid, time.monotonic() - 0.5]] * 3}))
    lim = collect.RateLimiter(tmp_path / "state", 3)
    place = lim.wait()[1]
    assert json.loads((tmp_path / "state").read_text())["pending"] == [place] and place[0] == os.getpid()
    assert lim.sent(place) and lim.sent(place) is None          # given back once


def test_long_waits_print_a_line(monkeypatch, capsys):
    monkeypatch.setattr(collect, "VISIBLE_WAIT", 0.1)
    collect.pause(0.3, "Last.fm asked")
    collect.pause(0.05, "short")
    err = capsys.readouterr().err
    assert err.count("waiting") == 1 and "Last.fm asked" in err


def test_key_scrubbing_only_touches_the_key(tmp_path):
    api = collect.Lastfm(KEY, tmp_path / "c.sqlite", base_url="http://127.0.0.1:9/2.0/", rate=0)
    assert api.scrub(f"api_key={KEY}&x=1") == "api_key=***&x=1"
    assert api.scrub("a song about api_key=abc and more") == "a song about api_key=abc and more"
    assert api.scrub(KEY.replace("-", "%2D")) != KEY


def test_no_redirect_to_another_host_and_path_kept():
    other = RawServer(lambda h: raw_answer(200, b"{}"))
    srv = RawServer(lambda h: raw_answer(307, headers=[("Location", other.url + "/evil")]) if "go" in h.path
                    else raw_answer(200, b'{"ok": 1}'))
    try:
        with pytest.raises(collect.Transient, match="another host"):
            collect.http_request("POST", srv.url + "/go", 1, body=b"{}")
        r = collect.http_request("GET", srv.url + "/v1/%2E%2E/%2E/a%20b", 1)
        assert r.status == 200 and r.json() == {"ok": 1}
    finally:
        srv.stop()
        other.stop()
    assert other.paths == [] and srv.paths[-1] == "/v1/%2E%2E/%2E/a%20b"


BAD_INPUTS = {   # name: (arguments, extra environment, words of the one error line); {d}: the test's folder
    "catalog not UTF-8 (match)": (["match", "{d}/latin.csv", "--name", "x", "--no-tags"], {}, "latin.csv: the catalog is not UTF-8"),
    "catalog not UTF-8 (all)": (["all", "--catalog", "x={d}/latin.csv"], {}, "latin.csv: the catalog is not UTF-8"),
    "0-byte catalog": (["all", "--catalog", "x={d}/empty.csv"], {}, "empty.csv: the catalog is empty"),
    "header-only catalog": (["all", "--catalog", "x={d}/header.csv"], {}, "header.csv: no songs in the catalog"),
    "match that matches nothing": (["match", "{d}/one.csv", "--name", "x", "--no-tags"], {}, "none of the 0 loved tracks"),
    "catalog named lastfm": (["match", "{d}/one.csv", "--name", "lastfm", "--no-tags"], {}, "dataset name 'lastfm'"),
    "two catalogs, one name": (["all", "--catalog", "x={d}/one.csv", "--catalog", "x={d}/one.csv"], {}, "name 'x'"),
    "--data-dir is a file": (["--data-dir", "{d}/afile", "crawl"], {}, "--data-dir"),
    "--cache-dir is a file": (["--cache-dir", "{d}/afile", "crawl"], {}, "--cache-dir"),
    "--cache-dir under a file": (["--cache-dir", "{d}/afile/sub", "crawl"], {}, "is a file, not a folder"),
    "--max-users 0": (["crawl", "--max-users", "0"], {}, "--max-users 0"),
    "--min-plays 0": (["lastfm1k", "{d}", "--min-plays", "0"], {}, "--min-plays 0"),
    "--min-plays -1": (["lastfm1k", "{d}", "--min-plays", "-1"], {}, "--min-plays -1"),
    "--max-wait nan": (["crawl", "--max-wait", "nan"], {}, "--max-wait nan"),
    "LASTFM_BASE_URL bad port": (["crawl"], {"LASTFM_BASE_URL": "http://127.0.0.1:notaport/2.0/"}, "invalid port"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, tmp_path, monkeypatch, capsys):
    (tmp_path / "latin.csv").write_bytes("artistName,trackName,primaryGenreName\nBj\xf6rk,J\xf3ga,pop\n".encode("latin-1"))
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "header.csv").write_text("artistName,trackName,primaryGenreName\n")
    (tmp_path / "one.csv").write_text("artistName,trackName,primaryGenreName\nBjork,Joga,pop\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "data" / "lastfm").mkdir(parents=True)          # as if a crawl had run (for match)
    for f in ("users.csv", "loved.csv"):
        (tmp_path / "data" / "lastfm" / f).write_text("user,country\n" if f == "users.csv" else "user,artist,track,timestamp\n")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    args, env, words = BAD_INPUTS[name]
    args = [a.format(d=tmp_path) for a in args]
    monkeypatch.setenv("LASTFM_API_KEY", KEY)
    for k, v in {"LASTFM_BASE_URL": "http://127.0.0.1:9/2.0/", **env}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        collect.main((["--data-dir", str(tmp_path / "data")] if args[0] != "--data-dir" else []) + args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@needs(LFM1K)
def test_a_crawl_that_keeps_nobody_says_so(tmp_path, monkeypatch, capsys):
    fake = FakeLastfm(fake_world(n_users=3))
    try:
        with pytest.raises(SystemExit) as e:
            run_inproc(monkeypatch, fake, ["--data-dir", tmp_path, "crawl", "--seed-users", "nobody", *API_OPTS])
    finally:
        fake.stop()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no user kept" in err and "--seed-users" in err
    assert not (tmp_path / "lastfm").exists()


def test_older_caches_ask_again_for_what_was_a_passing_fault(tmp_path):
    """Failures an older version recorded as permanent for an unreadable body are asked again on a plain rerun;
    answers it stored with U+FFFD (undecodable bytes) are asked again with --retry-failed."""
    db = sqlite3.connect(tmp_path / "c.sqlite")
    db.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, body TEXT NOT NULL)")
    db.execute("CREATE TABLE failed (key TEXT PRIMARY KEY, reason TEXT NOT NULL)")
    db.executemany("INSERT INTO failed VALUES (?, ?)", [("a", "unexpected response: not a JSON object (3 times)"),
                                                        ("b", "Last.fm error 6: User not found"),
                                                        ("e", "user.getInfo without a user object"), ("f", "HTTP 404")])
    db.executemany("INSERT INTO responses VALUES (?, ?)", [("c", '{"user": {"country": "P\ufffdru"}}'), ("d", "{}")])
    db.commit()
    db.close()
    api = collect.Lastfm(KEY, tmp_path / "c.sqlite", base_url="http://127.0.0.1:9/2.0/", rate=0)
    assert sorted(k for (k,) in api.db.execute("SELECT key FROM failed")) == ["b", "f"]   # what Last.fm said stays
    api = collect.Lastfm(KEY, tmp_path / "c.sqlite", base_url="http://127.0.0.1:9/2.0/", rate=0, retry_failed=True)
    assert api.db.execute("SELECT COUNT(*) FROM failed").fetchone()[0] == 0
    assert [k for (k,) in api.db.execute("SELECT key FROM responses")] == ["d"]
    # an answer of the wrong shape an older version cached (as "no country", "no loved tracks"): asked again
    key = collect.cache_key("user.getInfo", {"user": "RJ"})
    api.db.execute("INSERT INTO responses VALUES (?, ?)", (key, '{"user": "oops"}'))
    api.db.commit()
    srv = RawServer(lambda h: raw_answer(200, b'{"user": {"name": "RJ", "country": "Peru"}}'))
    try:
        api.base_url = srv.url + "/2.0/"
        assert api.call("user.getInfo", collect.parse_country, user="RJ") == ("Peru", None) and len(srv.paths) == 1
        assert api.call("user.getInfo", collect.parse_country, user="RJ") == ("Peru", None) and len(srv.paths) == 1
    finally:
        srv.stop()


def test_kept_alive_connection_is_reused_and_a_stale_one_replaced():
    """One connection serves a thread's requests in a row; when the server has closed it meanwhile, the request is
    sent once more on a new connection (not a failure)."""
    import http.server
    peers = []

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            peers.append(self.client_address)
            body = b'{"ok": 1}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = "close" in self.path     # the server drops the connection without saying so

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        for path in ("/a", "/b", "/close", "/c", "/d"):
            assert collect.http_request("GET", url + path, 2).json() == {"ok": 1}
            time.sleep(0.05)
    finally:
        srv.shutdown()
        srv.server_close()
    assert len(peers) == 5 and peers[0] == peers[1] == peers[2] != peers[3] == peers[4]
