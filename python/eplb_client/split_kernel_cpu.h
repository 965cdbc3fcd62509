// The CPU shim of split_kernel.cu: the CUDA names it uses, for a C compiler, so that the kernel's
// logic is tested without a GPU (python/tests/test_split_kernel.py compiles it with
// `cc -O2 -shared -fPIC -x c`). A block runs as one thread (blockDim 1): every parallel section
// of the kernel is a loop `for (i = threadIdx.x; i < n; i += blockDim.x)` whose result does not
// depend on the order of its iterations, __syncthreads is a no-op, atomics are plain updates.
#ifndef SPLIT_KERNEL_CPU_H
#define SPLIT_KERNEL_CPU_H

#include <stdlib.h>
#include <string.h>

typedef struct {
    unsigned int x, y, z;
} split_dim3;

static split_dim3 blockIdx, threadIdx, blockDim, gridDim;

#define SPLIT_EXTERN_C
#define SPLIT_WS_FN static inline
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() ((void)0)

// The block's dynamic shared memory: set by split_layers_cpu before each block.
static unsigned char* split_smem;

static inline int atomicAdd(int* p, int v) {
    int old = *p;
    *p = old + v;
    return old;
}

static inline int atomicMin(int* p, int v) {
    int old = *p;
    if (v < old) *p = v;
    return old;
}

#endif
