//! Local search over the slots of one node: replica counts and packing improved together.
//!
//! The state is one node's placement, `slot_expert [num_slots]` (local expert indices), with
//! `slots_per_rank` consecutive slots a GPU. [`Search::run`] repeatedly takes the most loaded GPU
//! `a` (load `P`; among equals the highest index) and applies the best move that lowers it:
//!
//! * **swap** slot `i` on `a` with slot `j` on another GPU `b` whose expert is lighter per replica
//!   by `d`, with `0 < d < P - load[b]`;
//! * **recount** slot `j`: its expert `x` (with at least two replicas) gives the slot to a new
//!   replica of expert `y`. The replica counts change, so every replica of `x` gets heavier and
//!   every replica of `y` lighter, wherever they are. Two kinds lower `a`: `j` is on `a` (and `y`
//!   is the expert lightest per replica once it has one more, an expert already on `a`, or one
//!   that the previous placement had on `a`), or `y` is on `a` and `j` is anywhere else.
//!
//! A move is allowed when `a` ends below `P` and every GPU whose load rises stays below `P`: the
//! vector of GPU loads sorted in decreasing order then falls lexicographically, so the search
//! ends. An allowed move's *value* is the largest load it leaves on `a` or on a GPU it raises.
//! With a previous placement, a move must also lower `a` by more than `per_copy` for every
//! expert copy it sends to a GPU that did not hold it, and its *cost* is its value plus
//! `per_copy` per copy sent (without one, cost = value).
//!
//! Which move: swaps first. Partners are visited from the lightest GPU (ties: lower index), and
//! the first partner with an allowed swap supplies the move, its allowed swap of lowest cost:
//! the lightest GPUs have the most room, and searching every partner would cost more time than
//! it gains. Only when no swap is allowed are recounts evaluated, and the one of lowest cost
//! wins: they are dearer to evaluate, and the replica counts the search starts from are good
//! (see [`super::incremental`]). Ties go to the move that sends fewer copies, then to the first
//! found in a fixed order (swaps: partner slot, then `a`'s slots by increasing per-replica load;
//! recounts: slot on `a` then expert ascending, then expert on `a` in slot order, expert with
//! several replicas ascending, its slots in list order). Every load is an exact [`Fixed`] integer,
//! so the result is a pure function of the input.
//!
//! The search stops when no move is allowed, when the peak is within 1/512 of the lower bound
//! (the last small gains cost the most search, and would move copies for nothing), or when a
//! move budget that depends on the shape only (never on time) is spent.

use super::fixed::{per_replica, Fixed};

/// No slot (end of an expert's slot list).
const NIL: usize = usize::MAX;

/// One local-search move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Move {
    /// Exchange the experts of slots `i` and `j` (on different GPUs).
    Swap { i: usize, j: usize },
    /// Slot `j`'s expert, which has other replicas, gives the slot to a new replica of `expert`.
    Recount { j: usize, expert: usize },
}

/// The best move found so far: lowest `cost`, then lowest `dm` (change in copies moved), then
/// the first found.
#[derive(Debug, Clone, Copy)]
struct Best {
    cost: Fixed,
    dm: i64,
    mv: Move,
}

/// The most entries (`num_gpus * num_local`) for which a search keeps per-GPU copy tables.
const DENSE_COPIES: usize = 4096;

/// A GPU's key in the load order: `load << 64 | gpu`, so keys sort by (load, index).
#[inline]
fn key(load: Fixed, gpu: usize) -> u128 {
    ((load as u128) << 64) | gpu as u128
}

/// A per-GPU sum that clears in constant time: a GPU's value counts only where its stamp is the
/// current epoch; `touched` lists the GPUs with a value, in the order they got one.
struct Tally {
    epoch: u32,
    stamp: Vec<u32>,
    value: Vec<Fixed>,
    touched: Vec<usize>,
}

impl Tally {
    fn new(num_gpus: usize) -> Self {
        Tally { epoch: 0, stamp: vec![0; num_gpus], value: vec![0; num_gpus], touched: Vec::new() }
    }

    fn clear(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.stamp.fill(0);
            self.epoch = 1;
        }
        self.touched.clear();
    }

    fn add(&mut self, g: usize, v: Fixed) {
        if self.stamp[g] != self.epoch {
            self.stamp[g] = self.epoch;
            self.value[g] = 0;
            self.touched.push(g);
        }
        self.value[g] += v;
    }

    #[inline]
    fn get(&self, g: usize) -> Fixed {
        if self.stamp[g] == self.epoch {
            self.value[g]
        } else {
            0
        }
    }
}

/// Local search over one node's slots.
pub(super) struct Search<'a> {
    /// `[num_local]`
    weight: &'a [u64],
    spr: usize,
    /// `[num_slots]`: local expert of every slot.
    slot_expert: Vec<usize>,
    /// `[num_slots]`: per-replica load of every slot's expert.
    slot_rep: Vec<Fixed>,
    /// `[num_local]`: replicas per expert; the per-replica load with that count, with one fewer
    /// (`Fixed::MAX` for a single replica) and with one more.
    count: Vec<usize>,
    rep: Vec<Fixed>,
    rep_less: Vec<Fixed>,
    rep_more: Vec<Fixed>,
    /// `[num_gpus]`
    load: Vec<Fixed>,
    /// `[num_gpus]`: [`key`] of every GPU, ascending.
    order: Vec<u128>,
    /// Every expert's slots as a doubly linked list: `head [num_local]`, `next`/`back [num_slots]`.
    head: Vec<usize>,
    next: Vec<usize>,
    back: Vec<usize>,
    /// `[num_slots]`: the previous placement (None: no previous placement, or an expert of
    /// another node), and the copies moved relative to it.
    prev: Option<&'a [Option<usize>]>,
    moved: usize,
    /// `[num_gpus * num_local]`: copies of every expert on every GPU, now and in the previous
    /// placement, kept only for small nodes (at most [`DENSE_COPIES`] entries; empty otherwise,
    /// where counting over a GPU's few slots is cheaper than zeroing the tables every search).
    copies_now: Vec<u32>,
    copies_prev: Vec<u32>,
    per_copy: Fixed,
    /// A lower bound on the peak of any placement of this node.
    lower: Fixed,
    /// Scratch per GPU for recounts: the losing expert's copies on every GPU, and the load every
    /// GPU sheds when the gaining expert gets one more replica.
    loser: Tally,
    gainer: Tally,
    /// Scratch: the peak GPU's slots as `per-replica load << 64 | slot`, ascending.
    mine: Vec<u128>,
    /// Scratch of a recount: the GPUs it touches and their loads before.
    touched: Vec<(usize, Fixed)>,
    moves_left: usize,
    /// The cost of another candidate (a fresh plan): the search stops once even a perfect
    /// balance could not beat it with the copies already moved.
    rival: Fixed,
}

impl<'a> Search<'a> {
    /// A search from `slot_expert [num_slots]` over `weight [num_local]`; `prev [num_slots]` is the
    /// previous placement of the node (None where a slot held an expert of another node), a move
    /// must lower the peak by more than `per_copy` per copy it sends, and no placement of the
    /// node has a peak below `lower`.
    pub(super) fn new(
        weight: &'a [u64],
        slots_per_rank: usize,
        slot_expert: Vec<usize>,
        prev: Option<&'a [Option<usize>]>,
        per_copy: Fixed,
        lower: Fixed,
    ) -> Self {
        let n = weight.len();
        let m = slot_expert.len();
        let num_gpus = m / slots_per_rank;
        let mut count = vec![0usize; n];
        let (mut head, mut next, mut back) = (vec![NIL; n], vec![NIL; m], vec![NIL; m]);
        for (s, &e) in slot_expert.iter().enumerate().rev() {
            count[e] += 1;
            next[s] = head[e];
            if head[e] != NIL {
                back[head[e]] = s;
            }
            head[e] = s;
        }
        // Copies moved: those of `now` beyond `prev`, per GPU and expert.
        let moved = prev.map_or(0, |p| moved_copies(&slot_expert, p, slots_per_rank, n));
        let (mut copies_now, mut copies_prev) = (Vec::new(), Vec::new());
        if let Some(p) = prev.filter(|_| num_gpus * n <= DENSE_COPIES) {
            (copies_now, copies_prev) = (vec![0u32; num_gpus * n], vec![0u32; num_gpus * n]);
            for (s, (&e, &before)) in slot_expert.iter().zip(p).enumerate() {
                copies_now[(s / slots_per_rank) * n + e] += 1;
                if let Some(b) = before {
                    copies_prev[(s / slots_per_rank) * n + b] += 1;
                }
            }
        }
        let mut s = Search {
            weight,
            spr: slots_per_rank,
            slot_rep: vec![0; m],
            slot_expert,
            rep: vec![0; n],
            rep_less: vec![0; n],
            rep_more: vec![0; n],
            count,
            load: vec![0; num_gpus],
            order: Vec::with_capacity(num_gpus),
            head,
            next,
            back,
            prev,
            moved,
            copies_now,
            copies_prev,
            per_copy,
            lower,
            loser: Tally::new(num_gpus),
            gainer: Tally::new(num_gpus),
            mine: Vec::with_capacity(slots_per_rank),
            touched: Vec::new(),
            moves_left: 4 * m + 64,
            rival: Fixed::MAX,
        };
        for e in 0..n {
            s.set_rep(e);
        }
        for slot in 0..m {
            s.slot_rep[slot] = s.rep[s.slot_expert[slot]];
            s.load[slot / slots_per_rank] += s.slot_rep[slot];
        }
        s.sort_order();
        s
    }

    /// Caps the moves the search may still make (a budget that depends on the shape only).
    pub(super) fn with_budget(mut self, moves: usize) -> Self {
        self.moves_left = self.moves_left.min(moves);
        self
    }

    /// Stops the search once `lower + per_copy x moved` reaches `cost`, the cost of a rival
    /// candidate: no later state could beat it.
    pub(super) fn with_rival(mut self, cost: Fixed) -> Self {
        self.rival = cost;
        self
    }

    /// The most loaded GPU (the highest index among equals) and its load.
    pub(super) fn peak(&self) -> (usize, Fixed) {
        let k = *self.order.last().expect("a node has GPUs");
        (k as u64 as usize, (k >> 64) as Fixed)
    }

    /// The cost of this placement, to choose among candidates: peak + `per_copy` x copies moved.
    pub(super) fn score(&self) -> Fixed {
        self.peak().1.saturating_add(self.per_copy.saturating_mul(self.moved as u64))
    }

    fn set_rep(&mut self, e: usize) {
        let (w, c) = (self.weight[e], self.count[e]);
        self.rep[e] = per_replica(w, c);
        self.rep_less[e] = if c > 1 { per_replica(w, c - 1) } else { Fixed::MAX };
        self.rep_more[e] = per_replica(w, c + 1);
    }

    fn sort_order(&mut self) {
        self.order.clear();
        self.order.extend(self.load.iter().enumerate().map(|(g, &l)| key(l, g)));
        self.order.sort_unstable();
    }

    /// Moves GPU `g`'s key in `order` from load `old` to its current load.
    fn reorder(&mut self, g: usize, old: Fixed) {
        let from = self.order.binary_search(&key(old, g)).expect("every GPU has a key");
        let new = key(self.load[g], g);
        let to = self.order.partition_point(|&k| k < new);
        if to > from {
            self.order.copy_within(from + 1..to, from);
            self.order[to - 1] = new;
        } else {
            self.order.copy_within(to..from, to + 1);
            self.order[to] = new;
        }
    }

    /// Copies of expert `e` on GPU `g`, now and in the previous placement (with one): from the
    /// tables of a small node, else a count over the GPU's slots.
    #[inline(always)]
    fn copies(&self, g: usize, e: usize) -> (u32, u32) {
        if !self.copies_now.is_empty() {
            let k = g * self.weight.len() + e;
            return (self.copies_now[k], self.copies_prev[k]);
        }
        let gpu = g * self.spr..(g + 1) * self.spr;
        let now = self.slot_expert[gpu.clone()].iter().filter(|&&x| x == e).count() as u32;
        let before = self.prev.map_or(0, |p| p[gpu].iter().filter(|&&x| x == Some(e)).count() as u32);
        (now, before)
    }

    /// Change in copies moved when one copy of `e` leaves GPU `g` (-1 or 0).
    #[inline(always)]
    fn dm_leave(&self, g: usize, e: usize) -> i64 {
        let (now, before) = self.copies(g, e);
        -((now > before) as i64)
    }

    /// Change in copies moved when one copy of `e` arrives on GPU `g` (0 or +1).
    #[inline(always)]
    fn dm_arrive(&self, g: usize, e: usize) -> i64 {
        let (now, before) = self.copies(g, e);
        (now >= before) as i64
    }

    /// Change in copies moved when one copy of `e` leaves GPU `g` and one of `f` arrives on `h`.
    #[inline(always)]
    fn dm(&self, g: usize, e: usize, h: usize, f: usize) -> i64 {
        if self.prev.is_none() {
            return 0;
        }
        self.dm_leave(g, e) + self.dm_arrive(h, f)
    }

    /// Offers a move of value `value` that changes copies moved by `dm()`, against peak `peak`.
    #[inline]
    fn offer(&self, best: &mut Option<Best>, peak: Fixed, value: Fixed, dm: impl FnOnce() -> i64, mv: Move) {
        if value >= peak || best.is_some_and(|b| value > b.cost) {
            return;
        }
        let dm = dm();
        let charge = self.per_copy.saturating_mul(dm.max(0) as u64);
        if dm > 0 && peak - value <= charge {
            return;
        }
        let cost = value.saturating_add(charge);
        if best.is_none_or(|b| (cost, dm) < (b.cost, b.dm)) {
            *best = Some(Best { cost, dm, mv });
        }
    }

    /// The swap of a slot on `a` (at load `peak`) with a slot on the lightest partner GPU that
    /// has an allowed swap, of lowest cost (see the module documentation for the order).
    fn best_swap(&mut self, a: usize, peak: Fixed, best: &mut Option<Best>) {
        let spr = self.spr;
        // a's slots by (per-replica load, slot).
        let mut mine = std::mem::take(&mut self.mine);
        mine.clear();
        mine.extend((a * spr..(a + 1) * spr).map(|i| ((self.slot_rep[i] as u128) << 64) | i as u128));
        mine.sort_unstable();
        for &k in &self.order {
            let (b, lb) = (k as u64 as usize, (k >> 64) as Fixed);
            if b == a {
                continue;
            }
            let gap = peak.saturating_sub(lb);
            if gap <= 1 || best.is_some() {
                break;
            }
            for j in b * spr..(b + 1) * spr {
                let rj = self.slot_rep[j];
                // The slots of `a` lighter than `rj + gap` and heavier than `rj`.
                let first = mine.partition_point(|&m| (m >> 64) as Fixed <= rj);
                for &m in &mine[first..] {
                    let (ri, i) = ((m >> 64) as Fixed, m as u64 as usize);
                    let d = ri - rj;
                    if d >= gap {
                        break;
                    }
                    let value = (peak - d).max(lb + d);
                    let (x, z) = (self.slot_expert[i], self.slot_expert[j]);
                    let dm = || self.dm(a, x, b, x) + self.dm(b, z, a, z);
                    self.offer(best, peak, value, dm, Move::Swap { i, j });
                }
            }
        }
        self.mine = mine;
    }

    /// Adds `per_replica` to `tally` on the GPU of every slot of expert `e` (after clearing it).
    fn collect(head: &[usize], next: &[usize], spr: usize, e: usize, per_replica: Fixed, tally: &mut Tally) {
        tally.clear();
        let mut s = head[e];
        while s != NIL {
            tally.add(s / spr, per_replica);
            s = next[s];
        }
    }

    /// Fills `loser` with expert `x`'s copies on every GPU.
    fn collect_loser(&mut self, x: usize) {
        Self::collect(&self.head, &self.next, self.spr, x, 1, &mut self.loser);
    }

    /// Fills `gainer` with the load every GPU sheds when `y` gains a replica.
    fn collect_gainer(&mut self, y: usize) {
        let d = self.rep[y] - self.rep_more[y];
        Self::collect(&self.head, &self.next, self.spr, y, d, &mut self.gainer);
    }

    /// GPU `h`'s load once the collected loser has lost a replica and the collected gainer has
    /// gained one, leaving aside the slot that changes hands.
    #[inline]
    fn after_recount(&self, h: usize, raise: Fixed) -> Fixed {
        self.load[h] + self.loser.get(h) * raise - self.gainer.get(h)
    }

    /// Recounts that lower `a` (at load `peak`): a slot on `a` changes expert, or an expert on
    /// `a` gains a replica in a slot elsewhere.
    fn best_recount(&mut self, a: usize, peak: Fixed, best: &mut Option<Best>) {
        let spr = self.spr;
        let n = self.weight.len();
        let on_a = a * spr..(a + 1) * spr;
        let mut on_a_experts: Vec<usize> = Vec::with_capacity(spr);
        for s in on_a.clone() {
            if !on_a_experts.contains(&self.slot_expert[s]) {
                on_a_experts.push(self.slot_expert[s]);
            }
        }
        // The two experts lightest per replica once they gain one (ties: lower index).
        let mut lightest = [NIL; 2];
        for e in 0..n {
            let r = self.rep_more[e];
            if lightest[0] == NIL || r < self.rep_more[lightest[0]] {
                lightest = [e, lightest[0]];
            } else if lightest[1] == NIL || r < self.rep_more[lightest[1]] {
                lightest[1] = e;
            }
        }
        // Experts the previous placement had on `a` (coming back is cheap).
        let home: Vec<usize> = self.prev.map_or_else(Vec::new, |p| p[on_a.clone()].iter().flatten().copied().collect());

        // (1) A slot on `a` changes expert.
        let mut gainers: Vec<usize> = Vec::with_capacity(2 * spr + 1);
        for j in on_a.clone() {
            let x = self.slot_expert[j];
            if self.count[x] < 2 {
                continue;
            }
            gainers.clear();
            gainers.extend(lightest.iter().copied().filter(|&y| y != NIL && y != x).take(1));
            gainers.extend(on_a_experts.iter().chain(&home).copied().filter(|&y| y != x));
            gainers.sort_unstable();
            gainers.dedup();
            self.collect_loser(x);
            let raise = self.rep_less[x] - self.rep[x];
            for &y in &gainers {
                self.collect_gainer(y);
                let mut value = 0;
                let mut allowed = true;
                for &h in &self.loser.touched {
                    let mut l = self.after_recount(h, raise);
                    if h == a {
                        l = l + self.rep_more[y] - self.rep_less[x];
                    } else if l <= self.load[h] {
                        continue;
                    }
                    allowed &= l < peak;
                    value = value.max(l);
                }
                if allowed {
                    self.offer(best, peak, value, || self.dm(a, x, a, y), Move::Recount { j, expert: y });
                }
            }
        }

        // (2) An expert on `a` gains a replica in a slot elsewhere, taken from an expert with
        // several replicas.
        let multi: Vec<usize> = (0..n).filter(|&x| self.count[x] >= 2).collect();
        for &y in &on_a_experts {
            self.collect_gainer(y);
            let a_after = peak - self.gainer.get(a);
            if a_after >= peak || best.is_some_and(|b| a_after > b.cost) {
                continue;
            }
            for &x in multi.iter().filter(|&&x| x != y) {
                self.collect_loser(x);
                let raise = self.rep_less[x] - self.rep[x];
                // `a`'s load, and the two largest raised loads over x's other GPUs.
                let mut a_val = a_after;
                let mut top = [(0 as Fixed, NIL); 2];
                for &h in &self.loser.touched {
                    let l = self.after_recount(h, raise);
                    if h == a {
                        a_val = l;
                    } else if l > self.load[h] {
                        if l > top[0].0 {
                            top = [(l, h), top[0]];
                        } else if l > top[1].0 {
                            top[1] = (l, h);
                        }
                    }
                }
                if a_val >= peak || best.is_some_and(|b| a_val > b.cost) {
                    continue;
                }
                let mut s = self.head[x];
                while s != NIL {
                    let g = s / spr;
                    if g != a {
                        let lg = self.after_recount(g, raise) + self.rep_more[y] - self.rep_less[x];
                        let others = if top[0].1 == g { top[1].0 } else { top[0].0 };
                        let value = if lg > self.load[g] { a_val.max(others).max(lg) } else { a_val.max(others) };
                        if lg < peak {
                            self.offer(best, peak, value, || self.dm(g, x, g, y), Move::Recount { j: s, expert: y });
                        }
                    }
                    s = self.next[s];
                }
            }
        }
    }

    /// Slot `s` now holds expert `e`: relinks the expert lists and counts the copies moved.
    fn relink(&mut self, s: usize, e: usize) {
        let old = self.slot_expert[s];
        let g = s / self.spr;
        if self.prev.is_some() {
            self.moved = (self.moved as i64 + self.dm(g, old, g, e)) as usize;
            if !self.copies_now.is_empty() {
                let n = self.weight.len();
                self.copies_now[g * n + old] -= 1;
                self.copies_now[g * n + e] += 1;
            }
        }
        let (nx, bk) = (self.next[s], self.back[s]);
        if bk == NIL {
            self.head[old] = nx;
        } else {
            self.next[bk] = nx;
        }
        if nx != NIL {
            self.back[nx] = bk;
        }
        self.back[s] = NIL;
        self.next[s] = self.head[e];
        if self.head[e] != NIL {
            self.back[self.head[e]] = s;
        }
        self.head[e] = s;
        self.slot_expert[s] = e;
    }

    /// Applies a move.
    fn apply(&mut self, mv: Move) {
        let spr = self.spr;
        match mv {
            Move::Swap { i, j } => {
                let (x, z) = (self.slot_expert[i], self.slot_expert[j]);
                let (ri, rj) = (self.slot_rep[i], self.slot_rep[j]);
                let (a, b) = (i / spr, j / spr);
                let (la, lb) = (self.load[a], self.load[b]);
                self.load[a] = la - ri + rj;
                self.load[b] = lb - rj + ri;
                self.reorder(a, la);
                self.reorder(b, lb);
                self.relink(i, z);
                self.relink(j, x);
                self.slot_rep[i] = rj;
                self.slot_rep[j] = ri;
            }
            Move::Recount { j, expert: y } => {
                let x = self.slot_expert[j];
                // Take every replica of x and y out of the loads, change the counts, put back;
                // then move the touched GPUs' keys in the order (their loads before: `touched`).
                let mut touched = std::mem::take(&mut self.touched);
                touched.clear();
                for e in [x, y] {
                    let mut s = self.head[e];
                    while s != NIL {
                        let g = s / spr;
                        if !touched.iter().any(|&(h, _)| h == g) {
                            touched.push((g, self.load[g]));
                        }
                        self.load[g] -= self.slot_rep[s];
                        s = self.next[s];
                    }
                }
                self.relink(j, y);
                self.count[x] -= 1;
                self.count[y] += 1;
                for e in [x, y] {
                    self.set_rep(e);
                    let r = self.rep[e];
                    let mut s = self.head[e];
                    while s != NIL {
                        self.slot_rep[s] = r;
                        self.load[s / spr] += r;
                        s = self.next[s];
                    }
                }
                for &(g, before) in &touched {
                    self.reorder(g, before);
                }
                self.touched = touched;
            }
        }
    }

    /// Applies the best allowed move on the peak GPU until none is left or the budget is spent,
    /// and returns the final `(score, slot_expert)`.
    ///
    /// With a previous placement the search then goes back to the state of lowest
    /// [`Search::score`] along the way (the earliest among equals, so the start when nothing
    /// pays): lowering the peak can take several moves (several GPUs share it), and only the
    /// whole sequence pays. It also stops once even a perfect balance (`lower`) could not pay
    /// for the copies already moved.
    pub(super) fn run(mut self) -> (Fixed, Vec<usize>) {
        // Moves applied, each with the inverse that undoes it, and how many the best state had.
        let mut log: Vec<Move> = Vec::new();
        let (mut best_score, mut best_len) = (self.score(), 0);
        // A peak within 1/512 of the lower bound is good enough: the last small gains cost the
        // most search, and with a previous placement they would move copies for nothing.
        let good_enough = self.lower.saturating_add(self.lower / 512);
        while self.moves_left > 0 {
            let (a, peak) = self.peak();
            if peak <= good_enough {
                break;
            }
            let mut best = None;
            self.best_swap(a, peak, &mut best);
            if best.is_none() {
                self.best_recount(a, peak, &mut best);
            }
            let Some(b) = best else { break };
            let undo = match b.mv {
                Move::Swap { .. } => b.mv,
                Move::Recount { j, .. } => Move::Recount { j, expert: self.slot_expert[j] },
            };
            self.apply(b.mv);
            self.moves_left -= 1;
            if self.prev.is_none() {
                continue;
            }
            log.push(undo);
            let now = self.score();
            if now < best_score {
                (best_score, best_len) = (now, log.len());
            }
            if self.lower.saturating_add(self.per_copy.saturating_mul(self.moved as u64)) >= best_score.min(self.rival)
            {
                break;
            }
        }
        #[cfg(test)]
        self.check();
        // Undo the moves after the best state, last first: a swap undoes itself, and a recount of
        // slot j from x to y is undone by one from y (which has at least two replicas) back to x.
        for undo in log.drain(best_len..).rev() {
            self.apply(undo);
        }
        #[cfg(test)]
        self.check();
        (self.score(), self.slot_expert)
    }

    /// Checks the bookkeeping: loads, counts, lists, order and copies moved agree.
    #[cfg(test)]
    fn check(&self) {
        let n = self.weight.len();
        let mut count = vec![0usize; n];
        let mut load = vec![0 as Fixed; self.load.len()];
        for (s, &e) in self.slot_expert.iter().enumerate() {
            count[e] += 1;
            load[s / self.spr] += self.rep[e];
            assert_eq!(self.slot_rep[s], self.rep[e]);
        }
        assert_eq!(count, self.count);
        assert_eq!(load, self.load);
        for (e, &c) in count.iter().enumerate() {
            assert_eq!(self.rep[e], per_replica(self.weight[e], c));
            let mut k = 0;
            let mut s = self.head[e];
            while s != NIL {
                assert_eq!(self.slot_expert[s], e);
                k += 1;
                s = self.next[s];
            }
            assert_eq!(k, c);
        }
        let mut order: Vec<u128> = load.iter().enumerate().map(|(g, &l)| key(l, g)).collect();
        order.sort_unstable();
        assert_eq!(order, self.order);
        if let Some(p) = self.prev {
            assert_eq!(self.moved, moved_copies(&self.slot_expert, p, self.spr, n));
            let fresh = Search::new(self.weight, self.spr, self.slot_expert.clone(), Some(p), 0, 0);
            assert_eq!(fresh.copies_now, self.copies_now);
        }
    }
}

/// Copies of `slot_expert [num_slots]` that `prev [num_slots]` does not have on the same GPU
/// (a multiset difference per GPU, as [`super::metrics::copies_moved`]); `num_local` experts.
pub(super) fn moved_copies(slot_expert: &[usize], prev: &[Option<usize>], spr: usize, num_local: usize) -> usize {
    let mut have = vec![0u32; num_local];
    let mut moved = 0;
    for (new, old) in slot_expert.chunks(spr).zip(prev.chunks(spr)) {
        for e in old.iter().flatten() {
            have[*e] += 1;
        }
        for &e in new {
            if have[e] > 0 {
                have[e] -= 1;
            } else {
                moved += 1;
            }
        }
        for e in old.iter().flatten() {
            have[*e] = 0;
        }
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::splitmix64;

    /// Random searches, with and without a previous placement, keep their bookkeeping exact and
    /// never raise the peak.
    #[test]
    fn bookkeeping_stays_exact() {
        for seed in 0..40u64 {
            let r = |k: u64| splitmix64(seed * 1000 + k);
            let n = 4 + (r(0) % 20) as usize;
            let spr = 1 + (r(1) % 6) as usize;
            let gpus = 1 + (r(2) % 6) as usize;
            let m = (n.div_ceil(spr) + (r(3) % 3) as usize) * spr;
            let m = m.max(spr * gpus.max(n.div_ceil(spr)));
            let weight: Vec<u64> = (0..n).map(|e| r(10 + e as u64) % (1 + (r(4) % 1000))).collect();
            let start: Vec<usize> =
                (0..m).map(|s| if s < n { s } else { (r(100 + s as u64) % n as u64) as usize }).collect();
            let prev: Vec<Option<usize>> =
                (0..m).map(|s| (r(200 + s as u64) % 5 != 0).then(|| (r(300 + s as u64) % n as u64) as usize)).collect();
            for p in [None, Some(&prev[..])] {
                let per_copy = if p.is_some() { (r(5) % 1000) << 20 } else { 0 };
                let search = Search::new(&weight, spr, start.clone(), p, per_copy, 0);
                search.check();
                let before = search.score();
                // run() checks the bookkeeping after the descent and after the undo.
                let (score, slots) = search.run();
                assert!(score <= before, "seed {seed}: the score rose");
                let again = Search::new(&weight, spr, slots, p, per_copy, 0);
                assert_eq!(again.score(), score, "seed {seed}: the returned score is not the placement's");
            }
        }
    }

    #[test]
    fn moved_copies_is_a_multiset_difference_per_gpu() {
        let prev = [Some(0), Some(1), Some(2), None];
        assert_eq!(moved_copies(&[1, 0, 2, 3], &prev, 2, 4), 1);
        assert_eq!(moved_copies(&[0, 0, 2, 2], &prev, 2, 4), 2);
    }
}
