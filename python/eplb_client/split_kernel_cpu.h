// The CPU shim of split_kernel.cu: the CUDA names it uses, for a C compiler, so that the kernel's
// logic is tested without a GPU (python/tests/test_split_kernel.py compiles it with
// `cc -O2 -shared -fPIC -x c`). A block runs as one thread (blockDim 1): every parallel section
// of the kernel is a loop `for (i = threadIdx.x; i < n; i += blockDim.x)` whose result does not
// depend on the order of its iterations, __syncthreads is a no-op, atomics are plain updates.
//
// With -DSPLIT_CPU_THREADS (and -pthread), a block runs as blockDim.x POSIX threads instead:
// __syncthreads is a barrier of them, __shared__ variables are shared by them (statics),
// threadIdx is per thread and the atomics are atomic: the tests run the kernel's parallel sections
// with real concurrency (split_layers_cpu_threads), as on a GPU.
#ifndef SPLIT_KERNEL_CPU_H
#define SPLIT_KERNEL_CPU_H

#include <stdlib.h>
#include <string.h>

typedef struct {
    unsigned int x, y, z;
} split_dim3;

#ifdef SPLIT_CPU_THREADS
#include <pthread.h>
static split_dim3 blockIdx, blockDim, gridDim;
static __thread split_dim3 threadIdx;
static pthread_barrier_t split_barrier;
#define __syncthreads() ((void)pthread_barrier_wait(&split_barrier))
static inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline int atomicMin(int* p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
#else
static split_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __syncthreads() ((void)0)
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

#define SPLIT_EXTERN_C
#define SPLIT_WS_FN static inline
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

// The block's dynamic shared memory: set by split_layers_cpu before each block.
static unsigned char* split_smem;

#endif
