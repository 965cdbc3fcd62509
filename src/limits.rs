//! Sizes and ranges checked before any work: float flags that must be finite and in range, shapes
//! whose policy would run for minutes, and byte counts that the machine cannot hold. Every check
//! here is bad input (exit 2) with a message naming the flag and the limit, so that an absurd
//! request never panics, aborts on allocation or runs for minutes.

use thiserror::Error;

/// Most physical slots a layer (`--num-replicas`, R) may have. A real deployment has a few
/// hundred to a few thousand (DeepSeek-V3 at EP 320: under 1 500); planning 65 536 slots of 58
/// layers took 50 s and 8 GB on the dev machine.
pub(crate) const MAX_REPLICAS: usize = 65_536;

/// Most GPUs (`--num-gpus`, world size).
pub(crate) const MAX_GPUS: usize = 8_192;

/// Most slots on one GPU: the policy's local search grows faster than quadratically with it
/// (65 536 slots a GPU took 22 s for one layer; 4 096 take milliseconds).
pub(crate) const MAX_SLOTS_PER_GPU: usize = 4_096;

#[derive(Debug, Error)]
pub enum LimitError {
    #[error("{flag} {value}: {why}")]
    Range { flag: &'static str, value: String, why: String },
    #[error("{what} needs {} of host memory ({detail}), but this machine has {} available; {hint}", human(*.need), human(*.available))]
    HostMemory { what: String, need: u128, available: u128, detail: String, hint: String },
}

/// Bytes in the largest fitting unit, e.g. `1.50 GiB`.
pub(crate) fn human(bytes: u128) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

/// Parses a float and checks that it is finite: `inf`, `nan` never act as a silent default.
fn finite(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{s} is not a finite number"))
    }
}

/// A clap value parser: a finite number >= 0 (`--move-cost`, sizes in MiB).
pub(crate) fn non_negative(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("{s} is negative; it must be >= 0"))
    }
}

/// A clap value parser: a finite number > 0.
pub(crate) fn positive(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err(format!("{s} must be greater than 0"))
    }
}

/// The longest duration a flag may give: a week (also keeps every conversion to a `Duration`
/// far from its limits).
pub(crate) const MAX_SECONDS: f64 = 7.0 * 86400.0;

/// A clap value parser: a number of seconds > 0, at most [`MAX_SECONDS`].
pub fn seconds(s: &str) -> Result<f64, String> {
    positive_at_most(s, MAX_SECONDS, "s")
}

/// A clap value parser: a number of milliseconds > 0, at most [`MAX_SECONDS`].
pub fn milliseconds(s: &str) -> Result<f64, String> {
    positive_at_most(s, MAX_SECONDS * 1e3, "ms")
}

/// A duration `s` > 0 in `unit`, at most `max` of them (a week).
fn positive_at_most(s: &str, max: f64, unit: &str) -> Result<f64, String> {
    let v = positive(s)?;
    if v <= max {
        Ok(v)
    } else {
        Err(format!("{s} {unit} is longer than a week ({max} {unit}), the longest supported"))
    }
}

/// A clap value parser: a fraction in [0, 1].
pub(crate) fn unit_interval(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} is outside 0..=1"))
    }
}

/// Checks a placement shape against [`MAX_REPLICAS`], [`MAX_GPUS`] and [`MAX_SLOTS_PER_GPU`]
/// (`flags`: the names of the replicas and GPUs flags of the command, for the message).
pub(crate) fn check_shape(
    num_replicas: usize,
    num_gpus: usize,
    flags: (&'static str, &'static str),
) -> Result<(), LimitError> {
    let range = |flag, value: usize, why: String| Err(LimitError::Range { flag, value: value.to_string(), why });
    if num_replicas > MAX_REPLICAS {
        return range(flags.0, num_replicas, format!("more than {MAX_REPLICAS} slots a layer is not supported"));
    }
    if num_gpus > MAX_GPUS {
        return range(flags.1, num_gpus, format!("more than {MAX_GPUS} GPUs is not supported"));
    }
    if num_gpus > 0 && num_replicas / num_gpus > MAX_SLOTS_PER_GPU {
        return range(
            flags.0,
            num_replicas,
            format!(
                "{} slots a GPU over {num_gpus} GPUs; at most {MAX_SLOTS_PER_GPU} slots a GPU are supported",
                num_replicas / num_gpus
            ),
        );
    }
    Ok(())
}

/// Bytes of host memory available to this process: `MemAvailable` of `/proc/meminfo`, lowered to
/// the cgroup's memory limit when one is set. `None` when neither can be read.
pub(crate) fn host_memory_available() -> Option<u128> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        rest.trim().trim_end_matches("kB").trim().parse::<u128>().ok().map(|kb| kb * 1024)
    })?;
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|t| t.trim().parse::<u128>().ok())
        .and_then(|max| {
            let used = std::fs::read_to_string("/sys/fs/cgroup/memory.current").ok()?.trim().parse::<u128>().ok()?;
            Some(max.saturating_sub(used))
        });
    Some(cgroup.map_or(available, |c| c.min(available)))
}

/// The product of `factors`, `None` on overflow (of u128).
pub(crate) fn product(factors: &[usize]) -> Option<u128> {
    factors.iter().try_fold(1u128, |acc, &f| acc.checked_mul(f as u128))
}

/// Checks that `need` bytes (`None`: more than u128 holds) fit in the host memory available.
/// Passes when the available memory cannot be read (then the allocation itself is the check).
pub(crate) fn check_host_memory(what: &str, need: Option<u128>, detail: &str, hint: &str) -> Result<(), LimitError> {
    let Some(available) = host_memory_available() else { return Ok(()) };
    match need {
        Some(n) if n <= available => Ok(()),
        _ => Err(LimitError::HostMemory {
            what: what.to_string(),
            need: need.unwrap_or(u128::MAX),
            available,
            detail: detail.to_string(),
            hint: hint.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_parsers_refuse_non_finite_and_out_of_range() {
        for bad in ["inf", "-inf", "nan", "NaN", "-0.5", "x", ""] {
            assert!(non_negative(bad).is_err(), "{bad}");
        }
        assert_eq!(non_negative("0").unwrap(), 0.0);
        assert_eq!(non_negative("0.25").unwrap(), 0.25);
        assert!(positive("0").is_err() && positive("1e-3").is_ok());
        assert!(unit_interval("1.5").is_err() && unit_interval("nan").is_err() && unit_interval("1").is_ok());
    }

    #[test]
    fn shapes_past_the_limits_are_refused() {
        let flags = ("--num-replicas", "--num-gpus");
        assert!(check_shape(288, 32, flags).is_ok());
        assert!(check_shape(MAX_REPLICAS, MAX_GPUS, flags).is_ok());
        for (r, g) in [(usize::MAX, 4), (1_000_000, 4), (MAX_REPLICAS + 1, 1), (4096, MAX_GPUS + 1), (16_384, 2)] {
            let e = check_shape(r, g, flags).unwrap_err().to_string();
            assert!(e.contains("not supported") || e.contains("are supported"), "{e}");
        }
    }

    #[test]
    fn memory_checks_name_the_sizes() {
        assert!(product(&[usize::MAX, usize::MAX, 4]).is_none());
        assert_eq!(product(&[3, 4]), Some(12));
        if host_memory_available().is_some() {
            let e = check_host_memory("the store", product(&[1 << 40, 1 << 30]), "x", "use less").unwrap_err();
            assert!(e.to_string().contains("the store needs") && e.to_string().contains("use less"), "{e}");
            let e = check_host_memory("the store", None, "x", "y").unwrap_err().to_string();
            assert!(e.contains("needs"), "{e}");
            check_host_memory("a little", Some(1024), "x", "y").unwrap();
        }
        assert_eq!(human(1536), "1.50 KiB");
    }
}
