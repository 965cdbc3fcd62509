"""Per-step token splitting between an expert's replicas (issue 22): the same integer quotas as
eplb's Rust `eplb::split` (src/split/mod.rs, where the algorithm, its tie-breaks and the proof of
optimality are written out), so that every rank, in any of the three, agrees where each token goes.

* :func:`split_layer` (numpy): one layer, the exact min-max split, step for step as in Rust;
* :func:`split_layers` (PyTorch, any device): every layer at once, the same algorithm run in
  lock step over the layers (each round: one breadth-first search and one augmentation, or one
  raise of the bound, per layer still placing tokens); torch is imported only here;
* :class:`SplitGraph` / :func:`split_layers_graph` (PyTorch): the same algorithm, the same
  quotas, with fixed loop counts (``rounds``, ``levels``) and masked updates instead of host
  syncs, captured once in a CUDA graph and replayed; a per-layer ``ok`` flag says where the bounds
  sufficed (there the quotas are exactly :func:`split_layers`'s), the others are redone exactly;
* :func:`even_quotas`: the engines' fixed rule in counts (replica ``(k + layer) mod n``);
* :func:`replica_slots`: the token-to-replica rule: the token at index ``k`` of an expert's
  tokens (ordered by source rank, then position in that rank's dispatch order) goes to the replica
  (slots ascending) whose running quota sum first exceeds ``k``.

Bad input (a negative count, counts not summing to the tokens, an expert with tokens and no
replica, a slot out of range, a shape that does not divide) raises :class:`SplitError`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np

UNSEEN = np.iinfo(np.int64).max


class SplitError(ValueError):
    """Bad input to the split: it refuses rather than misroute a token."""


def check(counts: np.ndarray, tokens: int, phy2log: np.ndarray, slots_per_rank: int) -> None:
    """The checks of one layer (the same as Rust's, in the same order)."""
    num_physical = len(phy2log)
    if slots_per_rank <= 0 or num_physical == 0 or num_physical % slots_per_rank:
        raise SplitError(f"{num_physical} slots do not divide into ranks of slots_per_rank = {slots_per_rank}")
    neg = np.nonzero(counts < 0)[0]
    if len(neg):
        e = int(neg[0])
        raise SplitError(f"expert {e} has a negative token count {int(counts[e])}")
    total = int(counts.astype(object).sum()) if len(counts) else 0
    if total != int(tokens):
        raise SplitError(f"the counts sum to {total} tokens, but the step has {int(tokens)}")
    bad = np.nonzero((phy2log < 0) | (phy2log >= len(counts)))[0]
    if len(bad):
        s = int(bad[0])
        raise SplitError(f"phy2log slot {s} holds expert {int(phy2log[s])}, but there are {len(counts)} experts")
    has = np.zeros(len(counts), dtype=bool)
    has[phy2log] = True
    missing = np.nonzero((counts > 0) & ~has)[0]
    if len(missing):
        e = int(missing[0])
        raise SplitError(f"expert {e} has {int(counts[e])} tokens but no replica in the placement")


def even_quotas(counts: Sequence[int], tokens: int, phy2log: Sequence[int], slots_per_rank: int,
                layer: int) -> np.ndarray:
    """The even dispatch of one layer (Rust's `even_quotas`)."""
    counts = np.asarray(counts, dtype=np.int64)
    phy2log = np.asarray(phy2log, dtype=np.int64)
    check(counts, tokens, phy2log, slots_per_rank)
    n = np.bincount(phy2log, minlength=len(counts))
    j = np.zeros(len(counts), dtype=np.int64)
    quotas = np.zeros(len(phy2log), dtype=np.int64)
    for p, e in enumerate(phy2log):
        c, k = int(counts[e]), int(n[e])
        shifted = (int(j[e]) + k - layer % k) % k
        quotas[p] = c // k + (1 if shifted < c % k else 0)
        j[e] += 1
    return quotas


def split_layer(counts: Sequence[int], tokens: int, phy2log: Sequence[int],
                slots_per_rank: int) -> Tuple[np.ndarray, int]:
    """The exact min-max split of one layer: (quotas [num_physical] int64, max GPU load).

    Step for step the algorithm of Rust's `split_layer_into` (same orders, same tie-breaks).
    """
    counts = np.asarray(counts, dtype=np.int64)
    phy2log = np.asarray(phy2log, dtype=np.int64)
    check(counts, tokens, phy2log, slots_per_rank)
    num_logical, num_physical = len(counts), len(phy2log)
    num_gpus = num_physical // slots_per_rank
    gpus_of = [[] for _ in range(num_logical)]  # distinct GPUs ascending
    for p in range(num_physical):
        e, g = int(phy2log[p]), p // slots_per_rank
        if not gpus_of[e] or gpus_of[e][-1] != g:
            gpus_of[e].append(g)
    flex = [e for e in range(num_logical) if len(gpus_of[e]) >= 2 and counts[e] > 0]
    flex_of = {e: f for f, e in enumerate(flex)}
    edge_gpu, edge_expert, edge_start = [], [], [0]
    for f, e in enumerate(flex):
        for g in gpus_of[e]:
            edge_gpu.append(g)
            edge_expert.append(f)
        edge_start.append(len(edge_gpu))
    load = [0] * num_gpus
    for e in range(num_logical):
        if e not in flex_of and counts[e] > 0:
            load[gpus_of[e][0]] += int(counts[e])
    gpu_edges = [[] for _ in range(num_gpus)]  # by flexible expert ascending
    for edge, g in enumerate(edge_gpu):
        gpu_edges[g].append(edge)
    x = [0] * len(edge_gpu)
    supply = [int(counts[e]) for e in flex]
    t = max(-(-int(tokens) // num_gpus), max(load) if load else 0)
    remaining = sum(supply)
    m = len(flex)
    while remaining > 0:
        dist_e = [UNSEEN] * m
        dist_g = [UNSEEN] * num_gpus
        frontier = [f for f in range(m) if supply[f] > 0]
        for f in frontier:
            dist_e[f] = 0
        reached = 0
        level = 0
        target = -1
        while True:
            nxt = []
            for f in frontier:
                for edge in range(edge_start[f], edge_start[f + 1]):
                    g = edge_gpu[edge]
                    if dist_g[g] == UNSEEN:
                        dist_g[g] = level + 1
                        nxt.append(g)
            if not nxt:
                break
            reached += len(nxt)
            spare = [g for g in nxt if load[g] < t]
            if spare:
                target = min(spare)
                break
            frontier, nxt = nxt, []
            for g in frontier:
                for edge in gpu_edges[g]:
                    f = edge_expert[edge]
                    if x[edge] > 0 and dist_e[f] == UNSEEN:
                        dist_e[f] = level + 2
                        nxt.append(f)
            if not nxt:
                break
            frontier = nxt
            level += 2
        if target < 0:
            t += -(-remaining // reached)
            continue
        path = []
        g = target
        delta = t - load[g]
        while True:
            dg = dist_g[g]
            chosen = next(edge for edge in gpu_edges[g] if dist_e[edge_expert[edge]] == dg - 1)
            f = edge_expert[chosen]
            path.append((chosen, 1))
            if dg - 1 == 0:
                src = f
                break
            de = dist_e[f]
            back = next(edge for edge in range(edge_start[f], edge_start[f + 1])
                        if x[edge] > 0 and dist_g[edge_gpu[edge]] == de - 1)
            delta = min(delta, x[back])
            path.append((back, -1))
            g = edge_gpu[back]
        delta = min(delta, supply[src])
        for edge, sign in path:
            x[edge] += sign * delta
        supply[src] -= delta
        load[target] += delta
        remaining -= delta
    # quotas per slot
    per_gpu = {}  # (expert, gpu) -> tokens
    for e in range(num_logical):
        if counts[e] == 0:
            continue
        if e in flex_of:
            f = flex_of[e]
            for edge in range(edge_start[f], edge_start[f + 1]):
                per_gpu[(e, edge_gpu[edge])] = x[edge]
        else:
            per_gpu[(e, gpus_of[e][0])] = int(counts[e])
    quotas = np.zeros(num_physical, dtype=np.int64)
    for g in range(num_gpus):
        row = [int(v) for v in phy2log[g * slots_per_rank:(g + 1) * slots_per_rank]]
        for e in set(row):
            if counts[e] == 0:
                continue
            q, k = per_gpu[(e, g)], row.count(e)
            j = 0
            for s, v in enumerate(row):
                if v == e:
                    quotas[g * slots_per_rank + s] = q // k + (1 if j < q % k else 0)
                    j += 1
    return quotas, int(t)


def gpu_loads(quotas: np.ndarray, slots_per_rank: int) -> np.ndarray:
    return np.asarray(quotas).reshape(-1, slots_per_rank).sum(axis=1)


def balancedness(quotas: np.ndarray, slots_per_rank: int) -> float:
    """mean / max GPU load of one layer's dispatch (1 when no token)."""
    loads = gpu_loads(quotas, slots_per_rank)
    mx = int(loads.max())
    return 1.0 if mx <= 0 else float(loads.sum()) / len(loads) / mx


def replica_slots(expert_ids: np.ndarray, quotas: np.ndarray, phy2log: np.ndarray,
                  offsets: Optional[np.ndarray] = None) -> np.ndarray:
    """The slot of every (token, k) pair of one layer under the token-to-replica rule.

    * ``expert_ids [n]``: logical experts of this rank's pairs, in its dispatch order;
    * ``quotas [num_physical]``: the layer's quotas (every rank's, identical);
    * ``offsets [num_logical]``: pairs of each expert on lower ranks (the exclusive prefix over
      ranks of the per-rank counts); zeros for rank 0 or a single process.
    Raises :class:`SplitError` if a pair falls beyond its expert's quotas (counts that do not
    match the quotas).
    """
    expert_ids = np.asarray(expert_ids, dtype=np.int64)
    phy2log = np.asarray(phy2log, dtype=np.int64)
    quotas = np.asarray(quotas, dtype=np.int64)
    num_logical = int(max(phy2log.max(), expert_ids.max() if len(expert_ids) else 0)) + 1
    if offsets is None:
        offsets = np.zeros(num_logical, dtype=np.int64)
    # the index of each pair among its expert's pairs: stable order
    order = np.argsort(expert_ids, kind="stable")
    sorted_ids = expert_ids[order]
    starts = np.searchsorted(sorted_ids, sorted_ids, side="left")
    k = np.empty(len(expert_ids), dtype=np.int64)
    k[order] = np.arange(len(expert_ids)) - starts
    k += np.asarray(offsets, dtype=np.int64)[expert_ids]
    if len(expert_ids) and (expert_ids.min() < 0 or expert_ids.max() >= num_logical):
        raise SplitError("an expert id is out of range")
    # Every expert's replicas one after the other (experts ascending, slots ascending): pair k of
    # expert e is at position before[e] + k of the concatenated quotas.
    slot_order = np.lexsort((np.arange(len(phy2log)), phy2log))
    ends = np.cumsum(quotas[slot_order])
    total = np.zeros(num_logical, dtype=np.int64)
    np.add.at(total, phy2log, quotas)
    before = np.concatenate(([0], np.cumsum(total)[:-1]))
    over = np.nonzero(k >= total[expert_ids])[0]
    if len(over):
        i = int(over[0])
        raise SplitError(f"pair {i} of expert {int(expert_ids[i])} is beyond its quotas (index {int(k[i])}, "
                         f"quotas {int(total[expert_ids[i]])})")
    j = np.searchsorted(ends, before[expert_ids] + k, side="right")
    return slot_order[j]


# ---- PyTorch: every layer at once ------------------------------------------------------------


def _search_level(frontier_e: Any, dist_g: Any, dist_e: Any, reached: Any, target: Any, done: Any, level: int,
                  A: Any, x: Any, load: Any, t: Any, gidx: Any, G: int, INF: int) -> Tuple[Any, Any, Any, Any, Any, Any]:
    """One level pair of the breadth-first search of every layer at once (the reference's
    :func:`split_layers` and the graph's :func:`_split_core` alike): experts of ``frontier_e``
    reach their GPUs at ``level + 1`` (the lowest-index GPU with spare capacity becomes the
    layer's ``target``), those GPUs reach the experts that send to them at ``level + 2``. Returns
    the new ``(frontier_e, dist_g, dist_e, reached, target, done)``."""
    import torch

    newg = (frontier_e[:, :, None] & A).any(1) & (dist_g == INF) & ~done[:, None]
    dist_g = torch.where(newg, level + 1, dist_g)
    reached = reached + newg.sum(1)
    spare = newg & (load < t[:, None])
    hit = spare.any(1)
    target = torch.where(hit, torch.where(spare, gidx, G).min(1).values, target)
    done = done | hit | ~newg.any(1)
    frontier_g = newg & ~done[:, None]
    newe = (frontier_g[:, None, :] & (x > 0)).any(2) & (dist_e == INF)
    dist_e = torch.where(newe, level + 2, dist_e)
    done = done | ~newe.any(1)
    frontier_e = newe & ~done[:, None]
    return frontier_e, dist_g, dist_e, reached, target, done


def split_layers(counts: Any, phy2log: Any, slots_per_rank: int, tokens: Any = None) -> Tuple[Any, Any]:
    """The exact split of every layer at once, on the tensors' device.

    * ``counts [L, num_logical]`` (int64 tensor), ``phy2log [L, num_physical]`` (int tensor);
    * ``tokens [L]``: the step's tokens of each layer (default: the counts' sums, which then
      only checks the signs and replicas).
    Returns ``(quotas [L, num_physical] int64, max_load [L] int64)``, equal to :func:`split_layer`
    (and Rust's) layer by layer. Raises :class:`SplitError` on bad input.
    """
    import torch

    dev = counts.device
    counts = counts.to(torch.int64)
    phy2log = phy2log.to(device=dev, dtype=torch.int64)
    L, E = counts.shape
    P = phy2log.shape[1]
    S = int(slots_per_rank)
    if S <= 0 or P == 0 or P % S or phy2log.shape[0] != L:
        raise SplitError(f"{P} slots do not divide into ranks of slots_per_rank = {S} (or the layers differ)")
    G = P // S
    if tokens is None:
        tokens = counts.sum(1)
    tokens = torch.as_tensor(tokens, device=dev, dtype=torch.int64)
    # checks (one sync)
    bad = torch.stack([
        (counts < 0).any(),
        (counts.sum(1) != tokens).any(),
        ((phy2log < 0) | (phy2log >= E)).any(),
    ])
    ar = torch.arange(L, device=dev)
    if bool(bad.any()):
        b = bad.tolist()
        if b[0]:
            l, e = (counts < 0).nonzero()[0].tolist()
            raise SplitError(f"layer {l}: expert {e} has a negative token count {int(counts[l, e])}")
        if b[1]:
            l = int((counts.sum(1) != tokens).nonzero()[0, 0])
            raise SplitError(f"layer {l}: the counts sum to {int(counts[l].sum())} tokens, but the step has {int(tokens[l])}")
        raise SplitError("phy2log holds an expert out of range")
    gpu_of_slot = torch.arange(P, device=dev) // S
    # on[L, E, G]: replicas of e on g
    on = torch.zeros(L, E, G, dtype=torch.int64, device=dev)
    on.index_put_((ar[:, None].expand(L, P), phy2log, gpu_of_slot[None].expand(L, P)),
                  torch.ones(L, P, dtype=torch.int64, device=dev), accumulate=True)
    has = on > 0
    ngpu = has.sum(2)  # [L, E]
    missing = (counts > 0) & (ngpu == 0)
    if bool(missing.any()):
        l, e = missing.nonzero()[0].tolist()
        raise SplitError(f"layer {l}: expert {e} has {int(counts[l, e])} tokens but no replica in the placement")
    isflex = (ngpu >= 2) & (counts > 0)  # [L, E]
    fixed = torch.where(isflex, 0, counts)  # tokens of experts on one GPU
    first_gpu = torch.where(has, torch.arange(G, device=dev), G).min(2).values.clamp(max=G - 1)
    load = torch.zeros(L, G, dtype=torch.int64, device=dev)
    load.scatter_add_(1, first_gpu, fixed)
    A = has & isflex[:, :, None]  # [L, E, G] edges of the flexible experts (experts by index)
    x = torch.zeros(L, E, G, dtype=torch.int64, device=dev)
    supply = torch.where(isflex, counts, 0)
    t = torch.maximum((tokens + G - 1) // G, load.max(1).values)
    INF = torch.iinfo(torch.int64).max
    eidx = torch.arange(E, device=dev)
    gidx = torch.arange(G, device=dev)
    remaining = supply.sum(1)
    while bool((remaining > 0).any()):
        active = remaining > 0
        dist_e = torch.where(supply > 0, 0, INF)
        dist_g = torch.full((L, G), INF, dtype=torch.int64, device=dev)
        frontier_e = supply > 0
        target = torch.full((L,), -1, dtype=torch.int64, device=dev)
        done = ~active
        reached = torch.zeros(L, dtype=torch.int64, device=dev)
        level = 0
        while True:
            frontier_e, dist_g, dist_e, reached, target, done = _search_level(
                frontier_e, dist_g, dist_e, reached, target, done, level, A, x, load, t, gidx, G, INF)
            level += 2
            if not bool(frontier_e.any()):
                break
        # raises: active layers without a target
        raise_ = active & (target < 0)
        t = torch.where(raise_, t + (remaining + reached.clamp(min=1) - 1) // reached.clamp(min=1), t)
        aug = active & (target >= 0)
        if not bool(aug.any()):
            continue
        tg = target.clamp(min=0)
        delta = torch.where(aug, t - load[ar, tg], 0)
        g = tg.clone()
        walking = aug.clone()
        steps = []  # (mask, expert, gpu, sign)
        src = torch.zeros(L, dtype=torch.int64, device=dev)
        while bool(walking.any()):
            dg = dist_g[ar, g]
            cand = A[ar, :, g] & (dist_e == (dg - 1)[:, None])  # [L, E]
            f = torch.where(cand, eidx, E).min(1).values.clamp(max=E - 1)
            steps.append((walking.clone(), f, g.clone(), 1))
            at_src = walking & (dist_e[ar, f] == 0)
            src = torch.where(at_src, f, src)
            walking = walking & ~at_src
            de = dist_e[ar, f]
            bk = (x[ar, f] > 0) & (dist_g == (de - 1)[:, None])  # [L, G]
            gb = torch.where(bk, gidx, G).min(1).values.clamp(max=G - 1)
            delta = torch.where(walking, torch.minimum(delta, x[ar, f, gb]), delta)
            steps.append((walking.clone(), f, gb, -1))
            g = torch.where(walking, gb, g)
        delta = torch.where(aug, torch.minimum(delta, supply[ar, src]), 0)
        for mask, f, gg, sign in steps:
            x[ar, f, gg] += torch.where(mask, sign * delta, 0)
        supply[ar, src] -= delta
        load[ar, tg] += delta
        remaining = remaining - delta
    # quotas per slot: the (expert, GPU) tokens split over the expert's slots there
    per = torch.where(isflex[:, :, None], x, torch.where(has & (fixed > 0)[:, :, None], fixed[:, :, None], 0))
    q = per[ar[:, None], phy2log, gpu_of_slot[None]]  # [L, P]: the (e, g) tokens of each slot
    k = on[ar[:, None], phy2log, gpu_of_slot[None]]  # replicas of e on g
    # j: index of this slot among e's slots on g (slots ascending)
    same = (phy2log[:, :, None] == phy2log[:, None, :]) & (gpu_of_slot[:, None] == gpu_of_slot[None, :])
    pidx = torch.arange(P, device=dev)
    earlier = pidx[None, :] < pidx[:, None]  # earlier[i, j]: slot j before slot i
    j = (same & earlier).sum(2)
    quotas = q // k + (j < q % k).to(torch.int64)
    return quotas, t


def replica_slots_layers(ids: Any, quotas: Any, phy2log: Any, num_logical: int) -> Any:
    """:func:`replica_slots` for every layer at once in PyTorch (no host sync, no checks: the
    quotas must come from the counts of these very ``ids``, as :func:`split_layers` of them).

    ``ids [L, n]``: logical experts of the pairs in (token, k) order over all ranks;
    ``quotas``, ``phy2log`` ``[L, num_physical]``. Returns the slots ``[L, n]`` (int64).
    """
    import torch

    ids = ids.to(torch.int64)
    phy2log = phy2log.to(device=ids.device, dtype=torch.int64)
    quotas = quotas.to(device=ids.device, dtype=torch.int64)
    L, n = ids.shape
    P = phy2log.shape[1]
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)
    start = torch.searchsorted(sorted_ids, sorted_ids, right=False)
    k = torch.empty_like(ids)
    k.scatter_(1, order, torch.arange(n, device=ids.device)[None].expand(L, n) - start)
    slot_order = torch.argsort(phy2log * P + torch.arange(P, device=ids.device)[None], dim=1)
    ends = torch.cumsum(torch.gather(quotas, 1, slot_order), dim=1)
    total = torch.zeros((L, num_logical), dtype=torch.int64, device=ids.device).scatter_add_(1, phy2log, quotas)
    before = torch.cumsum(total, dim=1) - total
    pos = torch.gather(before, 1, ids) + k
    j = torch.searchsorted(ends, pos, right=True).clamp(max=P - 1)
    return torch.gather(slot_order, 1, j)


# ---- PyTorch without a host sync: CUDA-graph capturable ---------------------------------------


def _split_core(counts: Any, phy2log: Any, tokens: Any, slots_per_rank: int, rounds: int,
                levels: int) -> Tuple[Any, Any, Any]:
    """The algorithm of :func:`split_layers` (same orders, same tie-breaks, so the same quotas)
    with data-independent loop counts and no host synchronisation, so that a CUDA graph can
    capture it: ``rounds`` rounds (each: one breadth-first search of ``levels`` expert -> GPU ->
    expert levels, then one augmentation or one raise of ``T`` per layer still placing tokens),
    finished layers idling through masked updates.

    Returns ``(quotas [L, P], max_load [L], ok [L] bool)``. ``ok[l]`` is true iff layer ``l``'s
    input is valid, its supply was all placed within ``rounds`` rounds and no search was cut at
    ``levels`` levels; then its quotas are exactly :func:`split_layers`'s (every step of the
    reference ran, in the same order). A layer not ok has meaningless quotas: the caller must
    check ``ok`` (once, after the call) and fall back to the exact :func:`split_layers`.
    """
    import torch

    dev = counts.device
    counts = counts.to(torch.int64)
    L, E = counts.shape
    P = phy2log.shape[1]
    S = int(slots_per_rank)
    G = P // S
    tokens = tokens.to(torch.int64)
    raw = phy2log.to(torch.int64)
    ok = ~((counts < 0).any(1) | (counts.sum(1) != tokens) | ((raw < 0) | (raw >= E)).any(1))
    phy2log = raw.clamp(0, E - 1)
    counts = counts.clamp(min=0)
    ar = torch.arange(L, device=dev)
    gpu_of_slot = torch.arange(P, device=dev) // S
    on = torch.zeros(L, E * G, dtype=torch.int64, device=dev)  # scatter_add: no sort, no sync
    on.scatter_add_(1, phy2log * G + gpu_of_slot[None], torch.ones(L, P, dtype=torch.int64, device=dev))
    on = on.view(L, E, G)
    has = on > 0
    ngpu = has.sum(2)
    ok = ok & ~((counts > 0) & (ngpu == 0)).any(1)
    isflex = (ngpu >= 2) & (counts > 0)
    fixed = torch.where(isflex, 0, counts)
    gidx = torch.arange(G, device=dev)
    eidx = torch.arange(E, device=dev)
    first_gpu = torch.where(has, gidx, G).min(2).values.clamp(max=G - 1)
    load = torch.zeros(L, G, dtype=torch.int64, device=dev)
    load.scatter_add_(1, first_gpu, fixed)
    A = has & isflex[:, :, None]
    x = torch.zeros(L, E, G, dtype=torch.int64, device=dev)
    supply = torch.where(isflex, counts, 0)
    t = torch.maximum((tokens.clamp(min=0) + G - 1) // G, load.max(1).values)
    INF = torch.iinfo(torch.int64).max
    remaining = supply.sum(1)
    cut = torch.zeros(L, dtype=torch.bool, device=dev)  # a search was cut at `levels` levels
    for _ in range(rounds):
        active = (remaining > 0) & ok & ~cut
        dist_e = torch.where(supply > 0, 0, INF)
        dist_g = torch.full((L, G), INF, dtype=torch.int64, device=dev)
        frontier_e = (supply > 0) & active[:, None]
        target = torch.full((L,), -1, dtype=torch.int64, device=dev)
        done = ~active
        reached = torch.zeros(L, dtype=torch.int64, device=dev)
        level = 0
        for _ in range(levels):
            frontier_e, dist_g, dist_e, reached, target, done = _search_level(
                frontier_e, dist_g, dist_e, reached, target, done, level, A, x, load, t, gidx, G, INF)
            level += 2
        cut = cut | frontier_e.any(1)  # the reference would have searched on
        active = active & ~cut
        raise_ = active & (target < 0)
        rc = reached.clamp(min=1)
        t = torch.where(raise_, t + (remaining + rc - 1) // rc, t)
        aug = active & (target >= 0)
        # the path back: each node's parent (the lowest-index node of the previous level)
        par_g = torch.where(A & (dist_e[:, :, None] == (dist_g - 1)[:, None, :]), eidx[None, :, None], E) \
            .min(1).values.clamp(max=E - 1)  # [L, G]
        par_e = torch.where((x > 0) & (dist_g[:, None, :] == (dist_e - 1)[:, :, None]), gidx, G) \
            .min(2).values.clamp(max=G - 1)  # [L, E]
        tg = target.clamp(min=0)
        delta = torch.where(aug, t - load[ar, tg], 0)
        g = tg
        walking = aug
        sign = torch.zeros(L, E, G, dtype=torch.int64, device=dev)
        src = torch.zeros(L, dtype=torch.int64, device=dev)
        for _ in range(levels):
            f = par_g[ar, g]
            sign[ar, f, g] += walking.to(torch.int64)
            at_src = walking & (dist_e[ar, f] == 0)
            src = torch.where(at_src, f, src)
            walking = walking & ~at_src
            gb = par_e[ar, f]
            delta = torch.where(walking, torch.minimum(delta, x[ar, f, gb]), delta)
            sign[ar, f, gb] -= walking.to(torch.int64)
            g = torch.where(walking, gb, g)
        delta = torch.where(aug, torch.minimum(delta, supply[ar, src]), 0)
        x += sign * delta[:, None, None]
        supply[ar, src] -= delta
        load[ar, tg] += delta
        remaining = remaining - delta
    ok = ok & ~cut & (remaining == 0)
    per = torch.where(isflex[:, :, None], x, torch.where(has & (fixed > 0)[:, :, None], fixed[:, :, None], 0))
    q = per[ar[:, None], phy2log, gpu_of_slot[None]]
    k = on[ar[:, None], phy2log, gpu_of_slot[None]]
    same = (phy2log[:, :, None] == phy2log[:, None, :]) & (gpu_of_slot[:, None] == gpu_of_slot[None, :])
    pidx = torch.arange(P, device=dev)
    earlier = pidx[None, :] < pidx[:, None]
    j = (same & earlier).sum(2)
    quotas = q // k + (j < q % k).to(torch.int64)
    return quotas, t, ok


class SplitGraph:
    """:func:`_split_core` captured once in a CUDA graph for fixed shapes, replayed per step.

    Static input buffers ``counts [L, E]``, ``phy2log [L, P]``, ``tokens [L]`` and outputs
    ``quotas [L, P]``, ``max_load [L]``, ``ok [L]``. :meth:`run` copies its inputs in and replays
    (no host sync); the outputs are the static buffers (overwritten by the next run). Where
    ``ok[l]`` is true the quotas are exactly :func:`split_layers`'s (and Rust's); where it is false
    (bad input, or a layer that needs more than ``rounds`` rounds or ``levels`` search levels) the
    caller must fall back: :func:`split_layers_graph` does. On a device other than CUDA it runs
    the same core eagerly.
    """

    def __init__(self, num_layers: int, num_logical: int, num_physical: int, slots_per_rank: int,
                 device: Any = "cuda", rounds: int = 100, levels: int = 12) -> None:
        import torch

        if slots_per_rank <= 0 or num_physical == 0 or num_physical % slots_per_rank:
            raise SplitError(f"{num_physical} slots do not divide into ranks of slots_per_rank = {slots_per_rank}")
        self.device = torch.device(device)
        self.slots_per_rank, self.rounds, self.levels = int(slots_per_rank), int(rounds), int(levels)
        self.counts = torch.zeros(num_layers, num_logical, dtype=torch.int64, device=self.device)
        self.phy2log = torch.zeros(num_layers, num_physical, dtype=torch.int64, device=self.device)
        self.tokens = torch.zeros(num_layers, dtype=torch.int64, device=self.device)
        self.graph = None
        if self.device.type == "cuda":
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):  # warm-up outside the capture (allocator, kernels)
                for _ in range(2):
                    self._core()
            torch.cuda.current_stream(self.device).wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.quotas, self.max_load, self.ok = self._core()
        else:
            self.quotas, self.max_load, self.ok = self._core()

    def _core(self) -> Tuple[Any, Any, Any]:
        return _split_core(self.counts, self.phy2log, self.tokens, self.slots_per_rank, self.rounds, self.levels)

    def run(self, counts: Any, phy2log: Any, tokens: Any = None) -> Tuple[Any, Any, Any]:
        """``(quotas, max_load, ok)`` of these inputs (static buffers; no host sync on CUDA)."""
        self.counts.copy_(counts)
        self.phy2log.copy_(phy2log)
        if tokens is None:
            self.tokens.copy_(self.counts.sum(1))
        else:
            self.tokens.copy_(tokens)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.quotas, self.max_load, self.ok = self._core()
        return self.quotas, self.max_load, self.ok


def split_layers_graph(counts: Any, phy2log: Any, slots_per_rank: int, tokens: Any = None,
                       graph: Optional[SplitGraph] = None, rounds: int = 100,
                       levels: int = 12) -> Tuple[Any, Any]:
    """:func:`split_layers`, the same quotas, through a :class:`SplitGraph` (built here if not
    given): one replay, then one host sync to read ``ok``; layers not ok (rare: more rounds or
    levels than the graph's bounds, or bad input) are redone by :func:`split_layers`, which
    raises :class:`SplitError` on bad input. Returns copies ``(quotas, max_load)``.
    """
    import torch

    if graph is None:
        graph = SplitGraph(counts.shape[0], counts.shape[1], phy2log.shape[1], slots_per_rank,
                           counts.device, rounds, levels)
    q, t, ok = graph.run(counts, phy2log, tokens)
    q, t = q.clone(), t.clone()
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:, 0]
        tk = None if tokens is None else torch.as_tensor(tokens, device=counts.device)[bad]
        qb, tb = split_layers(counts[bad], phy2log[bad], slots_per_rank, tk)
        q[bad], t[bad] = qb.to(q.device), tb.to(t.device)
    return q, t
