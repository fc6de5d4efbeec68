//! Speaking A-11: schema version 2 and the migration of a version-1 data directory, Touchpoints
//! imports (pseudonymized, no free text), and the quarterly report in GSA's published layout,
//! checked against the data the generator wrote.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cxfed_e2e::Fed;
use cxfed_queries::schema::Table;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

async fn rows_of(
    ctx: &datafusion::prelude::SessionContext,
    sql: &str,
) -> Vec<Vec<serde_json::Value>> {
    rows(ctx, sql).await
}

async fn rows(ctx: &datafusion::prelude::SessionContext, sql: &str) -> Vec<Vec<serde_json::Value>> {
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    cxfed::output::rows(&batches).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_data_dir_is_migrated_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    copy_dir(&fixture("v1-data"), &data);
    assert_eq!(cxfed::storage::schema_version(&data).unwrap(), 1);
    // The version-1 rows, read straight from the files with the version-1 schema.
    let v1 = datafusion::prelude::SessionContext::new();
    let exp = data.join("experience");
    v1.register_parquet("e", exp.to_str().unwrap(), Default::default())
        .await
        .unwrap();
    let before = rows(
        &v1,
        "SELECT response_id, response_date, trust, employee_helpfulness FROM e ORDER BY response_id",
    )
    .await;
    assert_eq!(before.len(), 25);

    let m = cxfed::ingest::migrate(&data).unwrap();
    assert_eq!((m.from, m.files, m.rows), (1, 2, 25 + 63));
    assert_eq!(cxfed::storage::schema_version(&data).unwrap(), 2);
    let again = cxfed::ingest::migrate(&data).unwrap();
    assert_eq!(
        (again.from, again.files),
        (2, 0),
        "a second run does nothing"
    );

    let ctx = cxfed::engine::node_context(&data, 64 << 20).unwrap();
    let after = rows(
        &ctx,
        "SELECT response_id, response_date, trust, employee_helpfulness FROM experience ORDER BY response_id",
    )
    .await;
    assert_eq!(after, before, "existing values are kept");
    // New columns: fiscal year/quarter derived from the date, the legacy form, no drivers.
    let derived = rows(
        &ctx,
        "SELECT response_date, fiscal_year, fiscal_quarter, survey_format, positive_ease FROM experience",
    )
    .await;
    for r in &derived {
        let date = r[0].as_str().unwrap();
        let (y, m): (i64, i64) = (date[..4].parse().unwrap(), date[5..7].parse().unwrap());
        let fy = if m >= 10 { y + 1 } else { y };
        let q = match m {
            10..=12 => 1,
            1..=3 => 2,
            4..=6 => 3,
            _ => 4,
        };
        assert_eq!((r[1].as_i64(), r[2].as_i64()), (Some(fy), Some(q)), "{r:?}");
        assert_eq!(r[3], "a11_legacy");
        assert!(r[4].is_null());
    }
    let ops = rows(
        &ctx,
        "SELECT COUNT(*) FROM operational WHERE fiscal_year IS NOT NULL",
    )
    .await;
    assert_eq!(ops[0][0], 63);

    // A version-1 CSV still ingests, into the current layout.
    let fresh = tmp.path().join("fresh");
    let r = cxfed::ingest::ingest(
        &fresh,
        Table::Experience,
        &fixture("v1-experience.csv"),
        false,
    )
    .unwrap();
    assert_eq!(r.rows, 25);
    assert_eq!(cxfed::storage::schema_version(&fresh).unwrap(), 2);

    // A directory from a newer cxfed is refused.
    std::fs::write(data.join("SCHEMA_VERSION"), "3\n").unwrap();
    let err = cxfed::ingest::migrate(&data).unwrap_err().to_string();
    assert!(err.contains("newer cxfed"), "{err}");
}

const EXPORT_HEADER: &str = "id,external_id,question_1,positive_effectiveness,positive_ease,\
positive_efficiency,positive_transparency,positive_humanity,positive_employee,positive_other,\
negative_effectiveness,negative_ease,negative_efficiency,negative_transparency,negative_humanity,\
negative_employee,negative_other,question_4,job_id,created_at";

fn export_row(id: u32, external: &str, thumbs: &str, comment: &str, created: &str) -> String {
    format!(
        "{id},{external},{thumbs},1,0,1,0,null,null,0,0,0,0,0,null,null,0,\"{comment}\",d61af450e8,{created}"
    )
}

fn import_opts() -> cxfed::touchpoints::ImportOptions {
    cxfed::touchpoints::ImportOptions {
        agency: "SSA".into(),
        service: "Retirement benefits".into(),
        channel: "website".into(),
        life_experience: "approaching_retirement".into(),
        journey_stage: "apply".into(),
        question_1: cxfed::touchpoints::Question1::Thumbs,
        response_date: None,
    }
}

fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else {
            out.extend(std::fs::read(&p).unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touchpoints_import_pseudonymizes_and_never_stores_comments() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let secret = "my SSN is 078-05-1120, call me";
    let first = tmp.path().join("q1.csv");
    std::fs::write(
        &first,
        format!(
            "{EXPORT_HEADER}\n{}\n{}\n{}\n",
            export_row(1, "TP-alice", "1", secret, "2025-10-07T14:47:14.260Z"),
            export_row(2, "TP-bob", "0", "", "2025-11-02T09:00:00Z"),
            export_row(3, "TP-carol", "1", "fine, thanks", "2026-01-15T10:00:00Z"),
        ),
    )
    .unwrap();
    let r = cxfed::touchpoints::import(&data, &first, &import_opts()).unwrap();
    assert_eq!((r.rows_added(), r.comments_dropped), (3, 2));
    assert_eq!((r.already_stored, r.repeated), (0, 0));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join(cxfed::touchpoints::KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the pseudonym key is private");
    let second = tmp.path().join("q2.csv");
    std::fs::write(
        &second,
        format!(
            "{EXPORT_HEADER}\n{}\n",
            export_row(9, "TP-alice", "0", "", "2026-02-01T00:00:00Z")
        ),
    )
    .unwrap();
    cxfed::touchpoints::import(&data, &second, &import_opts()).unwrap();

    let stored = all_bytes(&data);
    let contains = |needle: &str| stored.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(
        !contains("078-05-1120") && !contains("fine, thanks"),
        "free text was stored"
    );
    assert!(
        !contains("TP-alice") && !contains("TP-bob"),
        "an external id was stored"
    );

    let ctx = cxfed::engine::node_context(&data, 64 << 20).unwrap();
    let got = rows(
        &ctx,
        "SELECT person_id, response_date, trust, trust_thumbs_up, positive_effectiveness, \
         positive_humanity, survey_format, fiscal_year, fiscal_quarter \
         FROM experience ORDER BY response_date",
    )
    .await;
    assert_eq!(got.len(), 4);
    // Alice answered twice, in two imports: one person_id; Bob is someone else.
    assert_eq!(got[0][0], got[3][0]);
    assert_ne!(got[0][0], got[1][0]);
    assert_eq!(got[0][1], "2025-10-07");
    assert!(got[0][2].is_null());
    assert_eq!((got[0][3].as_i64(), got[1][3].as_i64()), (Some(1), Some(0)));
    assert_eq!((got[0][4].as_i64(), got[0][5].is_null()), (Some(1), true));
    assert_eq!(got[0][6], "a11_2024");
    assert_eq!(
        (got[0][7].as_i64(), got[0][8].as_i64()),
        (Some(2026), Some(1))
    );
    assert_eq!(
        (got[2][7].as_i64(), got[2][8].as_i64()),
        (Some(2026), Some(2))
    );

    // Bad rows: FILE:LINE:COLUMN for each, and nothing is written.
    let before = all_bytes(&data);
    let bad = tmp.path().join("bad.csv");
    std::fs::write(
        &bad,
        format!(
            "{EXPORT_HEADER}\n{}\n{}\n{}\n",
            export_row(1, "TP-dan", "maybe", "", "2025-10-07T00:00:00Z"),
            export_row(2, "TP-erin", "1", "", "yesterday"),
            export_row(3, "", "1", "", "2025-10-07T00:00:00Z").replacen(",1,0,1,", ",2,0,1,", 1),
        ),
    )
    .unwrap();
    let err = cxfed::touchpoints::import(&data, &bad, &import_opts())
        .unwrap_err()
        .to_string();
    let f = bad.display().to_string();
    for want in [
        format!("{f}:2:3: question_1: \"maybe\" is not a thumbs answer"),
        format!("{f}:3:20: created_at: \"yesterday\""),
        format!("{f}:4:2: external_id: required value is empty"),
        format!("{f}:4:4: positive_effectiveness: \"2\" is not 0, 1 or null"),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    assert_eq!(all_bytes(&data), before, "a bad file wrote something");
    // Options are checked against the schema before the file is read.
    let mut wrong = import_opts();
    wrong.channel = "carrier_pigeon".into();
    let err = cxfed::touchpoints::import(&data, &first, &wrong)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--channel: \"carrier_pigeon\" is not allowed"),
        "{err}"
    );
}

/// Nothing is written when the input is bad: not the pseudonym key, not a table directory, not
/// a migration of an older data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_import_or_ingest_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.csv");
    std::fs::write(
        &bad,
        format!(
            "{EXPORT_HEADER}\n{}\n{}\n",
            export_row(1, "TP-dan", "1", "", "2025-10-07T00:00:00Z"),
            export_row(2, "TP-erin", "maybe", "", "2025-10-08T00:00:00Z"),
        ),
    )
    .unwrap();
    // A data directory that does not exist yet, and one that exists but is empty.
    let missing = tmp.path().join("missing");
    let err = cxfed::touchpoints::import(&missing, &bad, &import_opts()).unwrap_err();
    assert!(err.to_string().contains("nothing was ingested"), "{err}");
    assert!(
        !missing.exists(),
        "a rejected import created {}",
        missing.display()
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    cxfed::touchpoints::import(&empty, &bad, &import_opts()).unwrap_err();
    let left: Vec<_> = std::fs::read_dir(&empty).unwrap().collect();
    assert!(left.is_empty(), "a rejected import wrote {left:?}");
    // A bad driver flag alone: still no key.
    let flag = tmp.path().join("flag.csv");
    std::fs::write(
        &flag,
        format!(
            "{EXPORT_HEADER}\n{}\n",
            export_row(1, "TP-dan", "1", "", "2025-10-07T00:00:00Z")
                .replacen(",1,0,1,", ",1,7,1,", 1)
        ),
    )
    .unwrap();
    cxfed::touchpoints::import(&empty, &flag, &import_opts()).unwrap_err();
    assert!(std::fs::read_dir(&empty).unwrap().next().is_none());

    // A version-1 data directory is not migrated by an ingest of a bad file.
    let data = tmp.path().join("v1");
    copy_dir(&fixture("v1-data"), &data);
    let before = all_bytes(&data);
    let bad_csv = tmp.path().join("bad-experience.csv");
    let good = std::fs::read_to_string(fixture("v1-experience.csv")).unwrap();
    let mut lines: Vec<&str> = good.lines().collect();
    let broken = lines[2].replacen(",SSA,", ",not an agency!,", 1);
    lines[2] = &broken;
    std::fs::write(&bad_csv, lines.join("\n") + "\n").unwrap();
    let err = cxfed::ingest::ingest(&data, Table::Experience, &bad_csv, false).unwrap_err();
    assert!(err.to_string().contains(":3:"), "{err}");
    assert_eq!(
        cxfed::storage::schema_version(&data).unwrap(),
        1,
        "not migrated"
    );
    assert_eq!(
        all_bytes(&data),
        before,
        "a rejected ingest changed the directory"
    );
    let bad_import = cxfed::touchpoints::import(&data, &bad, &import_opts());
    assert!(bad_import.is_err());
    assert_eq!(all_bytes(&data), before);
    assert!(!data.join(cxfed::touchpoints::KEY_FILE).exists());
    // A good file migrates and adds.
    let r = cxfed::ingest::ingest(
        &data,
        Table::Experience,
        &fixture("v1-experience.csv"),
        false,
    )
    .unwrap();
    assert_eq!(r.rows, 25);
    assert_eq!(cxfed::storage::schema_version(&data).unwrap(), 2);
}

/// Touchpoints exports are cumulative: importing this quarter's export after last quarter's
/// adds only the new responses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touchpoints_reimport_skips_responses_already_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let rows = [
        export_row(1, "TP-alice", "1", "", "2025-10-07T14:47:14.260Z"),
        export_row(2, "TP-bob", "0", "", "2025-11-02T09:00:00Z"),
        export_row(3, "TP-carol", "1", "", "2026-01-15T10:00:00Z"),
    ];
    let write = |name: &str, rows: &[String]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, format!("{EXPORT_HEADER}\n{}\n", rows.join("\n"))).unwrap();
        p
    };
    let q1 = write("q1.csv", &rows[..2]);
    let r = cxfed::touchpoints::import(&data, &q1, &import_opts()).unwrap();
    assert_eq!((r.rows_added(), r.already_stored, r.repeated), (2, 0, 0));
    // The same export again: nothing added, nothing written.
    let before = all_bytes(&data);
    let r = cxfed::touchpoints::import(&data, &q1, &import_opts()).unwrap();
    assert_eq!((r.rows_added(), r.already_stored), (0, 2));
    assert!(r.ingest.is_none());
    assert_eq!(all_bytes(&data), before);
    // The cumulative export, with its rows in another order and other Touchpoints row ids (the
    // response is identified by respondent and time, not by line or row id), and Alice's next
    // answer (a new time), and one line repeated.
    let mut cumulative = vec![
        rows[2].clone(),
        rows[1].replacen("2,", "77,", 1),
        rows[0].clone(),
        export_row(4, "TP-alice", "0", "", "2026-02-01T00:00:00Z"),
    ];
    cumulative.push(rows[2].clone());
    let q2 = write("q2.csv", &cumulative);
    let r = cxfed::touchpoints::import(&data, &q2, &import_opts()).unwrap();
    assert_eq!(
        (r.rows_added(), r.already_stored, r.repeated),
        (2, 2, 1),
        "carol and alice's second answer added; alice's and bob's first skipped; carol once"
    );
    let ctx = cxfed::engine::node_context(&data, 64 << 20).unwrap();
    let got = rows_of(
        &ctx,
        "SELECT COUNT(*), COUNT(DISTINCT response_id), COUNT(DISTINCT person_id) FROM experience",
    )
    .await;
    assert_eq!(
        (got[0][0].as_i64(), got[0][1].as_i64(), got[0][2].as_i64()),
        (Some(4), Some(4), Some(3))
    );
}

/// Service provider names of the test federation's agencies, back to their abbreviations.
static ABBREVIATIONS: std::sync::LazyLock<BTreeMap<String, &'static str>> =
    std::sync::LazyLock::new(|| {
        ["SSA", "CMS", "OPM"]
            .into_iter()
            .map(|a| (cxfed::report::agency_names(a).1.to_string(), a))
            .collect()
    });

/// (agency, service, channel, question_id) -> the report's count columns.
type Counts = BTreeMap<RowKey, Vec<Option<f64>>>;
type RowKey = (String, String, String, String);

fn parse_report(csv_text: &str) -> (Vec<String>, Counts, BTreeMap<RowKey, f64>) {
    let mut r = csv::Reader::from_reader(csv_text.as_bytes());
    let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    let mut out = Counts::new();
    let mut cis = BTreeMap::new();
    for rec in r.records() {
        let rec = rec.unwrap();
        // Keyed by the service provider's name (the agency's full name, as GSA publishes it).
        let key = (
            rec[5].to_string(),
            rec[8].to_string(),
            rec[11].to_string(),
            rec[18].to_string(),
        );
        assert_eq!(
            cxfed::report::agency_names(ABBREVIATIONS[&rec[5]]),
            (&rec[3], &rec[5]),
            "{rec:?}"
        );
        let counts = (20..26).map(|i| rec[i].parse().ok()).collect();
        if let Some(ci) = rec[13].rsplit("+/-").next().and_then(|s| s.parse().ok())
            && rec[13].contains("+/-")
        {
            cis.insert(key.clone(), ci);
        }
        out.insert(key, counts);
    }
    (header, out, cis)
}

/// The same counts from the pooled data, for every group (no suppression).
async fn truth(fed: &Fed, fy: i32, q: u8) -> Counts {
    counts_of(fed, fy, q, false).await
}

/// Per count, how many of its rows belong to a person with more than one response in the
/// quarter: the only rows a node's contribution bounding (one group, one row per person) can
/// leave out.
async fn droppable(fed: &Fed, fy: i32, q: u8) -> Counts {
    counts_of(fed, fy, q, true).await
}

/// Per count, the distinct people behind it.
async fn people_of(fed: &Fed, fy: i32, q: u8) -> Counts {
    counts_with(fed, fy, q, false, "COUNT(DISTINCT person_id)").await
}

async fn counts_of(fed: &Fed, fy: i32, q: u8, only_repeat_respondents: bool) -> Counts {
    counts_with(fed, fy, q, only_repeat_respondents, "COUNT(*)").await
}

async fn counts_with(
    fed: &Fed,
    fy: i32,
    q: u8,
    only_repeat_respondents: bool,
    count: &str,
) -> Counts {
    let pooled = fed.pooled();
    let from = if only_repeat_respondents {
        format!(
            "experience e JOIN (SELECT person_id AS p FROM experience \
             WHERE fiscal_year = {fy} AND fiscal_quarter = {q} \
             GROUP BY person_id HAVING COUNT(*) > 1) r ON e.person_id = r.p"
        )
    } else {
        "experience".to_string()
    };
    let mut out = Counts::new();
    let items = [
        ("trust", "2"),
        ("satisfaction", "1"),
        ("effectiveness", "3"),
        ("ease", "4"),
        ("efficiency", "5"),
        ("transparency", "6"),
        ("employee_helpfulness", "7"),
    ];
    for (item, qid) in items {
        let sql = format!(
            "SELECT agency, service, channel, {} FROM {from} \
             WHERE fiscal_year = {fy} AND fiscal_quarter = {q} GROUP BY agency, service, channel",
            (1..=5)
                .map(|v| format!("{count} FILTER (WHERE {item} = {v})"))
                .chain([format!("{count} FILTER (WHERE {item} >= 4)")])
                .collect::<Vec<_>>()
                .join(", ")
        );
        for r in rows(&pooled, &sql).await {
            let key = (
                cxfed::report::agency_names(r[0].as_str().unwrap())
                    .1
                    .to_string(),
                r[1].as_str().unwrap().to_string(),
                r[2].as_str().unwrap().to_string(),
                qid.to_string(),
            );
            out.insert(key, r[3..9].iter().map(|v| v.as_f64()).collect());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarterly_report_has_the_published_layout_and_the_generated_numbers() {
    let published = std::fs::read_to_string(fixture("hisp-cx-header.csv")).unwrap();
    let published: Vec<&str> = published.trim().split(',').collect();
    assert_eq!(cxfed::report::HEADER, published.as_slice());

    // k-only nodes: every released count equals the pooled count.
    let fed = Fed::start_with(3_000, Duration::from_secs(60)).await;
    let csv_text = cxfed::report::a11_quarterly(&fed.analyst, &fed.fed.url(0), 2025, 3, None)
        .await
        .unwrap();
    let (header, got, _) = parse_report(&csv_text);
    assert_eq!(header, published);
    let want = truth(&fed, 2025, 3).await;
    let people = people_of(&fed, 2025, 3).await;
    let legacy: Vec<_> = got.iter().filter(|(k, _)| k.3 != "8").collect();
    assert!(legacy.len() > 20, "{} rows", legacy.len());
    let mut blanks = 0;
    for (key, counts) in legacy {
        // Each group is one agency's, so one node's: an answer count held by 1 to k − 1
        // people is left blank (k per cell), and the agree count too when it would hold one.
        let mut expected = want[key].clone();
        for (v, p) in expected.iter_mut().zip(&people[key]).take(5) {
            let p = p.unwrap_or(0.0);
            if p > 0.0 && p < cxfed_e2e::K as f64 {
                *v = None;
                blanks += 1;
            }
        }
        if expected[3].is_none() || expected[4].is_none() {
            expected[5] = None;
        }
        assert_eq!(counts, &expected, "{key:?}");
    }
    assert!(
        blanks > 0,
        "some answer count must be held by fewer than k people"
    );
    assert!(csv_text.contains("left blank"));
    assert!(got.keys().any(|k| k.3 == "8"), "thumbs rows");
    assert!(csv_text.contains("exact counts"));
    // Organizations and providers by the names GSA's published data uses.
    for (org, provider) in [
        (
            "U.S. Department of Health & Human Services",
            "Centers for Medicare and Medicaid Services",
        ),
        (
            "Social Security Administration",
            "Social Security Administration",
        ),
        (
            "Office of Personnel Management",
            "Office of Personnel Management",
        ),
    ] {
        assert!(
            csv_text.contains(&format!(",{org},,{provider},")),
            "{org} / {provider}"
        );
    }
    fed.fed.shutdown().await;

    // DP nodes: every count within its stated noise.
    // ε = 8 per query (the steward allows it; budget 100) so that groups of a few dozen people
    // pass DP partition selection at this test's scale.
    let dp = cxfed::policy::DpSettings {
        epsilon_per_query: 8.0,
        budget_epsilon: 100.0,
        ..cxfed::policy::DpSettings::DEFAULT
    };
    let fed = Fed::start_dp(3_000, dp).await;
    let csv_text = cxfed::report::a11_quarterly(&fed.analyst, &fed.fed.url(0), 2025, 3, None)
        .await
        .unwrap();
    let (_, got, cis) = parse_report(&csv_text);
    let want = truth(&fed, 2025, 3).await;
    let repeat = droppable(&fed, 2025, 3).await;
    assert!(!cis.is_empty() && cis.values().all(|c| *c > 0.0));
    let (mut within, mut total, mut dropped, mut rows) = (0, 0, 0.0, 0.0);
    for (key, counts) in got.iter().filter(|(k, _)| k.3 != "8") {
        let ci = cis[key];
        let truth = want.get(key).unwrap();
        let none = vec![Some(0.0); 6];
        let repeat = repeat.get(key).unwrap_or(&none);
        for ((g, t), d) in counts.iter().zip(truth).zip(repeat).take(5) {
            let (g, t, d) = (g.unwrap(), t.unwrap(), d.unwrap());
            total += 1;
            (dropped, rows) = (dropped + d, rows + t);
            // Contribution bounding keeps one group and one response per person: a count can
            // lose at most the rows of people who answered more than once, never gain. Noise is
            // discrete Laplace (heavier tails than the normal the 95% interval assumes), and
            // ~1,000 counts are checked: 6 half-widths (≈ 17 Laplace scales) keep a sound node
            // from failing by chance.
            if g >= t - d - ci && g <= t + ci {
                within += 1;
            }
            assert!(
                g <= t + 6.0 * ci && g >= t - d - 6.0 * ci,
                "{key:?}: {g} vs {t} (of which {d} from repeat respondents) ± {ci}"
            );
        }
    }
    assert!(total > 0);
    eprintln!(
        "dp report: {within} of {total} counts within ±ci; {dropped} of {rows} rows from repeat \
         respondents"
    );
    assert!(
        within as f64 >= 0.85 * total as f64,
        "{within} of {total} within ±ci"
    );
    // The allowance for bounding must not swallow the check: most rows are first responses.
    assert!(
        dropped < 0.5 * rows,
        "{dropped} of {rows} rows from repeat respondents"
    );
    fed.fed.shutdown().await;
}
