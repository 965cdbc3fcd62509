//! Where this rank runs: world rank and size, node and local rank.
//!
//! Nodes come from an MPI shared-memory split (`MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)`), not
//! from launcher environment variables, so the same code works under `mpirun` and
//! `srun --mpi=pmix`. `--ranks-per-node P` fakes nodes of `P` consecutive ranks on one host, to
//! test the hierarchical policy on a laptop.
//!
//! The policy owns GPU `g` on node `g / gpus_per_node`, so the ranks of a node must be consecutive
//! and every node must have as many ranks (`mpirun --map-by slot`/`core`, Slurm's block
//! distribution); [`Topology::discover`] checks it.

use thiserror::Error;

use crate::collective::{le_words, Comm, MpiError};

/// Bytes of a host name in the gathered device records.
const HOST_BYTES: usize = 64;

#[derive(Debug, Error)]
pub enum TopologyError {
    #[error(transparent)]
    Mpi(#[from] MpiError),
    #[error("--ranks-per-node {per_node} does not divide the {world_size} ranks")]
    FakeNodes { per_node: usize, world_size: usize },
    #[error("rank {rank} is on node {node} with {local_size} ranks a node, but eplb needs the ranks of a node to be consecutive and every node to have as many ranks (use --map-by slot / Slurm's block distribution, or --ranks-per-node)")]
    Irregular { rank: usize, node: usize, local_size: usize },
}

/// This rank's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub world_rank: usize,
    pub world_size: usize,
    /// Node index, `0..num_nodes`, in rank order.
    pub node: usize,
    pub num_nodes: usize,
    /// Rank within the node, `0..local_size`.
    pub local_rank: usize,
    /// Ranks per node.
    pub local_size: usize,
    pub host: String,
    /// Whether the nodes are faked with `--ranks-per-node`.
    pub faked: bool,
}

impl Topology {
    /// Finds this rank's node: from a shared-memory split of `world`, or, with
    /// `ranks_per_node = Some(P)`, nodes of `P` consecutive ranks. Collective over `world`.
    pub(crate) fn discover(world: &Comm, ranks_per_node: Option<usize>) -> Result<Topology, TopologyError> {
        let (world_rank, world_size) = (world.rank(), world.size());
        let host = host_name();
        if let Some(p) = ranks_per_node {
            if p == 0 || world_size % p != 0 {
                return Err(TopologyError::FakeNodes { per_node: p, world_size });
            }
            return Ok(Topology {
                world_rank,
                world_size,
                node: world_rank / p,
                num_nodes: world_size / p,
                local_rank: world_rank % p,
                local_size: p,
                host,
                faked: true,
            });
        }
        let local = world.split_shared()?;
        let (local_rank, local_size) = (local.rank(), local.size());
        // A node's leader is its local rank 0; the node index is the leader's position among all
        // leaders (world ranks ascending). Every rank learns every leader from one all-gather.
        let leader = (world_rank - local_rank) as u64;
        let all = world.allgather_u64(&[leader, local_size as u64])?;
        let mut leaders: Vec<u64> = all.iter().map(|r| r[0]).collect();
        leaders.dedup();
        let node = leaders.iter().position(|&l| l == leader).unwrap_or(0);
        let regular = all
            .iter()
            .enumerate()
            .all(|(r, rec)| rec[1] as usize == local_size && rec[0] as usize == r / local_size * local_size);
        if !regular {
            return Err(TopologyError::Irregular { rank: world_rank, node, local_size });
        }
        Ok(Topology {
            world_rank,
            world_size,
            node,
            num_nodes: world_size / local_size,
            local_rank,
            local_size,
            host,
            faked: false,
        })
    }

    /// The `# Using devices` block of every rank, gathered from all of them (collective; every
    /// rank gets the text, rank 0 prints it). `device` names this rank's device (`cpu` on the host
    /// path).
    pub(crate) fn devices_block(&self, world: &Comm, device: &str) -> Result<String, MpiError> {
        let mut record = Vec::with_capacity(24 + 2 * HOST_BYTES);
        for v in [self.node as u64, self.local_rank as u64, u64::from(std::process::id())] {
            record.extend(v.to_le_bytes());
        }
        record.extend(fixed_bytes(&self.host));
        record.extend(fixed_bytes(device));
        let all = world.allgather_bytes(&record)?;
        let mut out = String::from("# Using devices\n");
        for (rank, r) in all.iter().enumerate() {
            let word = le_words(&r[..24]);
            let text = |i: usize| {
                let b = &r[24 + i * HOST_BYTES..24 + (i + 1) * HOST_BYTES];
                String::from_utf8_lossy(&b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]).into_owned()
            };
            out += &format!(
                "#  Rank {rank:>3} Node {:>2} Local {:>2} Pid {:>7} on {:>12} device {}\n",
                word[0],
                word[1],
                word[2],
                text(0),
                text(1)
            );
        }
        Ok(out)
    }
}

/// `s` cut or zero-padded to [`HOST_BYTES`].
fn fixed_bytes(s: &str) -> [u8; HOST_BYTES] {
    let mut b = [0u8; HOST_BYTES];
    let n = s.len().min(HOST_BYTES);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
    b
}

/// The processor name MPI reports (the host name).
fn host_name() -> String {
    let mut buf = vec![0u8; mpi::ffi::MPI_MAX_PROCESSOR_NAME as usize + 1];
    let mut len = 0;
    // SAFETY: the buffer holds MPI_MAX_PROCESSOR_NAME bytes.
    let rc = unsafe { mpi::ffi::MPI_Get_processor_name(buf.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return "?".into();
    }
    buf.truncate(len.max(0) as usize);
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_bytes_pads_and_cuts() {
        assert_eq!(&fixed_bytes("ab")[..3], b"ab\0");
        let long = "x".repeat(100);
        assert_eq!(fixed_bytes(&long), [b'x'; HOST_BYTES]);
    }
}
