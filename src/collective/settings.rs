//! Agreement on settings before the first collective that depends on them.
//!
//! Ranks started with different flags (an MPMD launch, a bad Slurm script) used to corrupt memory
//! or hang: the sizes of the all-reduces and transfers differ. [`agree_on_settings`] hashes every
//! setting a collective or the plan depends on and compares the hash over all ranks (one
//! all-reduce); only when they differ does it gather the per-setting hashes and the values, to name
//! every setting that differs and which rank has which value.

use thiserror::Error;

use super::{Comm, MpiError};

/// Bytes of one value sent when the settings differ (longer values are cut).
const VALUE_BYTES: usize = 96;

#[derive(Debug, Error)]
pub(crate) enum SettingsError {
    #[error(transparent)]
    Mpi(#[from] MpiError),
    /// The ranks' settings differ; one line per setting that differs.
    #[error("the ranks were started with different settings; nothing was moved:\n  {}", .lines.join("\n  "))]
    Differ { lines: Vec<String> },
}

/// One setting: its flag (or the shape it names) and its value as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Setting {
    pub name: String,
    pub value: String,
}

impl Setting {
    pub fn new(name: impl Into<String>, value: impl ToString) -> Setting {
        Setting { name: name.into(), value: value.to_string() }
    }
}

/// FNV-1a 64 of `bytes`, continued from `h`.
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn setting_hash(s: &Setting) -> u64 {
    fnv(fnv(fnv(FNV_START, s.name.as_bytes()), b"="), s.value.as_bytes())
}

/// Checks that every rank of `comm` has the same `settings` (the same names in the same order,
/// with the same values). Collective over `comm`; every rank returns the same result. On a
/// difference, the error names each setting that differs: `--num-experts differs: rank 0 has
/// 64, rank 2 has 32` (the first rank with each distinct value).
pub(crate) fn agree_on_settings(comm: &Comm, settings: &[Setting]) -> Result<(), SettingsError> {
    let hashes: Vec<u64> = settings.iter().map(setting_hash).collect();
    let all =
        hashes.iter().fold(fnv(FNV_START, &(settings.len() as u64).to_le_bytes()), |h, s| fnv(h, &s.to_le_bytes()));
    if comm.agree_hash(all)?.agreed() {
        return Ok(());
    }
    let counts: Vec<u64> = comm.allgather_u64(&[settings.len() as u64])?.iter().map(|c| c[0]).collect();
    if counts.iter().any(|&c| c != counts[0]) {
        let per_rank: Vec<String> = counts.iter().enumerate().map(|(r, c)| format!("rank {r} has {c}")).collect();
        return Err(SettingsError::Differ {
            lines: vec![format!(
                "the number of settings differs ({}): the ranks run different eplb-worker builds; start the same binary on every rank",
                per_rank.join(", ")
            )],
        });
    }
    let gathered = comm.allgather_u64(&hashes)?;
    let differing: Vec<usize> =
        (0..settings.len()).filter(|&i| gathered.iter().any(|h| h.get(i) != gathered[0].get(i))).collect();
    let mut lines = Vec::with_capacity(differing.len());
    for &i in &differing {
        let values = comm.allgather_text(&settings[i].value, VALUE_BYTES)?;
        // The first rank with each distinct value, in rank order.
        let mut seen: Vec<(usize, &String)> = Vec::new();
        for (r, v) in values.iter().enumerate() {
            if !seen.iter().any(|(_, s)| *s == v) {
                seen.push((r, v));
            }
        }
        let has: Vec<String> = seen.iter().map(|(r, v)| format!("rank {r} has {v}")).collect();
        lines.push(format!("{} differs: {}", settings[i].name, has.join(", ")));
    }
    Err(SettingsError::Differ { lines })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_hashes_see_names_and_values() {
        let a = setting_hash(&Setting::new("--num-experts", 64));
        assert_ne!(a, setting_hash(&Setting::new("--num-experts", 32)));
        assert_ne!(a, setting_hash(&Setting::new("--num-layers", 64)));
        assert_eq!(a, setting_hash(&Setting::new("--num-experts", "64")));
    }
}
