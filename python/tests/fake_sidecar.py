"""A small sidecar in Python that follows docs/engine-contract.md (contract 2) from the sidecar's
side, for the client's tests (the real one is ``eplb-worker run --engine shm:NAME``). It reads
and writes the engines' tensors only through each region's tensor table: an expert's bytes are
row s of every per-expert tensor, in table order; global tensors are never written.

One process attaches to the regions of all N engine ranks of one host, so it needs no MPI: it
does the sidecar ranks' agreements (max engine_step, min/max of the acks) by looking at every
region. Every ``--every`` engine steps it moves one layer (round robin) to a new placement (a
deterministic shuffle of the layer's row, every expert kept), staging each changed local slot
from a slot of any rank that holds the expert now, verifying every staged expert against a
checksum of the bytes it sent, then posting "apply before step S" on every rank and waiting for
the answers.

Faults, to test the engine's invariants (on move --fault-at-move; the moves before it are healthy):
  --die-after-posting K     post on ranks < K only, then SIGKILL itself
  --die-mid-post            leave rank 0's cmd_seq odd (a post cut short), then SIGKILL itself
  --die-mid-stage           write half of a staged expert on rank 0, then SIGKILL itself
  --write-live              write into rank 0's live weights directly (breaks the contract: the
                            engine's output check must catch it)
  (SIGSTOP / SIGKILL from outside: the tests send them.)

Exit codes: 0 every engine rank finished; 1 an engine rank died or stopped (the message names
it), or the engines disagreed; 2 the regions never appeared.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
from typing import List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from eplb_client import region as R  # noqa: E402
from eplb_client.region import EngineRegion, check_phy2log  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--every", type=int, default=5, help="engine steps between two layer moves")
    p.add_argument("--lead", type=int, default=2)
    p.add_argument("--max-commits", type=int, default=1 << 30)
    p.add_argument("--attach-timeout", type=float, default=60.0)
    p.add_argument("--engine-timeout", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fault-at-move", type=int, default=1, help="the faults below hit this move (1: the first)")
    p.add_argument("--die-after-posting", type=int)
    p.add_argument("--die-mid-post", action="store_true")
    p.add_argument("--die-mid-stage", action="store_true")
    p.add_argument("--write-live", action="store_true")
    p.add_argument("--log", help="append one line per command outcome")
    return p.parse_args(argv)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class EngineGone(Exception):
    pass


# A command an engine finished without seeing (the worker's name for it).
FINISHED_UNANSWERED = 5


class FakeSidecar:
    def __init__(self, args):
        self.args = args
        self.regions: List[EngineRegion] = []
        deadline = time.monotonic() + args.attach_timeout
        for r in range(args.ranks):
            while True:
                try:
                    self.regions.append(EngineRegion.attach(args.name, r))
                    break
                except FileNotFoundError:
                    if time.monotonic() > deadline:
                        print(f"fake_sidecar: region {R.region_path(args.name, r)} did not appear", file=sys.stderr)
                        sys.exit(2)
                    time.sleep(0.01)
        for reg in self.regions:
            reg._h[R._W_SIDECAR_PID] = os.getpid()
            reg._h[R._W_SIDECAR_STATE] = R.SIDECAR_ATTACHED
        r0 = self.regions[0]
        self.L, self.S, self.E = r0.num_layers, r0.slots_per_rank, r0.num_logical
        self.phy2log = r0.placement().phy2log.copy()  # the sidecar's own view
        self.epoch = r0.placement().epoch.copy()
        self.cmd_id = 0
        self.rng = np.random.default_rng(args.seed)
        self.commits = 0
        self.moves = 0
        self.faulty = False

    # -- helpers --
    def check_engines(self) -> None:
        now = time.monotonic_ns()
        for reg in self.regions:
            h = reg._h
            state = int(h[R._W_ENGINE_STATE])
            if state == R.ENGINE_FINISHED:
                continue
            pid = int(h[R._W_ENGINE_PID])
            if state == R.ENGINE_FAILED or not R._pid_alive(pid):
                raise EngineGone(f"engine rank {reg.rank} (pid {pid}) died")
            if now - int(h[R._W_ENGINE_HEARTBEAT]) > self.args.engine_timeout * 1e9:
                raise EngineGone(f"engine rank {reg.rank} (pid {pid}) stopped: no heartbeat for {self.args.engine_timeout} s")

    def finished(self) -> bool:
        return all(int(reg._h[R._W_ENGINE_STATE]) == R.ENGINE_FINISHED for reg in self.regions)

    def engine_step(self) -> int:
        return max(int(reg._h[R._W_ENGINE_STEP]) for reg in self.regions)

    def new_row(self, layer: int) -> np.ndarray:
        old = self.phy2log[layer]
        while True:
            row = old.copy()
            # Shuffle a few slots' experts and re-point one redundant slot: every expert kept.
            idx = self.rng.choice(len(row), size=min(len(row), 6), replace=False)
            row[idx] = row[self.rng.permutation(idx)]
            if not check_phy2log(row, self.E) and not np.array_equal(row, old):
                return row.astype(np.int32)

    def stage(self, layer: int, row: np.ndarray) -> List[np.ndarray]:
        """Stages the changed local slots of every rank; returns the copy masks. Verifies each
        staged expert against the checksum of the bytes sent."""
        old = self.phy2log[layer]
        masks = []
        for reg in self.regions:
            r, S = reg.rank, self.S
            mask = np.zeros(S, np.uint8)
            for s in range(S):
                e = int(row[r * S + s])
                if e == int(old[r * S + s]):
                    continue
                src = int(np.flatnonzero(old == e)[0])  # a slot that holds e now
                sent = self.regions[src // S].read_expert(layer, src % S)
                digest = hashlib.blake2b(sent, digest_size=16).digest()
                if self.faulty and self.args.die_mid_stage and r == 0:
                    reg.write_expert(self.L, s, sent[: len(sent) // 2])
                    die()
                reg.write_expert(self.L, s, sent)
                if hashlib.blake2b(reg.read_expert(self.L, s), digest_size=16).digest() != digest:
                    raise RuntimeError(f"rank {r} slot {s}: staged bytes do not match the checksum")
                mask[s] = 1
            masks.append(mask)
        return masks

    def post(self, reg: EngineRegion, cmd_id: int, layer: int, S_step: int, epoch: int, row, mask) -> None:
        h = reg._h
        seq = int(h[R._W_CMD_SEQ])
        h[R._W_CMD_SEQ] = seq + 1
        if self.faulty and self.args.die_mid_post:
            die()
        h[R._W_CMD_ID] = cmd_id
        h[R._W_CMD_LAYER] = layer
        h[R._W_CMD_APPLY_STEP] = S_step
        h[R._W_CMD_EPOCH] = epoch
        reg._cmd_row[:] = row
        reg._cmd_mask[:] = mask
        h[R._W_CMD_SEQ] = seq + 2

    def wait_acks(self, cmd_id: int) -> List[int]:
        while True:
            acks = [int(reg._h[R._W_ACK_ID]) for reg in self.regions]
            if all(a == cmd_id for a in acks):
                return [int(reg._h[R._W_ACK_RESULT]) for reg in self.regions]
            self.check_engines()
            if self.finished():
                # An engine that finished answers a command pending at its finish (cancelled);
                # one posted while it finished may stay unanswered (FINISHED_UNANSWERED, as the
                # worker has it): no rank can have applied it, since that rank took part in no
                # agreement on it.
                acks = [int(reg._h[R._W_ACK_ID]) for reg in self.regions]
                if all(a == cmd_id for a in acks):
                    continue
                results = [int(reg._h[R._W_ACK_RESULT]) if a == cmd_id else FINISHED_UNANSWERED
                           for reg, a in zip(self.regions, acks)]
                if R.ACK_APPLIED in results:
                    raise RuntimeError(f"command {cmd_id} applied on some ranks, unanswered on others: {results}")
                return results
            time.sleep(0.0005)

    def move_layer(self, layer: int) -> None:
        self.moves += 1
        self.faulty = self.moves == self.args.fault_at_move
        row = self.new_row(layer)
        masks = self.stage(layer, row)
        if self.faulty and self.args.write_live:
            reg0 = self.regions[0]
            reg0.rows(layer, reg0.tensor_names[reg0._per_expert[0]])[0] ^= 0xFF
        for reg in self.regions:  # the contract: table_fault checked after staging, before posting
            if reg.table_fault:
                raise EngineGone(f"engine rank {reg.rank}: table_fault {reg.table_fault} (a tensor was re-allocated)")
        lead = self.args.lead
        for _try in range(5):
            self.cmd_id += 1
            S_step = self.engine_step() + lead
            epoch = int(self.epoch[layer]) + 1
            for i, reg in enumerate(self.regions):
                if self.faulty and self.args.die_after_posting is not None and i >= self.args.die_after_posting:
                    die()
                self.post(reg, self.cmd_id, layer, S_step, epoch, row, masks[i])
            results = self.wait_acks(self.cmd_id)
            self.note(f"cmd {self.cmd_id} layer {layer} step {S_step} results {results}")
            if min(results) == max(results) == R.ACK_APPLIED:
                self.phy2log[layer] = row
                self.epoch[layer] = epoch
                self.commits += 1
                return
            if R.ACK_APPLIED in results:
                raise RuntimeError(f"command {self.cmd_id}: mixed outcome {results}")
            if self.finished():
                return
            lead *= 2

    def note(self, line: str) -> None:
        if self.args.log:
            with open(self.args.log, "a") as f:
                f.write(line + "\n")

    def run(self) -> int:
        layer = 0
        last = 0
        try:
            while not self.finished():
                self.check_engines()
                step = self.engine_step()
                if step - last >= self.args.every and self.commits < self.args.max_commits:
                    last = step
                    self.move_layer(layer)
                    layer = (layer + 1) % self.L
                time.sleep(0.001)
        except EngineGone as e:
            # Every region stays mapped here, also those their engines unlinked: one placement?
            epochs = {tuple(reg.placement().epoch.tolist()) for reg in self.regions}
            rows = {reg.placement().phy2log.tobytes() for reg in self.regions}
            same = "the same on every rank" if len(epochs) == 1 and len(rows) == 1 else "DIFFERENT across ranks"
            print(f"fake_sidecar: error: {e}; stopping; live placements {same}", file=sys.stderr)
            for reg in self.regions:
                reg._h[R._W_SIDECAR_STATE] = R.SIDECAR_FAILED
            return 1
        for reg in self.regions:
            reg._h[R._W_SIDECAR_STATE] = R.SIDECAR_EXITED_OK
        print(f"fake_sidecar: {self.commits} layers committed")
        return 0


if __name__ == "__main__":
    sys.exit(FakeSidecar(parse_args()).run())
