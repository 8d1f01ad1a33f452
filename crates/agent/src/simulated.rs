//! The agent on a simulated node that its caller drives: the demo's fleet.
//!
//! [`start_simulated_node`] runs the real agent around a [`FakeNode`] the
//! caller keeps a handle to (it pushes each pod's engine state through
//! [`FakeNode::handle`]): the node's sources as `gpuscale agent` wires them
//! (GPUs, the GPU-to-pod assignment, engines; a pod the scaler drains is
//! reported `Draining`), the sampling loop and the uplink to the scaler,
//! and, with a Kubernetes client, the node-scoped pod watch and the
//! readiness-gate writer. The fake node's engines have no HTTP endpoint, so
//! an engine is warm when it reports `Warm` (no warm-up request). Samples
//! are stamped by the caller's [`Clock`], so a simulation that compresses
//! time runs every part on one timeline.
//!
//! Not for: real nodes (`gpuscale agent`, [`crate::start_node`]).

use std::sync::Arc;

use gpuscale_telemetry::fake::FakeNode;
use gpuscale_telemetry::{
    PushConfig, ScrapeConfig, ScrapeEngineSource, TelemetryError, push_source,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::AgentConfig;
use crate::discovery::watch_node_pods;
use crate::error::AgentError;
use crate::exporter::NodeStats;
use crate::node::{BatchLimits, apply_directives};
use crate::readiness::{ReadinessConfig, ReadinessWriter};
use crate::sources::{GpuBackend, NodeEngineSource, NodeGpuSource, NodePodSource, PodBackend};
use crate::{Agent, AgentHandle, Clock, RunningAgent};

/// A started agent on a simulated node.
#[derive(Debug)]
pub struct RunningSimulatedNode {
    agent: RunningAgent,
    shutdown: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl RunningSimulatedNode {
    /// The agent: directives (drains, batch limits), link state, samples.
    pub fn handle(&self) -> &AgentHandle {
        self.agent.handle()
    }

    /// Stops the node's tasks and the agent, and waits for all of them.
    pub async fn shutdown(self) -> Result<(), AgentError> {
        self.shutdown.send_replace(true);
        let mut first_error = None;
        for (task, join) in self.tasks {
            if let Err(e) = join.await
                && !e.is_cancelled()
            {
                first_error.get_or_insert(AgentError::Task {
                    task,
                    message: e.to_string(),
                });
            }
        }
        let agent = self.agent.shutdown().await;
        match first_error {
            Some(e) => Err(e),
            None => agent,
        }
    }
}

fn telemetry_error(e: TelemetryError) -> AgentError {
    AgentError::config(
        "node",
        e.to_string(),
        "a valid simulated node configuration",
    )
}

/// Starts the agent of `config.node_name` on the simulated node `fake`;
/// see the module docs. With `kube`, pods on this node that declare
/// `readiness.gate` get it set as on a real node.
pub async fn start_simulated_node(
    config: AgentConfig,
    fake: &FakeNode,
    readiness: ReadinessConfig,
    clock: Clock,
    kube: Option<kube::Client>,
) -> Result<RunningSimulatedNode, AgentError> {
    config.validate()?;
    readiness.validate()?;
    let stats = Arc::new(NodeStats::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks: Vec<(&'static str, JoinHandle<()>)> = Vec::new();
    let node_pods = kube.as_ref().map(|client| {
        let (rx, task) = watch_node_pods(
            client.clone(),
            config.node_name.clone(),
            stats.clone(),
            shutdown_rx.clone(),
        );
        tasks.push(("pod watch", task));
        rx
    });
    let gpus = NodeGpuSource::new(GpuBackend::Fake(fake.gpu_source()), stats.clone());
    let pods = NodePodSource::new(
        PodBackend::Fake(fake.pod_source()),
        gpus.inventory(),
        node_pods.clone(),
        stats.clone(),
    );
    let (_push, push_engines, limits) =
        push_source(PushConfig::default()).map_err(telemetry_error)?;
    let scrape = ScrapeEngineSource::new(ScrapeConfig::default()).map_err(telemetry_error)?;
    let engines = NodeEngineSource::new(
        scrape,
        push_engines,
        Some(fake.engine_source()),
        Vec::new(),
        node_pods.clone(),
        limits.clone(),
        stats.clone(),
    );
    let targets = engines.targets();
    let http = engines.http_client();
    let agent = Agent::new(config, gpus, pods, engines)?.with_clock(clock);
    let running = agent.start().await?;
    let handle = running.handle().clone();
    tasks.push((
        "directives",
        tokio::spawn(apply_directives(
            handle.directives(),
            limits,
            BatchLimits::Skip,
            shutdown_rx.clone(),
        )),
    ));
    if let (Some(client), Some(pods)) = (kube, node_pods) {
        let writer = ReadinessWriter {
            config: readiness,
            client,
            http,
            pods,
            samples: handle.samples(),
            directives: handle.directives(),
            targets,
            clock,
            stats,
            shutdown: shutdown_rx,
            seed: handle.boot_epoch(),
        };
        tasks.push(("readiness-gate writer", tokio::spawn(writer.run())));
    }
    Ok(RunningSimulatedNode {
        agent: running,
        shutdown: shutdown_tx,
        tasks,
    })
}
