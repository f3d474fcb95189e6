//! SWIM membership (foca), sans-IO.
//!
//! [`Membership`] is fed packets with [`Membership::handle_data`] (with the node id that mTLS
//! authenticated for the connection they came on) and timer events with
//! [`Membership::handle_timer`]; what it wants done is drained with
//! [`Membership::poll_transmit`], [`Membership::poll_timer`] and [`Membership::poll_event`].
//! It does no I/O and reads no clock: the driver in [`crate::node`] owns sockets and timers.
//!
//! A packet whose sender identity names another node than the connection's authenticated node
//! is rejected before foca sees it: nobody can speak for another node. Identities learned
//! second-hand (gossip) are only dialled with their node id as the TLS server name, so a lie
//! about another node's address makes dials fail, never reach an impostor.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU8, NonZeroUsize};
use std::time::Duration;

use bytes::Bytes;
use foca::{AccumulatingRuntime, Codec, Foca, NoCustomBroadcast, OwnedNotification, PostcardCodec};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::identity::{valid_name, NodeId};

/// foca's timer event, specialised to our identity.
pub type Timer = foca::Timer<PeerIdentity>;

/// The identity a member is known by: node id (the membership address), the UDP address to
/// reach it, its generation (bumped on restart and on rejoin) and its name.
///
/// Equality (and hashing) leaves the name out: it is the certificate's common name, fixed for
/// a node id and generation, carried for display. Two identities that differ only in name are
/// the same identity to SWIM, so a gossiped copy with another name (only a lying member can
/// send one: a member's own packets are checked against its certificate) does not replace the
/// one known. It also keeps foca's per-update identity comparison off the name's heap bytes,
/// a cache miss per received update (docs/BENCHMARKS.md, "Scale").
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerIdentity {
    /// Node id, from the member's certificate.
    pub node_id: NodeId,
    /// Address to dial.
    pub addr: SocketAddr,
    /// Generation; a higher one wins over a stale identity of the same node.
    pub generation: u64,
    /// Node name (certificate common name).
    pub name: String,
}

impl PartialEq for PeerIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.node_id == other.node_id
            && self.generation == other.generation
            && self.addr == other.addr
    }
}

impl Eq for PeerIdentity {}

impl std::hash::Hash for PeerIdentity {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.node_id.hash(state);
        self.generation.hash(state);
        self.addr.hash(state);
    }
}

impl foca::Identity for PeerIdentity {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            generation: self.generation.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> NodeId {
        self.node_id
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// A member's state as seen locally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Answering probes.
    Alive,
    /// Missed probes; may be declared down.
    Suspect,
    /// Declared down.
    Down,
}

/// Membership changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A member became reachable (joined, or came back).
    Up(PeerIdentity),
    /// A member was declared down, or left.
    Down(PeerIdentity),
    /// This node is part of a cluster (it knows at least one live member).
    Active,
    /// This node knows no live member.
    Idle,
    /// This node was declared down by others and rejoined under a renewed identity (its
    /// generation grew): what it announced before must be announced again.
    Rejoin(PeerIdentity),
}

/// Why a membership packet was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MembershipError {
    /// The packet's sender claims another node id than the authenticated connection.
    #[error("sender claims node {claimed} but the connection is authenticated as {actual}")]
    IdentityMismatch {
        /// Node id in the packet.
        claimed: NodeId,
        /// Node id from mTLS.
        actual: NodeId,
    },
    /// The sender's name is invalid or differs from its certificate.
    #[error("sender name {0:?} invalid or does not match its certificate")]
    BadName(String),
    /// foca refused the packet.
    #[error("membership packet refused: {0}")]
    Foca(String),
}

/// Timing of the SWIM protocol.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// Time between probes.
    pub probe_period: Duration,
    /// How long to wait for a direct ack before indirect probes.
    pub probe_rtt: Duration,
    /// Suspicion time before a member is declared down.
    pub suspect_to_down: Duration,
    /// Largest packet foca may produce (must fit a membership-channel packet).
    pub max_packet_size: usize,
    /// Expected cluster size (tunes how often an update is retransmitted).
    pub cluster_size_hint: u32,
    /// foca's periodic gossip (period, members per round), on top of piggy-backing updates on
    /// probes; foca sends it only while it has updates to spread. Default 200 ms × 3
    /// (memberlist's LAN values). Each round goes to fresh random members; on the membership
    /// channel a new member costs an `INIT` and a pair key (no QUIC handshake). Measured at
    /// 100 peers (docs/BENCHMARKS.md "Membership"): off makes the last peer see a crash 10.4 s after it
    /// instead of 5.5 s; 500 ms × 1 gives 7.7 s.
    pub periodic_gossip: Option<(Duration, usize)>,
    /// First contacts per second that periodic gossip may make (burst: twice as many). Each
    /// costs a certificate check and a pair key on the membership channel, and during a
    /// join storm foca would gossip to ~15 fresh members a second; past this budget, gossip for
    /// a member without a session goes to a random member with one (once there are 8).
    /// Default 2/s. None: never redirect. Measured (docs/BENCHMARKS.md "Scale"): always
    /// redirecting made the 100-peer crash detection 1.4 s slower.
    pub gossip_first_contacts_per_s: Option<u32>,
}

impl Default for MembershipConfig {
    /// memberlist's LAN defaults: probe 1 s, ack timeout 500 ms, suspicion 4 s.
    fn default() -> Self {
        Self {
            probe_period: Duration::from_secs(1),
            probe_rtt: Duration::from_millis(500),
            suspect_to_down: Duration::from_secs(4),
            max_packet_size: 1100,
            cluster_size_hint: 32,
            periodic_gossip: Some((Duration::from_millis(200), 3)),
            gossip_first_contacts_per_s: Some(2),
        }
    }
}

impl MembershipConfig {
    fn to_foca(&self) -> foca::Config {
        let size = NonZeroU32::new(self.cluster_size_hint.max(1)).unwrap_or(NonZeroU32::MIN);
        let mut c = foca::Config::new_lan(size);
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.suspect_to_down_after = self.suspect_to_down;
        // A member that hears a suspicion by gossip declares the suspect down itself after
        // 3× the suspicion time, as a backstop for a `Down` update that missed it (without
        // one it stayed Suspect until its own probe, ~N probe periods). Longer than the
        // prober's timer so that a refutation has time to reach everyone: with 1× it, 4
        // of 28 runs at 5% loss had false downs (docs/BENCHMARKS.md "Gossiped suspicion").
        c.gossiped_suspect_to_down_after = Some(self.suspect_to_down.saturating_mul(3));
        c.max_packet_size =
            NonZeroUsize::new(self.max_packet_size.max(512)).unwrap_or(NonZeroUsize::MIN);
        c.num_indirect_probes = NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN);
        c.max_transmissions = c
            .max_transmissions
            .max(NonZeroU8::new(4).unwrap_or(NonZeroU8::MIN));
        // Forget down members after a while so memory stays bounded under churn.
        c.remove_down_after = Some(Duration::from_secs(60));
        c.periodic_gossip = self.periodic_gossip.and_then(|(frequency, n)| {
            Some(foca::PeriodicParams {
                frequency,
                num_members: NonZeroUsize::new(n)?,
            })
        });
        c
    }
}

/// If `data` is one of foca's periodic-gossip packets (updates addressed to nobody in
/// particular), the same packet addressed to `to` instead: foca applies updates only from
/// packets addressed to its exact identity. Other packets (probes, acks, announces) are tied to
/// their destination and return None.
pub fn readdress_gossip(data: &[u8], to: &PeerIdentity) -> Option<Vec<u8>> {
    let mut buf = data;
    let mut header: foca::Header<PeerIdentity> = PostcardCodec.decode_header(&mut buf).ok()?;
    if header.message != foca::Message::Gossip {
        return None;
    }
    header.dst = to.clone();
    let mut out = Vec::with_capacity(data.len() + 16);
    PostcardCodec.encode_header(&header, &mut out).ok()?;
    out.extend_from_slice(buf);
    Some(out)
}

/// Whether `data` is one of foca's periodic-gossip packets.
pub fn is_gossip(data: &[u8]) -> bool {
    let mut buf = data;
    let header: Result<foca::Header<PeerIdentity>, _> = PostcardCodec.decode_header(&mut buf);
    header.is_ok_and(|h| h.message == foca::Message::Gossip)
}

/// SWIM membership state machine for one node.
pub struct Membership {
    foca: Foca<PeerIdentity, PostcardCodec, StdRng, NoCustomBroadcast>,
    rt: AccumulatingRuntime<PeerIdentity>,
    events: std::collections::VecDeque<MembershipEvent>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("identity", self.foca.identity())
            .field("members", &self.foca.num_members())
            .finish()
    }
}

impl Membership {
    /// Creates the state machine; `seed` makes its random choices reproducible.
    pub fn new(identity: PeerIdentity, config: &MembershipConfig, seed: u64) -> Self {
        let foca = Foca::new(
            identity,
            config.to_foca(),
            StdRng::seed_from_u64(seed),
            PostcardCodec,
        );
        Self {
            foca,
            rt: AccumulatingRuntime::new(),
            events: Default::default(),
        }
    }

    /// This node's current identity (its generation may have been renewed).
    pub fn identity(&self) -> &PeerIdentity {
        self.foca.identity()
    }

    /// Handles a packet that arrived on a connection authenticated as `from` with certificate
    /// name `from_name`.
    pub fn handle_data(
        &mut self,
        from: NodeId,
        from_name: &str,
        data: &[u8],
    ) -> Result<(), MembershipError> {
        let mut buf = data;
        let header: foca::Header<PeerIdentity> = PostcardCodec
            .decode_header(&mut buf)
            .map_err(|e| MembershipError::Foca(e.to_string()))?;
        if header.src.node_id != from {
            return Err(MembershipError::IdentityMismatch {
                claimed: header.src.node_id,
                actual: from,
            });
        }
        if !valid_name(&header.src.name) || header.src.name != from_name {
            return Err(MembershipError::BadName(header.src.name.clone()));
        }
        let res = self
            .foca
            .handle_data(data, &mut self.rt)
            .map_err(|e| MembershipError::Foca(e.to_string()));
        self.collect_events();
        res
    }

    /// Handles a timer event that fell due.
    pub fn handle_timer(&mut self, timer: Timer) {
        if let Err(e) = self.foca.handle_timer(timer, &mut self.rt) {
            tracing::debug!(error = %e, "membership timer");
        }
        self.collect_events();
    }

    /// Announces this node to `to` (a join attempt).
    pub fn announce(&mut self, to: PeerIdentity) {
        if let Err(e) = self.foca.announce(to, &mut self.rt) {
            tracing::debug!(error = %e, "announce");
        }
        self.collect_events();
    }

    /// Leaves the cluster gracefully (others learn it at once instead of suspecting).
    pub fn leave(&mut self) {
        if let Err(e) = self.foca.leave_cluster(&mut self.rt) {
            tracing::debug!(error = %e, "leave");
        }
        self.collect_events();
    }

    /// Next packet to send.
    pub fn poll_transmit(&mut self) -> Option<(PeerIdentity, Bytes)> {
        self.rt.to_send()
    }

    /// Next timer to schedule.
    pub fn poll_timer(&mut self) -> Option<(Duration, Timer)> {
        self.rt.to_schedule()
    }

    /// Next membership event.
    pub fn poll_event(&mut self) -> Option<MembershipEvent> {
        self.events.pop_front()
    }

    /// Number of live members (excluding this node).
    pub fn num_members(&self) -> usize {
        self.foca.num_members()
    }

    /// Every member known, with its state (down members until they are forgotten).
    pub fn members(&self) -> Vec<(PeerIdentity, PeerState)> {
        self.foca
            .iter_membership_state()
            .map(|m| {
                let state = match m.state() {
                    foca::State::Alive => PeerState::Alive,
                    foca::State::Suspect => PeerState::Suspect,
                    foca::State::Down => PeerState::Down,
                };
                (m.id().clone(), state)
            })
            .collect()
    }

    fn collect_events(&mut self) {
        while let Some(n) = self.rt.to_notify() {
            let ev = match n {
                OwnedNotification::MemberUp(id) => MembershipEvent::Up(id),
                OwnedNotification::MemberDown(id) => MembershipEvent::Down(id),
                OwnedNotification::Rename(old, new) => {
                    // Same node, new generation: report as down-then-up only if the address
                    // changed; otherwise it is the same live member.
                    if old.addr != new.addr {
                        self.events.push_back(MembershipEvent::Down(old));
                    }
                    MembershipEvent::Up(new)
                }
                OwnedNotification::Active => MembershipEvent::Active,
                OwnedNotification::Idle => MembershipEvent::Idle,
                OwnedNotification::Rejoin(id) => MembershipEvent::Rejoin(id),
                _ => continue,
            };
            self.events.push_back(ev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(n: u8) -> PeerIdentity {
        PeerIdentity {
            node_id: NodeId::from_spki(&[n]),
            addr: SocketAddr::from(([127, 0, 0, 1], 1000 + u16::from(n))),
            generation: 1,
            name: format!("n{n}"),
        }
    }

    /// Delivers every pending packet between a set of state machines, with sender checks.
    fn pump(nodes: &mut [Membership]) {
        for _ in 0..20 {
            let mut moved = false;
            for i in 0..nodes.len() {
                while let Some((to, data)) = nodes[i].poll_transmit() {
                    let from = nodes[i].identity().clone();
                    if let Some(j) = nodes
                        .iter()
                        .position(|n| n.identity().node_id == to.node_id)
                    {
                        nodes[j]
                            .handle_data(from.node_id, &from.name, &data)
                            .expect("honest packet accepted");
                        moved = true;
                    }
                }
            }
            if !moved {
                break;
            }
        }
    }

    #[test]
    fn announce_joins_both_sides() {
        let cfg = MembershipConfig::default();
        let mut nodes = vec![
            Membership::new(ident(1), &cfg, 1),
            Membership::new(ident(2), &cfg, 2),
        ];
        let target = nodes[1].identity().clone();
        nodes[0].announce(target);
        pump(&mut nodes);
        assert_eq!(nodes[0].num_members(), 1);
        assert_eq!(nodes[1].num_members(), 1);
        let ev: Vec<_> = std::iter::from_fn(|| nodes[1].poll_event()).collect();
        assert!(ev.contains(&MembershipEvent::Up(ident(1))), "{ev:?}");
    }

    #[test]
    fn packet_claiming_another_identity_is_refused() {
        let cfg = MembershipConfig::default();
        let mut a = Membership::new(ident(1), &cfg, 1);
        let mut b = Membership::new(ident(2), &cfg, 2);
        a.announce(b.identity().clone());
        let (_, data) = a.poll_transmit().expect("announce packet");
        let impostor = ident(3);
        let err = b.handle_data(impostor.node_id, &impostor.name, &data);
        assert!(matches!(err, Err(MembershipError::IdentityMismatch { .. })));
        assert_eq!(b.num_members(), 0, "refused sender was not added");
        // Right id, wrong name (name must match the certificate).
        let err = b.handle_data(ident(1).node_id, "someone-else", &data);
        assert!(matches!(err, Err(MembershipError::BadName(_))));
        assert_eq!(b.num_members(), 0);
    }

    #[test]
    fn the_name_is_no_part_of_identity_equality() {
        use std::collections::HashSet;
        let a = ident(1);
        let renamed = PeerIdentity {
            name: "liar".into(),
            ..a.clone()
        };
        assert_eq!(a, renamed);
        assert_eq!(HashSet::from([a.clone(), renamed]).len(), 1);
        let restarted = PeerIdentity {
            generation: 2,
            ..a.clone()
        };
        let moved = PeerIdentity {
            addr: SocketAddr::from(([127, 0, 0, 2], 1001)),
            ..a.clone()
        };
        assert_ne!(a, restarted);
        assert_ne!(a, moved);
        assert_ne!(a, ident(2));
    }

    #[test]
    fn garbage_is_refused_without_panic() {
        let cfg = MembershipConfig::default();
        let mut b = Membership::new(ident(2), &cfg, 2);
        for data in [&b""[..], &[0xff; 5], &[0u8; 2000]] {
            assert!(b.handle_data(ident(1).node_id, "n1", data).is_err());
        }
    }
}
