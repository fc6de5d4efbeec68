//! The node's append-only query log: one JSON line per request that reached a query endpoint,
//! accepted or refused, in `<data_dir>/audit.jsonl`. Each line is written whole and synced
//! before the answer leaves the node.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// File name of the log inside the data directory.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// What the node decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The query ran and results left the node.
    Executed,
    /// The query or caller was refused.
    Refused,
    /// The query failed.
    Failed,
}

/// One log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// 1-based position in this node's log.
    pub seq: u64,
    /// RFC 3339 UTC time.
    pub time: String,
    /// Query id (coordinator-assigned for partials).
    pub query_id: String,
    /// Endpoint, e.g. `/v1/partial`.
    pub endpoint: String,
    /// The TLS peer's verified identity.
    pub peer: String,
    /// The analyst the request is for.
    pub analyst: String,
    /// The SQL (null when none was sent).
    pub sql: Option<String>,
    /// Decision.
    pub decision: Decision,
    /// Rule or error code when refused or failed.
    pub code: Option<String>,
    /// Groups that left this node.
    pub groups_released: u64,
    /// Groups withheld by this node.
    pub groups_withheld: u64,
}

/// What the caller fills in; `seq` and `time` are the log's.
#[derive(Debug, Clone)]
pub struct Record {
    /// Query id.
    pub query_id: String,
    /// Endpoint.
    pub endpoint: &'static str,
    /// TLS peer.
    pub peer: String,
    /// Analyst.
    pub analyst: String,
    /// SQL.
    pub sql: Option<String>,
    /// Decision.
    pub decision: Decision,
    /// Code.
    pub code: Option<String>,
    /// Groups released.
    pub groups_released: u64,
    /// Groups withheld.
    pub groups_withheld: u64,
}

/// The open log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    inner: Mutex<(File, u64)>,
}

impl AuditLog {
    /// Opens (or creates) the log in `data_dir`, continuing its sequence. A torn last line
    /// (from a crash mid-write) is cut off.
    pub fn open(data_dir: &Path) -> std::io::Result<AuditLog> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(AUDIT_FILE);
        let mut seq = 0;
        let mut good_len = 0u64;
        if path.exists() {
            let reader = BufReader::new(File::open(&path)?);
            for line in reader.split(b'\n') {
                let line = line?;
                match serde_json::from_slice::<Entry>(&line) {
                    Ok(e) => {
                        seq = e.seq;
                        good_len += line.len() as u64 + 1;
                    }
                    Err(_) => break,
                }
            }
            let file = OpenOptions::new().write(true).open(&path)?;
            if file.metadata()?.len() != good_len {
                tracing::warn!(path = %path.display(), kept_bytes = good_len, "audit log had a torn tail; truncated");
                file.set_len(good_len)?;
                file.sync_all()?;
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(AuditLog {
            path,
            inner: Mutex::new((file, seq)),
        })
    }

    /// Appends one entry and syncs it to disk.
    pub async fn append(&self, record: Record) -> std::io::Result<Entry> {
        let mut guard = self.inner.lock().await;
        let (file, seq) = &mut *guard;
        let entry = Entry {
            seq: *seq + 1,
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            query_id: record.query_id,
            endpoint: record.endpoint.to_string(),
            peer: record.peer,
            analyst: record.analyst,
            sql: record.sql,
            decision: record.decision,
            code: record.code,
            groups_released: record.groups_released,
            groups_withheld: record.groups_withheld,
        };
        let mut line = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        file.write_all(&line)?;
        file.sync_data()?;
        *seq += 1;
        Ok(entry)
    }

    /// Entries with `seq > since`.
    pub async fn read_since(&self, since: u64) -> std::io::Result<Vec<Entry>> {
        let _guard = self.inner.lock().await;
        let reader = BufReader::new(File::open(&self.path)?);
        let mut out = Vec::new();
        for line in reader.lines() {
            let e: Entry = serde_json::from_str(&line?).map_err(std::io::Error::other)?;
            if e.seq > since {
                out.push(e);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(q: &str) -> Record {
        Record {
            query_id: q.into(),
            endpoint: "/v1/partial",
            peer: "spiffe://f/SSA/node/n".into(),
            analyst: "spiffe://f/SSA/analyst/a".into(),
            sql: Some("SELECT count(*) FROM experience".into()),
            decision: Decision::Executed,
            code: None,
            groups_released: 1,
            groups_withheld: 0,
        }
    }

    #[tokio::test]
    async fn continues_sequence_and_cuts_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path()).expect("open");
        log.append(record("a")).await.expect("append");
        log.append(record("b")).await.expect("append");
        drop(log);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(AUDIT_FILE))
            .expect("open");
        f.write_all(b"{\"seq\":3,\"ti").expect("torn write");
        drop(f);
        let log = AuditLog::open(dir.path()).expect("reopen");
        let e = log.append(record("c")).await.expect("append");
        assert_eq!(e.seq, 3);
        let all = log.read_since(0).await.expect("read");
        assert_eq!(
            all.iter().map(|e| e.query_id.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(log.read_since(2).await.expect("read").len(), 1);
    }
}
