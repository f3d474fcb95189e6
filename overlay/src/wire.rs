//! The meshd wire format, version 1: stream headers, frames and datagrams.
//!
//! Pure encode/decode; sizes are checked before anything is allocated. The async helpers in
//! [`io`] only move bytes between a stream and these functions. docs/PROTOCOL.md is the
//! reference for an independent implementation and must change with this file.
//!
//! ```text
//! stream header: version:u8 (=1) | len:u16 BE (<= 1024) | postcard(StreamHeader)
//! frame:         len:u32 BE (<= 65536) | postcard(message)
//! datagram:      kind:u8 | payload          (kind 1 = SWIM membership, foca postcard codec,
//!                                            kind 2 = catalog gossip: (len:u16 BE | item)*)
//! ```

use serde::{Deserialize, Serialize};

use crate::identity::valid_name;

/// Version byte that starts every stream header.
pub const VERSION: u8 = 1;
/// Largest encoded stream header body.
pub const MAX_HEADER_LEN: usize = 1024;
/// Largest frame body.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// Most services one peer may publish.
pub const MAX_SERVICES_PER_PEER: usize = 1024;
/// Datagram kind: SWIM membership packet.
pub const DATAGRAM_MEMBERSHIP: u8 = 1;
/// Datagram kind: catalog gossip (signed snapshots and version hints).
pub const DATAGRAM_CATALOG: u8 = 2;
/// Datagram kind: route gossip (signed [`RouteSummary`] items, same framing as catalog gossip).
pub const DATAGRAM_ROUTES: u8 = 3;
/// Datagram kind: a liveness and RTT probe ([`Probe`]).
pub const DATAGRAM_PROBE: u8 = 4;
/// Datagram kind: the answer to a probe ([`Probe`], same nonce).
pub const DATAGRAM_PROBE_ACK: u8 = 5;

/// QUIC application error codes (stream resets and connection closes).
pub mod code {
    /// Normal shutdown.
    pub const OK: u32 = 0x0;
    /// Peer identity refused (revoked, expired, wrong node).
    pub const AUTH_FAILED: u32 = 0x1;
    /// Peer broke the protocol.
    pub const PROTOCOL: u32 = 0x2;
    /// Node shutting down.
    pub const SHUTDOWN: u32 = 0x3;
    /// Stream: the service is not published on this peer.
    pub const UNKNOWN_SERVICE: u32 = 0x10;
    /// Stream: the backend refused or did not answer.
    pub const BACKEND_UNAVAILABLE: u32 = 0x11;
    /// Stream: the header could not be decoded.
    pub const MALFORMED_HEADER: u32 = 0x12;
    /// Stream: unsupported header version.
    pub const UNSUPPORTED_VERSION: u32 = 0x13;
    /// Stream: header or frame longer than allowed.
    pub const TOO_LARGE: u32 = 0x14;
    /// Stream: header not received in time.
    pub const HEADER_TIMEOUT: u32 = 0x15;
    /// Stream: refused for lack of capacity.
    pub const OVERLOADED: u32 = 0x16;
    /// Stream: the service requires a token and none, or an invalid one, was presented.
    pub const UNAUTHORIZED: u32 = 0x17;
    /// Stream: refused by a rate limit.
    pub const RATE_LIMITED: u32 = 0x18;
    /// Stream: speculative work (a pre-opened stream) shed by a loaded peer; retry later.
    pub const SHED: u32 = 0x19;
    /// Stream: a pre-opened stream was not used before its deadline; the backend is released.
    pub const PREOPEN_EXPIRED: u32 = 0x1a;
    /// Stream: this request id was already executed (a replayed 0-RTT request).
    pub const DUPLICATE_REQUEST: u32 = 0x1b;
    /// Stream: a non-idempotent request arrived in 0-RTT data and the handshake never completed.
    pub const EARLY_DATA_REFUSED: u32 = 0x1c;
    /// Stream: a relayed stream's path is longer than the receiver allows.
    pub const HOP_LIMIT: u32 = 0x1d;
    /// Stream: a relayed stream would pass a peer twice.
    pub const ROUTING_LOOP: u32 = 0x1e;
    /// Stream: the receiver does not relay for this origin now (policy or quota).
    pub const RELAY_REFUSED: u32 = 0x1f;
    /// Stream: the relay could not reach the next peer.
    pub const RELAY_UNREACHABLE: u32 = 0x20;

    /// Human-readable name of a code, for logs.
    pub fn name(code: u64) -> &'static str {
        match code {
            0x0 => "ok",
            0x1 => "authentication failed",
            0x2 => "protocol violation",
            0x3 => "shutdown",
            0x10 => "unknown service",
            0x11 => "backend unavailable",
            0x12 => "malformed header",
            0x13 => "unsupported version",
            0x14 => "too large",
            0x15 => "header timeout",
            0x16 => "overloaded",
            0x17 => "unauthorized",
            0x18 => "rate limited",
            0x19 => "speculative work shed",
            0x1a => "pre-opened stream expired",
            0x1b => "duplicate request",
            0x1c => "early data refused",
            0x1d => "hop limit",
            0x1e => "routing loop",
            0x1f => "relay refused",
            0x20 => "relay unreachable",
            _ => "unknown code",
        }
    }
}

/// Decoding failures; each maps to a stream error code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// Version byte is not one we speak.
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    /// Declared length over the limit.
    #[error("length {len} over limit {max}")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Body did not decode, or decoded to invalid values.
    #[error("malformed: {0}")]
    Malformed(String),
}

impl WireError {
    /// The stream error code to answer with.
    pub fn code(&self) -> u32 {
        match self {
            WireError::UnsupportedVersion(_) => code::UNSUPPORTED_VERSION,
            WireError::TooLarge { .. } => code::TOO_LARGE,
            WireError::Malformed(_) => code::MALFORMED_HEADER,
        }
    }
}

/// What a stream is for. New variants are added at the end only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamKind {
    /// Carry a TCP connection to the named service's backend; raw bytes follow both ways.
    Forward {
        /// Service name.
        service: String,
    },
    /// Ask for the peer's catalog; the peer answers with one [`CatalogSnapshot`] frame.
    CatalogPull,
    /// Push our catalog; one [`CatalogSnapshot`] frame follows.
    CatalogPush,
    /// Ask for a token to one of the peer's services: one [`TokenRequest`] frame follows; the
    /// peer answers with one [`TokenReply`] frame.
    TokenRequest,
    /// Authenticated discovery: one [`DiscoverRequest`] frame; answered by one
    /// [`DiscoverReply`] frame.
    Discover,
    /// Node revocations: one [`RevocationBatch`] frame follows (no answer).
    Revocations,
    /// Like `Forward`, carrying a token for the service (required when its policy says so).
    ForwardAuth {
        /// Service name.
        service: String,
        /// A JWT issued by the receiving peer to the sender, scope `connect`.
        token: String,
    },
    /// A pre-opened (speculative) forward: the receiver dials the backend at once and answers
    /// one byte [`PREOPEN_READY`] (or resets with `SHED`, `UNKNOWN_SERVICE`,
    /// `BACKEND_UNAVAILABLE`, `UNAUTHORIZED`); the client's bytes follow when a request comes.
    /// If none arrives within the receiver's deadline the stream is reset with
    /// `PREOPEN_EXPIRED` and the backend connection closed.
    Preopen {
        /// Service name.
        service: String,
        /// Token for the service, when its policy requires one.
        token: Option<String>,
    },
    /// Signed catalog exchange: one [`CatalogRequest`] frame follows; the peer answers with
    /// zero or more [`CatalogBatch`] frames and FIN.
    CatalogSync,
    /// A relayed stream. `route` lists the peers still to reach, the last being the
    /// destination; `visited` the peers it went through, the origin first. A receiver with a
    /// non-empty `route` relays: it opens `Relay { route[1..], visited + [itself] }` to
    /// `route[0]` and copies bytes both ways. A receiver with an empty `route` is the
    /// destination: the bytes that follow are a TLS 1.3 session (ALPN `meshd-e2e/1`, mutual,
    /// overlay certificates) between origin and destination, carrying a stream header and its
    /// payload, so relays see ciphertext only. Refused with `HOP_LIMIT`, `ROUTING_LOOP`,
    /// `RELAY_REFUSED` or `RELAY_UNREACHABLE`.
    Relay {
        /// Peers still to reach; the last is the destination.
        route: Vec<crate::identity::NodeId>,
        /// Peers gone through, origin first.
        visited: Vec<crate::identity::NodeId>,
    },
}

/// Most peers a relayed stream may name in `route` + `visited` (origin, up to 3 relays,
/// destination).
pub const MAX_RELAY_PATH: usize = 5;

/// ALPN of the end-to-end TLS session inside a relayed stream.
pub const E2E_ALPN: &[u8] = b"meshd-e2e/1";

/// A probe or probe answer (datagram kinds 4 and 5): the sender's network coordinate rides on
/// it, so every RTT sample also moves the receiver's coordinate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// Chosen by the prober, echoed by the answer.
    pub nonce: u64,
    /// The sender's coordinate.
    pub coord: crate::routing::vivaldi::Coord,
}

/// Encodes a probe datagram of `kind`.
pub fn encode_probe(kind: u8, p: &Probe) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&postcard::to_allocvec(p).unwrap_or_default());
    out
}

/// Decodes a probe payload (after the kind byte).
pub fn decode_probe(payload: &[u8]) -> Result<Probe, WireError> {
    if payload.len() > 64 {
        return Err(WireError::TooLarge {
            len: payload.len(),
            max: 64,
        });
    }
    let p: Probe = decode_exact(payload)?;
    if !p.coord.is_valid() {
        return Err(WireError::Malformed("invalid coordinate".into()));
    }
    Ok(p)
}

/// Most links one route summary reports.
pub const MAX_ROUTE_LINKS: usize = 16;

/// One measured link in a [`RouteSummary`]: from its origin to `peer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkReport {
    /// The other end.
    pub peer: crate::identity::NodeId,
    /// Smoothed RTT, µs.
    pub rtt_us: u32,
    /// Loss, parts per million.
    pub loss_ppm: u32,
}

/// A peer's own load, as it reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoadReport {
    /// Streams it serves now (forwards to its backends).
    pub serving: u32,
    /// Streams it relays now.
    pub relaying: u32,
    /// Peak-EWMA of its backends' time to first byte, µs (0: unknown).
    pub backend_us: u32,
}

/// What a peer says about itself for routing: signed by it (body of a [`SignedCatalog`]
/// envelope under context `meshd-routes-v1\0`), handed on by anyone. Only links of which the
/// origin is an end can be expressed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteSummary {
    /// The origin (must be the hash of the signing key).
    pub node_id: crate::identity::NodeId,
    /// Newer (generation, seq) wins.
    pub version: CatalogVersion,
    /// Its network coordinate.
    pub coord: crate::routing::vivaldi::Coord,
    /// Its load.
    pub load: LoadReport,
    /// Whether it relays streams for others.
    pub relays: bool,
    /// Its measured links, at most [`MAX_ROUTE_LINKS`].
    pub links: Vec<LinkReport>,
}

/// Decodes a route summary body, checking limits and values.
pub fn decode_route_summary(body: &[u8]) -> Result<RouteSummary, WireError> {
    if body.len() > MAX_GOSSIP_ITEM_LEN {
        return Err(WireError::TooLarge {
            len: body.len(),
            max: MAX_GOSSIP_ITEM_LEN,
        });
    }
    let s: RouteSummary = decode_exact(body)?;
    if s.links.len() > MAX_ROUTE_LINKS {
        return Err(WireError::Malformed("too many links".into()));
    }
    if !s.coord.is_valid() {
        return Err(WireError::Malformed("invalid coordinate".into()));
    }
    if s.links
        .iter()
        .any(|l| l.peer == s.node_id || l.loss_ppm > 1_000_000)
    {
        return Err(WireError::Malformed("invalid link".into()));
    }
    Ok(s)
}

/// Encodes route gossip items (each a postcard [`SignedCatalog`] whose body is a
/// [`RouteSummary`]) with the catalog gossip framing.
pub fn encode_route_item(s: &SignedCatalog) -> Option<Vec<u8>> {
    let b = postcard::to_allocvec(s).ok()?;
    (!b.is_empty() && b.len() <= MAX_GOSSIP_ITEM_LEN).then_some(b)
}

/// Decodes a route gossip datagram payload (after the kind byte) into signed envelopes; the
/// receiver checks the signatures.
pub fn decode_route_gossip(payload: &[u8]) -> Result<Vec<SignedCatalog>, WireError> {
    decode_gossip_items(payload, SignedCatalog::check_sizes)
}

/// The byte a receiver sends on a [`StreamKind::Preopen`] stream once its backend is dialled.
pub const PREOPEN_READY: u8 = 0x01;

/// Longest API key in a message.
pub const MAX_API_KEY_LEN: usize = 128;
/// Longest token or credential in a message.
pub const MAX_CREDENTIAL_LEN: usize = 2048;
/// Longest refusal reason.
pub const MAX_REASON_LEN: usize = 200;
/// Most revocation records in one frame.
pub const MAX_REVOCATIONS_PER_FRAME: usize = 256;
/// Most scopes in a discovery answer.
pub const MAX_SCOPES: usize = 256;

/// `TokenRequest` body. The caller is the connection's authenticated node, never a field.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Service on the receiving peer.
    pub service: String,
    /// An API key of that service (secret).
    pub api_key: String,
    /// Scope asked for.
    pub scope: String,
}

impl std::fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRequest")
            .field("service", &self.service)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// A refusal, as carried on the wire and returned by the node's API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// HTTP-like status: 401 bad credential, 403 policy, 404 no such service, 429 rate
    /// limited, 500 local failure, 502 unreachable.
    pub status: u16,
    /// Human-readable reason (no secrets).
    pub reason: String,
    /// When a rate-limited caller may retry, milliseconds.
    pub retry_after_ms: Option<u64>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.reason, self.status)
    }
}

/// `TokenRequest` answer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenReply {
    /// The token.
    Granted {
        /// Compact JWT (secret).
        token: String,
        /// Its `exp`, Unix seconds.
        expires_at: u64,
    },
    /// Refused.
    Refused(Refused),
}

impl std::fmt::Debug for TokenReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenReply::Granted { expires_at, .. } => f
                .debug_struct("Granted")
                .field("expires_at", expires_at)
                .finish_non_exhaustive(),
            TokenReply::Refused(r) => f.debug_tuple("Refused").field(r).finish(),
        }
    }
}

/// `Discover` body.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoverRequest {
    /// Service.
    pub service: String,
    /// An API key of the service on the receiving peer, or a token it issued (secret).
    pub credential: String,
}

impl std::fmt::Debug for DiscoverRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoverRequest")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// One usable instance of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Node offering it.
    pub node_id: crate::identity::NodeId,
    /// That node's name.
    pub name: String,
    /// Address it is dialled at.
    pub addr: std::net::SocketAddr,
    /// Scopes the caller may obtain.
    pub scopes: Vec<String>,
    /// Whether forwarded streams need a token.
    pub require_token: bool,
}

/// `Discover` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiscoverReply {
    /// The caller may use this instance.
    Instance(Instance),
    /// Refused.
    Refused(Refused),
}

/// `Revocations` body: signed records (see [`crate::auth::revocation`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationBatch {
    /// At most [`MAX_REVOCATIONS_PER_FRAME`].
    pub records: Vec<crate::auth::revocation::SignedRevocation>,
}

fn check_len(what: &str, s: &str, max: usize) -> Result<(), WireError> {
    if s.len() > max {
        return Err(WireError::Malformed(format!("{what} too long")));
    }
    Ok(())
}

fn check_scope(s: &str) -> Result<(), WireError> {
    if !valid_name(s) {
        return Err(WireError::Malformed("invalid scope".into()));
    }
    Ok(())
}

fn decode_exact<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    let (v, rest): (T, _) =
        postcard::take_from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed("trailing bytes".into()));
    }
    Ok(v)
}

fn check_refused(r: &Refused) -> Result<(), WireError> {
    check_len("reason", &r.reason, MAX_REASON_LEN)
}

/// Decodes a `TokenRequest` frame body.
pub fn decode_token_request(body: &[u8]) -> Result<TokenRequest, WireError> {
    let r: TokenRequest = decode_exact(body)?;
    if !valid_name(&r.service) {
        return Err(WireError::Malformed("invalid service name".into()));
    }
    check_len("api key", &r.api_key, MAX_API_KEY_LEN)?;
    check_scope(&r.scope)?;
    Ok(r)
}

/// Decodes a `TokenReply` frame body.
pub fn decode_token_reply(body: &[u8]) -> Result<TokenReply, WireError> {
    let r: TokenReply = decode_exact(body)?;
    match &r {
        TokenReply::Granted { token, .. } => check_len("token", token, MAX_CREDENTIAL_LEN)?,
        TokenReply::Refused(x) => check_refused(x)?,
    }
    Ok(r)
}

/// Decodes a `DiscoverRequest` frame body.
pub fn decode_discover_request(body: &[u8]) -> Result<DiscoverRequest, WireError> {
    let r: DiscoverRequest = decode_exact(body)?;
    if !valid_name(&r.service) {
        return Err(WireError::Malformed("invalid service name".into()));
    }
    check_len("credential", &r.credential, MAX_CREDENTIAL_LEN)?;
    Ok(r)
}

/// Decodes a `DiscoverReply` frame body.
pub fn decode_discover_reply(body: &[u8]) -> Result<DiscoverReply, WireError> {
    let r: DiscoverReply = decode_exact(body)?;
    match &r {
        DiscoverReply::Instance(i) => {
            if i.scopes.len() > MAX_SCOPES || !valid_name(&i.name) {
                return Err(WireError::Malformed("bad instance".into()));
            }
            for s in &i.scopes {
                check_scope(s)?;
            }
        }
        DiscoverReply::Refused(x) => check_refused(x)?,
    }
    Ok(r)
}

/// Decodes a `Revocations` frame body (signatures are checked by the receiver).
pub fn decode_revocations(body: &[u8]) -> Result<RevocationBatch, WireError> {
    let r: RevocationBatch = decode_exact(body)?;
    if r.records.len() > MAX_REVOCATIONS_PER_FRAME {
        return Err(WireError::Malformed("too many revocations".into()));
    }
    if r.records
        .iter()
        .any(|x| x.body.len() > crate::auth::revocation::MAX_BODY_LEN || x.signature.len() != 64)
    {
        return Err(WireError::Malformed("bad revocation record".into()));
    }
    Ok(r)
}

/// The header that opens every bidirectional stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// What the stream carries.
    pub kind: StreamKind,
    /// Caller-chosen id, unique per connection direction; used for de-duplication and logs.
    pub request_id: u64,
}

/// Version of a peer's catalog: ordered by (generation, seq).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct CatalogVersion {
    /// The peer's generation (changes on restart).
    pub generation: u64,
    /// Increments on every change within a generation.
    pub seq: u64,
}

/// The full list of services a peer publishes. The origin is the authenticated sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogSnapshot {
    /// Version; older snapshots than the one held are ignored.
    pub version: CatalogVersion,
    /// Service names, sorted, unique.
    pub services: Vec<String>,
}

impl CatalogSnapshot {
    fn validate(&self) -> Result<(), WireError> {
        if self.services.len() > MAX_SERVICES_PER_PEER {
            return Err(WireError::Malformed("too many services".into()));
        }
        if let Some(bad) = self.services.iter().find(|s| !valid_name(s)) {
            return Err(WireError::Malformed(format!(
                "invalid service name {:?}",
                bad.chars().take(80).collect::<String>()
            )));
        }
        Ok(())
    }
}

/// Encodes a stream header.
pub fn encode_header(h: &StreamHeader) -> Vec<u8> {
    let body = postcard::to_allocvec(h).unwrap_or_default();
    debug_assert!(body.len() <= MAX_HEADER_LEN);
    let mut out = Vec::with_capacity(3 + body.len());
    out.push(VERSION);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks the 3-byte header prefix; returns the body length to read.
pub fn decode_header_prefix(prefix: [u8; 3]) -> Result<usize, WireError> {
    if prefix[0] != VERSION {
        return Err(WireError::UnsupportedVersion(prefix[0]));
    }
    let len = usize::from(u16::from_be_bytes([prefix[1], prefix[2]]));
    if len > MAX_HEADER_LEN {
        return Err(WireError::TooLarge {
            len,
            max: MAX_HEADER_LEN,
        });
    }
    Ok(len)
}

/// Decodes a header body (after the prefix).
pub fn decode_header_body(body: &[u8]) -> Result<StreamHeader, WireError> {
    let (h, rest): (StreamHeader, _) =
        postcard::take_from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed("trailing bytes".into()));
    }
    match &h.kind {
        StreamKind::Forward { service }
        | StreamKind::ForwardAuth { service, .. }
        | StreamKind::Preopen { service, .. }
            if !valid_name(service) =>
        {
            Err(WireError::Malformed("invalid service name".into()))
        }
        StreamKind::Relay { route, visited }
            if route.len() + visited.len() > MAX_RELAY_PATH || visited.is_empty() =>
        {
            Err(WireError::Malformed("bad relay path".into()))
        }
        _ => Ok(h),
    }
}

/// Encodes a frame around a message.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let body = postcard::to_allocvec(msg).map_err(|e| WireError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME_LEN {
        return Err(WireError::TooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks a frame length prefix.
pub fn decode_frame_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(WireError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(len)
}

/// Decodes a catalog snapshot frame body.
pub fn decode_catalog(body: &[u8]) -> Result<CatalogSnapshot, WireError> {
    let (snap, rest): (CatalogSnapshot, _) =
        postcard::take_from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed("trailing bytes".into()));
    }
    snap.validate()?;
    Ok(snap)
}

// ---------------------------------------------------------------------------------------------
// Signed catalogs (protocol 1.1, docs/PROTOCOL.md §2.8 and §3.2)

/// Longest signed body (a snapshot of [`MAX_SERVICES_PER_PEER`] names must fit a frame).
pub const MAX_SIGNED_BODY_LEN: usize = 60 * 1024;
/// Most origins a [`CatalogRequest`] may name.
pub const MAX_REQUEST_ORIGINS: usize = 256;
/// Most entries in one [`CatalogBatch`] frame.
pub const MAX_BATCH_ENTRIES: usize = 1024;
/// Most entries a whole `CatalogSync` answer may carry (the reader counts).
pub const MAX_SYNC_ENTRIES: usize = 16 * 1024;
/// Largest gossip item (one fits a QUIC datagram with room to spare).
pub const MAX_GOSSIP_ITEM_LEN: usize = 1100;
/// Most items in one catalog gossip datagram.
pub const MAX_GOSSIP_ITEMS: usize = 16;

/// A body signed by an origin's node key (Ed25519). What the body is depends on where it is
/// carried: a snapshot body (`postcard(CatalogBody)`) or a hint body (`postcard(CatalogHint)`),
/// each under its own signature context (see [`crate::catalog::signed`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCatalog {
    /// The origin's Ed25519 public key; SHA-256 of its SubjectPublicKeyInfo gives the node id.
    pub key: [u8; 32],
    /// The signed bytes, at most [`MAX_SIGNED_BODY_LEN`].
    pub body: Vec<u8>,
    /// Ed25519 signature, 64 bytes.
    pub signature: Vec<u8>,
}

impl SignedCatalog {
    fn check_sizes(&self) -> Result<(), WireError> {
        if self.body.len() > MAX_SIGNED_BODY_LEN || self.signature.len() != 64 {
            return Err(WireError::Malformed("bad signed catalog sizes".into()));
        }
        Ok(())
    }
}

/// What a signed snapshot says: one origin's services at one version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogBody {
    /// The origin (must be the hash of the signing key).
    pub node_id: crate::identity::NodeId,
    /// Version; newer (generation, seq) wins.
    pub version: CatalogVersion,
    /// Service names, sorted, unique, at most [`MAX_SERVICES_PER_PEER`].
    pub services: Vec<String>,
}

/// What a signed hint says: the origin has a catalog at this version (too large to gossip).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogHint {
    /// The origin.
    pub node_id: crate::identity::NodeId,
    /// Its current version.
    pub version: CatalogVersion,
}

/// `CatalogSync` request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogRequest {
    /// Origins wanted; empty means every origin the peer holds (its own included).
    pub origins: Vec<crate::identity::NodeId>,
    /// The requester's own signed snapshot, if it has one to announce (a join).
    pub mine: Option<SignedCatalog>,
}

/// One frame of a `CatalogSync` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogBatch {
    /// Signed snapshots, at most [`MAX_BATCH_ENTRIES`].
    pub entries: Vec<SignedCatalog>,
}

/// One catalog gossip item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GossipItem {
    /// A whole signed snapshot (small catalogs).
    Snapshot(SignedCatalog),
    /// A signed [`CatalogHint`]: pull the origin's snapshot (large catalogs).
    Hint(SignedCatalog),
}

/// Decodes a `CatalogRequest` frame body.
pub fn decode_catalog_request(body: &[u8]) -> Result<CatalogRequest, WireError> {
    let r: CatalogRequest = decode_exact(body)?;
    if r.origins.len() > MAX_REQUEST_ORIGINS {
        return Err(WireError::Malformed("too many origins".into()));
    }
    if let Some(m) = &r.mine {
        m.check_sizes()?;
    }
    Ok(r)
}

/// Decodes a `CatalogBatch` frame body (signatures are checked by the receiver).
pub fn decode_catalog_batch(body: &[u8]) -> Result<CatalogBatch, WireError> {
    let b: CatalogBatch = decode_exact(body)?;
    if b.entries.len() > MAX_BATCH_ENTRIES {
        return Err(WireError::Malformed("too many entries".into()));
    }
    for e in &b.entries {
        e.check_sizes()?;
    }
    Ok(b)
}

/// Decodes a signed snapshot body (after its signature was checked, or to look at its version
/// before spending a signature check on it).
pub fn decode_catalog_body(body: &[u8]) -> Result<CatalogBody, WireError> {
    let b: CatalogBody = decode_exact(body)?;
    if b.services.len() > MAX_SERVICES_PER_PEER {
        return Err(WireError::Malformed("too many services".into()));
    }
    if b.services.iter().any(|s| !valid_name(s)) {
        return Err(WireError::Malformed("invalid service name".into()));
    }
    if b.services.windows(2).any(|w| w[0] >= w[1]) {
        return Err(WireError::Malformed(
            "services not sorted and unique".into(),
        ));
    }
    Ok(b)
}

/// Decodes a signed hint body.
pub fn decode_catalog_hint(body: &[u8]) -> Result<CatalogHint, WireError> {
    decode_exact(body)
}

/// Encodes a catalog gossip datagram payload (after the kind byte) from encoded items.
pub fn encode_gossip_items<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for it in items {
        debug_assert!(!it.is_empty() && it.len() <= MAX_GOSSIP_ITEM_LEN);
        out.extend_from_slice(&(it.len() as u16).to_be_bytes());
        out.extend_from_slice(it);
    }
    out
}

/// Encodes one gossip item; `None` when it is over [`MAX_GOSSIP_ITEM_LEN`].
pub fn encode_gossip_item(item: &GossipItem) -> Option<Vec<u8>> {
    let b = postcard::to_allocvec(item).ok()?;
    (!b.is_empty() && b.len() <= MAX_GOSSIP_ITEM_LEN).then_some(b)
}

/// Decodes a catalog gossip datagram payload (after the kind byte). Lengths are checked before
/// anything is allocated; signatures are checked by the receiver.
pub fn decode_gossip(payload: &[u8]) -> Result<Vec<GossipItem>, WireError> {
    decode_gossip_items(payload, |item: &GossipItem| match item {
        GossipItem::Snapshot(s) | GossipItem::Hint(s) => s.check_sizes(),
    })
}

/// The gossip framing shared by catalog (kind 2) and route (kind 3) gossip: 1 to
/// [`MAX_GOSSIP_ITEMS`] items, each a u16 length (1 to [`MAX_GOSSIP_ITEM_LEN`], checked before
/// decoding) and a postcard body, which `check` validates.
fn decode_gossip_items<T: serde::de::DeserializeOwned>(
    mut payload: &[u8],
    check: impl Fn(&T) -> Result<(), WireError>,
) -> Result<Vec<T>, WireError> {
    let mut out = Vec::new();
    while !payload.is_empty() {
        if out.len() == MAX_GOSSIP_ITEMS {
            return Err(WireError::Malformed("too many gossip items".into()));
        }
        let [a, b, rest @ ..] = payload else {
            return Err(WireError::Malformed("truncated gossip item".into()));
        };
        let len = usize::from(u16::from_be_bytes([*a, *b]));
        if len == 0 || len > MAX_GOSSIP_ITEM_LEN {
            return Err(WireError::TooLarge {
                len,
                max: MAX_GOSSIP_ITEM_LEN,
            });
        }
        if rest.len() < len {
            return Err(WireError::Malformed("truncated gossip item".into()));
        }
        let item: T = decode_exact(&rest[..len])?;
        check(&item)?;
        out.push(item);
        payload = &rest[len..];
    }
    Ok(out)
}

/// Async helpers: read and write headers and frames on QUIC streams.
pub mod io {
    use super::*;

    /// Reading a header or frame from a stream failed.
    #[derive(Debug, thiserror::Error)]
    #[non_exhaustive]
    pub enum ReadError {
        /// The bytes were invalid.
        #[error(transparent)]
        Wire(#[from] WireError),
        /// The stream ended or failed first.
        #[error("stream: {0}")]
        Stream(#[from] quinn::ReadExactError),
    }

    impl ReadError {
        /// The code to reset the stream with, if the peer misbehaved.
        pub fn code(&self) -> u32 {
            match self {
                ReadError::Wire(w) => w.code(),
                ReadError::Stream(_) => code::MALFORMED_HEADER,
            }
        }
    }

    /// Reads a stream header.
    pub async fn read_header(recv: &mut quinn::RecvStream) -> Result<StreamHeader, ReadError> {
        let mut prefix = [0u8; 3];
        recv.read_exact(&mut prefix).await?;
        let len = decode_header_prefix(prefix)?;
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await?;
        Ok(decode_header_body(&body)?)
    }

    /// Reads one frame body.
    pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, ReadError> {
        let mut prefix = [0u8; 4];
        recv.read_exact(&mut prefix).await?;
        let len = decode_frame_len(prefix)?;
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await?;
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn header_round_trip() {
        let h = StreamHeader {
            kind: StreamKind::Forward {
                service: "echo".into(),
            },
            request_id: 7,
        };
        let bytes = encode_header(&h);
        let len = decode_header_prefix([bytes[0], bytes[1], bytes[2]]).unwrap();
        assert_eq!(len, bytes.len() - 3);
        assert_eq!(decode_header_body(&bytes[3..]).unwrap(), h);
    }

    /// The example in docs/PROTOCOL.md §2.
    #[test]
    fn header_encoding_matches_the_protocol_document() {
        let h = StreamHeader {
            kind: StreamKind::Forward {
                service: "echo".into(),
            },
            request_id: 7,
        };
        assert_eq!(
            encode_header(&h),
            [0x01, 0x00, 0x07, 0x00, 0x04, b'e', b'c', b'h', b'o', 0x07]
        );
    }

    #[test]
    fn refuses_bad_version_and_oversize_before_reading_body() {
        assert_eq!(
            decode_header_prefix([2, 0, 1]),
            Err(WireError::UnsupportedVersion(2))
        );
        assert!(matches!(
            decode_header_prefix([1, 0xff, 0xff]),
            Err(WireError::TooLarge { len: 65535, .. })
        ));
        assert!(matches!(
            decode_frame_len([0xff, 0xff, 0xff, 0xff]),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn refuses_invalid_service_names() {
        let h = StreamHeader {
            kind: StreamKind::Forward {
                service: "../etc".into(),
            },
            request_id: 1,
        };
        let bytes = encode_header(&h);
        assert!(decode_header_body(&bytes[3..]).is_err());
    }

    #[test]
    fn auth_messages_round_trip_and_refuse_oversize() {
        let h = StreamHeader {
            kind: StreamKind::ForwardAuth {
                service: "db".into(),
                token: "t".repeat(600),
            },
            request_id: 9,
        };
        let bytes = encode_header(&h);
        assert_eq!(decode_header_body(&bytes[3..]).unwrap(), h);
        let req = TokenRequest {
            service: "db".into(),
            api_key: "mk_x".into(),
            scope: "connect".into(),
        };
        let f = encode_frame(&req).unwrap();
        assert_eq!(decode_token_request(&f[4..]).unwrap(), req);
        assert!(
            !format!("{req:?}").contains("mk_x"),
            "Debug redacts the key"
        );
        let long = TokenRequest {
            api_key: "k".repeat(MAX_API_KEY_LEN + 1),
            ..req.clone()
        };
        assert!(decode_token_request(&encode_frame(&long).unwrap()[4..]).is_err());
        let bad_scope = TokenRequest {
            scope: "Not A Scope".into(),
            ..req
        };
        assert!(decode_token_request(&encode_frame(&bad_scope).unwrap()[4..]).is_err());
        let reply = TokenReply::Refused(Refused {
            status: 429,
            reason: "rate limited".into(),
            retry_after_ms: Some(50),
        });
        assert_eq!(
            decode_token_reply(&encode_frame(&reply).unwrap()[4..]).unwrap(),
            reply
        );
        // New stream kinds are appended: the old variants keep their indices.
        let b = encode_header(&StreamHeader {
            kind: StreamKind::TokenRequest,
            request_id: 1,
        });
        assert_eq!(b[3], 3);
        let b = encode_header(&StreamHeader {
            kind: StreamKind::Revocations,
            request_id: 1,
        });
        assert_eq!(b[3], 5);
    }

    #[test]
    fn catalog_sync_is_appended_and_gossip_round_trips() {
        let b = encode_header(&StreamHeader {
            kind: StreamKind::CatalogSync,
            request_id: 1,
        });
        assert_eq!(b[3], 8, "new stream kinds are appended (after Preopen = 7)");
        let b = encode_header(&StreamHeader {
            kind: StreamKind::Preopen {
                service: "s".into(),
                token: None,
            },
            request_id: 1,
        });
        assert_eq!(b[3], 7);
        let signed = SignedCatalog {
            key: [7; 32],
            body: vec![1, 2, 3],
            signature: vec![9; 64],
        };
        let items = [
            GossipItem::Snapshot(signed.clone()),
            GossipItem::Hint(signed.clone()),
        ];
        let enc: Vec<Vec<u8>> = items
            .iter()
            .map(|i| encode_gossip_item(i).unwrap())
            .collect();
        let payload = encode_gossip_items(enc.iter().map(|v| v.as_slice()));
        assert_eq!(decode_gossip(&payload).unwrap(), items);
        // Truncated, zero-length and oversize items are refused before allocating.
        assert!(decode_gossip(&payload[..payload.len() - 1]).is_err());
        assert!(decode_gossip(&[0, 0]).is_err());
        assert!(matches!(
            decode_gossip(&[0xff, 0xff, 0]),
            Err(WireError::TooLarge { .. })
        ));
        // A signature of the wrong length is refused on decode.
        let bad = GossipItem::Snapshot(SignedCatalog {
            signature: vec![0; 10],
            ..signed.clone()
        });
        let e = encode_gossip_item(&bad).unwrap();
        assert!(decode_gossip(&encode_gossip_items([e.as_slice()])).is_err());
        let too_many = vec![enc[0].as_slice(); MAX_GOSSIP_ITEMS + 1];
        assert!(decode_gossip(&encode_gossip_items(too_many)).is_err());
        // Requests and batches round trip; limits hold.
        let req = CatalogRequest {
            origins: vec![],
            mine: Some(signed.clone()),
        };
        assert_eq!(
            decode_catalog_request(&encode_frame(&req).unwrap()[4..]).unwrap(),
            req
        );
        let batch = CatalogBatch {
            entries: vec![signed; 3],
        };
        assert_eq!(
            decode_catalog_batch(&encode_frame(&batch).unwrap()[4..]).unwrap(),
            batch
        );
        let unsorted = CatalogBody {
            node_id: crate::identity::NodeId::from_spki(&[1]),
            version: CatalogVersion::default(),
            services: vec!["b".into(), "a".into()],
        };
        assert!(decode_catalog_body(&postcard::to_allocvec(&unsorted).unwrap()).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_header_body(&bytes);
            let _ = decode_catalog(&bytes);
            let _ = decode_token_request(&bytes);
            let _ = decode_token_reply(&bytes);
            let _ = decode_discover_request(&bytes);
            let _ = decode_discover_reply(&bytes);
            let _ = decode_revocations(&bytes);
            let _ = decode_catalog_request(&bytes);
            let _ = decode_catalog_batch(&bytes);
            let _ = decode_catalog_body(&bytes);
            let _ = decode_catalog_hint(&bytes);
            let _ = decode_gossip(&bytes);
            if bytes.len() >= 3 {
                let _ = decode_header_prefix([bytes[0], bytes[1], bytes[2]]);
            }
        }

        #[test]
        fn catalog_round_trip(names in proptest::collection::vec("[a-z][a-z0-9-]{0,20}", 0..50),
                              generation in any::<u64>(), seq in any::<u64>()) {
            let snap = CatalogSnapshot { version: CatalogVersion { generation, seq }, services: names };
            let frame = encode_frame(&snap).unwrap();
            let len = decode_frame_len([frame[0], frame[1], frame[2], frame[3]]).unwrap();
            prop_assert_eq!(len, frame.len() - 4);
            prop_assert_eq!(decode_catalog(&frame[4..]).unwrap(), snap);
        }
    }
}
