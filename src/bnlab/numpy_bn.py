"""A tiny BatchNorm net in numpy with a hand-written backward pass.

Why: the float32 overflow check of an exponential learning-rate schedule needs ~100k optimizer
steps on an exactly scale-invariant loss. Autograd's per-step overhead makes that minutes even
for a tiny net; the same net written with numpy reductions runs a step in microseconds, and its
arithmetic is arranged so that scaling the weights by a power of two scales every intermediate
exactly (so two runs that differ by ``2^k`` can be compared bit for bit).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["TinyBNNet"]


class TinyBNNet:
    """``softmax-CE(relu(BN(X Wᵀ)) Vᵀ, y)`` on a fixed batch, gradient by hand in numpy.

    ``X``: ``(n, d)`` Gaussian, ``y``: random labels (stored one-hot), ``V``: ``(k, m)`` fixed; BN
    without affine and with ``eps = 0``, so the loss is exactly scale-invariant in ``W``
    (``(m, d)``). Float32 throughout.

    Args:
        seed: seeds ``X``, the labels, ``V`` and the initial weights ``W0`` (He-scaled Gaussian).
        n: batch size (a power of two keeps ``1/n`` exact).
        d: input dimension.
        m: BN channels (rows of ``W``).
        k: classes.

    Example:
        >>> net = TinyBNNet(0)
        >>> g = np.zeros_like(net.W0)
        >>> loss, finite = net.loss_grad(net.W0, g)
        >>> finite, loss > 0
        (True, True)
    """

    def __init__(self, seed: int, n: int = 32, d: int = 8, m: int = 8, k: int = 4) -> None:
        rng = np.random.default_rng(seed)
        self.X = rng.standard_normal((n, d)).astype(np.float32)
        self.onehot = np.eye(k, dtype=np.float32)[rng.integers(0, k, n)]
        self.V = (rng.standard_normal((k, m)) / math.sqrt(m)).astype(np.float32)
        self.W0 = (rng.standard_normal((m, d)) * math.sqrt(2.0 / d)).astype(np.float32)
        self.Vt = np.ascontiguousarray(self.V.T)
        self.inv_n = np.float32(1.0 / n)

    def loss_grad(self, W: np.ndarray, out: np.ndarray) -> tuple[float, bool]:
        """Write ``∇L(W)`` into ``out``; return ``(L(W), finite)``, ``finite`` False when the BN
        variance (~‖W‖²) or the loss left float32's range.

        Written for speed on tiny arrays (ufunc reductions, ``1/n`` with ``n`` a power of two) and
        so that a power-of-two scaling of ``W`` scales every intermediate exactly.
        """
        inv_n = self.inv_n
        h = self.X @ W.T                                           # (n, m)
        c = h - np.add.reduce(h, 0) * inv_n
        s = np.sqrt(np.add.reduce(c * c, 0) * inv_n)               # BN scale, eps = 0
        z = c / s
        pos = z > 0
        o = (z * pos) @ self.Vt                                    # (n, k) logits
        o -= np.maximum.reduce(o, 1, keepdims=True)
        e = np.exp(o)
        S = np.add.reduce(e, 1, keepdims=True)
        loss = float(np.add.reduce(np.log(S), None) * inv_n - np.add.reduce(o * self.onehot, None) * inv_n)
        dz = (((e / S - self.onehot) * inv_n) @ self.V) * pos
        dh = (dz - np.add.reduce(dz, 0) * inv_n - z * (np.add.reduce(dz * z, 0) * inv_n)) / s  # BN backward
        np.matmul(dh.T, self.X, out=out)
        return loss, bool(math.isfinite(loss) and np.isfinite(s).all())
