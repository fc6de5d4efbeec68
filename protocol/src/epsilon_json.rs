//! Serde for an optional ε that keeps every value apart. `null` (or no field) is "no ε: each
//! node's default"; a finite number is itself; NaN and ±∞, which a JSON number cannot carry
//! (serde_json would write them as `null`, i.e. "the default"), are the strings `"NaN"`, `"inf"`
//! and `"-inf"`. So a non-finite ε an analyst asked for — and signed — reaches every node as
//! what it is and is refused there, never silently read as "no ε". Any other string is refused.

use serde::{Deserialize, Deserializer, Serializer};

/// Writes `epsilon` (see the module docs).
pub fn serialize<S: Serializer>(epsilon: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match *epsilon {
        None => s.serialize_none(),
        Some(x) if x.is_finite() => s.serialize_f64(x),
        Some(x) if x.is_nan() => s.serialize_str("NaN"),
        Some(x) if x > 0.0 => s.serialize_str("inf"),
        Some(_) => s.serialize_str("-inf"),
    }
}

/// Reads what [`serialize`] writes.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(f64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Number(x)) => Ok(Some(x)),
        Some(Raw::Text(t)) => match t.as_str() {
            "NaN" => Ok(Some(f64::NAN)),
            "inf" => Ok(Some(f64::INFINITY)),
            "-inf" => Ok(Some(f64::NEG_INFINITY)),
            other => Err(serde::de::Error::custom(format!(
                "epsilon {other:?} is not a number (a number, null, \"NaN\", \"inf\" or \"-inf\")"
            ))),
        },
    }
}
