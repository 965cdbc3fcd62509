//! The one exit-code policy of every subcommand: an error says what kind of failure it is
//! ([`Failure::kind`]), and [`ExitKind::code`] alone turns a kind into the process's exit code.
//!
//! * 0: success;
//! * 2: bad input: flags, files, shapes, settings that differ between ranks, a machine that lacks
//!   what was asked for (no GPU, no driver); checked before any work where possible;
//! * 1: a runtime failure (an MPI, NCCL or CUDA call, a peer that stopped, a verification that
//!   failed, an output that could not be written at the end), and an internal invariant that did
//!   not hold (a bug: never 2, which would blame the input). A panic also ends with 1 (the panic
//!   hook, [`crate::failure`]).

/// What kind of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// The input is wrong: fix the flags or files named in the message.
    BadInput,
    /// Something failed while running (a call, a peer, a write).
    Runtime,
    /// An invariant of the code did not hold: a bug.
    Internal,
}

impl ExitKind {
    /// The process's exit code: 2 for bad input, 1 for everything else.
    pub const fn code(self) -> i32 {
        match self {
            ExitKind::BadInput => 2,
            ExitKind::Runtime | ExitKind::Internal => 1,
        }
    }

    /// The kind behind an exit code that another rank reported (the set-up agreements gather
    /// codes, not errors): 2 is bad input, any other failure a runtime one.
    pub const fn from_code(code: i32) -> ExitKind {
        match code {
            2 => ExitKind::BadInput,
            _ => ExitKind::Runtime,
        }
    }
}

/// An error that knows its [`ExitKind`]; every subcommand's error implements it, and `main` exits
/// with [`Failure::exit_code`].
pub trait Failure: std::error::Error {
    fn kind(&self) -> ExitKind;

    /// [`ExitKind::code`] of [`Failure::kind`]: never defined anywhere else.
    fn exit_code(&self) -> i32 {
        self.kind().code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_2_and_every_other_failure_is_1() {
        assert_eq!(ExitKind::BadInput.code(), 2);
        assert_eq!(ExitKind::Runtime.code(), 1);
        assert_eq!(ExitKind::Internal.code(), 1, "a bug must not blame the input");
        for kind in [ExitKind::BadInput, ExitKind::Runtime] {
            assert_eq!(ExitKind::from_code(kind.code()), kind);
        }
    }
}
