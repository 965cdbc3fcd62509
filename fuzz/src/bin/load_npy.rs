//! AFL target `load_npy`: see `fuzz/src/targets.rs`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        eplb_fuzz::targets::run("load_npy", data).expect("a known target");
    });
}
