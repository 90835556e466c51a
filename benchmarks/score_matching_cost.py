"""Cost per example of the noise-free score-matching objectives: one training step (loss, backward)
of ``NoiseFreeMLP`` with implicit (ISM, exact trace: D backward passes), sliced (SSM / SSM-VR:
Jacobian-vector product + double backward) and finite-difference sliced score matching (FD-SSM,
Pang et al. 2020: one forward pass on 2B points, ordinary backward).

    python benchmarks/score_matching_cost.py --dims 2 64 784 --batch-size 256 --repeats 5

Prints the median microseconds per example of each objective for each data dimension D.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgm_lightning.losses import (FDSMLoss, ImplicitScoreMatchingLoss,  # noqa: E402
                                  SlicedScoreMatchingLoss)
from sgm_lightning.nets.mlp import NoiseFreeMLP  # noqa: E402

LOSSES = {
    "ism": ImplicitScoreMatchingLoss,
    "ssm": lambda: SlicedScoreMatchingLoss(variance_reduction=False),
    "ssm_vr": SlicedScoreMatchingLoss,
    "fdsm": FDSMLoss,
}


def step_time(loss, net: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one loss + backward on the batch ``x``."""
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        net.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss(net, x, generator=g).mean().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 64, 784])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-ism-dim", type=int, default=64, help="skip ISM (D backward passes) above this D")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    print(f"{'D':>5} " + " ".join(f"{name:>10}" for name in LOSSES) + "   (us per example, one training step)")
    for dim in args.dims:
        torch.manual_seed(0)
        net = NoiseFreeMLP(dim=dim, hidden_dim=args.hidden_dim)
        x = torch.randn(args.batch_size, dim)
        row = {}
        for name, make in LOSSES.items():
            if name == "ism" and dim > args.max_ism_dim:
                row[name] = float("nan")
                continue
            row[name] = 1e6 * step_time(make(), net, x, args.repeats) / args.batch_size
        results[dim] = row
        print(f"{dim:>5} " + " ".join(f"{row[name]:>10.2f}" for name in LOSSES))
    return results


if __name__ == "__main__":
    main()
