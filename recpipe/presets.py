"""Per-model, per-task defaults ("presets") for stage 60.

A preset fills every training option the user did not give on the command line. The values
were chosen on the VALIDATION split only (never on test); docs/presets.md records, for each
preset, the validation numbers it was chosen on and the commands that produced them.

Units: ``reg`` is the per-sample L2 weight on the embedding rows a batch uses (in the
model's standardised units: explicit models predict (r - mean) / std of the train ratings,
so the same value carries over to another rating scale), and ``reg_power`` (mf explicit)
scales it per row by (the row's train count / its side's mean count) ** -reg_power;
``init_std`` is the standard deviation of the embedding initialisation in the same units;
``batch_size`` counts training samples (for implicit: positives plus their sampled
negatives); 0 means full batch.
"""
from __future__ import annotations

from typing import Any

DEFAULT_MODEL = "mf"        # --model of stages 60 and 70 when not given
# A family's default task is its class attribute ``default_task`` (models.py).

_COMMON: dict[str, Any] = {
    "optimizer": "adam", "momentum": 0.9, "lr_schedule": "plateau", "lr_decay": 0.5,
    "patience": 4, "min_delta": 0.0, "dropout": 0.0, "n_negatives": 4, "hidden": 64,
    "layers": [64, 32, 16, 8], "reg_power": 0.0, "recency_floor": 0.3,
}

# every family trained on (user, item) pairs takes --optimizer auto (train_config.for_data):
# dense Adam on the tables the presets were tuned on (ML-100K, ml-latest-small, ML-1M, the
# demo), lazy row-sparse Adam on Netflix-sized ones, where dense Adam passes over every row at
# every step
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    # min_delta (here and in deepmf's and autorec's rows): chosen on validation, ML-100K,
    # ml-latest-small and the demo (docs/presets.md): mf stops 1.5-2.5x sooner at the same
    # valid RMSE; deepmf and autorec, which stop by overfitting, are unchanged.
    # reg_power 0.5 with reg 0.12 (was 0 with 0.1): chosen on validation, ML-100K,
    # ml-latest-small and the demo, checked on the 10M synthetic set (docs/presets.md)
    ("mf", "explicit"): {"dim": 128, "lr": 1e-2, "batch_size": 2048, "reg": 0.12,
                         "reg_power": 0.5, "init_std": 0.1, "epochs": 60,
                         "optimizer": "auto", "min_delta": 1e-4},
    # --tune on ML-100K validation (docs/presets.md), rounded, checked on ml-latest-small's
    ("deepmf", "explicit"): {"dim": 64, "hidden": 128, "dropout": 0.5, "lr": 4e-3,
                             "batch_size": 2048, "reg": 0.12, "init_std": 0.1, "epochs": 60,
                             "optimizer": "auto", "min_delta": 1e-4},
    ("gmf", "explicit"): {"dim": 32, "lr": 2e-3, "batch_size": 1024, "reg": 0.05,
                          "init_std": 0.1, "epochs": 60, "optimizer": "auto"},
    ("mlp", "explicit"): {"layers": [64, 32, 16, 8], "lr": 1e-3, "batch_size": 1024,
                          "reg": 0.01, "init_std": 0.1, "epochs": 60, "optimizer": "auto"},
    ("neumf", "explicit"): {"dim": 32, "layers": [64, 32, 16, 8], "lr": 1e-3,
                            "batch_size": 1024, "reg": 0.05, "init_std": 0.1, "epochs": 60,
                            "optimizer": "auto"},
    ("mf", "implicit"): {"dim": 32, "lr": 1e-3, "batch_size": 1024, "reg": 1e-4,
                         "init_std": 0.01, "epochs": 30, "optimizer": "auto"},
    ("deepmf", "implicit"): {"dim": 64, "hidden": 32, "lr": 1e-3, "batch_size": 1024,
                             "reg": 1e-4, "init_std": 0.01, "epochs": 30, "optimizer": "auto"},
    ("gmf", "implicit"): {"dim": 16, "lr": 5e-3, "batch_size": 1024, "reg": 0.0,
                          "init_std": 0.01, "epochs": 30, "optimizer": "auto"},
    # --tune on ML-100K loo validation (docs/presets.md), rounded, checked on ml-latest-small's
    ("mlp", "implicit"): {"layers": [128, 64, 32, 16], "dropout": 0.2, "lr": 1.5e-3,
                          "batch_size": 1024, "reg": 5e-4, "n_negatives": 10, "init_std": 0.01,
                          "epochs": 30, "optimizer": "auto", "recency_latest": 5.0},
    # recency_latest: --recency on the splits that hold out each user's latest
    # (holdout.LATEST_HELD_OUT; train_config.resolved), chosen on ML-100K's and
    # ml-latest-small's loo validation (mlp: neumf's value, checked there)
    ("neumf", "implicit"): {"dim": 16, "layers": [64, 32, 16, 8], "lr": 1e-3,
                            "batch_size": 1024, "reg": 0.0, "init_std": 0.01, "epochs": 30,
                            "n_negatives": 8, "optimizer": "auto", "recency_latest": 5.0},
    # closed form: no reg here, so stage 60 chooses it on validation from EASE.reg_grid
    # (recpipe/ease.py); --reg fixes one value. epochs: one fit (per reg candidate)
    ("ease", "implicit"): {"epochs": 1},
    # Gibbs sampling (recpipe/bayes.py): epochs = sweeps (a quarter burn-in), dim = the rank
    # of each sample; no lr and no reg (the chain samples every precision). docs/presets.md
    ("bpmf", "explicit"): {"dim": 16, "init_std": 0.1, "epochs": 200},
    # item kNN on baseline residuals (recpipe/knn.py): dim = k neighbours; no reg here, so
    # stage 60 chooses the shrinkage on validation from ItemKNN.reg_grid (docs/presets.md)
    ("knn", "explicit"): {"dim": 40, "epochs": 1},
    # a stack of trained explicit models, weights fitted on validation (recpipe/blend.py);
    # reg chosen on cross-fitted validation from Blend.reg_grid (docs/presets.md)
    ("blend", "explicit"): {"epochs": 1, "members": ["bpmf", "autorec", "mf", "deepmf", "knn"]},
    ("blend", "implicit"): {"epochs": 1,
                            "members": ["ease", "gmf", "neumf", "mlp", "multvae"]},
    # autoencoders (recpipe/autoencoders.py): batch_size counts ROWS (autorec: items,
    # multvae: users); autorec's reg is the paper's lambda (docs/presets.md)
    ("autorec", "explicit"): {"dim": 500, "lr": 3e-3, "batch_size": 64, "reg": 100.0,
                              "init_std": 0.03, "epochs": 60, "min_delta": 1e-4},
    ("multvae", "implicit"): {"dim": 200, "hidden": 600, "dropout": 0.5, "lr": 3e-3,
                              "batch_size": 100, "reg": 0.0, "epochs": 60},
}


# --optimizer rowsgd (recpipe/kernels.py; what auto picks for mf explicit on the CPU): the
# values that differ from the row above. Its step is lr / sqrt(G) per row (AdaGrad), not
# Adam's, so its learning rate is its own (docs/presets.md: chosen on validation)
ROWSGD: dict[tuple[str, str], dict[str, Any]] = {
    ("mf", "explicit"): {"lr": 0.1},
}


def preset(model: str, task: str) -> dict[str, Any]:
    """The full set of defaults for ``model`` trained on ``task``."""
    if (model, task) not in PRESETS:
        raise KeyError(f"no preset row for model {model!r} and task {task!r} in "
                       f"recpipe/presets.py; add one (see docs/presets.md)")
    return {**_COMMON, **PRESETS[(model, task)]}
