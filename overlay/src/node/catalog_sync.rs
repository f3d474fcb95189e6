//! Catalog exchange, protocol 1.1: signed snapshots, gossip beside SWIM, one pull per join.
//!
//! Every decision about *what* to accept is made by the sans-IO [`crate::catalog`] (versions,
//! liveness, limits) and [`crate::catalog::signed`] (signatures); this module moves bytes:
//!
//! - **Join**: when the first member comes up, pull the *whole* catalog from it
//!   (`CatalogSync`, every origin's signed snapshot) and hand it ours in the same request.
//! - **Changes** (publish, unpublish, restart, rejoin): our signed snapshot — or, if too large
//!   for a datagram, a signed version hint — goes into the [`Gossip`] backlog and rides next to
//!   the SWIM packets this node sends anyway (datagram kind 2, on the membership channel). Receivers
//!   check it, apply it, and hand it on; a hint makes them pull that origin's snapshot.
//! - **Repair**: every 15 s (scaled up with the overlay's size, as memberlist scales its
//!   push-pull: × 6 at 1,000 members) pull the whole catalog from one random member.
//!
//! No dial per member: the number of catalog connections is one per join and one per repair
//! round, whatever the overlay's size.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::RngExt;
use tokio::time::timeout;
use tracing::{debug, warn};

use super::{lock, read, reset, write, DialError, Inner};
use crate::catalog::gossip::{transmissions_for, Gossip};
use crate::catalog::signed::{self, CatalogSigner, SignedError};
use crate::catalog::Applied;
use crate::identity::{CertInfo, NodeId, NodeIdentity};
use crate::membership::PeerIdentity;
use crate::stats;
use crate::wire::{
    self, io::ReadError, CatalogBatch, CatalogRequest, GossipItem, SignedCatalog, StreamHeader,
    StreamKind, WireError,
};

/// How often a random member's catalog is pulled (repairs lost gossip), up to 32 members.
pub(super) const REFRESH_PERIOD: Duration = Duration::from_secs(15);
/// Members up to which the repair period is not scaled.
const REFRESH_SCALE_THRESHOLD: usize = 32;

/// The repair period with `members` other members: [`REFRESH_PERIOD`] up to 32 members, then
/// × (⌈log2 n − log2 32⌉ + 1) — memberlist's `pushPullScale`. Every member pulls a whole catalog
/// (which grows with n) per period, so without scaling the overlay's repair traffic grows as
/// n² per period; lost gossip is rare (each item is handed on several times) and a join still
/// pulls at once.
pub(super) fn refresh_period(members: usize) -> Duration {
    if members <= REFRESH_SCALE_THRESHOLD {
        return REFRESH_PERIOD;
    }
    let excess = (members as f64).log2() - (REFRESH_SCALE_THRESHOLD as f64).log2();
    REFRESH_PERIOD * (excess.ceil() as u32 + 1)
}
/// Largest signed snapshot gossiped whole; larger ones are announced by a hint.
const MAX_GOSSIP_SNAPSHOT: usize = 900;
/// Most hint-triggered pulls in flight.
const MAX_HINT_PULLS: usize = 64;
/// Target size of one answer frame.
const BATCH_BYTES: usize = 48 * 1024;

/// Errors of one catalog exchange.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The member could not be reached.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The stream failed.
    #[error("stream: {0}")]
    Stream(String),
    /// The peer sent bytes that do not decode or break a limit (peer misbehaved).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
}

/// Catalog exchange state of a node.
pub(super) struct State {
    signer: CatalogSigner,
    gossip: Mutex<Gossip>,
    hint_pulls: Mutex<std::collections::HashSet<NodeId>>,
    /// Signed catalogs known to verify (`NodeConfig::catalog_checks`).
    checks: Option<Arc<signed::CheckCache>>,
}

impl State {
    pub(super) fn new(
        identity: &NodeIdentity,
        cluster_size_hint: u32,
        checks: Option<Arc<signed::CheckCache>>,
    ) -> Result<Self, SignedError> {
        Ok(Self {
            checks,
            signer: CatalogSigner::new(&identity.key)?,
            gossip: Mutex::new(Gossip::new(transmissions_for(
                cluster_size_hint.max(1) as usize
            ))),
            hint_pulls: Mutex::new(Default::default()),
        })
    }
}

fn notify(inner: &Inner) {
    stats::inc(&inner.stats.catalog_updates);
    inner.catalog_version.send_modify(|v| *v += 1);
}

/// Our snapshot changed (or must be announced again): sign it and queue it for gossip.
pub(super) fn announce_own(inner: &Arc<Inner>) {
    inner.catalog_version.send_modify(|v| *v += 1);
    let st = &inner.catalog_sync;
    let (signed, version) = {
        let mut cat = write(&inner.catalog);
        let version = cat.version();
        match cat.signed_own(&st.signer) {
            Ok(s) => (s, version),
            Err(e) => {
                warn!(error = %e, "catalog cannot be signed; not announced");
                return;
            }
        }
    };
    let whole = wire::encode_gossip_item(&GossipItem::Snapshot(signed))
        .filter(|b| b.len() <= MAX_GOSSIP_SNAPSHOT);
    let item = match whole {
        Some(b) => b,
        None => match st
            .signer
            .sign_hint(version)
            .ok()
            .and_then(|h| wire::encode_gossip_item(&GossipItem::Hint(h)))
        {
            Some(b) => b,
            None => return,
        },
    };
    lock(&st.gossip).insert(inner.info.node_id, version, Bytes::from(item));
}

/// At start: announce our services (a restart announces its new generation this way).
pub(super) fn on_start(inner: &Arc<Inner>) {
    if read(&inner.catalog).has_local() {
        announce_own(inner);
    }
}

/// We were declared down and rejoined under `me`: move past everything sent and announce.
pub(super) fn on_rejoin(inner: &Arc<Inner>, me: &PeerIdentity) {
    write(&inner.catalog).renew(me.generation);
    announce_own(inner);
}

/// A member came up. `first`: it is the only live member (we just joined, or came back from
/// isolation), so pull the whole catalog from it.
pub(super) fn on_member_up(inner: &Arc<Inner>, p: &PeerIdentity, first: bool) {
    if write(&inner.catalog).set_live(p.node_id, p.generation) {
        notify(inner);
    }
    if first {
        tokio::spawn(join_sync(inner.clone(), p.node_id));
    }
}

/// A member went down: its entries are withdrawn and no longer handed on.
pub(super) fn on_member_down(inner: &Arc<Inner>, node: NodeId) {
    if write(&inner.catalog).set_down(node) {
        inner.catalog_version.send_modify(|v| *v += 1);
    }
    lock(&inner.catalog_sync.gossip).remove(node);
}

/// The next catalog gossip datagram (kind 2 and its items, at most `max` bytes), if items
/// wait; the driver sends it right behind a membership packet, to the same member.
pub(super) fn poll_gossip(inner: &Inner, max: usize) -> Option<Vec<u8>> {
    let payload = lock(&inner.catalog_sync.gossip).poll_datagram(max.saturating_sub(1))?;
    let mut buf = Vec::with_capacity(payload.len() + 1);
    buf.push(wire::DATAGRAM_CATALOG);
    buf.extend_from_slice(&payload);
    Some(buf)
}

/// Checks and applies one signed snapshot, whoever delivered it. Returns what it did; the
/// signature is only checked for versions newer than the one held.
fn apply_signed(inner: &Inner, s: &SignedCatalog) -> Result<Applied, SignedError> {
    let (origin, version) = signed::peek_snapshot(s)?;
    if origin == inner.info.node_id
        || read(&inner.catalog)
            .version_of(origin)
            .is_some_and(|held| held >= version)
    {
        return Ok(Applied::Stale);
    }
    if inner.deny.is_node_denied(&origin) {
        debug!(origin = %origin.fmt_short(), "catalog of a revoked node refused");
        return Ok(Applied::Stale);
    }
    let verified = signed::verify_snapshot_cached(s, inner.catalog_sync.checks.as_deref())?;
    let applied = write(&inner.catalog).apply_verified(verified);
    if applied == Applied::Changed {
        notify(inner);
    }
    Ok(applied)
}

/// A catalog gossip datagram arrived on a connection authenticated as `from`.
pub(super) fn handle_gossip(inner: &Arc<Inner>, from: &CertInfo, payload: &[u8]) {
    stats::inc(&inner.stats.catalog_gossip_received);
    let items = match wire::decode_gossip(payload) {
        Ok(i) => i,
        Err(e) => {
            stats::inc(&inner.stats.catalog_refused);
            warn!(peer = %from.node_id.fmt_short(), error = %e, "bad catalog gossip");
            return;
        }
    };
    for item in items {
        match item {
            GossipItem::Snapshot(s) => match apply_signed(inner, &s) {
                Ok(a) if a.is_new() => {
                    if let (Ok((origin, version)), Some(b)) = (
                        signed::peek_snapshot(&s),
                        wire::encode_gossip_item(&GossipItem::Snapshot(s)),
                    ) {
                        lock(&inner.catalog_sync.gossip).insert(origin, version, Bytes::from(b));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    stats::inc(&inner.stats.catalog_refused);
                    warn!(peer = %from.node_id.fmt_short(), error = %e, "catalog gossip refused");
                }
            },
            GossipItem::Hint(h) => handle_hint(inner, from.node_id, h),
        }
    }
}

fn handle_hint(inner: &Arc<Inner>, from: NodeId, h: SignedCatalog) {
    let hint = match signed::verify_hint(&h) {
        Ok(x) => x,
        Err(e) => {
            stats::inc(&inner.stats.catalog_refused);
            warn!(peer = %from.fmt_short(), error = %e, "catalog hint refused");
            return;
        }
    };
    if hint.node_id == inner.info.node_id
        || inner.deny.is_node_denied(&hint.node_id)
        || read(&inner.catalog)
            .version_of(hint.node_id)
            .is_some_and(|held| held >= hint.version)
    {
        return;
    }
    if let Some(b) = wire::encode_gossip_item(&GossipItem::Hint(h)) {
        lock(&inner.catalog_sync.gossip).insert(hint.node_id, hint.version, Bytes::from(b));
    }
    {
        let mut pulls = lock(&inner.catalog_sync.hint_pulls);
        if pulls.len() >= MAX_HINT_PULLS || !pulls.insert(hint.node_id) {
            return;
        }
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        // The member that told us first (it is pulling too, or has it), then the origin.
        for node in [from, hint.node_id] {
            if read(&inner.catalog)
                .version_of(hint.node_id)
                .is_some_and(|held| held >= hint.version)
            {
                break;
            }
            if let Err(e) = sync_with(&inner, node, vec![hint.node_id], None).await {
                debug!(peer = %node.fmt_short(), error = %e, "hinted catalog pull failed");
            }
        }
        lock(&inner.catalog_sync.hint_pulls).remove(&hint.node_id);
    });
}

fn stream_err(e: impl std::fmt::Display) -> SyncError {
    SyncError::Stream(e.to_string())
}

/// Reads the next frame body, or None at a clean end of stream.
async fn read_frame_or_end(recv: &mut quinn::RecvStream) -> Result<Option<Vec<u8>>, SyncError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(stream_err(e)),
    }
    let len = wire::decode_frame_len(prefix)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(stream_err)?;
    Ok(Some(body))
}

/// One `CatalogSync` exchange with `node`: asks for `origins` (all when empty), offers `mine`,
/// applies what comes back. Returns how many entries were new.
pub(super) async fn sync_with(
    inner: &Arc<Inner>,
    node: NodeId,
    origins: Vec<NodeId>,
    mine: Option<SignedCatalog>,
) -> Result<usize, SyncError> {
    let conn = inner.conn_to(node).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(stream_err)?;
    let header = wire::encode_header(&StreamHeader {
        kind: StreamKind::CatalogSync,
        request_id: inner.next_request_id.fetch_add(1, Ordering::Relaxed),
    });
    let frame = wire::encode_frame(&CatalogRequest { origins, mine })?;
    send.write_all(&header).await.map_err(stream_err)?;
    send.write_all(&frame).await.map_err(stream_err)?;
    let _ = send.finish();
    let mut seen = 0usize;
    let mut new = 0usize;
    let read_all = async {
        while let Some(body) = read_frame_or_end(&mut recv).await? {
            let batch = wire::decode_catalog_batch(&body)?;
            seen += batch.entries.len();
            if seen > wire::MAX_SYNC_ENTRIES {
                return Err(SyncError::Wire(WireError::Malformed(
                    "too many catalog entries".into(),
                )));
            }
            for e in &batch.entries {
                match apply_signed(inner, e) {
                    Ok(a) if a.is_new() => new += 1,
                    Ok(_) => {}
                    Err(err) => {
                        stats::inc(&inner.stats.catalog_refused);
                        warn!(peer = %node.fmt_short(), error = %err, "catalog entry refused");
                    }
                }
            }
        }
        Ok::<(), SyncError>(())
    };
    match timeout(inner.transport.header_timeout, read_all).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            if matches!(e, SyncError::Wire(_)) {
                stats::inc(&inner.stats.catalog_refused);
                let _ = recv.stop(quinn::VarInt::from_u32(wire::code::MALFORMED_HEADER));
            }
            return Err(e);
        }
        Err(_) => return Err(SyncError::Timeout),
    }
    stats::inc(&inner.stats.catalog_pulls);
    Ok(new)
}

/// Serves a `CatalogSync` stream from `peer`.
pub(super) async fn serve_sync(
    inner: &Arc<Inner>,
    peer: &CertInfo,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let req = match timeout(
        inner.transport.header_timeout,
        wire::io::read_frame(&mut recv),
    )
    .await
    {
        Ok(Ok(body)) => match wire::decode_catalog_request(&body) {
            Ok(r) => r,
            Err(e) => {
                refuse(inner, peer, &mut send, &mut recv, &ReadError::Wire(e));
                return;
            }
        },
        Ok(Err(e)) => {
            refuse(inner, peer, &mut send, &mut recv, &e);
            return;
        }
        Err(_) => {
            reset(&mut send, &mut recv, wire::code::HEADER_TIMEOUT);
            return;
        }
    };
    if let Some(mine) = &req.mine {
        // A joiner hands us its snapshot: we are its first contact, so we spread it.
        match apply_signed(inner, mine) {
            Ok(a) if a.is_new() => {
                if let (Ok((origin, version)), Some(b)) = (
                    signed::peek_snapshot(mine),
                    wire::encode_gossip_item(&GossipItem::Snapshot(mine.clone()))
                        .filter(|b| b.len() <= MAX_GOSSIP_SNAPSHOT),
                ) {
                    lock(&inner.catalog_sync.gossip).insert(origin, version, Bytes::from(b));
                }
            }
            Ok(_) => {}
            Err(e) => {
                stats::inc(&inner.stats.catalog_refused);
                warn!(peer = %peer.node_id.fmt_short(), error = %e, "offered catalog refused");
            }
        }
    }
    let entries = {
        let mut cat = write(&inner.catalog);
        let _ = cat.signed_own(&inner.catalog_sync.signer);
        cat.signed_entries(&req.origins, wire::MAX_SYNC_ENTRIES)
    };
    let mut batch = CatalogBatch {
        entries: Vec::new(),
    };
    let mut bytes = 0usize;
    for e in entries {
        let len = e.body.len() + 110;
        if !batch.entries.is_empty()
            && (bytes + len > BATCH_BYTES || batch.entries.len() == wire::MAX_BATCH_ENTRIES)
        {
            if write_batch(&mut send, &batch).await.is_err() {
                return;
            }
            batch.entries.clear();
            bytes = 0;
        }
        bytes += len;
        batch.entries.push(e);
    }
    if !batch.entries.is_empty() && write_batch(&mut send, &batch).await.is_err() {
        return;
    }
    let _ = send.finish();
    stats::inc(&inner.stats.catalog_served);
}

async fn write_batch(send: &mut quinn::SendStream, batch: &CatalogBatch) -> Result<(), SyncError> {
    let frame = wire::encode_frame(batch)?;
    send.write_all(&frame).await.map_err(stream_err)
}

fn refuse(
    inner: &Inner,
    peer: &CertInfo,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    e: &ReadError,
) {
    stats::inc(&inner.stats.stream_errors);
    stats::inc(&inner.stats.catalog_refused);
    warn!(peer = %peer.node_id.fmt_short(), error = %e, "bad catalog request; stream reset");
    reset(send, recv, e.code());
}

/// Our own signed snapshot, if there is anything to tell (services, or a withdrawal).
fn mine(inner: &Inner) -> Option<SignedCatalog> {
    let mut cat = write(&inner.catalog);
    if !cat.has_local() && cat.version().seq == 0 {
        return None;
    }
    cat.signed_own(&inner.catalog_sync.signer).ok()
}

/// Joined (first member up): pull everything from it, offering ours; on failure try again,
/// with another member if that one went away.
async fn join_sync(inner: Arc<Inner>, first: NodeId) {
    let mut node = first;
    let mut delay = Duration::from_millis(200);
    for attempt in 0..5 {
        match sync_with(&inner, node, Vec::new(), mine(&inner)).await {
            Ok(n) => {
                debug!(peer = %node.fmt_short(), new = n, "catalog pulled on join");
                return;
            }
            Err(e) => {
                debug!(peer = %node.fmt_short(), attempt, error = %e, "join catalog pull failed")
            }
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
        if !read(&inner.alive).contains_key(&node) {
            match random_member(&inner) {
                Some(n) => node = n,
                None => return,
            }
        }
    }
}

fn random_member(inner: &Inner) -> Option<NodeId> {
    let mut members: Vec<NodeId> = read(&inner.alive).keys().copied().collect();
    if members.is_empty() {
        return None;
    }
    members.sort();
    let i = lock(&inner.rng).random_range(0..members.len());
    Some(members[i])
}

/// Pulls one random member's whole catalog every [`refresh_period`] (repairs lost gossip).
pub(super) async fn refresh_loop(inner: Arc<Inner>) {
    // Wakes every 15 s and pulls once the period for the overlay's current size has passed
    // since the last pull (or the start), so a period computed while still alone does not
    // stand for a whole overlay.
    let mut tick = tokio::time::interval(REFRESH_PERIOD);
    tick.tick().await;
    let mut last = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let members = read(&inner.alive).len();
        if last.elapsed() < refresh_period(members) {
            continue;
        }
        last = tokio::time::Instant::now();
        let Some(node) = random_member(&inner) else {
            continue;
        };
        if let Err(e) = sync_with(&inner, node, Vec::new(), None).await {
            debug!(peer = %node.fmt_short(), error = %e, "catalog refresh failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repair_period_grows_like_memberlists_push_pull() {
        assert_eq!(refresh_period(0), REFRESH_PERIOD);
        assert_eq!(refresh_period(32), REFRESH_PERIOD);
        // log2(33) - 5 = 0.04 → ⌈⌉ = 1 → × 2.
        assert_eq!(refresh_period(33), REFRESH_PERIOD * 2);
        assert_eq!(refresh_period(64), REFRESH_PERIOD * 2);
        assert_eq!(refresh_period(100), REFRESH_PERIOD * 3);
        assert_eq!(refresh_period(999), REFRESH_PERIOD * 6);
        assert_eq!(refresh_period(1_000_000), REFRESH_PERIOD * 16);
    }
}
