"""The cross-language golden test (issue 21): one scenario (``golden_region.py``'s docstring),
written by every writer, read by every reader, every field of contract 2 compared.

Writers: the pure-Python client; the C program's ``raw`` writer (every byte by hand, from the
generated header's structs and constants); libeplb_client through its C API (the C program's
``capi``); the Python client on the compiled core (``backend="native"``). Readers: Python's
(:func:`golden_region.dump`), C's (``region_golden dump``), the worker's Rust reader
(``examples/region_golden.rs``). Every reader must print the same dump of a region, and every
writer's region must have the same dump and the same bytes, but for ``engine_pid`` and
``engine_heartbeat_ns`` (a process id and a clock). A second test checks that the Python
client's constants and offsets are the generated header's and the Rust crate's.

Needs gcc, cargo and the library (``cargo build --release``); builds the C program and the Rust
example itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import golden_region as G
import pytest

from eplb_client import region as R

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "client" / "include" / "eplb_client.h"
RELEASE = ROOT / "target" / "release"
MASKED = {("header", "engine_pid"), ("header", "engine_heartbeat_ns")}
# engine_pid (8 bytes at 120) and engine_heartbeat_ns (8 bytes at 136): a process and a clock.
MASKED_BYTES = set(range(120, 128)) | set(range(136, 144))
SCENARIOS = ("host", "ipc")


def _run(cmd: List[str], **kw: Any) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p.stdout


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """The C program (built with gcc against the generated header and the library) and the Rust
    reader (cargo). Missing gcc or cargo fails the test: CI has both."""
    gcc, cargo = shutil.which("gcc") or shutil.which("cc"), shutil.which("cargo")
    assert gcc, "a C compiler (gcc or cc) is needed for the golden test (apt-get install gcc)"
    assert cargo, "cargo is needed for the golden test"
    assert HEADER.is_file(), f"{HEADER} is missing (the generated C header)"
    _run([cargo, "build", "--release", "--locked", "-p", "eplb-client", "--lib"], cwd=ROOT)
    _run([cargo, "build", "--release", "--locked", "--example", "region_golden"], cwd=ROOT)
    lib = RELEASE / "libeplb_client.so"
    assert lib.is_file(), f"{lib} was not built"
    out = tmp_path_factory.mktemp("golden")
    c_bin = out / "region_golden_c"
    _run([gcc, "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{HEADER.parent}",
          str(ROOT / "tests" / "golden" / "region_golden.c"), f"-L{RELEASE}", "-leplb_client",
          f"-Wl,-rpath,{RELEASE}", "-o", str(c_bin)])
    return {"c": c_bin, "rust": RELEASE / "examples" / "region_golden", "dir": out}


def _write(tools: Dict[str, Path], writer: str, scenario: str) -> Path:
    out = tools["dir"] / f"{writer}-{scenario}.bin"
    if not out.exists():
        if writer in ("raw", "capi"):
            _run([str(tools["c"]), writer, scenario, str(out)])
        else:
            backend = {"python": "python", "python-native": "native"}[writer]
            env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
            _run([sys.executable, str(Path(__file__).parent / "golden_region.py"), "write", scenario, str(out),
                  "--backend", backend], env=env)
    return out


def _read(tools: Dict[str, Path], reader: str, path: Path) -> Dict[str, Any]:
    if reader == "python":
        return json.loads(json.dumps(G.dump(str(path))))
    return json.loads(_run([str(tools[reader]), "dump", str(path)]))


def _diff(a: Any, b: Any, at: str = "") -> List[str]:
    if type(a) is not type(b):
        return [f"{at}: {a!r} != {b!r}"]
    if isinstance(a, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{at}.{k}")]
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{at}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{at}[{i}]")]
    return [] if a == b else [f"{at}: {a!r} != {b!r}"]


def _masked(d: Dict[str, Any]) -> Dict[str, Any]:
    d = json.loads(json.dumps(d))
    for section, key in MASKED:
        d[section][key] = "masked"
    return d


WRITERS = ("python", "raw", "capi", "python-native")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_reader_reads_every_writer_alike(tools: Dict[str, Path], scenario: str) -> None:
    dumps: Dict[str, Dict[str, Any]] = {}
    for writer in WRITERS:
        path = _write(tools, writer, scenario)
        by_reader = {reader: _read(tools, reader, path) for reader in ("python", "c", "rust")}
        for reader in ("c", "rust"):
            diff = _diff(by_reader["python"], by_reader[reader])
            assert not diff, f"{writer}'s {scenario} region: the {reader} reader disagrees with Python's:\n" + "\n".join(diff[:20])
        dumps[writer] = by_reader["python"]
    ref = _masked(dumps["python"])
    for writer in WRITERS[1:]:
        diff = _diff(ref, _masked(dumps[writer]))
        assert not diff, f"{scenario}: {writer}'s region differs from the Python client's:\n" + "\n".join(diff[:20])
    # The fields a dump must show, so that the comparison covers them (not vacuous).
    d = dumps["python"]
    assert d["reserved_nonzero_bytes"] == 0
    assert d["header"]["engine_step"] == G.STEPS and d["epochs"] == [0, 1, 0]
    assert len(d["steps"]) == G.RING and d["steps"][-1]["step"] == G.STEPS - 1
    assert d["header"]["sidecar_pid"] == G.SIDECAR_PID and d["header"]["table_fault"] == (0 if scenario == "host" else 8)
    assert (d["mailbox"]["ack_result"], d["mailbox"]["cmd_id"]) == ((2, 5) if scenario == "host" else (4, 3))
    assert (d["ipc"] is None) == (scenario == "host")
    # And byte for byte, but for the process id and the clock.
    ref_bytes = _write(tools, "python", scenario).read_bytes()
    for writer in WRITERS[1:]:
        data = _write(tools, writer, scenario).read_bytes()
        assert len(data) == len(ref_bytes), f"{scenario}: {writer}'s region has {len(data)} bytes, Python's {len(ref_bytes)}"
        bad = [i for i, (x, y) in enumerate(zip(data, ref_bytes)) if x != y and i not in MASKED_BYTES]
        assert not bad, f"{scenario}: {writer}'s region differs from Python's at bytes {bad[:16]}"


def _header_defines() -> Dict[str, int]:
    """``#define EPLB_NAME value`` of the generated header, as integers."""
    out: Dict[str, int] = {}
    for m in re.finditer(r"^#define (EPLB_\w+) \(?([^\n]+?)\)?\s*$", HEADER.read_text(), re.M):
        v = re.sub(r"\((u?int\d+_t|size_t)\)", "", m.group(2)).strip().strip("()")
        v = re.sub(r"(?<=[0-9a-fA-F])([uU][lL]{0,2}|[lL]{1,2}[uU]?)$", "", v)
        try:
            out[m.group(1)] = int(v, 0)
        except ValueError:
            pass
    return out


def test_python_layout_is_the_headers_and_rusts(tools: Dict[str, Path]) -> None:
    defines = _header_defines()
    c = json.loads(_run([str(tools["c"]), "layout"]))
    rust = json.loads(_run([str(tools["rust"]), "layout"]))
    py_consts = {
        "MAGIC": R.MAGIC, "VERSION": R.VERSION, "MINOR_VERSION": R.MINOR_VERSION, "HEADER_BYTES": R.HEADER_BYTES,
        "TENSOR_ENTRY_BYTES": R.TENSOR_ENTRY_BYTES, "MAX_TENSORS": R.MAX_TENSORS, "MIN_RING_LEN": R.MIN_RING_LEN,
        "WEIGHTS_HOST": R.WEIGHTS_HOST, "WEIGHTS_CUDA_IPC": R.WEIGHTS_CUDA_IPC, "COUNTS_LOCAL": R.COUNTS_LOCAL,
        "COUNTS_PHYSICAL": R.COUNTS_PHYSICAL, "KIND_EXPERT": R.KIND_EXPERT, "KIND_GLOBAL": R.KIND_GLOBAL,
        "ENGINE_STARTING": R.ENGINE_STARTING, "ENGINE_RUNNING": R.ENGINE_RUNNING,
        "ENGINE_FINISHED": R.ENGINE_FINISHED, "ENGINE_FAILED": R.ENGINE_FAILED, "SIDECAR_NONE": R.SIDECAR_NONE,
        "SIDECAR_ATTACHED": R.SIDECAR_ATTACHED, "SIDECAR_EXITED_OK": R.SIDECAR_EXITED_OK,
        "SIDECAR_FAILED": R.SIDECAR_FAILED, "ACK_APPLIED": R.ACK_APPLIED, "ACK_CANCELLED": R.ACK_CANCELLED,
        "ACK_MISSED": R.ACK_MISSED, "ACK_REJECTED": R.ACK_REJECTED, "PHASE_PREFILL": R.PHASES["prefill"],
        "PHASE_DECODE": R.PHASES["decode"], "PHASE_MIXED": R.PHASES["mixed"], "IPC_HANDLES": R.IPC_HEAD_BYTES,
        "IPC_ENTRY_BYTES": R.IPC_ENTRY_BYTES, "IPC_MAX_HANDLES": R.IPC_MAX_HANDLES,
    }
    for k, v in py_consts.items():
        assert defines.get(f"EPLB_{k}") == v, f"EPLB_{k}: the header says {defines.get(f'EPLB_{k}')}, Python {v}"
        assert c[k] == v, f"EPLB_{k}: the C program sees {c[k]}, Python {v}"
        rk = {"IPC_HANDLES": "IPC_HEAD_BYTES", "SIDECAR_NONE": None}.get(k, k)
        if rk:
            assert rust[rk] == v, f"{k}: Rust says {rust[rk]}, Python {v}"
    # Python's header layout: _HEADER_FMT's field offsets, its word indices, and the entry format.
    names = list(G._HEADER_NAMES)
    offsets: Dict[str, int] = {}
    at = 0
    for name, code in zip(names, R._HEADER_FMT[1:]):
        offsets[name] = at
        at += struct.calcsize("<" + code)
    words = {"engine_pid": R._W_ENGINE_PID, "engine_step": R._W_ENGINE_STEP,
             "engine_heartbeat_ns": R._W_ENGINE_HEARTBEAT, "engine_state": R._W_ENGINE_STATE,
             "sidecar_pid": R._W_SIDECAR_PID, "sidecar_heartbeat_ns": R._W_SIDECAR_HEARTBEAT,
             "sidecar_state": R._W_SIDECAR_STATE, "table_fault": R._W_TABLE_FAULT, "cmd_seq": R._W_CMD_SEQ,
             "cmd_id": R._W_CMD_ID, "cmd_layer": R._W_CMD_LAYER, "cmd_apply_step": R._W_CMD_APPLY_STEP,
             "cmd_epoch": R._W_CMD_EPOCH, "ack_id": R._W_ACK_ID, "ack_result": R._W_ACK_RESULT,
             "ack_step": R._W_ACK_STEP}
    for name, w in words.items():
        assert offsets.setdefault(name, 8 * w) == 8 * w, name
    # minor_version, counts_kind, num_handles: the "<IIII" at 176 of EngineRegion.__init__.
    offsets.update({"minor_version": 176, "counts_kind": 180, "num_handles": 184})
    # A ring entry: words 0..4 and the counts at word 8 (EngineRegion.record, _ring_counts).
    offsets.update({"entry_seq": 0, "entry_step": 8, "entry_phase": 16, "entry_tokens": 24, "entry_moe_ns": 32,
                    "entry_counts": 64})
    assert set(offsets) == set(c["offsets"]) == set(rust["offsets"])
    for name, v in offsets.items():
        assert c["offsets"][name] == v, f"{name}: the header puts it at {c['offsets'][name]}, Python at {v}"
        assert rust["offsets"][name] == v, f"{name}: Rust puts it at {rust['offsets'][name]}, Python at {v}"
    assert c["header_struct_bytes"] == 8 * (R._W_TABLE_FAULT + 1) == struct.calcsize(R._HEADER_FMT) + 72
    entry_at, at = {}, 0
    for name, code in zip(("name", "dtype", "offset", "row_stride", "row_bytes", "rows", "kind", "reserved", "handle"),
                          ("24s", "8s", "Q", "Q", "Q", "I", "B", "B", "H")):
        entry_at[name] = at
        at += struct.calcsize("<" + code)
    assert c["table_entry"] == entry_at and c["table_entry_bytes"] == struct.calcsize(R._ENTRY_FMT) == at
    assert (c["name_field_bytes"], c["dtype_field_bytes"]) == (24, 8)
    assert sorted(R.DTYPES) == sorted(_rust_dtypes())
    assert (defines["EPLB_VERSION"], defines["EPLB_MINOR_VERSION"]) == (R.VERSION, R.MINOR_VERSION)


def _rust_dtypes() -> List[str]:
    """The contract's dtype list as the Rust layout defines it (client/src/layout.rs)."""
    text = (ROOT / "client" / "src" / "layout.rs").read_text()
    m = re.search(r"pub const DTYPES: \[&str; \d+\] =\s*\[([^\]]*)\]", text)
    assert m, "DTYPES not found in client/src/layout.rs"
    return re.findall(r'"([^"]+)"', m.group(1))
