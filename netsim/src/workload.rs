//! Request schedules: synthetic (Poisson arrivals per client, Zipf over services, Markov
//! sequences), scripted, and replayed from `ts_ms,client,service` traces. Pure and seeded: the
//! output is a time-sorted list of requests, independent of the network.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::scenario::{Scenario, WorkloadKind};

/// One planned request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Planned {
    /// Time from the workload start.
    pub at: Duration,
    /// Client peer.
    pub client: usize,
    /// Service index.
    pub service: usize,
    /// The local client (application) on the client peer that makes the request: the trace's
    /// client for replays, else the peer itself. Pre-authentication profiles each one.
    pub app: usize,
}

/// Errors building a workload.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// The trace could not be read.
    #[error("trace {path}: {reason}")]
    Trace {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Zipf law over `n` items with exponent `s` (s = 0: uniform), sampled by inverse CDF.
#[derive(Clone, Debug)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// The law over `0..n`.
    pub fn new(n: usize, s: f64) -> Self {
        let w: Vec<f64> = (1..=n.max(1)).map(|k| 1.0 / (k as f64).powf(s)).collect();
        let total: f64 = w.iter().sum();
        let mut acc = 0.0;
        let cdf = w
            .iter()
            .map(|x| {
                acc += x / total;
                acc
            })
            .collect();
        Self { cdf }
    }

    /// One draw.
    pub fn sample(&self, rng: &mut StdRng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

/// Exponential inter-arrival time of a Poisson process of `rate` per second.
fn exp_gap(rng: &mut StdRng, rate: f64) -> Duration {
    let u: f64 = rng.random();
    Duration::from_secs_f64(-(1.0 - u).ln() / rate)
}

/// Builds the schedule of `sc`.
pub fn plan(sc: &Scenario) -> Result<Vec<Planned>, WorkloadError> {
    let w = &sc.workload;
    let services = sc.services.placement(sc.topology.peers).len();
    let clients = sc.clients();
    let horizon = Duration::from_secs_f64(sc.duration_s.max(0.0));
    let mut rng = StdRng::seed_from_u64(sc.seed ^ 0x776f_726b);
    let mut out = match w.kind {
        WorkloadKind::None => Vec::new(),
        WorkloadKind::Poisson | WorkloadKind::Markov if clients.is_empty() || services == 0 => {
            Vec::new()
        }
        WorkloadKind::Poisson | WorkloadKind::Markov => {
            let zipf = Zipf::new(services, w.zipf_s);
            // Markov: every service has one favourite successor (a seeded permutation).
            let mut succ: Vec<usize> = (0..services).collect();
            for i in (1..services).rev() {
                let j = rng.random_range(0..=i);
                succ.swap(i, j);
            }
            let mut out = Vec::new();
            for &c in &clients {
                let mut t = Duration::ZERO;
                let mut cur = zipf.sample(&mut rng);
                loop {
                    t += exp_gap(&mut rng, w.rate_per_client.max(1e-9));
                    if t >= horizon {
                        break;
                    }
                    let s = if w.kind == WorkloadKind::Markov
                        && rng.random_bool(w.markov_p.clamp(0.0, 1.0))
                    {
                        succ[cur]
                    } else {
                        zipf.sample(&mut rng)
                    };
                    cur = s;
                    out.push(Planned {
                        at: t,
                        client: c,
                        service: s,
                        app: c,
                    });
                }
            }
            out
        }
        WorkloadKind::Script => w
            .script
            .iter()
            .map(|r| Planned {
                at: crate::scenario::ms(r[0]),
                client: r[1] as usize,
                service: r[2] as usize,
                app: r[1] as usize,
            })
            .collect(),
        WorkloadKind::Trace => {
            let rows = read_trace(Path::new(&w.trace))?;
            map_trace(
                &rows,
                &clients,
                services,
                w.trace_speed,
                horizon,
                w.trace_limit,
            )
        }
    };
    out.sort_by(|a, b| {
        (a.at, a.client, a.app, a.service)
            .partial_cmp(&(b.at, b.client, b.app, b.service))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    if w.max_requests > 0 {
        out.truncate(w.max_requests);
    }
    Ok(out)
}

/// One row of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceRow {
    /// Timestamp, ms.
    pub ts_ms: u64,
    /// Client name.
    pub client: String,
    /// Service name.
    pub service: String,
}

/// Reads a `ts_ms,client,service` CSV (header optional, `.gz` decompressed).
pub fn read_trace(path: &Path) -> Result<Vec<TraceRow>, WorkloadError> {
    let err = |reason: String| WorkloadError::Trace {
        path: path.display().to_string(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    parse_trace(BufReader::new(reader)).map_err(err)
}

/// Parses trace CSV text.
pub fn parse_trace(r: impl BufRead) -> Result<Vec<TraceRow>, String> {
    let mut rows = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line = line.map_err(|e| e.to_string())?;
        let line = line.trim();
        if line.is_empty() || (i == 0 && line.starts_with("ts_ms")) {
            continue;
        }
        let mut f = line.splitn(3, ',');
        let (Some(ts), Some(c), Some(s)) = (f.next(), f.next(), f.next()) else {
            return Err(format!("line {}: expected ts_ms,client,service", i + 1));
        };
        let ts_ms = ts
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("line {}: bad ts_ms {ts:?}", i + 1))?;
        rows.push(TraceRow {
            ts_ms: ts_ms.max(0.0) as u64,
            client: c.trim().to_owned(),
            service: s.trim().to_owned(),
        });
    }
    Ok(rows)
}

/// Maps trace clients and services onto simulated ones: the k-th distinct client (in order of
/// first appearance) is `clients[k % clients.len()]`, the k-th distinct service is service
/// `k % services`. Time starts at the first row and is divided by `speed`; rows past `horizon`
/// or beyond `limit` (if non-zero) are dropped.
pub fn map_trace(
    rows: &[TraceRow],
    clients: &[usize],
    services: usize,
    speed: f64,
    horizon: Duration,
    limit: usize,
) -> Vec<Planned> {
    if clients.is_empty() || services == 0 {
        return Vec::new();
    }
    let t0 = rows.iter().map(|r| r.ts_ms).min().unwrap_or(0);
    let mut cmap: HashMap<&str, usize> = HashMap::new();
    let mut smap: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::new();
    for r in rows {
        let at = Duration::from_secs_f64((r.ts_ms - t0) as f64 / 1000.0 / speed.max(1e-9));
        if at >= horizon || (limit > 0 && out.len() >= limit) {
            break;
        }
        let nc = cmap.len();
        let c = *cmap.entry(&r.client).or_insert(nc);
        let ns = smap.len();
        let s = *smap.entry(&r.service).or_insert(ns);
        out.push(Planned {
            at,
            client: clients[c % clients.len()],
            service: s % services,
            app: c,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_the_first_items() {
        let z = Zipf::new(10, 1.0);
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = [0usize; 10];
        for _ in 0..100_000 {
            counts[z.sample(&mut rng)] += 1;
        }
        assert!(
            counts[0] > 2 * counts[2] && counts[2] > counts[9],
            "{counts:?}"
        );
        let u = Zipf::new(4, 0.0);
        let mut c = [0usize; 4];
        for _ in 0..40_000 {
            c[u.sample(&mut rng)] += 1;
        }
        assert!(c.iter().all(|x| (9_000..11_000).contains(x)), "{c:?}");
    }

    fn scenario(kind: &str) -> Scenario {
        Scenario::parse(
            &format!(
                "duration_s = 100\n[topology]\npeers = 12\n[services]\ncount = 5\n\
                 [workload]\nkind = \"{kind}\"\nrate_per_client = 2.0\n"
            ),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn poisson_rate_and_determinism() {
        let sc = scenario("poisson");
        let a = plan(&sc).unwrap();
        assert_eq!(a, plan(&sc).unwrap());
        // 7 clients (12 peers minus 5 providers) × 2/s × 100 s.
        assert!((1200..1600).contains(&a.len()), "{}", a.len());
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(a.iter().all(|p| p.client < 7 && p.service < 5));
    }

    #[test]
    fn markov_follows_successors() {
        let sc = scenario("markov");
        let a = plan(&sc).unwrap();
        // Per client, the most common next service after s is one fixed service most of the time.
        let mut pairs: HashMap<(usize, usize), usize> = HashMap::new();
        let mut last: HashMap<usize, usize> = HashMap::new();
        for p in &a {
            if let Some(prev) = last.insert(p.client, p.service) {
                *pairs.entry((prev, p.service)).or_default() += 1;
            }
        }
        let total: usize = pairs.values().sum();
        let top: usize = (0..5)
            .map(|s| {
                (0..5)
                    .map(|t| pairs.get(&(s, t)).copied().unwrap_or(0))
                    .max()
                    .unwrap()
            })
            .sum();
        assert!(top as f64 / total as f64 > 0.75, "{top}/{total}");
    }

    #[test]
    fn trace_mapping() {
        let rows = parse_trace(
            "ts_ms,client,service\n1000,a,x\n1500,b,y\n1700,a,z\n9000,c,x\n".as_bytes(),
        )
        .unwrap();
        let p = map_trace(&rows, &[3, 4], 2, 2.0, Duration::from_secs(3), 0);
        assert_eq!(
            p,
            vec![
                Planned {
                    at: Duration::ZERO,
                    client: 3,
                    service: 0,
                    app: 0
                },
                Planned {
                    at: Duration::from_millis(250),
                    client: 4,
                    service: 1,
                    app: 1
                },
                Planned {
                    at: Duration::from_millis(350),
                    client: 3,
                    service: 0,
                    app: 0
                },
            ]
        );
    }

    #[test]
    fn bundled_trace_reads() {
        let p =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/traces/boutique.csv.gz");
        if !p.exists() {
            return; // shared/ is beside the checkout in CI and on developer machines
        }
        let rows = read_trace(&p).unwrap();
        assert!(rows.len() > 1000);
    }
}
