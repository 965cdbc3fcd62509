/* The cross-language golden test's C side (issue 21), using only the generated header
 * (client/include/eplb_client.h): its structs eplb_header and eplb_table_entry, its EPLB_*
 * constants and, for `capi`, its functions.
 *
 *   region_golden layout               the header's constants and struct offsets, as JSON
 *   region_golden raw SCENARIO OUT     the golden scenario's final region, every byte by hand
 *   region_golden capi SCENARIO OUT    the golden scenario run through libeplb_client's C API
 *   region_golden dump PATH            C's reader: every field of contract 2, as JSON
 *
 * The scenario (host | ipc) is python/tests/golden_region.py's; keep the three writers alike.
 * python/tests/test_golden.py builds this file with gcc and compares every reader's dump of
 * every writer's region. Exit 0 ok, 1 failure (message on stderr), 2 bad usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "eplb_client.h"

/* ---- the scenario (python/tests/golden_region.py) ---- */
enum { W = 2, RANK = 1, L = 3, S = 4, E = 6, RING = 16, P = W * S, STEPS = 20, T = 3 };
enum { W13_ROW = 32, W13_STRIDE = 48, W2_ROW = 24, SCALE_ROW = 4 };
#define SIDECAR_PID 4242u
#define SIDECAR_HB 123456789u
#define SIDECAR_STATE 1u
#define IPC_BASE 0x7F0000000000ull
#define IPC_SEG (1ull << 16)
#define IPC_STAGE_BASE 0x7F1000000000ull
#define IPC_LAYER_BYTES (1024u + 4u)
#define IPC_STAGE_BYTES (256u + 4u * 24u)
#define PCI_BUS_ID "0000:19:00.0"

static const char *NAMES[T] = {"w13_weight", "w2_weight", "w13_input_scale"};
static const char *DTYPES[T] = {"bf16", "f8e4m3", "f32"};
static const uint32_t KINDS[T] = {EPLB_KIND_EXPERT, EPLB_KIND_EXPERT, EPLB_KIND_GLOBAL};
static const uint64_t ROW_BYTES[T] = {W13_ROW, W2_ROW, SCALE_ROW};
static const uint64_t ROW_STRIDE[T] = {W13_STRIDE, W2_ROW, SCALE_ROW};
static const uint32_t DIM0[T] = {S, S, 1};
/* ipc: offsets inside the layer's allocation; staging: inside the staging allocation. */
static const uint64_t IPC_OFF[T] = {0, 512, 1024};
static const uint64_t IPC_STAGE_OFF[T] = {0, 256, 0};
static const uint64_t IPC_STAGE_STRIDE[T] = {W13_ROW, W2_ROW, 0};

typedef struct {
  int before;                 /* post before this boundary; -1: after the last record */
  uint64_t id, layer, apply_step, epoch;
  int32_t local[S];
  uint8_t mask[S];
} command;

static const command HOST_CMDS[] = {
    {5, 1, 1, 5, 1, {5, 1, 0, 2}, {0, 1, 1, 1}},  {9, 2, 0, 9, 2, {4, 5, 0, 1}, {1, 1, 1, 1}},
    {11, 3, 2, 10, 1, {1, 0, 2, 3}, {1, 1, 0, 0}}, {13, 4, 2, 13, 1, {1, 0, 2, 3}, {1, 1, 0, 0}},
    {-1, 5, 0, 22, 1, {5, 4, 1, 0}, {1, 1, 1, 1}},
};
static const command IPC_CMDS[] = {
    {5, 1, 1, 5, 1, {5, 1, 0, 2}, {0, 1, 1, 1}},
    {8, 2, 2, 10, 1, {1, 0, 2, 3}, {1, 1, 0, 0}},
    {-1, 3, 0, 25, 1, {5, 4, 1, 0}, {1, 1, 1, 1}},
};
enum { IPC_FAULT_STEP = 8, IPC_FAULT_LAYER = 2, IPC_FAULT_TENSOR = 1 };

static int count_cols(int host) { return host ? S : P; }
static uint64_t count_of(int t, int layer, int col) {
  if (layer == 0 && col == 0) return (1ull << 40) - 1 - (uint64_t)t;
  return (uint64_t)((t * 131 + layer * 17 + col * 3) % 97);
}
static uint64_t tokens_of(int t) { return t % 2 ? (1ull << 63) + (uint64_t)t : 100u + (uint64_t)t; }
static uint64_t moe_ns_of(int t) { return t % 4 == 0 ? 0 : 1000u * (uint64_t)t + 7; }
static uint32_t phase_of(int t) {
  static const uint32_t ph[3] = {EPLB_PHASE_PREFILL, EPLB_PHASE_DECODE, EPLB_PHASE_MIXED};
  return ph[t % 3];
}
static uint8_t fill(int layer, int t, int r, int i) { return (uint8_t)((layer * 37 + t * 11 + r * 5 + i * 3 + 1) % 256); }
static uint8_t stage(int t, int s, int i) { return (uint8_t)((200 + t * 13 + s * 7 + i) % 256); }
static void ipc_handle(uint64_t base, uint8_t out[64]) {
  for (int k = 0; k < 8; k++) out[k] = (uint8_t)(base >> (8 * k));
  for (int k = 0; k < 56; k++) out[8 + k] = (uint8_t)((base >> 16) % 7 + (uint64_t)k);
}
static void phy2log0(int32_t out[L][P]) {
  for (int l = 0; l < L; l++)
    for (int p = 0; p < P; p++) out[l][p] = (p + l) % E;
}

static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "region_golden: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  exit(1);
}

static uint64_t round_up(uint64_t n, uint64_t m) { return (n + m - 1) / m * m; }
static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Atomic u64 access to a mapping (the contract's atomic fields: release stores, acquire loads). */
static uint64_t ld(const uint8_t *base, uint64_t at) {
  return __atomic_load_n((const uint64_t *)(const void *)(base + at), __ATOMIC_ACQUIRE);
}
static void st(uint8_t *base, uint64_t at, uint64_t v) {
  __atomic_store_n((uint64_t *)(void *)(base + at), v, __ATOMIC_RELEASE);
}

static void write_file(const char *out, const uint8_t *buf, size_t len) {
  int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) die("%s: %s", out, strerror(errno));
  size_t done = 0;
  while (done < len) {
    ssize_t n = write(fd, buf + done, len - done);
    if (n <= 0) die("%s: %s", out, strerror(errno));
    done += (size_t)n;
  }
  close(fd);
}

/* ---- layout: the header's constants and struct offsets ---- */

static int layout(void) {
  printf("{");
#define C(name) printf("\"%s\": %" PRIu64 ", ", #name, (uint64_t)(EPLB_##name))
  C(MAGIC); C(VERSION); C(MINOR_VERSION); C(HEADER_BYTES); C(TENSOR_ENTRY_BYTES); C(MAX_TENSORS);
  C(MIN_RING_LEN); C(WEIGHTS_HOST); C(WEIGHTS_CUDA_IPC); C(COUNTS_LOCAL); C(COUNTS_PHYSICAL);
  C(KIND_EXPERT); C(KIND_GLOBAL); C(ENGINE_STARTING); C(ENGINE_RUNNING); C(ENGINE_FINISHED);
  C(ENGINE_FAILED); C(SIDECAR_NONE); C(SIDECAR_ATTACHED); C(SIDECAR_EXITED_OK); C(SIDECAR_FAILED);
  C(ACK_APPLIED); C(ACK_CANCELLED); C(ACK_MISSED); C(ACK_REJECTED); C(PHASE_PREFILL); C(PHASE_DECODE);
  C(PHASE_MIXED); C(IPC_PCI_BUS_ID); C(IPC_UUID); C(IPC_HANDLES); C(IPC_ENTRY_BYTES); C(IPC_ENTRY_SIZE);
  C(IPC_HANDLE_BYTES); C(IPC_MAX_HANDLES); C(NAME_BYTES); C(DTYPE_BYTES);
#undef C
  printf("\"offsets\": {");
#define O(field, name) printf("\"%s\": %zu, ", #field, (size_t)EPLB_OFF_##name); \
  if (offsetof(eplb_header, field) != EPLB_OFF_##name) die("offsetof(eplb_header, %s) != EPLB_OFF_%s", #field, #name)
  O(magic, MAGIC); O(version, VERSION); O(header_bytes, HEADER_BYTES); O(num_layers, NUM_LAYERS);
  O(slots_per_rank, SLOTS_PER_RANK); O(num_logical, NUM_LOGICAL); O(world_size, WORLD_SIZE); O(rank, RANK);
  O(ring_len, RING_LEN); O(expert_bytes, EXPERT_BYTES); O(num_tensors, NUM_TENSORS);
  O(weights_kind, WEIGHTS_KIND); O(total_bytes, TOTAL_BYTES); O(ring_offset, RING_OFFSET);
  O(ring_entry_bytes, RING_ENTRY_BYTES); O(placement_offset, PLACEMENT_OFFSET); O(epochs_offset, EPOCHS_OFFSET);
  O(command_offset, COMMAND_OFFSET); O(table_offset, TABLE_OFFSET); O(ipc_offset, IPC_OFFSET);
  O(engine_pid, ENGINE_PID); O(engine_step, ENGINE_STEP); O(engine_heartbeat_ns, ENGINE_HEARTBEAT_NS);
  O(engine_state, ENGINE_STATE); O(sidecar_pid, SIDECAR_PID); O(sidecar_heartbeat_ns, SIDECAR_HEARTBEAT_NS);
  O(sidecar_state, SIDECAR_STATE); O(minor_version, MINOR_VERSION); O(counts_kind, COUNTS_KIND);
  O(num_handles, NUM_HANDLES); O(table_fault, TABLE_FAULT);
#undef O
#define M(field, name) printf("\"%s\": %zu, ", #field, (size_t)EPLB_OFF_##name)
  M(cmd_seq, CMD_SEQ); M(cmd_id, CMD_ID); M(cmd_layer, CMD_LAYER); M(cmd_apply_step, CMD_APPLY_STEP);
  M(cmd_epoch, CMD_EPOCH); M(ack_id, ACK_ID); M(ack_result, ACK_RESULT); M(ack_step, ACK_STEP);
#undef M
#define R(field, name) printf("\"%s\": %zu, ", #field, (size_t)EPLB_##name)
  R(entry_seq, ENTRY_SEQ); R(entry_step, ENTRY_STEP); R(entry_phase, ENTRY_PHASE); R(entry_tokens, ENTRY_TOKENS);
  R(entry_moe_ns, ENTRY_MOE_NS);
  printf("\"entry_counts\": %zu}, ", (size_t)EPLB_ENTRY_COUNTS);
#undef R
  printf("\"header_struct_bytes\": %zu, \"table_entry_bytes\": %zu, ", sizeof(eplb_header), sizeof(eplb_table_entry));
  printf("\"table_entry\": {\"name\": %zu, \"dtype\": %zu, \"offset\": %zu, \"row_stride\": %zu, \"row_bytes\": %zu, "
         "\"rows\": %zu, \"kind\": %zu, \"reserved\": %zu, \"handle\": %zu}, ",
         offsetof(eplb_table_entry, name), offsetof(eplb_table_entry, dtype), offsetof(eplb_table_entry, offset),
         offsetof(eplb_table_entry, row_stride), offsetof(eplb_table_entry, row_bytes),
         offsetof(eplb_table_entry, rows), offsetof(eplb_table_entry, kind), offsetof(eplb_table_entry, reserved),
         offsetof(eplb_table_entry, handle));
  printf("\"name_field_bytes\": %zu, \"dtype_field_bytes\": %zu}\n", sizeof(((eplb_table_entry *)0)->name),
         sizeof(((eplb_table_entry *)0)->dtype));
  return 0;
}

/* ---- the region's shape, as the clients lay it out ---- */

typedef struct {
  int host;
  uint64_t cols, ring_entry_bytes, ring_offset, placement_offset, epochs_offset, command_offset, mask_offset;
  uint64_t table_offset, ipc_offset, total_bytes, num_handles;
  eplb_table_entry table[(L + 1) * T];
} shape;

static void set_name(uint8_t *dst, size_t cap, const char *s) {
  memset(dst, 0, cap);
  memcpy(dst, s, strlen(s) < cap ? strlen(s) : cap);
}

static void make_shape(int host, shape *sh) {
  memset(sh, 0, sizeof *sh);
  sh->host = host;
  sh->cols = (uint64_t)count_cols(host);
  sh->ring_entry_bytes = EPLB_ENTRY_COUNTS + round_up(8 * L * sh->cols, EPLB_ALIGN);
  sh->ring_offset = EPLB_HEADER_BYTES;
  sh->placement_offset = sh->ring_offset + RING * sh->ring_entry_bytes;
  sh->epochs_offset = round_up(sh->placement_offset + 4 * L * P, EPLB_ALIGN);
  sh->command_offset = round_up(sh->epochs_offset + 8 * L, EPLB_ALIGN);
  sh->mask_offset = sh->command_offset + round_up(4 * P, EPLB_ALIGN);
  sh->table_offset = round_up(sh->mask_offset + S, EPLB_ALIGN);
  uint64_t table_end = sh->table_offset + (uint64_t)(L + 1) * T * EPLB_TENSOR_ENTRY_BYTES;
  uint64_t off = round_up(table_end, EPLB_ALIGN);
  for (int layer = 0; layer <= L; layer++) {
    for (int t = 0; t < T; t++) {
      eplb_table_entry *e = &sh->table[layer * T + t];
      set_name(e->name, sizeof e->name, NAMES[t]);
      set_name(e->dtype, sizeof e->dtype, DTYPES[t]);
      e->row_bytes = ROW_BYTES[t];
      e->kind = (uint8_t)KINDS[t];
      int staging = layer == L;
      if (staging && KINDS[t] == EPLB_KIND_GLOBAL) continue; /* offset = row_stride = rows = 0 */
      e->rows = KINDS[t] == EPLB_KIND_EXPERT ? S : 1;
      if (host) {
        e->offset = off;
        e->row_stride = staging ? ROW_BYTES[t] : ROW_STRIDE[t];
        off = round_up(off + (uint64_t)(DIM0[t] - 1) * e->row_stride + e->row_bytes, EPLB_ALIGN);
      } else {
        e->offset = staging ? IPC_STAGE_OFF[t] : IPC_OFF[t];
        e->row_stride = staging ? IPC_STAGE_STRIDE[t] : ROW_STRIDE[t];
        e->handle = (uint16_t)layer;
      }
    }
  }
  if (host) {
    sh->total_bytes = round_up(off, 4096);
  } else {
    sh->num_handles = L + 1;
    sh->ipc_offset = round_up(table_end, EPLB_ALIGN);
    sh->total_bytes = round_up(sh->ipc_offset + EPLB_IPC_HANDLES + sh->num_handles * EPLB_IPC_ENTRY_BYTES, 4096);
  }
}

/* ---- raw: the final region, every field by hand ---- */

static int raw(int host, const char *out) {
  shape sh;
  make_shape(host, &sh);
  uint8_t *buf = calloc(1, sh.total_bytes);
  if (!buf) die("out of memory");
  const command *cmds = host ? HOST_CMDS : IPC_CMDS;
  size_t ncmds = host ? sizeof HOST_CMDS / sizeof *HOST_CMDS : sizeof IPC_CMDS / sizeof *IPC_CMDS;

  /* The placement and epochs: command 1 applied to layer 1 (both scenarios). */
  int32_t phy2log[L][P];
  phy2log0(phy2log);
  uint64_t epochs[L] = {0, 0, 0};
  const command *c1 = &cmds[0];
  for (int s = 0; s < S; s++) phy2log[c1->layer][RANK * S + s] = c1->local[s];
  epochs[c1->layer] = c1->epoch;

  eplb_header h;
  memset(&h, 0, sizeof h);
  h.magic = EPLB_MAGIC;
  h.version = EPLB_VERSION;
  h.header_bytes = EPLB_HEADER_BYTES;
  h.num_layers = L;
  h.slots_per_rank = S;
  h.num_logical = E;
  h.world_size = W;
  h.rank = RANK;
  h.ring_len = RING;
  h.expert_bytes = W13_ROW + W2_ROW;
  h.num_tensors = T;
  h.weights_kind = host ? EPLB_WEIGHTS_HOST : EPLB_WEIGHTS_CUDA_IPC;
  h.total_bytes = sh.total_bytes;
  h.ring_offset = sh.ring_offset;
  h.ring_entry_bytes = sh.ring_entry_bytes;
  h.placement_offset = sh.placement_offset;
  h.epochs_offset = sh.epochs_offset;
  h.command_offset = sh.command_offset;
  h.table_offset = sh.table_offset;
  h.ipc_offset = sh.ipc_offset;
  h.engine_pid = (uint64_t)getpid();
  h.engine_step = STEPS;
  h.engine_heartbeat_ns = now_ns();
  h.engine_state = EPLB_ENGINE_RUNNING;
  h.sidecar_pid = SIDECAR_PID;
  h.sidecar_heartbeat_ns = SIDECAR_HB;
  h.sidecar_state = SIDECAR_STATE;
  h.minor_version = EPLB_MINOR_VERSION;
  h.counts_kind = host ? EPLB_COUNTS_LOCAL : EPLB_COUNTS_PHYSICAL;
  h.num_handles = (uint32_t)sh.num_handles;
  h.table_fault = host ? 0 : 1 + (uint64_t)(IPC_FAULT_LAYER * T + IPC_FAULT_TENSOR);
  memcpy(buf, &h, sizeof h);

  /* The mailbox: the last command posted (cmd_seq 2 a post), the last one answered. */
  const command *last = &cmds[ncmds - 1];
  uint64_t ack_id = host ? 4 : 2, ack_result = host ? EPLB_ACK_CANCELLED : EPLB_ACK_REJECTED;
  uint64_t ack_step = host ? 13 : 10;
  st(buf, EPLB_OFF_CMD_SEQ, 2 * ncmds);
  st(buf, EPLB_OFF_CMD_ID, last->id);
  st(buf, EPLB_OFF_CMD_LAYER, last->layer);
  st(buf, EPLB_OFF_CMD_APPLY_STEP, last->apply_step);
  st(buf, EPLB_OFF_CMD_EPOCH, last->epoch);
  st(buf, EPLB_OFF_ACK_ID, ack_id);
  st(buf, EPLB_OFF_ACK_RESULT, ack_result);
  st(buf, EPLB_OFF_ACK_STEP, ack_step);
  int32_t new_row[P];
  memcpy(new_row, phy2log[last->layer], sizeof new_row);
  for (int s = 0; s < S; s++) new_row[RANK * S + s] = last->local[s];
  memcpy(buf + sh.command_offset, new_row, sizeof new_row);
  memcpy(buf + sh.mask_offset, last->mask, S);

  /* The ring: entry i holds the last step t < STEPS with t % RING == i, written t / RING + 1 times. */
  for (int i = 0; i < RING; i++) {
    int t = i + RING < STEPS ? i + RING : i;
    uint8_t *e = buf + sh.ring_offset + (uint64_t)i * sh.ring_entry_bytes;
    st(e, EPLB_ENTRY_SEQ, 2u * (uint64_t)(t / RING + 1));
    st(e, EPLB_ENTRY_STEP, (uint64_t)t);
    st(e, EPLB_ENTRY_PHASE, phase_of(t));
    st(e, EPLB_ENTRY_TOKENS, tokens_of(t));
    st(e, EPLB_ENTRY_MOE_NS, moe_ns_of(t));
    for (int l = 0; l < L; l++)
      for (uint64_t c = 0; c < sh.cols; c++) st(e, EPLB_ENTRY_COUNTS + 8 * ((uint64_t)l * sh.cols + c), count_of(t, l, (int)c));
  }
  memcpy(buf + sh.placement_offset, phy2log, sizeof phy2log);
  for (int l = 0; l < L; l++) st(buf, sh.epochs_offset + 8 * (uint64_t)l, epochs[l]);
  memcpy(buf + sh.table_offset, sh.table, sizeof sh.table);

  if (host) {
    /* Live rows (layer 1's applied slots hold the staged bytes), globals, and the staging rows
       (every slot staged by command 2's full mask). */
    for (int layer = 0; layer <= L; layer++)
      for (int t = 0; t < T; t++) {
        const eplb_table_entry *e = &sh.table[layer * T + t];
        for (uint32_t r = 0; r < e->rows; r++)
          for (uint64_t i = 0; i < e->row_bytes; i++) {
            int staged = layer == L || ((uint64_t)layer == c1->layer && e->kind == EPLB_KIND_EXPERT && c1->mask[r]);
            buf[e->offset + r * e->row_stride + i] = staged ? stage(t, (int)r, (int)i) : fill(layer, t, (int)r, (int)i);
          }
      }
  } else {
    uint8_t *ipc = buf + sh.ipc_offset;
    memcpy(ipc + EPLB_IPC_PCI_BUS_ID, PCI_BUS_ID, strlen(PCI_BUS_ID));
    /* uuid: zeros (not checked) */
    for (uint64_t k = 0; k < sh.num_handles; k++) {
      uint8_t *he = ipc + EPLB_IPC_HANDLES + k * EPLB_IPC_ENTRY_BYTES;
      ipc_handle(k < L ? IPC_BASE + k * IPC_SEG : IPC_STAGE_BASE, he);
      uint64_t size = k < L ? IPC_LAYER_BYTES : IPC_STAGE_BYTES;
      memcpy(he + EPLB_IPC_ENTRY_SIZE, &size, 8);
    }
  }
  write_file(out, buf, sh.total_bytes);
  free(buf);
  return 0;
}

/* ---- capi: the scenario through the library ---- */

typedef struct {
  int step;
} agree_state;

static int agree(void *user, uint64_t have, uint64_t *min_out, uint64_t *max_out) {
  const agree_state *a = user;
  *min_out = a->step == 13 ? 0 : have;
  *max_out = have;
  return 0;
}

static int applied_calls;
static uint32_t applied_layer;
static uint32_t applied_slots[S];
static size_t applied_n;

static int apply(void *user, uint32_t layer, const uint32_t *slots, size_t num_slots) {
  (void)user;
  applied_calls++;
  applied_layer = layer;
  applied_n = num_slots < S ? num_slots : S;
  memcpy(applied_slots, slots, applied_n * sizeof *slots);
  return 0;
}

static void check(eplb_status rc, const char *what) {
  if (rc != EPLB_OK) die("%s: status %d: %s", what, (int)rc, eplb_last_error());
}

/* The harness as the sidecar: a mapping of the published region, one command under cmd_seq. */
static void post(uint8_t *m, const shape *sh, const command *c) {
  if (sh->host)
    for (int t = 0; t < T; t++) {
      const eplb_table_entry *e = &sh->table[L * T + t];
      eplb_table_entry got;
      memcpy(&got, m + ld(m, EPLB_OFF_TABLE_OFFSET) + (uint64_t)(L * T + t) * EPLB_TENSOR_ENTRY_BYTES, sizeof got);
      if (e->kind != EPLB_KIND_EXPERT) continue;
      for (int s = 0; s < S; s++)
        if (c->mask[s])
          for (uint64_t i = 0; i < got.row_bytes; i++) m[got.offset + (uint64_t)s * got.row_stride + i] = stage(t, s, (int)i);
    }
  uint64_t placement = ld(m, EPLB_OFF_PLACEMENT_OFFSET), command_offset = ld(m, EPLB_OFF_COMMAND_OFFSET);
  int32_t row[P];
  memcpy(row, m + placement + (uint64_t)c->layer * P * 4, sizeof row);
  for (int s = 0; s < S; s++) row[RANK * S + s] = c->local[s];
  uint64_t seq = ld(m, EPLB_OFF_CMD_SEQ);
  st(m, EPLB_OFF_CMD_SEQ, seq + 1);
  st(m, EPLB_OFF_CMD_ID, c->id);
  st(m, EPLB_OFF_CMD_LAYER, c->layer);
  st(m, EPLB_OFF_CMD_APPLY_STEP, c->apply_step);
  st(m, EPLB_OFF_CMD_EPOCH, c->epoch);
  memcpy(m + command_offset, row, sizeof row);
  memcpy(m + command_offset + round_up(4 * P, EPLB_ALIGN), c->mask, S);
  st(m, EPLB_OFF_CMD_SEQ, seq + 2);
}

static uint8_t *map_file(const char *path, size_t *len, int writable) {
  int fd = open(path, writable ? O_RDWR : O_RDONLY);
  if (fd < 0) die("%s: %s", path, strerror(errno));
  struct stat sb;
  if (fstat(fd, &sb) != 0) die("%s: %s", path, strerror(errno));
  *len = (size_t)sb.st_size;
  void *m = mmap(NULL, *len, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, 0);
  close(fd);
  if (m == MAP_FAILED) die("%s: mmap: %s", path, strerror(errno));
  return m;
}

static int capi(int host, const char *out) {
  shape sh;
  make_shape(host, &sh);
  char name[64];
  snprintf(name, sizeof name, "goldenc%d%s", (int)getpid(), host ? "host" : "ipc");
  eplb_tensor_desc descs[L][T], staging[T];
  uint8_t handles[L + 1][64];
  for (int k = 0; k <= L; k++) ipc_handle(k < L ? IPC_BASE + (uint64_t)k * IPC_SEG : IPC_STAGE_BASE, handles[k]);
  memset(descs, 0, sizeof descs);
  memset(staging, 0, sizeof staging);
  for (int layer = 0; layer <= L; layer++)
    for (int t = 0; t < T; t++) {
      const eplb_table_entry *e = &sh.table[layer * T + t];
      eplb_tensor_desc *d = layer == L ? &staging[t] : &descs[layer][t];
      d->name = NAMES[t];
      d->dtype = DTYPES[t];
      d->kind = KINDS[t];
      d->rows = e->rows ? e->rows : (KINDS[t] == EPLB_KIND_EXPERT ? S : 1);
      d->row_bytes = e->row_bytes;
      d->row_stride = e->row_stride ? e->row_stride : e->row_bytes;
      if (!host) {
        d->ipc_handle = handles[layer];
        d->ipc_offset = e->offset;
      }
    }
  int32_t phy2log[L][P];
  phy2log0(phy2log);
  eplb_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.rank = RANK;
  cfg.world_size = W;
  cfg.num_layers = L;
  cfg.slots_per_rank = S;
  cfg.num_logical = E;
  cfg.ring_len = RING;
  cfg.weights_kind = host ? EPLB_WEIGHTS_HOST : EPLB_WEIGHTS_CUDA_IPC;
  cfg.counts_kind = host ? EPLB_COUNTS_LOCAL : EPLB_COUNTS_PHYSICAL;
  cfg.num_tensors = T;
  cfg.tensors = &descs[0][0];
  cfg.staging = staging;
  cfg.phy2log = &phy2log[0][0];
  if (!host && setenv("EPLB_PCI_BUS_ID", PCI_BUS_ID, 1) != 0) die("setenv: %s", strerror(errno));
  eplb_region *r = NULL;
  check(eplb_create(name, &cfg, host ? NULL : apply, NULL, &r), "eplb_create");
  if (host)
    for (int layer = 0; layer < L; layer++)
      for (int t = 0; t < T; t++) {
        const eplb_table_entry *e = &sh.table[layer * T + t];
        uint8_t *p = eplb_tensor_ptr(r, (uint32_t)layer, (uint32_t)t);
        if (!p) die("eplb_tensor_ptr(%d, %d): %s", layer, t, eplb_last_error());
        for (uint32_t row = 0; row < e->rows; row++)
          for (uint64_t i = 0; i < e->row_bytes; i++) p[row * e->row_stride + i] = fill(layer, t, (int)row, (int)i);
      }
  check(eplb_publish(r), "eplb_publish");
  char path[256];
  snprintf(path, sizeof path, "/dev/shm/eplb-%s-%d", name, RANK);
  size_t len;
  uint8_t *m = map_file(path, &len, 1);
  st(m, EPLB_OFF_SIDECAR_PID, SIDECAR_PID);
  st(m, EPLB_OFF_SIDECAR_HEARTBEAT_NS, SIDECAR_HB);
  st(m, EPLB_OFF_SIDECAR_STATE, SIDECAR_STATE);
  const command *cmds = host ? HOST_CMDS : IPC_CMDS;
  size_t ncmds = host ? sizeof HOST_CMDS / sizeof *HOST_CMDS : sizeof IPC_CMDS / sizeof *IPC_CMDS;
  uint64_t counts[L * P];
  for (int t = 0; t < STEPS; t++) {
    for (size_t k = 0; k < ncmds; k++)
      if (cmds[k].before == t) post(m, &sh, &cmds[k]);
    if (!host && t == IPC_FAULT_STEP) check(eplb_table_fault(r, IPC_FAULT_LAYER, IPC_FAULT_TENSOR), "eplb_table_fault");
    agree_state a = {t};
    int32_t applied = -2;
    check(eplb_at_step_boundary(r, (uint64_t)t, agree, &a, &applied), "eplb_at_step_boundary");
    int want = t == 5 ? 1 : -1;
    if (applied != want) die("step %d: applied layer %d, want %d", t, (int)applied, want);
    for (int l = 0; l < L; l++)
      for (uint64_t c = 0; c < sh.cols; c++) counts[(uint64_t)l * sh.cols + c] = count_of(t, l, (int)c);
    check(eplb_record(r, (uint64_t)t, phase_of(t), counts, L * sh.cols, tokens_of(t), moe_ns_of(t)), "eplb_record");
  }
  for (size_t k = 0; k < ncmds; k++)
    if (cmds[k].before < 0) post(m, &sh, &cmds[k]);
  if (!host && !(applied_calls == 1 && applied_layer == 1 && applied_n == 3 && applied_slots[0] == 1 &&
                 applied_slots[1] == 2 && applied_slots[2] == 3))
    die("the apply callback: %d calls, the last of layer %u with %zu slots", applied_calls, applied_layer, applied_n);
  write_file(out, m, len);
  munmap(m, len);
  check(eplb_fail(r), "eplb_fail");
  eplb_close(r);
  return 0;
}

/* ---- dump: C's reader ---- */

static uint64_t fnv1a64(const uint8_t *p, uint64_t n, uint64_t h) {
  for (uint64_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

static uint64_t nonzero(const uint8_t *m, uint64_t lo, uint64_t hi) {
  uint64_t n = 0;
  for (uint64_t i = lo; i < hi; i++) n += m[i] != 0;
  return n;
}

static void json_str(const uint8_t *s, size_t cap) {
  putchar('"');
  for (size_t i = 0; i < cap && s[i]; i++) {
    if (s[i] == '"' || s[i] == '\\') putchar('\\');
    putchar(s[i]);
  }
  putchar('"');
}

static size_t cstrlen(const uint8_t *s, size_t cap) {
  size_t n = 0;
  while (n < cap && s[n]) n++;
  return n;
}

static void counts_json(const uint8_t *entry, uint32_t layers, uint64_t cols, const uint64_t *copy) {
  printf("[");
  for (uint32_t l = 0; l < layers; l++) {
    printf("%s[", l ? ", " : "");
    for (uint64_t c = 0; c < cols; c++) {
      uint64_t v;
      if (copy) {
        v = copy[(uint64_t)l * cols + c];
      } else {
        memcpy(&v, entry + EPLB_ENTRY_COUNTS + 8 * ((uint64_t)l * cols + c), 8);
      }
      printf("%s%" PRIu64, c ? ", " : "", v);
    }
    printf("]");
  }
  printf("]");
}

static int dump(const char *path) {
  size_t len;
  uint8_t *m = map_file(path, &len, 0);
  if (len < EPLB_HEADER_BYTES) die("%s: %zu bytes, shorter than the header", path, len);
  eplb_header h;
  memcpy(&h, m, sizeof h);
  if (h.magic != EPLB_MAGIC) die("%s: not an eplb region", path);
  if (h.version != EPLB_VERSION) die("%s: contract version %u, this reader speaks %u", path, h.version, EPLB_VERSION);
  if (h.total_bytes > len || h.table_offset + (uint64_t)(h.num_layers + 1) * h.num_tensors * EPLB_TENSOR_ENTRY_BYTES > len)
    die("%s: sections beyond the file", path);
  uint64_t cols = h.counts_kind == EPLB_COUNTS_PHYSICAL ? (uint64_t)h.world_size * h.slots_per_rank : h.slots_per_rank;
  uint64_t num_physical = (uint64_t)h.world_size * h.slots_per_rank;
  uint64_t nz = 0;
  printf("{\"header\": {");
#define U(f) printf("\"%s\": %" PRIu64 ", ", #f, (uint64_t)h.f)
#define A(f, off) printf("\"%s\": %" PRIu64 ", ", #f, ld(m, off))
  U(magic); U(version); U(header_bytes); U(num_layers); U(slots_per_rank); U(num_logical); U(world_size); U(rank);
  U(ring_len); U(expert_bytes); U(num_tensors); U(weights_kind); U(total_bytes); U(ring_offset); U(ring_entry_bytes);
  U(placement_offset); U(epochs_offset); U(command_offset); U(table_offset); U(ipc_offset); U(engine_pid);
  A(engine_step, EPLB_OFF_ENGINE_STEP); A(engine_heartbeat_ns, EPLB_OFF_ENGINE_HEARTBEAT_NS);
  A(engine_state, EPLB_OFF_ENGINE_STATE); A(sidecar_pid, EPLB_OFF_SIDECAR_PID);
  A(sidecar_heartbeat_ns, EPLB_OFF_SIDECAR_HEARTBEAT_NS); A(sidecar_state, EPLB_OFF_SIDECAR_STATE);
  U(minor_version); U(counts_kind); U(num_handles); U(reserved0);
  printf("\"table_fault\": %" PRIu64 "}, ", ld(m, EPLB_OFF_TABLE_FAULT));
#undef U
#undef A
  /* The mailbox under cmd_seq (a stable copy: even and unchanged around the read). */
  uint64_t mask_offset = h.command_offset + round_up(4 * num_physical, EPLB_ALIGN);
  uint64_t cmd[5];
  int32_t *row = malloc(4 * num_physical + 1);
  uint8_t *mask = malloc(h.slots_per_rank + 1u);
  for (int tries = 0;; tries++) {
    if (tries == 1000) die("cmd_seq never stable");
    uint64_t s1 = ld(m, EPLB_OFF_CMD_SEQ);
    if (s1 % 2) continue;
    cmd[0] = s1;
    cmd[1] = ld(m, EPLB_OFF_CMD_ID);
    cmd[2] = ld(m, EPLB_OFF_CMD_LAYER);
    cmd[3] = ld(m, EPLB_OFF_CMD_APPLY_STEP);
    cmd[4] = ld(m, EPLB_OFF_CMD_EPOCH);
    memcpy(row, m + h.command_offset, 4 * num_physical);
    memcpy(mask, m + mask_offset, h.slots_per_rank);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (ld(m, EPLB_OFF_CMD_SEQ) == s1) break;
  }
  uint64_t ack_id = ld(m, EPLB_OFF_ACK_ID);
  printf("\"mailbox\": {\"cmd_seq\": %" PRIu64 ", \"cmd_id\": %" PRIu64 ", \"cmd_layer\": %" PRIu64
         ", \"cmd_apply_step\": %" PRIu64 ", \"cmd_epoch\": %" PRIu64 ", \"ack_id\": %" PRIu64 ", \"ack_result\": %" PRIu64
         ", \"ack_step\": %" PRIu64 ", \"new_row\": [",
         cmd[0], cmd[1], cmd[2], cmd[3], cmd[4], ack_id, ld(m, EPLB_OFF_ACK_RESULT), ld(m, EPLB_OFF_ACK_STEP));
  for (uint64_t p = 0; p < num_physical; p++) printf("%s%d", p ? ", " : "", row[p]);
  printf("], \"copy_mask\": [");
  for (uint32_t s = 0; s < h.slots_per_rank; s++) printf("%s%u", s ? ", " : "", mask[s]);
  printf("]}, \"table\": [");
  free(row);
  free(mask);
  uint64_t n_entries = (uint64_t)(h.num_layers + 1) * h.num_tensors;
  for (uint64_t i = 0; i < n_entries; i++) {
    eplb_table_entry e;
    uint64_t at = h.table_offset + i * EPLB_TENSOR_ENTRY_BYTES;
    memcpy(&e, m + at, sizeof e);
    printf("%s{\"layer\": %" PRIu64 ", \"index\": %" PRIu64 ", \"name\": ", i ? ", " : "", i / h.num_tensors,
           i % h.num_tensors);
    json_str(e.name, sizeof e.name);
    printf(", \"dtype\": ");
    json_str(e.dtype, sizeof e.dtype);
    printf(", \"offset\": %" PRIu64 ", \"row_stride\": %" PRIu64 ", \"row_bytes\": %" PRIu64 ", \"rows\": %u, \"kind\": %u"
           ", \"reserved\": %u, \"handle\": %u",
           (uint64_t)e.offset, (uint64_t)e.row_stride, (uint64_t)e.row_bytes, (unsigned)e.rows, (unsigned)e.kind,
           (unsigned)e.reserved, (unsigned)e.handle);
    if (h.weights_kind == EPLB_WEIGHTS_HOST) {
      uint64_t f = 0xcbf29ce484222325ull;
      for (uint32_t r = 0; r < e.rows; r++) {
        uint64_t o = e.offset + (uint64_t)r * e.row_stride;
        if (o + e.row_bytes > len) die("table entry %" PRIu64 ": rows beyond the file", i);
        f = fnv1a64(m + o, e.row_bytes, f);
      }
      printf(", \"rows_fnv1a64\": %" PRIu64, f);
    }
    printf("}");
    nz += nonzero(m, at + cstrlen(e.name, sizeof e.name), at + sizeof e.name);
    nz += nonzero(m, at + offsetof(eplb_table_entry, dtype) + cstrlen(e.dtype, sizeof e.dtype),
                  at + offsetof(eplb_table_entry, dtype) + sizeof e.dtype);
  }
  printf("], \"ipc\": ");
  if (h.weights_kind == EPLB_WEIGHTS_CUDA_IPC) {
    const uint8_t *io = m + h.ipc_offset;
    printf("{\"pci_bus_id\": ");
    json_str(io + EPLB_IPC_PCI_BUS_ID, 16);
    nz += nonzero(m, h.ipc_offset + cstrlen(io + EPLB_IPC_PCI_BUS_ID, 16), h.ipc_offset + 16);
    nz += nonzero(m, h.ipc_offset + 32, h.ipc_offset + EPLB_IPC_HANDLES);
    printf(", \"uuid\": \"");
    for (int k = 0; k < 16; k++) printf("%02x", io[EPLB_IPC_UUID + k]);
    printf("\", \"handles\": [");
    for (uint32_t k = 0; k < h.num_handles; k++) {
      const uint8_t *he = io + EPLB_IPC_HANDLES + (uint64_t)k * EPLB_IPC_ENTRY_BYTES;
      uint64_t size;
      memcpy(&size, he + EPLB_IPC_ENTRY_SIZE, 8);
      printf("%s{\"handle\": \"", k ? ", " : "");
      for (int b = 0; b < EPLB_IPC_HANDLE_BYTES; b++) printf("%02x", he[b]);
      printf("\", \"bytes\": %" PRIu64 "}", size);
      nz += nonzero(he, EPLB_IPC_ENTRY_SIZE + 8, EPLB_IPC_ENTRY_BYTES);
    }
    printf("]}");
  } else {
    printf("null");
  }
  printf(", \"placement\": [");
  for (uint32_t l = 0; l < h.num_layers; l++) {
    printf("%s[", l ? ", " : "");
    for (uint64_t p = 0; p < num_physical; p++) {
      int32_t v;
      memcpy(&v, m + h.placement_offset + 4 * ((uint64_t)l * num_physical + p), 4);
      printf("%s%d", p ? ", " : "", v);
    }
    printf("]");
  }
  printf("], \"epochs\": [");
  for (uint32_t l = 0; l < h.num_layers; l++) printf("%s%" PRIu64, l ? ", " : "", ld(m, h.epochs_offset + 8 * (uint64_t)l));
  printf("], \"ring\": [");
  for (uint32_t i = 0; i < h.ring_len; i++) {
    const uint8_t *e = m + h.ring_offset + (uint64_t)i * h.ring_entry_bytes;
    printf("%s{\"index\": %u, \"seq\": %" PRIu64 ", \"step\": %" PRIu64 ", \"phase\": %" PRIu64 ", \"tokens\": %" PRIu64
           ", \"moe_ns\": %" PRIu64 ", \"counts\": ",
           i ? ", " : "", i, ld(e, EPLB_ENTRY_SEQ), ld(e, EPLB_ENTRY_STEP), ld(e, EPLB_ENTRY_PHASE), ld(e, EPLB_ENTRY_TOKENS),
           ld(e, EPLB_ENTRY_MOE_NS));
    counts_json(e, h.num_layers, cols, NULL);
    printf("}");
    nz += nonzero(e, EPLB_ENTRY_MOE_NS + 8, EPLB_ENTRY_COUNTS);
  }
  /* The steps the ring still holds, each read under its sequence lock. */
  printf("], \"steps\": [");
  uint64_t engine_step = ld(m, EPLB_OFF_ENGINE_STEP);
  uint64_t *copy = malloc(8 * h.num_layers * cols + 8);
  int first = 1;
  for (uint64_t t = engine_step > h.ring_len ? engine_step - h.ring_len : 0; t < engine_step; t++) {
    const uint8_t *e = m + h.ring_offset + (t % h.ring_len) * h.ring_entry_bytes;
    uint64_t step, phase, tokens;
    for (int tries = 0;; tries++) {
      if (tries == 1000) die("step %" PRIu64 ": the entry never stable", t);
      uint64_t s1 = ld(e, EPLB_ENTRY_SEQ);
      if (s1 % 2) continue;
      step = ld(e, EPLB_ENTRY_STEP);
      phase = ld(e, EPLB_ENTRY_PHASE);
      tokens = ld(e, EPLB_ENTRY_TOKENS);
      memcpy(copy, e + EPLB_ENTRY_COUNTS, 8 * h.num_layers * cols);
      __atomic_thread_fence(__ATOMIC_ACQUIRE);
      if (ld(e, EPLB_ENTRY_SEQ) == s1) break;
    }
    if (step != t) die("step %" PRIu64 " lost (the entry holds %" PRIu64 ")", t, step);
    printf("%s{\"step\": %" PRIu64 ", \"phase\": %" PRIu64 ", \"tokens\": %" PRIu64 ", \"counts\": ", first ? "" : ", ",
           t, phase, tokens);
    first = 0;
    counts_json(NULL, h.num_layers, cols, copy);
    printf("}");
  }
  free(copy);
  nz += nonzero(m, EPLB_OFF_TABLE_FAULT + 8, EPLB_OFF_CMD_SEQ) + nonzero(m, EPLB_OFF_CMD_EPOCH + 8, EPLB_OFF_ACK_ID);
  nz += nonzero(m, EPLB_OFF_ACK_STEP + 8, EPLB_HEADER_BYTES);
  printf("], \"reserved_nonzero_bytes\": %" PRIu64 "}\n", nz);
  munmap(m, len);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 2 && !strcmp(argv[1], "layout")) return layout();
  if (argc == 3 && !strcmp(argv[1], "dump")) return dump(argv[2]);
  if (argc == 4 && (!strcmp(argv[2], "host") || !strcmp(argv[2], "ipc"))) {
    int host = !strcmp(argv[2], "host");
    if (!strcmp(argv[1], "raw")) return raw(host, argv[3]);
    if (!strcmp(argv[1], "capi")) return capi(host, argv[3]);
  }
  fprintf(stderr, "usage: region_golden layout | dump PATH | raw|capi host|ipc OUT\n");
  return 2;
}
