"""``exp-lr``: an exponentially growing learning rate is weight decay in disguise (Li & Arora 2020).

Li & Arora, *An Exponential Learning Rate Schedule for Deep Learning* (ICLR 2020), Theorem 2.1:
if the loss is scale-invariant in all trained parameters jointly, SGD with constant
``(η, λ, γ)`` (learning rate, weight decay, momentum) and SGD with **no** weight decay, the same
``γ`` and ``η̃_t = η α^{-2t-1}`` visit the same directions ``w/‖w‖`` at every step
(``w̃_t = α^{-t} w_t``), provided the momentum buffer is mapped too
(:class:`bnlab.schedules.ExpLR`; ``α`` the larger root of ``x² - (1+γ-λη)x + γ``). TEXP
(:class:`bnlab.schedules.TEXP`) is the same for step decay. Power-of-two renormalization keeps
the exponential schedule inside float32's range (bnlab's own feature). bnlab's extension
:class:`bnlab.schedules.ExactExpLR` needs no preset buffer. A follow-up claim (Wan et al. 2020:
the angular update settles at ``√(2ηλ/(1+γ))``) is checked on the same net.

**Setting.** A fully scale-invariant BN net: ``models.make(model, norm="bn", affine=False,
freeze_last=True)`` (no BN γ/β, the classifier fixed), so every trained tensor is a conv/linear
weight feeding a BN layer (for ``preresnet`` this holds only jointly: residual sums mix convs;
``joint_invariance_error`` in the summary measures it: ``max |f(3w) - f(w)| / max |f(w)|`` on the
fixed batch, float64). Every arm of a comparison starts from the same initialization (the same
``seed``) and sees the same batches: the arms are stepped side by side in one loop
(:func:`bnlab.lockstep.lockstep`), and after every step :class:`bnlab.lockstep.PairTracker`
measures the angle between their weights (:func:`bnlab.scale.compare_trajectories`: per tensor and
all trained tensors jointly) and the largest difference of their outputs (logits) on a fixed batch
of test inputs, in train mode (batch statistics), evaluated statelessly (the BN running statistics
are untouched).

**Parts.**

* **A. Equivalence (L1, L2, L3, L6, L7, W1).** Float64 with the norm layers' ``eps = exact_bn_eps``
  (1e-30, zero in effect: PyTorch refuses 0; the theorem has no ``eps``), ``equiv_steps`` steps,
  the *main* pairs: weight decay (``wd``) vs :class:`ExpLR` (``exp``, L1); step decay + weight
  decay (``sd``) vs :class:`TEXP` (``texp``, L3); ``wd`` vs :class:`ExactExpLR` (``zb_exp``) and
  ``sd`` vs :class:`ExactExpLR` with the step-decay phases (``zb_texp``), both from PyTorch's
  lazily created zero momentum buffers (L7, bnlab's extension: ``η̃_t = η_t/(c_t c_{t+1})``,
  REFERENCES §6); and for each norm of ``other_norms`` (GroupNorm, LayerNorm) the same net built
  with that norm, fully scale-invariant likewise, WD vs ExpLR (``norm_gn``, ``norm_ln``, L6).
  Output differences every ``output_every`` steps. One more arm, ``w1``, trains the BN net with a
  constant LR and the larger weight decay ``w1_weight_decay`` (its norm equilibrates within the
  run); :class:`bnlab.lockstep.AngularUpdateTracker` records the angle ``∠(w_t, w_{t+1})`` of each
  trained tensor of ``w1`` and ``wd`` per step (W1, Wan et al. 2020: ``√(2ηλ/(1+γ))``). *Side*
  pairs for the first ``side_steps`` steps (output differences every ``side_output_every``): the
  ablation ``exp_nopreset`` (L2): ExpLR with the momentum-buffer preset removed right after
  constructing it (ExpLR has no switch for this, so the preset buffers are popped from
  ``optimizer.state``: PyTorch's default start, where the first step's buffer is the gradient);
  the ``wd``/``exp`` pair in float32 (round-off only); the same fully scale-invariant net in
  float64 with BN's default ``eps = 1e-5`` (``bn_eps``); and the **standard net** (BN with
  trainable γ/β, trainable classifier with bias, default ``eps``) with weight decay on every
  parameter vs ExpLR on every parameter (``standard``; ``renormalize=False`` there, since
  rescaling parameters that are not scale-invariant would change the function; the angle of its
  conv/linear weights alone is recorded too). Every ``equiv_eval_every`` steps the pairs are also
  compared in **eval mode** (BN running statistics): the running averages mix batch statistics of
  weights of different norms, which the map ``w̃ = α^{-t} w`` does not carry over, so eval-mode
  outputs differ even where the train-mode function is identical. The joint invariance error
  ``max |f(3w) - f(w)| / max |f(w)|`` (float64, train mode) of every net is measured once.
* **B. Accuracy (L4).** Float32, BN's default ``eps``, ``acc_steps`` steps of batch
  ``acc_batch_size`` on a ``acc_width`` net, for each seed in ``acc_seeds`` (initialization and
  batch order): ``wd``, ``exp``, ``sd``, ``texp`` on the fully scale-invariant net, and
  ``std_wd``/``std_exp`` on the standard net for the first ``acc_standard_seeds`` seeds. Train and
  test loss/accuracy (eval mode) every ``acc_eval_every`` steps. Step decay: the LR is multiplied
  by ``decay_factor`` at the fractions ``decay_at`` of the run.
* **C. Overflow (L5, bnlab's own feature).** Float32, ``overflow_steps`` steps on a tiny
  scale-invariant net whose gradient is computed by hand in numpy
  (:class:`bnlab.numpy_bn.TinyBNNet`; tens of thousands of autograd steps would not fit the quick
  budget):
  ``X (32x8 fixed Gaussian batch) -> Linear 8->8 (trained, no bias) -> BN (no affine, eps = 0) ->
  ReLU -> Linear 8->4 (fixed) -> softmax cross-entropy`` with fixed random labels; the update is
  PyTorch's SGD with :class:`ExpLR` (``weight_decay = overflow_weight_decay``), once with
  ``renormalize=True`` (``renorm_bound``) and once without, in lockstep. Recorded for the plain
  run: the first step whose forward pass is not finite (BN's variance ``~‖w‖²`` overflows first),
  the first step whose LR exceeds float32's largest value, and the step at which the weights turn
  non-finite or PyTorch's SGD refuses the update (it raises when the LR cannot be converted to
  float32); for the renormalized run whether it stays finite; and whether its weights times
  ``2^k`` equal the plain run's bit for bit while the plain run is finite.

**Claims and verdicts** (each rule's numbers are :class:`Thresholds` fields, fixed before the run;
``ref`` is the row of CLAIMS.md). L1 ``directions-agree``, L3 ``texp-matches-step-decay``, L6
``other-norms-agree``, L7 ``zero-buffer-schedule-exact``: the max angle of every pair over the
first ``required_equiv_steps`` (1000) steps ``<= equiv_tol`` (1e-6 rad); inconclusive with fewer
steps or a net whose invariance error exceeds ``invariance_tol``; fails if a run diverges. L2
``buffer-mapping-needed``: the ablation's max angle ``>= material_angle`` (1e-3 rad) while the
mapped pair agrees over the same steps. L4 ``accuracy-matches``: ``|mean final test acc(exp) -
mean(wd)|`` and ``|mean(texp) - mean(sd)|`` both ``<= acc_tol`` (1 point) over ``>= min_seeds``
(3) seeds; L4 ``standard-net-accuracy``: ``|mean(std_exp) - mean(std_wd)| <= std_acc_tol`` (2
points); both inconclusive when a baseline does not train (``trained_acc``). L5
``rescaling-prevents-overflow``: the renormalized run finite for ``>= required_overflow_steps``
(40000) while the plain run overflows. W1 ``angular-update-equilibrium``: the RMS angular update
of each tensor of ``w1`` over the last ``w1_window`` (half) of the run within ``w1_rel_tol`` (10%)
of ``√(2ηλ/(1+γ))``; inconclusive unless settled (the window's halves within ``w1_settle_tol``).
A profile that runs fewer steps or seeds than a claim requires gets ``inconclusive`` with the
numbers it did measure.

**Hyperparameters.** The paper's ``η = 0.1, γ = 0.9, λ = 5e-4`` in parts A and B at every
profile (``α^{-2} = 1.001`` per step: the LR grows 2.7x over 1000 steps); ``w1`` uses ``λ =
0.01`` (norm time scale ``(1-γ)/(2ηλ) = 50`` steps; at 5e-4 it is 1000 steps and the ``wd`` arm
has not settled by step 1000). Part C uses ``overflow_weight_decay = 0.01`` at quick (LR x1.023
per step, so the plain run overflows after ~3.9k steps instead of ~80k) and the paper's 5e-4
with 200k steps at paper. Try ``--set weight_decay=5e-3`` to see the weight-norm equilibrium
within the run; there the stale BN running statistics of the exponential run cost test accuracy
in eval mode (see the summary's ``max_eval_mode_output_diff``).

Settings: :class:`Config` (``--set key=value``; every field documented there); decision numbers:
:class:`Thresholds`. The code: :mod:`.config`, :mod:`.measure` (parts A-C), :mod:`.judge` (pure),
:mod:`.figures`.
"""

from __future__ import annotations

from ...runs import RunDir
from ..base import Claim, Context, Experiment, register_experiment
from .config import Config, Thresholds, decay_phases
from .figures import figures as _figures
from .judge import judge as _judge
from .measure import measure as _measure

__all__ = ["ExpLRExperiment", "Config", "Thresholds", "decay_phases"]

_SRC = "Li & Arora 2020"


@register_experiment
class ExpLRExperiment(Experiment):
    name = "exp-lr"
    title = "Exponential learning rate ≡ weight decay on scale-invariant nets"
    source = _SRC
    description = (
        "A fully scale-invariant BN net (no BN affine, frozen classifier) trained with weight decay and with "
        "the equivalent exponential LR (ExpLR, no weight decay), and with step decay + WD against TEXP, from "
        "the same init on the same batches, stepped side by side. Per step: the angle between the runs' "
        "weights (per tensor and jointly) and the largest output difference on a fixed batch; float64 with "
        "BN eps 0 for exactness, ablations without the momentum-buffer mapping, with BN's eps, in float32, "
        "and on the standard net (affine BN, trainable classifier); GroupNorm and LayerNorm nets; the exact "
        "zero-buffer schedule (ExactExpLR); the angular update per step against √(2ηλ/(1+γ)). Accuracy over "
        "3 seeds in float32. Float32 overflow of a 40k-step exponential schedule with and without power-of-two "
        "renormalization."
    )
    claims = (
        Claim("directions-agree",
              "On a fully scale-invariant BN net, SGD with weight decay and SGD with the exponential LR (no weight "
              "decay, mapped momentum buffer) visit the same directions w/‖w‖ at every step.", _SRC,
              "max over the first 1000 steps of the angle between the two runs' weights (all trained tensors "
              "jointly; float64, BN eps 1e-30, same init and batches)",
              "holds if ≤ equiv_tol (1e-6 rad) over ≥ required_equiv_steps (1000) steps; inconclusive if fewer steps "
              "or the net is not fully scale-invariant (invariance_tol); fails if a run diverges", ref="L1"),
        Claim("buffer-mapping-needed",
              "The momentum buffer must be mapped: ExpLR started from PyTorch's zero buffer does not follow the "
              "weight-decay run.", _SRC,
              "max angle between the weight-decay run and the ablation (ExpLR with the preset buffer removed) over "
              "the side steps, against the mapped pair over the same steps",
              "holds if ≥ material_angle (1e-3 rad) while the mapped pair stays ≤ equiv_tol; inconclusive if the "
              "mapped pair does not agree", ref="L2"),
        Claim("texp-matches-step-decay",
              "TEXP (the tapered exponential LR, no weight decay) visits the same directions as step decay with weight "
              "decay at every step.", _SRC,
              "max over the first 1000 steps of the angle between TEXP and step decay + WD (float64, BN eps 1e-30; "
              "LR x0.1 at 50% and 75% of the run)",
              "L1's rule: ≤ equiv_tol (1e-6 rad) over ≥ 1000 steps", ref="L3"),
        Claim("accuracy-matches",
              "ExpLR and TEXP reach the test accuracy of constant LR + weight decay and of step decay + weight "
              "decay.", _SRC,
              "|mean final test accuracy of ExpLR − that of WD| and |TEXP − step decay| over ≥ 3 seeds (fully "
              "scale-invariant BN net, float32, BN's default eps)",
              "holds if both ≤ acc_tol (1 point), fixed; inconclusive with fewer than min_seeds seeds or if a baseline "
              "does not train (trained_acc); fails if a run diverges", ref="L4"),
        Claim("standard-net-accuracy",
              "On the standard net (BN with trainable γ/β, trainable classifier, no exact equivalence) ExpLR on all "
              "parameters reaches the accuracy of weight decay on all parameters.", _SRC,
              "|mean final test accuracy of ExpLR − that of WD| on the standard net over ≥ 3 seeds (float32)",
              "holds if ≤ std_acc_tol (2 points, its own declared bound); inconclusive and fails as accuracy-matches",
              ref="L4"),
        Claim("rescaling-prevents-overflow",
              "bnlab's own feature (not a claim of the paper): with power-of-two renormalization an exponential LR "
              "schedule stays finite in float32; without it the weights or the LR overflow.", _SRC,
              "float32 steps with finite weights of ExpLR with renormalization; first non-finite step of ExpLR "
              "without it (tiny scale-invariant BN net)",
              "holds if the renormalized run is finite for ≥ required_overflow_steps (40000) steps and the plain run "
              "overflows; inconclusive if fewer steps are run or the plain run does not overflow", ref="L5"),
        Claim("other-norms-agree",
              "The equivalence also holds for other scale-invariant normalizations: on fully scale-invariant "
              "GroupNorm and LayerNorm nets WD and ExpLR visit the same directions.", _SRC,
              "max over the first 1000 steps of the angle between WD and ExpLR on each net (float64, norm eps 1e-30, "
              "no affine, frozen classifier)",
              "L1's rule on every net: ≤ equiv_tol (1e-6 rad) over ≥ 1000 steps; inconclusive if a net is not "
              "fully scale-invariant", ref="L6"),
        Claim("zero-buffer-schedule-exact",
              "bnlab's own extension: the exponential schedule η̃_t = η_t/(c_t c_{t+1}) (c_t from REFERENCES §6) "
              "matches SGD + WD from step 0 with PyTorch's zero (lazily created) momentum buffers, for a constant LR "
              "and for step decay (an exact TEXP), with no preset buffer.", _SRC,
              "max over the first 1000 steps of the angle between bnlab.schedules.ExactExpLR and WD (constant LR) "
              "and step decay + WD (float64, BN eps 1e-30)",
              "L1's rule on both pairs: ≤ equiv_tol (1e-6 rad) over ≥ 1000 steps", ref="L7"),
        Claim("angular-update-equilibrium",
              "Wan et al. 2020 (a follow-up): with weight decay the angular update per step of a scale-invariant "
              "tensor settles at √(2ηλ/(1+γ)).", "Wan et al. 2020",
              "RMS of ∠(w_t, w_t+1) per trained tensor over the last half of a constant-LR + WD run (λ = "
              "w1_weight_decay, float64, fully scale-invariant BN net) against the prediction",
              "holds if every tensor is within w1_rel_tol (10%) of the prediction; inconclusive if not settled (the "
              "window's two halves differ by > w1_settle_tol, 10%) or the run diverged", ref="W1"),
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(width=2, acc_width=4, equiv_steps=24, equiv_batch_size=16, output_batch=32, equiv_eval_every=12,
                       side_steps=12, side_output_every=4, acc_steps=20, acc_batch_size=64, acc_seeds=(0, 1),
                       acc_standard_seeds=1, acc_eval_every=10, overflow_steps=1200, overflow_weight_decay=0.025,
                       overflow_log_every=10),
        "quick": Config(),
        # PreResNet32 on CIFAR-10 (Li & Arora's setting); for a GPU. Step decay at 50%/75% of ~164 epochs.
        "paper": Config(data="cifar10", model="preresnet", width=16, depth=32, acc_width=16, equiv_steps=2000,
                        equiv_batch_size=128, output_batch=128, equiv_eval_every=500, side_steps=2000,
                        side_output_every=1, acc_steps=64000, acc_batch_size=128, acc_standard_seeds=3,
                        acc_eval_every=391, overflow_steps=200_000, overflow_weight_decay=5e-4,
                        overflow_log_every=200),
    }
    #: a smoke run (:func:`bnlab.paper.smoke_config`): one accuracy seed
    smoke_cuts = {"acc_seeds": lambda v: v[:1]}

    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        return _measure(cfg, run, ctx, self.name)

    def judge(self, summary: dict, th: Thresholds) -> list:
        return _judge(summary, th)

    def figures(self, run: RunDir):
        return _figures(run)
