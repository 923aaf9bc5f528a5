"""Probes: measurements attached to a training loop (see :mod:`bnlab.probes.base`)."""

from .base import COST_CLASSES, Probe, StepContext, every, log_spaced
from .basic import GradNorm, LearningRate, WeightNorm
from .scale import ScaleInvariantStats

__all__ = ["COST_CLASSES", "Probe", "StepContext", "every", "log_spaced", "GradNorm", "LearningRate", "WeightNorm", "ScaleInvariantStats"]
