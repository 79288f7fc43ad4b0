# RecSetters. Two commands do all set-up on a fresh machine: `make train` and `make test`.
PY      := .venv/bin/python
DATASET ?= demo
TEXT    ?=
EPOCHS  ?=
SEED    ?= 0
ARGS    ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Threads: `train` and bench.py follow the cores other processes leave free (--threads 0, their default; README,
# Speed and scale). The tests' trainings are too short for that to react, so there OpenMP threads waiting for work
# sleep instead of spinning (beside a busy process spinning threads took 2-3x longer).

.PHONY: venv train test test-fast bench clean clean-runs

venv: .venv/.installed
.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# TEXT empty: --text auto (the first of lyrics, summary, tags, title that most items have: lyrics on demo, tags on hetrec)
train: venv
	$(PY) recsetters.py train --dataset $(DATASET) $(if $(TEXT),--text $(TEXT)) --seed $(SEED) $(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)

test: export OMP_WAIT_POLICY ?= PASSIVE
test: venv
	$(PY) -m pytest -q

# the tests that start no subprocess (pytest.ini: marker slow)
test-fast: export OMP_WAIT_POLICY ?= PASSIVE
test-fast: venv
	$(PY) -m pytest -q -m "not slow"

# Speed and scale (bench.py): prints a table, writes runs/bench/bench.json. E.g. ARGS="--sets demo --against ca6ae59".
bench: venv
	$(PY) bench.py $(ARGS)

# Experiments (experiments.py): every (dataset, text, seed) two-tower run beside Popularity, ItemKNN, EASE, RP3beta, iALS and MF,
# and (PROTOCOLS cold-items) on new items beside the content baselines,
# with significance tests, fairness and plots in runs/ablation/report.md. Finished cells are skipped (resumable).
DATASETS ?= demo hetrec
TEXTS    ?= none title summary lyrics tags
SEEDS    ?= 0 1 2
JOBS     ?= 2
PROTOCOLS ?= leave-one-out cold-items new-users
.PHONY: ablation
ablation: venv
	$(PY) experiments.py ablation --datasets $(DATASETS) --texts $(TEXTS) --seeds $(SEEDS) --protocols $(PROTOCOLS) --jobs $(JOBS) $(ARGS)

# Real data (collect.py): `make data` crawls Last.fm (needs LASTFM_API_KEY) and matches both catalogs;
# `make data SOURCE=hetrec|lastfm1k FROM=PATH_OR_URL` imports a public dump (no key; FROM empty = official URL).
SOURCE          ?= lastfm
FROM            ?=
APPLE_CATALOG   ?= ../shared/data/apple-music-10k/apple_music_dataset.csv
SPOTIFY_CATALOG ?= ../shared/data/spotify-songs-tidytuesday/spotify_songs.csv
.PHONY: data data-key
data: $(if $(filter lastfm,$(SOURCE)),data-key) venv
	$(PY) collect.py $(if $(filter lastfm,$(SOURCE)),all --catalog apple=$(APPLE_CATALOG) --catalog spotify=$(SPOTIFY_CATALOG),$(SOURCE) $(FROM)) $(ARGS)
data-key:
	@test -n "$$LASTFM_API_KEY" || grep -qsE '^\s*(export\s+)?LASTFM_API_KEY=.' .env || { echo "make data: no LASTFM_API_KEY (environment or .env). Get a free key at https://www.last.fm/api/account/create, or use real data offline: make data SOURCE=hetrec FROM=../shared/data/hetrec2011-lastfm-2k (or SOURCE=lastfm1k FROM=PATH_OR_URL)" >&2; exit 2; }

# Track texts (enrich.py): `make enrich DATASET=apple` fills summaries (Groq, needs GROQ_API_KEY) and lyrics;
# WHAT=summary|lyrics does one. FAKE=1 uses the local fake servers of test_enrich.py instead (no network, no key).
WHAT ?= both
.PHONY: enrich
enrich: venv
	$(PY) $(if $(FAKE),test_enrich.py fake,enrich.py) $(DATASET) --what $(WHAT) $(ARGS)

# generated files; runs/ is kept (clean-runs removes it)
clean:
	rm -rf data/demo .pytest_cache __pycache__

clean-runs:
	@echo "removing every run in runs/ (checkpoints, results.json, ranks.npz)"
	rm -rf runs
