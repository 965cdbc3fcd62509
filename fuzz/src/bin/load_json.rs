//! AFL target `load_json`: see `fuzz/src/targets.rs`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        eplb_fuzz::targets::run("load_json", data).expect("a known target");
    });
}
