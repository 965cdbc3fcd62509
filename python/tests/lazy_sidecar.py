"""The fake sidecar with the bug real movers had (vLLM #34646, #37217; SGLang #13715): it moves
every per-expert tensor of a changed slot except one (``--skip NAME``), which stays as the slot
held it before, so the slot ends with the new expert's weights and the old expert's scales.
Nothing in the protocol fails: only the engine's checks of its outputs and applied bytes can see
it (python/tests/test_engine.py). Every other flag is fake_sidecar.py's."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fake_sidecar  # noqa: E402


class LazySidecar(fake_sidecar.FakeSidecar):
    def __init__(self, args, skip: str):
        super().__init__(args)
        self.skip = skip
        names = self.regions[0].tensor_names
        if skip not in names:
            print(f"lazy_sidecar: no tensor {skip!r} (tensors: {names})", file=sys.stderr)
            sys.exit(2)

    def stage(self, layer: int, row: np.ndarray) -> List[np.ndarray]:
        masks = super().stage(layer, row)
        for reg, mask in zip(self.regions, masks):
            staged, live = reg.rows(self.L, self.skip), reg.rows(layer, self.skip)
            for s in np.flatnonzero(mask):
                staged[s] = live[s]  # left behind: the slot keeps its old rows of this tensor
        return masks


if __name__ == "__main__":
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--skip", required=True)
    known, rest = pre.parse_known_args()
    sys.exit(LazySidecar(fake_sidecar.parse_args(rest), known.skip).run())
