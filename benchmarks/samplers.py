"""Error vs NFE of every sampler on an exact-score 2-D Gaussian mixture (VP and VE).

Error: energy distance to fresh data samples (V-statistic; the same statistic between two
independent data sets of the same size is the noise floor). Every solver runs at NFE budgets
5, 10, 20, 50 (steps chosen per method so that NFE <= budget where the method allows it; the
table prints the NFE actually used). Also prints the NFE of the adaptive probability-flow ODE
solvers ("rk45", torchdiffeq's dopri5) against scipy's RK45 on the same problem and tolerances.
Usage: python benchmarks/samplers.py [--out docs/figures/samplers_error_vs_nfe.png] [--n 2000]
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
BUDGETS = (5, 10, 20, 50)
# label -> (method, steps for an NFE budget, options)
SOLVERS = {
    "unipc": ("unipc", lambda b: b, {}),
    "dpm3m": ("dpm3m", lambda b: b, {}),
    "dpm2m": ("dpm2m", lambda b: b, {}),
    "dpm_sde": ("dpm_sde", lambda b: b, {}),
    "ddim": ("ddim", lambda b: b, {}),
    "heun": ("heun", lambda b: (b + 1) // 2, {}),
    "ode(rk4)": ("ode", lambda b: max(1, (b - 1) // 4), {"solver": "rk4"}),
    "ode(euler)": ("ode", lambda b: b - 1, {"solver": "euler"}),
    "ddpm": ("ddpm", lambda b: b, {}),
    "pc": ("pc", lambda b: max(1, b // 2), {}),
    "pc(hmc)": ("pc", lambda b: max(1, b // 5), {"corrector": "hmc"}),
    "sde(euler)": ("sde", lambda b: b - 1, {"solver": "euler"}),
    "sde(srk)": ("sde", lambda b: max(1, (b - 1) // 4), {"solver": "srk"}),
    "ald": ("ald", lambda b: max(1, b - 1), {"steps_per_level": 1}),
}
TOLS = (1e-2, 1e-3, 1e-4, 1e-5)


def energy_distance(x, y):
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def scipy_rk45_nfe(fn, sde, x_T, tol):
    """NFE of scipy's RK45 on the same probability-flow ODE (T -> eps) and tolerances (+1 Tweedie step)."""
    from scipy.integrate import solve_ivp

    rsde = sde.reverse(fn, probability_flow=True)
    shape = x_T.shape

    def f(t, y):
        yt = torch.from_numpy(y).reshape(shape)
        return rsde.sde(yt, torch.full((shape[0],), t, dtype=torch.float64))[0].reshape(-1).numpy()

    return solve_ivp(f, (sde.T, sde.default_eps), x_T.double().reshape(-1).numpy(), method="RK45",
                     rtol=tol, atol=tol).nfev + 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/figures/samplers_error_vs_nfe.png")
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = MIX.sample(args.n, generator=torch.Generator().manual_seed(1)).float()
    floor = energy_distance(MIX.sample(args.n, generator=torch.Generator().manual_seed(2)), data)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    print(f"noise floor (data vs data, n={args.n}): energy distance {floor:.4f}")
    for ax, (sname, sde) in zip(axes, {"VP": VPSDE(), "VE": VESDE(sigma_max=10.0)}.items()):
        fn = MIX.score_fn(sde)
        print(f"\n{sname}: energy distance to data (NFE used) at NFE budgets {BUDGETS}")
        print("| solver | " + " | ".join(f"NFE {b}" for b in BUDGETS) + " |")
        print("|---|" + "---|" * len(BUDGETS))
        for k, (label, (method, steps_for, opts)) in enumerate(SOLVERS.items()):
            pts, cells = [], []
            for b in BUDGETS:
                res = sample(fn, sde, (args.n, 2), method, steps=steps_for(b),
                             generator=torch.Generator().manual_seed(0), **opts)
                ed = energy_distance(res.samples, data)
                pts.append((res.nfe, ed))
                cells.append(f"{ed:.4f}" + (f" ({res.nfe})" if res.nfe != b else ""))
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
            ax.loglog(*zip(*pts), "osvD^<>ph*"[k % 10] + "-", color=plt.cm.tab20(k % 20), label=label,
                      lw=2.2 if method in ("unipc", "dpm2m", "dpm3m") else 1.0)
        pts = []
        x_T = sde.prior_sampling((args.n, 2), generator=torch.Generator().manual_seed(0))
        print(f"\n{sname}: adaptive probability-flow ODE, NFE at rtol = atol (incl. the Tweedie step)")
        print("| rtol = atol | rk45 | torchdiffeq dopri5 | scipy RK45 | energy (rk45) |\n|---|---|---|---|---|")
        for tol in TOLS:
            ours = sample(fn, sde, (args.n, 2), "ode", x_T=x_T, rtol=tol, atol=tol, dtype=torch.float64)
            tdq = sample(fn, sde, (args.n, 2), "ode", x_T=x_T, rtol=tol, atol=tol, solver="dopri5", dtype=torch.float64)
            ed = energy_distance(ours.samples, data)
            pts.append((ours.nfe, ed))
            print(f"| {tol:g} | {ours.nfe} | {tdq.nfe} | {scipy_rk45_nfe(fn, sde, x_T, tol)} | {ed:.4f} |", flush=True)
        ax.loglog(*zip(*pts), "k^:", label="ode(rk45, adaptive)")
        ax.axhline(floor, color="k", ls="--", label="noise floor")
        ax.set(title=f"{sname}: exact-score 2-D mixture", xlabel="NFE", ylabel="energy distance to data")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print("saved", args.out)


if __name__ == "__main__":
    main()
