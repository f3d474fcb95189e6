//! Rate limits (governor, GCRA) on an injected clock: per caller per service, per service
//! overall, and failed authentications per caller. No I/O; `now_ms` is passed to every check.
//!
//! The clock is a shared atomic that each check moves forward to `now_ms` (never back), so
//! tests step time instead of sleeping and the simulator's virtual time works unchanged.
//!
//! Memory: per-service state lives in a map entry removed when the service is deregistered;
//! keyed limiters drop callers whose buckets are full again on [`Limiters::maintain`]
//! (`retain_recent`), which also runs whenever a keyed limiter exceeds `max_tracked`, so
//! 10,000 distinct callers cost a bounded amount (about 40 B of state each, plus the key).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};

use crate::identity::NodeId;

/// A governor clock that reads an injected time (milliseconds), moved forward by callers.
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    now_ns: Arc<AtomicU64>,
}

impl ManualClock {
    /// Moves the clock to `now_ms` if that is later than its current reading.
    pub fn advance_to(&self, now_ms: u64) {
        self.now_ns
            .fetch_max(now_ms.saturating_mul(1_000_000), Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        Duration::from_nanos(self.now_ns.load(Ordering::Relaxed))
    }
}

type Keyed<K> = RateLimiter<K, HashMapStateStore<K>, ManualClock, NoOpMiddleware<Duration>>;
type Direct = RateLimiter<NotKeyed, InMemoryState, ManualClock, NoOpMiddleware<Duration>>;

/// A rate: `per_second` sustained, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Sustained rate (requests per second). Must be > 0.
    pub per_second: u32,
    /// Burst size. Must be > 0.
    pub burst: u32,
}

impl Rate {
    fn quota(self) -> Quota {
        let per = NonZeroU32::new(self.per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(self.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        Quota::per_second(per).allow_burst(burst)
    }
}

/// Limit settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitSettings {
    /// Token requests and discoveries per caller per service. Default 20/s, burst 40.
    pub per_caller_service: Rate,
    /// All token requests and discoveries per service. Default 2000/s, burst 4000.
    pub per_service: Rate,
    /// Failed authentications per caller (any service) before refusing outright.
    /// Default 1/s sustained, burst 10.
    pub failed_auth_per_caller: Rate,
    /// Keyed limiters prune themselves when they track more keys than this. Default 10,000.
    pub max_tracked: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            per_caller_service: Rate {
                per_second: 20,
                burst: 40,
            },
            per_service: Rate {
                per_second: 2000,
                burst: 4000,
            },
            failed_auth_per_caller: Rate {
                per_second: 1,
                burst: 10,
            },
            max_tracked: 10_000,
        }
    }
}

/// Which limit refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// This caller on this service.
    CallerService,
    /// This service overall.
    Service,
    /// This caller failed to authenticate too often.
    FailedAuth,
}

impl LimitKind {
    /// Stable name for logs, metrics and error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::CallerService => "caller_service",
            LimitKind::Service => "service",
            LimitKind::FailedAuth => "failed_auth",
        }
    }
}

/// A refusal by a rate limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rate limited ({}), retry after {retry_after_ms} ms", kind.as_str())]
pub struct LimitRefusal {
    /// Which limit.
    pub kind: LimitKind,
    /// When the caller may try again.
    pub retry_after_ms: u64,
}

struct ServiceLimits {
    overall: Direct,
    per_caller: Keyed<NodeId>,
}

/// All limiters of one node.
pub struct Limiters {
    settings: LimitSettings,
    clock: ManualClock,
    services: Mutex<HashMap<String, Arc<ServiceLimits>>>,
    failures: Keyed<NodeId>,
    lockout: Mutex<HashMap<NodeId, u64>>,
}

impl std::fmt::Debug for Limiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiters")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn retry_after(n: &NotUntil<Duration>, clock: &ManualClock) -> u64 {
    n.wait_time_from(clock.now()).as_millis() as u64
}

impl Limiters {
    /// Limiters with `settings`, their clock starting at `now_ms`.
    pub fn new(settings: LimitSettings, now_ms: u64) -> Self {
        let clock = ManualClock::default();
        clock.advance_to(now_ms);
        Self {
            failures: RateLimiter::new(
                settings.failed_auth_per_caller.quota(),
                HashMapStateStore::default(),
                clock.clone(),
            ),
            settings,
            clock,
            services: Mutex::new(HashMap::new()),
            lockout: Mutex::new(HashMap::new()),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &LimitSettings {
        &self.settings
    }

    fn service(&self, service: &str) -> Arc<ServiceLimits> {
        let mut m = self.services.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(service.to_owned())
            .or_insert_with(|| {
                Arc::new(ServiceLimits {
                    overall: RateLimiter::direct_with_clock(
                        self.settings.per_service.quota(),
                        self.clock.clone(),
                    ),
                    per_caller: RateLimiter::new(
                        self.settings.per_caller_service.quota(),
                        HashMapStateStore::default(),
                        self.clock.clone(),
                    ),
                })
            })
            .clone()
    }

    /// Refuses a caller that spent its failed-authentication budget, without counting
    /// anything. Checked before authenticating, so a locked-out caller cannot keep guessing.
    pub fn check_lockout(&self, caller: &NodeId, now_ms: u64) -> Result<(), LimitRefusal> {
        self.clock.advance_to(now_ms);
        let mut l = self.lockout.lock().unwrap_or_else(|e| e.into_inner());
        match l.get(caller) {
            Some(&until) if until > now_ms => Err(LimitRefusal {
                kind: LimitKind::FailedAuth,
                retry_after_ms: until - now_ms,
            }),
            Some(_) => {
                l.remove(caller);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Counts one request of `caller` to `service` against both request limits.
    pub fn check_request(
        &self,
        caller: &NodeId,
        service: &str,
        now_ms: u64,
    ) -> Result<(), LimitRefusal> {
        self.clock.advance_to(now_ms);
        let s = self.service(service);
        if let Err(n) = s.per_caller.check_key(caller) {
            return Err(LimitRefusal {
                kind: LimitKind::CallerService,
                retry_after_ms: retry_after(&n, &self.clock),
            });
        }
        if s.per_caller.len() > self.settings.max_tracked {
            s.per_caller.retain_recent();
        }
        if let Err(n) = s.overall.check() {
            return Err(LimitRefusal {
                kind: LimitKind::Service,
                retry_after_ms: retry_after(&n, &self.clock),
            });
        }
        Ok(())
    }

    /// Counts one failed authentication of `caller`; once its budget is spent the caller is
    /// locked out (see [`Self::check_lockout`]) until the budget refills by one.
    pub fn record_failure(&self, caller: &NodeId, now_ms: u64) -> Result<(), LimitRefusal> {
        self.clock.advance_to(now_ms);
        if self.failures.len() > self.settings.max_tracked {
            self.failures.retain_recent();
        }
        match self.failures.check_key(caller) {
            Ok(_) => Ok(()),
            Err(n) => {
                let retry_after_ms = retry_after(&n, &self.clock).max(1);
                let mut l = self.lockout.lock().unwrap_or_else(|e| e.into_inner());
                if l.len() >= self.settings.max_tracked {
                    l.retain(|_, until| *until > now_ms);
                }
                l.insert(*caller, now_ms + retry_after_ms);
                Err(LimitRefusal {
                    kind: LimitKind::FailedAuth,
                    retry_after_ms,
                })
            }
        }
    }

    /// Removes all state of a service (deregistration).
    pub fn remove_service(&self, service: &str) {
        self.services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(service);
    }

    /// Whether a service has limiter state.
    pub fn has_service(&self, service: &str) -> bool {
        self.services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(service)
    }

    /// Forgets callers whose buckets are full again (bounded memory); call periodically.
    pub fn maintain(&self, now_ms: u64) {
        self.clock.advance_to(now_ms);
        let services: Vec<Arc<ServiceLimits>> = self
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for s in services {
            s.per_caller.retain_recent();
            s.per_caller.shrink_to_fit();
        }
        self.failures.retain_recent();
        self.failures.shrink_to_fit();
        self.lockout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, until| *until > now_ms);
    }

    /// Callers tracked (all services plus the failure limiter), for tests and metrics.
    pub fn tracked(&self) -> usize {
        let m = self.services.lock().unwrap_or_else(|e| e.into_inner());
        m.values().map(|s| s.per_caller.len()).sum::<usize>() + self.failures.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> NodeId {
        let mut b = [0u8; 20];
        b[..4].copy_from_slice(&n.to_be_bytes());
        data_encoding::BASE32_NOPAD
            .encode(&b)
            .to_ascii_lowercase()
            .parse()
            .unwrap()
    }

    fn small() -> LimitSettings {
        LimitSettings {
            per_caller_service: Rate {
                per_second: 2,
                burst: 3,
            },
            per_service: Rate {
                per_second: 1,
                burst: 5,
            },
            failed_auth_per_caller: Rate {
                per_second: 1,
                burst: 2,
            },
            max_tracked: 10_000,
        }
    }

    #[test]
    fn per_caller_then_per_service_limits_without_sleeping() {
        let l = Limiters::new(small(), 1_000);
        let a = id(1);
        for _ in 0..3 {
            l.check_request(&a, "db", 1_000).unwrap();
        }
        let r = l.check_request(&a, "db", 1_000).unwrap_err();
        assert_eq!(r.kind, LimitKind::CallerService);
        assert!(r.retry_after_ms > 0 && r.retry_after_ms <= 500, "{r:?}");
        // Another service is independent.
        l.check_request(&a, "web", 1_000).unwrap();
        // Half a second later one more is allowed.
        l.check_request(&a, "db", 1_500).unwrap();
        // Service-wide: two other callers use up the remaining service budget (5 burst).
        l.check_request(&id(2), "db", 1_500).unwrap();
        let r = l.check_request(&id(3), "db", 1_500).unwrap_err();
        assert_eq!(r.kind, LimitKind::Service);
    }

    #[test]
    fn failed_authentications_lock_a_caller_out() {
        let l = Limiters::new(small(), 0);
        let a = id(1);
        l.check_lockout(&a, 0).unwrap();
        l.record_failure(&a, 0).unwrap();
        l.record_failure(&a, 0).unwrap();
        let r = l.record_failure(&a, 0).unwrap_err();
        assert_eq!(r.kind, LimitKind::FailedAuth);
        assert_eq!(
            l.check_lockout(&a, 10).unwrap_err().kind,
            LimitKind::FailedAuth
        );
        assert!(l.check_lockout(&id(2), 10).is_ok(), "others unaffected");
        assert!(l.check_lockout(&a, 1_001).is_ok(), "budget refills");
    }

    #[test]
    fn memory_stays_bounded_with_10000_callers() {
        let l = Limiters::new(
            LimitSettings {
                per_service: Rate {
                    per_second: 1_000_000,
                    burst: 1_000_000,
                },
                ..LimitSettings::default()
            },
            0,
        );
        for n in 0..10_000 {
            l.check_request(&id(n), "db", 0).unwrap();
            let _ = l.record_failure(&id(n), 0);
        }
        assert_eq!(l.tracked(), 20_000);
        // A few seconds later every bucket is full again and indistinguishable from fresh.
        l.maintain(10_000);
        assert_eq!(l.tracked(), 0);
        // Over max_tracked the limiter prunes itself without waiting for `maintain`.
        let l = Limiters::new(
            LimitSettings {
                max_tracked: 100,
                per_service: Rate {
                    per_second: 1_000_000,
                    burst: 1_000_000,
                },
                ..LimitSettings::default()
            },
            0,
        );
        for n in 0..10_000u32 {
            l.check_request(&id(n), "db", u64::from(n) * 100).unwrap();
        }
        assert!(l.tracked() < 200, "{}", l.tracked());
        // Deregistration drops the service's state.
        l.remove_service("db");
        assert!(!l.has_service("db"));
    }
}
