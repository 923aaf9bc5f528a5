"""``exp-lr``'s settings (``Config``), decision thresholds (``Thresholds``) and the arms it compares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models import NORMS
from ...schedules import wd_equivalent_alpha

#: The arrays file of a run (per-step series of every arm and pair).
SERIES_FILE = "series.npz"

#: The arms of part A: name -> (net, schedule, dtype, BN eps). net: ``si`` (fully scale-invariant BN
#: net), ``std`` (affine BN, trainable classifier) or ``si_<norm>`` (fully scale-invariant with another
#: norm layer, one per ``Config.other_norms``, added by :func:`a_arms`); eps ``"exact"`` = ``exact_bn_eps``,
#: ``None`` = the norm layer's default. Schedules: ``wd`` (constant LR + WD), ``sd`` (step decay + WD),
#: ``exp`` (ExpLR), ``texp`` (TEXP), ``exp_nopreset`` (ExpLR, preset buffer removed), ``zb_exp`` /
#: ``zb_texp`` (ExactExpLR, PyTorch's lazily created buffers; constant LR / step decay), ``w1`` (constant
#: LR + WD with ``w1_weight_decay``).
A_ARMS = {
    "wd": ("si", "wd", torch.float64, "exact"),
    "exp": ("si", "exp", torch.float64, "exact"),
    "exp_nopreset": ("si", "exp_nopreset", torch.float64, "exact"),
    "sd": ("si", "sd", torch.float64, "exact"),
    "texp": ("si", "texp", torch.float64, "exact"),
    "zb_exp": ("si", "zb_exp", torch.float64, "exact"),
    "zb_texp": ("si", "zb_texp", torch.float64, "exact"),
    "w1": ("si", "w1", torch.float64, "exact"),
    "wd32": ("si", "wd", torch.float32, "exact"),
    "exp32": ("si", "exp", torch.float32, "exact"),
    "wd_eps": ("si", "wd", torch.float64, None),
    "exp_eps": ("si", "exp", torch.float64, None),
    "std_wd": ("std", "wd", torch.float64, None),
    "std_exp": ("std", "exp", torch.float64, None),
}
#: The pairs of part A: pair -> (arm a, arm b, description); ``norm_<norm>`` pairs are added by :func:`a_pairs`.
A_PAIRS = {
    "exact": ("wd", "exp", "WD vs ExpLR, float64, eps 0"),
    "texp": ("sd", "texp", "step decay+WD vs TEXP, float64, eps 0"),
    "zero_buffer": ("wd", "zb_exp", "WD vs exact ExpLR from zero buffers"),
    "zero_buffer_sd": ("sd", "zb_texp", "step decay+WD vs exact TEXP from zero buffers"),
    "ablation": ("wd", "exp_nopreset", "WD vs ExpLR without buffer preset"),
    "float32": ("wd32", "exp32", "WD vs ExpLR, float32, eps 0"),
    "bn_eps": ("wd_eps", "exp_eps", "WD vs ExpLR, float64, BN eps 1e-5"),
    "standard": ("std_wd", "std_exp", "standard net: WD vs ExpLR on all params"),
}
#: The pairs run for ``equiv_steps`` (with the ``norm_<norm>`` pairs); the others (side pairs) for ``side_steps``.
MAIN_PAIRS = ("exact", "texp", "zero_buffer", "zero_buffer_sd")
#: The arms whose angular update per step (each trained tensor) is recorded (claim W1).
ANGULAR_ARMS = ("w1", "wd")
#: The arms of part B: name -> (net, schedule).
B_ARMS = {
    "wd": ("si", "wd"), "exp": ("si", "exp"), "sd": ("si", "sd"), "texp": ("si", "texp"),
    "std_wd": ("std", "wd"), "std_exp": ("std", "exp"),
}
#: The pairs of part B whose angles are recorded.
B_PAIRS = {"exact": ("wd", "exp"), "texp": ("sd", "texp"), "standard": ("std_wd", "std_exp")}

LABELS = {
    "wd": "const LR + WD", "exp": "ExpLR (no WD)", "exp_nopreset": "ExpLR, zero buffer", "sd": "step decay + WD",
    "texp": "TEXP (no WD)", "zb_exp": "exact ExpLR, zero buffers", "zb_texp": "exact TEXP, zero buffers",
    "w1": "const LR + WD (W1's λ)", "std_wd": "standard net, const LR + WD", "std_exp": "standard net, ExpLR",
}


def a_arms(other_norms) -> dict:
    """:data:`A_ARMS` plus ``<norm>_wd`` / ``<norm>_exp`` (float64, eps 0) for each of ``other_norms``."""
    out = dict(A_ARMS)
    for n in other_norms:
        out[f"{n}_wd"] = (f"si_{n}", "wd", torch.float64, "exact")
        out[f"{n}_exp"] = (f"si_{n}", "exp", torch.float64, "exact")
    return out


def a_pairs(other_norms) -> dict:
    """:data:`A_PAIRS` plus ``norm_<norm>`` (WD vs ExpLR on the net with that norm) for each of ``other_norms``."""
    out = dict(A_PAIRS)
    for n in other_norms:
        out[f"norm_{n}"] = (f"{n}_wd", f"{n}_exp", f"{n.upper()} net: WD vs ExpLR, float64, eps 0")
    return out


def label(arm: str) -> str:
    """A legend label for an arm (``<norm>_wd``/``<norm>_exp`` included)."""
    if arm in LABELS:
        return LABELS[arm]
    norm, _, kind = arm.rpartition("_")
    return f"{norm.upper()} net, " + LABELS.get(kind, kind)


def decay_phases(lr: float, decay_at, decay_factor: float, steps: int) -> list[tuple[int, float]]:
    """Step decay as ``[(start step, lr), ...]``: ``lr`` from step 0, times ``decay_factor`` at each
    fraction ``decay_at`` of ``steps`` (fractions rounding to step 0 or to the same step count once)."""
    starts = sorted({int(round(f * steps)) for f in decay_at} - {0})
    return [(0, float(lr))] + [(s, float(lr) * float(decay_factor) ** (i + 1)) for i, s in enumerate(starts)]


@dataclass(frozen=True)
class Config:
    """What ``exp-lr`` trains and measures (hashed: names the run)."""

    data: str = "digits"
    """Dataset (``bnlab list``)."""
    model: str = "convnet"
    """Model (``bnlab list``), built fully scale-invariant (no BN affine, classifier frozen) or standard."""
    width: int = 4
    """Model width in part A (equivalence)."""
    depth: int = 1
    """Model depth (parts A and B)."""
    acc_width: int = 8
    """Model width in part B (accuracy)."""
    lr: float = 0.1
    """Learning rate η (the constant LR of the weight-decay runs; ExpLR's η̃_0 = η/α)."""
    momentum: float = 0.9
    """SGD momentum γ."""
    weight_decay: float = 5e-4
    """Weight decay λ of the baselines (ExpLR/TEXP use the equivalent schedule instead)."""
    decay_at: tuple[float, ...] = (0.5, 0.75)
    """Step decay: fractions of the run (in (0, 1)) where the LR is multiplied by ``decay_factor``."""
    decay_factor: float = 0.1
    """Step decay: the LR factor at each boundary."""
    exact_bn_eps: float = 1e-30
    """BN's eps in the exact float64 arms (zero in effect; PyTorch refuses 0)."""
    equiv_steps: int = 1000
    """Part A: steps of the main pairs (exact, ablation, TEXP)."""
    equiv_batch_size: int = 32
    """Part A: examples per step."""
    output_batch: int = 64
    """Test inputs in the fixed batch on which outputs (logits) are compared."""
    output_every: int = 10
    """Part A main pairs: steps between output comparisons (0: never)."""
    equiv_eval_every: int = 100
    """Part A: steps between test evaluations and eval-mode output comparisons (0: never)."""
    side_steps: int = 300
    """Part A: steps of the side pairs (no buffer preset, float32, BN eps, standard net); 0: no side pairs."""
    other_norms: tuple[str, ...] = ("gn", "ln")
    """Part A: norm layers (``bnlab list``) besides BN whose fully scale-invariant nets (no affine, frozen
    classifier, eps ``exact_bn_eps``) are run as WD vs ExpLR pairs for ``equiv_steps`` (claim L6)."""
    w1_weight_decay: float = 0.01
    """Part A: weight decay λ of the extra constant-LR arm ``w1`` whose angular update per step is compared with
    √(2ηλ/(1+γ)) (claim W1); large enough that the norm equilibrates within ``equiv_steps`` (time scale
    (1-γ)/(2ηλ) = 50 steps at the defaults)."""
    side_output_every: int = 10
    """Part A side pairs: steps between output comparisons (0: never)."""
    acc_steps: int = 400
    """Part B: steps per run."""
    acc_batch_size: int = 64
    """Part B: examples per step."""
    acc_seeds: tuple[int, ...] = (0, 1, 2)
    """Part B: seeds (initialization and batch order), one group of arms each."""
    acc_standard_seeds: int = 3
    """Part B: the standard-net arms run for the first this many seeds."""
    acc_eval_every: int = 42
    """Part B: steps between train/test evaluations, and one at the end (0: none, so accuracy is not judged)."""
    overflow_steps: int = 40_000
    """Part C: float32 steps of the tiny net."""
    overflow_weight_decay: float = 0.01
    """Part C: the weight decay λ whose equivalent ExpLR is run (sets the LR growth per step: x1.02 at 0.01, so
    the plain run overflows float32 after ~4,000 steps)."""
    overflow_log_every: int = 100
    """Part C: steps between recorded points of the series."""
    renorm_bound: float = 256.0
    """ExpLR/TEXP renormalize by a power of two when the weight norm has changed by this factor."""
    seed: int = 0
    """Seed of the data split, part A's initialization and batch order, and part C's tiny net."""

    def __post_init__(self) -> None:
        for key in ("equiv_steps", "acc_steps", "overflow_steps", "equiv_batch_size", "acc_batch_size", "output_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if not self.acc_seeds:
            raise ValueError("acc_seeds must list at least one seed")
        if any(not 0 < f < 1 for f in self.decay_at):
            raise ValueError(f"decay_at must be a list of fractions in (0, 1), got {self.decay_at!r}")
        for key in ("output_every", "equiv_eval_every", "side_steps", "side_output_every", "acc_eval_every",
                    "acc_standard_seeds"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        wd_equivalent_alpha(lr=self.lr, weight_decay=self.weight_decay, momentum=self.momentum)
        wd_equivalent_alpha(lr=self.lr, weight_decay=self.overflow_weight_decay, momentum=self.momentum)
        wd_equivalent_alpha(lr=self.lr, weight_decay=self.w1_weight_decay, momentum=self.momentum)
        for n in self.other_norms:
            if n not in NORMS or n in ("bn", "none"):
                raise ValueError(f"other_norms takes norm layers other than bn and none ({', '.join(sorted(NORMS))}), "
                                 f"got {n!r}")
        if len(set(self.other_norms)) != len(self.other_norms):
            raise ValueError(f"other_norms lists a norm twice: {self.other_norms!r}")


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``exp-lr``'s decision rules."""

    equiv_tol: float = 1e-6
    """L1, L3, L6, L7: directions "agree" when the max angle (rad) between the two runs stays ≤ this. Float64 round-off
    amplified over 1000 steps measures ~1e-12; an error in the map (e.g. no buffer preset: 1.5e-5 after one step)
    exceeds it from the first steps."""
    required_equiv_steps: int = 1000
    """L1, L3, L6, L7: the max angle is taken over the first this many steps (the LR grows 2.7x over 1000 steps at
    the paper's η, λ); fewer steps run: inconclusive."""
    invariance_tol: float = 1e-9
    """L1, L3, L6, L7 precondition: the net is fully scale-invariant when max |f(3w) − f(w)| / max |f(w)| (float64,
    train mode) is ≤ this (round-off is ~1e-15; BN's default eps gives ~1e-6); larger: inconclusive."""
    material_angle: float = 1e-3
    """L2: the runs without the buffer mapping must part by at least this angle (rad), a thousand times L1's
    tolerance: a visible difference in the weights' directions, not round-off."""
    acc_tol: float = 0.01
    """L4 (fully scale-invariant net): ExpLR/TEXP match WD/step decay when the mean final test accuracies differ by at
    most this (1 point), fixed in advance (never widened by the seed spread)."""
    std_acc_tol: float = 0.02
    """L4 (standard net: affine BN, trained classifier, no exact equivalence): ExpLR on all parameters matches WD on
    all parameters when the mean final test accuracies differ by at most this (2 points, a looser declared bound)."""
    min_seeds: int = 3
    """L4: accuracies are compared over at least this many seeds; fewer: inconclusive."""
    trained_acc: float = 0.5
    """L4 precondition: the baseline (WD / step decay) "trains" when its mean final test accuracy reaches this (10
    classes: chance is 10%); otherwise there is nothing to match: inconclusive."""
    required_overflow_steps: int = 40_000
    """L5: the renormalized float32 run must stay finite for at least this many steps (~10x the plain run's overflow
    step at λ = 0.01, where the un-rescaled LR reaches 2^1288, beyond even float64); fewer run: inconclusive."""
    w1_rel_tol: float = 0.1
    """W1: the late-training RMS angular update of every scale-invariant tensor must be within this relative distance
    of √(2ηλ/(1+γ)) (the prediction neglects O(ηλ) terms and gradient correlations; before settling the update is
    off by a factor 2-3)."""
    w1_window: float = 0.5
    """W1: the late-training window is this last fraction of the run."""
    w1_settle_tol: float = 0.1
    """W1 precondition: the run has settled when, for every tensor, the RMS angular updates over the two halves of the
    window differ by at most this fraction of the window's; otherwise inconclusive."""
