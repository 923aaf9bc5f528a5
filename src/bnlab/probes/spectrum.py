"""The outline of the Hessian's eigenvalue density during training (Ghorbani, Krishnan, Xiao 2019).

:class:`SpectrumProbe` runs :func:`bnlab.spectrum.spectral_density` (stochastic Lanczos quadrature)
at ``after_backward`` of a scheduled step, at ``w_t``, and records the outline of the density:
the top eigenvalue ``λ̂_1``, the bulk edge ``λ_b``, their ratio, the outlier mass above the edge
and above ``far_factor · λ_b`` (as numbers of eigenvalues, ``n μ̂``), the spread of the ratio over
the runs, and the share of ``‖g‖²`` in the top-``k`` eigenspace and above the edge. The Hessian is
that of the step's batch (the default, as the other curvature probes) or, given ``batches``, of
the mean loss over those fixed batches (:class:`bnlab.dataset_curvature.DatasetHessianOperator`,
the papers' dataset-level Hessian). With ``eval_mode=True`` it is the Hessian of the network with
BatchNorm on population statistics: a copy of the model whose running statistics are recomputed
as the plain average over the batches (``momentum=None``), put in eval mode (Ghorbani et al.,
sec. 4: the outliers return).

Cost: ``n_runs · n_steps + n_steps`` dataset-level HVPs per measurement; the default schedule is
sparse (steps 0, 10, 31, 99, 316, 999, ...). The model, its buffers, ``.grad`` and the RNG are
left unchanged (the population statistics live in a copy).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import Probe, StepContext, log_spaced

__all__ = ["SpectrumProbe", "population_statistics"]

_OUTLINE = ("top", "bulk_edge", "top_to_edge", "outlier_mass", "n_outliers", "n_far", "ratio_spread", "grad_share",
            "grad_share_outliers", "n_hvp")


def population_statistics(model: nn.Module, batches: Sequence[Any]) -> nn.Module:
    """A copy of ``model`` in eval mode whose BatchNorm running statistics are the plain average of
    the batch statistics over ``batches`` (``momentum=None``: a cumulative mean; the running
    variance is the mean of the unbiased batch variances). ``model`` is not changed."""
    from ..adapters import forward

    net = copy.deepcopy(model)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    with torch.no_grad():
        for b in batches:
            forward(net, b)
    return net.eval()


class SpectrumProbe(Probe):
    """Outline of the Hessian eigenvalue density by stochastic Lanczos quadrature (cost: expensive).

    Records ``top``, ``bulk_edge``, ``top_to_edge``, ``outlier_mass``, ``n_outliers``, ``n_far``
    (eigenvalues above ``far_factor · bulk_edge``), ``ratio_spread``, ``grad_share`` (top-``k``
    eigenspace), ``grad_share_outliers`` and ``n_hvp`` (see :class:`bnlab.spectrum.SpectralDensity`).

    Args:
        every: steps to measure at (default: steps 0, 10, 31, 99, 316, 999, ...).
        batches: fixed batches of the dataset-level Hessian; ``None``: the step's batch.
        eval_mode: BatchNorm on population statistics of ``batches`` (or of the step's batch).
        n_runs, n_steps, top_k, bulk_count, gap_frac, seed: as in :func:`bnlab.spectrum.spectral_density`.
        far_factor: ``n_far`` counts the eigenvalues above this multiple of the bulk edge.
        keep: keep every :class:`~bnlab.spectrum.SpectralDensity` in ``self.results`` as
            ``(step, density)`` (for figures).
        name: metric prefix.

    Example:
        >>> train(net, data, opt, steps=500, probes=[SpectrumProbe(batches=[data.full_batch()])])
    """

    name = "spectrum"
    cost = "expensive"

    def __init__(self, every: Union[int, Callable[[int], bool], None] = None, *, batches: Optional[Sequence[Any]] = None,
                 eval_mode: bool = False, n_runs: int = 5, n_steps: int = 40, top_k: int = 10, bulk_count: float = 10.0,
                 gap_frac: float = 0.1, far_factor: float = 5.0, seed: int = 0, keep: bool = False, name: str = "spectrum"):
        super().__init__(log_spaced(first=10, per_decade=2) if every is None else every)
        if not (math.isfinite(far_factor) and far_factor >= 1):
            raise UserError(f"far_factor must be a finite number >= 1, got {far_factor!r}")
        self.batches = None if batches is None else list(batches)
        self.eval_mode = eval_mode
        self.kwargs = dict(n_runs=n_runs, n_steps=n_steps, top_k=top_k, bulk_count=bulk_count, gap_frac=gap_frac, seed=seed)
        self.far_factor = far_factor
        self.keep = keep
        self.results: list = []
        self.name = name

    def measure(self, model: nn.Module, batches: Sequence[Any], loss_fn: Optional[Callable] = None):
        """The :class:`~bnlab.spectrum.SpectralDensity` of ``model`` on ``batches`` now (model unchanged)."""
        from ..adapters import batch_to
        from ..curvature import model_state_preserved
        from ..dataset_curvature import DatasetHessianOperator
        from ..spectrum import spectral_density

        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        batches = [batch_to(b, dev) for b in batches]
        with model_state_preserved(model):
            net = population_statistics(model, batches) if self.eval_mode else model
            loss_fn = loss_fn if loss_fn is not None else (None if isinstance(batches[0], Mapping) else F.cross_entropy)
            op = DatasetHessianOperator(net, batches, loss_fn, retain_graphs=True, distributed=False)
            return spectral_density(op, **self.kwargs)

    def outline(self, sd) -> dict:
        """The recorded numbers of a density (NaN for ``None``: a measurement that failed)."""
        if sd is None:
            return {k: math.nan for k in _OUTLINE}
        out = sd.outline()
        edge = sd.bulk_edge
        out["n_far"] = sd.n * sd.mass_between(self.far_factor * edge, math.inf) if edge > 0 else math.nan
        return {k: float(out[k]) for k in _OUTLINE}

    def after_backward(self, ctx: StepContext) -> dict:
        batches = self.batches if self.batches is not None else (
            [ctx.batch if isinstance(ctx.batch, Mapping) else tuple(ctx.batch)] if ctx.batch is not None else None)
        if not batches:
            return {}
        try:
            sd = self.measure(ctx.model, batches, ctx.loss_fn)
        except UserError:  # non-finite HVPs (a diverging run): recorded as NaN, never raised
            sd = None
        if self.keep:
            self.results.append((ctx.step, sd))
        return self.outline(sd)
