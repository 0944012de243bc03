"""Data-parallel helpers: single-process behaviour, and two real processes on the CPU (gloo):
distillation ends with identical weights on both ranks, the data is split between them, and
calibration observers all-reduced give both ranks the scales one process gets from all the data."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from passes.distributed import (StridedBatches, all_reduce_, all_reduce_observers, is_distributed, shard,
                                sync_module, world_size, wrap_ddp)

WORLD = 2


# ----------------------------------------------------------------------------- one process

def test_helpers_are_no_ops_in_one_process() -> None:
    assert not is_distributed() and world_size() == 1
    loader = DataLoader(TensorDataset(torch.arange(10.0)), batch_size=4)
    assert shard(loader) is loader
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model) is model
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_(t, "mean") is t and t.tolist() == [1.0, 2.0]
    sync_module(model)  # nothing to do, no error


def test_strided_batches_split_evenly_and_drop_the_ragged_group() -> None:
    batches = list(range(7))
    parts = [list(StridedBatches(batches, r, 3)) for r in range(3)]
    assert parts == [[0, 3], [1, 4], [2, 5]]  # batch 6 alone would leave ranks out of step
    assert [len(StridedBatches(batches, r, 3)) for r in range(3)] == [2, 2, 2]


# ----------------------------------------------------------------------------- two processes

def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@contextmanager
def _process_group(rank: int, store: str) -> Iterator[None]:
    """One gloo process group for a spawned test worker.

    Both ranks meet at a barrier before the group is destroyed, and a worker that succeeded leaves
    with ``os._exit(0)``: a spawned process otherwise finalizes the interpreter and runs gloo's
    static destructors, which now and then abort it ("terminate called without an active
    exception", SIGABRT) after its results are written. A failing worker raises as usual, so
    ``mp.spawn`` reports its traceback."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, store: str, out_dir: str) -> None:
    with _process_group(rank, store):
        _distill_and_calibrate(rank, Path(out_dir))


def _distill_and_calibrate(rank: int, out: Path) -> None:
    from fxcompress.digits import DigitsResNet, load_digits_tensors
    from fxcompress.pass_base import PassContext
    from fxcompress.trace import trace
    from passes.distill import Distill
    from passes.distributed import all_reduce_histogram, all_reduce_min_max, max_abs_difference_across_ranks
    from passes.quantize.calibrate import observe
    from passes.quantize.observers import make_observer

    x, y, _, _ = load_digits_tensors(0)
    x, y = x[:256], y[:256]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = DigitsResNet(width=8).eval()
        student = DigitsResNet(width=4)
    # every rank starts from the same student; a different start on rank 1 would be overwritten by
    # DDP's broadcast from rank 0, so perturb it to prove that
    if rank == 1:
        with torch.no_grad():
            student.fc.weight.add_(1.0)
    gm = trace(student, (x[:2],))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    ctx = PassContext((x[:2],), train_data=loader, original=teacher, seed=0)
    before = gm.get_submodule("conv1").weight.detach().clone()
    result = Distill(epochs=2, lr=5e-3, features=(("layer1_relu_1", "layer1"),)).run(gm, ctx)
    changed = not torch.equal(before, gm.get_submodule("conv1").weight)
    diff = max_abs_difference_across_ranks(gm)

    # each rank sees its own share of the data
    seen = sorted(int(i) for (xb, _) in shard(DataLoader(TensorDataset(torch.arange(10.0), torch.arange(10)),
                                                          batch_size=2, shuffle=True), seed=0)
                  for i in xb.tolist())

    # calibration: each rank observes its shard, then all-reduce; compare with one observer over all
    calib = DataLoader(TensorDataset(x, y), batch_size=32)
    nodes = [n for n in gm.graph.nodes if n.name in ("relu", "layer1_relu_1", "fc")]
    scales: dict[str, list[float]] = {}
    single: dict[str, list[list[float]]] = {}
    merged: dict[str, list[list[float]]] = {}
    for kind in ("minmax", "percentile", "entropy", "moving-average"):
        mine = observe(gm, nodes, lambda n, k=kind: make_observer(k), shard(calib), ctx, batches=0,
                       pass_name="test")
        all_reduce_observers(mine)
        scales[kind] = [mine[n.name].range()[1] for n in nodes]
        if kind != "moving-average":  # order-independent statistics: equal to one pass over all data
            full = observe(gm, nodes, lambda n, k=kind: make_observer(k), calib, ctx, batches=0,
                           pass_name="test")
            single[kind] = [[*full[n.name].range(), int(full[n.name].count)] for n in nodes]
            merged[kind] = [[*mine[n.name].range(), int(mine[n.name].count)] for n in nodes]
    lo, hi = all_reduce_min_max(torch.tensor(float(rank)), torch.tensor(float(rank)))
    hist = all_reduce_histogram(torch.tensor([1.0, float(rank), 0.0]))

    (out / f"rank{rank}.json").write_text(json.dumps({
        "digest": _digest(gm), "max_diff": diff, "changed": changed, "steps": result.stats["steps"],
        "world_size": result.stats["world_size"], "projections": result.stats["projections"],
        "seen": seen, "scales": scales, "single": single, "merged": merged,
        "minmax": [float(lo), float(hi)], "hist": hist.tolist(),
    }))


@pytest.mark.slow
def test_two_gloo_processes_end_identical(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert r0["digest"] == r1["digest"] and r0["max_diff"] == 0.0 == r1["max_diff"]
    assert r0["changed"] and r1["changed"]
    assert r0["world_size"] == 2 and r0["projections"] == 1
    # 256 samples, batch 32, half per rank: 4 steps per epoch, 2 epochs
    assert r0["steps"] == r1["steps"] == 8
    assert sorted(r0["seen"] + r1["seen"]) == list(range(10)) and not set(r0["seen"]) & set(r1["seen"])
    assert r0["scales"] == r1["scales"]
    # min/max, percentile and entropy all-reduced over the two halves equal one pass over all data
    assert r0["merged"] == r0["single"] == r1["merged"] == r1["single"]
    assert r0["merged"]["minmax"][0][2] == 256 // 32
    assert r0["minmax"] == r1["minmax"] == [0.0, 1.0]
    assert r0["hist"] == r1["hist"] == [2.0, 1.0, 0.0]


def _qat_worker(rank: int, store: str, out_dir: str) -> None:
    with _process_group(rank, store):
        import fxcompress as fxc
        from fxcompress.digits import DigitsResNet, load_digits_tensors

        x, y, _, _ = load_digits_tensors(0)
        x, y = x[:256], y[:256]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = DigitsResNet(width=4).eval()
        # each rank calibrates on its own half: the all-reduced scales must still agree
        mine = x[rank * 128:(rank + 1) * 128]
        calib = [mine[i:i + 32] for i in range(0, 128, 32)]
        train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
        qat = "fold-batchnorm,quantize-int8{qat=true},fine-tune{epochs=1,lr=0.005}"
        compiled = fxc.compile(model, (x[:2],), qat, target="fx", calibration=calib, train_data=train, progress=False)
        ptq = fxc.compile(model, (x[:2],), "fold-batchnorm,quantize-int8", target="fx", calibration=calib,
                          progress=False)
        (Path(out_dir) / f"qat{rank}.json").write_text(json.dumps({
            # activation scales are constants in the code, weights and weight scales in the state dict
            "qat": [_digest(compiled.graph_module), compiled.graph_module.code],
            "ptq": [_digest(ptq.graph_module), ptq.graph_module.code],
            "steps": compiled.report.find("fine-tune")[0].stats.get("steps")}))


@pytest.mark.slow
def test_qat_fine_tune_and_ptq_calibration_agree_across_two_processes(tmp_path: Path) -> None:
    """FineTune trains QAT in DistributedDataParallel on each rank's shard and PTQ observers are
    all-reduced: both ranks end with bit-identical weights and scales."""
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    mp.spawn(_qat_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (json.loads((tmp_path / f"qat{r}.json").read_text()) for r in range(WORLD))
    assert r0["qat"] == r1["qat"] and r0["ptq"] == r1["ptq"]
    assert r0["steps"] == r1["steps"] == 4  # 256 samples, batch 32, half per rank, 1 epoch


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([os.path.abspath(__file__), "-q", "-p", "no:randomly"]))
