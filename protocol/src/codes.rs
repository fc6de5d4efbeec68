//! Stable refusal codes of the API and of stewards' policies, each code, slug and HTTP status
//! written once: the server answers with them, the client, console and gateway read them, the
//! README's tables list them. Query-rule codes (`CXF-Q…`) live with the rules that raise them
//! (`cxfed_queries::rules::Rule`), since only the validator decides them.

/// Declares a family of codes: each variant with its code, slug, HTTP status and doc.
macro_rules! codes {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => ($code:literal, $slug:literal, $status:literal),)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every code of the family, in code order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The stable code, e.g. `CXF-A403`.
            pub const fn code(self) -> &'static str {
                match self { $($name::$variant => $code,)+ }
            }

            /// The stable slug (`kind` on the wire), e.g. `forbidden`.
            pub const fn slug(self) -> &'static str {
                match self { $($name::$variant => $slug,)+ }
            }

            /// The HTTP status a node answers with.
            pub const fn status(self) -> u16 {
                match self { $($name::$variant => $status,)+ }
            }

            /// The family member with this code and slug, if any.
            pub fn parse(code: &str, slug: &str) -> Option<$name> {
                $name::ALL.iter().copied().find(|c| c.code() == code && c.slug() == slug)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{} {}", self.code(), self.slug())
            }
        }
    };
}

codes! {
    /// Refusals of a request as such (`CXF-A…`, and `CXF-C…` of the console's own proxy).
    ApiCode {
        /// The request is malformed (bad JSON, a missing field, a value out of range).
        BadRequest => ("CXF-A400", "bad-request", 400),
        /// An ε no node can spend (not finite, not positive, above the steward's cap).
        BadEpsilon => ("CXF-A400", "bad-epsilon", 400),
        /// The request carries no analyst signature.
        UnsignedRequest => ("CXF-A401", "unsigned-request", 401),
        /// The signature does not verify over what was received.
        BadSignature => ("CXF-A401", "bad-signature", 401),
        /// The signing certificate is not one the federation's CA (and CRL) accepts.
        UntrustedCertificate => ("CXF-A401", "untrusted-certificate", 401),
        /// The signing certificate is not an analyst's.
        NotAnAnalyst => ("CXF-A401", "not-an-analyst", 401),
        /// The request was signed for another coordinator.
        WrongCoordinator => ("CXF-A401", "wrong-coordinator", 401),
        /// The signature's time is outside the accepted window.
        StaleRequest => ("CXF-A401", "stale-request", 401),
        /// The request's nonce was seen before.
        ReplayedRequest => ("CXF-A401", "replayed-request", 401),
        /// The caller's certificate may not use this endpoint.
        Forbidden => ("CXF-A403", "forbidden", 403),
        /// No such endpoint.
        NotFound => ("CXF-A404", "not-found", 404),
        /// The request body is over the node's limit.
        BodyTooLarge => ("CXF-A413", "body-too-large", 413),
        /// An internal error (the node's log says what; the response never does).
        Internal => ("CXF-A500", "internal", 500),
        /// Not every node of the federation answered.
        NodesFailed => ("CXF-A502", "nodes-failed", 502),
        /// The console could not reach its node.
        ConsoleUnreachable => ("CXF-C502", "unreachable", 502),
    }
}

codes! {
    /// Refusals by a steward's policy (`CXF-P…`): the query is valid, this node will not run it.
    PolicyCode {
        /// The analyst's agency may not query this node.
        AgencyNotAllowed => ("CXF-P001", "analyst-agency-not-allowed", 403),
        /// The query touches a dimension the steward hides.
        DimensionHidden => ("CXF-P002", "dimension-hidden", 403),
        /// Too many queries from this analyst.
        RateLimited => ("CXF-P003", "rate-limited", 429),
        /// The partial would have too many groups.
        TooManyGroups => ("CXF-P004", "too-many-groups", 403),
        /// The query ran past the time limit.
        QueryTimeout => ("CXF-P005", "query-timeout", 503),
        /// The query needed more memory than the pool.
        MemoryLimit => ("CXF-P006", "memory-limit", 503),
        /// The analyst's privacy budget on this node is spent.
        BudgetExhausted => ("CXF-P007", "budget-exhausted", 429),
        /// A secure-aggregation step was refused (a repeated query id, a roster this node does
        /// not accept, keys that are not public).
        SecureAggregationRefused => ("CXF-P008", "secure-aggregation-refused", 403),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn each_code_and_slug_pair_is_unique_and_well_formed() {
        let mut seen = HashSet::new();
        for (code, slug, status) in ApiCode::ALL
            .iter()
            .map(|c| (c.code(), c.slug(), c.status()))
            .chain(
                PolicyCode::ALL
                    .iter()
                    .map(|c| (c.code(), c.slug(), c.status())),
            )
        {
            assert!(seen.insert((code, slug)), "{code} {slug} twice");
            assert!(code.starts_with("CXF-") && code.len() == 8, "{code}");
            assert!(
                slug.chars().all(|c| c.is_ascii_lowercase() || c == '-'),
                "{slug}"
            );
            assert!((400..600).contains(&status), "{code}: {status}");
        }
        // A policy code's number is unique on its own: clients match on the code alone.
        let policy: HashSet<_> = PolicyCode::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(policy.len(), PolicyCode::ALL.len());
    }

    #[test]
    fn parse_finds_a_member_by_code_and_slug() {
        assert_eq!(
            ApiCode::parse("CXF-A400", "bad-epsilon"),
            Some(ApiCode::BadEpsilon)
        );
        assert_eq!(
            PolicyCode::parse("CXF-P007", "budget-exhausted"),
            Some(PolicyCode::BudgetExhausted)
        );
        assert_eq!(ApiCode::parse("CXF-A400", "no-such-slug"), None);
        assert_eq!(ApiCode::Forbidden.to_string(), "CXF-A403 forbidden");
    }
}
