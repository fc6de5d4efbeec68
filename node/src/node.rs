//! The node's state and what it does for a request, free of HTTP: its configuration, DataFusion
//! session, TLS material, audit log, policy, limits, ledger, request checker, row bounds and
//! validated-query cache ([`Node`]); building it from `node.toml` ([`build_node`]); admitting an
//! analyst and answering a partial under the steward's policy ([`Node::answer_partial`]). The
//! HTTP layer ([`crate::server`]) and the coordinator ([`crate::coordinator`]) both sit above it.

use std::sync::{Arc, RwLock};

use datafusion::execution::context::SessionContext;
use tracing::{info, warn};

use cxfed_protocol::Identity;
use cxfed_protocol::codes::ApiCode;
use cxfed_queries::rules::QueryError;

use crate::audit::{AuditLog, Decision, Record};
use crate::config::NodeConfig;
use crate::ledger::Ledger;
use crate::partial::{PartialError, PartialOutput};
use crate::policy::{Policy, PolicyRefusal, RateLimiter};
use crate::requests::{Received, RequestChecker};

/// Everything a running node shares between requests.
pub struct Node {
    /// Its configuration.
    pub config: NodeConfig,
    /// DataFusion over its Parquet files: plans, validates, merges.
    pub ctx: SessionContext,
    /// Where its validated partial plans run (`[engine]`: here, or a Ballista cluster).
    pub engine: crate::engine::Engine,
    /// The TLS material in force: server configuration, mTLS clients for each peer (each
    /// accepting only that peer's node certificate), replaced whole on reload.
    pub tls: crate::rotation::TlsState,
    /// Its query log.
    pub audit: AuditLog,
    /// The steward's policy in force (replaced on reload).
    policy: RwLock<Arc<Policy>>,
    /// Per-analyst rate limits.
    limiter: RateLimiter,
    /// Per-analyst partials running now.
    in_flight: crate::policy::InFlight,
    /// Per-analyst privacy budgets.
    pub ledger: Ledger,
    /// Checks analysts' request signatures and remembers their nonces.
    pub requests: RequestChecker,
    /// The most rows one person holds in each data file (`k-only` people bounds).
    pub row_bounds: Arc<crate::row_bounds::RowBounds>,
    /// Queries already validated here, by SQL text.
    pub approvals: crate::approvals::Approvals,
    /// Exact partials of the current data files (see [`crate::exact_cache`]).
    pub exact: crate::exact_cache::ExactCache,
    /// One-time secure-aggregation keys issued, by query id.
    pub secagg_keys: crate::secagg::KeyStore,
    /// Journey runs this node is the membership side of, between their steps.
    pub journeys: crate::journey::Pending,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("agency", &self.config.agency)
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

/// Why a node could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// TLS files are missing or wrong.
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The data directory or audit log could not be opened.
    #[error("data directory {path}: {message}")]
    Data {
        /// The directory.
        path: String,
        /// What failed.
        message: String,
    },
    /// The engine of `[engine]` could not be set up.
    #[error("engine: {message}")]
    Engine {
        /// What failed.
        message: String,
    },
    /// Binding or serving failed.
    #[error("listen on {addr}: {source}")]
    Io {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Builds the node's state from its configuration.
pub fn build_node(config: NodeConfig) -> Result<Node, ServeError> {
    let data_err = |e: &dyn std::fmt::Display| ServeError::Data {
        path: config.data_dir.display().to_string(),
        message: e.to_string(),
    };
    let migrated = crate::ingest::migrate(&config.data_dir).map_err(|e| data_err(&e))?;
    if migrated.files > 0 {
        info!(
            files = migrated.files,
            rows = migrated.rows,
            from = migrated.from,
            "upgraded the data directory to the current schema"
        );
    }
    let ctx = crate::engine::node_context(&config.data_dir, config.policy.memory_limit_bytes)
        .map_err(|e| data_err(&e))?;
    let engine =
        crate::engine::Engine::new(&config.engine, &config.tls, ctx.clone()).map_err(|e| {
            ServeError::Engine {
                message: e.to_string(),
            }
        })?;
    if let Some(scheduler) = engine.cluster() {
        info!(%scheduler, "partial plans run on the agency's Ballista cluster");
    }
    let material = crate::rotation::load(
        &config.tls,
        &config.federation,
        &config.peers,
        config.timeout,
    )?;
    let requests = RequestChecker::with_verifier(material.requests.clone(), &config.federation);
    // Nonces already answered stay answered across a restart (only of requests whose
    // signature was accepted: a refused forgery must not block the nonce it copied).
    let audit = AuditLog::open(
        &config.data_dir,
        &config.agency,
        config.audit_checkpoint_every,
        |e| {
            if let Some(r) = e.accepted_request() {
                requests.remember(r);
            }
        },
    )
    .map_err(|e| data_err(&e))?;
    let tls = crate::rotation::TlsState::new(&material);
    let policy = RwLock::new(Arc::new(config.policy.clone()));
    let ledger = Ledger::open(&config.data_dir).map_err(|e| data_err(&e))?;
    let row_bounds = crate::row_bounds::RowBounds::new(&config.data_dir);
    let cache_bytes =
        usize::try_from(config.cache_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
    Ok(Node {
        row_bounds,
        config,
        ctx,
        engine,
        tls,
        audit,
        policy,
        limiter: RateLimiter::default(),
        in_flight: crate::policy::InFlight::default(),
        ledger,
        requests,
        approvals: crate::approvals::Approvals::default(),
        exact: crate::exact_cache::ExactCache::new(cache_bytes),
        secagg_keys: crate::secagg::KeyStore::default(),
        journeys: crate::journey::Pending::default(),
    })
}

impl Node {
    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reads, checks and puts in force the TLS material of `files` (certificate, key, CA
    /// bundle, CRLs) for new connections, both accepted and opened to peers, and for checking
    /// analysts' signatures. Connections already open carry on. A set that does not check is
    /// refused with an error naming the file, logged, and the material in force stays.
    pub fn reload_tls(
        &self,
        files: crate::tls::TlsFiles,
    ) -> Result<Arc<crate::rotation::Served>, crate::tls::TlsError> {
        let loaded = crate::rotation::load(
            &files,
            &self.config.federation,
            &self.config.peers,
            self.config.timeout,
        )
        .and_then(|m| self.tls.check(&m).map(|()| m));
        let material = match loaded {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(
                    error = %e,
                    files = %crate::rotation::describe(&files),
                    "TLS files not reloaded; the certificate, key, CA and CRLs in force stay"
                );
                return Err(e);
            }
        };
        self.requests.set_verifier(material.requests.clone());
        let old = self.tls.install(&material);
        let new = self.tls.served();
        if old.identity != new.identity {
            warn!(from = %old.identity, to = %new.identity, "the node's certificate names a new identity");
        }
        info!(
            identity = %new.identity,
            serial = %new.serial,
            previous_serial = %old.serial,
            sha256 = %new.sha256,
            not_after = %new.not_after,
            cas = new.cas,
            crls = new.crls,
            revoked = new.revoked,
            rotated = old.serial != new.serial,
            "TLS files reloaded; new connections use them"
        );
        Ok(new)
    }

    /// Replaces the policy in force (used by reload).
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }

    /// Checks an analyst against the policy and its rate limit for `what` (`query` or
    /// `partial`, counted separately so a coordinator's own part is not counted twice).
    pub fn admit(&self, analyst: &str, what: &str) -> Result<(), PolicyRefusal> {
        let policy = self.policy();
        policy.check_analyst(analyst)?;
        self.limiter
            .check(&format!("{what}:{analyst}"), policy.rate_limit_per_minute)
    }

    /// Runs this node's part of a query for a verified analyst under its own policy, and
    /// audits it with the analyst's signature and the digest of what leaves.
    /// `approved` is the query as this node already approved it, when it coordinates (the
    /// same SQL against the same tables: no need to plan it twice).
    ///
    /// With `secagg`, the partial leaves masked for the roster it names (see
    /// [`crate::secagg`]).
    pub async fn answer_partial(
        &self,
        peer: &str,
        analyst: &Identity,
        query_id: &str,
        req: Received<'_>,
        approved: Option<&cxfed_queries::query::ApprovedQuery>,
        secagg: Option<&cxfed_protocol::wire::SecAggRound>,
    ) -> Result<PartialOutput, PartialError> {
        let analyst = analyst.to_string();
        let charge = crate::partial::Charge {
            ledger: &self.ledger,
            analyst: &analyst,
            query_id,
            requested_epsilon: req.epsilon,
        };
        let policy = self.policy();
        let slot = self.admit(&analyst, "partial").and_then(|()| {
            self.in_flight
                .enter(&analyst, policy.max_in_flight_per_analyst)
        });
        let result = match slot {
            Err(refusal) => Err(PartialError::Policy(refusal)),
            Ok(_slot) => {
                let cached = match approved {
                    Some(_) => Ok(None),
                    None => self.approvals.approve(&self.ctx, req.sql).await.map(Some),
                };
                match cached {
                    Err(e) => Err(PartialError::Query(e)),
                    Ok(cached) => {
                        let known = self.known_agencies();
                        let secagg = secagg.map(|round| crate::partial::Masking {
                            round,
                            keys: &self.secagg_keys,
                            check: crate::secagg::RosterCheck {
                                federation: &self.config.federation,
                                me: &self.config.agency,
                                known: &known,
                                certificates: &self.requests,
                            },
                        });
                        crate::partial::run(
                            &self.engine,
                            &self.config.agency,
                            &policy,
                            req.sql,
                            charge,
                            crate::partial::DataState {
                                row_bounds: &self.row_bounds,
                                exact: &self.exact,
                            },
                            approved.or(cached.as_deref()),
                            secagg,
                        )
                        .await
                    }
                }
            }
        };
        let (decision, code) = decision(&result);
        if let Err(e) = &result {
            warn!(query_id, peer, code = ?code, error = %e, "partial not answered");
        }
        let out = result.as_ref().ok();
        self.audit
            .append(Record {
                query_id: query_id.to_string(),
                endpoint: "/v1/partial".into(),
                peer: peer.to_string(),
                analyst,
                sql: Some(req.sql.to_string()),
                requested_epsilon: req.epsilon,
                require_all: Some(req.require_all),
                request: req.signature.cloned(),
                received_at: req.signature.map(|_| req.received_at),
                decision: Some(decision),
                code,
                groups_released: out.map_or(0, |o| o.groups),
                groups_withheld: out.map_or(0, |o| o.suppressed_groups),
                epsilon_spent: out.and_then(|o| o.epsilon),
                digest: out.map(|o| crate::audit::digest(&o.ipc)),
                fanout: vec![],
            })
            .await
            .map_err(|e| QueryError::Internal(format!("audit log: {e}")))?;
        result
    }
    /// What a journey step needs of this node.
    pub fn here(&self) -> crate::journey::Here<'_> {
        crate::journey::Here {
            engine: &self.engine,
            agency: &self.config.agency,
            data_dir: &self.config.data_dir,
            policy: self.policy(),
            approvals: &self.approvals,
            ledger: &self.ledger,
            pending: &self.journeys,
            admit: Box::new(|analyst| self.admit(analyst, "journey")),
        }
    }

    /// Runs one step of a journey query for the coordinator `peer` (see [`crate::journey`])
    /// and audits it with the analyst's signature and the digest of what leaves.
    pub async fn answer_journey(
        &self,
        peer: &str,
        analyst: Option<&Identity>,
        req: &cxfed_protocol::wire::JourneyRequest,
        received_at: i64,
    ) -> Result<Vec<u8>, PartialError> {
        let out = crate::journey::step(&self.here(), peer, analyst, req, received_at).await;
        let (decision, code) = decision(&out.result);
        if let Err(e) = &out.result {
            warn!(query_id = %req.query_id, peer, code = ?code, error = %e, "journey step not answered");
        }
        self.audit
            .append(Record {
                query_id: req.query_id.clone(),
                endpoint: out.endpoint.into(),
                peer: peer.to_string(),
                analyst: out.analyst,
                sql: Some(req.sql.clone()),
                requested_epsilon: req.epsilon,
                require_all: Some(req.require_all),
                request: out.request.as_ref().map(|(s, _)| s.clone()),
                received_at: out.request.as_ref().map(|(_, t)| *t),
                decision: Some(decision),
                code,
                epsilon_spent: out.spent,
                digest: out.result.as_ref().ok().map(|b| crate::audit::digest(b)),
                ..Record::default()
            })
            .await
            .map_err(|e| QueryError::Internal(format!("audit log: {e}")))?;
        out.result
    }

    /// This node's agency and its peers'.
    pub fn known_agencies(&self) -> Vec<&str> {
        std::iter::once(self.config.agency.as_str())
            .chain(self.config.peers.iter().map(|p| p.agency.as_str()))
            .collect()
    }

    /// Round 1 of secure aggregation for a coordinator (`peer`): validates the query under
    /// this node's policy, calibrates its noise, and issues its one-time key for `query_id`,
    /// signed with this node's certificate. Audited like any request.
    pub async fn secagg_key(
        &self,
        peer: &str,
        req: &cxfed_protocol::wire::SecAggKeyRequest,
    ) -> Result<cxfed_protocol::wire::SecAggKey, PartialError> {
        let result = self.issue_secagg_key(req).await;
        let (decision, code) = decision(&result);
        if let Err(e) = &result {
            warn!(query_id = %req.query_id, peer, code = ?code, error = %e, "secure-aggregation key refused");
        }
        self.audit
            .append(Record {
                query_id: req.query_id.clone(),
                endpoint: "/v1/secagg/key".into(),
                peer: peer.to_string(),
                sql: Some(req.sql.clone()),
                requested_epsilon: req.epsilon,
                decision: Some(decision),
                code,
                ..Record::default()
            })
            .await
            .map_err(|e| QueryError::Internal(format!("audit log: {e}")))?;
        result
    }

    async fn issue_secagg_key(
        &self,
        req: &cxfed_protocol::wire::SecAggKeyRequest,
    ) -> Result<cxfed_protocol::wire::SecAggKey, PartialError> {
        let policy = self.policy();
        crate::partial::check_epsilon(&policy, req.epsilon)?;
        let Some(settings) = &policy.dp else {
            return Err(PolicyRefusal::secure_aggregation(
                "this node runs in k-only mode: secure aggregation is for dp partials".into(),
            )
            .into());
        };
        let approved = self.approvals.approve(&self.ctx, &req.sql).await?;
        policy.check_query(&approved)?;
        let calibration =
            crate::partial::secagg_calibration(&approved, &policy, settings, req.epsilon)?;
        let public = self.secagg_keys.issue(&req.query_id, &calibration)?;
        let signer = crate::tls::signer(&self.tls.files())
            .map_err(|e| QueryError::Internal(format!("node signing key: {e}")))?;
        Ok(crate::secagg::signed_key(
            &signer,
            &self.config.federation,
            &req.query_id,
            &self.config.agency,
            public,
            &calibration,
        )?)
    }
}

/// How the audit log records the outcome of a request this node answered.
fn decision<T>(result: &Result<T, PartialError>) -> (Decision, Option<String>) {
    match result {
        Ok(_) => (Decision::Executed, None),
        Err(PartialError::Query(QueryError::Rejected(r))) => {
            (Decision::Refused, Some(r.rule.code().to_string()))
        }
        Err(PartialError::Policy(p)) => (Decision::Refused, Some(p.code().to_string())),
        Err(PartialError::Epsilon(_)) => (
            Decision::Refused,
            Some(ApiCode::BadEpsilon.code().to_string()),
        ),
        Err(_) => (Decision::Failed, Some(ApiCode::Internal.code().to_string())),
    }
}
