//! The fuzz corpus and the crash cases as regression tests: every file of `fuzz/corpus/<target>/`
//! and `fuzz/regressions/<target>/` goes through the same target function the fuzzer runs
//! (`fuzz/src/targets.rs`, included by path), which must return without panicking: readers give a
//! value or a typed error. `scripts/fuzz.sh` grows these directories; docs/fuzzing.md says how.

use std::path::{Path, PathBuf};

#[path = "../fuzz/src/targets.rs"]
mod targets;

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md" && n != ".gitkeep"))
        .collect();
    files.sort();
    files
}

/// Replays target `name`'s corpus and regressions; the corpus must not be empty (an empty one
/// would make this test pass without testing anything).
fn replay(name: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = files(&root.join("corpus").join(name));
    assert!(!corpus.is_empty(), "fuzz/corpus/{name}/ is empty: the fuzz target has no seeds");
    for file in corpus.iter().chain(&files(&root.join("regressions").join(name))) {
        let data = std::fs::read(file).expect("a readable corpus file");
        let outcome = std::panic::catch_unwind(|| targets::run(name, &data));
        match outcome {
            Ok(result) => result.expect("a known target"),
            Err(_) => panic!("fuzz target {name} panicked on {}", file.display()),
        }
    }
}

#[test]
fn region_corpus() {
    replay("region");
}

#[test]
fn load_csv_corpus() {
    replay("load_csv");
}

#[test]
fn load_json_corpus() {
    replay("load_json");
}

#[test]
fn load_npy_corpus() {
    replay("load_npy");
}

#[test]
fn placement_corpus() {
    replay("placement");
}

/// Every target has a test above, and the list in `targets.rs` names each of them.
#[test]
fn every_target_is_replayed() {
    assert_eq!(targets::TARGETS, ["region", "load_csv", "load_json", "load_npy", "placement"]);
    assert!(targets::run("no_such_target", b"").is_err());
}
