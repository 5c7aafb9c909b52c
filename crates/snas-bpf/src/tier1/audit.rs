//! Reading the programs' audit events from the ring buffer.

use std::time::Duration;

use super::{bpf_err, Tier1, Tier1Error};
use crate::audit::AuditEvent;

impl Tier1 {
    /// A reader of audit events; `on_event` is called from [`AuditReader::poll`].
    pub fn audit_reader<F>(&self, mut on_event: F) -> Result<AuditReader, Tier1Error>
    where
        F: FnMut(AuditEvent) + 'static,
    {
        let mut b = libbpf_rs::RingBufferBuilder::new();
        b.add(&self.maps.audit, move |data: &[u8]| {
            if let Some(e) = AuditEvent::parse(data) {
                on_event(e);
            }
            0
        })
        .map_err(bpf_err("ring buffer add"))?;
        let rb = b.build().map_err(bpf_err("ring buffer build"))?;
        Ok(AuditReader { rb })
    }
}

/// Reader of the audit ring buffer.
pub struct AuditReader {
    rb: libbpf_rs::RingBuffer<'static>,
}

impl std::fmt::Debug for AuditReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditReader").finish_non_exhaustive()
    }
}

impl AuditReader {
    /// Waits up to `timeout` for events and delivers them to the callback.
    pub fn poll(&self, timeout: Duration) -> Result<(), Tier1Error> {
        self.rb.poll(timeout).map_err(bpf_err("ring buffer poll"))
    }

    /// Delivers every pending event without waiting.
    pub fn consume(&self) -> Result<(), Tier1Error> {
        self.rb.consume().map_err(bpf_err("ring buffer consume"))
    }

    /// File descriptor to wait on with epoll.
    pub fn epoll_fd(&self) -> i32 {
        self.rb.epoll_fd()
    }
}
