"""Guidance against exact oracles on a 2-D two-mode Gaussian mixture (one class per mode):
the conditional score of class k is the score of component k, the unconditional one the mixture
score, and the exact posterior classifier is log p(k | x_t) = log w_k N_k - log sum_j w_j N_j."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.guidance import cfg_score_fn, classifier_guidance_score_fn
from sgm_lightning.training.lit_classifier import NoisyClassifierModule
from sgm_lightning.nets.classifier import MLPClassifier
from sgm_lightning.sampling import sample
from sgm_lightning.sde import VPSDE

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
MIX = GaussianMixture([0.7, 0.3], MEANS, [0.25, 0.25])  # the rarer mode is class 1
COMPONENTS = [GaussianMixture([1.0], MEANS[k:k + 1], [0.25]) for k in range(2)]
NULL = 2


class OracleModel:
    """A fake class-conditional ScoreModel: y = k gives component k's score, y = NULL the mixture's."""

    def __init__(self, sde):
        self.sde = sde
        self.calls = 0

    def score(self, x, t, y):
        self.calls += 1
        out = MIX.score(x, self.sde, t)
        for k, comp in enumerate(COMPONENTS):
            sel = y == k
            if sel.any():
                out[sel] = comp.score(x[sel], self.sde, t[sel])
        return out


def exact_classifier(sde):
    def clf(x, t):  # label_fn=None hands the classifier t itself
        return torch.log(MIX.responsibilities(x, sde, t))

    return clf


def _mode_share(x, k):
    return (MIX.responsibilities(x).argmax(1) == k).double().mean().item()


def test_cfg_scale_zero_is_the_unconditional_sampler_bitwise():
    sde = VPSDE()
    model = OracleModel(sde)
    shape = (256, 2)
    guided = sample(cfg_score_fn(model, 1, scale=0.0, null_label=NULL), sde, shape, "ddpm", steps=50,
                    generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    uncond = sample(lambda x, t: model.score(x, t, y=torch.full((x.shape[0],), NULL)), sde, shape, "ddpm",
                    steps=50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(guided.samples, uncond.samples)


def test_cfg_formula_batched_and_limits():
    sde = VPSDE()
    model = OracleModel(sde)
    x = torch.randn(6, 2, dtype=torch.float64)
    t = torch.full((6,), 0.4, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    s_c = model.score(x, t, y=y)
    s_u = model.score(x, t, y=torch.full_like(y, NULL))
    for w in (0.0, 1.0, 3.0):
        calls = model.calls
        s = cfg_score_fn(model, y, scale=w, null_label=NULL)(x, t)
        assert model.calls == calls + 1  # one (batched) network call per evaluation
        torch.testing.assert_close(s, s_u + w * (s_c - s_u))
        torch.testing.assert_close(cfg_score_fn(model, y, w, NULL, batched=False)(x, t), s)
    with pytest.raises(ValueError, match="null_label"):
        cfg_score_fn(model, y, 1.0, null_label=-1)
    with pytest.raises(ValueError, match="scale"):
        cfg_score_fn(model, y, "big", NULL)


@pytest.mark.parametrize("k", [0, 1])
def test_cfg_conditional_sampling_hits_the_requested_mode(k):
    # modes 4.1 apart with std 0.5: a correct conditional sampler puts ~100% in mode k;
    # 95% with 400 samples leaves room for discretization error only
    sde = VPSDE()
    res = sample(cfg_score_fn(OracleModel(sde), k, scale=1.0, null_label=NULL), sde, (400, 2), "pc", steps=100,
                 generator=torch.Generator().manual_seed(1), dtype=torch.float64, corrector="none")
    assert _mode_share(res.samples, k) >= 0.95


def test_exact_classifier_guidance_equals_conditional_score():
    # Bayes: grad log p_t(x) + grad log p(y=k | x_t) = grad log p_t(x | k), exactly
    sde = VPSDE()
    x = torch.randn(8, 2, dtype=torch.float64) * 2
    t = torch.rand(8, dtype=torch.float64) * 0.9 + 0.05
    for k in range(2):
        s = classifier_guidance_score_fn(MIX.score_fn(sde), exact_classifier(sde), k, scale=1.0)(x, t)
        torch.testing.assert_close(s, COMPONENTS[k].score(x, sde, t), rtol=1e-8, atol=1e-8)
    unguided = classifier_guidance_score_fn(MIX.score_fn(sde), exact_classifier(sde), 1, scale=0.0)(x, t)
    torch.testing.assert_close(unguided, MIX.score(x, sde, t))


def test_classifier_guidance_sampling_hits_the_rare_mode():
    sde = VPSDE()
    fn = classifier_guidance_score_fn(MIX.score_fn(sde), exact_classifier(sde), 1, scale=1.0)
    res = sample(fn, sde, (400, 2), "ddpm", steps=100, generator=torch.Generator().manual_seed(2),
                 dtype=torch.float64)
    assert _mode_share(res.samples, 1) >= 0.95
    base = sample(MIX.score_fn(sde), sde, (400, 2), "ddpm", steps=100, generator=torch.Generator().manual_seed(2),
                  dtype=torch.float64)
    assert _mode_share(base.samples, 1) < 0.45  # unguided: weight 0.3 (+- 0.023 std at n=400)


def test_noisy_classifier_module_trains_and_reloads(tmp_path):
    torch.manual_seed(0)
    sde = VPSDE()
    x, k = MIX.sample(2048, generator=torch.Generator().manual_seed(0), return_labels=True)
    loader = DataLoader(TensorDataset(x.float(), k), batch_size=256, shuffle=True)
    module = NoisyClassifierModule(MLPClassifier(dim=2, num_classes=2, hidden_dim=64, num_layers=2), sde, lr=3e-3)
    trainer = L.Trainer(max_steps=120, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(module, loader)
    # at small t the modes are separable: accuracy near 1 (chance level of the majority class 0.7)
    xs = x[:512].float()
    t = torch.full((512,), 0.05)
    acc = (module(sde.marginal_prob(xs, t)[0], t).argmax(1) == k[:512]).float().mean()
    assert acc > 0.9
    ckpt = tmp_path / "clf.ckpt"
    trainer.save_checkpoint(ckpt)
    sd = torch.load(ckpt, weights_only=True)
    assert sd["hyper_parameters"]["lr"] == 3e-3 and sd["sde"]["class"] == "VPSDE"
    clone = NoisyClassifierModule.load_from_checkpoint(
        ckpt, classifier=MLPClassifier(dim=2, num_classes=2, hidden_dim=64, num_layers=2), sde=sde)
    torch.testing.assert_close(clone(xs, t), module(xs, t))
    # the trained classifier plugs into guidance (its own time label via label_fn)
    fn = classifier_guidance_score_fn(MIX.score_fn(sde), clone.classifier, 1, scale=1.0, label_fn=clone.label)
    out = fn(x[:4].float(), torch.full((4,), 0.5))
    assert out.shape == (4, 2) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="lr"):
        NoisyClassifierModule(MLPClassifier(dim=2, num_classes=2), sde, lr=0.0)
