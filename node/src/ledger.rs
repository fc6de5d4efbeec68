//! The node's privacy-budget ledger: how much ε each analyst has spent here in the current
//! period. A query is charged — written and fsynced — before the node reads any data for it,
//! so a crash never gives budget back. `<data_dir>/ledger.jsonl`, one JSON line per charge.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

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
#[derive(Debug)]
pub struct Ledger {
    inner: Mutex<(File, Vec<Charge>)>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Ledger {
    /// Opens (or creates) the ledger in `data_dir`; a torn last line from a crash is cut off
    /// (that charge had not been acknowledged, and no data was read for it).
    pub fn open(data_dir: &Path) -> std::io::Result<Ledger> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(LEDGER_FILE);
        let mut charges = Vec::new();
        if path.exists() {
            let mut good_len = 0u64;
            for line in BufReader::new(File::open(&path)?).split(b'\n') {
                let line = line?;
                match serde_json::from_slice::<Charge>(&line) {
                    Ok(c) => {
                        good_len += line.len() as u64 + 1;
                        charges.push(c);
                    }
                    Err(_) => break,
                }
            }
            let f = OpenOptions::new().write(true).open(&path)?;
            if f.metadata()?.len() != good_len {
                tracing::warn!(path = %path.display(), "budget ledger had a torn tail; truncated");
                f.set_len(good_len)?;
                f.sync_all()?;
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Ledger {
            inner: Mutex::new((file, charges)),
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
        let (file, charges) = &mut *guard;
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
        file.write_all(&line)?;
        file.sync_data()?;
        charges.push(charge);
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
        for c in guard.1.iter().filter(|c| c.time > since) {
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
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

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
