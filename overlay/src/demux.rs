//! The peer's UDP socket, shared by QUIC and the membership channel ([`crate::channel`]).
//!
//! [`DemuxSocket`] wraps the injected socket (a kernel UDP socket, or netsim's virtual one) and is
//! what quinn's endpoint reads from: every received datagram whose first byte is
//! [`crate::channel::MARKER`] is taken out of quinn's batch and handed to the membership actor
//! over a bounded channel (dropped when it is full: membership tolerates loss); the rest goes to
//! quinn untouched. This is sound only because the endpoint runs with `grease_quic_bit` off, so
//! no QUIC packet sent to us has the fixed bit (0x40) clear, and the marker has it clear.
//!
//! Sending membership packets uses the inner socket directly ([`DemuxSocket::send_to`]); a
//! datagram the socket cannot take right now is dropped, like any UDP loss.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

use crate::channel::is_channel_packet;

/// The socket quinn reads from, diverting membership datagrams (see the module doc).
pub struct DemuxSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    tx: mpsc::Sender<(SocketAddr, Bytes)>,
    /// Membership datagrams dropped because the actor's queue was full.
    pub dropped: AtomicU64,
    /// Membership datagrams that could not be sent (socket busy or failed).
    pub send_failed: AtomicU64,
}

impl fmt::Debug for DemuxSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemuxSocket")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl DemuxSocket {
    /// Wraps `inner`; membership datagrams come out of the returned receiver (at most `queue`
    /// waiting).
    pub fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        queue: usize,
    ) -> (Arc<Self>, mpsc::Receiver<(SocketAddr, Bytes)>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let s = Arc::new(Self {
            inner,
            tx,
            dropped: AtomicU64::new(0),
            send_failed: AtomicU64::new(0),
        });
        (s, rx)
    }

    /// Sends one membership datagram (best effort).
    pub fn send_to(&self, to: SocketAddr, datagram: &[u8]) {
        let t = Transmit {
            destination: to,
            ecn: None,
            contents: datagram,
            segment_size: None,
            src_ip: None,
        };
        if self.inner.try_send(&t).is_err() {
            self.send_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn divert(&self, from: SocketAddr, segment: &[u8]) {
        if self
            .tx
            .try_send((from, Bytes::copy_from_slice(segment)))
            .is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes membership datagrams out of a received batch of `n` entries; returns how many
    /// entries are left for quinn (moved to the front).
    fn filter(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) -> usize {
        let mut kept = 0;
        for i in 0..n {
            let m = meta[i];
            let stride = if m.stride == 0 { m.len } else { m.stride };
            let len = m.len.min(bufs[i].len());
            // A GRO batch holds several datagrams of one sender, `stride` bytes apart.
            let mut new_len = 0;
            let mut start = 0;
            while start < len {
                let end = (start + stride).min(len);
                if is_channel_packet(&bufs[i][start..end]) {
                    self.divert(m.addr, &bufs[i][start..end]);
                } else {
                    if new_len != start {
                        bufs[i].copy_within(start..end, new_len);
                    }
                    new_len += end - start;
                }
                start = end;
            }
            if new_len == 0 {
                continue;
            }
            if kept != i {
                let (lo, hi) = bufs.split_at_mut(i);
                lo[kept][..new_len].copy_from_slice(&hi[0][..new_len]);
            }
            meta[kept] = RecvMeta {
                len: new_len,
                stride: stride.min(new_len),
                ..m
            };
            kept += 1;
        }
        kept
    }
}

impl AsyncUdpSocket for DemuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => {
                    let kept = self.filter(bufs, meta, n);
                    if kept > 0 || n == 0 {
                        return Poll::Ready(Ok(kept));
                    }
                    // Only membership datagrams: read on (the inner socket registers the waker
                    // when it has nothing more).
                }
                other => return other,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Nothing;
    impl AsyncUdpSocket for Nothing {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            unimplemented!()
        }
        fn try_send(&self, _: &Transmit) -> io::Result<()> {
            Ok(())
        }
        fn poll_recv(
            &self,
            _: &mut Context,
            _: &mut [IoSliceMut<'_>],
            _: &mut [RecvMeta],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
        fn local_addr(&self) -> io::Result<SocketAddr> {
            Ok(SocketAddr::from(([127, 0, 0, 1], 1)))
        }
    }

    fn meta(len: usize, stride: usize) -> RecvMeta {
        RecvMeta {
            addr: SocketAddr::from(([127, 0, 0, 1], 9)),
            len,
            stride,
            ecn: None,
            dst_ip: None,
        }
    }

    #[test]
    fn membership_datagrams_are_taken_out_of_quic_batches() {
        let (s, mut rx) = DemuxSocket::new(Arc::new(Nothing), 16);
        // Entry 0: a GRO batch of three 4-byte datagrams, the middle one membership.
        // Entry 1: one membership datagram. Entry 2: one QUIC datagram.
        let mut b0 = [0x40, 1, 1, 1, 0x2a, 2, 2, 2, 0x41, 3, 3, 3];
        let mut b1 = [0x2a, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut b2 = [0x55, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut bufs = [
            IoSliceMut::new(&mut b0),
            IoSliceMut::new(&mut b1),
            IoSliceMut::new(&mut b2),
        ];
        let mut metas = [meta(12, 4), meta(3, 3), meta(2, 2)];
        let kept = s.filter(&mut bufs, &mut metas, 3);
        assert_eq!(kept, 2);
        assert_eq!(metas[0].len, 8);
        assert_eq!(&bufs[0][..8], &[0x40, 1, 1, 1, 0x41, 3, 3, 3]);
        assert_eq!(metas[1].len, 2);
        assert_eq!(&bufs[1][..2], &[0x55, 7]);
        assert_eq!(rx.try_recv().unwrap().1.as_ref(), &[0x2a, 2, 2, 2]);
        assert_eq!(rx.try_recv().unwrap().1.as_ref(), &[0x2a, 9, 9]);
        assert!(rx.try_recv().is_err());
    }
}
