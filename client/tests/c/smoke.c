/* A C engine on libeplb_client (host weights, one rank): creates a region with a per-expert
   tensor (padded rows) and a global one, fills every slot with its expert's bytes, publishes,
   optionally waits for a sidecar, then runs STEPS steps: boundary, check that every slot holds
   the expert its phy2log names, record. Prints one JSON line; exit 0 only if every check held.

     smoke NAME STEPS WAIT_SIDECAR_S STEP_US

   Built and run by client/tests/c_smoke.rs (cc against include/eplb_client.h and
   libeplb_client.a) and tests/capi.rs (beside eplb-worker --force-moves). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "eplb_client.h"

#define LAYERS 2
#define SLOTS 4
#define EXPERTS 3
#define ROW 64
#define STRIDE 128
#define GROWS 2

static unsigned char pattern(int layer, int expert, int j) { return (unsigned char)(layer * 53 + expert * 31 + j); }

static int fail(const char *what, eplb_status s) {
  fprintf(stderr, "smoke: %s: status %d: %s\n", what, (int)s, eplb_last_error());
  return 1;
}

/* The sidecar_state word of the published region, read through its own read-only mapping. */
static volatile uint64_t *sidecar_state_word(const char *name) {
  char path[512];
  snprintf(path, sizeof path, "/dev/shm/eplb-%s-0", name);
  int fd = open(path, O_RDONLY);
  if (fd < 0) return NULL;
  void *p = mmap(NULL, EPLB_HEADER_BYTES, PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return NULL;
  return (volatile uint64_t *)((char *)p + EPLB_OFF_SIDECAR_STATE);
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: smoke NAME STEPS WAIT_SIDECAR_S STEP_US\n");
    return 2;
  }
  const char *name = argv[1];
  long steps = atol(argv[2]), wait_s = atol(argv[3]), step_us = atol(argv[4]);
  if (eplb_abi_version() != ((uint32_t)EPLB_VERSION << 16 | EPLB_MINOR_VERSION)) {
    fprintf(stderr, "smoke: abi version %u\n", eplb_abi_version());
    return 1;
  }
  eplb_tensor_desc tensors[LAYERS * 2];
  for (int l = 0; l < LAYERS; l++) {
    tensors[2 * l] = (eplb_tensor_desc){"w13_weight", "float8_e4m3fn", EPLB_KIND_EXPERT, SLOTS, ROW, STRIDE, NULL, 0};
    tensors[2 * l + 1] = (eplb_tensor_desc){"bias", "f32", EPLB_KIND_GLOBAL, GROWS, 16, 16, NULL, 0};
  }
  int32_t phy2log[LAYERS * SLOTS] = {0, 1, 2, 0, 2, 1, 0, 1};
  eplb_config cfg = {0};
  cfg.rank = 0;
  cfg.world_size = 1;
  cfg.num_layers = LAYERS;
  cfg.slots_per_rank = SLOTS;
  cfg.num_logical = EXPERTS;
  cfg.ring_len = 0;
  cfg.weights_kind = EPLB_WEIGHTS_HOST;
  cfg.counts_kind = EPLB_COUNTS_LOCAL;
  cfg.num_tensors = 2;
  cfg.tensors = tensors;
  cfg.staging = NULL;
  cfg.phy2log = phy2log;

  /* Bad input is refused with a message, never an abort. */
  eplb_region *r = NULL;
  cfg.num_logical = 5; /* experts 3 and 4 have no slot */
  eplb_status s = eplb_create(name, &cfg, NULL, NULL, &r);
  if (s != EPLB_ERR_INVALID || r != NULL || strstr(eplb_last_error(), "phy2log layer 0") == NULL)
    return fail("a phy2log without experts 3 and 4 must be refused", s);
  cfg.num_logical = EXPERTS;

  s = eplb_create(name, &cfg, NULL, NULL, &r);
  if (s != EPLB_OK) return fail("eplb_create", s);
  for (int l = 0; l < LAYERS; l++) {
    unsigned char *w = eplb_tensor_ptr(r, l, 0);
    unsigned char *g = eplb_tensor_ptr(r, l, 1);
    if (!w || !g) return fail("eplb_tensor_ptr", EPLB_ERR_INVALID);
    for (int k = 0; k < SLOTS; k++)
      for (int j = 0; j < ROW; j++) w[k * STRIDE + j] = pattern(l, phy2log[l * SLOTS + k], j);
    memset(g, 0x5a, 16 * GROWS);
  }
  if (eplb_tensor_ptr(r, LAYERS, 1) != NULL) return fail("a global has no staging", EPLB_ERR_INVALID);
  if ((s = eplb_publish(r)) != EPLB_OK) return fail("eplb_publish", s);
  volatile uint64_t *sidecar = sidecar_state_word(name);
  if (!sidecar) return fail("map the published region", EPLB_ERR_IO);
  for (long i = 0; i < wait_s * 100 && __atomic_load_n(sidecar, __ATOMIC_ACQUIRE) != EPLB_SIDECAR_ATTACHED; i++) {
    eplb_heartbeat(r);
    usleep(10000);
  }
  if (wait_s > 0 && __atomic_load_n(sidecar, __ATOMIC_ACQUIRE) != EPLB_SIDECAR_ATTACHED) {
    fprintf(stderr, "smoke: no sidecar attached within %ld s\n", wait_s);
    eplb_fail(r);
    eplb_close(r);
    return 1;
  }

  long applied = 0, mismatches = 0;
  uint64_t counts[LAYERS * SLOTS];
  for (long step = 0; step < steps; step++) {
    int32_t layer = -2;
    if ((s = eplb_at_step_boundary(r, (uint64_t)step, NULL, NULL, &layer)) != EPLB_OK) return fail("boundary", s);
    if (layer >= 0) applied++;
    for (int l = 0; l < LAYERS; l++) {
      int32_t row[SLOTS];
      if ((s = eplb_phy2log(r, l, row, SLOTS)) != EPLB_OK) return fail("eplb_phy2log", s);
      const unsigned char *w = eplb_tensor_ptr(r, l, 0);
      const unsigned char *g = eplb_tensor_ptr(r, l, 1);
      for (int k = 0; k < SLOTS; k++)
        for (int j = 0; j < ROW; j++)
          if (w[k * STRIDE + j] != pattern(l, row[k], j)) mismatches++;
      for (int j = 0; j < 16 * GROWS; j++)
        if (g[j] != 0x5a) mismatches++;
    }
    for (int i = 0; i < LAYERS * SLOTS; i++) counts[i] = (uint64_t)((step + i) % 7 + 1);
    if ((s = eplb_record(r, (uint64_t)step, EPLB_PHASE_DECODE, counts, LAYERS * SLOTS, 16, 1000)) != EPLB_OK)
      return fail("eplb_record", s);
    if (step_us > 0) usleep((useconds_t)step_us);
  }
  /* Out of order: refused, the region goes on. */
  if ((s = eplb_record(r, 0, EPLB_PHASE_DECODE, counts, LAYERS * SLOTS, 0, 0)) != EPLB_ERR_STATE)
    return fail("a record of an old step must be refused", s);
  if ((s = eplb_finish(r, 10000)) != EPLB_OK) return fail("eplb_finish", s);
  if ((s = eplb_record(r, (uint64_t)steps, EPLB_PHASE_DECODE, counts, LAYERS * SLOTS, 0, 0)) != EPLB_ERR_STATE)
    return fail("a record after finish must be refused", s);
  eplb_close(r);
  eplb_close(NULL);
  printf("{\"steps\": %ld, \"applied\": %ld, \"mismatches\": %ld, \"outputs_match\": %s}\n", steps, applied,
         mismatches, mismatches == 0 ? "true" : "false");
  return mismatches == 0 ? 0 : 1;
}
