//! The virtual network: one [`SimSocket`] per peer (quinn's `AsyncUdpSocket`), and an event
//! queue (a heap of pending deliveries ordered by arrival time, then by send order) drained by
//! one driver task.
//!
//! Each send looks up the directed link between the two peers, asks its [`LinkState`] for an
//! arrival time (latency, in-order jitter, loss, serialisation, queue, MTU) and pushes the packet
//! on the heap. The driver sleeps with `tokio::time` until the earliest arrival, so under a
//! paused runtime the clock jumps from event to event; under a normal runtime (real-time mode)
//! the same code waits on the wall clock. Nothing touches a kernel socket.
//!
//! Faults: partitions (one- or two-way cuts between two groups of peers; a cut drops packets
//! at send and in flight), link degradation (per-pair spec overrides), crash (a socket that
//! neither sends nor receives) and rebind (restart at the same address).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::link::{DropReason, LinkSpec, LinkState};
use crate::topology::LatencyModel;

/// Packets a socket holds undelivered before new arrivals are dropped (a receive buffer).
pub const INBOX_PACKETS: usize = 8192;

/// Counters of the whole network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetStats {
    /// Datagrams handed to the network.
    pub sent: u64,
    /// Datagrams delivered to a socket.
    pub delivered: u64,
    /// Bytes delivered.
    pub bytes_delivered: u64,
    /// QUIC long-header datagrams sent (Initial, Handshake, 0-RTT: handshakes).
    pub handshake_datagrams: u64,
    /// Bytes of those.
    pub handshake_bytes: u64,
    /// QUIC short-header datagrams sent (1-RTT: stream data and membership datagrams).
    pub data_datagrams: u64,
    /// Bytes of those.
    pub data_bytes: u64,
    /// Dropped by random loss.
    pub dropped_loss: u64,
    /// Dropped by a full queue (sender link queue or receiver inbox).
    pub dropped_queue: u64,
    /// Dropped for exceeding the MTU.
    pub dropped_mtu: u64,
    /// Dropped by a partition.
    pub dropped_partition: u64,
    /// Dropped because an end was crashed or unbound.
    pub dropped_unreachable: u64,
}

impl NetStats {
    fn count_drop(&mut self, r: DropReason) {
        match r {
            DropReason::Loss => self.dropped_loss += 1,
            DropReason::Queue => self.dropped_queue += 1,
            DropReason::Mtu => self.dropped_mtu += 1,
            DropReason::Partition => self.dropped_partition += 1,
            DropReason::Unreachable => self.dropped_unreachable += 1,
        }
    }

    /// All drops.
    pub fn dropped(&self) -> u64 {
        self.dropped_loss
            + self.dropped_queue
            + self.dropped_mtu
            + self.dropped_partition
            + self.dropped_unreachable
    }
}

/// A cut between two groups of peers.
#[derive(Clone, Debug)]
struct Cut {
    a: Vec<bool>,
    b: Vec<bool>,
    two_way: bool,
}

impl Cut {
    fn blocks(&self, from: usize, to: usize) -> bool {
        let f = |v: &Vec<bool>, i: usize| v.get(i).copied().unwrap_or(false);
        (f(&self.a, from) && f(&self.b, to)) || (self.two_way && f(&self.b, from) && f(&self.a, to))
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Pending {
    at: Duration,
    seq: u64,
    to: SocketAddr,
    from: SocketAddr,
    data: Bytes,
}

struct Inbox {
    queue: VecDeque<(SocketAddr, Bytes)>,
    waker: Option<Waker>,
    down: bool,
}

struct SocketEntry {
    peer: usize,
    inbox: Arc<Mutex<Inbox>>,
}

struct State {
    seq: u64,
    heap: BinaryHeap<Reverse<Pending>>,
    sockets: HashMap<SocketAddr, SocketEntry>,
    latency: LatencyModel,
    base: LinkSpec,
    overrides: HashMap<(usize, usize), LinkSpec>,
    links: HashMap<(usize, usize), LinkState>,
    cuts: Vec<Cut>,
    rng: StdRng,
    stats: NetStats,
}

impl State {
    fn spec(&self, from: usize, to: usize) -> LinkSpec {
        let mut spec = self
            .overrides
            .get(&(from, to))
            .copied()
            .unwrap_or(self.base);
        if !self.overrides.contains_key(&(from, to)) || spec.latency.is_zero() {
            spec.latency = self.latency.one_way(from, to);
        }
        spec
    }

    fn cut(&self, from: usize, to: usize) -> bool {
        self.cuts.iter().any(|c| c.blocks(from, to))
    }
}

struct Shared {
    state: Mutex<State>,
    notify: Notify,
    epoch: Instant,
}

/// The virtual network. Cheap to clone; all clones are the same network.
#[derive(Clone)]
pub struct SimNet {
    shared: Arc<Shared>,
}

impl fmt::Debug for SimNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimNet").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SimNet {
    /// A network whose links all follow `base` except for their latency, which comes from
    /// `latency`. Must be called inside a tokio runtime: it spawns the delivery driver.
    pub fn new(latency: LatencyModel, base: LinkSpec, seed: u64) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                seq: 0,
                heap: BinaryHeap::new(),
                sockets: HashMap::new(),
                latency,
                base,
                overrides: HashMap::new(),
                links: HashMap::new(),
                cuts: Vec::new(),
                rng: StdRng::seed_from_u64(seed ^ 0x6e65_7473_696d),
                stats: NetStats::default(),
            }),
            notify: Notify::new(),
            epoch: Instant::now(),
        });
        tokio::spawn(drive(shared.clone()));
        SimNet { shared }
    }

    /// Time since the network was created (virtual under a paused runtime).
    pub fn now(&self) -> Duration {
        Instant::now() - self.shared.epoch
    }

    /// The instant the network was created.
    pub fn epoch(&self) -> Instant {
        self.shared.epoch
    }

    /// A socket for peer number `peer` at `addr` (replaces any socket bound there: a restart).
    pub fn bind(&self, peer: usize, addr: SocketAddr) -> Arc<SimSocket> {
        let inbox = Arc::new(Mutex::new(Inbox {
            queue: VecDeque::new(),
            waker: None,
            down: false,
        }));
        let old = lock(&self.shared.state).sockets.insert(
            addr,
            SocketEntry {
                peer,
                inbox: inbox.clone(),
            },
        );
        if let Some(old) = old {
            let mut i = lock(&old.inbox);
            i.down = true;
            if let Some(w) = i.waker.take() {
                w.wake();
            }
        }
        Arc::new(SimSocket {
            addr,
            net: self.clone(),
            inbox,
        })
    }

    /// Crashes the socket at `addr`: from now on it neither sends nor receives, and what is
    /// queued for it is lost.
    pub fn crash(&self, addr: SocketAddr) {
        let st = lock(&self.shared.state);
        if let Some(e) = st.sockets.get(&addr) {
            let mut i = lock(&e.inbox);
            i.down = true;
            i.queue.clear();
        }
    }

    /// Cuts traffic from group `a` to group `b` (and back if `two_way`). Packets in flight
    /// across the cut are dropped at delivery.
    pub fn partition(&self, a: &[usize], b: &[usize], two_way: bool) {
        let mut st = lock(&self.shared.state);
        let n = st.sockets.values().map(|s| s.peer + 1).max().unwrap_or(0);
        let n = n
            .max(a.iter().copied().max().map_or(0, |x| x + 1))
            .max(b.iter().copied().max().map_or(0, |x| x + 1));
        let mut va = vec![false; n];
        let mut vb = vec![false; n];
        for &i in a {
            va[i] = true;
        }
        for &i in b {
            vb[i] = true;
        }
        st.cuts.push(Cut {
            a: va,
            b: vb,
            two_way,
        });
    }

    /// Removes every partition.
    pub fn heal(&self) {
        lock(&self.shared.state).cuts.clear();
    }

    /// Whether traffic from peer `from` to peer `to` is currently cut.
    pub fn is_cut(&self, from: usize, to: usize) -> bool {
        lock(&self.shared.state).cut(from, to)
    }

    /// Overrides the link spec between every peer of `a` and every peer of `b`, both ways
    /// (a zero `latency` keeps the topology's latency).
    pub fn degrade(&self, a: &[usize], b: &[usize], spec: LinkSpec) {
        let mut st = lock(&self.shared.state);
        for &x in a {
            for &y in b {
                if x != y {
                    st.overrides.insert((x, y), spec);
                    st.overrides.insert((y, x), spec);
                }
            }
        }
    }

    /// Removes every link override.
    pub fn restore(&self) {
        lock(&self.shared.state).overrides.clear();
    }

    /// The configured RTT between two peers (without overrides).
    pub fn rtt(&self, a: usize, b: usize) -> Duration {
        lock(&self.shared.state).latency.rtt(a, b)
    }

    /// Network counters so far.
    pub fn stats(&self) -> NetStats {
        lock(&self.shared.state).stats.clone()
    }

    /// Datagrams waiting in the event queue.
    pub fn in_flight(&self) -> usize {
        lock(&self.shared.state).heap.len()
    }

    fn send(&self, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        let now = self.now();
        let mut guard = lock(&self.shared.state);
        let st = &mut *guard;
        st.stats.sent += 1;
        if data.first().is_some_and(|b| b & 0x80 != 0) {
            st.stats.handshake_datagrams += 1;
            st.stats.handshake_bytes += data.len() as u64;
        } else {
            st.stats.data_datagrams += 1;
            st.stats.data_bytes += data.len() as u64;
        }
        let (Some(src), Some(dst)) = (st.sockets.get(&from), st.sockets.get(&to)) else {
            st.stats.count_drop(DropReason::Unreachable);
            return;
        };
        let (src, dst) = (src.peer, dst.peer);
        if st.cut(src, dst) {
            st.stats.count_drop(DropReason::Partition);
            return;
        }
        let spec = st.spec(src, dst);
        let link = st.links.entry((src, dst)).or_default();
        match link.transmit(&spec, now, data.len(), &mut st.rng) {
            Ok(at) => {
                st.seq += 1;
                let earliest = st.heap.peek().map(|Reverse(p)| p.at);
                st.heap.push(Reverse(Pending {
                    at,
                    seq: st.seq,
                    to,
                    from,
                    data: Bytes::copy_from_slice(data),
                }));
                if earliest.is_none_or(|e| at < e) {
                    drop(guard);
                    self.shared.notify.notify_one();
                }
            }
            Err(r) => st.stats.count_drop(r),
        }
    }
}

/// Delivers due packets, then sleeps until the next one (or until a send wakes it). Lives as
/// long as the runtime.
async fn drive(sh: Arc<Shared>) {
    loop {
        let next = {
            let now = Instant::now() - sh.epoch;
            let mut guard = lock(&sh.state);
            let st = &mut *guard;
            while st.heap.peek().is_some_and(|Reverse(p)| p.at <= now) {
                let Some(Reverse(p)) = st.heap.pop() else {
                    break;
                };
                let endpoints = st
                    .sockets
                    .get(&p.from)
                    .map(|s| s.peer)
                    .zip(st.sockets.get(&p.to).map(|s| (s.peer, s.inbox.clone())));
                let Some((src, (dst, inbox))) = endpoints else {
                    st.stats.count_drop(DropReason::Unreachable);
                    continue;
                };
                if st.cut(src, dst) {
                    st.stats.count_drop(DropReason::Partition);
                    continue;
                }
                let mut i = lock(&inbox);
                if i.down {
                    st.stats.count_drop(DropReason::Unreachable);
                } else if i.queue.len() >= INBOX_PACKETS {
                    st.stats.count_drop(DropReason::Queue);
                } else {
                    st.stats.delivered += 1;
                    st.stats.bytes_delivered += p.data.len() as u64;
                    i.queue.push_back((p.from, p.data));
                    if let Some(w) = i.waker.take() {
                        w.wake();
                    }
                }
            }
            st.heap.peek().map(|Reverse(p)| sh.epoch + p.at)
        };
        let notified = sh.notify.notified();
        match next {
            Some(at) => {
                tokio::select! {
                    biased;
                    _ = notified => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            None => notified.await,
        }
    }
}

/// The datagrams of one quinn transmit (split at `segment_size` when quinn batches, GSO-style).
pub(crate) fn datagrams<'a>(transmit: &'a Transmit<'_>) -> std::slice::Chunks<'a, u8> {
    let seg = match transmit.segment_size {
        Some(seg) if seg > 0 => seg,
        _ => transmit.contents.len().max(1),
    };
    transmit.contents.chunks(seg)
}

/// One peer's socket on a [`SimNet`].
pub struct SimSocket {
    addr: SocketAddr,
    net: SimNet,
    inbox: Arc<Mutex<Inbox>>,
}

impl fmt::Debug for SimSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimSocket")
            .field("addr", &self.addr)
            .finish()
    }
}

/// A simulated socket never blocks on send (a full queue drops, as UDP would).
#[derive(Debug)]
pub(crate) struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if lock(&self.inbox).down {
            return Ok(());
        }
        for datagram in datagrams(transmit) {
            self.net.send(self.addr, transmit.destination, datagram);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut inbox = lock(&self.inbox);
        if inbox.down {
            inbox.queue.clear();
            // A crashed socket never becomes readable again.
            inbox.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut n = 0;
        for (buf, m) in bufs.iter_mut().zip(meta.iter_mut()) {
            let Some((from, data)) = inbox.queue.pop_front() else {
                break;
            };
            let len = data.len().min(buf.len());
            buf[..len].copy_from_slice(&data[..len]);
            *m = RecvMeta {
                addr: from,
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        if n == 0 {
            inbox.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// The address of peer number `i`: 127.x.y.z port 7000, never a routable address.
pub fn peer_addr(i: usize) -> SocketAddr {
    let i = i as u32 + 1;
    SocketAddr::from(([127, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8], 7000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::LossModel;

    fn transmit<'a>(to: SocketAddr, data: &'a [u8]) -> Transmit<'a> {
        Transmit {
            destination: to,
            ecn: None,
            contents: data,
            segment_size: None,
            src_ip: None,
        }
    }

    async fn recv(s: &SimSocket) -> (SocketAddr, Vec<u8>) {
        std::future::poll_fn(|cx| {
            let mut buf = [0u8; 2000];
            let mut bufs = [IoSliceMut::new(&mut buf)];
            let mut meta = [RecvMeta::default()];
            match s.poll_recv(cx, &mut bufs, &mut meta) {
                Poll::Ready(Ok(_)) => {
                    let len = meta[0].len;
                    Poll::Ready((meta[0].addr, buf[..len].to_vec()))
                }
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn delivers_after_one_way_latency_in_order() {
        let net = SimNet::new(LatencyModel::uniform(2, 20.0), LinkSpec::default(), 1);
        let a = net.bind(0, peer_addr(0));
        let b = net.bind(1, peer_addr(1));
        let t0 = Instant::now();
        for i in 0..10u8 {
            a.try_send(&transmit(peer_addr(1), &[i])).unwrap();
        }
        for i in 0..10u8 {
            let (from, data) = recv(&b).await;
            assert_eq!(from, peer_addr(0));
            assert_eq!(data, vec![i]);
        }
        assert_eq!(Instant::now() - t0, Duration::from_millis(10));
        assert_eq!(net.stats().delivered, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn partitions_cut_one_or_both_ways_and_heal() {
        let net = SimNet::new(LatencyModel::uniform(2, 20.0), LinkSpec::default(), 1);
        let a = net.bind(0, peer_addr(0));
        let b = net.bind(1, peer_addr(1));
        net.partition(&[0], &[1], false);
        a.try_send(&transmit(peer_addr(1), b"x")).unwrap();
        b.try_send(&transmit(peer_addr(0), b"y")).unwrap();
        assert_eq!(
            recv(&a).await.1,
            b"y".to_vec(),
            "one-way cut lets b→a through"
        );
        assert_eq!(net.stats().dropped_partition, 1);
        // In flight when the cut starts: dropped at delivery.
        net.heal();
        a.try_send(&transmit(peer_addr(1), b"z")).unwrap();
        net.partition(&[0], &[1], true);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(net.stats().dropped_partition, 2);
        net.heal();
        a.try_send(&transmit(peer_addr(1), b"w")).unwrap();
        assert_eq!(recv(&b).await.1, b"w".to_vec());
    }

    #[tokio::test(start_paused = true)]
    async fn crashed_socket_neither_sends_nor_receives() {
        let net = SimNet::new(LatencyModel::uniform(2, 2.0), LinkSpec::default(), 1);
        let a = net.bind(0, peer_addr(0));
        let _b = net.bind(1, peer_addr(1));
        net.crash(peer_addr(1));
        a.try_send(&transmit(peer_addr(1), b"x")).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(net.stats().dropped_unreachable, 1);
        // Restart at the same address: reachable again.
        let b2 = net.bind(1, peer_addr(1));
        a.try_send(&transmit(peer_addr(1), b"y")).unwrap();
        assert_eq!(recv(&b2).await.1, b"y".to_vec());
    }

    #[tokio::test(start_paused = true)]
    async fn degraded_link_loses_packets() {
        let net = SimNet::new(LatencyModel::uniform(2, 2.0), LinkSpec::default(), 1);
        let a = net.bind(0, peer_addr(0));
        let _b = net.bind(1, peer_addr(1));
        net.degrade(
            &[0],
            &[1],
            LinkSpec {
                latency: Duration::ZERO,
                loss: LossModel::Bernoulli { p: 1.0 },
                ..LinkSpec::default()
            },
        );
        a.try_send(&transmit(peer_addr(1), b"x")).unwrap();
        assert_eq!(net.stats().dropped_loss, 1);
        net.restore();
        a.try_send(&transmit(peer_addr(1), b"x")).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(net.stats().delivered, 1);
    }

    #[test]
    fn peer_addresses_are_loopback_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..70_000 {
            let a = peer_addr(i);
            assert!(a.ip().is_loopback());
            assert!(seen.insert(a));
        }
    }
}
