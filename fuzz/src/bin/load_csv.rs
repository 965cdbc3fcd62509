//! AFL target `load_csv`: see `fuzz/src/targets.rs`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        eplb_fuzz::targets::run("load_csv", data).expect("a known target");
    });
}
