"""Error vs NFE of every sampler on an exact-score 2-D Gaussian mixture (VP and VE).

Error: energy distance to fresh data samples (V-statistic, with the same statistic between two
independent data sets of the same size as the noise floor) and |mode weight - 0.8|.
Usage: python benchmarks/samplers.py [--out benchmarks/samplers.png] [--n 2000]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from sgm_lightning.analytic import GaussianMixture  # noqa: E402
from sgm_lightning.sampling import sample  # noqa: E402
from sgm_lightning.sde import VESDE, VPSDE  # noqa: E402

MIX = GaussianMixture([0.2, 0.8], [[-1.5, 0.5], [1.0, -0.5]],
                      [[[0.05, 0.0], [0.0, 0.05]], [[0.12, 0.03], [0.03, 0.08]]])
RUNS = {
    "pc": [("pc", s, {}) for s in (25, 100, 400)],
    "pc(P only)": [("pc", s, {"corrector": "none"}) for s in (50, 200, 1000)],
    "pc(per-example snr)": [("pc", s, {"snr_norm": "example"}) for s in (25, 100, 400)],
    "ddpm": [("ddpm", s, {}) for s in (50, 200, 1000)],
    "ddim": [("ddim", s, {}) for s in (10, 25, 100)],
    "ode(dopri5)": [("ode", None, {"rtol": r, "atol": r}) for r in (1e-2, 1e-3, 1e-5)],
    "heun": [("heun", s, {}) for s in (6, 10, 18)],
    "ald": [("ald", s, {"steps_per_level": k}) for s, k in ((10, 20), (10, 100), (30, 50))],
}


def energy_distance(x, y):
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/samplers.png")
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = MIX.sample(args.n, generator=torch.Generator().manual_seed(1)).float()
    floor = energy_distance(MIX.sample(args.n, generator=torch.Generator().manual_seed(2)), data)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    print(f"noise floor (data vs data, n={args.n}): energy distance {floor:.4f}")
    print(f"{'sde':4} {'sampler':22} {'NFE':>6} {'energy':>8} {'|w-0.8|':>8}")
    for ax, (sname, sde) in zip(axes, {"VP": VPSDE(), "VE": VESDE(sigma_max=10.0)}.items()):
        for label, runs in RUNS.items():
            pts = []
            for method, steps, opts in runs:
                res = sample(MIX.score_fn(sde), sde, (args.n, 2), method, steps=steps,
                             generator=torch.Generator().manual_seed(0), **opts)
                ed = energy_distance(res.samples, data)
                w = MIX.responsibilities(res.samples).argmax(1).double().mean().item()
                pts.append((res.nfe, ed))
                print(f"{sname:4} {label:22} {res.nfe:6d} {ed:8.4f} {abs(w - 0.8):8.3f}", flush=True)
            ax.loglog(*zip(*pts), "o-", label=label)
        ax.axhline(floor, color="k", ls="--", label="noise floor")
        ax.set(title=f"{sname}: exact-score 2-D mixture", xlabel="NFE", ylabel="energy distance to data")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("saved", args.out)


if __name__ == "__main__":
    main()
