"""
bench.py: how fast recsetters.py trains and evaluates, next to the floor set by the hardware.

    .venv/bin/python bench.py                         # demo, hetrec (if data/hetrec/ exists), large; cpu
    .venv/bin/python bench.py --sets demo --reps 3    # one set
    .venv/bin/python bench.py --device cuda --amp     # on a GPU (records the device name)

For each dataset and scorer (dot, dotcompress) it measures
  - one training epoch (the study's margin loss, 20 negatives, batch 512): seconds (median of --reps),
    positives/s, and the share of the epoch spent preparing data (shuffling, negative sampling, batching);
  - one full-ranking evaluation of every test user over all items: seconds and (user, item) pairs/s;
  - the floor: the same users x items product of the tower outputs (chunked into a reused buffer), and
    the evaluation's ratio to it;
  - peak resident memory of the process that ran the set (each set runs in its own child process).
Datasets: `demo` (SYNTHETIC, the study's scale), `hetrec` (data/hetrec/, made by
`collect.py hetrec ../shared/data/hetrec2011-lastfm-2k`), `large` (SYNTHETIC: 100,000 users x 50,000 items x
5,000,000 interactions, generated here in a few vectorized numpy calls). Text features are random
384-dim vectors by default (the same compute as all-MiniLM-L6-v2 embeddings; no encoding in a benchmark).
Writes runs/bench/bench.json (atomically) and prints a table.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import recsetters as R

SETS = ("demo", "hetrec", "large")
SCORERS = tuple(R.SCORERS)
# the model and training setup every set is timed with, pinned (train's defaults may change): the study's towers
# (hidden layers 128,64, 96-dim embeddings, GELU on the outputs, no history, no normalization) and margin loss
# with 20 negatives, at lr 1e-3; --scorer, --batch-size, --amp and --compile come from the command line
BENCH_MODEL = dict(loss="margin", negatives=20, lr=1e-3, dim=96, out_dim=192, hidden="128,64", tower_act=True,
                   final_gelu=False, history=False, normalize=False, temperature=1.0, dropout=0.0, user_ids=True)


# ----------------------------------------------------------------------------------------------
# datasets

def large_split(n_users=100_000, n_items=50_000, n_inter=5_000_000, seed=0):
    """A SYNTHETIC large set: long-tail item popularity, log-normal user activity (at least 5 each),
    distinct (user, item) pairs, random times; split by recsetters.split_interactions (leave-last-out)."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / (np.arange(n_items) + 20.0) ** 0.8
    pop = rng.permutation(pop / pop.sum())
    act = rng.lognormal(0, 1, n_users)
    counts = 5 + np.floor(act / act.sum() * (n_inter * 1.06 - 5 * n_users)).astype(np.int64)
    u = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    i = rng.choice(n_items, size=len(u), p=pop)
    keys = np.unique(u * n_items + i)                      # distinct pairs (a few % are duplicates)
    keys = np.sort(rng.choice(keys, size=min(n_inter, len(keys)), replace=False))
    u, i = keys // n_items, keys % n_items
    t = rng.integers(1_300_000_000, 1_700_000_000, len(u)).astype(float)
    import pandas as pd
    users = pd.DataFrame({"user": np.arange(n_users), "country": ""})
    items = pd.DataFrame({"item": np.arange(n_items)})
    ds = R.Dataset("large", users, items, pd.DataFrame({"user": u, "item": i, "timestamp": t}), synthetic=True)
    split = R.split_interactions(ds, "last", seed)
    feats = R.Features(np.arange(n_users), rng.integers(0, 40, n_users), np.arange(n_users), np.arange(n_items),
                       rng.integers(0, 10_000, n_items), rng.integers(0, 15, n_items), None)
    return split, feats, len(u)


def load_set(name, text, seed=0):
    """Returns (split, features, interactions, note)."""
    if name == "large":
        split, feats, n = large_split(seed=seed)
        note = "SYNTHETIC, generated in bench.py"
    else:
        if name == "hetrec" and not Path("data/hetrec/interactions.csv").exists():
            return None
        cfg = R.Config(dataset=name)
        ds, split = R.prepare(cfg, quiet=True)
        feats = R.build_features(ds, "none" if text == "random" else text, Path("data") / ".cache")
        n = len(ds.inter)
        note = "SYNTHETIC (make_demo)" if ds.synthetic else "real"
    if text == "random":
        feats.text = np.random.default_rng(seed).standard_normal((split.n_items, 384)).astype(np.float32)
    feats.sizes = dict(users=split.n_users, countries=int(feats.user_country.max()) + 1,
                       names=int(feats.user_name.max()) + 1, items=split.n_items,
                       artists=int(feats.item_artist.max()) + 1, tags=int(feats.item_tag.max()) + 1)
    return split, feats, n, note


# ----------------------------------------------------------------------------------------------
# measurements

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_epochs(cfg, split, feats, device, reps):
    """`reps` real training epochs with recsetters.train_epoch (the code train_model runs)."""
    R.seed_everything(cfg.seed)
    model = R.TwoTower(feats, cfg, split.train).to(device)
    if cfg.compile:
        for m in (model.user_tower, model.item_tower, model.scorer):
            m.compile(dynamic=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=device.type in ("cpu", "cuda") or None)
    sampler = R.NegativeSampler(split, cfg.seed)
    all_pos = split.train          # as train_model: training knows only train positives
    logq = np.log(np.maximum(split.degree, 1) / len(split.train_u))
    rng = np.random.default_rng(cfg.seed)
    step = R.LossStep(model)
    seconds, prep, losses = [], [], []
    for rep in range(reps):
        model.train()
        sync(device)
        t0 = time.perf_counter()
        total, n, p = R.train_epoch(step, opt, cfg, split, sampler, logq, all_pos, rng, device,
                                    f"{cfg.scorer} epoch {rep + 1}/{reps}")
        sync(device)
        seconds.append(time.perf_counter() - t0)
        prep.append(p)
        losses.append(total / n)
    k = int(np.argsort(seconds)[len(seconds) // 2])
    return model, {"epoch_seconds": seconds[k], "epoch_seconds_all": seconds, "positives": len(split.train_u),
                   "positives_per_s": len(split.train_u) / seconds[k], "prep_seconds": prep[k],
                   "prep_share": prep[k] / seconds[k], "loss": losses}


def time_eval(model, split, device, memory_mb, max_pairs):
    """One full-ranking evaluation of the test users (all of them, or an evenly spaced sample when
    users x items exceeds max_pairs), and the floor: the same users x items product of the tower outputs."""
    users = np.arange(len(split.test_u))
    if len(users) * split.n_items > max_pairs:
        users = np.linspace(0, len(users) - 1, max(1, int(max_pairs // split.n_items))).astype(np.int64)
    sub = R.Split(split.n_users, split.n_items, split.train_u, split.train_i, split.val_u, split.val_i,
                  split.test_u[users], split.test_i[users], split.train, split.degree, split.warm)
    sync(device)
    t0 = time.perf_counter()
    score = R.model_scores(model, device)
    res = R.evaluate_split(score, sub, "test", 10, device, memory_mb)
    sync(device)
    seconds = time.perf_counter() - t0
    pairs = len(users) * split.n_items
    with torch.inference_mode():
        U = torch.cat([model.users(torch.as_tensor(sub.test_u[a:a + 65536], device=device))
                       for a in range(0, len(users), 65536)])
        V = model.items(torch.arange(split.n_items, device=device))
        rows = max(1, min(len(users), int(memory_mb * 2**20 // (split.n_items * 16))))
        buf = torch.empty(rows, split.n_items, device=device)
        VT = V.T.contiguous()
        torch.mm(U[:rows], VT, out=buf)                      # warm-up
        sync(device)
        t0 = time.perf_counter()
        for a in range(0, len(users), rows):
            b = min(a + rows, len(users))
            torch.mm(U[a:b], VT, out=buf[:b - a])
        sync(device)
        floor = time.perf_counter() - t0
    return {"eval_users": len(users), "all_test_users": len(split.test_u), "sampled": len(users) < len(split.test_u),
            "eval_seconds": seconds, "pairs": pairs, "pairs_per_s": pairs / seconds,
            "full_eval_seconds_extrapolated": seconds * len(split.test_u) / len(users),
            "floor_seconds": floor, "ratio_to_floor": seconds / floor,
            "test_ndcg@10": res["overall"]["ndcg@10"]}


def run_set(args):
    """Child process: one dataset, both scorers. Returns a dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = R.pick_device(args.device)
    t0 = time.perf_counter()
    loaded = load_set(args.one, args.text, args.seed)
    if loaded is None:
        return {"set": args.one, "skipped": "data/hetrec/ not found: make it with "
                "`.venv/bin/python collect.py hetrec ../shared/data/hetrec2011-lastfm-2k`"}
    split, feats, n_inter, note = loaded
    out = {"set": args.one, "note": note, "users": split.n_users, "items": split.n_items, "interactions": n_inter,
           "train_positives": len(split.train_u), "test_users": len(split.test_u),
           "load_seconds": time.perf_counter() - t0, "scorers": {}}
    reps = args.reps if args.reps else (1 if args.one == "large" else 3)
    for scorer in args.scorers.split(","):
        cfg = R.Config(**BENCH_MODEL, dataset=args.one, scorer=scorer, seed=args.seed, batch_size=args.batch_size,
                       amp=args.amp, compile=args.compile).validate()
        if args.no_train:          # evaluation speed does not depend on the weights: an untrained model
            R.seed_everything(cfg.seed)
            model, tr = R.TwoTower(feats, cfg, split.train).to(device), {"reps": 0}
        else:
            model, tr = time_epochs(cfg, split, feats, device, reps)
            tr["reps"] = reps
        ev = time_eval(model, split, device, args.eval_memory_mb,
                       args.max_eval_pairs if scorer == "dotcompress" else float("inf"))
        out["scorers"][scorer] = {**tr, **ev}
        R.log(f"{args.one} {scorer}: epoch {tr.get('epoch_seconds', float('nan')):.1f}s, "
              f"eval {ev['eval_seconds']:.1f}s "
              f"({ev['ratio_to_floor']:.1f}x floor)")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ----------------------------------------------------------------------------------------------
# report

def table(results):
    head = (f"{'set':<8}{'scorer':<12}{'epoch s':>9}{'pos/s':>10}{'prep':>6}{'eval s':>9}{'pairs/s':>10}"
            f"{'floor s':>9}{'ratio':>7}{'peak RSS':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['set']:<8}skipped: {r['skipped']}")
            continue
        for sc, m in r["scorers"].items():
            star = "*" if m["sampled"] else ""
            tr = (f"{m['epoch_seconds']:>9.1f}{m['positives_per_s']:>10,.0f}{m['prep_share']:>6.0%}"
                  if m["reps"] else f"{'(not trained)':>25}")
            lines.append(f"{r['set']:<8}{sc:<12}{tr}{m['eval_seconds']:>8.1f}{star:1}{m['pairs_per_s']:>10.2e}"
                         f"{m['floor_seconds']:>9.2f}{m['ratio_to_floor']:>6.1f}x{r['peak_rss_mb'] / 1024:>8.1f}GB")
    lines.append("* evaluated on an evenly spaced sample of the test users (--max-eval-pairs); pairs/s and the "
                 "ratio are for that sample")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated: demo, hetrec, large")
    ap.add_argument("--scorers", default=",".join(SCORERS))
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--reps", type=int, default=0, help="epochs timed per scorer (default: 3, large: 1)")
    ap.add_argument("--batch-size", type=int, default=R.Config.batch_size)
    ap.add_argument("--text", default="random", help="random (384-dim random text features), none, or a text "
                    "column of items.csv (demo/hetrec; large always uses random)")
    ap.add_argument("--eval-memory-mb", type=int, default=R.Config.eval_memory_mb)
    ap.add_argument("--max-eval-pairs", type=float, default=2e8, help="DotCompress evaluates a sample of users "
                    "above this many (user, item) pairs (the dot scorer always evaluates all users)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast in training")
    ap.add_argument("--compile", action="store_true", help="torch.compile towers and scorer")
    ap.add_argument("--no-train", action="store_true", help="evaluation only (untrained model; same speed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench/bench.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)           # internal: run one set in this process
    ap.add_argument("--one-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        res = run_set(args)
        Path(args.one_out).write_text(json.dumps(res))
        return
    device = R.pick_device(args.device)
    env = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                     "cpu") if Path("/proc/cpuinfo").exists() else "cpu",
           "cpus": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
           "torch": torch.__version__, "amp": args.amp, "compile": args.compile, "text": args.text,
           "batch_size": args.batch_size, "negatives": BENCH_MODEL["negatives"], "loss": BENCH_MODEL["loss"],
           "load_average_at_start": os.getloadavg(), "gpu_measured": device.type == "cuda"}
    results = []
    passthrough = ["--scorers", args.scorers, "--device", args.device, "--threads", str(args.threads),
                   "--reps", str(args.reps), "--batch-size", str(args.batch_size), "--text", args.text,
                   "--eval-memory-mb", str(args.eval_memory_mb), "--max-eval-pairs", str(args.max_eval_pairs),
                   "--seed", str(args.seed)] + ["--amp"] * args.amp + ["--compile"] * args.compile \
        + ["--no-train"] * args.no_train
    for name in args.sets.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            tmp = f.name
        try:
            p = subprocess.run([sys.executable, __file__, *passthrough, "--one", name, "--one-out", tmp])
            if p.returncode != 0:
                results.append({"set": name, "skipped": f"failed with exit code {p.returncode}"})
            else:
                results.append(json.loads(Path(tmp).read_text()))
        finally:
            os.unlink(tmp)
    env["load_average_at_end"] = os.getloadavg()
    R.atomic_write_text(args.out, json.dumps({"environment": env, "results": results}, indent=1))
    print(f"\nbench on {env['device']} ({env['device_name']}), {env['torch_threads']} torch threads, "
          f"load average {env['load_average_at_start'][0]:.1f} at start")
    print(table(results))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
