//! The model of one directed link: propagation latency, in-order jitter, independent or bursty
//! (Gilbert–Elliott) loss, bandwidth as serialisation delay behind a bounded drop-tail queue,
//! and an MTU.
//!
//! Plain deterministic structs: time is a [`Duration`] since the start of the simulation and
//! every random draw comes from the caller's seeded RNG. No I/O, no clock.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::RngExt;
use serde::{Deserialize, Serialize};

/// How packets are lost on a link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LossModel {
    /// No loss.
    #[default]
    None,
    /// Each packet is lost independently with probability `p`.
    Bernoulli {
        /// Loss probability, 0..=1.
        p: f64,
    },
    /// Gilbert–Elliott: a two-state Markov chain (good, bad), stepped once per packet, with a
    /// loss probability per state. Mean loss = `(p_gb * loss_bad + p_bg * loss_good) /
    /// (p_gb + p_bg)`; mean burst length in the bad state = `1 / p_bg` packets.
    GilbertElliott {
        /// Probability of moving from good to bad, per packet.
        p_gb: f64,
        /// Probability of moving from bad to good, per packet.
        p_bg: f64,
        /// Loss probability in the good state.
        loss_good: f64,
        /// Loss probability in the bad state.
        loss_bad: f64,
    },
}

impl LossModel {
    /// Long-run fraction of packets lost.
    pub fn mean_loss(&self) -> f64 {
        match *self {
            LossModel::None => 0.0,
            LossModel::Bernoulli { p } => p,
            LossModel::GilbertElliott {
                p_gb,
                p_bg,
                loss_good,
                loss_bad,
            } => {
                if p_gb + p_bg <= 0.0 {
                    loss_good
                } else {
                    (p_gb * loss_bad + p_bg * loss_good) / (p_gb + p_bg)
                }
            }
        }
    }
}

/// Static properties of a directed link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkSpec {
    /// One-way propagation delay.
    pub latency: Duration,
    /// Extra delay drawn uniformly in `0..=jitter` per packet; never reorders the link.
    pub jitter: Duration,
    /// Loss process.
    pub loss: LossModel,
    /// Bits per second; `None` is infinitely fast (no serialisation delay, no queue).
    pub bandwidth_bps: Option<u64>,
    /// Bytes the sender's queue holds before dropping new packets (drop-tail).
    pub queue_bytes: u64,
    /// Largest datagram (UDP payload) the link carries; larger ones are dropped.
    pub mtu: usize,
}

impl Default for LinkSpec {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: LossModel::None,
            bandwidth_bps: None,
            queue_bytes: 256 * 1024,
            mtu: 1500,
        }
    }
}

/// Why a packet did not make it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Random loss (Bernoulli or Gilbert–Elliott).
    Loss,
    /// The sender's queue was full.
    Queue,
    /// Larger than the link's MTU.
    Mtu,
    /// The link is cut by a partition.
    Partition,
    /// Sender or receiver crashed, or no socket at the address.
    Unreachable,
}

/// Mutable state of a directed link.
#[derive(Clone, Debug, Default)]
pub struct LinkState {
    /// When the transmitter finishes sending what is queued.
    busy_until: Duration,
    /// Arrival time of the latest packet sent on this link (keeps the link in order).
    last_arrival: Duration,
    /// Gilbert–Elliott: currently in the bad state.
    bad: bool,
}

impl LinkState {
    /// A packet of `size` bytes enters the link at `now`: its arrival time, or why it is dropped.
    /// Arrivals on one link never go backwards (jitter does not reorder).
    pub fn transmit(
        &mut self,
        spec: &LinkSpec,
        now: Duration,
        size: usize,
        rng: &mut StdRng,
    ) -> Result<Duration, DropReason> {
        if size > spec.mtu {
            return Err(DropReason::Mtu);
        }
        // Serialisation: the packet leaves when the transmitter is free, then takes size/bw.
        let sent = match spec.bandwidth_bps {
            Some(bps) if bps > 0 => {
                let start = self.busy_until.max(now);
                let backlog = start - now;
                let backlog_bytes = backlog.as_nanos() * bps as u128 / 8 / 1_000_000_000;
                if backlog_bytes + size as u128 > spec.queue_bytes as u128 {
                    return Err(DropReason::Queue);
                }
                let tx = Duration::from_nanos((size as u64 * 8 * 1_000_000_000) / bps);
                self.busy_until = start + tx;
                self.busy_until
            }
            _ => now,
        };
        // Loss is decided after queueing: a lost packet still used the transmitter.
        if self.lost(&spec.loss, rng) {
            return Err(DropReason::Loss);
        }
        let jitter = if spec.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(rng.random_range(0..=spec.jitter.as_nanos() as u64))
        };
        let arrival = (sent + spec.latency + jitter).max(self.last_arrival);
        self.last_arrival = arrival;
        Ok(arrival)
    }

    fn lost(&mut self, loss: &LossModel, rng: &mut StdRng) -> bool {
        match *loss {
            LossModel::None => false,
            LossModel::Bernoulli { p } => p > 0.0 && rng.random_bool(p.min(1.0)),
            LossModel::GilbertElliott {
                p_gb,
                p_bg,
                loss_good,
                loss_bad,
            } => {
                let flip = if self.bad { p_bg } else { p_gb };
                if flip > 0.0 && rng.random_bool(flip.min(1.0)) {
                    self.bad = !self.bad;
                }
                let p = if self.bad { loss_bad } else { loss_good };
                p > 0.0 && rng.random_bool(p.min(1.0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    #[test]
    fn plain_link_adds_latency() {
        let spec = LinkSpec {
            latency: ms(10),
            ..LinkSpec::default()
        };
        let mut l = LinkState::default();
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(l.transmit(&spec, ms(5), 1200, &mut rng), Ok(ms(15)));
    }

    #[test]
    fn jitter_never_reorders_a_link() {
        let spec = LinkSpec {
            latency: ms(10),
            jitter: ms(8),
            ..LinkSpec::default()
        };
        let mut l = LinkState::default();
        let mut rng = StdRng::seed_from_u64(2);
        let mut last = Duration::ZERO;
        let mut spread = Vec::new();
        for i in 0..10_000u64 {
            let now = Duration::from_micros(i * 100);
            let at = l.transmit(&spec, now, 100, &mut rng).unwrap();
            assert!(at >= last, "packet {i} overtook its predecessor");
            assert!(at >= now + ms(10) && at <= now.max(last) + ms(18));
            spread.push(at - now);
            last = at;
        }
        assert!(spread.iter().any(|d| *d > ms(14)), "jitter is applied");
    }

    #[test]
    fn bandwidth_serialises_and_queue_drops_tail() {
        // 8 Mbit/s: 1000 bytes take 1 ms. Queue of 3000 bytes.
        let spec = LinkSpec {
            latency: ms(10),
            bandwidth_bps: Some(8_000_000),
            queue_bytes: 3000,
            ..LinkSpec::default()
        };
        let mut l = LinkState::default();
        let mut rng = StdRng::seed_from_u64(3);
        let at: Vec<_> = (0..5)
            .map(|_| l.transmit(&spec, Duration::ZERO, 1000, &mut rng))
            .collect();
        assert_eq!(at[0], Ok(ms(11)));
        assert_eq!(at[1], Ok(ms(12)));
        assert_eq!(at[2], Ok(ms(13)));
        assert_eq!(at[3], Err(DropReason::Queue), "queue holds 3000 bytes");
        // Once drained, the link accepts again.
        assert_eq!(l.transmit(&spec, ms(3), 1000, &mut rng), Ok(ms(14)));
    }

    #[test]
    fn mtu_drops_large_packets() {
        let spec = LinkSpec::default();
        let mut rng = StdRng::seed_from_u64(4);
        assert_eq!(
            LinkState::default().transmit(&spec, Duration::ZERO, 1501, &mut rng),
            Err(DropReason::Mtu)
        );
    }

    #[test]
    fn bernoulli_loss_rate() {
        let spec = LinkSpec {
            loss: LossModel::Bernoulli { p: 0.1 },
            ..LinkSpec::default()
        };
        let mut l = LinkState::default();
        let mut rng = StdRng::seed_from_u64(5);
        let lost = (0..100_000)
            .filter(|_| l.transmit(&spec, Duration::ZERO, 100, &mut rng).is_err())
            .count();
        assert!((9_000..11_000).contains(&lost), "{lost}");
    }

    #[test]
    fn gilbert_elliott_is_bursty_with_the_right_mean() {
        let loss = LossModel::GilbertElliott {
            p_gb: 0.01,
            p_bg: 0.2,
            loss_good: 0.0,
            loss_bad: 0.8,
        };
        let spec = LinkSpec {
            loss,
            ..LinkSpec::default()
        };
        let mut l = LinkState::default();
        let mut rng = StdRng::seed_from_u64(6);
        let n = 200_000;
        let outcomes: Vec<bool> = (0..n)
            .map(|_| l.transmit(&spec, Duration::ZERO, 100, &mut rng).is_err())
            .collect();
        let lost = outcomes.iter().filter(|x| **x).count() as f64 / n as f64;
        let mean = loss.mean_loss();
        assert!((lost - mean).abs() < 0.01, "lost {lost} vs mean {mean}");
        // Burstiness: P(loss | previous lost) far above the mean.
        let pairs = outcomes.windows(2).filter(|w| w[0]).count() as f64;
        let both = outcomes.windows(2).filter(|w| w[0] && w[1]).count() as f64;
        assert!(both / pairs > 3.0 * mean, "conditional {}", both / pairs);
    }

    #[test]
    fn same_seed_same_outcomes() {
        let spec = LinkSpec {
            jitter: ms(5),
            loss: LossModel::Bernoulli { p: 0.3 },
            ..LinkSpec::default()
        };
        let run = || {
            let mut l = LinkState::default();
            let mut rng = StdRng::seed_from_u64(7);
            (0..100)
                .map(|i| l.transmit(&spec, ms(i), 100, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }
}
