//! The membership channel: authenticated membership datagrams on the peer's own UDP socket,
//! beside QUIC, with no QUIC handshake per target (docs/PROTOCOL.md §8). Sans-IO.
//!
//! [`Channel`] is fed received packets with [`Channel::handle_packet`] and payloads to send with
//! [`Channel::send`]; it is drained with [`Channel::poll_transmit`]. It reads no clock and does
//! no I/O: the driver passes `now` (tokio's clock, virtual under netsim) and the wall-clock time
//! in milliseconds (for certificate expiry and hello freshness), and owns the socket.
//!
//! What it does, per pair of peers:
//!
//! - **First contact** is a `HELLO`: the sender's overlay certificate, a fresh X25519 public key
//!   and the payload, signed with the sender's node key (Ed25519) and bound to the target's node
//!   id and the time. The receiver verifies the certificate chain against the overlay CA once per
//!   certificate (cached), checks the node id against the key, expiry and the deny-set on every
//!   packet, the signature, the time window and a replay cache, then delivers the payload.
//! - A peer answering a `HELLO` sends its own `HELLO` echoing the first one's X25519 key; both then
//!   hold a session (HKDF-SHA256 over X25519) with one ChaCha20-Poly1305 key per direction.
//! - Afterwards every packet is a `DATA`: session id, a per-direction counter (the nonce), and
//!   the sealed payload; the receiver keeps a 64-packet sliding replay window.
//!
//! Sessions live until either side restarts (a restarted peer sends `HELLO`s again, which
//! replaces the session), [`Channel::forget`] is called, or `session_lifetime` passes; at most
//! `max_peers` peers are kept (least recently used first out).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::hkdf;
use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::identity::{parse_node_cert_key, CertInfo, NodeId};
use crate::tls::DenySet;

/// First byte of every membership-channel packet. Both high bits are clear: a QUIC packet always
/// has the fixed bit (0x40) set once greasing is off (RFC 9000 §17, RFC 9287), so the byte
/// tells the two apart before quinn sees the datagram.
pub const MARKER: u8 = 0x2a;
/// Channel protocol version (second byte).
pub const VERSION: u8 = 1;
/// Packet type: signed first contact.
pub const TYPE_HELLO: u8 = 1;
/// Packet type: sealed with a session key.
pub const TYPE_DATA: u8 = 2;
/// Largest packet sent or accepted (fits a 1500-byte MTU over IPv6 + UDP).
pub const MAX_PACKET: usize = 1452;
/// Largest certificate a `HELLO` may carry.
pub const MAX_CERT: usize = 1024;
/// Signature context of a `HELLO`.
pub const HELLO_CONTEXT: &[u8] = b"meshd-membership-hello-v1\0";
/// HKDF salt of session keys.
const KDF_SALT: &[u8] = b"meshd-membership-v1";
/// HKDF info label of session keys.
const KDF_LABEL: &[u8] = b"meshd-membership-session-v1";
/// marker, version, type.
const PREFIX: usize = 3;
/// target id, timestamp, sequence number, ephemeral key, echo, cert length, payload length,
/// signature.
const HELLO_FIXED: usize = PREFIX + 20 + 8 + 4 + 32 + 32 + 2 + 2 + 64;
/// marker, version, type, session id, counter.
const DATA_HEADER: usize = PREFIX + 8 + 8;
const TAG: usize = 16;
/// Largest payload of a `DATA` packet.
pub const MAX_PAYLOAD: usize = MAX_PACKET - DATA_HEADER - TAG;
/// Tolerated clock difference for a hello sent just before this node started.
const START_SKEW_MS: u64 = 1000;

/// Whether a datagram belongs to the membership channel (and not to QUIC).
pub fn is_channel_packet(datagram: &[u8]) -> bool {
    datagram.first() == Some(&MARKER)
}

/// Settings of the channel.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// A `HELLO` is accepted only if its timestamp is within this of the local wall clock.
    /// Default 30 s. Replays inside the window are caught by the replay cache.
    pub hello_window: Duration,
    /// How long an unanswered ephemeral key (ours or the peer's) is kept. Default 60 s.
    pub ephemeral_lifetime: Duration,
    /// A session is dropped (and set up again on the next send) after this. Default 1 h.
    pub session_lifetime: Duration,
    /// Most peers with state (sessions, keys, queued payloads); ~400 B each. Default 8192.
    pub max_peers: usize,
    /// Payloads held per peer while its session is set up (too large for a `HELLO`). Default 8.
    pub max_queued: usize,
    /// Most `HELLO` signatures remembered for replay detection (16 B + 8 B each). Default 65 536.
    pub max_seen_hellos: usize,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            hello_window: Duration::from_secs(30),
            ephemeral_lifetime: Duration::from_secs(60),
            session_lifetime: Duration::from_secs(3600),
            max_peers: 8192,
            max_queued: 8,
            max_seen_hellos: 65_536,
        }
    }
}

/// Why a received packet was dropped. Every variant but [`ChannelError::Local`] means the
/// sender misbehaved, the packet was damaged, or it is stale.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChannelError {
    /// Shorter than its header, longer than [`MAX_PACKET`], or lengths that do not add up.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// A version other than [`VERSION`].
    #[error("unsupported channel version {0}")]
    UnsupportedVersion(u8),
    /// An unknown packet type.
    #[error("unknown packet type {0}")]
    UnknownType(u8),
    /// The hello names another node as its target.
    #[error("hello for another node")]
    WrongTarget,
    /// The hello's timestamp is outside the window, or older than this node's start.
    #[error("stale hello")]
    Stale,
    /// A hello already seen, or a `DATA` counter already seen or left of the window.
    #[error("replayed packet")]
    Replayed,
    /// The certificate does not parse, or its node id does not match its key.
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    /// The certificate does not verify to the overlay CA.
    #[error("certificate not from the overlay CA: {0}")]
    Untrusted(String),
    /// The certificate expired.
    #[error("certificate expired")]
    Expired,
    /// The sender is on the deny-set.
    #[error("node {0} is revoked")]
    Revoked(NodeId),
    /// The signature does not verify.
    #[error("bad hello signature")]
    BadSignature,
    /// The hello carries this node's own certificate.
    #[error("packet from ourselves")]
    FromSelf,
    /// No session with that id (the peer has one we forgot, e.g. we restarted).
    #[error("unknown session")]
    UnknownSession,
    /// The sealed payload does not open (tampered, or not for this key).
    #[error("packet does not decrypt")]
    Decrypt,
    /// A local failure (key generation, randomness, key agreement).
    #[error("local failure: {0}")]
    Local(&'static str),
}

/// Why a payload was not sent.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// Over [`MAX_PAYLOAD`].
    #[error("payload of {0} B over the limit")]
    TooLarge(usize),
    /// A local failure (key generation, randomness, key agreement).
    #[error("local failure: {0}")]
    Local(&'static str),
}

/// A payload that arrived authenticated.
#[derive(Debug)]
pub struct Received {
    /// The sender's certificate (checked: CA chain, node id, expiry, deny-set).
    pub peer: Arc<CertInfo>,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Counters of one channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// `HELLO`s sent.
    pub hellos_sent: u64,
    /// `HELLO`s accepted.
    pub hellos_received: u64,
    /// `DATA` packets sent.
    pub data_sent: u64,
    /// `DATA` packets accepted.
    pub data_received: u64,
    /// Sessions set up.
    pub sessions: u64,
    /// Certificate chains verified (cache misses).
    pub chains_verified: u64,
    /// Packets dropped (any [`ChannelError`]).
    pub dropped: u64,
    /// Payloads dropped from a full set-up queue.
    pub queue_dropped: u64,
}

struct Pending {
    key: EphemeralPrivateKey,
    public: [u8; 32],
    born: Instant,
}

struct Session {
    sid: u64,
    send_key: LessSafeKey,
    recv_key: LessSafeKey,
    my_eph: [u8; 32],
    their_eph: [u8; 32],
    /// The peer holds the session too (it sent `DATA` on it, or derived it from our echo).
    confirmed: bool,
    next_counter: u64,
    window: ReplayWindow,
    born: Instant,
}

#[derive(Default)]
struct Peer {
    cert: Option<(Arc<CertInfo>, [u8; 32])>,
    pending: Option<Pending>,
    theirs: Option<([u8; 32], Instant)>,
    session: Option<Session>,
    queue: VecDeque<Vec<u8>>,
    addr: Option<SocketAddr>,
    last_used: Option<Instant>,
}

/// Sliding window of the last 64 counters (RFC 4303 §3.4.3 style).
#[derive(Default)]
struct ReplayWindow {
    /// Highest counter accepted + 1 (0: none yet).
    top: u64,
    bits: u64,
}

impl ReplayWindow {
    fn check(&self, c: u64) -> bool {
        if c >= self.top {
            return true;
        }
        let back = self.top - 1 - c;
        back < 64 && self.bits & (1 << back) == 0
    }

    fn commit(&mut self, c: u64) {
        if c >= self.top {
            let shift = c + 1 - self.top;
            self.bits = if shift >= 64 { 0 } else { self.bits << shift };
            self.bits |= 1;
            self.top = c + 1;
        } else {
            self.bits |= 1 << (self.top - 1 - c);
        }
    }
}

/// Who this node is, for the channel.
pub struct LocalIdentity {
    /// This node's id.
    pub node_id: NodeId,
    /// This node's leaf certificate (DER), sent in every `HELLO`.
    pub cert: Vec<u8>,
    /// The node key (the key of `cert`).
    pub key: Ed25519KeyPair,
}

/// The membership channel of one node (see the module doc).
pub struct Channel {
    me: LocalIdentity,
    verifier: Arc<dyn ClientCertVerifier>,
    deny: DenySet,
    config: ChannelConfig,
    started_unix_ms: u64,
    rng: SystemRandom,
    certs: HashMap<[u8; 32], (Arc<CertInfo>, [u8; 32])>,
    peers: HashMap<NodeId, Peer>,
    sessions: HashMap<u64, NodeId>,
    /// Peers with a confirmed session, for O(1) random choice ([`Channel::session_peer`]).
    neighbours: Vec<NodeId>,
    neighbour_at: HashMap<NodeId, usize>,
    seen: HashMap<[u8; 16], u64>,
    seen_order: VecDeque<([u8; 16], u64)>,
    /// Hellos at or before this timestamp are refused (the replay cache forgot them).
    seen_floor: u64,
    out: VecDeque<(SocketAddr, Vec<u8>)>,
    stats: ChannelStats,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("node_id", &self.me.node_id)
            .field("peers", &self.peers.len())
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

struct Hello<'a> {
    target: [u8; 20],
    ts: u64,
    eph: [u8; 32],
    echo: Option<[u8; 32]>,
    cert: &'a [u8],
    payload: &'a [u8],
    signed: &'a [u8],
    sig: &'a [u8],
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], ChannelError> {
    if buf.len() < n {
        return Err(ChannelError::Malformed("truncated"));
    }
    let (a, b) = buf.split_at(n);
    *buf = b;
    Ok(a)
}

fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    a
}

fn parse_hello(packet: &[u8]) -> Result<Hello<'_>, ChannelError> {
    if packet.len() < HELLO_FIXED {
        return Err(ChannelError::Malformed("short hello"));
    }
    let sig_at = packet.len() - 64;
    let mut b = &packet[PREFIX..sig_at];
    let target = arr(take(&mut b, 20)?);
    let ts = u64::from_be_bytes(arr(take(&mut b, 8)?));
    let _seq = take(&mut b, 4)?;
    let eph = arr(take(&mut b, 32)?);
    let echo: [u8; 32] = arr(take(&mut b, 32)?);
    let cert_len = usize::from(u16::from_be_bytes(arr(take(&mut b, 2)?)));
    if cert_len == 0 || cert_len > MAX_CERT {
        return Err(ChannelError::Malformed("certificate length"));
    }
    let cert = take(&mut b, cert_len)?;
    let payload_len = usize::from(u16::from_be_bytes(arr(take(&mut b, 2)?)));
    let payload = take(&mut b, payload_len)?;
    if !b.is_empty() {
        return Err(ChannelError::Malformed("trailing bytes"));
    }
    Ok(Hello {
        target,
        ts,
        eph,
        echo: (echo != [0u8; 32]).then_some(echo),
        cert,
        payload,
        signed: &packet[..sig_at],
        sig: &packet[sig_at..],
    })
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

impl Channel {
    /// A channel for `me`, trusting certificates that `verifier` accepts (the overlay CA) and
    /// refusing nodes on `deny`. `started_unix_ms` is this node's start (hellos from before it
    /// are refused: they cannot be for this run).
    pub fn new(
        me: LocalIdentity,
        verifier: Arc<dyn ClientCertVerifier>,
        deny: DenySet,
        config: ChannelConfig,
        started_unix_ms: u64,
    ) -> Self {
        Self {
            me,
            verifier,
            deny,
            config,
            started_unix_ms,
            rng: SystemRandom::new(),
            certs: HashMap::new(),
            peers: HashMap::new(),
            sessions: HashMap::new(),
            neighbours: Vec::new(),
            neighbour_at: HashMap::new(),
            seen: HashMap::new(),
            seen_order: VecDeque::new(),
            seen_floor: 0,
            out: VecDeque::new(),
            stats: ChannelStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> ChannelStats {
        self.stats
    }

    /// Next packet to put on the wire.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.out.pop_front()
    }

    /// Forgets everything about `node` (it restarted, or was revoked): the next send starts a
    /// new session.
    pub fn forget(&mut self, node: NodeId) {
        self.drop_session(node);
        self.peers.remove(&node);
    }

    /// Number of peers with a confirmed session.
    pub fn session_peers(&self) -> usize {
        self.neighbours.len()
    }

    /// The `i % n`-th of the `n` peers with a confirmed session (the caller brings the
    /// randomness), if any.
    pub fn session_peer(&self, i: usize) -> Option<NodeId> {
        if self.neighbours.is_empty() {
            return None;
        }
        Some(self.neighbours[i % self.neighbours.len()])
    }

    fn add_neighbour(&mut self, node: NodeId) {
        if !self.neighbour_at.contains_key(&node) {
            self.neighbour_at.insert(node, self.neighbours.len());
            self.neighbours.push(node);
        }
    }

    fn drop_session(&mut self, node: NodeId) {
        let sid = self
            .peers
            .get_mut(&node)
            .and_then(|p| p.session.take())
            .map(|s| s.sid);
        if let Some(sid) = sid {
            self.sessions.remove(&sid);
        }
        if let Some(i) = self.neighbour_at.remove(&node) {
            self.neighbours.swap_remove(i);
            if let Some(moved) = self.neighbours.get(i) {
                self.neighbour_at.insert(*moved, i);
            }
        }
    }

    fn confirm(&mut self, node: NodeId) {
        let newly = self
            .peers
            .get_mut(&node)
            .and_then(|p| p.session.as_mut())
            .is_some_and(|s| !std::mem::replace(&mut s.confirmed, true));
        if newly {
            self.add_neighbour(node);
        }
    }

    /// Whether a confirmed session with `node` exists.
    pub fn has_session(&self, node: NodeId) -> bool {
        self.peers
            .get(&node)
            .and_then(|p| p.session.as_ref())
            .is_some_and(|s| s.confirmed)
    }

    fn peer_mut(&mut self, node: NodeId, now: Instant) -> &mut Peer {
        if !self.peers.contains_key(&node) && self.peers.len() >= self.config.max_peers {
            // Least recently used out (ties by node id, so the choice is reproducible).
            let victim = self
                .peers
                .iter()
                .min_by_key(|(id, p)| (p.last_used, **id))
                .map(|(id, _)| *id);
            if let Some(v) = victim {
                self.forget(v);
            }
        }
        let p = self.peers.entry(node).or_default();
        p.last_used = Some(now);
        p
    }

    /// Sends `payload` to `to` at `addr`: sealed on an established session, else signed in a
    /// `HELLO` (queued, with an empty `HELLO` sent, when it does not fit one).
    pub fn send(
        &mut self,
        now: Instant,
        unix_ms: u64,
        to: NodeId,
        addr: SocketAddr,
        payload: &[u8],
    ) -> Result<(), SendError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(SendError::TooLarge(payload.len()));
        }
        if to == self.me.node_id {
            return Ok(());
        }
        let lifetime = self.config.session_lifetime;
        let p = self.peer_mut(to, now);
        p.addr = Some(addr);
        if p.session
            .as_ref()
            .is_some_and(|s| now.duration_since(s.born) >= lifetime)
        {
            self.drop_session(to);
        }
        let p = self.peer_mut(to, now);
        if let Some(s) = &p.session {
            if s.confirmed {
                self.seal(to, addr, payload);
                return Ok(());
            }
        }
        self.ensure_session_or_pending(now, to)?;
        if self.hello_len(payload.len()) > MAX_PACKET {
            let max = self.config.max_queued;
            let p = self.peer_mut(to, now);
            let full = p.queue.len() >= max;
            if full {
                p.queue.pop_front();
            }
            p.queue.push_back(payload.to_vec());
            if full {
                self.stats.queue_dropped += 1;
            }
            self.hello(unix_ms, to, addr, &[]);
        } else {
            self.hello(unix_ms, to, addr, payload);
        }
        Ok(())
    }

    fn hello_len(&self, payload: usize) -> usize {
        HELLO_FIXED + self.me.cert.len() + payload
    }

    /// Makes sure we hold either a session (maybe unconfirmed) or a pending ephemeral key for
    /// `to`: derives the session when the peer's ephemeral key is known.
    fn ensure_session_or_pending(&mut self, now: Instant, to: NodeId) -> Result<(), SendError> {
        let life = self.config.ephemeral_lifetime;
        let p = self.peer_mut(to, now);
        if p.session.is_some() {
            return Ok(());
        }
        if p.pending
            .as_ref()
            .is_some_and(|k| now.duration_since(k.born) >= life)
        {
            p.pending = None;
        }
        if p.theirs
            .as_ref()
            .is_some_and(|(_, t)| now.duration_since(*t) >= life)
        {
            p.theirs = None;
        }
        if p.pending.is_none() {
            let key = EphemeralPrivateKey::generate(&X25519, &self.rng)
                .map_err(|_| SendError::Local("ephemeral key"))?;
            let public = key
                .compute_public_key()
                .map_err(|_| SendError::Local("ephemeral key"))?;
            let public = arr(public.as_ref());
            self.peer_mut(to, now).pending = Some(Pending {
                key,
                public,
                born: now,
            });
        }
        let p = self.peer_mut(to, now);
        if let Some((theirs, _)) = p.theirs.take() {
            if let Some(mine) = p.pending.take() {
                self.derive(now, to, mine, theirs, false)
                    .map_err(|_| SendError::Local("key agreement"))?;
            }
        }
        Ok(())
    }

    /// Derives the session with `to` from our ephemeral key and theirs.
    fn derive(
        &mut self,
        now: Instant,
        to: NodeId,
        mine: Pending,
        theirs: [u8; 32],
        confirmed: bool,
    ) -> Result<(), ChannelError> {
        let me = self.me.node_id;
        let (lo, hi, lo_eph, hi_eph) = if me < to {
            (me, to, mine.public, theirs)
        } else {
            (to, me, theirs, mine.public)
        };
        let my_pub = mine.public;
        let mut okm = [0u8; 72];
        agreement::agree_ephemeral(mine.key, &UnparsedPublicKey::new(&X25519, theirs), |dh| {
            let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT).extract(dh);
            let info: [&[u8]; 5] = [KDF_LABEL, lo.as_bytes(), hi.as_bytes(), &lo_eph, &hi_eph];
            prk.expand(&info, Len(okm.len()))
                .and_then(|o| o.fill(&mut okm))
        })
        .map_err(|_| ChannelError::Local("key agreement"))?
        .map_err(|_| ChannelError::Local("key derivation"))?;
        let key = |k: &[u8]| {
            UnboundKey::new(&CHACHA20_POLY1305, k)
                .map(LessSafeKey::new)
                .map_err(|_| ChannelError::Local("aead key"))
        };
        let (lo_to_hi, hi_to_lo) = (key(&okm[..32])?, key(&okm[32..64])?);
        let (send_key, recv_key) = if me < to {
            (lo_to_hi, hi_to_lo)
        } else {
            (hi_to_lo, lo_to_hi)
        };
        let sid = u64::from_be_bytes(arr(&okm[64..72]));
        okm.fill(0);
        self.drop_session(to);
        let p = self.peer_mut(to, now);
        p.session = Some(Session {
            sid,
            send_key,
            recv_key,
            my_eph: my_pub,
            their_eph: theirs,
            confirmed: false,
            next_counter: 0,
            window: ReplayWindow::default(),
            born: now,
        });
        self.sessions.insert(sid, to);
        self.stats.sessions += 1;
        if confirmed {
            self.confirm(to);
        }
        Ok(())
    }

    /// Queues a `HELLO` to `to`: our pending key (or the session's) and the echo.
    fn hello(&mut self, unix_ms: u64, to: NodeId, addr: SocketAddr, payload: &[u8]) {
        let Some(p) = self.peers.get(&to) else {
            return;
        };
        let (eph, echo) = match (&p.session, &p.pending) {
            (Some(s), _) => (s.my_eph, s.their_eph),
            (None, Some(k)) => (k.public, [0u8; 32]),
            (None, None) => return,
        };
        let cert = &self.me.cert;
        let mut b = Vec::with_capacity(HELLO_FIXED + cert.len() + payload.len());
        b.extend_from_slice(&[MARKER, VERSION, TYPE_HELLO]);
        b.extend_from_slice(to.as_bytes());
        b.extend_from_slice(&unix_ms.to_be_bytes());
        // Two hellos of one millisecond with the same payload still differ (and so do their
        // signatures, which the receiver's replay cache is keyed on).
        b.extend_from_slice(&(self.stats.hellos_sent as u32).to_be_bytes());
        b.extend_from_slice(&eph);
        b.extend_from_slice(&echo);
        b.extend_from_slice(&(cert.len() as u16).to_be_bytes());
        b.extend_from_slice(cert);
        b.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        b.extend_from_slice(payload);
        let mut msg = Vec::with_capacity(HELLO_CONTEXT.len() + b.len());
        msg.extend_from_slice(HELLO_CONTEXT);
        msg.extend_from_slice(&b);
        let sig = self.me.key.sign(&msg);
        b.extend_from_slice(sig.as_ref());
        self.stats.hellos_sent += 1;
        self.out.push_back((addr, b));
    }

    /// Queues a `DATA` packet on the session with `to`.
    fn seal(&mut self, to: NodeId, addr: SocketAddr, payload: &[u8]) {
        let Some(s) = self.peers.get_mut(&to).and_then(|p| p.session.as_mut()) else {
            return;
        };
        let counter = s.next_counter;
        if counter == u64::MAX {
            // Never reused; the session must be set up anew (not reachable in practice).
            return;
        }
        s.next_counter += 1;
        let mut b = Vec::with_capacity(DATA_HEADER + payload.len() + TAG);
        b.extend_from_slice(&[MARKER, VERSION, TYPE_DATA]);
        b.extend_from_slice(&s.sid.to_be_bytes());
        b.extend_from_slice(&counter.to_be_bytes());
        let mut body = payload.to_vec();
        let aad: [u8; DATA_HEADER] = arr(&b);
        if s.send_key
            .seal_in_place_append_tag(nonce(counter), Aad::from(&aad), &mut body)
            .is_err()
        {
            return;
        }
        b.extend_from_slice(&body);
        self.stats.data_sent += 1;
        self.out.push_back((addr, b));
    }

    /// Sends what waited for the session with `to` (or an empty `DATA` that confirms it).
    fn flush(&mut self, to: NodeId, addr: SocketAddr) {
        let (queued, addr) = match self.peers.get_mut(&to) {
            Some(p) => (std::mem::take(&mut p.queue), p.addr.unwrap_or(addr)),
            None => return,
        };
        if queued.is_empty() {
            self.seal(to, addr, &[]);
        }
        for q in queued {
            self.seal(to, addr, &q);
        }
    }

    /// Handles a datagram that arrived from `from` (an address: not trusted, only replied to).
    /// Returns the payload if one arrived authenticated.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        unix_ms: u64,
        from: SocketAddr,
        packet: &[u8],
    ) -> Result<Option<Received>, ChannelError> {
        let r = self.handle_inner(now, unix_ms, from, packet);
        if r.is_err() {
            self.stats.dropped += 1;
        }
        r
    }

    fn handle_inner(
        &mut self,
        now: Instant,
        unix_ms: u64,
        from: SocketAddr,
        packet: &[u8],
    ) -> Result<Option<Received>, ChannelError> {
        if packet.len() < PREFIX || packet.len() > MAX_PACKET || packet[0] != MARKER {
            return Err(ChannelError::Malformed("length or marker"));
        }
        if packet[1] != VERSION {
            return Err(ChannelError::UnsupportedVersion(packet[1]));
        }
        match packet[2] {
            TYPE_HELLO => self.handle_hello(now, unix_ms, from, packet),
            TYPE_DATA => self.handle_data(now, unix_ms, from, packet),
            t => Err(ChannelError::UnknownType(t)),
        }
    }

    fn check_peer(&self, info: &CertInfo, unix_ms: u64) -> Result<(), ChannelError> {
        if info.not_after_unix.saturating_mul(1000) < unix_ms as i64 {
            return Err(ChannelError::Expired);
        }
        if self.deny.is_denied(info) {
            return Err(ChannelError::Revoked(info.node_id));
        }
        Ok(())
    }

    /// The certificate's checked identity and key; the CA chain is verified once per
    /// certificate (by hash), expiry and the deny-set by the caller on every packet.
    fn verify_cert(
        &mut self,
        der: &[u8],
        unix_ms: u64,
    ) -> Result<(Arc<CertInfo>, [u8; 32]), ChannelError> {
        let hash: [u8; 32] = Sha256::digest(der).into();
        if let Some(c) = self.certs.get(&hash) {
            return Ok(c.clone());
        }
        let (info, key) =
            parse_node_cert_key(der).map_err(|e| ChannelError::BadCertificate(e.to_string()))?;
        let now = UnixTime::since_unix_epoch(Duration::from_millis(unix_ms));
        self.verifier
            .verify_client_cert(&CertificateDer::from(der), &[], now)
            .map_err(|e| ChannelError::Untrusted(e.to_string()))?;
        self.stats.chains_verified += 1;
        if self.certs.len() >= self.config.max_peers * 2 {
            self.certs.clear();
        }
        let entry = (Arc::new(info), key);
        self.certs.insert(hash, entry.clone());
        Ok(entry)
    }

    fn remember_hello(&mut self, key: [u8; 16], ts: u64, unix_ms: u64) {
        let window = self.config.hello_window.as_millis() as u64;
        while let Some((k, t)) = self.seen_order.front().copied() {
            if t.saturating_add(window) >= unix_ms
                && self.seen_order.len() < self.config.max_seen_hellos
            {
                break;
            }
            self.seen_order.pop_front();
            self.seen.remove(&k);
            if t.saturating_add(window) >= unix_ms {
                // Forgotten while still inside the window: refuse anything as old.
                self.seen_floor = self.seen_floor.max(t);
            }
        }
        self.seen.insert(key, ts);
        self.seen_order.push_back((key, ts));
    }

    fn handle_hello(
        &mut self,
        now: Instant,
        unix_ms: u64,
        from: SocketAddr,
        packet: &[u8],
    ) -> Result<Option<Received>, ChannelError> {
        let h = parse_hello(packet)?;
        if h.target != *self.me.node_id.as_bytes() {
            return Err(ChannelError::WrongTarget);
        }
        let window = self.config.hello_window.as_millis() as u64;
        if h.ts.saturating_add(window) < unix_ms
            || h.ts > unix_ms.saturating_add(window)
            || h.ts.saturating_add(START_SKEW_MS) < self.started_unix_ms
            || h.ts <= self.seen_floor
        {
            return Err(ChannelError::Stale);
        }
        let seen_key: [u8; 16] = arr(&h.sig[..16]);
        if self.seen.contains_key(&seen_key) {
            return Err(ChannelError::Replayed);
        }
        let (info, key) = self.verify_cert(h.cert, unix_ms)?;
        if info.node_id == self.me.node_id {
            return Err(ChannelError::FromSelf);
        }
        self.check_peer(&info, unix_ms)?;
        let mut msg = Vec::with_capacity(HELLO_CONTEXT.len() + h.signed.len());
        msg.extend_from_slice(HELLO_CONTEXT);
        msg.extend_from_slice(h.signed);
        signature::UnparsedPublicKey::new(&signature::ED25519, key)
            .verify(&msg, h.sig)
            .map_err(|_| ChannelError::BadSignature)?;
        self.remember_hello(seen_key, h.ts, unix_ms);
        self.stats.hellos_received += 1;
        let peer = info.node_id;
        let p = self.peer_mut(peer, now);
        p.cert = Some((info.clone(), key));
        if p.addr.is_none() {
            p.addr = Some(from);
        }
        let reply_to = p.addr.unwrap_or(from);
        match h.echo {
            Some(echo) => {
                let pending_matches = p.pending.as_ref().is_some_and(|k| k.public == echo);
                let same_session = p
                    .session
                    .as_ref()
                    .is_some_and(|s| s.my_eph == echo && s.their_eph == h.eph);
                if pending_matches {
                    // It answered our hello: the session is set up on both sides.
                    if let Some(mine) = p.pending.take() {
                        self.derive(now, peer, mine, h.eph, true)?;
                        self.flush(peer, reply_to);
                    }
                } else if same_session {
                    // It holds the session but has not seen our DATA yet: confirm it.
                    self.confirm(peer);
                    self.flush(peer, reply_to);
                } else {
                    // It answers a key we no longer hold (we restarted or it is old): start
                    // over; an empty hello asks it for a fresh echo.
                    self.drop_session(peer);
                    self.peer_mut(peer, now).theirs = None;
                    if self.ensure_session_or_pending(now, peer).is_ok() {
                        self.hello(unix_ms, peer, reply_to, &[]);
                    }
                }
            }
            None => {
                let older_of_ours = p.session.as_ref().is_some_and(|s| s.their_eph == h.eph);
                if !older_of_ours {
                    // A fresh key: the peer holds no session with us (it restarted, or this is
                    // first contact). Ours is useless to it.
                    p.theirs = Some((h.eph, now));
                    self.drop_session(peer);
                    let wants_echo = h.payload.is_empty();
                    let queued = !self.peer_mut(peer, now).queue.is_empty();
                    if (wants_echo || queued) && self.ensure_session_or_pending(now, peer).is_ok() {
                        self.hello(unix_ms, peer, reply_to, &[]);
                    }
                }
            }
        }
        if h.payload.is_empty() {
            return Ok(None);
        }
        Ok(Some(Received {
            peer: info,
            payload: h.payload.to_vec(),
        }))
    }

    fn handle_data(
        &mut self,
        now: Instant,
        unix_ms: u64,
        from: SocketAddr,
        packet: &[u8],
    ) -> Result<Option<Received>, ChannelError> {
        if packet.len() < DATA_HEADER + TAG {
            return Err(ChannelError::Malformed("short data"));
        }
        let sid = u64::from_be_bytes(arr(&packet[3..11]));
        let counter = u64::from_be_bytes(arr(&packet[11..19]));
        let peer = *self
            .sessions
            .get(&sid)
            .ok_or(ChannelError::UnknownSession)?;
        let lifetime = self.config.session_lifetime;
        let (info, was_confirmed, body) = {
            let p = self
                .peers
                .get_mut(&peer)
                .ok_or(ChannelError::UnknownSession)?;
            let info = p
                .cert
                .as_ref()
                .map(|(c, _)| c.clone())
                .ok_or(ChannelError::UnknownSession)?;
            let s = p
                .session
                .as_mut()
                .filter(|s| s.sid == sid)
                .ok_or(ChannelError::UnknownSession)?;
            if now.duration_since(s.born) >= lifetime {
                return Err(ChannelError::UnknownSession);
            }
            if !s.window.check(counter) {
                return Err(ChannelError::Replayed);
            }
            let mut body = packet[DATA_HEADER..].to_vec();
            let aad: [u8; DATA_HEADER] = arr(&packet[..DATA_HEADER]);
            let len = s
                .recv_key
                .open_in_place(nonce(counter), Aad::from(&aad), &mut body)
                .map_err(|_| ChannelError::Decrypt)?
                .len();
            body.truncate(len);
            s.window.commit(counter);
            let was = s.confirmed;
            p.last_used = Some(now);
            (info, was, body)
        };
        self.confirm(peer);
        self.check_peer(&info, unix_ms)?;
        self.stats.data_received += 1;
        if !was_confirmed {
            let has_queue = self.peers.get(&peer).is_some_and(|p| !p.queue.is_empty());
            if has_queue {
                self.flush(peer, from);
            }
        }
        if body.is_empty() {
            return Ok(None);
        }
        Ok(Some(Received {
            peer: info,
            payload: body,
        }))
    }
}

/// Builds a channel's [`LocalIdentity`] from a node identity.
pub fn local_identity(id: &crate::identity::NodeIdentity) -> Result<LocalIdentity, String> {
    let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(id.key.secret_der())
        .map_err(|e| e.to_string())?;
    let cert = id
        .chain
        .first()
        .ok_or_else(|| "no certificate".to_owned())?
        .to_vec();
    if cert.len() > MAX_CERT {
        return Err(format!("certificate of {} B over {MAX_CERT}", cert.len()));
    }
    Ok(LocalIdentity {
        node_id: id.info.node_id,
        cert,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{generate_ca, CaMaterial, NodeIdentity, Validity};
    use proptest::prelude::*;
    use time::OffsetDateTime;

    const T0: u64 = 1_800_000_000_000;

    fn day0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp((T0 / 1000) as i64).expect("valid")
    }

    fn ca(name: &str) -> CaMaterial {
        generate_ca(name, Validity::days_from(day0(), 10).expect("validity")).expect("ca")
    }

    fn ident(ca: &CaMaterial, name: &str) -> NodeIdentity {
        NodeIdentity::issue(ca, name, Validity::days_from(day0(), 5).expect("validity"))
            .expect("identity")
    }

    fn channel(id: &NodeIdentity, deny: DenySet) -> Channel {
        Channel::new(
            local_identity(id).expect("local identity"),
            crate::tls::chain_verifier(id).expect("verifier"),
            deny,
            ChannelConfig::default(),
            T0,
        )
    }

    fn addr(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], n))
    }

    struct Pair {
        a: Channel,
        b: Channel,
        a_id: NodeId,
        b_id: NodeId,
        now: Instant,
        /// Every packet that crossed, for replay tests: (to b?, bytes).
        log: Vec<(bool, Vec<u8>)>,
    }

    impl Pair {
        fn new() -> Self {
            let ca = ca("ca");
            let (ia, ib) = (ident(&ca, "alpha"), ident(&ca, "beta"));
            Self {
                a: channel(&ia, DenySet::default()),
                b: channel(&ib, DenySet::default()),
                a_id: ia.node_id(),
                b_id: ib.node_id(),
                now: Instant::now(),
                log: Vec::new(),
            }
        }

        /// Delivers every queued packet both ways; returns what each side received.
        fn pump(&mut self) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
            let (mut at_a, mut at_b) = (Vec::new(), Vec::new());
            for _ in 0..10 {
                let mut moved = false;
                while let Some((to, p)) = self.a.poll_transmit() {
                    assert_eq!(to, addr(2));
                    self.log.push((true, p.clone()));
                    if let Ok(Some(r)) = self.b.handle_packet(self.now, T0, addr(1), &p) {
                        assert_eq!(r.peer.node_id, self.a_id);
                        at_b.push(r.payload);
                    }
                    moved = true;
                }
                while let Some((_, p)) = self.b.poll_transmit() {
                    self.log.push((false, p.clone()));
                    if let Ok(Some(r)) = self.a.handle_packet(self.now, T0, addr(2), &p) {
                        assert_eq!(r.peer.node_id, self.b_id);
                        at_a.push(r.payload);
                    }
                    moved = true;
                }
                if !moved {
                    break;
                }
            }
            (at_a, at_b)
        }

        fn a_to_b(&mut self, payload: &[u8]) {
            self.a
                .send(self.now, T0, self.b_id, addr(2), payload)
                .expect("send");
        }

        fn b_to_a(&mut self, payload: &[u8]) {
            self.b
                .send(self.now, T0, self.a_id, addr(1), payload)
                .expect("send");
        }

        fn established(mut self) -> Self {
            self.a_to_b(b"ping");
            let (_, at_b) = self.pump();
            assert_eq!(at_b, vec![b"ping".to_vec()]);
            self.b_to_a(b"ack");
            let (at_a, _) = self.pump();
            assert_eq!(at_a, vec![b"ack".to_vec()]);
            assert!(self.a.has_session(self.b_id) && self.b.has_session(self.a_id));
            self.log.clear();
            self
        }
    }

    #[test]
    fn first_contact_is_a_signed_hello_then_sessions_seal() {
        let mut p = Pair::new().established();
        for i in 0..5u8 {
            p.a_to_b(&[i; 100]);
            p.b_to_a(&[i; 50]);
        }
        let (at_a, at_b) = p.pump();
        assert_eq!(at_b.len(), 5);
        assert_eq!(at_a.len(), 5);
        assert!(
            p.log.iter().all(|(_, b)| b[2] == TYPE_DATA),
            "sealed after set-up"
        );
        assert_eq!(p.a.stats().sessions, 1);
        assert_eq!(p.b.stats().sessions, 1);
        assert_eq!(p.a.stats().chains_verified, 1);
    }

    #[test]
    fn one_way_traffic_stays_signed_until_answered() {
        let mut p = Pair::new();
        for _ in 0..3 {
            p.a_to_b(b"gossip");
        }
        let (_, at_b) = p.pump();
        assert_eq!(at_b.len(), 3);
        assert_eq!(p.b.stats().chains_verified, 1, "chain verified once");
        assert!(!p.a.has_session(p.b_id));
        p.b_to_a(b"reply");
        p.pump();
        assert!(p.a.has_session(p.b_id) && p.b.has_session(p.a_id));
    }

    #[test]
    fn large_payload_waits_for_the_session() {
        let mut p = Pair::new();
        let big = vec![7u8; 1200];
        p.a_to_b(&big);
        let (_, at_b) = p.pump();
        assert_eq!(at_b, vec![big]);
        assert!(p.a.has_session(p.b_id) && p.b.has_session(p.a_id));
    }

    #[test]
    fn simultaneous_first_contact_converges() {
        let mut p = Pair::new();
        p.a_to_b(b"a1");
        p.b_to_a(b"b1");
        let (at_a, at_b) = p.pump();
        assert_eq!((at_a.len(), at_b.len()), (1, 1));
        p.a_to_b(b"a2");
        p.b_to_a(b"b2");
        let (at_a, at_b) = p.pump();
        assert_eq!((at_a.len(), at_b.len()), (1, 1));
        p.a_to_b(b"a3");
        p.b_to_a(b"b3");
        p.log.clear();
        let (at_a, at_b) = p.pump();
        assert_eq!((at_a, at_b), (vec![b"b3".to_vec()], vec![b"a3".to_vec()]));
        assert!(p.log.iter().all(|(_, b)| b[2] == TYPE_DATA));
    }

    #[test]
    fn tampered_data_is_dropped() {
        let mut p = Pair::new().established();
        p.a_to_b(b"secret");
        let (_, pkt) = p.a.poll_transmit().expect("packet");
        for i in 3..pkt.len() {
            let mut bad = pkt.clone();
            bad[i] ^= 0x01;
            assert!(
                p.b.handle_packet(p.now, T0, addr(1), &bad).is_err(),
                "byte {i}"
            );
        }
        let r =
            p.b.handle_packet(p.now, T0, addr(1), &pkt)
                .expect("genuine");
        assert_eq!(r.expect("payload").payload, b"secret");
    }

    #[test]
    fn replayed_data_and_hellos_are_dropped() {
        let mut p = Pair::new();
        p.a_to_b(b"hello payload");
        let (_, hello) = p.a.poll_transmit().expect("hello");
        assert!(p.b.handle_packet(p.now, T0, addr(1), &hello).is_ok());
        assert_eq!(
            p.b.handle_packet(p.now, T0, addr(1), &hello).err(),
            Some(ChannelError::Replayed)
        );
        let mut p = p.established();
        for i in 0..70u8 {
            p.a_to_b(&[i]);
        }
        let pkts: Vec<_> = std::iter::from_fn(|| p.a.poll_transmit()).collect();
        // Deliver out of order (the last 60, reversed), then replay them all.
        for (_, pkt) in pkts.iter().rev().take(60) {
            assert!(p.b.handle_packet(p.now, T0, addr(1), pkt).is_ok());
        }
        for (_, pkt) in &pkts[10..] {
            assert_eq!(
                p.b.handle_packet(p.now, T0, addr(1), pkt).err(),
                Some(ChannelError::Replayed)
            );
        }
        // Never delivered but left of the 64-packet window: refused as well.
        for (_, pkt) in &pkts[..6] {
            assert_eq!(
                p.b.handle_packet(p.now, T0, addr(1), pkt).err(),
                Some(ChannelError::Replayed)
            );
        }
    }

    #[test]
    fn stale_or_misdirected_hellos_are_dropped() {
        let ca = ca("ca");
        let (ia, ib, ic) = (ident(&ca, "alpha"), ident(&ca, "beta"), ident(&ca, "gamma"));
        let mut a = channel(&ia, DenySet::default());
        let mut b = channel(&ib, DenySet::default());
        let mut c = channel(&ic, DenySet::default());
        let now = Instant::now();
        // Sent long ago: outside the window.
        a.send(now, T0 - 120_000, ib.node_id(), addr(2), b"x")
            .expect("send");
        let (_, old) = a.poll_transmit().expect("hello");
        assert_eq!(
            b.handle_packet(now, T0, addr(1), &old).err(),
            Some(ChannelError::Stale)
        );
        // For b, delivered to c.
        a.send(now, T0, ib.node_id(), addr(2), b"x").expect("send");
        let (_, h) = a.poll_transmit().expect("hello");
        assert_eq!(
            c.handle_packet(now, T0, addr(1), &h).err(),
            Some(ChannelError::WrongTarget)
        );
    }

    #[test]
    fn forged_hellos_are_dropped() {
        let ca = ca("ca");
        let (ia, ib, im) = (
            ident(&ca, "alpha"),
            ident(&ca, "beta"),
            ident(&ca, "mallory"),
        );
        let mut b = channel(&ib, DenySet::default());
        let now = Instant::now();
        // Mallory (a member) sends a hello carrying alpha's certificate, signed with her key.
        let mut forged = local_identity(&im).expect("identity");
        forged.cert = ia.chain[0].to_vec();
        forged.node_id = ia.node_id();
        let mut m = Channel::new(
            forged,
            crate::tls::chain_verifier(&im).expect("verifier"),
            DenySet::default(),
            ChannelConfig::default(),
            T0,
        );
        m.send(now, T0, ib.node_id(), addr(2), b"I am alpha")
            .expect("send");
        let (_, h) = m.poll_transmit().expect("hello");
        assert_eq!(
            b.handle_packet(now, T0, addr(3), &h).err(),
            Some(ChannelError::BadSignature)
        );
        // A genuine hello with its payload changed.
        let mut a = channel(&ia, DenySet::default());
        a.send(now, T0, ib.node_id(), addr(2), b"genuine")
            .expect("send");
        let (_, mut h) = a.poll_transmit().expect("hello");
        let at = h.len() - 64 - 7;
        h[at..at + 7].copy_from_slice(b"forged!");
        assert_eq!(
            b.handle_packet(now, T0, addr(1), &h).err(),
            Some(ChannelError::BadSignature)
        );
        assert_eq!(b.stats().hellos_received, 0);
    }

    #[test]
    fn a_certificate_not_from_the_ca_cannot_join() {
        let (good, evil) = (ca("ca"), ca("ca"));
        let ib = ident(&good, "beta");
        let outsider = ident(&evil, "outsider");
        let mut b = channel(&ib, DenySet::default());
        // The outsider trusts its own CA; beta trusts only the overlay's.
        let mut o = channel(&outsider, DenySet::default());
        let now = Instant::now();
        o.send(now, T0, ib.node_id(), addr(2), b"let me in")
            .expect("send");
        let (_, h) = o.poll_transmit().expect("hello");
        assert!(matches!(
            b.handle_packet(now, T0, addr(9), &h),
            Err(ChannelError::Untrusted(_))
        ));
    }

    #[test]
    fn revoked_and_expired_peers_are_dropped() {
        let ca = ca("ca");
        let (ia, ib) = (ident(&ca, "alpha"), ident(&ca, "beta"));
        let deny = DenySet::default();
        let mut p = Pair {
            a: channel(&ia, DenySet::default()),
            b: channel(&ib, deny.clone()),
            a_id: ia.node_id(),
            b_id: ib.node_id(),
            now: Instant::now(),
            log: Vec::new(),
        }
        .established();
        deny.deny_node(p.a_id);
        p.a_to_b(b"still here");
        let (_, pkt) = p.a.poll_transmit().expect("data");
        assert_eq!(
            p.b.handle_packet(p.now, T0, addr(1), &pkt).err(),
            Some(ChannelError::Revoked(p.a_id))
        );
        // A fresh hello from the revoked node is refused too.
        let mut a2 = channel(&ia, DenySet::default());
        a2.send(p.now, T0, p.b_id, addr(2), b"again").expect("send");
        let (_, h) = a2.poll_transmit().expect("hello");
        assert_eq!(
            p.b.handle_packet(p.now, T0, addr(1), &h).err(),
            Some(ChannelError::Revoked(p.a_id))
        );
        // Expired: a's certificate is valid for 5 days.
        let mut c = channel(&ib, DenySet::default());
        let later = T0 + 6 * 86_400_000;
        let mut a3 = channel(&ia, DenySet::default());
        a3.send(p.now, later, p.b_id, addr(2), b"old")
            .expect("send");
        let (_, h) = a3.poll_transmit().expect("hello");
        assert!(c.handle_packet(p.now, later, addr(1), &h).is_err());
    }

    #[test]
    fn a_restarted_peer_sets_up_a_new_session() {
        let ca = ca("ca");
        let (ia, ib) = (ident(&ca, "alpha"), ident(&ca, "beta"));
        let mut p = Pair {
            a: channel(&ia, DenySet::default()),
            b: channel(&ib, DenySet::default()),
            a_id: ia.node_id(),
            b_id: ib.node_id(),
            now: Instant::now(),
            log: Vec::new(),
        }
        .established();
        // b restarts: a's DATA is not understood until b talks to a again.
        p.b = channel(&ib, DenySet::default());
        p.a_to_b(b"lost");
        let (_, at_b) = p.pump();
        assert!(at_b.is_empty());
        p.b_to_a(b"i am back");
        let (at_a, _) = p.pump();
        assert_eq!(at_a, vec![b"i am back".to_vec()]);
        p.a_to_b(b"welcome");
        let (_, at_b) = p.pump();
        assert_eq!(at_b, vec![b"welcome".to_vec()]);
        assert!(p.a.has_session(p.b_id) && p.b.has_session(p.a_id));
    }

    #[test]
    fn oversize_payload_is_refused_on_send() {
        let mut p = Pair::new();
        let too_big = vec![0u8; MAX_PAYLOAD + 1];
        assert_eq!(
            p.a.send(p.now, T0, p.b_id, addr(2), &too_big).err(),
            Some(SendError::TooLarge(MAX_PAYLOAD + 1))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn malformed_packets_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..1600),
            kind in 0u8..4,
            cut in 0usize..1600,
            flip in 0usize..1600,
        ) {
            let mut p = Pair::new().established();
            let mut pkt = body.clone();
            if pkt.len() >= 3 {
                pkt[0] = MARKER;
                pkt[1] = VERSION;
                pkt[2] = kind;
            }
            let _ = p.b.handle_packet(p.now, T0, addr(1), &pkt);
            // Truncated and bit-flipped genuine packets.
            p.a_to_b(&body[..body.len().min(MAX_PAYLOAD)]);
            let mut fresh = channel_pair_hello(&p);
            if let Some((_, real)) = p.a.poll_transmit() {
                let mut t = real.clone();
                t.truncate(cut.min(real.len()));
                let _ = p.b.handle_packet(p.now, T0, addr(1), &t);
                let mut f = real.clone();
                let i = flip % f.len();
                f[i] ^= 0x80;
                let _ = p.b.handle_packet(p.now, T0, addr(1), &f);
            }
            if let Some(h) = fresh.take() {
                let mut t = h.clone();
                t.truncate(cut.min(h.len()));
                let _ = p.b.handle_packet(p.now, T0, addr(1), &t);
            }
        }
    }

    /// A genuine first-contact hello from a third node to `p.b`.
    fn channel_pair_hello(p: &Pair) -> Option<Vec<u8>> {
        let ca = ca("other");
        let id = ident(&ca, "gamma");
        let mut c = channel(&id, DenySet::default());
        c.send(p.now, T0, p.b_id, addr(2), b"hi").ok()?;
        c.poll_transmit().map(|(_, b)| b)
    }
}
