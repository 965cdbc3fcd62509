//! The executor factory: the one place that builds an [`ExpertStore`] from where the weights live
//! ([`Weights`]) and how they move ([`Transport`]), and that owns the set-up agreement.
//!
//! A store's set-up has a local part ([`open`]: open this rank's GPU, an engine's IPC handles;
//! nothing collective, so a rank that fails here cannot leave a peer waiting) and a collective
//! part ([`finish`]: the NCCL communicator, then the store, which warms up its connections). In
//! between, every rank must learn whether every rank's local part succeeded; [`build`] does all
//! three (callers with an agreement of their own, such as `run`'s set-up, call [`open`] and
//! [`finish`] around it).
//!
//! A new weight location or transport is one file (its memory) and one arm here: [`Weights`] or
//! [`Transport`] gets a variant, [`open`] and [`finish`] an arm.
//!
//! Faults (tests) are decorators the factory puts around the store it built when
//! [`StoreSpec::faults`] asks for one ([`super::fault`]); the stores themselves have no fault hook.

use crate::exit::{ExitKind, Failure};
use std::sync::Arc;

use thiserror::Error;

pub(crate) use super::fault::{decorate, StoreFaults};
use super::host::{HostExpertStore, HostStore};
use super::verify::Verification;
use super::{ExecError, ExpertStore};
use crate::collective::host::HostTransport;
use crate::collective::{Comm, MpiError};
use crate::engine::shm::apply::{ShmSlots, ShmSwitch};
use crate::engine::shm::region::Region;
use crate::gpu::device::Gpu;
use crate::gpu::ipc::IpcMemory;
use crate::gpu::nccl::NcclComm;
use crate::gpu::store::{DeviceExpertStore, NcclTuning};
use crate::gpu::{self, GpuError};

/// Where a rank's expert weights live.
pub enum Weights {
    /// This process's heap (the synthetic engine): `experts[layer][slot]`, filled with each
    /// expert's pattern, one contiguous tensor of `expert_bytes` a layer.
    Heap { experts: Vec<Vec<usize>>, expert_bytes: usize },
    /// GPU memory the store allocates (the synthetic engine on GPUs), on `gpu`.
    Device { gpu: Gpu, experts: Vec<Vec<usize>>, expert_bytes: usize },
    /// An engine's host tensors, in its shared-memory region; `switch` is the contract's switch
    /// protocol.
    Region { region: Arc<Region>, switch: ShmSwitch },
    /// An engine's GPU tensors behind the region's CUDA IPC handles.
    DeviceIpc { region: Arc<Region>, switch: ShmSwitch },
}

/// How expert bytes move between ranks.
pub enum Transport {
    /// MPI point-to-point, in chunks of `chunk_bytes`.
    Host { chunk_bytes: usize },
    /// NCCL point-to-point, GPU to GPU.
    Nccl { tuning: NcclTuning },
}

/// What to build: the weights, the transport, a communicator of the store's own, and the faults
/// to inject (tests; none in production: the store is then returned undecorated).
pub struct StoreSpec {
    pub weights: Weights,
    pub transport: Transport,
    pub comm: Comm,
    pub faults: StoreFaults,
}

/// Errors of a store's set-up.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Mpi(#[from] MpiError),
    /// A combination that cannot work (bad input).
    #[error("{0}")]
    Config(String),
    #[error("the expert store could not be set up on rank(s) {ranks} (each printed why); nothing was moved")]
    Peers { ranks: String, code: i32 },
}

/// Bad input for a missing GPU or driver or a table the driver contradicts, else a runtime failure.
impl Failure for StoreError {
    fn kind(&self) -> ExitKind {
        match self {
            StoreError::Gpu(e) => e.kind(),
            StoreError::Exec(_) | StoreError::Mpi(_) => ExitKind::Runtime,
            StoreError::Config(_) => ExitKind::BadInput,
            StoreError::Peers { code, .. } => ExitKind::from_code(*code),
        }
    }
}

/// A store whose local part is done.
pub enum Opened {
    /// Needs nothing collective.
    Ready(Box<dyn ExpertStore>),
    /// The GPU is open; the communicator and the store come in [`finish`].
    Device {
        gpu: Gpu,
        comm: Comm,
        experts: Vec<Vec<usize>>,
        expert_bytes: usize,
        tuning: NcclTuning,
        faults: StoreFaults,
    },
    /// The engine's GPU and its handles are open.
    DeviceIpc { gpu: Gpu, comm: Comm, memory: IpcMemory, switch: ShmSwitch, tuning: NcclTuning, faults: StoreFaults },
}

/// The local part of a store's set-up (nothing collective).
pub fn open(spec: StoreSpec) -> Result<Opened, StoreError> {
    let StoreSpec { weights, transport, comm, faults } = spec;
    match (weights, transport) {
        (Weights::Heap { experts, expert_bytes }, Transport::Host { chunk_bytes }) => {
            let store = HostExpertStore::new(HostTransport::new(comm, chunk_bytes), expert_bytes, &experts)?;
            Ok(Opened::Ready(decorate(store, faults)))
        }
        (Weights::Device { gpu, experts, expert_bytes }, Transport::Nccl { tuning }) => {
            let (layers, spr) = (experts.len(), experts.first().map_or(0, Vec::len));
            // Before the NCCL set-up that every peer joins: a store that cannot fit fails here.
            DeviceExpertStore::check_fits(&gpu, layers, spr, expert_bytes)?;
            Ok(Opened::Device { gpu, comm, experts, expert_bytes, tuning, faults })
        }
        (Weights::Region { region, switch }, Transport::Host { chunk_bytes }) => {
            let memory = ShmSlots::new(region, switch);
            let store = HostStore::with_memory(memory, HostTransport::new(comm, chunk_bytes), Verification::Checksum)?;
            Ok(Opened::Ready(decorate(store, faults)))
        }
        (Weights::DeviceIpc { region, switch }, Transport::Nccl { tuning }) => {
            let l = &region.layout;
            let w = l.ipc.as_ref().ok_or_else(|| StoreError::Config("the region has no IPC section".into()))?;
            gpu::check_cuda()?;
            let gpu = Gpu::open(gpu::ipc::device_by_pci(&w.pci_bus_id, &w.uuid)?)?;
            let memory = IpcMemory::open(l)?;
            log::info!(
                "rank {}: the engine's GPU {} ({}): {} IPC handle(s) in the table, {} distinct allocation(s) opened",
                l.rank,
                w.pci_bus_id,
                gpu.name,
                w.handles.len(),
                memory.mappings.len()
            );
            Ok(Opened::DeviceIpc { gpu, comm, memory, switch, tuning, faults })
        }
        (Weights::Heap { .. } | Weights::Region { .. }, Transport::Nccl { .. }) => Err(StoreError::Config(
            "these weights are in host memory: they move with the host transport (--transport host or auto)".into(),
        )),
        (Weights::Device { .. } | Weights::DeviceIpc { .. }, Transport::Host { .. }) => {
            Err(StoreError::Config("these weights are on a GPU: they move with NCCL (--transport nccl or auto)".into()))
        }
    }
}

/// The collective part (every rank calls it, once every rank's [`open`] succeeded).
pub fn finish(opened: Opened) -> Result<Box<dyn ExpertStore>, StoreError> {
    Ok(match opened {
        Opened::Ready(store) => store,
        Opened::Device { gpu, comm, experts, expert_bytes, tuning, faults } => {
            let nccl = NcclComm::bootstrap(&comm)?;
            decorate(DeviceExpertStore::new(gpu, nccl, &experts, expert_bytes, tuning)?, faults)
        }
        Opened::DeviceIpc { gpu, comm, memory, switch, tuning, faults } => {
            let nccl = NcclComm::bootstrap(&comm)?;
            decorate(DeviceExpertStore::over_engine(gpu, nccl, memory, Box::new(switch), tuning)?, faults)
        }
    })
}

/// A synthetic device store on a GPU and communicator that already exist (the migration
/// benchmark builds one store per expert size on the same GPU and communicator).
pub(crate) fn device_store(
    gpu: Gpu,
    nccl: NcclComm,
    experts: &[Vec<usize>],
    expert_bytes: usize,
    tuning: NcclTuning,
) -> Result<DeviceExpertStore, GpuError> {
    DeviceExpertStore::new(gpu, nccl, experts, expert_bytes, tuning)
}

/// Builds a store on every rank: the local part, the agreement (every rank learns which ranks
/// failed, so that none goes on into NCCL's set-up alone), then the collective part. Collective
/// over `world`.
pub fn build(world: &Comm, spec: StoreSpec) -> Result<Box<dyn ExpertStore>, StoreError> {
    let opened = open(spec);
    agree(world, opened).and_then(finish)
}

/// Every rank learns whether every rank's local part succeeded (one all-gather of exit codes).
pub fn agree<T>(world: &Comm, local: Result<T, StoreError>) -> Result<T, StoreError> {
    let code = match &local {
        Ok(_) => 0u64,
        Err(e) => e.exit_code().max(1) as u64,
    };
    let (failed, max_code) = world.failed_ranks(code)?;
    match local {
        Err(e) => {
            eprintln!("eplb-worker: rank {}: error: {e}", world.rank());
            Err(StoreError::Peers { ranks: format!("{failed:?}"), code: e.exit_code() })
        }
        Ok(_) if !failed.is_empty() => Err(StoreError::Peers { ranks: format!("{failed:?}"), code: max_code as i32 }),
        Ok(x) => Ok(x),
    }
}
