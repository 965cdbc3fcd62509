//! The host transport: expert bytes between ranks through non-blocking MPI point-to-point.
//!
//! One [`HostTransport::exchange`] posts every receive, then every send, each cut into chunks of
//! at most `chunk_bytes` (so that no single message is huge and MPI can pipeline them), and
//! waits for all of them. Chunks of one message share its tag: MPI's non-overtaking rule delivers
//! the chunks of one (source, tag) in the order they were posted.

use std::ffi::{c_int, c_void};

use mpi::ffi;

use super::{check, mpi_count, Comm, MpiError};

/// Default chunk size of the host transport.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// One message: `len` bytes at `offset` of the exchange's send or receive buffer, to or from
/// `peer`, with `tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    pub peer: usize,
    pub tag: i32,
    pub offset: usize,
    pub len: usize,
}

/// Non-blocking, chunked MPI point-to-point on a communicator of its own.
pub struct HostTransport {
    comm: Comm,
    chunk_bytes: usize,
}

impl HostTransport {
    /// A transport on `comm` (give it a [`Comm::dup`], so that its tags meet no other traffic).
    pub fn new(comm: Comm, chunk_bytes: usize) -> HostTransport {
        HostTransport { comm, chunk_bytes: chunk_bytes.clamp(1, c_int::MAX as usize) }
    }

    /// The largest tag every MPI allows (the standard guarantees at least 32767).
    pub(crate) const MAX_TAG: i32 = 32767;

    /// Receives every message of `recvs` into `recv_buf` and sends every message of `sends` from
    /// `send_buf`, and returns once all have completed. The peers must post the matching messages
    /// (same tags and lengths). On an error the posted requests are still waited for, so that no
    /// buffer is released while MPI writes into it.
    pub fn exchange(
        &self,
        send_buf: &[u8],
        sends: &[Message],
        recv_buf: &mut [u8],
        recvs: &[Message],
    ) -> Result<(), MpiError> {
        for (m, len, what) in sends
            .iter()
            .map(|m| (m, send_buf.len(), "send"))
            .chain(recvs.iter().map(|m| (m, recv_buf.len(), "receive")))
        {
            if m.offset.checked_add(m.len).is_none_or(|end| end > len) || m.peer >= self.comm.size() {
                return Err(MpiError::usage(
                    "MPI_Isend/MPI_Irecv",
                    format!("{what} of {} bytes at {} to/from rank {} is out of bounds", m.len, m.offset, m.peer),
                ));
            }
            if !(0..=Self::MAX_TAG).contains(&m.tag) {
                return Err(MpiError::usage("MPI_Isend/MPI_Irecv", format!("tag {} is out of range", m.tag)));
            }
        }
        let mut requests: Vec<ffi::MPI_Request> = Vec::new();
        let posted = self.post(recv_buf.as_mut_ptr(), recvs, true, &mut requests).and_then(|()| {
            // The send buffer is only read; MPI_Isend takes a const pointer.
            self.post(send_buf.as_ptr().cast_mut(), sends, false, &mut requests)
        });
        let waited = self.comm.wait_all(&mut requests, "MPI_Waitall");
        posted.and(waited)
    }

    /// Posts one request per chunk of every message.
    fn post(
        &self,
        base: *mut u8,
        msgs: &[Message],
        recv: bool,
        out: &mut Vec<ffi::MPI_Request>,
    ) -> Result<(), MpiError> {
        let op = if recv { "MPI_Irecv" } else { "MPI_Isend" };
        for m in msgs {
            // A zero-length message is still one (empty) message, so both sides post the same number.
            for start in (0..m.len.max(1)).step_by(self.chunk_bytes) {
                let count = mpi_count((m.len - start).min(self.chunk_bytes), op)?;
                let mut req: ffi::MPI_Request = unsafe { ffi::RSMPI_REQUEST_NULL };
                // SAFETY: offsets were checked against the buffer lengths; the buffers outlive the
                // requests because `exchange` waits for all of them before returning.
                let rc = unsafe {
                    let ptr = base.add(m.offset + start).cast::<c_void>();
                    let (peer, comm) = (m.peer as c_int, self.comm.raw());
                    if recv {
                        ffi::MPI_Irecv(ptr, count, ffi::RSMPI_UINT8_T, peer, m.tag, comm, &mut req)
                    } else {
                        ffi::MPI_Isend(ptr, count, ffi::RSMPI_UINT8_T, peer, m.tag, comm, &mut req)
                    }
                };
                check(rc, op)?;
                out.push(req);
            }
        }
        Ok(())
    }
}
