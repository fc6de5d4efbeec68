//! Wire types, identities and versions shared by every cxfed node and client.
//!
//! # Layout
//! - [`identity`]: SPIFFE identities (`spiffe://<federation>/<agency>/<role>/<name>`) parsed from
//!   verified X.509 certificates.
//! - [`wire`]: the JSON bodies of `/v1/*` and the Arrow IPC conventions of `/v1/partial`.
//! - [`signing`]: analyst request signatures (what is signed, signing, checking a signature).
#![forbid(unsafe_code)]

pub mod identity;
pub mod signing;
pub mod wire;

pub use identity::{Identity, IdentityError, Role};
