// Expert-weight kernels for eplb's GPU executor. The pattern is the same pure function of
// (layer, logical expert, 8-byte word) as the CPU path's `engine::pattern_word`.
//
// This file is compiled to PTX by `cargo run --example gen_ptx` (NVRTC 12.0, arch compute_70:
// Volta and every later GPU JIT-compiles it) into src/gpu/kernels.ptx, which the binary embeds
// and the CUDA driver JIT-compiles at start-up, so the GPU machines need no NVRTC library.

typedef unsigned long long u64;

__device__ __forceinline__ u64 splitmix64(u64 z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

__device__ __forceinline__ u64 pattern_word(u64 layer, u64 expert, u64 word) {
    return splitmix64(splitmix64((layer << 32) ^ expert) ^ word);
}

// dst[i] = pattern_word(layer, expert, i) for i < words.
extern "C" __global__ void fill_pattern(u64* dst, u64 words, u64 layer, u64 expert) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride) {
        dst[i] = pattern_word(layer, expert, i);
    }
}

// *wrong += number of bytes of src[0..words) that differ from the pattern of (layer, expert).
extern "C" __global__ void count_wrong(const u64* src, u64 words, u64 layer, u64 expert, u64* wrong) {
    const u64 low7 = 0x7f7f7f7f7f7f7f7fULL;
    u64 stride = (u64)gridDim.x * blockDim.x;
    u64 local = 0;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride) {
        u64 d = src[i] ^ pattern_word(layer, expert, i);
        // High bit of each byte of z is set where that byte of d is zero.
        u64 z = ~((((d & low7) + low7) | d) | low7);
        local += 8 - __popcll(z);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        local += __shfl_down_sync(0xffffffffu, local, offset);
    }
    if ((threadIdx.x & 31) == 0 && local != 0) {
        atomicAdd(wrong, local);
    }
}

// *sum += sum over i < words of splitmix64(src[i] ^ splitmix64(i)) (mod 2^64): the checksum a
// sender computes over an expert it sends and its receiver over the bytes that landed. A sum of
// per-word terms, so the result does not depend on the launch shape or the order of the adds.
extern "C" __global__ void checksum(const u64* src, u64 words, u64* sum) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    u64 local = 0;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride) {
        local += splitmix64(src[i] ^ splitmix64(i));
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        local += __shfl_down_sync(0xffffffffu, local, offset);
    }
    if ((threadIdx.x & 31) == 0) {
        atomicAdd(sum, local);
    }
}
