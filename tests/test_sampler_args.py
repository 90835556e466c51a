"""Bad arguments to ``sampling.sample`` raise ValueError naming the argument."""

import pytest
import torch

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.samplers import langevin
from sgm_lightning.sampling import sample
from sgm_lightning.sde import VPSDE

SDE = VPSDE()
FN = GaussianMixture([1.0], [[0.0, 0.0]], 1.0).score_fn(SDE)


@pytest.mark.parametrize("kwargs,name", [
    ({"method": "euler"}, "method"),
    ({"method": "pc", "predictor": "rk4"}, "predictor"),
    ({"method": "pc", "corrector": "mala"}, "corrector"),
    ({"method": "pc", "corrector": "hmc", "hmc_leapfrog": 0}, "hmc_leapfrog"),
    ({"method": "pc", "corrector": "hmc", "hmc_persistence": 1.0}, "hmc_persistence"),
    ({"method": "sde", "solver": "rk4"}, "solver"),
    ({"method": "dpm2m", "grid": "cosine"}, "grid"),
    ({"method": "unipc", "order": 4}, "order"),
    ({"method": "dpm3m", "order": 2}, "order"),
    ({"method": "pc", "snr": 0.0}, "snr"),
    ({"method": "pc", "snr_norm": "pixel"}, "snr_norm"),
    ({"method": "pc", "predictor": "none", "corrector": "none"}, "predictor"),
    ({"method": "ddim", "steps": 0}, "steps"),
    ({"method": "ddim", "steps": 2.5}, "steps"),
    ({"method": "ddim", "steps": True}, "steps"),
    ({"method": "ddim", "eta": -1.0}, "eta"),
    ({"method": "heun", "eps": 1.0}, "eps"),
    ({"method": "heun", "eps": 0.0}, "eps"),
    ({"method": "heun", "eps": -0.1}, "eps"),
    ({"method": "ode", "solver": "magic"}, "solver"),
    ({"method": "ode", "rtol": 0}, "rtol"),
    ({"method": "ald", "steps_per_level": 0}, "steps_per_level"),
    ({"method": "ald", "step_lr": -1.0}, "step_lr"),
    ({"method": "ddpm", "foo": 1}, "foo"),
    ({"method": "ddpm", "dtype": torch.int64}, "dtype"),
    ({"method": "ddpm", "x_T": torch.zeros(3, 2)}, "x_T"),
])
def test_bad_options(kwargs, name):
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    steps = kwargs.pop("steps", 3)
    with pytest.raises(ValueError, match=name):
        sample(FN, SDE, (4, 2), method, steps=steps, **kwargs)


@pytest.mark.parametrize("shape", [(0, 2), (4, -1), [4.0, 2], "4x2", (), 4])
def test_bad_shape(shape):
    with pytest.raises(ValueError, match="shape"):
        sample(FN, SDE, shape, "ddim", steps=2)


def test_score_fn_wrong_shape():
    with pytest.raises(ValueError, match="score_fn"):
        sample(lambda x, t: x[:, :1], SDE, (4, 2), "ddim", steps=2)
    with pytest.raises(ValueError, match="score_fn"):
        sample("not callable", SDE, (4, 2), "ddim", steps=2)


def test_langevin_args():
    with pytest.raises(ValueError, match="step_size"):
        langevin(lambda x: -x, torch.zeros(2, 2), step_size=0.0, n_steps=3)
    with pytest.raises(ValueError, match="n_steps"):
        langevin(lambda x: -x, torch.zeros(2, 2), step_size=0.1, n_steps=-1)


def test_ode_solver_list_matches_the_installed_torchdiffeq():
    """The literal list of torchdiffeq methods (public names) agrees with the installed version."""
    import sys

    import torchdiffeq  # noqa: F401
    from torchdiffeq._impl.solvers import FixedGridODESolver

    from sgm_lightning.samplers.ode import FIXED_GRID_SOLVERS, TORCHDIFFEQ_SOLVERS
    table = sys.modules["torchdiffeq._impl.odeint"].SOLVERS
    assert set(TORCHDIFFEQ_SOLVERS) == set(table)
    assert set(FIXED_GRID_SOLVERS) == {k for k, v in table.items() if issubclass(v, FixedGridODESolver)}
