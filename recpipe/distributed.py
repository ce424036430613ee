"""Stage 60 under ``torchrun``: PyTorch's own collectives (``torch.distributed``), gloo on
the CPU and NCCL on CUDA (chosen by the device, ``--dist-backend`` overrides).

``torchrun --nproc_per_node N 60_train.py ...`` starts N processes (ranks); each reads the
whole stage-40 artifact (it is the size of the ratings) and holds a full replica of the
model and of its optimizer state. docs/distributed.md has the design; in short:

- **Data.** Every rank draws the same permutation of the train pairs each epoch (the run's
  seeded generator, identical on every rank); each global batch of ``--batch-size`` samples
  (the one-process batch: the rule is that N changes the speed, not the optimisation) is cut
  into N contiguous chunks, one per rank. Negatives, dropout and VAE noise are drawn per
  rank from generators seeded by (seed, epoch, rank): reproducible for a given world size,
  and ``--resume`` refuses another world size.
- **Gradients.** Each rank's gradient is weighted by its share of the global batch
  (``share``), so the combined gradient is the one-process gradient of the global batch:
  - tower (dense) weights: one flat all-reduce per step (what DDP does, without its hooks:
    the analytic MF path bypasses autograd, and the embedding tables are handled below);
  - each embedding table, per step: every rank all-gathers (rows it touched, their
    gradients) and sums them; the bytes scale with the rows the step touched, not with the
    table. When that would move more bytes than a dense all-reduce of the table (a small,
    mostly-touched table: ML-100K's items at a large batch) the table is all-reduced
    instead. The choice is made per table and per step from the row counts, which every
    rank sees, so every rank takes the same path. NCCL has no sparse all-reduce; the gather
    works on gloo and NCCL alike.
  Every rank then applies the same update to the same replica (identical optimizer state).
- **Checks.** At every epoch end the ranks compare parameter checksums (``checksums``);
  on the CPU they are bit-identical. On CUDA ``index_add_`` is nondeterministic, so tiny
  differences are possible: they are logged and rank 0's parameters broadcast.
- **Evaluation** is sharded by users (``shard``) and the scores or per-user sums combined,
  so the metrics equal those of one process scoring the same model.
- **Output.** Only rank 0 takes the stage lock and writes files (atomically, manifest last);
  user errors are printed by rank 0 only.

Without torchrun (no ``WORLD_SIZE`` in the environment) ``current()`` is a world of one and
every call here is a no-op.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
from collections import defaultdict
from typing import Any, Sequence

import torch
import torch.distributed as tdist

log = logging.getLogger("recpipe")

BACKENDS = ("auto", "gloo", "nccl")


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher that sets the
    ``torch.distributed`` environment)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def derived_seed(seed: int, epoch: int, rank: int) -> int:
    """A per-(seed, epoch, rank) seed for the draws that differ between ranks."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(rank) * 104_729 + 12_345) % 2**63


class Dist:
    """This process's place in the run (``world`` ranks) and the collectives stage 60 uses.
    ``world == 1`` without torchrun: every method returns its input."""

    def __init__(self, world: int = 1, rank: int = 0, local_rank: int = 0,
                 backend: str | None = None, device: torch.device | None = None):
        self.world, self.rank, self.local_rank = int(world), int(rank), int(local_rank)
        self.backend = backend
        self.device = device or torch.device("cpu")
        self.enabled = backend is not None
        self.stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.steps = 0
        self.checks: list[list[float]] = []

    def new_run(self) -> None:
        """Start the counts of a run afresh (one process may run several: tests)."""
        self.stats.clear()
        self.steps = 0
        self.checks = []

    @property
    def multi(self) -> bool:
        """More than one rank in a joined group: the collectives run."""
        return self.enabled and self.world > 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes files and logs."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """What metrics.json records: world size, backend, devices, bytes per step."""
        per_step = {name: {k: round(v / max(1, self.steps), 1) for k, v in s.items()}
                    for name, s in sorted(self.stats.items())}
        return {"world_size": self.world, "backend": self.backend or "none",
                "devices": self._devices(), "steps": self.steps,
                "per_step": per_step,
                "bytes_per_step": round(sum(s.get("bytes", 0.0) for s in self.stats.values())
                                        / max(1, self.steps), 1),
                "checksums": self.checks}

    def _devices(self) -> list[str]:
        if not self.enabled:
            return [str(self.device)]
        names = [None] * self.world
        tdist.all_gather_object(names, str(self.device))
        return names

    # -- plain collectives ---------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (returns ``t``)."""
        if self.multi:
            tdist.all_reduce(t)
        return t

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's value of ``flag`` on every rank (decisions that depend on the clock)."""
        if not self.multi:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], device=self.device)
        tdist.broadcast(t, 0)
        return bool(t.item())

    def barrier(self) -> None:
        if self.multi:
            if self.backend == "nccl":
                tdist.barrier(device_ids=[self.local_rank])
            else:
                tdist.barrier()

    def shard(self, n: int) -> slice:
        """The positions 0..n-1 this rank evaluates: every world-th one, from its rank."""
        return slice(self.rank, n, self.world) if self.world > 1 else slice(0, n)

    def sharded(self, n: int, score) -> torch.Tensor:
        """``score(sl)`` ([len(sl), ...] values of positions ``sl``) computed for this rank's
        shard, combined into the [n, ...] tensor of every position: the other ranks' rows
        are zeros here and the sum over ranks fills them (x + 0 is exact)."""
        sl = self.shard(n)
        local = score(sl)
        if not self.multi:
            return local
        full = torch.zeros((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
        full[sl] = local
        tdist.all_reduce(full)
        return full

    # -- gradients -------------------------------------------------------------------------
    def _count(self, name: str, nbytes: float, rows: float = 0.0, dense: bool = False) -> None:
        """Per step and table: ``bytes``, the payload of its collective on each rank (an
        all-gather's output, world x the largest chunk; an all-reduce's tensor); ``rows``,
        the rows the ranks contributed (each rank's distinct touched rows, summed);
        ``dense_steps``, the steps it went by dense all-reduce."""
        s = self.stats[name]
        s["bytes"] += nbytes
        s["rows"] += rows
        s["dense_steps"] += 1.0 if dense else 0.0

    def _gather_rows(self, names: Sequence[str], parts: Sequence[tuple[torch.Tensor,
                                                                   torch.Tensor, Any]],
                     sizes: Sequence[int]) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """For each table k: (rows, values, the whole dense gradient or None) of this rank ->
        (distinct rows, summed values)
        over every rank, or (None, dense [sizes[k], ...] sum) when the gather would move
        more bytes than an all-reduce of the whole table (decided from the row counts every
        rank sees, so all ranks take the same path). Four collectives per step whatever the
        number of tables: the counts, then one all-gather of every gathered table's rows,
        one of their values, and one all-reduce of the dense ones."""
        if not parts:
            return []
        dev = parts[0][1].device
        counts = torch.tensor([int(r.numel()) for r, _, _ in parts], dtype=torch.int64,
                              device=dev)
        every = [torch.empty_like(counts) for _ in range(self.world)]
        tdist.all_gather(every, counts)
        every_c = torch.stack(every).cpu()          # [world, tables]
        plan = []                                   # per table: (m, width, dense?)
        for k, ((rows, vals, _), n) in enumerate(zip(parts, sizes)):
            width = tuple(vals.shape[1:])
            row_bytes = int(torch.Size(width).numel()) * vals.element_size()
            m = int(every_c[:, k].max())
            gather_bytes = self.world * m * (row_bytes + 8)
            table_bytes = n * row_bytes
            dense = gather_bytes >= table_bytes
            plan.append((m, width, dense))
            self._count(names[k], table_bytes if dense else gather_bytes,
                        float(every_c[:, k].sum()), dense=dense)
        out: list[Any] = [None] * len(parts)
        # the dense tables: one flat all-reduce
        dense_k = [k for k, p in enumerate(plan) if p[2]]
        if dense_k:
            fulls = []
            for k in dense_k:
                rows, vals, whole = parts[k]
                if whole is None:                   # rows only: spread into the table
                    whole = torch.zeros((sizes[k], *plan[k][1]), dtype=vals.dtype,
                                        device=vals.device).index_add_(0, rows, vals)
                fulls.append(whole)
            flat = torch.cat([f.reshape(-1) for f in fulls])
            tdist.all_reduce(flat)
            off = 0
            for k, f in zip(dense_k, fulls):
                out[k] = (None, flat[off:off + f.numel()].view_as(f))
                off += f.numel()
        gather_k = [k for k, p in enumerate(plan) if not p[2]]
        if gather_k:
            dtype = parts[gather_k[0]][1].dtype
            pad_r, pad_v = [], []
            for k in gather_k:
                rows, vals, _ = parts[k]
                m, width, _ = plan[k]
                r = torch.zeros(m, dtype=torch.int64, device=dev)
                v = torch.zeros((m, *width), dtype=dtype, device=dev)
                r[:rows.numel()] = rows
                v[:rows.numel()] = vals
                pad_r.append(r)
                pad_v.append(v.reshape(-1))
            mine_r, mine_v = torch.cat(pad_r), torch.cat(pad_v)
            got_r = [torch.empty_like(mine_r) for _ in range(self.world)]
            got_v = [torch.empty_like(mine_v) for _ in range(self.world)]
            tdist.all_gather(got_r, mine_r)
            tdist.all_gather(got_v, mine_v)
            off_r = off_v = 0
            for k in gather_k:
                m, width, _ = plan[k]
                w = int(torch.Size(width).numel())
                rs = torch.cat([g[off_r:off_r + int(every_c[r, k])]
                                for r, g in enumerate(got_r)])
                vs = torch.cat([g[off_v:off_v + int(every_c[r, k]) * w].view(-1, *width)
                                for r, g in enumerate(got_v)])
                off_r += m
                off_v += m * w
                uniq, inv = torch.unique(rs, sorted=True, return_inverse=True)
                summed = torch.zeros((uniq.numel(), *width), dtype=dtype, device=dev)
                out[k] = (uniq, summed.index_add_(0, inv, vs))
        return out

    def reduce_grads(self, model: torch.nn.Module, share: float) -> None:
        """After a backward pass on this rank's chunk: every ``.grad`` becomes the gradient
        of the global batch (each rank's weighted by its ``share`` of the batch, summed).
        Embedding tables by (rows, gradients) gather or dense all-reduce (module docstring),
        the other weights by one flat all-reduce."""
        if not self.multi:
            return
        tables = {id(m.weight): name for name, m in _named_tables(model)}
        # the weights without a gradient this step are the same on every rank (the same
        # graph): left without one, as one process would leave them
        dense = [p for p in model.parameters()
                 if id(p) not in tables and p.requires_grad and p.grad is not None]
        if dense:
            flat = torch.cat([p.grad.reshape(-1) for p in dense]).mul_(share)
            tdist.all_reduce(flat)
            self._count("dense weights", flat.numel() * flat.element_size(), dense=True)
            off = 0
            for p in dense:
                k = p.numel()
                p.grad = flat[off:off + k].view_as(p).clone()
                off += k
        names, parts, sizes, params = [], [], [], []
        for name, m in _named_tables(model):
            p = m.weight
            if not p.requires_grad or p.grad is None:    # unused this step, on every rank
                continue
            names.append(name)
            parts.append(_rows_of(p.grad, p, share))
            sizes.append(p.shape[0])
            params.append(p)
        for p, (rows, vals), sparse in zip(params, self._gather_rows(names, parts, sizes),
                                           [p.grad.is_sparse for p in params]):
            if sparse:
                if rows is None:                            # dense sum -> touched rows
                    rows = (vals != 0).any(1).nonzero().squeeze(1)
                    vals = vals.index_select(0, rows)
                p.grad = torch.sparse_coo_tensor(rows[None], vals, p.shape,
                                                 check_invariants=False).coalesce()
            else:
                if rows is None:
                    p.grad = vals
                else:
                    g = torch.zeros_like(p)
                    g.index_copy_(0, rows, vals)
                    p.grad = g
        self.steps += 1

    def reduce_rows(self, updates: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    share: float, names: dict[int, str]
                    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The row-compact gradients of the analytic MF path (``(param, rows, grad_rows)``
        per table, ``optim.RowSparseAdam.step_rows``) combined over ranks: the distinct
        rows of the global batch and their summed gradients. Tables listed with the same
        ``rows`` tensor (a side's factors and bias) travel as one [rows, d + 1] block."""
        if not self.multi:
            return updates
        groups: dict[int, list[int]] = {}
        for k, (_, rows, _) in enumerate(updates):
            groups.setdefault(id(rows), []).append(k)
        gnames, parts, sizes, members = [], [], [], []
        for ks in groups.values():
            p0, rows, _ = updates[ks[0]]
            vals = torch.cat([updates[k][2].reshape(rows.numel(), -1) for k in ks], 1)
            gnames.append(" + ".join(names.get(id(updates[k][0]), "?") for k in ks))
            parts.append((rows if share > 0 else rows[:0],
                          vals.mul(share) if share > 0 else vals[:0], None))
            sizes.append(p0.shape[0])
            members.append(ks)
        out: list[Any] = [None] * len(updates)
        for ks, (rows, vals) in zip(members, self._gather_rows(gnames, parts, sizes)):
            if rows is None:
                rows = (vals != 0).any(1).nonzero().squeeze(1)
                vals = vals.index_select(0, rows)
            off = 0
            for k in ks:
                p, _, g = updates[k]
                w = g.reshape(g.shape[0], -1).shape[1] if g.numel() else \
                    (p.shape[1] if p.dim() > 1 else 1)
                out[k] = (p, rows, vals[:, off:off + w].reshape(rows.numel(), *p.shape[1:]))
                off += w
        self.steps += 1
        return out

    # -- replicas -------------------------------------------------------------------------
    @torch.no_grad()
    def check_replicas(self, model: torch.nn.Module, epoch: int) -> float:
        """Compare the ranks' parameter checksums (float64 sum and sum of squares over every
        parameter and buffer); records them (metrics.json ``checksums``), and when they
        differ (CUDA's nondeterministic index_add_) logs it and broadcasts rank 0's
        tensors. Returns the largest difference from rank 0's checksum."""
        if not self.multi:
            return 0.0
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for t in model.state_dict().values():
            if t.is_floating_point():
                x = t.detach().double()
                total[0] += x.sum()
                total[1] += x.square().sum()
        every = [torch.empty_like(total) for _ in range(self.world)]
        tdist.all_gather(every, total)
        sums = [float(e[0] + e[1]) for e in every]
        self.checks.append(sums)
        diff = max(abs(s - sums[0]) for s in sums)
        if diff > 0:
            log.warning("epoch %d: the %d replicas' parameter checksums differ by %.3g "
                        "(nondeterministic GPU kernels); broadcasting rank 0's parameters",
                        epoch, self.world, diff)
            for t in model.state_dict().values():
                tdist.broadcast(t, 0)
        return diff

    def close(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()
        self.enabled = False


def _named_tables(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    tables = {id(m) for m in getattr(model, "row_sparse_tables", lambda: [])()}
    return [(n, m) for n, m in model.named_children() if id(m) in tables]


def table_names(model: torch.nn.Module) -> dict[int, str]:
    """id(weight) -> table name, for the byte counts of ``reduce_rows``."""
    return {id(m.weight): n for n, m in _named_tables(model)}


def _rows_of(grad: torch.Tensor | None, p: torch.Tensor, share: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(rows, values * share, the whole weighted gradient when it is dense) of a table's
    gradient: a sparse one's coalesced entries, a dense one's nonzero rows (a row a batch
    touched with an exactly zero gradient is the same as untouched for a dense optimizer).
    ``share == 0`` (a rank without samples this step): no rows."""
    if grad is None or share == 0:
        return (torch.zeros(0, dtype=torch.int64, device=p.device),
                p.new_zeros((0, *p.shape[1:])), None)
    if grad.is_sparse:
        g = grad.coalesce()
        return g.indices()[0], g.values() * share, None
    grad.mul_(share)                  # the rank's own gradient tensor: weighted in place
    rows = (grad != 0).any(1).nonzero().squeeze(1)
    return rows, grad.index_select(0, rows), grad


_CURRENT = Dist()


def current() -> Dist:
    """The run's ``Dist`` (a world of one until ``setup`` joins a torchrun group)."""
    return _CURRENT


def setup(backend: str, device: torch.device, timeout_s: float) -> Dist:
    """Join the torchrun group when launched by it (once per process; later calls return
    the same ``Dist``). ``backend`` auto: nccl on CUDA, gloo on the CPU. On CUDA each rank
    uses ``cuda:LOCAL_RANK``. ``timeout_s``: how long a collective waits for a rank that
    stopped answering before this rank fails (and torchrun stops the others)."""
    global _CURRENT
    if _CURRENT.enabled or not launched():
        return _CURRENT
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    name = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    kwargs = {"device_id": device} if name == "nccl" else {}
    tdist.init_process_group(name, timeout=datetime.timedelta(seconds=float(timeout_s)),
                             **kwargs)
    _CURRENT = Dist(world, rank, local, name, device)
    # leave the group before the interpreter exits: a gloo group destroyed with its
    # threads still running aborts the process ("terminate called without an active
    # exception"), which torchrun reports as a failed rank
    atexit.register(_CURRENT.close)
    if rank != 0:
        # rank 0 logs for the run; the others say only what goes wrong on them
        logging.getLogger("recpipe").setLevel(logging.WARNING)
    log.info("torch.distributed: rank %d of %d, backend %s, device %s", rank, world, name,
             device)
    return _CURRENT


def reset() -> None:
    """Leave the group and go back to a world of one (the end of a run; tests)."""
    global _CURRENT
    _CURRENT.close()
    _CURRENT = Dist()
