//! [`AppendGate`]: admission of appends to a partition group, which a leadership transfer or a
//! voter change closes so that the log stops growing while a replica catches up.

/// Admission of appends to a partition group, without any await between the check and the
/// proposal: a caller's batch reaches Raft on the caller's first poll, so the batches of one
/// connection's pipelined requests enter the log in arrival order whatever the runtime's
/// cooperative budget or task scheduling does.
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

/// Counts one admitted append until it is dropped.
pub(crate) struct InFlight<'a>(&'a AppendGate);

impl Drop for InFlight<'_> {
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
    pub(crate) fn admit<T>(&self, submit: impl FnOnce() -> T) -> Option<(InFlight<'_>, T)> {
        // Poisoning cannot leave the two plain fields inconsistent, so it is ignored.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.closed {
            return None;
        }
        st.in_flight += 1;
        let out = submit();
        Some((InFlight(self), out))
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
