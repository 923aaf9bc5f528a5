"""``bn-noisy``: BatchNorm followed by noise whose mean and variance change at every training step.

Santurkar et al. (2018, sec. 2.1) inject "i.i.d. noise sampled from a non-zero mean and non-unit
variance distribution" after every BatchNorm layer, with a distribution that "changes at each time
step", to create severe internal covariate shift on purpose; the network still trains about as
well as with plain BatchNorm. The exact distributions are marked *(check)* in REFERENCES.md; this
module uses the following, close to the paper's description and configurable.

**Definition.** Let ``ŷ = BN(x)`` be the BatchNorm output (batch statistics, then the affine
``γ, β``) of shape ``(N, C, *spatial)``. At each training forward pass ``t`` and for each channel
``c`` draw::

    μ_c ~ U(-mean_range, mean_range)          σ_c ~ U(1, scale_max)

and for every activation (example ``n``, channel ``c``, position ``p``) two standard normals
``ξ, ζ ~ N(0, 1)``; the output is::

    y[n,c,p] = σ_c (1 + jitter ξ[n,c,p]) ŷ[n,c,p] + μ_c + jitter ζ[n,c,p]

so channel ``c`` is scaled by about ``σ_c`` and shifted by ``μ_c`` (its mean moves to about
``σ_c β_c + μ_c`` and its standard deviation to about ``σ_c γ_c``), with independent per-activation
perturbations of relative size ``jitter``, and all of it is redrawn at the next step. Defaults:
``mean_range = 0.5``, ``scale_max = 1.25``, ``jitter = 0.1``: a shift of up to half a standard
deviation and a scale of up to 1.25 per channel, redrawn every step (a choice close to the paper's
description; its exact distributions are unverified here, see REFERENCES.md). In **eval mode** the layer is plain BatchNorm with its
running statistics (computed from the noise-free inputs): no noise, nothing drawn.

**Randomness.** The noise never touches the global RNG: each training forward draws it from the
layer's own ``torch.Generator`` seeded with ``hash(noise_seed, noise_step)``, two int64 buffers. The
layer seed defaults to a hash of the global RNG *state* at construction (read, never advanced),
so ``bnlab.models.make(..., seed=s)`` gives every layer its own deterministic seed and the BN
and noisy-BN nets of one seed get the same initial weights; :func:`reseed_noise` sets them
explicitly. Since the state is a buffer, it is saved with ``state_dict`` and restored by the
probe machinery like the running statistics.

**Which forward passes advance the noise.** A training forward with the layer's *own* buffer
first increments ``noise_step`` in place and then draws the noise of the new value. A forward
through :func:`torch.func.functional_call` with *copies* of the buffers (what every bnlab probe
does, and :func:`bnlab.curvature.model_loss_closure`) draws the noise of the copied
``noise_step`` without advancing it: a probe after the training forward of step ``t`` replays
that step's noise, repeatedly and deterministically, and changes nothing.

Configuration: the ``bn-noisy`` norm of :data:`bnlab.models.NORMS` reads the module defaults
:data:`NOISE_DEFAULTS`; change them for the models built inside ``with noise_config(...)``, or
register a named variant with :func:`register_noisy_norm`.

Reference:
    Santurkar, Tsipras, Ilyas, Madry, "How Does Batch Normalization Help Optimization?",
    NeurIPS 2018, section 2.1 and figure 2 ("noisy" BatchNorm).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Optional

import torch
from torch import nn

from ..errors import UserError
from .norms import register_norm

__all__ = ["NoisyBatchNorm", "NOISE_DEFAULTS", "noise_config", "register_noisy_norm", "reseed_noise", "noisy_layers"]

#: Defaults of the ``bn-noisy`` norm (see the module docstring for the equation).
NOISE_DEFAULTS: dict[str, float] = {"mean_range": 0.5, "scale_max": 1.25, "jitter": 0.1}

_MASK63 = (1 << 63) - 1


def _check(mean_range: float, scale_max: float, jitter: float) -> None:
    if not mean_range >= 0:
        raise UserError(f"bn-noisy: mean_range must be >= 0, got {mean_range!r}")
    if not scale_max >= 1:
        raise UserError(f"bn-noisy: scale_max must be >= 1, got {scale_max!r}")
    if not jitter >= 0:
        raise UserError(f"bn-noisy: jitter must be >= 0, got {jitter!r}")


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _seed_from_global_state() -> int:
    """A seed derived from the global CPU RNG state, which is read but not advanced."""
    return int.from_bytes(hashlib.blake2b(torch.get_rng_state().numpy().tobytes(), digest_size=8).digest(), "little") & _MASK63


def _refresh_own_step(module: "NoisyBatchNorm", incompatible_keys=None) -> None:
    module._own_step = module._buffers["noise_step"]


class NoisyBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm, then per-step noise of non-zero mean and non-unit variance (train mode only).

    ``y = σ_c (1 + jitter ξ) BN(x) + μ_c + jitter ζ`` with ``μ_c ~ U(-mean_range, mean_range)``,
    ``σ_c ~ U(1, scale_max)`` per channel and ``ξ, ζ ~ N(0, 1)`` per activation, redrawn at
    every training forward pass from the layer's own generator (module docstring). Eval mode:
    plain BatchNorm.

    Args:
        num_features: channels ``C``.
        spatial_dims: 0 for ``(N, C)``, 1 for ``(N, C, L)``, 2 for ``(N, C, H, W)``, 3 for volumes.
        affine: learnable ``γ, β``.
        mean_range: ``m`` of ``μ_c ~ U(-m, m)``.
        scale_max: ``s`` of ``σ_c ~ U(1, s)``.
        jitter: relative size of the per-activation perturbations.
        seed: the layer's noise seed (default: a hash of the global RNG state, not advanced).
        eps, momentum, track_running_stats: as in :class:`torch.nn.BatchNorm2d`.

    Example:
        >>> bn = NoisyBatchNorm(8, spatial_dims=2, seed=0)
        >>> y = bn(torch.randn(16, 8, 4, 4))        # noisy; bn.noise_step is now 1
        >>> bn.eval(); z = bn(torch.randn(16, 8, 4, 4))  # plain BatchNorm
    """

    is_bnlab_norm = True

    def __init__(
        self,
        num_features: int,
        *,
        spatial_dims: int = 2,
        affine: bool = True,
        mean_range: Optional[float] = None,
        scale_max: Optional[float] = None,
        jitter: Optional[float] = None,
        seed: Optional[int] = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
        track_running_stats: bool = True,
    ):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats)
        if spatial_dims not in (0, 1, 2, 3):
            raise UserError(f"bn-noisy: spatial_dims must be 0, 1, 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims
        self.mean_range = float(NOISE_DEFAULTS["mean_range"] if mean_range is None else mean_range)
        self.scale_max = float(NOISE_DEFAULTS["scale_max"] if scale_max is None else scale_max)
        self.jitter = float(NOISE_DEFAULTS["jitter"] if jitter is None else jitter)
        _check(self.mean_range, self.scale_max, self.jitter)
        self.register_buffer("noise_seed", torch.tensor(_seed_from_global_state() if seed is None else int(seed) & _MASK63, dtype=torch.long))
        self.register_buffer("noise_step", torch.tensor(0, dtype=torch.long))
        self._own_step = self.noise_step
        self.register_load_state_dict_post_hook(_refresh_own_step)  # load_state_dict(assign=True) replaces buffers

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != self.spatial_dims + 2:
            raise ValueError(f"NoisyBatchNorm(spatial_dims={self.spatial_dims}) expects {self.spatial_dims + 2}-D input, got {input.dim()}-D")

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        _refresh_own_step(self)  # .to(device) may have replaced the buffer
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, spatial_dims={self.spatial_dims}, mean_range={self.mean_range}, scale_max={self.scale_max}, jitter={self.jitter}"

    def reseed(self, seed: int) -> None:
        """Set the noise seed and restart the step counter at 0."""
        with torch.no_grad():
            self.noise_seed.fill_(int(seed) & _MASK63)
            self.noise_step.zero_()

    def noise(self, shape: torch.Size, *, step: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The multiplier and offset ``(a, b)`` of ``y = a ŷ + b`` for training forward ``step``.

        Deterministic in ``(noise_seed, step)``. Shapes: both ``shape`` (the activation's).
        """
        seed = _splitmix64(int(self.noise_seed) ^ _splitmix64(int(step))) & _MASK63
        gen = torch.Generator(device=device).manual_seed(seed)  # the layer's own, seeded per step
        c = shape[1]
        view = (1, c) + (1,) * (len(shape) - 2)
        u = torch.rand(2, c, generator=gen, device=device, dtype=dtype)
        mu = ((2 * u[0] - 1) * self.mean_range).view(view)
        sigma = (1 + (self.scale_max - 1) * u[1]).view(view)
        if self.jitter > 0:
            xi = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            zeta = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            return sigma * (1 + self.jitter * xi), mu + self.jitter * zeta
        return sigma.expand(shape), mu.expand(shape)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        y = super().forward(input)  # BatchNorm with affine; updates the running stats in train mode
        if not self.training:
            return y
        counter = self.noise_step
        if counter is self._own_step:  # a training forward with the layer's own state: advance
            with torch.no_grad():
                counter.add_(1)
        a, b = self.noise(y.shape, step=int(counter), dtype=y.dtype, device=y.device)
        return y * a + b


def noisy_layers(model: nn.Module) -> list[NoisyBatchNorm]:
    """The :class:`NoisyBatchNorm` layers of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, NoisyBatchNorm)]


def reseed_noise(model: nn.Module, seed: int) -> None:
    """Give the noisy layers of ``model`` the seeds ``hash(seed, layer index)`` and reset their steps."""
    for i, m in enumerate(noisy_layers(model)):
        m.reseed(_splitmix64((int(seed) << 16) + i))


@contextlib.contextmanager
def noise_config(*, mean_range: Optional[float] = None, scale_max: Optional[float] = None, jitter: Optional[float] = None) -> Iterator[dict]:
    """Change :data:`NOISE_DEFAULTS` for the ``bn-noisy`` layers built inside the block.

    Example:
        >>> with noise_config(mean_range=1.0, scale_max=2.0):
        ...     net = bnlab.models.make("convnet", norm="bn-noisy", in_shape=(1, 8, 8), num_classes=10)
    """
    new = {k: float(v) for k, v in (("mean_range", mean_range), ("scale_max", scale_max), ("jitter", jitter)) if v is not None}
    merged = {**NOISE_DEFAULTS, **new}
    _check(merged["mean_range"], merged["scale_max"], merged["jitter"])
    old = dict(NOISE_DEFAULTS)
    NOISE_DEFAULTS.update(new)
    try:
        yield dict(NOISE_DEFAULTS)
    finally:
        NOISE_DEFAULTS.clear()
        NOISE_DEFAULTS.update(old)


def register_noisy_norm(name: str, *, mean_range: Optional[float] = None, scale_max: Optional[float] = None, jitter: Optional[float] = None):
    """Register a noisy-BN variant with fixed noise parameters as norm ``name`` (e.g. ``"bn-noisy-strong"``)."""
    _check(*(NOISE_DEFAULTS[k] if v is None else float(v) for k, v in (("mean_range", mean_range), ("scale_max", scale_max), ("jitter", jitter))))

    @register_norm(name)
    def _factory(num_channels: int, *, spatial_dims: int, affine: bool = True) -> nn.Module:
        return NoisyBatchNorm(num_channels, spatial_dims=spatial_dims, affine=affine, mean_range=mean_range, scale_max=scale_max, jitter=jitter)

    return _factory


@register_norm("bn-noisy")
def _bn_noisy(num_channels: int, *, spatial_dims: int, affine: bool = True) -> nn.Module:
    return NoisyBatchNorm(num_channels, spatial_dims=spatial_dims, affine=affine)
