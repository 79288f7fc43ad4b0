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
import dataclasses
import inspect
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
PHASES = ("sampling", "forward", "backward", "optimizer")
# the model and training setup every set is timed with, pinned (train's defaults may change): the study's towers
# (hidden layers 128,64, 96-dim embeddings, GELU on the outputs, no history, no normalization) and margin loss
# with 20 negatives, at lr 1e-3; --scorer, --batch-size, --negatives, --amp and --compile come from the command
# line
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

def module_at(rev):
    """recsetters.py as it was at git revision `rev`, imported from a temporary folder (for --against)."""
    import importlib.util
    text = subprocess.run(["git", "show", f"{rev}:recsetters.py"], cwd=Path(__file__).parent, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "recsetters_then.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("recsetters_then", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def epoch_runner(M, cfg, split, feats, device, free_cores=None):
    """(model, run) for module M (this recsetters.py, or an older one): run(desc) trains one real epoch with
    M.train_epoch, the code train_model runs, and returns (mean loss, {phase: seconds}). free_cores: a
    FreeCores (--threads auto), checked between steps as train does (older code: not checked)."""
    M.seed_everything(cfg.seed)
    model = (M.TwoTower(feats, cfg, split.train) if hasattr(M, "SCORERS") else M.build_model(cfg, feats, split)).to(device)
    if cfg.compile:
        for m in (model.user_tower, model.item_tower, model.scorer):
            m.compile(dynamic=True)
    rt = M.Runtime(device, cfg.amp) if hasattr(M, "Runtime") else device     # older code: a device
    opt = rt.optimizer(model.parameters(), cfg.lr) if hasattr(M, "Runtime") else \
        torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=device.type in ("cpu", "cuda") or None)
    logq = np.log(np.maximum(split.degree, 1) / len(split.train_u))
    rng, step = np.random.default_rng(cfg.seed), M.LossStep(model)
    if hasattr(M, "Phases"):
        sampler = M.NegativeSampler(split, cfg.seed, device)
        more = {"free_cores": free_cores} if free_cores and "free_cores" in inspect.signature(M.train_epoch).parameters \
            else {}

        def run(desc):
            model.train()
            phases = M.Phases(device, sync=True)          # waits for the device at each phase boundary
            total, n, _ = M.train_epoch(step, opt, cfg, split, sampler, logq, rng, rt, desc, phases=phases, **more)
            return total / n, phases.seconds
    else:                                                 # before the device-resident loop (ca6ae59)
        sampler = M.NegativeSampler(split, cfg.seed)

        def run(desc):
            model.train()
            total, n, prep = M.train_epoch(step, opt, cfg, split, sampler, logq, split.train, rng, device, desc)
            return total / n, {"sampling": prep}
    return model, run


def time_epochs(runs, reps, n_positives, device):
    """`reps` rounds of one epoch of each (name, run) in `runs`, interleaved (so that load affects all alike);
    per name the median epoch and its phases."""
    out = {name: {"seconds": [], "phases": [], "loss": []} for name, _ in runs}
    for rep in range(reps):
        for name, run in runs:
            R.sync_device(device)
            t0 = time.perf_counter()
            loss, phases = run(f"{name} epoch {rep + 1}/{reps}")
            R.sync_device(device)
            out[name]["seconds"].append(time.perf_counter() - t0)
            out[name]["phases"].append(phases)
            out[name]["loss"].append(loss)
    res = {}
    for name, o in out.items():
        k = int(np.argsort(o["seconds"])[len(o["seconds"]) // 2])
        s = o["seconds"][k]
        res[name] = {"epoch_seconds": s, "epoch_seconds_all": o["seconds"], "positives": n_positives,
                     "positives_per_s": n_positives / s, "phases": o["phases"][k],
                     "prep_share": o["phases"][k]["sampling"] / s, "loss": o["loss"], "reps": reps}
    return res


def time_eval(evals, split, device, memory_mb, max_pairs, reps):
    """evals: [(name, module, model)]. One full-ranking evaluation of the test users with module.evaluate
    (all of them, or an evenly spaced sample when users x items exceeds max_pairs), `reps` interleaved rounds,
    the median per name; and the floor: the same users x items product of the first model's tower outputs."""
    users = np.arange(len(split.test_u))
    if len(users) * split.n_items > max_pairs:
        users = np.linspace(0, len(users) - 1, max(1, int(max_pairs // split.n_items))).astype(np.int64)
    sub = dataclasses.replace(split, test_u=split.test_u[users], test_i=split.test_i[users])
    seconds, ndcg = {name: [] for name, _, _ in evals}, {}
    for _ in range(reps):
        for name, M, model in evals:
            R.sync_device(device)
            t0 = time.perf_counter()
            evaluate = M.evaluate if hasattr(M, "PROTOCOLS") else M.evaluate_split
            res = evaluate(M.model_scores(model, device), sub, "test", 10, device, memory_mb)
            R.sync_device(device)
            seconds[name].append(time.perf_counter() - t0)
            ndcg[name] = res["overall"]["ndcg@10"]
    model = evals[0][2]
    with torch.inference_mode():
        U = torch.cat([model.users(torch.as_tensor(sub.test_u[a:a + 65536], device=device))
                       for a in range(0, len(users), 65536)])
        V = model.items(torch.arange(split.n_items, device=device))
        rows = max(1, min(len(users), int(memory_mb * 2**20 // (split.n_items * 16))))
        buf = torch.empty(rows, split.n_items, device=device)
        VT = V.T.contiguous()
        torch.mm(U[:rows], VT, out=buf)                      # warm-up
        R.sync_device(device)
        t0 = time.perf_counter()
        for a in range(0, len(users), rows):
            b = min(a + rows, len(users))
            torch.mm(U[a:b], VT, out=buf[:b - a])
        R.sync_device(device)
        floor = time.perf_counter() - t0
    pairs = len(users) * split.n_items
    out = {}
    for name, s in seconds.items():
        s = float(np.median(s))
        out[name] = {"eval_users": len(users), "all_test_users": len(split.test_u),
                     "sampled": len(users) < len(split.test_u), "eval_seconds": s, "eval_seconds_all": seconds[name],
                     "pairs": pairs, "pairs_per_s": pairs / s,
                     "full_eval_seconds_extrapolated": s * len(split.test_u) / len(users),
                     "floor_seconds": floor, "ratio_to_floor": s / floor, "test_ndcg@10": ndcg[name]}
    return out


def time_recommend(run, loved_csv, reps=5, device="cpu", threads="auto"):
    """One line: the seconds `recommend RUN --loved FILE` needs after the run is loaded, median of `reps` rounds
    (--threads: a number; auto: as `recommend`, the cores other processes left free while the run loaded; torch:
    torch's default)."""
    R.make_runtime("cpu", 0 if threads in ("auto", "torch") else int(threads), quiet=True)     # the thread count
    cfg, ds, split, model, device, _ = R.restore(run, device_name=device, free_cores=threads == "auto")
    loved, times = R.read_loved(loved_csv), []
    for _ in range(reps):
        t0 = time.perf_counter()
        idx = R.match_items(ds.items, loved)[0]
        history = R.loved_history(idx)
        R.recommend_items(model, history, 10, device=device)
        times.append(time.perf_counter() - t0)
    print(f"recommend --loved {loved_csv} ({len(loved)} rows, {int((idx >= 0).sum())} matched) on {run} ({ds.label}, "
          f"{split.n_items:,} items, --fold-in-steps {cfg.fold_in_steps}), {device}, {torch.get_num_threads()} "
          f"thread(s): median {np.median(times):.3f} s over {reps} rounds "
          f"(min {min(times):.3f}, max {max(times):.3f}), after loading")
    return times


def run_set(args):
    """Child process: one dataset, both scorers (and the code of --against beside this one). Returns a dict."""
    rt = R.make_runtime(args.device, 0 if args.threads in ("auto", "torch") else int(args.threads), args.amp, quiet=True)
    device = rt.device
    free_cores = rt.free_cores() if args.threads == "auto" else None
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
    modules = [("now", R)] + ([(args.against, module_at(args.against))] if args.against else [])
    for scorer in args.scorers.split(","):
        if args.model == "train" and scorer != "dot":
            R.log(f"{args.one} {scorer}: skipped (--model train trains with the full softmax, which needs --scorer dot)")
            continue
        settings = {**(BENCH_MODEL if args.model == "study" else {}), "dataset": args.one, "scorer": scorer,
                    "seed": args.seed, "batch_size": args.batch_size, "amp": args.amp, "compile": args.compile,
                    **({"negatives": args.negatives} if args.model == "study" else {})}
        R.Config(**settings).validate()
        runs, evals = [], []
        for name, M in modules:
            cfg = M.Config(**{k: v for k, v in settings.items() if k in M.Config.__dataclass_fields__})
            model, run = epoch_runner(M, cfg, split, feats, device, free_cores)
            runs.append((name, run))
            evals.append((name, M, model))
        # evaluation speed does not depend on the weights: --no-train evaluates the untrained models
        tr = {name: {"reps": 0} for name, _ in runs} if args.no_train else \
            time_epochs(runs, reps, len(split.train_u), device)
        if free_cores:
            free_cores()
        ev = time_eval(evals, split, device, args.eval_memory_mb,
                       args.max_eval_pairs if scorer == "dotcompress" else float("inf"), reps)
        out["scorers"][scorer] = {name: {**tr[name], **ev[name]} for name, _ in runs}
        for name, m in out["scorers"][scorer].items():
            R.log(f"{args.one} {scorer} {name}: epoch {m.get('epoch_seconds', float('nan')):.2f}s, "
                  f"eval {m['eval_seconds']:.2f}s ({m['ratio_to_floor']:.1f}x floor)")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ----------------------------------------------------------------------------------------------
# report

def table(results):
    head = (f"{'set':<8}{'scorer':<12}{'code':<9}{'epoch s':>9}{'pos/s':>9}{'sample':>8}{'fwd':>7}{'bwd':>7}"
            f"{'opt':>7}{'eval s':>9}{'pairs/s':>10}{'floor s':>9}{'ratio':>7}{'RSS':>7}")
    lines, sampled, ratios = [head, "-" * len(head)], False, []
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['set']:<8}skipped: {r['skipped']}")
            continue
        for sc, by_code in r["scorers"].items():
            for code, m in by_code.items():
                star = "*" if m["sampled"] else ""
                sampled |= m["sampled"]
                if m["reps"]:
                    ph = m["phases"]
                    tr = f"{m['epoch_seconds']:>9.2f}{m['positives_per_s']:>9,.0f}" + "".join(
                        f"{ph[p]:>7.2f}" if p in ph else f"{'-':>7}" for p in PHASES)
                else:
                    tr = f"{'(not trained)':>46}"
                lines.append(f"{r['set']:<8}{sc:<12}{code:<9}{tr}{m['eval_seconds']:>8.2f}{star:1}"
                             f"{m['pairs_per_s']:>10.2e}{m['floor_seconds']:>9.3f}{m['ratio_to_floor']:>6.1f}x"
                             f"{r['peak_rss_mb'] / 1024:>5.1f}GB")
            if len(by_code) > 1:
                (_, now), (then_name, then) = list(by_code.items())[:2]
                ep = (f"epoch {then['epoch_seconds'] / now['epoch_seconds']:.2f}x, " if now["reps"] else "")
                ratios.append(f"{r['set']} {sc}: {then_name} / now = {ep}"
                              f"evaluation {then['eval_seconds'] / now['eval_seconds']:.2f}x")
    lines.append("phases (sample = sampling and batching, fwd, bwd, opt) in seconds per epoch, the device waited "
                 "for at each boundary")
    if ratios:
        lines += ["side by side in one run (interleaved rounds, medians): " + ratios[0]] + \
                 [" " * 55 + x for x in ratios[1:]]
    if sampled:
        lines.append("* evaluated on an evenly spaced sample of the test users (--max-eval-pairs); pairs/s and the "
                     "ratio are for that sample")
    return "\n".join(lines)


# name: (torch threads, OpenMP environment); torch's CPU wheels use GNU libgomp, whose idle threads spin
# GOMP_SPINCOUNT times (300,000 by default, none with OMP_WAIT_POLICY=PASSIVE) before they sleep
THREAD_SETTINGS = {"auto (train's default: the free cores)": ("auto", {}),
                   "torch default (OMP_WAIT_POLICY unset)": ("torch", {}), "1 thread": ("1", {}),
                   "torch default, OMP_WAIT_POLICY=PASSIVE": ("torch", {"OMP_WAIT_POLICY": "PASSIVE"}),
                   "torch default, GOMP_SPINCOUNT=10000": ("torch", {"GOMP_SPINCOUNT": "10000"})}
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def threads_table(args, passthrough):
    """--threads-sweep: one epoch and evaluation (dot scorer) of the first of --sets (demo by default) per thread
    setting, in a fresh process each, as the machine is and beside one busy process (a `while True: pass` started
    and stopped here)."""
    rows, name_set = [], args.sets.split(",")[0] if args.sets != ",".join(SETS) else "demo"
    for condition in ("as it is", "beside one busy process"):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition != "as it is" else None
        try:
            for rep in range(args.reps or 1):
                for name, (threads, omp) in THREAD_SETTINGS.items():
                    load = os.getloadavg()[0]
                    with tempfile.NamedTemporaryFile(suffix=".json") as f:
                        subprocess.run([sys.executable, __file__, *passthrough, "--threads", threads, "--sets", name_set,
                                        "--scorers", "dot", "--reps", "1", "--one", name_set, "--one-out", f.name],
                                       env={**{k: v for k, v in os.environ.items() if k not in OMP_VARIABLES},
                                            **omp}, check=True)
                        m = json.loads(Path(f.name).read_text())["scorers"]["dot"]["now"]
                    rows.append({"set": name_set, "condition": condition, "setting": name, "load_average": load,
                                 "epoch_seconds": m["epoch_seconds"], "eval_seconds": m["eval_seconds"]})
                    R.log(f"{condition}, {name}: epoch {m['epoch_seconds']:.2f}s, eval {m['eval_seconds']:.2f}s "
                          f"(load {load:.1f})")
        finally:
            if busy:
                busy.kill()
                busy.wait()
    return rows


def threads_arg(text):
    if text in ("auto", "torch") or (text.isdigit() and int(text) > 0):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use auto, torch or a number of threads (1 or more)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated: demo, hetrec, large")
    ap.add_argument("--scorers", default=",".join(SCORERS))
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    ap.add_argument("--threads", default="auto", type=threads_arg, help="torch CPU threads: auto (as train: the cores other processes "
                    "leave free, re-checked between steps), torch (torch's default, one per core) or a number")
    ap.add_argument("--reps", type=int, default=0, help="epochs timed per scorer (default: 3, large: 1)")
    ap.add_argument("--batch-size", type=int, default=R.PRESETS["original"]["batch_size"],
                    help="default: the study's 512")
    ap.add_argument("--model", choices=("study", "train"), default="study", help="study: the pinned BENCH_MODEL "
                    "(the study's towers, margin loss); train: the default configuration of `recsetters.py train` "
                    "(full softmax, dot scorer)")
    ap.add_argument("--negatives", type=int, default=BENCH_MODEL["negatives"],
                    help="negatives per positive (the study's 20; 40 gives its 41 scored pairs per positive)")
    ap.add_argument("--against", metavar="REV", help="also time recsetters.py as of git revision REV (e.g. "
                    "ca6ae59), side by side in the same process, interleaved rounds")
    ap.add_argument("--text", default="random", help="random (384-dim random text features), none, or a text "
                    "column of items.csv (demo/hetrec; large always uses random)")
    ap.add_argument("--eval-memory-mb", type=int, default=R.Config.eval_memory_mb)
    ap.add_argument("--max-eval-pairs", type=float, default=2e8, help="DotCompress evaluates a sample of users "
                    "above this many (user, item) pairs (the dot scorer always evaluates all users)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast in training")
    ap.add_argument("--compile", action="store_true", help="torch.compile towers and scorer")
    ap.add_argument("--no-train", action="store_true", help="evaluation only (untrained model; same speed)")
    ap.add_argument("--threads-sweep", action="store_true", help="instead: an epoch and evaluation (of the first of "
                    "--sets, demo by default; --model) per thread setting (THREAD_SETTINGS: auto, torch's default "
                    "spinning, 1, torch's default with OMP_WAIT_POLICY=PASSIVE or a short GOMP_SPINCOUNT), as the "
                    "machine is and beside one busy process; --reps rounds")
    ap.add_argument("--recommend", nargs=2, metavar=("RUN", "LOVED_CSV"), help="instead: the seconds `recommend RUN "
                    "--loved LOVED_CSV` takes to answer once the run is loaded (matching, encoding, ranking, reasons), "
                    "the median of --reps rounds (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench/bench.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)           # internal: run one set in this process
    ap.add_argument("--one-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        res = run_set(args)
        Path(args.one_out).write_text(json.dumps(res))
        return
    if args.recommend:
        return time_recommend(*args.recommend, reps=args.reps or 5, device=args.device, threads=args.threads)
    device = R.pick_device(args.device)
    env = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                     "cpu") if Path("/proc/cpuinfo").exists() else "cpu",
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads() if args.threads == "torch" else args.threads,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
           "torch": torch.__version__, "amp": args.amp, "compile": args.compile, "text": args.text,
           "batch_size": args.batch_size, "negatives": args.negatives, "model": args.model,
           "loss": BENCH_MODEL["loss"] if args.model == "study" else R.Config.loss,
           "against": args.against,
           "load_average_at_start": os.getloadavg(), "gpu_measured": device.type == "cuda"}
    results = []
    passthrough = ["--scorers", args.scorers, "--device", args.device, "--threads", args.threads,
                   "--reps", str(args.reps), "--batch-size", str(args.batch_size), "--text", args.text,
                   "--model", args.model,
                   "--negatives", str(args.negatives), *(["--against", args.against] if args.against else []),
                   "--eval-memory-mb", str(args.eval_memory_mb), "--max-eval-pairs", str(args.max_eval_pairs),
                   "--seed", str(args.seed)] + ["--amp"] * args.amp + ["--compile"] * args.compile \
        + ["--no-train"] * args.no_train
    if args.threads_sweep:
        rows = threads_table(args, [a for a in passthrough if a not in ("--against", args.against)])
        R.atomic_write_text(args.out, json.dumps({"environment": env, "threads": rows}, indent=1))
        print(f"{'condition':<26}{'setting':<42}{'load':>6}{'epoch s':>9}{'eval s':>8}")
        for r in rows:
            print(f"{r['condition']:<26}{r['setting']:<42}{r['load_average']:>6.1f}{r['epoch_seconds']:>9.2f}"
                  f"{r['eval_seconds']:>8.2f}")
        return
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
          f"OMP_WAIT_POLICY={env['omp_wait_policy'] or '(unset)'}, load average "
          f"{env['load_average_at_start'][0]:.1f} at start, {env['load_average_at_end'][0]:.1f} at the end")
    print(table(results))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
