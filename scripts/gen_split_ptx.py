#!/usr/bin/env python3
"""Regenerates python/eplb_client/split_kernel.ptx from split_kernel.cu with NVRTC (no GPU needed).

NVRTC 12.0 from the NVIDIA wheel, as examples/gen_ptx.rs does for src/gpu/kernels.ptx:

    pip download --no-deps nvidia-cuda-nvrtc-cu12==12.0.140 -d /tmp/nvrtc && unzip -o /tmp/nvrtc/*.whl -d /tmp/nvrtc/x
    python3 scripts/gen_split_ptx.py --nvrtc /tmp/nvrtc/x/nvidia/cuda_nvrtc/lib/libnvrtc.so.12

The PTX targets compute_70 with the PTX ISA of NVRTC 12.0, so every driver of CUDA 12.0 or later
JIT-compiles it for its GPU (Volta to Blackwell); a newer NVRTC writes a newer PTX ISA that older
drivers refuse. The first line records the FNV-1a hash of the source
(python/tests/test_split_kernel.py fails when the two disagree).
"""

import argparse
import ctypes
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

from eplb_client import split_kernel  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nvrtc", default="libnvrtc.so.12", help="path of libnvrtc (12.0 for the widest driver support)")
    p.add_argument("--arch", default="compute_70")
    a = p.parse_args()
    try:
        lib = ctypes.CDLL(a.nvrtc)
    except OSError as e:
        print(f"error: {a.nvrtc} cannot be loaded ({e}); see this script's doc string", file=sys.stderr)
        return 1
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    src = open(split_kernel.SOURCE, "rb").read()

    def check(rc: int, op: str) -> None:
        if rc != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise SystemExit(f"error: {op} failed: {lib.nvrtcGetErrorString(rc).decode()}")

    prog = ctypes.c_void_p()
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"split_kernel.cu", 0, None, None), "nvrtcCreateProgram")
    opts = [f"--gpu-architecture={a.arch}".encode()]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        print(log.value.decode(errors="replace"), file=sys.stderr)
        check(rc, "nvrtcCompileProgram")
    check(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
    ptx = ctypes.create_string_buffer(size.value)
    check(lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    text = split_kernel.ptx_header(src) + ptx.value.decode()
    with open(split_kernel.PTX, "w") as f:
        f.write(text)
    print(f"wrote {split_kernel.PTX} (NVRTC {major.value}.{minor.value}, {a.arch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
