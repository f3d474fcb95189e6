//! An in-memory datagram network: every socket is an `AsyncUdpSocket` that quinn drives like a
//! kernel socket, but packets travel through bounded in-process queues (full queue: the packet
//! is dropped, as UDP would). Delivery is immediate; the full simulator with latency, loss and
//! partitions builds on the same socket interface.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;

use crate::net::{datagrams, AlwaysWritable};

/// Packets queued per socket before new ones are dropped.
pub const QUEUE_PACKETS: usize = 4096;

type Packet = (SocketAddr, Bytes);

/// A set of in-memory sockets that can reach each other.
#[derive(Clone, Default)]
pub struct MemNet {
    routes: Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Packet>>>>,
    sent: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    loss: Arc<Mutex<Option<(f64, StdRng)>>>,
    /// Datagrams recorded from one address to another (an on-path attacker's capture).
    capture: Arc<Mutex<Option<Capture>>>,
}

#[derive(Default)]
struct Capture {
    from: Option<SocketAddr>,
    to: Option<SocketAddr>,
    packets: Vec<Bytes>,
}

impl fmt::Debug for MemNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemNet")
            .field("sent", &self.sent.load(Ordering::Relaxed))
            .finish()
    }
}

impl MemNet {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// A socket bound to `addr` on this network (replaces any socket bound there).
    pub fn bind(&self, addr: SocketAddr) -> Arc<MemSocket> {
        let (tx, rx) = mpsc::channel(QUEUE_PACKETS);
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, tx);
        Arc::new(MemSocket {
            addr,
            net: self.clone(),
            rx: Mutex::new(rx),
            down: AtomicBool::new(false),
        })
    }

    /// Drops each datagram independently with probability `p`, from a seeded RNG.
    pub fn set_loss(&self, p: f64, seed: u64) {
        *self.loss.lock().unwrap_or_else(|e| e.into_inner()) =
            (p > 0.0).then(|| (p.min(1.0), StdRng::seed_from_u64(seed)));
    }

    /// Starts recording every datagram sent from `from` to `to` (replacing any recording).
    pub fn start_capture(&self, from: SocketAddr, to: SocketAddr) {
        *self.capture.lock().unwrap_or_else(|e| e.into_inner()) = Some(Capture {
            from: Some(from),
            to: Some(to),
            packets: Vec::new(),
        });
    }

    /// Stops recording and returns what was recorded, in order.
    pub fn take_capture(&self) -> Vec<Bytes> {
        self.capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|c| c.packets)
            .unwrap_or_default()
    }

    /// Delivers `data` to `to` as if `from` had sent it (a replay by an on-path attacker).
    pub fn inject(&self, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        self.deliver(from, to, data);
    }

    /// Datagrams dropped so far (loss, full queues, unknown destinations).
    pub fn packets_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Datagrams delivered so far.
    pub fn packets_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn deliver(&self, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        if let Some(c) = self
            .capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            if c.from == Some(from) && c.to == Some(to) {
                c.packets.push(Bytes::copy_from_slice(data));
            }
        }
        if let Some((p, rng)) = self.loss.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            if rng.random_bool(*p) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let tx = self
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&to)
            .cloned();
        match tx {
            Some(tx) if tx.try_send((from, Bytes::copy_from_slice(data))).is_ok() => {
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One endpoint's socket on a [`MemNet`].
pub struct MemSocket {
    addr: SocketAddr,
    net: MemNet,
    rx: Mutex<mpsc::Receiver<Packet>>,
    down: AtomicBool,
}

impl MemSocket {
    /// Crashes the socket: it neither sends nor receives from now on.
    pub fn crash(&self) {
        self.down.store(true, Ordering::SeqCst);
    }
}

impl fmt::Debug for MemSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemSocket")
            .field("addr", &self.addr)
            .finish()
    }
}

impl AsyncUdpSocket for MemSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if self.down.load(Ordering::Relaxed) {
            return Ok(());
        }
        for datagram in datagrams(transmit) {
            self.net.deliver(self.addr, transmit.destination, datagram);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match rx.poll_recv(cx) {
                Poll::Ready(Some((from, data))) => {
                    if self.down.load(Ordering::Relaxed) {
                        continue;
                    }
                    let (Some(buf), Some(m)) = (bufs.first_mut(), meta.first_mut()) else {
                        return Poll::Ready(Ok(0));
                    };
                    let n = data.len().min(buf.len());
                    buf[..n].copy_from_slice(&data[..n]);
                    *m = RecvMeta {
                        addr: from,
                        len: n,
                        stride: n,
                        ecn: None,
                        dst_ip: None,
                    };
                    return Poll::Ready(Ok(1));
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "network gone",
                    )))
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}
