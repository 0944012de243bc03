"""Distillation on several processes: prune a digits CNN by half and repair it by distilling from
the original model, with the training split over processes (DistributedDataParallel).

    python examples/distill_ddp.py                            # one process
    torchrun --nproc-per-node 2 examples/distill_ddp.py       # two processes (CPU: gloo; GPUs: nccl)
    torchrun --nproc-per-node 2 examples/distill_ddp.py --quick   # tiny sizes, seconds (what CI runs)

Under ``torchrun`` the ``distill`` pass wraps the student in DistributedDataParallel and gives each
process its share of ``train_data`` (a DistributedSampler); at the end every process holds the same
weights, which the script checks. Nothing in the pipeline changes between one and several processes.
Rank 0 trains the teacher and broadcasts it (in practice: every rank loads the same checkpoint).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import fxcompress as fxc
from fxcompress.digits import DigitsResNet, accuracy, digits_loaders, train_classifier
from passes.distributed import (barrier, broadcast_module, is_main_process, max_abs_difference_across_ranks, rank,
                                world_size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and few epochs (seconds)")
    parser.add_argument("--epochs", type=int, default=None, help="distillation epochs (default 5, --quick 3)")
    parser.add_argument("--out", type=Path, default=None, help="save the compiled artifact here (rank 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def init_distributed(device: str) -> bool:
    """Join the process group ``torchrun`` describes in the environment (no-op when run plainly)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def say(*args: object) -> None:
    if is_main_process():
        print(*args, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = init_distributed(args.device)
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if args.device.startswith("cuda") else "cpu"
    try:
        torch.set_num_threads(1)
        width, teacher_epochs = (16, 3) if args.quick else (32, 6)
        epochs = args.epochs or (3 if args.quick else 5)
        data = digits_loaders(batch_size=64, seed=0)

        torch.manual_seed(0)
        teacher = DigitsResNet(width=width)
        if is_main_process():
            train_classifier(teacher, data.train, epochs=teacher_epochs, seed=0)
        broadcast_module(teacher.eval())
        base = accuracy(teacher, data.test)
        say(f"{world_size()} process(es); teacher DigitsResNet(width={width}): "
            f"{base:.2%} on the digits test set")

        passes = f"prune-channels{{ratio=0.5}},distill{{epochs={epochs},lr=0.01,temperature=4,alpha=0.7}}"
        example = next(iter(data.test))[0][:1]
        t0 = time.perf_counter()
        compiled = fxc.compile(teacher, (example,), passes, target="onnxruntime", train_data=data.train,
                               device=device, progress=is_main_process())
        seconds = time.perf_counter() - t0
        diff = max_abs_difference_across_ranks(compiled.graph_module)
        (row,) = compiled.report.find("distill")
        after = accuracy(compiled, data.test)
        say(compiled.report)
        say(f"distill: {row.stats['steps']} steps per process on 1/{row.stats['world_size']} "
            f"of the data each, {seconds:.1f} s for the whole compile")
        say(f"accuracy: original {base:.2%}, pruned + distilled (ONNX Runtime) {after:.2%}; "
            f"params {compiled.report[0].params} -> {compiled.report[-1].params}")
        say(f"largest weight difference between processes: {diff:g}")
        if args.out is not None and is_main_process():
            say(f"saved to {compiled.save(args.out)}/")
        barrier()  # every process done before the group is torn down
        if diff != 0.0:
            print(f"rank {rank()}: weights differ from rank 0 by {diff:g}", flush=True)
            return 1
        return 0
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
