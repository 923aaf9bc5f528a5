"""The vectorized trainer: :func:`sweep` trains a learning-rate x seed grid of one architecture.

Member ``i`` is the run ``train(model_fn(seed=s_i), data, SGD(lr=η_i, momentum=γ,
weight_decay=λ), seed=data_seed)`` (see :mod:`bnlab.sweep`). How the vectorized path works
(``vectorize=True``/``"auto"``):

* **Stacking.** The ``M`` models' trainable parameters are concatenated into one flat leaf
  tensor ``W`` of shape ``[M, D]`` (``D`` = parameters per model); each parameter is a view of a
  column block (``torch.split`` + ``view``), so the SGD update is four whole-tensor operations on
  ``W``, ``V`` (momentum, ``[M, D]``) and a per-member learning-rate column ``η`` (``[M, 1]``),
  and a member's finiteness check is one ``isfinite(W).all(1)``. Frozen parameters and buffers
  are stacked per name (``[M, *shape]``).
* **Forward.** ``torch.func.vmap`` over the stacked state of
  ``functional_call(template, state, (x,))``: the batch ``x`` is shared (``in_dims=None``), so a
  convolution with stacked weights becomes one grouped convolution and a linear layer one batched
  matmul. The result is the vector of member losses ``ℓ = [L_1, ..., L_M]``.
* **Backward.** One reverse pass of ``Σ_i L_i`` with respect to ``W``. Members share no
  parameters, so ``∂(Σ_j L_j)/∂w_i = ∇L_i(w_i)``: row ``i`` of the gradient is member ``i``'s own
  gradient. (``vmap(grad(L))`` computes the same numbers; the single reverse pass over the
  vmapped forward was 20-45 % faster per step on the digits convnet, widths 4 and 16, one
  thread, and keeps BN simple, see below.)
* **BatchNorm in train mode.** The BN running statistics are passed through ``vmap`` *as stacked
  buffers* (``in_dims=0``), so inside the vmapped call each member's ``running_mean``,
  ``running_var`` and ``num_batches_tracked`` are batched tensors and BN's own in-place update
  ``r <- (1 - m) r + m·stat`` writes member ``i``'s batch statistics into row ``i``: exactly the
  arithmetic of a separate run (bit-identical for the same batch statistics in our checks). The
  documented failure of in-place running-stat updates under ``vmap`` is the case of an
  *unbatched* buffer receiving a batched statistic (``functional_call`` with the module's own
  buffers, or a buffer captured from outside the transform); this module never creates that
  case, and it differentiates with one outer reverse pass rather than ``vmap(grad(...))``, so
  no buffer is mutated inside a ``grad`` transform either. Normalization
  uses the batch statistics, as in training; evaluation (``model.eval()`` semantics) uses the
  stacked running statistics. BN with ``momentum=None`` (cumulative average) reads
  ``num_batches_tracked`` as a Python number, which ``vmap`` cannot do: ``"auto"`` then falls
  back to the loop.
* **Layer rules.** The private template's plain layers (convolutions, BatchNorm in train mode,
  pooling) run through custom ``vmap`` rules that fold the members into the channel dimension
  and call one kernel, on channels-last maps: :mod:`bnlab.sweep.layers`.
* **Divergence.** Member ``i`` diverges at step ``t`` when its loss at ``t`` is not finite (no
  update is applied, as in ``train``) or when its weights after the update at ``t`` are not
  finite. Its state at that moment is kept aside for the final evaluation and its row is
  **removed** from the stack (all stacked tensors are index-selected to the surviving rows), so a
  diverged member costs nothing afterwards, produces no NaN/inf arithmetic (no warnings, no slow
  denormal/NaN paths) and cannot touch the others: their rows are computed by the same
  independent per-member arithmetic as without it.

The fallback (``vectorize=False``, or ``"auto"`` when the vectorized run raises) trains each
member with ``bnlab.train.train`` and ``torch.optim.SGD``, the reference semantics (see
:mod:`bnlab.sweep`).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..data import ArrayData
from ..errors import UserError, check_positive
from ..train import History, make_optimizer, resolve_device, resolve_steps, train
from .executors import Executor, LocalExecutor
from .layers import use_stacked_layers

__all__ = ["SweepResult", "sgd_step", "sweep"]

log = logging.getLogger(__name__)

Vectorize = Union[bool, Literal["auto"]]
ModelFn = Callable[..., nn.Module]


# ------------------------------------------------------------------------------------ functional SGD
def sgd_step(
    w: Tensor, grad: Tensor, buf: Optional[Tensor], *, lr: Union[float, Tensor], momentum: float = 0.0, weight_decay: float = 0.0
) -> Optional[Tensor]:
    """One SGD step in place on (stacked) weights, PyTorch's convention.

    ``d = g + λ w``;  ``v <- γ v + d`` (``v`` starts at zero, so ``v_0 = d_0`` as in
    ``torch.optim.SGD``);  ``w <- w - η v``.

    Args:
        w: weights, updated in place (e.g. ``[M, D]`` for ``M`` stacked members).
        grad: ``∇L(w)``, same shape.
        buf: the momentum buffer ``v`` (same shape, updated in place); ``None`` at the first step
            (a new buffer ``v_0 = d_0`` is returned) or when ``γ = 0``.
        lr: ``η``: a number, or a tensor broadcastable to ``w`` (``[M, 1]``: one LR per member).
        momentum: ``γ``.
        weight_decay: ``λ`` (L2 penalty ``λ/2 ‖w‖²`` folded into the gradient).

    Returns:
        The buffer to pass to the next step (``None`` without momentum).

    Example:
        >>> W, V = torch.randn(4, 10), None
        >>> lrs = torch.tensor([[0.1], [0.2], [0.3], [0.4]])  # one learning rate per row
        >>> for _ in range(3):
        ...     V = sgd_step(W, torch.ones(4, 10), V, lr=lrs, momentum=0.9)
    """
    with torch.no_grad():
        d = grad.add(w, alpha=weight_decay) if weight_decay else grad
        if momentum:
            if buf is None:
                buf = d.clone()
            else:
                buf.mul_(momentum).add_(d)
            d = buf
        if isinstance(lr, Tensor):
            w.addcmul_(d, lr, value=-1.0)
        else:
            w.add_(d, alpha=-lr)
    return buf


# ------------------------------------------------------------------------------------ result
@dataclass
class SweepResult:
    """What a sweep produced, one entry per member ``i`` (``M`` members, grid order: for each
    learning rate, for each seed: ``i = lr_index * len(seed_grid) + seed_index``).

    Attributes:
        lrs: ``[M]`` learning rate of each member.
        seeds: ``[M]`` initialization seed of each member.
        lr_grid, seed_grid: the grid axes as given.
        losses: ``[M, steps]`` float64 training loss per step; ``nan`` after a member stopped
            (the step at which its loss became non-finite holds that value).
        diverged: ``[M]`` bool.
        diverged_at: step at which each member diverged (``None`` if it did not).
        reasons: why each member stopped early (``""`` if it did not).
        steps_taken: optimizer steps each member took.
        evals: every evaluation record per member (``step``, ``train_loss``, ``train_acc``,
            ``test_loss``, ``test_acc``); the last one is the final evaluation.
        steps: steps asked for.
        seconds: wall time of the whole sweep (training and evaluation).
        vectorized: every member ran in a vectorized loop.
        fallback_reason: why the loop ran instead (``""`` if it did not).
        config: the settings shared by all members.
        states: with ``keep_states``, each member's final named parameters and buffers (CPU
            tensors; a diverged member's as they were when it stopped), e.g. for
            ``model.load_state_dict(res.states[i])``.
    """

    lrs: list[float]
    seeds: list[int]
    lr_grid: list[float]
    seed_grid: list[int]
    losses: Tensor
    diverged: Tensor
    diverged_at: list[Optional[int]]
    reasons: list[str]
    steps_taken: list[int]
    evals: list[list[dict]]
    steps: int
    seconds: float
    vectorized: bool
    fallback_reason: str = ""
    config: dict = field(default_factory=dict)
    states: Optional[list[dict[str, Tensor]]] = None

    def __len__(self) -> int:
        return len(self.lrs)

    @property
    def final(self) -> list[dict]:
        """The final evaluation of each member (without ``step``/``event``)."""
        return [{k: v for k, v in (e[-1] if e else {}).items() if k not in ("step", "event")} for e in self.evals]

    def metric(self, key: str) -> Tensor:
        """``[M]`` float64 final value of ``key`` (``test_acc``, ``train_loss``, ...); ``nan`` if absent."""
        return torch.tensor([float(f.get(key, math.nan)) for f in self.final], dtype=torch.float64)

    def grid(self, values: Union[Tensor, Sequence]) -> Tensor:
        """Reshape per-member ``values`` (``[M, ...]``) to ``[len(lr_grid), len(seed_grid), ...]``."""
        t = torch.as_tensor(values)
        return t.reshape(len(self.lr_grid), len(self.seed_grid), *t.shape[1:])

    @property
    def member_steps_per_second(self) -> float:
        """Throughput: ``Σ_i steps_taken_i / seconds``."""
        return sum(self.steps_taken) / self.seconds if self.seconds > 0 else math.nan

    def summary(self, i: int) -> dict:
        """Member ``i``'s final metrics and status, JSON-ready (the keys of ``History.summary``)."""
        return {
            **self.final[i],
            "lr": self.lrs[i],
            "seed": self.seeds[i],
            "steps": self.steps_taken[i],
            "diverged": bool(self.diverged[i]),
            "diverged_at": self.diverged_at[i],
            "reason": self.reasons[i],
            "seconds": round(self.seconds, 3),
        }

    def history(self, i: int) -> History:
        """Member ``i`` as a :class:`bnlab.train.History` (per-step ``loss``/``lr`` records, evals)."""
        h = History(steps=self.steps_taken[i], diverged=bool(self.diverged[i]), diverged_at=self.diverged_at[i], reason=self.reasons[i], seconds=self.seconds)
        n = self.steps_taken[i] + (1 if self.diverged_at[i] is not None and self.diverged_at[i] == self.steps_taken[i] else 0)
        for t in range(n):
            loss = float(self.losses[i, t])
            h.records.append({"step": t, "loss": loss, "diverged": True} if t == self.steps_taken[i] else {"step": t, "loss": loss, "lr": self.lrs[i]})
        h.evals = [{"step": e["step"], "event": "eval", **{k: v for k, v in e.items() if k != "step"}} for e in self.evals[i]]
        return h

    def cell_config(self, i: int) -> dict:
        """Member ``i``'s config, JSON-ready: the shared settings (:attr:`config`) with ``cell``
        (``i``), ``lr`` and ``seed``."""
        return {**self.config, "cell": i, "lr": self.lrs[i], "seed": self.seeds[i]}

    def metric_records(self, i: int) -> list[dict]:
        """Member ``i``'s metrics records in time order, as ``bnlab.train.train`` logs them: the
        per-step ``loss``/``lr`` records of :meth:`history` with each periodic evaluation after
        the step that precedes it, and the final evaluation last."""
        h = self.history(i)
        periodic = h.evals[:-1]
        out, k = [], 0
        for rec in h.records:
            out.append(rec)
            while k < len(periodic) and periodic[k]["step"] <= rec["step"] + 1:
                out.append(periodic[k])
                k += 1
        return out + periodic[k:] + h.evals[-1:]


# ------------------------------------------------------------------------------------ work items
@dataclass
class _Settings:
    steps: int
    batch_size: int
    full_batch: bool
    drop_last: bool
    momentum: float
    weight_decay: float
    data_seed: int
    eval_every: Optional[int]
    eval_train: bool
    loss_fn: Callable
    device: str
    vectorize: Vectorize
    progress: bool
    keep_states: bool = False


@dataclass
class _Group:
    model_fn: ModelFn
    data: ArrayData
    eval_data: Optional[ArrayData]
    members: list[tuple[int, float, int]]  # (index, lr, seed)
    settings: _Settings


@dataclass
class _MemberOut:
    index: int
    losses: Tensor  # [steps] float64
    steps_taken: int
    diverged: bool
    diverged_at: Optional[int]
    reason: str
    evals: list[dict]
    state: Optional[dict[str, Tensor]] = None


@dataclass
class _GroupOut:
    members: list[_MemberOut]
    vectorized: bool
    fallback_reason: str = ""


class _NotStackable(Exception):
    """The members' models cannot be stacked (different structure, shapes or dtypes)."""


def _run_group(group: _Group) -> _GroupOut:
    """Train one group of members: vectorized when asked and possible, else one by one."""
    s = group.settings
    if s.vectorize is not False:
        try:
            return _GroupOut(_run_vectorized(group), True)
        except (RuntimeError, NotImplementedError, _NotStackable) as e:
            if s.vectorize is True:
                if isinstance(e, _NotStackable):
                    raise UserError(f"sweep: vectorize=True but {e}; use vectorize='auto' or False") from None
                raise
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            log.info("sweep: vectorized run failed (%s); training the members one by one", reason)
            return _GroupOut(_run_sequential(group), False, reason)
    return _GroupOut(_run_sequential(group), False)


# ------------------------------------------------------------------------------------ sequential path
def _run_sequential(group: _Group) -> list[_MemberOut]:
    """Reference semantics: ``bnlab.train.train`` with ``torch.optim.SGD`` per member."""
    s = group.settings
    outs = []
    for index, lr, seed in group.members:
        model = group.model_fn(seed=seed)
        opt = make_optimizer(model.parameters(), name="sgd", lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)
        h = train(
            model, group.data, opt, steps=s.steps, batch_size=s.batch_size, full_batch=s.full_batch, drop_last=s.drop_last,
            eval_data=group.eval_data, eval_every=s.eval_every or max(s.steps, 1), eval_train=s.eval_train, loss_fn=s.loss_fn,
            device=s.device, seed=s.data_seed, progress=f"sweep lr={lr:g} seed={seed}" if s.progress else False,
        )
        losses = torch.full((s.steps,), math.nan, dtype=torch.float64)
        for r in h.records:
            if "loss" in r and r["step"] < s.steps:
                losses[r["step"]] = r["loss"]
        evals = [{k: v for k, v in e.items() if k != "event"} for e in h.evals]
        state = _model_state(model) if s.keep_states else None
        outs.append(_MemberOut(index, losses, h.steps, h.diverged, h.diverged_at, h.reason, evals, state))
    return outs


def _model_state(model: nn.Module) -> dict[str, Tensor]:
    """Named parameters and buffers, detached CPU copies (the keys of ``model.state_dict()``)."""
    out = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    out.update({n: b.detach().cpu().clone() for n, b in model.named_buffers()})
    return out


# ------------------------------------------------------------------------------------ vectorized path
@dataclass
class _Stack:
    """The surviving members' state, stacked along dim 0 (row r = member ``alive[r]``)."""

    alive: list[int]  # positions in group.members
    W: Tensor  # [m, D] flat trainable parameters (leaf, requires_grad)
    V: Optional[Tensor]  # [m, D] momentum buffer
    lr: Tensor  # [m, 1]
    fixed: dict[str, Tensor]  # frozen params and buffers, [m, *shape]

    def select(self, rows: Tensor) -> "_Stack":
        return _Stack(
            [self.alive[r] for r in rows.tolist()],
            self.W.detach()[rows].requires_grad_(True),
            None if self.V is None else self.V[rows],
            self.lr[rows],
            {k: v[rows] for k, v in self.fixed.items()},
        )

    def row_state(self, r: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.W.detach()[r].clone(), {k: v[r].clone() for k, v in self.fixed.items()}


def _stack_models(models_: list[nn.Module]) -> tuple[list[tuple[str, torch.Size]], Tensor, dict[str, Tensor]]:
    """``(trainable names and shapes, W [M, D], fixed {name: [M, *shape]})`` of same-shaped models."""
    ref = models_[0]
    trainable = [(n, p.shape, p.dtype) for n, p in ref.named_parameters() if p.requires_grad]
    frozen = [n for n, p in ref.named_parameters() if not p.requires_grad]
    buffers = [n for n, b in ref.named_buffers()]
    dtypes = {d for _, _, d in trainable}
    if len(dtypes) > 1:
        raise _NotStackable(f"trainable parameters have several dtypes {sorted(map(str, dtypes))}")
    sig = [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in ref.named_parameters()] + [(n, tuple(b.shape), b.dtype) for n, b in ref.named_buffers()]
    for m in models_[1:]:
        other = [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in m.named_parameters()] + [(n, tuple(b.shape), b.dtype) for n, b in m.named_buffers()]
        if other != sig:
            raise _NotStackable("the models built for different seeds differ in structure, shapes or dtypes")
    if trainable:
        W = torch.stack([torch.cat([dict(m.named_parameters())[n].detach().reshape(-1) for n, _, _ in trainable]) for m in models_])
    else:
        W = torch.zeros(len(models_), 0)
    fixed = {}
    for n in frozen:
        fixed[n] = torch.stack([dict(m.named_parameters())[n].detach() for m in models_])
    for n in buffers:
        fixed[n] = torch.stack([dict(m.named_buffers())[n].detach() for m in models_]).clone()
    return [(n, s) for n, s, _ in trainable], W, fixed


class _Vectorized:
    """The stacked forward/backward/eval of one group (template module + shapes)."""

    def __init__(self, template: nn.Module, shapes: list[tuple[str, torch.Size]], loss_fn: Callable):
        self.template = template
        self.names = [n for n, _ in shapes]
        self.shapes = [s for _, s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.loss_fn = loss_fn

        def member_loss(state: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return loss_fn(functional_call(template, state, (x,)), y)

        def member_logits(state: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(template, state, (x,))

        self._losses = vmap(member_loss, in_dims=(0, None, None))
        self._logits = vmap(member_logits, in_dims=(0, None))

    def state(self, stack: _Stack, W: Tensor) -> dict[str, Tensor]:
        m = W.shape[0]
        views = torch.split(W, self.sizes, dim=1) if self.sizes else ()
        st = {n: v.view(m, *s) for n, v, s in zip(self.names, views, self.shapes)}
        st.update(stack.fixed)
        return st

    def unstack(self, w_row: Tensor, fixed_row: dict[str, Tensor]) -> dict[str, Tensor]:
        """One member's named parameters and buffers (CPU copies) from its row."""
        views = torch.split(w_row, self.sizes) if self.sizes else ()
        out = {n: v.view(s).cpu().clone() for n, v, s in zip(self.names, views, self.shapes)}
        out.update({k: v.cpu().clone() for k, v in fixed_row.items()})
        order = [n for n, _ in self.template.named_parameters()] + [n for n, _ in self.template.named_buffers()]
        return {k: out[k] for k in order}

    def losses(self, stack: _Stack, x: Tensor, y: Tensor) -> Tensor:
        """``[m]`` member losses on ``(x, y)`` in train mode (BN running stats updated in place)."""
        return self._losses(self.state(stack, stack.W), x, y)

    @torch.no_grad()
    def evaluate(self, W: Tensor, fixed: dict[str, Tensor], data: ArrayData) -> tuple[Tensor, Tensor]:
        """``([m] mean loss, [m] accuracy)`` in eval mode, as ``bnlab.train.evaluate``."""
        m = W.shape[0]
        stack = _Stack([], W, None, W.new_zeros(m, 1), fixed)  # only W and fixed are read
        st = self.state(stack, W)
        was = [(mod, mod.training) for mod in self.template.modules()]
        self.template.eval()
        loss_sum = torch.zeros(m, dtype=torch.float64, device=W.device)
        correct = torch.zeros(m, dtype=torch.int64, device=W.device)
        try:
            for x, y in data.batches(max(1, 1024 // max(m, 1)), shuffle=False):
                logits = self._logits(st, x)  # [m, n, K]
                if self.loss_fn is F.cross_entropy:
                    ls = F.cross_entropy(logits.flatten(0, 1), y.repeat(m), reduction="none").view(m, -1).sum(1)
                else:
                    ls = vmap(lambda lg: self.loss_fn(lg, y))(logits) * len(y)
                loss_sum += ls.double()
                correct += (logits.argmax(-1) == y).sum(1)
        finally:
            for mod, t in was:
                mod.training = t
        n = max(len(data), 1)
        return loss_sum / n, correct.double() / n


def _run_vectorized(group: _Group) -> list[_MemberOut]:
    s = group.settings
    dev = resolve_device(s.device)
    seeds = []
    for _, _, seed in group.members:
        if seed not in seeds:
            seeds.append(seed)
    built = {seed: group.model_fn(seed=seed) for seed in seeds}
    models_ = [built[seed] for _, _, seed in group.members]
    shapes, W, fixed = _stack_models(models_)
    template = copy.deepcopy(models_[0]).to(dev).train()
    use_stacked_layers(template)
    vec = _Vectorized(template, shapes, s.loss_fn)
    data = group.data.to(dev)
    eval_data = group.eval_data.to(dev) if group.eval_data is not None else None
    M = len(group.members)
    lrs = torch.tensor([lr for _, lr, _ in group.members], dtype=W.dtype)
    stack = _Stack(
        list(range(M)), W.to(dev).requires_grad_(True), torch.zeros_like(W, device=dev) if s.momentum else None,
        lrs.to(dev).view(M, 1), {k: v.to(dev) for k, v in fixed.items()},
    )
    curves = torch.full((M, s.steps), math.nan, dtype=torch.float64, device=dev)
    steps_taken = [0] * M
    diverged_at: list[Optional[int]] = [None] * M
    reasons = [""] * M
    evals: list[list[dict]] = [[] for _ in range(M)]
    frozen_state: dict[int, tuple[Tensor, dict[str, Tensor]]] = {}  # member -> state when it diverged

    def eval_rows(W_: Tensor, fixed_: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        if s.eval_train:
            out["train_loss"], out["train_acc"] = vec.evaluate(W_, fixed_, data)
        if eval_data is not None:
            out["test_loss"], out["test_acc"] = vec.evaluate(W_, fixed_, eval_data)
        return {k: v.cpu() for k, v in out.items()}

    gen = torch.Generator().manual_seed(s.data_seed)
    bar = None
    if s.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=s.steps, desc=f"sweep x{M}", unit="step", leave=False, dynamic_ncols=True)
    stream = data.stream(s.batch_size, generator=gen, drop_last=s.drop_last, full_batch=s.full_batch)
    rows = torch.arange(M, device=dev)  # the members of the stack's rows, as a tensor
    try:
        for t in range(s.steps):
            if not stack.alive:
                break
            x, y = next(stream)
            losses = vec.losses(stack, x, y)  # [m]; BN running stats of every row updated
            curves[rows, t] = losses.detach().double()
            finite = torch.isfinite(losses.detach())
            bad_loss = [] if bool(finite.all()) else (~finite).nonzero().flatten().tolist()
            for r in bad_loss:  # no update for these rows, as train() stops before backward
                i = stack.alive[r]
                diverged_at[i], steps_taken[i] = t, t
                reasons[i] = f"non-finite loss ({float(losses.detach()[r])}) at step {t}"
                frozen_state[i] = stack.row_state(r)
            total = losses.sum() if not bad_loss else torch.where(finite, losses, torch.zeros_like(losses)).sum()
            (g,) = torch.autograd.grad(total, stack.W, allow_unused=True, materialize_grads=True)  # [m, D]
            sgd_step(stack.W, g, stack.V, lr=stack.lr, momentum=s.momentum, weight_decay=s.weight_decay)
            ok = torch.isfinite(stack.W.detach()).all(1)
            if bad_loss:
                ok[bad_loss] = False
            if not bool(ok.all()):
                for r in (~ok).nonzero().flatten().tolist():
                    i = stack.alive[r]
                    if diverged_at[i] is None:
                        diverged_at[i], steps_taken[i] = t, t + 1
                        reasons[i] = f"non-finite weights after step {t}"
                        frozen_state[i] = stack.row_state(r)
                stack = stack.select(ok.nonzero().flatten())
                rows = torch.tensor(stack.alive, dtype=torch.long, device=dev)
            for i in stack.alive:
                steps_taken[i] = t + 1
            if bar is not None:
                bar.update(1)
            if s.eval_every and (t + 1) % s.eval_every == 0 and t + 1 < s.steps and stack.alive:
                m = eval_rows(stack.W.detach(), stack.fixed)
                for r, i in enumerate(stack.alive):
                    evals[i].append({"step": t + 1, **{k: float(v[r]) for k, v in m.items()}})
    finally:
        if bar is not None:
            bar.close()

    # Final evaluation: the survivors as they are, diverged members from their kept state.
    rows_W, rows_fixed, who = [], [], []
    for r, i in enumerate(stack.alive):
        who.append(i)
    if stack.alive:
        rows_W.append(stack.W.detach())
        rows_fixed.append(stack.fixed)
    for i in sorted(frozen_state):
        w_i, f_i = frozen_state[i]
        if bool(torch.isfinite(w_i).all()) and eval_data is not None:  # train() evaluates a diverged net's test metrics when its weights are finite
            who.append(i)
            rows_W.append(w_i[None])
            rows_fixed.append({k: v[None] for k, v in f_i.items()})
    metrics: dict[int, dict] = {}
    if who:
        W_all = torch.cat(rows_W)
        fixed_all = {k: torch.cat([f[k] for f in rows_fixed]) for k in rows_fixed[0]}
        m = eval_rows(W_all, fixed_all)
        for r, i in enumerate(who):
            metrics[i] = {k: float(v[r]) for k, v in m.items()}
    nan = math.nan
    outs = []
    for i, (index, _, _) in enumerate(group.members):
        if diverged_at[i] is None:
            final = {"step": steps_taken[i], **metrics[i]}
        else:
            final = {"step": steps_taken[i]}
            if s.eval_train:
                final.update(train_loss=nan, train_acc=nan)
            if eval_data is not None:
                got = metrics.get(i, {})
                final.update(test_loss=got.get("test_loss", nan), test_acc=got.get("test_acc", nan))
        evals[i].append(final)
        state = None
        if s.keep_states:
            if i in frozen_state:
                w_i, f_i = frozen_state[i]
            else:
                r = stack.alive.index(i)
                w_i, f_i = stack.row_state(r)
            state = vec.unstack(w_i, f_i)
        outs.append(_MemberOut(index, curves[i].cpu(), steps_taken[i], diverged_at[i] is not None, diverged_at[i], reasons[i], evals[i], state))
    return outs


# ------------------------------------------------------------------------------------ the sweep
def _describe(obj: Any) -> str:
    """A readable, stable name of a callable for the sweep's config (``module.qualname(args)``)."""
    if isinstance(obj, functools.partial):
        args = [repr(a) for a in obj.args] + [f"{k}={v!r}" for k, v in sorted(obj.keywords.items())]
        return f"{_describe(obj.func)}({', '.join(args)})"
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{mod}.{qual}" if mod and qual else repr(obj)


def _check_grid(name: str, values: Any, *, positive: bool) -> list:
    try:
        vals = [v.item() if isinstance(v, Tensor) else v for v in (values.tolist() if isinstance(values, Tensor) else list(values))]
    except TypeError:
        raise UserError(f"sweep: {name} must be a sequence, got {values!r}") from None
    if not vals:
        raise UserError(f"sweep: {name} must hold at least one value")
    for v in vals:
        if positive:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise UserError(f"sweep: every learning rate must be a finite number > 0, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"sweep: every seed must be an integer, got {v!r}")
    return [float(v) for v in vals] if positive else [int(v) for v in vals]


def _split(items: list, n: int) -> list[list]:
    """``items`` in ``n`` contiguous chunks of near-equal size (no empty chunk)."""
    n = max(1, min(n, len(items)))
    k, r = divmod(len(items), n)
    out, start = [], 0
    for j in range(n):
        stop = start + k + (1 if j < r else 0)
        out.append(items[start:stop])
        start = stop
    return out


def sweep(
    model_fn: ModelFn,
    data: ArrayData,
    *,
    lrs: Sequence[float],
    seeds: Sequence[int] = (0,),
    steps: Optional[int] = None,
    epochs: Optional[float] = None,
    batch_size: int = 128,
    full_batch: bool = False,
    drop_last: bool = False,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    data_seed: int = 0,
    eval_data: Optional[ArrayData] = None,
    eval_every: Optional[int] = None,
    eval_train: bool = True,
    loss_fn: Callable = F.cross_entropy,
    device: Union[str, torch.device] = "auto",
    vectorize: Vectorize = "auto",
    executor: Optional[Executor] = None,
    name: str = "sweep",
    config: Optional[dict] = None,
    progress: bool = False,
    keep_states: bool = False,
) -> SweepResult:
    """Train a grid of learning rates x initialization seeds at once; one result per member.

    Member ``i = (η_i, s_i)`` is the run ``train(model_fn(seed=s_i), data, SGD(lr=η_i,
    momentum=γ, weight_decay=λ), seed=data_seed)``: every member sees the same minibatches, and
    the update is PyTorch's SGD::

        v_t = γ v_{t-1} + ∇L_B(w_t) + λ w_t   (v_{-1} = 0),      w_{t+1} = w_t - η_i v_t

    Vectorized (the default when possible) the members' parameters and buffers are stacked and
    one ``torch.func.vmap``-ed forward and one backward pass serve them all; BatchNorm trains
    with batch statistics and updates each member's running statistics. A member whose loss or
    weights become non-finite is recorded as diverged at that step and removed from the stack;
    the others continue unchanged. See the module docstring for the details.

    Args:
        model_fn: builds one member: ``model_fn(seed=s) -> nn.Module`` (called with the keyword),
            e.g. ``functools.partial(bnlab.models.make, "convnet", in_shape=(1, 8, 8),
            num_classes=10)``. All members must have the same parameter shapes.
        data: training set.
        lrs: the learning-rate grid (each > 0).
        seeds: initialization seeds; the grid is ``lrs x seeds`` (lr-major).
        steps: optimizer steps per member; takes precedence over ``epochs``.
        epochs: passes over ``data`` (``ceil(epochs * steps_per_epoch)`` steps).
        batch_size: examples per step (ignored with ``full_batch``).
        full_batch: every step uses the whole set (gradient descent).
        drop_last: drop an incomplete last batch of each epoch.
        momentum: ``γ`` in ``[0, 1)``.
        weight_decay: ``λ >= 0``.
        data_seed: seeds the batch order shared by all members.
        eval_data: test set for ``test_loss``/``test_acc``.
        eval_every: steps between evaluations; ``None``: only the final one.
        eval_train: also evaluate on the training set.
        loss_fn: ``loss_fn(logits, y) -> scalar``; it must be ``vmap``-able to vectorize.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        vectorize: ``True`` (vmap, errors raise), ``False`` (the ``bnlab.train`` loop per
            member) or ``"auto"`` (vmap, falling back to the loop when the vectorized run fails).
        executor: runs the work; :class:`~bnlab.sweep.executors.LocalExecutor` (default) or
            :class:`~bnlab.sweep.executors.ProcessExecutor`.
        name: the sweep's name (``SweepResult.config["sweep"]``).
        config: extra JSON-able fields recorded in the shared config (``SweepResult.config``,
            and so in every :meth:`SweepResult.cell_config`), e.g. the model name.
        progress: show progress bars.
        keep_states: return every member's final parameters and buffers (``SweepResult.states``).

    Returns:
        SweepResult: per-member loss curves ``[M, steps]``, evaluations, divergence status and
        wall time. Nothing is written to disk: a caller that records each cell as a run writes
        :meth:`SweepResult.cell_config`, :meth:`SweepResult.metric_records` and
        :meth:`SweepResult.summary`.

    Raises:
        UserError: bad grid or setting, unpicklable work for a process executor, or
            ``vectorize=True`` for models that cannot be stacked.

    Example:
        >>> from functools import partial
        >>> from bnlab import data, models
        >>> tr, te = data.load_pair("digits")
        >>> res = sweep(partial(models.make, "convnet", in_shape=tr.in_shape, num_classes=10, width=8),
        ...             tr, lrs=[0.01, 0.1, 1.0], seeds=[0, 1], steps=200, momentum=0.9, eval_data=te)
        >>> res.grid(res.metric("test_acc"))  # [3 lrs, 2 seeds]
    """
    t0 = time.perf_counter()
    if not callable(model_fn):
        raise UserError(f"sweep: model_fn must be callable as model_fn(seed=...), got {model_fn!r}")
    lr_grid = _check_grid("lrs", lrs, positive=True)
    seed_grid = _check_grid("seeds", seeds, positive=False)
    check_positive("batch size", batch_size)
    check_positive("weight decay", weight_decay, allow_zero=True)
    if not 0.0 <= momentum < 1.0:
        raise UserError(f"momentum must be in [0, 1), got {momentum!r}")
    if vectorize not in (True, False, "auto"):
        raise UserError(f"sweep: vectorize must be True, False or 'auto', got {vectorize!r}")
    if eval_every is not None:
        check_positive("eval_every", eval_every)
    steps, _ = resolve_steps(data, epochs=epochs, steps=steps, batch_size=batch_size, full_batch=full_batch, drop_last=drop_last)
    executor = executor if executor is not None else LocalExecutor()
    if not hasattr(executor, "map"):
        raise UserError(f"sweep: executor must have a .map(fn, items) method, got {executor!r}")
    dev = resolve_device(device)  # validates the name here, in the parent
    if not isinstance(executor, LocalExecutor):  # work is pickled: fail here with one clear line, not inside a pool
        for what, obj in (("model_fn", model_fn), ("loss_fn", loss_fn)):
            try:
                pickle.dumps(obj)
            except (pickle.PicklingError, AttributeError, TypeError) as e:
                raise UserError(
                    f"sweep: {executor!r} needs a picklable {what} (a module-level function or a functools.partial of one, "
                    f"not a lambda or closure): {str(e).splitlines()[0]}"
                ) from None

    settings = _Settings(int(steps), batch_size, full_batch, drop_last, float(momentum), float(weight_decay), int(data_seed),
                         eval_every, eval_train, loss_fn, str(dev), vectorize, progress, keep_states)
    members = [(lr_i * len(seed_grid) + s_i, lr, seed) for lr_i, lr in enumerate(lr_grid) for s_i, seed in enumerate(seed_grid)]
    workers = max(1, int(getattr(executor, "max_workers", 1)))
    if vectorize is False and workers > 1:
        chunks = [[m] for m in members]
    else:
        chunks = _split(members, workers)
    groups = [_Group(model_fn, data, eval_data, chunk, settings) for chunk in chunks]
    group_outs = executor.map(_run_group, groups)

    M = len(members)
    by_index: dict[int, _MemberOut] = {mo.index: mo for g in group_outs for mo in g.members}
    outs = [by_index[i] for i in range(M)]
    reasons = sorted({g.fallback_reason for g in group_outs if g.fallback_reason})
    shared = {
        "sweep": name,
        "model_fn": _describe(model_fn),
        "data": {"name": data.name, "split": data.split, "n": len(data)},
        "eval_data": None if eval_data is None else {"name": eval_data.name, "split": eval_data.split, "n": len(eval_data)},
        "optimizer": "sgd",
        "lr_grid": lr_grid,
        "seed_grid": seed_grid,
        "steps": int(steps),
        "batch_size": batch_size,
        "full_batch": full_batch,
        "drop_last": drop_last,
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "data_seed": int(data_seed),
        "eval_every": eval_every,
        "eval_train": eval_train,
        "loss_fn": _describe(loss_fn),
        **(config or {}),
    }
    result = SweepResult(
        lrs=[lr for _, lr, _ in members],
        seeds=[seed for _, _, seed in members],
        lr_grid=lr_grid,
        seed_grid=seed_grid,
        losses=torch.stack([o.losses for o in outs]) if outs else torch.zeros(0, steps, dtype=torch.float64),
        diverged=torch.tensor([o.diverged for o in outs], dtype=torch.bool),
        diverged_at=[o.diverged_at for o in outs],
        reasons=[o.reason for o in outs],
        steps_taken=[o.steps_taken for o in outs],
        evals=[o.evals for o in outs],
        steps=int(steps),
        seconds=0.0,
        vectorized=all(g.vectorized for g in group_outs),
        fallback_reason="; ".join(reasons),
        config=shared,
        states=[o.state for o in outs] if keep_states else None,
    )
    result.seconds = time.perf_counter() - t0
    return result
