//! The agent → scaler link end to end: a scaler and three agents over
//! loopback gRPC; the scaler stops mid-stream and comes back on the same
//! port; afterwards its state holds every node's GPUs exactly once and no
//! pod that went away while it was down.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use gpuscale_agent::LinkStatus;
use gpuscale_core::{NodeName, PodRef};
use gpuscale_scaler::{Scaler, ScalerConfig, StateView};
use support::{eventually, fake_node, start_agent, wait_for_view};

fn all_gpus(view: &StateView) -> Vec<String> {
    view.gpus().map(|(_, g)| g.info.uuid.0.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaler_restart_mid_stream_ends_with_every_gpu_once_and_no_stale_pods() {
    let scaler = Scaler::new(ScalerConfig::new("127.0.0.1:0".parse().expect("addr")))
        .start()
        .await
        .expect("scaler starts");
    let addr: SocketAddr = scaler.grpc_addr();
    let url = format!("http://{addr}");

    let names = ["node-a", "node-b", "node-c"];
    let nodes: Vec<_> = names
        .iter()
        .map(|n| fake_node(n, 4, &[&format!("{n}-llama-0"), &format!("{n}-llama-1")]))
        .collect();
    let mut agents = Vec::new();
    for (name, node) in names.iter().zip(&nodes) {
        agents.push(start_agent(&url, node, name).await);
    }

    // Mid-stream: every node has sent its snapshot and several deltas.
    let mut view = scaler.view();
    let before = wait_for_view(&mut view, "three nodes streaming deltas", |v| {
        v.nodes.len() == 3
            && v.nodes
                .values()
                .all(|n| n.last_seq >= 5 && n.gpus.len() == 4)
    })
    .await;
    assert_eq!(all_gpus(&before).len(), 12);
    let epochs: Vec<u64> = agents.iter().map(|a| a.handle().boot_epoch()).collect();

    scaler.shutdown().await.expect("scaler stops");
    for a in &agents {
        let mut link = a.handle().link();
        link.wait_for(|l| matches!(l, LinkStatus::Disconnected { .. }))
            .await
            .expect("agent alive");
    }
    // While the scaler is away, node-b loses a pod and the agents keep
    // sampling (their unsent states coalesce).
    let gone = PodRef::new("default", "node-b-llama-1");
    assert!(nodes[1].handle().remove_engine(&gone));
    let coalesced: Vec<u64> = agents
        .iter()
        .map(|a| a.handle().health().coalesced_total)
        .collect();
    for (a, c) in agents.iter().zip(&coalesced) {
        let h = a.handle().clone();
        let c = *c;
        eventually("samples to coalesce while disconnected", || {
            h.health().coalesced_total >= c + 3
        })
        .await;
    }

    // The scaler comes back on the same port with empty state.
    let scaler = Scaler::new(ScalerConfig::new(addr))
        .start()
        .await
        .expect("scaler restarts on the same port");
    let mut view = scaler.view();
    let after = wait_for_view(&mut view, "all three nodes back", |v| {
        v.nodes.len() == 3 && v.nodes.values().all(|n| n.connected && n.last_seq > 5)
    })
    .await;

    let gpus = all_gpus(&after);
    let unique: BTreeSet<_> = gpus.iter().cloned().collect();
    assert_eq!(gpus.len(), 12, "every node's GPUs, once: {gpus:?}");
    assert_eq!(unique.len(), 12, "no GPU twice");
    for ((name, node), epoch) in names.iter().zip(&nodes).zip(&epochs) {
        let n = &after.nodes[&NodeName::new(*name)];
        let expected: BTreeSet<String> =
            node.handle().gpu_uuids().into_iter().map(|u| u.0).collect();
        let got: BTreeSet<String> = n.gpus.iter().map(|g| g.info.uuid.0.clone()).collect();
        assert_eq!(got, expected, "{name}'s GPUs");
        let pods: BTreeSet<PodRef> = n.pods.iter().map(|p| p.pod.clone()).collect();
        let engines: BTreeSet<PodRef> = n.engines.iter().map(|e| e.sample.pod.clone()).collect();
        let expected_pods: BTreeSet<PodRef> = node.handle().pods().into_iter().collect();
        assert_eq!(pods, expected_pods, "{name}'s pods");
        assert_eq!(engines, expected_pods, "{name}'s engines");
        assert_eq!(n.boot_epoch, *epoch, "same agent process, same epoch");
    }
    assert!(
        !after.nodes[&NodeName::new("node-b")]
            .pods
            .iter()
            .any(|p| p.pod == gone)
    );
    // The scaler may apply a new stream's snapshot before the agent has seen
    // the stream's response headers; wait for the agents' side too.
    for a in &agents {
        let h = a.handle().clone();
        eventually("the agent to count its reconnect", || {
            h.health().reconnects_total >= 1 && h.link().borrow().is_connected()
        })
        .await;
    }

    for a in agents {
        a.shutdown().await.expect("agent stops");
    }
    scaler.shutdown().await.expect("scaler stops");
}
