"""Tests for recsetters.py. Run with `make test` (or `.venv/bin/python -m pytest -q`)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats
import torch

import experiments as E
import recsetters as R

HERE = Path(__file__).parent
SHARED = HERE.parent / "shared" / "data"


# ---------------------------------------------------------------------------------------------- helpers

def write_dataset(folder, users, items, inter):
    folder.mkdir(parents=True, exist_ok=True)
    users.to_csv(folder / "users.csv", index=False)
    items.to_csv(folder / "items.csv", index=False)
    inter.to_csv(folder / "interactions.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """A small synthetic dataset from the demo generator (module-scoped: generated once)."""
    root = tmp_path_factory.mktemp("data")
    users, items, inter = R.make_demo(seed=1, n_users=800, n_items=400, n_artists=80, n_countries=10)
    write_dataset(root / "small", users, items, inter)
    return root


def random_interactions(n_users=60, n_items=40, n=700, seed=0, timestamps=True):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"user": [f"u{x}" for x in rng.integers(0, n_users, n)],
                       "item": [f"i{x}" for x in (rng.zipf(1.5, n) % n_items)],
                       "timestamp": rng.integers(1, 50, n).astype(float) if timestamps else np.nan})
    users = pd.DataFrame({"user": sorted(df.user.unique()), "country": ""})
    items = pd.DataFrame({"item": sorted(df.item.unique())})
    for c in ["artist", "track", "tag", "title", "summary", "lyrics"]:
        items[c] = items.item + "-" + c
    return users, items, df


def dataset_from(users, items, inter):
    return R.Dataset("t", users, items, inter.assign(timestamp=inter.timestamp.astype(float)))


# ---------------------------------------------------------------------------------------------- filtering

def test_kcore_reaches_fixed_point():
    _, _, inter = random_interactions(n_users=200, n_items=100, n=1500)
    inter = inter.drop_duplicates(["user", "item"])
    out, rounds = R.kcore(inter, 5)
    assert rounds >= 2 and len(out) > 0
    assert out.user.value_counts().min() >= 5 and out.item.value_counts().min() >= 5
    again, r2 = R.kcore(out, 5)
    assert r2 == 1 and len(again) == len(out)



@pytest.mark.slow
def test_a_dataset_is_read_whole_and_the_demo_written_by_its_one_writer(tmp_path, capsys):
    """Files that disagree (an interaction naming a user or item the other files lack: a torn or foreign write) stop
    train before anything runs, with one line; the demo generator is a dataset writer like collect.py and enrich.py
    (collect.dataset_lock): while another process holds the lock it refuses with one line naming it, after it
    writes."""
    import collect
    users, items, inter = random_interactions()
    write_dataset(tmp_path / "x", users, items, inter.assign(item=inter.item.where(inter.index != 3, "ghost")))
    line = one_error_line(capsys, ["stats", "--dataset", "x", "--data-dir", str(tmp_path)])
    assert "files disagree" in line and "1 of 700 interactions name an item not in items.csv" in line
    write_dataset(tmp_path / "y", users, items, inter)
    (tmp_path / "y" / "items.csv").unlink()
    (tmp_path / "y" / "items.csv").mkdir()
    assert "items.csv: not a file" in one_error_line(capsys, ["stats", "--dataset", "y", "--data-dir", str(tmp_path)])
    holder = subprocess.Popen([sys.executable, "-c", "import collect, sys, time\n"
                               f"with collect.dataset_lock({str(tmp_path / 'data' / 'demo')!r}, 'enrich.py demo'):\n"
                               "    print('held', flush=True); time.sleep(60)"], cwd=Path(R.__file__).parent,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error_line(capsys, ["stats", "--dataset", "demo", "--data-dir", str(tmp_path / "data")])
        assert "enrich.py demo" in line and f"pid {holder.pid}" in line
        assert not (tmp_path / "data" / "demo" / "users.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    R.ensure_demo(tmp_path / "data" / "demo")            # the holder killed: its lock is free
    assert (tmp_path / "data" / "demo" / R.SYNTHETIC_MARK).exists()
    assert not (tmp_path / "data" / "demo" / collect.WRITER_LOCK).exists()

def test_duplicates_keep_latest_and_impossible_timestamps_are_unknown_with_counts():
    inter = pd.DataFrame({"user": ["a", "a", "a", "b", "b", "b", "b", "c"], "item": ["x", "x", "y", "y", "x", "z", "w", "x"],
                          "timestamp": [10.0, 30.0, 0.0, np.nan, -5.0, np.inf, 1e26, -np.inf]})
    users = pd.DataFrame({"user": ["a", "b", "c"], "country": ""})
    items = pd.DataFrame({"item": ["x", "y", "z", "w"], "artist": "A", "track": "T", "tag": "", "title": "T"})
    ds = R.filter_dataset(R.Dataset("t", users, items, inter), min_interactions=1)
    got = ds.inter.set_index(["user", "item"]).timestamp
    assert got[("a", "x")] == 30.0
    assert got.drop(("a", "x")).isna().all()          # 0, empty, negative, infinite, after tomorrow: unknown time
    line = next(line for line in ds.report if "no usable timestamp" in line)
    assert line.strip().startswith("6 interactions") and "2 empty or 0, 1 negative, 2 infinite, 1 after " in line


# ---------------------------------------------------------------------------------------------- split

def test_leave_last_out_holds_out_latest_items():
    users, items, inter = random_interactions(n=1500)
    ds = R.filter_dataset(dataset_from(users, items, inter), min_interactions=3)
    s = R.split_interactions(ds, "last")
    assert s.kind == "last"
    uidx, iidx = pd.Index(ds.users.user), pd.Index(ds.items.item)
    df = ds.inter.assign(u=uidx.get_indexer(ds.inter.user), i=iidx.get_indexer(ds.inter.item))
    eligible = df.groupby("u").size() >= 3
    # exactly one validation and one test item per eligible user
    assert sorted(s.val_u) == sorted(eligible.index[eligible]) == sorted(s.test_u)
    assert len(np.unique(s.val_u)) == len(s.val_u) and len(np.unique(s.test_u)) == len(s.test_u)
    # every interaction lands in exactly one part
    assert len(s.train_u) + len(s.val_u) + len(s.test_u) == len(df)
    t = df.set_index(["u", "i"]).timestamp
    train_max = pd.Series(t[list(zip(s.train_u, s.train_i))].values, index=s.train_u).groupby(level=0).max()
    test_of = dict(zip(s.test_u, s.test_i))
    for u, vi in zip(s.val_u, s.val_i):
        tv, tt = t[(u, vi)], t[(u, test_of[u])]
        assert tv <= tt  # validation before test
        if u in train_max.index:
            assert train_max[u] <= tv  # train before validation
    # deterministic: the same split again
    s2 = R.split_interactions(ds, "last")
    assert np.array_equal(s.test_i, s2.test_i) and np.array_equal(s.val_i, s2.val_i)


def test_random_leave_one_out_without_timestamps_is_seeded():
    users, items, inter = random_interactions(n=1500, timestamps=False)
    ds = R.filter_dataset(dataset_from(users, items, inter), min_interactions=3)
    a, b, c = (R.split_interactions(ds, "auto", seed=s) for s in (0, 0, 1))
    assert a.kind == "random"
    assert np.array_equal(a.test_i, b.test_i) and not np.array_equal(a.test_i, c.test_i)
    assert len(np.unique(a.test_u)) == len(a.test_u) == len(a.val_u)
    with pytest.raises(R.UserError):
        R.split_interactions(ds, "last")


def test_cold_warm_partition_complete_disjoint_deterministic():
    degree = np.array([5, 3, 3, 3, 0, 9, 1, 3, 2, 0])
    warm = R.warm_items(degree, 0.3)
    assert warm.sum() == 3
    assert list(np.flatnonzero(warm)) == [0, 1, 5]        # ties at degree 3: lowest index first
    cold = ~warm
    assert not (warm & cold).any() and (warm | cold).all()
    assert degree[warm].min() >= degree[cold].max()


# ---------------------------------------------------------------------------------------------- sampling

def test_sampler_never_returns_a_train_positive_and_knows_no_held_out_item(small_demo):
    ds = R.filter_dataset(R.load_dataset(small_demo, "small"), 5)
    s = R.split_interactions(ds, "last")
    sampler = R.NegativeSampler(s, seed=3)
    pos = s.train.toarray() > 0
    rng = np.random.default_rng(0)
    for _ in range(50):
        users = rng.integers(0, s.n_users, 256)
        neg = sampler.sample(torch.as_tensor(users), 20).numpy()
        assert neg.shape == (256, 20) and neg.min() >= 0 and neg.max() < s.n_items
        assert not pos[users[:, None], neg].any()
    # seeded: the same negatives again from a sampler with the same seed
    a, b = R.NegativeSampler(s, seed=3), R.NegativeSampler(s, seed=3)
    users = torch.as_tensor(rng.integers(0, s.n_users, 64))
    assert torch.equal(a.sample(users, 5), b.sample(users, 5))
    # held-out items are ordinary negatives in training: excluding them would leak them (see NegativeSampler)
    t = lambda x: torch.tensor(x)
    assert not sampler.is_positive(t(s.test_u), t(s.test_i)).any()
    assert not sampler.is_positive(t(s.val_u), t(s.val_i)).any()
    assert sampler.is_positive(t(s.train_u), t(s.train_i)).all()
    # the train positives of a batch, straight from the CSR on the device
    users = rng.integers(0, s.n_users, 100)
    rows, cols = sampler.positives(torch.as_tensor(users), int(sampler.degree[users].sum()))
    got = np.zeros((100, s.n_items), bool)
    got[rows.numpy(), cols.numpy()] = True
    assert (got == pos[users]).all()


def test_sampler_is_uniform_over_the_users_non_positives():
    """Negatives are uniform over a user's non-positives, validation and test items included: chi-square over
    100,000 draws for a user with many positives (a redraw-free sampler could easily get this wrong)."""
    n_items = 50
    train_i = np.array([0, 1, 2, 7, 8, 20, 21, 22, 23, 49, 3, 30])
    train_u = np.array([1] * 10 + [0, 2])
    s = R.Split(3, n_items, train_u, train_i, np.array([1]), np.array([5]), np.array([1]), np.array([6]))
    neg = R.NegativeSampler(s, seed=0).sample(torch.ones(100_000, dtype=torch.long), 1).numpy().ravel()
    counts = np.bincount(neg, minlength=n_items)
    allowed = np.setdiff1d(np.arange(n_items), train_i[:10])
    assert counts[train_i[:10]].sum() == 0 and counts[5] > 0 and counts[6] > 0
    expected = len(neg) / len(allowed)
    chi2 = ((counts[allowed] - expected) ** 2 / expected).sum()
    assert chi2 < 80          # 39 degrees of freedom: P(chi2 > 80) < 1e-4


# ---------------------------------------------------------------------------------------------- metrics

def test_metrics_hand_computed():
    m = R.metrics(np.array([0]), 10)
    assert m["hr@10"] == 100 and m["ndcg@10"] == pytest.approx(100)
    m = R.metrics(np.array([9]), 10)
    assert m["hr@10"] == 100 and m["ndcg@10"] == pytest.approx(100 / np.log2(11))
    m = R.metrics(np.array([10]), 10)
    assert m["hr@10"] == 0 and m["ndcg@10"] == 0
    m = R.metrics(np.array([0, 9, 10, 500]), 10)
    assert m["hr@10"] == 50 and m["ndcg@10"] == pytest.approx((1 + 1 / np.log2(11)) / 4 * 100)
    assert m["mrr"] == pytest.approx((1 + 1 / 10 + 1 / 11 + 1 / 501) / 4 * 100)


def test_ranking_masks_exclusions_and_breaks_ties_by_index():
    scores = torch.tensor([[5.0, 9.0, 1.0, 5.0, 7.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0]])
    exclude = sp.csr_matrix(np.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32))
    targets = sp.csr_matrix(([1.0, 1.0], [3, 2], [0, 1, 2]), shape=(2, 5))
    r = R.target_ranks(lambda u: scores[u], np.array([0, 1]), targets, {"overall": None}, exclude, "cpu")["overall"]
    # user 0: item 1 excluded; above item 3: item 4 (7), and item 0 (tie, lower index) -> rank 2
    # user 1: all tied; items 0 and 1 come first -> rank 2
    assert list(r) == [2, 2]


def test_evaluator_matches_a_naive_loop_and_masks_validation_at_test_time():
    rng = np.random.default_rng(0)
    n_users, n_items = 50, 30
    S = rng.normal(size=(n_users, n_items)).astype(np.float32)
    train = (rng.random((n_users, n_items)) < 0.2)
    val_i, test_i = np.zeros(n_users, int), np.zeros(n_users, int)
    for u in range(n_users):
        free = np.flatnonzero(~train[u])
        val_i[u], test_i[u] = rng.choice(free, 2, replace=False)
    tu, ti = np.nonzero(train)
    s = R.Split(n_users, n_items, tu, ti, np.arange(n_users), val_i, np.arange(n_users), test_i, kind="random")
    s.train = sp.csr_matrix(train.astype(np.float32))
    s.degree = train.sum(0)
    s.warm = R.warm_items(s.degree, 0.2)
    fn = lambda users: torch.as_tensor(S[users])
    fn.bytes_per_pair = 4 * n_items  # forces many small chunks
    _, ranks = R.evaluate(fn, s, "test", 10, "cpu", memory_mb=0.01, return_ranks=True)
    ranks = ranks["overall"]
    for u in range(n_users):
        cand = [j for j in range(n_items) if not train[u, j] and j != val_i[u]]
        order = sorted(cand, key=lambda j: (-S[u, j], j))
        assert ranks[u] == order.index(test_i[u])


# ---------------------------------------------------------------------------------------------- baselines

def toy_split(n_users=30, n_items=20, density=0.25, seed=0):
    rng = np.random.default_rng(seed)
    X = (rng.random((n_users, n_items)) < density).astype(np.float32)
    u, i = np.nonzero(X)
    s = R.Split(n_users, n_items, u, i, u[:0], i[:0], u[:0], i[:0])
    s.train, s.degree = sp.csr_matrix(X), X.sum(0).astype(np.int64)
    return s, X.astype(np.float64)


@pytest.mark.parametrize("alpha,beta,k", [(1.0, 0.0, None), (0.6, 0.4, None), (0.8, 0.5, 4)])
def test_rp3beta_matches_the_naive_random_walk(alpha, beta, k):
    s, X = toy_split()
    n_users, n_items = X.shape
    W = np.zeros((n_items, n_items))
    for i in range(n_items):                   # item i -> user u -> item j, each step uniform over neighbours
        for j in range(n_items):
            if i != j:
                W[i, j] = sum((X[u, i] / max(X[:, i].sum(), 1)) ** alpha * (X[u, j] / max(X[u].sum(), 1)) ** alpha
                              for u in range(n_users) if X[u, i] and X[u, j]) / max(X[:, j].sum(), 1) ** beta
        if k:                                  # keep the k largest outgoing weights of item i
            W[i, np.argsort(-W[i], kind="stable")[k:]] = 0
    got = R.rp3beta_scores(s, alpha, beta, k)(np.arange(n_users)).numpy()
    assert np.allclose(got, X @ W, atol=1e-5)


def test_baselines_option_selects_a_subset_and_rejects_unknown_names():
    assert R.baseline_names("all") == list(R.BASELINES) and R.baseline_names("none") == []
    assert R.baseline_names("ials, EASE") == ["iALS", "EASE"]
    with pytest.raises(R.UserError, match="--baselines 'EASE,SLIM': all, none, or comma-separated names"):
        R.Config(baselines="EASE,SLIM").validate()
    args = R.parser().parse_args(["train", "--no-baselines"])
    assert R.config_from(args).baselines == "none" and R.parser().parse_args(["train"]).baselines == "all"


def ials_loss(X, U, V, reg, alpha):
    C = 1 + alpha * X
    return float((C * ((X > 0) - U @ V.T) ** 2).sum() + reg * ((U ** 2).sum() + (V ** 2).sum()))


def test_ials_half_step_solves_each_row_exactly_and_the_loss_decreases():
    s, X = toy_split(density=0.3)
    X[X > 0] = np.random.default_rng(1).integers(1, 5, int((X > 0).sum()))     # interaction strengths
    Rm, f, reg, alpha = sp.csr_matrix(X), 6, 0.5, 3.0
    V = torch.randn(X.shape[1], f, dtype=torch.float64)
    U = R.ials_half_step(Rm, V, torch.zeros(X.shape[0], f, dtype=torch.float64), reg, alpha, cg_steps=3 * f)
    Vn = V.numpy()
    for u in range(X.shape[0]):                # dense closed form: (V^T C_u V + reg I) x_u = V^T C_u p_u
        Cu = np.diag(1 + alpha * X[u])
        exact = np.linalg.solve(Vn.T @ Cu @ Vn + reg * np.eye(f), Vn.T @ Cu @ (X[u] > 0))
        assert np.allclose(U[u].numpy(), exact, atol=1e-6)
    losses = [ials_loss(X, *(M.double().numpy() for M in R.ials_fit(Rm, f, reg, alpha, it, seed=0)), reg, alpha)
              for it in (1, 2, 4, 8)]
    assert all(a >= b - 1e-6 for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0]


def test_ials_and_rp3beta_beat_popularity_on_validation(small_demo):
    ds, split = R.prepare(R.Config(dataset="small", data_dir=str(small_demo), seed=0), quiet=True)
    pop = R.evaluate(R.popularity_scores(split), split, "validation", 10, "cpu")["overall"]["ndcg@10"]
    for fn in (R.ials_scores(split, 16, 10.0, 1.0, 8), R.rp3beta_scores(split, 0.8, 0.3, 50)):
        assert R.evaluate(fn, split, "validation", 10, "cpu")["overall"]["ndcg@10"] > pop


# ---------------------------------------------------------------------------------------------- model

def test_dotcompress_five_number_identity_equals_literal_formula():
    torch.manual_seed(0)
    head = R.DotCompress(192, final_gelu=False).double()
    with torch.no_grad():                       # make the bias non-zero so every term is exercised
        head.b.normal_()
    u, v = torch.randn(64, 192, dtype=torch.float64), torch.randn(64, 192, dtype=torch.float64)
    lit = head.literal(u, v)
    assert torch.allclose(head.pairs(u, v), lit, atol=1e-9, rtol=1e-9)
    full = head.all_pairs(u, v)                 # every user against every item
    lit_full = torch.stack([head.literal(u[i].expand(64, -1), v) for i in range(64)])
    assert torch.allclose(full, lit_full, atol=1e-9, rtol=1e-9)
    # each user against its own candidate rows (the margin loss): with a small catalog (one product and a
    # gather) and a large one (gathered rows, a batched product), the same numbers
    inv = torch.randint(0, 64, (64, 7))
    assert torch.allclose(head.pairs_of(u, v, inv), head.pairs(u[:, None], v[inv]), atol=1e-9, rtol=1e-9)
    big = torch.randn(1000, 192, dtype=torch.float64)
    inv = torch.randint(0, 1000, (64, 7))
    assert 1000 > 64 * 7 and torch.allclose(R.dots_of(u, big, inv), (u[:, None] * big[inv]).sum(-1), atol=1e-9)
    assert torch.allclose(R.dots_of(u, big[:400], inv % 400), (u[:, None] * big[inv % 400]).sum(-1), atol=1e-9)
    # float32 too, within float tolerance
    h32 = head.float()
    assert torch.allclose(h32.pairs(u.float(), v.float()), h32.literal(u.float(), v.float()), atol=1e-3, rtol=1e-4)


def test_dotcompress_evaluation_tiles_give_the_float32_reference_ranks():
    """Evaluation scores DotCompress in tiles: CPU-sized (4,096 pairs), GPU-sized (millions; here 50,000, so
    several users per tile and a ragged last tile, on the CPU) or in one piece (the float32 reference). The
    ranks of held-out items are the same whatever the tiling."""
    torch.manual_seed(1)
    head = R.DotCompress(192, final_gelu=True)
    U, V = torch.randn(333, 192), torch.randn(700, 192)
    assert R.eval_tile("cpu") == 4096
    targets = np.random.default_rng(0).integers(0, 700, 333)
    exclude = sp.random(333, 700, density=0.05, format="lil", random_state=0, dtype=np.float32)
    exclude[np.arange(333), targets] = 0
    exclude = exclude.tocsr()
    exclude.eliminate_zeros()
    ranks = {}
    with torch.inference_mode():
        ref = head.all_pairs(U, V, tile=U.shape[0] * V.shape[0])      # one piece: no tiling at all
        for tile in (None, 50_000, 10**9):
            S = head.all_pairs(U, V, tile=tile)
            assert torch.allclose(S, ref, atol=1e-5, rtol=1e-5)
            T = sp.csr_matrix((np.ones(333), targets, np.arange(334)), shape=(333, 700))
            ranks[tile] = R.target_ranks(lambda u: S[u], np.arange(333), T, {"overall": None}, exclude, "cpu")["overall"]
    assert (ranks[None] == ranks[50_000]).all() and (ranks[None] == ranks[10**9]).all()


def test_scoring_every_item_or_the_unique_candidates_gives_the_same_loss(small_demo):
    """A batch's margin and sampled-softmax losses are the same whether the item tower scores every item (large
    batches, no sync) or only the de-duplicated candidates (small batches over a large catalog)."""
    cfg = R.Config(dataset="small", data_dir=str(small_demo), text="none", scorer="dotcompress", dropout=0.0,
                   history=False, normalize=False)
    ds, split = R.prepare(cfg, quiet=True)
    feats = R.build_features(ds, "none")
    torch.manual_seed(0)
    model = R.TwoTower(feats, cfg, split.train).eval()
    sampler = R.NegativeSampler(split, seed=0)
    logq = torch.as_tensor(np.log(np.maximum(split.degree, 1) / len(split.train_u)), dtype=torch.float32)
    idx = np.random.default_rng(0).choice(len(split.train_u), 8, replace=False)
    users, pos = torch.as_tensor(split.train_u[idx]), torch.as_tensor(split.train_i[idx])
    neg = sampler.sample(users, 5)
    n_pos = int(sampler.degree[split.train_u[idx]].sum())
    for loss in ("margin", "softmax"):
        cfg.loss, cfg.negatives = loss, 5
        a, b = (R.batch_loss(model, cfg, R.make_batch(cfg, sampler, users, pos, neg, logq, n_pos, every_item=e))
                for e in (True, False))
        assert torch.isfinite(a) and a.item() == pytest.approx(b.item(), rel=1e-5)


def test_history_pooling_leaves_the_target_out_and_preset_original_is_the_study(small_demo):
    cfg = R.Config(dataset="small", data_dir=str(small_demo), text="none", history=True)
    ds, split = R.prepare(cfg, quiet=True)
    model = R.TwoTower(R.build_features(ds, "none"), cfg, split.train)
    users = torch.arange(6)
    rows = [split.train[u].indices for u in range(6)]
    E = model.hist_emb.weight.detach()
    assert torch.allclose(model.history(users), torch.stack([E[r].mean(0) for r in rows]), atol=1e-5)
    drop = torch.as_tensor([r[0] for r in rows])
    assert torch.allclose(model.history(users, drop), torch.stack([E[r[1:]].mean(0) for r in rows]), atol=1e-5)
    c = R.config_from(R.parser("original").parse_args(["train", "--preset", "original"]))
    assert (c.scorer, c.loss, c.negatives, c.tower_act, c.final_gelu, c.lr, c.batch_size, c.dim, c.out_dim,
            c.history, c.normalize, c.user_ids, c.dropout) == ("dotcompress", "margin", 20, True, True, 2e-4, 512,
                                                               96, 192, False, False, True, 0.0)
    assert R.config_from(R.parser("original").parse_args(["train", "--preset", "original", "--lr", "1e-3"])).lr == 1e-3


# ---------------------------------------------------------------------------------------------- end to end

def test_short_training_run_beats_popularity_on_validation(small_demo):
    cfg = R.Config(dataset="small", data_dir=str(small_demo), text="none", scorer="dot", epochs=5, seed=0,
                   patience=5, device="cpu")
    ds, split = R.prepare(cfg, quiet=True)
    feats = R.build_features(ds, "none")
    model, history, timings = R.train_model(cfg, split, feats, R.Runtime(torch.device("cpu")), quiet=True)
    val = R.evaluate(R.model_scores(model, "cpu"), split, "validation", 10, "cpu")
    pop = R.evaluate(R.popularity_scores(split), split, "validation", 10, "cpu")
    assert val["overall"]["ndcg@10"] > pop["overall"]["ndcg@10"]
    # the best checkpoint is the one restored
    best = max(h["validation"]["overall"]["ndcg@10"] for h in history)
    assert val["overall"]["ndcg@10"] == pytest.approx(best)
    # reproducible under the seed
    cfg.epochs = 2
    model2, history2, _ = R.train_model(cfg, split, feats, R.Runtime(torch.device("cpu")), quiet=True)
    assert [h["loss"] for h in history2] == pytest.approx([h["loss"] for h in history[:2]])
    assert [h["lr"] for h in history2] == [cfg.lr, cfg.lr]


@pytest.mark.slow
def test_cli_train_writes_results_and_recommends(small_demo, tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "recsetters.py", "train", "--dataset", "small", "--data-dir", str(small_demo),
           "--text", "title", "--scorer", "dot", "--epochs", "2", "--runs-dir", str(runs), "--run-name", "r", "--device", "cpu"]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert "EASE" in p.stdout and "two-tower" in p.stdout
    assert "it/s" not in p.stderr and "\r" not in p.stderr          # no progress bars in a log (not a terminal)
    res = __import__("json").loads((runs / "r" / "results.json").read_text())
    for part in ("overall", "cold", "warm"):
        assert set(res["test"][part]) >= {"hr@10", "ndcg@10"}
        assert set(res["baselines"]["EASE"]["test"][part]) >= {"hr@10", "ndcg@10"}
    assert len(res["history"]) == 2
    # a second run encodes nothing (cached embeddings)
    p2 = subprocess.run(cmd + ["--run-name", "r2", "--no-baselines"], cwd=HERE, capture_output=True, text=True)
    assert p2.returncode == 0 and "encoding" not in p2.stderr
    user = pd.read_csv(small_demo / "small" / "interactions.csv").user.iloc[0]
    p3 = subprocess.run([sys.executable, "recsetters.py", "recommend", str(runs / "r"), "--user", user, "-k", "5"],
                        cwd=HERE, capture_output=True, text=True)
    assert p3.returncode == 0, p3.stderr
    assert len([line for line in p3.stdout.splitlines() if " — " in line]) == 5


# ---------------------------------------------------------------------------------------------- bad input

def run_cli(*args, cwd=HERE):
    return subprocess.run([sys.executable, str(HERE / "recsetters.py"), *args], cwd=cwd, capture_output=True,
                          text=True)


@pytest.mark.parametrize("breakage, message", [
    ("missing_file", "missing file"),
    ("missing_column", "missing column"),
    ("bad_timestamp", "non-numeric timestamp"),
    ("empty_after_kcore", "empty after"),
])
@pytest.mark.slow
def test_bad_input_gives_one_clear_line(tmp_path, breakage, message):
    users, items, inter = random_interactions(n=400)
    folder = write_dataset(tmp_path / "data" / "bad", users, items, inter)
    extra = []
    if breakage == "missing_file":
        (folder / "items.csv").unlink()
    elif breakage == "missing_column":
        items.drop(columns="artist").to_csv(folder / "items.csv", index=False)
    elif breakage == "bad_timestamp":
        inter.astype({"timestamp": object}).assign(timestamp=lambda d: d.timestamp.where(d.index != 7, "yesterday")
                                                   ).to_csv(folder / "interactions.csv", index=False)
    elif breakage == "empty_after_kcore":
        extra = ["--min-interactions", "500"]
    p = run_cli("train", "--dataset", "bad", "--data-dir", str(tmp_path / "data"), "--text", "none",
                "--runs-dir", str(tmp_path / "runs"), *extra)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    err = p.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_unknown_dataset_and_text_column(tmp_path, small_demo):
    p = run_cli("stats", "--dataset", "nope", "--data-dir", str(tmp_path))
    assert p.returncode == 2 and "no dataset folder" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("train", "--dataset", "small", "--data-dir", str(small_demo), "--text", "nosuch",
                "--runs-dir", str(tmp_path / "runs"))
    assert p.returncode == 2 and "no such column" in p.stderr and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_help_lists_subcommands():
    p = run_cli("--help")
    assert p.returncode == 0
    for cmd in ("train", "evaluate", "baselines", "recommend", "stats"):
        assert cmd in p.stdout


# ---------------------------------------------------------------------------------------------- demo data

def test_demo_is_deterministic_and_study_scale():
    a = R.make_demo(seed=0)
    b = R.make_demo(seed=0)
    for x, y in zip(a, b):
        pd.testing.assert_frame_equal(x, y)
    users, items, inter = a
    assert 2500 <= inter.user.nunique() <= 3000 and users.country.nunique() == 40
    assert 25_000 <= len(inter) <= 40_000 and items.artist.nunique() >= 250
    years = pd.to_datetime(inter.timestamp, unit="s").dt.year
    assert years.max() - years.min() >= 5


# ---------------------------------------------------------------------------------------------- threads

def test_threads_follow_the_cores_other_processes_leave_free(tmp_path):
    assert [R.threads_for(2, x) for x in (0.0, 0.15, 0.3, 1.0, 1.9, 5.0)] == [2, 2, 1, 1, 1, 1]
    assert [R.threads_for(16, x) for x in (0.0, 1.0, 3.5)] == [16, 15, 12]
    stat = tmp_path / "stat"
    free = R.FreeCores(stat=stat)
    assert not free.active                               # nothing to read: torch's default is left alone
    stat.write_text("cpu0 not numbers\n\n")
    assert not R.FreeCores(stat=stat).active             # not the kernel's format: the same, no traceback
    cpus = sorted(os.sched_getaffinity(0))
    stat.write_text("cpu  1 2 3 4 5 6 7 8 0 0\n" + "".join(f"cpu{c} 0 0 0 1000 0 0 0 0 0 0\n" for c in cpus))
    free, before = R.FreeCores(stat=stat), torch.get_num_threads()
    try:
        assert free.active and free.last[1] == 0.0
        # one second later another process has used one whole core (user ticks of the first CPU, 100 per second);
        # the busy column of a CPU outside the affinity set would not count
        t, _, own = free.last
        free.last = (t - 1.0, 0.0, own)
        stat.write_text("cpu  1 2 3 4 5 6 7 8 0 0\n" + "".join(
            f"cpu{c} {free.tick if c == cpus[0] else 0} 0 0 1000 0 0 0 0 0 0\n" for c in cpus) +
            f"cpu{max(cpus) + 1} {50 * free.tick} 0 0 0 0 0 0 0 0 0\n")
        free()
        assert torch.get_num_threads() == max(1, len(cpus) - 1)
        free()                                            # within a second of the last check: nothing read
        assert free.wait == free.every and torch.get_num_threads() == max(1, len(cpus) - 1)
    finally:
        torch.set_num_threads(before)


def test_a_saved_run_restored_on_the_cpu_takes_the_threads_other_processes_left_free(tiny_run, monkeypatch):
    """recommend, evaluate, browse, export and fairness have no --threads: restore sets torch's thread count once,
    after loading, by --threads 0's rule (FreeCores over the loading time); free_cores=False (bench.py with a fixed
    count) leaves it alone."""
    calls = []

    class Watch:
        def __init__(self, first=0.25):
            calls.append(("made", first))

        def __call__(self):
            calls.append("checked")
            torch.set_num_threads(1)

    before = torch.get_num_threads()
    monkeypatch.setattr(R, "FreeCores", Watch)
    try:
        torch.set_num_threads(2)
        R.restore(str(tiny_run[1]), device_name="cpu")
        assert calls == [("made", 0.0), "checked"] and torch.get_num_threads() == 1
        calls.clear()
        torch.set_num_threads(2)
        R.restore(str(tiny_run[1]), device_name="cpu", free_cores=False)
        assert calls == [] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- distributed

@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(small_demo, tmp_path):
    """torchrun with 2 CPU (gloo) ranks, each computing its half of every global batch, gives the losses and
    validation metrics of a single process with the same global batch (up to float noise)."""
    import json
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["train", "--dataset", "small", "--data-dir", str(small_demo), "--text", "none", "--scorer",
              "dotcompress", "--loss", "margin", "--dropout", "0", "--epochs", "2", "--batch-size", "256",
              "--no-baselines", "--device", "cpu",
              "--runs-dir", str(tmp_path), "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "recsetters.py", *common, "--run-name", "one"], cwd=HERE,
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={port}", "recsetters.py", *common,
                          "--run-name", "two"], cwd=HERE, capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[:3000] + " ... " + two.stderr[-1500:]     # the root cause is near the top
    a, b = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("one", "two"))
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert len(a["history"]) == len(b["history"]) == 2
    for x, y in zip(a["history"], b["history"]):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
        for m in ("hr@10", "ndcg@10"):
            assert y["validation"]["overall"][m] == pytest.approx(x["validation"]["overall"][m], abs=0.5)
    assert b["test"]["overall"]["ndcg@10"] == pytest.approx(a["test"]["overall"]["ndcg@10"], abs=0.5)


def test_experiments_reuse_a_run_only_under_the_same_resolved_config(tmp_path):
    """experiments.py skips a finished cell only when its stored config is what the flags resolve to today."""
    import json
    want = E.train_config("hetrec", 0, "data", ["--text", "none"])
    assert want["text"] == "none" and want["dim"] == R.Config().dim and "threads" not in want
    run = tmp_path / "run"
    assert not E.ran_with(run, want)
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"config": {**want, "threads": 1, "run_name": "x"}}))
    assert E.ran_with(run, want)
    assert not E.ran_with(run, E.train_config("hetrec", 0, "data", ["--text", "none", "--dim", "96"]))
    assert not E.ran_with(run, E.train_config("hetrec", 1, "data", ["--text", "none"]))
    older = {k: v for k, v in want.items() if k != "ensemble"}      # made before the option existed
    (run / "results.json").write_text(json.dumps({"config": older}))
    assert not E.ran_with(run, want)
    # a retired setting (R.RETIRED): stored at the value kept, the run is today's; at another, it is not
    for value, same in ((0.0, True), (0.3, False)):
        (run / "results.json").write_text(json.dumps({"config": {**want, "history_dropout": value}}))
        assert E.ran_with(run, want) == same


def test_tuning_rows_parse_or_say_at_which_commit_their_retired_setting_is(tmp_path, capsys):
    """Every TUNING row is a valid `train` command line today, unless it sets a retired setting: then `tune` runs
    nothing for it and says in one line at which commit it can be rerun."""
    import experiments as E
    retired = [(label, flags) for label, flags in E.TUNING if E.retired_flag(flags)]
    assert retired and len({label for label, _ in E.TUNING}) == len(E.TUNING)
    for label, flags in E.TUNING:
        if not E.retired_flag(flags):
            E.train_config("hetrec", 0, "data", [*E.TUNE_FIXED, *flags])
    assert E.tune(tmp_path, "data", [0], rows=retired[:1]) is None and not (tmp_path / "tuning.md").exists()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and R.RETIRED_AT in out[0] and retired[0][0] in out[0], out


# ---------------------------------------------------------------------------------------------- configuration

BAD_SETTINGS = [            # (command line, what the one error line must say)
    (["train", "--epochs", "0"], "--epochs 0: an integer >= 1"),
    (["train", "--epochs", "-1"], "--epochs -1: an integer >= 1"),
    (["train", "--lr", "nan"], "--lr nan: a positive finite number"),
    (["train", "--lr", "-1"], "--lr -1.0: a positive finite number"),
    (["train", "--lr", "inf"], "--lr inf: a positive finite number"),
    (["train", "--batch-size", "0"], "--batch-size 0: an integer >= 1"),
    (["train", "--dim", "0"], "--dim 0: an integer >= 1"),
    (["train", "--out-dim", "0"], "--out-dim 0: an integer >= 1"),
    (["train", "-k", "0"], "-k 0: an integer >= 1"),
    (["train", "--warm-fraction", "2"], "--warm-fraction 2.0: a fraction, between 0 and 1"),
    (["train", "--min-interactions", "0"], "--min-interactions 0: an integer >= 1"),
    (["train", "--dropout", "1.5"], "--dropout 1.5: a probability, between 0 and 1"),
    (["train", "--temperature", "0"], "--temperature 0.0: a positive finite number"),
    (["train", "--margin", "nan"], "--margin nan: a finite number >= 0"),
    (["train", "--weight-decay", "-1"], "--weight-decay -1.0: a finite number >= 0"),
    (["train", "--negatives", "-1"], "--negatives -1: an integer >= 0"),
    (["train", "--patience", "0"], "--patience 0: an integer >= 1"),
    (["train", "--seed", "-1"], "--seed -1: an integer between 0 and 2**32 - 1"),
    (["train", "--eval-memory-mb", "0"], "--eval-memory-mb 0: an integer >= 1"),
    (["train", "--threads", "-2"], "--threads -2: an integer >= 0"),
    (["train", "--hidden", "64,x"], "--hidden '64,x': comma-separated layer sizes"),
    (["train", "--scorer", "dotcompress"], "--loss full needs --scorer dot"),
    (["train", "--scorer", "dotcompress", "--loss", "margin", "--out-dim", "191"], "needs an even size"),
    (["train", "--loss", "margin", "--negatives", "0"], "needs at least one negative"),
    (["baselines", "-k", "0"], "-k 0: an integer >= 1"),
    (["stats", "--warm-fraction", "nan"], "--warm-fraction nan: a fraction, between 0 and 1"),
    (["recommend", "somerun", "--user", "u", "-k", "0"], "-k 0: an integer >= 1"),
    (["fairness", "somerun", "--min-users", "0"], "--min-users 0: an integer >= 1"),
    (["fairness", "somerun", "--bootstrap", "0"], "--bootstrap 0: an integer >= 1"),
]


@pytest.mark.parametrize("argv, message", BAD_SETTINGS, ids=[" ".join(a) for a, _ in BAD_SETTINGS])
def test_bad_settings_are_one_error_line_before_anything_is_read_or_written(argv, message, tmp_path, capsys):
    where = ["--data-dir", str(tmp_path / "data")] if argv[0] in ("train", "baselines", "stats") else []
    where += ["--runs-dir", str(tmp_path / "runs")] if argv[0] not in ("baselines", "stats") else []
    with pytest.raises(SystemExit) as e:
        R.main([*argv, *where])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_bad_setting_on_the_real_command_line_has_no_traceback(tmp_path):
    p = run_cli("train", "--lr", "nan", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"))
    assert p.returncode == 2 and p.stderr.strip() == "error: --lr nan: a positive finite number"
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_a_dataset_where_every_hit_is_certain_is_refused(tmp_path):
    """One user and a dozen items at --min-interactions 1: every held-out item is in the top 10 by construction."""
    items = pd.DataFrame({"item": [f"i{j}" for j in range(12)], "artist": "A", "track": "T", "tag": "", "title": "T"})
    write_dataset(tmp_path / "one", pd.DataFrame({"user": ["u"], "country": [""]}), items,
                  pd.DataFrame({"user": "u", "item": items.item, "timestamp": np.arange(1, 13)}))
    with pytest.raises(R.UserError, match="whatever the model"):
        R.prepare(R.Config(dataset="one", data_dir=str(tmp_path), min_interactions=1), quiet=True)


def test_the_parser_is_generated_from_config(monkeypatch, capsys):
    """Every Config field is a flag of the commands it names, with Config's default, shown in --help; a preset is
    an overlay of Config and --help says what it sets."""
    monkeypatch.setenv("COLUMNS", "1000")             # one line per option in --help
    fixed = {"evaluate": ["r"], "recommend": ["r", "--user", "u"], "fairness": ["r"]}
    default = R.Config()
    seen = set()
    for cmd in ("train", "baselines", "stats", "evaluate", "recommend", "fairness"):
        args = vars(R.parser().parse_args([cmd, *fixed.get(cmd, [])]))
        with pytest.raises(SystemExit):
            R.parser().parse_args([cmd, "--help"])
        lines = capsys.readouterr().out.splitlines()
        for f in R.fields(R.Config):
            if cmd not in f.metadata["cmds"]:
                assert f.name not in args
                continue
            seen.add(f.name)
            value = getattr(default, f.name)
            assert args[f.name] == value
            shown = (R.flag(f.name) if value else "--no-" + f.name.replace("_", "-")) if isinstance(value, bool) \
                else repr(value) if isinstance(value, str) else str(value)
            start = [n for n, ln in enumerate(lines) if ln.strip().startswith((R.flag(f.name) + " ", R.flag(f.name) + ","))]
            assert len(start) == 1, (cmd, f.name)
            end = next((n for n in range(start[0] + 1, len(lines)) if lines[n].lstrip().startswith("-")), len(lines))
            entry = " ".join(lines[start[0]:end])        # the option and its help (on the next line when long)
            by = "".join(f"; --split {n}: {R.typed(f.name, p.defaults[f.name]) if isinstance(value, bool) else repr(p.defaults[f.name])}"
                         for n, p in R.PROTOCOLS.items() if f.name in p.defaults)     # and each protocol's, visible
            assert f"(default: {shown}{by})" in entry and f.metadata["help"][:20] in entry, (cmd, f.name, entry)
    assert seen == {f.name for f in R.fields(R.Config)}
    original = R.config_from(R.parser("original").parse_args(["train", "--preset", "original"]))
    assert original == R.Config(**R.PRESETS["original"], preset="original")
    with pytest.raises(SystemExit):
        R.parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "original sets --scorer dotcompress --loss margin" in help_text and "--hidden 128,64" in help_text
    assert "--split new-users sets --fold-in-steps 300 --squared-loss 5.0 --dim 384 --out-dim 384 --ensemble 3 (an " \
           "ensemble: 3 two-towers trained one after another, 3 times the training)" in " ".join(help_text.split())


def test_a_run_starts_by_saying_what_its_protocol_changed_and_how_many_times_it_trains():
    from types import SimpleNamespace
    split = SimpleNamespace(protocol="new-users")
    lines = R.run_cost(R.defaults_for("", "new-users"), split)
    assert lines == ["new-users defaults: --fold-in-steps 300 --squared-loss 5.0 --dim 384 --out-dim 384 --ensemble 3",
                     "--ensemble 3: 3 two-towers trained one after another, each up to --epochs 40 (3 times a single "
                     "model's training)"]
    cfg = R.Config(**{**R.PROTOCOLS["new-users"].defaults, "ensemble": 1, "fold_in_steps": 20})
    assert R.run_cost(cfg, split) == ["new-users defaults: --fold-in-steps 300 --squared-loss 5.0 --dim 384 --out-dim "
                                      "384 --ensemble 3 (given instead: --fold-in-steps 20 --ensemble 1)"]
    assert R.run_cost(R.Config(), SimpleNamespace(protocol="leave-one-out")) == []
    warn = R.idle_options(R.Config(split="last", cold_fraction=0.3))
    assert warn == ["warning: --cold-fraction 0.3 does nothing under leave-one-out (read by cold-items)"]


def test_model_is_built_from_config_alone(small_demo):
    """TwoTower has no defaults of its own: every setting comes from the Config it is given."""
    cfg = R.Config(dataset="small", data_dir=str(small_demo), text="none", hidden="32", dim=16, out_dim=8)
    ds, split = R.prepare(cfg, quiet=True)
    feats = R.build_features(ds, "none")
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}
    model = R.TwoTower(feats, cfg, split.train)
    assert shapes(model)["item_tower.embs.0.weight"] == (split.n_items, 16)
    assert shapes(model)["item_tower.mlp.1.weight"][0] == 32 and isinstance(model.scorer, R.SCORERS["dot"])
    study = R.TwoTower(feats, R.Config(**R.PRESETS["original"]), split.train)
    assert isinstance(study.scorer, R.SCORERS["dotcompress"]) and study.hist_emb is None and study.scale is None
    import inspect
    assert list(inspect.signature(R.TwoTower).parameters) == ["feats", "cfg", "history"]
    assert all(p.default is inspect.Parameter.empty for p in inspect.signature(R.TwoTower).parameters.values())


def test_a_baseline_added_to_the_registry_is_run_and_reported_as_a_baseline(small_demo, tmp_path, monkeypatch):
    """BASELINES is the one list: run_baselines runs a new entry (tuned on its grid), and experiments.py treats it
    as a baseline (never as a model in the paired tests), with K read from the runs (here 5, not 10)."""
    import json


    def noise_scores(split, _, seed):
        g = torch.Generator().manual_seed(seed)
        S = torch.rand(split.n_users, split.n_items, generator=g)
        return lambda users: S[torch.as_tensor(np.array(users))]

    monkeypatch.setitem(R.BASELINES, "Noise", R.Baseline(noise_scores, [1, 2]))
    out = tmp_path / "ablation"
    E.run_baselines_cell("small", "leave-one-out", 0, str(small_demo), out / "runs" / "small-loo-baselines-s0", 5)
    res = json.loads((out / "runs" / "small-loo-baselines-s0" / "results.json").read_text())
    assert set(res["baselines"]) == set(R.BASELINES) and res["baselines"]["Noise"]["params"] in (1, 2)
    assert "hr@5" in res["baselines"]["Noise"]["test"]["overall"]
    scored = {n for n, b in R.BASELINES.items() if not R.why_not(b, "leave-one-out")}
    assert {n for n, r in res["baselines"].items() if "na" in r} == set(R.BASELINES) - scored
    # a two-tower cell, made up from EASE's numbers and ranks (no training needed to test the bookkeeping)
    tt = out / "runs" / "small-loo-none-s0"
    tt.mkdir()
    ease = res["baselines"]["EASE"]
    (tt / "results.json").write_text(json.dumps({"dataset": res["dataset"], "best_epoch": 1, "history": [],
                                                 "protocol": "leave-one-out",
                                                 "config": {"dataset": "small", "seed": 0, "k": 5, "text": "none"},
                                                 "test": ease["test"], "validation": ease["validation"]}))
    z = np.load(out / "runs" / "small-loo-baselines-s0" / "ranks.npz")
    np.savez(tt / "ranks.npz", users=z["users"], counts=z["counts"], items=z["items"], two_tower__overall=z["ease__overall"])
    df, per_user, _ = E.collect(out)
    assert set(df[df.kind == "baseline"].model) == scored and set(df.k) == {5}
    sig = E.significance(df, per_user)
    assert set(sig.model) == {"two-tower, text none"} and set(sig.metric) == {"hr@5", "ndcg@5"}
    assert "Noise" in set(sig.vs) and "Noise" not in set(sig.model)
    lines = E.chosen_lines(E.summary(df), 5, "leave-one-out")
    assert "HR@5" in lines[1]


# The run commands given what a new user might type, against a trained run: each is one `error:` line and exit 2, or
# (expected "ok") a correct answer with exit 0. Placeholders: RUN a leave-one-out run, RUNS its --runs-dir, DATA and
# DS its dataset, USER one of its users, LOVED a loved-tracks file that matches, NONE one that matches nothing, FILE a
# stranger's file, BOARD a path whose .md exists, DIR a stranger's folder, RO a read-only folder, BIG a 6 MB file, BIN random bytes, EMPTY a 0-byte
# file, HEAD a header-only file, COLS a file with other columns, DAMAGED a run with a truncated best.pt.
BAD_INPUTS = [
    ("train --dataset '' --data-dir DATA --runs-dir RUNS", "--dataset '': a name, not empty"),
    ("train --dataset DS --data-dir '' --runs-dir RUNS", "--data-dir '': a name, not empty"),
    ("train --dataset DS --data-dir DATA --text ''", "--text '': a name, not empty"),
    ("train --dataset DS --data-dir DATA --runs-dir ''", "--runs-dir '': a name, not empty"),
    ("train --dataset DS --data-dir DATA --runs-dir /proc/recsetters", "cannot write in /proc"),
    ("train --dataset DS --data-dir DATA --runs-dir FILE", "is a file, not a folder"),
    ("train --dataset DS --data-dir DATA --runs-dir RO/runs", "cannot write in"),
    ("train --dataset DS --data-dir DATA --epochs x", "invalid int value"),
    ("train --dataset DS --data-dir DATA --no-such-flag", "unrecognized arguments"),
    ("train --dataset DS --data-dir DATA --split nope", "invalid choice"),
    ("train --dataset DS --data-dir DATA --baselines Nope", "--baselines 'Nope'"),
    ("baselines --dataset DS --data-dir DATA --trials many", "--trials 'many': auto or an integer >= 0"),
    ("baselines --dataset DS --data-dir DATA --trials 5 --study /nonexistent/folder/s.db", "folder /nonexistent/folder does not exist"),
    ("baselines --dataset DS --data-dir DATA --trials 5 --study DATA", "a folder; name an SQLite file"),
    ("train --dataset DS --data-dir DATA --squared-loss nan", "--squared-loss nan"),
    ("train --dataset DS --data-dir DATA --squared-alpha inf", "--squared-alpha inf"),
    ("train --dataset DS --data-dir DATA --cold-fraction nan", "--cold-fraction nan"),
    ("train --dataset DS --data-dir DATA --new-user-fraction inf", "--new-user-fraction inf"),
    ("train --dataset DS --data-dir DATA --temperature inf", "--temperature inf"),
    ("train --dataset DS --data-dir DATA --dropout nan", "--dropout nan"),
    ("train --dataset DS --data-dir DATA --preset nope", "invalid choice"),
    ("baselines --dataset DS --data-dir DATA --no-baselines", "no baseline to run"),
    ("baselines --dataset DS --data-dir DATA --baselines none", "no baseline to run"),
    ("baselines --dataset DS --data-dir DATA --baselines iALS,Nope", "--baselines 'iALS,Nope'"),
    ("baselines --dataset nosuch --data-dir DATA", "no dataset folder"),
    ("stats --dataset DS --data-dir DATA --baselines all", "unrecognized arguments: --baselines"),
    ("stats --dataset '' --data-dir DATA", "--dataset '': a name, not empty"),
    ("stats --dataset DS --data-dir DATA --min-interactions -3", "--min-interactions -3"),
    ("evaluate '' --runs-dir RUNS", "the run: empty"),
    ("evaluate nosuch --runs-dir RUNS", "no run 'nosuch'"),
    ("evaluate FILE --runs-dir RUNS", "no run"),
    ("evaluate DAMAGED --runs-dir RUNS", "not a readable RecSetters checkpoint"),
    ("evaluate RUN --runs-dir RUNS --new-item-offset nan", "--new-item-offset nan: a finite number"),
    ("evaluate RUN --runs-dir RUNS --new-item-offset inf", "--new-item-offset inf: a finite number"),
    ("evaluate RUN --runs-dir RUNS --new-item-offset=-inf", "--new-item-offset -inf: a finite number"),
    ("evaluate RUN --runs-dir RUNS --new-item-offset 0.5", "holds out no new items"),
    ("evaluate RUN --runs-dir RUNS --device nope", "invalid choice"),
    ("recommend RUN --runs-dir RUNS", "one of the arguments --user --loved --lastfm-user is required"),
    ("recommend RUN --runs-dir RUNS --user ''", "--user: empty"),
    ("recommend RUN --runs-dir RUNS --lastfm-user ''", "--lastfm-user: empty"),
    ("recommend RUN --runs-dir RUNS --loved ''", "--loved: empty"),
    ("recommend RUN --runs-dir RUNS --loved DIR", "a folder; name a CSV file"),
    ("recommend RUN --runs-dir RUNS --loved /nonexistent/loved.csv", "missing file"),
    ("recommend RUN --runs-dir RUNS --loved BIG", "over the cap of 5 MB"),
    ("recommend RUN --runs-dir RUNS --loved BIN", "--loved"),
    ("recommend RUN --runs-dir RUNS --loved EMPTY", "--loved"),
    ("recommend RUN --runs-dir RUNS --loved HEAD", "no rows"),
    ("recommend RUN --runs-dir RUNS --loved COLS", "needs a column `item`"),
    ("recommend RUN --runs-dir RUNS --loved NONE", "none of the 1 loved tracks"),
    ("recommend RUN --runs-dir RUNS --user nosuchuser", "not in dataset"),
    ("recommend RUN --runs-dir RUNS --user USER -k 0", "-k 0: an integer >= 1"),
    ("recommend RUN --runs-dir RUNS --user USER -k -5", "-k -5: an integer >= 1"),
    ("recommend RUN --runs-dir RUNS --user USER -k many", "invalid int value"),
    ("recommend RUN --runs-dir RUNS --user USER --loved LOVED", "not allowed with argument"),
    ("recommend RUN --runs-dir RUNS --loved LOVED --out /proc/recs.csv", "cannot write in /proc"),
    ("recommend RUN --runs-dir RUNS --loved LOVED --out FILE", "exists; add --overwrite"),
    ("recommend RUN --runs-dir RUNS --loved LOVED --out DIR", "an existing folder"),
    ("recommend RUN --runs-dir RUNS --loved LOVED --out RO/recs.csv", "cannot write in"),
    ("recommend RUN --runs-dir RUNS --loved LOVED --out DIR/recs.txt", "a .csv or .json file"),
    ("recommend RUN --runs-dir RUNS --loved LOVED --per-artist -1", "--per-artist -1"),
    ("recommend RUN --runs-dir RUNS --user USER --show-matches", "--show-matches: only with --loved"),
    ("recommend RUN --runs-dir RUNS --user USER --popular", "--popular: only with --loved"),
    ("recommend RUN --runs-dir RUNS --user USER -k 100000", "ok"),
    ("recommend RUN --runs-dir RUNS --loved LOVED -k 100000", "ok"),
    ("recommend RUN --runs-dir RUNS --user USER -k NEAR", "ok"),
    ("fairness RUN --runs-dir RUNS -k 100000", "-k 100000: the run ranks"),
    ("fairness RUN --runs-dir RUNS -k nan", "invalid int value"),
    ("fairness nosuch --runs-dir RUNS", "no run 'nosuch'"),
    ("fairness '' --runs-dir RUNS", "the run: empty"),
    ("fairness ROUN --runs-dir RUNS", "cannot write in"),
    ("browse RUN --runs-dir RUNS -k 100000", "-k 100000: the run ranks"),
    ("browse RUN --runs-dir RUNS --users nosuchuser", "no user 'nosuchuser'"),
    ("browse RUN --runs-dir RUNS --users 0", "--users 0"),
    ("browse RUN --runs-dir RUNS --out FILE", "exists; add --overwrite"),
    ("browse RUN --runs-dir RUNS --out DIR", "an existing folder"),
    ("browse RUN --runs-dir RUNS --out /proc/b.html", "cannot write in /proc"),
    ("browse RUN --runs-dir RUNS --out RO/b.html", "cannot write in"),
    ("browse RUN --runs-dir RUNS --out RUN/best.pt --overwrite", "a file of run"),
    ("browse '' --runs-dir RUNS", "the run: empty"),
    ("export RUN --runs-dir RUNS --out RUN", "a run folder"),
    ("export RUN --runs-dir RUNS --out DAMAGED --overwrite", "a run folder"),
    ("export RUN --runs-dir RUNS --out DIR", "exists; add --overwrite"),
    ("export RUN --runs-dir RUNS --out FILE", "an existing file, not a folder"),
    ("export RUN --runs-dir RUNS --out /proc/export", "cannot write in /proc"),
    ("export RUN --runs-dir RUNS --out RO/export", "cannot write in"),
    ("export RUN --runs-dir RUNS --out FILE/export", "is a file, not a folder"),
    ("export nosuch --runs-dir RUNS", "no run 'nosuch'"),
    ("compare --runs-dir RUNS", "name the runs to compare"),
    ("compare --runs-dir RUNS --dataset nosuch", "no finished run of dataset 'nosuch'"),
    ("compare RUN --runs-dir RUNS --protocol nope", "invalid choice"),
    ("compare RUN --runs-dir RUNS --out BOARD", "exists; add --overwrite"),
    ("compare RUN --runs-dir RUNS --out /proc/board", "cannot write in /proc"),
    ("compare RUN --runs-dir RUNS --out RO/board", "cannot write in"),
    ("compare nosuch --runs-dir RUNS", "no run 'nosuch'"),
    ("report --out FILE", "an existing file, not a folder"),
    ("report --out DIR", "not an experiments folder"),
    ("report --out /proc/ablation", "cannot write in /proc"),
    ("report --out RUN", "a run folder"),
]


def bad_input_places(tmp_path, data, run):
    """The placeholders of BAD_INPUTS for a run (its folder) trained on data/DATASET."""
    import scipy
    cfg = json.loads((run / "run.json").read_text())
    (tmp_path / "FILE").write_text("someone's file")
    (tmp_path / "board.md").write_text("someone's table")
    (tmp_path / "DIR").mkdir()
    (tmp_path / "DIR" / "theirs.txt").write_text("someone's file")
    (tmp_path / "RO").mkdir()
    items = pd.read_csv(Path(cfg["dataset"]["folder"]) / "items.csv")
    pd.DataFrame({"artist": items.artist[:3], "track": items.track[:3]}).to_csv(tmp_path / "loved.csv", index=False)
    pd.DataFrame({"artist": ["Nobody"], "track": ["Nothing"]}).to_csv(tmp_path / "none.csv", index=False)
    (tmp_path / "big.csv").write_text("artist,track\n" + "A,B\n" * 1_600_000)
    (tmp_path / "bin.csv").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "head.csv").write_text("artist,track\n")
    (tmp_path / "cols.csv").write_text("song,singer\nx,y\n")
    damaged = tmp_path / "runs" / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "best.pt").write_bytes((damaged / "best.pt").read_bytes()[:100])
    roun = tmp_path / "runs" / "readonly"
    shutil.copytree(run, roun)
    return {"RUNS": str(run.parent), "RUN": str(run), "DATA": str(data), "DS": Path(cfg["dataset"]["folder"]).name,
            "USER": cfg["users"][3], "NEAR": str(len(cfg["items"]) - 3), "LOVED": str(tmp_path / "loved.csv"),
            "NONE": str(tmp_path / "none.csv"), "FILE": str(tmp_path / "FILE"), "BOARD": str(tmp_path / "board"), "DIR": str(tmp_path / "DIR"),
            "RO": str(tmp_path / "RO"), "BIG": str(tmp_path / "big.csv"), "BIN": str(tmp_path / "bin.csv"),
            "EMPTY": str(tmp_path / "empty.csv"), "HEAD": str(tmp_path / "head.csv"), "COLS": str(tmp_path / "cols.csv"),
            "DAMAGED": str(damaged), "ROUN": str(roun)}


def bad_input_argv(line, places):
    import shlex
    return [re.sub(r"\b(" + "|".join(sorted(places, key=len, reverse=True)) + r")\b", lambda m: places[m.group(1)], w)
            for w in shlex.split(line)]


@pytest.fixture(scope="module")
def bad_input_world(tiny_run, tmp_path_factory):
    data, run = tiny_run
    root = tmp_path_factory.mktemp("bad")
    places = bad_input_places(root, data, run)
    for p in ("RO", "ROUN"):
        Path(places[p]).chmod(0o555)
    yield places
    for p in ("RO", "ROUN"):
        Path(places[p]).chmod(0o755)


@pytest.mark.parametrize("line, says", BAD_INPUTS, ids=[c for c, _ in BAD_INPUTS])
def test_every_bad_input_to_the_run_commands_is_one_error_line(bad_input_world, line, says, capsys):
    """No traceback, no wrong exit 0: each bad input is one `error:` line and exit 2, before anything is written;
    the "ok" cases (a -k past the catalog) answer with what is left, never a loved item."""
    argv = bad_input_argv(line, bad_input_world)
    main = E.main if argv[0] in ("compare", "report") else R.main
    argv = [*argv, "--device", "cpu"] if argv[0] in R.SAVED else argv
    if says == "ok":
        main(argv)
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith("top ") and len(out) > 1
        assert not any(l.split(". ", 1)[1].split("   ")[0] == l.split("because you loved ")[-1] for l in out[1:])
        return
    assert says in one_error_line(capsys, argv, main)


# ---------------------------------------------------------------------------------------------- paths, run folders

def one_error_line(capsys, argv, main=R.main):
    """Run the command line in-process: it must exit 2 with exactly one `error:` line; returns that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


TINY = ["--text", "none", "--epochs", "1", "--no-baselines", "--device", "cpu"]


def test_runs_are_written_under_runs_dir_and_found_by_name_or_path(tmp_path, monkeypatch, capsys):
    """A dataset given as a path (relative with ../, or absolute) is resolved and reported, and its run goes under
    --runs-dir with a sanitized name, never inside data/; evaluate takes a run name or a run path, never doubled."""
    write_dataset(tmp_path / "data" / "x", *random_interactions(n=1500))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    R.main(["train", "--dataset", "../data/x", *TINY])
    assert f"dataset folder {tmp_path / 'data' / 'x'}" in capsys.readouterr().err
    R.main(["train", "--dataset", str(tmp_path / "data" / "x"), "--run-name", "../../escape/..", *TINY])
    R.main(["train", "--dataset", "x", "--data-dir", "../data", "--run-name", "a/b", "--seed", "1", *TINY])
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "work"]
    names = sorted(p.name for p in (work / "runs").iterdir())
    assert names[:2] == ["a-b", "escape"] and len(names) == 3
    name = names[2]          # DATASET-SPLIT-TEXT-sSEED and a digest of the settings that differ from the defaults
    assert re.fullmatch(r"x-last-none-s0-[0-9a-f]{6}", name), name
    assert {p.name for p in (work / "runs" / "escape").iterdir()} == {"best.pt", "run.json", "results.json",
                                                                      "ranks.npz", "curves.png"}
    capsys.readouterr()
    for run in (name, f"runs/{name}", str(work / "runs" / name)):
        R.main(["evaluate", run, "--device", "cpu"])
        assert f"{name} on x" in capsys.readouterr().out
    line = one_error_line(capsys, ["evaluate", "runs/missing"])
    assert "no run 'runs/missing'" in line and "runs/runs" not in line and "a-b" in line


def test_a_run_is_never_replaced_without_overwrite_and_records_its_provenance(tmp_path, monkeypatch, capsys):
    """Runs that differ in their settings or split get their own folders; the same run again is one error line
    naming the folder and --overwrite, and leaves the first run as it was; results.json says what made it."""
    write_dataset(tmp_path / "data" / "x", *random_interactions(n=1500))
    monkeypatch.chdir(tmp_path)
    args = ["train", "--dataset", "x", *TINY]
    R.main(args)
    (run,) = (tmp_path / "runs").iterdir()
    first = (run / "results.json").read_text()
    prov = json.loads(first)["provenance"]
    assert prov["torch"] == torch.__version__ and prov["numpy"] == np.__version__ and prov["revision"]
    assert {"python", "pandas", "command", "device"} <= set(prov)
    capsys.readouterr()
    line = one_error_line(capsys, args)
    assert run.name in line and "--overwrite" in line and (run / "results.json").read_text() == first
    R.main([*args, "--epochs", "2"])                    # other settings: another folder
    R.main([*args, "--split", "random"])                # another split: another folder
    assert len(list((tmp_path / "runs").iterdir())) == 3
    R.main([*args, "--overwrite"])
    assert len(list((tmp_path / "runs").iterdir())) == 3 and (run / "results.json").read_text() != first


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One trained run (1 epoch, no text) of a small dataset of its own: (data dir, run folder)."""
    root = tmp_path_factory.mktemp("tiny")
    write_dataset(root / "data" / "x", *random_interactions(n=1500))
    R.main(["train", "--dataset", "x", "--data-dir", str(root / "data"), "--runs-dir", str(root / "runs"),
            "--run-name", "r", *TINY])
    return root / "data", root / "runs" / "r"


def test_train_draws_its_curves_with_the_chosen_epoch(tmp_path):
    """curves.png: one point per epoch of loss and validation metric, the chosen epoch marked, epochs on a sane axis
    (a one-epoch run gets the axis 0.5..1.5, not matplotlib's 0.96..1.04)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    captured = {}
    real = plt.Figure.savefig
    plt.Figure.savefig = lambda fig, *a, **kw: (captured.setdefault("fig", fig), real(fig, *a, **kw))[1]
    try:
        split = toy_split()[0]
        split.kind = "last"
        cfg = R.Config(k=10)
        val = lambda x: {"overall": {"ndcg@10": x, "hr@10": 2 * x, "mrr": x}}
        history = [{"epoch": e, "loss": 5 - e, "validation": val(v)} for e, v in [(1, 3.0), (2, 7.0), (3, 6.0)]]
        R.plot_curves(history, 2, split, cfg, tmp_path / "curves.png", "title")
    finally:
        plt.Figure.savefig = real
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loss_ax, val_ax = captured["fig"].axes
    assert "loss" in loss_ax.get_ylabel() and "NDCG@10" in val_ax.get_ylabel() and "×100" in val_ax.get_ylabel()
    assert all(ax.get_xlabel() == "epoch" and ax.get_xlim() == (0.5, 3.5) for ax in (loss_ax, val_ax))
    assert list(val_ax.lines[0].get_ydata()) == [3.0, 7.0, 6.0]
    assert [tuple(line.get_xdata()) for line in val_ax.lines[1:]] == [(2, 2), (2,)]     # the chosen epoch
    assert "chosen epoch 2" in val_ax.get_legend().get_texts()[0].get_text()
    R.plot_curves(history[:1], 1, split, cfg, tmp_path / "one.png", "one epoch")


def damaged_copy(run, tmp_path, name, damage):
    copy = tmp_path / "runs" / name
    import shutil
    shutil.copytree(run, copy)
    damage(copy)
    return copy


class Payload:
    """A pickle that runs code when loaded with weights_only=False."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_damaged_foreign_or_old_run_is_one_line_naming_the_file(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    good = (run / "best.pt").read_bytes()
    info = __import__("json").loads((run / "run.json").read_text())
    marker = tmp_path / "payload-ran"
    other = {k: v[:2] for k, v in torch.load(run / "best.pt", weights_only=True)["state_dict"].items()}
    cases = {
        "truncated": (lambda d: (d / "best.pt").write_bytes(good[:len(good) // 2]), "best.pt: not a readable"),
        "cut-short": (lambda d: (d / "best.pt").write_bytes(good[:100]), "best.pt: not a readable"),
        "random": (lambda d: (d / "best.pt").write_bytes(np.random.default_rng(0).bytes(4096)), "best.pt: not a"),
        "pickle": (lambda d: torch.save({"state_dict": {}, "x": Payload(marker)}, d / "best.pt"), "best.pt: not a"),
        "foreign": (lambda d: torch.save({"state_dict": other, "epoch": 1}, d / "best.pt"), "does not fit the model"),
        "old": (lambda d: (d / "run.json").unlink(), "an older recsetters.py"),
        "no-json": (lambda d: (d / "run.json").write_text("{not json"), "run.json: not a recsetters-run"),
        "unknown-key": (lambda d: (d / "run.json").write_text(__import__("json").dumps(
            {**info, "config": {**info["config"], "wobble": 3}})), "unknown setting(s) wobble"),
        "bad-value": (lambda d: (d / "run.json").write_text(__import__("json").dumps(
            {**info, "config": {**info["config"], "lr": -1}})), "run.json: --lr -1: a positive finite number"),
        "no-checkpoint": (lambda d: (d / "best.pt").unlink(), "no checkpoint"),
    }
    for name, (damage, message) in cases.items():
        d = damaged_copy(run, tmp_path, name, damage)
        line = one_error_line(capsys, ["fairness", str(d), "--device", "cpu"])
        assert message in line and str(d) in line and "retrain" in line, (name, line)
        assert not (d / "fairness.json").exists()
    assert not marker.exists()                  # the pickle's code never ran


def test_an_old_run_with_a_retired_setting_loads_at_the_value_kept_else_names_the_commit(tiny_run, tmp_path,
                                                                                          capsys):
    """run.json of a run made before the RETIRED settings went: at the values kept it loads as before; with
    another value one line says it needs the commit where the setting still is."""
    import json
    _, run = tiny_run
    info = json.loads((run / "run.json").read_text())
    old = damaged_copy(run, tmp_path, "old", lambda d: (d / "run.json").write_text(json.dumps(
        {**info, "config": {**info["config"], **R.RETIRED}})))
    cfg = R.restore(str(old), device_name="cpu", free_cores=False)[0]
    assert not set(R.RETIRED) & set(R.asdict(cfg))
    ema = damaged_copy(run, tmp_path, "ema", lambda d: (d / "run.json").write_text(json.dumps(
        {**info, "config": {**info["config"], **R.RETIRED, "ema": 0.995, "item_bias": True}})))
    line = one_error_line(capsys, ["evaluate", str(ema), "--device", "cpu"])
    assert str(ema) in line and "--item-bias, --ema 0.995: retired" in line and "commit b25c7b3" in line, line


def test_a_run_refuses_a_dataset_changed_after_training(tiny_run, tmp_path, capsys):
    import shutil
    data, run = tiny_run
    shutil.copytree(data, tmp_path / "data")
    run = damaged_copy(run, tmp_path, "r", lambda d: None)
    info = __import__("json").loads((run / "run.json").read_text())
    info["config"]["data_dir"] = str(tmp_path / "data")
    (run / "run.json").write_text(__import__("json").dumps(info))
    R.main(["evaluate", str(run), "--device", "cpu"])         # unchanged: fine
    capsys.readouterr()
    inter = tmp_path / "data" / "x" / "interactions.csv"
    inter.write_text(inter.read_text() + "u1,i1,7\n")
    line = one_error_line(capsys, ["recommend", str(run), "--user", "u1", "--device", "cpu"])
    assert "dataset x has changed since run" in line and str(run) in line and "retrain" in line


# ---------------------------------------------------------------------------------------------- data checks

def test_missing_value_countries_and_header_only_files(tmp_path, capsys):
    users, items, inter = random_interactions(n=400)
    users["country"] = ["NaN", "None", "nan", "null", "", "NULL"] + ["Chile"] * (len(users) - 6)
    write_dataset(tmp_path / "c", users, items, inter)
    ds = R.load_dataset(tmp_path, "c")
    assert set(ds.users.country) == {"", "Chile"}
    assert any(line.startswith("5 users have country 'NULL', 'NaN', 'None', 'nan', 'null': unknown") for line in ds.report)
    write_dataset(tmp_path / "h", users, items, inter.iloc[:0])
    line = one_error_line(capsys, ["stats", "--dataset", "h", "--data-dir", str(tmp_path)])
    assert line == f"error: no interactions in {tmp_path / 'h' / 'interactions.csv'} (only its header)"
    line = one_error_line(capsys, ["stats", "--dataset", "apple", "--data-dir", str(tmp_path)])
    assert "LASTFM_API_KEY" in line and R.LASTFM_KEY_URL in line and "SOURCE=hetrec" in line


def test_atomic_write_keeps_the_mode_and_leaves_no_temp_file(tmp_path):
    f = tmp_path / "a.json"
    R.atomic_write_text(f, "1")
    mask = os.umask(0)
    os.umask(mask)
    assert (f.stat().st_mode & 0o777) == 0o666 & ~mask
    f.chmod(0o640)
    R.atomic_write_text(f, "2")
    assert f.read_text() == "2" and (f.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# ---------------------------------------------------------------------------------------------- cold-items protocol

def cold_split(small_demo, seed=0, fraction=0.2):
    cfg = R.Config(dataset="small", data_dir=str(small_demo), split="cold-items", cold_fraction=fraction, seed=seed)
    return R.prepare(cfg, quiet=True)


def test_cold_items_split_holds_out_items_with_all_their_interactions(small_demo):
    ds, s = cold_split(small_demo)
    n_cold = round(0.2 * s.n_items)
    assert len(s.parts["val_items"]) == n_cold // 2 and len(s.parts["val_items"]) + len(s.parts["test_items"]) == n_cold
    assert not np.intersect1d(s.parts["val_items"], s.parts["test_items"]).size
    cold = np.union1d(s.parts["val_items"], s.parts["test_items"])
    assert (s.degree[cold] == 0).all() and (s.degree[np.setdiff1d(np.arange(s.n_items), cold)] > 0).all()
    assert np.isin(s.val_i, s.parts["val_items"]).all() and np.isin(s.test_i, s.parts["test_items"]).all()
    # every interaction lands in exactly one part
    assert len(s.train_u) + len(s.val_u) + len(s.test_u) == len(ds.inter)
    st = R.split_stats(s)["parts"]
    assert st["test"] == {"users": len(np.unique(s.test_u)), "items": len(s.parts["test_items"]),
                               "interactions": len(s.test_u)}
    _, s2 = cold_split(small_demo)
    _, s3 = cold_split(small_demo, seed=1)
    assert (s2.parts["test_items"] == s.parts["test_items"]).all() and not np.array_equal(s3.parts["test_items"], s.parts["test_items"])
    with pytest.raises(R.UserError, match="cold-fraction"):
        cold_split(small_demo, fraction=1.5)


def naive_cold_metrics(S, users, targets, cand, exclude, k):
    """Per-user Recall/NDCG/HR@k by an explicit sort of each user's candidates (ties by item index)."""
    out = {"recall": [], "ndcg": [], "hr": []}
    for u in users:
        items = [j for j in cand if not exclude[u, j]]
        top = sorted(items, key=lambda j: (-S[u, j], j))[:k]
        t = set(targets[u])
        hits = [p for p, j in enumerate(top) if j in t]
        ideal = sum(1 / np.log2(p + 2) for p in range(min(len(t), k)))
        out["recall"].append(len(hits) / len(t) * 100)
        out["ndcg"].append(sum(1 / np.log2(p + 2) for p in hits) / ideal * 100)
        out["hr"].append(100.0 * bool(hits))
    return {m: np.mean(v) for m, v in out.items()}


def test_cold_evaluator_matches_a_naive_loop_in_both_views():
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 36
    S = rng.integers(0, 6, size=(n_users, n_items)).astype(np.float32)      # many ties
    items = rng.permutation(n_items)
    val_items, test_items = np.sort(items[:6]), np.sort(items[6:12])
    warm = items[12:]
    train = np.zeros((n_users, n_items), bool)
    for u in range(n_users):
        train[u, rng.choice(warm, 5, replace=False)] = True
    pairs = {part: [(u, j) for u in range(n_users) for j in its if rng.random() < 0.3]
             for part, its in (("val", val_items), ("test", test_items))}
    tu, ti = np.nonzero(train)
    arr = lambda p, c: np.array([x[c] for x in pairs[p]], np.int64)
    s = R.Split(n_users, n_items, tu, ti, arr("val", 0), arr("val", 1), arr("test", 0), arr("test", 1),
                kind="cold-items", parts=dict(val_items=val_items, test_items=test_items),
                catalog=~np.isin(np.arange(n_items), np.r_[val_items, test_items]))
    s.train = sp.csr_matrix(train.astype(np.float32))
    s.degree = train.sum(0)
    fn = lambda users: torch.as_tensor(S[users])
    fn.bytes_per_pair = 4 * n_items          # many small chunks
    res = R.evaluate(fn, s, "test", 10, "cpu", memory_mb=0.01)
    users = np.unique(arr("test", 0))
    targets = {u: [j for v, j in pairs["test"] if v == u] for u in users}
    seen_val = np.zeros_like(train)
    seen_val[arr("val", 0), arr("val", 1)] = True
    for k in (10, 20):
        cold = naive_cold_metrics(S, users, targets, test_items, np.zeros_like(train), k)
        every = naive_cold_metrics(S, users, targets, range(n_items), train | seen_val, k)
        for m in ("recall", "ndcg", "hr"):
            assert res["cold"][f"{m}@{k}"] == pytest.approx(cold[m])
            assert res["all"][f"{m}@{k}"] == pytest.approx(every[m])
    assert res["cold"]["n"] == len(users) and res["cold"]["targets"] == len(pairs["test"])
    # hand-computed: 3 targets, hits at ranks 0 and 4 of K = 10
    m = R.multi_target_metrics(np.array([0, 4, 30]), [3], ks=(10,))
    ideal = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    assert m["recall@10"][0] == pytest.approx(200 / 3) and m["hr@10"][0] == 100
    assert m["ndcg@10"][0] == pytest.approx((1 + 1 / np.log2(6)) / ideal * 100)


def test_unseen_items_are_scored_from_content_alone(small_demo):
    ds, s = cold_split(small_demo)
    feats = R.build_features(ds, "none")
    cold = s.parts["test_items"][:5]
    cfg = R.Config(dataset="small", split="cold-items", text="none", dropout=0.0)
    m = R.TwoTower(feats, cfg, s.train).eval()
    before = m.items(torch.as_tensor(cold))
    with torch.no_grad():
        m.item_tower.embs[0].weight[cold] += 1.0          # the never-trained id rows change: replaced by zero
    assert torch.allclose(before, m.items(torch.as_tensor(cold)))
    # artist/tag known only through train items
    unk = R.unknown_values(s.degree == 0, feats)
    assert (unk[0] == (s.degree == 0)).all()
    assert not unk[1][s.degree > 0].any() and not unk[2][s.degree > 0].any()
    # cold-items training: held-out new items are neither softmax candidates nor sampled negatives
    sampler = R.NegativeSampler(s, 0)
    users = torch.as_tensor(s.train_u[:200].copy())
    assert (s.degree[sampler.sample(users, 20).numpy()] > 0).all()
    rows, cols = sampler.positives(users, int(sampler.degree[s.train_u[:200]].sum()))
    masked = np.zeros((200, s.n_items), bool)
    masked[rows.numpy(), cols.numpy()] = True
    assert masked[:, s.degree == 0].all()        # the full softmax masks every new item for every user


def test_cold_item_tags_drop_the_listeners_own_tagging(small_demo):
    ds, s = cold_split(small_demo)
    item_ids, user_ids = ds.items.item.to_numpy(), ds.users.user.to_numpy()
    c = s.parts["test_items"][0]
    listener = user_ids[s.test_u[s.test_i == c][0]]
    stranger = next(u for u in user_ids if u not in set(user_ids[s.test_u[s.test_i == c]]) | set(user_ids[s.val_u[s.val_i == c]]))
    w = item_ids[s.train_i[0]]
    ta = pd.DataFrame({"user": [listener, listener, stranger, stranger, listener],
                       "item": [item_ids[c], item_ids[c], item_ids[c], w, w],
                       "tag": ["own", "own2", "other", "warmtag", "warmtag2"]})
    ds.items["tags"] = ""
    ds = R.Dataset(ds.name, ds.users, ds.items, ds.inter, tag_assignments=ta)
    clean, rep = R.leak_free_tags(ds, s, "non-listeners")
    row = clean.items.set_index("item")
    assert row.loc[item_ids[c], "tags"] == "other" and row.loc[item_ids[c], "tag"] == "other"
    assert row.loc[w, "tag"] == ds.items.set_index("item").loc[w, "tag"]      # warm items keep theirs
    assert "2 of 3 assignments" in rep[0]
    assert R.leak_free_tags(ds, s, "all")[0] is ds
    # top tags: most applied first, ties by name (collect.py's hetrec import)
    top = R.top_tags(pd.DataFrame({"item": ["a"] * 4, "tag": ["z", "b", "z", "c"], "user": list("1234")}), 2)
    assert top["a"] == ["z", "b"]


def tagged_loo():
    """Three users, four items, a hand-made leave-one-out split (u0's test item a, u1's validation item b) and tag
    assignments: (Dataset, Split)."""
    users = pd.DataFrame({"user": ["u0", "u1", "u2"], "country": ""})
    items = pd.DataFrame({"item": list("abcd"), "artist": list("abcd"), "tag": "imp", "tags": "imp"})
    inter = pd.DataFrame({"user": ["u0", "u0", "u1", "u1", "u2", "u2"], "item": list("acbdcd"), "timestamp": np.nan})
    ta = pd.DataFrame({"user": ["u0", "u0", "u1", "u1", "u0", "u2", "u0"],
                       "item": ["a", "a", "a", "b", "b", "c", "d"],
                       "tag": ["own", "x", "x", "own2", "keep", "c1", "d1"]})
    ds = R.Dataset("t", users, items, inter, tag_assignments=ta)
    s = R.Split(3, 4, np.array([0, 1, 2, 2]), np.array([2, 3, 2, 3]), np.array([1]), np.array([1]), np.array([0]),
                np.array([0]), kind="random")
    return ds, s


def test_leave_one_out_tags_drop_each_held_out_pairs_own_tagging():
    """Leave-one-out's item text: exactly the held-out (user, item) pairs' own assignments are removed (u0's on a,
    u1's on b; another user's tag on a, and u0's on b, stay); only the items that lost one are rebuilt, unless the
    tag count rebuilds all; --tag-source all keeps the leaky text."""
    ds, s = tagged_loo()
    assert R.PROTOCOLS["leave-one-out"].item_text is R.held_pair_tags
    clean, rep = R.leak_free_tags(ds, s)
    assert clean.items.tags.tolist() == ["x", "keep", "imp", "imp"] and clean.items.tag.tolist() == ["x", "keep",
                                                                                                      "imp", "imp"]
    assert "tags of 2 items rebuilt without the 3 of 7 tag assignments" in rep[0]
    every = R.leak_free_tags(ds, s, tag_count="all")[0].items.tags.tolist()
    assert every == ["x", "keep", "c1", "d1"]
    assert R.leak_free_tags(ds, s, "all")[0] is ds
    assert R.leak_free_tags(ds, s, "all", "all")[0].items.tags.tolist() == ["x, own", "keep, own2", "c1", "d1"]


def test_random_tag_count_draws_the_same_number_of_tags_per_item_under_the_seed():
    """--tag-count randomN: N of an item's tags drawn at random (not its N most applied; fewer: all kept), the same
    under the same seed whatever else is rebuilt, most applied first; validated like any setting."""
    rng = np.random.default_rng(0)
    ta = pd.DataFrame({"item": np.repeat([f"i{n}" for n in range(20)], 55), "user": "u",
                       "tag": [f"t{k}" for _ in range(20) for k in range(10) for _ in range(10 - k)]})
    ta = pd.concat([ta, pd.DataFrame({"item": "few", "user": "u", "tag": ["a", "b", "b"]})]).sample(frac=1,
                                                                                                    random_state=1)
    top5 = R.top_tags(ta, 5)
    drawn = R.top_tags(ta, 5, seed=0)
    assert drawn.equals(R.top_tags(ta, 5, seed=0)) and drawn.equals(R.top_tags(ta.iloc[::-1], 5, seed=0))
    assert drawn["few"] == ["b", "a"] and all(len(t) == 5 for i, t in drawn.items() if i != "few")
    assert all(t == sorted(t, key=lambda x: int(x[1:])) for i, t in drawn.items() if i != "few")    # most applied first
    assert any(drawn[i] != top5[i] for i in top5.index) and not drawn.equals(R.top_tags(ta, 5, seed=1))
    alone = R.top_tags(ta[ta.item == "i3"], 5, seed=0)                       # an item's draw ignores the others
    assert alone["i3"] == drawn["i3"]
    # under a protocol: every item rebuilt, N tags at most, drawn with the split's seed
    ds, s = tagged_loo()
    ds = R.Dataset(ds.name, ds.users, ds.items, ds.inter, tag_assignments=ta.assign(item=ta.item.map(
        dict(i0="a", i1="b", i2="c", few="d"))).dropna())
    s.seed = 7
    tags = R.leak_free_tags(ds, s, tag_count="random5")[0].items.tags
    assert tags.str.split(", ").map(len).tolist() == [5, 5, 5, 2]
    assert tags.tolist() == R.leak_free_tags(ds, s, tag_count="random5")[0].items.tags.tolist()
    s.seed = 8
    assert tags.tolist() != R.leak_free_tags(ds, s, tag_count="random5")[0].items.tags.tolist()
    assert R.split_interactions(ds, "random", seed=8).seed == 8
    assert R.tags_kept("random5") == 5 and R.Config(tag_count="random5").validate()
    for bad in ("random", "random0", "randomx", "5random"):
        with pytest.raises(R.UserError, match=f"--tag-count '{bad}': imported, all, a number N >= 1, or randomN"):
            R.Config(tag_count=bad).validate()


def genre_split(seed=0):
    """A cold-items split where content says taste: items carry a genre (dense C, and tags "gG, xN"), users like
    two genres. Returns (split, C, tags)."""
    rng = np.random.default_rng(seed)
    n_users, n_items, G = 300, 400, 8
    genre = rng.integers(0, G, n_items)
    C = np.eye(G)[genre] + 0.3 * rng.normal(size=(n_items, G))
    likes = np.stack([rng.choice(G, 2, replace=False) for _ in range(n_users)])
    X = ((genre[None, :] == likes[:, :1]) | (genre[None, :] == likes[:, 1:])) & (rng.random((n_users, n_items)) < 0.3)
    perm = rng.permutation(n_items)
    val_items, test_items = np.sort(perm[:80]), np.sort(perm[80:160])
    part = np.zeros(n_items, int)
    part[val_items], part[test_items] = 1, 2
    u, i = np.nonzero(X)
    pick = lambda p: (u[part[i] == p], i[part[i] == p])
    s = R.Split(n_users, n_items, *pick(0), *pick(1), *pick(2), kind="cold-items",
                parts=dict(val_items=val_items, test_items=test_items), catalog=part == 0)
    s.train = sp.csr_matrix((np.ones(len(s.train_u), np.float32), (s.train_u, s.train_i)), shape=X.shape)
    s.degree = np.asarray(s.train.sum(0)).ravel()
    tags = pd.Series([f"g{g}, x{rng.integers(0, 50)}" for g in genre])
    return s, C, tags


def test_content_baselines_find_taste_in_content():
    """Items carry a genre in their content; users like two genres: every content baseline beats Random."""
    s, C, tags = genre_split()
    rnd = R.evaluate(R.random_scores(s.n_items), s, "test", 10, "cpu")["cold"]["ndcg@10"]
    for fn in [R.profile_scores(s, C), R.profile_scores(s, R.tag_tfidf(tags)),
               R.cb2cf_scores(s, C, R.collaborative_factors(s, ("svd", 8)), 1.0),
               R.cb2cf_scores(s, C, R.collaborative_factors(s, ("ease", 10.0)), 1.0),
               R.BASELINES["Heater"].make(s, tags, (0.5, 1.0, 0.1))]:
        assert R.evaluate(fn, s, "test", 10, "cpu")["cold"]["ndcg@10"] > 2 * rnd


def test_tag_tfidf_fit_takes_vocabulary_and_idf_from_the_fit_items_only():
    """tag_tfidf(fit=): a tag seen only on other items is dropped, document frequencies count only the fit items;
    fit=None (all items) as before."""
    tags = pd.Series(["a, b", "b", "c, A", "d, a"])
    X = R.tag_tfidf(tags, fit=np.array([True, True, True, False])).toarray()
    assert X.shape == (4, 3)                                            # a, b, c: d is only on the non-fit item
    assert np.allclose(X, [[np.log(3 / 2), np.log(3 / 2), 0], [0, np.log(3 / 2), 0], [np.log(3 / 2), 0, np.log(3)],
                           [np.log(3 / 2), 0, 0]])
    assert np.allclose(R.tag_tfidf(tags, fit=[0, 1, 2]).toarray(), X)
    assert np.allclose(R.tag_tfidf(tags, False, fit=[0, 1, 2]).toarray(), X > 0)
    assert R.tag_tfidf(tags).shape == (4, 4) and np.isclose(R.tag_tfidf(tags)[0, 0], np.log(4 / 3))


def test_tag_count_scores_every_item_by_its_number_of_distinct_tags_for_everyone():
    """TagCount, the content-free control of the new-items protocol: duplicates and case count once, an item without
    tags scores 0, every user gets the same scores; it runs where items are unseen and nowhere else."""
    tags = pd.Series(["rock, Rock, indie", "", "jazz", None, "a, b, c, d"])
    S = R.tag_count_scores(tags)([0, 5, 9])
    assert S.tolist() == [[2.0, 0.0, 1.0, 0.0, 4.0]] * 3
    assert {p for p in R.PROTOCOLS if not R.why_not(R.BASELINES["TagCount"], p)} == \
        {p for p, x in R.PROTOCOLS.items() if x.unseen == "items"}

def test_heater_scores_new_items_by_their_content_map_and_is_seeded():
    """Heater: the same scores under the same seed; two items with the same tags, both without train interactions,
    score the same for every user (the map of their content), while a train item keeps its own factors."""
    s, _, tags = genre_split()
    a, b = s.parts["test_items"][:2]
    w1, w2 = np.flatnonzero(s.degree > 0)[:2]
    tags = tags.copy()
    tags[b], tags[w2] = tags[a], tags[w1]
    users = np.arange(0, s.n_users, 5)
    S1, S2 = R.heater_scores(s, tags, 0.5, 1.0, steps=50)(users), R.heater_scores(s, tags, 0.5, 1.0, steps=50)(users)
    assert torch.equal(S1, S2) and torch.allclose(S1[:, a], S1[:, b])
    assert not torch.allclose(S1[:, w1], S1[:, w2])


def test_a_new_item_offset_moves_the_all_view_and_its_warm_share_not_the_cold_view():
    """evaluate --new-item-offset: new items' scores + c. The cold view ranks only new items: unchanged; the all view
    gives new items more of each top 20 as c grows (Warm@20 falls)."""
    s, C, tags = genre_split()
    fn = R.profile_scores(s, C)
    res = [R.evaluate(R.offset_new_items(fn, s, c), s, "test", 10, "cpu") for c in (0.0, 0.2, 1.0)]
    assert res[0]["cold"] == res[1]["cold"] == res[2]["cold"]
    assert res[0]["all"]["warm@20"] > res[1]["all"]["warm@20"] > res[2]["all"]["warm@20"]
    assert R.offset_new_items(fn, s, 0.0) is fn


def test_warm_share_of_the_all_view_is_the_share_of_train_items_in_each_top_k():
    """cold-items reports warm@20 in the all view: per user, the share of their top 20 (among the items their ranking
    does not exclude) that have train interactions; checked against top_k_lists and a plain count."""
    s, C, tags = genre_split()
    fn = R.profile_scores(s, C)
    for which in ("validation", "test"):
        users = R.held_out(s, which)[0]
        top = R.top_k_lists(fn, users, R.exclusion(s, which), k=20)
        want = (s.degree[top] > 0).mean() * 100
        assert R.evaluate(fn, s, which, 10, "cpu")["all"]["warm@20"] == pytest.approx(want)
        assert 0 < want < 100


@pytest.mark.slow
def test_cli_cold_items_train_writes_the_protocol(small_demo, tmp_path):
    p = run_cli("train", "--dataset", "small", "--data-dir", str(small_demo), "--split", "cold-items", "--text", "none",
                "--epochs", "1", "--runs-dir", str(tmp_path), "--run-name", "c", "--device", "cpu", "--no-baselines")
    assert p.returncode == 0, p.stderr
    res = __import__("json").loads((tmp_path / "c" / "results.json").read_text())
    assert res["protocol"] == "cold-items" and set(res["test"]) == {"cold", "all"}
    assert {"recall@20", "ndcg@20", "hr@10"} <= set(res["test"]["cold"])
    assert "Test, small, cold-items:" in p.stdout
    z = np.load(tmp_path / "c" / "ranks.npz")
    assert len(z["two_tower__cold"]) == z["counts"].sum() == res["test"]["cold"]["targets"]


@pytest.mark.slow
def test_experiments_cold_items_protocol_end_to_end(small_demo, tmp_path):
    """One seed, text none, one epoch, a dataset without text (so no text encoder: fast): the cold-items cells run,
    and the report has the table, n/a rows and the paired test against the best content baseline."""

    root = small_demo
    if not (root / "notext" / "items.csv").exists():
        (root / "notext").mkdir(exist_ok=True)
        for f in ("users.csv", "interactions.csv"):
            (root / "notext" / f).write_text((root / "small" / f).read_text())
        items = pd.read_csv(root / "small" / "items.csv", dtype=str, keep_default_na=False)
        items.assign(title="", summary="", lyrics="").to_csv(root / "notext" / "items.csv", index=False)
    E.main(["ablation", "--datasets", "notext", "--data-dir", str(root), "--texts", "none", "--seeds", "0",
            "--protocols", "cold-items", "--train-args", "--epochs 1 --device cpu", "--out", str(tmp_path),
            "--no-fairness"])
    md = (tmp_path / "report.md").read_text()
    assert "## notext, cold-items" in md and "| Random | 1 |" in md
    assert re.search(r"n/a under cold-items .*: .*EASE", md)
    assert "| two-tower, text none | Random |" in md
    # the leaderboard is experiments.py compare's: every model against the best on validation
    assert "| two-tower, text none | 1 |" in md and "best on validation" in md
    assert (tmp_path / "ablation.png").exists()


def test_fast_dropout_drops_a_share_p_and_keeps_the_mean():
    torch.manual_seed(0)
    d = R.Dropout(0.3).train()
    x = torch.ones(400, 500)
    y = d(x)
    assert abs((y == 0).float().mean().item() - 0.3) < 0.005        # 200,000 draws: ~0.001 standard deviation
    values = torch.unique(y).tolist()            # p is rounded to 1/65,536: the scale is 1 / 0.7 to 5 digits
    assert abs(y.mean().item() - 1.0) < 0.01 and len(values) == 2 and values[0] == 0 and abs(values[1] - 1 / 0.7) < 1e-4
    assert torch.equal(d.eval()(x), x) and torch.equal(R.Dropout(0.0).train()(x), x)
    odd = torch.ones(7, 3, requires_grad=True)                       # a size not divisible by 4
    R.Dropout(0.5).train()(odd).sum().backward()
    assert odd.grad.shape == (7, 3) and set(torch.unique(odd.grad).tolist()) <= {0.0, 2.0}   # 0.5: exact


def test_text_tokens_and_the_bag_leave_out_tokens_no_train_item_has(small_demo):
    ptr, tok = R.text_tokens(["Rock, indie ,rock", "", "Hip hop, rock"], commas=True)
    assert ptr.tolist() == [0, 2, 2, 4] and len(set(tok.tolist())) == 3 and tok[1] == tok[3]   # 'rock' twice
    ptr, tok = R.text_tokens(["Love me, love me!", "me"])
    assert ptr.tolist() == [0, 2, 3]
    ds, s = cold_split(small_demo)
    feats = R.build_features(ds, "lyrics")
    cfg = R.Config(dataset="small", split="cold-items", text="lyrics", text_bag=True, tag_feature=False)
    torch.manual_seed(0)
    m = R.TwoTower(feats, cfg, s.train).eval()
    assert len(m.item_tower.embs) == 2                          # id and artist: --no-tag-feature
    ptr, tok = feats.tokens
    item_of = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    on_train = np.zeros(feats.sizes["tokens"], bool)
    on_train[tok[s.degree[item_of] > 0]] = True
    new_only, cold = np.flatnonzero(~on_train), s.parts["test_items"]
    idx = torch.as_tensor(cold)
    before = m.items(idx)
    with torch.no_grad():
        m.bag.weight[torch.as_tensor(new_only)] += 5.0          # tokens no train item has: never trained
    assert torch.equal(before, m.items(idx))
    with torch.no_grad():
        m.bag.weight[torch.as_tensor(np.flatnonzero(on_train))] += 5.0
    assert not torch.allclose(before, m.items(idx))
    # the bag of an item is the mean of its known tokens' embeddings
    j = int(cold[0])
    known = [t for t in tok[ptr[j]:ptr[j + 1]] if on_train[t]]
    want = m.bag.weight[torch.as_tensor(known)].mean(0) if known else torch.zeros(cfg.dim)
    assert torch.allclose(m.token_bag(torch.as_tensor([j]))[0], want, atol=1e-6)
    # --bag-weights idf: known tokens weighted by log(train items / train items with the token), normalized per item;
    # from the texts of the items training has (a new item's text counts in no weight)
    torch.manual_seed(0)
    mi = R.TwoTower(feats, R.Config(**{**R.asdict(cfg), "bag_weights": "idf"}), s.train).eval()
    seen = s.degree[item_of] > 0                    # document frequencies over the train catalog's items only
    df = np.array([len(set(item_of[(tok == t) & seen])) for t in range(len(on_train))])
    for j in map(int, cold[:20]):
        toks = tok[ptr[j]:ptr[j + 1]]
        w = np.array([on_train[t] * np.log((s.degree > 0).sum() / max(df[t], 1)) for t in toks])
        if w.sum() > 0:
            want = (mi.bag.weight[torch.as_tensor(toks)] * torch.as_tensor(w / w.sum(), dtype=torch.float32)[:, None]).sum(0)
            assert torch.allclose(mi.token_bag(torch.as_tensor([j]))[0], want, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the model contract

@pytest.mark.parametrize("split_kind", [p.splits[0] for p in R.PROTOCOLS.values()])
def test_every_model_keeps_the_contract_under_every_protocol_it_claims(small_demo, split_kind):
    """Each baseline that claims the protocol, and the two-tower: scores of shape (users, items), no train item in a
    top-K list, the same scores twice under one seed, and above Random on the protocol's selection metric
    (SYNTHETIC small demo; content: the artist as a one-hot text vector, the top tag as the tags column)."""
    cfg = R.Config(dataset="small", data_dir=str(small_demo), seed=0, split=split_kind, text="none")
    ds, split = R.prepare(cfg, quiet=True)
    protocol = R.protocol_name(split.kind)
    content = {"": None, "tags": ds.items.tag, "text": np.eye(R.codes(ds.items.artist).max() + 1,
                                                                 dtype=np.float32)[R.codes(ds.items.artist)]}
    users = np.unique(split.test_u)[:50]
    excl = R.exclusion(split, "test")
    rnd = R.selection_score(R.evaluate(R.random_scores(split.n_items, 0), split, "test", 10, "cpu"), split, 10)
    models = {name: (lambda p, b=b: b.make(split, content[b.content], p), b.grid)
              for name, b in R.BASELINES.items() if not R.why_not(b, protocol) and name != "Random"}
    tt = R.Config(**{**R.PROTOCOLS[protocol].defaults, "text": "none", "tag_feature": True, "epochs": 2, "seed": 0})
    feats = R.build_features(ds, "none")
    models["two-tower"] = (lambda p: R.model_scores(R.train_model(tt, split, feats, R.Runtime(torch.device("cpu")),
                                                                  quiet=True)[0], "cpu"), [None])
    assert len(models) >= 3
    for name, (make, grid) in models.items():
        grid = [0 if p == "seed" else p for p in grid]
        res, _ = R.tune(name, make, grid[:3], split, 10, quiet=True)      # the first 3 grid points: fast
        fn = make(res["params"])
        S = np.asarray(torch.as_tensor(fn(users)))
        assert S.shape == (len(users), split.n_items), name
        assert np.array_equal(S, np.asarray(torch.as_tensor(make(res["params"])(users)))), name
        top = R.top_k_lists(fn, users, excl, 10)
        assert not excl[users][np.arange(len(users))[:, None], top].toarray().any(), name
        assert R.selection_score(res["test"], split, 10) > rnd, (name, R.selection_score(res["test"], split, 10), rnd)


@pytest.mark.parametrize("split_kind", [p.splits[0] for p in R.PROTOCOLS.values()])
def test_every_search_space_is_searched_and_its_chosen_point_fits_again_to_the_same_validation(small_demo, split_kind):
    """Each baseline's search space under each protocol it runs in (a few TPE trials on the small demo): every point
    drawn is a valid input of its make, the chosen point lies in the space (an iterative model's step count within
    its most), and fitting once more at the chosen point (as a resumed search does) gives the same validation."""
    cfg = R.Config(dataset="small", data_dir=str(small_demo), seed=0, split=split_kind, text="none")
    ds, split = R.prepare(cfg, quiet=True)
    content = {"": None, "tags": ds.items.tag, "text": np.eye(R.codes(ds.items.artist).max() + 1,
                                                                 dtype=np.float32)[R.codes(ds.items.artist)]}
    searched = 0
    for name, b in R.BASELINES.items():
        if R.why_not(b, split.protocol) or b.space is None:
            continue
        make = lambda p, b=b: b.make(split, content[b.content], {n: v for n, v in p.items() if n != "tag_count"})
        small = b.space
        steps = (b.steps[0], 4, 2) if b.steps else ()       # at most 4 steps, checked every 2: fast
        res, _ = R.tune(name, make, small, split, 10, quiet=True, trials=3, seed=1, steps=steps)
        searched += 1
        p = res["params"]
        assert res["trials"] == min(3, np.prod([len(d.choices) for d in small.values()])) if all(
            d.choices for d in small.values()) else res["trials"] == 3, name
        assert set(res["space"]) == set(small) and res["search"] in ("TPE", "every point"), name
        for n, d in small.items():
            if n in p:
                assert p[n] in d.choices if d.choices else d.low <= p[n] <= d.high, (name, n, p[n])
        if steps:
            assert p[steps[0]] in (2, 4), name
        again = R.evaluate(make(p), split, "validation", 10, "cpu")
        assert R.selection_score(again, split, 10) == pytest.approx(R.selection_score(res["validation"], split, 10),
                                                                    abs=1e-9), name
    assert searched >= 3


def test_two_processes_share_one_study_and_a_finished_search_resumes_without_new_trials(small_demo, tmp_path):
    """Two `baselines --trials 8 --study FILE` processes at once fill one study (8 trials between them, not 16; one
    more where both were running a trial when the 8th ended); a third run finds the search done, adds no trial,
    and fits the study's best point again."""
    import optuna
    args = ["baselines", "--dataset", "small", "--data-dir", str(small_demo), "--baselines", "EASE,ItemKNN",
            "--trials", "8", "--study", str(tmp_path / "study.db"), "--seed", "0"]
    procs = [subprocess.Popen([sys.executable, str(HERE / "recsetters.py"), *args], cwd=HERE, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    url = f"sqlite:///{tmp_path / 'study.db'}"
    studies = lambda: {s.study_name: optuna.load_study(study_name=s.study_name, storage=url)
                       for s in optuna.get_all_study_summaries(url)}
    complete = lambda st: st.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    counts = {n: len(complete(st)) for n, st in studies().items()}
    assert sorted(n.rsplit("/", 1)[1] for n in counts) == ["EASE", "ItemKNN"]
    assert all(8 <= n <= 9 for n in counts.values()), counts
    third = run_cli(*args)
    assert third.returncode == 0, third.stderr
    assert {n: len(complete(st)) for n, st in studies().items()} == counts
    for name, st in studies().items():
        best = max(complete(st), key=lambda t: (t.value, -t.number))
        row = f"{name.rsplit('/', 1)[1]} ({R.point_text(best.user_attrs['point'])})"
        assert any(ln.startswith(row) for ln in third.stdout.splitlines()), (row, third.stdout)


def test_the_contest_searches_freezes_and_confirms_once_on_fresh_seeds(small_demo, tmp_path, capsys):
    """experiments.py search (a few trials) writes each model's chosen point to frozen.json and a search table
    without test columns; confirm runs every model at its frozen point on a fresh seed (the baselines fitted once,
    the two-tower with and without text), writes the leaderboard with the search beside it, and a second confirm
    finds every cell done."""
    out = tmp_path / "contest"
    common = ["--dataset", "small", "--data-dir", str(small_demo), "--protocols", "loo", "--out", str(out)]
    E.main(["search", *common, "--trials", "3", "--seeds", "0", "--train-args", "--epochs 2"])
    frozen = json.loads((out / "frozen.json").read_text())["leave-one-out"]
    texts = {t["text"]: E.text_validation(out, "small", "leave-one-out", t, 0) for t in E.text_points(
        R.load_dataset(str(small_demo), "small"))}
    assert set(texts) == {"title", "summary", "lyrics"} and min(texts.values()) > 0     # each text point trained
    assert frozen["two-tower"] == {"text": max(texts, key=texts.get)}                   # its best on validation
    searched = json.loads((out / "search" / "runs" / "small-leave-one-out-baselines-s0" / "results.json").read_text())
    assert {"EASE", "iALS", "Blend EASE+iALS+RP3beta"} <= set(frozen)
    assert frozen["EASE"] == searched["baselines"]["EASE"]["params"] and searched["baselines"]["EASE"]["trials"] == 3
    table = (out / "search.md").read_text()
    heads = [ln for ln in table.splitlines() if ln.startswith("| model")]
    assert "| EASE | 3 | TPE |" in table and heads and not any("test" in h.lower() for h in heads)
    assert f"| two-tower (single) | 3 | every point | text {frozen['two-tower']['text']} |" in table
    capsys.readouterr()
    E.main(["confirm", *common, "--seeds", "10", "--plan"])                # what it would run and cost; runs nothing
    plan = capsys.readouterr().out
    assert "confirm: 3 cells left" in plan and "leave-one-out  two-tower, no text     1 cells" in plan
    assert "not estimated" not in plan and not (out / "confirm").exists()
    E.main(["confirm", *common, "--seeds", "10", "--train-args", "--epochs 2"])
    res = json.loads((out / "confirm" / "runs" / "small-leave-one-out-baselines-s10" / "results.json").read_text())
    assert res["config"]["seed"] == 10
    for model in ("EASE", "RP3beta", "Blend EASE+iALS+RP3beta"):        # at the frozen point, one fit each
        assert res["baselines"][model]["params"] == frozen[model] and res["baselines"][model]["trials"] == 1
    assert {n: v for n, v in res["baselines"]["iALS"]["params"].items() if n != "iterations"} == \
        {n: v for n, v in frozen["iALS"].items() if n != "iterations"}      # sweeps: early stopping on seed 10
    board = (out / "confirm-leave-one-out.md").read_text()
    assert f"two-tower, text {frozen['two-tower']['text']}" in board and "two-tower, text none" in board
    assert "EASE" in board
    summary = (out / "confirmation.md").read_text()
    assert "### Search, small, leave-one-out, seed 0" in summary and board.splitlines()[0] in summary
    assert "## Where the time went" in summary and "| leave-one-out | two-tower, no text | 1 |" in summary
    capsys.readouterr()
    E.main(["confirm", *common, "--seeds", "10", "--train-args", "--epochs 2"])
    again = capsys.readouterr().out
    assert again.count("skipped (done)") == 3 and "every cell is done" in again


def test_a_contest_matches_ensembles_and_blends_and_starts_from_the_grid(small_demo):
    """In a contest (a search) under new-users with the two-tower an ensemble of 2: iALS is also reported as the
    mean of 2 fits at its chosen point (seeds 0, 1); the blend of EASE, iALS and RP3beta starts from each model alone,
    so its validation is at least the best of theirs; a search's first trials are the grid's points."""
    cfg = R.Config(dataset="small", data_dir=str(small_demo), seed=0, split="new-users", text="none")
    ds, split = R.prepare(cfg, quiet=True)
    res, ranks = R.run_baselines(ds, split, 10, names=["EASE", "iALS", "RP3beta"], quiet=True,
                                 search=R.Search(trials=3, ensemble=2))
    sel = lambda r: R.selection_score(r["validation"], split, 10)
    assert set(res) == {"EASE", "iALS", "RP3beta", "iALS ×2", "Blend EASE+iALS+RP3beta"} and set(ranks) == set(res)
    assert res["EASE"]["params"]["lam"] in [float(v) for v in R.BASELINES["EASE"].grid[:3]]    # the grid's first 3
    assert sel(res["Blend EASE+iALS+RP3beta"]) >= max(sel(res[n]) for n in R.BLEND) - 1e-9
    p = res["iALS"]["params"]
    users = np.arange(0, split.n_users, 5)
    mean = (R.ials_scores(split, **{**p, "seed": 0})(users) + R.ials_scores(split, **{**p, "seed": 1})(users)) / 2
    assert res["iALS ×2"]["params"] == {**p, "members": 2}
    fn = R.ensemble_scores([R.ials_scores(split, **{**p, "seed": s}) for s in (0, 1)])
    assert torch.allclose(fn(users), mean) and res["iALS ×2"]["validation"] == R.evaluate(fn, split, "validation", 10,
                                                                                          "cpu")


def test_a_study_refuses_another_space_and_resumes_over_a_wider_one(small_demo, tmp_path):
    """Trials stored for one space are never mixed with another's: a changed space on the same study is one
    UserError that says to give the search a new study; the same space resumes, and so does a wider one."""
    ds, split = R.prepare(R.Config(dataset="small", data_dir=str(small_demo), seed=0), quiet=True)
    make = lambda p: R.ease_scores(split, **p)
    url, study = f"sqlite:///{tmp_path / 's.db'}", "small/EASE"
    first, _ = R.tune("EASE", make, {"lam": R.Dim(1.0, 1e4, True)}, split, quiet=True, trials=2, storage=url, study=study)
    again, _ = R.tune("EASE", make, {"lam": R.Dim(1.0, 1e4, True)}, split, quiet=True, trials=2, storage=url, study=study)
    assert again["params"] == first["params"] and again["trials"] == 2
    with pytest.raises(R.UserError, match="another search space"):              # narrower: old trials lie outside
        R.tune("EASE", make, {"lam": R.Dim(10.0, 1e4, True)}, split, quiet=True, trials=3, storage=url, study=study)
    with pytest.raises(R.UserError, match="another search space"):              # another scale
        R.tune("EASE", make, {"lam": R.Dim(1.0, 1e4)}, split, quiet=True, trials=3, storage=url, study=study)
    with pytest.raises(R.UserError, match="another search space"):              # another dimension
        R.tune("EASE", make, {"lam": R.Dim(1.0, 1e4, True), "x": R.Dim(0.0, 1.0)}, split, quiet=True, trials=3,
               storage=url, study=study)
    # a wider range keeps the study's trials (each lies inside it) and goes on to the new count
    wider, _ = R.tune("EASE", make, {"lam": R.Dim(0.1, 1e5, True)}, split, quiet=True, trials=3, storage=url,
                      study=study)
    assert wider["trials"] == 3 and wider["space"]["lam"] == {"low": 0.1, "high": 1e5, "log": True}
    import optuna
    st = optuna.load_study(study_name=study, storage=url)
    assert st.user_attrs["widened"][0]["space"]["lam"]["high"] == 1e4


def test_widens_accepts_only_ranges_that_contain_the_old_ones():
    rec = lambda **dims: R.jsonable({"space": R.space_record(dims), "steps": ("epochs", 10, 1)})
    old = rec(n=R.Dim(1, 8), lam=R.Dim(1e-3, 1.0, True), kind=R.Dim(choices=("a", "b")))
    assert R.widens(old, rec(n=R.Dim(1, 16), lam=R.Dim(1e-4, 1.0, True), kind=R.Dim(choices=("a", "b"))))
    assert R.widens(old, old)
    assert not R.widens(old, rec(n=R.Dim(2, 16), lam=R.Dim(1e-4, 1.0, True), kind=R.Dim(choices=("a", "b"))))
    assert not R.widens(old, rec(n=R.Dim(1.0, 16.0), lam=R.Dim(1e-3, 1.0, True), kind=R.Dim(choices=("a", "b"))))
    assert not R.widens(old, rec(n=R.Dim(1, 8), lam=R.Dim(1e-3, 1.0, True), kind=R.Dim(choices=("a", "b", "c"))))
    assert not R.widens(old, {**old, "steps": ["epochs", 20, 1]})


def test_on_edge_names_the_dimensions_chosen_at_an_end_of_their_range():
    space = {"lam": R.Dim(1.0, 1e4, True), "beta": R.Dim(0.0, 1.0), "n": R.Dim(5, 100), "kind": R.Dim(choices=("a", "b"))}
    assert R.on_edge(space, {"lam": 1.1, "beta": 0.5, "n": 100, "kind": "a"}) == ["lam low", "n high"]
    assert R.on_edge(space, {"lam": 100.0, "beta": 0.995}) == ["beta high"]
    assert R.on_edge(space, {"lam": 5000.0, "beta": 0.3, "n": 50}) == []          # 5000: 92% of the way, on a log scale
    assert R.on_edge(space, {"lam": 9000.0}) == ["lam high"]                        # 99%


def test_encode_reproduces_known_users_and_reasons_name_the_item_that_contributes_most(small_demo):
    """encode() with a known user's own country and train history gives that user's vector; the reason for a
    recommendation is the history item whose removal lowers its score most (checked by encoding the user without
    each history item, one at a time)."""
    ds, split = R.prepare(R.Config(dataset="small", data_dir=str(small_demo), seed=0, text="none"), quiet=True)
    cfg = R.Config(text="none", epochs=1, seed=0)
    model = R.train_model(cfg, split, R.build_features(ds, "none"), R.Runtime(torch.device("cpu")), quiet=True)[0]
    model.eval()
    users = np.array([3, 10, 42])
    with torch.no_grad():
        want = model.users(torch.as_tensor(users))
        got = model.encode(model.u_feats[1, users].numpy(), split.train[users], users)
        new = model.encode(model.u_feats[1, users].numpy(), split.train[users])        # ids unknown: same here
    assert torch.allclose(want, got, atol=1e-6) and torch.allclose(want, new, atol=1e-6)   # no --user-ids
    u = 10
    H = split.train[u].indices
    items = np.array([0, 5, 7])
    why, drop = R.reasons(model, int(model.u_feats[1, u]), H, items)
    with torch.no_grad():
        V = model.items(torch.as_tensor(items))
        full = model.scorer.all_pairs(model.encode([int(model.u_feats[1, u])], split.train[[u]]), V)[0]
        for j in range(len(items)):
            drops = [float(full[j] - model.scorer.all_pairs(model.encode(
                [int(model.u_feats[1, u])], sp.csr_matrix(np.isin(np.arange(split.n_items), np.delete(H, h))[None]
                                                          .astype(np.float32))), V)[0, j]) for h in range(len(H))]
            assert why[j] == H[int(np.argmax(drops))] and drop[j] == pytest.approx(max(drops), abs=1e-5)


def test_fold_in_steps_move_a_new_user_towards_their_items_and_leave_trained_users_alone(small_demo):
    """--fold-in-steps: a user the model never trained is encoded, then refined on the likelihood of their items
    anchored to the encoded vector. The refined vector gives their items a higher likelihood, keeps the tower
    output's norm (normalized towers), is the same on every call, and depends on the steps (0: the encoding); a
    dataset user (known) is never refined."""
    ds, split = R.prepare(R.Config(dataset="small", data_dir=str(small_demo), seed=0, text="none"), quiet=True)
    model = R.train_model(R.Config(text="none", epochs=1, seed=0), split, R.build_features(ds, "none"),
                          R.Runtime(torch.device("cpu")), quiet=True)[0].eval()
    users = np.array([3, 10, 42])
    country, H = model.u_feats[1, users].numpy(), split.train[users]
    with torch.no_grad():
        V = model.items(torch.arange(split.n_items))
        U0 = model.encode(country, H)
        model.fold_in_steps = 30
        U1, again = model.encode(country, H), model.encode(country, H)
        known = model.encode(country, H, users)
    X = torch.as_tensor(H.toarray())
    nll = lambda U: -(X * torch.log_softmax(U @ V.T, 1)).sum(1)
    assert (nll(U1) < nll(U0)).all() and torch.equal(U1, again) and not torch.allclose(U0, U1)
    assert torch.allclose(U1.norm(dim=1), U0.norm(dim=1), atol=1e-4)
    assert torch.allclose(known, model.users(torch.as_tensor(users)), atol=1e-6)
    with pytest.raises(R.UserError, match="--fold-in-steps needs --scorer dot"):
        R.Config(fold_in_steps=5, scorer="dotcompress", loss="softmax").validate()


def test_ensemble_scores_by_the_mean_of_members_trained_apart_and_its_first_member_is_the_single_model(small_demo):
    """--ensemble M: member 0 trains exactly as the single model does (same seed, same losses), member 1 from its own
    seed (other losses); the ensemble's scores, for trained users and for users folded in (each member folds in
    itself), are the mean of the members' scores; a saved ensemble is restored whole."""
    cfg = R.Config(dataset="small", data_dir=str(small_demo), text="none", epochs=2, seed=0, fold_in_steps=5,
                   ensemble=2, device="cpu")
    ds, split = R.prepare(cfg, quiet=True)
    feats, rt = R.build_features(ds, "none"), R.Runtime(torch.device("cpu"))
    single, h1, _ = R.train_model(R.Config(**{**R.asdict(cfg), "ensemble": 1}), split, feats, rt, quiet=True)
    ens, h, t = R.train_ensemble(cfg, split, feats, rt, quiet=True)
    assert [e["loss"] for e in h] == pytest.approx([e["loss"] for e in h1])
    assert len(t["members"]) == 2 and t["epochs_run"] == 4
    other = R.train_model(cfg, split, feats, rt, quiet=True, member=1)[1]
    assert [e["loss"] for e in other] != pytest.approx([e["loss"] for e in h1])
    users = np.arange(split.n_users)
    mean = sum(R.model_scores(m, "cpu")(users) for m in ens.members) / 2
    assert torch.allclose(R.model_scores(ens, "cpu")(users), mean, atol=1e-4)
    country, H = ens.u_feats[1, [3, 10]].numpy(), split.train[[3, 10]]
    with torch.no_grad():
        V = [m.items(torch.arange(split.n_items)) for m in ens.members]
        want = sum(m.encode(country, H) @ v.T for m, v in zip(ens.members, V)) / 2
        got = ens.encode(country, H) @ ens.items(torch.arange(split.n_items)).T
    assert torch.allclose(got, want, atol=1e-4)
    with pytest.raises(R.UserError, match="--ensemble needs --scorer dot"):
        R.Config(ensemble=2, scorer="dotcompress", loss="softmax").validate()
    back = R.make_model(feats, cfg, split.train)
    back.load_state_dict(ens.state_dict())
    assert torch.allclose(R.model_scores(back, "cpu")(users), mean, atol=1e-4)


def test_squared_loss_adds_ials_objective_on_the_cosines():
    """--squared-loss B: the full softmax loss plus B times the confidence-weighted mean squared error of every
    item's cosine (score x temperature) to 1 for the user's train positives (the target and the masked others) and
    0 for the rest, confidence 1 + --squared-alpha for a positive; written out per row here."""
    cfg = R.Config(squared_loss=2.0, squared_alpha=3.0, temperature=0.5)
    # unit rows scaled by temperature^-1/2, as normalized towers give: a dot product is cosine / temperature
    unit = lambda n, seed: torch.nn.functional.normalize(
        torch.randn(n, 4, generator=torch.Generator().manual_seed(seed)), dim=1) * 2 ** 0.5

    class Toy:
        scorer = R.DotScorer()
        users = staticmethod(lambda users, drop=None: unit(len(users), 1))
        items = staticmethod(lambda idx: unit(len(idx), 2))

    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, [1, 4]] = mask[1, 5] = True
    batch = {"users": torch.tensor([0, 1]), "pos": torch.tensor([2, 0]), "mask": mask}
    got = R.batch_loss(Toy(), cfg, batch)
    S = Toy().users(torch.arange(2)) @ Toy().items(torch.arange(6)).T
    ce = torch.nn.functional.cross_entropy(S.masked_fill(mask, float("-inf")), batch["pos"])
    sq = 0.0
    for r, positives in enumerate(([1, 2, 4], [0, 5])):
        x = torch.zeros(6)
        x[positives] = 1
        w = 1 + 3.0 * x
        sq += float((w * (x - S[r] * 0.5) ** 2).sum() / w.sum()) / 2
    assert float(got) == pytest.approx(float(ce) + 2.0 * sq, rel=1e-5)
    with pytest.raises(R.UserError, match="--squared-loss needs"):
        R.Config(squared_loss=1.0, loss="softmax").validate()


# ---------------------------------------------------------------------------------------------- new-users protocol

def test_new_users_split_holds_out_users_with_a_fold_in_of_their_earliest_items(small_demo):
    cfg = R.Config(dataset="small", data_dir=str(small_demo), seed=0, split="new-users", text="none")
    ds, s = R.prepare(cfg, quiet=True)
    val, test = np.unique(s.val_u), np.unique(s.test_u)
    held = np.union1d(val, test)
    assert not np.intersect1d(val, test).size and abs(len(held) - round(0.2 * s.n_users)) <= 1
    assert not np.isin(s.train_u, held).any()                       # training never sees a held-out user
    fold_in = s.profile - s.train                                   # what scoring is given beyond train
    fold_in.eliminate_zeros()
    assert (s.folded_users() == np.unique(fold_in.nonzero()[0])).all()
    fu, fi = fold_in.nonzero()
    assert set(np.unique(fu)) <= set(held) and len(fu) + len(s.val_u) + len(s.test_u) + len(s.train_u) == len(ds.inter)
    t = dict(zip(zip(R.pd.Index(ds.users.user).get_indexer(ds.inter.user), R.pd.Index(ds.items.item).get_indexer(ds.inter.item)),
                 ds.inter.timestamp))
    for u in held[:40]:
        fold, tgt = fold_in[u].indices, np.concatenate([s.val_i[s.val_u == u], s.test_i[s.test_u == u]])
        n = len(fold) + len(tgt)
        assert len(tgt) >= 1 and len(fold) == max(1, min(n - 1, int(np.floor(0.8 * n))))
        assert max(t[(u, i)] for i in fold) <= min(t[(u, i)] for i in tgt)          # the earliest 80%
    assert (R.exclusion(s, "test")[held].toarray() >= fold_in[held].toarray()).all()   # fold-in never ranked
    _, s2 = R.prepare(cfg, quiet=True)
    assert np.array_equal(s2.test_u, s.test_u) and np.array_equal(s2.test_i, s.test_i)
    st = R.split_stats(s)["parts"]
    assert st["fold_in_interactions"] == len(fu) and st["test"]["users"] == len(test)
    known = R.positives_matrix(s)              # what recommend and export leave out: the fold-in too
    assert (known[held].toarray() >= fold_in[held].toarray()).all() and set(known.data) == {1.0}


def test_new_users_evaluator_matches_a_naive_loop_with_recall_over_min_k_targets(small_demo):
    ds, s = R.prepare(R.Config(dataset="small", data_dir=str(small_demo), seed=1, split="new-users", text="none"),
                      quiet=True)
    S = np.random.default_rng(0).integers(0, 5, size=(s.n_users, s.n_items)).astype(np.float32)      # many ties
    fn = lambda users: torch.as_tensor(S[users])
    fn.bytes_per_pair = 4 * s.n_items
    res = R.evaluate(fn, s, "test", 10, "cpu", memory_mb=0.05)["all"]
    users = np.unique(s.test_u)
    ex = R.exclusion(s, "test").toarray()
    for k in (10, 20):
        rec, ndcg = [], []
        for u in users:
            order = sorted(np.flatnonzero(~ex[u].astype(bool)), key=lambda j: (-S[u, j], j))[:k]
            tgt = set(s.test_i[s.test_u == u])
            hits = [j in tgt for j in order]
            rec.append(sum(hits) / min(k, len(tgt)))
            ndcg.append(sum(h / np.log2(r + 2) for r, h in enumerate(hits)) / sum(1 / np.log2(r + 2) for r in range(min(k, len(tgt)))))
        assert res[f"recall@{k}"] == pytest.approx(np.mean(rec) * 100) and res[f"ndcg@{k}"] == pytest.approx(np.mean(ndcg) * 100)


def test_ials_folds_in_new_users_by_an_exact_least_squares_solve(small_demo):
    ds, s = R.prepare(R.Config(dataset="small", data_dir=str(small_demo), seed=0, split="new-users", text="none"),
                      quiet=True)
    f, reg, alpha = 16, 10.0, 5.0
    fn = R.ials_scores(s, factors=f, reg=reg, alpha=alpha, iterations=3)
    _, V = R.ials_fit(s.train, f, reg, alpha, 3, 0)
    V = V.double()
    for u in np.unique(s.test_u)[:5]:
        items = s.profile[u].indices          # a new user's profile: their fold-in
        A = V.T @ V + reg * torch.eye(f, dtype=V.dtype) + alpha * V[items].T @ V[items]
        x = torch.linalg.solve(A, (1 + alpha) * V[items].sum(0))
        assert torch.allclose(fn([u])[0].double(), V @ x, atol=1e-3)


def test_multvae_folds_in_new_users_from_their_fold_in_alone_and_is_seeded(small_demo):
    """Mult-VAE under new-users: the same scores under the same seed, a new user's scores a function of their fold-in
    alone (two users with the same fold-in score the same), and better than Popularity on the test users."""
    ds, s = R.prepare(R.Config(dataset="small", data_dir=str(small_demo), seed=0, split="new-users", text="none"),
                      quiet=True)
    users = np.unique(s.test_u)
    assert torch.equal(R.multvae_scores(s, 0.2, 10)(users), R.multvae_scores(s, 0.2, 10)(users))
    fold = s.profile.tolil()
    fold[users[1]] = fold[users[0]]
    s2 = __import__("dataclasses").replace(s, profile=fold.tocsr())
    S = R.multvae_scores(s2, 0.2, 10)(users[:2])
    assert torch.allclose(S[0], S[1])
    fn = R.BASELINES["Mult-VAE"].make(s, None, (0.2, 50))
    pop = R.evaluate(R.popularity_scores(s), s, "test", 10, "cpu")["all"]["ndcg@20"]
    assert R.evaluate(fn, s, "test", 10, "cpu")["all"]["ndcg@20"] > pop


# ---------------------------------------------------------------------------------------------- recommend for anyone

def test_recommend_finds_users_in_any_case_and_answers_for_a_loved_tracks_file(tiny_run, tmp_path, capsys):
    data, run = tiny_run
    users = pd.read_csv(data / "x" / "users.csv").user
    R.main(["recommend", str(run), "--user", users[3].upper(), "-k", "4", "--device", "cpu"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"top 4 for {users[3]} ") and len(out) == 5
    assert all(re.search(r"score -?\d+\.\d{3}   because you loved i\d+-artist — i\d+-track$", line) for line in out[1:])
    line = one_error_line(capsys, ["recommend", str(run), "--user", users[3] + "x", "--device", "cpu"])
    assert "not in dataset x" in line and f"closest: {users[3]}" in line
    loved = tmp_path / "loved.csv"
    items = pd.read_csv(data / "x" / "items.csv")
    pd.DataFrame({"artist": [items.artist[0].upper(), items.artist[1], "Nobody"],
                  "track": [items.track[0], items.track[1], "Nothing"]}).to_csv(loved, index=False)
    R.main(["recommend", str(run), "--loved", str(loved), "-k", "3", "--device", "cpu"])
    out = capsys.readouterr().out.splitlines()
    assert "2 of 3 loved tracks matched to 2" in out[0] and len(out) == 4
    picks = [line.split(". ", 1)[1].split("   ")[0] for line in out[1:]]
    loved_names = {f"{items.artist[j]} — {items.track[j]}" for j in (0, 1)}
    assert not set(picks) & loved_names                                   # what you loved is not recommended
    assert all(line.split("because you loved ")[1] in loved_names for line in out[1:])
    pd.DataFrame({"artist": ["Nobody"], "track": ["Nothing"]}).to_csv(loved, index=False)
    line = one_error_line(capsys, ["recommend", str(run), "--loved", str(loved), "--device", "cpu"])
    assert "none of the 1 loved tracks" in line and "--popular" in line
    R.main(["recommend", str(run), "--loved", str(loved), "--popular", "-k", "2", "--device", "cpu"])
    assert "most popular" in capsys.readouterr().out


def test_recommend_never_gives_back_what_you_loved_reports_each_match_caps_artists_and_saves_the_list(
        tiny_run, tmp_path, capsys):
    """At any -k (up to past the catalog) the loved items never come back and the list stays in score order; every
    line of the file is reported (matched item, or why not); --per-artist caps one artist's items; --out writes the
    list as CSV or JSON."""
    data, run = tiny_run
    items = pd.read_csv(data / "x" / "items.csv")
    loved = tmp_path / "loved.csv"
    pd.DataFrame({"artist": [items.artist[0], items.artist[1], "Nobody", items.artist[0]],
                  "track": [items.track[0], items.track[1], "Nothing", "No such track"]}).to_csv(loved, index=False)
    loved_names = {f"{items.artist[j]} — {items.track[j]}" for j in (0, 1)}
    cfg, ds, split, model, device, _ = R.restore(str(run), device_name="cpu")
    for k in (10, split.n_items - 3, split.n_items, 10 * split.n_items):
        R.main(["recommend", str(run), "--loved", str(loved), "-k", str(k), "--device", "cpu", "--show-matches"])
        cap = capsys.readouterr()
        out = cap.out.splitlines()
        picks = [line.split(". ", 1)[1].split("   ")[0] for line in out[1:]]
        scores = [float(line.split("score ")[1].split()[0]) for line in out[1:]]
        assert len(picks) == min(k, split.n_items - 2) and not set(picks) & loved_names
        assert scores == sorted(scores, reverse=True)
    err = cap.err
    assert f"line 2: {items.artist[0]} — {items.track[0]} -> {items.artist[0]} — {items.track[0]}" in err
    assert "line 4: Nobody — Nothing -> no match: artist not in the run's catalog" in err
    assert "line 5:" in err and "no match: artist known, not this track" in err
    artist = np.arange(split.n_items) % 3                                         # three artists
    top, *_ = R.recommend_items(model, [0, 1], 8, exclude=[0, 1], artist=artist, per_artist=2)
    assert len(top) == 6 and np.bincount(artist[top]).tolist() == [2, 2, 2]
    for suffix in ("csv", "json"):
        R.main(["recommend", str(run), "--loved", str(loved), "-k", "3", "--device", "cpu", "--out",
                str(tmp_path / f"recs.{suffix}")])
        shown = [line.split(". ", 1)[1].split("   ")[0] for line in capsys.readouterr().out.splitlines()[1:]]
        saved = pd.read_csv(tmp_path / "recs.csv") if suffix == "csv" else \
            pd.DataFrame(json.loads((tmp_path / "recs.json").read_text())["recommendations"])
        assert saved.name.tolist() == shown and saved["rank"].tolist() == [1, 2, 3]
        assert set(saved.because) <= loved_names
    line = one_error_line(capsys, ["recommend", str(run), "--loved", str(loved), "--out", str(tmp_path / "recs.csv")])
    assert "--overwrite" in line


def test_recommend_for_a_lastfm_user_through_the_collect_client(tiny_run, tmp_path, monkeypatch, capsys):
    """--lastfm-user fetches user.getLovedTracks from a fake Last.fm on 127.0.0.1 (the real wire format), caches the
    answer (a second call asks nothing) and matches it to the run's catalog; an unknown user is one error line."""
    import http.server
    import json
    import threading
    from urllib.parse import parse_qs, urlparse
    data, run = tiny_run
    items = pd.read_csv(data / "x" / "items.csv")
    asked = []

    class Fake(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            q = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
            asked.append(q)
            if q.get("user") == "ghost":
                body, code = {"error": 6, "message": "User not found"}, 404
            else:
                tracks = [{"name": items.track[j], "artist": {"name": items.artist[j]}, "date": {"uts": "1600000000"}}
                          for j in (2, 5)]
                body, code = {"lovedtracks": {"track": tracks, "@attr": {"page": "1", "totalPages": "1",
                                                                         "total": "2", "user": q["user"]}}}, 200
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("LASTFM_API_KEY", "k" * 32)
        monkeypatch.setenv("LASTFM_BASE_URL", f"http://127.0.0.1:{server.server_port}/2.0/")
        for _ in range(2):
            R.main(["recommend", str(run), "--lastfm-user", "Someone", "-k", "3", "--device", "cpu"])
            out = capsys.readouterr().out.splitlines()
            assert "Last.fm user Someone" in out[0] and "2 of 2 loved tracks matched to 2" in out[0] and len(out) == 4
        assert len(asked) == 1 and asked[0]["method"] == "user.getLovedTracks" and asked[0]["user"] == "Someone"
        line = one_error_line(capsys, ["recommend", str(run), "--lastfm-user", "ghost", "--device", "cpu"])
        assert "ghost" in line and "k" * 32 not in line
    finally:
        server.shutdown()


def test_cb2cf_over_tag_tfidf_is_a_plain_kernel_ridge_onto_ease_columns(small_demo):
    """CB2CF with TF-IDF tag content equals a plain implementation written here (binary TF-IDF, unit rows, ridge from
    content onto EASE's item columns learned on the train items; tag vocabulary and IDF from the train catalog), in
    the primal (few tags) and the dual (more tags than train items) solve, to 1e-6."""
    ds, split = R.prepare(R.Config(dataset="small", data_dir=str(small_demo), seed=0, split="cold-items", text="none"),
                          quiet=True)
    users = np.arange(0, split.n_users, 7)

    def reference(tags, lam, ease_lam=200.0):          # vocabulary and IDF from the train catalog's items only
        lists = [{t.strip().lower() for t in s.split(",") if t.strip()} for s in tags]
        vocab = {t: j for j, t in enumerate(sorted(set().union(*(l for l, c in zip(lists, split.catalog) if c))))}
        X = np.zeros((len(lists), len(vocab)))
        for r, l in enumerate(lists):
            X[r, [vocab[t] for t in l if t in vocab]] = 1
        X *= np.log(split.catalog.sum() / np.maximum(X[split.catalog].sum(0), 1))
        X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-300)
        seen = split.degree > 0
        Rm = split.train[:, seen].toarray()
        P = np.linalg.inv(Rm.T @ Rm + ease_lam * np.eye(seen.sum()))
        B = -P / np.diag(P)[None, :]
        np.fill_diagonal(B, 0)
        Q = B.T
        Qa = X @ np.linalg.solve(X[seen].T @ X[seen] + lam * np.eye(X.shape[1]), X[seen].T @ Q)
        Qa[seen] = Q
        return Rm[users] @ Qa.T

    few = (ds.items.tag + ", " + ds.items.artist).tolist()
    many = (ds.items.tag + ", " + ds.items.artist + ", " + ds.items.item).tolist()     # more tags than train items
    assert len(set(many)) > (split.degree > 0).sum()
    for tags in (few, many):
        for lam in (0.1, 10.0):
            fn = R.BASELINES["CB2CF TF-IDF"].make(split, pd.Series(tags), (("ease", 200.0), lam))
            assert np.allclose(fn(users).numpy(), reference(tags, lam), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- compare, browse, export

@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory):
    """Two seeds of a short run with two baselines on one dataset, and a run on another dataset: (root, runs dir)."""
    root = tmp_path_factory.mktemp("compare")
    write_dataset(root / "data" / "x", *random_interactions(n_users=120, n_items=60, n=2500))
    write_dataset(root / "data" / "y", *random_interactions(n_users=120, n_items=60, n=2500, seed=1))
    common = ["--data-dir", str(root / "data"), "--runs-dir", str(root / "runs"), "--text", "none", "--epochs", "2",
              "--device", "cpu", "--baselines", "Popularity,EASE", "--threads", "1"]
    for seed in (0, 1):
        R.main(["train", "--dataset", "x", "--seed", str(seed), *common])
    R.main(["train", "--dataset", "y", *common])
    return root, root / "runs"


def test_compare_is_one_leaderboard_over_seeds_with_paired_tests_against_the_best(seed_runs, capsys):
    root, runs = seed_runs
    capsys.readouterr()
    out = root / "tables" / "x"
    E.main(["compare", "--dataset", "x", "--runs-dir", str(runs), "--out", str(out)])
    printed = capsys.readouterr().out
    res = [json.loads((d / "results.json").read_text()) for d in sorted(runs.glob("x-*"))]
    assert [r["config"]["seed"] for r in res] == [0, 1]
    models = {"two-tower, text none, --epochs 2": [r["test"] for r in res],
              "EASE": [r["baselines"]["EASE"]["test"] for r in res],
              "Popularity": [r["baselines"]["Popularity"]["test"] for r in res]}
    val = {"two-tower, text none, --epochs 2": np.mean([r["validation"]["overall"]["ndcg@10"] for r in res]),
           **{b: np.mean([r["baselines"][b]["validation"]["overall"]["ndcg@10"] for r in res]) for b in ("EASE", "Popularity")}}
    best = max(val, key=val.get)
    md = (root / "tables" / "x.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in md.splitlines() if line.startswith("| ")
            and not line.startswith("| model")}
    assert set(rows) == set(models) and md.index(f"| {best} |") < min(md.index(f"| {m} |") for m in models if m != best)
    for m, tests in models.items():         # mean ± std (sample std) over the two seeds, every column
        x = [t["overall"]["hr@10"] for t in tests]
        assert rows[m][1] == "2" and rows[m][3].strip("*") == f"{np.mean(x):.2f} ± {np.std(x, ddof=1):.2f}"
        assert f"| {m} |" in printed
    # the paired tests against the best, by hand from ranks.npz: per user over both seeds, a user's seeds one cluster
    # (the same users recur), Holm over the table's 4 tests; 2 seeds are too few for the seed-level test
    zs = [np.load(d / "ranks.npz") for d in sorted(runs.glob("x-*"))]
    users = np.concatenate([z["users"] for z in zs])
    assert len(np.unique(users)) < len(users)
    key = lambda m: "two_tower" if m.startswith("two-tower") else m.lower()
    per = lambda m, metric: np.concatenate([R.per_user_metrics(z[f"{key(m)}__overall"])[metric] * 100 for z in zs])
    others = [m for m in models if m != best]
    tests = [E.cluster_bootstrap(per(m, metric) - per(best, metric), np.ones(len(users)), users)
             for m in others for metric in ("hr@10", "ndcg@10")]
    assert all(t["users"] == len(np.unique(users)) and t["items"] == 0 for t in tests)
    for t, p in zip(tests, E.holm([t["p"] for t in tests])):
        t["p_holm"] = p
    for j, m in enumerate(others):
        for t, cells in zip(tests[2 * j:2 * j + 2], (rows[m][-4:-2], rows[m][-2:])):
            assert [c.strip(" |") for c in cells] == [f"{t['diff']:+.2f} [{t['lo']:+.2f}, {t['hi']:+.2f}]",
                                                      f"{E.pvalue(t['p_holm'])} (seeds –)"]
    assert "Holm-adjusted over the table's 4 comparisons" in md and "user-seed pairs" in md
    assert rows[best][-2] == "best on validation"
    tex = (root / "tables" / "x.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "leave-one-out" in tex
    assert "\\caption{" in tex and tex.count(" \\\\\n") == 1 + len(models) and "EASE" in tex
    # the runs of another dataset, or another protocol, are refused with one line that says which differ
    line = one_error_line(capsys, ["compare", "--runs-dir", str(runs), *[str(d) for d in sorted(runs.glob("[xy]-*"))]],
                          E.main)
    assert "differ in dataset" in line and "digest" in line and "(y-" in line
    R.main(["train", "--dataset", "x", "--split", "cold-items", "--data-dir", str(root / "data"), "--runs-dir",
            str(runs / "cold"), *TINY])
    cold = next((runs / "cold").iterdir())
    capsys.readouterr()
    line = one_error_line(capsys, ["compare", "--runs-dir", str(runs), str(cold), *map(str, sorted(runs.glob("x-*")))],
                          E.main)
    assert "differ in protocol" in line and "cold-items" in line and "leave-one-out" in line
    assert not (root / "tables" / "cold-items.md").exists()


def test_compare_of_a_dataset_is_a_leaderboard_per_protocol_skipping_damaged_runs_with_mrr_and_seed_rows(
        seed_runs, tmp_path, capsys):
    """--dataset without --protocol: one table per protocol found; a damaged run is skipped with a warning line; the
    leave-one-out table has MRR; --per-seed adds a row per model and seed; the same model and seed twice is said."""
    root, runs = seed_runs
    mine = tmp_path / "runs"
    shutil.copytree(runs, mine, ignore=shutil.ignore_patterns("cold", "compare"))
    first = sorted(mine.glob("x-*"))[0]
    shutil.copytree(first, mine / "x-again")                                 # the same model and seed, twice
    shutil.copytree(first, mine / "x-damaged")
    (mine / "x-damaged" / "results.json").write_text("{not json")
    R.main(["train", "--dataset", "x", "--split", "cold-items", "--data-dir", str(root / "data"), "--runs-dir",
            str(mine), *TINY])
    capsys.readouterr()
    E.main(["compare", "--dataset", "x", "--runs-dir", str(mine), "--out", str(tmp_path / "board"), "--per-seed"])
    cap = capsys.readouterr()
    assert f"warning: skipped {mine / 'x-damaged'}" in cap.err
    assert "warning: two-tower, text none, --epochs 2 at seed 0 is in runs" in cap.err and "x-again" in cap.err
    loo, cold = (tmp_path / "board-leave-one-out.md").read_text(), (tmp_path / "board-cold-items.md").read_text()
    assert "MRR overall" in loo and "MRR" not in cold and "cold-items" in cold
    assert "Per seed:" in loo and loo.count("| EASE | ") == 1 + 2                  # its row, and one per seed


def test_leaderboard_tables_format_p_values_and_error_bars_for_a_paper():
    """p < 0.001 is written so, never 0.000; one seed has no ± (no error bar from one value); LaTeX is escaped."""
    rng = np.random.default_rng(0)
    users = np.arange(400)
    good, bad = rng.random(400) < 0.6, rng.random(400) < 0.2
    entry = lambda m, s, hit: {"model": m, "kind": "baseline", "seed": s, "val": hit.mean() * 100,
                               "test": {(v, mm): hit.mean() * 100 for v, mm in (R.column(c, 10) for c in R.LOO_COLUMNS)},
                               "users": users, "per_user": {"overall": {"hr@10": hit * 100.0, "ndcg@10": hit * 50.0}}}
    board = E.leaderboard([entry("A_1 & co", 0, good), entry("B", 0, bad), {"model": "C", "kind": "n/a", "seed": 0}],
                          "leave-one-out", 10)
    assert [r["model"] for r in board["rows"]] == ["A_1 & co", "B"] and board["na"] == ["C"]
    md = "\n".join(E.board_markdown(board))
    assert "< 0.001" in md and "0.000" not in md and "±" not in md and "n/a under leave-one-out" in md and ": C" in md
    tex = "\n".join(E.board_latex(board, "cap 95% x", "t"))
    assert "A\\_1 \\& co" in tex and "$< 0.001$" in tex and "95\\% x" in tex and "\\begin{tabular}{l" in tex
    assert E.pm(1.234, 0.5, 1) == "1.23" and E.pm(1.234, 0.5, 3) == "1.23 ± 0.50"


def test_holm_adjusts_a_family_of_p_values_as_by_hand():
    """Holm: the j-th smallest of m p-values times (m - j + 1), kept monotone, at most 1; no test (None) is left out
    of the family. add_holm adjusts both the clustered and the seed-level p of a table's tests, keeping the raw."""
    # m = 4: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> 0.06 (monotone)
    assert E.holm([0.01, 0.04, 0.03, None, 0.005]) == pytest.approx([0.03, 0.06, 0.06, None, 0.02])
    assert E.holm([0.5, 0.6]) == [1.0, 1.0] and E.holm([0.2]) == [0.2] and E.holm([None]) == [None]
    tests = E.add_holm([{"p": 0.01, "seed_p": 0.2}, {"p": 0.04, "seed_p": None}, {"p": 0.02, "seed_p": 0.01}])
    assert [t["p_holm"] for t in tests] == pytest.approx([0.03, 0.04, 0.04]) and tests[0]["p"] == 0.01
    assert [t["seed_p_holm"] for t in tests] == pytest.approx([0.2, None, 0.02])


def test_user_clusters_widen_the_ci_where_the_same_users_recur_with_correlated_differences():
    """Leave-one-out tests the same users at every seed: a user's differences are alike over seeds, so resampling
    (seed, user) pairs as independent understates the uncertainty; the user-clustered bootstrap does not. Where
    differences are independent the two agree."""
    rng = np.random.default_rng(0)
    n, seeds = 300, 5
    users, ones = np.tile(np.arange(n), seeds), np.ones(n * seeds)
    width = lambda t: t["hi"] - t["lo"]
    alike = np.tile(rng.normal(0, 5, n), seeds) + rng.normal(0, 1, n * seeds)      # a user effect, seed after seed
    clustered, naive = E.cluster_bootstrap(alike, ones, users), E.cluster_bootstrap(alike, ones, np.arange(n * seeds))
    assert clustered["diff"] == naive["diff"] == pytest.approx(alike.mean())
    assert clustered["users"] == n and naive["users"] == n * seeds
    assert width(clustered) > 1.8 * width(naive) and clustered["p"] > naive["p"]
    assert width(clustered) == pytest.approx(2 * 1.96 * alike.reshape(seeds, n).mean(0).std() / np.sqrt(n), rel=0.15)
    apart = rng.normal(0, 5, n * seeds)
    assert 0.8 < width(E.cluster_bootstrap(apart, ones, users)) / width(E.cluster_bootstrap(apart, ones, np.arange(
        n * seeds))) < 1.25


def test_item_clusters_widen_the_ci_when_one_item_dominates():
    """Cold-items holds a sample of items fixed: when one target item carries many users' targets and most of the
    difference, resampling users alone misses how much rides on that item; the two-way (users and items) bootstrap
    does not. With neither a user nor an item effect (pure noise) the two-way bootstrap is conservative by about
    sqrt(3) in width (Owen 2007: it counts the noise three times), the price of never understating."""
    rng = np.random.default_rng(1)
    n_targets = 3000
    users = rng.integers(0, 1000, n_targets)
    items = np.where(rng.random(n_targets) < 0.4, 0, rng.integers(1, 60, n_targets))       # item 0: 40% of targets
    d = np.where(items == 0, 10.0, 0.0) + rng.normal(0, 1, n_targets)
    w = np.ones(n_targets)
    two_way, by_user = E.cluster_bootstrap(d, w, users, items), E.cluster_bootstrap(d, w, users)
    assert two_way["diff"] == by_user["diff"] == pytest.approx(d.mean()) and two_way["items"] == 60
    assert two_way["hi"] - two_way["lo"] > 3 * (by_user["hi"] - by_user["lo"]) and two_way["p"] > by_user["p"]
    plain, spread = rng.normal(0, 1, n_targets), rng.integers(0, 60, n_targets)
    ratio = lambda a, b: (a["hi"] - a["lo"]) / (b["hi"] - b["lo"])
    assert 1.5 < ratio(E.cluster_bootstrap(plain, w, users, spread), E.cluster_bootstrap(plain, w, users)) < 1.95


def test_seed_level_test_is_scipys_paired_t_test_of_the_per_seed_means():
    x, y = [30.1, 31.0, 29.5, 30.7], [29.0, 30.2, 29.6, 29.9]
    assert E.seed_test(x, y) == pytest.approx(stats.ttest_rel(x, y).pvalue) and 0 < E.seed_test(x, y) < 1
    assert E.seed_test(x[:2], y[:2]) is None and E.seed_test(x, x) == 1.0       # too few seeds; identical models
    # through paired_over_seeds: each seed's mean of the per-user values, over the seeds both models have
    rng = np.random.default_rng(0)
    users = np.arange(50)
    entry = lambda m, s, v: {"model": m, "seed": s, "users": users, "per_user": {"overall": {"ndcg@10": v}}}
    a = {s: entry("A", s, rng.random(50) * 100) for s in range(4)}
    b = {s: entry("B", s, rng.random(50) * 100) for s in range(5)}
    t = E.paired_over_seeds(a, b, "overall", "ndcg@10", n_boot=200)
    means = [[e[s]["per_user"]["overall"]["ndcg@10"].mean() for s in range(4)] for e in (a, b)]
    assert t["seeds"] == 4 and t["seed_p"] == pytest.approx(stats.ttest_rel(*means).pvalue)


class RanksNpz(dict):
    """A dict that reads like np.load's ranks.npz."""
    files = property(lambda self: list(self))


def made_up_cold_items_run(seed, ranks_of, users, items, counts):
    """(results.json, ranks.npz) of a made-up cold-items run: the two-tower ("two_tower") and baselines with the given
    rank of each target, in both views."""
    p = R.PROTOCOLS["cold-items"]
    z = RanksNpz(users=users, items=items, counts=counts)
    res = {"protocol": "cold-items", "config": {"k": 10, "seed": seed}, "baselines": {}}
    for name, ranks in ranks_of.items():
        z.update({f"{R.ranks_key(name)}__{v}": ranks for v in ("cold", "all")})
        means = {m: float(x.mean()) for m, x in p.per_user(ranks, counts, 10).items()} | {"warm@20": 50.0}
        r = {"test": {"cold": means, "all": means}, "validation": {"cold": means}}
        res.update(r) if name == "two_tower" else res["baselines"].update({name: r})
    return res, z


def test_cold_items_board_is_two_way_clustered_over_per_target_terms_with_seed_tests_and_holm():
    """Under cold-items (unseen items) the leaderboard's paired test resamples users and target items crossed, over
    each target's own term of the metric (NDCG@20: its gain / its user's ideal DCG; the terms of a user sum to its
    NDCG); the seed-level test and Holm over the table's 4 comparisons are in both tables, and the note says so."""
    rng = np.random.default_rng(0)
    n = 120
    users, counts = np.arange(n), rng.integers(1, 6, n)
    entries = []
    for seed in range(3):
        items = rng.choice(40, counts.sum()) + 100 * seed            # each seed its own sample of held-out items
        good, bad = rng.integers(0, 30, counts.sum()), rng.integers(0, 60, counts.sum())
        ranks = {"two_tower": good, "EASE": bad, "Popularity": bad + 5}
        res, z = made_up_cold_items_run(seed, ranks, users, items, counts)
        entries += E.run_entries(res, z, "two-tower")
    tt = entries[-3]                                  # the two-tower at seed 2: its per-target terms by hand
    assert (tt["model"], tt["seed"]) == ("two-tower", 2)
    row = np.repeat(users, counts)
    ideal = np.array([sum(1 / np.log2(j + 2) for j in range(min(c, 20))) for c in counts])
    gain = np.where(good < 20, 100 / np.log2(good + 2), 0)
    assert np.allclose(tt["per_target"]["cold"]["ndcg@20"], gain / ideal[row])
    for m in ("ndcg@20", "recall@20", "hr@10"):                      # a user's terms sum to its value
        assert np.allclose(np.bincount(row, tt["per_target"]["cold"][m]), tt["per_user"]["cold"][m])
    board = E.leaderboard(entries, "cold-items", 10, n_boot=500)
    assert [r["model"] for r in board["rows"]] == ["two-tower", "EASE", "Popularity"]
    t = board["rows"][1]["vs_best"][("cold", "ndcg@20")]
    cat = lambda m, f: np.concatenate([f(x) for x in entries if x["model"] == m])
    terms = lambda m: cat(m, lambda x: x["per_target"]["cold"]["ndcg@20"])
    by_hand = E.cluster_bootstrap(terms("EASE") - terms("two-tower"), cat("EASE", lambda x: 1 / x["counts"][row]),
                                  cat("EASE", lambda x: x["users"][row]), cat("EASE", lambda x: x["targets"]), 500)
    assert {k: t[k] for k in by_hand} == pytest.approx(by_hand) and t["users"] == n and t["items"] > 100
    per_seed = lambda m: [x["per_user"]["cold"]["ndcg@20"].mean() for x in entries if x["model"] == m]
    assert t["diff"] == pytest.approx(np.mean(per_seed("EASE")) - np.mean(per_seed("two-tower")))
    assert t["seed_p"] == pytest.approx(stats.ttest_rel(per_seed("EASE"), per_seed("two-tower")).pvalue)
    tests = [r["vs_best"][c] for r in board["rows"][1:] for c in board["tested"]]
    assert [x["p_holm"] for x in tests] == pytest.approx(E.holm([x["p"] for x in tests]))
    assert [x["seed_p_holm"] for x in tests] == pytest.approx(E.holm([x["seed_p"] for x in tests]))
    md = "\n".join(E.board_markdown(board) + ["", E.board_note(board, "Table")])
    line = next(x for x in md.splitlines() if x.startswith("| EASE |"))
    assert f"{t['diff']:+.2f} [{t['lo']:+.2f}, {t['hi']:+.2f}] | {E.pvalue(t['p_holm'])} " \
           f"(seeds {E.pvalue(t['seed_p_holm'])}) |" in line
    assert "p Holm (seeds)" in md and "two-way" in md and f"{n} users in {3 * n} user-seed pairs" in md
    assert "Holm-adjusted over the table's 4 comparisons." in md
    tex = "\n".join(E.board_latex(board, "c", "t"))
    p_of = lambda p: "$< 0.001$" if p < 0.001 else f"${p:.3f}$"
    assert f"& {p_of(t['p_holm'])} (seeds {p_of(t['seed_p_holm'])}) \\\\" in tex


def browse_blob(page):
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))


def test_browse_page_holds_the_runs_lists_reasons_and_held_out_ranks(tiny_run, capsys):
    """The page's data are the run's: each user's top K under the test exclusions with the model's scores, the
    reason recommend gives, and the rank of each held-out test item as the evaluator computes it. Self-contained."""
    _, run = tiny_run
    R.main(["browse", str(run), "--users", "all", "-k", "5", "--device", "cpu"])
    page = (run / "browse.html").read_text()
    assert not re.search(r"https?://|<link|\ssrc=|@import|fetch\(", page)       # nothing fetched: CSS and JS inline
    data = browse_blob(page)
    cfg, ds, split, model, device, _ = R.restore(str(run), device_name="cpu")
    users, T, _ = R.loo_targets(split, "test")
    names = ds.users.user.iloc[users].tolist()
    assert [u["n"] for u in data["users"]] == sorted(names, key=R.natural) and data["views"] == ["overall"]
    assert R.natural("105") < R.natural("1003") and R.natural("u2") < R.natural("u10")      # numbers as numbers
    ex = R.exclusion(split, "test")
    fn = R.model_scores(model, "cpu")
    top = R.top_k_lists(fn, users, ex, 5)
    ranks = R.evaluate(fn, split, "test", 5, "cpu", return_ranks=True)[1]["overall"]
    name = lambda i: R.item_names(ds.items)[i]
    for e in data["users"]:
        r = names.index(e["n"])
        u = users[r]
        shown = e["top"]["overall"]
        assert [data["items"][x[0]][0] for x in shown] == [name(i) for i in top[r]]
        S = fn(np.array([u]))[0]
        assert [x[1] for x in shown] == pytest.approx([float(S[i]) for i in top[r]], abs=1e-3)
        why, _ = R.reasons(model, int(model.u_feats[1, u]), split.train[u].indices, top[r], u)
        assert [data["items"][x[2]][0] for x in shown] == [name(h) for h in why]
        assert [data["items"][x][0] for x in e["h"]] == [name(i) for i in split.train[u].indices]
        assert [(data["items"][i][0], rk["overall"]) for i, rk in e["t"]] == [(name(T.indices[r]), int(ranks[r]))]
    capsys.readouterr()
    R.main(["browse", str(run), "--users", f"{data['users'][0]['n']},{data['users'][1]['n']}", "--out",
            str(run / "two.html"), "--device", "cpu"])
    assert len(browse_blob((run / "two.html").read_text())["users"]) == 2
    line = one_error_line(capsys, ["browse", str(run), "--users", "nobody,u1", "--out", str(run / "no.html")])
    assert "no user 'nobody'" in line and not (run / "no.html").exists()


def test_browse_shows_a_second_run_or_a_baseline_beside_the_model_and_says_fold_in_for_new_users(tiny_run, tmp_path,
                                                                                                   capsys):
    """--against RUN: that run's top K per user beside the model's (here the same run: the same lists); --against a
    baseline the run did not fit is one line naming what it has; a user training never saw is marked as folded in."""
    _, run = tiny_run
    out = tmp_path / "b.html"
    R.main(["browse", str(run), "--users", "all", "-k", "5", "--against", str(run), "--out", str(out), "--device", "cpu"])
    data = browse_blob(out.read_text())
    assert data["against"].startswith(f"run {run.name} (two-tower")
    for e in data["users"]:
        assert [x[0] for x in e["vs"]["overall"]] == [x[0] for x in e["top"]["overall"]] and e["f"] is False
    line = one_error_line(capsys, ["browse", str(run), "--against", "EASE", "--out", str(tmp_path / "c.html")])
    assert "not a baseline of run r" in line and not (tmp_path / "c.html").exists()
    page = out.read_text()
    assert "fold-in items (given at scoring" in page and "an artist or track they loved" in page


@pytest.mark.slow
def test_browse_page_in_headless_chromium_searches_selects_and_renders_a_user(tiny_run, tmp_path):
    """The page in a real browser (Debian's chromium, headless): a search narrows the user list, the first match is
    clicked, and the rendered page shows that user's top K with reasons and the held-out item's rank."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    if chromium is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it when it can)")
    _, run = tiny_run
    page = tmp_path / "page.html"
    R.main(["browse", str(run), "--users", "all", "-k", "5", "--out", str(page), "--device", "cpu"])
    data = browse_blob(page.read_text())
    who = max(data["users"], key=lambda u: (len(u["n"]), u["n"]))
    query = who["n"]
    matches = [u for u in data["users"] if query.lower() in u["n"].lower() or query.lower() in u["c"].lower()]
    url = f"{page.as_uri()}#q={query}&pick=first"
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,900"]
    p = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    dom = p.stdout
    shown = re.findall(r'<li data-i="\d+"( style="display: none;")?( class="sel")?>([^<]*)', dom)
    assert len(shown) == len(data["users"])
    assert sorted(n for hidden, _, n in shown if not hidden) == sorted(u["n"] for u in matches)
    assert [n for _, sel, n in shown if sel] == [matches[0]["n"]]
    assert f"{len(matches)} of {len(data['users'])} users" in dom
    first = matches[0]
    assert f"<h2>{first['n']}" in dom
    table = re.search(r'<table id="top-overall">(.*?)</table>', dom, re.S).group(1)
    assert table.count("<tr") == 1 + len(first["top"]["overall"]) == 6
    assert table.count("because you loved") == sum(x[2] >= 0 for x in first["top"]["overall"])
    (item, ranks), = first["t"]
    assert f"{data['items'][item][0]}: view overall rank {ranks['overall'] + 1}" in dom
    assert ("held-out test item, found" in table) == (ranks["overall"] < 5)
    track = data["items"][who["h"][0]][0].split(" — ")[-1]          # who loved this track: a search by what they loved
    lovers = [u for u in data["users"] if track.lower() in u["n"].lower() or track.lower() in u["c"].lower()
              or any(track.lower() in data["items"][h][0].lower() for h in u["h"])]
    p = subprocess.run([*base, "--dump-dom", f"{page.as_uri()}#q={track}"], capture_output=True, text=True, timeout=120)
    assert who in lovers and f"{len(lovers)} of {len(data['users'])} users" in p.stdout
    shot = tmp_path / "browse.png"
    p = subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10000


def test_export_round_trip_gives_recommends_top_k(tiny_run, tmp_path, capsys):
    """The exported vectors, ids and known positives alone (numpy and CSV, no recsetters) give the same top K as
    `recommend`; with faiss installed, its approximate top 10 is measured against the exact one."""
    _, run = tiny_run
    R.main(["export", str(run), "--out", str(tmp_path / "ex"), "--device", "cpu"])
    printed = capsys.readouterr().out
    ex = tmp_path / "ex"
    U, V = np.load(ex / "user_vectors.npy"), np.load(ex / "item_vectors.npy")
    users, items = pd.read_csv(ex / "users.csv", dtype=str), pd.read_csv(ex / "items.csv", dtype=str)
    known = sp.load_npz(ex / "known.npz").tocsr()
    assert U.shape[1] == V.shape[1] and len(U) == len(users) and len(V) == len(items) and known.shape == (len(U), len(V))
    assert json.loads((ex / "export.json").read_text())["scorer"] == "dot" and not (ex / "scorer.npz").exists()
    for u in range(0, len(users), max(1, len(users) // 8)):
        S = U[u] @ V.T
        S[known[u].indices] = -np.inf
        mine = [items.artist[i] if items.track[i] == items.artist[i] else f"{items.artist[i]} — {items.track[i]}"
                for i in np.argsort(-S, kind="stable")[:5]]
        R.main(["recommend", str(run), "--user", users.user[u], "-k", "5", "--device", "cpu"])
        lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\s*\d+\. ", line)]
        assert [re.sub(r"^\s*\d+\. ", "", line).split("   score")[0] for line in lines] == mine
    try:
        import faiss  # noqa: F401
        assert "recall of its approximate top 10" in printed and (ex / "item_vectors.faiss").exists()
    except ImportError:
        assert "faiss: not installed" in printed


def test_export_of_a_dotcompress_run_carries_its_scorer(tmp_path):
    """DotCompress is not a dot product: the export carries the head's weights, and scoring the exported vectors
    with them gives the run's own top K."""
    write_dataset(tmp_path / "data" / "x", *random_interactions(n=1500))
    R.main(["train", "--dataset", "x", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
            "--run-name", "dc", "--scorer", "dotcompress", "--loss", "softmax", *TINY])
    R.main(["export", str(tmp_path / "runs" / "dc"), "--device", "cpu"])
    ex = tmp_path / "runs" / "dc" / "export"
    assert (ex / "scorer.npz").exists() and json.loads((ex / "export.json").read_text())["scorer"] == "dotcompress"
    cfg, ds, split, model, device, _ = R.restore(str(tmp_path / "runs" / "dc"), device_name="cpu")
    users = np.arange(split.n_users)
    known = sp.load_npz(ex / "known.npz")
    want = R.top_k_lists(R.model_scores(model, "cpu"), users, R.positives_matrix(split), 10)
    assert (R.exact_top_k(R.exported_scores(ex)(users), known, 10) == want).all()
    U, V = np.load(ex / "user_vectors.npy"), np.load(ex / "item_vectors.npy")
    assert not (R.exact_top_k(U @ V.T, known, 10) == want).all()        # a plain dot product would not do


def test_export_folder_is_written_whole_or_not_at_all(tmp_path):
    out = tmp_path / "ex"
    R.write_folder(out, {"a.npy": b"1", "b.csv": b"2"})
    with pytest.raises(OSError):
        R.write_folder(out, {"a.npy": b"new", "missing/b.csv": b"x"})       # fails half-way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex"] and (out / "a.npy").read_bytes() == b"1"
    (out / "mine.txt").write_text("a stranger's file")
    R.write_folder(out, {"a.npy": b"new", "c.csv": b"3"})       # replaces only what it writes
    assert sorted(p.name for p in out.iterdir()) == ["a.npy", "b.csv", "c.csv", "mine.txt"]
    assert (out / "a.npy").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["ex"]


def tree(folder):
    """Every file under folder with its bytes (what must survive a refused write)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


WRITERS = {   # a writer's command line with its output path OUT (and, where it has one, the run RUN)
    "export": lambda run, out: ["export", str(run), "--out", str(out)],
    "browse": lambda run, out: ["browse", str(run), "--out", str(out)],
    "compare": lambda run, out: ["compare", str(run), "--out", str(out)],
    "report": lambda run, out: ["report", "--out", str(out)],
    "train": lambda run, out: ["train", "--dataset", "x", "--data-dir", str(run.parent.parent / "data"),
                               "--runs-dir", str(out), *TINY],
}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("target", ["run folder", "a stranger's folder", "an existing file", "read-only folder",
                                    "under /proc"])
def test_no_output_path_destroys_what_the_command_did_not_write(tiny_run, tmp_path, capsys, writer, target):
    """Every writer pointed at a run folder, a folder holding someone else's file, an existing file, a read-only
    folder or a path under /proc: one error line, exit 2, and every file that was there is there, unchanged."""
    _, run = tiny_run
    victim = tmp_path / "victim"
    shutil.copytree(run, victim)
    stranger = tmp_path / "theirs"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("years of work")
    (tmp_path / "notes.txt").write_text("mine")
    ro = tmp_path / "ro"
    ro.mkdir()
    out = {"run folder": victim, "a stranger's folder": stranger, "an existing file": tmp_path / "notes.txt",
           "read-only folder": ro / "out", "under /proc": Path("/proc/recsetters-out")}[target]
    if writer == "train" and target in ("a stranger's folder", "run folder"):
        pytest.skip("--runs-dir is a folder of runs: train writes a new run folder inside it, never onto it")
    if writer == "compare" and target != "read-only folder" and target != "under /proc":
        out = out / "board" if out.is_dir() else out.with_suffix("")            # OUT.md and OUT.tex
        if out.parent.is_dir():
            for suffix in (".md", ".tex"):
                out.with_name(out.name + suffix).write_text("someone's table")
    ro.chmod(0o555)
    before = tree(tmp_path)
    main = E.main if writer in ("compare", "report") else R.main
    try:
        line = one_error_line(capsys, WRITERS[writer](victim, out), main)
    finally:
        ro.chmod(0o755)
    assert tree(tmp_path) == before, line
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*")), "a temporary file was left behind"


@pytest.mark.slow
def test_leaderboard_latex_compiles(tmp_path):
    """The LaTeX table compiles (pdflatex, where it is installed) with the packages its first line names."""
    if shutil.which("pdflatex") is None:
        pytest.skip("no pdflatex on this machine (Debian: texlive-latex-base texlive-latex-recommended)")
    hit = np.arange(50) % 3 == 0
    e = lambda m, x: {"model": m, "kind": "baseline", "seed": 0, "val": x.mean(), "users": np.arange(50),
                      "test": {R.column(c, 10): x.mean() for c in R.LOO_COLUMNS},
                      "per_user": {"overall": {"hr@10": x * 100.0, "ndcg@10": x * 60.0}}}
    board = E.leaderboard([e("two-tower, text tags, --epochs 2", hit), e("EASE_1 & 50%", ~hit)], "leave-one-out", 10,
                          n_boot=100)
    table = "\n".join(E.board_latex(board, "hetrec, leave-one-out: ×100, mean ± std, Δ", "t"))
    packages = re.match(r"% needs \\usepackage\{(.*)\}", table).group(1)
    (tmp_path / "t.tex").write_text("\\documentclass{article}\\usepackage[utf8]{inputenc}\\usepackage{" + packages
                                    + "}\\begin{document}\n" + table + "\n\\end{document}\n")
    p = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and (tmp_path / "t.pdf").exists(), p.stdout[-2000:]
    assert "Overfull" not in (tmp_path / "t.log").read_text()


# ---------------------------------------------------------------------------------------------- the protocol seam

def half_given_parts(df, rng, n_users, n_items, kind, opts):
    """A protocol recsetters.py has never seen: a seeded 10% + 10% of the users held out whole, each scored from a
    seeded half of their items (no order: the given half is drawn at random) and ranked on the other half."""
    held = rng.permutation(n_users)[:2 * (n_users // 10)]
    part = np.zeros(n_users, np.int8)
    part[held[:len(held) // 2]], part[held[len(held) // 2:]] = 1, 2
    d = df[["u", "i"]].sample(frac=1.0, random_state=int(rng.integers(2**31))).sort_values("u", kind="stable")
    p = part[d.u.to_numpy()]
    given = (p > 0) & (d.groupby("u").cumcount().to_numpy() % 2 == 0)
    return d[p == 0], d[(p == 1) & ~given], d[(p == 2) & ~given], {"given": d[given]}, ["half given, half ranked"]


HALF_GIVEN = R.Protocol(
    splits=("half-given",), make_split=half_given_parts,
    targets=lambda split, which: (*R.held_out(split, which), {"all": None}),
    results=lambda *a: R.multi_target_results(*a, capped=True),
    per_user=lambda r, counts, k: R.multi_target_metrics(r, counts, capped=True),
    select=("all", "ndcg@20"), columns=(("all", "recall@20"), ("all", "ndcg@20"), ("all", "hr@10")),
    unseen="users")


def test_a_new_protocol_is_one_registry_entry_and_its_functions(small_demo, tmp_path, monkeypatch, capsys):
    """The seam's contract: a protocol the code has never seen (HALF_GIVEN, above) registered as one PROTOCOLS entry
    runs through train, baselines, evaluate and the leaderboard with nothing else edited. Its held-out users are
    scored from their given half (the two-tower encodes and folds them in, iALS solves them), the baselines that
    run follow from their capabilities, and every number is the one the evaluator computes."""
    monkeypatch.setitem(R.PROTOCOLS, "half-given", HALF_GIVEN)
    common = ["--dataset", "small", "--data-dir", str(small_demo), "--split", "half-given", "--threads", "1"]
    runs = tmp_path / "runs"
    R.main(["train", *common, "--text", "none", "--device", "cpu", "--epochs", "2", "--fold-in-steps", "5", "--runs-dir", str(runs), "--run-name", "toy",
            "--baselines", "Popularity,EASE,iALS,TagTFIDF,CB2CF"])
    res = json.loads((runs / "toy" / "results.json").read_text())
    assert res["protocol"] == "half-given" and res["split"]["parts"]["fold_in_interactions"] > 0
    base = res["baselines"]
    assert {n for n, r in base.items() if "na" in r} == {"TagTFIDF", "CB2CF"}       # made for new items
    assert base["iALS"]["test"]["all"]["ndcg@20"] > base["Popularity"]["test"]["all"]["ndcg@20"]   # folded in
    printed = capsys.readouterr().out
    assert "half-given" in printed and "Recall@20 all" in printed
    # evaluate reproduces the run's test numbers from its checkpoint
    R.main(["evaluate", "toy", "--runs-dir", str(runs), "--device", "cpu"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("test"))
    assert line.split()[1:] == [f"{res['test']['all'][m]:.2f}" for m in ("recall@20", "ndcg@20", "hr@10")]
    # baselines alone, on the same split: the same choices and numbers
    R.main(["baselines", *common, "--baselines", "EASE"])
    row = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("EASE ("))
    assert row.split()[-3:] == [f"{base['EASE']['test']['all'][m]:.2f}" for m in ("recall@20", "ndcg@20", "hr@10")]
    # the leaderboard of the protocol, and fairness under it
    E.main(["compare", "--dataset", "small", "--runs-dir", str(runs), "--out", str(tmp_path / "board")])
    md = (tmp_path / "board.md").read_text()
    assert "half-given" in md and "| EASE |" in md and "Recall@20 all" in md
    R.main(["fairness", "toy", "--runs-dir", str(runs), "--device", "cpu", "--min-users", "5", "--bootstrap", "20"])
    fair = json.loads((runs / "toy" / "fairness.json").read_text())
    assert set(fair["accuracy"]) == {"Recall@20 all", "NDCG@20 all"}


def test_an_ensemble_run_reports_its_first_member_as_the_single_model(small_demo, tmp_path, capsys):
    """train --ensemble 2 tests its first member too (the single model: the same seed, the same training), beside the
    ensemble: the same numbers as a run of --ensemble 1, and its own row in the leaderboard."""
    common = ["--dataset", "small", "--data-dir", str(small_demo), "--runs-dir", str(tmp_path), "--text", "none",
              "--epochs", "2", "--no-baselines", "--threads", "1", "--device", "cpu"]
    R.main(["train", *common, "--ensemble", "2", "--run-name", "ens"])
    R.main(["train", *common, "--ensemble", "1", "--run-name", "one"])
    assert "two-tower, single (member 1" in capsys.readouterr().out
    ens, one = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("ens", "one"))
    assert "single" not in one and ens["single"]["best_epoch"] == one["best_epoch"]
    assert ens["single"]["test"]["overall"] == pytest.approx(one["test"]["overall"], abs=1e-6)
    assert ens["single"]["validation"]["overall"] == pytest.approx(one["validation"]["overall"])
    with np.load(tmp_path / "ens" / "ranks.npz") as z, np.load(tmp_path / "one" / "ranks.npz") as o:
        assert np.array_equal(z["two_tower_single__overall"], o["two_tower__overall"])
    entries = E.run_entries(ens, np.load(tmp_path / "ens" / "ranks.npz"))
    assert [e["model"] for e in entries] == ["two-tower, text none, --epochs 2 --ensemble 2",
                                            "two-tower, text none, --epochs 2 --ensemble 2, single"]
    # under new-users (an ensemble of 3 by default) a run of --ensemble 1 is named as the single model it is
    assert E.two_tower_label({"text": "none", "ensemble": 1, "split": "new-users"}, "new-users") == \
        "two-tower, text none, single"


def test_a_search_goes_on_when_another_process_told_its_trial_first(small_demo, tmp_path):
    """Two processes can pop the same enqueued trial from an SQLite study (it locks no rows); the one that tells it
    second gets optuna's "Cannot tell a COMPLETE trial": the search goes on to its count instead of failing."""
    import optuna
    ds, split = R.prepare(R.Config(dataset="small", data_dir=str(small_demo), seed=0), quiet=True)
    url, study, told = f"sqlite:///{tmp_path / 's.db'}", "small/EASE", []

    def make(p):                              # the first fit: "another process" finishes this very trial meanwhile
        if not told:
            other = optuna.load_study(study_name=study, storage=url)
            running = other.get_trials(states=(optuna.trial.TrialState.RUNNING,))[0]
            other.tell(running.number, 1.0)
            told.append(running.number)
        return R.ease_scores(split, **p)

    res, _ = R.tune("EASE", make, {"lam": R.Dim(1.0, 1e4, True)}, split, quiet=True, trials=3, storage=url,
                    study=study, start=[{"lam": 100.0}])
    st = optuna.load_study(study_name=study, storage=url)
    assert told == [0] and res["trials"] == 3
    assert len(st.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3
