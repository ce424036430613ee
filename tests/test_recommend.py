"""Stage 70: top-k, fold-in, similar items, batch; on hand-made artifacts and on ML-100K."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from models import GMF, BiasedMF
from recpipe.artifacts import StageOutput, upstream_entry, write_parquet
from recpipe.cli import run_main
from recpipe.recommend import (TITLE_WIDTH, fold_in, fold_in_adam, load_recommender, main,
                               top_k, training_l2)
from tests.conftest import run_script

N_USERS, N_ITEMS, DIM = 6, 9, 3
RAW_USERS = np.array([10, 20, 30, 40, 50, 60], dtype=np.int64)
RAW_ITEMS = np.array([101, 102, 103, 104, 105, 106, 107, 108, 109], dtype=np.int64)
TITLES = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta", "Iota"]
L2 = 0.05
SCALE = 1.3          # the std of the train ratings: the network works in standardised units


def _train_matrix() -> sp.csr_matrix:
    """Every user rated 3-5 items (ratings 1..5); item 8 (raw 109) is rated by nobody."""
    rng = np.random.default_rng(7)
    rows, cols, vals = [], [], []
    for u in range(N_USERS):
        items = rng.choice(8, size=3 + u % 3, replace=False)
        rows += [u] * len(items)
        cols += items.tolist()
        vals += rng.integers(1, 6, size=len(items)).astype(float).tolist()
    return sp.csr_matrix((np.array(vals, np.float32), (rows, cols)), shape=(N_USERS, N_ITEMS))


def _hand_model(task: str = "explicit") -> BiasedMF:
    """A BiasedMF with explicitly set weights; items 3 and 5 are identical (a tie)."""
    g = torch.Generator().manual_seed(3)
    m = BiasedMF(N_USERS, N_ITEMS, dim=DIM, global_mean=3.5, scale=SCALE)
    with torch.no_grad():
        m.user_factors.weight.copy_(torch.randn(N_USERS, DIM, generator=g))
        m.item_factors.weight.copy_(torch.randn(N_ITEMS, DIM, generator=g))
        m.user_bias.weight.copy_(torch.randn(N_USERS, 1, generator=g) * 0.3)
        m.item_bias.weight.copy_(torch.randn(N_ITEMS, 1, generator=g) * 0.3)
        m.item_factors.weight[5] = m.item_factors.weight[3]
        m.item_bias.weight[5] = m.item_bias.weight[3]
    return m


def make_artifacts(data_dir: Path, model: torch.nn.Module | None = None, name: str = "mf",
                   task: str = "explicit", model_args: dict | None = None,
                   string_ids: bool = False) -> Path:
    """Stages 20, 40 and 60/<name> written the way the real stages write them."""
    train = _train_matrix()
    raw_users, raw_items = RAW_USERS, RAW_ITEMS
    if string_ids:                      # e.g. Netflix-like string ids: "u10", "i101"
        raw_users = pd.array([f"u{x}" for x in RAW_USERS], dtype="str")
        raw_items = pd.array([f"i{x}" for x in RAW_ITEMS], dtype="str")
    with StageOutput(data_dir, "20_make_ids") as out:
        users = pd.DataFrame({"user_idx": np.arange(N_USERS, dtype=np.int32),
                              "raw_user_id": raw_users,
                              "n_ratings": np.diff(train.indptr).astype(np.int32)})
        items = pd.DataFrame({"item_idx": np.arange(N_ITEMS, dtype=np.int32),
                              "raw_item_id": raw_items,
                              "n_ratings": np.bincount(train.indices, minlength=N_ITEMS)
                              .astype(np.int32),
                              "title": pd.array(TITLES, dtype="string"),
                              "year": pd.array([1990 + i if i != 2 else None
                                                for i in range(N_ITEMS)], dtype="Int32")})
        write_parquet(users, out.path("users.parquet"))
        write_parquet(items, out.path("items.parquet"))
        out.commit({"n_users": N_USERS, "n_items": N_ITEMS, "n_ratings": int(train.nnz)})
    with StageOutput(data_dir, "40_make_sparse_matrix") as out:
        sp.save_npz(out.path("train.npz"), train)
        binary = train.copy()
        binary.data[:] = 1.0
        sp.save_npz(out.path("train_implicit.npz"), binary)
        out.commit({"n_users": N_USERS, "n_items": N_ITEMS, "rating_scale": [1.0, 5.0],
                    "upstream": upstream_entry(data_dir, "20_make_ids")})
    model = model if model is not None else _hand_model()
    args = model_args if model_args is not None else {"dim": DIM, "global_mean": 3.5, "scale": SCALE}
    with StageOutput(data_dir, f"60_train/{name}") as out:
        torch.save({"model": name, "model_args": args, "state_dict": model.state_dict(),
                    "task": task, "rating_scale": [1.0, 5.0], "n_users": N_USERS,
                    "n_items": N_ITEMS, "best_epoch": 1, "valid_metric": 0.9,
                    "config": {"model": name, "task": task, "reg": L2}},
                   out.path("model.pt"))
        out.commit({"model": name, "upstream": upstream_entry(data_dir, "40_make_sparse_matrix"),
                    "command": f"python 60_train.py --model {name} --data-dir {data_dir}"})
    return data_dir


@pytest.fixture
def hand(tmp_path) -> Path:
    return make_artifacts(tmp_path / "data")


def _scores(model: BiasedMF) -> np.ndarray:
    with torch.no_grad():
        return model(torch.arange(N_USERS)[:, None], torch.arange(N_ITEMS)[None, :]).numpy()


def _expected_top(scores: np.ndarray, train: sp.csr_matrix, u: int, k: int) -> list[int]:
    s = scores[u].astype(np.float64).copy()
    s[train[u].indices] = -np.inf
    order = np.lexsort((np.arange(N_ITEMS), -s))
    return [int(i) for i in order[:k] if np.isfinite(s[i])]


# ------------------------------------------------------------------ top-k on hand-made data

def test_top_k_breaks_ties_by_item_index_across_the_cut():
    s = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.5],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [-torch.inf, 4.0, 4.0, -torch.inf, 1.0, 4.0]])
    vals, idx = top_k(s, 2)
    assert idx.tolist() == [[1, 3], [0, 1], [1, 2]]
    vals, idx = top_k(s, 4)
    assert idx.tolist() == [[1, 3, 4, 2], [0, 1, 2, 3], [1, 2, 5, 4]]


def test_user_top_k_matches_brute_force_and_excludes_train(hand, capsys):
    train = _train_matrix()
    scores = _scores(_hand_model())
    for u, raw in enumerate(RAW_USERS):
        df = main(["--data-dir", str(hand), "--model", "mf", "--user", str(raw), "-k", "4"])
        want = _expected_top(scores, train, u, 4)
        got = [int(np.flatnonzero(RAW_ITEMS == r)[0]) for r in df["raw_item_id"]]
        assert got == want
        assert not set(got) & set(train[u].indices.tolist())
        np.testing.assert_allclose(df["score"], scores[u, got], rtol=1e-6)
    out = capsys.readouterr().out
    assert "Top 4 for user 60" in out and "title" in out and "score = predicted rating" in out


def test_same_list_across_runs_and_k_larger_than_candidates(hand):
    a = main(["--data-dir", str(hand), "--user", "20", "-k", "50"])
    b = main(["--data-dir", str(hand), "--user", "20", "-k", "50"])
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == N_ITEMS - _train_matrix()[1].nnz          # every unrated item, no more
    ties = a[a["raw_item_id"].isin([104, 106])]                # identical items (equal scores)
    assert ties["raw_item_id"].tolist() == [104, 106]           # lower item index first
    assert ties["score"].iloc[0] == ties["score"].iloc[1]
    assert ties.index[1] == ties.index[0] + 1


def test_explain_lists_the_users_liked_items(hand, capsys):
    df = main(["--data-dir", str(hand), "--user", "10", "-k", "3", "--explain"])
    train = _train_matrix()
    liked = train[0].data >= train[0].data.mean()
    liked_titles = {TITLES[i] for i in train[0].indices[liked]}
    for reason in df["because_you_liked"]:
        names = {part.split(" (")[0] for part in reason.split("; ")}
        assert names and names <= liked_titles
    assert "because_you_liked" in capsys.readouterr().out


def test_unknown_user_fallback_is_labelled_and_names_the_fold_in_route(hand, capsys):
    df = main(["--data-dir", str(hand), "--user", "999", "-k", "3"])
    out = capsys.readouterr().out
    assert "unknown user '999'" in out and "--ratings" in out
    assert "POPULARITY FALLBACK (not personalised" in out
    counts = np.bincount(_train_matrix().indices, minlength=N_ITEMS)
    want = np.lexsort((np.arange(N_ITEMS), -counts))[:3]
    assert df["raw_item_id"].tolist() == RAW_ITEMS[want].tolist()


def test_unknown_user_without_fallback_and_unknown_item_exit_1(hand, capsys):
    assert run_main(main, ["--data-dir", str(hand), "--user", "abc", "--no-fallback"]) == 1
    err = capsys.readouterr().err
    assert "unknown user 'abc'" in err and "--ratings FILE" in err and "Traceback" not in err
    assert run_main(main, ["--data-dir", str(hand), "--similar-to", "555"]) == 1
    err = capsys.readouterr().err
    assert "unknown item '555'" in err and "e.g. 101" in err


def test_missing_model_names_the_training_command(hand, capsys):
    assert run_main(main, ["--data-dir", str(hand), "--model", "neumf", "--user", "10"]) == 1
    err = capsys.readouterr().err
    assert f"python 60_train.py --model neumf --data-dir {hand}" in err
    (hand / "40_make_sparse_matrix" / "manifest.json").unlink()
    assert run_main(main, ["--data-dir", str(hand), "--user", "10"]) == 1
    assert "python 40_make_sparse_matrix.py" in capsys.readouterr().err


def test_similar_to_is_cosine_of_item_vectors(hand):
    df = main(["--data-dir", str(hand), "--similar-to", "104", "-k", "3"])
    v = _hand_model().item_factors.weight.detach().numpy()
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    sims = v @ v[3]
    sims[3] = -np.inf
    want = np.lexsort((np.arange(N_ITEMS), -sims))[:3]
    assert df["raw_item_id"].tolist() == RAW_ITEMS[want].tolist()
    assert df["raw_item_id"].iloc[0] == 106 and df["cosine"].iloc[0] == pytest.approx(1.0)


def test_string_raw_ids_in_every_mode(tmp_path, capsys):
    data = make_artifacts(tmp_path / "d", string_ids=True)
    numeric = make_artifacts(tmp_path / "n")
    a = main(["--data-dir", str(data), "--user", "u20", "-k", "4"])
    b = main(["--data-dir", str(numeric), "--user", "20", "-k", "4"])
    assert a["raw_item_id"].tolist() == ["i" + str(x) for x in b["raw_item_id"]]
    assert main(["--data-dir", str(data), "--similar-to", "i104", "-k", "1"])[
        "raw_item_id"].tolist() == ["i106"]
    f = tmp_path / "me.tsv"
    f.write_text("i101\t5\ni103\t1\n101\t4\n")
    df = main(["--data-dir", str(data), "--ratings", str(f), "-k", "3"])
    assert "skipped 1 item id(s)" in capsys.readouterr().out and len(df) == 3
    users = tmp_path / "users.csv"
    users.write_text("user,comment\nu30,x\n20,y\n")
    out = main(["--data-dir", str(data), "--batch", str(users), "--out", str(tmp_path / "o.csv"),
                "-k", "2"])
    assert out["raw_user_id"].tolist() == ["u30", "u30", "20", "20"]
    assert out["source"].tolist() == ["model", "model", "popularity_fallback",
                                      "popularity_fallback"]
    assert run_main(main, ["--data-dir", str(data), "--user", "20", "--no-fallback"]) == 1
    assert "raw user ids here are strings, e.g. 'u10'" in capsys.readouterr().err


# ------------------------------------------------------------------ batch

@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_batch_equals_the_per_user_path(hand, tmp_path, suffix):
    users = tmp_path / "users.txt"
    users.write_text("raw_user_id\n30\n10\n777\n30\n")
    out = tmp_path / f"recs{suffix}"
    assert run_main(main, ["--data-dir", str(hand), "--batch", str(users), "--out", str(out),
                           "-k", "3", "--chunk-users", "1"]) == 0
    df = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert list(df.columns) == ["raw_user_id", "rank", "raw_item_id", "title", "year", "score",
                                "source"]
    model_rows = df[df.source == "model"]
    assert model_rows["raw_user_id"].tolist() == [30] * 3 + [10] * 3
    for raw in (30, 10):
        one = main(["--data-dir", str(hand), "--user", str(raw), "-k", "3"])
        got = model_rows[model_rows.raw_user_id == raw]
        assert got["raw_item_id"].tolist() == one["raw_item_id"].tolist()
        assert got["rank"].tolist() == [1, 2, 3]
        np.testing.assert_allclose(got["score"], one["score"], rtol=1e-6)
    fb = df[df.source == "popularity_fallback"]
    assert fb["raw_user_id"].tolist() == [777] * 3


def test_batch_all_every_user(hand, tmp_path):
    out = tmp_path / "all.parquet"
    df = main(["--data-dir", str(hand), "--batch", "all", "--out", str(out), "-k", "2"])
    assert len(df) == 2 * N_USERS and (df.source == "model").all()
    back = pd.read_parquet(out)
    assert back["raw_user_id"].dtype == np.int64 and str(back["year"].dtype) == "Int32"
    train = _train_matrix()
    scores = _scores(_hand_model())
    for u, raw in enumerate(RAW_USERS):
        got = back.loc[back.raw_user_id == raw, "raw_item_id"].tolist()
        assert got == RAW_ITEMS[_expected_top(scores, train, u, 2)].tolist()


# ------------------------------------------------------------------ fold-in

def _ridge(model: BiasedMF, items: np.ndarray, ratings: np.ndarray, lam: float) -> np.ndarray:
    q = model.item_factors.weight.detach().double().numpy()[items]
    x = np.hstack([q, np.ones((len(items), 1))])
    y = (ratings - 3.5) / SCALE - model.item_bias.weight.detach().double().numpy()[items, 0]
    return np.linalg.solve(x.T @ x + lam * np.eye(DIM + 1), x.T @ y)


def test_mf_fold_in_is_the_ridge_solution_and_recommends_from_it(hand, tmp_path, capsys):
    f = tmp_path / "me.csv"
    f.write_text("item,rating\n101,5\n103, 1\n\n# a comment\n105,4.5\n999,3\n")
    df = main(["--data-dir", str(hand), "--ratings", str(f), "-k", "20", "--explain"])
    out = capsys.readouterr().out
    assert "closed form" in out and "skipped 1 item id" in out and "999" in out
    model = _hand_model()
    items, ratings = np.array([0, 2, 4]), np.array([5.0, 1.0, 4.5])
    theta = _ridge(model, items, ratings, L2 * 3)
    scores = 3.5 + SCALE * (model.item_factors.weight.detach().double().numpy() @ theta[:DIM]
                            + theta[DIM] + model.item_bias.weight.detach().double().numpy()[:, 0])
    scores[items] = -np.inf
    want = np.lexsort((np.arange(N_ITEMS), -scores))[: N_ITEMS - 3]
    assert df["raw_item_id"].tolist() == RAW_ITEMS[want].tolist()
    np.testing.assert_allclose(df["score"], scores[want], rtol=1e-5)


@pytest.mark.parametrize("text,where,what", [
    ("101,5\n102\n", ":2:", "expected 2 fields"),
    ("101,5\n102,x\n", ":2:", "is not a number"),
    ("101,5\n102,9\n", ":2:", "outside this dataset's rating scale [1, 5]"),
    ("abc,5\n", ":1:", "is not an integer"),
    ("101 5\n101\t4\n", ":2:", "rated more than once"),
    ("101,5,3,4\n", ":1:", "got 4"),
    ("101,,5\n", ":1:", "an empty field"),
    ("101,x\n102,4\n", ":1:", "is not a number"),
])
def test_bad_ratings_file_lines_name_file_and_line(hand, tmp_path, capsys, text, where, what):
    f = tmp_path / "bad.txt"
    f.write_text(text)
    assert run_main(main, ["--data-dir", str(hand), "--ratings", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"{f}{where}" in err and what in err


def test_ratings_file_with_only_unknown_items_is_an_error(hand, tmp_path, capsys):
    f = tmp_path / "new.tsv"
    f.write_text("item_id\trating\n5000\t4\n")
    assert run_main(main, ["--data-dir", str(hand), "--ratings", str(f)]) == 1
    assert "none of its 1 item ids is known" in capsys.readouterr().err


def test_adam_fold_in_reaches_the_closed_form(hand):
    rec = load_recommender(hand, "mf", torch.device("cpu"))
    train = _train_matrix().tocoo()
    users, items, ratings = train.row, train.col, train.data.astype(np.float64)
    closed = fold_in(rec, users, items, ratings, N_USERS)
    adam = fold_in_adam(rec.model, "explicit", training_l2(rec.meta), users, items, ratings,
                        N_USERS, steps=300, lr=0.05, negatives=1, seed=0)   # the CLI defaults
    np.testing.assert_allclose(_scores(adam.model), _scores(closed.model), atol=1e-4)


def test_adam_fold_in_of_an_implicit_model_ranks_the_given_items_first(tmp_path, capsys):
    torch.manual_seed(0)
    gmf = GMF(N_USERS, N_ITEMS, dim=4, init_std=1.0)
    data = make_artifacts(tmp_path / "d", gmf, "gmf", "implicit", {"dim": 4, "init_std": 1.0})
    rec = load_recommender(data, "gmf", torch.device("cpu"))
    given = np.array([0, 4])
    fold = fold_in(rec, np.zeros(2, np.int64), given, np.ones(2), 1, steps=200, lr=0.1,
                   negatives=4, seed=1)
    with torch.no_grad():
        s = fold.model(torch.zeros(1, 1, dtype=torch.long), torch.arange(N_ITEMS)[None])[0]
    assert "fresh user row" in fold.method and "sampled negatives" in fold.method
    assert s[given].min() > s[np.setdiff1d(np.arange(N_ITEMS), given)].median()
    # the trained model is untouched: same user table as saved
    assert torch.equal(rec.model.user_gmf.weight, gmf.user_gmf.weight)


@pytest.mark.parametrize("name,task,args,tables", [
    ("deepmf", "explicit", {"emb_dim": 4, "hidden": 3, "global_mean": 3.5, "scale": 1.1},
     "user_bias, user_embedding"),
    ("mlp", "implicit", {"layers": [8, 4]}, "user_mlp"),
    ("neumf", "implicit", {"gmf_dim": 3, "layers": [8, 4]}, "user_gmf, user_mlp"),
])
def test_every_model_folds_in_from_a_ratings_file(tmp_path, capsys, name, task, args, tables):
    from models import build_model
    torch.manual_seed(1)
    model = build_model(name, N_USERS, N_ITEMS, **args)
    data = make_artifacts(tmp_path / "d", model, name, task, args)
    f = tmp_path / "me.txt"
    f.write_text("102 4\n107 5\n")
    df = main(["--data-dir", str(data), "--model", name, "--ratings", str(f), "-k", "5",
               "--foldin-steps", "50"])
    out = capsys.readouterr().out
    assert f"optimised a fresh user row ({tables})" in out and "50 Adam steps" in out
    assert len(df) == 5 and not {102, 107} & set(df["raw_item_id"])
    again = main(["--data-dir", str(data), "--model", name, "--ratings", str(f), "-k", "5",
                  "--foldin-steps", "50"])
    pd.testing.assert_frame_equal(df, again)                      # seeded: the same list


# ------------------------------------------------------------------ CLI

def test_help_lists_every_mode():
    proc = run_script("70_recommend.py", "--help")
    for flag in ("--user", "--ratings", "--similar-to", "--batch", "--out", "--explain",
                 "--no-fallback", "-k", "--model", "--data-dir"):
        assert flag in proc.stdout


@pytest.mark.parametrize("argv,what", [
    (["--user", "1", "--similar-to", "2"], "choose exactly one of"),
    ([], "choose exactly one of"),
    (["--batch", "all"], "--batch needs --out"),
    (["--user", "1", "--out", "x.json"], "expected .csv or .parquet"),
    (["--similar-to", "1", "--explain"], "--explain applies to --user and --ratings only"),
    (["--user", "1", "-k", "0"], "-k must be at least 1"),
])
def test_bad_mode_combinations_are_usage_errors(argv, what, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and what in capsys.readouterr().err


# ------------------------------------------------------------------ the real chain on ML-100K

@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> Path:
    """Stages 10-60 (mf, a few quick epochs) on the real MovieLens 100K, run in-process through
    the package mains the numbered scripts call (saves a torch import per stage)."""
    from recpipe import ids, matrix, preprocess, split, train
    from tests.conftest import SHARED_DATA
    src = SHARED_DATA / "movielens" / "ml-100k"
    if not (src / "u.data").exists():
        pytest.skip(f"real data not found at {src} (set RECPIPE_SHARED_DATA to run)")
    d = tmp_path_factory.mktemp("ml100k") / "data"
    threads = torch.get_num_threads()
    try:
        assert run_main(preprocess.main, ["--input", str(src), "--data-dir", str(d)]) == 0
        for stage in (ids, split, matrix):
            assert run_main(stage.main, ["--data-dir", str(d)]) == 0
        assert run_main(train.main, ["--data-dir", str(d), "--model", "mf", "--epochs", "4",
                                     "--lr", "0.01", "--batch-size", "8192", "--dim", "32",
                                     "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return d


@pytest.mark.shared
def test_real_chain_lists_titles_and_never_train_items(ml100k, tmp_path, capsys):
    assert run_main(main, ["--data-dir", str(ml100k), "--model", "mf", "--user", "196"]) == 0
    shown = capsys.readouterr().out
    assert "Top 10 for user 196" in shown and "title" in shown
    out = tmp_path / "all.parquet"
    a = main(["--data-dir", str(ml100k), "--batch", "all", "--out", str(out)])
    b = pd.read_parquet(out)
    assert len(a) == 943 * 10 and len(b) == 943 * 10 and (b.source == "model").all()
    pd.testing.assert_frame_equal(a, main(["--data-dir", str(ml100k), "--batch", "all",
                                           "--out", str(tmp_path / "again.csv")]))
    users = pd.read_parquet(ml100k / "20_make_ids" / "users.parquet")
    items = pd.read_parquet(ml100k / "20_make_ids" / "items.parquet")
    train = sp.load_npz(ml100k / "40_make_sparse_matrix" / "train_implicit.npz").tocsr()
    u = pd.Index(users.raw_user_id).get_indexer(b.raw_user_id)
    i = pd.Index(items.raw_item_id).get_indexer(b.raw_item_id)
    assert (u >= 0).all() and (i >= 0).all()
    assert np.asarray(train[u, i]).ravel().sum() == 0          # no train item recommended
    one = main(["--data-dir", str(ml100k), "--user", "196"])
    assert b[b.raw_user_id == 196].raw_item_id.tolist() == one.raw_item_id.tolist()
    for title in one["title"]:                       # real MovieLens titles, e.g. "Heat (1995)"
        assert title[:TITLE_WIDTH - 3] in shown and title.endswith(")")


@pytest.mark.shared
def test_real_fold_in_of_known_users_matches_their_trained_rows(ml100k):
    """Folding 200 known users in from their own train ratings predicts their test ratings
    about as well as their trained rows do."""
    rec = load_recommender(ml100k, "mf", torch.device("cpu"))
    tr = sp.load_npz(ml100k / "40_make_sparse_matrix" / "train.npz").tocsr()
    te = sp.load_npz(ml100k / "40_make_sparse_matrix" / "test.npz").tocoo()
    users = np.arange(0, rec.n_users, 4)[:200]
    sub = tr[users].tocoo()
    fold = fold_in(rec, sub.row, sub.col, sub.data, len(users))
    assert "closed form" in fold.method
    keep = np.isin(te.row, users)
    row_new = np.searchsorted(users, te.row[keep])
    with torch.no_grad():
        trained = rec.model(torch.as_tensor(te.row[keep]), torch.as_tensor(te.col[keep])).numpy()
        folded = fold.model(torch.as_tensor(row_new), torch.as_tensor(te.col[keep])).numpy()
    truth = te.data[keep]
    rmse_trained = np.sqrt(np.mean((np.clip(trained, 1, 5) - truth) ** 2))
    rmse_folded = np.sqrt(np.mean((np.clip(folded, 1, 5) - truth) ** 2))
    assert rmse_folded < rmse_trained + 0.02, (rmse_folded, rmse_trained)
    assert np.corrcoef(trained, folded)[0, 1] > 0.9
