"""Probes: measurements attached to a training loop (see :mod:`bnlab.probes.base`).

=========================  ==========  ==============================================================
probe                      cost        what it records
=========================  ==========  ==============================================================
GradNorm, WeightNorm       cheap       ‖∇L‖, ‖w‖ over all trained parameters
LearningRate               cheap       the LR of each optimizer group
ScaleInvariantStats        cheap       per scale-invariant group: ‖w‖, ‖g‖, η/‖w‖², angular update, ...
ActivationStats            cheap       per layer (and channel): mean, std, largest magnitude
OutputGradients            standard    ∂ℓ_i/∂logits and |Σ_i ∂ℓ_i| against Σ_i |∂ℓ_i|
UpdateInterpolation        standard    activation statistics along w + sΔw, s in [0, 1]
LandscapeProbe             standard    loss band, gradient-predictiveness band, β-smoothness
InternalCovariateShift     standard    per layer ‖G − G'‖ and cos(G, G')
ActivationQuantiles        standard    percentiles of one layer's channels
HessianQuadForm            expensive   gᵀHg / ‖g‖²
TopHessianEigenvalue       expensive   λ_max by Lanczos over Hessian-vector products
=========================  ==========  ==============================================================
"""

from .activations import ActivationStats, OutputGradients, UpdateInterpolation, activation_stats, gradient_alignment, output_gradients
from .base import COST_CLASSES, Probe, StepContext, every, log_spaced
from .basic import GradNorm, LearningRate, WeightNorm
from .curvature import HessianQuadForm, TopHessianEigenvalue
from .ics import ActivationQuantiles, InternalCovariateShift
from .landscape import LandscapeProbe
from .scale import ScaleInvariantStats

__all__ = [
    "COST_CLASSES", "Probe", "StepContext", "every", "log_spaced",
    "GradNorm", "LearningRate", "WeightNorm", "ScaleInvariantStats",
    "ActivationStats", "OutputGradients", "UpdateInterpolation", "activation_stats", "gradient_alignment", "output_gradients",
    "LandscapeProbe", "HessianQuadForm", "TopHessianEigenvalue", "InternalCovariateShift", "ActivationQuantiles",
]
