//! Two in-process socketioxide servers sharing one Redis through `agentgate::cluster`'s
//! driver and the socketioxide-redis adapter: cross-node emit-with-ack, the empty-room
//! answer, recovery after Redis is killed and restarted, and Redis Cluster (sharded
//! pub/sub). Latencies are printed (`--nocapture`), never asserted (DESIGN.md, "Testing").
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use agentgate::cluster::{self, DriverConfig, RedisDriver, RedisUrl, Topology};
use common::redis::{RedisCluster, RedisServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::adapter::Emitter;
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide_redis::{CustomRedisAdapter, RedisAdapterConfig, RedisAdapterCtr};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

type Adapter = CustomRedisAdapter<Emitter, RedisDriver>;

/// Ack timeout of the emits: long, so that a stalled stream would show as `complete ==
/// false` (the collector's deadline) rather than as a slow pass.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// One socketioxide server on 127.0.0.1:0 with the Redis adapter.
struct Node {
    io: SocketIo<Adapter>,
    addr: SocketAddr,
    driver: RedisDriver,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Node {
    async fn start(topology: &Topology) -> Node {
        common::init_tracing();
        let driver_config = DriverConfig::default();
        let connect = RedisDriver::connect(topology, &driver_config);
        let driver = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .expect("driver connect hung")
            .expect("driver connects");
        // Request timeout 2 s: the fallback when a node does not answer at all.
        let config = RedisAdapterConfig::new().with_request_timeout(Duration::from_secs(2));
        let ctr = RedisAdapterCtr::new_with_driver(driver.clone(), config);
        let (layer, io) = SocketIo::builder()
            .with_adapter::<Adapter>(ctr)
            .build_layer();
        // With a remote adapter `ns` is async and fallible: not awaiting it leaves no
        // namespace (DESIGN.md).
        tokio::time::timeout(Duration::from_secs(10), io.ns("/", on_connect))
            .await
            .expect("namespace init hung")
            .expect("namespace");
        let app = axum::Router::new().layer(layer);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Node {
            io,
            addr,
            driver,
            task,
        }
    }

    async fn emit(&self, room: &'static str, data: Value) -> cluster::AckCollection<Value> {
        let emit = cluster::emit_with_ack(self.io.to(room), "command", &data, ACK_TIMEOUT);
        tokio::time::timeout(ACK_TIMEOUT * 3, emit)
            .await
            .expect("emit_with_ack hung")
            .expect("emit_with_ack")
    }
}

async fn on_connect(socket: SocketRef<Adapter>) {
    socket.on(
        "join",
        async |s: SocketRef<Adapter>, Data(room): Data<String>, ack: AckSender<Adapter>| {
            s.join(room);
            let _ = ack.send("joined");
        },
    );
}

/// A plain-WebSocket Socket.IO client (the TLS one in tests/common is bound to the
/// gateway); after `join` it runs as an echo agent that acks every event with
/// `{"echo": data}`.
struct Client {
    ws: WebSocketStream<TcpStream>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        tokio::time::timeout(Duration::from_secs(10), Self::connect_now(addr))
            .await
            .expect("Socket.IO connect hung")
    }

    async fn connect_now(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
        let (ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        let mut client = Client { ws };
        let open = client.next_text().await.expect("open packet");
        assert!(open.starts_with('0'), "{open}");
        client.ws.send(Message::text("40")).await.unwrap();
        let connected = client.next_text().await.expect("connect answer");
        assert!(connected.starts_with("40"), "{connected}");
        client
    }

    /// Joins `room` on its server and starts answering events in the background.
    async fn join_and_echo(self, room: &str) -> tokio::task::JoinHandle<()> {
        tokio::time::timeout(Duration::from_secs(10), self.join_now(room))
            .await
            .expect("join hung")
    }

    /// Sends `join` until it is acknowledged: socketioxide 0.18 sends CONNECT before it
    /// runs the connect handler, so an event sent right after CONNECT can arrive before
    /// `on("join")` is registered and be dropped (seen on a loaded machine).
    async fn join_now(mut self, room: &str) -> tokio::task::JoinHandle<()> {
        let mut ack_id = 0;
        'joined: loop {
            ack_id += 1;
            let packet = format!("42{ack_id}{}", json!(["join", room]));
            self.ws.send(Message::text(packet)).await.unwrap();
            let want = format!("43{ack_id}");
            let retry = tokio::time::sleep(Duration::from_millis(300));
            tokio::pin!(retry);
            loop {
                tokio::select! {
                    msg = self.next_text() => {
                        let msg = msg.expect("join ack");
                        if let Some(rest) = msg.strip_prefix(&want) {
                            assert_eq!(rest, r#"["joined"]"#);
                            break 'joined;
                        }
                    }
                    _ = &mut retry => continue 'joined,
                }
            }
        }
        tokio::spawn(async move {
            while let Some(msg) = self.next_text().await {
                let Some(rest) = msg.strip_prefix("42") else {
                    continue;
                };
                let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                let event: Value = serde_json::from_str(&rest[digits.len()..]).unwrap();
                let reply = json!([{"echo": event[1]}]);
                let packet = format!("43{digits}{reply}");
                if self.ws.send(Message::text(packet)).await.is_err() {
                    return;
                }
            }
        })
    }

    async fn next_text(&mut self) -> Option<String> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Text(t)) if t.as_str() == "2" => {
                    let _ = self.ws.send(Message::text("3")).await;
                }
                Ok(Message::Text(t)) => return Some(t.to_string()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

fn standalone(redis: &RedisServer) -> Topology {
    Topology::Standalone(RedisUrl::parse(&redis.url()).unwrap())
}

fn assert_one_echo(got: &cluster::AckCollection<Value>, data: &Value) {
    assert!(got.complete, "stream did not end by itself: {got:?}");
    assert_eq!(got.answers.len(), 1, "{got:?}");
    let answer = got.answers[0].1.as_ref().expect("ack");
    assert_eq!(answer, &json!({"echo": data}));
}

fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    format!(
        "n={} p50={:?} p99={:?} max={:?}",
        samples.len(),
        at(0.50),
        at(0.99),
        samples[samples.len() - 1]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_with_ack_from_node_a_reaches_a_socket_on_node_b_and_returns() {
    let redis = RedisServer::start();
    let a = Node::start(&standalone(&redis)).await;
    let b = Node::start(&standalone(&redis)).await;
    let _agent = Client::connect(b.addr).await.join_and_echo("agent:1").await;

    let data = json!({"cmd": "restart"});
    let started = Instant::now();
    let got = a.emit("agent:1", data.clone()).await;
    println!("first cross-node emit_with_ack: {:?}", started.elapsed());
    assert_one_echo(&got, &data);
    // The same room from node B itself (same-node): it ends as well.
    let got = b.emit("agent:1", data.clone()).await;
    assert_one_echo(&got, &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_to_a_room_empty_on_every_node_ends_without_waiting_for_a_timeout() {
    let redis = RedisServer::start();
    let a = Node::start(&standalone(&redis)).await;
    let b = Node::start(&standalone(&redis)).await;
    let _elsewhere = Client::connect(b.addr).await.join_and_echo("agent:1").await;

    let mut took = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let got = a.emit("agent:nowhere", json!({})).await;
        took.push(started.elapsed());
        // `complete` means the stream ended by itself, well before ACK_TIMEOUT: the
        // stall would have run into the collector's deadline instead.
        assert!(got.is_empty_room(), "{got:?}");
    }
    println!("empty room, 2 nodes: {}", percentiles(took));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_and_same_node_emit_with_ack_latency() {
    const ROUNDS: usize = 500;
    let redis = RedisServer::start();
    let a = Node::start(&standalone(&redis)).await;
    let b = Node::start(&standalone(&redis)).await;
    let _agent = Client::connect(b.addr).await.join_and_echo("agent:1").await;

    for (name, node) in [("cross-node (A -> B)", &a), ("same-node (B -> B)", &b)] {
        let mut took = Vec::with_capacity(ROUNDS);
        for i in 0..ROUNDS {
            let data = json!({"i": i});
            let started = Instant::now();
            let got = node.emit("agent:1", data.clone()).await;
            took.push(started.elapsed());
            assert_one_echo(&got, &data);
        }
        println!("emit_with_ack {name}: {}", percentiles(took));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_emits_work_again_after_redis_is_killed_and_restarted() {
    let mut redis = RedisServer::start();
    let a = Node::start(&standalone(&redis)).await;
    let b = Node::start(&standalone(&redis)).await;
    let _agent = Client::connect(b.addr).await.join_and_echo("agent:1").await;
    assert_one_echo(&a.emit("agent:1", json!(0)).await, &json!(0));
    let (status_a, status_b) = (a.driver.status(), b.driver.status());
    let (mut back_a, mut back_b) = (status_a.reconnected(), status_b.reconnected());

    redis.kill();
    wait_until("both drivers notice the outage", || {
        !status_a.is_connected() && !status_b.is_connected()
    })
    .await;
    let during = cluster::emit_with_ack::<_, _, Value>(
        a.io.to("agent:1"),
        "command",
        &json!(1),
        Duration::from_millis(300),
    )
    .await;
    println!("emit during the outage: {:?}", during.map(|c| c.complete));

    redis.restart();
    let restarted = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), async {
        back_a.changed().await.unwrap();
        back_b.changed().await.unwrap();
    })
    .await
    .expect("both drivers report a reconnection");
    let reconnected = restarted.elapsed();
    // The first emit after the reconnection events must go through: they come after the
    // subscriptions are restored.
    let got = a.emit("agent:1", json!(2)).await;
    let recovered = restarted.elapsed();
    assert_one_echo(&got, &json!(2));
    assert_eq!(status_a.reconnects(), 1);
    assert_eq!(status_b.reconnects(), 1);
    assert!(status_a.errors() > 0);
    println!(
        "redis restart: both drivers reconnected {reconnected:?} after the restart, \
         first cross-node emit answered at {recovered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_emit_with_ack_over_a_three_shard_redis_cluster() {
    let redis = RedisCluster::start();
    let seeds = redis
        .urls()
        .iter()
        .map(|u| RedisUrl::parse(u).unwrap())
        .collect();
    let topology = Topology::Cluster(seeds);
    let a = Node::start(&topology).await;
    let b = Node::start(&topology).await;
    let _agent = Client::connect(b.addr).await.join_and_echo("agent:1").await;

    let mut took = Vec::new();
    for i in 0..200 {
        let data = json!({"i": i});
        let started = Instant::now();
        let got = a.emit("agent:1", data.clone()).await;
        took.push(started.elapsed());
        assert_one_echo(&got, &data);
    }
    println!(
        "emit_with_ack cross-node, redis cluster: {}",
        percentiles(took)
    );
    assert!(a.emit("agent:nowhere", json!({})).await.is_empty_room());
}

/// Waits for `cond`, polling; the deadline only bounds a failure.
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
