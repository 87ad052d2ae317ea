//! Serving TCP so that clients without a token cannot exhaust the daemon.
//!
//! Each connection counts as unauthenticated until one of its requests passes the token check
//! ([`authenticated`] runs behind it). At most [`TcpLimits::max_unauthenticated`] such
//! connections are served at once; beyond that a new one is closed as soon as it is accepted,
//! before it costs more than the accept. Every connection must send its request headers
//! within [`TcpLimits::header_timeout`], also while idle between requests, so a half-open or
//! silent connection is closed instead of holding a file descriptor forever. The Unix socket
//! is served by its own listener and task, untouched by any of this.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{extract::Request, middleware::Next, response::Response, Router};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tower::Service;

/// Bounds on what TCP clients may hold.
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    /// Most connections served at once that have not yet presented a valid token.
    pub max_unauthenticated: usize,
    /// How long a connection may take to send a request's headers, and may sit idle between
    /// requests.
    pub header_timeout: Duration,
}

/// How long accepting pauses after it failed (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A connection's place among the unauthenticated ones, given up once it authenticates.
#[derive(Clone)]
struct Unauthenticated(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

/// Serves `app` on `listener` within `limits`; returns only if accepting is impossible.
pub async fn serve_tcp(listener: TcpListener, app: Router, limits: TcpLimits) {
    let places = Arc::new(Semaphore::new(limits.max_unauthenticated));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a TCP connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        match places.clone().try_acquire_owned() {
            Ok(place) => {
                tokio::spawn(serve_connection(
                    stream,
                    app.clone(),
                    place,
                    limits.header_timeout,
                ));
            }
            // Dropping the stream closes it.
            Err(_) => tracing::debug!("unauthenticated TCP connections at their cap: one closed"),
        }
    }
}

/// Serves one connection (HTTP/1.1 with upgrades, for the WebSocket exec).
async fn serve_connection(
    stream: TcpStream,
    app: Router,
    place: OwnedSemaphorePermit,
    header_timeout: Duration,
) {
    let pending = Unauthenticated(Arc::new(Mutex::new(Some(place))));
    let service = tower::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(pending.clone());
        app.clone().call(req)
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "TCP connection ended");
    }
}

/// Middleware behind the token check: the request's connection presented a valid token, so it
/// no longer counts against the unauthenticated cap.
pub async fn authenticated(req: Request, next: Next) -> Response {
    if let Some(Unauthenticated(place)) = req.extensions().get::<Unauthenticated>() {
        place.lock().expect("place lock").take();
    }
    next.run(req).await
}

/// Raises this process's file descriptor limit to its hard limit, so that many sandboxes and
/// clients fit before `accept` fails.
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the file descriptor limit");
        }
    }
}
