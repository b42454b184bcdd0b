//! What the simulator needs from the operating system: its own file-descriptor limit,
//! source addresses in 127.0.0.0/8, and the gateway's CPU time and memory.

use std::net::{IpAddr, Ipv4Addr};

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use serde::{Deserialize, Serialize};

/// Raises the soft limit on open files to the hard limit (no privilege needed for that;
/// raising the hard limit needs CAP_SYS_RESOURCE). Returns `(soft, hard)` as they are now.
pub fn raise_fd_limit() -> (u64, u64) {
    let now = getrlimit(Resource::Nofile);
    if now.maximum != now.current {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: now.maximum,
                maximum: now.maximum,
            },
        );
    }
    let after = getrlimit(Resource::Nofile);
    (
        after.current.unwrap_or(u64::MAX),
        after.maximum.unwrap_or(u64::MAX),
    )
}

/// How many ephemeral ports one source address offers towards one destination
/// (`net.ipv4.ip_local_port_range`), less a margin for other users of the machine.
pub fn ports_per_address() -> usize {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<usize>().ok());
            Some((it.next()??, it.next()??))
        });
    match range {
        Some((lo, hi)) if hi > lo => (hi - lo + 1).saturating_sub(2_000).max(1_000),
        _ => 20_000,
    }
}

/// The source address of connection number `index`: 127.0.0.1 for the first
/// `per_address` connections, then 127.0.0.2, and so on (every 127/8 address is local on
/// Linux, so binding to one before `connect` gives another set of ephemeral ports).
pub fn source_address(index: usize, per_address: usize) -> IpAddr {
    let n = (index / per_address.max(1)) as u32 + 1;
    IpAddr::V4(Ipv4Addr::from(0x7f00_0000u32 | (n & 0x00ff_ffff)))
}

/// CPU time and memory of a process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ProcSample {
    /// User + system CPU seconds since the process started.
    pub cpu_secs: f64,
    /// Resident set size now (VmRSS), KiB.
    pub rss_kib: u64,
    /// Peak resident set size (VmHWM), KiB.
    pub peak_rss_kib: u64,
}

pub fn sample(pid: u32) -> std::io::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces: fields are counted after its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| std::io::Error::other("unexpected /proc/<pid>/stat format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, utime field 14, stime field 15 (proc(5)).
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let hz = rustix::param::clock_ticks_per_second().max(1) as f64;
    let cpu_secs = (ticks(11) + ticks(12)) as f64 / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        cpu_secs,
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_step_through_127_slash_8() {
        assert_eq!(source_address(0, 10).to_string(), "127.0.0.1");
        assert_eq!(source_address(9, 10).to_string(), "127.0.0.1");
        assert_eq!(source_address(10, 10).to_string(), "127.0.0.2");
        assert_eq!(source_address(2_560, 10).to_string(), "127.0.1.1");
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0 && s.peak_rss_kib >= s.rss_kib);
    }
}
