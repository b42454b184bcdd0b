//! Several agentgate nodes behind one L4 load balancer, sharing one Redis (DESIGN.md,
//! "Several nodes").
//!
//! - [`acme`]: one server certificate for the whole cluster over ACME: one node orders
//!   under a Redis lock, every node serves the certificate from Redis, and whichever node
//!   the CA reaches answers the TLS-ALPN-01 challenge.

pub mod acme;
