"""A compile spread over several processes with ``torch.distributed``: who this process is, its share of
the work, and the reductions that make every process decide the same.

``compile(..., distributed=True)`` (or a process group already initialised, e.g. by ``torchrun``) runs
every stage on every rank. The work that grows with the calibration set is split:

    observers, channel statistics,    contiguous shards of the calibration batches: rank r of N takes
    scale search                      batches [r B / N, (r + 1) B / N)                          (``shard``)
    reconstruction, distillation      each step's minibatch of m rows, drawn the same on every rank,
                                      in contiguous pieces [r m / N, (r + 1) m / N)              (``split``)

and what a decision needs from all ranks is combined so that every rank takes the same one:

    min, max            ``all_reduce`` MIN / MAX. Exact, so in any order the result is the 1-process one.
    sums that decide    ``ordered_sum``: a sum over calibration rows (or batches) by a fixed binary tree
                        over the row index, level by level, t(k+1, j) = t(k, 2j) + t(k, 2j+1), in float64.
                        Every rank reduces the whole subtrees that lie in its own rows, the ranks exchange
                        those subtree sums (at most 2 log2 R of them each) and every rank finishes the top
                        of the tree. Each addition has the same two operands as in one process, so the
                        result is bitwise the 1-process sum for any number of ranks.
    samples             ``place``: every element of a buffer is written by exactly one rank, the others
                        contribute zeros; an integer ``all_reduce`` SUM of the bit patterns is exact, so
                        every rank gets the bits that one rank wrote.
    gradients           ``sum_gradients``: ``all_reduce`` SUM. Each rank's loss is its rows' share of the
                        minibatch's loss, so the sum is the minibatch gradient; only the order of the float
                        additions differs from one process (trained results agree to a tolerance).

The process group: ``gloo`` for a model on the CPU, ``nccl`` for one on a GPU (``resolve``); the compile
runs its collectives on a group of its own. A rank whose stage raises leaves "rank r failed in stage s:
error" in the process group's store and raises ``DistributedError`` with it; when its process exits, the
others' next collective fails (gloo: the connection closes; torchrun also stops them at once), and they
read the first failure from the store, so every rank's error names the rank that failed and why
(``failure_named``).
"""

from __future__ import annotations

import itertools
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor

_COMPILES = itertools.count()   # every rank compiles in the same order: the n-th compile's store keys


class DistributedError(RuntimeError):
    """The process group cannot be set up, or a rank of it failed (the message names the rank)."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel compile; ``Distributed()`` is a single process."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None                   # "gloo" | "nccl" (None: a single process)
    group: Any = field(default=None, compare=False, repr=False)
    device: torch.device = field(default=torch.device("cpu"), compare=False)   # where collectives run
    tag: str = ""                                # this compile's prefix for the group's store keys

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- shares of the work ------------------------------------------------------------------------
    def shard(self, count: int) -> range:
        """This rank's calibration batches among ``count``: a contiguous range, sizes differing by at most 1."""
        return range(self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size)

    def shard_of(self, rank: int, count: int) -> range:
        return range(rank * count // self.world_size, (rank + 1) * count // self.world_size)

    def split(self, count: int) -> slice:
        """This rank's positions in a minibatch of ``count`` rows."""
        rows = self.shard(count)
        return slice(rows.start, rows.stop)

    # ---- reductions ----------------------------------------------------------------------------------
    def _all_reduce(self, tensor: Tensor, op: Any) -> Tensor:
        import torch.distributed as dist

        work = tensor.detach().to(self.device, copy=True).contiguous()
        dist.all_reduce(work, op=op, group=self.group)
        return work.to(tensor.device)

    def minimum(self, tensor: Tensor) -> Tensor:
        """Elementwise minimum over the ranks (exact)."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        return self._all_reduce(tensor, dist.ReduceOp.MIN)

    def maximum(self, tensor: Tensor) -> Tensor:
        """Elementwise maximum over the ranks (exact)."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        return self._all_reduce(tensor, dist.ReduceOp.MAX)

    def total(self, tensor: Tensor) -> Tensor:
        """Elementwise sum over the ranks, in the backend's order: for figures that decide nothing."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def place(self, tensor: Tensor) -> Tensor:
        """Every rank's writes into a zero buffer, combined: each element must be written by one rank only.

        The bit patterns are summed as integers, so the result is exactly the bits that rank wrote (a
        float sum would turn -0.0 into 0.0)."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        as_int = {4: torch.int32, 8: torch.int64, 2: torch.int16}[tensor.element_size()]
        bits = self._all_reduce(tensor.contiguous().view(as_int), dist.ReduceOp.SUM)
        return bits.view(tensor.dtype)

    def ordered_sum(self, parts: Tensor, start: int, count: int) -> Tensor:
        """The sum of ``count`` leaves by the fixed tree (module docstring), this rank holding leaves
        ``[start, start + len(parts))`` (``parts[i]`` is leaf ``start + i``; float64)."""
        return self.ordered_sums([parts], start, count)[0]

    def ordered_sums(self, parts: Iterable[Tensor], start: int, count: int) -> list[Tensor]:
        """``ordered_sum`` of each item of ``parts`` (all over the same leaves), with one exchange for all."""
        nodes = [subtree_sums(p, start, count) for p in parts]
        if self.active:
            everyone = self.gather([[(k, j, v.cpu()) for k, j, v in n] for n in nodes])   # [rank][item]
            nodes = [[node for rank_nodes in item for node in rank_nodes] for item in zip(*everyone, strict=True)]
        return [tree_total({(k, j): v for k, j, v in n}, count) for n in nodes]

    def sum_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the ranks (one flat ``all_reduce``)."""
        if not self.active or not parameters:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = self.total(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p, g in zip(parameters, grads, strict=True):
            p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()

    def broadcast_tensors(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` (in place) with rank ``src``'s values."""
        if not self.active or not tensors:
            return
        import torch.distributed as dist

        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64) for t in tensors])
            dist.broadcast(flat, src=self._global(src), group=self.group)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view(t.shape).to(t.dtype))
                offset += t.numel()

    # ---- objects --------------------------------------------------------------------------------------
    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def _global(self, rank: int) -> int:
        import torch.distributed as dist

        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    # ---- failures ---------------------------------------------------------------------------------------
    @contextmanager
    def failure_named(self, stage: str) -> Iterator[None]:
        """Run a stage; if it raises, the error names the rank that failed first and its error.

        The failing rank writes ``rank r failed in stage s: error`` to the process group's store; ranks
        whose collective then breaks read that first failure and report it rather than their broken
        connection."""
        try:
            yield
        except Exception as error:
            if not self.active:
                raise
            mine = f"rank {self.rank} of {self.world_size} failed in stage '{stage}': " \
                   f"{type(error).__name__}: {' '.join(str(error).split())}"
            first = self._record_failure(mine)
            self.close()
            if first == mine:
                raise DistributedError(mine) from error
            raise DistributedError(f"{first} (rank {self.rank} stopped with it: {type(error).__name__})") from error

    def _record_failure(self, message: str) -> str:
        """The first failure recorded in the store (this one, if no rank recorded one before)."""
        store = _default_store()
        if store is None or not self.tag:
            return message
        key = f"{self.tag}/failed"
        try:
            if store.add(f"{key}/count", 1) == 1:
                store.set(key, message)
            return store.get(key).decode()
        except Exception:   # the store itself is gone (its host, rank 0, exited): name this rank's failure
            return message

    def close(self) -> None:
        """Destroy the compile's own process group (the user's default group is left as it was)."""
        if self.active and self.group is not None:
            import torch.distributed as dist

            try:
                dist.destroy_process_group(self.group)
            except Exception:   # already destroyed, or the backend is gone
                pass


SINGLE = Distributed()


# ---- the fixed summation tree ---------------------------------------------------------------------------

def subtree_sums(parts: Tensor, start: int, count: int) -> list[tuple[int, int, Tensor]]:
    """The whole subtrees (level k, index j) that lie in leaves ``[start, start + len(parts))`` of the tree over
    ``count`` leaves, and are not inside a larger one that does, with their sums.

    Level 0 holds the leaves; node (k + 1, j) = node (k, 2j) + node (k, 2j + 1), or node (k, 2j) alone
    when it has no right sibling; node (k, j) covers leaves [j 2^k, min((j + 1) 2^k, count)).
    """
    parts = parts.to(torch.float64)
    lo, hi = start, start + parts.shape[0]
    if hi > count or lo < 0:
        raise ValueError(f"leaves [{lo}, {hi}) outside a tree of {count}")
    found: list[tuple[int, int, Tensor]] = []
    level, width, values = 0, count, parts          # width: nodes on this level; values: nodes [lo, hi)
    while hi > lo:
        if width == 1:                               # the root lies inside
            found.append((level, 0, values[0]))
            break
        p_lo = (lo + 1) // 2                         # first parent whose children both lie inside
        p_hi = (hi + 1) // 2 if hi == width else hi // 2
        if p_lo >= p_hi:
            found.extend((level, lo + i, values[i]) for i in range(hi - lo))
            break
        found.extend((level, lo + i, values[i]) for i in range(2 * p_lo - lo))
        found.extend((level, j, values[j - lo]) for j in range(2 * p_hi, hi))
        pairs = min(p_hi, width // 2) - p_lo          # parents with two children
        inner = values[2 * p_lo - lo: 2 * p_lo - lo + 2 * pairs]
        parents = inner[0::2] + inner[1::2]
        if p_hi > p_lo + pairs:                      # the last node of the level, alone
            parents = torch.cat([parents, values[2 * (p_lo + pairs) - lo:][:1]])
        level, width, lo, hi, values = level + 1, (width + 1) // 2, p_lo, p_hi, parents
    return found


def tree_total(nodes: dict[tuple[int, int], Tensor], count: int) -> Tensor:
    """The root of the tree over ``count`` leaves from subtree sums covering every leaf exactly once."""
    if count == 0:
        raise ValueError("an ordered sum over no leaves")
    top = math.ceil(math.log2(count)) if count > 1 else 0

    def node(level: int, j: int) -> Tensor:
        if (level, j) in nodes:
            return nodes[(level, j)]
        if level == 0:
            raise ValueError(f"leaf {j} of {count} is in no rank's part")
        width = math.ceil(count / 2 ** (level - 1))
        left = node(level - 1, 2 * j)
        return left + node(level - 1, 2 * j + 1) if 2 * j + 1 < width else left

    return node(top, 0)


# ---- setting up --------------------------------------------------------------------------------------

def _default_store() -> Any:
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:   # no default group, or a torch without this helper: failures name their own rank
        return None


def launched_by_torchrun() -> bool:
    """True when the environment says this process is one of several (``torchrun`` sets these)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def resolve(distributed: bool | Distributed | None, device: torch.device | str = "cpu") -> Distributed:
    """``compile``'s ``distributed=``: a ``Distributed`` as given; False: one process; None: the initialised
    process group if it has several ranks, else one process; True: that group, initialising it from
    ``torchrun``'s environment when none is (``gloo`` for a CPU ``device``, ``nccl`` for a GPU)."""
    if isinstance(distributed, Distributed):
        return distributed
    if distributed is False:
        return SINGLE
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None and not (initialised and dist.get_world_size() > 1):
        return SINGLE
    if not initialised:
        init_from_environment(device)
    return open_group()


def init_from_environment(device: torch.device | str = "cpu") -> Distributed:
    """The default process group, initialised from ``torchrun``'s environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) if it is not yet: ``gloo`` for a CPU ``device``, ``nccl`` (on GPU LOCAL_RANK) for a GPU."""
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("a distributed compile needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise DistributedError("distributed=True needs a process group: launch with torchrun "
                                   "(torchrun --nproc-per-node N script.py) or call "
                                   "torch.distributed.init_process_group() before compile()")
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return default_group()


def open_group() -> Distributed:
    """A ``Distributed`` on a new group of every rank of the default one (a collective: all ranks call it)."""
    import torch.distributed as dist

    backend = str(dist.get_backend())
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    group = dist.new_group(backend=backend)
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(), backend=backend, group=group,
                       device=device, tag=f"ditq/compile{next(_COMPILES)}")


def default_group() -> Distributed:
    """The initialised default process group (no group of the compile's own), or a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(), backend=backend, device=device)


def model_device(model: torch.nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


__all__ = ["SINGLE", "Distributed", "DistributedError", "default_group", "init_from_environment",
           "launched_by_torchrun", "model_device", "open_group", "resolve", "subtree_sums", "tree_total"]
