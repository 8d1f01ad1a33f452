//! The admission queue: at most `limit` requests in flight, the rest wait
//! in arrival order, each until its own deadline, in a queue of bounded
//! length.
//!
//! * [`Admission::acquire`] admits at once when there is room and nobody is
//!   waiting; otherwise the request joins the back of the queue (or is
//!   refused with [`Refusal::QueueFull`]) and waits until it is admitted or
//!   its deadline passes ([`Refusal::Timeout`]). A caller that gives up (its
//!   future is dropped, e.g. the client went away) leaves the queue.
//! * A [`Permit`] is one request in flight; dropping it frees the slot and
//!   admits the head of the queue.
//! * [`Admission::set_limit`] changes the limit at run time: raising it
//!   admits as many queued requests as now fit, in order, at once; lowering
//!   it never preempts, it only stops admitting until enough requests
//!   finish. [`Limit::At`]`(0)` holds every request (the activator's state
//!   while a workload has no ready replica).
//! * [`Admission::drain`] stops admitting new requests ([`Refusal::Draining`]);
//!   requests already queued keep their place. [`Admission::wait_empty`]
//!   resolves when nothing is in flight or queued.
//!   [`Admission::drain_queued`] also refuses the queued ones at once (a
//!   holder that stops).
//! * A [`QueueBudget`] shared by several admissions bounds their queues
//!   together (the activator's bound over all workloads).
//!
//! One mutex guards the state; it is held only to change counters and hand
//! a slot over (`oneshot::send`), never across an `.await`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

/// How many requests may be in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Limit {
    /// No limit: every request is admitted at once.
    #[default]
    Unlimited,
    /// At most this many; `At(0)` holds every request.
    At(u32),
}

impl Limit {
    /// `None` (no limit from the scaler) is [`Limit::Unlimited`].
    pub fn from_option(limit: Option<u32>) -> Self {
        limit.map_or(Limit::Unlimited, Limit::At)
    }

    /// The limit as a number, `None` when unlimited.
    pub fn as_option(self) -> Option<u32> {
        match self {
            Limit::Unlimited => None,
            Limit::At(n) => Some(n),
        }
    }

    fn has_room(self, in_flight: u32) -> bool {
        match self {
            Limit::Unlimited => true,
            Limit::At(n) => in_flight < n,
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Unlimited => f.write_str("unlimited"),
            Limit::At(n) => write!(f, "{n}"),
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The queue (or the shared budget) holds as many requests as allowed.
    #[error("the admission queue is full ({max_queue} requests waiting)")]
    QueueFull { max_queue: usize },
    /// The request's deadline passed while it waited.
    #[error("not admitted within {waited_ms} ms: the queue did not move fast enough")]
    Timeout { waited_ms: u64 },
    /// The admission is draining: no new requests.
    #[error("draining: this replica is not accepting new requests")]
    Draining,
}

impl Refusal {
    /// A short, bounded name for metric labels and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::QueueFull { .. } => "queue_full",
            Refusal::Timeout { .. } => "queue_timeout",
            Refusal::Draining => "draining",
        }
    }
}

/// What the admission holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    pub in_flight: u32,
    pub queued: usize,
    pub limit: Limit,
    pub draining: bool,
}

impl Load {
    /// Nothing in flight and nothing queued.
    pub fn is_empty(&self) -> bool {
        self.in_flight == 0 && self.queued == 0
    }
}

/// A bound on queued requests shared by several [`Admission`]s.
#[derive(Debug, Clone)]
pub struct QueueBudget {
    max: usize,
    used: Arc<AtomicUsize>,
}

impl QueueBudget {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            used: Arc::default(),
        }
    }

    /// Requests queued now, over all admissions sharing this budget.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u < self.max).then_some(u + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    admit: oneshot::Sender<()>,
}

#[derive(Debug)]
struct State {
    limit: Limit,
    in_flight: u32,
    queue: VecDeque<Waiter>,
    max_queue: usize,
    budget: Option<QueueBudget>,
    draining: bool,
    next_id: u64,
}

impl State {
    /// Admits queued requests, in order, while there is room.
    fn pump(&mut self) {
        while self.limit.has_room(self.in_flight) {
            let Some(w) = self.queue.pop_front() else {
                break;
            };
            if let Some(b) = &self.budget {
                b.give_back();
            }
            self.in_flight += 1;
            // The receiver lives as long as the waiter is queued (its
            // guard removes it before dropping the receiver); a closed one
            // gives the slot back.
            if w.admit.send(()).is_err() {
                self.in_flight -= 1;
            }
        }
    }

    fn remove(&mut self, id: u64) -> bool {
        match self.queue.iter().position(|w| w.id == id) {
            Some(pos) => {
                self.queue.remove(pos);
                if let Some(b) = &self.budget {
                    b.give_back();
                }
                true
            }
            None => false,
        }
    }

    fn is_empty(&self) -> bool {
        self.in_flight == 0 && self.queue.is_empty()
    }
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    empty: Notify,
}

/// The admission queue; see the module docs. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

impl Admission {
    /// An admission at `limit` whose queue holds at most `max_queue` requests.
    pub fn new(limit: Limit, max_queue: usize) -> Self {
        Self::with_budget(limit, max_queue, None)
    }

    /// As [`Admission::new`], also bounded by a budget shared with others.
    pub fn with_budget(limit: Limit, max_queue: usize, budget: Option<QueueBudget>) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    limit,
                    in_flight: 0,
                    queue: VecDeque::new(),
                    max_queue,
                    budget,
                    draining: false,
                    next_id: 0,
                }),
                empty: Notify::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Critical sections only move counters and queue entries; a panic
        // inside one cannot leave them inconsistent with each other.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify_if_empty(&self, s: &State) {
        if s.is_empty() {
            self.inner.empty.notify_waiters();
        }
    }

    /// Waits for a slot until `deadline`. See the module docs.
    pub async fn acquire(&self, deadline: Instant) -> Result<Permit, Refusal> {
        let arrived = Instant::now();
        let (id, admit) = {
            let mut s = self.lock();
            if s.draining {
                return Err(Refusal::Draining);
            }
            if s.queue.is_empty() && s.limit.has_room(s.in_flight) {
                s.in_flight += 1;
                return Ok(self.permit(Duration::ZERO));
            }
            let budget_ok = s.budget.as_ref().is_none_or(QueueBudget::try_take);
            if s.queue.len() >= s.max_queue || !budget_ok {
                if budget_ok && let Some(b) = &s.budget {
                    b.give_back();
                }
                let max_queue = match &s.budget {
                    Some(b) if !budget_ok => b.max,
                    _ => s.max_queue,
                };
                return Err(Refusal::QueueFull { max_queue });
            }
            let id = s.next_id;
            s.next_id += 1;
            let (tx, rx) = oneshot::channel();
            s.queue.push_back(Waiter { id, admit: tx });
            (id, rx)
        };
        let mut waiting = Waiting {
            admission: self,
            id,
            admit,
            settled: false,
        };
        let outcome = tokio::time::timeout_at(deadline, &mut waiting.admit).await;
        waiting.settled = true;
        match outcome {
            Ok(Ok(())) => Ok(self.permit(arrived.elapsed())),
            // A queue entry removed without a slot (`drain_queued`).
            Ok(Err(_)) => Err(Refusal::Draining),
            Err(_) => {
                let mut s = self.lock();
                if s.remove(id) {
                    self.notify_if_empty(&s);
                    return Err(Refusal::Timeout {
                        waited_ms: arrived.elapsed().as_millis() as u64,
                    });
                }
                drop(s);
                // Admitted between the deadline and the lock: the slot is ours.
                match waiting.admit.try_recv() {
                    Ok(()) => Ok(self.permit(arrived.elapsed())),
                    Err(_) => Err(Refusal::Timeout {
                        waited_ms: arrived.elapsed().as_millis() as u64,
                    }),
                }
            }
        }
    }

    fn permit(&self, queued_for: Duration) -> Permit {
        Permit {
            admission: self.clone(),
            queued_for,
        }
    }

    fn release(&self) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        s.pump();
        self.notify_if_empty(&s);
    }

    /// Changes the limit; raising it admits queued requests at once.
    pub fn set_limit(&self, limit: Limit) {
        let mut s = self.lock();
        s.limit = limit;
        s.pump();
    }

    /// Stops admitting new requests (queued ones keep their place).
    pub fn drain(&self) {
        self.lock().draining = true;
    }

    /// Stops admitting new requests and refuses every queued one
    /// ([`Refusal::Draining`]) at once: a holder that stops and will not
    /// admit them. What is in flight is not touched.
    pub fn drain_queued(&self) {
        let mut s = self.lock();
        s.draining = true;
        while let Some(w) = s.queue.pop_front() {
            if let Some(b) = &s.budget {
                b.give_back();
            }
            // Dropping the sender refuses the waiter.
            drop(w);
        }
        self.notify_if_empty(&s);
    }

    /// Admits new requests again.
    pub fn resume(&self) {
        self.lock().draining = false;
    }

    pub fn is_draining(&self) -> bool {
        self.lock().draining
    }

    /// What is in flight and queued now, the limit and the drain flag.
    pub fn load(&self) -> Load {
        let s = self.lock();
        Load {
            in_flight: s.in_flight,
            queued: s.queue.len(),
            limit: s.limit,
            draining: s.draining,
        }
    }

    /// Resolves when nothing is in flight or queued.
    pub async fn wait_empty(&self) {
        loop {
            let notified = self.inner.empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// One request in flight; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    admission: Admission,
    queued_for: Duration,
}

impl Permit {
    /// How long the request waited in the queue (zero when admitted at once).
    pub fn queued_for(&self) -> Duration {
        self.queued_for
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release();
    }
}

/// A queued request; dropped before it settles (the caller gave up), it
/// leaves the queue, or frees the slot it was just given.
struct Waiting<'a> {
    admission: &'a Admission,
    id: u64,
    admit: oneshot::Receiver<()>,
    settled: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut s = self.admission.lock();
        if !s.remove(self.id) && self.admit.try_recv().is_ok() {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.pump();
        }
        self.admission.notify_if_empty(&s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test(start_paused = true)]
    async fn admits_up_to_the_limit_then_queues_in_arrival_order() {
        let a = Admission::new(Limit::At(2), 10);
        let p1 = a.acquire(far()).await.unwrap();
        let _p2 = a.acquire(far()).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..3 {
            let a = a.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let p = a.acquire(far()).await.unwrap();
                tx.send(i).unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
                drop(p);
            });
            // Arrive in order.
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        assert_eq!(a.load().queued, 3);
        assert!(rx.try_recv().is_err(), "nothing admitted past the limit");
        drop(p1);
        assert_eq!(rx.recv().await, Some(0));
        assert!(rx.try_recv().is_err());
        assert_eq!(a.load().in_flight, 2);
        // The first queued one finishes after 1 s and admits the next.
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn raising_the_limit_admits_the_queue_at_once_in_order() {
        let a = Admission::new(Limit::At(1), 10);
        let _p = a.acquire(far()).await.unwrap();
        let mut waiting = Vec::new();
        for _ in 0..4 {
            let a2 = a.clone();
            waiting.push(tokio::spawn(async move { a2.acquire(far()).await }));
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        assert_eq!(a.load().queued, 4);
        a.set_limit(Limit::At(3));
        let load = a.load();
        assert_eq!(
            (load.in_flight, load.queued),
            (3, 2),
            "two admitted at once"
        );
        a.set_limit(Limit::Unlimited);
        assert_eq!(a.load().queued, 0);
        for w in waiting {
            assert!(w.await.unwrap().is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lowering_the_limit_does_not_preempt() {
        let a = Admission::new(Limit::At(3), 10);
        let p: Vec<_> = futures_lite_join(&a, 3).await;
        a.set_limit(Limit::At(1));
        assert_eq!(a.load().in_flight, 3);
        let a2 = a.clone();
        let next = tokio::spawn(async move { a2.acquire(far()).await.map(|_| ()) });
        tokio::task::yield_now().await;
        drop(p);
        // 3 → 0 in flight; the queued one fits under 1.
        assert!(next.await.unwrap().is_ok());
    }

    async fn futures_lite_join(a: &Admission, n: usize) -> Vec<Permit> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(a.acquire(far()).await.unwrap());
        }
        v
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_and_a_deadline_times_out() {
        let a = Admission::new(Limit::At(0), 2);
        let t = Instant::now();
        let a1 = a.clone();
        let first = tokio::spawn(async move { a1.acquire(t + Duration::from_secs(5)).await });
        let a2 = a.clone();
        let second = tokio::spawn(async move { a2.acquire(t + Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        assert_eq!(
            a.acquire(far()).await.unwrap_err(),
            Refusal::QueueFull { max_queue: 2 }
        );
        let r = first.await.unwrap().unwrap_err();
        assert_eq!(r, Refusal::Timeout { waited_ms: 5000 });
        assert_eq!(Instant::now() - t, Duration::from_secs(5));
        assert_eq!(a.load().queued, 1, "the timed-out request left the queue");
        a.set_limit(Limit::At(1));
        assert!(second.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_leaves_the_queue() {
        let a = Admission::new(Limit::At(1), 10);
        let p = a.acquire(far()).await.unwrap();
        let a1 = a.clone();
        let gone = tokio::spawn(async move { a1.acquire(far()).await });
        tokio::task::yield_now().await;
        assert_eq!(a.load().queued, 1);
        gone.abort();
        let _ = gone.await;
        assert_eq!(a.load().queued, 0);
        drop(p);
        assert!(a.load().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_queued_refuses_the_queued_requests_at_once_and_keeps_what_is_in_flight() {
        let budget = QueueBudget::new(10);
        let a = Admission::with_budget(Limit::At(1), 10, Some(budget.clone()));
        let p = a.acquire(far()).await.unwrap();
        let queued: Vec<_> = (0..3)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move { a.acquire(far()).await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(a.load().queued, 3);
        assert_eq!(budget.used(), 3);
        a.drain_queued();
        for q in queued {
            assert_eq!(q.await.unwrap().unwrap_err(), Refusal::Draining);
        }
        let load = a.load();
        assert_eq!((load.in_flight, load.queued, load.draining), (1, 0, true));
        assert_eq!(budget.used(), 0);
        assert_eq!(a.acquire(far()).await.unwrap_err(), Refusal::Draining);
        drop(p);
        assert!(a.load().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_refuses_new_requests_serves_queued_ones_and_reports_empty() {
        let a = Admission::new(Limit::At(1), 10);
        let p = a.acquire(far()).await.unwrap();
        let a1 = a.clone();
        let queued = tokio::spawn(async move {
            let p = a1.acquire(far()).await.unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(p);
        });
        tokio::task::yield_now().await;
        a.drain();
        assert_eq!(a.acquire(far()).await.unwrap_err(), Refusal::Draining);
        let a2 = a.clone();
        let empty = tokio::spawn(async move {
            a2.wait_empty().await;
            Instant::now()
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!empty.is_finished());
        let t = Instant::now();
        drop(p);
        queued.await.unwrap();
        assert_eq!(empty.await.unwrap() - t, Duration::from_secs(2));
        a.resume();
        assert!(a.acquire(far()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_budget_bounds_queues_together() {
        let budget = QueueBudget::new(2);
        let a = Admission::with_budget(Limit::At(0), 10, Some(budget.clone()));
        let b = Admission::with_budget(Limit::At(0), 10, Some(budget.clone()));
        let (a1, b1) = (a.clone(), b.clone());
        let ta = tokio::spawn(async move { a1.acquire(far()).await.map(|_| ()) });
        let tb = tokio::spawn(async move { b1.acquire(far()).await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert_eq!(budget.used(), 2);
        assert_eq!(
            a.acquire(far()).await.unwrap_err(),
            Refusal::QueueFull { max_queue: 2 }
        );
        a.set_limit(Limit::Unlimited);
        b.set_limit(Limit::Unlimited);
        assert!(ta.await.unwrap().is_ok() && tb.await.unwrap().is_ok());
        assert_eq!(budget.used(), 0);
    }
}
