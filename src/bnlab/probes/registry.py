"""The probe registry: every probe by name, with a factory that builds it for a given model.

``PROBES[name].build(model, batch, loss_fn, every=...)`` returns a ready probe with sensible
defaults for that model (e.g. :class:`~bnlab.probes.ScaleInvariantStats` gets the groups
:func:`bnlab.scale.find_scale_invariant` confirms; :class:`~bnlab.probes.ActivationQuantiles` the
first activation layer). The test suite runs one check over the whole registry: training with
each probe gives bit-identical weights, buffers, gradients, optimizer state and RNG state as
training without it. A probe class that is not registered fails that suite, so every new probe is
covered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch.nn.functional as F
from torch import nn

from ..errors import UserError, unknown_name
from .base import Probe

Schedule = Union[int, Callable[[int], bool]]


@dataclass(frozen=True)
class ProbeEntry:
    """A registered probe.

    Attributes:
        name: the registry name (kebab-case).
        cls: the probe class.
        build: ``build(model, batch, loss_fn, every) -> Probe``.
        summary: what it records, in one line.
        cost: the cost class of the probes it builds (``cheap``, ``standard``, ``expensive``).
    """

    name: str
    cls: type
    build: Callable[[nn.Module, Any, Callable, Schedule], Probe]
    summary: str
    cost: str


PROBES: dict[str, ProbeEntry] = {}


def register_probe(name: str, cls: type, summary: str, build: Callable | None = None, *, cost: str | None = None) -> None:
    """Register ``cls`` under ``name``; ``build`` defaults to ``cls(every=every)``, ``cost`` to ``cls.cost``."""
    if name in PROBES:
        raise ValueError(f"probe {name!r} is already registered")
    if not (isinstance(cls, type) and issubclass(cls, Probe)):
        raise ValueError(f"probe {name!r}: {cls!r} is not a Probe subclass")
    PROBES[name] = ProbeEntry(name, cls, build or (lambda model, batch, loss_fn, every: cls(every=every)), summary,
                              cost or cls.cost)


def make_probe(name: str, model: nn.Module, batch=None, loss_fn: Optional[Callable] = None, *, every: Schedule = 1) -> Probe:
    """The probe ``name`` built for ``model`` (``batch``: an ``(x, y)`` sample, or a dict batch, some
    factories need). ``loss_fn`` ``None``: ``F.cross_entropy`` for an ``(x, y)`` batch, the model's
    own ``output.loss`` for a dict batch (:func:`bnlab.adapters.default_loss_fn`).

    A probe built by name keeps no per-step history in memory (``keep=False``): its numbers go to the
    records, so memory stays flat over a run (a kept history grows every measured step: ``ActivationStats``
    ~160 KB a step on ResNet-18, ``OutputGradients`` a tokens x vocabulary matrix on a language model).
    Construct the class with ``keep=True`` for the history."""
    if name not in PROBES:
        raise unknown_name("probe", name, PROBES)
    if loss_fn is None:
        from ..adapters import default_loss_fn

        loss_fn = default_loss_fn(batch) if batch is not None else F.cross_entropy
    probe = PROBES[name].build(model, batch, loss_fn, every)
    if hasattr(probe, "keep") and hasattr(probe, "history"):
        probe.keep = False
    return probe


@dataclass(frozen=True)
class Preset:
    """A named bundle of probes with their schedules, chosen by what it may cost
    (``economy`` ~1.07x a bare step, ``business`` ~1.1x, ``full`` ~2.2x on ResNet-18, CPU).

    Attributes:
        name: the preset's name.
        probes: ``(registry name, every)`` pairs: probe ``name`` runs every ``every`` steps.
        summary: what it measures and what it costs, in one line.
    """

    name: str
    probes: tuple
    summary: str


PRESETS: dict[str, Preset] = {}


def register_preset(name: str, probes, summary: str) -> None:
    """Register a preset: ``probes`` is a sequence of ``(registry name, every)`` pairs."""
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    PRESETS[name] = Preset(name, tuple((str(n), int(e)) for n, e in probes), summary)


def make_preset(name: str, model: nn.Module, batch=None, loss_fn: Callable = F.cross_entropy) -> list[Probe]:
    """The probes of preset ``name`` built for ``model``, each on its schedule.

    ``batch`` (an ``(x, y)`` sample) is needed by the probes that first look at the model
    (``scale-invariant`` and the others built on :func:`bnlab.scale.find_scale_invariant`).

    Raises:
        UserError: unknown preset, or a probe of it needs ``batch`` and none was given.

    Example:
        >>> probes = make_preset("economy", net, (x, y))
        >>> train(net, data, opt, steps=1000, probes=probes)          # or probes="economy"
    """
    if name not in PRESETS:
        raise unknown_name("preset", name, PRESETS)
    out = []
    for pname, every in PRESETS[name].probes:
        if batch is None and pname in _NEEDS_BATCH:
            raise UserError(f"preset {name!r}: probe {pname!r} needs a sample batch (x, y); pass batch=")
        out.append(make_probe(pname, model, batch, loss_fn, every=every))  # no history kept (make_probe)
    return out


_NEEDS_BATCH = {"scale-invariant", "intrinsic-grad-norm", "intrinsic-grad-norm-objective", "scale-lemma"}


def first_activation_layer(model: nn.Module) -> str:
    """The name of the first ReLU (else the first normalization, else the first leaf module)."""
    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    for kinds in ((nn.ReLU,), (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
        for n, m in leaves:
            if isinstance(m, kinds):
                return n
    if not leaves:
        raise ValueError("the model has no layers")
    return leaves[0][0]


def _scale_invariant(model, batch, loss_fn, every):
    from ..scale import find_scale_invariant
    from .scale import ScaleInvariantStats

    return ScaleInvariantStats(find_scale_invariant(model, batch, loss_fn), every=every)


def _intrinsic(objective: bool):
    def build(model, batch, loss_fn, every):
        from ..scale import find_scale_invariant
        from .intrinsic import IntrinsicGradNorm

        si = {g.param_name: g.param for g in find_scale_invariant(model, batch, loss_fn) if g.per_channel}
        ids = {id(p) for p in si.values()}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        parts = None
        if objective:  # the batch cut in two: the finite-sum objective Σ_k |B_k|/N · L_{B_k}
            import torch

            from ..adapters import batch_size, is_dict_batch

            h = max(1, batch_size(batch) // 2)
            if is_dict_batch(batch):  # cut every tensor with the batch's leading dimension
                n = batch_size(batch)
                cut = {k: isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n for k, v in batch.items()}
                parts = [{k: (v[:h] if cut[k] else v) for k, v in batch.items()},
                         {k: (v[h:] if cut[k] else v) for k, v in batch.items()}]
            else:
                x, y = batch
                parts = [(x[:h], y[:h]), (x[h:], y[h:])]
        return IntrinsicGradNorm(si, others, objective=parts, every=every)

    return build


def _scale_lemma(model, batch, loss_fn, every):
    """The per-channel scale-invariant tensors :func:`bnlab.scale.find_scale_invariant` confirms; in a
    net with none, every weight matrix or filter bank (its residuals then measure how far it is from
    invariance)."""
    from ..scale import find_scale_invariant
    from .intrinsic import ScaleLemma

    si = {g.param_name: g.param for g in find_scale_invariant(model, batch, loss_fn) if g.per_channel}
    if not si:
        si = {n: p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2}
    return ScaleLemma(si, every=every)


def _register_builtin() -> None:
    from .activations import ActivationStats, OutputGradients, UpdateInterpolation
    from .basic import GradNorm, LearningRate, WeightNorm
    from .curvature import HessianQuadForm, TopHessianEigenvalue
    from .accuracy import TrainModeAccuracy
    from .ics import ActivationQuantiles, InternalCovariateShift
    from .intrinsic import IntrinsicGradNorm, ScaleLemma
    from .landscape import LandscapeProbe
    from .scale import ScaleInvariantStats

    register_probe("grad-norm", GradNorm, "‖∇L‖ over all trained parameters")
    register_probe("weight-norm", WeightNorm, "‖w‖ over all trained parameters")
    register_probe("lr", LearningRate, "the learning rate of each optimizer group")
    register_probe("scale-invariant", ScaleInvariantStats, "per scale-invariant group: ‖w‖, ‖g‖, η/‖w‖², angular update",
                   _scale_invariant)
    register_probe("activation-stats", ActivationStats, "per layer: mean, std, largest magnitude")
    register_probe("output-gradients", OutputGradients, "∂ℓ_i/∂logits and their alignment across examples")
    register_probe("update-interpolation", UpdateInterpolation, "activation statistics along w + sΔw",
                   lambda model, batch, loss_fn, every: UpdateInterpolation(every=every, s=3))
    register_probe("landscape", LandscapeProbe, "loss band, gradient-predictiveness band, β-smoothness along the gradient")
    register_probe("ics", InternalCovariateShift, "per layer ‖G − G'‖ and cos(G, G')")
    register_probe("activation-quantiles", ActivationQuantiles, "percentiles of one layer's channels",
                   lambda model, batch, loss_fn, every: ActivationQuantiles(first_activation_layer(model), every=every))
    register_probe("intrinsic-grad-norm", IntrinsicGradNorm,
                   "‖∇̃L‖² = Σ_i ‖w_i‖²‖∇_{w_i}L‖² + ‖∇_g L‖² from the step's gradient", _intrinsic(False))
    register_probe("intrinsic-grad-norm-objective", IntrinsicGradNorm,
                   "the same, of a fixed finite-sum objective (here: the batch in two parts)", _intrinsic(True),
                   cost="standard")
    register_probe("scale-lemma", ScaleLemma,
                   "|⟨∇L(w), w⟩|/(‖∇L‖‖w‖) and ‖c∇L(cw) − ∇L(w)‖/‖∇L‖ per scale-invariant tensor", _scale_lemma)
    register_probe("train-mode-accuracy", TrainModeAccuracy, "accuracy of the step's batch in training mode at w_t")
    register_probe("hessian-quad-form", HessianQuadForm, "gᵀHg / ‖g‖²")
    register_probe("top-hessian-eigenvalue", TopHessianEigenvalue, "λ_max by Lanczos over Hessian-vector products",
                   lambda model, batch, loss_fn, every: TopHessianEigenvalue(every=every, max_iter=4))
    from .spectrum import SpectrumProbe  # Ghorbani et al. 2019 (bnlab.spectrum)
    register_probe("spectrum", SpectrumProbe, "Hessian density outline: λ_top, bulk edge, outlier mass, ‖g‖² share in the top space",
                   lambda model, batch, loss_fn, every: SpectrumProbe(every=every, n_runs=2, n_steps=8, top_k=3))
    from .theory import SanturkarCurvature, SanturkarTerms  # Santurkar et al. §4 (bnlab.theory)
    register_probe("santurkar-terms", SanturkarTerms, "per BN layer: Thm 4.1's two sides (float64, ε = 0) and Obs. 4.3's shares")
    register_probe("santurkar-curvature", SanturkarCurvature, "per BN layer: Thm 4.2(a)/(b) from activation-space HVPs")


_register_builtin()


def _register_presets() -> None:
    """The cost presets, measured with ``benchmarks/probe_overhead.py`` (ResNet-18 in torchvision's
    layout, batch 32 of 3x32x32, CPU, one thread, 2-core machine; the every-step part timed
    directly, each scheduled probe added as its measured cost per call / its interval)::

        preset     every-step part   + scheduled    = total (x a bare training step)
        economy    1.059-1.065       + 0.006-0.009  = 1.07
        business   1.079-1.088       + 0.035-0.057  = 1.11-1.14
        full       1.152             + 0.479 (standard / 100) + 0.570 (expensive / 1000) = 2.2

    In ``full`` the expensive probes run every 1000 steps: ``santurkar-curvature`` alone costs
    ~484 steps a call on that model (every BN layer's Thm 4.2 terms from activation-space HVPs),
    which every 200 steps would add 2.4 steps to each step.
    """
    register_preset("economy", [("grad-norm", 1), ("weight-norm", 1), ("lr", 1), ("activation-stats", 10)],
                    "‖∇L‖, ‖w‖, learning rates every step, activation statistics every 10 steps; ~1.07x a bare step")
    register_preset("business", [("grad-norm", 1), ("weight-norm", 1), ("lr", 1), ("intrinsic-grad-norm", 1),
                                 ("scale-invariant", 10), ("activation-stats", 10), ("train-mode-accuracy", 50),
                                 ("hessian-quad-form", 200)],
                    "economy + the intrinsic gradient norm every step, the scale-invariant groups every 10 steps, "
                    "train-mode accuracy every 50, gᵀHg/‖g‖² every 200; ~1.1x a bare step")
    cheap = ("grad-norm", "weight-norm", "lr", "scale-invariant", "intrinsic-grad-norm")
    standard = sorted(n for n, e in PROBES.items() if e.cost == "standard")
    expensive = sorted(n for n, e in PROBES.items() if e.cost == "expensive")
    register_preset("full", [(n, 1) for n in cheap] + [("activation-stats", 10)] + [(n, 100) for n in standard]
                    + [(n, 1000) for n in expensive],
                    "every registered probe: the cheap ones every step (activations every 10), standard ones every "
                    "100 steps, expensive ones every 1000; ~2.2x a bare step")


_register_presets()
