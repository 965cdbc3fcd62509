// The C++ reference engine: N ranks under mpirun, on the C API of libeplb_client alone
// (client/include/eplb_client.h) and MPI. docs/cpp-engine.md says how to build and run it.
//
//   mpirun -n 4 target/cpp_engine/eplb_cpp_engine --name demo --steps 200
//       --trace expert_freq_qwen_policy_datasets.csv --trace-dataset wikitext --report engine.json
//
// Every step, every rank:
//
// 1. eplb_at_step_boundary: the library reads the mailbox, the ranks agree (`agree`: one
//    MPI_Allreduce of two u64), a command is applied in place (host weights: the library copies the
//    staging rows inside the region) or answered, and the router gets the live placement
//    (eplb_phy2log of the layer it names);
// 2. makes the step's tokens and, layer by layer: routes every token (top-k, following the load),
//    maps each (token, expert) pair to the slot the placement and the replica rule choose
//    (replica `(token + layer) % logcnt` of log2phy, slots in ascending order: the contract's
//    rule, the Python engine's), computes only the pairs of its own slots with the weights in the
//    shared-memory region (bf16 `w13_weight` [slots][H][2F] and `w2_weight` [slots][F][H], the
//    latter with a padded row stride), all-gathers the pair results (MPI_Allgatherv), combines
//    them in fixed top-k order with weights from the GLOBAL tensor `gate_weight` [E][H] (read from
//    the region, never moved), and checks the combined output of its share of the tokens against
//    the reference forward pass (every expert held once, weights generated from (seed, layer,
//    expert)): equal integers, so bit for bit;
// 3. eplb_record: its per-slot counts (counts_kind local) and the MoE time into the load ring.
//
// The math is the Python reference engine's (python/eplb_engine/model.py), in integers: weights in
// [-7, 7], activations in [-15, 15], SwiGLU with the integer hard-swish
// `hswish(g) = g * clip(g + 3s, 0, 6s) / 6s` (floor), `h = clip(rshift(hswish(g) * u, 12), -15, 15)`,
// `y = h @ w2`, residual `x = clip(x + rshift(out, 12), -15, 15)`. Every value is an exact integer,
// so the EP forward pass equals the reference whatever the batching, on every rank. The router is
// its own (no numpy here): each token's top-k experts are drawn without replacement in proportion
// to the trace's load (+0.5), from splitmix64 of (seed, step, layer, token, k); the same bits on
// every rank.
//
// Rank 0 writes the report with the Python engine's keys (steps, outputs_match, layers committed,
// commit step disagreements, wrong bytes, global bytes changed, balancedness static/live from its
// own counts, client times). Exit 0 only if every step matched and nothing wrong was applied;
// 2 for bad input; 1 for a runtime failure.

#include <mpi.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "eplb_client.h"

namespace {

// ---- the model's constants (python/eplb_engine/model.py) ----------------------------------------

constexpr int64_t XMAX = 15;      // activations in [-XMAX, XMAX]
constexpr int64_t WMAX = 7;       // weights in [-WMAX, WMAX]
constexpr int H_SHIFT = 12;       // rshift of hswish(gate) * up
constexpr int OUT_SHIFT = 12;     // rshift of the combined output into the residual
constexpr int64_t GATE_UNITS = 64;  // combine weights are integers in [1, GATE_UNITS]

// Tensor indices in a layer (the order of the table).
constexpr uint32_t T_W13 = 0, T_W2 = 1, T_GATE = 2, NUM_TENSORS = 3;
// w2_weight's rows are padded by this many bytes: the engine honours row_stride != row_bytes,
// as vLLM's and SGLang's tensors may need.
constexpr uint64_t W2_PAD = 64;

// An input the user can fix: exit 2 with this message.
struct BadInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A failure at run time (the library, MPI): exit 1.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A pure function of its key words: the generator of weights, tokens and routing.
uint64_t hash_key(std::initializer_list<uint64_t> words) {
  uint64_t h = 0x6A09E667F3BCC908ull;
  for (uint64_t w : words) h = splitmix64(h ^ w);
  return h;
}

// An integer uniform on [-m, m] from a hash.
int64_t uniform(uint64_t h, int64_t m) { return static_cast<int64_t>(h % static_cast<uint64_t>(2 * m + 1)) - m; }

// bf16 of a small integer (|v| <= 127): exact, the upper half of the float's bits.
uint16_t to_bf16(int64_t v) {
  float f = static_cast<float>(v);
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>(bits >> 16);
}
int32_t from_bf16(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return static_cast<int32_t>(f);
}

int64_t rshift(int64_t a, int bits) { return (a + (int64_t{1} << (bits - 1))) >> bits; }  // round half up
int64_t clip(int64_t v, int64_t lo, int64_t hi) { return std::min(std::max(v, lo), hi); }

double uniform_std(int64_t m) { return std::sqrt((static_cast<double>((2 * m + 1) * (2 * m + 1)) - 1.0) / 12.0); }

uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

// ---- flags ----------------------------------------------------------------------------------------

struct Args {
  std::string name = "demo";
  uint32_t steps = 100;
  std::string trace, trace_dataset;
  uint32_t num_layers = 8, num_experts = 64, slots_per_rank = 0, tokens = 512, top_k = 2, hidden = 32, ffn = 32;
  uint64_t seed = 0;
  uint32_t drift_steps = 100;
  std::string phase = "decode";
  std::string boundary = "two-phase";  // two-phase: eplb_boundary_begin/end around MPI; callback: eplb_at_step_boundary
  uint32_t ring_len = 64;
  double wait_sidecar = 0.0;
  std::string report;
  uint32_t log_every = 0;
  int64_t die_at_step = -1;
  uint32_t die_rank = 0;
};

const char* USAGE =
    "usage: eplb_cpp_engine [--name NAME] [--steps S] [--trace FILE.csv|FILE.npy [--trace-dataset D]]\n"
    "       [--num-layers L] [--num-experts E] [--slots-per-rank S] [--tokens T] [--top-k K] [--hidden H]\n"
    "       [--ffn F] [--seed N] [--drift-steps N] [--phase decode|prefill|mixed] [--ring-len N]\n"
    "       [--boundary two-phase|callback]\n"
    "       [--wait-sidecar SECONDS] [--report OUT.json] [--log-every N] [--die-at-step K [--die-rank R]]\n";

uint64_t parse_u64(const std::string& flag, const std::string& v, uint64_t max) {
  if (v.empty() || v.find_first_not_of("0123456789") != std::string::npos || v.size() > 19)
    throw BadInput(flag + ": '" + v + "' is not a non-negative integer");
  uint64_t x = std::stoull(v);
  if (x > max) throw BadInput(flag + ": " + v + " is above " + std::to_string(max));
  return x;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i];
    if (f == "-h" || f == "--help") {
      std::fputs(USAGE, stdout);
      std::exit(0);
    }
    if (i + 1 >= argc) throw BadInput(f + ": a value is missing (see --help)");
    std::string v = argv[++i];
    const uint64_t u32 = 0xFFFFFFFFull;
    if (f == "--name") a.name = v;
    else if (f == "--steps") a.steps = static_cast<uint32_t>(parse_u64(f, v, 100000000));
    else if (f == "--trace") a.trace = v;
    else if (f == "--trace-dataset") a.trace_dataset = v;
    else if (f == "--num-layers") a.num_layers = static_cast<uint32_t>(parse_u64(f, v, 4096));
    else if (f == "--num-experts") a.num_experts = static_cast<uint32_t>(parse_u64(f, v, 65536));
    else if (f == "--slots-per-rank") a.slots_per_rank = static_cast<uint32_t>(parse_u64(f, v, 65536));
    else if (f == "--tokens") a.tokens = static_cast<uint32_t>(parse_u64(f, v, 1 << 24));
    else if (f == "--top-k") a.top_k = static_cast<uint32_t>(parse_u64(f, v, 64));
    else if (f == "--hidden") a.hidden = static_cast<uint32_t>(parse_u64(f, v, 4096));
    else if (f == "--ffn") a.ffn = static_cast<uint32_t>(parse_u64(f, v, 4096));
    else if (f == "--seed") a.seed = parse_u64(f, v, ~0ull);
    else if (f == "--drift-steps") a.drift_steps = static_cast<uint32_t>(parse_u64(f, v, u32));
    else if (f == "--phase") a.phase = v;
    else if (f == "--boundary") a.boundary = v;
    else if (f == "--ring-len") a.ring_len = static_cast<uint32_t>(parse_u64(f, v, 1 << 20));
    else if (f == "--wait-sidecar") a.wait_sidecar = static_cast<double>(parse_u64(f, v, 86400));
    else if (f == "--report") a.report = v;
    else if (f == "--log-every") a.log_every = static_cast<uint32_t>(parse_u64(f, v, u32));
    else if (f == "--die-at-step") a.die_at_step = static_cast<int64_t>(parse_u64(f, v, u32));
    else if (f == "--die-rank") a.die_rank = static_cast<uint32_t>(parse_u64(f, v, u32));
    else throw BadInput("unknown flag " + f + " (see --help)");
  }
  if (a.phase != "decode" && a.phase != "prefill" && a.phase != "mixed") throw BadInput("--phase: decode|prefill|mixed");
  if (a.boundary != "two-phase" && a.boundary != "callback") throw BadInput("--boundary: two-phase|callback");
  if (a.hidden == 0 || a.ffn == 0 || a.tokens == 0) throw BadInput("--hidden, --ffn and --tokens must be >= 1");
  if (a.drift_steps == 0) throw BadInput("--drift-steps must be >= 1");
  return a;
}

// ---- the load: a trace or the built-in drifting load ---------------------------------------------

// [iterations][layers][experts] token counts; step t follows iteration t % iterations.
struct Load {
  uint32_t iters = 0, layers = 0, experts = 0;
  std::vector<double> v;
  double at(uint32_t i, uint32_t l, uint32_t e) const { return v[(static_cast<size_t>(i) * layers + l) * experts + e]; }
};

std::vector<std::string> split_csv(const std::string& line) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : line) {
    if (c == ',') {
      out.push_back(cur);
      cur.clear();
    } else if (c != '\r') {
      cur.push_back(c);
    }
  }
  out.push_back(cur);
  return out;
}

// The per-iteration CSV of shared/traces/harmoeny_qwen15moe_switch (python/eplb_engine/loads.py).
Load read_csv(const std::string& path, std::string dataset) {
  std::ifstream f(path);
  if (!f) throw BadInput(path + ": cannot open (" + std::strerror(errno) + ")");
  std::string line;
  std::vector<std::vector<std::string>> rows;
  while (std::getline(f, line)) {
    if (!line.empty() && line != "\r") rows.push_back(split_csv(line));
  }
  if (rows.size() < 2 || rows[0].size() < 5 || rows[0][1] != "dataset" || rows[0][2] != "iteration" ||
      rows[0][3] != "layer_idx")
    throw BadInput(path + ": not a per-iteration CSV (header ',dataset,iteration,layer_idx,0,1,...')");
  const size_t num_experts = rows[0].size() - 4;
  std::set<std::string> names;
  for (size_t i = 1; i < rows.size(); ++i) names.insert(rows[i][1]);
  if (dataset.empty()) dataset = rows[1][1];
  if (!names.count(dataset)) {
    std::string all;
    for (auto& n : names) all += (all.empty() ? "" : ", ") + n;
    throw BadInput(path + ": no dataset '" + dataset + "'; it has " + all);
  }
  std::map<long long, uint32_t> iters, layers;
  std::vector<size_t> sel;
  for (size_t i = 1; i < rows.size(); ++i) {
    if (rows[i][1] != dataset) continue;
    if (rows[i].size() != num_experts + 4)
      throw BadInput(path + ": line " + std::to_string(i + 1) + " has " + std::to_string(rows[i].size()) +
                     " columns, the header " + std::to_string(num_experts + 4));
    try {
      iters[std::stoll(rows[i][2])] = 0;
      layers[std::stoll(rows[i][3])] = 0;
    } catch (const std::exception&) {
      throw BadInput(path + ": line " + std::to_string(i + 1) + ": iteration and layer_idx must be integers");
    }
    sel.push_back(i);
  }
  uint32_t k = 0;
  for (auto& p : iters) p.second = k++;
  k = 0;
  for (auto& p : layers) p.second = k++;
  Load load;
  load.iters = static_cast<uint32_t>(iters.size());
  load.layers = static_cast<uint32_t>(layers.size());
  load.experts = static_cast<uint32_t>(num_experts);
  load.v.assign(static_cast<size_t>(load.iters) * load.layers * load.experts, 0.0);
  for (size_t i : sel) {
    size_t base = (static_cast<size_t>(iters[std::stoll(rows[i][2])]) * load.layers + layers[std::stoll(rows[i][3])]) *
                  load.experts;
    for (size_t e = 0; e < num_experts; ++e) {
      char* end = nullptr;
      const std::string& s = rows[i][4 + e];
      double x = std::strtod(s.c_str(), &end);
      if (s.empty() || *end != '\0' || !std::isfinite(x) || x < 0)
        throw BadInput(path + ": line " + std::to_string(i + 1) + ": count '" + s + "' is not a finite number >= 0");
      load.v[base + e] = x;
    }
  }
  return load;
}

// A .npy [steps][layers][experts] of f8/f4/i8/i4/u8/u4 little-endian, C order.
Load read_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw BadInput(path + ": cannot open (" + std::strerror(errno) + ")");
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw BadInput(path + ": not a .npy file");
  uint32_t hlen = 0;
  if (magic[6] == 1) {
    unsigned char b[2];
    f.read(reinterpret_cast<char*>(b), 2);
    hlen = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4];
    f.read(reinterpret_cast<char*>(b), 4);
    hlen = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  }
  if (!f || hlen > (1u << 20)) throw BadInput(path + ": a truncated .npy header");
  std::string h(hlen, '\0');
  if (!f.read(&h[0], hlen)) throw BadInput(path + ": a truncated .npy header");
  auto field = [&](const std::string& key) {
    size_t p = h.find("'" + key + "'");
    if (p == std::string::npos) throw BadInput(path + ": .npy header without '" + key + "'");
    p = h.find(':', p);
    size_t q = p + 1;
    while (q < h.size() && h[q] == ' ') ++q;
    return h.substr(q);
  };
  std::string descr = field("descr"), fortran = field("fortran_order"), shape = field("shape");
  if (fortran.rfind("False", 0) != 0) throw BadInput(path + ": a Fortran-order .npy (save it C-ordered)");
  std::string d = descr.substr(1, 3);
  size_t item;
  if (d == "<f8" || d == "<i8" || d == "<u8") item = 8;
  else if (d == "<f4" || d == "<i4" || d == "<u4") item = 4;
  else throw BadInput(path + ": dtype " + d + ", want <f8, <f4, <i8, <i4, <u8 or <u4");
  std::vector<uint64_t> dims;
  {
    size_t a = shape.find('('), b = shape.find(')');
    std::stringstream ss(shape.substr(a + 1, b - a - 1));
    std::string tok;
    while (std::getline(ss, tok, ',')) {
      tok.erase(std::remove(tok.begin(), tok.end(), ' '), tok.end());
      if (!tok.empty()) dims.push_back(parse_u64(path + ": shape", tok, 1u << 30));
    }
  }
  if (dims.size() != 3 || dims[0] == 0 || dims[1] == 0 || dims[2] == 0)
    throw BadInput(path + ": want a non-empty [steps][layers][experts] array");
  Load load;
  load.iters = static_cast<uint32_t>(dims[0]);
  load.layers = static_cast<uint32_t>(dims[1]);
  load.experts = static_cast<uint32_t>(dims[2]);
  size_t n = dims[0] * dims[1] * dims[2];
  if (n > (size_t{1} << 31)) throw BadInput(path + ": too large");
  std::vector<char> raw(n * item);
  if (!f.read(raw.data(), static_cast<std::streamsize>(raw.size()))) throw BadInput(path + ": truncated data");
  load.v.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const char* p = raw.data() + i * item;
    double x;
    if (d == "<f8") { double y; std::memcpy(&y, p, 8); x = y; }
    else if (d == "<f4") { float y; std::memcpy(&y, p, 4); x = y; }
    else if (d == "<i8") { int64_t y; std::memcpy(&y, p, 8); x = static_cast<double>(y); }
    else if (d == "<i4") { int32_t y; std::memcpy(&y, p, 4); x = y; }
    else if (d == "<u8") { uint64_t y; std::memcpy(&y, p, 8); x = static_cast<double>(y); }
    else { uint32_t y; std::memcpy(&y, p, 4); x = y; }
    if (!std::isfinite(x) || x < 0) throw BadInput(path + ": element " + std::to_string(i) + " is not a finite count >= 0");
    load.v[i] = x;
  }
  return load;
}

// Zipf-like hot experts (weight 1000 / (1 + rank)) whose order rotates by one expert every
// drift_steps / experts steps, each layer with its own shuffled order (loads.drifting_load's
// shape, with a splitmix64 shuffle).
Load drifting_load(uint32_t layers, uint32_t experts, uint32_t steps, uint32_t drift_steps, uint64_t seed) {
  Load load;
  load.iters = std::max<uint32_t>(1, steps);
  load.layers = layers;
  load.experts = experts;
  load.v.assign(static_cast<size_t>(load.iters) * layers * experts, 0.0);
  for (uint32_t l = 0; l < layers; ++l) {
    std::vector<uint32_t> perm(experts);
    for (uint32_t e = 0; e < experts; ++e) perm[e] = e;
    for (uint32_t e = experts; e > 1; --e) std::swap(perm[e - 1], perm[hash_key({seed, 7, l, e}) % e]);
    for (uint32_t t = 0; t < load.iters; ++t) {
      uint64_t shift = static_cast<uint64_t>(t) * experts / drift_steps;
      for (uint32_t e = 0; e < experts; ++e)
        load.v[(static_cast<size_t>(t) * layers + l) * experts + e] = 1000.0 / (1.0 + static_cast<double>((perm[e] + shift) % experts));
    }
  }
  return load;
}

// ---- the reference MoE math, in integers -----------------------------------------------------------

struct Shape {
  uint32_t L, E, H, F, K;
  int64_t gate_scale;
};

// w13 [H][2F] and w2 [F][H] of (layer, expert): integers in [-WMAX, WMAX], a pure function of the key.
int64_t w13_value(uint64_t seed, uint32_t layer, uint32_t expert, size_t i) { return uniform(hash_key({seed, layer, expert, 13, i}), WMAX); }
int64_t w2_value(uint64_t seed, uint32_t layer, uint32_t expert, size_t i) { return uniform(hash_key({seed, layer, expert, 2, i}), WMAX); }
// The router's gate [E][H]: the global tensor; integers in [-WMAX, WMAX].
int64_t gate_value(uint64_t seed, uint32_t layer, size_t i) { return uniform(hash_key({seed, layer, 1u << 20, i}), WMAX); }

// One expert on one token: x [H] -> y [H]; w13 [H][2F], w2 [F][H] as int8.
void expert_forward(const Shape& s, const int32_t* x, const int8_t* w13, const int8_t* w2, int64_t* gu, int32_t* y) {
  const uint32_t H = s.H, F = s.F;
  for (uint32_t j = 0; j < 2 * F; ++j) gu[j] = 0;
  for (uint32_t i = 0; i < H; ++i) {
    const int64_t xi = x[i];
    const int8_t* row = w13 + static_cast<size_t>(i) * 2 * F;
    for (uint32_t j = 0; j < 2 * F; ++j) gu[j] += xi * row[j];
  }
  for (uint32_t i = 0; i < H; ++i) y[i] = 0;
  const int64_t s3 = 3 * s.gate_scale;
  for (uint32_t j = 0; j < F; ++j) {
    const int64_t g = gu[j], u = gu[F + j];
    int64_t t = clip(g + s3, 0, 2 * s3) * g;
    // floor division, as numpy's // on int64
    int64_t q = t / (2 * s3);
    if ((t % (2 * s3) != 0) && (t < 0)) --q;
    const int64_t h = clip(rshift(q * u, H_SHIFT), -XMAX, XMAX);
    if (h == 0) continue;
    const int8_t* row = w2 + static_cast<size_t>(j) * H;
    for (uint32_t i = 0; i < H; ++i) y[i] += static_cast<int32_t>(h * row[i]);
  }
}

// ---- the engine ---------------------------------------------------------------------------------

struct Commit {
  int64_t step, layer, nth;  // the nth apply of layer on this rank (0, 1, ...): the epoch's stand-in
};

int agree_allreduce(void* user, uint64_t have, uint64_t* min_out, uint64_t* max_out) {
  // One MPI_Allreduce of {have, ~have} with MPI_MAX: max, and ~min. Exact for every u64.
  auto* comm = static_cast<MPI_Comm*>(user);
  uint64_t in[2] = {have, ~have}, out[2] = {0, 0};
  if (MPI_Allreduce(in, out, 2, MPI_UINT64_T, MPI_MAX, *comm) != MPI_SUCCESS) return 1;
  *max_out = out[0];
  *min_out = ~out[1];
  return 0;
}

std::string last_error() {
  const char* m = eplb_last_error();
  return m ? m : "";
}

void check(eplb_status st, const char* what) {
  if (st == EPLB_OK) return;
  std::string msg = std::string(what) + ": status " + std::to_string(static_cast<int>(st)) + ": " + last_error();
  if (st == EPLB_ERR_INVALID) throw BadInput(msg);
  throw Failure(msg);
}

std::string json_num(double x) {
  if (!std::isfinite(x)) return "null";
  char b[64];
  std::snprintf(b, sizeof b, "%.17g", x);
  return b;
}

// {count, median, p99, max} as numpy computes them (linear percentile).
std::string stats_json(std::vector<double> a) {
  if (a.empty()) return "{\"count\": 0}";
  std::sort(a.begin(), a.end());
  auto pct = [&](double q) {
    double idx = q / 100.0 * static_cast<double>(a.size() - 1);
    size_t lo = static_cast<size_t>(std::floor(idx));
    size_t hi = std::min(lo + 1, a.size() - 1);
    return a[lo] + (a[hi] - a[lo]) * (idx - static_cast<double>(lo));
  };
  return "{\"count\": " + std::to_string(a.size()) + ", \"median\": " + json_num(pct(50)) + ", \"p99\": " +
         json_num(pct(99)) + ", \"max\": " + json_num(a.back()) + "}";
}

double median(std::vector<double> a) {
  if (a.empty()) return 0.0;
  std::sort(a.begin(), a.end());
  size_t n = a.size();
  return n % 2 ? a[n / 2] : 0.5 * (a[n / 2 - 1] + a[n / 2]);
}

std::string json_str(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\', o += c;
    else if (static_cast<unsigned char>(c) < 0x20) {
      char b[8];
      std::snprintf(b, sizeof b, "\\u%04x", c);
      o += b;
    } else o += c;
  }
  return o + "\"";
}

// Mean over steps and layers of mean / max of the per-rank loads (1 where a layer has none):
// loads.balancedness. rank_load [steps][L][N].
double balancedness(const std::vector<int64_t>& rank_load, size_t steps, size_t L, size_t N) {
  if (steps * L == 0) return 1.0;
  double sum = 0;
  for (size_t i = 0; i < steps * L; ++i) {
    int64_t mx = 0, tot = 0;
    for (size_t r = 0; r < N; ++r) {
      mx = std::max(mx, rank_load[i * N + r]);
      tot += rank_load[i * N + r];
    }
    sum += mx > 0 ? (static_cast<double>(tot) / static_cast<double>(N)) / static_cast<double>(mx) : 1.0;
  }
  return sum / static_cast<double>(steps * L);
}

class Engine {
 public:
  Engine(MPI_Comm comm, Args args) : comm_(comm), a_(std::move(args)) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &world_);
    if (!a_.trace.empty()) {
      const std::string& t = a_.trace;
      load_ = (t.size() > 4 && t.compare(t.size() - 4, 4, ".npy") == 0) ? read_npy(t) : read_csv(t, a_.trace_dataset);
    } else {
      load_ = drifting_load(a_.num_layers, a_.num_experts, a_.steps, a_.drift_steps, a_.seed);
    }
    const uint32_t N = static_cast<uint32_t>(world_);
    s_.L = load_.layers;
    s_.E = load_.experts;
    s_.H = a_.hidden;
    s_.F = a_.ffn;
    s_.K = a_.top_k;
    s_.gate_scale = std::max<int64_t>(1, std::llround(std::sqrt(static_cast<double>(s_.H)) * uniform_std(XMAX) * uniform_std(WMAX)));
    if (s_.K < 1 || s_.K > s_.E) throw BadInput("--top-k " + std::to_string(s_.K) + " must be in [1, " + std::to_string(s_.E) + "]");
    S_ = a_.slots_per_rank ? a_.slots_per_rank : (s_.E + N + N - 1) / N;
    if (static_cast<uint64_t>(S_) * N < s_.E)
      throw BadInput(std::to_string(S_) + " slots a rank x " + std::to_string(N) + " ranks < " + std::to_string(s_.E) +
                     " experts: raise --slots-per-rank");
    P_ = S_ * N;
    tok_lo_ = static_cast<uint32_t>(static_cast<uint64_t>(a_.tokens) * rank_ / N);
    tok_hi_ = static_cast<uint32_t>(static_cast<uint64_t>(a_.tokens) * (rank_ + 1) / N);
    // Router weights of every (iteration, layer): floor(2 * load) + 1, integers (the load + 0.5).
    // Every rank computes them from the same file with the same code: the same integers.
    route_w_.resize(load_.v.size());
    for (size_t i = 0; i < load_.v.size(); ++i) route_w_[i] = static_cast<uint64_t>(std::floor(2.0 * std::min(load_.v[i], 1e15))) + 1;

    // The initial placement: slot p holds expert p % E (every expert at least once).
    phy2log0_.assign(static_cast<size_t>(s_.L) * P_, 0);
    for (uint32_t l = 0; l < s_.L; ++l)
      for (uint32_t p = 0; p < P_; ++p) phy2log0_[static_cast<size_t>(l) * P_ + p] = static_cast<int32_t>(p % s_.E);
    phy2log_ = phy2log0_;
    derive_all(phy2log0_, log2phy0_, logcnt0_);
    derive_all(phy2log_, log2phy_, logcnt_);

    // The reference holds every expert once, int8.
    const size_t n13 = static_cast<size_t>(s_.H) * 2 * s_.F, n2 = static_cast<size_t>(s_.F) * s_.H;
    ref13_.resize(static_cast<size_t>(s_.L) * s_.E * n13);
    ref2_.resize(static_cast<size_t>(s_.L) * s_.E * n2);
    for (uint32_t l = 0; l < s_.L; ++l)
      for (uint32_t e = 0; e < s_.E; ++e) {
        int8_t* a = &ref13_[(static_cast<size_t>(l) * s_.E + e) * n13];
        int8_t* b = &ref2_[(static_cast<size_t>(l) * s_.E + e) * n2];
        for (size_t i = 0; i < n13; ++i) a[i] = static_cast<int8_t>(w13_value(a_.seed, l, e, i));
        for (size_t i = 0; i < n2; ++i) b[i] = static_cast<int8_t>(w2_value(a_.seed, l, e, i));
      }
    create_region();
  }

  ~Engine() { eplb_close(region_); }

  // ---- the region ----
  void create_region() {
    row13_ = static_cast<uint64_t>(s_.H) * 2 * s_.F * 2;  // bf16
    row2_ = static_cast<uint64_t>(s_.F) * s_.H * 2;
    rowg_ = static_cast<uint64_t>(s_.H) * 4;  // f32
    std::vector<eplb_tensor_desc> descs(static_cast<size_t>(s_.L) * NUM_TENSORS);
    for (uint32_t l = 0; l < s_.L; ++l) {
      eplb_tensor_desc* d = &descs[static_cast<size_t>(l) * NUM_TENSORS];
      d[T_W13] = desc("w13_weight", "bf16", EPLB_KIND_EXPERT, S_, row13_, row13_);
      d[T_W2] = desc("w2_weight", "bf16", EPLB_KIND_EXPERT, S_, row2_, row2_ + W2_PAD);
      d[T_GATE] = desc("gate_weight", "f32", EPLB_KIND_GLOBAL, s_.E, rowg_, rowg_);
    }
    eplb_config cfg;
    std::memset(&cfg, 0, sizeof cfg);
    cfg.rank = static_cast<uint32_t>(rank_);
    cfg.world_size = static_cast<uint32_t>(world_);
    cfg.num_layers = s_.L;
    cfg.slots_per_rank = S_;
    cfg.num_logical = s_.E;
    cfg.ring_len = a_.ring_len;
    cfg.weights_kind = EPLB_WEIGHTS_HOST;
    cfg.counts_kind = EPLB_COUNTS_LOCAL;
    cfg.num_tensors = NUM_TENSORS;
    cfg.tensors = descs.data();
    cfg.staging = nullptr;  // host weights: the library allocates the staging layer in the region
    cfg.phy2log = phy2log0_.data();
    check(eplb_create(a_.name.c_str(), &cfg, nullptr, nullptr, &region_), "eplb_create");

    // The engine initialises its weights where the library placed them, and computes with them.
    w13_.resize(s_.L);
    w2_.resize(s_.L);
    gate_.resize(s_.L);
    gate0_.resize(s_.L);
    for (uint32_t l = 0; l < s_.L; ++l) {
      w13_[l] = static_cast<unsigned char*>(eplb_tensor_ptr(region_, l, T_W13));
      w2_[l] = static_cast<unsigned char*>(eplb_tensor_ptr(region_, l, T_W2));
      gate_[l] = static_cast<unsigned char*>(eplb_tensor_ptr(region_, l, T_GATE));
      if (!w13_[l] || !w2_[l] || !gate_[l]) throw Failure("eplb_tensor_ptr(layer " + std::to_string(l) + "): " + last_error());
      for (uint32_t s = 0; s < S_; ++s) write_expert(l, s, phy2log0_[static_cast<size_t>(l) * P_ + rank_ * S_ + s]);
      gate0_[l].resize(static_cast<size_t>(s_.E) * rowg_);
      for (uint32_t e = 0; e < s_.E; ++e)
        for (uint32_t i = 0; i < s_.H; ++i) {
          float v = static_cast<float>(gate_value(a_.seed, l, static_cast<size_t>(e) * s_.H + i));
          std::memcpy(gate_[l] + e * rowg_ + i * 4, &v, 4);
        }
      std::memcpy(gate0_[l].data(), gate_[l], gate0_[l].size());
    }
    check(eplb_publish(region_), "eplb_publish");
  }

  eplb_tensor_desc desc(const char* name, const char* dtype, uint32_t kind, uint32_t rows, uint64_t row_bytes, uint64_t row_stride) {
    eplb_tensor_desc d;
    std::memset(&d, 0, sizeof d);
    d.name = name;
    d.dtype = dtype;
    d.kind = kind;
    d.rows = rows;
    d.row_bytes = row_bytes;
    d.row_stride = row_stride;
    d.ipc_handle = nullptr;
    d.ipc_offset = 0;
    return d;
  }

  // Expert e's rows, bf16, into local slot s of layer l (the row stride honoured).
  void write_expert(uint32_t l, uint32_t s, int32_t e) {
    const size_t n13 = static_cast<size_t>(s_.H) * 2 * s_.F, n2 = static_cast<size_t>(s_.F) * s_.H;
    uint16_t* a = reinterpret_cast<uint16_t*>(w13_[l] + s * row13_);
    uint16_t* b = reinterpret_cast<uint16_t*>(w2_[l] + s * (row2_ + W2_PAD));
    const int8_t* ra = &ref13_[(static_cast<size_t>(l) * s_.E + e) * n13];
    const int8_t* rb = &ref2_[(static_cast<size_t>(l) * s_.E + e) * n2];
    for (size_t i = 0; i < n13; ++i) a[i] = to_bf16(ra[i]);
    for (size_t i = 0; i < n2; ++i) b[i] = to_bf16(rb[i]);
  }

  // Bytes of layer l's local slots that differ from the experts phy2log names (rows' own bytes only).
  int64_t wrong_bytes(uint32_t l) {
    const size_t n13 = static_cast<size_t>(s_.H) * 2 * s_.F, n2 = static_cast<size_t>(s_.F) * s_.H;
    int64_t wrong = 0;
    for (uint32_t s = 0; s < S_; ++s) {
      int32_t e = phy2log_[static_cast<size_t>(l) * P_ + rank_ * S_ + s];
      const unsigned char* a = w13_[l] + s * row13_;
      const unsigned char* b = w2_[l] + s * (row2_ + W2_PAD);
      const int8_t* ra = &ref13_[(static_cast<size_t>(l) * s_.E + e) * n13];
      const int8_t* rb = &ref2_[(static_cast<size_t>(l) * s_.E + e) * n2];
      for (size_t i = 0; i < n13; ++i) {
        uint16_t want = to_bf16(ra[i]);
        wrong += (a[2 * i] != (want & 0xFF)) + (a[2 * i + 1] != (want >> 8));
      }
      for (size_t i = 0; i < n2; ++i) {
        uint16_t want = to_bf16(rb[i]);
        wrong += (b[2 * i] != (want & 0xFF)) + (b[2 * i + 1] != (want >> 8));
      }
    }
    return wrong;
  }

  int64_t global_bytes_changed() {
    int64_t changed = 0;
    for (uint32_t l = 0; l < s_.L; ++l)
      for (size_t i = 0; i < gate0_[l].size(); ++i) changed += gate_[l][i] != gate0_[l][i];
    return changed;
  }

  // log2phy [L][E][P] (replicas in ascending slot order, -1 padded) and logcnt [L][E].
  void derive_layer(const std::vector<int32_t>& phy2log, uint32_t l, std::vector<int32_t>& log2phy, std::vector<int32_t>& logcnt) {
    int32_t* cnt = &logcnt[static_cast<size_t>(l) * s_.E];
    int32_t* out = &log2phy[static_cast<size_t>(l) * s_.E * P_];
    std::fill(cnt, cnt + s_.E, 0);
    std::fill(out, out + static_cast<size_t>(s_.E) * P_, -1);
    for (uint32_t p = 0; p < P_; ++p) {
      int32_t e = phy2log[static_cast<size_t>(l) * P_ + p];
      if (e < 0 || static_cast<uint32_t>(e) >= s_.E) throw Failure("layer " + std::to_string(l) + ": phy2log holds expert " + std::to_string(e));
      out[static_cast<size_t>(e) * P_ + cnt[e]++] = static_cast<int32_t>(p);
    }
    for (uint32_t e = 0; e < s_.E; ++e)
      if (cnt[e] == 0) throw Failure("layer " + std::to_string(l) + ": expert " + std::to_string(e) + " has no slot in the placement");
  }
  void derive_all(const std::vector<int32_t>& phy2log, std::vector<int32_t>& log2phy, std::vector<int32_t>& logcnt) {
    log2phy.assign(static_cast<size_t>(s_.L) * s_.E * P_, -1);
    logcnt.assign(static_cast<size_t>(s_.L) * s_.E, 0);
    for (uint32_t l = 0; l < s_.L; ++l) derive_layer(phy2log, l, log2phy, logcnt);
  }

  // ---- waiting for a sidecar (demos and tests only: an engine never waits for its sidecar) ----

  // Whether a sidecar attached to every engine rank's region within `seconds` (collective). Reads
  // the header's sidecar_pid (EPLB_OFF_SIDECAR_PID: 0 until a sidecar attaches; the C API has no
  // call for it) through a read-only mapping of this rank's region; beats the heartbeat meanwhile.
  bool wait_for_sidecar(double seconds) {
    std::string path = "/dev/shm/eplb-" + a_.name + "-" + std::to_string(rank_);
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    void* m = MAP_FAILED;
    if (fd >= 0) {
      m = mmap(nullptr, 4096, PROT_READ, MAP_SHARED, fd, 0);
      close(fd);
    }
    uint64_t attached = 0;
    if (m != MAP_FAILED) {
      const uint64_t* pid = reinterpret_cast<const uint64_t*>(static_cast<const char*>(m) + EPLB_OFF_SIDECAR_PID);
      uint64_t deadline = now_ns() + static_cast<uint64_t>(seconds * 1e9);
      while ((attached = __atomic_load_n(pid, __ATOMIC_ACQUIRE) != 0 ? 1 : 0) == 0 && now_ns() < deadline) {
        check(eplb_heartbeat(region_), "eplb_heartbeat");
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      munmap(m, 4096);
    } else {
      std::fprintf(stderr, "# rank %d: cannot map %s to wait for the sidecar: %s\n", rank_, path.c_str(), std::strerror(errno));
    }
    uint64_t every = 0;
    MPI_Allreduce(&attached, &every, 1, MPI_UINT64_T, MPI_MIN, comm_);
    return every != 0;
  }

  // ---- one layer ----

  // The EP forward pass of layer l on x [T][H] (the whole batch, the same on every rank).
  // Returns whether this rank's tokens equal the reference bit for bit; replaces x by the
  // next layer's input. Adds this rank's computed pairs to counts[slot] and the initial
  // placement's per-rank pairs of this rank's tokens to static_load[rank].
  bool moe_layer(uint32_t step, uint32_t l, std::vector<int32_t>& x, uint64_t* counts, int64_t* static_load) {
    const uint32_t T = a_.tokens, K = s_.K, H = s_.H, N = static_cast<uint32_t>(world_);
    const uint64_t* lw = &route_w_[(static_cast<size_t>(step % load_.iters) * s_.L + l) * s_.E];
    const float* gate = reinterpret_cast<const float*>(gate_[l]);
    // Route: top-k without replacement in proportion to the load; combine weights from the
    // global gate tensor: 1 + (x . gate[e] mod GATE_UNITS).
    ids_.resize(static_cast<size_t>(T) * K);
    gw_.resize(static_cast<size_t>(T) * K);
    uint64_t total = 0;
    for (uint32_t e = 0; e < s_.E; ++e) total += lw[e];
    for (uint32_t t = 0; t < T; ++t) {
      uint64_t left = total;
      for (uint32_t k = 0; k < K; ++k) {
        uint64_t u = hash_key({a_.seed, step, l, t, k, 0x726f757465ull}) % left;
        int32_t pick = -1;
        for (uint32_t e = 0; e < s_.E; ++e) {
          bool taken = false;
          for (uint32_t j = 0; j < k; ++j) taken |= ids_[static_cast<size_t>(t) * K + j] == static_cast<int32_t>(e);
          if (taken) continue;
          if (u < lw[e]) {
            pick = static_cast<int32_t>(e);
            break;
          }
          u -= lw[e];
        }
        if (pick < 0) throw Failure("routing: no expert picked (a bug)");
        left -= lw[pick];
        ids_[static_cast<size_t>(t) * K + k] = pick;
        int64_t dot = 0;
        for (uint32_t i = 0; i < H; ++i) dot += static_cast<int64_t>(x[static_cast<size_t>(t) * H + i]) * static_cast<int64_t>(gate[static_cast<size_t>(pick) * H + i]);
        gw_[static_cast<size_t>(t) * K + k] = 1 + static_cast<int32_t>(((dot % GATE_UNITS) + GATE_UNITS) % GATE_UNITS);
      }
    }
    // Each pair's slot: the live placement and the replica rule; the static one for the
    // balancedness of the initial placement on the same tokens.
    const size_t TK = static_cast<size_t>(T) * K;
    slot_.resize(TK);
    const int32_t* l2p = &log2phy_[static_cast<size_t>(l) * s_.E * P_];
    const int32_t* cnt = &logcnt_[static_cast<size_t>(l) * s_.E];
    const int32_t* l2p0 = &log2phy0_[static_cast<size_t>(l) * s_.E * P_];
    const int32_t* cnt0 = &logcnt0_[static_cast<size_t>(l) * s_.E];
    std::vector<int> per_rank(N, 0);
    for (size_t p = 0; p < TK; ++p) {
      const uint32_t t = static_cast<uint32_t>(p / K);
      const int32_t e = ids_[p];
      slot_[p] = l2p[static_cast<size_t>(e) * P_ + (t + l) % static_cast<uint32_t>(cnt[e])];
      per_rank[slot_[p] / S_]++;
      if (t >= tok_lo_ && t < tok_hi_) static_load[l2p0[static_cast<size_t>(e) * P_ + (t + l) % static_cast<uint32_t>(cnt0[e])] / S_]++;
    }
    // This rank's pairs in pair order, computed with the live weights in the region (each slot's
    // rows turned to int8 once, for the slots that have pairs).
    mine_.clear();
    for (size_t p = 0; p < TK; ++p)
      if (slot_[p] / S_ == static_cast<uint32_t>(rank_)) mine_.push_back(p);
    const size_t n13 = static_cast<size_t>(H) * 2 * s_.F, n2 = static_cast<size_t>(s_.F) * H;
    live13_.resize(static_cast<size_t>(S_) * n13);
    live2_.resize(static_cast<size_t>(S_) * n2);
    std::vector<char> ready(S_, 0);
    y_mine_.resize(mine_.size() * H);
    gu_.resize(2 * s_.F);
    for (size_t i = 0; i < mine_.size(); ++i) {
      const uint32_t local = static_cast<uint32_t>(slot_[mine_[i]]) % S_;
      if (!ready[local]) {
        const uint16_t* a = reinterpret_cast<const uint16_t*>(w13_[l] + local * row13_);
        const uint16_t* b = reinterpret_cast<const uint16_t*>(w2_[l] + local * (row2_ + W2_PAD));
        for (size_t j = 0; j < n13; ++j) live13_[local * n13 + j] = static_cast<int8_t>(from_bf16(a[j]));
        for (size_t j = 0; j < n2; ++j) live2_[local * n2 + j] = static_cast<int8_t>(from_bf16(b[j]));
        ready[local] = 1;
      }
      const uint32_t t = static_cast<uint32_t>(mine_[i] / K);
      expert_forward(s_, &x[static_cast<size_t>(t) * H], &live13_[local * n13], &live2_[local * n2], gu_.data(), &y_mine_[i * H]);
      counts[local]++;
    }
    // All-gather the pair results, rank by rank; each rank's pairs in pair order.
    std::vector<int> sizes(N), displs(N);
    int off = 0;
    for (uint32_t r = 0; r < N; ++r) {
      sizes[r] = per_rank[r] * static_cast<int>(H);
      displs[r] = off;
      off += sizes[r];
    }
    gathered_.resize(TK * H);
    if (MPI_Allgatherv(y_mine_.data(), static_cast<int>(y_mine_.size()), MPI_INT32_T, gathered_.data(), sizes.data(),
                       displs.data(), MPI_INT32_T, comm_) != MPI_SUCCESS)
      throw Failure("MPI_Allgatherv failed");
    // Back into pair order: the i-th pair of rank r is at displs[r] + i * H.
    y_.resize(TK * H);
    std::vector<int> next(N, 0);
    for (size_t p = 0; p < TK; ++p) {
      const uint32_t r = static_cast<uint32_t>(slot_[p]) / S_;
      std::memcpy(&y_[p * H], &gathered_[static_cast<size_t>(displs[r]) + static_cast<size_t>(next[r]++) * H], H * sizeof(int32_t));
    }
    // Combine in the fixed order k = 0, 1, ...; the reference of this rank's tokens; the residual.
    bool ok = true;
    std::vector<int64_t> out(H), ref(H);
    std::vector<int32_t> yref(H);
    std::vector<int32_t> xnext(x.size());
    for (uint32_t t = 0; t < T; ++t) {
      std::fill(out.begin(), out.end(), 0);
      for (uint32_t k = 0; k < K; ++k) {
        const size_t p = static_cast<size_t>(t) * K + k;
        for (uint32_t i = 0; i < H; ++i) out[i] += static_cast<int64_t>(gw_[p]) * y_[p * H + i];
      }
      if (t >= tok_lo_ && t < tok_hi_) {
        std::fill(ref.begin(), ref.end(), 0);
        for (uint32_t k = 0; k < K; ++k) {
          const size_t p = static_cast<size_t>(t) * K + k;
          const int32_t e = ids_[p];
          expert_forward(s_, &x[static_cast<size_t>(t) * H], &ref13_[(static_cast<size_t>(l) * s_.E + e) * n13],
                         &ref2_[(static_cast<size_t>(l) * s_.E + e) * n2], gu_.data(), yref.data());
          for (uint32_t i = 0; i < H; ++i) ref[i] += static_cast<int64_t>(gw_[p]) * yref[i];
        }
        ok = ok && out == ref;
      }
      for (uint32_t i = 0; i < H; ++i)
        xnext[static_cast<size_t>(t) * H + i] = static_cast<int32_t>(clip(x[static_cast<size_t>(t) * H + i] + rshift(out[i], OUT_SHIFT), -XMAX, XMAX));
    }
    x.swap(xnext);
    return ok;
  }

  // ---- the run ----

  int run() {
    const uint32_t L = s_.L, N = static_cast<uint32_t>(world_), steps = a_.steps;
    bool sidecar = a_.wait_sidecar > 0 ? wait_for_sidecar(a_.wait_sidecar) : false;
    std::vector<uint64_t> counts(static_cast<size_t>(L) * S_);
    std::vector<int64_t> live_rank(static_cast<size_t>(steps) * L, 0);  // this rank's pairs [steps][L]
    std::vector<int64_t> static_load(static_cast<size_t>(steps) * L * N, 0);
    std::vector<int64_t> mismatched(steps, 0);
    std::vector<double> boundary_us(steps), record_us(steps), apply_us;
    std::vector<int64_t> applied_at(steps, 0);
    std::vector<Commit> commits;
    std::vector<int64_t> applies_of(L, 0);
    int64_t wrong = 0;
    const uint32_t phase = a_.phase == "prefill" ? EPLB_PHASE_PREFILL : a_.phase == "mixed" ? EPLB_PHASE_MIXED : EPLB_PHASE_DECODE;
    std::vector<int32_t> x(static_cast<size_t>(a_.tokens) * s_.H);
    for (uint32_t t = 0; t < steps; ++t) {
      if (a_.die_at_step == static_cast<int64_t>(t) && static_cast<uint32_t>(rank_) == a_.die_rank) raise(SIGKILL);
      agree_ns_ = 0;
      const uint64_t t0 = now_ns();
      int32_t applied = -1;
      AgreeTimer timer{&comm_, &agree_ns_};
      if (a_.boundary == "callback") {
        check(eplb_at_step_boundary(region_, t, &AgreeTimer::call, &timer, &applied), "eplb_at_step_boundary");
      } else {
        // The boundary in two calls: the collective runs here, between them, with no callback.
        uint64_t have = 0, posted = 0, lo = 0, hi = 0;
        check(eplb_boundary_begin(region_, t, &have, &posted), "eplb_boundary_begin");
        if (AgreeTimer::call(&timer, have, &lo, &hi) != 0) throw Failure("MPI_Allreduce of the boundary failed");
        if (have != 0 || posted != 0) check(eplb_boundary_end(region_, t, lo, hi, &applied), "eplb_boundary_end");
      }
      boundary_us[t] = static_cast<double>(now_ns() - t0 - agree_ns_) / 1000.0;
      if (applied >= 0) {
        const uint32_t l = static_cast<uint32_t>(applied);
        if (l >= L) throw Failure("eplb_at_step_boundary applied layer " + std::to_string(applied) + " of " + std::to_string(L));
        apply_us.push_back(boundary_us[t]);
        applied_at[t] = 1;
        check(eplb_phy2log(region_, l, &phy2log_[static_cast<size_t>(l) * P_], P_), "eplb_phy2log");
        derive_layer(phy2log_, l, log2phy_, logcnt_);
        commits.push_back({t, l, applies_of[l]++});
        wrong += wrong_bytes(l);
      }
      // The step's tokens, the whole batch, on every rank.
      for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<int32_t>(uniform(hash_key({a_.seed, t, 0x746f6bull, i}), XMAX));
      std::fill(counts.begin(), counts.end(), 0);
      const uint64_t m0 = now_ns();
      for (uint32_t l = 0; l < L; ++l) {
        bool ok = moe_layer(t, l, x, &counts[static_cast<size_t>(l) * S_], &static_load[(static_cast<size_t>(t) * L + l) * N]);
        mismatched[t] += ok ? 0 : 1;
        int64_t pairs = 0;
        for (uint32_t s = 0; s < S_; ++s) pairs += static_cast<int64_t>(counts[static_cast<size_t>(l) * S_ + s]);
        live_rank[static_cast<size_t>(t) * L + l] = pairs;
      }
      const uint64_t moe_ns = now_ns() - m0;
      const uint64_t r0 = now_ns();
      check(eplb_record(region_, t, phase, counts.data(), counts.size(), static_cast<uint64_t>(tok_hi_ - tok_lo_) * s_.K, moe_ns),
            "eplb_record");
      record_us[t] = static_cast<double>(now_ns() - r0) / 1000.0;
      if (a_.log_every && rank_ == 0 && (t + 1) % a_.log_every == 0)
        std::printf("# step %u/%u, %zu layer switches so far\n", t + 1, steps, commits.size());
    }
    return report(sidecar, live_rank, static_load, mismatched, boundary_us, record_us, apply_us, applied_at, commits, wrong);
  }

  struct AgreeTimer {
    MPI_Comm* comm;
    uint64_t* ns;
    static int call(void* user, uint64_t have, uint64_t* lo, uint64_t* hi) {
      auto* self = static_cast<AgreeTimer*>(user);
      const uint64_t t0 = now_ns();
      int rc = agree_allreduce(self->comm, have, lo, hi);
      *self->ns += now_ns() - t0;
      return rc;
    }
  };

  // Gathers every rank's results on rank 0, writes the report there; returns rank 0's exit code on
  // every rank.
  int report(bool sidecar, const std::vector<int64_t>& live_rank, const std::vector<int64_t>& static_load,
             const std::vector<int64_t>& mismatched, const std::vector<double>& boundary_us, const std::vector<double>& record_us,
             const std::vector<double>& apply_us, const std::vector<int64_t>& applied_at, const std::vector<Commit>& commits,
             int64_t wrong) {
    const uint32_t L = s_.L, N = static_cast<uint32_t>(world_), steps = a_.steps;
    const bool root = rank_ == 0;
    std::vector<int64_t> all_live(root ? static_cast<size_t>(N) * steps * L : 0);
    MPI_Gather(live_rank.data(), static_cast<int>(live_rank.size()), MPI_INT64_T, all_live.data(), static_cast<int>(live_rank.size()),
               MPI_INT64_T, 0, comm_);
    std::vector<int64_t> static_sum(root ? static_load.size() : 0);
    MPI_Reduce(static_load.data(), static_sum.data(), static_cast<int>(static_load.size()), MPI_INT64_T, MPI_SUM, 0, comm_);
    std::vector<int64_t> mism(root ? steps : 0);
    MPI_Reduce(mismatched.data(), mism.data(), static_cast<int>(steps), MPI_INT64_T, MPI_SUM, 0, comm_);
    int64_t sums[2] = {wrong, global_bytes_changed()}, sums_out[2] = {0, 0};
    MPI_Reduce(sums, sums_out, 2, MPI_INT64_T, MPI_SUM, 0, comm_);
    // Commits: (step, layer, nth) triples of every rank.
    std::vector<int64_t> flat;
    for (auto& c : commits) flat.insert(flat.end(), {c.step, c.layer, c.nth});
    auto gatherv_i64 = [&](const std::vector<int64_t>& mine, std::vector<int>& sizes) {
      int n = static_cast<int>(mine.size());
      sizes.assign(N, 0);
      MPI_Gather(&n, 1, MPI_INT, sizes.data(), 1, MPI_INT, 0, comm_);
      std::vector<int> displs(N, 0);
      int total = 0;
      for (uint32_t r = 0; r < N; ++r) displs[r] = total, total += sizes[r];
      std::vector<int64_t> all(root ? static_cast<size_t>(total) : 0);
      MPI_Gatherv(mine.data(), n, MPI_INT64_T, all.data(), sizes.data(), displs.data(), MPI_INT64_T, 0, comm_);
      return all;
    };
    auto gatherv_f64 = [&](const std::vector<double>& mine) {
      int n = static_cast<int>(mine.size());
      std::vector<int> sizes(N, 0), displs(N, 0);
      MPI_Gather(&n, 1, MPI_INT, sizes.data(), 1, MPI_INT, 0, comm_);
      int total = 0;
      for (uint32_t r = 0; r < N; ++r) displs[r] = total, total += sizes[r];
      std::vector<double> all(root ? static_cast<size_t>(total) : 0);
      MPI_Gatherv(mine.data(), n, MPI_DOUBLE, all.data(), sizes.data(), displs.data(), MPI_DOUBLE, 0, comm_);
      return all;
    };
    std::vector<int> commit_sizes, step_sizes;
    std::vector<int64_t> all_commits = gatherv_i64(flat, commit_sizes);
    std::vector<double> all_boundary = gatherv_f64(boundary_us), all_record = gatherv_f64(record_us), all_apply = gatherv_f64(apply_us);
    std::vector<int64_t> all_applied_at = gatherv_i64(applied_at, step_sizes);
    std::vector<int32_t> all_p2l(root ? phy2log_.size() * N : 0);
    MPI_Gather(phy2log_.data(), static_cast<int>(phy2log_.size()), MPI_INT32_T, all_p2l.data(), static_cast<int>(phy2log_.size()),
               MPI_INT32_T, 0, comm_);
    int code = 0;
    if (root) {
      // live [steps][L][N] from the per-rank [N][steps][L].
      std::vector<int64_t> live(static_cast<size_t>(steps) * L * N);
      for (uint32_t r = 0; r < N; ++r)
        for (size_t i = 0; i < static_cast<size_t>(steps) * L; ++i) live[i * N + r] = all_live[r * static_cast<size_t>(steps) * L + i];
      // (layer, nth) -> the step each rank applied it at (-1: never). The gather put every rank's
      // triples after the previous rank's.
      std::vector<int> commit_displs(N, 0);
      for (uint32_t r = 1; r < N; ++r) commit_displs[r] = commit_displs[r - 1] + commit_sizes[r - 1];
      std::map<std::pair<int64_t, int64_t>, std::vector<int64_t>> by_key;
      for (uint32_t r = 0; r < N; ++r) {
        for (int i = 0; i < commit_sizes[r]; i += 3) {
          size_t at = static_cast<size_t>(commit_displs[r] + i);
          auto key = std::make_pair(all_commits[at + 1], all_commits[at + 2]);
          auto& v = by_key[key];
          if (v.empty()) v.assign(N, -1);
          v[r] = all_commits[at];
        }
      }
      int64_t disagreements = 0;
      std::string detail, commits_json;
      for (auto& kv : by_key) {
        bool same = std::all_of(kv.second.begin(), kv.second.end(), [&](int64_t s) { return s == kv.second[0]; });
        if (!same) {
          ++disagreements;
          std::string steps_json;
          for (int64_t s : kv.second) steps_json += (steps_json.empty() ? "" : ", ") + (s < 0 ? std::string("null") : std::to_string(s));
          detail += std::string(detail.empty() ? "" : ", ") + "{\"layer\": " + std::to_string(kv.first.first) + ", \"nth\": " +
                    std::to_string(kv.first.second) + ", \"steps\": [" + steps_json + "]}";
        }
      }
      // Rank 0's commits, sorted: [step, layer, nth].
      std::vector<std::array<int64_t, 3>> c0;
      for (int i = 0; i < commit_sizes[0]; i += 3)
        c0.push_back({all_commits[static_cast<size_t>(i)], all_commits[static_cast<size_t>(i) + 1], all_commits[static_cast<size_t>(i) + 2]});
      std::sort(c0.begin(), c0.end());
      for (auto& c : c0)
        commits_json += std::string(commits_json.empty() ? "" : ", ") + "[" + std::to_string(c[0]) + ", " + std::to_string(c[1]) + ", " +
                        std::to_string(c[2]) + "]";
      bool placements_agree = true;
      for (uint32_t r = 1; r < N; ++r)
        placements_agree = placements_agree && std::equal(phy2log_.begin(), phy2log_.end(), all_p2l.begin() + static_cast<long>(r * phy2log_.size()));
      std::vector<double> client_us(all_boundary.size()), no_apply;
      for (size_t i = 0; i < all_boundary.size(); ++i) {
        client_us[i] = all_boundary[i] + all_record[i];
        if (!all_applied_at[i]) no_apply.push_back(all_boundary[i]);
      }
      std::string mism_json;
      int64_t mism_total = 0;
      for (uint32_t t = 0; t < steps; ++t)
        if (mism[t]) mism_total += mism[t], mism_json += (mism_json.empty() ? "" : ", ") + std::to_string(t);
      const double b_static = balancedness(static_sum, steps, L, N), b_live = balancedness(live, steps, L, N);
      const bool outputs_match = mism_total == 0;
      const int64_t expert_bytes = static_cast<int64_t>(row13_ + row2_);
      std::string tensors = "[{\"name\": \"w13_weight\", \"dtype\": \"bf16\", \"shape\": [" + std::to_string(s_.H) + ", " +
                            std::to_string(2 * s_.F) + "], \"kind\": \"expert\", \"row_bytes\": " + std::to_string(row13_) +
                            "}, {\"name\": \"w2_weight\", \"dtype\": \"bf16\", \"shape\": [" + std::to_string(s_.F) + ", " +
                            std::to_string(s_.H) + "], \"kind\": \"expert\", \"row_bytes\": " + std::to_string(row2_) +
                            "}, {\"name\": \"gate_weight\", \"dtype\": \"f32\", \"shape\": [" + std::to_string(s_.E) + ", " +
                            std::to_string(s_.H) + "], \"kind\": \"global\", \"row_bytes\": " + std::to_string(rowg_) + "}]";
      std::string j = "{\n";
      auto kv = [&](const std::string& k, const std::string& v) { j += " " + json_str(k) + ": " + v + ",\n"; };
      kv("engine", "\"cpp\"");
      kv("engine_steps", std::to_string(steps));
      kv("world_size", std::to_string(N));
      kv("num_layers", std::to_string(L));
      kv("num_experts", std::to_string(s_.E));
      kv("slots_per_rank", std::to_string(S_));
      kv("tokens_per_step", std::to_string(a_.tokens));
      kv("top_k", std::to_string(s_.K));
      kv("hidden", std::to_string(s_.H));
      kv("ffn", std::to_string(s_.F));
      kv("quant", "\"none\"");
      kv("tensors_per_layer", std::to_string(NUM_TENSORS));
      kv("tensors", tensors);
      kv("expert_bytes", std::to_string(expert_bytes));
      kv("trace", a_.trace.empty() ? "null" : json_str(a_.trace));
      kv("trace_dataset", a_.trace_dataset.empty() ? "null" : json_str(a_.trace_dataset));
      kv("sidecar_attached", a_.wait_sidecar > 0 ? (sidecar ? "true" : "false") : "null");
      kv("outputs_match", outputs_match ? "true" : "false");
      kv("mismatched_steps", "[" + mism_json + "]");
      kv("layers_committed", std::to_string(by_key.size()));
      kv("commits", "[" + commits_json + "]");
      kv("commit_step_disagreements", std::to_string(disagreements));
      kv("commit_step_disagreement_detail", "[" + detail + "]");
      kv("placements_agree", placements_agree ? "true" : "false");
      kv("wrong_bytes", std::to_string(sums_out[0]));
      kv("global_bytes_changed", std::to_string(sums_out[1]));
      kv("balancedness_static", json_num(b_static));
      kv("balancedness_live", json_num(b_live));
      kv("client_us_median", json_num(median(client_us)));
      kv("boundary_us", stats_json(all_boundary));
      kv("boundary_us_no_apply", stats_json(no_apply));
      kv("apply_us", stats_json(all_apply));
      j += " \"record_us\": " + stats_json(all_record) + "\n}\n";
      std::printf("# eplb_cpp_engine: %u ranks, %u layers x %u experts, %u slots a rank, %u tokens a step, top-%u\n", N, L, s_.E, S_,
                  a_.tokens, s_.K);
      std::printf("# quant none: %u tensors a layer, %lld bytes an expert\n", NUM_TENSORS, static_cast<long long>(expert_bytes));
      std::printf("# steps %u | outputs match %s | layers committed %zu | commit step disagreements %lld | wrong bytes %lld "
                  "| global bytes changed %lld\n",
                  steps, outputs_match ? "True" : "False", by_key.size(), static_cast<long long>(disagreements),
                  static_cast<long long>(sums_out[0]), static_cast<long long>(sums_out[1]));
      std::printf("# balancedness (mean over steps): static %.4f, live %.4f\n", b_static, b_live);
      std::printf("# client a step: median %.1f us | apply of a layer: %zu times\n", median(client_us), all_apply.size());
      std::fflush(stdout);
      if (!a_.report.empty()) {
        std::FILE* f = std::fopen(a_.report.c_str(), "w");
        if (!f || std::fputs(j.c_str(), f) < 0 || std::fclose(f) != 0) {
          std::fprintf(stderr, "error: cannot write %s: %s\n", a_.report.c_str(), std::strerror(errno));
          code = 1;
        }
      }
      if (!(outputs_match && disagreements == 0 && sums_out[0] == 0 && sums_out[1] == 0)) code = code ? code : 1;
    }
    MPI_Bcast(&code, 1, MPI_INT, 0, comm_);
    return code;
  }

  void finish(bool ok) {
    if (!region_) return;
    if (ok) check(eplb_finish(region_, 0), "eplb_finish");
    else eplb_fail(region_);
  }

 private:
  MPI_Comm comm_;
  Args a_;
  int rank_ = 0, world_ = 1;
  Load load_;
  std::vector<uint64_t> route_w_;
  Shape s_{};
  uint32_t S_ = 0, P_ = 0, tok_lo_ = 0, tok_hi_ = 0;
  std::vector<int32_t> phy2log0_, log2phy0_, logcnt0_, phy2log_, log2phy_, logcnt_;
  std::vector<int8_t> ref13_, ref2_;
  eplb_region* region_ = nullptr;
  uint64_t row13_ = 0, row2_ = 0, rowg_ = 0;
  std::vector<unsigned char*> w13_, w2_, gate_;
  std::vector<std::vector<unsigned char>> gate0_;
  uint64_t agree_ns_ = 0;
  // Scratch of moe_layer.
  std::vector<int32_t> ids_, gw_, y_mine_, gathered_, y_;
  std::vector<uint32_t> slot_;
  std::vector<size_t> mine_;
  std::vector<int8_t> live13_, live2_;
  std::vector<int64_t> gu_;
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  int code = 0;
  Engine* engine = nullptr;
  try {
    Args args = parse_args(argc, argv);
    engine = new Engine(MPI_COMM_WORLD, args);
  } catch (const BadInput& e) {
    std::fprintf(stderr, "error: rank %d: %s\n", rank, e.what());
    code = 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: rank %d: %s\n", rank, e.what());
    code = 1;
  }
  // Set-up: every rank learns the largest code, so that no rank runs while another failed.
  int worst = 0;
  MPI_Allreduce(&code, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (worst != 0) {
    delete engine;
    MPI_Finalize();
    return worst;
  }
  try {
    code = engine->run();
    engine->finish(true);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: rank %d: %s\n", rank, e.what());
    engine->finish(false);
    delete engine;
    // A rank that fails mid-run cannot meet the others at their next collective: end the job.
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
  delete engine;
  MPI_Finalize();
  return code;
}
