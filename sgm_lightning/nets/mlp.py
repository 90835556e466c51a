"""Multi-layer perceptrons for low-dimensional data (2-D toys, any (B, D) or flattened (B, ...) data).

* ``MLPScoreNet`` -- noise-conditional network ``net(x, label, y=None)`` (the score / eps / x0
  network of Song & Ermon 2019 and Song et al. 2021 on toy data): every hidden pre-activation gets
  a learned projection of the time embedding added, h_{l+1} = W_l act(h_l + U_l e(label)).
* ``NoiseFreeMLP`` -- ``net(x)`` -> s_theta(x), the unconditional score model of sliced / implicit
  score matching (Hyvarinen 2005; Song et al. 2019, "Sliced Score Matching"). Its default activation
  is softplus: these losses differentiate through the Jacobian of s_theta, so a smooth
  activation gives a non-degenerate second derivative.
* ``ConditionedMLP`` -- the shared trunk (also used by ``nets.classifier.MLPClassifier``).
"""

from __future__ import annotations

import torch
from torch import nn

from sgm_lightning.nets.embeddings import LabelEmbedding, TimeEmbedding, check_even, embed_conditions
from sgm_lightning.utils import check_choice, check_int

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "softplus": nn.Softplus,
               "tanh": nn.Tanh}


def make_activation(name: str) -> nn.Module:
    """The activation module called ``name`` (one of ``ACTIVATIONS``)."""
    check_choice("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]()


def flatten_check(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Flatten x (B, ...) to (B, D) and check D == ``dim``."""
    if x.ndim < 2:
        raise ValueError(f"expected input of shape (B, ...) with {dim} values per example, got {tuple(x.shape)}")
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] != dim:
        raise ValueError(f"expected {dim} values per example (dim={dim}), got input of shape {tuple(x.shape)} "
                         f"with {flat.shape[1]}; build the network with dim={flat.shape[1]}")
    return flat


class ConditionedMLP(nn.Module):
    """Trunk h_0 = W_in x; h_{l+1} = W_l act(h_l + U_l e) (l < num_layers); out = W_out act(h_L + U_L e).

    ``e`` is the (B, emb_dim) conditioning vector (or None for no conditioning; then U_l are absent).
    ``num_layers`` hidden layers of width ``hidden_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, num_layers: int, emb_dim: int | None,
                 activation: str):
        super().__init__()
        in_dim, out_dim, hidden_dim, num_layers = (
            check_int(name, value) for name, value in (("dim", in_dim), ("out_dim", out_dim),
                                                       ("hidden_dim", hidden_dim), ("num_layers", num_layers)))
        self.act = make_activation(activation)
        self.inp = nn.Linear(in_dim, hidden_dim)
        self.hidden = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in range(num_layers - 1))
        self.cond = (nn.ModuleList(nn.Linear(emb_dim, hidden_dim) for _ in range(num_layers))
                     if emb_dim is not None else None)
        self.out = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.inp(x)
        for i, layer in enumerate([*self.hidden, self.out]):
            if self.cond is not None:
                h = h + self.cond[i](emb)
            h = layer(self.act(h))
        return h


class MLPScoreNet(nn.Module):
    """Noise-conditional MLP ``net(x, label, y=None)`` for (B, D) data (any (B, ...) is flattened).

    Args:
        dim: data dimension D = prod(x.shape[1:]).
        hidden_dim: width of the hidden layers.
        num_layers: number of hidden layers.
        embedding_dim: size of the sin/cos (or Fourier) label features; the embedding MLP maps them
            to ``hidden_dim``.
        embedding: "sinusoidal" or "fourier" (see ``nets.embeddings``).
        fourier_scale: Fourier frequency scale (``embedding="fourier"``).
        num_classes: classes for conditioning (None: unconditional); the class embedding (with a
            null class, y = -1 or num_classes) is added to the time embedding.
        activation: one of ``ACTIVATIONS``.
    Returns a tensor shaped like x.
    """

    def __init__(self, dim: int = 2, hidden_dim: int = 256, num_layers: int = 4, embedding_dim: int = 64,
                 embedding: str = "sinusoidal", fourier_scale: float = 16.0, num_classes: int | None = None,
                 activation: str = "silu"):
        super().__init__()
        dim, hidden_dim, num_layers = (check_int(name, value) for name, value in
                                       (("dim", dim), ("hidden_dim", hidden_dim), ("num_layers", num_layers)))
        embedding_dim = check_even("embedding_dim", embedding_dim)
        if num_classes is not None:
            num_classes = check_int("num_classes", num_classes)
        self._hparams = dict(dim=dim, hidden_dim=hidden_dim, num_layers=num_layers, embedding_dim=embedding_dim,
                             embedding=embedding, fourier_scale=fourier_scale, num_classes=num_classes,
                             activation=activation)
        self.dim, self.num_classes = dim, num_classes
        self.time_embed = TimeEmbedding(embedding_dim, kind=embedding, fourier_scale=fourier_scale, out_dim=hidden_dim)
        self.label_embed = LabelEmbedding(num_classes, hidden_dim) if num_classes is not None else None
        self.trunk = ConditionedMLP(dim, dim, hidden_dim, num_layers, hidden_dim, activation)

    def hparams(self) -> dict:
        """Constructor keyword arguments (for logging and checkpoints)."""
        return dict(self._hparams)

    def forward(self, x: torch.Tensor, label: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        flat = flatten_check(x, self.dim)
        return self.trunk(flat, embed_conditions(self.time_embed, self.label_embed, label, x, y)).reshape(x.shape)


class NoiseFreeMLP(nn.Module):
    """Unconditional score model ``net(x) -> s_theta(x)`` shaped like x (sliced / implicit score matching).

    Args:
        dim: data dimension D = prod(x.shape[1:]).
        hidden_dim: width of the hidden layers.
        num_layers: number of hidden layers.
        activation: one of ``ACTIVATIONS`` (default softplus, smooth for the Jacobian-based losses).

    ``forward(x, label=None, y=None)``: a time label (passed when the network is wrapped in a
    ``ScoreModel`` with ``prediction="score"``, as ``train.py`` does) is ignored; class labels are
    not supported.
    """

    def __init__(self, dim: int = 2, hidden_dim: int = 128, num_layers: int = 3, activation: str = "softplus"):
        super().__init__()
        dim, hidden_dim, num_layers = (check_int(name, value) for name, value in
                                       (("dim", dim), ("hidden_dim", hidden_dim), ("num_layers", num_layers)))
        self._hparams = dict(dim=dim, hidden_dim=hidden_dim, num_layers=num_layers, activation=activation)
        self.dim = dim
        self.trunk = ConditionedMLP(dim, dim, hidden_dim, num_layers, None, activation)

    def hparams(self) -> dict:
        """Constructor keyword arguments (for logging and checkpoints)."""
        return dict(self._hparams)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None:
            raise ValueError("NoiseFreeMLP is unconditional: class labels y are not supported")
        return self.trunk(flatten_check(x, self.dim)).reshape(x.shape)
