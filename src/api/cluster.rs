//! `GET /cluster/nodes`: the live nodes of the cluster, each with its agent and session
//! counts and when it was last heard from.
//!
//! Without `[cluster]` there is no cluster to list: 404 with a detail saying so (rather
//! than a one-node list, which would look like a cluster whose other nodes are missing).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::schema::{ClusterNodes, ErrorDetail};
use super::{ApiError, AppState};
use crate::clock::rfc3339;
use crate::cluster::fleet::{NodeSummary, from_unix_ms};

#[utoipa::path(
    get, path = "/cluster/nodes", operation_id = "list_cluster_nodes",
    summary = "List the live nodes of the cluster", tag = "cluster", security(("api_key" = [])),
    responses(
        (status = 200, description = "The live nodes, this one first", body = ClusterNodes),
        (status = 404, description = "This node runs without `[cluster]`", body = ErrorDetail),
        (status = 503, description = "Redis is unreachable", body = ErrorDetail),
    ),
)]
pub async fn nodes(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let Some(link) = &app.agents.cluster else {
        return Err(ApiError::NotFound(
            "this node runs without [cluster]: there are no other nodes to list".into(),
        ));
    };
    if !link.status.is_connected() {
        return Err(ApiError::ClusterUnavailable(
            "Redis is unreachable: the other cluster nodes cannot be listed now (this node keeps serving its own agents; retry in a few seconds)".into(),
        ));
    }
    let own = link
        .fleet
        .own_summary(&app.agents.registry, app.clock.now(), 0);
    let mut nodes = vec![show(&own, true)];
    nodes.extend(link.fleet.nodes().iter().map(|n| show(n, false)));
    Ok(Json(json!({ "node_id": link.node_id, "nodes": nodes })))
}

fn show(n: &NodeSummary, this: bool) -> Value {
    json!({
        "node_id": n.node_id,
        "self": this,
        "agents": n.agents,
        "sessions": n.sessions,
        "last_heard": rfc3339(from_unix_ms(n.heard_at_ms)),
        "started_at": rfc3339(from_unix_ms(n.started_at_ms)),
    })
}
