"""``exp-lr``: an exponentially growing learning rate is weight decay in disguise (Li & Arora 2020).

Li & Arora, *An Exponential Learning Rate Schedule for Deep Learning* (ICLR 2020), Theorem 2.1:
if the loss is scale-invariant in all trained parameters jointly, SGD with constant
``(η, λ, γ)`` (learning rate, weight decay, momentum) and SGD with **no** weight decay, the same
``γ`` and ``η̃_t = η α^{-2t-1}`` visit the same directions ``w/‖w‖`` at every step
(``w̃_t = α^{-t} w_t``), provided the momentum buffer is mapped too
(:class:`bnlab.schedules.ExpLR`; ``α`` the larger root of ``x² - (1+γ-λη)x + γ``). TEXP
(:class:`bnlab.schedules.TEXP`) is the same for step decay. Power-of-two renormalization keeps
the exponential schedule inside float32's range.

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

* **A. Equivalence (claims 1, 2).** Float64 with BN's ``eps = exact_bn_eps`` (1e-30, zero in
  effect: PyTorch refuses 0; the theorem has no ``eps``), ``equiv_steps`` steps, three *main*
  pairs: weight decay (``wd``) vs :class:`ExpLR` (``exp``); the ablation ``exp_nopreset``: ExpLR
  with the momentum-buffer preset removed right after constructing it (ExpLR has no switch for
  this, so the preset buffers are popped from ``optimizer.state``: PyTorch's default start, where
  the first step's buffer is the gradient); step decay + weight decay (``sd``) vs :class:`TEXP`
  (``texp``). Output differences every ``output_every`` steps. Three *side* pairs for the first
  ``side_steps`` steps (output differences every ``side_output_every``): the ``wd``/``exp`` pair in
  float32 (round-off only), the same fully scale-invariant net in float64 with BN's default
  ``eps = 1e-5`` (``bn_eps``), and the **standard net** (BN with trainable γ/β, trainable
  classifier with bias, default ``eps``) with weight decay on every parameter vs ExpLR on every
  parameter (``standard``; ``renormalize=False`` there, since rescaling parameters that are not
  scale-invariant would change the function; the angle of its conv/linear weights alone is
  recorded too). Every ``equiv_eval_every`` steps the pairs are also compared in **eval mode**
  (BN running statistics): the running averages mix batch statistics of weights of different
  norms, which the map ``w̃ = α^{-t} w`` does not carry over, so eval-mode outputs differ even
  where the train-mode function is identical.
* **B. Accuracy (claim 3).** Float32, BN's default ``eps``, ``acc_steps`` steps of batch
  ``acc_batch_size`` on a ``acc_width`` net, for each seed in ``acc_seeds`` (initialization and
  batch order): ``wd``, ``exp``, ``sd``, ``texp`` on the fully scale-invariant net, and
  ``std_wd``/``std_exp`` on the standard net for the first ``acc_standard_seeds`` seeds. Train and
  test loss/accuracy (eval mode) every ``acc_eval_every`` steps. Step decay: the LR is multiplied
  by ``decay_factor`` at the fractions ``decay_at`` of the run.
* **C. Overflow (claim 4).** Float32, ``overflow_steps`` steps on a tiny scale-invariant net whose
  gradient is computed by hand in numpy (:class:`bnlab.numpy_bn.TinyBNNet`; 100k autograd steps
  would not fit the quick budget):
  ``X (32x8 fixed Gaussian batch) -> Linear 8->8 (trained, no bias) -> BN (no affine, eps = 0) ->
  ReLU -> Linear 8->4 (fixed) -> softmax cross-entropy`` with fixed random labels; the update is
  PyTorch's SGD with :class:`ExpLR` (``weight_decay = overflow_weight_decay``), once with
  ``renormalize=True`` (``renorm_bound``) and once without, in lockstep. Recorded for the plain
  run: the first step whose forward pass is not finite (BN's variance ``~‖w‖²`` overflows first),
  the first step whose LR exceeds float32's largest value, and the step at which the weights turn
  non-finite or PyTorch's SGD refuses the update (it raises when the LR cannot be converted to
  float32); for the renormalized run whether it stays finite; and whether its weights times
  ``2^k`` equal the plain run's bit for bit while the plain run is finite.

**Claims and verdicts** (the numbers are :class:`Thresholds` fields). (1) max angle of ``wd`` vs
``exp`` (float64, eps 0) over the first ``required_equiv_steps`` (1000) steps ``<= equiv_tol``
(1e-6 rad); (2) the ablation's max angle over the same steps ``> equiv_tol``; (3) ``|mean final
test acc(exp) - mean(wd)|`` and ``|mean(texp) - mean(sd)|`` over the seeds both ``<= max(acc_tol,
noise)``, ``noise`` the larger range over seeds of the two baselines' final test accuracies; (4)
the renormalized run finite for ``>= required_overflow_steps`` (100000) steps while the plain run
overflows. A profile that runs fewer steps than a claim requires gets ``inconclusive`` with the
numbers it did measure.

**Hyperparameters.** The paper's ``η = 0.1, γ = 0.9, λ = 5e-4`` in parts A and B at every
profile (``α^{-2} = 1.001`` per step: the LR grows 2.7x over 1000 steps). Part C uses
``overflow_weight_decay = 5e-3`` at quick (LR x1.011 per step, so the plain run overflows after
~8k steps instead of ~90k) and the paper's 5e-4 with 200k steps at paper. Try ``--set
weight_decay=5e-3`` to see the weight-norm equilibrium within the run; there the stale BN
running statistics of the exponential run cost test accuracy in eval mode (see the summary's
``max_eval_mode_output_diff``).

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
        "and on the standard net (affine BN, trainable classifier). Accuracy over seeds in float32. "
        "Float32 overflow of a 100k-step exponential schedule with and without power-of-two renormalization."
    )
    claims = (
        Claim("directions-agree",
              "On a fully scale-invariant BN net, SGD with weight decay and SGD with the exponential LR (no weight "
              "decay, mapped momentum buffer) visit the same directions w/‖w‖ at every step.", _SRC,
              "max over the first 1000 steps of the angle between the two runs' weights (all trained tensors "
              "jointly; float64, BN eps 1e-30, same init and batches)",
              "holds if <= equiv_tol (1e-6 rad) over >= 1000 steps; inconclusive if the profile runs fewer steps"),
        Claim("buffer-mapping-needed",
              "Without mapping the momentum buffer (ExpLR started from PyTorch's zero buffer) the two runs do not "
              "agree.", _SRC,
              "max angle between the weight-decay run and the ablation (ExpLR with the preset buffer removed) over "
              "the same steps",
              "holds if > equiv_tol (1e-6 rad)"),
        Claim("accuracy-matches",
              "ExpLR and TEXP reach the test accuracy of constant LR + weight decay and of step decay + weight "
              "decay.", _SRC,
              "|mean final test accuracy of ExpLR - that of WD| and |TEXP - step decay| over the seeds (float32, "
              "BN's default eps)",
              "holds if both <= max(acc_tol = 2 points, noise), noise = the largest range over seeds of the "
              "baselines' final test accuracy; fails if a run diverges"),
        Claim("rescaling-prevents-overflow",
              "With power-of-two renormalization an exponential LR schedule stays finite in float32; without it "
              "the weights or the LR overflow.", _SRC,
              "float32 steps with finite weights of ExpLR with renormalization; first non-finite step of ExpLR "
              "without it (tiny scale-invariant BN net)",
              "holds if the renormalized run is finite for >= 100000 steps and the plain run overflows; "
              "inconclusive if fewer steps are run or the plain run does not overflow"),
    )
    Config = Config
    Thresholds = Thresholds
    profiles = {
        "tiny": Config(width=2, acc_width=4, equiv_steps=24, equiv_batch_size=16, output_batch=32, equiv_eval_every=12,
                       side_steps=24, side_output_every=4, acc_steps=20, acc_batch_size=64, acc_seeds=(0, 1),
                       acc_eval_every=10, overflow_steps=2000, overflow_weight_decay=0.02, overflow_log_every=10),
        "quick": Config(),
        # PreResNet32 on CIFAR-10 (Li & Arora's setting); for a GPU. Step decay at 50%/75% of ~164 epochs.
        "paper": Config(data="cifar10", model="preresnet", width=16, depth=32, acc_width=16, equiv_steps=2000,
                        equiv_batch_size=128, output_batch=128, equiv_eval_every=500, side_steps=2000,
                        side_output_every=1, acc_steps=64000, acc_batch_size=128, acc_standard_seeds=3,
                        acc_eval_every=391, overflow_steps=200_000, overflow_weight_decay=5e-4,
                        overflow_log_every=200),
    }

    def measure(self, cfg: Config, run: RunDir, ctx: Context) -> dict:
        return _measure(cfg, run, ctx, self.name)

    def judge(self, summary: dict, th: Thresholds) -> list:
        return _judge(summary, th)

    def figures(self, run: RunDir):
        return _figures(run)
