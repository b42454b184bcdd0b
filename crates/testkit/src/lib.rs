//! Clients that talk to agentgate from outside, shared by its integration tests and by
//! `agentgate-bench`: they speak the wire protocols as agents and the SaaS backend do and
//! do not depend on the gateway crate.
//!
//! # Layout
//!
//! - [`sio`]: Engine.IO v4 / Socket.IO v5: the frames, the namespace connect over a
//!   WebSocket ([`sio::open`], lean enough for a simulated fleet), a test client over
//!   WebSocket ([`sio::SioWs`]) and long-polling by hand ([`sio::Polling`]).
//! - [`http`]: an HTTP/1.1 client connection over any stream (hyper's client).
//! - [`pki`]: the test PKI made with rcgen at run time (a CA, a server certificate, agent
//!   certificates good and bad) and the `openssl req -x509` recipe of agent installers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test and bench tooling: a failure should stop loudly
#![forbid(unsafe_code)]

pub mod http;
pub mod pki;
pub mod sio;
