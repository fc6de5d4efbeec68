//! `cxfed synth`: calibrated synthetic A-11 Section 280 CX data for one agency.
//!
//! Writes `experience.csv` and `operational.csv` (schema column order, ISO dates, `true`/`false`,
//! empty field = null) that pass [`crate::ingest`] unchanged. The same options always give
//! byte-identical files: every draw comes, in a fixed order, from one ChaCha8 stream seeded from
//! the seed mixed with the agency name, and only exact IEEE arithmetic is used (no libm).
//!
//! # The model
//! - Each agency has a few services, each tied to a Priority Life Experience (SSA: retirement
//!   benefits, SSNs for newborns, SSI; CMS: Medicare enrollment, Medicaid and CHIP; FEMA, SBA and
//!   HUD: disaster recovery; VA, DOL, DOD: the transition to civilian life ...). An unknown agency
//!   gets a generic mix covering every life experience.
//! - A person (state by population, with disaster-prone states over-represented for disaster
//!   recovery; age band skewed by life experience) has 1–3 cases that move through the journey
//!   stages of one service (a denial leads to an appeal, an abandoned contact is retried).
//! - Channels follow an agency-specific mix, shifted by age (older people call, visit and mail more;
//!   younger people use the mobile app). Waits depend on the channel (phone and in-person long,
//!   digital about zero, null for paper and postal mail), processing days on the service and stage,
//!   phone abandonment on the wait. Dates span FY2025Q1–FY2026Q1 (2024-10-01..2025-12-31); a case
//!   that would close after the window is still pending.
//! - 35–60 % of cases (agency-specific, fewer for abandoned ones) have a survey response. Its seven
//!   scores come from one latent satisfaction per response: agency base + person effect − long
//!   waits − long processing − denial/abandonment + first-contact resolution, plus item-specific
//!   sensitivities and noise, rounded and clamped to 1–5; overall mean trust ≈ 3.95 with ≈ 71 %
//!   agreeing (≥ 4), as in the published HISP data. Each item is missing 3–8 % of the time;
//!   employee helpfulness is mostly missing for self-service channels.
//! - Identifiers are pseudonyms prefixed by the agency (`SSA-P-…`, `SSA-C-…`, `SSA-R-…`), so they
//!   never collide across agencies.
//!
//! [`journeys`] generates the agencies of a Priority Life Experience together, with people who
//! visit several of them (`cxfed synth --journeys`); the single-agency output above does not
//! depend on it (its bytes are pinned by a test).

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use cxfed_queries::schema::{
    AGE_BANDS, CHANNELS, JOURNEY_STAGES, LIFE_EXPERIENCES, OUTCOMES, STATES, Table,
};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::ingest::{days_from_civil, is_agency_code, push_date};

pub mod journeys;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthOptions {
    /// Agency abbreviation (2–12 uppercase ASCII letters or digits), e.g. `SSA`.
    pub agency: String,
    /// Number of people; each has 1–3 cases.
    pub people: usize,
    /// Random seed; with the agency it fully determines the output.
    pub seed: u64,
}

/// What [`write`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSummary {
    /// People generated.
    pub people: usize,
    /// Rows of `operational.csv` (cases).
    pub operational_rows: u64,
    /// Rows of `experience.csv` (survey responses).
    pub experience_rows: u64,
    /// Path of `operational.csv`.
    pub operational_path: PathBuf,
    /// Path of `experience.csv`.
    pub experience_path: PathBuf,
}

/// Why synthetic data could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The agency is not a valid agency code.
    #[error("invalid agency {0:?}: expected 2-12 uppercase ASCII letters or digits, e.g. SSA")]
    InvalidAgency(String),
    /// The journeys' overlap is not a share.
    #[error("invalid overlap {0}: expected a share between 0 and 1, e.g. 0.3")]
    InvalidOverlap(f64),
    /// Creating or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Generates the data described by `opts` and writes `out_dir/experience.csv` and
/// `out_dir/operational.csv` (creating `out_dir`), each atomically (temp file + rename).
pub fn write(opts: &SynthOptions, out_dir: &Path) -> Result<SynthSummary, SynthError> {
    if !is_agency_code(opts.agency.as_bytes()) {
        return Err(SynthError::InvalidAgency(opts.agency.clone()));
    }
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Io { path, source }
    };
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let op_path = out_dir.join(format!("{}.csv", Table::Operational.name()));
    let exp_path = out_dir.join(format!("{}.csv", Table::Experience.name()));
    let op_tmp = temp_in(out_dir, Table::Operational).map_err(io_err(&op_path))?;
    let exp_tmp = temp_in(out_dir, Table::Experience).map_err(io_err(&exp_path))?;
    let mut op = BufWriter::with_capacity(1 << 20, op_tmp.as_file());
    let mut exp = BufWriter::with_capacity(1 << 20, exp_tmp.as_file());

    let mut generator = Generator::new(opts);
    let (operational_rows, experience_rows) =
        generator
            .run(&mut op, &mut exp)
            .map_err(|e| SynthError::Io {
                path: out_dir.to_path_buf(),
                source: e,
            })?;

    op.flush().map_err(io_err(&op_path))?;
    exp.flush().map_err(io_err(&exp_path))?;
    drop((op, exp));
    for (tmp, path) in [(op_tmp, &op_path), (exp_tmp, &exp_path)] {
        tmp.as_file().sync_all().map_err(io_err(path))?;
        tmp.persist(path).map_err(|e| SynthError::Io {
            path: path.clone(),
            source: e.error,
        })?;
    }
    Ok(SynthSummary {
        people: opts.people,
        operational_rows,
        experience_rows,
        operational_path: op_path,
        experience_path: exp_path,
    })
}

fn temp_in(dir: &Path, table: Table) -> io::Result<tempfile::NamedTempFile> {
    let prefix = format!(".{}.csv.", table.name());
    tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(dir)
}

// ---------------------------------------------------------------------------------------------
// Agency profiles

/// Channel indexes into [`CHANNELS`].
const WEBSITE: usize = 0;
const MOBILE_APP: usize = 1;
const EMAIL: usize = 2;
const LIVE_CHAT: usize = 3;
const PHONE: usize = 4;
const AUTOMATED_PHONE: usize = 5;
const IN_PERSON: usize = 6;
const POSTAL_MAIL: usize = 7;
const PAPER: usize = 8;

/// Life experience indexes into [`LIFE_EXPERIENCES`].
const RETIREMENT: usize = 0;
const DISASTER: usize = 1;
const CIVILIAN: usize = 2;
const CHILD: usize = 3;
const SHOCK: usize = 4;

/// Outcome indexes into [`OUTCOMES`].
const APPROVED: usize = 0;
const DENIED: usize = 1;
const PENDING: usize = 2;
const WITHDRAWN: usize = 3;

struct Service {
    name: &'static str,
    life: usize,
    weight: u32,
    /// Mean processing days of an application.
    days: f64,
    /// Denial rate at the decision stage.
    deny: f64,
}

struct Profile {
    services: &'static [Service],
    /// Weights in [`CHANNELS`] order.
    channels: [u32; 9],
    /// Mean phone wait (minutes).
    phone_wait: f64,
    /// Mean in-person wait (minutes).
    in_person_wait: f64,
    /// Offset of the agency's latent satisfaction from the federal average.
    base: f64,
    /// Share of cases with a survey response.
    response: f64,
}

const fn svc(name: &'static str, life: usize, weight: u32, days: f64, deny: f64) -> Service {
    Service {
        name,
        life,
        weight,
        days,
        deny,
    }
}

//                         web mob eml cht phn aut inp pst pap
const SSA: Profile = Profile {
    services: &[
        svc("Retirement benefits", RETIREMENT, 45, 30.0, 0.06),
        svc("SSN for a newborn", CHILD, 20, 12.0, 0.02),
        svc("Supplemental Security Income", SHOCK, 25, 110.0, 0.40),
        svc(
            "Medicare Part A and B enrollment",
            RETIREMENT,
            10,
            20.0,
            0.03,
        ),
    ],
    channels: [22, 3, 0, 0, 36, 8, 24, 5, 2],
    phone_wait: 32.0,
    in_person_wait: 28.0,
    base: -0.15,
    response: 0.42,
};
const CMS: Profile = Profile {
    services: &[
        svc("Medicare enrollment", RETIREMENT, 55, 14.0, 0.04),
        svc("Medicaid and CHIP", SHOCK, 35, 40.0, 0.22),
        svc("Health Insurance Marketplace", SHOCK, 10, 20.0, 0.10),
    ],
    channels: [40, 3, 4, 9, 30, 4, 0, 6, 4],
    phone_wait: 12.0,
    in_person_wait: 15.0,
    base: 0.10,
    response: 0.50,
};
const OPM: Profile = Profile {
    services: &[
        svc("Federal retirement services", RETIREMENT, 75, 70.0, 0.03),
        svc("Survivor annuities", RETIREMENT, 15, 60.0, 0.05),
        svc(
            "Federal Employees Health Benefits",
            RETIREMENT,
            10,
            10.0,
            0.02,
        ),
    ],
    channels: [42, 0, 10, 0, 33, 0, 0, 8, 7],
    phone_wait: 25.0,
    in_person_wait: 15.0,
    base: -0.35,
    response: 0.55,
};
const FEMA: Profile = Profile {
    services: &[
        svc("Individual assistance", DISASTER, 70, 25.0, 0.30),
        svc("Critical needs assistance", DISASTER, 30, 5.0, 0.15),
    ],
    channels: [30, 10, 2, 0, 30, 5, 20, 2, 1],
    phone_wait: 20.0,
    in_person_wait: 35.0,
    base: -0.25,
    response: 0.40,
};
const SBA: Profile = Profile {
    services: &[
        svc("Disaster loans", DISASTER, 80, 45.0, 0.35),
        svc("Economic injury disaster loans", DISASTER, 20, 30.0, 0.30),
    ],
    channels: [55, 0, 8, 5, 22, 0, 8, 1, 1],
    phone_wait: 15.0,
    in_person_wait: 20.0,
    base: 0.0,
    response: 0.45,
};
const HUD: Profile = Profile {
    services: &[
        svc("Housing assistance", DISASTER, 60, 60.0, 0.25),
        svc("Rental assistance", SHOCK, 40, 45.0, 0.30),
    ],
    channels: [25, 0, 0, 0, 35, 0, 20, 8, 12],
    phone_wait: 18.0,
    in_person_wait: 25.0,
    base: -0.20,
    response: 0.38,
};
const VA: Profile = Profile {
    services: &[
        svc("Disability compensation", CIVILIAN, 40, 100.0, 0.25),
        svc("Health care enrollment", CIVILIAN, 35, 7.0, 0.08),
        svc("Education benefits", CIVILIAN, 25, 25.0, 0.06),
    ],
    channels: [35, 10, 2, 3, 27, 3, 17, 2, 1],
    phone_wait: 10.0,
    in_person_wait: 20.0,
    base: 0.30,
    response: 0.55,
};
const DOL: Profile = Profile {
    services: &[
        svc("Veterans employment services", CIVILIAN, 55, 14.0, 0.02),
        svc("Unemployment insurance", SHOCK, 45, 21.0, 0.28),
    ],
    channels: [38, 0, 10, 0, 22, 0, 28, 0, 2],
    phone_wait: 22.0,
    in_person_wait: 20.0,
    base: -0.05,
    response: 0.40,
};
const DOD: Profile = Profile {
    services: &[
        svc("Transition Assistance Program", CIVILIAN, 70, 30.0, 0.01),
        svc("TRICARE transitional coverage", CIVILIAN, 30, 10.0, 0.05),
    ],
    channels: [35, 0, 10, 3, 12, 0, 40, 0, 0],
    phone_wait: 12.0,
    in_person_wait: 15.0,
    base: 0.10,
    response: 0.60,
};
const IRS: Profile = Profile {
    services: &[
        svc("Earned Income Tax Credit", SHOCK, 55, 21.0, 0.10),
        svc("Payment plans", SHOCK, 45, 7.0, 0.08),
    ],
    channels: [45, 5, 0, 0, 28, 12, 3, 4, 3],
    phone_wait: 28.0,
    in_person_wait: 30.0,
    base: -0.30,
    response: 0.35,
};
const USDA: Profile = Profile {
    services: &[
        svc("Disaster assistance for farmers", DISASTER, 25, 45.0, 0.20),
        svc("WIC", CHILD, 35, 7.0, 0.05),
        svc("SNAP", SHOCK, 40, 30.0, 0.25),
    ],
    channels: [25, 2, 3, 0, 25, 0, 33, 4, 8],
    phone_wait: 15.0,
    in_person_wait: 20.0,
    base: 0.05,
    response: 0.45,
};
const GENERIC: Profile = Profile {
    services: &[
        svc("Retirement planning assistance", RETIREMENT, 20, 30.0, 0.05),
        svc("Disaster assistance", DISASTER, 20, 30.0, 0.25),
        svc(
            "Veteran and military family services",
            CIVILIAN,
            20,
            20.0,
            0.10,
        ),
        svc("Family benefits", CHILD, 20, 15.0, 0.10),
        svc("Emergency financial assistance", SHOCK, 20, 30.0, 0.25),
    ],
    channels: [35, 5, 6, 4, 28, 5, 12, 3, 2],
    phone_wait: 18.0,
    in_person_wait: 20.0,
    base: 0.0,
    response: 0.45,
};

fn profile(agency: &str) -> &'static Profile {
    match agency {
        "SSA" => &SSA,
        "CMS" => &CMS,
        "OPM" => &OPM,
        "FEMA" => &FEMA,
        "SBA" => &SBA,
        "HUD" => &HUD,
        "VA" => &VA,
        "DOL" => &DOL,
        "DOD" => &DOD,
        "IRS" => &IRS,
        "USDA" => &USDA,
        _ => &GENERIC,
    }
}

/// 2020 census population (thousands), in [`STATES`] order.
const POPULATION: [u32; 56] = [
    5024, 733, 7152, 3012, 39538, 5774, 3606, 990, 21538, 10712, 1455, 1839, 12813, 6786, 3190,
    2938, 4506, 4658, 1362, 6177, 7030, 10077, 5706, 2961, 6154, 1084, 1962, 3105, 1378, 9289,
    2118, 20201, 10439, 779, 11799, 3959, 4237, 13003, 1097, 5118, 887, 6911, 29146, 3272, 643,
    8631, 7705, 1794, 5894, 577, 690, 3286, 154, 87, 50, 47,
];
/// Over-represented in disaster recovery (hurricanes, wildfires, floods).
const DISASTER_STATES: &[&str] = &["FL", "TX", "LA", "CA", "NC", "PR", "HI", "MS", "AL", "SC"];

/// Age band weights in [`AGE_BANDS`] order, per life experience.
const AGE_WEIGHTS: [[u32; 6]; 5] = [
    [0, 1, 17, 34, 38, 10], // approaching_retirement
    [7, 30, 30, 10, 15, 8], // recovering_from_disaster
    [28, 50, 15, 3, 3, 1],  // transition_to_civilian_life
    [24, 68, 6, 1, 1, 0],   // having_a_child
    [14, 36, 28, 8, 9, 5],  // facing a financial shock
];

/// Channel weight multipliers per age band (in [`CHANNELS`] order).
const AGE_CHANNEL: [[f64; 9]; 6] = [
    // web   mob  eml  cht  phn  aut  inp  pst  pap
    [1.15, 1.8, 0.9, 1.4, 0.8, 0.8, 0.9, 0.5, 0.5], // under_25
    [1.15, 1.5, 1.0, 1.2, 0.9, 0.9, 0.9, 0.6, 0.6], // 25_44
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  // 45_61
    [0.95, 0.7, 1.0, 0.8, 1.1, 1.0, 1.1, 1.2, 1.2], // 62_64
    [0.8, 0.4, 0.9, 0.6, 1.3, 1.1, 1.3, 1.5, 1.6],  // 65_74
    [0.5, 0.2, 0.6, 0.4, 1.5, 1.0, 1.5, 2.0, 2.2],  // 75_plus
];

/// Stage weights of a person's first case, in [`JOURNEY_STAGES`] order.
const START_STAGE: [u32; 7] = [10, 14, 34, 12, 10, 12, 8];
/// Processing days relative to an application, per stage.
const STAGE_DAYS: [f64; 7] = [0.02, 0.1, 1.0, 0.25, 0.5, 0.15, 1.3];
/// Denial rate relative to the decision stage, per stage.
const STAGE_DENY: [f64; 7] = [0.0, 0.6, 0.5, 0.0, 1.0, 0.05, 0.7];
/// First-contact resolution rate per stage.
const STAGE_FCR: [f64; 7] = [0.85, 0.7, 0.5, 0.55, 0.45, 0.65, 0.35];
/// First-contact resolution multiplier per channel.
const CHANNEL_FCR: [f64; 9] = [0.9, 0.9, 0.7, 1.0, 1.0, 0.8, 1.1, 0.55, 0.55];
const RENEW_OR_APPEAL: usize = 6;

/// The seven items in [`cxfed_queries::schema::SCORES`] order.
struct Item {
    offset: f64,
    /// Sensitivity to waits, processing time and denial.
    wait: f64,
    days: f64,
    denied: f64,
    /// Probability of a missing answer.
    missing: f64,
}

const ITEMS: [Item; 7] = [
    Item {
        offset: -0.10,
        wait: 0.8,
        days: 0.8,
        denied: 1.0,
        missing: 0.03,
    }, // trust
    Item {
        offset: 0.00,
        wait: 1.0,
        days: 1.0,
        denied: 1.0,
        missing: 0.04,
    }, // satisfaction
    Item {
        offset: 0.05,
        wait: 0.6,
        days: 0.8,
        denied: 1.5,
        missing: 0.05,
    }, // effectiveness
    Item {
        offset: 0.05,
        wait: 1.0,
        days: 0.6,
        denied: 0.7,
        missing: 0.05,
    }, // ease
    Item {
        offset: -0.15,
        wait: 1.6,
        days: 1.6,
        denied: 0.7,
        missing: 0.06,
    }, // efficiency
    Item {
        offset: 0.00,
        wait: 0.6,
        days: 0.8,
        denied: 1.2,
        missing: 0.08,
    }, // transparency
    Item {
        offset: 0.20,
        wait: 0.7,
        days: 0.4,
        denied: 0.6,
        missing: 0.06,
    }, // employee_helpfulness
];
const EMPLOYEE: usize = 6;

/// Federal-average latent satisfaction (calibrated: mean trust ≈ 3.95, ≈ 71 % agree).
const LATENT_BASE: f64 = 5.0;
const PERSON_SD: f64 = 0.65;
const RESPONSE_SD: f64 = 0.65;
const ITEM_SD: f64 = 0.6;
/// Share of responses from people who had a bad experience not visible in the data.
const DISAFFECTED: f64 = 0.13;

// ---------------------------------------------------------------------------------------------
// Random helpers (exact arithmetic only, so output is identical on every platform)

/// Cumulative weights for [`pick`].
fn cumulative(weights: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut sum = 0u32;
    weights
        .into_iter()
        .map(|w| {
            sum += w;
            sum
        })
        .collect()
}

fn pick(rng: &mut ChaCha8Rng, cum: &[u32]) -> usize {
    let total = cum.last().copied().unwrap_or(0);
    if total == 0 {
        return 0;
    }
    let x = rng.random_range(0..total);
    cum.partition_point(|&c| c <= x)
}

fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    rng.random::<f64>() < p
}

/// Approximately standard normal (Irwin–Hall, 4 uniforms).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let s: f64 = (0..4).map(|_| rng.random::<f64>()).sum();
    (s - 2.0) * 1.732_050_807_568_877_2
}

/// `e^x` with exact arithmetic only (range reduction + Taylor series), for reproducibility.
fn exp(x: f64) -> f64 {
    let x = x.clamp(-700.0, 700.0);
    let k = (x * std::f64::consts::LOG2_E).round();
    let r = x - k * std::f64::consts::LN_2;
    let mut term = 1.0;
    let mut sum = 1.0;
    for i in 1..=13 {
        term *= r / f64::from(i);
        sum += term;
    }
    sum * f64::from_bits(((k as i64 + 1023) as u64) << 52)
}

/// Log-normal with the given mean.
fn lognormal(rng: &mut ChaCha8Rng, mean: f64, sigma: f64) -> f64 {
    mean * exp(sigma * normal(rng) - sigma * sigma / 2.0)
}

/// FNV-1a, to mix the agency name into the seed.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------------
// CSV line building (no per-row allocation)

fn push_text(buf: &mut Vec<u8>, s: &str) {
    if s.bytes().any(|b| matches!(b, b',' | b'"' | b'\n' | b'\r')) {
        buf.push(b'"');
        for b in s.bytes() {
            if b == b'"' {
                buf.push(b'"');
            }
            buf.push(b);
        }
        buf.push(b'"');
    } else {
        buf.extend_from_slice(s.as_bytes());
    }
}

fn push_id(buf: &mut Vec<u8>, agency: &str, tag: u8, id: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.extend_from_slice(agency.as_bytes());
    buf.extend_from_slice(&[b'-', tag, b'-']);
    for shift in (0..16).rev() {
        buf.push(HEX[((id >> (shift * 4)) & 0xf) as usize]);
    }
}

fn push_uint(buf: &mut Vec<u8>, mut v: u32) {
    let mut digits = [0u8; 10];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf.extend(digits[..n].iter().rev());
}

fn push_opt_uint(buf: &mut Vec<u8>, v: Option<u32>) {
    if let Some(v) = v {
        push_uint(buf, v);
    }
}

fn push_opt_bool(buf: &mut Vec<u8>, v: Option<bool>) {
    match v {
        Some(true) => buf.extend_from_slice(b"true"),
        Some(false) => buf.extend_from_slice(b"false"),
        None => {}
    }
}

fn push_opt_str(buf: &mut Vec<u8>, v: Option<&str>) {
    if let Some(v) = v {
        push_text(buf, v);
    }
}

/// First day of fiscal year 2024, when the new A-11 form starts appearing.
const FY2024_START: i32 = 19_631; // 2023-10-01
/// Share of FY2024+ responses on the new form.
const NEW_FORM_SHARE: f64 = 0.3;
/// Index of trust in [`ITEMS`].
const TRUST: usize = 0;
/// The legacy item each driver of [`cxfed_queries::schema::DRIVERS`] follows (humanity follows
/// transparency; "other" follows trust, rarely).
const DRIVER_ITEMS: [Option<usize>; 7] =
    [Some(2), Some(3), Some(4), Some(5), Some(5), Some(6), None];

/// `,<fiscal year>,<fiscal quarter>` of a date.
fn push_fiscal(line: &mut Vec<u8>, date: i32) {
    use cxfed_queries::schema::Derived;
    for d in [Derived::FiscalYear(""), Derived::FiscalQuarter("")] {
        line.push(b',');
        push_uint(line, d.value(date) as u32);
    }
}

fn header(table: Table) -> Vec<u8> {
    let mut line = Vec::new();
    for (i, c) in table.columns().iter().enumerate() {
        if i > 0 {
            line.push(b',');
        }
        line.extend_from_slice(c.name.as_bytes());
    }
    line.push(b'\n');
    line
}

// ---------------------------------------------------------------------------------------------
// The generator

/// One case, as written to `operational.csv`.
struct Case {
    id: u64,
    service: usize,
    stage: usize,
    channel: usize,
    opened: i32,
    closed: Option<i32>,
    wait: Option<u32>,
    days: Option<u32>,
    fcr: Option<bool>,
    abandoned: Option<bool>,
    outcome: usize,
}

struct Person {
    id: u64,
    state: Option<usize>,
    age: Option<usize>,
    /// Effect on every score this person gives.
    effect: f64,
    /// What earlier agencies of a journey left (see [`journeys`]); 0 otherwise.
    carry: f64,
}

/// Whether a case went badly for the person: denied, abandoned, or an hour's wait on the phone
/// or in person.
fn went_badly(case: &Case) -> bool {
    case.outcome == DENIED
        || case.abandoned == Some(true)
        || (matches!(case.channel, PHONE | IN_PERSON) && case.wait.is_some_and(|w| w > 60))
}

struct Generator<'a> {
    rng: ChaCha8Rng,
    agency: &'a str,
    people: usize,
    profile: &'static Profile,
    services: Vec<u32>,
    /// Channel tables per age band, plus one for an unknown age.
    channels: Vec<Vec<u32>>,
    states: Vec<u32>,
    disaster_states: Vec<u32>,
    ages: Vec<Vec<u32>>,
    start_stage: Vec<u32>,
    start: i32,
    end: i32,
    line: Vec<u8>,
}

impl<'a> Generator<'a> {
    fn new(opts: &'a SynthOptions) -> Generator<'a> {
        let profile = profile(&opts.agency);
        let seed = splitmix(opts.seed ^ splitmix(fnv1a(opts.agency.as_bytes())));
        let channel_table = |mult: &[f64; 9]| {
            cumulative(
                profile
                    .channels
                    .iter()
                    .zip(mult)
                    .map(|(&w, &m)| (f64::from(w) * m * 100.0).round() as u32),
            )
        };
        let mut channels: Vec<Vec<u32>> = AGE_CHANNEL.iter().map(channel_table).collect();
        channels.push(channel_table(&[1.0; 9]));
        let disaster_states = cumulative(STATES.iter().zip(POPULATION).map(|(s, p)| {
            if DISASTER_STATES.contains(s) {
                p * 3
            } else {
                p
            }
        }));
        Generator {
            rng: ChaCha8Rng::seed_from_u64(seed),
            agency: &opts.agency,
            people: opts.people,
            profile,
            services: cumulative(profile.services.iter().map(|s| s.weight)),
            channels,
            states: cumulative(POPULATION),
            disaster_states,
            ages: AGE_WEIGHTS
                .iter()
                .map(|w| cumulative(w.iter().copied()))
                .collect(),
            start_stage: cumulative(START_STAGE),
            start: days_from_civil(2024, 10, 1) as i32,
            end: days_from_civil(2025, 12, 31) as i32,
            line: Vec::with_capacity(512),
        }
    }

    /// Writes both files; returns (operational rows, experience rows).
    fn run(&mut self, op: &mut impl Write, exp: &mut impl Write) -> io::Result<(u64, u64)> {
        op.write_all(&header(Table::Operational))?;
        exp.write_all(&header(Table::Experience))?;
        let (mut n_op, mut n_exp) = (0u64, 0u64);
        for _ in 0..self.people {
            let service = pick(&mut self.rng, &self.services);
            let life = self.profile.services[service].life;
            let person = self.person(life);
            let (cases, responses, _) = self.cases(op, exp, &person, service, None)?;
            n_op += cases;
            n_exp += responses;
        }
        Ok((n_op, n_exp))
    }

    /// Writes one person's 1–3 cases of `service` and their survey responses. The first case
    /// opens on `first`, or on a day drawn from the window. Returns (cases, responses, whether
    /// the first case went badly — see [`went_badly`]).
    fn cases(
        &mut self,
        op: &mut impl Write,
        exp: &mut impl Write,
        person: &Person,
        service: usize,
        first: Option<i32>,
    ) -> io::Result<(u64, u64, Option<bool>)> {
        let (mut n_op, mut n_exp, mut first_bad) = (0u64, 0u64, None);
        {
            let cases = match self.rng.random_range(0..100u32) {
                0..52 => 1,
                52..83 => 2,
                _ => 3,
            };
            let mut stage = pick(&mut self.rng, &self.start_stage);
            // Drawn even when `first` is given, so that the stream is the same either way.
            let drawn = self.start + self.rng.random_range(0..=(self.end - self.start));
            let mut opened = first.unwrap_or(drawn);
            let mut channel = None;
            for _ in 0..cases {
                if opened > self.end {
                    break;
                }
                // People tend to stay with a channel.
                let ch = match channel {
                    Some(c) if chance(&mut self.rng, 0.6) => c,
                    _ => pick(&mut self.rng, &self.channels[person.age.unwrap_or(6)]),
                };
                channel = Some(ch);
                let case = self.case(service, stage, ch, opened);
                self.write_case(op, person, &case)?;
                first_bad.get_or_insert(went_badly(&case));
                n_op += 1;
                let mut respond = self.profile.response;
                if case.abandoned == Some(true) {
                    respond *= 0.35;
                }
                if chance(&mut self.rng, respond) {
                    self.write_response(exp, person, &case)?;
                    n_exp += 1;
                }
                // The next case: an appeal after a denial, a retry after giving up, else onwards.
                stage = match case.outcome {
                    DENIED => RENEW_OR_APPEAL,
                    WITHDRAWN => stage,
                    _ => (stage + 1).min(RENEW_OR_APPEAL),
                };
                let after = case.closed.unwrap_or(opened + self.rng.random_range(5..20));
                opened = after + self.rng.random_range(0..21);
            }
        }
        Ok((n_op, n_exp, first_bad))
    }

    fn person(&mut self, life: usize) -> Person {
        let id = self.rng.next_u64();
        let states = if life == DISASTER {
            &self.disaster_states
        } else {
            &self.states
        };
        let state = pick(&mut self.rng, states);
        let age = pick(&mut self.rng, &self.ages[life]);
        let effect = PERSON_SD * normal(&mut self.rng);
        let state = (!chance(&mut self.rng, 0.005)).then_some(state);
        let age = (!chance(&mut self.rng, 0.02)).then_some(age);
        Person {
            id,
            state,
            age,
            effect,
            carry: 0.0,
        }
    }

    fn case(&mut self, service: usize, stage: usize, channel: usize, opened: i32) -> Case {
        let rng = &mut self.rng;
        let svc = &self.profile.services[service];
        let id = rng.next_u64();
        let wait = match channel {
            WEBSITE | MOBILE_APP => Some(if chance(rng, 0.85) {
                0.0
            } else {
                rng.random_range(1..6u32).into()
            }),
            EMAIL => Some(lognormal(rng, 600.0, 0.9)),
            LIVE_CHAT => Some(lognormal(rng, 6.0, 0.7)),
            PHONE => Some(lognormal(rng, self.profile.phone_wait, 0.8)),
            AUTOMATED_PHONE => Some(lognormal(rng, 3.0, 0.6)),
            IN_PERSON => Some(lognormal(rng, self.profile.in_person_wait, 0.6)),
            _ => None, // postal mail, paper
        }
        .map(|w| w.round().clamp(0.0, 10_080.0) as u32);
        let w = f64::from(wait.unwrap_or(0));
        let p_abandon = match channel {
            PHONE => Some(0.03 + 0.30 * (1.0 - exp(-w / 45.0))),
            LIVE_CHAT => Some(0.02 + 0.15 * (1.0 - exp(-w / 15.0))),
            AUTOMATED_PHONE => Some(0.06),
            WEBSITE | MOBILE_APP => Some(0.05),
            IN_PERSON => Some(0.01),
            EMAIL => Some(0.0),
            _ => None,
        };
        let abandoned = p_abandon.map(|p| chance(rng, p));
        let channel_days = match channel {
            POSTAL_MAIL | PAPER => 1.4,
            WEBSITE | MOBILE_APP => 0.85,
            _ => 1.0,
        };
        let (mut outcome, days) = if abandoned == Some(true) {
            (WITHDRAWN, 0)
        } else {
            let mean = svc.days * STAGE_DAYS[stage] * channel_days;
            let days = lognormal(rng, mean, 0.6).round().clamp(0.0, 3650.0) as u32;
            let deny = svc.deny * STAGE_DENY[stage];
            let u: f64 = rng.random();
            let outcome = if u < deny {
                DENIED
            } else if u < deny + 0.03 {
                WITHDRAWN
            } else if u < deny + 0.07 {
                PENDING
            } else {
                APPROVED
            };
            (outcome, days)
        };
        let mut closed = Some(opened + days as i32);
        if outcome == PENDING || closed.is_some_and(|c| c > self.end) {
            outcome = PENDING;
            closed = None;
        }
        let fcr = if abandoned == Some(true) {
            Some(false)
        } else {
            let p = STAGE_FCR[stage] * CHANNEL_FCR[channel];
            let resolved = chance(rng, p);
            (!chance(rng, 0.02)).then_some(resolved)
        };
        Case {
            id,
            service,
            stage,
            channel,
            opened,
            closed,
            wait,
            days: closed.map(|_| days),
            fcr,
            abandoned,
            outcome,
        }
    }

    /// Pushes the columns shared by both tables, from `agency` to `age_band`.
    fn push_dimensions(&mut self, person: &Person, case: &Case) {
        let line = &mut self.line;
        line.extend_from_slice(self.agency.as_bytes());
        line.push(b',');
        push_text(line, self.profile.services[case.service].name);
        line.push(b',');
        line.extend_from_slice(
            LIFE_EXPERIENCES[self.profile.services[case.service].life].as_bytes(),
        );
        line.push(b',');
        line.extend_from_slice(JOURNEY_STAGES[case.stage].as_bytes());
        line.push(b',');
        line.extend_from_slice(CHANNELS[case.channel].as_bytes());
        line.push(b',');
        push_opt_str(line, person.state.map(|s| STATES[s]));
        line.push(b',');
        push_opt_str(line, person.age.map(|a| AGE_BANDS[a]));
        line.push(b',');
    }

    fn write_case(&mut self, out: &mut impl Write, person: &Person, case: &Case) -> io::Result<()> {
        self.line.clear();
        push_id(&mut self.line, self.agency, b'C', case.id);
        self.line.push(b',');
        push_id(&mut self.line, self.agency, b'P', person.id);
        self.line.push(b',');
        self.push_dimensions(person, case);
        let line = &mut self.line;
        push_date(case.opened, line);
        line.push(b',');
        if let Some(c) = case.closed {
            push_date(c, line);
        }
        line.push(b',');
        push_opt_uint(line, case.wait);
        line.push(b',');
        push_opt_uint(line, case.days);
        line.push(b',');
        push_opt_bool(line, case.fcr);
        line.push(b',');
        push_opt_bool(line, case.abandoned);
        line.push(b',');
        line.extend_from_slice(OUTCOMES[case.outcome].as_bytes());
        push_fiscal(line, case.opened);
        line.push(b'\n');
        out.write_all(line)
    }

    fn write_response(
        &mut self,
        out: &mut impl Write,
        person: &Person,
        case: &Case,
    ) -> io::Result<()> {
        let rng = &mut self.rng;
        let id = rng.next_u64();
        let base = case.closed.unwrap_or(case.opened);
        let lag = rng.random_range(0..8).min(rng.random_range(0..8));
        let date = (base + lag).min(self.end).max(base);

        // Latent satisfaction and what drags it down.
        // `carry` is 0 outside journeys, and x + 0.0 == x: single-agency output is unchanged.
        let mut latent = LATENT_BASE
            + self.profile.base
            + person.effect
            + person.carry
            + RESPONSE_SD * normal(rng);
        if chance(rng, DISAFFECTED) {
            latent -= 3.5;
        }
        let w = f64::from(case.wait.unwrap_or(0));
        let wait_pen = match case.channel {
            PHONE | IN_PERSON | LIVE_CHAT | AUTOMATED_PHONE => 0.015 * w.min(100.0),
            EMAIL => 0.2 * (w / 720.0).min(3.0),
            _ => 0.0,
        };
        let days_pen = 0.005 * f64::from(case.days.unwrap_or(0)).min(180.0);
        let denied = match case.outcome {
            DENIED => 0.9,
            PENDING => 0.3,
            _ => 0.0,
        };
        latent += match case.fcr {
            Some(true) => 0.25,
            Some(false) => -0.15,
            None => 0.0,
        };
        if case.abandoned == Some(true) {
            latent -= 3.5;
        }
        let ease = match case.channel {
            POSTAL_MAIL | PAPER => -0.3,
            WEBSITE | MOBILE_APP => 0.1,
            _ => 0.0,
        };
        let self_service = matches!(case.channel, WEBSITE | MOBILE_APP | AUTOMATED_PHONE);
        let mut latent_items = [0.0; 7];
        let mut scores = [None; 7];
        for (k, item) in ITEMS.iter().enumerate() {
            let mut v = latent + item.offset
                - item.wait * wait_pen
                - item.days * days_pen
                - item.denied * denied
                + ITEM_SD * normal(rng);
            if k == 3 {
                v += ease;
            }
            latent_items[k] = v;
            let missing = if k == EMPLOYEE && self_service {
                0.85
            } else {
                item.missing
            };
            if !chance(rng, missing) {
                scores[k] = Some(v.round().clamp(1.0, 5.0) as u32);
            }
        }

        self.line.clear();
        push_id(&mut self.line, self.agency, b'R', id);
        self.line.push(b',');
        push_id(&mut self.line, self.agency, b'P', person.id);
        self.line.push(b',');
        push_id(&mut self.line, self.agency, b'C', case.id);
        self.line.push(b',');
        self.push_dimensions(person, case);
        let line = &mut self.line;
        push_date(date, line);
        // From FY2024 some responses use the new form: one trust item (1-5, or thumbs up/down)
        // and "what went well / what didn't" checklists instead of the six other items.
        let new_form = date >= FY2024_START && chance(&mut self.rng, NEW_FORM_SHARE);
        let thumbs = new_form && chance(&mut self.rng, 0.5);
        for (k, s) in scores.iter().enumerate() {
            line.push(b',');
            let kept = !new_form || (k == TRUST && !thumbs);
            push_opt_uint(line, s.filter(|_| kept));
        }
        push_fiscal(line, date);
        line.push(b',');
        line.extend_from_slice(if new_form { b"a11_2024" } else { b"a11_legacy" });
        line.push(b',');
        if thumbs {
            push_opt_uint(line, scores[TRUST].map(|t| u32::from(t >= 4)));
        }
        // Drivers: a respondent ticks what went clearly well (latent item ≥ 4.5) or clearly
        // badly (≤ 2.5), usually not every one.
        let drivers = DRIVER_ITEMS.map(|k| k.map(|k| latent_items[k]));
        for negative in [false, true] {
            for d in drivers {
                line.push(b',');
                if new_form {
                    let v = d.unwrap_or(latent_items[TRUST]);
                    let hit = if negative { v <= 2.5 } else { v >= 4.5 };
                    let ticked = hit && chance(&mut self.rng, if d.is_some() { 0.7 } else { 0.1 });
                    push_uint(line, u32::from(ticked));
                }
            }
        }
        line.push(b'\n');
        out.write_all(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    fn synth(agency: &str, people: usize, seed: u64) -> (tempfile::TempDir, SynthSummary) {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = SynthOptions {
            agency: agency.to_string(),
            people,
            seed,
        };
        let summary = write(&opts, &dir.path().join("out")).expect("synth");
        (dir, summary)
    }

    fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
        let mut r = csv::Reader::from_path(path).expect("open");
        let header = r
            .headers()
            .expect("header")
            .iter()
            .map(str::to_string)
            .collect();
        let rows = r
            .records()
            .map(|rec| rec.expect("record").iter().map(str::to_string).collect())
            .collect();
        (header, rows)
    }

    /// SHA-256 of `operational.csv` and `experience.csv` as `cxfed synth` wrote them before
    /// journeys existed (commit dfcb92c): the single-agency output must never change.
    const GOLDEN: [(&str, usize, u64, &str, &str); 3] = [
        (
            "SSA",
            700,
            1,
            "ca0acded11070391c4d54f1c3ee7d789da4909834559c2f922bb0a0faa66d34d",
            "883b9d3f5c1aa8141e38a7e675697fcf62afd0173e6ce05e6b7e84f1089f5e8c",
        ),
        (
            "FEMA",
            500,
            7,
            "1e3f76d2e312a83d4ba0a60e759fb8100a98efa799ee3ca96f57b861c3728804",
            "9a3d352a65ad5113aaed25e14011d8d3bc714b9084f9a5d9916acd924e9b8b23",
        ),
        (
            "XYZ",
            300,
            3,
            "9bee98004b5754e1019c93b95ae59ea09316b31c90357319482539278ac66b36",
            "b10737022f0182c9d53189c342a95fde0dd8d6679fdff98a6d9b7946e5114662",
        ),
    ];

    #[test]
    fn single_agency_output_is_byte_identical_to_before_journeys() {
        let sha = |p: &Path| {
            let bytes = std::fs::read(p).expect("read");
            cxfed_protocol::signing::hex(
                ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref(),
            )
        };
        let got: Vec<(String, String)> = GOLDEN
            .iter()
            .map(|&(agency, people, seed, _, _)| {
                let (_d, s) = synth(agency, people, seed);
                (sha(&s.operational_path), sha(&s.experience_path))
            })
            .collect();
        for ((agency, _, _, op, exp), (got_op, got_exp)) in GOLDEN.iter().zip(&got) {
            assert_eq!(got_op, op, "{agency} operational.csv changed: {got:?}");
            assert_eq!(got_exp, exp, "{agency} experience.csv changed: {got:?}");
        }
    }

    #[test]
    fn exp_is_accurate() {
        for x in [-20.0, -3.3, -1.0, -0.01, 0.0, 0.5, 1.0, 2.7, 10.0] {
            let (a, b): (f64, f64) = (exp(x), x.exp());
            assert!((a - b).abs() <= 1e-12 * b, "{x}: {a} vs {b}");
        }
    }

    #[test]
    fn deterministic() {
        let (_a, sa) = synth("SSA", 2000, 1);
        let (_b, sb) = synth("SSA", 2000, 1);
        let (_c, sc) = synth("SSA", 2000, 2);
        let (_d, sd) = synth("CMS", 2000, 1);
        let read = |p: &Path| std::fs::read(p).expect("read");
        assert_eq!(read(&sa.operational_path), read(&sb.operational_path));
        assert_eq!(read(&sa.experience_path), read(&sb.experience_path));
        assert_ne!(read(&sa.operational_path), read(&sc.operational_path));
        assert_ne!(read(&sa.experience_path), read(&sc.experience_path));
        assert_ne!(read(&sa.operational_path), read(&sd.operational_path));
        // Only the two files, no temp files.
        let dir = sa.operational_path.parent().expect("dir");
        assert_eq!(std::fs::read_dir(dir).expect("list").count(), 2);
    }

    #[test]
    fn passes_schema_validation() {
        for agency in [
            "SSA", "CMS", "OPM", "FEMA", "SBA", "HUD", "VA", "DOL", "DOD", "IRS", "USDA", "HHS",
        ] {
            let (_d, s) = synth(agency, 1500, 7);
            let ops = crate::ingest::validate(Table::Operational, &s.operational_path)
                .unwrap_or_else(|e| panic!("{agency}: {e}"));
            let exps = crate::ingest::validate(Table::Experience, &s.experience_path)
                .unwrap_or_else(|e| panic!("{agency}: {e}"));
            assert_eq!(ops, s.operational_rows);
            assert_eq!(exps, s.experience_rows);
            let share = s.experience_rows as f64 / s.operational_rows as f64;
            assert!(
                (0.3..=0.62).contains(&share),
                "{agency}: response share {share}"
            );
        }
    }

    #[test]
    fn invalid_agency() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = SynthOptions {
            agency: "ssa".into(),
            people: 10,
            seed: 1,
        };
        assert!(matches!(
            write(&opts, dir.path()),
            Err(SynthError::InvalidAgency(_))
        ));
    }

    #[test]
    fn responses_link_to_cases() {
        let (_d, s) = synth("USDA", 3000, 3);
        let (oh, ops) = read_csv(&s.operational_path);
        let (eh, exps) = read_csv(&s.experience_path);
        let expected: Vec<&str> = Table::Operational
            .columns()
            .iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(oh, expected);
        let expected: Vec<&str> = Table::Experience.columns().iter().map(|c| c.name).collect();
        assert_eq!(eh, expected);
        let cases: HashMap<&str, &Vec<String>> = ops.iter().map(|r| (r[0].as_str(), r)).collect();
        assert_eq!(cases.len(), ops.len(), "case ids are unique");
        let opened = |r: &Vec<String>| crate::ingest::parse_date(r[9].as_bytes()).expect("date");
        for r in &exps {
            assert!(r[0].starts_with("USDA-R-") && r[0].len() == 7 + 16);
            let case = cases
                .get(r[2].as_str())
                .unwrap_or_else(|| panic!("no case {}", r[2]));
            assert_eq!(case[1], r[1], "same person");
            // agency, service, life_experience, journey_stage, channel, state, age_band
            assert_eq!(case[2..9], r[3..10]);
            let date = crate::ingest::parse_date(r[10].as_bytes()).expect("date");
            let after = if case[10].is_empty() {
                opened(case)
            } else {
                crate::ingest::parse_date(case[10].as_bytes()).expect("date")
            };
            assert!(date >= after);
        }
        for r in &ops {
            assert!(r[0].starts_with("USDA-C-") && r[1].starts_with("USDA-P-"));
        }
        // Every service of the profile and its life experience appear.
        let services: BTreeMap<&str, &str> =
            ops.iter().map(|r| (r[3].as_str(), r[4].as_str())).collect();
        assert_eq!(services.get("WIC"), Some(&"having_a_child"));
        assert_eq!(services.get("SNAP"), Some(&"financial_shock"));
        assert_eq!(
            services.get("Disaster assistance for farmers"),
            Some(&"recovering_from_disaster")
        );
    }

    /// Realism: states, ages, channels, dates, waits and the score distribution.
    #[test]
    fn realistic_distributions() {
        let (_d, s) = synth("SSA", 20_000, 1);
        let (_, ops) = read_csv(&s.operational_path);
        let (_, exps) = read_csv(&s.experience_path);

        let states: std::collections::BTreeSet<&str> = ops.iter().map(|r| r[7].as_str()).collect();
        for st in &STATES[..51] {
            assert!(states.contains(st), "state {st} missing");
        }
        let share = |rows: &[Vec<String>], col: usize, pred: &dyn Fn(&str) -> bool| {
            rows.iter().filter(|r| pred(&r[col])).count() as f64 / rows.len() as f64
        };
        // Retirement benefits: mostly 62+.
        let retire: Vec<Vec<String>> = ops
            .iter()
            .filter(|r| r[3] == "Retirement benefits")
            .cloned()
            .collect();
        assert!(share(&retire, 8, &|a| a == "62_64" || a == "65_74") > 0.6);
        let newborn: Vec<Vec<String>> = ops
            .iter()
            .filter(|r| r[3] == "SSN for a newborn")
            .cloned()
            .collect();
        assert!(share(&newborn, 8, &|a| a == "25_44") > 0.55);
        // SSA: phone and in person heavy.
        assert!(share(&ops, 6, &|c| c == "phone" || c == "in_person") > 0.5);
        // Waits: null exactly for paper and mail.
        for r in &ops {
            assert_eq!(
                r[11].is_empty(),
                r[6] == "paper" || r[6] == "postal_mail",
                "{r:?}"
            );
            if r[10].is_empty() {
                assert_eq!(r[15], "pending");
            }
        }
        // Dates within the five quarters.
        let lo = days_from_civil(2024, 10, 1) as i32;
        let hi = days_from_civil(2025, 12, 31) as i32;
        for r in &ops {
            let d = crate::ingest::parse_date(r[9].as_bytes()).expect("date");
            assert!((lo..=hi).contains(&d));
        }
        // Phone abandonment grows with the wait.
        let phone = |long: bool| -> Vec<&Vec<String>> {
            ops.iter()
                .filter(|r| r[6] == "phone" && (r[11].parse::<u32>().unwrap_or(0) > 45) == long)
                .collect()
        };
        let abandon = |rows: Vec<&Vec<String>>| {
            rows.iter().filter(|r| r[14] == "true").count() as f64 / rows.len() as f64
        };
        assert!(abandon(phone(true)) > abandon(phone(false)) + 0.05);
        // Nulls per item on the legacy form: 3-8 % outside the employee item.
        let legacy: Vec<Vec<String>> = exps
            .iter()
            .filter(|r| r[20] == "a11_legacy")
            .cloned()
            .collect();
        let new_form = 1.0 - legacy.len() as f64 / exps.len() as f64;
        assert!(
            (0.25..=0.35).contains(&new_form),
            "new form share {new_form}"
        );
        for col in 11..17 {
            let missing = share(&legacy, col, &|v| v.is_empty());
            assert!((0.02..=0.10).contains(&missing), "column {col}: {missing}");
        }
    }

    fn score_stats(exps: &[Vec<String>], col: usize) -> (f64, f64) {
        let vals: Vec<f64> = exps
            .iter()
            .filter_map(|r| r[col].parse::<f64>().ok())
            .collect();
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        let agree = vals.iter().filter(|&&v| v >= 4.0).count() as f64 / vals.len() as f64;
        (mean, agree)
    }

    #[test]
    fn scores_are_calibrated_and_correlated() {
        let mut all = Vec::new();
        for (i, agency) in [
            "SSA", "CMS", "OPM", "FEMA", "SBA", "HUD", "VA", "DOL", "DOD", "IRS", "USDA",
        ]
        .iter()
        .enumerate()
        {
            let (_d, s) = synth(agency, 3000, i as u64);
            let (_, ops) = read_csv(&s.operational_path);
            let (_, exps) = read_csv(&s.experience_path);
            let (mean, _) = score_stats(&exps, 11);
            assert!((3.07..=4.53).contains(&mean), "{agency}: mean trust {mean}");
            let cases: HashMap<&str, &Vec<String>> =
                ops.iter().map(|r| (r[0].as_str(), r)).collect();
            for r in exps {
                let case = cases[r[2].as_str()];
                all.push((case[11].parse::<u32>().ok(), case[15].clone(), r));
            }
        }
        let exps: Vec<Vec<String>> = all.iter().map(|(_, _, r)| r.clone()).collect();
        let (mean, agree) = score_stats(&exps, 11);
        assert!((3.85..=4.05).contains(&mean), "mean trust {mean}");
        assert!((0.66..=0.76).contains(&agree), "share agree {agree}");

        // Long waits lower satisfaction where the customer waits on the line or in the office
        // (the wait penalty applies to synchronous channels; across all channels the effect is
        // diluted by email waits and varies between 0.2 and 0.35 with the seed).
        let sat = |pred: &dyn Fn(u32) -> bool| {
            let rows: Vec<Vec<String>> = all
                .iter()
                .filter(|(w, _, r)| w.is_some_and(pred) && (r[7] == "phone" || r[7] == "in_person"))
                .map(|(_, _, r)| r.clone())
                .collect();
            score_stats(&rows, 12).0
        };
        let (long, short) = (sat(&|w| w > 60), sat(&|w| w <= 10));
        assert!(long < short - 0.5, "wait > 60: {long}, <= 10: {short}");

        // The items correlate.
        let pairs: Vec<(f64, f64)> = exps
            .iter()
            .filter_map(|r| Some((r[11].parse().ok()?, r[15].parse().ok()?)))
            .collect();
        let n = pairs.len() as f64;
        let (mx, my) = (
            pairs.iter().map(|p| p.0).sum::<f64>() / n,
            pairs.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let cov = pairs.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / n;
        let sx = (pairs.iter().map(|p| (p.0 - mx).powi(2)).sum::<f64>() / n).sqrt();
        let sy = (pairs.iter().map(|p| (p.1 - my).powi(2)).sum::<f64>() / n).sqrt();
        let r = cov / (sx * sy);
        assert!(r > 0.5, "trust/efficiency correlation {r}");

        // Denials lower scores.
        let by_outcome = |outcome: &str| {
            let rows: Vec<Vec<String>> = all
                .iter()
                .filter(|(_, o, _)| o == outcome)
                .map(|(_, _, r)| r.clone())
                .collect();
            score_stats(&rows, 13).0
        };
        let (denied, approved) = (by_outcome("denied"), by_outcome("approved"));
        assert!(
            denied < approved - 0.5,
            "effectiveness denied {denied}, approved {approved}"
        );
    }

    #[test]
    #[ignore = "prints calibration statistics"]
    fn print_calibration() {
        let mut hist = [0u64; 5];
        for agency in [
            "SSA", "CMS", "OPM", "FEMA", "SBA", "HUD", "VA", "DOL", "DOD", "IRS", "USDA", "XYZ",
        ] {
            let (_d, s) = synth(agency, 5000, 1);
            let (_, exps) = read_csv(&s.experience_path);
            for r in &exps {
                if let Ok(v) = r[11].parse::<usize>() {
                    hist[v - 1] += 1;
                }
            }
            let stats: Vec<String> = (11..18)
                .map(|c| {
                    let (m, a) = score_stats(&exps, c);
                    format!("{m:.2}/{:.0}%", a * 100.0)
                })
                .collect();
            println!(
                "{agency:5} ops {:6} exp {:6} ({:.0}%) {}",
                s.operational_rows,
                s.experience_rows,
                100.0 * s.experience_rows as f64 / s.operational_rows as f64,
                stats.join(" ")
            );
        }
        let n: u64 = hist.iter().sum();
        let shares: Vec<String> = hist
            .iter()
            .map(|&h| format!("{:.1}%", 100.0 * h as f64 / n as f64))
            .collect();
        println!("trust 1..5: {}", shares.join(" "));
    }
}
