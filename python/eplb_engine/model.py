"""The reference engine's MoE math, in exact integer-valued arithmetic.

Every value is an integer small enough that float32 holds it and every partial sum of every
matrix product exactly (|x| <= 15, |w| <= 7, inner dimension <= 128: sums below 2**24). So a
product's result does not depend on the BLAS kernel, the summation order or the batch a row was
computed in, and the EP forward pass (each rank computes only its slots' pairs, in whatever
batches arrive) equals the reference forward pass (every expert held once) bit for bit, with no
tolerance. The nonlinearity is integer too:

* expert (SwiGLU): ``gate, up = x @ w13``; ``h = clip(rshift(hswish(gate) * up), -15, 15)``;
  ``y = h @ w2``, with ``hswish(g) = g * clip(g + 3s, 0, 6s) // 6s``, the integer hard-swish
  (the usual piecewise stand-in for SiLU);
* router: ``logits = (x @ w_router) * c + log(p_t)``, where ``p_t`` is the load the trace wants at
  step t, so the top-k choices follow the trace; combine weights in integer 64ths from IEEE basic
  operations only, so every rank computes the same routing; the combine sums the k results in a
  fixed order (k = 0, 1, ...);
* residual: ``x_next = clip(x + rshift(out), -15, 15)``.

Weights are generated deterministically from (seed, layer, expert).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

XMAX = 15  # activations in [-XMAX, XMAX]
WMAX = 7  # weights in [-WMAX, WMAX]
GATE_UNITS = 64  # combine weights are integer 64ths
H_SHIFT = 12  # rshift of hswish(gate) * up
OUT_SHIFT = 12  # rshift of the combined output into the residual
ROUTER_TAG = 1 << 20  # the router's generator key, apart from every expert id


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_experts: int
    hidden: int = 64
    ffn: int = 64
    top_k: int = 2

    def __post_init__(self) -> None:
        # Exactness: every dot product of ints below 2**24 (float32's exact integer range).
        if max(self.hidden, self.ffn) * XMAX * WMAX >= 1 << 24 or self.top_k * GATE_UNITS * self.ffn * XMAX * WMAX >= 1 << 24:
            raise ValueError("hidden/ffn/top_k too large for exact float32 arithmetic")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} must be in [1, {self.num_experts}]")

    @property
    def gate_scale(self) -> int:
        """The hard-swish's scale s: about one standard deviation of a gate value."""
        return max(1, int(round(np.sqrt(self.hidden) * _uniform_std(XMAX) * _uniform_std(WMAX))))


def _uniform_std(m: int) -> float:
    """Standard deviation of an integer uniform on [-m, m]."""
    return float(np.sqrt(((2 * m + 1) ** 2 - 1) / 12.0))


def expert_weights(seed: int, layer: int, expert: int, shape: ModelShape) -> Tuple[np.ndarray, np.ndarray]:
    """(w13 [hidden, 2*ffn], w2 [ffn, hidden]) float32 integer-valued, a pure function of its key."""
    rng = np.random.default_rng([seed, layer, expert])
    w13 = rng.integers(-WMAX, WMAX + 1, size=(shape.hidden, 2 * shape.ffn)).astype(np.float32)
    w2 = rng.integers(-WMAX, WMAX + 1, size=(shape.ffn, shape.hidden)).astype(np.float32)
    return w13, w2


def router_weights(seed: int, layer: int, shape: ModelShape) -> np.ndarray:
    """w_router [hidden, num_experts] float32 integer-valued."""
    rng = np.random.default_rng([seed, layer, ROUTER_TAG])
    return rng.integers(-WMAX, WMAX + 1, size=(shape.hidden, shape.num_experts)).astype(np.float32)


def tokens(seed: int, step: int, num_tokens: int, shape: ModelShape) -> np.ndarray:
    """The step's input hidden states [num_tokens, hidden] (every rank can make any token)."""
    rng = np.random.default_rng([seed, step, ROUTER_TAG + 1])
    return rng.integers(-XMAX, XMAX + 1, size=(num_tokens, shape.hidden)).astype(np.float32)


def _rshift(a: np.ndarray, bits: int) -> np.ndarray:
    """Rounded arithmetic right shift of int64 values (round half up)."""
    return (a + (1 << (bits - 1))) >> bits


def expert_forward(x: np.ndarray, w13: np.ndarray, w2: np.ndarray, gate_scale: int, in13: float = 1.0,
                   in2: float = 1.0) -> np.ndarray:
    """SwiGLU expert on rows x [n, hidden] -> [n, hidden]; each row independent of the others.

    ``in13``, ``in2``: the activations' input scales (NVFP4's global ``w13_input_scale`` and
    ``w2_input_scale`` of the expert), powers of two: the input is divided by its scale and the
    weights multiplied by it, as a quantised engine folds them into its GEMMs; exact, so the
    result does not depend on them (a 1.0 default is the unquantised path, bit for bit)."""
    ffn = w2.shape[0]
    if in13 != 1.0:
        x, w13 = x / np.float32(in13), w13 * np.float32(in13)
    gu = (x @ w13).astype(np.int64)
    g, u = gu[:, :ffn], gu[:, ffn:]
    s3 = 3 * gate_scale
    t = g + s3  # hswish(g) = g * clip(g + 3s, 0, 6s) // 6s, in place
    np.maximum(t, 0, out=t)
    np.minimum(t, 2 * s3, out=t)
    t *= g
    t //= 2 * s3
    t *= u  # h = clip(rshift(hswish(g) * u), -15, 15)
    t += 1 << (H_SHIFT - 1)
    t >>= H_SHIFT
    np.maximum(t, -XMAX, out=t)
    np.minimum(t, XMAX, out=t)
    h = t.astype(np.float32)
    if in2 != 1.0:
        h, w2 = h / np.float32(in2), w2 * np.float32(in2)
    return h @ w2


def route(x: np.ndarray, w_router: np.ndarray, log_p: np.ndarray, noise_scale: float, top_k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k router: (expert ids [n, k] int64, combine weights [n, k] float32 integer 64ths).

    ``logits = (x @ w_router) * noise_scale + log_p``: the learned part acts as noise around the
    load the trace wants (``log_p`` [num_experts]); ties go to the lower expert id. Only IEEE
    basic operations (no exp: its last bit may differ between CPUs), so every rank that routes a
    token gets the same bits: weight_k is proportional to 1 / (1 + logit_0 - logit_k)."""
    logits = (x @ w_router).astype(np.float64) * noise_scale + log_p
    n = logits.shape[0]
    rows = np.arange(n)
    ids = np.empty((n, top_k), np.int64)
    top = np.empty((n, top_k), np.float64)
    work = logits.copy()
    for k in range(top_k):  # argmax takes the first (lowest) id on ties
        ids[:, k] = np.argmax(work, axis=1)
        top[:, k] = work[rows, ids[:, k]]
        work[rows, ids[:, k]] = -np.inf
    r = 1.0 / (1.0 + (top[:, :1] - top))
    w = np.floor(GATE_UNITS * r / r.sum(axis=1, keepdims=True) + 0.5).astype(np.float32)
    return ids, w


def noise_scale_for(shape: ModelShape, sigma: float) -> float:
    """The factor that gives the router's learned part a standard deviation of about ``sigma``."""
    return sigma / (np.sqrt(shape.hidden) * _uniform_std(XMAX) * _uniform_std(WMAX))


def combine(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum_k w[:, k] * y[:, k] in the fixed order k = 0, 1, ...: y [n, k, hidden], w [n, k]."""
    out = w[:, 0, None] * y[:, 0]
    for k in range(1, y.shape[1]):
        out = out + w[:, k, None] * y[:, k]
    return out


def residual(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The next layer's input: clip(x + rshift(out), -15, 15)."""
    y = x + _rshift(out.astype(np.int64), OUT_SHIFT).astype(np.float32)
    return np.minimum(np.maximum(y, -XMAX), XMAX)


def reference_layer(x: np.ndarray, ids: np.ndarray, w: np.ndarray, w13: np.ndarray, w2: np.ndarray, gate_scale: int) -> np.ndarray:
    """The reference MoE layer: every expert held once (w13 [E, hidden, 2*ffn], w2 [E, ffn, hidden]),
    each expert computed on the tokens that chose it, then the fixed-order combine."""
    n, k = ids.shape
    y = np.empty((n, k, x.shape[1]), dtype=np.float32)
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    experts, starts = np.unique(flat[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    yf = y.reshape(n * k, -1)
    for e, a, b in zip(experts, starts, ends):
        pairs = order[a:b]
        yf[pairs] = expert_forward(x[pairs // k], w13[e], w2[e], gate_scale)
    return combine(y, w)
