"""``exp-lr``'s settings (``Config``), decision thresholds (``Thresholds``) and the arms it compares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...schedules import wd_equivalent_alpha

#: The arrays file of a run (per-step series of every arm and pair).
SERIES_FILE = "series.npz"

#: The arms of part A: name -> (net, schedule, dtype, BN eps). net: ``si`` (fully scale-invariant)
#: or ``std`` (affine BN, trainable classifier); eps ``"exact"`` = ``exact_bn_eps``, ``None`` = BN's default.
A_ARMS = {
    "wd": ("si", "wd", torch.float64, "exact"),
    "exp": ("si", "exp", torch.float64, "exact"),
    "exp_nopreset": ("si", "exp_nopreset", torch.float64, "exact"),
    "sd": ("si", "sd", torch.float64, "exact"),
    "texp": ("si", "texp", torch.float64, "exact"),
    "wd32": ("si", "wd", torch.float32, "exact"),
    "exp32": ("si", "exp", torch.float32, "exact"),
    "wd_eps": ("si", "wd", torch.float64, None),
    "exp_eps": ("si", "exp", torch.float64, None),
    "std_wd": ("std", "wd", torch.float64, None),
    "std_exp": ("std", "exp", torch.float64, None),
}
#: The pairs of part A: pair -> (arm a, arm b, description).
A_PAIRS = {
    "exact": ("wd", "exp", "WD vs ExpLR, float64, eps 0"),
    "ablation": ("wd", "exp_nopreset", "WD vs ExpLR without buffer preset"),
    "texp": ("sd", "texp", "step decay+WD vs TEXP, float64, eps 0"),
    "float32": ("wd32", "exp32", "WD vs ExpLR, float32, eps 0"),
    "bn_eps": ("wd_eps", "exp_eps", "WD vs ExpLR, float64, BN eps 1e-5"),
    "standard": ("std_wd", "std_exp", "standard net: WD vs ExpLR on all params"),
}
#: The pairs run for ``equiv_steps``; the others (side pairs) run for ``side_steps``.
MAIN_PAIRS = ("exact", "ablation", "texp")
#: The arms of part B: name -> (net, schedule).
B_ARMS = {
    "wd": ("si", "wd"), "exp": ("si", "exp"), "sd": ("si", "sd"), "texp": ("si", "texp"),
    "std_wd": ("std", "wd"), "std_exp": ("std", "exp"),
}
#: The pairs of part B whose angles are recorded.
B_PAIRS = {"exact": ("wd", "exp"), "texp": ("sd", "texp"), "standard": ("std_wd", "std_exp")}

LABELS = {
    "wd": "const LR + WD", "exp": "ExpLR (no WD)", "exp_nopreset": "ExpLR, zero buffer", "sd": "step decay + WD",
    "texp": "TEXP (no WD)", "std_wd": "standard net, const LR + WD", "std_exp": "standard net, ExpLR",
}


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
    output_every: int = 1
    """Part A main pairs: steps between output comparisons (0: never)."""
    equiv_eval_every: int = 100
    """Part A: steps between test evaluations and eval-mode output comparisons (0: never)."""
    side_steps: int = 300
    """Part A: steps of the side pairs (float32, BN eps, standard net); 0: no side pairs."""
    side_output_every: int = 10
    """Part A side pairs: steps between output comparisons (0: never)."""
    acc_steps: int = 400
    """Part B: steps per run."""
    acc_batch_size: int = 64
    """Part B: examples per step."""
    acc_seeds: tuple[int, ...] = (0, 1, 2)
    """Part B: seeds (initialization and batch order), one group of arms each."""
    acc_standard_seeds: int = 1
    """Part B: the standard-net arms run for the first this many seeds."""
    acc_eval_every: int = 42
    """Part B: steps between train/test evaluations, and one at the end (0: none, so accuracy is not judged)."""
    overflow_steps: int = 100_000
    """Part C: float32 steps of the tiny net."""
    overflow_weight_decay: float = 5e-3
    """Part C: the weight decay λ whose equivalent ExpLR is run (sets the LR growth per step)."""
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


@dataclass(frozen=True)
class Thresholds:
    """The numbers of ``exp-lr``'s decision rules."""

    equiv_tol: float = 1e-6
    """Directions "agree" when the max angle (rad) between the WD and ExpLR runs stays ≤ this; the ablation must exceed it."""
    required_equiv_steps: int = 1000
    """The equivalence claims take the max angle over the first this many steps; fewer run: directions-agree is inconclusive."""
    acc_tol: float = 0.02
    """ExpLR/TEXP match the baselines' mean final test accuracy within max(this, the baselines' seed range)."""
    required_overflow_steps: int = 100_000
    """The renormalized float32 run must stay finite for at least this many steps; fewer run: inconclusive."""
