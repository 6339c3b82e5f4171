"""A compile spread over processes (``ditq_compiler.distributed``): the summation tree and the sharded
draws in one process, then two gloo processes spawned here (no launcher) against one process.

Observers (MSE), TaQ-DiT's channel statistics and TQ-DiT's scale search give bitwise the one-process
artifact; reconstruction agrees to at least 60 dB; a failing rank names itself in every rank's error,
and the blocks rank 0 finished before it resume in a new compile.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import ditq_compiler as dq
from ditq_compiler.calibration import CalibrationSet
from ditq_compiler.calibration.recon_layer import keep_float_mask
from ditq_compiler.distributed import Distributed, subtree_sums, tree_total
from ditq_compiler.quant import QuantSpec
from ditq_compiler.quant.observers import MSEObserver, PercentileObserver, rows_per_qparam
from ditq_compiler.stages import DEFAULT_STAGES, Stage, with_stage
from ditq_compiler.toy import small_dit

WORLD = 2
TIMEOUT_S = 240


# ---- one process: the pieces -------------------------------------------------------------------------

def _tree_of_all(parts: torch.Tensor) -> torch.Tensor:
    """Level by level over all leaves, as one process adds them: (0+1), (2+3), ..., an odd last one carried."""
    values = parts.double()
    while values.shape[0] > 1:
        pairs = values.shape[0] // 2
        values = torch.cat([values[0:2 * pairs:2] + values[1:2 * pairs:2], values[2 * pairs:]])
    return values[0]


@pytest.mark.parametrize("count", [1, 2, 3, 7, 16, 33])
def test_the_ranks_subtree_sums_add_up_to_the_one_process_sum_bit_for_bit(count):
    g = torch.Generator().manual_seed(count)
    scale = torch.logspace(-12, 12, count, dtype=torch.float64)[torch.randperm(count, generator=g)]
    parts = torch.randn(count, 3, generator=g, dtype=torch.float64) * scale[:, None]   # a sum that rounds a lot
    whole = _tree_of_all(parts)
    for ranks in range(1, min(count, 5) + 1):
        shards = [Distributed(rank=r, world_size=ranks).shard(count) for r in range(ranks)]
        nodes = {(k, j): v for s in shards for k, j, v in subtree_sums(parts[s.start:s.stop], s.start, count)}
        assert torch.equal(tree_total(nodes, count), whole)
        assert all(len(subtree_sums(parts[s.start:s.stop], s.start, count)) <= 2 * count.bit_length()
                   for s in shards)


def test_a_minibatch_s_qdrop_mask_is_the_same_split_over_ranks():
    full = keep_float_mask((10, 4, 6), 0.5, torch.Generator().manual_seed(3))
    for ranks in (2, 3):
        generators = [torch.Generator().manual_seed(3) for _ in range(ranks)]
        pieces = []
        for r, g in enumerate(generators):
            rows = Distributed(rank=r, world_size=ranks).split(10)
            pieces.append(keep_float_mask((rows.stop - rows.start, 4, 6), 0.5, g, (10, rows.start, rows.stop)))
        assert torch.equal(torch.cat(pieces), full)
        assert all(torch.equal(g.get_state(), generators[0].get_state()) for g in generators)


class _Placing:
    """Stands in for the process group: collects each rank's buffer; their bit patterns add up."""

    def __init__(self):
        self.buffers = []

    def place(self, buffer):
        self.buffers.append(buffer)
        return buffer


@pytest.mark.parametrize("observer_class", [MSEObserver, PercentileObserver])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_sampled_observers_folded_from_rank_parts_equal_one_process_bit_for_bit(observer_class, granularity):
    """Small samples so that updates are subsampled and the reservoir replaces columns (slots drawn twice)."""
    spec = QuantSpec(8, False, granularity, axis=-1, observer="percentile", percentile=99.0)
    make = lambda: observer_class(spec, max_samples=120, max_samples_per_update=48, seed=5)   # noqa: E731
    g = torch.Generator().manual_seed(0)
    updates = [torch.randn(int(torch.randint(1, 4, (1,), generator=g)), 5, 6, generator=g) * (i + 1)
               for i in range(9)]
    one = make()
    for x in updates:
        one.update(x)
    ranks = [(make(), range(0, 4)), (make(), range(4, 9))]
    placing = _Placing()
    parts = {u: ranks[0 if u < 4 else 1][0].part(updates[u]) for u in range(9)}
    for observer, mine in ranks:
        observer.fold([parts[u].light() for u in range(9)])
        needed = observer.columns_needed(mine)
        columns = {u: rows_per_qparam(updates[u].float(), spec)[0][:, needed[u]] for u in mine}
        observer.settle(columns, placing)
    bits = sum(b.view(torch.int32) for b in placing.buffers).view(torch.float32)
    assert torch.equal(bits, one.samples)
    for observer, _ in ranks:
        observer._reservoir.samples, observer._dist = bits, None    # the clip search's split: the spawned test
        for mine, theirs in zip(observer.compute(), one.compute(), strict=True):
            assert torch.equal(mine, theirs)


# ---- two processes ---------------------------------------------------------------------------------

def _calibration() -> CalibrationSet:
    """32 rows in 8 batches, with the noise the Hessian-guided search needs."""
    g = torch.Generator().manual_seed(11)
    return CalibrationSet("hidden_states", torch.randn(32, 4, 8, 8, generator=g),
                          torch.randint(0, 1000, (32,), generator=g), torch.randint(0, 10, (32,), generator=g),
                          torch.zeros(32, dtype=torch.long), batch_size=4, noise=torch.randn(32, 4, 8, 8, generator=g))


def _recipes() -> dict[str, dq.Recipe]:
    taq = dq.Recipe.load("taq-dit-w4a8")          # MSE observers, shift, migration
    tq = dq.Recipe.from_dict({**dq.Recipe.load("tq-dit-w6a6").to_dict(),
                              "time_groups": {"groups": 2, "sites": ["post_softmax", "post_gelu"]}})
    return {
        "observers-shift": dataclasses.replace(taq, reconstruction=None),
        "scale-search": dataclasses.replace(tq, scale_search=dataclasses.replace(tq.scale_search, eq_n=12, rounds=1)),
        "reconstruction": dataclasses.replace(taq, reconstruction=dataclasses.replace(
            taq.reconstruction, iterations=40, batch_size=8)),
    }


def _failing_stages(rank: int):
    """The reconstruction compile with a stage after it that fails on rank 1 while rank 0 waits for it."""
    def fail_on_rank_1(state):
        if rank == 1:
            raise ValueError("injected failure")
        state.options.distributed.barrier()
    return with_stage(DEFAULT_STAGES, Stage("inject", fail_on_rank_1), after="reconstruct")


def _worker(rank: int, port: int, out: str) -> None:
    """One of the two ranks: the bitwise cases compiled by both ranks (saved by rank 0), the one-process
    references (each rank some of them, to share the work), then the failing compile."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    recipes, out = _recipes(), Path(out)
    for name in ("observers-shift", "scale-search"):
        compiled = dq.compile(small_dit(), recipes[name], _calibration(), progress=False, cache_dir=False)
        compiled.save(out / f"two-{name}")
        (out / f"summary-{rank}.txt").write_text(str(compiled.summary()))
    for name in ("observers-shift", "scale-search") if rank == 0 else ("reconstruction",):
        dq.compile(small_dit(), recipes[name], _calibration(), progress=False, cache_dir=False,
                   distributed=False).save(out / f"one-{name}")
    try:
        dq.compile(small_dit(), recipes["reconstruction"], _calibration(), progress=False,
                   cache_dir=out / "cache", stages=_failing_stages(rank))
    except dq.DistributedError as error:
        (out / f"failure-{rank}.txt").write_text(str(error))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-processes")
    context = mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two ranks did not finish in {TIMEOUT_S} s")
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """The ranks run one thread each; the compile resumed here runs as they do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _files(artifact: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(artifact.iterdir()) if p.name != "run.json"}


@pytest.mark.parametrize("name", ["observers-shift", "scale-search"])
def test_two_processes_write_the_one_process_artifact_bit_for_bit(two_processes, name):
    assert _files(two_processes / f"two-{name}") == _files(two_processes / f"one-{name}")
    two, one = dq.load(two_processes / f"two-{name}"), dq.load(two_processes / f"one-{name}")
    assert two.world_size == WORLD and one.world_size == 1
    assert "calibrated by 2 processes" in str(two.summary())
    assert "calibrated by 2 processes" in (two_processes / "summary-1.txt").read_text()


def test_a_failing_rank_is_named_by_every_rank_and_finished_blocks_resume(two_processes):
    named = "rank 1 of 2 failed in stage 'inject': ValueError: injected failure"
    assert (two_processes / "failure-1.txt").read_text() == named
    assert (two_processes / "failure-0.txt").read_text().startswith(named + " (rank 0 stopped with it")
    resumed = dq.compile(small_dit(), _recipes()["reconstruction"], _calibration(), progress=False,
                         cache_dir=two_processes / "cache")
    assert {"transforms", "observers", "reconstruct-joint-transformer_blocks.0",
            "reconstruct-joint-transformer_blocks.1"} <= set(resumed.resumed_from_cache)
    # what two processes reconstructed (resumed from rank 0's cache) against one process
    one = dq.load(two_processes / "one-reconstruction")
    with torch.no_grad():
        a = torch.cat([one(*args, **kwargs).sample for args, kwargs in _calibration()])
        b = torch.cat([resumed(*args, **kwargs).sample for args, kwargs in _calibration()])
    sqnr = 10 * torch.log10(a.square().sum() / (a - b).square().sum().clamp_min(1e-30))
    assert sqnr >= 60, f"{float(sqnr):.1f} dB"
    assert os.environ.get("DITQ_CACHE_DIR")      # the conftest keeps the default cache out of ~/.cache
