"""The load the reference engine's router follows: a trace file or a built-in drifting load.

A load is ``[iterations, num_layers, num_experts]`` token counts; step t follows iteration
``t % iterations`` (wrapping around, as ``eplb-worker run --trace`` does).
"""

from __future__ import annotations

import csv
from typing import Optional

import numpy as np


class LoadError(ValueError):
    """A load file cannot be read (the message says why and what to pass)."""


def read_trace(path: str, dataset: Optional[str] = None) -> np.ndarray:
    """``.npy`` [steps][layers][experts], the JSON counts of shared/traces/qwen3_sglang_recorder
    ([layers][experts], one iteration), or the per-iteration CSV of
    shared/traces/harmoeny_qwen15moe_switch (columns: index, dataset, iteration, layer_idx,
    then one per expert; ``dataset`` picks the rows, default the first dataset in the file)."""
    if path.endswith(".npy"):
        a = np.load(path)
        if a.ndim != 3:
            raise LoadError(f"{path}: shape {a.shape}, want [steps][layers][experts]")
        return a.astype(np.float64)
    if path.endswith(".json"):
        # shared/traces/qwen3_sglang_recorder: {"counts": [layers][experts]}, summed over the
        # recording (no time axis): one iteration, every step follows it.
        import json

        with open(path) as f:
            doc = json.load(f)
        a = np.asarray(doc.get("counts") if isinstance(doc, dict) else None, dtype=np.float64)
        if a.ndim != 2 or a.size == 0:
            raise LoadError(f"{path}: want a JSON object with \"counts\": [layers][experts]")
        return a[None]
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or rows[0][1:4] != ["dataset", "iteration", "layer_idx"]:
        raise LoadError(f"{path}: not a per-iteration CSV (header ',dataset,iteration,layer_idx,0,1,...')")
    body = rows[1:]
    names = sorted({r[1] for r in body})
    dataset = dataset or body[0][1]
    if dataset not in names:
        raise LoadError(f"{path}: no dataset {dataset!r}; it has {names}")
    sel = [r for r in body if r[1] == dataset]
    iters = sorted({int(r[2]) for r in sel})
    layers = sorted({int(r[3]) for r in sel})
    num_experts = len(rows[0]) - 4
    out = np.zeros((len(iters), len(layers), num_experts))
    for r in sel:
        out[iters.index(int(r[2])), layers.index(int(r[3]))] = [float(v) for v in r[4:]]
    return out


def drifting_load(num_layers: int, num_experts: int, steps: int, drift_steps: int = 100, seed: int = 0) -> np.ndarray:
    """Zipf-like hot experts (weight 1/rank) whose order rotates by one expert every
    ``drift_steps / num_experts`` steps, each layer with its own shuffled order."""
    rng = np.random.default_rng([seed, 7])
    perms = np.stack([rng.permutation(num_experts) for _ in range(num_layers)])
    out = np.zeros((steps, num_layers, num_experts))
    for t in range(steps):
        shift = (t * num_experts) // max(1, drift_steps)
        ranks = (np.arange(num_experts)[None, :] + shift) % num_experts
        out[t] = 1000.0 / (1.0 + np.take_along_axis(ranks, perms, axis=1))
    return out


def log_probs(load: np.ndarray) -> np.ndarray:
    """log of the normalised load (+0.5 a count, so that no expert is impossible)."""
    p = load + 0.5
    return np.log(p / p.sum(axis=-1, keepdims=True))


def balancedness(rank_load: np.ndarray) -> float:
    """Mean over steps and layers of (mean rank load / max rank load): rank_load [steps, L, N]
    (1.0 for a step and layer without load)."""
    mx = rank_load.max(axis=2)
    b = np.where(mx > 0, rank_load.mean(axis=2) / np.maximum(mx, 1), 1.0)
    return float(b.mean()) if b.size else 1.0
