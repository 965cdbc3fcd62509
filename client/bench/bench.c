/* The C client's cost to the engine a step (docs/bench/capi.md; scripts/bench_capi.sh builds and
   runs it): the shape of python/bench/bench_client.py (12 layers x 16 slots a rank, 60 experts,
   world 4, 48 KiB experts), eplb_at_step_boundary (no command; agree is the identity: the
   engine's collective is not the client's cost) + eplb_record of the [12, 16] counts. The
   baseline of the same run: a memcpy of the counts into a buffer and a clock read. --cold:
   before each step, stream 64 MiB and sleep 2 ms, as a forward pass does to the caches.

     bench [--steps N] [--cold] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "eplb_client.h"

#define L 12
#define S 16
#define E 60
#define W 4
#define EB (48 * 1024)

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static int identity(void *user, uint64_t have, uint64_t *lo, uint64_t *hi) {
  (void)user;
  *lo = *hi = have;
  return 0;
}

static double *flush_buf;
static void cool(int cold) {
  if (!cold) return;
  for (size_t i = 0; i < (8u << 20); i++) flush_buf[i] *= 1.0000001;
  usleep(2000);
}

int main(int argc, char **argv) {
  long steps = 20000;
  int cold = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--cold")) cold = 1;
    else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atol(argv[++i]);
  }
  flush_buf = calloc(8u << 20, sizeof(double));
  eplb_tensor_desc t[L];
  for (int l = 0; l < L; l++) t[l] = (eplb_tensor_desc){"w", "u8", EPLB_KIND_EXPERT, S, EB, EB, NULL, 0};
  int32_t phy2log[L * W * S];
  for (int i = 0; i < L * W * S; i++) phy2log[i] = (i % (W * S)) % E;
  eplb_config cfg = {0, W, L, S, E, 0, EPLB_WEIGHTS_HOST, EPLB_COUNTS_LOCAL, 1, t, NULL, phy2log};
  char name[64];
  snprintf(name, sizeof name, "cbench%d", (int)getpid());
  eplb_region *r;
  if (eplb_create(name, &cfg, NULL, NULL, &r) != EPLB_OK || eplb_publish(r) != EPLB_OK) {
    fprintf(stderr, "bench: %s\n", eplb_last_error());
    return 1;
  }
  uint64_t counts[L * S], buf[64][L * S];
  for (int i = 0; i < L * S; i++) counts[i] = (uint64_t)(rand() % 500);
  double *client = malloc(sizeof(double) * steps), *base = malloc(sizeof(double) * steps);
  for (long s = 0; s < steps; s++) {
    cool(cold);
    double t0 = now_us();
    int32_t applied;
    if (eplb_at_step_boundary(r, (uint64_t)s, identity, NULL, &applied) != EPLB_OK ||
        eplb_record(r, (uint64_t)s, EPLB_PHASE_DECODE, counts, L * S, 0, 0) != EPLB_OK) {
      fprintf(stderr, "bench: %s\n", eplb_last_error());
      return 1;
    }
    client[s] = now_us() - t0;
  }
  /* The end of a step in one call (eplb_step_end: record + the next boundary's begin; nothing is
   * posted, so no eplb_boundary_end), and the same identity agree, on steps after the above. */
  double *one = malloc(sizeof(double) * steps);
  for (long s = 0; s < steps; s++) {
    cool(cold);
    double t0 = now_us();
    uint64_t have, posted, lo, hi;
    uint64_t step = (uint64_t)(steps + s);
    if (eplb_step_end(r, step, EPLB_PHASE_DECODE, counts, L * S, 0, 0, &have, &posted) != EPLB_OK ||
        identity(NULL, have, &lo, &hi) != 0 || have != 0 || posted != 0) {
      fprintf(stderr, "bench: step_end: %s\n", eplb_last_error());
      return 1;
    }
    one[s] = now_us() - t0;
  }
  for (long s = 0; s < steps; s++) {
    cool(cold);
    double t0 = now_us();
    memcpy(buf[s % 64], counts, sizeof counts);
    volatile double sink = now_us();
    (void)sink;
    base[s] = now_us() - t0;
  }
  qsort(client, steps, sizeof(double), cmp);
  qsort(one, steps, sizeof(double), cmp);
  qsort(base, steps, sizeof(double), cmp);
  printf("{\"steps\": %ld, \"cold\": %s, \"client_median_us\": %.3f, \"client_p99_us\": %.3f, "
         "\"step_end_median_us\": %.3f, \"step_end_p99_us\": %.3f, "
         "\"baseline_median_us\": %.3f, \"baseline_p99_us\": %.3f}\n",
         steps, cold ? "true" : "false", client[steps / 2], client[steps * 99 / 100], one[steps / 2],
         one[steps * 99 / 100], base[steps / 2], base[steps * 99 / 100]);
  eplb_finish(r, 0);
  eplb_close(r);
  return 0;
}
