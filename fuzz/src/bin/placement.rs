//! AFL target `placement`: see `fuzz/src/targets.rs`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        eplb_fuzz::targets::run("placement", data).expect("a known target");
    });
}
