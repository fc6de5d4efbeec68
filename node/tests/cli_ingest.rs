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

/// Runs `cxfed ARGS` in `dir` with every log level on; returns (success, stdout + stderr).
fn cxfed(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cxfed"))
        .current_dir(dir)
        .args(args)
        .env("CI", "true")
        .env("CXFED_LOG", "trace")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn journeys_synthesized_keyed_and_ingested_with_no_ssn_in_any_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut outputs = Vec::new();
    let (ok, text) = cxfed(
        d,
        &[
            "synth",
            "--journeys",
            "retirement",
            "--overlap",
            "0.4",
            "--people",
            "300",
            "--seed",
            "5",
            "--out",
            "j",
        ],
    );
    assert!(ok, "{text}");
    assert!(text.contains("CMS: 300 people ("), "{text}");
    outputs.push(text);
    let (ok, text) = cxfed(d, &["linkage", "keygen", "--out", "linkage.key"]);
    assert!(ok, "{text}");
    outputs.push(text);
    let (ok, text) = cxfed(
        d,
        &["synth", "--agency", "SSA", "--overlap", "0.4", "--out", "x"],
    );
    assert!(!ok && text.contains("--overlap needs --journeys"), "{text}");

    let mut ssns = Vec::new();
    for agency in ["SSA", "CMS", "OPM"] {
        let data = d.join("data").join(agency);
        std::fs::create_dir_all(&data).unwrap();
        std::fs::copy(d.join("linkage.key"), data.join("linkage.key")).unwrap();
        let data_arg = format!("data/{agency}");
        for t in Table::ALL {
            let file = format!("j/{agency}/{}.csv", t.name());
            let (ok, text) = cxfed(
                d,
                &[
                    "ingest",
                    "--data-dir",
                    &data_arg,
                    "--table",
                    t.name(),
                    &file,
                ],
            );
            assert!(ok, "{agency} {}: {text}", t.name());
        }
        let file = format!("j/{agency}/linkage.csv");
        let (ok, text) = cxfed(d, &["linkage", "ingest", "--data-dir", &data_arg, &file]);
        assert!(ok, "{agency}: {text}");
        assert!(text.contains("added 300 keyed linkage value(s)"), "{text}");
        outputs.push(text);
        let linkage = std::fs::read_to_string(d.join(&file)).unwrap();
        ssns.extend(
            linkage
                .lines()
                .skip(1)
                .map(|l| l.split(',').nth(1).unwrap().to_string()),
        );
        let store = std::fs::read_to_string(data.join("linkage.keyed")).unwrap();
        outputs.push(store);
    }
    assert_eq!(ssns.len(), 900);

    // A bad file: located, nothing added, and still no SSN shown.
    let bad = format!(
        "person_id,ssn\nSSA-P-x1,{}\nSSA-P-x2,666-12-3456\nSSA-P-x3,{}\n",
        ssns[0], ssns[0]
    );
    std::fs::write(d.join("bad.csv"), bad).unwrap();
    let before = std::fs::read(d.join("data/SSA/linkage.keyed")).unwrap();
    let (ok, text) = cxfed(
        d,
        &["linkage", "ingest", "--data-dir", "data/SSA", "bad.csv"],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("bad.csv:3:2: ssn: area number (the first three digits) 666"),
        "{text}"
    );
    assert!(
        text.contains("bad.csv:4:2: ssn: the same ssn is given on line 2"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(d.join("data/SSA/linkage.keyed")).unwrap(),
        before
    );
    outputs.push(text);
    // Valid on its own, but the node holds that SSN for another person.
    let clash = format!("person_id,ssn\nSSA-P-x1,{}\n", ssns[0]);
    std::fs::write(d.join("clash.csv"), clash).unwrap();
    let (ok, text) = cxfed(
        d,
        &["linkage", "ingest", "--data-dir", "data/SSA", "clash.csv"],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("clash.csv:2:2: ssn: this node already holds the same ssn"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(d.join("data/SSA/linkage.keyed")).unwrap(),
        before
    );
    outputs.push(text);

    let all = outputs.join("\n");
    for s in &ssns {
        assert!(!all.contains(s.as_str()), "an SSN appears in an output");
        assert!(
            !all.contains(&s.replace('-', "")),
            "an SSN appears in an output"
        );
    }
}
