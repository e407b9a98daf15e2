//! The agent's side of the uplink: the buffer as the gateway's [`Source`].

use telemesh_gateway::Source;
use telemesh_proto::forwarder::{BufferedGap, Trim};
use telemesh_proto::Event;
use tokio::sync::watch;

use crate::buffer::{Handle, Reader};

/// The buffer, read and trimmed by the uplink.
#[derive(Debug)]
pub struct BufferSource {
    reader: Reader,
    handle: Handle,
    commits: watch::Receiver<u64>,
}

impl BufferSource {
    /// The buffer behind `reader` and `handle`; `commits` changes after each commit.
    pub fn new(reader: Reader, handle: Handle, commits: watch::Receiver<u64>) -> Self {
        BufferSource {
            reader,
            handle,
            commits,
        }
    }
}

impl Source for BufferSource {
    fn read(&self, after: Option<(u64, u64)>, max: usize) -> Result<Vec<(u64, Event)>, String> {
        self.reader
            .read(after, max)
            .map(|v| v.into_iter().map(|s| (s.epoch, s.event)).collect())
            .map_err(|e| e.to_string())
    }

    fn gaps(&self) -> Result<Vec<BufferedGap>, String> {
        self.reader
            .gaps()
            .map(|v| {
                v.into_iter()
                    .map(|g| BufferedGap {
                        id: g.id,
                        epoch: g.epoch,
                        gap: g.gap,
                    })
                    .collect()
            })
            .map_err(|e| e.to_string())
    }

    fn acked(&self) -> Option<(u64, u64)> {
        self.reader.state().ok().and_then(|s| s.acked)
    }

    async fn trim(&self, trim: Trim) -> Result<(), String> {
        self.handle
            .trim_async(trim.through, trim.gap_ids)
            .await
            .map_err(|e| e.to_string())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.commits.clone()
    }
}
