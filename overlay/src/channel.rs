//! The membership channel: authenticated membership datagrams on the peer's own UDP socket,
//! beside QUIC, with no QUIC handshake per target (docs/PROTOCOL.md §8). Sans-IO.
//!
//! [`Channel`] is fed received packets with [`Channel::handle_packet`] and payloads to send with
//! [`Channel::send`]; it is drained with [`Channel::poll_transmit`]. It reads no clock and does
//! no I/O: the driver passes `now` (tokio's clock, virtual under netsim) and the wall-clock time
//! in milliseconds (for certificate expiry and hello freshness), and owns the socket.
//!
//! Authentication is by static Diffie–Hellman between the two nodes' certificate keys (the
//! Ed25519 node key, used as an X25519 key): no packet is signed, and a pair of peers costs one
//! scalar multiplication on each side, cached for as long as the peer's certificate is.
//!
//! - **First contact**, when we do not hold the peer's certificate: an `INIT` carrying our
//!   certificate and a fresh nonce, and nothing else (it is not authenticated). The peer checks
//!   the certificate (CA chain once per certificate, expiry and deny-set every time), derives
//!   the pair key and answers with a `HELLO`.
//! - A `HELLO` carries the sender's certificate, its nonce, the nonce it answers (`echo`) and
//!   maybe a payload, and is authenticated with HMAC-SHA256 under a key only the two peers can
//!   derive. A peer whose certificate we hold gets its payload in our first `HELLO`; a first
//!   contact's payloads wait one round trip (`INIT`, `HELLO`, then `DATA`).
//! - Once both nonces are known each side holds a session (HKDF-SHA256 over the pair secret and
//!   both nonces) with one ChaCha20-Poly1305 key per direction, and every packet is a `DATA`:
//!   session id, a per-direction counter (the nonce), the sealed payload; the receiver keeps a
//!   64-packet sliding replay window.
//!
//! An `INIT` never replaces a session: it sets up a *candidate* beside it, which takes over only
//! when the peer proves it holds it (a `DATA` on it, or a `HELLO` echoing it) — anyone who has
//! seen a certificate can send an `INIT` carrying it.
//!
//! Sessions live until either side restarts, [`Channel::forget`] is called, or
//! `session_lifetime` passes; at most `max_peers` peers are kept (least recently used first
//! out).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::hkdf;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use sha2::{Digest, Sha256, Sha512};
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::identity::{parse_node_cert_key, CertInfo, NodeId};
use crate::tls::DenySet;

/// First byte of every membership-channel packet. Both high bits are clear: a QUIC packet always
/// has the fixed bit (0x40) set once greasing is off (RFC 9000 §17, RFC 9287), so the byte
/// tells the two apart before quinn sees the datagram.
pub const MARKER: u8 = 0x2a;
/// Channel protocol version (PROTOCOL.md §8; version 1 signed every hello).
pub const VERSION: u8 = 2;
/// Packet type: authenticated hello.
pub const TYPE_HELLO: u8 = 1;
/// Packet type: sealed data.
pub const TYPE_DATA: u8 = 2;
/// Packet type: first contact (certificate and nonce, not authenticated).
pub const TYPE_INIT: u8 = 3;
/// Largest channel packet (fits a 1500-byte path with IPv6 and UDP headers).
pub const MAX_PACKET: usize = 1452;
/// Largest certificate carried in a hello.
pub const MAX_CERT: usize = 1024;
/// Prefix of the bytes a `HELLO`'s MAC covers.
pub const HELLO_CONTEXT: &[u8] = b"meshd-membership-hello-v2\0";
const KDF_SALT: &[u8] = b"meshd-membership-v2";
const HELLO_KEY_LABEL: &[u8] = b"meshd-membership-hello-key-v2";
const KDF_LABEL: &[u8] = b"meshd-membership-session-v2";
/// Marker, version, type.
const PREFIX: usize = 3;
const MAC: usize = 32;
/// A `HELLO` without certificate and payload.
const HELLO_FIXED: usize = PREFIX + 20 + 8 + 4 + 32 + 32 + 2 + 2 + MAC;
/// An `INIT` without certificate.
const INIT_FIXED: usize = PREFIX + 20 + 32 + 2;
/// Marker, version, type, session id, counter.
const DATA_HEADER: usize = PREFIX + 8 + 8;
const TAG: usize = 16;
/// Largest payload [`Channel::send`] takes (what fits a `DATA`).
pub const MAX_PAYLOAD: usize = MAX_PACKET - DATA_HEADER - TAG;
/// Hellos stamped up to this long before the receiver started are still taken (clock skew).
const START_SKEW_MS: u64 = 1000;
/// An `INIT` is repeated (on a send) at most this often while unanswered.
const INIT_RETRY: Duration = Duration::from_millis(250);
/// First retransmission of an unanswered `INIT` with payloads waiting (then doubling).
const SETUP_RETRY: Duration = Duration::from_millis(200);
/// Retransmissions of one `INIT` before the payloads wait for the next send.
const SETUP_RETRIES: u8 = 3;

/// Whether a UDP datagram belongs to the membership channel (not to QUIC).
pub fn is_channel_packet(datagram: &[u8]) -> bool {
    datagram.first() == Some(&MARKER)
}

/// Limits and lifetimes of a [`Channel`].
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// A `HELLO` is accepted only if its timestamp is within this of the local wall clock.
    /// Default 30 s. Replays inside the window are caught by the replay cache.
    pub hello_window: Duration,
    /// How long an unanswered nonce (ours or the peer's) is kept. Default 60 s.
    pub nonce_lifetime: Duration,
    /// A session is dropped (and set up again on the next send) after this. Default 1 h.
    pub session_lifetime: Duration,
    /// Most peers with state (sessions, nonces, queued payloads); ~500 B each. Default 8192.
    pub max_peers: usize,
    /// Payloads held per peer while its session is set up. Default 8.
    pub max_queued: usize,
    /// Most `HELLO` MACs remembered for replay detection (16 B + 8 B each). Default 65 536.
    pub max_seen_hellos: usize,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            hello_window: Duration::from_secs(30),
            nonce_lifetime: Duration::from_secs(60),
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
    /// The certificate does not parse, its node id does not match its key, or its key is not
    /// usable for key agreement.
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
    /// The hello's MAC does not verify (forged, tampered, or not from the certificate's key).
    #[error("bad hello MAC")]
    BadMac,
    /// The hello carries this node's own certificate.
    #[error("packet from ourselves")]
    FromSelf,
    /// No session with that id (the peer has one we forgot, e.g. we restarted).
    #[error("unknown session")]
    UnknownSession,
    /// The sealed payload does not open (tampered, or not for this key).
    #[error("packet does not decrypt")]
    Decrypt,
    /// A local failure (randomness, key derivation).
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
    /// A local failure (randomness, key derivation).
    #[error("local failure: {0}")]
    Local(&'static str),
}

/// An authenticated payload.
#[derive(Debug)]
pub struct Received {
    /// Who sent it (checked certificate).
    pub peer: Arc<CertInfo>,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Counters of one channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// `INIT`s sent (first contacts).
    pub inits_sent: u64,
    /// `INIT`s taken (certificate good).
    pub inits_received: u64,
    /// `HELLO`s sent.
    pub hellos_sent: u64,
    /// `HELLO`s accepted.
    pub hellos_received: u64,
    /// `DATA` packets sent.
    pub data_sent: u64,
    /// `DATA` packets accepted.
    pub data_received: u64,
    /// Sessions set up (candidates included).
    pub sessions: u64,
    /// Certificate chains verified (cache misses).
    pub chains_verified: u64,
    /// Pair keys derived (one X25519 scalar multiplication each).
    pub pair_keys: u64,
    /// Packets dropped (any [`ChannelError`]).
    pub dropped: u64,
    /// Payloads dropped from a full set-up queue.
    pub queue_dropped: u64,
}

/// What a verified certificate gives: who, and the keys shared with them.
struct Known {
    info: Arc<CertInfo>,
    /// MAC key of `HELLO`s between the two nodes (both directions). Kept as bytes (ring's
    /// keys hold precomputed hash states, ~250 B each; a peer meets thousands of certificates).
    hello_key: Zeroizing<[u8; 32]>,
    /// HKDF-Extract output the session keys are expanded from.
    prk: Zeroizing<[u8; 32]>,
}

struct Pending {
    nonce: [u8; 32],
    born: Instant,
}

struct Session {
    sid: u64,
    send_key: LessSafeKey,
    recv_key: LessSafeKey,
    my_nonce: [u8; 32],
    their_nonce: [u8; 32],
    /// The peer holds the session too (it sent `DATA` on it, or derived it from our echo).
    confirmed: bool,
    next_counter: u64,
    window: ReplayWindow,
    born: Instant,
}

#[derive(Default)]
struct Peer {
    known: Option<Arc<Known>>,
    pending: Option<Pending>,
    theirs: Option<([u8; 32], Instant)>,
    /// Boxed, as is `candidate`: ring's AEAD keys are sized for AES-GCM's tables (~0.5 KiB
    /// each), and a node keeps an entry for every peer it has talked to, most with no session.
    session: Option<Box<Session>>,
    /// Set up in answer to an `INIT` while `session` exists; replaces it once the peer uses it.
    candidate: Option<Box<Session>>,
    queue: VecDeque<Vec<u8>>,
    addr: Option<SocketAddr>,
    last_used: Option<Instant>,
    /// When we last sent this peer an `INIT`.
    init_sent: Option<Instant>,
}

impl Peer {
    fn matches(s: &Option<Box<Session>>, mine: &[u8; 32], theirs: &[u8; 32]) -> bool {
        s.as_ref()
            .is_some_and(|s| s.my_nonce == *mine && s.their_nonce == *theirs)
    }
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
    /// This node's leaf certificate (DER), sent in every `INIT` and `HELLO`.
    pub cert: Vec<u8>,
    /// The node key as an X25519 scalar: the first half of SHA-512 of the Ed25519 seed (the
    /// scalar Ed25519 itself signs with), clamped when used.
    pub scalar: Zeroizing<[u8; 32]>,
}

/// Where a session sits in its peer's state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Current,
    Candidate,
}

/// The membership channel of one node (see the module doc).
pub struct Channel {
    me: LocalIdentity,
    verifier: Arc<dyn ClientCertVerifier>,
    deny: DenySet,
    config: ChannelConfig,
    started_unix_ms: u64,
    rng: SystemRandom,
    certs: HashMap<[u8; 32], Arc<Known>>,
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
    /// Retransmissions due: (when, peer, attempt). Entries are checked when they fall due.
    retries: BinaryHeap<Reverse<(Instant, NodeId, u8)>>,
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
    nonce: [u8; 32],
    echo: Option<[u8; 32]>,
    cert: &'a [u8],
    payload: &'a [u8],
    authenticated: &'a [u8],
    mac: &'a [u8],
}

struct Init<'a> {
    target: [u8; 20],
    nonce: [u8; 32],
    cert: &'a [u8],
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

fn cert_field<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], ChannelError> {
    let cert_len = usize::from(u16::from_be_bytes(arr(take(b, 2)?)));
    if cert_len == 0 || cert_len > MAX_CERT {
        return Err(ChannelError::Malformed("certificate length"));
    }
    take(b, cert_len)
}

fn parse_hello(packet: &[u8]) -> Result<Hello<'_>, ChannelError> {
    if packet.len() < HELLO_FIXED {
        return Err(ChannelError::Malformed("short hello"));
    }
    let mac_at = packet.len() - MAC;
    let mut b = &packet[PREFIX..mac_at];
    let target = arr(take(&mut b, 20)?);
    let ts = u64::from_be_bytes(arr(take(&mut b, 8)?));
    let _seq = take(&mut b, 4)?;
    let nonce: [u8; 32] = arr(take(&mut b, 32)?);
    let echo: [u8; 32] = arr(take(&mut b, 32)?);
    let cert = cert_field(&mut b)?;
    let payload_len = usize::from(u16::from_be_bytes(arr(take(&mut b, 2)?)));
    let payload = take(&mut b, payload_len)?;
    if !b.is_empty() {
        return Err(ChannelError::Malformed("trailing bytes"));
    }
    if nonce == [0u8; 32] {
        return Err(ChannelError::Malformed("zero nonce"));
    }
    Ok(Hello {
        target,
        ts,
        nonce,
        echo: (echo != [0u8; 32]).then_some(echo),
        cert,
        payload,
        authenticated: &packet[..mac_at],
        mac: &packet[mac_at..],
    })
}

fn parse_init(packet: &[u8]) -> Result<Init<'_>, ChannelError> {
    if packet.len() < INIT_FIXED {
        return Err(ChannelError::Malformed("short init"));
    }
    let mut b = &packet[PREFIX..];
    let target = arr(take(&mut b, 20)?);
    let nonce: [u8; 32] = arr(take(&mut b, 32)?);
    let cert = cert_field(&mut b)?;
    if !b.is_empty() {
        return Err(ChannelError::Malformed("trailing bytes"));
    }
    if nonce == [0u8; 32] {
        return Err(ChannelError::Malformed("zero nonce"));
    }
    Ok(Init {
        target,
        nonce,
        cert,
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

/// The X25519 secret of `scalar` (clamped) and the Ed25519 public key `theirs`: the same value
/// as X25519 with `theirs` mapped to its Montgomery u-coordinate (RFC 7748 §4.1).
fn pair_secret(scalar: &[u8; 32], theirs: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, ChannelError> {
    let point = CompressedEdwardsY(*theirs)
        .decompress()
        .ok_or_else(|| ChannelError::BadCertificate("key is not a curve point".into()))?;
    if point.is_small_order() {
        return Err(ChannelError::BadCertificate("key of small order".into()));
    }
    let shared = Zeroizing::new(point.mul_clamped(*scalar).to_montgomery().to_bytes());
    if *shared == [0u8; 32] {
        return Err(ChannelError::BadCertificate(
            "degenerate key agreement".into(),
        ));
    }
    Ok(shared)
}

/// `lo`, `hi`: the two node ids in byte order.
fn ordered(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    if a < b {
        (a, b)
    } else {
        (b, a)
    }
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
            retries: BinaryHeap::new(),
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

    fn remove_neighbour(&mut self, node: NodeId) {
        if let Some(i) = self.neighbour_at.remove(&node) {
            self.neighbours.swap_remove(i);
            if let Some(moved) = self.neighbours.get(i) {
                self.neighbour_at.insert(*moved, i);
            }
        }
    }

    /// Drops the session and the candidate with `node`.
    fn drop_session(&mut self, node: NodeId) {
        let Some(p) = self.peers.get_mut(&node) else {
            return;
        };
        for s in [p.session.take(), p.candidate.take()].into_iter().flatten() {
            self.sessions.remove(&s.sid);
        }
        self.remove_neighbour(node);
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

    /// The candidate with `node` becomes its session (the peer proved it holds it).
    fn promote(&mut self, node: NodeId) {
        let Some(p) = self.peers.get_mut(&node) else {
            return;
        };
        let Some(c) = p.candidate.take() else {
            return;
        };
        if let Some(old) = p.session.replace(c) {
            self.sessions.remove(&old.sid);
        }
        self.remove_neighbour(node);
        self.confirm(node);
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

    fn fresh_nonce(&self) -> Result<[u8; 32], ChannelError> {
        let mut n = [0u8; 32];
        loop {
            self.rng
                .fill(&mut n)
                .map_err(|_| ChannelError::Local("randomness"))?;
            if n != [0u8; 32] {
                return Ok(n);
            }
        }
    }

    /// Sends `payload` to `to` at `addr`: sealed on an established session; else in a `HELLO`
    /// if we hold `to`'s certificate (queued, with an empty `HELLO` sent, when it does not fit
    /// one); else queued behind an `INIT`.
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
        if p.session.as_ref().is_some_and(|s| s.confirmed) {
            self.seal(to, addr, payload);
            return Ok(());
        }
        let known = p.known.is_some();
        let too_big = self.hello_len(payload.len()) > MAX_PACKET;
        if !known || too_big {
            self.enqueue(now, to, payload);
        }
        self.ensure_session_or_pending(now, to)
            .map_err(|_| SendError::Local("key derivation"))?;
        if !known {
            let p = self.peer_mut(to, now);
            if p.init_sent
                .is_none_or(|t| now.duration_since(t) >= INIT_RETRY)
            {
                self.send_init(now, to, addr, 0);
            }
        } else if too_big {
            self.hello(unix_ms, to, addr, &[]);
        } else {
            self.hello(unix_ms, to, addr, payload);
        }
        Ok(())
    }

    /// When [`Channel::handle_timeout`] should next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.retries.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Retransmits the `INIT`s that are due: payloads wait behind them, and a lost `INIT` or
    /// answer would otherwise hold them until the next send (SWIM's probe timeout is 500 ms).
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, to, attempt))) = self.retries.peek().copied() {
            if at > now {
                break;
            }
            self.retries.pop();
            let Some(p) = self.peers.get_mut(&to) else {
                continue;
            };
            if p.known.is_some() || p.queue.is_empty() {
                // Answered (a session follows the answer), or nothing waits.
                continue;
            }
            let Some(addr) = p.addr else {
                continue;
            };
            self.send_init(now, to, addr, attempt);
        }
    }

    /// Sends an `INIT` to `to` (its `retransmitted`-th repetition) and schedules the next one.
    fn send_init(&mut self, now: Instant, to: NodeId, addr: SocketAddr, retransmitted: u8) {
        if let Some(p) = self.peers.get_mut(&to) {
            p.init_sent = Some(now);
        }
        self.init(to, addr);
        if retransmitted < SETUP_RETRIES {
            let next = now + SETUP_RETRY * (1u32 << retransmitted);
            self.retries.push(Reverse((next, to, retransmitted + 1)));
        }
    }

    fn enqueue(&mut self, now: Instant, to: NodeId, payload: &[u8]) {
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
    }

    fn hello_len(&self, payload: usize) -> usize {
        HELLO_FIXED + self.me.cert.len() + payload
    }

    /// Makes sure we hold either a session (maybe unconfirmed) or a pending nonce for `to`:
    /// derives the session when the peer's nonce and certificate are known.
    fn ensure_session_or_pending(&mut self, now: Instant, to: NodeId) -> Result<(), ChannelError> {
        let life = self.config.nonce_lifetime;
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
            let nonce = self.fresh_nonce()?;
            self.peer_mut(to, now).pending = Some(Pending { nonce, born: now });
        }
        let p = self.peer_mut(to, now);
        if p.known.is_some() {
            if let Some((theirs, _)) = p.theirs.take() {
                if let Some(mine) = p.pending.take() {
                    self.derive(now, to, mine.nonce, theirs, Slot::Current)?;
                }
            }
        }
        Ok(())
    }

    /// Derives a session with `to` (whose certificate we hold) from the two nonces, into
    /// `slot` (a current session replaces the old one and any candidate).
    fn derive(
        &mut self,
        now: Instant,
        to: NodeId,
        mine: [u8; 32],
        theirs: [u8; 32],
        slot: Slot,
    ) -> Result<(), ChannelError> {
        let known = self
            .peers
            .get(&to)
            .and_then(|p| p.known.clone())
            .ok_or(ChannelError::Local("no certificate for the peer"))?;
        let me = self.me.node_id;
        let (lo, hi) = ordered(me, to);
        let (lo_nonce, hi_nonce) = if me < to {
            (mine, theirs)
        } else {
            (theirs, mine)
        };
        let mut okm = Zeroizing::new([0u8; 72]);
        let info: [&[u8]; 5] = [
            KDF_LABEL,
            lo.as_bytes(),
            hi.as_bytes(),
            &lo_nonce,
            &hi_nonce,
        ];
        hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &known.prk[..])
            .expand(&info, Len(okm.len()))
            .and_then(|o| o.fill(&mut okm[..]))
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
        let session = Box::new(Session {
            sid,
            send_key,
            recv_key,
            my_nonce: mine,
            their_nonce: theirs,
            confirmed: false,
            next_counter: 0,
            window: ReplayWindow::default(),
            born: now,
        });
        match slot {
            Slot::Current => {
                self.drop_session(to);
                self.peer_mut(to, now).session = Some(session);
            }
            Slot::Candidate => {
                let p = self.peer_mut(to, now);
                if let Some(old) = p.candidate.replace(session) {
                    self.sessions.remove(&old.sid);
                }
            }
        }
        self.sessions.insert(sid, to);
        self.stats.sessions += 1;
        Ok(())
    }

    /// Queues an `INIT` to `to`: our certificate and pending nonce.
    fn init(&mut self, to: NodeId, addr: SocketAddr) {
        let Some(nonce) = self
            .peers
            .get(&to)
            .and_then(|p| p.pending.as_ref())
            .map(|k| k.nonce)
        else {
            return;
        };
        let cert = &self.me.cert;
        let mut b = Vec::with_capacity(INIT_FIXED + cert.len());
        b.extend_from_slice(&[MARKER, VERSION, TYPE_INIT]);
        b.extend_from_slice(to.as_bytes());
        b.extend_from_slice(&nonce);
        b.extend_from_slice(&(cert.len() as u16).to_be_bytes());
        b.extend_from_slice(cert);
        self.stats.inits_sent += 1;
        self.out.push_back((addr, b));
    }

    /// Queues a `HELLO` to `to` with our nonce and the echo of the session (or our pending
    /// nonce and no echo).
    fn hello(&mut self, unix_ms: u64, to: NodeId, addr: SocketAddr, payload: &[u8]) {
        let Some(p) = self.peers.get(&to) else {
            return;
        };
        let (nonce, echo) = match (&p.session, &p.pending) {
            (Some(s), _) => (s.my_nonce, s.their_nonce),
            (None, Some(k)) => (k.nonce, [0u8; 32]),
            (None, None) => return,
        };
        self.hello_with(unix_ms, to, addr, nonce, echo, payload);
    }

    fn hello_with(
        &mut self,
        unix_ms: u64,
        to: NodeId,
        addr: SocketAddr,
        nonce: [u8; 32],
        echo: [u8; 32],
        payload: &[u8],
    ) {
        let Some(known) = self.peers.get(&to).and_then(|p| p.known.clone()) else {
            return;
        };
        let cert = &self.me.cert;
        let mut b = Vec::with_capacity(HELLO_FIXED + cert.len() + payload.len());
        b.extend_from_slice(&[MARKER, VERSION, TYPE_HELLO]);
        b.extend_from_slice(to.as_bytes());
        b.extend_from_slice(&unix_ms.to_be_bytes());
        // Two hellos of one millisecond with the same payload still differ (and so do their
        // MACs, which the receiver's replay cache is keyed on).
        b.extend_from_slice(&(self.stats.hellos_sent as u32).to_be_bytes());
        b.extend_from_slice(&nonce);
        b.extend_from_slice(&echo);
        b.extend_from_slice(&(cert.len() as u16).to_be_bytes());
        b.extend_from_slice(cert);
        b.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        b.extend_from_slice(payload);
        let mut ctx =
            hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &known.hello_key[..]));
        ctx.update(HELLO_CONTEXT);
        ctx.update(&b);
        b.extend_from_slice(ctx.sign().as_ref());
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
        b.extend_from_slice(payload);
        let aad: [u8; DATA_HEADER] = arr(&b[..DATA_HEADER]);
        let tag = match s.send_key.seal_in_place_separate_tag(
            nonce(counter),
            Aad::from(&aad),
            &mut b[DATA_HEADER..],
        ) {
            Ok(t) => t,
            Err(_) => return,
        };
        b.extend_from_slice(tag.as_ref());
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
            TYPE_INIT => self.handle_init(now, unix_ms, from, packet).map(|()| None),
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

    /// The certificate's checked identity and the keys shared with its node; the CA chain is
    /// verified and the pair key derived once per certificate (by hash), expiry and the
    /// deny-set by the caller on every packet.
    fn verify_cert(&mut self, der: &[u8], unix_ms: u64) -> Result<Arc<Known>, ChannelError> {
        let hash: [u8; 32] = Sha256::digest(der).into();
        if let Some(c) = self.certs.get(&hash) {
            return Ok(c.clone());
        }
        let (info, key) =
            parse_node_cert_key(der).map_err(|e| ChannelError::BadCertificate(e.to_string()))?;
        if info.node_id == self.me.node_id {
            return Err(ChannelError::FromSelf);
        }
        let now = UnixTime::since_unix_epoch(Duration::from_millis(unix_ms));
        self.verifier
            .verify_client_cert(&CertificateDer::from(der), &[], now)
            .map_err(|e| ChannelError::Untrusted(e.to_string()))?;
        self.stats.chains_verified += 1;
        let secret = pair_secret(&self.me.scalar, &key)?;
        // HKDF-Extract (RFC 5869 §2.2): HMAC-SHA256 keyed with the salt.
        let mut prk_bytes = Zeroizing::new([0u8; 32]);
        prk_bytes.copy_from_slice(
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, KDF_SALT), &secret[..]).as_ref(),
        );
        let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &prk_bytes[..]);
        let (lo, hi) = ordered(self.me.node_id, info.node_id);
        let mut hello_key = Zeroizing::new([0u8; 32]);
        prk.expand(&[HELLO_KEY_LABEL, lo.as_bytes(), hi.as_bytes()], Len(32))
            .and_then(|o| o.fill(&mut hello_key[..]))
            .map_err(|_| ChannelError::Local("key derivation"))?;
        self.stats.pair_keys += 1;
        if self.certs.len() >= self.config.max_peers * 2 {
            self.certs.clear();
        }
        let known = Arc::new(Known {
            info: Arc::new(info),
            hello_key,
            prk: prk_bytes,
        });
        self.certs.insert(hash, known.clone());
        Ok(known)
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

    /// A first contact: checks the certificate, sets up a session (or a candidate beside the
    /// one we hold: the `INIT` proves nothing) and answers with a `HELLO`.
    fn handle_init(
        &mut self,
        now: Instant,
        unix_ms: u64,
        from: SocketAddr,
        packet: &[u8],
    ) -> Result<(), ChannelError> {
        let init = parse_init(packet)?;
        if init.target != *self.me.node_id.as_bytes() {
            return Err(ChannelError::WrongTarget);
        }
        let known = self.verify_cert(init.cert, unix_ms)?;
        self.check_peer(&known.info, unix_ms)?;
        self.stats.inits_received += 1;
        let peer = known.info.node_id;
        let p = self.peer_mut(peer, now);
        p.known = Some(known);
        if p.addr.is_none() {
            p.addr = Some(from);
        }
        let reply_to = p.addr.unwrap_or(from);
        let answered = |s: &Option<Box<Session>>| {
            s.as_ref()
                .filter(|s| s.their_nonce == init.nonce)
                .map(|s| (s.my_nonce, s.their_nonce))
        };
        if let Some((mine, theirs)) = answered(&p.session).or_else(|| answered(&p.candidate)) {
            // A repeated init (our answer was lost, or is on its way): answer again.
            self.hello_with(unix_ms, peer, reply_to, mine, theirs, &[]);
            return Ok(());
        }
        if p.session.is_some() {
            let mine = self.fresh_nonce()?;
            self.derive(now, peer, mine, init.nonce, Slot::Candidate)?;
            self.hello_with(unix_ms, peer, reply_to, mine, init.nonce, &[]);
            return Ok(());
        }
        p.theirs = Some((init.nonce, now));
        self.ensure_session_or_pending(now, peer)?;
        self.hello(unix_ms, peer, reply_to, &[]);
        Ok(())
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
        let seen_key: [u8; 16] = arr(&h.mac[..16]);
        if self.seen.contains_key(&seen_key) {
            return Err(ChannelError::Replayed);
        }
        let known = self.verify_cert(h.cert, unix_ms)?;
        self.check_peer(&known.info, unix_ms)?;
        let mut ctx =
            hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &known.hello_key[..]));
        ctx.update(HELLO_CONTEXT);
        ctx.update(h.authenticated);
        let tag = ctx.sign();
        if !bool::from(subtle::ConstantTimeEq::ct_eq(tag.as_ref(), h.mac)) {
            return Err(ChannelError::BadMac);
        }
        self.remember_hello(seen_key, h.ts, unix_ms);
        self.stats.hellos_received += 1;
        let info = known.info.clone();
        let peer = info.node_id;
        let p = self.peer_mut(peer, now);
        p.known = Some(known);
        if p.addr.is_none() {
            p.addr = Some(from);
        }
        let reply_to = p.addr.unwrap_or(from);
        match h.echo {
            Some(echo) => {
                let pending = p.pending.as_ref().is_some_and(|k| k.nonce == echo);
                if pending {
                    // It answered our init or hello: the session is set up on both sides.
                    if let Some(mine) = p.pending.take() {
                        self.derive(now, peer, mine.nonce, h.nonce, Slot::Current)?;
                        self.confirm(peer);
                        self.flush(peer, reply_to);
                    }
                } else if Peer::matches(&p.session, &echo, &h.nonce) {
                    // It holds the session but has not seen our DATA yet: confirm it.
                    self.confirm(peer);
                    self.flush(peer, reply_to);
                } else if Peer::matches(&p.candidate, &echo, &h.nonce) {
                    self.promote(peer);
                    self.flush(peer, reply_to);
                } else if !p.session.as_ref().is_some_and(|s| s.confirmed) {
                    // It answers a nonce we no longer hold (we restarted, or it expired):
                    // start over; a hello without echo asks it for a fresh answer.
                    self.drop_session(peer);
                    self.peer_mut(peer, now).theirs = None;
                    if self.ensure_session_or_pending(now, peer).is_ok() {
                        self.hello(unix_ms, peer, reply_to, &[]);
                    }
                }
                // Else: an answer to an init we did not send (someone replayed our
                // certificate); the session we hold stays.
            }
            None => {
                let ours =
                    |s: &Option<Box<Session>>| s.as_ref().is_some_and(|s| s.their_nonce == h.nonce);
                if !ours(&p.session) && !ours(&p.candidate) {
                    // A fresh nonce, authenticated: the peer holds no session with us (it
                    // restarted, or its session expired). Ours is useless to it.
                    p.theirs = Some((h.nonce, now));
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
        let (info, slot, was_confirmed, body) = {
            let p = self
                .peers
                .get_mut(&peer)
                .ok_or(ChannelError::UnknownSession)?;
            let info = p
                .known
                .as_ref()
                .map(|k| k.info.clone())
                .ok_or(ChannelError::UnknownSession)?;
            let (slot, s) = match (&mut p.session, &mut p.candidate) {
                (Some(s), _) if s.sid == sid => (Slot::Current, s),
                (_, Some(c)) if c.sid == sid => (Slot::Candidate, c),
                _ => return Err(ChannelError::UnknownSession),
            };
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
            let was = s.confirmed && slot == Slot::Current;
            p.last_used = Some(now);
            (info, slot, was, body)
        };
        match slot {
            Slot::Current => self.confirm(peer),
            Slot::Candidate => self.promote(peer),
        }
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

/// The X25519 scalar of an Ed25519 PKCS#8 key (RFC 8410): SHA-512 of the 32-byte seed, first
/// half. Checked against `public`: the scalar times the base point must be that key.
fn x25519_scalar(pkcs8: &[u8], public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, String> {
    // PrivateKeyInfo: ... AlgorithmIdentifier 1.3.101.112, then privateKey OCTET STRING
    // wrapping the OCTET STRING of the seed (04 22 04 20 || seed).
    const SEED_PREFIX: [u8; 11] = [
        0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    ];
    let prefix = &SEED_PREFIX[..];
    let at = pkcs8
        .windows(prefix.len())
        .position(|w| w == prefix)
        .ok_or_else(|| "node key is not an Ed25519 PKCS#8 key".to_owned())?;
    let seed = pkcs8
        .get(at + prefix.len()..at + prefix.len() + 32)
        .ok_or_else(|| "node key truncated".to_owned())?;
    let mut digest = Sha512::digest(seed);
    let mut scalar = Zeroizing::new([0u8; 32]);
    scalar.copy_from_slice(&digest[..32]);
    zeroize::Zeroize::zeroize(digest.as_mut_slice());
    if EdwardsPoint::mul_base_clamped(*scalar)
        .compress()
        .to_bytes()
        != *public
    {
        return Err("node key does not match its certificate".to_owned());
    }
    Ok(scalar)
}

/// Builds a channel's [`LocalIdentity`] from a node identity.
pub fn local_identity(id: &crate::identity::NodeIdentity) -> Result<LocalIdentity, String> {
    let cert = id
        .chain
        .first()
        .ok_or_else(|| "no certificate".to_owned())?
        .to_vec();
    if cert.len() > MAX_CERT {
        return Err(format!("certificate of {} B over {MAX_CERT}", cert.len()));
    }
    let (_, public) = parse_node_cert_key(&cert).map_err(|e| e.to_string())?;
    let scalar = x25519_scalar(id.key.secret_der(), &public)?;
    Ok(LocalIdentity {
        node_id: id.info.node_id,
        cert,
        scalar,
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
            Self::of(&ia, &ib, DenySet::default())
        }

        /// Channels for `ia` and `ib`, `ib`'s refusing what `b_deny` lists.
        fn of(ia: &NodeIdentity, ib: &NodeIdentity, b_deny: DenySet) -> Self {
            Self {
                a: channel(ia, DenySet::default()),
                b: channel(ib, b_deny),
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

    fn types(log: &[(bool, Vec<u8>)]) -> Vec<(bool, u8)> {
        log.iter().map(|(to_b, b)| (*to_b, b[2])).collect()
    }

    #[test]
    fn first_contact_is_an_init_then_sessions_seal() {
        let mut p = Pair::new().established();
        assert_eq!((p.a.stats().inits_sent, p.b.stats().inits_received), (1, 1));
        assert_eq!((p.a.stats().pair_keys, p.b.stats().pair_keys), (1, 1));
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
    fn first_payloads_wait_one_round_trip_then_go_sealed() {
        let mut p = Pair::new();
        for _ in 0..3 {
            p.a_to_b(b"gossip");
        }
        let (_, at_b) = p.pump();
        assert_eq!(at_b, vec![b"gossip".to_vec(); 3]);
        // One init (repeated at most every 250 ms), the answer, then the queue, sealed.
        assert_eq!(
            types(&p.log),
            vec![
                (true, TYPE_INIT),
                (false, TYPE_HELLO),
                (true, TYPE_DATA),
                (true, TYPE_DATA),
                (true, TYPE_DATA)
            ]
        );
        assert_eq!(p.b.stats().chains_verified, 1, "chain verified once");
        assert!(p.a.has_session(p.b_id) && p.b.has_session(p.a_id));
    }

    #[test]
    fn a_lost_init_is_sent_again_by_the_timer() {
        let mut p = Pair::new();
        p.a_to_b(b"ping");
        let (_, lost) = p.a.poll_transmit().expect("init");
        assert_eq!(lost[2], TYPE_INIT);
        let due = p.a.poll_timeout().expect("a retry is due");
        assert_eq!(due, p.now + SETUP_RETRY);
        p.a.handle_timeout(due - Duration::from_millis(1));
        assert!(p.a.poll_transmit().is_none(), "not before it is due");
        p.now = due;
        p.a.handle_timeout(due);
        let (_, at_b) = p.pump();
        assert_eq!(at_b, vec![b"ping".to_vec()]);
        // Answered: the next retry finds nothing to do and none is scheduled after it.
        p.now += Duration::from_secs(1);
        p.a.handle_timeout(p.now);
        assert!(p.a.poll_transmit().is_none());
        assert_eq!(p.a.poll_timeout(), None);
        // A peer that never answers gets SETUP_RETRIES retransmissions, then none.
        let mut q = Pair::new();
        q.a_to_b(b"ping");
        let mut inits = 0;
        while let Some(at) = q.a.poll_timeout() {
            q.a.handle_timeout(at);
            inits += std::iter::from_fn(|| q.a.poll_transmit()).count();
        }
        assert_eq!(inits, 1 + usize::from(SETUP_RETRIES));
    }

    #[test]
    fn a_peer_whose_certificate_we_hold_gets_the_payload_in_the_first_hello() {
        let mut p = Pair::new().established();
        // Both sessions expire; the certificates (and pair keys) stay.
        p.now += ChannelConfig::default().session_lifetime + Duration::from_secs(1);
        p.a_to_b(b"again");
        let (_, at_b) = p.pump();
        assert_eq!(at_b, vec![b"again".to_vec()]);
        assert_eq!(types(&p.log)[0], (true, TYPE_HELLO));
        p.b_to_a(b"back");
        let (at_a, _) = p.pump();
        assert_eq!(at_a, vec![b"back".to_vec()]);
        assert!(p.a.has_session(p.b_id) && p.b.has_session(p.a_id));
        assert_eq!((p.a.stats().pair_keys, p.b.stats().pair_keys), (1, 1));
        assert_eq!(p.a.stats().inits_sent + p.b.stats().inits_sent, 1);
    }

    #[test]
    fn an_init_replaying_a_certificate_cannot_take_a_session_over() {
        let ca = ca("ca");
        let (ia, ib) = (ident(&ca, "alpha"), ident(&ca, "beta"));
        let mut p = Pair::of(&ia, &ib, DenySet::default()).established();
        // Anyone who saw alpha's certificate can build this.
        let cert = ia.chain[0].to_vec();
        let mut init = vec![MARKER, VERSION, TYPE_INIT];
        init.extend_from_slice(p.b_id.as_bytes());
        init.extend_from_slice(&[9u8; 32]);
        init.extend_from_slice(&(cert.len() as u16).to_be_bytes());
        init.extend_from_slice(&cert);
        assert!(p
            .b
            .handle_packet(p.now, T0, addr(66), &init)
            .expect("taken")
            .is_none());
        // b answers alpha (at alpha's address, not the sender's); alpha keeps its session.
        let (to, answer) = p.b.poll_transmit().expect("answer");
        assert_eq!((to, answer[2]), (addr(1), TYPE_HELLO));
        assert!(p
            .a
            .handle_packet(p.now, T0, addr(2), &answer)
            .expect("authentic")
            .is_none());
        assert!(p.a.poll_transmit().is_none());
        p.a_to_b(b"still");
        p.b_to_a(b"here");
        let (at_a, at_b) = p.pump();
        assert_eq!(
            (at_a, at_b),
            (vec![b"here".to_vec()], vec![b"still".to_vec()])
        );
        assert!(types(&p.log).iter().all(|(_, t)| *t == TYPE_DATA));
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
        let (_, init) = p.a.poll_transmit().expect("init");
        assert!(p.b.handle_packet(p.now, T0, addr(1), &init).is_ok());
        let (_, hello) = p.b.poll_transmit().expect("hello");
        assert!(p.a.handle_packet(p.now, T0, addr(2), &hello).is_ok());
        assert_eq!(
            p.a.handle_packet(p.now, T0, addr(2), &hello).err(),
            Some(ChannelError::Replayed)
        );
        let mut p = Pair::new().established();
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
        // b's init teaches a its certificate; a's answer is stamped long ago.
        b.send(now, T0, ia.node_id(), addr(1), b"x").expect("send");
        let (_, init) = b.poll_transmit().expect("init");
        a.handle_packet(now, T0 - 120_000, addr(2), &init)
            .expect("init taken");
        let (_, old) = a.poll_transmit().expect("hello");
        assert_eq!(old[2], TYPE_HELLO);
        assert_eq!(
            b.handle_packet(now, T0, addr(1), &old).err(),
            Some(ChannelError::Stale)
        );
        // For b, delivered to c: an init and a hello.
        assert_eq!(
            c.handle_packet(now, T0, addr(2), &init).err(),
            Some(ChannelError::WrongTarget)
        );
        a.handle_packet(now, T0, addr(2), &init)
            .expect("init taken");
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
        // Mallory (a member) answers for alpha: her hello carries alpha's certificate, but
        // her key is not alpha's, so her MAC is not the one b derives for alpha.
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
        b.send(now, T0, ia.node_id(), addr(1), b"for alpha")
            .expect("send");
        let (_, init) = b.poll_transmit().expect("init");
        m.handle_packet(now, T0, addr(2), &init)
            .expect("init taken");
        let (_, h) = m.poll_transmit().expect("hello");
        assert_eq!(
            b.handle_packet(now, T0, addr(3), &h).err(),
            Some(ChannelError::BadMac)
        );
        // A genuine hello with its payload changed.
        let mut a = channel(&ia, DenySet::default());
        a.handle_packet(now, T0, addr(2), &init)
            .expect("init taken");
        let _answer = a.poll_transmit().expect("answer");
        a.send(now, T0, ib.node_id(), addr(2), b"genuine")
            .expect("send");
        let (_, mut h) = a.poll_transmit().expect("hello");
        assert_eq!(h[2], TYPE_HELLO);
        let at = h.len() - MAC - 7;
        assert_eq!(&h[at..at + 7], b"genuine");
        h[at..at + 7].copy_from_slice(b"forged!");
        assert_eq!(
            b.handle_packet(now, T0, addr(1), &h).err(),
            Some(ChannelError::BadMac)
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
        let mut p = Pair::of(&ia, &ib, deny.clone()).established();
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
        let mut p = Pair::of(&ia, &ib, DenySet::default()).established();
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
    fn the_channel_key_must_be_the_certificate_key() {
        let ca = ca("ca");
        let (ia, ib) = (ident(&ca, "alpha"), ident(&ca, "beta"));
        let mut mixed = ia.clone();
        mixed.key = ib.key.clone_key();
        let err = local_identity(&mixed).err().expect("refused");
        assert!(err.contains("does not match"), "{err}");
        // Each side's scalar with the other's key gives one secret.
        let (la, lb) = (
            local_identity(&ia).expect("a"),
            local_identity(&ib).expect("b"),
        );
        let (_, ka) = parse_node_cert_key(&la.cert).expect("a key");
        let (_, kb) = parse_node_cert_key(&lb.cert).expect("b key");
        let ab = pair_secret(&la.scalar, &kb).expect("ab");
        assert_eq!(*ab, *pair_secret(&lb.scalar, &ka).expect("ba"));
        assert_ne!(*ab, *pair_secret(&la.scalar, &ka).expect("aa"));
    }

    #[test]
    fn the_stored_prk_is_hkdf_extract() {
        let secret = [5u8; 32];
        let mut prk = [0u8; 32];
        prk.copy_from_slice(
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, KDF_SALT), &secret).as_ref(),
        );
        let info: [&[u8]; 1] = [KDF_LABEL];
        let (mut a, mut b) = ([0u8; 72], [0u8; 72]);
        hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT)
            .extract(&secret)
            .expand(&info, Len(72))
            .and_then(|o| o.fill(&mut a))
            .expect("ring");
        hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &prk)
            .expand(&info, Len(72))
            .and_then(|o| o.fill(&mut b))
            .expect("stored");
        assert_eq!(a, b);
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
            kind in 0u8..5,
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
