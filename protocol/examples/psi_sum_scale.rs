//! The journey protocol (`cxfed_protocol::psi_sum`) at scale, as `bench/journey.py` runs it:
//! B's members, A's values, B's sums and C's decryption over `--people` people a side, of whom
//! `--overlap` are at both, with every core the machine has (rayon). Prints one JSON line:
//! seconds per step and the bytes of each message as the nodes send them (JSON).
//!
//! `cargo run --release -p cxfed-protocol --example psi_sum_scale -- --people 1000000`
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Instant;

use cxfed_protocol::psi_sum::{
    DEFAULT_BOUND, DiscreteLog, MemberParty, ResultKey, ValueParty, ValueRecord,
};

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

/// A linkage value (what a node derives from an SSN with the federation's key): 32 bytes.
fn linkage(i: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    let d = ring::digest::digest(&ring::digest::SHA256, &i.to_le_bytes());
    out.copy_from_slice(d.as_ref());
    out
}

fn main() {
    let people = arg("--people", 100_000.0) as u64;
    let overlap = arg("--overlap", 0.3);
    let (ga, gb) = (arg("--a-groups", 1.0) as u32, arg("--b-groups", 5.0) as u32);
    let max = 4u32; // trust 1..5, shifted to start at 0
    let shared = (people as f64 * overlap) as u64;
    // A's people are 0..people; B's are the first `shared` of them and people of its own.
    let a: Vec<ValueRecord> = (0..people)
        .map(|i| ValueRecord {
            linkage: linkage(i),
            group: (i % u64::from(ga)) as u32,
            value: (i % u64::from(max + 1)) as u32,
        })
        .collect();
    let b: Vec<([u8; 32], u32)> = (0..shared)
        .chain(people..people + (people - shared))
        .map(|i| (linkage(i), (i % u64::from(gb)) as u32))
        .collect();
    let c = ResultKey::new().expect("C's key");
    let key = c.public_key();

    let t = Instant::now();
    let (party_b, m1) = MemberParty::new(gb, &b).expect("m1");
    let s_m1 = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let m2 = ValueParty::new(ga, max)
        .and_then(|party_a| party_a.respond(&key, &m1, &a))
        .expect("m2");
    let s_m2 = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let m3 = party_b.aggregate(&key, &m2, &|_, _| 0).expect("m3");
    let s_m3 = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let dlog = DiscreteLog::new(DEFAULT_BOUND).expect("table");
    let released = c.decrypt(&m3, &dlog).expect("decrypt");
    let s_dec = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (b1, b2, b3) = (
        serde_json::to_vec(&m1).expect("json").len(),
        serde_json::to_vec(&m2).expect("json").len(),
        serde_json::to_vec(&m3).expect("json").len(),
    );
    let s_json = t.elapsed().as_secs_f64();
    let matched: i64 = (0..ga)
        .flat_map(|x| (0..gb).map(move |y| (x, y)))
        .map(|(x, y)| released.matched(x, y).map_or(0, |s| s.count))
        .sum();
    assert_eq!(
        matched as u64, shared,
        "every shared person is matched once"
    );
    println!(
        "{{\"people_per_side\": {people}, \"shared\": {shared}, \"a_groups\": {ga}, \"b_groups\": {gb}, \
         \"threads\": {}, \"seconds\": {{\"b_members\": {s_m1:.2}, \"a_values\": {s_m2:.2}, \
         \"b_sums\": {s_m3:.2}, \"c_decrypt\": {s_dec:.2}, \"json_encode_all\": {s_json:.2}, \
         \"total\": {:.2}}}, \"bytes\": {{\"members\": {b1}, \"values\": {b2}, \"sums\": {b3}}}}}",
        rayon::current_num_threads(),
        s_m1 + s_m2 + s_m3 + s_dec + s_json
    );
}
