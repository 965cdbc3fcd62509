//! AFL target `region`: see `fuzz/src/targets.rs`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        eplb_fuzz::targets::run("region", data).expect("a known target");
    });
}
