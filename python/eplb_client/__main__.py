"""Small tools around the regions (read-only except ``cleanup``):

    python -m eplb_client status NAME --ranks N     # engine step, states, pids, epochs of each rank
    python -m eplb_client cleanup NAME              # remove regions of exactly NAME whose engine is gone
                                                    # (crash leftovers; never blocks on a FIFO)
    python -m eplb_client wait-step NAME RANK STEP [--timeout S]
        # wait until engine rank RANK has completed STEP steps; print the sidecar pid beside it
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from .region import ContractError, EngineRegion, cleanup


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eplb_client", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status")
    st.add_argument("name")
    st.add_argument("--ranks", type=int, default=1)
    cl = sub.add_parser("cleanup")
    cl.add_argument("name")
    ws = sub.add_parser("wait-step")
    ws.add_argument("name")
    ws.add_argument("rank", type=int)
    ws.add_argument("step", type=int)
    ws.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    if args.cmd == "cleanup":
        try:
            removed = cleanup(args.name)
        except ContractError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for path in removed:
            print(f"removed {path}")
        return 0
    reg: Optional[EngineRegion]
    if args.cmd == "status":
        for r in range(args.ranks):
            try:
                reg = EngineRegion.attach(args.name, r)
            except FileNotFoundError:
                print(f"rank {r}: no region")
                continue
            except (ContractError, OSError) as e:
                print(f"rank {r}: {e}")
                continue
            print(f"rank {r}: engine_step {reg.engine_step} engine_state {reg.engine_state} sidecar_pid {reg.sidecar_pid} "
                  f"sidecar_state {reg.sidecar_state} table_fault {reg.table_fault} epochs {reg.placement().epoch.tolist()}")
            reg.close()
        return 0
    deadline = time.monotonic() + args.timeout
    reg = None
    while time.monotonic() < deadline:
        try:
            reg = reg or EngineRegion.attach(args.name, args.rank)
        except (FileNotFoundError, ContractError, OSError):
            time.sleep(0.01)
            continue
        if reg.engine_step >= args.step and reg.sidecar_pid:
            print(reg.sidecar_pid)
            return 0
        if reg.engine_state >= 2:
            break
        time.sleep(0.002)
    print(f"error: engine rank {args.rank} of {args.name} did not reach step {args.step} with a sidecar attached",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
