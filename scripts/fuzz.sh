#!/usr/bin/env bash
# Coverage-guided fuzzing of the readers of hostile input (docs/fuzzing.md): the shared-memory
# region header and tensor table, the load files (CSV, JSON, .npy) and placement files. AFL++
# through afl.rs (cargo-afl), which works on stable Rust; targets are fuzz/src/targets.rs.
#
#   scripts/fuzz.sh [--seconds N] [--minimize] [--seeds] [TARGET...]
#
#   --seconds N   fuzz each target N seconds (default 60), one after another
#   --minimize    afterwards, replace fuzz/corpus/<target>/ by the minimised corpus (afl-cmin over
#                 the old corpus and everything the run found); commit the result
#   --seeds       first rewrite the seed files fuzz/corpus/<target>/seed-* (fuzz/src/bin/seeds.rs)
#   TARGET        region load_csv load_json load_npy placement (default: all)
#
# Exits 1 when any target crashed (a panic, an abort, an allocation past the memory limit) or hung
# (an input ran past the hang timeout); each such input is copied to fuzz/regressions/<target>/,
# where `cargo test --test fuzz_corpus` replays it. Exits 2 on a bad argument.
#
# Installs what it needs on a fresh machine, cached under target/ (a second run installs nothing):
# the build deps (scripts/lib/setup.sh), cargo-afl into target/fuzz-tools/bin, AFL++ built from
# cargo-afl's bundled source into target/fuzz-tools/share; the instrumented targets are built
# into target/fuzz (their own directory: the instrumentation flags would rebuild target/release).
# Runs under `nice -n 19`: fuzzing takes every cycle it gets.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TARGETS=(region load_csv load_json load_npy placement)
# The cargo-afl version and the `afl` crate of fuzz/Cargo.toml must match.
AFL_VERSION=0.18.2
# An input that runs longer than this is a hang (AFL's -t, milliseconds): the readers take
# microseconds a file of AFL's largest (1 MB) size, so only an endless loop or a pathological
# blow-up reaches it, not a loaded 2-core machine.
HANG_MS=5000
# Virtual memory limit of a target process (AFL's -m, MiB): an allocation the input's size does
# not bound fails and aborts, which AFL counts as a crash.
MEMORY_MB=1024

seconds=60
minimize=0
seeds=0
targets=()
while (($#)); do
  case "$1" in
    --seconds)
      [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "error: --seconds needs a positive integer, got '${2:-}'" >&2; exit 2; }
      seconds=$2
      shift 2
      ;;
    --minimize) minimize=1; shift ;;
    --seeds) seeds=1; shift ;;
    -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1; see scripts/fuzz.sh --help" >&2; exit 2 ;;
    *)
      [[ " ${ALL_TARGETS[*]} " == *" $1 "* ]] || { echo "error: unknown target $1; targets: ${ALL_TARGETS[*]}" >&2; exit 2; }
      targets+=("$1")
      shift
      ;;
  esac
done
((${#targets[@]})) || targets=("${ALL_TARGETS[@]}")

. scripts/lib/setup.sh
eplb_install_build_deps
eplb_require_cargo

root=$PWD
tools=$root/target/fuzz-tools
export PATH=$tools/bin:$PATH XDG_DATA_HOME=$tools/share
if ! cargo afl --version 2>/dev/null | grep -q "$AFL_VERSION"; then
  echo "# installing cargo-afl $AFL_VERSION into $tools"
  nice -n 19 cargo install --locked --force --quiet --root "$tools" --version "$AFL_VERSION" cargo-afl
fi
if ! compgen -G "$tools/share/afl.rs/*/afl.rs-$AFL_VERSION/afl/bin/afl-fuzz" >/dev/null; then
  echo "# building AFL++ (cargo afl config --build) into $tools/share"
  nice -n 19 cargo afl config --build --force
fi

# Built from inside fuzz/: cargo-afl's flags differ with --manifest-path from the root, which
# would rebuild every dependency.
if ((seeds)); then
  (cd fuzz && nice -n 19 cargo run --quiet --release --locked --target-dir ../target --bin seeds)
fi
echo "# building the instrumented targets into target/fuzz"
(cd fuzz && nice -n 19 cargo afl build --quiet --release --locked --target-dir ../target/fuzz)

# AFL's checks of the host: CI machines and containers share CPUs (no pinning) and may pipe core
# dumps elsewhere (crashes are still seen: the target's signal is what counts).
export AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
export AFL_NO_CRASH_README=1

stat_of() { sed -n "s/^$2 *: *//p" "$1/default/fuzzer_stats"; }

failed=()
for t in "${targets[@]}"; do
  out=$root/target/fuzz-out/$t
  rm -rf "$out"
  mkdir -p "$out/in"
  # The corpus and the kept crash cases: a case that crashes again fails the dry run at once.
  for f in fuzz/corpus/"$t"/* fuzz/regressions/"$t"/*; do
    [ -f "$f" ] && [ "$(basename "$f")" != README.md ] && cp "$f" "$out/in/$(basename "$(dirname "$f")")-$(basename "$f")"
  done
  if ! compgen -G "$out/in/*" >/dev/null; then
    echo "error: fuzz/corpus/$t/ is empty; run scripts/fuzz.sh --seeds" >&2
    exit 1
  fi
  echo "# fuzzing $t for ${seconds}s (hang timeout ${HANG_MS} ms, memory limit ${MEMORY_MB} MiB)"
  rc=0
  nice -n 19 cargo afl fuzz -i "$out/in" -o "$out" -V "$seconds" -t "$HANG_MS" -m "$MEMORY_MB" \
    -- "$root/target/fuzz/release/$t" >"$out/afl.log" 2>&1 || rc=$?
  if [ ! -f "$out/default/fuzzer_stats" ]; then
    # AFL stops before fuzzing when an input of the corpus crashes or hangs, or the host is unfit.
    tail -n 30 "$out/afl.log" >&2
    echo "error: afl-fuzz did not fuzz $t (exit $rc); its log: $out/afl.log" >&2
    failed+=("$t")
    continue
  fi
  execs=$(stat_of "$out" execs_done)
  crashes=$(stat_of "$out" saved_crashes)
  hangs=$(stat_of "$out" saved_hangs)
  echo "$t: $execs executions in $(stat_of "$out" run_time) s ($(stat_of "$out" execs_per_sec)/s)," \
    "$(stat_of "$out" corpus_count) paths, edges $(stat_of "$out" edges_found)/$(stat_of "$out" total_edges)" \
    "($(stat_of "$out" bitmap_cvg)), $crashes crashes, $hangs hangs"
  if [ "$crashes" != 0 ] || [ "$hangs" != 0 ] || [ "$rc" != 0 ]; then
    mkdir -p "fuzz/regressions/$t"
    for f in "$out"/default/crashes/id:* "$out"/default/hangs/id:*; do
      [ -f "$f" ] || continue
      kind=$(basename "$(dirname "$f")")
      keep=fuzz/regressions/$t/${kind%s}-$(sha1sum "$f" | cut -c1-16)
      cp "$f" "$keep"
      echo "error: $t: ${kind%s} on $keep (replay: target/fuzz/release/$t < $keep)" >&2
    done
    [ "$rc" = 0 ] || echo "error: afl-fuzz exited $rc on $t; its log: $out/afl.log" >&2
    failed+=("$t")
  elif ((minimize)); then
    echo "# minimising fuzz/corpus/$t"
    rm -rf "$out/cmin"
    mkdir -p "$out/all"
    cp "$out"/in/* "$out"/default/queue/id:* "$out/all/"
    # afl-cmin.awk, not `cargo afl cmin`: that runs afl-cmin.py, which records no coverage from
    # afl.rs targets here and would empty the corpus.
    cmin=$(compgen -G "$tools/share/afl.rs/*/afl.rs-$AFL_VERSION/afl/bin/afl-cmin.awk" | head -n 1)
    PATH="$(dirname "$cmin"):$PATH" nice -n 19 "$cmin" -i "$out/all" -o "$out/cmin" -t "$HANG_MS" -m "$MEMORY_MB" \
      -- "$root/target/fuzz/release/$t" >"$out/cmin.log" 2>&1 || { tail "$out/cmin.log" >&2; exit 1; }
    compgen -G "$out/cmin/*" >/dev/null || { echo "error: afl-cmin kept nothing of $t; its log: $out/cmin.log" >&2; exit 1; }
    rm -f fuzz/corpus/"$t"/*
    for f in "$out"/cmin/*; do
      cp "$f" "fuzz/corpus/$t/$(sha1sum "$f" | cut -c1-16)"
    done
    echo "# fuzz/corpus/$t: $(find "fuzz/corpus/$t" -type f | wc -l) files"
  fi
done

if ((${#failed[@]})); then
  echo "error: fuzzing found crashes or hangs in: ${failed[*]}; fix them (a typed error, never a panic) and keep the cases in fuzz/regressions/" >&2
  exit 1
fi
echo "# fuzzing: no crash, no hang in ${targets[*]}"
