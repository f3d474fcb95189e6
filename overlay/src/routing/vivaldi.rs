//! Vivaldi network coordinates (Dabek et al., SIGCOMM 2004), in the variant Consul/Serf use: a
//! Euclidean vector plus a non-negative "height" (the access-link delay every path from the
//! node pays), an error estimate that weights each update, all in milliseconds of RTT.
//!
//! A peer updates its own coordinate from every RTT sample it takes to another peer whose
//! coordinate it knows (probes carry the sender's coordinate). The estimated RTT between two
//! peers is `|a − b| + a.height + b.height`, so routing and pre-authentication can rank peers
//! they have never talked to. No I/O, no clock.

use serde::{Deserialize, Serialize};

/// Dimensions of the Euclidean part (Consul uses 8; 4 is enough for planar topologies plus
/// some slack, and keeps the wire form small).
pub const DIMENSIONS: usize = 4;

/// Tuning of [`Coord::update`] (Consul's defaults).
#[derive(Clone, Copy, Debug)]
pub struct VivaldiConfig {
    /// Error cap and initial error.
    pub error_max: f64,
    /// Weight of a sample on the error estimate (c_e).
    pub ce: f64,
    /// Weight of a sample on the position (c_c).
    pub cc: f64,
    /// Smallest height, ms.
    pub height_min: f64,
}

impl Default for VivaldiConfig {
    fn default() -> Self {
        Self {
            error_max: 1.5,
            ce: 0.25,
            cc: 0.25,
            height_min: 0.01,
        }
    }
}

/// A network coordinate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Coord {
    /// Position, ms.
    pub vec: [f32; DIMENSIONS],
    /// Height, ms.
    pub height: f32,
    /// Confidence: 0 is certain, `error_max` knows nothing.
    pub error: f32,
}

impl Default for Coord {
    fn default() -> Self {
        Self {
            vec: [0.0; DIMENSIONS],
            height: VivaldiConfig::default().height_min as f32,
            error: VivaldiConfig::default().error_max as f32,
        }
    }
}

impl Coord {
    /// Whether every field is finite and in range (a coordinate off the wire may not be).
    pub fn is_valid(&self) -> bool {
        self.vec.iter().all(|v| v.is_finite() && v.abs() < 1e7)
            && self.height.is_finite()
            && (0.0..1e7).contains(&self.height)
            && self.error.is_finite()
            && (0.0..=10.0).contains(&self.error)
    }

    fn euclid(&self, other: &Coord) -> f64 {
        self.vec
            .iter()
            .zip(other.vec.iter())
            .map(|(a, b)| {
                let d = f64::from(*a) - f64::from(*b);
                d * d
            })
            .sum::<f64>()
            .sqrt()
    }

    /// Estimated RTT to `other`, ms.
    pub fn distance_ms(&self, other: &Coord) -> f64 {
        self.euclid(other) + f64::from(self.height) + f64::from(other.height)
    }

    /// Moves this coordinate after measuring `rtt_ms` to a peer at `other`. `salt` picks the
    /// direction when both sit on the same point (deterministic: callers pass a hash of the
    /// pair). Samples that are not positive and finite are ignored.
    pub fn update(&mut self, cfg: &VivaldiConfig, other: &Coord, rtt_ms: f64, salt: u64) {
        if !(rtt_ms.is_finite() && rtt_ms > 0.0 && other.is_valid()) {
            return;
        }
        let rtt = rtt_ms.max(cfg.height_min);
        let dist = self.distance_ms(other);
        let (ea, eb) = (f64::from(self.error), f64::from(other.error));
        let w = if ea + eb > 0.0 { ea / (ea + eb) } else { 0.5 };
        let es = (dist - rtt).abs() / rtt;
        let e = (es * cfg.ce * w + ea * (1.0 - cfg.ce * w)).min(cfg.error_max);
        self.error = e as f32;
        let force = cfg.cc * w * (rtt - dist);
        // Unit vector from other to self.
        let mut u = [0.0f64; DIMENSIONS];
        let mut norm = 0.0;
        for (i, ui) in u.iter_mut().enumerate() {
            *ui = f64::from(self.vec[i]) - f64::from(other.vec[i]);
            norm += *ui * *ui;
        }
        let norm = norm.sqrt();
        if norm > 1e-9 {
            for ui in &mut u {
                *ui /= norm;
            }
        } else {
            // Same point: push apart in a direction fixed by the salt.
            let mut s = salt | 1;
            let mut n2 = 0.0;
            for ui in &mut u {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *ui = (s % 2001) as f64 / 1000.0 - 1.0;
                n2 += *ui * *ui;
            }
            let n = n2.sqrt().max(1e-9);
            for ui in &mut u {
                *ui /= n;
            }
        }
        for (i, ui) in u.iter().enumerate() {
            self.vec[i] = (f64::from(self.vec[i]) + ui * force) as f32;
        }
        if dist > 0.0 {
            let h = (f64::from(self.height) + f64::from(other.height)) * force / dist
                + f64::from(self.height);
            self.height = h.max(cfg.height_min) as f32;
        }
        if !self.is_valid() {
            *self = Coord::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Peers on a plane with RTT = distance: coordinates learn it from samples alone.
    #[test]
    fn converges_on_a_plane() {
        let pos: Vec<(f64, f64)> = (0..12)
            .map(|i| (((i * 37) % 100) as f64, ((i * 53) % 100) as f64))
            .collect();
        let rtt = |a: usize, b: usize| {
            let (dx, dy) = (pos[a].0 - pos[b].0, pos[a].1 - pos[b].1);
            (dx * dx + dy * dy).sqrt() + 1.0
        };
        let cfg = VivaldiConfig::default();
        let mut c = vec![Coord::default(); pos.len()];
        let mut s = 7u64;
        for _ in 0..20_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let a = (s >> 33) as usize % pos.len();
            let b = (s >> 13) as usize % pos.len();
            if a == b {
                continue;
            }
            let other = c[b];
            c[a].update(&cfg, &other, rtt(a, b), s);
        }
        let mut rel = Vec::new();
        for a in 0..pos.len() {
            for b in a + 1..pos.len() {
                let est = c[a].distance_ms(&c[b]);
                rel.push((est - rtt(a, b)).abs() / rtt(a, b));
            }
        }
        rel.sort_by(f64::total_cmp);
        let median = rel[rel.len() / 2];
        assert!(median < 0.15, "median relative error {median}");
        assert!(c.iter().all(|c| c.error < 0.5));
    }

    #[test]
    fn bad_samples_and_coordinates_are_ignored() {
        let cfg = VivaldiConfig::default();
        let mut c = Coord::default();
        let before = c;
        c.update(&cfg, &Coord::default(), f64::NAN, 1);
        c.update(&cfg, &Coord::default(), -3.0, 1);
        let mut bad = Coord::default();
        bad.vec[0] = f32::INFINITY;
        c.update(&cfg, &bad, 10.0, 1);
        assert_eq!(c, before);
        c.update(&cfg, &Coord::default(), 10.0, 1);
        assert!(c.is_valid());
        assert!(c.distance_ms(&Coord::default()) > before.distance_ms(&Coord::default()));
    }
}
