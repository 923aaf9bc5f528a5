"""Many models at once: a learning-rate x seed grid trained in one vectorized loop, plus executors.

:func:`sweep` trains ``M = len(lrs) * len(seeds)`` copies of one architecture, member ``i`` with
its own learning rate ``η_i`` and initialization seed, on the **same minibatch sequence** (the
batch order of ``bnlab.train.train(..., seed=data_seed)``), with SGD (PyTorch convention, per
member)::

    d_t = ∇L_B(w_t) + λ w_t                    (weight decay λ)
    v_t = γ v_{t-1} + d_t,   v_{-1} = 0         (momentum γ; so v_0 = d_0, as torch.optim.SGD)
    w_{t+1} = w_t - η_i v_t

so that member ``i`` reproduces the separate run
``train(model_fn(seed=s_i), data, SGD(lr=η_i, momentum=γ, weight_decay=λ), seed=data_seed)``.

Fallback (``vectorize=False``, or ``"auto"`` when the vectorized run raises, e.g. a forward with
data-dependent control flow, ``.item()``, dropout (random operations under ``vmap``), models whose
parameter shapes differ between seeds): each member is trained by ``bnlab.train.train`` with
``torch.optim.SGD``, the reference semantics. :attr:`SweepResult.vectorized` and
``fallback_reason`` say which path ran.

When vectorizing pays (benchmarks/sweep.py: digits convnet with BN, 16 learning rates, batch
128, momentum 0.9, against 16 sequential ``train`` runs, this 2-core CPU, idle): ``vmap`` removes
``M - 1`` copies of the per-operator overhead but does not make the arithmetic cheaper, so the
gain is largest for small networks and shrinks as they grow: with one torch thread 3.1x the
member-steps per second at width 4, 2.4x at width 8 and 1.9x at width 16; with two threads
4.3x, 3.0x and 2.3x. For large networks on a CPU, run cells in parallel with
:class:`ProcessExecutor`.

Results: :class:`SweepResult` holds every member's loss curve, evaluations and divergence status;
:meth:`SweepResult.cell_config`, :meth:`SweepResult.metric_records` and
:meth:`SweepResult.summary` give one member's config, metrics records (as ``train`` logs them)
and summary, for a caller that records each cell as a run. The sweep itself writes no files.

Modules:

* :mod:`bnlab.sweep.trainer`: :func:`sweep`, :class:`SweepResult`, :func:`sgd_step`; how the
  vectorized path works (stacking, BatchNorm, divergence);
* :mod:`bnlab.sweep.layers`: the ``vmap`` rules that fold the members into the channels of
  convolutions, BatchNorm and pooling (:func:`bnlab.sweep.layers.use_stacked_layers`);
* :mod:`bnlab.sweep.executors`: :class:`Executor`, :class:`LocalExecutor`, :class:`RayExecutor`,
  :class:`ProcessExecutor`.

The relative loss of one step (Bjorck et al.) is :func:`bnlab.landscape.relative_loss`.

Reference:
    Bjorck, Gomes, Selman, Weinberger, "Understanding Batch Normalization", NeurIPS 2018
    (learning-rate sweeps).
"""

from .executors import Executor, LocalExecutor, ProcessExecutor, RayExecutor
from .trainer import SweepResult, sgd_step, sweep

__all__ = [
    "Executor",
    "LocalExecutor",
    "ProcessExecutor",
    "RayExecutor",
    "SweepResult",
    "sgd_step",
    "sweep",
]
