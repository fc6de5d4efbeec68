//! `cxfed gateway`: the federation behind the PostgreSQL wire protocol, for analysts' own tools
//! (psql, Excel and Power BI through the PostgreSQL ODBC/Npgsql drivers, Tableau, R's
//! RPostgres, Python's psycopg and pandas).
//!
//! Like [`crate::console`], it runs on the analyst's machine, holds the analyst's certificate
//! and key, and has no privileges of its own: every data query is signed as the analyst and
//! sent to a node exactly as `cxfed query` sends it ([`crate::client::send_query`]); the nodes
//! decide, charge ε and write their audit logs as for the CLI.
//!
//! ```text
//!  psql / psycopg / BI ──PostgreSQL wire (SCRAM, loopback)──▶ gateway
//!       │  SET, SHOW, BEGIN, version(), pg_catalog, information_schema ──▶ catalog (local,
//!       │                                                 from the CX schema; never sent)
//!       └─ everything else: $n parameters bound as literals ──▶ signed /v1/query ──▶ node
//!            answer: columns typed from the locally planned query (int2/int4/int8, float8,
//!            numeric, text, date, timestamp, bool), `<name>_ci95` beside each aggregate,
//!            node status and ε as a NOTICE; a refusal as an ERROR with SQLSTATE, the CXF
//!            code and the SQL position
//! ```
//!
//! Guards: it listens on loopback unless told `--listen-public`; clients log in with
//! SCRAM-SHA-256 (the password never crosses the socket) using a random password printed at
//! start-up or written, in `.pgpass` form and mode 0600, to `--password-file`. Its certificate
//! must be an analyst's.

pub mod catalog;

use std::fmt::Debug;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{NaiveDate, NaiveDateTime};
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use futures::{Sink, SinkExt};
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::sasl::scram::{ScramAuth, gen_salted_password};
use pgwire::api::auth::{AuthSource, DefaultServerParameterProvider, LoginInfo, Password};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DataRowEncoder, DescribePortalResponse, DescribeResponse, DescribeStatementResponse, FieldInfo,
    QueryResponse as PgQueryResponse, Response, Tag,
};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, METADATA_USER, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use rust_decimal::Decimal;

use cxfed_protocol::wire::{ErrorBody, NodeState, QueryRequest, QueryResponse};
use cxfed_protocol::{Identity, Role};

use crate::client::{AnalystClient, QueryFailure, send_query};
use crate::gateway::catalog::{Session, Val};
use crate::tls::{TlsError, TlsFiles};

/// SCRAM iterations for the local login (the password is random: this only slows guessing).
const SCRAM_ITERATIONS: usize = 4096;
/// The suffix of a column that carries the 95% half-width of the column before it.
pub const CI95_SUFFIX: &str = "_ci95";

/// How to run a gateway.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Nodes to send queries to: the first coordinates; the next ones are tried, in order,
    /// only when the ones before cannot be reached.
    pub nodes: Vec<String>,
    /// The analyst's certificate files.
    pub tls: TlsFiles,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Allow a non-loopback `listen` address.
    pub listen_public: bool,
    /// Also write the password here, as a `.pgpass` line, mode 0600.
    pub password_file: Option<PathBuf>,
    /// ε each query spends per node (default: each node's maximum).
    pub epsilon: Option<f64>,
    /// Accept answers from only the nodes that responded.
    pub allow_partial: bool,
    /// Add a `<name>_ci95` column beside each aggregate column.
    pub ci95_columns: bool,
    /// Seconds to wait for each answer.
    pub timeout: Duration,
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A non-loopback address without `--listen-public`.
    #[error(
        "--listen {0}: not a loopback address; the gateway holds your key and would let anyone \
         who can reach it and learns the password query as you. Pass --listen-public to do it anyway"
    )]
    NotLoopback(SocketAddr),
    /// No `--node`.
    #[error("--node: give at least one node URL")]
    NoNode,
    /// A node URL that is not https.
    #[error("--node {0}: must be an https:// URL")]
    BadNode(String),
    /// Certificate files.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Not an analyst's certificate.
    #[error(
        "--cert: {0} is not an analyst identity; the gateway runs queries, which only analysts may ask"
    )]
    NotAnalyst(String),
    /// No randomness for the password.
    #[error("the operating system's random generator failed")]
    Random,
    /// The query planner could not be set up (a bug).
    #[error("internal error: {0}")]
    Internal(String),
    /// Writing `--password-file`.
    #[error("--password-file {path}: {source}")]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Binding the listener.
    #[error("--listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// The local login password (never printed by `Debug`).
#[derive(Clone)]
pub struct Secret(String);

impl Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Secret {
    /// The password itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A gateway serving in the background.
#[derive(Debug)]
pub struct RunningGateway {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The analyst it acts as.
    pub identity: Identity,
    /// The password local clients log in with.
    pub password: Secret,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningGateway {
    /// A libpq connection URL (without the password).
    pub fn url(&self) -> String {
        let host = match self.addr.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        format!(
            "postgresql://{}@{host}:{}/{}",
            self.identity.name(),
            self.addr.port(),
            catalog::DATABASE
        )
    }

    /// Stops accepting connections (open ones end with the process).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(());
        let _ = self.task.await;
    }
}

/// Checks the options, binds and starts serving.
pub async fn start(opts: GatewayOptions) -> Result<RunningGateway, GatewayError> {
    if !opts.listen.ip().is_loopback() && !opts.listen_public {
        return Err(GatewayError::NotLoopback(opts.listen));
    }
    if opts.nodes.is_empty() {
        return Err(GatewayError::NoNode);
    }
    if let Some(bad) = opts.nodes.iter().find(|n| !n.starts_with("https://")) {
        return Err(GatewayError::BadNode(bad.clone()));
    }
    let identity = crate::client::own_identity(&opts.tls.cert)?;
    if identity.role() != Role::Analyst {
        return Err(GatewayError::NotAnalyst(identity.to_string()));
    }
    let client = AnalystClient::new(&opts.tls, opts.timeout)?;
    let planner = cxfed_queries::context::planning_context()
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| GatewayError::Bind {
            addr: opts.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| GatewayError::Bind {
        addr: opts.listen,
        source,
    })?;
    let password = Secret(new_password()?);
    if let Some(path) = &opts.password_file {
        let host = addr
            .ip()
            .to_string()
            .replace('\\', "\\\\")
            .replace(':', "\\:");
        let line = format!("{host}:{}:*:*:{}\n", addr.port(), password.0);
        crate::storage::write_atomic(path, line.as_bytes(), true).map_err(|source| {
            GatewayError::PasswordFile {
                path: path.clone(),
                source,
            }
        })?;
    }
    let salt = new_salt()?;
    let salted = gen_salted_password(&password.0, &salt, SCRAM_ITERATIONS);
    let backend = Arc::new(Backend {
        client,
        nodes: opts
            .nodes
            .iter()
            .map(|n| n.trim_end_matches('/').to_string())
            .collect(),
        planner,
        epsilon: opts.epsilon,
        require_all: !opts.allow_partial,
        ci95_columns: opts.ci95_columns,
        parser: Arc::new(Parser),
    });
    let handlers = Arc::new(Handlers {
        backend,
        auth: Arc::new(LocalPassword { salt, salted }),
    });
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut rx => break,
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        let handlers = handlers.clone();
                        tokio::spawn(async move {
                            if let Err(e) = pgwire::tokio::process_socket(socket, None, handlers).await {
                                tracing::debug!(%peer, error = %e, "gateway connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "gateway accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    });
    tracing::info!(%addr, analyst = %identity, "gateway listening");
    Ok(RunningGateway {
        addr,
        identity,
        password,
        shutdown: tx,
        task,
    })
}

fn random_bytes<const N: usize>() -> Result<[u8; N], GatewayError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| GatewayError::Random)?;
    Ok(bytes)
}

fn new_password() -> Result<String, GatewayError> {
    Ok(cxfed_protocol::signing::hex(&random_bytes::<24>()?))
}

fn new_salt() -> Result<Vec<u8>, GatewayError> {
    Ok(random_bytes::<16>()?.to_vec())
}

/// The one password of this gateway, as SCRAM needs it (salted; any user name).
#[derive(Debug)]
struct LocalPassword {
    salt: Vec<u8>,
    salted: Vec<u8>,
}

#[async_trait]
impl AuthSource for LocalPassword {
    async fn get_password(&self, _login: &LoginInfo) -> PgWireResult<Password> {
        Ok(Password::new(Some(self.salt.clone()), self.salted.clone()))
    }
}

struct Handlers {
    backend: Arc<Backend>,
    auth: Arc<LocalPassword>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.backend.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.backend.clone()
    }

    fn startup_handler(&self) -> Arc<impl pgwire::api::auth::StartupHandler> {
        let mut params = DefaultServerParameterProvider::default();
        params.server_version = catalog::SERVER_VERSION.to_string();
        params.is_superuser = false;
        params.default_transaction_read_only = true;
        let mut scram = ScramAuth::new(self.auth.clone());
        scram.set_iterations(SCRAM_ITERATIONS);
        Arc::new(SASLAuthStartupHandler::new(Arc::new(params)).with_scram(scram))
    }
}

struct Backend {
    client: AnalystClient,
    nodes: Vec<String>,
    planner: SessionContext,
    epsilon: Option<f64>,
    require_all: bool,
    ci95_columns: bool,
    parser: Arc<Parser>,
}

/// A column of an answer: its name and PostgreSQL type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PgCol {
    Int2,
    Int4,
    Int8,
    Float8,
    Numeric,
    Text,
    Date,
    Timestamp,
    Bool,
}

impl PgCol {
    fn of_arrow(t: &DataType) -> PgCol {
        match t {
            DataType::Int8 | DataType::Int16 | DataType::UInt8 => PgCol::Int2,
            DataType::Int32 | DataType::UInt16 => PgCol::Int4,
            DataType::Int64 | DataType::UInt32 | DataType::UInt64 => PgCol::Int8,
            DataType::Float16 | DataType::Float32 | DataType::Float64 => PgCol::Float8,
            DataType::Decimal32(..)
            | DataType::Decimal64(..)
            | DataType::Decimal128(..)
            | DataType::Decimal256(..) => PgCol::Numeric,
            DataType::Date32 | DataType::Date64 => PgCol::Date,
            DataType::Timestamp(_, None) => PgCol::Timestamp,
            DataType::Boolean => PgCol::Bool,
            _ => PgCol::Text,
        }
    }

    fn pg_type(self) -> Type {
        match self {
            PgCol::Int2 => Type::INT2,
            PgCol::Int4 => Type::INT4,
            PgCol::Int8 => Type::INT8,
            PgCol::Float8 => Type::FLOAT8,
            PgCol::Numeric => Type::NUMERIC,
            PgCol::Text => Type::TEXT,
            PgCol::Date => Type::DATE,
            PgCol::Timestamp => Type::TIMESTAMP,
            PgCol::Bool => Type::BOOL,
        }
    }
}

/// The shape of an answer: names and types, in order.
type Shape = Vec<(String, PgCol)>;

/// One cell of an answer.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Numeric(Decimal),
    Text(String),
    Date(NaiveDate),
    Timestamp(NaiveDateTime),
    Bool(bool),
}

/// What one statement produced.
enum Outcome {
    Rows { shape: Shape, rows: Vec<Vec<Cell>> },
    Command(Tag),
    Begin,
    End(&'static str),
}

/// A prepared statement: the SQL and its parameters' types (from the client, else inferred).
#[derive(Debug, Clone)]
pub struct Statement {
    sql: String,
    params: Vec<Type>,
}

/// Parses nothing up front; see [`Backend::prepare`].
#[derive(Debug)]
pub struct Parser;

#[async_trait]
impl QueryParser for Parser {
    type Statement = Statement;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Option<Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        Ok(Some(Statement {
            sql: sql.to_string(),
            params: types
                .iter()
                .map(|t| t.clone().unwrap_or(Type::UNKNOWN))
                .collect(),
        }))
    }

    fn get_parameter_types(&self, stmt: &Statement) -> PgWireResult<Vec<Type>> {
        Ok(stmt.params.clone())
    }

    fn get_result_schema(
        &self,
        _stmt: &Statement,
        _column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(vec![])
    }
}

fn user_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message.into(),
    )))
}

fn session_of<C: ClientInfo>(client: &C) -> Arc<Mutex<Session>> {
    let user = client
        .metadata()
        .get(METADATA_USER)
        .cloned()
        .unwrap_or_default();
    client
        .session_extensions()
        .get_or_insert_with(|| Mutex::new(Session::new(&user)))
}

/// SQL with its `$n` placeholders replaced by literals, and where each replacement went (to
/// point an error position back into the SQL the client wrote).
#[derive(Debug, Clone, Default)]
struct Bound {
    sql: String,
    /// (start in the bound SQL, length there, start in the original, length there), in chars.
    splices: Vec<(usize, usize, usize, usize)>,
}

impl Bound {
    fn plain(sql: &str) -> Bound {
        Bound {
            sql: sql.to_string(),
            splices: vec![],
        }
    }

    /// The 1-based character position in the original SQL of position `pos` of the bound SQL.
    fn original_position(&self, pos: usize) -> usize {
        let mut shift: isize = 0;
        for &(new_start, new_len, orig_start, orig_len) in &self.splices {
            if pos <= new_start {
                break;
            }
            if pos <= new_start + new_len {
                return orig_start + 1;
            }
            shift = (orig_start + orig_len) as isize - (new_start + new_len) as isize;
        }
        (pos as isize + shift).max(1) as usize
    }
}

/// The `$n` placeholders of `sql`: (byte offset, byte length, n).
fn placeholders(sql: &str) -> Result<Vec<(usize, usize, usize)>, PgWireError> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize_with_location()
        .map_err(|e| user_error("42601", format!("syntax error: {e}")))?;
    // Byte offset of each line start, to turn (line, column) into a byte offset.
    let mut line_starts = vec![0usize];
    for (i, c) in sql.char_indices() {
        if c == '\n' {
            line_starts.push(i + 1);
        }
    }
    let mut out = Vec::new();
    for t in tokens {
        if let Token::Placeholder(p) = &t.token
            && let Some(n) = p.strip_prefix('$').and_then(|d| d.parse::<usize>().ok())
        {
            let line = usize::try_from(t.span.start.line)
                .unwrap_or(0)
                .saturating_sub(1);
            let col = usize::try_from(t.span.start.column)
                .unwrap_or(0)
                .saturating_sub(1);
            let start = line_starts.get(line).copied().unwrap_or(0);
            let offset = sql[start..]
                .char_indices()
                .nth(col)
                .map_or(sql.len(), |(i, _)| start + i);
            out.push((offset, p.len(), n));
        }
    }
    Ok(out)
}

/// Replaces placeholders by `literals` (`literals[n - 1]` for `$n`).
fn bind(sql: &str, literals: &[String]) -> Result<Bound, PgWireError> {
    let mut out = String::with_capacity(sql.len());
    let mut splices = Vec::new();
    let mut last = 0;
    for (offset, len, n) in placeholders(sql)? {
        let lit = literals.get(n.wrapping_sub(1)).ok_or_else(|| {
            user_error(
                "08P01",
                format!(
                    "${n}: the statement was bound with {} parameters",
                    literals.len()
                ),
            )
        })?;
        out.push_str(&sql[last..offset]);
        let new_start = out.chars().count();
        let orig_start = sql[..offset].chars().count();
        out.push_str(lit);
        splices.push((new_start, lit.chars().count(), orig_start, len));
        last = offset + len;
    }
    out.push_str(&sql[last..]);
    Ok(Bound { sql: out, splices })
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The SQL literal for parameter `i` of `portal`, read as `ty`.
fn literal(portal: &Portal<Statement>, i: usize, ty: &Type) -> PgWireResult<String> {
    let bad = |e: PgWireError| user_error("22P02", format!("parameter ${}: {e}", i + 1));
    let s = match *ty {
        Type::INT2 => portal
            .parameter::<i16>(i, ty)
            .map_err(bad)?
            .map(|v| v.to_string()),
        Type::INT4 => portal
            .parameter::<i32>(i, ty)
            .map_err(bad)?
            .map(|v| v.to_string()),
        Type::INT8 => portal
            .parameter::<i64>(i, ty)
            .map_err(bad)?
            .map(|v| v.to_string()),
        Type::FLOAT4 | Type::FLOAT8 => {
            let v = if *ty == Type::FLOAT4 {
                portal.parameter::<f32>(i, ty).map_err(bad)?.map(f64::from)
            } else {
                portal.parameter::<f64>(i, ty).map_err(bad)?
            };
            match v {
                Some(f) if !f.is_finite() => {
                    return Err(user_error(
                        "22P02",
                        format!("parameter ${}: {f} is not a finite number", i + 1),
                    ));
                }
                other => other.map(|f| format!("{f:?}")),
            }
        }
        Type::NUMERIC => portal
            .parameter::<Decimal>(i, ty)
            .map_err(bad)?
            .map(|d| d.to_string()),
        Type::BOOL => portal
            .parameter::<bool>(i, ty)
            .map_err(bad)?
            .map(|b| if b { "TRUE" } else { "FALSE" }.to_string()),
        Type::DATE => portal
            .parameter::<NaiveDate>(i, ty)
            .map_err(bad)?
            .map(|d| format!("DATE '{d}'")),
        Type::TIMESTAMP => portal
            .parameter::<NaiveDateTime>(i, ty)
            .map_err(bad)?
            .map(|d| format!("TIMESTAMP '{}'", d.format("%Y-%m-%d %H:%M:%S%.f"))),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => portal
            .parameter::<String>(i, ty)
            .map_err(bad)?
            .map(|s| quote(&s)),
        ref other => {
            return Err(user_error(
                "0A000",
                format!(
                    "parameter ${}: type {} is not supported by the gateway",
                    i + 1,
                    other.name()
                ),
            ));
        }
    };
    Ok(s.unwrap_or_else(|| "NULL".into()))
}

/// A neutral literal of `ty`, to plan a statement before its parameters are known.
fn neutral_literal(ty: &Type) -> &'static str {
    match *ty {
        Type::INT2 | Type::INT4 | Type::INT8 | Type::NUMERIC => "0",
        Type::FLOAT4 | Type::FLOAT8 => "0.0",
        Type::BOOL => "TRUE",
        Type::DATE => "DATE '2000-01-01'",
        Type::TIMESTAMP => "TIMESTAMP '2000-01-01 00:00:00'",
        _ => "''",
    }
}

fn pg_type_of_arrow(t: &DataType) -> Type {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Type::TEXT,
        DataType::Timestamp(TimeUnit::Nanosecond | TimeUnit::Microsecond, None) => Type::TIMESTAMP,
        other => PgCol::of_arrow(other).pg_type(),
    }
}

/// The first word of `sql`, lower case.
fn first_word(sql: &str) -> String {
    sql.split(|c: char| c.is_whitespace() || c == '(' || c == ';')
        .find(|w| !w.is_empty())
        .unwrap_or("")
        .to_ascii_lowercase()
}

impl Backend {
    /// Parameter types of `sql`: the client's, else what the planner infers, else text.
    async fn parameter_types(&self, sql: &str, given: &[Type]) -> PgWireResult<Vec<Type>> {
        let count = placeholders(sql)?.iter().map(|p| p.2).max().unwrap_or(0);
        let count = count.max(given.len());
        let inferred = if given.contains(&Type::UNKNOWN) || given.len() < count {
            match self.planner.state().create_logical_plan(sql).await {
                Ok(plan) => plan.get_parameter_types().unwrap_or_default(),
                Err(_) => Default::default(),
            }
        } else {
            Default::default()
        };
        Ok((0..count)
            .map(|i| match given.get(i) {
                Some(t) if *t != Type::UNKNOWN => t.clone(),
                _ => inferred
                    .get(&format!("${}", i + 1))
                    .cloned()
                    .flatten()
                    .map_or(Type::UNKNOWN, |t| pg_type_of_arrow(&t)),
            })
            .collect())
    }

    /// The shape a federated query will answer with, planned here (`None` when it does not
    /// plan: the nodes will say why).
    async fn federated_shape(&self, sql: &str) -> Option<(Shape, Vec<bool>)> {
        let approved = cxfed_queries::validate::approve(&self.planner.state(), sql)
            .await
            .ok()?;
        let aggregates = approved.aggregate_names();
        let plan = approved.plan();
        let is_aggregate = output_is_aggregate(plan, &aggregates);
        let shape = plan
            .schema()
            .fields()
            .iter()
            .map(|f| (f.name().clone(), PgCol::of_arrow(f.data_type())))
            .collect();
        Some((shape, is_aggregate))
    }

    /// The full shape of a query's answer as a client sees it (with `_ci95` columns).
    async fn shape(&self, session: &Arc<Mutex<Session>>, sql: &str) -> PgWireResult<Shape> {
        if let Some(local) = self.local(session, sql, true)? {
            return Ok(match local {
                Outcome::Rows { shape, .. } => shape,
                _ => vec![],
            });
        }
        Ok(match self.federated_shape(sql).await {
            Some((shape, aggregates)) => self.with_ci(&shape, &aggregates),
            None => vec![],
        })
    }

    fn with_ci(&self, shape: &Shape, aggregates: &[bool]) -> Shape {
        let mut out = Vec::new();
        for (i, (name, ty)) in shape.iter().enumerate() {
            out.push((name.clone(), *ty));
            if self.ci95_columns && aggregates.get(i).copied().unwrap_or(false) {
                out.push((format!("{name}{CI95_SUFFIX}"), PgCol::Float8));
            }
        }
        out
    }

    /// Answers what is answered here (`dry`: only the shape is needed, change nothing).
    fn local(
        &self,
        session: &Arc<Mutex<Session>>,
        sql: &str,
        dry: bool,
    ) -> PgWireResult<Option<Outcome>> {
        let trimmed = sql.trim().trim_end_matches(';').trim();
        let word = first_word(trimmed);
        let mut session = session.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = match word.as_str() {
            "set" => {
                if !dry {
                    set(&mut session, trimmed);
                }
                Outcome::Command(Tag::new("SET"))
            }
            "reset" => Outcome::Command(Tag::new("RESET")),
            "begin" | "start" => Outcome::Begin,
            "commit" | "end" => Outcome::End("COMMIT"),
            "rollback" | "abort" => Outcome::End("ROLLBACK"),
            "discard" => Outcome::Command(Tag::new("DISCARD ALL")),
            "deallocate" => Outcome::Command(Tag::new("DEALLOCATE")),
            "show" => {
                let name = trimmed[4..].trim().trim_matches('"').to_ascii_lowercase();
                if name == "all" {
                    Outcome::Rows {
                        shape: vec![
                            ("name".into(), PgCol::Text),
                            ("setting".into(), PgCol::Text),
                        ],
                        rows: session
                            .settings
                            .iter()
                            .map(|(k, v)| vec![Cell::Text(k.clone()), Cell::Text(v.clone())])
                            .collect(),
                    }
                } else {
                    let value = session.show(&name).ok_or_else(|| {
                        user_error(
                            "42704",
                            format!("unrecognized configuration parameter \"{name}\""),
                        )
                    })?;
                    Outcome::Rows {
                        shape: vec![(name.clone(), PgCol::Text)],
                        rows: vec![vec![Cell::Text(value.to_string())]],
                    }
                }
            }
            _ if catalog::is_catalog_query(trimmed) => {
                let a = catalog::answer(&session, trimmed)
                    .map_err(|e| user_error("0A000", e.to_string()))?;
                catalog_outcome(a)
            }
            _ => return Ok(None),
        };
        Ok(Some(outcome))
    }

    /// Runs one statement: here, or at the federation.
    async fn run(
        &self,
        session: &Arc<Mutex<Session>>,
        bound: &Bound,
    ) -> PgWireResult<(Outcome, Option<String>)> {
        if let Some(local) = self.local(session, &bound.sql, false)? {
            return Ok((local, None));
        }
        let planned = self.federated_shape(&bound.sql).await;
        let req = QueryRequest::new(bound.sql.clone())
            .require_all(self.require_all)
            .epsilon(self.epsilon);
        let resp = self.send(&req).await.map_err(|f| refusal(&f, bound))?;
        let notice = notice(&resp);
        let (shape, aggregates) = match planned {
            Some(p) => p,
            None => (guess_shape(&resp), vec![true; resp.columns.len()]),
        };
        let rows = rows_of(&resp, &shape, &aggregates, self.ci95_columns);
        Ok((
            Outcome::Rows {
                shape: self.with_ci(&shape, &aggregates),
                rows,
            },
            Some(notice),
        ))
    }

    /// Sends `req` to the first node that can be reached.
    async fn send(&self, req: &QueryRequest) -> Result<QueryResponse, QueryFailure> {
        let mut last = QueryFailure::Transport("no node".into());
        for node in &self.nodes {
            match send_query(&self.client, node, req).await {
                Err(QueryFailure::Transport(e)) => {
                    tracing::warn!(%node, error = %e, "node unreachable; trying the next");
                    last = QueryFailure::Transport(e);
                }
                other => return other,
            }
        }
        Err(last)
    }

    async fn respond<C>(
        &self,
        client: &mut C,
        bound: &Bound,
        format: &Format,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let session = session_of(client);
        let (outcome, notice) = self.run(&session, bound).await?;
        if let Some(n) = notice {
            let info = ErrorInfo::new("NOTICE".into(), "00000".into(), n);
            client
                .send(PgWireBackendMessage::NoticeResponse(info.into()))
                .await?;
        }
        Ok(match outcome {
            Outcome::Rows { shape, rows } => {
                let fields = Arc::new(fields(&shape, format));
                let encoded = encode(&fields, &shape, rows)?;
                Response::Query(PgQueryResponse::new(
                    fields,
                    futures::stream::iter(encoded.into_iter().map(Ok)),
                ))
            }
            Outcome::Command(tag) => Response::Execution(tag),
            Outcome::Begin => Response::TransactionStart(Tag::new("BEGIN")),
            Outcome::End(t) => Response::TransactionEnd(Tag::new(t)),
        })
    }
}

/// Which output columns of `plan` show an aggregate (so may carry noise).
fn output_is_aggregate(plan: &LogicalPlan, aggregates: &[String]) -> Vec<bool> {
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Projection(p) => {
                return p
                    .expr
                    .iter()
                    .map(|e| e.column_refs().iter().any(|c| aggregates.contains(&c.name)))
                    .collect();
            }
            LogicalPlan::Limit(l) => node = &l.input,
            LogicalPlan::Sort(s) => node = &s.input,
            LogicalPlan::Filter(f) => node = &f.input,
            _ => {
                return plan
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| aggregates.contains(f.name()))
                    .collect();
            }
        }
    }
}

fn set(session: &mut Session, sql: &str) {
    // SET [SESSION | LOCAL] name { TO | = } value
    let rest = sql[3..].trim();
    let rest = rest
        .strip_prefix("SESSION ")
        .or_else(|| rest.strip_prefix("session "))
        .or_else(|| rest.strip_prefix("LOCAL "))
        .or_else(|| rest.strip_prefix("local "))
        .unwrap_or(rest);
    let (name, value) = match rest.split_once('=') {
        Some((n, v)) => (n.trim(), v.trim()),
        None => match rest.split_once(char::is_whitespace) {
            Some((n, v)) => {
                let v = v.trim();
                let v = v
                    .strip_prefix("TO ")
                    .or_else(|| v.strip_prefix("to "))
                    .unwrap_or(v);
                (n.trim(), v.trim())
            }
            None => return,
        },
    };
    let value = value.trim_matches('\'').trim_matches('"').to_string();
    session
        .settings
        .insert(name.trim_matches('"').to_ascii_lowercase(), value);
}

fn catalog_outcome(a: catalog::Answer) -> Outcome {
    let shape = a
        .columns
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut ty = None;
            for r in &a.rows {
                let t = match r.get(i) {
                    Some(Val::Int(_)) => PgCol::Int8,
                    Some(Val::Bool(_)) => PgCol::Bool,
                    Some(Val::Text(_)) => PgCol::Text,
                    _ => continue,
                };
                ty = match ty {
                    None => Some(t),
                    Some(prev) if prev == t => Some(t),
                    Some(_) => Some(PgCol::Text),
                };
            }
            (name.clone(), ty.unwrap_or(PgCol::Text))
        })
        .collect::<Shape>();
    let rows = a
        .rows
        .into_iter()
        .map(|r| {
            r.into_iter()
                .zip(&shape)
                .map(|(v, (_, ty))| match (v, ty) {
                    (Val::Null, _) => Cell::Null,
                    (Val::Int(i), PgCol::Int8) => Cell::Int(i),
                    (Val::Bool(b), PgCol::Bool) => Cell::Bool(b),
                    (v, _) => v.as_text().map_or(Cell::Null, Cell::Text),
                })
                .collect()
        })
        .collect();
    Outcome::Rows { shape, rows }
}

/// A shape from the JSON answer alone (when the query did not plan here).
fn guess_shape(resp: &QueryResponse) -> Shape {
    resp.columns
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let ty = resp
                .rows
                .iter()
                .filter_map(|r| r.get(i))
                .find(|v| !v.is_null())
                .map_or(PgCol::Text, |v| match v {
                    serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => PgCol::Int8,
                    serde_json::Value::Number(_) => PgCol::Float8,
                    serde_json::Value::Bool(_) => PgCol::Bool,
                    _ => PgCol::Text,
                });
            (name.clone(), ty)
        })
        .collect()
}

fn cell(v: &serde_json::Value, ty: PgCol) -> Cell {
    use serde_json::Value as J;
    match (v, ty) {
        (J::Null, _) => Cell::Null,
        (J::Number(n), PgCol::Int2 | PgCol::Int4 | PgCol::Int8) => n
            .as_i64()
            .map(Cell::Int)
            .or_else(|| n.as_f64().map(|f| Cell::Int(f.round() as i64)))
            .unwrap_or(Cell::Null),
        (J::Number(n), PgCol::Numeric) => n
            .as_f64()
            .and_then(Decimal::from_f64_retain)
            .map_or(Cell::Null, |d| Cell::Numeric(d.normalize())),
        (J::Number(n), _) => n.as_f64().map_or(Cell::Null, Cell::Float),
        (J::Bool(b), _) => Cell::Bool(*b),
        (J::String(s), PgCol::Date) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_or_else(|_| Cell::Text(s.clone()), Cell::Date),
        (J::String(s), PgCol::Timestamp) => {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
                .map_or_else(|_| Cell::Text(s.clone()), Cell::Timestamp)
        }
        (J::String(s), _) => Cell::Text(s.clone()),
        (other, _) => Cell::Text(other.to_string()),
    }
}

fn rows_of(resp: &QueryResponse, shape: &Shape, aggregates: &[bool], ci: bool) -> Vec<Vec<Cell>> {
    resp.rows
        .iter()
        .enumerate()
        .map(|(r, row)| {
            let mut out = Vec::new();
            for (c, (_, ty)) in shape.iter().enumerate() {
                let v = row.get(c).unwrap_or(&serde_json::Value::Null);
                let mut value = cell(v, *ty);
                // A text cell in a typed column (an unexpected value) is sent as NULL rather
                // than as bytes the client would misread.
                if matches!(value, Cell::Text(_)) && *ty != PgCol::Text {
                    value = Cell::Null;
                }
                out.push(value);
                if ci && aggregates.get(c).copied().unwrap_or(false) {
                    let half = resp.ci95.get(r).and_then(|x| x.get(c)).copied().flatten();
                    out.push(half.map_or(Cell::Null, Cell::Float));
                }
            }
            out
        })
        .collect()
}

fn fields(shape: &Shape, format: &Format) -> Vec<FieldInfo> {
    shape
        .iter()
        .enumerate()
        .map(|(i, (name, ty))| {
            FieldInfo::new(name.clone(), None, None, ty.pg_type(), format.format_for(i))
        })
        .collect()
}

fn encode(
    fields: &Arc<Vec<FieldInfo>>,
    shape: &Shape,
    rows: Vec<Vec<Cell>>,
) -> PgWireResult<Vec<pgwire::messages::data::DataRow>> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut enc = DataRowEncoder::new(fields.clone());
        for (c, (_, ty)) in row.into_iter().zip(shape) {
            match (c, ty) {
                (Cell::Null, _) => enc.encode_field(&None::<i64>)?,
                (Cell::Int(i), PgCol::Int2) => enc.encode_field(&i16::try_from(i).ok())?,
                (Cell::Int(i), PgCol::Int4) => enc.encode_field(&i32::try_from(i).ok())?,
                (Cell::Int(i), PgCol::Int8) => enc.encode_field(&i)?,
                (Cell::Int(i), PgCol::Float8) => enc.encode_field(&(i as f64))?,
                (Cell::Float(f), PgCol::Float8) => enc.encode_field(&f)?,
                (Cell::Numeric(d), _) => enc.encode_field(&d)?,
                (Cell::Date(d), _) => enc.encode_field(&d)?,
                (Cell::Timestamp(t), _) => enc.encode_field(&t)?,
                (Cell::Bool(b), _) => enc.encode_field(&b)?,
                (Cell::Text(s), _) => enc.encode_field(&s)?,
                (other, _) => {
                    return Err(user_error(
                        "XX000",
                        format!("internal error: cell {other:?} does not fit column type {ty:?}"),
                    ));
                }
            }
        }
        out.push(enc.take_row());
    }
    Ok(out)
}

/// The NOTICE sent with every federated answer: query id, privacy mode, each node's status and
/// ε spent, withheld groups.
fn notice(resp: &QueryResponse) -> String {
    let nodes: Vec<String> = resp
        .nodes
        .iter()
        .map(|n| {
            let state = match n.status {
                NodeState::Ok => "ok",
                NodeState::Refused => "refused",
                NodeState::Error => "error",
                NodeState::Unreachable => "unreachable",
            };
            let mut s = format!("{} {state}", n.agency);
            if let Some(e) = n.epsilon {
                s.push_str(&format!(" ε={e}"));
            }
            if let Some(e) = &n.error {
                s.push_str(&format!(" ({e})"));
            }
            s
        })
        .collect();
    let epsilons: Vec<f64> = resp.nodes.iter().filter_map(|n| n.epsilon).collect();
    let spent = if epsilons.is_empty() {
        "no ε spent".to_string()
    } else {
        format!(
            "ε spent {} in total",
            epsilons.iter().fold(0.0, |a, b| a + b)
        )
    };
    format!(
        "cxfed query {}: privacy {}; nodes: {}; {spent}; {} group(s) and {} cell(s) withheld{}",
        resp.query_id,
        resp.privacy,
        nodes.join(", "),
        resp.suppressed_groups,
        resp.suppressed_cells,
        if resp.complete {
            ""
        } else {
            "; PARTIAL answer: not every node contributed"
        }
    )
}

/// The SQLSTATE of a refusal code.
fn sqlstate(b: &ErrorBody) -> &'static str {
    use cxfed_protocol::codes::{ApiCode, PolicyCode};
    use cxfed_queries::rules::Rule;
    if let Some(rule) = Rule::parse(&b.code) {
        return match rule {
            Rule::SyntaxError => "42601",
            Rule::QueryTooLarge => "54001",
            Rule::TableNotAllowed | Rule::IdentifierNotAllowed => "42501",
            _ => "0A000",
        };
    }
    if let Some(policy) = PolicyCode::parse(&b.code, &b.kind) {
        return match policy {
            PolicyCode::BudgetExhausted => "53400",
            _ => "42501",
        };
    }
    match ApiCode::parse(&b.code, &b.kind) {
        Some(ApiCode::BadRequest | ApiCode::BadEpsilon) => "22023",
        Some(ApiCode::Forbidden) => "42501",
        Some(ApiCode::NotFound) => "42704",
        Some(ApiCode::NodesFailed | ApiCode::ConsoleUnreachable) => "08006",
        Some(c) if c.status() == 401 => "28000",
        Some(ApiCode::BodyTooLarge) => "54000",
        _ => "XX000",
    }
}

/// A node's refusal (or no answer) as a PostgreSQL error.
fn refusal(f: &QueryFailure, bound: &Bound) -> PgWireError {
    match f {
        QueryFailure::Transport(m) => user_error("08006", format!("no node answered: {m}")),
        QueryFailure::Refused(b) => {
            let mut info = ErrorInfo::new(
                "ERROR".into(),
                sqlstate(b).into(),
                format!("{} {}: {}", b.code, b.kind, b.message),
            );
            if let (Some(line), Some(col)) = (b.line, b.column) {
                let pos = char_position(&bound.sql, line, col);
                info.position = Some(bound.original_position(pos).to_string());
            }
            let mut detail: Vec<String> = b
                .nodes
                .iter()
                .map(|n| {
                    format!(
                        "node {}: {:?}{}",
                        n.agency,
                        n.status,
                        n.error
                            .as_ref()
                            .map(|e| format!(" — {e}"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            if let Some(q) = &b.query_id {
                detail.push(format!("query id {q}"));
            }
            if !detail.is_empty() {
                info.detail = Some(detail.join("\n"));
            }
            info.hint = Some(format!(
                "`cxfed explain` shows the rule {}; the README lists every code",
                b.code
            ));
            PgWireError::UserError(Box::new(info))
        }
    }
}

/// 1-based character position of 1-based (`line`, `column`) in `sql`.
fn char_position(sql: &str, line: u64, column: u64) -> usize {
    let mut pos = 0usize;
    for (i, l) in sql.split('\n').enumerate() {
        if i as u64 + 1 == line {
            return pos + usize::try_from(column).unwrap_or(1).max(1);
        }
        pos += l.chars().count() + 1;
    }
    pos.max(1)
}

#[async_trait]
impl SimpleQueryHandler for Backend {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let r = self
            .respond(client, &Bound::plain(query), &Format::UnifiedText)
            .await;
        Ok(vec![match r {
            Ok(r) => r,
            Err(PgWireError::UserError(e)) => Response::Error(e),
            Err(e) => return Err(e),
        }])
    }
}

#[async_trait]
impl ExtendedQueryHandler for Backend {
    type Statement = Statement;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let bound = self.bind_portal(portal).await?;
        self.respond(client, &bound, &portal.result_column_format)
            .await
    }

    async fn do_describe_statement<C>(
        &self,
        client: &mut C,
        stmt: &StoredStatement<Statement>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let types = self
            .parameter_types(&stmt.statement.sql, &stmt.statement.params)
            .await?;
        let literals: Vec<String> = types
            .iter()
            .map(|t| neutral_literal(t).to_string())
            .collect();
        let bound = bind(&stmt.statement.sql, &literals)?;
        let shape = self.shape(&session_of(client), &bound.sql).await?;
        let types = types
            .into_iter()
            .map(|t| if t == Type::UNKNOWN { Type::TEXT } else { t })
            .collect();
        Ok(DescribeStatementResponse::new(
            types,
            fields(&shape, &Format::UnifiedText),
        ))
    }

    async fn do_describe_portal<C>(
        &self,
        client: &mut C,
        portal: &Portal<Statement>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let bound = self.bind_portal(portal).await?;
        let shape = self.shape(&session_of(client), &bound.sql).await?;
        if shape.is_empty() {
            return Ok(DescribePortalResponse::no_data());
        }
        Ok(DescribePortalResponse::new(fields(
            &shape,
            &portal.result_column_format,
        )))
    }
}

impl Backend {
    async fn bind_portal(&self, portal: &Portal<Statement>) -> PgWireResult<Bound> {
        let stmt = &portal.statement.statement;
        let types = self.parameter_types(&stmt.sql, &stmt.params).await?;
        if portal.parameter_len() != types.len() {
            return Err(user_error(
                "08P01",
                format!(
                    "bind message supplies {} parameters, but the statement has {}",
                    portal.parameter_len(),
                    types.len()
                ),
            ));
        }
        let literals = types
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let t = if *t == Type::UNKNOWN { &Type::TEXT } else { t };
                literal(portal, i, t)
            })
            .collect::<PgWireResult<Vec<_>>>()?;
        bind(&stmt.sql, &literals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_placeholders_outside_strings_and_maps_positions_back() {
        let sql = "SELECT '$1' AS s, COUNT(*) FROM experience WHERE agency = $1 AND trust >= $2";
        let b = bind(sql, &["'SSA'".into(), "4".into()]).expect("bind");
        assert_eq!(
            b.sql,
            "SELECT '$1' AS s, COUNT(*) FROM experience WHERE agency = 'SSA' AND trust >= 4"
        );
        // "trust" is at the same place in both; "AND" moved by 3 characters.
        let and_bound = b.sql.find(" AND").expect("and") + 2;
        let and_orig = sql.find(" AND").expect("and") + 2;
        assert_eq!(b.original_position(and_bound), and_orig);
        // A position inside a literal points at its placeholder.
        let lit = b.sql.find("'SSA'").expect("lit") + 2;
        assert_eq!(
            b.original_position(lit),
            sql.find("$1 AND").expect("$1") + 1
        );
        let err = bind("SELECT $3", &["1".into()]).expect_err("too few");
        assert!(err.to_string().contains("$3"), "{err}");
    }

    #[test]
    fn quotes_text_parameters() {
        assert_eq!(quote("O'Brien"), "'O''Brien'");
    }

    #[test]
    fn positions_count_characters_across_lines() {
        let sql = "SELECT ε,\n  person_id FROM experience";
        assert_eq!(char_position(sql, 2, 3), 13);
        assert_eq!(sql.chars().nth(12), Some('p'));
    }

    #[test]
    fn refusal_codes_have_sqlstates() {
        let body = |code: &str, kind: &str| ErrorBody {
            code: code.into(),
            kind: kind.into(),
            message: "m".into(),
            line: None,
            column: None,
            query_id: None,
            nodes: vec![],
        };
        assert_eq!(
            sqlstate(&body("CXF-Q012", "identifier-not-allowed")),
            "42501"
        );
        assert_eq!(sqlstate(&body("CXF-Q001", "syntax-error")), "42601");
        assert_eq!(sqlstate(&body("CXF-Q005", "raw-rows")), "0A000");
        assert_eq!(sqlstate(&body("CXF-A502", "nodes-failed")), "08006");
    }

    #[test]
    fn set_and_show_keep_session_settings() {
        let mut s = Session::new("a");
        set(&mut s, "SET application_name = 'excel'");
        set(&mut s, "SET SESSION DateStyle TO 'ISO'");
        assert_eq!(s.show("application_name"), Some("excel"));
        assert_eq!(s.show("datestyle"), Some("ISO"));
    }
}
