"""Edge cases of ``sampling.sample`` and the SDEs found by a held-out-style audit: option values of
the wrong type, NumPy scalars, float64 start points, score functions in another dtype, and the
cosine schedule's coefficients for float32 times."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.sampling import sample
from sgm_lightning.sde import SubVPSDE, VESDE, VPSDE

SDE = VPSDE()
GM = GaussianMixture([1.0], [[0.5, -1.0]], [[[0.3, 0.1], [0.1, 0.2]]])
FN = GM.score_fn(SDE)


@pytest.mark.parametrize("method,options,name", [
    # values that are not numbers: a ValueError naming the option, not a TypeError from a comparison
    ("pc", {"snr": "0.16"}, "snr"),
    ("ode", {"rtol": "1e-3"}, "rtol"),
    ("sde", {"atol": None}, "atol"),
    ("heun", {"rho": "7"}, "rho"),
    ("heun", {"s_tmax": "1"}, "s_tmax"),
    ("heun", {"s_noise": "1"}, "s_noise"),
    ("ald", {"step_lr": "2e-5"}, "step_lr"),
    # flags: bool("False") is True, so a string would silently turn the option on
    ("ddim", {"denoise": "False"}, "denoise"),
    ("ddpm", {"return_trajectory": "no"}, "return_trajectory"),
    ("sde", {"adaptive": "no"}, "adaptive"),
    # x_T that is not a tensor: checked before its device is read
    ("ddim", {"x_T": [[0.0, 0.0]] * 4}, "x_T"),
    # a seed where a generator belongs
    ("ddim", {"generator": 0}, "torch.Generator"),
])
def test_bad_option_values_name_the_option(method, options, name):
    options = dict(options)
    generator = options.pop("generator", None)
    with pytest.raises(ValueError, match=name):
        sample(FN, SDE, (4, 2), method, steps=3, generator=generator, **options)


@pytest.mark.parametrize("method,option,value", [("ddim", "eps", 1e-3), ("ddim", "eta", 0.5),
                                                 ("pc", "hmc_persistence", 0.5)])
def test_numpy_scalars_are_numbers(method, option, value):
    """A NumPy float32 option gives bitwise the samples of the same value as a Python float."""
    extra = {"corrector": "hmc", "hmc_leapfrog": 1} if option == "hmc_persistence" else {}
    runs = [sample(FN, SDE, (4, 2), method, steps=4, generator=torch.Generator().manual_seed(0),
                   **{option: v}, **extra).samples for v in (np.float32(value), float(np.float32(value)))]
    assert torch.equal(*runs)


@pytest.mark.parametrize("method", ["ddim", "heun", "dpm2m", "sde"])
def test_float64_start_point_stays_float64(method):
    """x_T in float64 without dtype: float64 samples, the score sees float64 (as with dtype=float64)."""
    seen = set()

    def fn(x, t):
        seen.add((x.dtype, t.dtype))
        return FN(x, t)

    x_T = SDE.prior_sampling((5, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = sample(fn, SDE, (5, 2), method, steps=4, x_T=x_T, generator=torch.Generator().manual_seed(2)).samples
    assert a.dtype == torch.float64 and seen == {(torch.float64, torch.float64)}
    b = sample(FN, SDE, (5, 2), method, steps=4, x_T=x_T, dtype=torch.float64,
               generator=torch.Generator().manual_seed(2)).samples
    assert torch.equal(a, b)
    c = sample(FN, SDE, (5, 2), method, steps=4, x_T=x_T, dtype=torch.float32,
               generator=torch.Generator().manual_seed(2)).samples
    assert c.dtype == torch.float32  # an explicit dtype still wins


@pytest.mark.parametrize("method", ["pc", "ddpm", "ode", "heun", "ald", "unipc", "sde"])
def test_score_in_another_dtype_does_not_change_the_samples_dtype(method):
    """A score_fn answering in float64 for float32 x: samples stay float32, every call sees float32 x,
    and the samples are bitwise those of the same score returned in float32."""
    seen = set()

    def fn64(x, t):
        seen.add(x.dtype)
        return GM.score(x.double(), SDE, t)  # float64 out

    kw = {"steps_per_level": 2} if method == "ald" else {}
    a = sample(fn64, SDE, (4, 2), method, steps=3, generator=torch.Generator().manual_seed(0), **kw).samples
    b = sample(FN, SDE, (4, 2), method, steps=3, generator=torch.Generator().manual_seed(0), **kw).samples
    assert a.dtype == torch.float32 and seen == {torch.float32}
    assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [VPSDE, SubVPSDE])
def test_cosine_schedule_float32_times(cls):
    """The cosine schedule in float32 t agrees with float64 t to float32 precision at every t, small t
    included (log cos(phi) - log cos(phi0) cancelled: sigma off by 6 % at t = 1e-6, sub-VP's g too),
    and its float64 values are the closed form alpha^2 = cos^2(phi(t)) / cos^2(phi(0))."""
    sde = cls(schedule="cosine")
    t32 = torch.tensor([1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 0.9, 0.999, 1.0])
    t64 = t32.double()
    for coeffs in (sde.marginal_coeffs, sde.drift_coeff_and_diffusion):
        for lo, hi in zip(coeffs(t32), coeffs(t64)):
            assert lo.dtype == torch.float32
            rel = ((lo.double() - hi).abs() / hi.abs()).max().item()
            assert rel < 2e-5, (coeffs.__name__, rel)
    s, m = sde.cosine_s, sde.cosine_tmax_margin
    t = torch.linspace(0.05, 1.0, 20, dtype=torch.float64)
    phi = lambda u: (u * (1 - m) + s) / (1 + s) * math.pi / 2  # noqa: E731
    alpha2 = (torch.cos(phi(t)) / math.cos(phi(0.0))) ** 2
    torch.testing.assert_close(sde.marginal_coeffs(t)[0] ** 2, alpha2, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("method,options,fix", [
    ("ddim", {"step": 10}, "did you mean 'steps'"),  # the named arguments were missing from the allowed list
    ("pc", {"corector": "none"}, "did you mean 'corrector'"),
    ("ddpm", {"eta": 1.0}, "option of method=ddim"),
    ("ddim", {"seed": 0}, r"generator=torch\.Generator\(\)\.manual_seed"),
])
def test_unknown_option_error_names_the_fix(method, options, fix):
    with pytest.raises(ValueError, match=fix):
        sample(FN, SDE, (4, 2), method, **options)


def test_prior_bad_input_names_the_problem():
    """prior_sampling(4) / prior_sampling(shape, generator=0) / prior_logp(0-d) raised TypeError /
    AttributeError / IndexError naming nothing."""
    with pytest.raises(ValueError, match="shape must be a tuple"):
        SDE.prior_sampling(4)
    with pytest.raises(ValueError, match=r"manual_seed"):
        SDE.prior_sampling((4, 2), generator=0)
    with pytest.raises(ValueError, match=r"shape \(B, \.\.\.\)"):
        SDE.prior_logp(torch.tensor(0.5))


@pytest.mark.parametrize("make, kwargs, name", [
    (lambda **kw: VPSDE(**kw), {"beta_min": "abc"}, "beta_min"),
    (lambda **kw: SubVPSDE(**kw), {"beta_max": None}, "beta_max"),
    (lambda **kw: VESDE(**kw), {"sigma_max": "50"}, "sigma_max"),
    (lambda **kw: VPSDE(schedule="cosine", **kw), {"cosine_s": "s"}, "cosine_s"),
])
def test_sde_constructor_refuses_text_for_a_number(make, kwargs, name):
    """VPSDE(beta_min="abc") raised TypeError "'>' not supported" naming nothing."""
    with pytest.raises(ValueError, match=f"{name} must be a number > 0"):
        make(**kwargs)


@pytest.mark.parametrize("solver,steps", [("euler", 5), ("srk", 3), ("milstein", 2)])
def test_sde_method_reports_every_step(solver, steps):
    """method="sde" called the callback (and filled the trajectory) once, at the end, whatever the
    number of steps. Now once per step, t decreasing from T to eps, without changing the samples."""
    seen = []
    kw = dict(steps=steps, solver=solver, denoise=False)
    a = sample(FN, SDE, (3, 2), "sde", generator=torch.Generator().manual_seed(0), return_trajectory=True,
               callback=lambda i, t, x: seen.append((i, t, x.clone())), **kw)
    b = sample(FN, SDE, (3, 2), "sde", generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a.samples, b.samples) and a.nfe == b.nfe
    assert [i for i, _, _ in seen] == list(range(steps)) and len(a.trajectory) == steps
    times = [t for _, t, _ in seen]
    assert times[-1] == SDE.default_eps
    step = (SDE.T - SDE.default_eps) / steps
    assert all(abs(t - (SDE.T - (i + 1) * step)) < 1e-4 * step for i, t in enumerate(times))
    assert all(torch.equal(x, y) for (_, _, x), y in zip(seen, a.trajectory))
    assert torch.equal(a.trajectory[-1], a.samples)
    assert all(not torch.equal(x, y) for x, y in zip(a.trajectory, a.trajectory[1:]))
