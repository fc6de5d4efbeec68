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
//! Not yet: TLS on these connections (plain gRPC: run the cluster on a network only the
//! agency's machines reach), object stores other than the local filesystem.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

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
    /// Serving gRPC or Flight failed.
    #[error("serving on {addr}: {message}")]
    Serve {
        /// The address served.
        addr: String,
        /// Why.
        message: String,
    },
}

/// The session a node runs partial plans in when its engine is a cluster: the node's own
/// session `ctx` (its tables, options, functions and memory pool) with Ballista's query
/// planner, which sends each plan to `scheduler` instead of running it.
pub fn client_context(
    ctx: &SessionContext,
    scheduler: &SchedulerAddr,
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
        .upgrade_for_ballista(scheduler.grpc_url())?;
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

/// Runs a Ballista scheduler on `listener` (pull scheduling: executors poll it for tasks)
/// until `shutdown` completes.
pub async fn run_scheduler(
    listener: TcpListener,
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
    info!(%addr, "Ballista scheduler (cxfed functions) listening");
    create_grpc_server(&GrpcServerConfig::default())
        .add_service(grpc)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
        .map_err(|e| ClusterError::Serve {
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
    let endpoint = create_grpc_client_endpoint(
        opts.scheduler.grpc_url(),
        Some(&GrpcClientConfig::default()),
    )
    .map_err(|e| unreachable(e.to_string()))?;
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
    let config: ConfigProducer = Arc::new(default_config_producer);
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
    let serve = create_grpc_server(&GrpcServerConfig::default())
        .add_service(flight)
        .serve_with_incoming(TcpIncoming::from(listener));
    let poll = ballista_executor::execution_loop::poll_loop(
        scheduler,
        executor,
        BallistaCodec::<LogicalPlanNode, PhysicalPlanNode>::default(),
        None,
        None,
        ballista_executor::health::ExecutorHealth::new(),
    );
    info!(%addr, scheduler = %opts.scheduler, vcores, work_dir, "Ballista executor (cxfed functions) polling");
    tokio::select! {
        r = serve => r.map_err(|e| ClusterError::Serve { addr: addr.to_string(), message: e.to_string() }),
        r = poll => r.map_err(ClusterError::from),
        () = shutdown => Ok(()),
    }
}
