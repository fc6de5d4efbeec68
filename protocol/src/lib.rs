//! Wire types, identities and versions shared by every cxfed node and client.
//!
//! # Layout
//! - [`identity`]: SPIFFE identities (`spiffe://<federation>/<agency>/<role>/<name>`) parsed from
//!   verified X.509 certificates.
//! - [`wire`]: the JSON bodies of `/v1/*` and the Arrow IPC conventions of `/v1/partial`.
//! - [`signing`]: analyst request signatures (what is signed, signing, checking a signature).
//! - [`epsilon_json`]: how an ε travels in JSON, NaN and ±∞ included (used by both).
//! - [`psi`]: private set intersection cardinality over ristretto255 (pure; not yet on the wire).
//! - [`psi_sum`]: private intersection-sum with grouping, exponential EC-ElGamal over ristretto255
//!   (pure; not yet on the wire).
//! - [`secagg`]: secure aggregation by pairwise masking over Z_2^64 (used by `/v1/partial`).
//! - [`codes`]: the stable refusal codes of the API and of stewards' policies, each written once.
#![forbid(unsafe_code)]

pub mod codes;
pub mod epsilon_json;
pub mod identity;
pub mod psi;
pub mod psi_sum;
pub mod secagg;
pub mod signing;
pub mod wire;

pub use identity::{Identity, IdentityError, Role};
