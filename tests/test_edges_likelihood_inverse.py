"""Edge cases of the likelihood, PF-ODE encode / decode, guidance and inverse-problem APIs that the
per-module tests do not reach: scalar data (B,), fixed-grid solvers, argument boundaries, operator
shapes. Every check is against a closed form (diffused Gaussians) or an exact identity."""

import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from conftest import make_sdes

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.evaluation.inverse_tasks import image_metrics, restore_dataset_images
from sgm_lightning.guidance import cfg_score_fn, classifier_guidance_score_fn
from sgm_lightning.inverse import (AvgPoolDownsample, BoxInpainting, GaussianBlur, Grayscale, Inpainting,
                                   MatrixOperator, dps_sample, repaint_sample, replacement_sample)
from sgm_lightning.inverse.sr3 import downsample
from sgm_lightning.likelihood import log_likelihood
from sgm_lightning.sampling import decode, encode, interpolate
from sgm_lightning.sde import VPSDE

SDES = make_sdes(ve_sigma_max=100.0)
GM1 = GaussianMixture([1.0], [[0.3]], [0.5], event_shape=())  # scalar data: examples of shape ()
GM2 = GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [0.25, 0.36])


def _logp_eps(gm, sde, x):
    return gm.log_prob(x, sde, torch.full((x.shape[0],), sde.default_eps, dtype=torch.float64))


# ----------------------------------------------------------------------------- likelihood
@pytest.mark.parametrize("name", list(SDES))
def test_likelihood_of_scalar_data(name):
    """x of shape (B,) (as sample(..., shape=(B,)) returns): the NLL of N(0.3, 0.5) diffused to t = eps;
    in one dimension a Rademacher probe (v^2 = 1) makes Hutchinson's estimate exact."""
    sde = SDES[name]
    x = GM1.sample(3, generator=torch.Generator().manual_seed(0))
    exact = log_likelihood(GM1.score_fn(sde), sde, x, trace="exact")
    assert exact.nll.shape == (3,) and exact.z.shape == (3,)
    assert torch.allclose(exact.nll, -_logp_eps(GM1, sde, x), atol=1e-2)
    hutch = log_likelihood(GM1.score_fn(sde), sde, x, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(hutch.nll, exact.nll, rtol=0, atol=1e-9)


def test_likelihood_fixed_grid_solvers_take_steps():
    """A fixed-grid method without a grid used to take one step over [eps, T] (NLL off by 0.3 nats,
    silently); ``steps=N`` takes N uniform steps (rk4: 4 NFE each)."""
    sde, x = VPSDE(), GM2.sample(4, generator=torch.Generator().manual_seed(5))
    f = GM2.score_fn(sde)
    res = log_likelihood(f, sde, x, trace="exact", solver="rk4", steps=50)
    assert res.nfe == 4 * 50
    assert torch.allclose(res.nll, -_logp_eps(GM2, sde, x), atol=1e-2)
    step = log_likelihood(f, sde, x, trace="exact", solver="rk4", step_size=(1 - 1e-3) / 50)
    assert torch.allclose(step.nll, res.nll, rtol=0, atol=1e-12)  # the same uniform grid
    with pytest.raises(ValueError, match="steps=N"):
        log_likelihood(f, sde, x, solver="euler")
    with pytest.raises(ValueError, match="adaptive"):
        log_likelihood(f, sde, x, solver="dopri5", steps=10)
    with pytest.raises(ValueError, match="steps"):
        log_likelihood(f, sde, x, solver="rk4", steps=0)
    with pytest.raises(ValueError, match="not both"):
        log_likelihood(f, sde, x, solver="rk4", steps=10, step_size=0.1)



def test_likelihood_refuses_a_score_of_another_shape():
    """A (B, 1) score for (B, 2) data used to broadcast into the drift and give a finite, wrong NLL."""
    sde, x = VPSDE(), GM2.sample(3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"shaped like x \(3, 2\), got \(3, 1\)"):
        log_likelihood(lambda x, t: -x.sum(1, keepdim=True), sde, x, trace="exact")


# ----------------------------------------------------------------------------- encode / decode
def _gaussian_flow(sde, x, mu, var, t_from, t_to):
    """The probability-flow map of N(mu, var I) data between two times: an affine map, since p_t stays
    N(alpha_t mu, v_t I) with v_t = alpha_t^2 var + sigma_t^2 and the flow keeps the standardized value."""
    (a0, s0), (a1, s1) = (sde.marginal_coeffs(torch.tensor(t, dtype=torch.float64)) for t in (t_from, t_to))
    v0, v1 = a0**2 * var + s0**2, a1**2 * var + s1**2
    return a1 * mu + torch.sqrt(v1 / v0) * (x - a0 * mu)


@pytest.mark.parametrize("name", list(SDES))
def test_encode_and_interpolate_scalar_data(name):
    sde = SDES[name]
    f = GM1.score_fn(sde)
    x = GM1.sample(4, generator=torch.Generator().manual_seed(2))
    z = encode(f, sde, x, rtol=1e-8, atol=1e-8).samples
    assert z.shape == (4,)
    torch.testing.assert_close(z, _gaussian_flow(sde, x, 0.3, 0.5, sde.default_eps, sde.T), rtol=1e-6, atol=1e-6)
    res = interpolate(f, sde, x[:2], x[2:], n=3)  # used to refuse data of shape (P,)
    assert res.samples.shape == (2, 3)
    torch.testing.assert_close(res.samples[:, 0], x[:2], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(res.samples[:, -1], x[2:], rtol=1e-3, atol=1e-3)


def test_encode_decode_reject_bad_eps_and_steps():
    """eps outside [0, T) (log_likelihood's range: its z is the same latent) used to run the ODE over a
    wrong interval (eps=2 "encoded" towards t=2, eps=-1 through negative times) and steps=0 / 1.5 failed
    deep inside the grid code."""
    sde = VPSDE()
    f, x = GM2.score_fn(sde), GM2.sample(3, generator=torch.Generator().manual_seed(0))
    for fn in (encode, decode):
        for eps in (2.0, 1.0, -1.0, -1e-3):
            with pytest.raises(ValueError, match="eps"):
                fn(f, sde, x, eps=eps)
        for steps in (0, 1.5):
            with pytest.raises(ValueError, match="steps"):
                fn(f, sde, x, solver="euler", steps=steps)
        with pytest.raises(ValueError, match="floating-point"):
            fn(f, sde, x.long())
    z = log_likelihood(f, sde, x, eps=0.0, trace="exact", rtol=1e-8, atol=1e-8).z
    torch.testing.assert_close(encode(f, sde, x, eps=0.0, rtol=1e-8, atol=1e-8).samples, z, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- guidance
class _ClassGaussians:
    """Class k: N(m_k, I) diffused by ``sde`` (score -(x - alpha m_k) / (alpha^2 + sigma^2)); class 2 is null."""

    def __init__(self, sde):
        self.sde, self.means = sde, torch.tensor([[1.0, -1.0], [-2.0, 0.5], [0.0, 0.0]], dtype=torch.float64)

    def score(self, x, t, y):
        a, s = self.sde.marginal_coeffs(t)
        return -(x - a[:, None] * self.means[y]) / (a**2 + s**2)[:, None]


def test_guidance_scale_accepts_numpy_and_tensor_scalars_refuses_infinity():
    """A numpy or 0-dim tensor guidance weight (e.g. from a sweep) used to be refused as 'not a real
    number'; an infinite weight made every score -inf / nan."""
    sde = VPSDE()
    model = _ClassGaussians(sde)
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 0.3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    s_c, s_u = model.score(x, t, y), model.score(x, t, torch.full_like(y, 2))
    want = s_u + 3.0 * (s_c - s_u)
    for w in (3.0, np.float32(3.0), np.int64(3), torch.tensor(3.0)):
        assert torch.equal(cfg_score_fn(model, y, w, null_label=2)(x, t), want)
    for w in (float("inf"), float("nan"), True, torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="scale"):
            cfg_score_fn(model, y, w, null_label=2)
        with pytest.raises(ValueError, match="scale"):
            classifier_guidance_score_fn(lambda x, t: x, lambda x, t: x, 0, scale=w)


# ----------------------------------------------------------------------------- inverse problems
def test_inpainting_mask_must_fit_the_examples():
    """A mask of another shape used to fail in a broadcast (4x4 mask, 8x8 images) or, worse, to
    broadcast silently: a (3, 8, 8) mask turned 1-channel images into a 3-channel 'measurement'."""
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    for mask in (torch.ones(1, 4, 4), torch.ones(3, 8, 8)):
        op = Inpainting(mask)
        for call in (op.forward, op.transpose, op.pinv, lambda v: op.replace(v, v)):
            with pytest.raises(ValueError, match="mask of shape"):
                call(x)
    m = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) < 0.5  # (H, W) broadcasts over channels
    assert torch.equal(Inpainting(m).forward(x), torch.where(m, x, 0.0))


def test_matrix_operator_on_scalar_data_keeps_the_shape():
    """Data of shape (B,) (event shape ()): A^T y and A^+ y used to come back as (B, 1)."""
    op = MatrixOperator(torch.tensor([[2.0], [-1.0]], dtype=torch.float64))
    x = torch.randn(5, dtype=torch.float64)
    y = op.forward(x)
    assert y.shape == (5, 2)
    torch.testing.assert_close(op.pinv(y), x)  # A has full column rank: A^+ A = I
    torch.testing.assert_close(op.transpose(y), 5 * x)  # A^T A = 5


def test_posterior_samplers_reject_bad_eps_and_mismatched_measurements():
    sde = VPSDE()
    f = GM2.score_fn(sde)
    op = Inpainting(torch.tensor([1, 0]))
    y = op.forward(GM2.sample(3, generator=torch.Generator().manual_seed(0)))
    kwargs = {"dps": {}, "replacement": {}, "repaint": {"jump_length": 1}}
    for fn, kw in zip((dps_sample, replacement_sample, repaint_sample), kwargs.values()):
        for eps in (1.0, 2.0):  # used to run the grid T -> eps backwards or not at all
            with pytest.raises(ValueError, match="eps"):
                fn(f, sde, op, y, steps=2, eps=eps, **kw)
        with pytest.raises(ValueError, match="y has shape"):  # a measurement of 3-dim data
            fn(f, sde, op, torch.zeros(3, 3, dtype=torch.float64), steps=2, shape=(3, 2), **kw)
        with pytest.raises(ValueError, match="y has shape"):  # a measurement of another batch
            fn(f, sde, op, y[:2], steps=2, shape=(3, 2), **kw)
        with pytest.raises(ValueError, match="y has shape"):  # a start point of another batch size
            fn(f, sde, op, y, steps=2, x_T=torch.zeros(2, 2, dtype=torch.float64), **kw)


def test_one_measurement_broadcast_over_many_posterior_samples():
    """y of batch 1 with shape=(N, ...) (N posterior samples of one measurement) must give the samples of
    y repeated N times. Replacement and RePaint drew the diffused measurement's noise in y's shape, so all
    N samples shared it: their mean fluctuated ~7x more than that of independent samples."""
    sde = VPSDE()
    op = Inpainting(torch.tensor([1, 0]))
    y1 = op.forward(GM2.sample(1, generator=torch.Generator().manual_seed(0)))
    kwargs = {"dps": {}, "replacement": {}, "repaint": {"jump_length": 1, "resamplings": 2}}
    for fn, kw in zip((dps_sample, replacement_sample, repaint_sample), kwargs.values()):
        one, rep = (fn(GM2.score_fn(sde), sde, op, y, steps=3, shape=(5, 2), generator=torch.Generator().manual_seed(1),
                       **kw).samples for y in (y1, y1.expand(5, 2).clone()))
        assert torch.equal(one, rep), fn.__name__


def test_operator_errors_name_the_fix():
    with pytest.raises(ValueError, match="padding='zeros'"):
        GaussianBlur(9, 2.0).forward(torch.zeros(1, 3, 4, 4))
    assert GaussianBlur(9, 2.0, padding="zeros").forward(torch.zeros(1, 3, 4, 4)).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="channels=4"):
        Grayscale().forward(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        BoxInpainting((0, 0, 9, 2)).forward(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="7x7: crop or resize the images to multiples of 2"):
        AvgPoolDownsample(2).forward(torch.zeros(1, 3, 7, 7))
    with pytest.raises(ValueError, match="7x8: crop or resize the images to multiples of 2"):
        downsample(torch.zeros(1, 3, 7, 8), 2)


def test_task_metrics_of_a_model_trained_on_0_1_images(tmp_path):
    """sample.py mode=task on a data_range=[0,1] model: PSNR / SSIM were computed after mapping the
    images from [-1, 1] to [0, 1] (differences halved: PSNR +6.02 dB) and outputs clipped to [-1, 1]."""
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    module = SimpleNamespace(device=torch.device("cpu"), score_model=None, sde=VPSDE(),
                             hparams=SimpleNamespace(data_range="[0,1]"),
                             ema_scope=lambda use: contextlib.nullcontext())
    data = SimpleNamespace(setup=lambda stage: None, val_dataset=TensorDataset(images))
    out = restore_dataset_images(module, data, task="superres", method="bicubic", num_images=3, steps=1, seed=0,
                                 use_ema=False, out_dir=str(tmp_path), factor=2)
    recon = F.interpolate(F.avg_pool2d(images, 2), size=(8, 8), mode="bicubic", align_corners=False).clamp(0, 1)
    psnr = -10 * torch.log10((recon - images).pow(2).mean(dim=(1, 2, 3)))
    summary = json.load(open(out["metrics"]))
    torch.testing.assert_close(torch.tensor(summary["psnr"]), psnr, rtol=1e-4, atol=1e-4)


def test_image_metrics_on_images_smaller_than_the_ssim_window():
    """The SSIM window was meant to shrink to fit small images, but torchmetrics sizes a Gaussian window
    by its std (11 pixels for 1.5), so images under 6 pixels failed in the reflect padding. A 1-pixel
    window has no variance terms: SSIM = (2 p q + C1) / (p^2 + q^2 + C1), C1 = 0.01^2, on [0, 1] values."""
    g = torch.Generator().manual_seed(0)
    truth, recon = (torch.rand(2, 3, 1, 1, generator=g) * 2 - 1 for _ in range(2))
    psnr, ssim = image_metrics(recon, truth)
    p, q = (recon.double() + 1) / 2, (truth.double() + 1) / 2
    want = ((2 * p * q + 1e-4) / (p**2 + q**2 + 1e-4)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ssim.double(), want, rtol=1e-4, atol=1e-5)
    mse = (p - q).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(psnr.double(), -10 * torch.log10(mse), rtol=1e-4, atol=1e-4)
    for size in (2, 3, 5):
        x = torch.rand(2, 1, size, size, generator=g) * 2 - 1
        torch.testing.assert_close(image_metrics(x, x)[1], torch.ones(2))


def test_autograd_parts_work_under_inference_mode():
    """log_likelihood, DPS and classifier guidance differentiate through the score / classifier; under
    torch.inference_mode (Lightning's test / predict loops) they failed with 'element 0 of tensors does
    not require grad'. Now they leave inference mode and give the same numbers bit for bit."""
    sde = VPSDE()
    x = GM2.sample(3, generator=torch.Generator().manual_seed(0))
    op = Inpainting(torch.tensor([1, 0]))
    model = _ClassGaussians(sde)

    def classifier(x, t):  # the exact posterior over the two classes of _ClassGaussians (equal weights)
        a, s = sde.marginal_coeffs(t)
        var = (a**2 + s**2)[:, None]
        return -((x[:, None] - a[:, None, None] * model.means[None, :2]) ** 2).sum(-1) / (2 * var)

    mixture = GaussianMixture([0.5, 0.5], model.means[:2], [1.0])  # p(x) of the two classes
    t = torch.full((3,), 0.4, dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    runs = {
        "nll": lambda: log_likelihood(GM2.score_fn(sde), sde, x, generator=torch.Generator().manual_seed(1)).nll,
        "dps": lambda: dps_sample(GM2.score_fn(sde), sde, op, op.forward(x), steps=3,
                                  generator=torch.Generator().manual_seed(2)).samples,
        "guided": lambda: classifier_guidance_score_fn(mixture.score_fn(sde), classifier, y)(x, t),
    }
    for name, run in runs.items():
        want = run()
        with torch.inference_mode():
            got = run()
        assert torch.equal(got, want), name
    # A^T of the reflect-padded blur is a vector-Jacobian product: also under inference mode
    blur, img = GaussianBlur(3, 1.0), torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    want = blur.transpose(img)
    with torch.inference_mode():
        assert torch.equal(blur.transpose(img), want)
    # guidance with the exact classifier at scale 1 is the conditional score (Bayes)
    torch.testing.assert_close(runs["guided"](), model.score(x, t, y))


def test_empty_batches_are_refused_not_solved_forever():
    """encode / decode of a (0, 2) batch never returned (the adaptive controller rejects every step);
    log_likelihood failed in a reshape."""
    from sgm_lightning.likelihood import log_likelihood
    from sgm_lightning.samplers.encode import decode, encode
    sde, empty = VPSDE(), torch.zeros(0, 2)
    for fn in (encode, decode):
        with pytest.raises(ValueError, match="at least one example"):
            fn(lambda x, t: -x, sde, empty)
    with pytest.raises(ValueError, match="at least one example"):
        log_likelihood(lambda x, t: -x, sde, empty)
