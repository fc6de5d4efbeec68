//! `cxfed ingest` run as a user runs it: from the directory that will hold the node, with a
//! relative `--data-dir` that does not exist yet.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

use cxfed_queries::schema::Table;

#[test]
fn ingest_into_a_new_relative_data_dir_succeeds_and_writes_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let opts = cxfed::synth::SynthOptions {
        agency: "SSA".into(),
        people: 40,
        seed: 3,
    };
    cxfed::synth::write(&opts, &dir.path().join("synth")).unwrap();
    for t in Table::ALL {
        let out = Command::new(env!("CARGO_BIN_EXE_cxfed"))
            .current_dir(dir.path())
            .args(["ingest", "--data-dir", "data", "--table", t.name()])
            .arg(format!("synth/{}.csv", t.name()))
            .env("CI", "true")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", t.name());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("to {}", t.name())), "{stdout}");
        let table_dir = dir.path().join("data").join(t.name());
        let parquet = std::fs::read_dir(&table_dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "parquet")
            })
            .count();
        assert_eq!(parquet, 1, "one Parquet file in {}", table_dir.display());
    }
}
