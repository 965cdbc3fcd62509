//! Progress bars on long work (`plan` on large inputs; `simulate` may share it), drawn on stderr
//! only when stderr is a terminal: under mpirun, in CI or into a file they stay quiet.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `len` items of `unit` (e.g. "layers"), prefixed with `what`; hidden when stderr is
/// not a terminal. Finish it with [`ProgressBar::finish_and_clear`].
pub(crate) fn bar(len: u64, what: &str, unit: &str) -> ProgressBar {
    let target =
        if std::io::stderr().is_terminal() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    let template = format!("{{prefix:>12}} [{{bar:40}}] {{pos}}/{{len}} {unit} ({{elapsed}}, eta {{eta}})");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_bar_counts_and_is_hidden_off_a_terminal() {
        let b = super::bar(10, "plan", "layers");
        b.inc(3);
        assert_eq!((b.position(), b.length()), (3, Some(10)));
        // cargo test captures stderr: not a terminal.
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            assert!(b.is_hidden());
        }
        b.finish_and_clear();
    }
}
