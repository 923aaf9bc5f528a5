"""Probes: measurements attached to a training loop (see :mod:`bnlab.probes.base`).

=========================  ==========  ==============================================================
probe                      cost        what it records
=========================  ==========  ==============================================================
GradNorm, WeightNorm       cheap       ‖∇L‖, ‖w‖ over all trained parameters
LearningRate               cheap       the LR of each optimizer group
ScaleInvariantStats        cheap       per scale-invariant group: ‖w‖, ‖g‖, η/‖w‖², angular update, ...
ActivationStats            cheap       per layer (and channel): mean, std, largest magnitude
IntrinsicGradNorm          cheap       ‖∇̃L‖² = Σ_i ‖w_i‖²‖∇_{w_i}L‖² + ‖∇_g L‖² (standard with a fixed objective)
TrainModeAccuracy          standard    accuracy of the step's batch in training mode at w_t
ScaleLemma                 standard    |⟨∇L(w),w⟩|/(‖∇L‖‖w‖) and ‖c∇L(cw) − ∇L(w)‖/‖∇L‖ per scale-invariant tensor
OutputGradients            standard    ∂ℓ_i/∂logits and |Σ_i ∂ℓ_i| against Σ_i |∂ℓ_i|
UpdateInterpolation        standard    activation statistics along w + sΔw, s in [0, 1]
LandscapeProbe             standard    loss band, gradient-predictiveness band, β-smoothness
InternalCovariateShift     standard    per layer ‖G − G'‖ and cos(G, G')
ActivationQuantiles        standard    percentiles of one layer's channels
HessianQuadForm            expensive   gᵀHg / ‖g‖²
TopHessianEigenvalue       expensive   λ_max by Lanczos over Hessian-vector products
SanturkarTerms             standard    per BN layer: both sides of Santurkar Thm 4.1, the projection shares
SanturkarCurvature         expensive   per BN layer: both sides of Thm 4.2(a)/(b) from activation-space HVPs
SpectrumProbe              expensive   Hessian density outline (SLQ): λ_max, bulk edge, outlier mass, ‖g‖² share
=========================  ==========  ==============================================================

Every probe is registered by name in :data:`PROBES` (:mod:`bnlab.probes.registry`), with a factory
that builds it for a given model; one test over the registry checks that no probe changes training.
"""

from .accuracy import TrainModeAccuracy
from .activations import (ActivationStats, OutputGradients, UpdateInterpolation, activation_stats, gradient_alignment,
                          jacobian_spectra, output_gradients, representation_cosine)
from .base import COST_CLASSES, Probe, StepContext, every_n, log_spaced
from .basic import GradNorm, LearningRate, WeightNorm
from .curvature import HessianQuadForm, TopHessianEigenvalue
from .ics import ActivationQuantiles, InternalCovariateShift
from .intrinsic import IntrinsicGradNorm, ScaleLemma, scale_lemma_residuals
from .landscape import LandscapeProbe
from .scale import ScaleInvariantStats
from .spectrum import SpectrumProbe
from .theory import SanturkarCurvature, SanturkarTerms
from .registry import PRESETS, PROBES, Preset, ProbeEntry, make_preset, make_probe, register_preset, register_probe

__all__ = [
    "COST_CLASSES", "Probe", "StepContext", "every_n", "log_spaced",
    "GradNorm", "LearningRate", "WeightNorm", "ScaleInvariantStats",
    "ActivationStats", "OutputGradients", "UpdateInterpolation", "activation_stats", "gradient_alignment", "output_gradients",
    "jacobian_spectra", "representation_cosine",
    "LandscapeProbe", "HessianQuadForm", "TopHessianEigenvalue", "InternalCovariateShift", "ActivationQuantiles",
    "IntrinsicGradNorm", "ScaleLemma", "scale_lemma_residuals", "TrainModeAccuracy", "SanturkarTerms", "SanturkarCurvature", "SpectrumProbe", "PROBES", "ProbeEntry", "make_probe", "register_probe",
    "PRESETS", "Preset", "make_preset", "register_preset",
]
