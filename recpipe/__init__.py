"""recpipe: the importable package behind the numbered pipeline scripts.

Where things live: model families in ``models.py`` (the interface they declare:
``family.py``); objectives in ``objectives.py``; scoring (shared by stages 60 and 70) in
``scoring.py``; which metrics on which part in ``evaluation.py`` (their definitions in
``metrics.py``); checkpoints and the device in ``checkpoint.py``; raw formats in
``formats.py`` (the registry) over ``readers/``; split strategies in ``split.STRATEGIES``;
stage folders and manifests in ``artifacts.py`` over the durable writes, folder swaps and
lock of ``durable.py``.

Artifact contract (each stage writes DATA_DIR/<stage>/ and a manifest.json last):

10_preprocessing/
    ratings.parquet  raw_user_id (int64, or string when the source ids are not integers),
                     raw_item_id (same rule), rating float32 (NaN for an interaction kept
                     without a rating, e.g. anime -1 with --keep-unrated), timestamp int64
                     Unix seconds (column present only when the source has times)
    items.parquet    raw_item_id, title (string), year (Int32, nullable); only when the
                     source has titles
    manifest         n_ratings, n_users, n_items, format, dataset, inputs, rating_scale
                     [lo, hi], has_timestamp, n_unrated, counts of dropped rows
20_make_ids/
    ratings.parquet  user_idx int32, item_idx int32, rating float32, [timestamp int64]
    users.parquet    user_idx int32 (row i has user_idx i), raw_user_id, n_ratings int32
    items.parquet    item_idx int32 (row i has item_idx i), raw_item_id, n_ratings int32,
                     [title, year]
    manifest         n_users, n_items, n_ratings, duplicates policy and count, filters
30_split_train_test/
    train/valid/test.parquet  same columns as 20_make_ids/ratings.parquet
    valid_negatives.npy, test_negatives.npy  int32 [rows of that part, N] for the
                     leave-one-out / NCF protocol: row j are the sampled negatives of row j
    manifest         strategy, seed, sizes {train, valid, test}, n_users, n_items, n_negatives,
                     task ("implicit" for the ranking protocols loo/ncf, null for splits
                     that serve either task)
40_make_sparse_matrix/
    train.npz, valid.npz, test.npz   scipy CSR float32 [n_users, n_items], explicit ratings
    train_implicit.npz, ...          the binary view (1.0 per interaction, unrated ones too)
    valid_candidates.npz, test_candidates.npz  (leave-one-out only) users int32 [n],
                     items int32 [n, 1 + N], column 0 the held-out positive
    manifest         n_users, n_items, nnz per part, rating_scale, global_mean and rating_std
                     of the train ratings, n_negatives, task (stage 30's, passed on)
60_train/<model>/
    model.pt (best weights), checkpoint.pt (last epoch, for --resume), history.csv,
    metrics.json, curve.png, manifest.json
"""
__version__ = "0.2.0"
