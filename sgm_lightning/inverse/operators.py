"""Linear measurement operators y = A x + sigma_y n for imaging inverse problems.

Each operator acts on a batch x of shape (B, C, H, W) (masks also on (B, D)) and provides

- ``forward(x)`` = A x (noise-free; differentiable, used inside DPS's gradient, Chung et al. 2023, Eq. 16),
- ``measure(x, generator)`` = A x + sigma_y n, n ~ N(0, I) (the observation model of Chung et al. 2023, Eq. 1),
- ``transpose(y)`` = A^T y (the adjoint: <A x, y> = <x, A^T y>),
- ``pinv(y)`` = A^+ y where a closed form exists (``has_pinv``); A^+ A is then the orthogonal
  projector P onto the row space of A, i.e. the "known" part of x (the masked pixels; the
  grayscale direction; the block means), which the replacement sampler (Song et al. 2021, App. I.2)
  and RePaint (Lugmayr et al. 2022) overwrite with the diffused measurement,
- ``to_image(y)``: the measurement shown in image space (A^+ y; the blurred image itself),
- ``replace(x, known)`` = (I - P) x + known, where ``known`` already lies in the range of P.

Every operator takes ``sigma_y`` (measurement noise std, >= 0) as a keyword argument.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sgm_lightning.utils import check_choice, check_int, randn_like


def _check_image(x: torch.Tensor, name: str = "x") -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")


class LinearOperator:
    """Base class: a linear map A with measurement noise std ``sigma_y``."""

    has_pinv: bool = True

    def __init__(self, sigma_y: float = 0.0):
        if not sigma_y >= 0:
            raise ValueError(f"sigma_y (measurement noise std) must be >= 0, got {sigma_y!r}")
        self.sigma_y = float(sigma_y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A x."""
        raise NotImplementedError

    __call__ = forward

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        """A^T y."""
        raise NotImplementedError

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """A^+ y (Moore-Penrose pseudo-inverse)."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form pseudo-inverse")

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """P x = A^+ A x: the component of x that the measurement determines."""
        return self.pinv(self.forward(x))

    def replace(self, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """(I - P) x + known: keep the unobserved part of x, take the observed part from ``known``."""
        return x - self.project(x) + known

    def to_image(self, y: torch.Tensor) -> torch.Tensor:
        """The measurement shown in image space (A^+ y by default)."""
        return self.pinv(y)

    def measure(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """y = A x + sigma_y n with n ~ N(0, I) drawn from ``generator``."""
        y = self.forward(x)
        if self.sigma_y > 0:
            y = y + self.sigma_y * randn_like(y, generator)
        return y

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_y={self.sigma_y})"


# ----------------------------------------------------------------------------- masking (inpainting)
class Inpainting(LinearOperator):
    """A x = m * x for a binary mask m (1 = observed). A is an orthogonal projector: A^T = A^+ = A.

    The measurement keeps the image shape (unobserved entries are 0). ``mask`` is a fixed tensor of
    the event shape (C, H, W) / (1, H, W) / (D,) (broadcast over the batch); subclasses build it
    from the data shape on first use via ``make_mask(shape)``.
    """

    def __init__(self, mask: torch.Tensor | None = None, sigma_y: float = 0.0):
        super().__init__(sigma_y=sigma_y)
        if mask is not None:
            mask = torch.as_tensor(mask)
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must contain only 0 (unknown) and 1 (observed)")
        self._mask = None if mask is None else mask.bool()

    def make_mask(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The boolean mask for one example of event shape ``shape`` (True = observed)."""
        raise ValueError(f"{type(self).__name__} needs an explicit mask")

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask broadcastable to ``x`` (True = observed)."""
        event = tuple(x.shape[1:])
        m = self._mask if self._mask is not None else self.make_mask(event)
        try:
            fits = torch.broadcast_shapes(tuple(m.shape), event) == event
        except RuntimeError:
            fits = False
        if not fits:  # else a cryptic broadcast error, or a measurement of another shape than x
            raise ValueError(f"mask of shape {tuple(m.shape)} does not fit examples of shape {event}: pass a mask of "
                             f"the example shape ((C, H, W), (1, H, W) or (H, W) for images, (D,) for vectors)")
        return m.to(x.device).unsqueeze(0)

    def forward(self, x):
        return torch.where(self.mask(x), x, torch.zeros((), dtype=x.dtype, device=x.device))

    def transpose(self, y):
        return self.forward(y)

    def pinv(self, y):
        return self.forward(y)

    def replace(self, x, known):
        # torch.where: observed entries equal ``known`` bit for bit (no 0 * x round-off)
        return torch.where(self.mask(x), known, x)


class BoxInpainting(Inpainting):
    """A rectangular hole: ``box`` = (top, left, height, width) in pixels is unknown.

    ``box=None`` hides the centred square of half the image height and width.
    """

    def __init__(self, box: tuple[int, int, int, int] | None = None, sigma_y: float = 0.0):
        super().__init__(sigma_y=sigma_y)
        if box is not None:
            if len(box) != 4:
                raise ValueError(f"box must be (top, left, height, width), got {box!r}")
            box = tuple(check_int(f"box[{i}] ({what})", b, min=0 if i < 2 else 1)
                        for i, (what, b) in enumerate(zip(("top", "left", "height", "width"), box)))
        self.box = box

    def make_mask(self, shape):
        if len(shape) != 3:
            raise ValueError(f"BoxInpainting needs images (B, C, H, W), got event shape {shape}")
        _, H, W = shape
        top, left, h, w = self.box if self.box is not None else (H // 4, W // 4, H // 2, W // 2)
        if top + h > H or left + w > W:
            raise ValueError(f"box {self.box!r} does not fit into an image of size {H}x{W}")
        m = torch.ones(1, H, W, dtype=torch.bool)
        m[:, top:top + h, left:left + w] = False
        return m


class HalfInpainting(Inpainting):
    """One half of the image is unknown: ``side`` in {"left", "right", "top", "bottom"} names that half."""

    SIDES = ("left", "right", "top", "bottom")

    def __init__(self, side: str = "right", sigma_y: float = 0.0):
        super().__init__(sigma_y=sigma_y)
        check_choice("side", side, self.SIDES)
        self.side = side

    def make_mask(self, shape):
        if len(shape) != 3:
            raise ValueError(f"HalfInpainting needs images (B, C, H, W), got event shape {shape}")
        _, H, W = shape
        m = torch.ones(1, H, W, dtype=torch.bool)
        if self.side == "left":
            m[:, :, : W // 2] = False
        elif self.side == "right":
            m[:, :, W // 2:] = False
        elif self.side == "top":
            m[:, : H // 2] = False
        else:
            m[:, H // 2:] = False
        return m


class RandomInpainting(Inpainting):
    """A random ``fraction`` in (0, 1) of the pixels is unknown (the same pattern for every example and,
    for images, for every channel); the pattern is drawn from a generator seeded with ``seed``.
    Works on images (B, C, H, W) and vectors (B, D)."""

    def __init__(self, fraction: float = 0.5, seed: int = 0, sigma_y: float = 0.0):
        super().__init__(sigma_y=sigma_y)
        if not 0 < fraction < 1:
            raise ValueError(f"fraction (share of unknown pixels) must be in (0, 1), got {fraction!r}")
        self.fraction = float(fraction)
        self.seed = int(seed)

    def make_mask(self, shape):
        pix = (1,) + tuple(shape[1:]) if len(shape) == 3 else tuple(shape)
        g = torch.Generator().manual_seed(self.seed)
        n = math.prod(pix)
        n_unknown = min(max(int(round(self.fraction * n)), 1), n - 1)
        m = torch.ones(n, dtype=torch.bool)
        m[torch.randperm(n, generator=g)[:n_unknown]] = False
        return m.reshape(pix)


# ----------------------------------------------------------------------------- colorization
class Grayscale(LinearOperator):
    """Colorization: A x = sum_c w_c x_c, (B, C, H, W) -> (B, 1, H, W), C = ``channels``.

    ``weights="mean"`` (w_c = 1/C) or ``"luminance"`` (ITU-R BT.601: 0.299, 0.587, 0.114; C = 3).
    A^T y = w y, A A^T = ||w||^2 I, so A^+ y = w y / ||w||^2 (for the mean: replicate y over channels),
    and P = w w^T / ||w||^2 projects onto the gray direction of Song et al. 2021's decoupled basis.
    """

    WEIGHTS = ("mean", "luminance")

    def __init__(self, weights: str = "mean", channels: int = 3, sigma_y: float = 0.0):
        super().__init__(sigma_y=sigma_y)
        check_choice("weights", weights, self.WEIGHTS)
        check_int("channels (colour images)", channels, min=1)
        if channels == 1:  # 'must be an integer >= 2, got 1' named no way out
            raise ValueError("colorization restores colour from grey images, but these images have 1 channel: "
                             "use a model of colour images (e.g. a data=cifar10 checkpoint) for task=colorize")
        if weights == "luminance" and channels != 3:
            raise ValueError(f"weights='luminance' needs channels=3, got {channels}; use weights='mean'")
        self.weights = weights
        self.channels = int(channels)

    def _w(self, x: torch.Tensor) -> torch.Tensor:
        C = self.channels
        w = torch.tensor([0.299, 0.587, 0.114]) if self.weights == "luminance" else torch.full((C,), 1.0 / C)
        return w.to(device=x.device, dtype=x.dtype).reshape(1, C, 1, 1)

    def forward(self, x):
        _check_image(x)
        if x.shape[1] != self.channels:
            raise ValueError(f"Grayscale(channels={self.channels}) got images with {x.shape[1]} channels: colorization "
                             f"needs colour images; pass channels={x.shape[1]} if they are (at least 2 channels)")
        return (x * self._w(x)).sum(dim=1, keepdim=True)

    def transpose(self, y):
        _check_image(y, "y")
        return y * self._w(y)

    def pinv(self, y):
        w = self._w(y)
        return y * w / (w * w).sum()

    def __repr__(self):
        return f"Grayscale(weights={self.weights!r}, channels={self.channels}, sigma_y={self.sigma_y})"


# ----------------------------------------------------------------------------- super-resolution
class AvgPoolDownsample(LinearOperator):
    """Super-resolution: A = average pooling over ``factor`` x ``factor`` blocks (factor 2 or 4).

    A^T y = nearest_upsample(y) / factor^2 and A A^T = I / factor^2, so A^+ = nearest upsampling
    (exactly the pseudo-inverse) and P = nearest_upsample(avg_pool(x)) replaces every block by its mean.
    """

    def __init__(self, factor: int = 2, sigma_y: float = 0.0):
        super().__init__(sigma_y=sigma_y)
        check_choice("factor", factor, (2, 4))
        self.factor = int(factor)

    def forward(self, x):
        _check_image(x)
        H, W = x.shape[-2:]
        if H % self.factor or W % self.factor:
            raise ValueError(f"factor={self.factor} must divide the image size {H}x{W}: crop or resize the images to "
                             f"multiples of {self.factor}")
        return F.avg_pool2d(x, self.factor)

    def pinv(self, y):
        _check_image(y, "y")
        return y.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)

    def transpose(self, y):
        return self.pinv(y) / self.factor**2

    def __repr__(self):
        return f"AvgPoolDownsample(factor={self.factor}, sigma_y={self.sigma_y})"


# ----------------------------------------------------------------------------- deblurring
class GaussianBlur(LinearOperator):
    """Deblurring: A = depthwise convolution with a normalised Gaussian kernel (odd ``kernel_size``,
    std ``sigma`` pixels) and ``padding`` "reflect" or "zeros"; the image size is kept.

    The adjoint is the convolution with the flipped kernel (the same kernel: it is symmetric). With
    zero padding that is ``conv_transpose2d``; with reflect padding the boundary folding is part of
    A, and A^T is computed exactly as the vector-Jacobian product of the linear map. No closed-form
    pseudo-inverse (``has_pinv`` is False): DPS handles deblurring; the measurement is itself an image.
    """

    has_pinv = False
    PADDINGS = ("reflect", "zeros")

    def __init__(self, kernel_size: int = 9, sigma: float = 2.0, padding: str = "reflect", sigma_y: float = 0.0):
        super().__init__(sigma_y=sigma_y)
        if check_int("kernel_size", kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive integer, got {kernel_size!r}")
        if not sigma > 0:
            raise ValueError(f"sigma (blur std in pixels) must be > 0, got {sigma!r}")
        check_choice("padding", padding, self.PADDINGS)
        self.kernel_size = int(kernel_size)
        self.sigma = float(sigma)
        self.padding = padding

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """(C, 1, k, k) normalised Gaussian kernel in x's dtype and device."""
        r = torch.arange(self.kernel_size, dtype=torch.float64) - (self.kernel_size - 1) / 2
        k1 = torch.exp(-0.5 * (r / self.sigma) ** 2)
        k2 = k1[:, None] * k1[None, :]
        k2 = (k2 / k2.sum()).to(device=x.device, dtype=x.dtype)
        return k2.expand(x.shape[1], 1, -1, -1)

    def forward(self, x):
        _check_image(x)
        p = self.kernel_size // 2
        if self.padding == "reflect":
            if p >= min(x.shape[-2:]):
                raise ValueError(f"kernel_size={self.kernel_size} too large for reflect padding of a "
                                 f"{x.shape[-2]}x{x.shape[-1]} image: use kernel_size <= {2 * min(x.shape[-2:]) - 1} "
                                 f"or padding='zeros'")
            return F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), self.kernel(x), groups=x.shape[1])
        return F.conv2d(x, self.kernel(x), padding=p, groups=x.shape[1])

    def transpose(self, y):
        _check_image(y, "y")
        p = self.kernel_size // 2
        if self.padding == "zeros":
            return F.conv_transpose2d(y, self.kernel(y), padding=p, groups=y.shape[1])
        with torch.inference_mode(False), torch.enable_grad():  # also under no_grad / inference_mode
            y = y.clone() if y.is_inference() else y
            x = torch.zeros_like(y, requires_grad=True)
            (g,) = torch.autograd.grad(self.forward(x), x, grad_outputs=y)
        return g

    def to_image(self, y):
        return y

    def __repr__(self):
        return (f"GaussianBlur(kernel_size={self.kernel_size}, sigma={self.sigma}, "
                f"padding={self.padding!r}, sigma_y={self.sigma_y})")


# ----------------------------------------------------------------------------- general matrices
class MatrixOperator(LinearOperator):
    """A general dense A of shape (M, D) acting on flattened examples: (B, ...) -> (B, M).

    ``pinv`` uses torch.linalg.pinv. Mostly for tests with Gaussian data (exact posteriors).
    """

    def __init__(self, A: torch.Tensor, sigma_y: float = 0.0):
        super().__init__(sigma_y=sigma_y)
        A = torch.as_tensor(A)
        if A.ndim != 2:
            raise ValueError(f"A must be a matrix of shape (M, D), got {tuple(A.shape)}")
        self.A = A
        self._pinv = torch.linalg.pinv(A.to(torch.float64))
        self.event_shape: tuple[int, ...] | None = None

    def forward(self, x):
        if x[0].numel() != self.A.shape[1]:
            raise ValueError(f"x has {x[0].numel()} numbers per example, A expects D={self.A.shape[1]}")
        self.event_shape = tuple(x.shape[1:])
        return x.reshape(x.shape[0], -1) @ self.A.to(x).T

    def _unflatten(self, v):
        shape = self.event_shape if self.event_shape is not None else (self.A.shape[1],)  # () for scalar data
        return v.reshape(v.shape[0], *shape)

    def transpose(self, y):
        return self._unflatten(y @ self.A.to(y))

    def pinv(self, y):
        return self._unflatten(y @ self._pinv.to(y).T)
