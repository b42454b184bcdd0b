//! Two (or more) in-process gateway nodes sharing one Redis and one test PKI: the
//! `[cluster]` configuration, starting nodes, and waiting (bounded) for a node to see a
//! change another node made.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentgate::config::{ClusterMode, RawCluster};

use super::{TestPki, TestServer, test_config};

/// The failure bound of every wait for a change to reach another node. Propagation takes
/// about a millisecond on loopback (BENCHMARKS.md); this only ends a test that failed.
pub const PROPAGATION_BOUND: Duration = Duration::from_secs(10);

/// Starts one node on `redis_url` with its own directories and the shared `pki`.
pub async fn start_node(
    pki: &Arc<TestPki>,
    redis_url: &str,
    node_id: &str,
    mode: ClusterMode,
) -> TestServer {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = test_config(pki, dir.path(), |c| {
        c.cluster = Some(RawCluster {
            redis_url: Some(redis_url.to_owned()),
            node_id: Some(node_id.to_owned()),
            mode,
            ..RawCluster::default()
        });
    });
    TestServer::start_in(pki.clone(), dir, config)
        .await
        .unwrap_or_else(|e| panic!("node {node_id} did not start: {e}"))
}

/// Nodes `node-a` and `node-b` on one Redis.
pub async fn two_nodes(redis_url: &str, mode: ClusterMode) -> (TestServer, TestServer) {
    let pki = Arc::new(TestPki::new());
    let a = start_node(&pki, redis_url, "node-a", mode).await;
    let b = start_node(&pki, redis_url, "node-b", mode).await;
    (a, b)
}

/// Polls `done` until it holds; panics naming `what` after [`PROPAGATION_BOUND`].
pub async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PROPAGATION_BOUND;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
