//! End-to-end: secure aggregation in `dp` mode. A query grouped by public keys runs in two
//! rounds (one-time keys, then masked partials), the noise of the sum is one central draw, and
//! every node refuses what a hostile coordinator tries: a repeated query id, a roster that is
//! too small, names another node falsely, or disagrees on the calibration, and a second run of
//! a used key. A coordinator that colludes with all the other nodes can unmask one node's
//! partial — as documented — and then reads it with only a share of the noise.
#![allow(clippy::unwrap_used, missing_docs)]

use cxfed::policy::DpSettings;
use cxfed_e2e::{Fed, signed_partial};
use cxfed_protocol::secagg::{KeyPair, Member, Roster, mask};
use cxfed_protocol::signing::hex;
use cxfed_protocol::wire::{ErrorBody, PROTOCOL_VERSION, SecAggKey, SecAggKeyRequest, SecAggRound};

const SQL: &str = "SELECT channel, COUNT(*) AS n, AVG(trust) AS t FROM experience GROUP BY channel ORDER BY channel";

async fn key_from(fed: &Fed, i: usize, query_id: &str) -> Result<SecAggKey, ErrorBody> {
    let hostile = fed.client("CMS", "node");
    let resp = hostile
        .post(format!("{}/v1/secagg/key", fed.fed.url(i)))
        .json(&SecAggKeyRequest {
            protocol: PROTOCOL_VERSION,
            query_id: query_id.into(),
            sql: SQL.into(),
            epsilon: None,
        })
        .send()
        .await
        .unwrap();
    if resp.status().is_success() {
        Ok(resp.json().await.unwrap())
    } else {
        Err(resp.json().await.unwrap())
    }
}

/// CMS's own entry for `query_id`, signed with CMS's node key, naming `agency`.
fn cms_entry(
    fed: &Fed,
    query_id: &str,
    key: &KeyPair,
    calibration: &str,
    agency: &str,
) -> SecAggKey {
    let signer = cxfed::tls::signer(&fed.fed.tls("CMS", "node")).unwrap();
    let mut entry = SecAggKey {
        agency: agency.into(),
        public_key: hex(&key.public_key()),
        calibration: calibration.into(),
        certificate: hex(signer.certificate()),
        signature: String::new(),
    };
    entry.signature = hex(&signer
        .sign_bytes(&entry.message("cx-demo", query_id))
        .unwrap());
    entry
}

/// SSA's answer to a partial for `query_id` sent by CMS with `roster`.
async fn partial_at_ssa(
    fed: &Fed,
    query_id: &str,
    roster: Vec<SecAggKey>,
) -> Result<Vec<u8>, ErrorBody> {
    let mut req = signed_partial(&fed.analyst, "CMS", query_id, SQL, None);
    req.secagg = Some(SecAggRound { roster });
    let resp = fed
        .client("CMS", "node")
        .post(format!("{}/v1/partial", fed.fed.url(0)))
        .json(&req)
        .send()
        .await
        .unwrap();
    if resp.status().is_success() {
        Ok(resp.bytes().await.unwrap().to_vec())
    } else {
        Err(resp.json().await.unwrap())
    }
}

fn refused(r: Result<impl std::fmt::Debug, ErrorBody>, says: &str) {
    match r {
        Err(b) => assert!(
            b.code == "CXF-P008" && b.message.contains(says),
            "expected CXF-P008 saying {says:?}: {b:?}"
        ),
        Ok(v) => panic!("expected a refusal saying {says:?}, got {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_sum_is_readable_and_hostile_rosters_are_refused() {
    let fed = Fed::start_dp(
        400,
        DpSettings {
            budget_epsilon: 100.0,
            ..DpSettings::DEFAULT
        },
    )
    .await;

    // 1. The federation's answer: every node issued a key, and the noise of each released
    //    count is one central draw (three shares shaped for h = 3), not three.
    let got = fed.query(SQL).await.unwrap();
    assert_eq!(got.rows.len(), cxfed_queries::schema::CHANNELS.len());
    for i in 0..3 {
        let log = fed.audit_log(i).await;
        assert!(
            log.iter().any(|e| e.endpoint == "/v1/secagg/key"
                && e.query_id == got.query_id
                && e.code.is_none()),
            "node {i} issued its key for {}",
            got.query_id
        );
    }
    // COUNT(*) and AVG's count and sum share ε = 1: scale 3 per statistic, one draw's σ.
    let central = cxfed_queries::dp::variance(3.0).sqrt();
    for row in &got.noise_sd {
        let sd = row[1].expect("count noise");
        assert!(
            (sd - central).abs() < 1e-9 * central,
            "σ {sd} vs one draw's {central}"
        );
    }
    let pooled = fed.pooled();
    let truth = pooled
        .sql("SELECT channel, COUNT(DISTINCT person_id) FROM experience GROUP BY channel ORDER BY channel")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let truth = cxfed::output::rows(&truth).unwrap();
    for t in &truth {
        let row = got.rows.iter().find(|r| r[0] == t[0]).expect("released");
        let (n, want) = (row[1].as_i64().unwrap(), t[1].as_i64().unwrap());
        assert!((n - want).abs() as f64 <= 6.0 * central + 1.0, "{t:?}: {n}");
    }

    // 2. One key per query id, ever.
    let ssa = key_from(&fed, 0, "hostile-1").await.unwrap();
    refused(
        key_from(&fed, 0, "hostile-1").await,
        "already had its secure-aggregation key",
    );

    // 3. A roster of SSA alone would show its partial: refused (and its key is used up).
    refused(
        partial_at_ssa(&fed, "hostile-1", vec![ssa.clone()]).await,
        "at least 2",
    );
    refused(
        partial_at_ssa(&fed, "hostile-1", vec![ssa]).await,
        "no secure-aggregation key waits",
    );

    // 4. CMS claiming to be OPM, or committing to another calibration: refused.
    let ssa = key_from(&fed, 0, "hostile-2").await.unwrap();
    let fake = KeyPair::generate().unwrap();
    refused(
        partial_at_ssa(
            &fed,
            "hostile-2",
            vec![
                ssa.clone(),
                cms_entry(&fed, "hostile-2", &fake, &ssa.calibration, "OPM"),
            ],
        )
        .await,
        "not OPM's node",
    );
    let ssa = key_from(&fed, 0, "hostile-3").await.unwrap();
    refused(
        partial_at_ssa(
            &fed,
            "hostile-3",
            vec![
                ssa.clone(),
                cms_entry(&fed, "hostile-3", &fake, &"00".repeat(32), "CMS"),
            ],
        )
        .await,
        "calibration differs",
    );

    // 5. A well-formed roster of SSA and CMS: SSA masks its partial. Without CMS's key the
    //    words look random; CMS (here: the coordinator holding CMS's key) can strip its own
    //    mask and read SSA's noisy partial — the collusion README describes.
    let ssa = key_from(&fed, 0, "hostile-4").await.unwrap();
    let cms_key = KeyPair::generate().unwrap();
    let cms = cms_entry(&fed, "hostile-4", &cms_key, &ssa.calibration, "CMS");
    let bytes = partial_at_ssa(&fed, "hostile-4", vec![ssa.clone(), cms.clone()])
        .await
        .unwrap();
    let decoded = cxfed::partial::decode(&bytes).unwrap();
    let batch = &decoded.batches[0];
    assert_eq!(batch.num_rows(), cxfed_queries::schema::CHANNELS.len());
    let words: Vec<i64> = (1..batch.num_columns())
        .flat_map(|c| {
            let a = batch
                .column(c)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .unwrap()
                .clone();
            a.values().to_vec()
        })
        .collect();
    let large = words.iter().filter(|w| w.unsigned_abs() > 1 << 40).count();
    assert!(
        large * 10 >= words.len() * 9,
        "masked words look random: {words:?}"
    );
    let roster = Roster::new(
        "hostile-4",
        vec![
            Member {
                agency: "SSA".into(),
                public_key: cxfed_protocol::signing::unhex(&ssa.public_key)
                    .unwrap()
                    .try_into()
                    .unwrap(),
            },
            Member {
                agency: "CMS".into(),
                public_key: cms_key.public_key(),
            },
        ],
    )
    .unwrap();
    let cms_mask = mask(&vec![0u64; words.len()], "CMS", &cms_key, &roster).unwrap();
    let plain: Vec<i64> = words
        .iter()
        .zip(&cms_mask)
        .map(|(w, m)| (*w as u64).wrapping_add(*m) as i64)
        .collect();
    // Column 1 is COUNT(*)'s count: SSA's own people per channel, with a share of noise.
    let ssa_truth = pooled
        .sql("SELECT channel, COUNT(DISTINCT person_id) FROM experience WHERE agency = 'SSA' GROUP BY channel")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let ssa_truth = cxfed::output::rows(&ssa_truth).unwrap();
    let channel =
        |r: usize| arrow::util::display::array_value_to_string(batch.column(0), r).unwrap();
    for (r, got) in plain.iter().enumerate().take(batch.num_rows()) {
        let want = ssa_truth
            .iter()
            .find(|t| t[0].as_str() == Some(channel(r).as_str()))
            .map_or(0, |t| t[1].as_i64().unwrap());
        assert!(
            (got - want).abs() as f64 <= 6.0 * central + 1.0,
            "{}: {got} vs {want}",
            channel(r),
        );
    }
}
