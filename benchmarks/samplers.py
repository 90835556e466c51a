"""Error vs NFE of every sampler on an exact-score 2-D Gaussian mixture (VP and VE).

Error: energy distance to fresh data samples (V-statistic; the same statistic between two
independent data sets of the same size is the noise floor). Every solver runs at NFE budgets
5, 10, 20, 50 (steps chosen per method so that NFE <= budget where the method allows it; the
table prints the NFE actually used). Also prints the NFE of the adaptive probability-flow ODE
solvers ("rk45", torchdiffeq's dopri5) against scipy's RK45 on the same problem and tolerances.
Usage: python benchmarks/samplers.py [--out docs/figures/samplers_error_vs_nfe.png] [--n 2000]

``--forms`` instead compares the two step forms of ``samplers.exponential`` (its module doc): the
exact-kernel multistep form ("kernel") against Lu et al.'s DPM-Solver++ forms ("lu": Alg. 2 for 2M,
their code's 3M and midpoint SDE-2M), on a 2-D Gaussian (exact flow) and the mixture (adaptive ODE,
rtol = atol = 1e-10), VP / VE, 5-50 steps: PF-ODE endpoint error at eps from the same x_T (max and
median over points), and for the SDE step the error of the output mean and std (about 20 s).
"""

from __future__ import annotations

import argparse
import math
from unittest import mock

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from sgm_lightning.analytic import GaussianMixture  # noqa: E402
from sgm_lightning.samplers import exponential  # noqa: E402
from sgm_lightning.samplers.common import CountingScore, Recorder  # noqa: E402
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


def _exp(fn, sde, x_T, steps, order, form, grid, stochastic=False, denoise=False, generator=None):
    return exponential.exp_multistep(CountingScore(fn), sde, x_T.clone(), steps=steps, eps=None, generator=generator,
                                     denoise=denoise, record=Recorder(), order=order, grid=grid,
                                     stochastic=stochastic, form=form)


def _sde_moments(sde, steps, form, grid):
    """SDE-2M on 1-D N(0.7, 0.3) data: the sampler is affine in x_T and the noises (x0_hat is affine),
    so one run on unit inputs gives its exact output law N(b, A^2 prior_std^2 + sum_k B_k^2)."""
    fn = GaussianMixture([1.0], [[0.7]], 0.3).score_fn(sde)
    x_T = torch.zeros(steps + 2, 1, dtype=torch.float64)
    x_T[1] = 1.0
    k = iter(range(steps))

    def unit_noise(x, generator=None):
        z = torch.zeros_like(x)
        z[2 + next(k)] = 1.0
        return z

    with mock.patch.object(exponential, "randn_like", unit_noise):
        out = _exp(fn, sde, x_T, steps, 2, form, grid, stochastic=True, denoise=True)[:, 0]
    return float(out[0]), math.sqrt(float((out[1] - out[0]) ** 2 * sde.prior_std**2 + ((out[2:] - out[0]) ** 2).sum()))


def compare_forms(n=256):
    gauss = GaussianMixture([1.0], [[0.7, -0.7]], 0.3)
    ve = VESDE(sigma_max=10.0)
    cases = [("VP", VPSDE(), "logsnr"), ("VE", ve, "logsnr"), ("VE", ve, "karras")]
    print(f"PF-ODE endpoint error at eps, {n} points from the same x_T (float64): max | median over points of "
          "|x - x_ref|, kernel / lu (ratio kernel / lu > 1: lu more accurate)")
    print("| SDE | grid | data | method | " + " | ".join(f"{b} steps" for b in BUDGETS) + " |")
    print("|---|---|---|---|" + "---|" * len(BUDGETS))
    for sname, sde, grid in cases:
        x_T = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for dname, dist in (("gauss", gauss), ("mixture", MIX)):
            fn = dist.score_fn(sde)
            if dname == "gauss":  # the exact (linear) probability-flow map
                (a0, a1), (s0, s1) = sde.marginal_coeffs(torch.tensor([sde.T, sde.default_eps], dtype=torch.float64))
                mu = dist.means[0]
                ref = a1 * mu + torch.sqrt((a1**2 * 0.3 + s1**2) / (a0**2 * 0.3 + s0**2)) * (x_T - a0 * mu)
            else:
                ref = sample(fn, sde, (n, 2), "ode", x_T=x_T, rtol=1e-10, atol=1e-10, denoise=False).samples
            for order in (2, 3):
                cells = []
                for b in BUDGETS:
                    ek, el = ((_exp(fn, sde, x_T, b, order, f, grid) - ref).norm(dim=1) for f in ("kernel", "lu"))
                    (mk, dk), (ml, dl) = ((e.max().item(), e.median().item()) for e in (ek, el))
                    cells.append(f"{mk:.1e} / {ml:.1e} ({mk / ml:.2f}) \\| {dk:.1e} / {dl:.1e} ({dk / dl:.2f})")
                print(f"| {sname} | {grid} | {dname} | dpm{order}m | " + " | ".join(cells) + " |", flush=True)
    print("\nSDE-2M (dpm_sde), 1-D N(0.7, 0.3), exact output law: |mean - mean_ref| + |std - std_ref| with ref the same"
          " form at 2000 steps, kernel / lu")
    print("| SDE | grid | " + " | ".join(f"{b} steps" for b in BUDGETS) + " |\n|---|---|" + "---|" * len(BUDGETS))
    for sname, sde, grid in cases:
        refs = {f: _sde_moments(sde, 2000, f, grid) for f in ("kernel", "lu")}
        errs = {f: [sum(abs(u - v) for u, v in zip(_sde_moments(sde, b, f, grid), refs[f])) for b in BUDGETS]
                for f in refs}
        print(f"| {sname} | {grid} | " + " | ".join(f"{k:.1e} / {u:.1e} ({k / u:.2f})"
                                                   for k, u in zip(errs["kernel"], errs["lu"])) + " |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/figures/samplers_error_vs_nfe.png")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--forms", action="store_true", help="compare the exponential integrators' step forms and exit")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.forms:
        compare_forms()
        return
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
