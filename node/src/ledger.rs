//! The node's privacy-budget ledger: how much ε each analyst has spent here in the current
//! period. A query is charged — written and fsynced — before the node reads any data for it,
//! so a crash never gives budget back. `<data_dir>/ledger.jsonl`, one JSON line per charge.
//!
//! A charge whose write or sync fails is cut back off the file (the query is refused), so a
//! failed write leaves no half line for later charges to follow. On start only the last line may
//! be unreadable — a crash mid-write, cut off — and a node refuses a ledger with any other bad
//! line rather than drop charges after it (which would give their budget back).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::storage::AppendFile;

/// File name of the ledger inside the data directory.
pub const LEDGER_FILE: &str = "ledger.jsonl";

/// One charge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    /// Seconds since the Unix epoch.
    pub time: u64,
    /// The analyst charged.
    pub analyst: String,
    /// The query.
    pub query_id: String,
    /// ε spent.
    pub epsilon: f64,
}

/// An analyst's use of the budget in the current period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// The analyst.
    pub analyst: String,
    /// ε spent in the period.
    pub used: f64,
    /// ε left in the period.
    pub remaining: f64,
    /// Queries charged in the period.
    pub queries: u64,
}

/// Why a charge was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "privacy budget exhausted: this query needs ε = {needed}, {remaining:.3} of {budget} is left for this analyst in the current {period_days}-day period"
)]
pub struct Exhausted {
    /// ε the query needs.
    pub needed: f64,
    /// ε left.
    pub remaining: f64,
    /// ε per period.
    pub budget: f64,
    /// Period length in days.
    pub period_days: u64,
}

/// The open ledger.
pub struct Ledger {
    inner: Mutex<Inner>,
}

struct Inner {
    file: Box<dyn AppendFile>,
    /// Bytes of the file that are whole, synced charges.
    len: u64,
    /// Set when a failed write could not be cut back off: no more charges (queries refused).
    poisoned: Option<String>,
    charges: Vec<Charge>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").finish_non_exhaustive()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Ledger {
    /// Opens (or creates) the ledger in `data_dir`. An unreadable last line — torn by a crash
    /// mid-write — is cut off (that charge had not been acknowledged, and no data was read for
    /// it); an unreadable line before the last is refused with its line number.
    pub fn open(data_dir: &Path) -> std::io::Result<Ledger> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(LEDGER_FILE);
        let mut charges = Vec::new();
        let mut good_len = 0u64;
        if path.exists() {
            let mut bytes = Vec::new();
            File::open(&path)?.read_to_end(&mut bytes)?;
            let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
            for (i, line) in lines.iter().enumerate() {
                let complete = line.strip_suffix(b"\n");
                match complete.map(serde_json::from_slice::<Charge>) {
                    Some(Ok(c)) => {
                        good_len += line.len() as u64;
                        charges.push(c);
                    }
                    // The last line: a write the crash cut short.
                    _ if i + 1 == lines.len() => break,
                    // (Only the last line can lack an end of line.)
                    other => {
                        let why = match other {
                            Some(Err(e)) => e.to_string(),
                            _ => "no end of line".into(),
                        };
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "{}:{}: not a budget charge ({why}); only a torn last line is \
                                 repaired — the node will not start on a ledger whose earlier \
                                 charges it cannot read, since dropping them would give budget \
                                 back",
                                path.display(),
                                i + 1
                            ),
                        ));
                    }
                }
            }
            if bytes.len() as u64 != good_len {
                tracing::warn!(path = %path.display(), dropped_bytes = bytes.len() as u64 - good_len, "budget ledger had a torn last line; cut off");
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(good_len)?;
                f.sync_all()?;
            }
        }
        let file = crate::storage::open_append(&path)?;
        Ok(Ledger {
            inner: Mutex::new(Inner {
                file: Box::new(file),
                len: good_len,
                poisoned: None,
                charges,
            }),
        })
    }

    /// Charges `epsilon` to `analyst` if the period's budget allows, durably, before returning.
    pub async fn charge(
        &self,
        analyst: &str,
        query_id: &str,
        epsilon: f64,
        budget: f64,
        period: Duration,
    ) -> Result<Result<Usage, Exhausted>, std::io::Error> {
        let mut guard = self.inner.lock().await;
        let inner = &mut *guard;
        if let Some(why) = &inner.poisoned {
            return Err(std::io::Error::other(format!(
                "{LEDGER_FILE}: not charged since a write failed and could not be undone ({why}); \
                 restart the node to repair the ledger"
            )));
        }
        let charges = &inner.charges;
        let t = now();
        let since = t.saturating_sub(period.as_secs());
        let (used, queries) = charges
            .iter()
            .filter(|c| c.analyst == analyst && c.time > since)
            .fold((0.0, 0u64), |(u, n), c| (u + c.epsilon, n + 1));
        // A small tolerance so that ten charges of 0.1 fit a budget of 1.0.
        if used + epsilon > budget + 1e-9 {
            return Ok(Err(Exhausted {
                needed: epsilon,
                remaining: (budget - used).max(0.0),
                budget,
                period_days: period.as_secs() / 86_400,
            }));
        }
        let charge = Charge {
            time: t,
            analyst: analyst.to_string(),
            query_id: query_id.to_string(),
            epsilon,
        };
        let mut line = serde_json::to_vec(&charge).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if let Err((error, rollback)) = crate::storage::blocking(|| {
            crate::storage::append_durably(inner.file.as_mut(), &mut inner.len, &line)
        }) {
            tracing::error!(%error, rollback = ?rollback.as_ref().map(ToString::to_string), "budget charge not written");
            if let Some(r) = rollback {
                inner.poisoned = Some(format!("{error}; then {r}"));
            }
            return Err(error);
        }
        inner.charges.push(charge);
        Ok(Ok(Usage {
            analyst: analyst.to_string(),
            used: used + epsilon,
            remaining: (budget - used - epsilon).max(0.0),
            queries: queries + 1,
        }))
    }

    /// Every analyst's use in the current period.
    pub async fn usage(&self, budget: f64, period: Duration) -> Vec<Usage> {
        let guard = self.inner.lock().await;
        let since = now().saturating_sub(period.as_secs());
        let mut by: HashMap<&str, (f64, u64)> = HashMap::new();
        for c in guard.charges.iter().filter(|c| c.time > since) {
            let e = by.entry(c.analyst.as_str()).or_default();
            e.0 += c.epsilon;
            e.1 += 1;
        }
        let mut out: Vec<Usage> = by
            .into_iter()
            .map(|(a, (used, queries))| Usage {
                analyst: a.to_string(),
                used,
                remaining: (budget - used).max(0.0),
                queries,
            })
            .collect();
        out.sort_by(|a, b| a.analyst.cmp(&b.analyst));
        out
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::storage::testing::FailingFile;

    const DAY: Duration = Duration::from_secs(86_400);

    #[tokio::test]
    async fn a_failed_charge_is_cut_back_and_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(LEDGER_FILE);
        let l = Ledger::open(dir.path()).expect("open");
        l.charge("a", "q1", 0.5, 10.0, DAY)
            .await
            .expect("io")
            .expect("within budget");
        let before = std::fs::read(&path).expect("read");
        for fail in [FailingFile::after_bytes(7), FailingFile::on_sync()] {
            let real = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .expect("open");
            l.inner.lock().await.file = Box::new(fail.wrapping(real));
            l.charge("a", "q2", 0.5, 10.0, DAY)
                .await
                .expect_err("the write fails");
            assert_eq!(std::fs::read(&path).expect("read"), before, "cut back");
        }
        // The failed charges were not counted, and the ledger reads back whole.
        let usage = l.usage(10.0, DAY).await;
        assert_eq!(usage[0].queries, 1);
        drop(l);
        let l = Ledger::open(dir.path()).expect("reopen");
        assert_eq!(l.usage(10.0, DAY).await[0].queries, 1);

        // When even the cut fails, no more charges are made.
        let real = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        l.inner.lock().await.file = Box::new(FailingFile::after_bytes(3).and_cut().wrapping(real));
        l.charge("a", "q3", 0.5, 10.0, DAY)
            .await
            .expect_err("fails");
        let real = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        l.inner.lock().await.file = Box::new(real);
        let err = l
            .charge("a", "q4", 0.5, 10.0, DAY)
            .await
            .expect_err("poisoned");
        assert!(err.to_string().contains("restart"), "{err}");
        drop(l);
        // And a restart repairs the torn tail the failed cut left.
        let l = Ledger::open(dir.path()).expect("reopen repairs the last line");
        assert_eq!(l.usage(10.0, DAY).await[0].queries, 1);
    }

    #[test]
    fn refuses_a_ledger_with_a_bad_line_before_the_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(LEDGER_FILE);
        let good = r#"{"time":1,"analyst":"a","query_id":"q","epsilon":1.0}"#;
        std::fs::write(&path, format!("{good}\n{{\"garbage\n{good}\n")).expect("write");
        let err = Ledger::open(dir.path()).expect_err("refused");
        assert!(err.to_string().contains(":2:"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&path)
                .expect("read")
                .lines()
                .count(),
            3,
            "nothing was cut"
        );
        // A complete but unreadable *last* line is a torn write: cut off.
        std::fs::write(&path, format!("{good}\n{{\"garbage\n")).expect("write");
        Ledger::open(dir.path()).expect("repaired");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            format!("{good}\n")
        );
    }

    #[tokio::test]
    async fn refuses_when_exhausted_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = Ledger::open(dir.path()).expect("open");
        for i in 0..10 {
            let u = l
                .charge("a", &format!("q{i}"), 0.1, 1.0, DAY)
                .await
                .expect("io")
                .expect("within budget");
            assert!((u.used - 0.1 * f64::from(i + 1)).abs() < 1e-9);
        }
        let refused = l
            .charge("a", "q10", 0.1, 1.0, DAY)
            .await
            .expect("io")
            .expect_err("exhausted");
        assert!(refused.remaining < 1e-9 && refused.to_string().contains("exhausted"));
        assert!(l.charge("b", "q", 0.5, 1.0, DAY).await.expect("io").is_ok());
        drop(l);
        // A crash mid-write leaves a torn line: cut off, everything before kept.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(LEDGER_FILE))
            .expect("open");
        f.write_all(b"{\"time\":1,\"anal").expect("write");
        drop(f);
        let l = Ledger::open(dir.path()).expect("reopen");
        assert!(
            l.charge("a", "q11", 0.1, 1.0, DAY)
                .await
                .expect("io")
                .is_err(),
            "spent budget must stay spent"
        );
        let usage = l.usage(1.0, DAY).await;
        assert_eq!(
            usage
                .iter()
                .map(|u| (u.analyst.as_str(), u.queries))
                .collect::<Vec<_>>(),
            [("a", 10), ("b", 1)]
        );
    }
}
