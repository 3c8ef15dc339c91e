//! Where linearizable reads wait for their read index, without a trip through the
//! driver thread per read.
//!
//! A read takes a ticket (tickets count up from 1) and waits. The driver, once per
//! pass over its inputs, asks raft for one read index covering every ticket taken
//! so far. When this member has applied up to that index, every read holding a
//! covered ticket may be served from the applied state: any write acknowledged
//! before such a read arrived was committed before its ticket was taken, so before
//! the read index was chosen, so at or below it. The read itself then runs on the
//! request's thread, from the same shared state serializable reads use
//! (`DECISIONS.md` §17).
//!
//! The driver is woken only when a read arrives while it does not already know of
//! waiting tickets, so a batch of reads costs it one input instead of one each.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::driver::Input;
use crate::status::RequestError;

#[derive(Default)]
pub struct ReadGate {
    state: Mutex<GateState>,
    /// The leader this member knows of (0: none), for the error of a read that
    /// times out.
    leader: AtomicU64,
}

#[derive(Default)]
struct GateState {
    /// The last ticket taken.
    issued: u64,
    /// Whether the driver will look at the tickets without being woken: it has
    /// been sent [`Input::ReadsWaiting`], or has not yet looked since a ticket
    /// was taken while it knew.
    driver_knows: bool,
    /// Reads waiting, in ticket order.
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl ReadGate {
    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until a read arriving now may be served from this member's applied
    /// state, at most until `deadline`.
    pub async fn wait(&self, driver: &mpsc::Sender<Input>, deadline: Instant) -> Result<(), RequestError> {
        let (sender, released) = oneshot::channel();
        let wake_driver = {
            let mut state = self.state();
            state.issued += 1;
            let ticket = state.issued;
            state.waiting.push_back((ticket, sender));
            !std::mem::replace(&mut state.driver_knows, true)
        };
        if wake_driver {
            match driver.try_send(Input::ReadsWaiting) {
                // A full queue: the driver has inputs to take, and looks at the
                // tickets after taking them.
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(RequestError::Stopped),
            }
        }
        match tokio::time::timeout_at(deadline.into(), released).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(RequestError::Stopped),
            Err(_) if self.leader() == raft::INVALID_ID => Err(RequestError::NoLeader),
            Err(_) => Err(RequestError::Timeout),
        }
    }

    /// Driver side: the last ticket taken. Reads that take a ticket after this
    /// call wake the driver again.
    pub fn tickets_taken(&self) -> u64 {
        let mut state = self.state();
        state.driver_knows = false;
        state.issued
    }

    /// Driver side: lets every read with a ticket up to `through` go on.
    pub fn release(&self, through: u64) {
        let released: Vec<_> = {
            let mut state = self.state();
            let count = state.waiting.partition_point(|(ticket, _)| *ticket <= through);
            state.waiting.drain(..count).collect()
        };
        for (_, sender) in released {
            let _ = sender.send(());
        }
    }

    /// Driver side: forgets reads whose callers gave up; returns whether any
    /// read still waits.
    pub fn any_waiting(&self) -> bool {
        let mut state = self.state();
        state.waiting.retain(|(_, sender)| !sender.is_closed());
        !state.waiting.is_empty()
    }

    pub fn set_leader(&self, leader: u64) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    pub fn leader(&self) -> u64 {
        self.leader.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_read_waits_for_a_release_covering_its_ticket_and_wakes_the_driver_once() {
        let gate = std::sync::Arc::new(ReadGate::default());
        let (driver, mut inputs) = mpsc::channel(8);
        let deadline = Instant::now() + Duration::from_secs(5);
        let first = tokio::spawn({
            let (gate, driver) = (gate.clone(), driver.clone());
            async move { gate.wait(&driver, deadline).await }
        });
        while gate.state().issued < 1 {
            tokio::task::yield_now().await;
        }
        let second = tokio::spawn({
            let (gate, driver) = (gate.clone(), driver.clone());
            async move { gate.wait(&driver, deadline).await }
        });
        while gate.state().issued < 2 {
            tokio::task::yield_now().await;
        }
        // One wake-up for both reads.
        assert!(matches!(inputs.try_recv(), Ok(Input::ReadsWaiting)));
        assert!(inputs.try_recv().is_err());
        assert_eq!(gate.tickets_taken(), 2);
        gate.release(1);
        assert!(first.await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!second.is_finished(), "ticket 2 is not covered by a release through 1");
        // The driver has looked: the next read wakes it again.
        let third = tokio::spawn({
            let (gate, driver) = (gate.clone(), driver.clone());
            async move { gate.wait(&driver, deadline).await }
        });
        while gate.state().issued < 3 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(inputs.try_recv(), Ok(Input::ReadsWaiting)));
        gate.release(3);
        assert!(second.await.unwrap().is_ok());
        assert!(third.await.unwrap().is_ok());
        assert!(!gate.any_waiting());
    }

    #[tokio::test]
    async fn a_read_never_released_times_out_with_no_leader_or_timeout() {
        let gate = ReadGate::default();
        let (driver, _inputs) = mpsc::channel(8);
        let soon = Instant::now() + Duration::from_millis(30);
        assert!(matches!(gate.wait(&driver, soon).await, Err(RequestError::NoLeader)));
        gate.set_leader(7);
        let soon = Instant::now() + Duration::from_millis(30);
        assert!(matches!(gate.wait(&driver, soon).await, Err(RequestError::Timeout)));
        assert!(!gate.any_waiting(), "reads that gave up are forgotten");
    }
}
