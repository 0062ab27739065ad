//! A subscription's events count against the process's memory budget as soon as they arrive,
//! before the SDK buffers and decodes them.
//!
//! The response body of SubscribeToShard is read through [`MeteredBody`]: it follows the
//! event-stream framing (each message starts with its total length and its headers), and when a
//! `SubscribeToShardEvent` message begins it waits for budget for what decoding that message
//! costs, before it lets the message's bytes through to the SDK. While it waits, nothing more is
//! read from the connection: HTTP/2 and Enhanced Fan-Out flow control hold the rest at the
//! sender. The reader takes each event's reservation from the [`EventMeter`] and keeps only what
//! the decoded records need.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use aws_sdk_kinesis::config::interceptors::BeforeDeserializationInterceptorContextMut;
use aws_sdk_kinesis::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::memory::MemoryBudget;

/// Prelude of an event-stream message: total length, headers length, prelude CRC.
const PRELUDE: usize = 12;
/// The event-stream format caps a message's headers at 128 KiB.
const MAX_HEADERS: usize = 128 << 10;
/// Decoding a message of W bytes holds, at its peak, the received pieces of it (W), the SDK's
/// contiguous copy (W) and the decoded records (at most about W: base64 shrinks the data more
/// than the records' own fields add).
const DECODE_COST: usize = 3;
/// The only message type whose decoding costs anything worth counting.
const EVENT_TYPE: &[u8] = b"SubscribeToShardEvent";

/// Called with `true` when an event starts waiting for budget and `false` when it got it.
pub type OnWait = Arc<dyn Fn(bool) + Send + Sync>;

/// The reservations of one subscription's events, oldest first.
#[derive(Clone)]
pub struct EventMeter {
    budget: MemoryBudget,
    reserved: Arc<Mutex<VecDeque<OwnedSemaphorePermit>>>,
    /// Whether an event waits for budget now, and when the last wait ended: a subscription
    /// held back by the meter is not silent (no idle resubscribe, no stale readiness).
    waits: Arc<Mutex<Waits>>,
    on_wait: Option<OnWait>,
}

#[derive(Debug, Default)]
struct Waits {
    waiting: bool,
    ended: Option<Instant>,
}

impl std::fmt::Debug for EventMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventMeter").field("budget", &self.budget).field("waits", &self.waits).finish_non_exhaustive()
    }
}

impl EventMeter {
    pub fn new(budget: MemoryBudget) -> Self {
        EventMeter { budget, reserved: Arc::default(), waits: Arc::default(), on_wait: None }
    }

    /// Tells `on_wait` when an event starts and stops waiting for budget.
    pub fn on_wait(mut self, on_wait: OnWait) -> Self {
        self.on_wait = Some(on_wait);
        self
    }

    fn waits(&self) -> std::sync::MutexGuard<'_, Waits> {
        self.waits.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_waiting(&self, waiting: bool) {
        let mut waits = self.waits();
        if waits.waiting == waiting {
            return;
        }
        waits.waiting = waiting;
        if !waiting {
            waits.ended = Some(Instant::now());
        }
        drop(waits);
        if let Some(on_wait) = &self.on_wait {
            on_wait(waiting);
        }
    }

    /// When a subscription that delivered nothing may be judged idle, as far as the meter is
    /// concerned: `within` after the meter last held it back (from now while it holds it back),
    /// `None` when it never did.
    fn idle_deadline(&self, within: Duration) -> Option<Instant> {
        let waits = self.waits();
        if waits.waiting { Some(Instant::now() + within) } else { waits.ended.map(|ended| ended + within) }
    }

    /// What `next` gives, or `None` once the subscription was silent for `idle` by no doing of
    /// the service's own: time an event spent waiting here for budget is not silence.
    pub async fn unless_idle<T>(&self, next: impl Future<Output = T>, idle: Duration) -> Option<T> {
        tokio::pin!(next);
        let mut deadline = Instant::now() + idle;
        loop {
            tokio::select! {
                out = &mut next => return Some(out),
                _ = tokio::time::sleep_until(deadline) => match self.idle_deadline(idle) {
                    Some(later) if later > Instant::now() => deadline = later,
                    _ => return None,
                },
            }
        }
    }

    /// The reservation of the oldest event not yet taken: the one the SDK just handed over.
    pub fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.reserved.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }

    /// The SDK interceptor that reads this subscription's body through the meter.
    pub fn interceptor(&self) -> MeterEvents {
        MeterEvents(self.clone())
    }
}

/// Puts a [`MeteredBody`] under a successful SubscribeToShard response.
#[derive(Debug)]
pub struct MeterEvents(EventMeter);

impl Intercept for MeterEvents {
    fn name(&self) -> &'static str {
        "MeterEvents"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_kinesis::error::BoxError> {
        let response = context.response_mut();
        if response.status().is_success() {
            let body = std::mem::replace(response.body_mut(), SdkBody::taken());
            *response.body_mut() = SdkBody::from_body_1_x(MeteredBody::new(body, self.0.clone()));
        }
        Ok(())
    }
}

type Reserving = Pin<Box<dyn Future<Output = OwnedSemaphorePermit> + Send>>;

/// A response body that lets each event through to the SDK only once it is paid for.
pub struct MeteredBody {
    inner: SdkBody,
    meter: EventMeter,
    framing: Framing,
    /// Received and not yet assembled.
    incoming: Bytes,
    /// The reservation being waited for (in a mutex only so that the body is `Sync`).
    reserving: Option<Mutex<Reserving>>,
}

impl MeteredBody {
    fn new(inner: SdkBody, meter: EventMeter) -> Self {
        MeteredBody { inner, meter, framing: Framing::default(), incoming: Bytes::new(), reserving: None }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if self.reserving.is_some() {
            self.meter.set_waiting(false);
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = aws_sdk_kinesis::error::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(reserving) = &mut this.reserving {
                let future = reserving.get_mut().unwrap_or_else(|e| e.into_inner());
                let Poll::Ready(permit) = future.as_mut().poll(cx) else {
                    this.meter.set_waiting(true);
                    return Poll::Pending;
                };
                this.meter.set_waiting(false);
                this.meter.reserved.lock().unwrap_or_else(|e| e.into_inner()).push_back(permit);
                this.reserving = None;
                if let Some(head) = this.framing.paid() {
                    return Poll::Ready(Some(Ok(Frame::data(head))));
                }
            }
            match this.framing.push(&mut this.incoming) {
                Step::Pay(total) => {
                    let budget = this.meter.budget.clone();
                    let cost = total.saturating_mul(DECODE_COST);
                    this.reserving = Some(Mutex::new(Box::pin(async move { budget.reserve(cost).await })));
                    continue;
                }
                Step::Pass(bytes) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Step::NeedMore => {}
            }
            match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.incoming = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                // A message cut short goes to the SDK as it is: it reports the truncation.
                None => return Poll::Ready(this.framing.finish().map(|rest| Ok(Frame::data(rest)))),
            }
        }
    }
}

/// What the framing needs or has.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Everything given was taken in; more bytes are needed.
    NeedMore,
    /// An event of this many bytes begins: pay for it, then call [`Framing::paid`].
    Pay(usize),
    /// Bytes for the SDK, in stream order.
    Pass(Bytes),
}

/// Follows event-stream messages through a byte stream cut anywhere by the transport: holds
/// back each message's head (prelude and headers, a few hundred bytes) until it knows whether
/// the message is an event to pay for, then lets the message through as it comes.
#[derive(Debug, Default)]
struct Framing {
    /// The current message's prelude and headers, as far as received.
    head: Vec<u8>,
    /// The current message's total length and head length, once its prelude is read.
    lengths: Option<(usize, usize)>,
    /// Bytes of the current message still to let through after its head.
    rest: usize,
    /// An event's head is read; the event waits for payment.
    unpaid: bool,
    /// The framing made no sense: everything passes as it comes (the SDK reports the error).
    lost: bool,
}

impl Framing {
    /// Takes in bytes from `data` until some can pass, payment is due, or `data` is empty.
    fn push(&mut self, data: &mut Bytes) -> Step {
        loop {
            if self.unpaid {
                return Step::NeedMore;
            }
            if self.lost {
                return if data.is_empty() { Step::NeedMore } else { Step::Pass(data.split_off(0)) };
            }
            if self.rest > 0 {
                if data.is_empty() {
                    return Step::NeedMore;
                }
                let n = self.rest.min(data.len());
                self.rest -= n;
                return Step::Pass(data.split_to(n));
            }
            let wanted = self.lengths.map_or(PRELUDE, |(_, head)| head);
            let n = (wanted - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data.split_to(n));
            if self.head.len() < wanted {
                return Step::NeedMore;
            }
            match self.lengths {
                None => match prelude(&self.head) {
                    Some(lengths) => self.lengths = Some(lengths),
                    None => {
                        self.lost = true;
                        return Step::Pass(Bytes::from(std::mem::take(&mut self.head)));
                    }
                },
                Some((total, _)) if is_event(&self.head[PRELUDE..]) => {
                    self.unpaid = true;
                    return Step::Pay(total);
                }
                Some(_) => return self.let_through(),
            }
        }
    }

    /// The event whose head was read is paid for: let it through.
    fn paid(&mut self) -> Option<Bytes> {
        std::mem::take(&mut self.unpaid).then(|| match self.let_through() {
            Step::Pass(head) => head,
            _ => Bytes::new(),
        })
    }

    /// Lets the current message's head through; the rest follows as it comes.
    fn let_through(&mut self) -> Step {
        let (total, head) = self.lengths.take().expect("a message with a head has lengths");
        self.rest = total - head;
        Step::Pass(Bytes::from(std::mem::take(&mut self.head)))
    }

    /// At the end of the stream: the head of a message cut short, if any.
    fn finish(&mut self) -> Option<Bytes> {
        self.lengths = None;
        self.unpaid = false;
        (!self.head.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.head)))
    }
}

/// A message's total length and the length of its prelude plus headers, if its prelude is
/// intact (its CRC matches: a garbled length is never trusted with an allocation) and makes sense.
fn prelude(bytes: &[u8]) -> Option<(usize, usize)> {
    let crc = u32::from_be_bytes(bytes.get(8..12)?.try_into().ok()?);
    if crc32fast::hash(bytes.get(0..8)?) != crc {
        return None;
    }
    let total = u32::from_be_bytes(bytes.get(0..4)?.try_into().ok()?) as usize;
    let headers = u32::from_be_bytes(bytes.get(4..8)?.try_into().ok()?) as usize;
    // A message is its prelude, its headers, its payload and a 4-byte CRC.
    (headers <= MAX_HEADERS && PRELUDE + headers + 4 <= total).then_some((total, PRELUDE + headers))
}

/// Whether a message's headers say it is a `SubscribeToShardEvent`.
fn is_event(mut headers: &[u8]) -> bool {
    while let Some((&name_len, rest)) = headers.split_first() {
        let Some((name, rest)) = rest.split_at_checked(name_len as usize) else { return false };
        let Some((&kind, rest)) = rest.split_first() else { return false };
        let len = match kind {
            0 | 1 => 0,
            2 => 1,
            3 => 2,
            4 => 4,
            5 | 8 => 8,
            9 => 16,
            6 | 7 => match rest.get(0..2) {
                Some(len) => 2 + u16::from_be_bytes([len[0], len[1]]) as usize,
                None => return false,
            },
            _ => return false,
        };
        let Some((value, rest)) = rest.split_at_checked(len) else { return false };
        if name == b":event-type" && kind == 7 {
            return &value[2..] == EVENT_TYPE;
        }
        headers = rest;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An event-stream message (its prelude CRC right, its message CRC left zero: only the
    /// SDK checks that one).
    fn message(event_type: &str, payload_len: usize) -> Vec<u8> {
        let mut headers = Vec::new();
        for (name, value) in
            [(":message-type", "event"), (":event-type", event_type), (":content-type", "application/json")]
        {
            headers.push(name.len() as u8);
            headers.extend_from_slice(name.as_bytes());
            headers.push(7);
            headers.extend_from_slice(&(value.len() as u16).to_be_bytes());
            headers.extend_from_slice(value.as_bytes());
        }
        let total = PRELUDE + headers.len() + payload_len + 4;
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&(total as u32).to_be_bytes());
        out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        out.extend_from_slice(&crc32fast::hash(&out[0..8]).to_be_bytes());
        out.extend_from_slice(&headers);
        out.extend(std::iter::repeat_n(b'x', payload_len));
        out.extend_from_slice(&[0; 4]);
        out
    }

    /// Runs bytes cut into pieces through the framing, paying at once; returns what it let
    /// through and the events it asked payment for.
    fn run(pieces: &[&[u8]]) -> (Vec<u8>, Vec<usize>) {
        let mut framing = Framing::default();
        let (mut passed, mut paid) = (Vec::new(), Vec::new());
        for piece in pieces {
            let mut data = Bytes::copy_from_slice(piece);
            loop {
                match framing.push(&mut data) {
                    Step::NeedMore => break,
                    Step::Pay(total) => {
                        paid.push(total);
                        passed.extend_from_slice(&framing.paid().expect("a head waits"));
                    }
                    Step::Pass(bytes) => passed.extend_from_slice(&bytes),
                }
            }
            assert!(data.is_empty(), "NeedMore only once everything was taken in");
        }
        passed.extend(framing.finish().unwrap_or_default());
        (passed, paid)
    }

    #[test]
    fn everything_passes_and_only_records_events_are_paid_for() {
        let initial = message("initial-response", 2);
        let event = message("SubscribeToShardEvent", 5_000);
        let stream = [initial, event.clone(), event.clone()].concat();
        let (passed, paid) = run(&stream.chunks(7).collect::<Vec<_>>());
        assert_eq!(passed, stream);
        assert_eq!(paid, vec![event.len(), event.len()]);
    }

    #[test]
    fn an_event_does_not_pass_before_it_is_paid_for() {
        let event = message("SubscribeToShardEvent", 100);
        let mut framing = Framing::default();
        let mut data = Bytes::from(event.clone());
        assert_eq!(framing.push(&mut data), Step::Pay(event.len()));
        assert_eq!(framing.push(&mut data), Step::NeedMore, "unpaid: nothing more is taken");
        assert!(!data.is_empty());
        let head = framing.paid().unwrap();
        assert_eq!(framing.push(&mut data), Step::Pass(Bytes::copy_from_slice(&event[head.len()..])));
    }

    #[test]
    fn nonsense_framing_passes_everything_on_without_a_panic() {
        let garbage = [0xffu8; 64];
        let (passed, paid) = run(&[&garbage[..10], &garbage[10..]]);
        assert_eq!(passed, garbage.to_vec());
        assert!(paid.is_empty());
    }

    #[test]
    fn a_garbled_length_is_not_trusted() {
        let mut event = message("SubscribeToShardEvent", 100);
        event[0] = 0x7f; // 2 GiB, if believed
        let (passed, paid) = run(&[&event]);
        assert!(paid.is_empty());
        assert_eq!(passed, event);
    }

    #[test]
    fn a_message_cut_short_is_passed_on_for_the_sdk_to_report() {
        let event = message("SubscribeToShardEvent", 100);
        let (passed, _) = run(&[&event[..50]]);
        assert_eq!(passed, event[..50].to_vec());
    }

    async fn next(body: &mut MeteredBody) -> Option<Result<Frame<Bytes>, aws_sdk_kinesis::error::BoxError>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    #[tokio::test]
    async fn the_body_waits_for_budget_before_an_event_passes_and_the_reader_takes_its_share() {
        let event = message("SubscribeToShardEvent", 1_000);
        let stream = [message("initial-response", 2), event.clone()].concat();
        let budget = MemoryBudget::new(10 * event.len() as u64);
        let meter = EventMeter::new(budget.clone());
        let mut body = MeteredBody::new(SdkBody::from(stream.clone()), meter.clone());
        let held = budget.reserve(9 * event.len()).await;

        let mut passed = Vec::new();
        let waiting = std::time::Duration::from_millis(50);
        while let Ok(frame) = tokio::time::timeout(waiting, next(&mut body)).await {
            passed.extend_from_slice(frame.expect("a frame").expect("no error").data_ref().expect("data"));
        }
        assert_eq!(
            passed.len(),
            stream.len() - event.len(),
            "the initial response passes unpaid; the event waits: {} bytes free, it costs {}",
            event.len(),
            3 * event.len()
        );
        drop(held);
        while let Some(frame) = next(&mut body).await {
            passed.extend_from_slice(frame.expect("no error").data_ref().expect("data"));
        }
        assert_eq!(passed, stream, "everything passed, in order");
        let share = meter.take().expect("the event's reservation");
        assert_eq!(share.num_permits(), 3 * event.len());
        assert!(meter.take().is_none(), "one reservation per event");
        drop(share);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn an_event_waiting_for_budget_is_reported_and_keeps_the_subscription_from_looking_idle() {
        tokio::time::pause();
        let event = message("SubscribeToShardEvent", 1_000);
        let budget = MemoryBudget::new(4 * event.len() as u64);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let meter = EventMeter::new(budget.clone()).on_wait({
            let seen = Arc::clone(&seen);
            Arc::new(move |waiting| seen.lock().unwrap().push(waiting))
        });
        let idle = Duration::from_secs(60);
        // Silent on its own: idle after the timeout.
        let started = Instant::now();
        assert_eq!(meter.unless_idle(std::future::pending::<()>(), idle).await, None);
        assert_eq!(started.elapsed().as_secs(), 60);

        // An event that waits five minutes for budget, then passes: the wait is reported, and the
        // subscription is never judged idle meanwhile.
        let held = budget.reserve(3 * event.len()).await;
        let mut body = MeteredBody::new(SdkBody::from(event.clone()), meter.clone());
        let release = async move {
            tokio::time::sleep(Duration::from_secs(300)).await;
            drop(held);
            std::future::pending::<()>().await
        };
        let started = Instant::now();
        let got = tokio::select! {
            got = meter.unless_idle(next(&mut body), idle) => got,
            _ = release => unreachable!("never ends"),
        };
        assert!(got.is_some_and(|frame| frame.is_some_and(|f| f.is_ok())), "the event passed after its wait");
        assert_eq!(started.elapsed().as_secs(), 300);
        assert_eq!(*seen.lock().unwrap(), vec![true, false], "the wait is reported once, and its end");
        // Silent after the wait: idle a full timeout after the wait ended.
        let started = Instant::now();
        assert_eq!(meter.unless_idle(std::future::pending::<()>(), idle).await, None);
        assert_eq!(started.elapsed().as_secs(), 60);
    }

    proptest! {
        #[test]
        fn events_are_found_however_the_stream_is_cut(
            messages in proptest::collection::vec((any::<bool>(), 0usize..3_000), 0..12),
            cuts in proptest::collection::vec(1usize..700, 1..40),
        ) {
            let mut stream = Vec::new();
            let mut events = Vec::new();
            for (is_event, len) in &messages {
                let m = message(if *is_event { "SubscribeToShardEvent" } else { "initial-response" }, *len);
                if *is_event {
                    events.push(m.len());
                }
                stream.extend_from_slice(&m);
            }
            let mut pieces = Vec::new();
            let mut rest = stream.as_slice();
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (piece, tail) = rest.split_at((*cut).min(rest.len()));
                pieces.push(piece);
                rest = tail;
            }
            let (passed, paid) = run(&pieces);
            prop_assert_eq!(passed, stream);
            prop_assert_eq!(paid, events);
        }

        #[test]
        fn any_bytes_pass_through_unchanged(
            bytes in proptest::collection::vec(any::<u8>(), 0..4_096),
            cut in 1usize..500,
        ) {
            let (passed, _) = run(&bytes.chunks(cut).collect::<Vec<_>>());
            prop_assert_eq!(passed, bytes);
        }
    }
}
