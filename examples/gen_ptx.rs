//! Regenerates `src/gpu/kernels.ptx` from `src/gpu/kernels.cu` with NVRTC.
//!
//! NVRTC needs no GPU. On a machine without CUDA, take it from the NVIDIA wheel:
//! ```sh
//! pip download --no-deps nvidia-cuda-nvrtc-cu12==12.0.140 -d /tmp/nvrtc && unzip -o /tmp/nvrtc/*.whl -d /tmp/nvrtc/x
//! ln -sf libnvrtc.so.12 /tmp/nvrtc/x/nvidia/cuda_nvrtc/lib/libnvrtc.so
//! LD_LIBRARY_PATH=/tmp/nvrtc/x/nvidia/cuda_nvrtc/lib cargo run --example gen_ptx
//! ```
//! The PTX targets compute_70, the lowest architecture the kernels need (warp shuffles with a
//! mask, 64-bit atomics; NCCL itself needs Volta or later), with the PTX ISA 8.0 of NVRTC 12.0:
//! every driver of CUDA 12.0 or later JIT-compiles it for its GPU, Volta, Turing, Ampere, Ada,
//! Hopper and Blackwell alike. A newer NVRTC writes a newer PTX ISA that older drivers refuse.

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

fn main() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/gpu");
    let src = std::fs::read_to_string(format!("{dir}/kernels.cu")).expect("read kernels.cu");
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        eprintln!("error: libnvrtc not found; see this example's doc comment for LD_LIBRARY_PATH");
        std::process::exit(1);
    }
    let opts = CompileOptions { arch: Some("compute_70"), name: Some("kernels.cu".into()), ..Default::default() };
    let ptx = compile_ptx_with_opts(&src, opts).unwrap_or_else(|e| {
        eprintln!("error: NVRTC failed: {e:?}");
        std::process::exit(1);
    });
    let header = format!(
        "// Generated from kernels.cu by `cargo run --example gen_ptx`; source hash {:016x}\n",
        eplb::gpu::source_hash(&src)
    );
    std::fs::write(format!("{dir}/kernels.ptx"), header + &ptx.to_src()).expect("write kernels.ptx");
    println!("wrote {dir}/kernels.ptx");
}
