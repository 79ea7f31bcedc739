//! [`AppendGate`]: admission of appends to a partition group, which a leadership transfer or a
//! voter change closes so that the log stops growing while a replica catches up.

use std::sync::Arc;

/// Admission of appends to a partition group, without any await between the check and the
/// proposal: while the gate is open a batch reaches Raft on the first poll of
/// [`crate::PartitionGroup::enqueue`], and batches enter the log in the order their enqueue calls
/// return. Callers that finish the enqueue of one request before starting the next therefore
/// keep their requests in order by construction, whatever the runtime's scheduling does.
#[derive(Default)]
pub(crate) struct AppendGate {
    state: std::sync::Mutex<GateState>,
    /// Signalled when a transfer reopens the gate.
    pub(crate) reopened: tokio::sync::Notify,
}

#[derive(Default)]
struct GateState {
    closed: bool,
    /// Admitted appends that have not finished (committed, failed or given up).
    in_flight: usize,
}

/// Counts one admitted append until it is dropped; owned, so that it can travel with the
/// append's [`super::append::Committed`].
pub(crate) struct InFlight(Arc<AppendGate>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        st.in_flight = st.in_flight.saturating_sub(1);
    }
}

/// Keeps the gate closed until dropped.
pub(crate) struct Closed<'a>(&'a AppendGate);

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.0
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed = false;
        self.0.reopened.notify_waiters();
    }
}

impl AppendGate {
    /// Runs `submit` and counts the append in flight if the gate is open; `None` if it is closed.
    pub(crate) fn admit<T>(self: &Arc<Self>, submit: impl FnOnce() -> T) -> Option<(InFlight, T)> {
        // Poisoning cannot leave the two plain fields inconsistent, so it is ignored.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.closed {
            return None;
        }
        st.in_flight += 1;
        let out = submit();
        Some((InFlight(self.clone()), out))
    }

    pub(crate) fn close(&self) -> Closed<'_> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        Closed(self)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .in_flight
    }
}

/// Polls `fut` once; its output if that was enough.
pub(crate) fn poll_once<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}
