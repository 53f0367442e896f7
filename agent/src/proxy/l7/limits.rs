//! DestinationRule `connectionPool` limits, per calling workload and
//! destination, as circuit breakers: past a limit a request fails at once
//! with 503 instead of joining a queue that grows without bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::balance::ClusterKey;
use crate::routing::ConnectionPool;

/// The limits of one (workload, destination) pair.
pub struct Limits {
    settings: ConnectionPool,
    /// `http2MaxRequests`: requests in flight, whatever the protocol.
    requests: Option<Arc<Semaphore>>,
    /// `tcp.maxConnections`: an HTTP/1.1 request holds a connection for its
    /// whole exchange, so this bounds HTTP/1.1 requests in flight.
    connections: Option<Arc<Semaphore>>,
    /// Requests waiting for a connection, bounded by `http1MaxPendingRequests`.
    pending: AtomicU32,
}

/// Held until the response has been read; dropping it frees the slots.
pub struct Admitted {
    _request: Option<OwnedSemaphorePermit>,
    _connection: Option<OwnedSemaphorePermit>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

fn semaphore(limit: Option<u32>) -> Option<Arc<Semaphore>> {
    limit.map(|n| Arc::new(Semaphore::new(n as usize)))
}

impl Limits {
    fn new(settings: &ConnectionPool) -> Limits {
        Limits {
            settings: settings.clone(),
            requests: semaphore(settings.http2_max_requests),
            connections: semaphore(settings.max_connections),
            pending: AtomicU32::new(0),
        }
    }

    pub async fn admit(&self, http1: bool) -> Result<Admitted, Overflow> {
        let request = match &self.requests {
            Some(s) => Some(s.clone().try_acquire_owned().map_err(|_| Overflow)?),
            None => None,
        };
        let connection = match (&self.connections, http1) {
            (Some(s), true) => Some(match s.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => self.wait_for_connection(s.clone()).await?,
            }),
            _ => None,
        };
        Ok(Admitted {
            _request: request,
            _connection: connection,
        })
    }

    async fn wait_for_connection(
        &self,
        connections: Arc<Semaphore>,
    ) -> Result<OwnedSemaphorePermit, Overflow> {
        let max_pending = self.settings.http1_max_pending_requests.unwrap_or(u32::MAX);
        let queued = self.pending.fetch_add(1, Ordering::AcqRel);
        let _leave = Leave(&self.pending);
        if queued >= max_pending {
            return Err(Overflow);
        }
        connections.acquire_owned().await.map_err(|_| Overflow)
    }
}

struct Leave<'a>(&'a AtomicU32);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The limits of one calling workload, per destination.
#[derive(Default)]
pub struct WorkloadLimits(Mutex<HashMap<ClusterKey, Arc<Limits>>>);

impl WorkloadLimits {
    /// The limits for `key` under `settings`; changed settings start afresh.
    pub fn get(&self, key: &ClusterKey, settings: &ConnectionPool) -> Arc<Limits> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match all.get(key) {
            Some(l) if l.settings == *settings => l.clone(),
            _ => {
                let limits = Arc::new(Limits::new(settings));
                all.insert(key.clone(), limits.clone());
                limits
            }
        }
    }
}

/// Requests in flight of one workload over all its connections, so that a
/// tenant holding many streams open (an HTTP/2 window kept at zero, say)
/// bounds its own cost instead of the node's memory; and of one HTTP/2
/// connection, so that closing it idle can tell whether it cut a request.
#[derive(Default, Clone)]
pub struct InFlight(Arc<AtomicU32>);

/// One admitted request; leaving frees its place.
pub struct InFlightRequest(Arc<AtomicU32>);

impl InFlight {
    pub fn try_enter(&self, max: u32) -> Option<InFlightRequest> {
        let entered = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then(|| n + 1)
            })
            .is_ok();
        entered.then(|| InFlightRequest(self.0.clone()))
    }

    /// Counted without a limit (a connection's own requests).
    pub fn enter(&self) -> InFlightRequest {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightRequest(self.0.clone())
    }

    pub fn count(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Drop for InFlightRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_is_immediate_past_pending_limit() {
        let limits = Limits::new(&ConnectionPool {
            max_connections: Some(1),
            http1_max_pending_requests: Some(1),
            ..ConnectionPool::default()
        });
        let first = limits.admit(true).await.unwrap();
        let limits = Arc::new(limits);
        let waiting = tokio::spawn({
            let limits = limits.clone();
            async move { limits.admit(true).await.is_ok() }
        });
        tokio::task::yield_now().await;
        // One waits for the connection; the next one overflows at once.
        assert_eq!(limits.admit(true).await.err(), Some(Overflow));
        drop(first);
        assert!(waiting.await.unwrap());
    }

    #[test]
    fn in_flight_requests_are_bounded_and_released() {
        let in_flight = InFlight::default();
        let first = in_flight.try_enter(2).unwrap();
        let _second = in_flight.try_enter(2).unwrap();
        assert!(in_flight.try_enter(2).is_none());
        drop(first);
        let _third = in_flight.try_enter(2).expect("a place was freed");
        assert_eq!(in_flight.count(), 2);
        assert!(in_flight.try_enter(2).is_none());
    }

    #[tokio::test]
    async fn max_requests_bounds_requests_in_flight() {
        let limits = Limits::new(&ConnectionPool {
            http2_max_requests: Some(1),
            ..ConnectionPool::default()
        });
        let first = limits.admit(false).await.unwrap();
        assert_eq!(limits.admit(false).await.err(), Some(Overflow));
        drop(first);
        assert!(limits.admit(false).await.is_ok());
    }
}
