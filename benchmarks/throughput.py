"""Training throughput of the library's loop vs a bare inline PyTorch loop, same process, one run.

For each architecture, both loops train a copy of the same initial model on the same resident tensor
of images, with the same optimizer (AdamW) and batch size (the library draws its own batch order).
The library loop is ``fer_core.training.train_one_epoch`` (with its scheduler, loss plumbing and, with
``--augment``, its augmentation); the bare loop is the few lines every tutorial has. Epochs alternate
between the two so that machine noise hits both alike (which goes first alternates too); the median
images/s of each is reported and the ratio library/bare (target >= 0.95, with augmentation off, so
both do the same arithmetic), then the median and quartiles of the per-round ratios, which show how much
of a difference is noise. Every figure is given twice: by wall clock and by the process's CPU time; on a
shared machine other processes take the core away at random moments, which slows wall-clock epochs but
not CPU-time ones (with one torch thread, CPU time is the work done; with more, it includes threads
spinning while they wait).

Run: ``python benchmarks/throughput.py [--n 1024] [--rounds 5] [--threads N] [--arch main ...] [--augment]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from fer_core.config import TrainConfig
from fer_core.models import list_models
from fer_core.training import Trainer, make_optimizer, train_one_epoch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def bare_epoch(model, optimizer, x, y, order, batch_size) -> None:
    """The plain loop: forward, loss, backward, step."""
    model.train()
    for i in range(len(x) // batch_size):
        idx = order[i * batch_size:(i + 1) * batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()


def measure(arch: str, n: int, rounds: int, augment: bool, batch_size: int
            ) -> dict[str, tuple[list[float], list[float]]]:
    """Images per second of (library loop, bare loop) in each round of alternating epochs.

    Two clocks: ``wall`` (perf_counter) and ``cpu`` (this process's CPU time, which other processes on
    a shared machine cannot inflate by taking the core away).
    """
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 48, 48), dtype=np.uint8)
    labels = rng.integers(0, 4, n)
    cfg = TrainConfig(arch=arch, batch_size=batch_size, epochs=rounds + 1, label_smoothing=0.0,
                      aug_strength=1.0 if augment else 0.0, schedule="constant")
    tr = Trainer(cfg, pixels, labels, pixels[:0], labels[:0], 4)
    bare = copy.deepcopy(tr.model)
    bare_opt = make_optimizer(bare, cfg)
    order = torch.randperm(n)
    used = (n // batch_size) * batch_size
    rates = {clock: ([], []) for clock in CLOCKS}
    train_one_epoch(tr)  # warm-up both (allocator, kernels)
    bare_epoch(bare, bare_opt, tr.x, tr.y, order, batch_size)

    def timed(which: int, epoch) -> None:
        start = {clock: fn() for clock, fn in CLOCKS.items()}
        epoch()
        for clock, fn in CLOCKS.items():
            rates[clock][which].append(used / (fn() - start[clock]))

    def lib() -> None:
        timed(0, lambda: train_one_epoch(tr))

    def plain() -> None:
        timed(1, lambda: bare_epoch(bare, bare_opt, tr.x, tr.y, order, batch_size))

    for r in range(rounds):  # who goes first alternates, so neither always follows the other
        for run in ((lib, plain) if r % 2 == 0 else (plain, lib)):
            run()
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1024, help="training images per epoch")
    p.add_argument("--rounds", type=int, default=5, help="timed epochs per loop")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--arch", nargs="*", default=list_models())
    p.add_argument("--augment", action="store_true", help="library loop augments (bare does not)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, n={args.n}, "
          f"batch {args.batch_size}, {args.rounds} alternating epochs, augment={args.augment}")
    print(f"{'arch':10s} {'clock':5s} {'library img/s':>14s} {'bare img/s':>11s} {'ratio':>6s}   "
          "per-round ratio: median [quartiles]")
    for arch in args.arch:
        for clock, (lib, bare) in measure(arch, args.n, args.rounds, args.augment, args.batch_size).items():
            ratio = statistics.median(lib) / statistics.median(bare)
            q1, q2, q3 = np.quantile(np.divide(lib, bare), [0.25, 0.5, 0.75])
            print(f"{arch:10s} {clock:5s} {statistics.median(lib):14.1f} {statistics.median(bare):11.1f} "
                  f"{ratio:6.3f}   {q2:.3f} [{q1:.3f}, {q3:.3f}]", flush=True)


if __name__ == "__main__":
    main()
