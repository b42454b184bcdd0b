//! The fleet console at `/ui/`: a browser page, embedded in the binary, that shows the
//! fleet live and acts on it with the rights of the API key it was signed in with.
//!
//! # Layout
//! - `assets`: the embedded files of `ui/` (Preact and htm vendored, no build step);
//! - `session`: sign-in sessions (cookie, CSRF token; in Redis with `[cluster]`);
//! - `feed`: the live table of agents and its counters, pushed over Server-Sent Events;
//! - `routes`: `/ui/...` and the console's JSON endpoints under `/ui/api/`, which run the
//!   API's own handlers behind a session check instead of the Bearer check, with the same
//!   per-endpoint scopes.
//!
//! Every response under `/ui` carries a strict Content-Security-Policy ([`CSP`]): scripts,
//! styles and connections from the gateway itself only, no inline script or style, no
//! framing.

mod assets;
mod feed;
mod routes;
mod session;

use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::clock::Clock;
use crate::config::ConsoleConfig;
use crate::store::CertStore;
pub(crate) use routes::router;

/// The Content-Security-Policy of every response under `/ui`.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The console's state: its sessions and its live feed; cheap to clone.
#[derive(Clone)]
pub(crate) struct Console {
    sessions: session::Sessions,
    feed: feed::Feed,
}

impl Console {
    /// Sessions in the shared store's Redis when the store is shared (`[cluster]`), in
    /// memory otherwise.
    pub fn new(config: ConsoleConfig, clock: Clock, store: &CertStore) -> Self {
        Self {
            sessions: session::Sessions::new(config, clock, store.redis_driver()),
            feed: feed::Feed::new(),
        }
    }

    /// Starts the live feed; it stops, and closes every open event stream, at `shutdown`.
    pub fn spawn(&self, app: AppState, shutdown: CancellationToken) {
        self.feed.spawn(app, shutdown);
    }
}
