"""``--model blend``: a linear stack of trained models, its weights fitted on the validation
split (the Netflix Prize's probe blending), for either task.

The prediction is ``sum_m w_m(u, i) * r_m(u, i)`` plus an intercept, where ``r_m`` is member
``m``'s predicted rating (clipped to the rating scale, as it is scored) and each weight is a
linear function of the pair's support, ``w_m = a_m + b_m * f_u + c_m * f_i`` with ``f`` =
log(1 + train ratings of the user / item), centred: feature-weighted linear stacking (Sill,
Takacs, Mackey & Lin 2009), so that a member that is better for sparse users weighs more
there. The weights are one ridge solve in float64, shrunk toward the members' plain average
(``a_m = 1/M``, everything else 0); the shrinkage ``--reg`` is chosen from ``reg_grid``.

The protocol, which never reads the test split:

- **selection** (what stage 60's validation figure is): the members' models trained on
  train only (their ``selected.pt``; ``model.pt`` of a ``--no-refit`` run) predict the
  validation pairs, and the weights are fitted to those ratings. The validation figure is
  cross-fitted: the validation users are cut into ``FOLDS`` seeded folds, and a user's pairs
  are scored with the weights fitted without their fold (``user_fold``), so it is an
  out-of-sample estimate and ``--reg`` is chosen on it honestly;
- **refit**: the weights fitted on every validation pair (the same files, so the same
  numbers) combine the members' final models (``model.pt``, refitted on train + valid);
  that model scores the test split once. ``--no-refit`` tests the selection's model with
  the cross-fitted weights of each validation user's fold (and the all-validation weights
  for every other user).

**Implicit** (a split with sampled validation candidates: loo, ncf): each member's scores of a
user are standardised over every item (z-scores per user, so that no member's scale
dominates and the score of (u, i) does not depend on which candidates are scored), and the
blend's score is ``sum_m w_m z_m(u, i)``. The weights maximise the validation positives'
log-softmax among their candidates (the positive against its sampled negatives: a listwise
logistic fit, convex, solved by L-BFGS in float64), with ``reg * ||w - 1/M||^2``; the folds,
the cross-fitted validation figure and the refit are as for ratings. Members that score from
interaction rows (EASE, Mult-VAE) get the user's history; EASE's recency weighting is passed
to it (at most one half-life among the members) and the others get the binary rows.

The members are trained first, by stage 60, on the same stage-40 output; the blend refuses a
member trained on another one or for another task, naming the command to run. Scoring, the
fallback of unseen rows, top-k and stage 70 go through the members' own scoring. A new user
(stage 70 ``--ratings``) is folded into each member by the member's own fold-in, with the
member's training L2, and gets the support of their given ratings.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .cli import PipelineError
from .family import Family, family, register
from .objectives import for_task
from .presets import preset

log = logging.getLogger("recpipe")

FOLDS = 5                 # cross-fitting folds of the validation users
FEATURES = 3              # per member: 1, the user's support, the item's support
STAGE40 = "40_make_sparse_matrix"


def _train_command(data_dir: Path, name: str) -> str:
    return f"python 60_train.py --data-dir {data_dir} --model {name}"


def member_dir(data_dir: Path, name: str, task: str, fingerprint: str | None = None) -> Path:
    """DATA_DIR/60_train/NAME after checking that it holds a model of ``task`` trained on this
    stage-40 output (``fingerprint``: its manifest's; None skips that check)."""
    d = Path(data_dir) / "60_train" / name
    man = d / "manifest.json"
    if not man.exists():
        raise PipelineError(f"--model blend: member {name} has no trained model ({man} not "
                            f"found); train it first: `{_train_command(data_dir, name)}`")
    m = json.loads(man.read_text())
    if m.get("task") != task:
        raise PipelineError(f"{man}: member {name} was trained for the {m.get('task')} task, "
                            f"the blend is for the {task} task: `{_train_command(data_dir, name)}"
                            f" --task {task}`")
    got = (m.get("upstream") or {}).get(STAGE40)
    if fingerprint is not None and got != fingerprint:
        raise PipelineError(f"{man}: member {name} was trained on another {STAGE40} output "
                            f"(fingerprint {got}, this data's {fingerprint}); retrain it: "
                            f"`{_train_command(data_dir, name)}`")
    return d


def selection_file(d: Path) -> str:
    """The member's model trained on train only: selected.pt when it was refitted."""
    return "selected.pt" if (d / "selected.pt").exists() else "model.pt"


def _support(counts: torch.Tensor) -> torch.Tensor:
    return torch.log1p(counts.double()).float()


def design(preds: torch.Tensor, fu: torch.Tensor, fi: torch.Tensor) -> torch.Tensor:
    """[B, FEATURES * (1 + M)] stacking inputs of members' predictions ``preds`` [B, M] and
    centred supports ``fu``, ``fi`` [B]: (1, r_1..r_M) times (1, f_u, f_i)."""
    base = torch.cat([torch.ones_like(preds[:, :1]), preds], 1)
    return torch.cat([base, base * fu[:, None], base * fi[:, None]], 1)


def ridge(x: torch.Tensor, y: torch.Tensor, reg: float, prior: torch.Tensor) -> torch.Tensor:
    """argmin_w ||y - x w||^2 + reg * n * ||D (w - prior)||^2, D = 1 except on the intercept
    (column 0), in float64; the penalty grows with the number of rows n so that ``reg`` means
    the same on any validation size."""
    x, y, prior = x.double(), y.double(), prior.double()
    pen = torch.full((x.shape[1],), float(reg) * x.shape[0], dtype=torch.float64,
                     device=x.device)
    pen[0] = 0.0
    a = x.T @ x + torch.diag(pen)
    return torch.linalg.solve(a, x.T @ y + pen * prior)


@register("blend")
class Blend(Family):
    """A linear stack of trained members (module docstring)."""

    default_task = "explicit"
    tasks = ("explicit", "implicit")
    fit_by = "closed_form"
    closed_form_input = "data"           # fit_closed_form gets the whole Data (it reads valid)
    has_item_vectors = False
    reg_grid = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
    options = {"members": "the trained models it combines, each trained first by stage 60 on "
                          "the same data (presets: explicit "
                          + " ".join(preset("blend", "explicit")["members"]) + "; implicit "
                          + " ".join(preset("blend", "implicit")["members"]) + ")",
               "reg": "weight of the stacking fit's penalty toward the members' average "
                      "(chosen on cross-fitted validation from "
                      + ", ".join(map(str, reg_grid)) + ")"}

    def __init__(self, n_users: int, n_items: int, members: list[dict[str, Any]] = (),
                 task: str = "explicit", global_mean: float = 0.0, scale: float = 1.0,
                 sparse: bool = False):
        super().__init__(n_users, n_items, global_mean, scale)
        if not members:
            raise ValueError("blend needs at least one member")
        self.task = task
        self.members = [dict(m) for m in members]
        self.parts = nn.ModuleDict({
            m["name"]: family(m["name"])(n_users, n_items, **{**m["args"], "sparse": False})
            for m in self.members})
        # scored from the history rows when a member is (scoring.py reads ``input``)
        self.input = "rows" if any(p.input == "rows" for p in self.parts.values()) else "pairs"
        self.stack = STACKS[task]              # how this task's members are combined
        n_w = self.stack.n_weights(len(self.members))
        self.score_label = self.stack.label(", ".join(m["name"] for m in self.members))
        # row 0: fitted on every validation pair; row k: without fold k (user_fold == k)
        self.register_buffer("weights", torch.zeros(1 + FOLDS, n_w, dtype=torch.float64))
        self.register_buffer("user_fold", torch.zeros(n_users, dtype=torch.long))
        self.register_buffer("user_support", torch.zeros(n_users))
        self.register_buffer("item_support", torch.zeros(n_items))
        self.register_buffer("support_mean", torch.zeros(2))
        self.register_buffer("bounds", torch.tensor([-float("inf"), float("inf")]))
        self._cache: dict[str, Any] = {}

    @classmethod
    def from_config(cls, hp, task, global_mean, scale, sparse):
        data_dir = Path(hp["data_dir"])
        members = []
        for name in hp.get("members") or preset("blend", task)["members"]:
            if family(name) is cls:
                raise PipelineError("--members: a blend cannot contain a blend")
            d = member_dir(data_dir, name, task)
            meta = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
            members.append({"name": name, "args": dict(meta["model_args"]),
                            "reg": float((meta.get("config") or {}).get("reg") or 0.0)})
        return {"members": members, "task": task, "global_mean": global_mean, "scale": scale}

    def history_half_life(self) -> float:
        """The members' (EASE's ``--recency``; 0: none): the rows are weighted for that
        member, and binarised again for the others (``_history``)."""
        lives = {p.history_half_life() for p in self.parts.values()
                 if p.history_half_life() > 0}
        if len(lives) > 1:
            raise PipelineError(f"--model blend: the members weigh their histories by "
                                f"different recency half-lives {sorted(lives)}; retrain all "
                                f"but one with --recency 0")
        return lives.pop() if lives else 0.0

    def _history(self, part, history: torch.Tensor | None) -> torch.Tensor | None:
        """The rows member ``part`` scores from: the (possibly recency-weighted) history for
        the member with a half-life, its binary pattern for other row members, none for pair
        members."""
        if part.input != "rows" or history is None:
            return None
        if part.history_half_life() > 0:
            return history
        return (history > 0).to(history.dtype)

    # -- fitting ---------------------------------------------------------------------------
    def _load_parts(self, data_dir: Path, fingerprint: str, selection: bool) -> list[str]:
        from .checkpoint import load_model
        dev = self.global_mean.device
        files = []
        for m in self.members:
            d = member_dir(data_dir, m["name"], self.task, fingerprint)
            fname = selection_file(d) if selection else "model.pt"
            model, _ = load_model(d, dev, fname)
            self.parts[m["name"]].load_state_dict(model.state_dict())
            files.append(str(d / fname))
        return files

    def _member_preds(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[B, M] each member's predicted rating of the pairs, fallback included, clipped."""
        from .scoring import predict_pairs
        cols = [predict_pairs(p, users, items).float().clamp(*self.bounds.tolist())
                for p in self.parts.values()]
        return torch.stack(cols, 1)

    @torch.no_grad()
    def fit_closed_form(self, data, hp: dict[str, Any]) -> None:
        """Fit the stacking weights on ``data.valid`` from the members' train-only models
        (module docstring); ``hp["is_refit"]``: then load the members' final models."""
        data_dir, dev = Path(hp["data_dir"]), self.global_mean.device
        self.eval()            # the members score as they are evaluated: no dropout, no noise
        if len(data.valid) == 0:
            raise PipelineError("--model blend fits its weights on the validation split, "
                                "which is empty here; split with a validation part")
        files = self._load_parts(data_dir, data.fingerprint, selection=True)
        reg = float(hp["reg"] if hp.get("reg") is not None else self.reg_grid[0])
        key = "|".join(files)
        if self._cache.get("key") != key:           # once per run, not per --reg candidate
            self._cache = {"key": key, **self.stack.inputs(self, data, hp)}
        c = self._cache
        prior = self.stack.prior(self, c)
        self.weights[0] = self.stack.solve(*c["fit"], reg, prior)
        fold = self._folds(c["users"], int(hp.get("seed") or 0))
        for k in range(1, FOLDS + 1):            # the fit's inputs without fold k's users
            keep = fold != k
            self.weights[k] = self.stack.solve(*(t[keep] for t in c["fit"]), reg, prior)
        if hp.get("is_refit"):
            self.user_fold.zero_()                  # every user: the all-validation weights
            self._load_parts(data_dir, data.fingerprint, selection=False)
            tu, ti = _train_counts(data, self.n_users, self.n_items, False, dev)
            self.user_support.copy_(_support(tu))      # the refit's: train + valid
            self.item_support.copy_(_support(ti))
        w, unit = self.stack.member_weights(self.weights[0], len(self.members))
        log.info("blend of %s, reg %g: weights %s (%s)", " ".join(
            m["name"] for m in self.members), reg, " ".join(f"{x:.3f}" for x in w.tolist()),
            unit)

    def _folds(self, users: torch.Tensor, seed: int) -> torch.Tensor:
        """A seeded fold 1..FOLDS per distinct user of ``users`` (``user_fold``), returned per
        entry of ``users``."""
        vu = torch.unique(users)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        order = torch.randperm(len(vu), generator=gen).to(vu.device)
        self.user_fold.zero_()
        self.user_fold[vu[order]] = torch.arange(len(vu), device=vu.device) % FOLDS + 1
        return self.user_fold[users]

    # -- scoring (the task's stack) ------------------------------------------------------
    def _member_z(self, users: torch.Tensor, history: torch.Tensor | None):
        """Each member's [U, n_items] scores of ``users``, fallback included, as z-scores per
        user over every item."""
        from .scoring import _fallback_all
        for p in self.parts.values():
            s = _fallback_all(p, users, p.score_all(users, self._history(p, history)).float())
            mean, std = s.mean(1, keepdim=True), s.std(1, keepdim=True)
            yield (s - mean) / std.clamp_min(1e-12)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        u, i = torch.broadcast_tensors(users, items)
        shape, u, i = u.shape, u.reshape(-1), i.reshape(-1)
        return self.stack.pairs(self, u, i).view(shape)

    def score_candidates(self, users: torch.Tensor, items: torch.Tensor,
                         history: torch.Tensor | None = None) -> torch.Tensor:
        return self.stack.candidates(self, users, items, history)

    def score_all(self, users: torch.Tensor, history: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """[U, n_items], one member at a time (the block holds two [U, n_items] arrays, not
        the design)."""
        return self.stack.all_items(self, users, self.weights[self.user_fold[users]].float(),
                                    history)

    # -- new users ---------------------------------------------------------------------------
    @torch.no_grad()
    def fold_in(self, objective, reg, users, items, ratings, n_users, steps=300, lr=0.05,
                seed=0):
        """Each member's own fold-in (with its training L2 and objective); the new users'
        support is the number of ratings they gave."""
        out = self.with_user_rows({}, n_users)
        parts, how = {}, []
        for m in self.members:
            p = self.parts[m["name"]]
            obj = for_task(self.task, scale=float(p.scale),
                           n_negatives=getattr(objective, "n_negatives", 4))
            with torch.enable_grad():
                folded, said = p.fold_in(obj, m["reg"], users, items, ratings, n_users,
                                         steps, lr, seed)
            parts[m["name"]] = folded
            how.append(f"{m['name']}: {said}")
        out._modules["parts"] = nn.ModuleDict(parts)
        dev = self.global_mean.device
        counts = np.bincount(np.asarray(users, dtype=np.int64), minlength=n_users)
        out._buffers["user_support"] = _support(torch.from_numpy(counts).to(dev))
        out._buffers["user_fold"] = torch.zeros(n_users, dtype=torch.long, device=dev)
        return out, "blend fold-in, each member's own: " + "; ".join(how)


def softmax_fit(z: torch.Tensor, same: torch.Tensor, reg: float, prior: torch.Tensor
                ) -> torch.Tensor:
    """argmax_w mean_u log softmax(z_u w)[0] - reg * ||w - prior||^2 over candidate rows z
    [U, 1 + N, M] (column 0 the positive; ``same`` [U, N] masks negatives that repeat it),
    by L-BFGS in float64 (the objective is concave in w)."""
    z = z.double()
    neg_mask = torch.cat([torch.zeros_like(same[:, :1]), same], 1)
    w = prior.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        s = (z @ w).masked_fill(neg_mask, -float("inf"))
        loss = -torch.log_softmax(s, 1)[:, 0].mean() + reg * ((w - prior) ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


class RatingStack:
    """Explicit: feature-weighted linear stacking of the members' clipped predicted ratings
    (module docstring): per member FEATURES weights (1, the user's and the item's centred log
    support) plus an intercept's, fitted by ``ridge`` toward the members' plain average."""

    @staticmethod
    def n_weights(n_m: int) -> int:
        return FEATURES * (1 + n_m)

    @staticmethod
    def label(names: str) -> str:
        return f"score = predicted rating, a weighted stack of {names} (not clipped)"

    @staticmethod
    def member_weights(w: torch.Tensor, n_m: int) -> tuple[torch.Tensor, str]:
        return w[1:1 + n_m], "at the mean support"

    @staticmethod
    def inputs(blend: "Blend", data, hp: dict[str, Any]) -> dict[str, Any]:
        """The validation pairs, the members' predictions of them and the supports."""
        dev = blend.global_mean.device
        blend.bounds.copy_(torch.tensor([float(x) for x in data.rating_scale]))
        v = data.valid
        users, items = v.users.to(dev), v.items.to(dev)
        tu, ti = _train_counts(data, blend.n_users, blend.n_items, hp.get("is_refit"), dev)
        return {"preds": blend._member_preds(users, items), "users": users, "items": items,
                "y": v.ratings.to(dev).float(), "support": (_support(tu), _support(ti))}

    @staticmethod
    def prior(blend: "Blend", c: dict[str, Any]) -> torch.Tensor:
        """Sets the blend's supports and their validation means; the members' average."""
        blend.user_support.copy_(c["support"][0])
        blend.item_support.copy_(c["support"][1])
        fu, fi = blend.user_support[c["users"]], blend.item_support[c["items"]]
        blend.support_mean.copy_(torch.stack([fu.mean(), fi.mean()]))
        fu, fi = RatingStack.features(blend, c["users"], c["items"])
        x = design(c["preds"], fu, fi)
        c["fit"] = (x, c["y"])
        n_m = c["preds"].shape[1]
        prior = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        prior[1:1 + n_m] = 1.0 / n_m
        return prior

    solve = staticmethod(ridge)          # over c["fit"] = (design, ratings)

    @staticmethod
    def features(blend: "Blend", users: torch.Tensor, items: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return (blend.user_support[users] - blend.support_mean[0],
                blend.item_support[items] - blend.support_mean[1])

    @staticmethod
    def pairs(blend: "Blend", u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        from .scoring import with_fallback
        lo, hi = blend.bounds.tolist()
        cols = [with_fallback(p, u, i, p.score_pairs(u, i).float()).clamp(lo, hi)
                for p in blend.parts.values()]
        fu, fi = RatingStack.features(blend, u, i)
        w = blend.weights[blend.user_fold[u]].float()
        return (design(torch.stack(cols, 1), fu, fi) * w).sum(1)

    @staticmethod
    def candidates(blend: "Blend", users, items, history) -> torch.Tensor:
        return blend(users[:, None], items)

    @staticmethod
    def all_items(blend: "Blend", users: torch.Tensor, w: torch.Tensor,
                  history: torch.Tensor | None) -> torch.Tensor:
        """sum_m (a_m + b_m f_u + c_m f_i) r_m plus the intercept's terms; ``w`` [U, n_w]."""
        from .scoring import _fallback_all
        lo, hi = blend.bounds.tolist()
        n = 1 + len(blend.members)
        fu = (blend.user_support[users] - blend.support_mean[0])[:, None]
        fi = (blend.item_support - blend.support_mean[1])[None, :]

        def weight(j: int) -> torch.Tensor:                           # [U, n_items]
            return w[:, j, None] + w[:, n + j, None] * fu + w[:, 2 * n + j, None] * fi

        out = weight(0)
        for j, p in enumerate(blend.parts.values(), start=1):
            out += weight(j) * _fallback_all(p, users, p.score_all(users).float()).clamp(lo, hi)
        return out


class RankingStack:
    """Implicit: each member's scores standardised per user over every item, weighted by a
    listwise softmax fit of the validation positives against their sampled candidates
    (``softmax_fit``, module docstring)."""

    @staticmethod
    def n_weights(n_m: int) -> int:
        return n_m

    @staticmethod
    def label(names: str) -> str:
        return f"score = weighted sum of {names}'s scores, each standardised over the items"

    @staticmethod
    def member_weights(w: torch.Tensor, n_m: int) -> tuple[torch.Tensor, str]:
        return w, "of z-scores"

    @staticmethod
    def inputs(blend: "Blend", data, hp: dict[str, Any]) -> dict[str, Any]:
        """The validation candidates and each member's z-scores of them."""
        from .dataset import weighted_history
        from .scoring import users_per_block
        dev = blend.global_mean.device
        if "valid" not in data.candidates:
            raise PipelineError("--model blend on the implicit task fits its weights on the "
                                "validation split's sampled candidates, which this split has "
                                "not (split with --strategy loo or ncf)")
        cu, ci = (t.to(dev) for t in data.candidates["valid"])
        h = blend.history_half_life()
        # the rows the train-only members score validation from: train (stage 40's files
        # when weighted; the refit's train part also holds valid, so take it back out)
        hist = (weighted_history(data, "valid", h) if h > 0
                else _train_only_csr(data, hp.get("is_refit")))
        z = torch.empty(cu.shape[0], ci.shape[1], len(blend.members), device=dev,
                        dtype=torch.float64)
        step = users_per_block(blend.n_items, dev, 0, False)
        ub = cu.cpu().numpy()
        for s in range(0, len(ub), step):
            rows = hist[ub[s:s + step]]
            dense = torch.from_numpy(rows.toarray().astype(np.float32)).to(dev)
            for j, zm in enumerate(blend._member_z(cu[s:s + step], dense)):
                z[s:s + step, :, j] = zm.gather(1, ci[s:s + step]).double()
        # a candidate that repeats the positive's item is not a negative (metrics.py's rule)
        return {"fit": (z, ci[:, 1:] == ci[:, :1]), "users": cu, "items": ci}

    @staticmethod
    def prior(blend: "Blend", c: dict[str, Any]) -> torch.Tensor:
        z = c["fit"][0]
        return torch.full((z.shape[2],), 1.0 / z.shape[2], dtype=torch.float64, device=z.device)

    solve = staticmethod(softmax_fit)    # over c["fit"] = (z-scores, repeats)

    @staticmethod
    def pairs(blend: "Blend", u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        uniq, inv = torch.unique(u, return_inverse=True)   # pair members only (else rows)
        return blend.score_all(uniq)[inv, i]

    @staticmethod
    def candidates(blend: "Blend", users, items, history) -> torch.Tensor:
        return blend.score_all(users, history).gather(1, items)

    @staticmethod
    def all_items(blend: "Blend", users: torch.Tensor, w: torch.Tensor,
                  history: torch.Tensor | None) -> torch.Tensor:
        """sum_m w_m z_m; ``w`` [U, n_w]."""
        out = None
        for j, z in enumerate(blend._member_z(users, history)):
            out = z * w[:, j, None] if out is None else out.add_(z * w[:, j, None])
        return out


STACKS = {"explicit": RatingStack, "implicit": RankingStack}


def _train_counts(data, n_users: int, n_items: int, is_refit: bool, dev
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ratings per user and per item as the selection saw them: the refit's train part
    also holds valid, whose pairs are taken back out."""
    tr, v = data.train, data.valid
    tu = torch.bincount(tr.users.to(dev), minlength=n_users)
    ti = torch.bincount(tr.items.to(dev), minlength=n_items)
    if is_refit:
        tu = tu - torch.bincount(v.users.to(dev), minlength=n_users)
        ti = ti - torch.bincount(v.items.to(dev), minlength=n_items)
    return tu, ti


def _train_only_csr(data, is_refit: bool):
    """The binary train rows of the selection (the refit's train part minus valid)."""
    import scipy.sparse as sp
    if not is_refit and data.train_csr is not None:
        return data.train_csr
    shape = (data.n_users, data.n_items)

    def binary(p):
        return sp.csr_matrix((np.ones(len(p), np.float32), (p.users.cpu().numpy(),
                                                            p.items.cpu().numpy())), shape=shape)
    out = binary(data.train)
    if is_refit:
        out = out - binary(data.valid)
        out.eliminate_zeros()
    out.data[:] = 1.0
    return out.tocsr()
