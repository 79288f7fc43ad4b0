"""
experiments.py: many runs. recsetters.py makes one run end to end; this file compares runs and runs the grid of
experiments that settles the study's question (issue 5), under every protocol.

  python experiments.py compare --dataset hetrec   # one leaderboard of a dataset's runs (mean ± std, paired tests)
  python experiments.py ablation --datasets demo hetrec --texts none title summary lyrics tags --seeds 0 1 2 \
      --protocols leave-one-out cold-items
  python experiments.py report        # rebuild report.md, results.csv and plots from the finished cells
  python experiments.py tune          # the tuning log (TUNING below) on hetrec: runs/ablation/tuning.md

Every (dataset, protocol, text, seed) two-tower run goes through `recsetters.py train` (model selection on
validation, test evaluated once on the best-validation checkpoint), beside the baselines that can score the
protocol (R.BASELINES, one cell per dataset, protocol and seed) on the same seeded split, and under leave-one-out an
ID-only dot-product two-tower (matrix factorization). Finished cells are skipped, so an interrupted grid resumes
where it stopped. Everything lands in runs/ablation/. Collecting, the paired tests, the plots and the report are
written once and loop over the protocols (R.PROTOCOLS): a new protocol needs nothing here.

Read top to bottom:
  1. comparing runs: one leaderboard (mean ± std over seeds, paired tests against the best on validation), as text,
     Markdown and LaTeX (`compare`)
  2. the grid: cells and how each one is run
  3. collecting results: results.csv, mean and std over seeds
  4. paired significance tests on per-user test metrics (clustered, seed-level, Holm: section 1)
  5. fairness and exposure (the metric functions live in recsetters.py, section 11)
  6. plots
  7. report.md
  8. the tuning log: how the default `train` configuration was found (validation only)
  9. command line
"""
import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

import recsetters as R

HERE = Path(__file__).resolve().parent
# --protocols takes R.PROTOCOLS' names (a cell's --split is its protocol's first) and these short aliases
ALIASES = {"loo": "leave-one-out"}
MF_FLAGS = ["--text", "none", "--id-only", "--no-history", "--scorer", "dot"]   # the ID-only two-tower
EXTRA_MODELS = {"leave-one-out": [("mf", MF_FLAGS)]}    # per protocol: (kind, flags) beside the text variants
# the contest's controls of the two-tower's text, per protocol: (kind, flags added to its text): leave-one-out's
# text with the held-out pairs' own tagging left in (leaky), new items' tags cut to 5 drawn at random (the same
# number for every item: what is left when tag counts no longer follow listeners)
CONTROLS = {"leave-one-out": [("leaky-tags", ["--tag-source", "all"])],
            "cold-items": [("random5", ["--tag-count", "random5"])]}
# The baselines are R.BASELINES, the metrics each protocol's per_user, and the cut-off K is each run's own (its config).


# ----------------------------------------------------------------------------------------------
# 1. comparing runs: one leaderboard per dataset and protocol (`compare`; the report below uses the same code), the
# mean and std over seeds, paired tests against the model best on validation, as text, Markdown and LaTeX.
# The paired tests follow the design: the unit resampled is what repeats. A user tested at several seeds is one
# cluster (leave-one-out tests the same users at every seed); where the protocol holds out a sample of items
# (R.PROTOCOLS' unseen == "items") the target items are a second, crossed cluster (two-way bootstrap). Beside it, a
# paired t-test of the per-seed means carries training randomness. Holm corrects each table's comparisons.

MIN_SEEDS = 3        # the seed-level test needs this many shared seeds (with 2, one degree of freedom says little)


def draws(rng, n, n_boot):
    """n_boot bootstrap resamples of n clusters: how many times each is drawn, (n_boot, n)."""
    hits = rng.integers(0, n, (n_boot, n)) + n * np.arange(n_boot)[:, None]
    return np.bincount(hits.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(float)


def cluster_bootstrap(d, w, users, items=None, n_boot=2000, seed=0):
    """Paired difference sum(d) / sum(w) of observations d (weights w: 1 per observation, or 1 / the user's targets)
    and its cluster bootstrap: users (ids, a user's every observation together) resampled with replacement, and where
    `items` are given, target items too, crossed with the users (a two-way, "pigeonhole" bootstrap). Returns the
    difference, its 95% percentile CI, the two-sided p-value of a zero difference from the bootstrap's standard error
    (normal; no resolution floor for Holm to multiply), and the number of user and item clusters. The two-way
    bootstrap is conservative where users and items explain little (up to sqrt(3) wider on pure noise: Owen 2007)."""
    d, w = np.asarray(d, float), np.asarray(w, float)
    rng = np.random.default_rng(seed)
    uid, u = np.unique(users, return_inverse=True)
    W = draws(rng, len(uid), n_boot)                                   # resamples x users
    if items is None:
        num, den = W @ np.bincount(u, d, len(uid)), W @ np.bincount(u, w, len(uid))
        n_items = 0
    else:
        iid, i = np.unique(items, return_inverse=True)
        V = draws(rng, len(iid), n_boot)
        cells = lambda x: sp.csr_matrix((x, (i, u)), shape=(len(iid), len(uid)))      # items x users, summed
        num, den = ((cells(d) @ W.T) * V.T).sum(0), ((cells(w) @ W.T) * V.T).sum(0)
        n_items = len(iid)
    boot = num[den > 0] / den[den > 0]
    diff, se = d.sum() / w.sum(), boot.std(ddof=1)
    p = 2 * stats.norm.sf(abs(diff) / se) if se > 0 else float(diff == 0)
    return {"diff": float(diff), "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5)),
            "p": float(p), "users": len(uid), "items": n_items}


def seed_test(x, y):
    """Paired t-test over seeds of two models' per-seed means (scipy.stats.ttest_rel): its two-sided p, None with
    fewer than MIN_SEEDS seeds; identical means are p 1."""
    if len(x) < MIN_SEEDS:
        return None
    return 1.0 if np.array_equal(x, y) else float(stats.ttest_rel(x, y).pvalue)


def holm(ps):
    """Holm's step-down adjustment of a family of p-values (None: no test, left None): the j-th smallest times
    (m - j + 1), kept monotone, at most 1."""
    order = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    out, top = list(ps), 0.0
    for j, i in enumerate(order):
        top = max(top, min(1.0, (len(order) - j) * ps[i]))
        out[i] = top
    return out


def add_holm(tests):
    """Holm over one table's tests (paired_over_seeds' dicts): adds "p_holm" and "seed_p_holm" beside the raw p's."""
    for key in ("p", "seed_p"):
        for t, q in zip(tests, holm([t[key] for t in tests])):
            t[key + "_holm"] = q
    return tests


def target_values(per_user, ranks, counts, k):
    """{metric: per-target values} of a run's ranks: each target's share of its user's value (per_user: the
    protocol's), so that a user's shares sum to its value. Where the metric is a sum over targets (Recall, NDCG:
    hit / targets, gain / ideal DCG) the share is exactly that target's term; otherwise (HR) the value is split in
    proportion to the targets' own values."""
    counts = np.asarray(counts)
    row = np.repeat(np.arange(len(counts)), counts)
    whole, alone = per_user(ranks, counts, k), per_user(ranks, np.ones(len(row), int), k)
    out = {}
    for m, v in whole.items():
        s = np.bincount(row, alone[m], len(counts))[row]
        out[m] = np.where(s > 0, v[row] * (alone[m] / np.where(s > 0, s, 1)), v[row] / counts[row])
    return out


def observations(e, view, metric, per_target):
    """One entry's observations of a metric for cluster_bootstrap: (user of each, its target item or None, value,
    weight); per target (weight 1 / its user's targets) or per user (weight 1)."""
    if per_target:
        row = np.repeat(np.arange(len(e["counts"])), e["counts"])
        return e["users"][row], e["targets"], e["per_target"][view][metric], 1 / e["counts"][row]
    v = e["per_user"][view][metric]
    return e["users"], None, v, np.ones(len(v))


def paired_over_seeds(a, b, view, metric, by_item=False, n_boot=2000):
    """Paired tests of two models' entries (see leaderboard) on one metric over the seeds both have: the cluster
    bootstrap of the per-user (per-target where both stored their targets) differences, users clustered across seeds,
    items too when by_item; and the seed-level t-test of the per-seed means. None when they share no seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    for s in seeds:
        if not np.array_equal(a[s]["users"], b[s]["users"]) or \
                not np.array_equal(a[s].get("targets", []), b[s].get("targets", [])):
            raise R.UserError(f"{a[s]['model']} and {b[s]['model']} were tested on different users or targets at "
                              f"seed {s}")
    per_target = all("per_target" in e[s] for e in (a, b) for s in seeds)
    cat = lambda e, j: np.concatenate([observations(e[s], view, metric, per_target)[j] for s in seeds])
    items = cat(a, 1) if by_item and per_target else None
    t = cluster_bootstrap(cat(a, 2) - cat(b, 2), cat(a, 3), cat(a, 0), items, n_boot)
    means = [[float(np.mean(e[s]["per_user"][view][metric])) for s in seeds] for e in (a, b)]
    return {**t, "seeds": len(seeds), "pairs": int(sum(len(a[s]["users"]) for s in seeds)), "seed_p": seed_test(*means)}


def pvalue(p):
    return "–" if p is None or math.isnan(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def pm(mean, std, seeds):
    """mean ± std, the std only where there are seeds to make one; "–" for a metric a run did not record (made
    before the metric existed)."""
    return "–" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}" if seeds > 1 else f"{mean:.2f}"


def leaderboard(entries, protocol, k, n_boot=2000):
    """One leaderboard of models on the same dataset and protocol. entries: one per (model, seed): {"model", "kind"
    ("two-tower", "baseline", "n/a", ...), "seed", and unless n/a: "val" (validation selection metric), "test"
    {(view, metric): mean}, "users" (test users), "per_user" {view: {metric: per-user values}}, and where the run
    stored its targets "targets" (item of each), "counts" (targets per user), "per_target" (as per_user)}. Rows best on
    validation first: mean and std over seeds of validation and of every column of the protocol's table, and the
    paired tests (paired_over_seeds, Holm over the table) of the protocol's two tested metrics against the best on
    validation. Returns {"protocol", "k", "columns", "tested", "best", "rows", "na": models that cannot score the
    protocol}."""
    p = R.PROTOCOLS[protocol]
    cols, sel = [R.column(c, k) for c in p.columns], R.column(p.select, k)
    scored = [e for e in entries if e["kind"] != "n/a"]
    cols += [(sel[0], "mrr")] if scored and all((sel[0], "mrr") in e["test"] for e in scored) else []
    by_model, duplicates = {}, []
    for e in scored:
        first = by_model.setdefault(e["model"], {}).setdefault(e["seed"], e)       # a model's seed once
        if first is not e:               # the same model and seed twice: counted once, and said
            duplicates.append((e["model"], e["seed"], first.get("run"), e.get("run")))
    na = list(dict.fromkeys(e["model"] for e in entries if e["kind"] == "n/a" and e["model"] not in by_model))
    mean_std = lambda x: (float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else 0.0)
    rows = []
    for model, per_seed in by_model.items():
        es = list(per_seed.values())
        rows.append({"model": model, "kind": es[0]["kind"], "seeds": sorted(per_seed),
                     "val": mean_std([e["val"] for e in es]),
                     "test": {c: mean_std([e["test"][c] for e in es]) for c in cols}})
    rows.sort(key=lambda r: -r["val"][0])
    best = rows[0]["model"] if rows else None
    by_item = p.unseen == "items"        # the protocol holds out a sample of items: they are clusters too
    for r in rows:
        r["vs_best"] = {c: None if r["model"] == best else paired_over_seeds(by_model[r["model"]], by_model[best], *c,
                                                                             by_item, n_boot)
                        for c in R.tested(protocol, k)}
    add_holm([t for r in rows for t in r["vs_best"].values() if t])
    return {"protocol": protocol, "k": k, "columns": cols, "select": sel, "tested": R.tested(protocol, k), "best": best,
            "rows": rows, "na": na, "duplicates": duplicates, "by_model": by_model}


def board_cells(board, r, num, sign, p_of, bold):
    """One row's cells, formatted by num(mean, std, seeds), sign(diff, lo, hi), p_of(p or None), bold(text): shared
    by the Markdown and the LaTeX table so that both say the same. The p cell: the clustered test's Holm-adjusted p,
    and in brackets the seed-level test's."""
    n = len(r["seeds"])
    top = {c: np.nanmax([x["test"][c][0] for x in board["rows"]]) if not c[1].startswith("warm") else None
           for c in board["columns"]}        # the best of each column in bold (a warm share has no best)
    cells = [str(n), num(*r["val"], n)]
    cells += [bold(num(*r["test"][c], n)) if r["test"][c][0] == top[c] else num(*r["test"][c], n)
              for c in board["columns"]]
    for c in board["tested"]:
        t = r["vs_best"][c]
        cells += ["best on validation", ""] if r["model"] == board["best"] else ["n/a", ""] if t is None else \
            [sign(t["diff"], t["lo"], t["hi"]), f"{p_of(t['p_holm'])} (seeds {p_of(t['seed_p_holm'])})"]
    return cells


def board_heads(board):
    sel = R.label(*board["select"])
    return (["model", "seeds", f"val {sel}"] + [R.label(*c) for c in board["columns"]]
            + [h for c in board["tested"] for h in (f"Δ{R.label(*c)} [95% CI]", "p Holm (seeds)")])


def board_note(board, what):
    return (f"{what}: test metrics ×100, mean ± std over seeds (std only with several seeds), full ranking; every "
            f"model selected on validation {R.label(*board['select'])} and its test split evaluated once; the best test mean "
            f"of each column in bold. " + design_note(board)
            + "".join(f" {R.label(*c)}: the mean share of items with train interactions in each user's top "
                      f"{c[1].split('@')[1]} of the {c[0]} view (never bold: neither more nor less is better)."
                      for c in board["columns"] if c[1].startswith("warm")))


def design_note(board):
    """What the paired tests of a board did: the clusters, from the comparison over the most seeds, and Holm's N."""
    tests = [t for r in board["rows"] for t in r["vs_best"].values() if t]
    if not tests:
        return ""
    t = max(tests, key=lambda t: t["seeds"])
    n, n_seed = len(tests), sum(t["seed_p"] is not None for t in tests)
    return (f"Δ: the paired difference to {board['best']} (the best on validation) on the test users of the seeds "
            f"both have, with its 95% cluster-bootstrap CI: users resampled as clusters, a user's every seed and "
            f"target together ({t['users']:,} users in {t['pairs']:,} user-seed pairs)"
            + (f", and crossed with them the target items ({t['items']:,} items; a two-way bootstrap, if anything "
               f"conservative)" if t["items"] else "")
            + f"; p: two-sided, from that bootstrap's standard error. seeds: a paired t-test of the per-seed means "
            f"over the seeds both have (– under {MIN_SEEDS} seeds). Both p-values are Holm-adjusted over the table's "
            f"{n} comparisons" + (f" ({n_seed} with a seed-level test)." if n_seed != n else "."))


def board_markdown(board, title=""):
    """The leaderboard as a Markdown table (and its n/a models), after an optional title paragraph."""
    heads = board_heads(board)
    L = ([title, ""] if title else []) + ["| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
    for r in board["rows"]:
        cells = board_cells(board, r, pm, lambda d, lo, hi: f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]", pvalue,
                            lambda s: f"**{s}**")
        L.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    if board["na"]:
        L += ["", f"n/a under {board['protocol']} (BASELINES says what each can score): "
                  f"{', '.join(board['na'])}"]
    return L


def tex(s):
    """Text safe in LaTeX."""
    s = re.sub(r"([&%$#_{}])", r"\\\1", str(s)).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")
    return s.replace("--", "-{}-").replace("×", r"$\times$").replace("±", r"$\pm$").replace("Δ", r"$\Delta$")


def board_latex(board, caption, tag):
    """The leaderboard as a LaTeX table (\\usepackage{booktabs, graphicx}), scaled to the line width, the protocol
    in the caption."""
    heads = [tex(h) for h in board_heads(board)]
    num = lambda m, s, n: f"${m:.2f} \\pm {s:.2f}$" if n > 1 else f"${m:.2f}$"
    sign = lambda d, lo, hi: f"${d:+.2f}$ [${lo:+.2f}$, ${hi:+.2f}$]"
    p_of = lambda p: "--" if p is None else "$< 0.001$" if p < 0.001 else f"${p:.3f}$"
    L = ["% needs \\usepackage{booktabs, graphicx}", "\\begin{table}[t]", "\\centering",
         "\\setlength{\\tabcolsep}{3pt}", "\\resizebox{\\linewidth}{!}{%",
         "\\begin{tabular}{l" + "r" * (len(heads) - 1) + "}", "\\toprule", " & ".join(heads) + " \\\\", "\\midrule"]
    for r in board["rows"]:
        cells = board_cells(board, r, num, sign, p_of, lambda s: "$\\mathbf{" + s.strip("$") + "}$")
        L.append(" & ".join([tex(r["model"]), *(c if c.startswith("$") or not c else tex(c) for c in cells)]) + " \\\\")
    L += ["\\bottomrule", "\\end{tabular}}", f"\\caption{{{tex(caption)}}}", f"\\label{{tab:{tag}}}", "\\end{table}"]
    return L


def two_tower_label(config, protocol):
    """A two-tower run's name among models: its text and the settings it changed from the protocol's defaults."""
    d = R.defaults_for(config.get("preset", ""), R.PROTOCOLS[protocol].splits[0])
    single = config.get("ensemble") == 1 and d.ensemble > 1          # an ensemble protocol's single model
    changed = [R.typed(f.name, config[f.name]) for f in R.fields(R.Config) if f.name not in R.PLACE + ("baselines",)
               and "train" in f.metadata["cmds"] and f.name in config and config[f.name] != getattr(d, f.name)
               and not (single and f.name == "ensemble")]
    return f"two-tower, text {config.get('text')}" + (f", preset {config['preset']}" if config.get("preset") else "") \
        + (", " + " ".join(changed) if changed else "") + (", single" if single else "")


def run_entries(res, ranks, model=None):
    """leaderboard entries of one run's models (results.json, ranks.npz): the two-tower (named `model`, else by
    two_tower_label) and every baseline in it, with their per-user and (where ranks.npz has the target items)
    per-target test values."""
    protocol = res.get("protocol", "leave-one-out")
    p, k, seed = R.PROTOCOLS[protocol], res["config"].get("k", 10), res["config"]["seed"]
    models = [(model or two_tower_label(res["config"], protocol), "two-tower", res)] if "test" in res else []
    models += [(f"{models[0][0]}, single", "two-tower", res["single"])] if "single" in res else []   # its member 1
    models += [(b, "n/a" if "na" in r else "baseline", r) for b, r in res.get("baselines", {}).items()]
    cols, sel = [R.column(c, k) for c in p.columns], R.column(p.select, k)
    cols += [(sel[0], "mrr")] if "mrr" in res.get("test", {}).get(sel[0], {}) else []      # where the protocol has it
    out = []
    for name, kind, r in models:
        e = {"model": name, "kind": kind, "seed": seed}
        if kind != "n/a":
            key = R.ranks_key("two_tower" if r is res else "two_tower_single" if r is res.get("single") else name)
            e.update(val=r["validation"][sel[0]][sel[1]], test={c: r["test"][c[0]].get(c[1], float("nan")) for c in cols},
                     users=ranks["users"], per_user={f[len(key) + 2:]: p.per_user(ranks[f], ranks["counts"], k)
                                                     for f in ranks.files if f.startswith(key + "__")})
            if "items" in ranks.files:
                e.update(targets=ranks["items"], counts=ranks["counts"],
                         per_target={f[len(key) + 2:]: target_values(p.per_user, ranks[f], ranks["counts"], k)
                                     for f in ranks.files if f.startswith(key + "__")})
        out.append(e)
    return out


# what makes two runs' test users and targets the same (with the dataset's digest and the protocol): paired tests
# and one leaderboard need them equal
COMPARED = ("k", "min_interactions", "warm_fraction", "cold_fraction", "tag_source")


def compared_runs(runs, runs_dir="runs", dataset=None, protocol=None):
    """[(run folder, results.json)] of the runs named (or every finished run of `dataset` under runs_dir, of
    `protocol` if given); a UserError that says which differ when they are not on the same data and protocol."""
    if runs:
        folders = [R.run_folder(r, runs_dir) for r in runs]
    else:
        folders = sorted(d for d in Path(runs_dir).glob("*") if (d / "results.json").exists())
    out = []
    for d in folders:
        if not (d / "results.json").exists() or not (d / "ranks.npz").exists():
            if runs:
                raise R.UserError(f"run {d} has no results.json and ranks.npz: it did not finish; retrain it")
            continue
        try:
            res = json.loads((d / "results.json").read_text(encoding="utf-8"))
            assert isinstance(res.get("config"), dict) and isinstance(res.get("dataset"), dict)
            with np.load(d / "ranks.npz") as z:
                assert "users" in z.files
        except Exception:                # damaged, truncated, another program's: named, and refused or skipped
            if runs:
                raise R.UserError(f"run {d}: results.json or ranks.npz is not a RecSetters file (damaged or from "
                                  f"another program); retrain it")
            R.log(f"warning: skipped {d}: results.json or ranks.npz is damaged (retrain it, or remove it)")
            continue
        if (dataset is None or res["dataset"].get("name") == dataset) and \
                (protocol is None or res.get("protocol", "leave-one-out") == protocol):
            out.append((d, res))
    if not out:
        raise R.UserError(f"no finished run of dataset {dataset!r}" + (f" under {protocol}" if protocol else "")
                        + f" in {runs_dir}/" if dataset else "name the runs to compare, or --dataset NAME")
    if protocol is None and not runs:        # --dataset D: one leaderboard per protocol found (same_data on each)
        return out
    return same_data(out)


def same_data(out):
    """out ([(run folder, results.json)]) if its runs are on the same data, protocol and split; else a UserError
    that says which differ."""
    defaults = R.Config()
    facts = [("dataset", lambda r: f"{r['dataset']['name']} (digest {r['dataset'].get('digest', 'unknown')})"),
             ("protocol", lambda r: r.get("protocol", "leave-one-out")),
             ("split", lambda r: r.get("split", {}).get("split", r["config"].get("split"))),    # auto resolved
             *((R.flag(s), lambda r, s=s: r["config"].get(s, getattr(defaults, s))) for s in COMPARED)]
    for what, of in facts:
        groups = {}
        for d, r in out:
            groups.setdefault(str(of(r)), []).append(d.name)
        if len(groups) > 1:
            raise R.UserError(f"the runs differ in {what}: " + "; ".join(
                f"{v} ({', '.join(n[:3])}{' ...' if len(n) > 3 else ''})" for v, n in groups.items())
                + (": compare one at a time (--protocol NAME)" if what == "protocol" else
                   ": a leaderboard compares runs on the same data and split"))
    return out


def compare_runs(folders_results, n_boot=2000):
    """The leaderboard of (run folder, results.json) pairs that compared_runs accepted, and a title."""
    entries = []
    for d, res in folders_results:
        with np.load(d / "ranks.npz") as z:
            entries += [{**e, "run": d.name} for e in run_entries(res, z)]
    res = folders_results[0][1]
    protocol, k = res.get("protocol", "leave-one-out"), res["config"].get("k", 10)
    split = res["config"].get("split", "auto")
    kind = res.get("split", {}).get("split", split)
    ds = res["dataset"]["name"] + (" (SYNTHETIC)" if res["dataset"].get("synthetic") else "")
    title = f"{ds}, {protocol}" + (f" ({kind})" if kind != protocol else "")
    return leaderboard(entries, protocol, k, n_boot), title


def cmd_compare(args):
    if not args.runs and not args.of_dataset:
        raise R.UserError("name the runs to compare, or --dataset NAME for every run of a dataset under --runs-dir")
    runs = compared_runs(args.runs, args.runs_dir, args.of_dataset, args.protocol)
    groups = {}
    for d, res in runs:                      # --dataset without --protocol: a leaderboard per protocol found
        groups.setdefault(res.get("protocol", "leave-one-out"), []).append((d, res))
    outs = {}
    for protocol, group in groups.items():
        same_data(group)
        name = f"{group[0][1]['dataset']['name']}-{protocol}"
        out = Path(args.out + (f"-{protocol}" if len(groups) > 1 else "") if args.out else
                   Path(args.runs_dir) / "compare" / name)
        for f in (f"{out}.md", f"{out}.tex"):            # before any work: nothing that exists is replaced unasked
            R.check_output(f, args.overwrite, own=not args.out)
        outs[protocol] = out
    for protocol, group in groups.items():
        compare_one(group, outs[protocol], args.per_seed)


def compare_one(runs, out, per_seed=False):
    """One protocol's leaderboard: printed, and written to OUT.md and OUT.tex."""
    board, title = compare_runs(runs)
    seeds = sorted({s for r in board["rows"] for s in r["seeds"]})
    n = f"{len(runs)} run{'s' if len(runs) > 1 else ''}"
    caption = f"{title}: {n}, seeds {', '.join(map(str, seeds))}. " + board_note(board, "Leaderboard")
    md = board_markdown(board, f"**{title}** ({n}: {', '.join(d.name for d, _ in runs)})")
    for model, seed, kept, other in board["duplicates"]:
        R.log(f"warning: {model} at seed {seed} is in runs {kept} and {other}: counted once (from {kept}); name the "
              f"runs to compare them apart")
    print("\n".join(md) + "\n\n" + board_note(board, "Leaderboard"))
    if per_seed:
        seed_rows = seed_table(board)
        print("\n" + "\n".join(seed_rows))
        md += ["", *seed_rows]
    R.atomic_write_text(Path(f"{out}.md"), "\n".join([f"## {title}", "", *md[2:], "", board_note(board, "Table")]) + "\n")
    tag = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    R.atomic_write_text(Path(f"{out}.tex"), "\n".join(board_latex(board, caption, tag)) + "\n")
    print(f"\nwrote {out}.md and {out}.tex")


def seed_table(board):
    """--per-seed: one Markdown row per (model, seed) with its run, validation and test columns, best model first."""
    heads = ["model", "seed", "run", f"val {R.label(*board['select'])}"] + [R.label(*c) for c in board["columns"]]
    L = ["Per seed:", "", "| " + " | ".join(heads) + " |", "|---|---:|---|" + "---:|" * (len(heads) - 3)]
    for r in board["rows"]:
        for seed, e in sorted(board["by_model"][r["model"]].items()):
            L.append(f"| {r['model']} | {seed} | {e.get('run', '')} | {e['val']:.2f} | "
                     + " | ".join(f"{e['test'].get(c, float('nan')):.2f}" for c in board["columns"]) + " |")
    return L


# ----------------------------------------------------------------------------------------------
# 2. the grid

def ensure_dataset(dataset, data_dir, hetrec_from):
    """demo is generated by recsetters.py; hetrec is imported with collect.py when it is missing."""
    if dataset == "hetrec" and not (Path(data_dir) / "hetrec" / "interactions.csv").exists():
        src = hetrec_from if hetrec_from is not None else (
            str(HERE.parent / "shared/data/hetrec2011-lastfm-2k")
            if (HERE.parent / "shared/data/hetrec2011-lastfm-2k").exists() else "")
        print(f"importing hetrec from {src or 'the official URL'} (collect.py) ...", flush=True)
        subprocess.run([sys.executable, str(HERE / "collect.py"), "--data-dir", data_dir, "hetrec",
                        *([src] if src else [])], cwd=HERE, check=True)


def cells(datasets, protocols, texts, seeds, data_dir, mf=True):
    """[(dataset, protocol, kind, text, seed)] in run order (baselines first, then each text over all seeds, then
    the protocol's extra models unless mf=False); skipped-text notes."""
    base, runs, notes = [], [], []
    for d in datasets:
        have = set(R.text_columns(R.load_dataset(data_dir, d).items))
        use = [t for t in texts if t == "none" or t in have]
        notes += [f"{d}: no `{t}` text (column missing or empty): skipped" for t in texts if t not in use]
        for p in protocols:
            base += [(d, p, "baselines", None, s) for s in seeds]
            runs += [(d, p, "two-tower", t, s) for t in use for s in seeds]
            runs += [(d, p, kind, None, s) for kind, _ in EXTRA_MODELS.get(p, []) if mf for s in seeds]
    return base + runs, notes


def text_flags(text):
    """A two-tower cell's text: a column name (`--text NAME`), or a point of its text search ({"text": column, and
    "tag_count" where it reads tags}: TEXT_POINTS)."""
    if not isinstance(text, dict):
        return ["--text", str(text)]
    return ["--text", text["text"], *(["--tag-count", text["tag_count"]] if "tag_count" in text else [])]


def text_name(text):
    return "-".join(text.values()) if isinstance(text, dict) else str(text)


def cell_name(dataset, protocol, kind, text, seed):
    return f"{dataset}-{protocol}-" + {"two-tower": text_name(text), "single": f"{text_name(text)}-single"}.get(
        kind, kind) + f"-s{seed}"


def cell_done(run_dir):
    return (run_dir / "results.json").exists() and (run_dir / "ranks.npz").exists()


def cell_flags(protocol, kind, text):
    extra = dict(EXTRA_MODELS.get(protocol, []), single=[*text_flags(text), "--ensemble", "1"],
                 **{c: [*text_flags(text), *flags] for c, flags in CONTROLS.get(protocol, [])})
    return ["--split", R.PROTOCOLS[protocol].splits[0], *(extra[kind] if kind in extra else text_flags(text))]


def train_config(dataset, seed, data_dir, flags):
    """The configuration `recsetters.py train` resolves these flags to, today's defaults and the protocol's chosen
    setting included (without the settings that do not change a run's results, and those of other commands)."""
    args = R.parse_args(["train", "--dataset", dataset, "--data-dir", data_dir, "--seed", str(seed), *flags])
    skip = set(R.PLACE) - {"dataset", "split", "text", "seed"} | {"baselines", "trials", "study"} | {
        f.name for f in R.fields(R.Config) if "train" not in f.metadata["cmds"]}
    return {k: v for k, v in R.asdict(R.config_from(args)).items() if k not in skip}


def ran_with(run_dir, want):
    """True when run_dir holds a finished run of exactly this configuration (a run made under older defaults
    is not reused)."""
    if not (run_dir / "results.json").exists():
        return False
    have = json.loads((run_dir / "results.json").read_text())["config"]
    have.setdefault("k", 10)                  # cells made before K was stored were evaluated at 10
    return {k: have.get(k) for k in want} == want and all(have.get(k, v) == v for k, v in R.RETIRED.items())


def data_settings(config):
    """The settings that make a split and its evaluation (those of `stats`, less where things go): what a baselines
    cell is reused under."""
    keys = [f.name for f in R.fields(R.Config) if "stats" in f.metadata["cmds"] and f.name not in R.PLACE
            and f.name not in ("eval_memory_mb", "baselines")]
    return {key: config.get(key) for key in keys}


def run_baselines_cell(dataset, protocol, seed, data_dir, run_dir, k, extra=(), contest=None):
    """Every baseline of R.BASELINES on the (dataset, protocol, seed) split (n/a where it cannot score it), with the
    protocol's audit where it has one. The protocol's chosen setting applies, and the split's settings among `extra`
    (the two-tower cells' flags), so that every model sees the same data. contest: (cfg, ds, split) -> R.Search
    (a search, or frozen points); None: the fixed grids."""
    cfg = R.config_from(R.parse_args(["baselines", "--dataset", dataset, "--data-dir", data_dir, "--seed", str(seed),
                                      "-k", str(k), "--split", R.PROTOCOLS[protocol].splits[0], *extra], known=True))
    cfg.validate()
    ds, split = R.prepare(cfg, quiet=True)
    cache = Path(data_dir) / ".cache"
    res, ranks = R.run_baselines(ds, split, cfg.k, cfg.eval_memory_mb, None, cache, seed, quiet=True,
                                 search=contest(cfg, ds, split) if contest else R.Search())
    audit = R.protocol_of(split).audit
    audit = audit(ds, split, res, cache, cfg.eval_memory_mb, cfg.tag_count) if audit and ds.tag_assignments is not None \
        else None
    run_dir.mkdir(parents=True, exist_ok=True)
    R.atomic_write_text(run_dir / "results.json", json.dumps(
        {"protocol": split.protocol,
         "dataset": {"name": ds.name, "synthetic": ds.synthetic, "digest": ds.digest},
         "config": {"dataset": dataset, "seed": seed, **data_settings(R.asdict(cfg))},
         "split": R.split_stats(split), "report": split.report, "baselines": res, "leak_audit": audit,
         "provenance": R.provenance("cpu")}, indent=1))
    R.save_ranks(run_dir / "ranks.npz", ranks)


def run_cell(cell, out, data_dir, extra, contest=None):
    dataset, protocol, kind, text, seed = cell
    name = cell_name(*cell)
    run_dir = out / "runs" / name
    flags = [*extra, *cell_flags(protocol, kind, text)]
    want = train_config(dataset, seed, data_dir, flags)
    if cell_done(run_dir) and ran_with(run_dir, data_settings(want) if kind == "baselines" else want):
        return "skipped (done)"
    t0 = time.time()
    if kind == "baselines":
        run_baselines_cell(dataset, protocol, seed, data_dir, run_dir, want["k"], extra, contest)
    else:
        failed = train_run(dataset, seed, data_dir, run_dir, [*flags, "--no-baselines"], out / "logs" / f"{name}.log")
        if failed:
            return failed
    R.atomic_write_text(run_dir / "wall.json", json.dumps({"seconds": time.time() - t0}))
    return f"done in {time.time() - t0:.0f}s"


def train_run(dataset, seed, data_dir, run_dir, flags, log_path):
    """`recsetters.py train` into run_dir (replacing an unfinished or outdated run there) as a subprocess, output to
    log_path; returns None, or why it failed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE / "recsetters.py"), "train", "--dataset", dataset, "--data-dir", data_dir,
           "--seed", str(seed), "--runs-dir", str(run_dir.parent), "--run-name", run_dir.name, "--overwrite", *flags]
    with open(log_path, "w") as f:
        p = subprocess.run(cmd, cwd=HERE, stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return f"FAILED (exit {p.returncode}, see {log_path})" if p.returncode else None


# ----------------------------------------------------------------------------------------------
# 2b. the contest: every baseline's space searched on the development seeds' validation (`search`, resumable: the
# trials are kept in OUT/study.db), each model's chosen point frozen (OUT/frozen.json), then every model run once at
# its frozen point on seeds that no choice has seen (`confirm`), with the leaderboards of what they show

DEV_SEEDS = [0]                      # where the two-tower's own setting was chosen (RESULTS.md: seed 0; 1, 2 to check)
CONFIRM_SEEDS = [10, 11, 12, 13, 14]     # seeds no choice has seen


def text_points(ds):
    """The two-tower's own text search (issue 35, item 2), like a content model's: each text column of the dataset,
    its tags at each of R.TAG_COUNTS where the dataset has the assignments to rebuild them from."""
    return [{"text": t, "tag_count": n} for t in R.text_columns(ds.items) if t == "tags" and ds.tag_assignments is
            not None for n in R.TAG_COUNTS] + [{"text": t} for t in R.text_columns(ds.items)
                                               if t != "tags" or ds.tag_assignments is None]


def search(out, data_dir, protocols, seeds=DEV_SEEDS, dataset="hetrec", trials="auto", jobs=1, train_args=()):
    """Search every model of each protocol on the validation of the development seeds, then freeze. The baselines:
    R.Search (Optuna's TPE, --trials auto = each protocol's count; an interrupted search resumes from the trials in
    OUT/study.db, and processes or machines given the same study share it). The two-tower: its own text, every point
    of text_points as a single model (its other settings are those its tuning chose, RESULTS.md). Writes
    OUT/frozen.json {protocol: {model: its point on the first seed}, "two-tower": its text point} and OUT/search.md
    (validation only). Finished cells are kept."""
    out.mkdir(parents=True, exist_ok=True)
    study = str((out / "study.db").resolve())
    contest = lambda cfg, ds, split: R.baseline_search(replace(cfg, trials=trials, study=study, ensemble=1), ds, split)
    points = text_points(R.load_dataset(data_dir, dataset))
    cells_ = [(dataset, p, "single", t, s) for p in protocols for t in points for s in seeds]
    cells_ += [(dataset, p, "baselines", None, s) for p in protocols for s in seeds]
    extra = [*train_args, *(["--threads", "1"] if jobs > 1 else [])]
    run = lambda c: f"{cell_name(*c)}: {run_cell(c, out / 'search', data_dir, extra, contest)}"
    with ThreadPoolExecutor(jobs) as ex:
        for i, line in enumerate(ex.map(run, cells_), 1):
            print(f"[{i}/{len(cells_)}] search {line}", flush=True)
    frozen = json.loads((out / "frozen.json").read_text()) if (out / "frozen.json").exists() else {}
    for p in protocols:
        res = json.loads((out / "search" / "runs" / cell_name(dataset, p, "baselines", None, seeds[0]) /
                          "results.json").read_text())
        frozen[p] = {m: r["params"] for m, r in res["baselines"].items() if "params" in r}
        scored = [(text_validation(out, dataset, p, t, seeds[0]), -i, t) for i, t in enumerate(points)]
        if scored and max(scored)[0] >= 0:        # the best text point trained (ties: the first); none: no choice
            frozen[p]["two-tower"] = max(scored)[2]
    R.atomic_write_text(out / "frozen.json", json.dumps(frozen, indent=1))
    R.atomic_write_text(out / "search.md", "\n".join(search_table(out, dataset, list(R.PROTOCOLS), seeds)) + "\n")
    return out / "frozen.json"


def text_validation(out, dataset, protocol, text, seed):
    """A two-tower text point's validation score in the search (the protocol's selection metric; -1: not run)."""
    f = out / "search" / "runs" / cell_name(dataset, protocol, "single", text, seed) / "results.json"
    if not f.exists():
        return -1.0
    res = json.loads(f.read_text())
    col = R.column(R.PROTOCOLS[protocol].select, res["config"].get("k", 10))
    return res["validation"][col[0]][col[1]]


def search_table(out, dataset, protocols, seeds):
    """search.md: per protocol and development seed, each model's trials, chosen point, the dimensions it lies on an
    edge of, its validation score and the search's time (no test column: test guided nothing here, and is not shown)."""
    L = ["# The contest's search (validation only)", ""]
    for p in protocols:
        for s in seeds:
            f = out / "search" / "runs" / cell_name(dataset, p, "baselines", None, s) / "results.json"
            if not f.exists():
                continue
            res = json.loads(f.read_text())
            col = R.column(R.PROTOCOLS[p].select, res["config"].get("k", 10))
            L += [f"## {dataset}, {p}, seed {s}", "", f"| model | trials | search | chosen point | on an edge | "
                  f"val {R.label(*col)} | search s |", "|---|---:|---|---|---|---:|---:|"]
            for m, r in res["baselines"].items():
                if "params" in r:
                    L.append(f"| {m} | {r['trials']} | {r.get('search', 'grid')} | "
                             f"{R.point_text(r['params'])} | {', '.join(r.get('edges', [])) or '–'} | "
                             f"{r['validation'][col[0]][col[1]]:.2f} | {r.get('search_seconds', r['seconds']):.0f} |")
            runs = [json.loads((d / "results.json").read_text()) for d in
                    sorted((out / "search" / "runs").glob(f"{dataset}-{p}-*-single-s{s}")) if cell_done(d)]
            tried = sorted(((r["validation"][col[0]][col[1]], {"text": r["config"]["text"]} | (
                {"tag_count": r["config"]["tag_count"]} if r["config"]["text"] == "tags" else {}),
                r["timings"]["train_seconds"]) for r in runs), key=lambda x: -x[0])
            if tried:
                L.append(f"| two-tower (single) | {len(tried)} | every point | {R.point_text(tried[0][1])} | – | "
                         f"{tried[0][0]:.2f} | {sum(t[2] for t in tried):.0f} |")
                L += ["", "The two-tower's text points (validation " + R.label(*col) + "): " +
                      "; ".join(f"{text_name(t)} {v:.2f}" for v, t, _ in tried) + "."]
            L.append("")
    return L


def confirm(out, data_dir, protocols, seeds=CONFIRM_SEEDS, dataset="hetrec", jobs=1, train_args=(), plan=False):
    """Every model once at its frozen point (OUT/frozen.json, from `search`) on each protocol's fresh seeds: the
    baselines (their ensembles of the two-tower's M and the blend), the two-tower with its own frozen text and
    without (--text none; its other settings are its tuning's; epochs by early stopping on each seed's validation),
    where it is an ensemble also its first member, the single model (the same training, tested apart; without text
    then only the single model, to fit the budget), and where
    its text is tags the protocol's CONTROLS. Finished cells are kept (resumable); each cell's wall time is kept
    beside it. Writes OUT/confirm-PROTOCOL.md and .tex (the leaderboard and its tests) and OUT/confirmation.md
    (every protocol's leaderboard, its search, and where the time went). First it prints what is left and what that
    should cost (plan_lines); plan=True: only that."""
    if not (out / "frozen.json").exists():
        raise R.UserError(f"{out}/frozen.json is missing: run `experiments.py search --out {out}` first")
    frozen = json.loads((out / "frozen.json").read_text())
    if missing := [p for p in protocols if p not in frozen]:
        raise R.UserError(f"no frozen points for {', '.join(missing)} in {out}/frozen.json: search it first")
    m_of = lambda p: R.PROTOCOLS[p].defaults.get("ensemble", 1)
    own = lambda p: frozen[p].get("two-tower") or R.auto_text(R.load_dataset(data_dir, dataset).items)
    contest = lambda cfg, ds, split: R.Search(frozen={m: v for m, v in frozen[split.protocol].items()
                                                      if m != "two-tower"}, ensemble=m_of(split.protocol), tag_counts=())
    order = []                                # protocol by protocol: each leaderboard complete as early as it can be
    for p in protocols:
        order += [(dataset, p, "baselines", None, s) for s in seeds]
        order += [(dataset, p, "two-tower", own(p), s) for s in seeds]
        # without text: the single model where the two-tower is an ensemble (the budget: answered single against
        # single, the ensemble's first member, beside its ensemble)
        order += [(dataset, p, "single" if m_of(p) > 1 else "two-tower", "none", s) for s in seeds]
        order += [(dataset, p, kind, own(p), s) for kind, _ in CONTROLS.get(p, []) for s in seeds
                  if text_flags(own(p))[1] == "tags"]
    extra = [*train_args, *(["--threads", "1"] if jobs > 1 else [])]
    todo = [c for c in order if not cell_done(out / "confirm" / "runs" / cell_name(*c))]
    for line in plan_lines(out, todo, m_of, jobs):
        print(line, flush=True)
    if plan:
        return []
    run = lambda c: f"{cell_name(*c)}: {run_cell(c, out / 'confirm', data_dir, extra, contest)}"
    with ThreadPoolExecutor(jobs) as ex:
        for i, line in enumerate(ex.map(run, order), 1):
            print(f"[{i}/{len(order)}] confirm {line}", flush=True)
    written, L = [], [f"# The contest's confirmation: {dataset}, seeds {', '.join(map(str, seeds))}", ""]
    for p in protocols:
        runs = [(d, json.loads((d / "results.json").read_text())) for d in
                (out / "confirm" / "runs" / cell_name(*c) for c in order if c[1] == p) if cell_done(d)]
        if runs:
            compare_one(same_data(runs), out / f"confirm-{p}")
            written.append(out / f"confirm-{p}.md")
            L += (out / f"confirm-{p}.md").read_text().splitlines() + [""]
            L += [f"Each model at its frozen point: chosen on {p}'s validation of seed {DEV_SEEDS[0]} (search.md: "
                  f"trials, point, edges; the two-tower's text there too, its other settings from its own tuning, "
                  f"RESULTS.md), epochs and sweeps by early stopping on each seed's validation.", ""]
            L += [ln.replace("## ", "### Search, ", 1) for ln in search_table(out, dataset, [p], DEV_SEEDS[:1])[2:]]
    L += wall_lines(out / "confirm", order, jobs)
    R.atomic_write_text(out / "confirmation.md", "\n".join(L) + "\n")
    return written + [out / "confirmation.md"]


def search_minutes(out, cell, m):
    """What a confirmation cell should cost (minutes), from the search's runs on the development seed: a baselines
    cell a mean trial (fit and validation) per model (a seeded model's M times), a training its text point's single run (M of them
    for an ensemble; without text, or a text point the search did not train: the mean of the protocol's). None: the
    search has no such run."""
    dataset, p, kind, text, _ = cell
    runs = out / "search" / "runs"
    if kind == "baselines":
        f = runs / cell_name(dataset, p, "baselines", None, DEV_SEEDS[0]) / "results.json"
        if not f.exists():
            return None
        of = lambda name: R.BASELINES.get(max((b for b in R.BASELINES if name.startswith(b)), key=len, default=""))
        trial = lambda r: r.get("search_seconds", r.get("seconds", 0)) / max(r.get("trials", 1), 1)
        return sum(trial(r) * (m if of(n) and of(n).seeded else 1)
                   for n, r in json.loads(f.read_text())["baselines"].items()) / 60
    took = lambda r: sum(h["seconds"] for h in r["history"]) + r["timings"].get("features_seconds", 0)
    mine = [took(json.loads((d / "results.json").read_text())) for d in sorted(runs.glob(f"{dataset}-{p}-*-single-s"
                                                                                         f"{DEV_SEEDS[0]}")) if cell_done(d)]
    f = runs / cell_name(dataset, p, "single", text, DEV_SEEDS[0]) / "results.json"
    one = took(json.loads(f.read_text())) if f.exists() else np.mean(mine) if mine else None
    return None if one is None else one / 60 * (m if kind == "two-tower" else 1)


def cell_kind(cell):
    """A cell's kind as the plan and the time table name it: "two-tower", "two-tower, no text", "baselines", ..."""
    return cell[2] + (", no text" if cell[3] == "none" else "")


def plan_lines(out, todo, m_of, jobs):
    """What is left of a confirmation and what it should cost, by protocol and kind of cell (search_minutes)."""
    if not todo:
        return ["confirm: every cell is done"]
    rows = {}
    for c in todo:
        r = rows.setdefault((c[1], cell_kind(c)), [0, 0.0, 0])
        est = search_minutes(out, c, m_of(c[1]))
        r[0], r[1], r[2] = r[0] + 1, r[1] + (est or 0), r[2] + (est is None)
    L = [f"confirm: {len(todo)} cells left; what they should cost, from the search's times on seed {DEV_SEEDS[0]}:"]
    L += [f"  {p:<14} {kind:<20} {n:>3} cells  ~{mins:5.0f} min" + (f" (+{u} not estimated)" if u else "")
          for (p, kind), (n, mins, u) in rows.items()]
    total = sum(r[1] for r in rows.values())
    return L + [f"  in all ~{total / 60:.1f} h of runs: about {total / 60 / jobs:.1f} h of wall time at --jobs {jobs}"]


def wall_lines(out, order, jobs):
    """Where the confirmation's time went: wall seconds per protocol and kind of cell (each cell's wall.json), and
    in all."""
    rows = {}
    for c in order:
        f = out / "runs" / cell_name(*c) / "wall.json"
        if f.exists():
            r = rows.setdefault((c[1], cell_kind(c)), [0, 0.0])
            r[0], r[1] = r[0] + 1, r[1] + json.loads(f.read_text())["seconds"]
    if not rows:
        return []
    L = ["## Where the time went", "", f"Wall time of each cell as it ran ({jobs} at a time), summed:", "",
         "| protocol | cells | runs | wall min |", "|---|---|---:|---:|"]
    L += [f"| {p} | {kind} | {n} | {sec / 60:.0f} |" for (p, kind), (n, sec) in rows.items()]
    total = sum(sec for _, sec in rows.values())
    return L + [f"| all | | {sum(n for n, _ in rows.values())} | {total / 60:.0f} (÷ {jobs} jobs: about "
                f"{total / 60 / jobs:.0f} wall) |", ""]


# ----------------------------------------------------------------------------------------------
# 3. collecting results: one row per (dataset, protocol, model, seed) with every column of the protocol's table

def model_label(res):
    c = res["config"]
    return "MF (ID-only two-tower)" if c.get("id_only") else f"two-tower, text {c['text']}"


def collect(out):
    """(rows, R.leaderboard entries (per-user test metrics included) keyed (dataset, protocol, model, seed), extras
    keyed (dataset, protocol, seed): split stats and the protocol's audit) from every finished cell."""
    rows, per_user, extras = [], {}, {}
    for d in sorted((out / "runs").glob("*")):
        if not cell_done(d):
            continue
        res = json.loads((d / "results.json").read_text())
        protocol = res.get("protocol", "leave-one-out")
        dataset, seed, k = res["config"]["dataset"], res["config"]["seed"], res["config"].get("k", 10)
        if "test" not in res:
            extras[(dataset, protocol, seed)] = {"split": res["split"], "audit": res.get("leak_audit")}
        with np.load(d / "ranks.npz") as z:
            entries = run_entries(res, z, model_label(res) if "test" in res else None)
        for e in entries:
            two_tower = e["kind"] == "two-tower"
            if two_tower and res["config"].get("id_only"):
                e["kind"] = "mf"
            r = res if two_tower else res["baselines"][e["model"]]
            row = {"dataset": dataset, "protocol": protocol, "synthetic": res["dataset"]["synthetic"],
                   "model": e["model"], "kind": e["kind"], "seed": seed, "k": k, "run": d.name,
                   "params": str(r.get("params", r.get("best_epoch"))), "best_epoch": r.get("best_epoch")}
            if e["kind"] != "n/a":
                row.update({f"{v} {m}": x for (v, m), x in e["test"].items()}, val=e["val"])
                per_user[(dataset, protocol, e["model"], seed)] = e
            rows.append(row)
    df = pd.DataFrame(rows)
    for (dataset, protocol), g in df.groupby(["dataset", "protocol"]) if len(df) else []:
        if g.k.nunique() > 1:
            raise SystemExit(f"the finished {protocol} cells of {dataset} were evaluated at different K "
                             f"({sorted(g.k.unique())}): remove the stale ones from {out / 'runs'}")
    return df, per_user, extras


def metric_cols(df):
    return [c for c in df.columns if " " in c and c.split(" ")[0] in ("overall", "cold", "warm", "unseen", "all")]


def summary(df):
    """Mean and std over seeds per (dataset, protocol, model) of every metric column, and the seeds."""
    d = df[df.kind != "n/a"]
    g = d.groupby(["dataset", "protocol", "model"], sort=False)
    s = g[metric_cols(d) + ["val"]].agg(["mean", "std"])
    s.columns = [f"{a}_{b}" for a, b in s.columns]
    s["seeds"] = g.seed.nunique()
    s["kind"] = g.kind.first()
    return s.reset_index()


# ----------------------------------------------------------------------------------------------
# 4. paired significance tests: per-user differences on the same test users, clustered (paired_over_seeds;
# the leaderboard of each (dataset, protocol) is `leaderboard`, the one `compare` prints)

def significance(df, per_user):
    """Per (dataset, protocol): each two-tower variant (and MF) against `two-tower, text none` and against the best
    baseline (by validation); the variant chosen on validation also against every other baseline. On the
    protocol's two tested metrics, over the seeds both models have (paired_over_seeds: clustered as the protocol's
    leaderboard is), Holm-adjusted over each (dataset, protocol)'s tests."""
    rows = []
    s = summary(df)
    for (dataset, protocol), o in s.groupby(["dataset", "protocol"], sort=False):
        k = int(df[(df.dataset == dataset) & (df.protocol == protocol)].k.iloc[0])
        base = o[o.kind == "baseline"].sort_values("val_mean", ascending=False)
        models = o[o.kind != "baseline"]
        chosen = models[models.kind == "two-tower"].sort_values("val_mean", ascending=False).model.head(1).tolist()
        table = []
        for model in models.model:
            refs = ["two-tower, text none", *base.model.head(1)] + (list(base.model) if model in chosen else [])
            for ref in dict.fromkeys(refs):
                a, b = ({sd: e for (d_, p_, m_, sd), e in per_user.items() if (d_, p_, m_) == (dataset, protocol, m)}
                        for m in (model, ref))
                for view, metric in R.tested(protocol, k) if ref != model else []:
                    t = paired_over_seeds(a, b, view, metric, R.PROTOCOLS[protocol].unseen == "items")
                    if t:
                        table.append({"dataset": dataset, "protocol": protocol, "model": model, "vs": ref,
                                      "metric": metric, **t})
        rows += add_holm(table)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# 5. fairness and exposure of the best two-tower variant (by validation) and EASE, seed 0, under each protocol

def fairness(out, df, data_dir, n_boot=500):
    """{(dataset, protocol): the fairness report (R.fairness_of) of the best two-tower variant on validation and of
    EASE where the protocol has it, on the first seed}."""
    res = {}
    tt_all = df[df.kind == "two-tower"]
    for (dataset, protocol), tt in tt_all.groupby(["dataset", "protocol"], sort=False):
        best = tt.groupby("model")["val"].mean().idxmax()
        seed = int(sorted(tt.seed.unique())[0])
        run = tt[(tt.model == best) & (tt.seed == seed)].run.iloc[0]
        cfg, ds, split, model, device, _ = R.restore(str(out / "runs" / run), device_name="cpu")
        scorers = {best: R.model_scores(model, device, split)}
        base = out / "runs" / cell_name(dataset, protocol, "baselines", None, seed) / "results.json"
        if base.exists() and "params" in json.loads(base.read_text())["baselines"].get("EASE", {}):
            lam = json.loads(base.read_text())["baselines"]["EASE"]["params"]
            scorers[f"EASE ({lam})"] = R.ease_scores(split, lam)
        res[(dataset, protocol)] = {"seed": seed, "label": ds.label, "protocol": protocol, "k": cfg.k, "models": {
            name: R.fairness_of(fn, split, ds, cfg.k, cfg.min_users, n_boot, seed, "cpu", cfg.eval_memory_mb)
            for name, fn in scorers.items()}}
    return res


# ----------------------------------------------------------------------------------------------
# 6. plots (matplotlib, headless): every axis labelled, error bars only where there are seeds to make them

def short(model):
    return model.replace("two-tower, text ", "TT ").replace(" (ID-only two-tower)", "")


def plots(out, df, fair):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    s = summary(df)
    groups = list(s.groupby(["dataset", "protocol"], sort=False))
    # test bars of each protocol's two tested metrics, mean (+- std where there are several seeds)
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.9 * len(groups)), squeeze=False)
    for ax, ((dataset, protocol), o) in zip(axes[:, 0], groups):
        k = int(df[(df.dataset == dataset) & (df.protocol == protocol)].k.iloc[0])
        x = np.arange(len(o))
        for j, ((view, metric), color) in enumerate(zip(R.tested(protocol, k), ("tab:blue", "tab:orange"))):
            std = o[f"{view} {metric}_std"].where(o.seeds > 1)
            ax.bar(x + (j - 0.5) * 0.4, o[f"{view} {metric}_mean"], 0.4, yerr=std if std.notna().any() else None,
                   capsize=2, color=color, label=R.label(view, metric))
        ax.set_xticks(x, [short(m) for m in o.model], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("model")
        ax.set_ylabel("test metric (×100)")
        syn = " (SYNTHETIC)" if df[df.dataset == dataset].synthetic.iloc[0] else ""
        seeds = int(o.seeds.max())
        ax.set_title(f"{dataset}{syn}, {protocol}: test, mean over {seeds} seed{'s' if seeds > 1 else ''}"
                     + (" (± std)" if seeds > 1 else ""), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(save(fig, out / "ablation.png"))
    # validation curves per epoch (mean over seeds) for every two-tower variant; the best baselines as lines
    fig, axes = plt.subplots(1, len(groups), figsize=(8 * len(groups), 3.8), squeeze=False)
    for ax, ((dataset, protocol), o) in zip(axes[0], groups):
        k = int(df[(df.dataset == dataset) & (df.protocol == protocol)].k.iloc[0])
        view, metric = R.column(R.PROTOCOLS[protocol].select, k)
        runs = df[(df.dataset == dataset) & (df.protocol == protocol) & df.kind.isin(["two-tower", "mf"])]
        longest = 1
        for model, g in runs.groupby("model"):
            results = [json.loads((out / "runs" / r / "results.json").read_text()) for r in g.run]
            curves = [[h["validation"][view][metric] for h in res["history"]] for res in results]
            ensemble = all(res.get("timings", {}).get("members") for res in results)     # curves: member 1's
            # the mean over the epochs every seed ran (early stopping ends seeds at different epochs: a mean over
            # the seeds still running would jump where one stops); each seed's own curve faint behind it
            n = min(len(c) for c in curves)
            longest = max(longest, max(len(c) for c in curves))
            line, = ax.plot(np.arange(1, n + 1), np.mean([c[:n] for c in curves], 0), marker=".",
                            label=short(model) + (", member 1" if ensemble else ""))
            for c in curves if len(curves) > 1 else ():
                ax.plot(np.arange(1, len(c) + 1), c, lw=0.6, alpha=0.3, color=line.get_color())
            if ensemble:     # what is selected and reported: the ensemble of the members at their best epochs
                v = np.mean([res["validation"][view][metric] for res in results])
                ax.axhline(v, ls=":", lw=1.2, color=line.get_color(), label=f"{short(model)}, the ensemble ({v:.2f})")
        # the three best baselines on validation as horizontal lines, each its own style, named in the legend (a
        # legend outside the axes: labels on the lines or in a corner overlap them)
        best = o[o.kind == "baseline"].sort_values("val_mean", ascending=False).head(3)
        for (_, b), ls in zip(best.iterrows(), ("--", ":", "-.")):
            ax.axhline(b.val_mean, ls=ls, lw=1, color="gray", label=f"{short(b.model)} (baseline, {b.val_mean:.2f})")
        R.epoch_axis(ax, longest)
        ax.set_ylabel(f"validation {R.label(view, metric)} (×100)")
        ax.set_title(f"{dataset}, {protocol}: mean over seeds, to the last epoch all ran (faint: each seed)", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    files.append(save(fig, out / "validation_curves.png"))
    # exposure share vs interaction share per artist
    if fair:
        fig, axes = plt.subplots(1, len(fair), figsize=(5.5 * len(fair), 4.2), squeeze=False)
        for ax, (dataset, f) in zip(axes[0], fair.items()):
            for (name, m), marker in zip(f["models"].items(), ["o", "x"]):
                e = m["exposure"]
                ax.scatter(np.asarray(e["artist_interaction_share"]) * 100, np.asarray(e["artist_exposure_share"]) * 100,
                           s=8, alpha=0.5, marker=marker, label=f"{name} (Gini {e['gini_artist_exposure']:.2f})")
            lim = ax.get_xlim()[1]
            ax.plot([0, lim], [0, lim], "k--", lw=0.8, label="exposure = popularity")
            ax.set_xscale("symlog", linthresh=0.01)
            ax.set_yscale("symlog", linthresh=0.01)
            ax.set_xlabel("artist share of train interactions (%)")
            ax.set_ylabel(f"artist share of top-{f['k']} slots (%)")
            ax.set_title(f"{f['label']}, {f['protocol']}, seed {f['seed']}", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(save(fig, out / "exposure_vs_popularity.png"))
    return files


def save(fig, path):
    fig.savefig(path, dpi=110)
    __import__("matplotlib.pyplot").pyplot.close(fig)
    return path.name


# ----------------------------------------------------------------------------------------------
# 7. report.md

def paired_lines(t, labels, intro):
    """The markdown table of paired tests `t` (significance's rows) for two metrics."""
    if not len(t):
        return []
    metrics = list(dict.fromkeys(t.metric))
    L = ["", f"{intro} (difference in points, 95% cluster-bootstrap CI as in the leaderboard; p two-sided, Holm-"
             f"adjusted over this table's {len(t)} tests; seeds: the paired t-test of the per-seed means):", "",
         f"| model | vs | Δ{labels[0]} [CI] | p (seeds) | Δ{labels[1]} [CI] | p (seeds) |",
         "|---|---|---|---|---|---|"]
    for (model, ref), g in t.groupby(["model", "vs"], sort=False):
        cells = [g[g.metric == m].iloc[0] for m in metrics]
        L.append(f"| {model} | {ref} | " + " | ".join(f"{c['diff']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}] | "
                                                    f"{pvalue(c['p_holm'])} ({pvalue(c['seed_p_holm'])})"
                                                    for c in cells) + " |")
    return L


def chosen_lines(o, k, protocol):
    """The two-tower variant chosen on validation against the best baseline (by validation), on test."""
    tt, base = o[o.kind == "two-tower"], o[o.kind == "baseline"]
    if tt.empty or base.empty:
        return []
    best, ref = tt.loc[tt.val_mean.idxmax()], base.loc[base.val_mean.idxmax()]
    m = [f"{v} {m}" for v, m in R.tested(protocol, k)]
    return ["", f"Chosen on validation: **{best.model}**, test {' / '.join(R.label(*c.split(' ')) for c in m)} "
            f"{best[m[0] + '_mean']:.2f} / {best[m[1] + '_mean']:.2f}, against the best baseline on validation, "
            f"{ref.model}: {ref[m[0] + '_mean']:.2f} / {ref[m[1] + '_mean']:.2f} (means over {int(best.seeds)} and "
            f"{int(ref.seeds)} seeds)."]


def audit_lines(audits):
    """The tag leak audit (cold-items): per seed, how many test pairs their user tagged and the scores of tag-based
    models with leaky and leak-free tags."""
    if not audits:
        return []
    first = audits[0][1]["test"]
    L = ["", "Tag leak audit (test, NDCG@20 / Recall@20 of the cold view; per seed):", "",
         "| seed | test pairs the user tagged | tag assignments on held-out items by their listeners | held-out items "
         "with tags (leaky → leak-free) | " + " | ".join(first) + " |", "|---|---|---|---|" + "---|" * len(first)]
    for seed, a in audits:
        L.append(f"| {seed} | {a['test_pairs_tagged_by_their_user_pct']:.1f}% | {a['by_listeners_pct']:.1f}% of "
                 f"{a['cold_tag_assignments']:,} | {a['cold_items_with_tags_leaky']} → "
                 f"{a['cold_items_with_tags_leak_free']} of {a['cold_items']} | "
                 + " | ".join(f"{r['cold']['ndcg@20']:.2f} / {r['cold']['recall@20']:.2f}" for r in a["test"].values())
                 + " |")
    return L


def fairness_lines(fair):
    L = ["## Fairness and exposure", "",
         "Test split, top-K lists of every test user (in the view of the protocol's selection metric), for the best "
         "two-tower variant (by validation) and EASE where the protocol has it. "
         "Intervals are bootstrap percentile intervals (users resampled within each country); a max − min gap "
         "over many small groups is biased upward by noise, so compare models rather than read it absolutely.", ""]
    for f in fair.values():
        k = f["k"]
        L += [f"### {f['label']}, {f['protocol']}, seed {f['seed']}, top {k}", "",
              "| model | artist exposure Gini | (interactions Gini) | item coverage % | artist coverage % | "
              "avg rec. popularity | cold share of slots % (of catalog) |", "|---|---|---|---|---|---|---|"]
        for name, m in f["models"].items():
            e = m["exposure"]
            L.append(f"| {name} | {e['gini_artist_exposure']:.3f} | {e['gini_artist_interactions']:.3f} | "
                     f"{e['item_coverage']:.1f} | {e['artist_coverage']:.1f} | {e['avg_rec_popularity']:.1f} "
                     f"(interactions: {e['avg_interaction_popularity']:.1f}) | {e['cold_slot_share']:.1f} "
                     f"({e['cold_item_share']:.1f}) |")
        L.append("")
        first = next(iter(f["models"].values()))
        if "note" in first:
            L += [f"Per-country metrics: {first['note']}.", ""]
            continue
        a, b = first["accuracy"]          # the protocol's two tested metrics
        L += [f"Per country ({len(first['countries'])} countries with ≥ {first['min_users']} test users):", "",
              f"| model | {a} gap max−min [CI] | {a} std [CI] | {b} gap [CI] | cold-slot share gap [CI] | "
              "largest artist-decile share gap (decile) |", "|---|---|---|---|---|---|"]
        for name, m in f["models"].items():
            ci = lambda r, key: f"{r[key]:.2f} [{r[key + '_ci'][0]:.2f}, {r[key + '_ci'][1]:.2f}]"
            g = np.array(m["decile_share_gap"])
            L.append(f"| {name} | {ci(m['accuracy'][a], 'gap')} | {ci(m['accuracy'][a], 'std')} | "
                     f"{ci(m['accuracy'][b], 'gap')} | {ci(m['cold_share'], 'gap')} | {g.max():.1f} "
                     f"({int(g.argmax()) + 1}) |")
        L.append("")
    return L


def report(out, data_dir, notes=(), do_fairness=True):
    df, per_user, extras = collect(out)
    if df.empty:
        print(f"error: no finished cells under {out / 'runs'}: run experiments.py ablation first", file=sys.stderr)
        sys.exit(2)
    df.to_csv(out / "results.csv", index=False)
    s = summary(df)
    sig = significance(df, per_user)
    fair = fairness(out, df, data_dir) if do_fairness else {}
    pngs = plots(out, df, fair)
    L = ["# RecSetters ablation: which item text helps, against strong baselines, under each protocol", "",
         "Test metrics (×100), full ranking, mean ± std over seeds; every model is selected on validation only and its "
         "test split evaluated once; every baseline under the identical split and evaluator (n/a: it cannot score the "
         "protocol). Two-tower runs use `recsetters.py train` defaults, the protocol's chosen setting and `--text`; MF "
         "is the same two-tower with only user and item ids and a dot product. Synthetic datasets are marked: no "
         "finding is claimed from them.", ""]
    L += [f"- {n}" for n in notes] + ([""] if notes else [])
    for (dataset, protocol), o in s.groupby(["dataset", "protocol"], sort=False):
        d = df[(df.dataset == dataset) & (df.protocol == protocol)]
        k = int(d.k.iloc[0])
        L += [f"## {dataset}{' (SYNTHETIC)' if d.synthetic.iloc[0] else ''}, {protocol}", ""]
        for (ds_, pr, seed), x in sorted(extras.items()):
            if (ds_, pr) == (dataset, protocol):
                st = x["split"]
                parts = "; ".join(f"{n} {c['users']:,} users, {c['items']:,} items, {c['interactions']:,} interactions"
                                  for n, c in st.get("parts", {}).items() if isinstance(c, dict))
                L.append(f"- seed {seed}: {st['users']:,} users × {st['items']:,} items, {st['train_interactions']:,} "
                         f"train interactions, split {st['split']}" + (f"; {parts}" if parts else ""))
        entries = [e for (d_, p_, _, _), e in per_user.items() if (d_, p_) == (dataset, protocol)]
        entries += [{"model": r.model, "kind": "n/a", "seed": r.seed} for _, r in d[d.kind == "n/a"].iterrows()]
        board = leaderboard(entries, protocol, k)
        L += [""] + board_markdown(board) + ["", board_note(board, "The table")]
        L += chosen_lines(o, k, protocol)
        L += paired_lines(sig[(sig.dataset == dataset) & (sig.protocol == protocol)] if len(sig) else sig,
                          [R.label(v, m) for v, m in R.tested(protocol, k)],
                          "Paired tests on per-user test metrics, same users, over the seeds both models have")
        L += audit_lines([(sd, x["audit"]) for (ds_, pr, sd), x in sorted(extras.items())
                          if (ds_, pr) == (dataset, protocol) and x["audit"]])
        L.append("")
    L += fairness_lines(fair) if fair else []
    L += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    if (out / "tuning.md").exists():
        L += [(out / "tuning.md").read_text()]
    R.atomic_write_text(out / "report.md", "\n".join(L))
    return out / "report.md"


# ----------------------------------------------------------------------------------------------
# 8. the tuning log: what was tried for the default `train` configuration, one change at a time, on hetrec.
# Each row is `recsetters.py train --text none` plus its flags (against the current defaults, so every row says
# exactly what it ran); the choice between rows is made on validation NDCG@K alone, test is shown for the record.
# A row with a retired setting (R.RETIRED) is rerun at commit R.RETIRED_AT, where the setting still is (retired_flag).

TUNING = [
    ("previous default: towers with hidden layers 128,64, dim 96", ["--hidden", "128,64", "--dim", "96"]),
    ("+ history dropout 0.3", ["--hidden", "128,64", "--dim", "96", "--history-dropout", "0.3"]),
    ("+ history dropout 0.5", ["--hidden", "128,64", "--dim", "96", "--history-dropout", "0.5"]),
    ("+ cosine lr schedule over 60 epochs", ["--hidden", "128,64", "--dim", "96", "--schedule", "cosine",
                                             "--epochs", "60"]),
    ("+ temperature 0.05", ["--hidden", "128,64", "--dim", "96", "--temperature", "0.05"]),
    ("one hidden layer of 256", ["--hidden", "256", "--dim", "96"]),
    ("linear towers (no hidden layer)", ["--hidden", "", "--dim", "96"]),
    ("linear + item bias", ["--hidden", "", "--dim", "96", "--item-bias"]),
    ("linear + temperature 0.05", ["--hidden", "", "--dim", "96", "--temperature", "0.05"]),
    ("linear + lr 6e-3", ["--hidden", "", "--dim", "96", "--lr", "6e-3"]),
    ("linear + dropout 0.5", ["--hidden", "", "--dim", "96", "--dropout", "0.5"]),
    ("linear + embedding dim 192 (the default)", ["--hidden", "", "--dim", "192"]),
    ("linear, dim 192, out dim 384", ["--hidden", "", "--dim", "192", "--out-dim", "384"]),
    ("linear, dim 192, patience 10, 80 epochs", ["--hidden", "", "--dim", "192", "--patience", "10",
                                                 "--epochs", "80"]),
    # third round (issue 12: beat iALS, the strongest baseline on hetrec validation), against today's defaults
    ("r3 defaults, text tags", ["--text", "tags"]),
    ("r3 tags + attention pooling of the history", ["--text", "tags", "--pool", "attention"]),
    ("r3 tags + text bag", ["--text", "tags", "--text-bag"]),
    ("r3 tags + batch 1024, lr 6e-3", ["--text", "tags", "--batch-size", "1024", "--lr", "6e-3"]),
    # new items (issue 11): the cold-items protocol, text tags, selected on validation-cold NDCG@20
    ("c1 cold-items, tags + text bag, no top-tag feature", ["--split", "cold-items", "--text", "tags", "--text-bag",
                                                           "--no-tag-feature"]),
    ("c1 cold-items, tags", ["--split", "cold-items", "--text", "tags", "--no-text-bag", "--tag-feature"]),
    ("c1 cold-items, tags + text bag", ["--split", "cold-items", "--text", "tags", "--text-bag", "--tag-feature"]),
    # new items with every leak-free tag: a DropoutNet-style share of train items that look new (both views)
    ("c2 cold-items, defaults + cold dropout 0.2", ["--split", "cold-items", "--text", "tags", "--cold-dropout", "0.2"]),
    ("c2 cold-items, defaults + cold dropout 0.5", ["--split", "cold-items", "--text", "tags", "--cold-dropout", "0.5"]),
    # new users (issue 21): does a user's free embedding (ids, zero for a user never trained) help, with or without
    # user-id dropout, and what does it cost leave-one-out? (the default has none: country and history only)
    ("n1 new-users, tags (defaults: no per-user embeddings)", ["--split", "new-users", "--text", "tags"]),
    ("n1 new-users, tags + history dropout 0.3", ["--split", "new-users", "--text", "tags", "--history-dropout", "0.3"]),
    ("n1 new-users, tags + history dropout 0.5", ["--split", "new-users", "--text", "tags", "--history-dropout", "0.5"]),
    ("n2 new-users, tags, patience 10, 60 epochs", ["--split", "new-users", "--text", "tags", "--patience", "10",
                                                    "--epochs", "60"]),
    ("n2 new-users, tags + attention pooling", ["--split", "new-users", "--text", "tags", "--pool", "attention"]),
    ("n2 new-users, tags + temperature 0.05", ["--split", "new-users", "--text", "tags", "--temperature", "0.05"]),
    ("n1 new-users, tags + user ids", ["--split", "new-users", "--text", "tags", "--user-ids"]),
    ("n1 new-users, tags + user ids, user-id dropout 0.5", ["--split", "new-users", "--text", "tags", "--user-ids",
                                                            "--user-id-dropout", "0.5"]),
    # new users, third round: what else validation supports for users never trained
    ("n3 new-users, tags + text bag over every tag", ["--split", "new-users", "--text", "tags", "--text-bag",
                                                      "--no-tag-feature", "--tag-count", "all"]),
    ("n3 new-users, tags + hidden layer 512", ["--split", "new-users", "--text", "tags", "--hidden", "512"]),
    ("n3 new-users, tags + item bias", ["--split", "new-users", "--text", "tags", "--item-bias"]),
    ("n3 new-users, tags + temperature 0.2", ["--split", "new-users", "--text", "tags", "--temperature", "0.2"]),
    ("n3 new-users, tags + weight decay 0.01", ["--split", "new-users", "--text", "tags", "--weight-decay", "0.01"]),
    ("n3 new-users, tags + dropout 0.5", ["--split", "new-users", "--text", "tags", "--dropout", "0.5"]),
    ("n3 new-users, no text", ["--split", "new-users", "--text", "none"]),
    ("n3 new-users, tags, out dim 384", ["--split", "new-users", "--text", "tags", "--out-dim", "384"]),
    # iALS, the best on new-users validation, picks its largest rank (256 factors): does the two-tower want more?
    ("n4 new-users, tags, dim 384, out dim 384", ["--split", "new-users", "--text", "tags", "--dim", "384",
                                                 "--out-dim", "384"]),
    ("n4 new-users, tags, dim 384, out dim 384, history dropout 0.5", ["--split", "new-users", "--text", "tags",
                                                                      "--dim", "384", "--out-dim", "384",
                                                                      "--history-dropout", "0.5"]),
    # with the fold-in (the protocol's default since n4; the rows' flags set squared loss 0 where it is not theirs,
    # since n5 chose weight 5): the rows n3 left unfinished, and new training objectives
    ("n5 new-users, tags (fold-in 300, softmax alone: the defaults before n5)",
     ["--split", "new-users", "--text", "tags", "--squared-loss", "0"]),
    ("n5 new-users, tags + item bias", ["--split", "new-users", "--text", "tags", "--squared-loss", "0", "--item-bias"]),
    ("n5 new-users, tags + history dropout 0.5",
     ["--split", "new-users", "--text", "tags", "--squared-loss", "0", "--history-dropout", "0.5"]),
    ("n5 new-users, tags + weight average 0.995",
     ["--split", "new-users", "--text", "tags", "--squared-loss", "0", "--ema", "0.995"]),
    ("n5 new-users, tags + weight average 0.999",
     ["--split", "new-users", "--text", "tags", "--squared-loss", "0", "--ema", "0.999"]),
    ("n5 new-users, tags + squared loss 1", ["--split", "new-users", "--text", "tags", "--squared-loss", "1"]),
    ("n5 new-users, tags + squared loss 5", ["--split", "new-users", "--text", "tags", "--squared-loss", "5"]),
    ("n5 new-users, tags + squared loss 10", ["--split", "new-users", "--text", "tags", "--squared-loss", "10"]),
    ("n5 new-users, tags + squared loss 20", ["--split", "new-users", "--text", "tags", "--squared-loss", "20"]),
    ("n5 new-users, tags + squared loss 5, confidence 1 + 3", ["--split", "new-users", "--text", "tags",
                                                              "--squared-loss", "5", "--squared-alpha", "3"]),
    ("n5 new-users, tags + squared loss 5, confidence 1 + 30", ["--split", "new-users", "--text", "tags",
                                                               "--squared-loss", "5", "--squared-alpha", "30"]),
    ("n5 new-users, tags + squared loss 10, confidence 1 + 30", ["--split", "new-users", "--text", "tags",
                                                                "--squared-loss", "10", "--squared-alpha", "30"]),
    # with the squared loss (weight 5, the protocol's default since n5); the --squared-holdout rows are at 4b5546f
    ("n6 new-users, tags + cosine schedule over 30 epochs", ["--split", "new-users", "--text", "tags", "--schedule",
                                                            "cosine", "--epochs", "30", "--patience", "30"]),
    ("n6 new-users, tags, dim 384, out dim 384", ["--split", "new-users", "--text", "tags", "--dim", "384",
                                                 "--out-dim", "384"]),
    ("n6 new-users, tags, dim 512, out dim 512", ["--split", "new-users", "--text", "tags", "--dim", "512",
                                                 "--out-dim", "512"]),
    # from the n6 defaults (fold-in 300, squared loss 5, dim 384)
    ("n7 new-users, tags + dropout 0.1", ["--split", "new-users", "--text", "tags", "--dropout", "0.1"]),
    ("n7 new-users, tags + dropout 0.4", ["--split", "new-users", "--text", "tags", "--dropout", "0.4"]),
    ("n7 new-users, tags + dropout 0.5", ["--split", "new-users", "--text", "tags", "--dropout", "0.5"]),
    ("n7 new-users, tags + lr 0.001, 60 epochs", ["--split", "new-users", "--text", "tags", "--lr", "0.001",
                                                  "--epochs", "60"]),
    ("n7 new-users, tags + batch size 256", ["--split", "new-users", "--text", "tags", "--batch-size", "256"]),
    ("n7 new-users, tags + temperature 0.15", ["--split", "new-users", "--text", "tags", "--temperature", "0.15"]),
    ("n7 new-users, tags + squared loss 10", ["--split", "new-users", "--text", "tags", "--squared-loss", "10"]),
    ("n7 new-users, tags + weight decay 0.01", ["--split", "new-users", "--text", "tags", "--weight-decay", "0.01"]),
    ("n7 new-users, tags + history text", ["--split", "new-users", "--text", "tags", "--history-text"]),
    ("n7 new-users, tags + attention pooling", ["--split", "new-users", "--text", "tags", "--pool", "attention"]),
    ("n8 new-users, no text", ["--split", "new-users", "--text", "none"]),
    ("n9 new-users, tags, a single two-tower", ["--split", "new-users", "--text", "tags", "--ensemble", "1"]),
    ("n1 leave-one-out, tags + user ids", ["--text", "tags", "--user-ids"]),
    ("n1 leave-one-out, tags + user ids, user-id dropout 0.5", ["--text", "tags", "--user-ids", "--user-id-dropout",
                                                                "0.5"]),
]
TUNE_FIXED = ["--text", "none", "--no-baselines"]


def retired_flag(flags):
    """The first flag of a tuning row that sets a retired setting (R.RETIRED), or None."""
    gone = {R.flag(n) for n in R.RETIRED} | {"--no-" + R.flag(n)[2:] for n, v in R.RETIRED.items() if v is False}
    return next((f for f in flags if f in gone), None)


def tune_cell(label, flags, dataset, seed, data_dir, out, threads):
    """Runs one tuning row unless a finished run with the identical resolved configuration is there."""
    name = re.sub("[^a-z0-9]+", "-", label.lower()).strip("-")[:60] + f"-s{seed}"
    run = out / "tune" / name
    flags = [*TUNE_FIXED, *flags, "--threads", str(threads)]
    if not ran_with(run, train_config(dataset, seed, data_dir, flags)):
        failed = train_run(dataset, seed, data_dir, run, flags, out / "logs" / f"tune-{name}.log")
        if failed:
            print(f"tune {name}: {failed}", flush=True)
            return None
    return json.loads((run / "results.json").read_text())


def tune(out, data_dir, seeds, jobs=1, dataset="hetrec", rows=TUNING, threads=None):
    """Every (row, seed) of the tuning log, `jobs` at a time; writes out/tuning.md and returns its path. A row with
    a retired setting is not run: one line says at which commit it is (only such rows: nothing is written, None)."""
    for label, flags in rows:
        if retired_flag(flags):
            print(f"tune {label}: {retired_flag(flags)} is retired; rerun at commit {R.RETIRED_AT} "
                  f"(git checkout {R.RETIRED_AT} && python experiments.py tune --only {shlex.quote(label)})", flush=True)
    work = [(label, flags, s) for label, flags in rows if not retired_flag(flags) for s in seeds]
    if rows and not work:
        return None
    threads = threads if threads is not None else 1 if jobs > 1 else 0
    with ThreadPoolExecutor(jobs) as ex:
        results = list(ex.map(lambda w: tune_cell(w[0], w[1], dataset, w[2], data_dir, out, threads), work))
    k = next((r["config"].get("k", 10) for r in results if r is not None), R.Config.k)
    L = [f"## Tuning log ({dataset}, text none unless a row sets --text; chosen on validation only)", "",
         "One change at a time, each row `recsetters.py train --text none` plus its flags against the current "
         f"defaults; mean over seeds {', '.join(map(str, seeds))}; ×100; each protocol's rows are chosen on its "
         "validation metric. No test column: a tuning table is where choices are made, and test guides none of "
         "them (the contest's confirmation, on fresh seeds, is where test is read).", ""]
    split_of = lambda flags: flags[flags.index("--split") + 1] if "--split" in flags else "auto"
    for protocol in R.PROTOCOLS:
        mine = [(label, flags) for label, flags in rows if R.protocol_name(split_of(flags)) == protocol]
        if not mine:
            continue
        metrics = R.tested(protocol, k)
        both = " / ".join(R.label(v, m) for v, m in metrics)
        L += [f"{protocol}:", "", f"| configuration | flags | best epoch | validation {both} | train s |",
              "|---|---|---|---|---|"]
        for label, flags in mine:
            if retired_flag(flags):
                L.append(f"| {label} | `{shlex.join(flags)}` | rerun at {R.RETIRED_AT} | | |")
                continue
            rs = [r for (l, _, _), r in zip(work, results) if l == label and r is not None]
            if not rs:
                L.append(f"| {label} | `{shlex.join(flags)}` | failed | | |")
                continue
            pair = lambda part: " / ".join(f"{np.mean([r[part][v][m] for r in rs]):.2f}" for v, m in metrics)
            L.append(f"| {label} | `{shlex.join(flags) or '(defaults)'}` | {np.mean([r['best_epoch'] for r in rs]):.0f} | "
                     f"{pair('validation')} | {np.mean([r['timings']['train_seconds'] for r in rs]):.0f} |")
        L.append("")
    out.mkdir(parents=True, exist_ok=True)
    R.atomic_write_text(out / "tuning.md", "\n".join(L) + "\n")
    return out / "tuning.md"


# ----------------------------------------------------------------------------------------------
# 9. command line

GRID_FILES = ("runs", "logs", "tune", "report.md", "tuning.md", "notes.json", "results.csv", "study.db", "frozen.json",
              "search", "confirm")


def grid_folder(out):
    """--out of ablation, tune and report: the grid's own folder, resumed when it exists; never a file, a run folder,
    someone else's non-empty folder (one without the grid's files) or a place that cannot be written."""
    out = R.check_output(out, folder=True, own=True)
    if out.is_dir() and any(out.iterdir()) and not any((out / f).exists() for f in GRID_FILES):
        raise R.UserError(f"--out {out}: a folder that is not an experiments folder (none of {', '.join(GRID_FILES)} "
                          f"in it); name a new folder")
    return out


def trials_arg(v):
    if v == "auto" or v.isdigit():
        return v
    raise argparse.ArgumentTypeError(f"{v!r}: auto or an integer >= 0")


def main(argv=None):
    ap = R.Parser(prog="experiments.py", description="RecSetters ablation grid and report")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ablation", help="run every missing cell of the grid, then write the report")
    a.add_argument("--datasets", nargs="+", default=["demo", "hetrec"])
    a.add_argument("--texts", nargs="+", default=["none", "title", "summary", "lyrics", "tags"])
    a.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    a.add_argument("--protocols", nargs="+", default=list(R.PROTOCOLS), type=lambda p: ALIASES.get(p, p),
                   choices=list(R.PROTOCOLS), help="protocols of R.PROTOCOLS (loo: leave-one-out)")
    a.add_argument("--no-mf", dest="mf", action="store_false", help="leave out the ID-only two-tower (MF) cells")
    a.add_argument("--train-args", default="", help="extra flags for every recsetters.py train run")
    a.add_argument("--jobs", type=int, default=1, help="training runs at a time (each with --threads 1 when > 1)")
    a.add_argument("--hetrec-from", default=None, help="where collect.py imports hetrec from when data/hetrec "
                   "is missing (default: ../shared/data/hetrec2011-lastfm-2k if present, else the official URL)")
    t = sub.add_parser("tune", help="run the tuning log (TUNING in experiments.py) and write tuning.md")
    t.add_argument("--seeds", nargs="+", type=int, default=[0])
    t.add_argument("--jobs", type=int, default=1, help="runs at a time (each with --threads 1 when > 1)")
    t.add_argument("--dataset", default="hetrec")
    t.add_argument("--only", nargs="+", default=[""], help="run only the rows whose label contains one of these "
                   "(e.g. r3 c1)")
    t.add_argument("--threads", type=int, default=None, help="torch threads per run (default: 1 with --jobs > 1)")
    s = sub.add_parser("search", help="the contest's search: every baseline's space on each protocol's validation "
                       "of the development seeds (resumable), then each chosen point frozen (OUT/frozen.json)")
    f = sub.add_parser("confirm", help="the contest's confirmation: every model once at its frozen point on fresh "
                       "seeds, and the leaderboards (OUT/confirm-PROTOCOL.md, .tex)")
    for p, seeds in ((s, DEV_SEEDS), (f, CONFIRM_SEEDS)):
        p.add_argument("--seeds", nargs="+", type=int, default=seeds)
        p.add_argument("--protocols", nargs="+", default=list(R.PROTOCOLS), type=lambda p: ALIASES.get(p, p),
                       choices=list(R.PROTOCOLS), help="protocols of R.PROTOCOLS (loo: leave-one-out)")
        p.add_argument("--dataset", default="hetrec")
        p.add_argument("--jobs", type=int, default=1, help="cells at a time (each with --threads 1 when > 1)")
        p.add_argument("--out", default="contest", help="the contest's folder, kept in git so that a search or a "
                       "confirmation spans sessions: study.db (the search's trials), frozen.json, search.md, "
                       "confirmation.md, confirm-PROTOCOL.md/.tex, and each cell's results.json, ranks.npz and "
                       "wall.json (not its checkpoint, plots or logs)")
        p.add_argument("--data-dir", default="data")
        p.add_argument("--train-args", default="", help="extra flags for every recsetters.py train run")
    f.add_argument("--plan", action="store_true", help="only print the cells left and what they should cost (from "
                   "the search's measured times)")
    s.add_argument("--trials", default="auto", type=trials_arg, help="trials per model (auto: each protocol's count, at least the two-tower's tuning effort)")
    for p in (a, t, sub.add_parser("report", help="rebuild report.md, results.csv and plots")):
        p.add_argument("--out", default="runs/ablation")
        p.add_argument("--data-dir", default="data")
        p.add_argument("--no-fairness", dest="fairness", action="store_false")
    c = sub.add_parser("compare", help="one leaderboard of runs on the same dataset and protocol: mean ± std over "
                       "seeds, paired tests against the best on validation; printed, and written as Markdown and LaTeX")
    c.add_argument("runs", nargs="*", help="run folders or names under --runs-dir (default: every finished run of "
                   "--dataset there)")
    c.add_argument("--dataset", dest="of_dataset", default=None, help="compare every run of this dataset")
    c.add_argument("--protocol", default=None, type=lambda p: ALIASES.get(p, p), choices=list(R.PROTOCOLS),
                   help="only the runs of this protocol (default: with --dataset, a leaderboard per protocol found)")
    c.add_argument("--out", default="", help="where the tables go: OUT.md and OUT.tex (default: "
                   "RUNS_DIR/compare/DATASET-PROTOCOL; OUT-PROTOCOL for each protocol when --dataset finds several); "
                   "existing files only with --overwrite")
    c.add_argument("--per-seed", action="store_true", help="also a row per model and seed (its run, validation and "
                   "test)")
    R.add_settings(c, "compare", R.Config())
    args = ap.parse_args(argv)
    if args.cmd == "compare":
        try:
            return cmd_compare(args)
        except R.UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    try:
        out = grid_folder(args.out)
    except R.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    notes = []
    if args.cmd in ("search", "confirm"):
        ensure_dataset(args.dataset, args.data_dir, None)
        try:
            if args.cmd == "search":
                frozen = search(out, args.data_dir, args.protocols, args.seeds, args.dataset, args.trials, args.jobs,
                                args.train_args.split())
                print(f"wrote {frozen} and {out / 'search.md'}")
            else:
                for path in confirm(out, args.data_dir, args.protocols, args.seeds, args.dataset, args.jobs,
                                    args.train_args.split(), args.plan):
                    print(f"wrote {path}")
        except R.UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        return
    if args.cmd == "ablation":
        (out / "logs").mkdir(parents=True, exist_ok=True)
        for d in args.datasets:
            ensure_dataset(d, args.data_dir, args.hetrec_from)
        order, notes = cells(args.datasets, args.protocols, args.texts, args.seeds, args.data_dir, args.mf)
        for n in notes:
            print("note: " + n, flush=True)
        # baselines first, then the training runs, --jobs at a time
        extra = args.train_args.split() + (["--threads", "1"] if args.jobs > 1 else [])
        run = lambda c: f"{cell_name(*c)}: {run_cell(c, out, args.data_dir, extra)}"
        with ThreadPoolExecutor(args.jobs) as ex:
            for i, line in enumerate(ex.map(run, order), 1):
                print(f"[{i}/{len(order)}] {line}", flush=True)
        R.atomic_write_text(out / "notes.json", json.dumps(notes))
    elif args.cmd == "tune":
        ensure_dataset(args.dataset, args.data_dir, None)
        rows = [r for r in TUNING if any(o in r[0] for o in args.only)]
        path = tune(out, args.data_dir, args.seeds, args.jobs, args.dataset, rows, args.threads)
        if path is None:
            return
        print(f"wrote {path}")
        if not (out / "runs").exists():
            return
    if args.cmd != "ablation" and (out / "notes.json").exists():
        notes = json.loads((out / "notes.json").read_text())
    print(f"wrote {report(out, args.data_dir, notes, args.fairness)}")


if __name__ == "__main__":
    main()
