//! Where peers are and how far apart: the round-trip time between any two peers, from a
//! region matrix (small or explicit topologies: one region per peer is a full matrix) or from
//! points on a plane (large topologies: RTT grows with distance). Pure and deterministic.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Round-trip times between peers.
#[derive(Clone, Debug)]
pub enum LatencyModel {
    /// Each peer sits in a region; `rtt_ms[a][b]` is the RTT between regions (the diagonal is
    /// the RTT within a region).
    Regions {
        /// Symmetric region-to-region RTT matrix, milliseconds.
        rtt_ms: Vec<Vec<f64>>,
        /// Region of each peer.
        region_of: Vec<usize>,
    },
    /// Each peer is a point in a `side × side` square: RTT = `base_ms + ms_per_unit * distance`.
    Coordinates {
        /// Position of each peer.
        points: Vec<(f64, f64)>,
        /// RTT at distance zero, milliseconds.
        base_ms: f64,
        /// Milliseconds of RTT per unit of distance.
        ms_per_unit: f64,
    },
}

impl LatencyModel {
    /// Every peer at the same `rtt_ms` from every other.
    pub fn uniform(peers: usize, rtt_ms: f64) -> Self {
        LatencyModel::Regions {
            rtt_ms: vec![vec![rtt_ms]],
            region_of: vec![0; peers],
        }
    }

    /// Peers spread round-robin over the regions of `rtt_ms`.
    pub fn regions(peers: usize, rtt_ms: Vec<Vec<f64>>) -> Self {
        let n = rtt_ms.len().max(1);
        LatencyModel::Regions {
            rtt_ms,
            region_of: (0..peers).map(|i| i % n).collect(),
        }
    }

    /// Peers placed uniformly at random (from `seed`) in a square of side `side`.
    pub fn coordinates(peers: usize, side: f64, base_ms: f64, ms_per_unit: f64, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xc00d);
        let points = (0..peers)
            .map(|_| {
                (
                    rng.random_range(0.0..=side.max(0.0)),
                    rng.random_range(0.0..=side.max(0.0)),
                )
            })
            .collect();
        LatencyModel::Coordinates {
            points,
            base_ms,
            ms_per_unit,
        }
    }

    /// Round-trip time between peers `a` and `b` (symmetric).
    pub fn rtt(&self, a: usize, b: usize) -> Duration {
        let ms = match self {
            LatencyModel::Regions { rtt_ms, region_of } => {
                let ra = region_of.get(a).copied().unwrap_or(0);
                let rb = region_of.get(b).copied().unwrap_or(0);
                rtt_ms
                    .get(ra)
                    .and_then(|row| row.get(rb))
                    .copied()
                    .unwrap_or(0.0)
            }
            LatencyModel::Coordinates {
                points,
                base_ms,
                ms_per_unit,
            } => {
                let pa = points.get(a).copied().unwrap_or_default();
                let pb = points.get(b).copied().unwrap_or_default();
                let d = ((pa.0 - pb.0).powi(2) + (pa.1 - pb.1).powi(2)).sqrt();
                base_ms + ms_per_unit * d
            }
        };
        Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    }

    /// One-way delay from `a` to `b`: half the RTT.
    pub fn one_way(&self, a: usize, b: usize) -> Duration {
        self.rtt(a, b) / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_rtt() {
        let m = LatencyModel::uniform(3, 20.0);
        assert_eq!(m.rtt(0, 2), Duration::from_millis(20));
        assert_eq!(m.one_way(2, 1), Duration::from_millis(10));
    }

    #[test]
    fn regions_round_robin() {
        let m = LatencyModel::regions(4, vec![vec![2.0, 80.0], vec![80.0, 4.0]]);
        assert_eq!(m.rtt(0, 2), Duration::from_millis(2));
        assert_eq!(m.rtt(1, 3), Duration::from_millis(4));
        assert_eq!(m.rtt(0, 1), Duration::from_millis(80));
    }

    #[test]
    fn coordinates_are_seeded_and_symmetric() {
        let a = LatencyModel::coordinates(50, 100.0, 1.0, 1.0, 9);
        let b = LatencyModel::coordinates(50, 100.0, 1.0, 1.0, 9);
        for i in 0..50 {
            for j in 0..50 {
                assert_eq!(a.rtt(i, j), b.rtt(i, j));
                assert_eq!(a.rtt(i, j), a.rtt(j, i));
            }
        }
        assert_eq!(a.rtt(3, 3), Duration::from_millis(1));
    }
}
