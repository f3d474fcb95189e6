//! The context-counting engine behind every context model.
//!
//! A *context* is a scope (one client, one group, or all clients) plus the client's last `n`
//! services (`n` = the order, 0..=3). For every event, the engine adds the service to the count
//! table ([`Dist`]) of each enabled scope × order, then shifts the client's history. Scopes are
//! keyed by a serial number that is never reused, so when a client or group id is recycled its
//! old contexts become unreachable and age out of the bounded context table.
//!
//! Tables are all bounded: clients, groups and contexts each have a cap and are evicted
//! least-recently-seen first (see `crate::store`).
//!
//! Speed: the context tables live in a [`Slab`], and every client keeps the slots of its current
//! context's tables ([`Handles`]), so `predict` and the next `observe` use them without hashing.
//! After an update, the next context of order `n + 1` is found by following the link kept in the
//! order-`n` table's entry for the service just seen ([`crate::store::Entry::child`]); a hash
//! lookup is only needed the first time. Handles are hints checked against the slab's epoch
//! before use, links are kept exact by the slab (cleared when their slot is vacated); neither
//! is serialized, and neither changes a result.

use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

use crate::models::ModelConfig;
use crate::store::{Bounded, Decay, Dist, Hint, Slab, SlotKey, Stamped, NONE, NO_HINT, NO_SLOT};
use crate::{ClientId, GroupId};

/// Scope index: the client's own contexts.
pub(crate) const CLIENT: usize = 0;
/// Scope index: contexts pooled over the client's group.
pub(crate) const GROUP: usize = 1;
/// Scope index: contexts pooled over all clients.
pub(crate) const GLOBAL: usize = 2;

/// Highest supported order.
pub(crate) const MAX_ORDER: usize = 4;
// `Core::learn_with` shifts histories with an explicit four-element literal.
const _: () = assert!(MAX_ORDER == 4);

const TAG_CLIENT: u64 = 1 << 62;
const TAG_GROUP: u64 = 2 << 62;
const TAG_GLOBAL: u64 = 3 << 62;
/// Marks the order-2 "bag" context (the last two services, order ignored).
const BAG: u64 = 1 << 61;
const SERIAL_MASK: u64 = BAG - 1;

/// Key of one count table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct CtxKey {
    scope: u64,
    hist: [u32; MAX_ORDER],
}

impl Hash for CtxKey {
    /// Three machine words (the derived impl also hashes the array's length and goes through
    /// byte slices).
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        let h = &self.hist;
        state.write_u64(self.scope);
        state.write_u64(u64::from(h[0]) | u64::from(h[1]) << 32);
        state.write_u64(u64::from(h[2]) | u64::from(h[3]) << 32);
    }
}

impl SlotKey for CtxKey {
    /// Scope 0: every real scope carries one of the `TAG_*` bits.
    const VACANT: Self = CtxKey {
        scope: 0,
        hist: [NONE; MAX_ORDER],
    };
    #[inline]
    fn is_vacant(&self) -> bool {
        self.scope == 0
    }
}

/// Tables per scope: orders `0..=MAX_ORDER`, then the bag ([`BAG_SLOT`]).
pub(crate) const SLOTS: usize = MAX_ORDER + 2;

/// A client-scope table known not to exist (only the client itself creates those): a hint
/// whose slot number no slab reaches.
const ABSENT: Hint = (NO_SLOT - 1) as u64;

/// Generation-tagged slab hints of a client's current-context tables, `[scope][slot]`
/// ([`NO_HINT`] = unknown, `ABSENT` = known missing), and the scope ids they were taken for
/// (a client's group can change, or its group be recreated with a new serial). A hint is
/// trusted without comparing keys when its scope id matches and it is of the slab's current epoch;
/// anything else falls back to a keyed lookup. An accelerator, not state: skipped by serde
/// and by `==`, reset whenever the client's history is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Handles {
    ids: [Option<u64>; 3],
    h: [[Hint; SLOTS]; 3],
    /// The engine's [`Core::group_epoch`] when `ids` were last computed (0: never): while it
    /// is current, `ids[GROUP]` is the client's group scope id, without a group lookup.
    epoch: u64,
}

impl Default for Handles {
    fn default() -> Self {
        Self {
            ids: [None; 3],
            h: [[NO_HINT; SLOTS]; 3],
            epoch: 0,
        }
    }
}

impl Handles {
    /// The hints of `scope` if they were taken for scope id `id`, else all unknown.
    #[inline]
    fn of(&self, scope: usize, id: u64) -> [Hint; SLOTS] {
        if self.ids[scope] == Some(id) {
            self.h[scope]
        } else {
            [NO_HINT; SLOTS]
        }
    }
}

impl PartialEq for Handles {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Per-client state; `X` is what a particular model adds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ClientState<X> {
    pub serial: u64,
    pub group: Option<GroupId>,
    /// Most recent first; `NONE` where the client has no history yet.
    pub hist: [u32; MAX_ORDER],
    pub last_at: u64,
    pub events: u32,
    pub ext: X,
    #[serde(skip)]
    pub cur: Handles,
}

/// The client's state, created if new (with `make` for the model's part); a group given
/// replaces the client's, and a change of group moves the group epoch (cached group ids are
/// then looked up again).
/// Touches group `g` for client `member` (creating it may evict others): the group becomes
/// shared once a second client touches it; creating it or sharing it moves the group epoch.
#[inline]
fn touch_group(
    groups: &mut Bounded<GroupId, GroupState>,
    group_epoch: &mut u64,
    g: GroupId,
    at: u64,
    serial: u64,
    member: u64,
) {
    let (gs, created) = groups.upsert(g, at, || GroupState {
        serial,
        last_at: at,
        first: member,
        shared: false,
    });
    gs.last_at = gs.last_at.max(at);
    let shared = gs.shared | (gs.first != member);
    if created | (shared != gs.shared) {
        *group_epoch += 1;
    }
    gs.shared = shared;
}

#[inline]
fn upsert_client<'a, X>(
    clients: &'a mut Bounded<ClientId, ClientState<X>>,
    group_epoch: &mut u64,
    (client, group, at, serial): (ClientId, Option<GroupId>, u64, u64),
    make: impl FnOnce() -> X,
) -> &'a mut ClientState<X> {
    let (c, _) = clients.upsert(client, at, || ClientState {
        serial,
        group: None,
        hist: [NONE; MAX_ORDER],
        last_at: at,
        events: 0,
        ext: make(),
        cur: Handles::default(),
    });
    if group.is_some() {
        if c.group != group {
            *group_epoch += 1;
        }
        c.group = group;
    }
    c
}

impl<X> Stamped for ClientState<X> {
    fn last_at(&self) -> u64 {
        self.last_at
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct GroupState {
    pub serial: u64,
    pub last_at: u64,
    /// Serial of the first client seen in the group.
    pub first: u64,
    /// Whether a second client has been seen: until then the group's contexts would only
    /// duplicate the client's, so they are not counted.
    pub shared: bool,
}

/// A table's statistics just before an update (see [`Core::learn_with`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Pre {
    /// Decayed total count.
    pub total: f32,
    /// Distinct successors.
    pub distinct: f32,
    /// Count of the service being learned.
    pub count: f32,
}

/// Slot of the bag context in per-scope arrays indexed by order.
pub(crate) const BAG_SLOT: usize = MAX_ORDER + 1;

/// Context tables (order or bag) updated by one event in one scope: `(hint, position of the
/// service in the table)`, [`NO_HINT`] for a table not updated (a sentinel rather than an
/// `Option`: [`Slab::check`] refuses it like any stale hint, so no separate branch).
type Updated = [(Hint, usize); SLOTS];

impl Stamped for GroupState {
    fn last_at(&self) -> u64 {
        self.last_at
    }
}

/// The count tables of a client's current context: `d[scope][slot]`, slot = order, or
/// [`BAG_SLOT`] for the bag context (if the engine counts bags).
pub(crate) struct View<'a> {
    pub d: [[Option<&'a Dist>; SLOTS]; 3],
}

/// Serialized form of a [`Core`], entries sorted by key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CoreState<X> {
    next_serial: u64,
    clients: Vec<(ClientId, ClientState<X>)>,
    groups: Vec<(GroupId, GroupState)>,
    ctx: Vec<(CtxKey, Dist)>,
}

/// The engine: which scopes and orders are counted, and the bounded tables.
#[derive(Debug, Clone)]
pub(crate) struct Core<X> {
    pub decay: Decay,
    pub scopes: [bool; 3],
    pub lo: usize,
    pub hi: usize,
    /// Highest order counted in each scope (at most `hi`, at least `lo`).
    pub his: [usize; 3],
    /// Whether the unordered last-two context is counted too, per scope.
    pub bag: [bool; 3],
    pub clients: Bounded<ClientId, ClientState<X>>,
    pub groups: Bounded<GroupId, GroupState>,
    pub ctx: Slab<CtxKey, Dist>,
    next_serial: u64,
    ttl_ms: u64,
    /// Moves on whenever a client's group scope id may change (a group created, evicted,
    /// removed or becoming shared, a client changing group, a restore); see `Handles::epoch`.
    /// Never serialized (nor are the handles).
    group_epoch: u64,
}

impl<X: Clone> Core<X> {
    /// An engine counting orders `lo..=hi` (clamped to `MAX_ORDER`) in the enabled scopes.
    pub fn new(cfg: &ModelConfig, scopes: [bool; 3], lo: usize, hi: usize) -> Self {
        let hi = hi.min(MAX_ORDER);
        Self {
            decay: Decay::new(cfg.half_life_ms.max(1) as f64, cfg.max_entries.max(1)),
            scopes,
            lo: lo.min(hi),
            hi,
            his: [hi; 3],
            bag: [false; 3],
            clients: Bounded::new(cfg.max_clients, cfg.idle_ttl_ms),
            groups: Bounded::new(cfg.max_groups, cfg.idle_ttl_ms),
            ctx: Slab::new(cfg.max_contexts, cfg.idle_ttl_ms),
            next_serial: 1,
            ttl_ms: cfg.idle_ttl_ms,
            group_epoch: 1,
        }
    }

    fn serial(&mut self) -> u64 {
        let s = self.next_serial;
        self.next_serial = (self.next_serial + 1) & SERIAL_MASK;
        s
    }

    /// Makes sure `client` (and its group, if given) exist; `make` builds a new client's
    /// extension. Returns the client's `(events, last_at)` (0 events if it is new).
    pub fn touch(
        &mut self,
        client: ClientId,
        group: Option<GroupId>,
        at: u64,
        make: impl FnOnce() -> X,
    ) -> (u32, u64) {
        let serial = self.serial();
        let c = upsert_client(
            &mut self.clients,
            &mut self.group_epoch,
            (client, group, at, serial),
            make,
        );
        let (group, member) = (c.group, c.serial);
        let seen = (c.events, c.last_at);
        if let Some(g) = group {
            if self.scopes[GROUP] {
                let serial = self.serial();
                touch_group(
                    &mut self.groups,
                    &mut self.group_epoch,
                    g,
                    at,
                    serial,
                    member,
                );
            }
        }
        seen
    }

    fn scope_ids(&self, c: &ClientState<X>) -> [Option<u64>; 3] {
        scope_ids(&self.scopes, &self.groups, self.group_epoch, c)
    }

    #[inline]
    fn key(scope: u64, hist: &[u32; MAX_ORDER], order: usize) -> Option<CtxKey> {
        key(scope, hist, order)
    }

    #[inline]
    fn bag_key(scope: u64, hist: &[u32; MAX_ORDER]) -> Option<CtxKey> {
        bag_key(scope, hist)
    }

    /// The count tables of `c`'s current context.
    pub fn view(&self, c: &ClientState<X>) -> View<'_> {
        let mut d = [[None; SLOTS]; 3];
        self.view_into(c, &mut d);
        View { d }
    }

    /// [`Core::view`] written into `d` (which must be all `None`): returning the 144-byte
    /// array is a `memcpy` call.
    pub fn view_into<'a>(&'a self, c: &ClientState<X>, d: &mut [[Option<&'a Dist>; SLOTS]; 3]) {
        for (scope, id) in self.scope_ids(c).into_iter().enumerate() {
            let Some(id) = id else { continue };
            let hints = c.cur.of(scope, id);
            // A valid hint is the table of this context (hints are reset with the history and
            // checked against the scope id); otherwise build the key and look it up.
            let find = |hint: Hint, key: &dyn Fn() -> Option<CtxKey>| {
                if let Some(d) = self.ctx.at_hint(hint) {
                    return Some(d);
                }
                if scope == CLIENT && hint == ABSENT {
                    return None;
                }
                self.ctx.slot_of(&key()?).and_then(|s| self.ctx.at(s))
            };
            if self.bag[scope] {
                d[scope][BAG_SLOT] = find(hints[BAG_SLOT], &|| Self::bag_key(id, &c.hist));
            }
            for (order, slot) in d[scope]
                .iter_mut()
                .enumerate()
                .take(self.his[scope] + 1)
                .skip(self.lo)
            {
                *slot = find(hints[order], &|| Self::key(id, &c.hist, order));
            }
        }
    }

    /// Counts `service` in every context of `client` (which must have been touched), then
    /// shifts its history.
    pub fn learn(&mut self, client: ClientId, service: u32, at: u64) {
        let _ = self.learn_with(client, service, at, |_, _, _| {});
    }

    /// Like [`Core::learn`], first telling `pre(scope, slot, stats)` each table's statistics
    /// before the update (`slot` = order, or [`BAG_SLOT`]). Uses the client's handles, so hash
    /// lookups are only needed for tables that are new or were not reachable by a link.
    pub fn learn_with(
        &mut self,
        client: ClientId,
        service: u32,
        at: u64,
        pre: impl FnMut(usize, usize, Pre),
    ) -> Option<&mut ClientState<X>> {
        // One client lookup: the client's entry and the context slab are disjoint fields, so
        // the client's history and handles are read and rewritten in place (no copies of the
        // handle arrays).
        let c = self.clients.get_mut(&client)?;
        let shape = Shape {
            scopes: &self.scopes,
            lo: self.lo,
            his: &self.his,
            bag: &self.bag,
            decay: &self.decay,
            group_epoch: self.group_epoch,
        };
        Some(learn_client(
            &mut self.ctx,
            &self.groups,
            &shape,
            c,
            service,
            at,
            pre,
        ))
    }

    /// [`Core::touch`] then [`Core::learn_with`] with one client lookup: returns the client's
    /// `(events, last_at)` before this event (as `touch`) and its entry after it.
    pub fn touch_learn(
        &mut self,
        client: ClientId,
        group: Option<GroupId>,
        (service, at): (u32, u64),
        make: impl FnOnce() -> X,
        pre: impl FnMut(usize, usize, Pre),
    ) -> ((u32, u64), &mut ClientState<X>) {
        // As `touch`, with the group's serial taken by field (the client's entry stays
        // borrowed): the same serials in the same order.
        let serial = self.serial();
        let c = upsert_client(
            &mut self.clients,
            &mut self.group_epoch,
            (client, group, at, serial),
            make,
        );
        let seen = (c.events, c.last_at);
        if let Some(g) = c.group {
            if self.scopes[GROUP] {
                let serial = self.next_serial;
                self.next_serial = (self.next_serial + 1) & SERIAL_MASK;
                let member = c.serial;
                touch_group(
                    &mut self.groups,
                    &mut self.group_epoch,
                    g,
                    at,
                    serial,
                    member,
                );
            }
        }
        let shape = Shape {
            scopes: &self.scopes,
            lo: self.lo,
            his: &self.his,
            bag: &self.bag,
            decay: &self.decay,
            group_epoch: self.group_epoch,
        };
        let c = learn_client(&mut self.ctx, &self.groups, &shape, c, service, at, pre);
        (seen, c)
    }

    pub fn forget_client(&mut self, client: ClientId) {
        self.clients.remove(&client);
    }

    pub fn forget_groups(&mut self, groups: &[GroupId]) {
        if groups.is_empty() {
            return;
        }
        self.group_epoch += 1;
        let mut sorted = groups.to_vec();
        sorted.sort_unstable();
        for g in &sorted {
            self.groups.remove(g);
        }
        for c in self.clients.values_mut() {
            if c.group.is_some_and(|g| sorted.binary_search(&g).is_ok()) {
                c.group = None;
            }
        }
    }

    /// Drops counts of the given services and histories that mention them.
    pub fn forget_services(&mut self, services: &[u32]) {
        if services.is_empty() {
            return;
        }
        let mut sorted = services.to_vec();
        sorted.sort_unstable();
        let gone = |s: u32| sorted.binary_search(&s).is_ok();
        for d in self.ctx.values_mut() {
            d.retain_services(&gone);
        }
        for c in self.clients.values_mut() {
            if c.hist.iter().any(|&h| gone(h)) {
                c.hist = [NONE; MAX_ORDER];
                c.cur = Handles::default();
            }
        }
    }

    pub fn memory_bytes(&self, ext_heap: impl Fn(&X) -> usize) -> usize {
        self.clients.bytes(|c| ext_heap(&c.ext))
            + self.groups.bytes(|_| 0)
            + self.ctx.bytes(Dist::heap_bytes)
    }

    pub fn state(&self) -> CoreState<X> {
        CoreState {
            next_serial: self.next_serial,
            clients: self
                .clients
                .sorted()
                .into_iter()
                .map(|(k, v)| (k, v.clone()))
                .collect(),
            groups: self
                .groups
                .sorted()
                .into_iter()
                .map(|(k, v)| (k, *v))
                .collect(),
            ctx: self
                .ctx
                .sorted()
                .into_iter()
                .map(|(k, v)| (k, v.clone()))
                .collect(),
        }
    }

    /// Restores tables from a snapshot into an engine built with the same configuration.
    pub fn restore(&mut self, s: CoreState<X>) {
        let ttl = self.ttl_ms;
        self.next_serial = s.next_serial.max(1) & SERIAL_MASK;
        self.clients = Bounded::from_entries(self.clients.cap(), ttl, s.clients);
        self.groups = Bounded::from_entries(self.groups.cap(), ttl, s.groups);
        self.group_epoch += 1;
        let max_entries = self.decay.max_entries;
        let mut ctx = s.ctx;
        for (_, d) in &mut ctx {
            d.entries.truncate(max_entries);
            if !(d.scale > 0.0 && d.scale <= 1.0) {
                d.renormalise();
            }
        }
        self.ctx = Slab::from_entries(self.ctx.cap(), ttl, ctx);
    }
}

/// What [`learn_client`] reads of the engine besides the slab and the groups.
struct Shape<'a> {
    scopes: &'a [bool; 3],
    lo: usize,
    his: &'a [usize; 3],
    bag: &'a [bool; 3],
    decay: &'a Decay,
    group_epoch: u64,
}

/// The body of [`Core::learn_with`] on a client's entry found (or created) by the caller; a
/// free function over the engine's fields, so the client's entry stays borrowed.
#[inline(always)]
fn learn_client<'c, X>(
    ctx: &mut Slab<CtxKey, Dist>,
    groups: &Bounded<GroupId, GroupState>,
    shape: &Shape<'_>,
    c: &'c mut ClientState<X>,
    service: u32,
    at: u64,
    mut pre: impl FnMut(usize, usize, Pre),
) -> &'c mut ClientState<X> {
    let ids = scope_ids(shape.scopes, groups, shape.group_epoch, c);
    c.cur.epoch = shape.group_epoch;
    let hist = c.hist;
    let delay = if c.events > 0 {
        at.saturating_sub(c.last_at) as f32
    } else {
        0.0
    };
    let next_hist = [service, hist[0], hist[1], hist[2]];
    let lo = shape.lo;
    for (scope, id) in ids.into_iter().enumerate() {
        let (hi, bag) = (shape.his[scope], shape.bag[scope]);
        let Some(id) = id else {
            c.cur.ids[scope] = None;
            continue;
        };
        let hints = c.cur.of(scope, id);
        let mut done: Updated = [(NO_HINT, 0); SLOTS];
        for slot in (lo..=hi).chain(bag.then_some(BAG_SLOT)) {
            // A valid hint is this context's table (see `Handles`); the key is only built
            // when it is not.
            let s = match ctx.check(hints[slot]) {
                Some(s) => s,
                None => {
                    let key = if slot == BAG_SLOT {
                        bag_key(id, &hist)
                    } else {
                        key(id, &hist, slot)
                    };
                    let Some(key) = key else { continue };
                    ctx.upsert(key, at).0
                }
            };
            // Live: a current hint's slot, or just upserted.
            let Some(dist) = ctx.live_mut(s) else {
                continue;
            };
            let (total, distinct) = (dist.total, dist.entries.len() as f32);
            let (count, pos) = dist.observe(service, at, delay, shape.decay);
            pre(
                scope,
                slot,
                Pre {
                    total,
                    distinct,
                    count,
                },
            );
            done[slot] = (ctx.hint(s), pos);
        }
        c.cur.ids[scope] = Some(id);
        c.cur.h[scope] = next_handles(ctx, (lo, hi, bag), scope, id, &done, &next_hist);
    }
    c.hist = next_hist;
    c.last_at = c.last_at.max(at);
    c.events = c.events.saturating_add(1);
    c
}

/// The scope ids of `c`'s contexts (`None` for a scope not counted, or a group not yet
/// shared by two clients).
#[inline]
fn scope_ids<X>(
    scopes: &[bool; 3],
    groups: &Bounded<GroupId, GroupState>,
    epoch: u64,
    c: &ClientState<X>,
) -> [Option<u64>; 3] {
    let group = if !scopes[GROUP] {
        None
    } else if c.cur.epoch == epoch {
        c.cur.ids[GROUP]
    } else {
        c.group
            .and_then(|g| groups.get(&g))
            .filter(|g| g.shared)
            .map(|g| TAG_GROUP | g.serial)
    };
    [
        scopes[CLIENT].then_some(TAG_CLIENT | c.serial),
        group,
        scopes[GLOBAL].then_some(TAG_GLOBAL),
    ]
}

#[inline]
fn key(scope: u64, hist: &[u32; MAX_ORDER], order: usize) -> Option<CtxKey> {
    if order > 0 && hist[order - 1] == NONE {
        return None;
    }
    // Element-wise select: a variable-length `copy_from_slice` becomes a `memcpy` call.
    let h = std::array::from_fn(|i| if i < order { hist[i] } else { NONE });
    Some(CtxKey { scope, hist: h })
}

#[inline]
fn bag_key(scope: u64, hist: &[u32; MAX_ORDER]) -> Option<CtxKey> {
    if hist[1] == NONE {
        return None;
    }
    let mut h = [NONE; MAX_ORDER];
    h[0] = hist[0].min(hist[1]);
    h[1] = hist[0].max(hist[1]);
    Some(CtxKey {
        scope: scope | BAG,
        hist: h,
    })
}

/// Slots of the tables of the context after an update (`hist` already shifted), following
/// the links of the tables just updated (`done`) and recording the ones found by lookup;
/// `orders` = the engine's `(lo, hi, bag)`.
#[inline(always)]
fn next_handles(
    ctx: &mut Slab<CtxKey, Dist>,
    (lo, hi, bag): (usize, usize, bool),
    scope: usize,
    id: u64,
    done: &Updated,
    hist: &[u32; MAX_ORDER],
) -> [Hint; SLOTS] {
    let miss = if scope == CLIENT { ABSENT } else { NO_HINT };
    let mut out = [NO_HINT; SLOTS];
    // Tables updated by this event are still valid unless a later upsert evicted them.
    let live = |ctx: &Slab<CtxKey, Dist>, k: usize| {
        let (h, pos) = done[k];
        ctx.check(h).map(|s| (s, pos))
    };
    for order in lo..=hi {
        // Order 0 has no history: the same table again.
        if order == 0 {
            out[0] = match live(ctx, 0) {
                Some((s, _)) => ctx.hint(s),
                None => lookup(ctx, &key(id, hist, 0), miss),
            };
            continue;
        }
        if hist[order - 1] == NONE {
            continue;
        }
        // The key is only built when there is no link to follow.
        let key = || key(id, hist, order).expect("hist[order - 1] checked above");
        out[order] = match live(ctx, order - 1) {
            Some((ps, pos)) => follow(ctx, ps, pos, key, miss),
            None => lookup(ctx, &Some(key()), miss),
        };
    }
    if bag {
        if let Some(key) = bag_key(id, hist) {
            out[BAG_SLOT] = lookup(ctx, &Some(key), miss);
        }
    }
    out
}

/// The hint of `key`'s table (one hash lookup), `miss` if there is none.
#[inline]
fn lookup(ctx: &Slab<CtxKey, Dist>, key: &Option<CtxKey>, miss: Hint) -> Hint {
    key.as_ref()
        .and_then(|k| ctx.slot_of(k))
        .map_or(miss, |s| ctx.hint(s))
}

/// The hint of `key`'s table, following the link of entry `pos` of the table in slot `ps`
/// (links are exact while set, see [`crate::store::Entry::child`], so the child's slot is not
/// read), or after a hash lookup that sets the link; `miss` if the table does not exist.
#[inline(always)]
fn follow(
    ctx: &mut Slab<CtxKey, Dist>,
    ps: u32,
    pos: usize,
    key: impl Fn() -> CtxKey,
    miss: Hint,
) -> Hint {
    // `ps` is the slot of a current hint (see `next_handles`).
    let link = ctx
        .live_ref(ps)
        .and_then(|d| d.entries.get(pos))
        .map_or(NO_SLOT, |e| e.child);
    if link != NO_SLOT {
        debug_assert!(ctx.holds(link, &key()));
        ctx.hint(link)
    } else if let Some(found) = ctx.slot_of(&key()) {
        if let Some(e) = ctx.live_mut(ps).and_then(|d| d.entries.get_mut(pos)) {
            e.child = found;
        }
        ctx.hint(found)
    } else {
        miss
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded xorshift64 generator: `next(n)` is a value in `0..n`.
    fn xorshift(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut x = seed;
        move |n| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        }
    }

    /// The group scope id a client's handles remember (trusted while the engine's group
    /// epoch has not moved) is always the one a fresh group lookup gives: through groups
    /// created, evicted (a cap of 3), becoming shared, removed, and clients changing group.
    #[test]
    fn cached_group_scope_ids_match_a_fresh_lookup() {
        let cfg = ModelConfig {
            max_clients: 8,
            max_groups: 3,
            idle_ttl_ms: 50_000,
            ..ModelConfig::default()
        };
        let mut core: Core<()> = Core::new(&cfg, [true; 3], 0, 2);
        let mut next = xorshift(0x9E37_79B9_7F4A_7C15u64);
        let mut cached = 0;
        for step in 0..20_000u64 {
            let client = ClientId(next(12) as u32);
            let group = match next(8) {
                0 => None,
                g => Some(GroupId(g as u32 % 5)),
            };
            let at = step * 37;
            core.touch(client, group, at, || ());
            let _ = core.learn_with(client, next(6) as u32, at, |_, _, _| {});
            if next(500) == 0 {
                core.forget_groups(&[GroupId(next(5) as u32)]);
            }
            for (_, c) in core.clients.sorted() {
                let fresh = scope_ids(&core.scopes, &core.groups, u64::MAX, c);
                let seen = scope_ids(&core.scopes, &core.groups, core.group_epoch, c);
                assert_eq!(seen, fresh, "step {step}");
                cached += usize::from(c.cur.epoch == core.group_epoch);
            }
        }
        // The cache is used, not only checked.
        assert!(cached > 10_000, "{cached}");
    }

    /// `touch_learn` (one client lookup) is `touch` then `learn_with`: the same returned
    /// `(events, last_at)`, the same statistics seen, the same state after every event
    /// (serials included), through group changes and evictions.
    #[test]
    fn touch_learn_is_touch_then_learn_with() {
        let cfg = ModelConfig {
            max_clients: 6,
            max_groups: 3,
            max_contexts: 50,
            idle_ttl_ms: 50_000,
            ..ModelConfig::default()
        };
        let mut a: Core<u32> = Core::new(&cfg, [true; 3], 0, 3);
        a.bag = [false, true, true];
        let mut b = a.clone();
        let mut next = xorshift(0x9E37_79B9_7F4A_7C15u64);
        for step in 0..3_000u64 {
            let client = ClientId(next(9) as u32);
            let group = match next(4) {
                0 => None,
                g => Some(GroupId(g as u32)),
            };
            let (service, at) = (next(6) as u32, step * 31);
            let mut seen_a = Vec::new();
            let ta = a.touch(client, group, at, || 7);
            let _ = a.learn_with(client, service, at, |s, o, p| {
                seen_a.push((s, o, p.total, p.distinct, p.count));
            });
            let mut seen_b = Vec::new();
            let (tb, _) = b.touch_learn(
                client,
                group,
                (service, at),
                || 7,
                |s, o, p| {
                    seen_b.push((s, o, p.total, p.distinct, p.count));
                },
            );
            assert_eq!(ta, tb, "step {step}");
            assert_eq!(seen_a, seen_b, "step {step}");
            assert_eq!(a.state(), b.state(), "step {step}");
        }
    }

    /// Links are followed without a key check, so they must be exact: every set link of
    /// every live table leads to the live table of the context one order longer, through
    /// evictions (a cap of 40 contexts) that vacate and reuse slots.
    #[test]
    fn links_stay_exact_through_evictions() {
        let cfg = ModelConfig {
            max_clients: 8,
            max_contexts: 40,
            idle_ttl_ms: 50_000,
            ..ModelConfig::default()
        };
        let mut core: Core<()> = Core::new(&cfg, [true; 3], 0, 3);
        let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
        let mut followed = 0;
        for step in 0..5_000u64 {
            let client = ClientId(next(6) as u32);
            let at = step * 29;
            core.touch(client, Some(GroupId(next(2) as u32)), at, || ());
            let _ = core.learn_with(client, next(5) as u32, at, |_, _, _| {});
            for (k, d) in core.ctx.sorted() {
                let order = k.hist.iter().take_while(|&&h| h != NONE).count();
                if k.scope & BAG != 0 || order >= MAX_ORDER {
                    continue;
                }
                for e in d.entries.iter().filter(|e| e.child != NO_SLOT) {
                    let mut hist = [NONE; MAX_ORDER];
                    hist[0] = e.service;
                    hist[1..].copy_from_slice(&k.hist[..MAX_ORDER - 1]);
                    let child = key(k.scope, &hist, order + 1).expect("a full history");
                    assert!(core.ctx.holds(e.child, &child), "step {step}");
                    followed += 1;
                }
            }
        }
        assert!(followed > 1_000, "{followed}");
    }
}
