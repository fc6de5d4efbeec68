//! Apache Ballista, embedded (the `ballista` feature): the client session a node submits its
//! validated partial plans through ([`client_context`]), and the scheduler and executor that
//! `cxfed scheduler` and `cxfed executor` run ([`run_scheduler`], [`run_executor`]), each with
//! cxfed's functions, so that a plan decodes and runs on the cluster as it would in the node.
//!
//! What travels: the node sends the optimized logical plan of a partial (its scans are the
//! node's listing tables: the Parquet directories under its data directory) to the scheduler
//! as protobuf; the scheduler lists the files, plans stages and hands tasks to executors that
//! poll it (pull scheduling); executors read the files at the same paths, so the node, the
//! scheduler and every executor must see the data directory at the same path (one machine,
//! or a shared filesystem). The rows of the last stage come back to the node over Arrow
//! Flight, straight from the executors. Nothing else of the node (policy, noise, ledger,
//! audit, keys) leaves its process.
//!
//! Mutual TLS ([`ClusterTls`], optional): every server (scheduler, executors' Flight) accepts
//! with cxfed's own rustls configuration (TLS 1.3, ring, client certificate from the federation
//! CA required) and then drops any peer that is not a node certificate of its own agency;
//! every client (node, executors) presents the agency's certificate and trusts only the
//! federation CA, through the endpoint hook Ballista offers (tonic's `ClientTlsConfig`, which
//! checks the chain and the host name, not the SPIFFE identity: a server of another agency of
//! the same federation is refused by that server's own check of the client, not by the
//! client). Without TLS the links are plain gRPC: keep the cluster on a network only the
//! agency's machines reach.
//!
//! Not yet: object stores other than the local filesystem.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ballista_core::extension::{EndpointOverrideFn, SessionConfigExt};
use futures::Stream;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use arrow_flight::flight_service_server::FlightServiceServer;
use ballista_core::error::BallistaError;
use ballista_core::extension::SessionStateExt;
use ballista_core::registry::BallistaFunctionRegistry;
use ballista_core::serde::BallistaCodec;
use ballista_core::serde::protobuf::ExecutorRegistration;
use ballista_core::serde::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use ballista_core::serde::protobuf::scheduler_grpc_server::SchedulerGrpcServer;
use ballista_core::serde::scheduler::{
    ExecutorOperatingSystemSpecification, ExecutorSpecification,
};
use ballista_core::utils::{
    GrpcClientConfig, GrpcServerConfig, create_grpc_client_endpoint, create_grpc_server,
    default_config_producer, default_session_builder,
};
use ballista_core::{BALLISTA_PROTOCOL_VERSION, ConfigProducer, RuntimeProducer};
use ballista_executor::executor::Executor;
use ballista_executor::flight_service::BallistaFlightService;
use ballista_executor::metrics::LoggingMetricsCollector;
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_server::SchedulerServer;
use datafusion::error::DataFusionError;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::context::{SessionConfig, SessionContext, SessionState};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{FunctionRegistry, SessionStateBuilder};
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tracing::info;

use cxfed_queries::context::{aggregate_functions, register_functions};

use crate::config::SchedulerAddr;

/// The largest gRPC message a cluster member sends or accepts (plans and task statuses; rows
/// travel over Flight in batches).
const MAX_MESSAGE: usize = 16 << 20;

/// Why a scheduler or an executor stopped or could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// Ballista refused its configuration or failed while running.
    #[error("ballista: {0}")]
    Ballista(#[from] BallistaError),
    /// The scheduler could not be reached (executor start).
    #[error("cannot reach the scheduler at {scheduler}: {message}")]
    Unreachable {
        /// The scheduler.
        scheduler: String,
        /// Why.
        message: String,
    },
    /// The TLS files cannot be used.
    #[error("tls: {0}")]
    Tls(String),
    /// Serving gRPC or Flight failed.
    #[error("serving on {addr}: {message}")]
    Serve {
        /// The address served.
        addr: String,
        /// Why.
        message: String,
    },
}

/// Mutual TLS within an agency's cluster, from one set of its `[tls]` files: the CA bundle,
/// and a node certificate of the agency with its key.
#[derive(Clone)]
pub struct ClusterTls {
    server: Arc<rustls::ServerConfig>,
    client: ClientTlsConfig,
    own: cxfed_protocol::Identity,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTls")
            .field("own", &self.own.to_string())
            .finish_non_exhaustive()
    }
}

impl ClusterTls {
    /// Loads `files` (a node certificate: the one the agency's node uses will do).
    pub fn load(files: &crate::tls::TlsFiles) -> Result<ClusterTls, ClusterError> {
        let bad = |e: &dyn std::fmt::Display| ClusterError::Tls(e.to_string());
        let chain = crate::tls::load_certs(&files.cert).map_err(|e| bad(&e))?;
        let leaf = chain.first().ok_or_else(|| {
            ClusterError::Tls(format!("{}: no certificate", files.cert.display()))
        })?;
        let own = crate::tls::peer_identity(&[leaf.to_vec()]).map_err(|e| bad(&e))?;
        let server = crate::tls::server_config(files, own.federation()).map_err(|e| bad(&e))?;
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ClusterError::Tls(format!("{}: {e}", p.display())))
        };
        let client = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&files.ca)?))
            .identity(tonic::transport::Identity::from_pem(
                read(&files.cert)?,
                read(&files.key)?,
            ));
        Ok(ClusterTls {
            server,
            client,
            own,
        })
    }

    /// What Ballista applies to every gRPC / Flight endpoint it connects to.
    fn endpoint_override(&self) -> EndpointOverrideFn {
        let client = self.client.clone();
        Arc::new(move |endpoint: Endpoint| Ok(endpoint.tls_config(client.clone())?))
    }

    /// `config` with TLS on every connection Ballista makes from it.
    fn session_config(&self, config: SessionConfig) -> SessionConfig {
        config
            .with_ballista_use_tls(true)
            .with_ballista_override_create_grpc_client_endpoint(self.endpoint_override())
    }

    /// Connections on `listener` that completed the handshake and present a node certificate
    /// of this agency; the others are dropped (and logged). Handshakes run concurrently.
    fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + use<> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&self.server));
        let own = self.own.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, remote) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    break; // the server stopped
                }
                let (acceptor, own, tx) = (acceptor.clone(), own.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
                    let stream = match handshake.await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::warn!(%remote, error = %e, "cluster TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%remote, "cluster TLS handshake timed out");
                            return;
                        }
                    };
                    let peer: Vec<Vec<u8>> = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .unwrap_or_default()
                        .iter()
                        .map(|c| c.to_vec())
                        .collect();
                    match crate::tls::peer_identity(&peer) {
                        Ok(id)
                            if id.role() == cxfed_protocol::Role::Node
                                && id.federation() == own.federation()
                                && id.agency() == own.agency() =>
                        {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(id) => tracing::warn!(
                            %remote,
                            peer = %id,
                            "refused on the cluster: only node certificates of {} may connect",
                            own.agency()
                        ),
                        Err(e) => tracing::warn!(%remote, error = %e, "refused on the cluster"),
                    }
                });
            }
        });
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|s| (s, rx)) })
    }
}

/// The session a node runs partial plans in when its engine is a cluster: the node's own
/// session `ctx` (its tables, options, functions and memory pool) with Ballista's query
/// planner, which sends each plan to `scheduler` instead of running it (over `tls` if given).
pub fn client_context(
    ctx: &SessionContext,
    scheduler: &SchedulerAddr,
    tls: Option<&ClusterTls>,
) -> Result<SessionContext, DataFusionError> {
    // The node's catalog is shared, not copied: building a state that creates the default
    // catalog would replace the node's own (and its tables) with an empty one.
    let config = ctx
        .state()
        .config()
        .clone()
        .with_create_default_catalog_and_schema(false);
    let state = SessionStateBuilder::new_from_existing(ctx.state())
        .with_config(config)
        .build()
        .upgrade_for_ballista(scheduler.grpc_url(tls.is_some()))?;
    // TLS is set after the upgrade: a config that already has Ballista's options would not
    // get Ballista's restricted DataFusion defaults.
    let state = match tls {
        None => state,
        Some(tls) => {
            let config = tls.session_config(state.config().clone());
            SessionStateBuilder::new_from_existing(state)
                .with_config(config)
                .build()
        }
    };
    let ctx = SessionContext::new_with_state(state);
    // `upgrade_for_ballista` resets the function set to Ballista's defaults.
    register_functions(&ctx);
    Ok(ctx)
}

/// A scheduler session: Ballista's defaults, cxfed's functions, and no cache of file lists
/// (a file a node ingests must be planned by the next query, as in the node).
fn scheduler_session(config: SessionConfig) -> datafusion::common::Result<SessionState> {
    let state = default_session_builder(config)?;
    let runtime = RuntimeEnvBuilder::from_runtime_env(state.runtime_env())
        .with_cache_manager(CacheManagerConfig::default().with_list_files_cache_limit(0))
        .build_arc()?;
    let mut state = SessionStateBuilder::new_from_existing(state)
        .with_runtime_env(runtime)
        .build();
    for f in aggregate_functions() {
        state.register_udaf(Arc::new(f))?;
    }
    Ok(state)
}

/// The functions an executor decodes plans with: Ballista's defaults and cxfed's.
fn executor_functions() -> datafusion::common::Result<BallistaFunctionRegistry> {
    let state = scheduler_session(default_config_producer())?;
    Ok(BallistaFunctionRegistry::from(&state))
}

/// Runs a Ballista scheduler on `listener` (pull scheduling: executors poll it for tasks),
/// over mutual TLS if `tls` is given, until `shutdown` completes.
pub async fn run_scheduler(
    listener: TcpListener,
    tls: Option<ClusterTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ClusterError> {
    let addr = listener.local_addr().map_err(BallistaError::from)?;
    let config = Arc::new(SchedulerConfig {
        bind_host: addr.ip().to_string(),
        bind_port: addr.port(),
        external_host: addr.ip().to_string(),
        scheduling_policy: ballista_core::config::TaskSchedulingPolicy::PullStaged,
        override_session_builder: Some(Arc::new(scheduler_session)),
        grpc_server_max_decoding_message_size: MAX_MESSAGE as u32,
        grpc_server_max_encoding_message_size: MAX_MESSAGE as u32,
        use_tls: tls.is_some(),
        override_create_grpc_client_endpoint: tls.as_ref().map(ClusterTls::endpoint_override),
        ..SchedulerConfig::default()
    });
    config.validate()?;
    let cluster = BallistaCluster::new_from_config(&config).await?;
    let metrics = ballista_scheduler::metrics::default_metrics_collector()?;
    let mut scheduler: SchedulerServer<LogicalPlanNode, PhysicalPlanNode> = SchedulerServer::new(
        config.scheduler_endpoint(),
        cluster,
        BallistaCodec::default(),
        Arc::clone(&config),
        metrics,
    );
    scheduler.init().await?;
    let grpc = SchedulerGrpcServer::new(scheduler)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    info!(%addr, tls = tls.is_some(), "Ballista scheduler (cxfed functions) listening");
    let router = create_grpc_server(&GrpcServerConfig::default()).add_service(grpc);
    let served = match &tls {
        None => {
            router
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
                .await
        }
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                .await
        }
    };
    served.map_err(|e| ClusterError::Serve {
        addr: addr.to_string(),
        message: e.to_string(),
    })
}

/// How an executor joins its cluster.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The scheduler to poll for tasks.
    pub scheduler: SchedulerAddr,
    /// The host name or address the node and other executors fetch results from (its Flight
    /// service); the listener's address if `None`.
    pub advertise_host: Option<String>,
    /// Where shuffle files go; a temporary directory, removed on exit, if `None`.
    pub work_dir: Option<PathBuf>,
    /// Tasks run at once (0: one per core).
    pub concurrent_tasks: usize,
    /// Mutual TLS to the scheduler, the node and other executors.
    pub tls: Option<ClusterTls>,
}

/// Runs a Ballista executor: its Flight service (results and shuffle files) on `listener`,
/// polling `opts.scheduler` for tasks, until `shutdown` completes or either stops.
pub async fn run_executor(
    listener: TcpListener,
    opts: ExecutorOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ClusterError> {
    let addr = listener.local_addr().map_err(BallistaError::from)?;
    let (_temp, work_dir) = match &opts.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(BallistaError::from)?;
            (None, dir.clone())
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("cxfed-executor-")
                .tempdir()
                .map_err(BallistaError::from)?;
            let path = temp.path().to_path_buf();
            (Some(temp), path)
        }
    };
    let work_dir = work_dir.display().to_string();
    let vcores = match opts.concurrent_tasks {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };

    let unreachable = |message: String| ClusterError::Unreachable {
        scheduler: opts.scheduler.to_string(),
        message,
    };
    let mut endpoint = create_grpc_client_endpoint(
        opts.scheduler.grpc_url(opts.tls.is_some()),
        Some(&GrpcClientConfig::default()),
    )
    .map_err(|e| unreachable(e.to_string()))?;
    if let Some(tls) = &opts.tls {
        endpoint = endpoint
            .tls_config(tls.client.clone())
            .map_err(|e| unreachable(e.to_string()))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let scheduler = SchedulerGrpcClient::new(channel)
        .max_encoding_message_size(MAX_MESSAGE)
        .max_decoding_message_size(MAX_MESSAGE);

    let metadata = ExecutorRegistration {
        id: ballista_core::ids::new_instance_id(),
        host: Some(
            opts.advertise_host
                .clone()
                .unwrap_or_else(|| addr.ip().to_string()),
        ),
        port: u32::from(addr.port()),
        // Pull scheduling: the scheduler never calls the executor, so no gRPC port.
        grpc_port: 0,
        specification: Some(
            ExecutorSpecification::default()
                .with_vcores(vcores as u32)
                .into(),
        ),
        os_info: Some(ExecutorOperatingSystemSpecification::default().into()),
        ballista_protocol_version: BALLISTA_PROTOCOL_VERSION,
    };
    let wd = work_dir.clone();
    let runtime: RuntimeProducer = Arc::new(move |_| {
        RuntimeEnvBuilder::new()
            .with_temp_file_path(wd.clone())
            .build_arc()
    });
    let config: ConfigProducer = match opts.tls.clone() {
        None => Arc::new(default_config_producer),
        Some(tls) => Arc::new(move || tls.session_config(default_config_producer())),
    };
    let registry = executor_functions().map_err(BallistaError::from)?;
    let executor = Arc::new(Executor::with_default_execution_engine(
        metadata,
        &work_dir,
        runtime,
        config,
        Arc::new(registry),
        Arc::new(LoggingMetricsCollector::default()),
        vcores,
    ));
    let flight = FlightServiceServer::new(BallistaFlightService::new(work_dir.clone()))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let router = create_grpc_server(&GrpcServerConfig::default()).add_service(flight);
    let serve = async {
        match &opts.tls {
            None => {
                router
                    .serve_with_incoming(TcpIncoming::from(listener))
                    .await
            }
            Some(tls) => router.serve_with_incoming(tls.incoming(listener)).await,
        }
    };
    let poll = ballista_executor::execution_loop::poll_loop(
        scheduler,
        executor,
        BallistaCodec::<LogicalPlanNode, PhysicalPlanNode>::default(),
        None,
        None,
        ballista_executor::health::ExecutorHealth::new(),
    );
    info!(%addr, scheduler = %opts.scheduler, vcores, work_dir, tls = opts.tls.is_some(), "Ballista executor (cxfed functions) polling");
    tokio::select! {
        r = serve => r.map_err(|e| ClusterError::Serve { addr: addr.to_string(), message: e.to_string() }),
        r = poll => r.map_err(ClusterError::from),
        () = shutdown => Ok(()),
    }
}
