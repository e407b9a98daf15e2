//! Retention: the oldest records are deleted in bounded transactions through the writer
//! (ingest interleaves), held range sets are never deleted (dedupe has no time window), and
//! durable consumers away longer than `consumer_ttl` expire.

use std::collections::HashSet;

use super::format::{encode, Cursor, Record, META};
use super::writer::{Cmd, Writer};
use super::{LogError, NodeLog};
use tokio::sync::oneshot;

impl NodeLog {
    /// Deletes the durable consumers last seen before `before_us`, except those in `keep`
    /// (connected now); returns the keys deleted.
    pub async fn expire_cursors(
        &self,
        before_us: u64,
        keep: HashSet<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>, LogError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Cmd::Expire {
                before_us,
                keep,
                reply,
            })
            .await
            .map_err(|_| LogError::Writer("stopped".into()))?;
        rx.await
            .map_err(|_| LogError::Writer("stopped".into()))?
            .map_err(LogError::Writer)
    }

    /// Applies retention: deletes records ingested before `min_ingest_us` and, oldest first,
    /// as many as needed to bring the log to `max_bytes`, in transactions of at most `chunk`
    /// records (ingest keeps going between them). Returns how many records it deleted. The
    /// held sets stay, so an event resent after its deletion is still recognised.
    pub async fn retain(
        &self,
        min_ingest_us: u64,
        max_bytes: u64,
        chunk: usize,
    ) -> Result<u64, LogError> {
        let mut total = 0;
        loop {
            let (reply, rx) = oneshot::channel();
            self.tx
                .send_async(Cmd::Retain {
                    min_ingest_us,
                    max_bytes,
                    chunk,
                    reply,
                })
                .await
                .map_err(|_| LogError::Writer("stopped".into()))?;
            let n = rx
                .await
                .map_err(|_| LogError::Writer("stopped".into()))?
                .map_err(LogError::Writer)?;
            total += n;
            if (n as usize) < chunk {
                return Ok(total);
            }
        }
    }
}

impl Writer {
    /// Deletes durable consumers last seen before `before_us`, except `keep`.
    pub(super) fn expire(
        &mut self,
        before_us: u64,
        keep: &HashSet<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>, String> {
        if let Some(f) = &self.failed {
            return Err(f.clone());
        }
        let shared = self.shared.clone();
        (|| -> Result<Vec<Vec<u8>>, heed::Error> {
            let mut wtxn = shared.env.write_txn()?;
            let mut old = Vec::new();
            for item in shared.cursors.iter(&wtxn)? {
                let (k, v) = item?;
                let seen = postcard::from_bytes::<Cursor>(v).map_or(0, |c| c.seen_us);
                if seen < before_us && !keep.contains(k) {
                    old.push(k.to_vec());
                }
            }
            for k in &old {
                shared.cursors.delete(&mut wtxn, k)?;
            }
            if !old.is_empty() {
                wtxn.commit()?;
            }
            Ok(old)
        })()
        .map_err(|e| e.to_string())
    }

    /// One retention transaction (see [`NodeLog::retain`]).
    pub(super) fn retain(
        &mut self,
        min_ingest_us: u64,
        max_bytes: u64,
        chunk: usize,
    ) -> Result<u64, String> {
        if let Some(f) = &self.failed {
            return Err(f.clone());
        }
        let shared = self.shared.clone();
        let snapshot = self.meta.clone();
        let r = (|| -> Result<u64, heed::Error> {
            let mut wtxn = shared.env.write_txn()?;
            let mut deleted = 0u64;
            while (deleted as usize) < chunk {
                let Some((k, v)) = shared.log.first(&wtxn)? else {
                    break;
                };
                let rec: Option<Record> = postcard::from_bytes(v).ok();
                let old = rec.as_ref().is_some_and(|r| r.ingest_us() < min_ingest_us);
                if !old && self.meta.bytes <= max_bytes {
                    break;
                }
                let key = k.to_vec();
                let len = v.len() as u64;
                shared.log.delete(&mut wtxn, &key)?;
                self.meta.bytes = self.meta.bytes.saturating_sub(len);
                deleted += 1;
            }
            if deleted > 0 {
                shared.meta.put(&mut wtxn, META, &encode(&self.meta))?;
                wtxn.commit()?;
            }
            Ok(deleted)
        })();
        r.map_err(|e| {
            self.meta = snapshot;
            e.to_string()
        })
    }
}
