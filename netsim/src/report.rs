//! What a run measured: per-request records turned into percentiles (hdrhistogram), counts, a
//! time series, and the JSON / Markdown / SVG renderings. The report of a run is a pure
//! function of its records and counters.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::net::NetStats;

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// First attempt answered.
    Ok,
    /// Answered after a failed attempt.
    Retried,
    /// Every attempt failed.
    Failed,
}

/// One request as measured.
#[derive(Clone, Debug, Serialize)]
pub struct RequestRecord {
    /// Sequence number in the schedule.
    pub id: u64,
    /// Start, seconds since the simulation began.
    pub at_s: f64,
    /// Client peer.
    pub client: usize,
    /// Service index.
    pub service: usize,
    /// Outcome.
    pub outcome: Outcome,
    /// Attempts made.
    pub attempts: u32,
    /// Peer whose backend answered.
    pub server: Option<usize>,
    /// Time from the first attempt's start to the first response byte (ms in JSON).
    #[serde(rename = "first_byte_ms", serialize_with = "opt_ms")]
    pub first_byte: Option<Duration>,
    /// Configured RTT between client and server (ms in JSON).
    #[serde(rename = "path_rtt_ms", serialize_with = "opt_ms")]
    pub path_rtt: Option<Duration>,
    /// The request paid a full handshake (it found nothing warm).
    pub cold: bool,
    /// How the request was served: stream, connection, ticket (0-RTT) or cold.
    pub served: Option<overlay::preauth::Served>,
    /// The response arrived while the server → client direction was cut (must never happen).
    pub through_cut: bool,
    /// Served by another provider than this client's previous request to this service.
    pub rerouted: bool,
    /// `routed` mode: the instance the overlay tried first.
    pub first_try: Option<usize>,
    /// `routed` mode: the relays of the first attempt's path.
    pub first_try_relays: Vec<usize>,
    /// `routed` mode: the relays of the answering attempt's path.
    pub relays: Vec<usize>,
    /// `routed` mode: attempts inside the overlay (retries before the first byte).
    pub overlay_attempts: u32,
}

fn opt_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&((d.as_secs_f64() * 1e6).round() / 1e3)),
        None => s.serialize_none(),
    }
}

/// Percentiles of a distribution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
    /// Largest.
    pub max: f64,
}

/// Values are recorded in thousandths (µs for ms values) with 4 significant digits.
fn percentiles(values: impl Iterator<Item = f64>) -> Percentiles {
    let Ok(mut h) = Histogram::<u64>::new(4) else {
        return Percentiles::default();
    };
    for v in values {
        let _ = h.record((v.max(0.0) * 1000.0).round() as u64);
    }
    if h.is_empty() {
        return Percentiles::default();
    }
    let r = |x: f64| x.round() / 1000.0;
    Percentiles {
        count: h.len(),
        p50: r(h.value_at_quantile(0.5) as f64),
        p90: r(h.value_at_quantile(0.9) as f64),
        p99: r(h.value_at_quantile(0.99) as f64),
        mean: r(h.mean()),
        max: r(h.max() as f64),
    }
}

/// Request counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Requests {
    /// Scheduled and run.
    pub total: u64,
    /// Answered (first try or after retries).
    pub ok: u64,
    /// Never answered.
    pub failed: u64,
    /// Answered after at least one failed attempt.
    pub retried: u64,
    /// Answered by another provider than the client's previous request to that service.
    pub rerouted: u64,
    /// Answered through a cut link (a simulator bug if ever non-zero).
    pub through_cut: u64,
    /// ok / total.
    pub success_rate: f64,
    /// Requests that paid a handshake.
    pub cold: u64,
}

/// Crash detection for one crashed peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Detection {
    /// The crashed peer.
    pub peer: usize,
    /// When it crashed, seconds.
    pub at_s: f64,
    /// Live peers that had to notice.
    pub observers: usize,
    /// Of those, how many marked it down before the run ended.
    pub detected: usize,
    /// Seconds until the first observer marked it down.
    pub first_s: Option<f64>,
    /// Median over observers.
    pub median_s: Option<f64>,
    /// Seconds until every observer marked it down.
    pub all_s: Option<f64>,
}

/// Membership outcome.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MembershipReport {
    /// Seconds until every peer saw every other as alive (None: not within the run).
    pub converged_s: Option<f64>,
    /// Peers that saw every other peer alive at some point.
    pub converged_peers: usize,
    /// Seconds until every client knew every service.
    pub catalog_converged_s: Option<f64>,
    /// Crash detections.
    pub crashes: Vec<Detection>,
    /// Down events about peers that were alive (all observers summed).
    pub false_downs: u64,
    /// Down events in total (all observers summed).
    pub down_events: u64,
    /// Live peers at the end.
    pub live_peers: usize,
    /// At the end, the fewest non-down members any live peer knows (ideal: live_peers − 1).
    pub end_view_min: usize,
    /// At the end, the mean number of non-down members a live peer knows.
    pub end_view_mean: f64,
}

/// Process memory, from /proc/self/statm and /proc/self/status.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Memory {
    /// Resident set before the peers started, MiB.
    pub rss_start_mib: f64,
    /// Resident set at the end of the run (peers still up), MiB.
    pub rss_end_mib: f64,
    /// Peak resident set of the process, MiB.
    pub peak_mib: f64,
    /// (end − start) / peers, KiB.
    pub per_peer_kib: f64,
}

/// One second of the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Bucket {
    /// Start of the second.
    pub t_s: u64,
    /// Requests started that were answered.
    pub ok: u64,
    /// Requests started that failed.
    pub failed: u64,
    /// Requests started that needed a retry.
    pub retried: u64,
    /// Requests started that went to another provider than before.
    pub rerouted: u64,
}

/// Everything a run reports.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Peer configuration mode.
    pub mode: String,
    /// Number of peers.
    pub peers: usize,
    /// "virtual" or "real".
    pub time: String,
    /// Wall-clock seconds of the run (varies between runs).
    pub wall_s: f64,
    /// Simulated seconds.
    pub virtual_s: f64,
    /// The run hit its wall-clock budget and stopped early.
    pub truncated: bool,
    /// Request counts.
    pub requests: Requests,
    /// Time to first response byte, ms (answered requests).
    pub first_byte_ms: Percentiles,
    /// Time to first response byte in RTTs of the client–server path.
    pub first_byte_rtt: Percentiles,
    /// First byte of requests that paid a handshake, ms.
    pub first_byte_ms_cold: Percentiles,
    /// First byte of requests on an open connection, ms.
    pub first_byte_ms_warm: Percentiles,
    /// Membership and catalog.
    pub membership: MembershipReport,
    /// Counters of every peer (overlay `Stats`), summed by name.
    pub overlay: BTreeMap<String, u64>,
    /// Network counters.
    pub net: NetStats,
    /// Memory (varies between runs).
    pub memory: Memory,
    /// Per-second time series.
    pub timeline: Vec<Bucket>,
    /// First-byte latency CDF points `[ms, fraction]` (for plots).
    pub cdf: Vec<[f64; 2]>,
    /// Share of answered requests that found a warm path (stream, connection or 0-RTT ticket).
    pub hit_rate: f64,
    /// Answered requests by how they were served.
    pub served: BTreeMap<String, u64>,
    /// Share of prepared warm entries dropped without ever being used.
    pub waste: f64,
    /// Speculative handshakes (started for predicted, not requested, work) per request.
    pub speculative_handshakes_per_request: f64,
    /// Handshakes of every kind per request (membership and catalog included).
    pub handshakes_per_request: f64,
    /// Bytes delivered on the network per request (all traffic: compare across modes).
    pub bytes_per_request: f64,
    /// Per crash or leave: how long new requests were still sent into the dead peer (first
    /// attempt's instance or relay), ms; p50 and max over the run's crashes.
    pub reroute_ms: Reroute,
    /// Requests that failed without any response byte.
    pub failed_before_first_byte: u64,
    /// Peers or links declared down although alive and reachable: membership false downs plus
    /// routers' false link downs.
    pub false_downs: u64,
    /// Routing details.
    pub routing: RoutingReport,
}

/// `reroute_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Reroute {
    /// Median over crashes, ms.
    pub p50: f64,
    /// Worst crash, ms.
    pub max: f64,
}

/// Routing details of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RoutingReport {
    /// Each crash: peer, time, and reroute time in ms.
    pub reroutes: Vec<RerouteEvent>,
    /// Membership false downs (also in `membership`).
    pub membership_false_downs: u64,
    /// Routers' false link downs.
    pub false_link_downs: u64,
    /// Answered requests that went through relays.
    pub relayed_requests: u64,
    /// Answered requests that needed more than one attempt inside the overlay.
    pub retried_in_overlay: u64,
    /// Answered requests by serving peer.
    pub served_by: BTreeMap<usize, u64>,
    /// Answered requests by relay (a request through two relays counts for both).
    pub relayed_by: BTreeMap<usize, u64>,
}

/// One crash's reroute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct RerouteEvent {
    /// The peer.
    pub peer: usize,
    /// When it crashed or left, s.
    pub at_s: f64,
    /// Last start of a request whose first attempt still went into it, minus `at_s`, ms (0:
    /// none did).
    pub ms: f64,
    /// Requests whose first attempt went into it after the crash.
    pub sent_into_dead: u64,
}

/// Inputs of [`Report::build`] besides the records.
#[derive(Debug)]
pub struct RunFacts {
    /// Scenario name.
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Mode.
    pub mode: String,
    /// Peers.
    pub peers: usize,
    /// "virtual" or "real".
    pub time: String,
    /// Wall seconds.
    pub wall_s: f64,
    /// Virtual seconds.
    pub virtual_s: f64,
    /// Stopped early by the wall-clock budget.
    pub truncated: bool,
    /// Membership.
    pub membership: MembershipReport,
    /// Summed peer counters.
    pub overlay: BTreeMap<String, u64>,
    /// Network counters.
    pub net: NetStats,
    /// Memory.
    pub memory: Memory,
    /// Links marked down by routers although neither end crashed nor was cut.
    pub false_link_downs: u64,
    /// Restarts: (peer, at s).
    pub restarts: Vec<(usize, f64)>,
}

fn ms_of(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Report {
    /// Summarises `records`.
    pub fn build(facts: RunFacts, records: &[RequestRecord]) -> Report {
        let answered: Vec<&RequestRecord> =
            records.iter().filter(|r| r.first_byte.is_some()).collect();
        let fb = |r: &&RequestRecord| r.first_byte.map(ms_of).unwrap_or(0.0);
        let count = |o: Outcome| records.iter().filter(|r| r.outcome == o).count() as u64;
        let total = records.len() as u64;
        let ok = count(Outcome::Ok) + count(Outcome::Retried);
        let requests = Requests {
            total,
            ok,
            failed: count(Outcome::Failed),
            retried: count(Outcome::Retried),
            rerouted: records.iter().filter(|r| r.rerouted).count() as u64,
            through_cut: records.iter().filter(|r| r.through_cut).count() as u64,
            success_rate: if total == 0 {
                1.0
            } else {
                (ok as f64 / total as f64 * 1e6).round() / 1e6
            },
            cold: records
                .iter()
                .filter(|r| r.cold && r.first_byte.is_some())
                .count() as u64,
        };
        let first_byte_rtt = percentiles(answered.iter().filter_map(|r| {
            let rtt = r.path_rtt?;
            (!rtt.is_zero()).then(|| fb(r) / ms_of(rtt))
        }));
        let mut sorted: Vec<f64> = answered.iter().map(fb).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let cdf = if n == 0 {
            Vec::new()
        } else {
            (0..=100)
                .map(|i| {
                    let idx = ((i as f64 / 100.0) * (n - 1) as f64).round() as usize;
                    [
                        (sorted[idx] * 1000.0).round() / 1000.0,
                        (((idx + 1) as f64 / n as f64) * 1e4).round() / 1e4,
                    ]
                })
                .collect()
        };
        let last = records.iter().map(|r| r.at_s.max(0.0) as u64).max();
        let mut timeline: Vec<Bucket> = (0..last.map_or(0, |l| l + 1))
            .map(|t_s| Bucket {
                t_s,
                ..Bucket::default()
            })
            .collect();
        for r in records {
            let b = &mut timeline[r.at_s.max(0.0) as usize];
            match r.outcome {
                Outcome::Ok => b.ok += 1,
                Outcome::Retried => {
                    b.ok += 1;
                    b.retried += 1
                }
                Outcome::Failed => b.failed += 1,
            }
            if r.rerouted {
                b.rerouted += 1;
            }
        }
        let r6 = |x: f64| (x * 1e6).round() / 1e6;
        let per_req = |v: u64| {
            if total == 0 {
                0.0
            } else {
                r6(v as f64 / total as f64)
            }
        };
        let mut served: BTreeMap<String, u64> = BTreeMap::new();
        for r in &answered {
            if let Some(s) = r.served {
                let name = serde_json::to_value(s)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                *served.entry(name).or_default() += 1;
            }
        }
        let hits = answered
            .iter()
            .filter(|r| {
                r.served
                    .is_some_and(|s| s != overlay::preauth::Served::Cold)
            })
            .count();
        let hit_rate = if answered.is_empty() {
            0.0
        } else {
            r6(hits as f64 / answered.len() as f64)
        };
        let counter = |k: &str| facts.overlay.get(k).copied().unwrap_or(0);
        let prepared = counter("preauth_prepared");
        let waste = if prepared == 0 {
            0.0
        } else {
            r6(counter("preauth_waste") as f64 / prepared as f64)
        };
        let speculative = per_req(counter("preauth_speculative_handshakes"));
        let handshakes = per_req(counter("connections_dialed"));
        let bytes = per_req(facts.net.bytes_delivered);
        // Reroutes: per crash, how long new requests kept going into the dead peer.
        let mut reroutes = Vec::new();
        for d in &facts.membership.crashes {
            // Until it is back (its restart, if any).
            let back = facts
                .restarts
                .iter()
                .filter(|(p, at)| *p == d.peer && *at > d.at_s)
                .map(|(_, at)| *at)
                .fold(f64::INFINITY, f64::min);
            let into: Vec<&RequestRecord> = records
                .iter()
                .filter(|r| {
                    r.at_s >= d.at_s
                        && r.at_s < back
                        && (r.first_try == Some(d.peer) || r.first_try_relays.contains(&d.peer))
                })
                .collect();
            let last = into.iter().map(|r| r.at_s).fold(d.at_s, f64::max);
            reroutes.push(RerouteEvent {
                peer: d.peer,
                at_s: d.at_s,
                ms: ((last - d.at_s) * 1e6).round() / 1e3,
                sent_into_dead: into.len() as u64,
            });
        }
        let mut rr: Vec<f64> = reroutes.iter().map(|e| e.ms).collect();
        rr.sort_by(f64::total_cmp);
        let reroute_ms = Reroute {
            p50: rr.get(rr.len() / 2).copied().unwrap_or(0.0),
            max: rr.last().copied().unwrap_or(0.0),
        };
        let mut served_by = BTreeMap::new();
        let mut relayed_by = BTreeMap::new();
        for r in &answered {
            if let Some(s) = r.server {
                *served_by.entry(s).or_default() += 1;
            }
            for h in &r.relays {
                *relayed_by.entry(*h).or_default() += 1;
            }
        }
        let routing = RoutingReport {
            reroutes,
            membership_false_downs: facts.membership.false_downs,
            false_link_downs: facts.false_link_downs,
            relayed_requests: answered.iter().filter(|r| !r.relays.is_empty()).count() as u64,
            retried_in_overlay: answered.iter().filter(|r| r.overlay_attempts > 1).count() as u64,
            served_by,
            relayed_by,
        };
        Report {
            reroute_ms,
            failed_before_first_byte: records.iter().filter(|r| r.first_byte.is_none()).count()
                as u64,
            false_downs: facts.membership.false_downs + facts.false_link_downs,
            routing,
            hit_rate,
            served,
            waste,
            speculative_handshakes_per_request: speculative,
            handshakes_per_request: handshakes,
            bytes_per_request: bytes,
            scenario: facts.scenario,
            seed: facts.seed,
            mode: facts.mode,
            peers: facts.peers,
            time: facts.time,
            wall_s: (facts.wall_s * 1000.0).round() / 1000.0,
            virtual_s: (facts.virtual_s * 1000.0).round() / 1000.0,
            truncated: facts.truncated,
            requests,
            first_byte_ms: percentiles(answered.iter().map(fb)),
            first_byte_rtt,
            first_byte_ms_cold: percentiles(answered.iter().filter(|r| r.cold).map(fb)),
            first_byte_ms_warm: percentiles(answered.iter().filter(|r| !r.cold).map(fb)),
            membership: facts.membership,
            overlay: facts.overlay,
            net: facts.net,
            memory: facts.memory,
            timeline,
            cdf,
        }
    }

    /// The report with the fields that vary between runs of one seed zeroed: what the
    /// determinism check compares. They are wall time and memory (the machine), and the
    /// network's datagram and byte counters, which differ by a few ACK-only datagrams (under
    /// 1%; `bytes_per_request` derives from them): tokio randomises `select!` branch order per runtime (its seed is settable only with
    /// `--cfg tokio_unstable`), which changes when quinn's ACKs coalesce. Request records,
    /// latencies, outcomes and the peers' counters are identical.
    pub fn without_varying_fields(&self) -> Report {
        Report {
            wall_s: 0.0,
            memory: Memory::default(),
            net: NetStats::default(),
            bytes_per_request: 0.0,
            ..self.clone()
        }
    }

    /// A Markdown summary.
    pub fn markdown(&self) -> String {
        markdown_table(std::slice::from_ref(self))
    }
}

/// One Markdown table with a row per report (e.g. per mode).
pub fn markdown_table(reports: &[Report]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| scenario | mode | peers | seed | requests | ok % | first byte p50 / p90 / p99 ms | p50 / p90 / p99 / mean RTTs | cold / warm p50 ms | hit rate | waste | spec. hs/req | handshakes | bytes/req | virtual s | wall s | MiB/peer |"
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in reports {
        let _ = writeln!(
            s,
            "| {}{} | {} | {} | {} | {} | {:.2} | {:.1} / {:.1} / {:.1} | {:.2} / {:.2} / {:.2} / {:.2} | {:.1} / {:.1} | {:.3} | {:.3} | {:.3} | {} | {:.0} | {:.1} | {:.2} | {:.3} |",
            r.scenario,
            if r.truncated { " (truncated)" } else { "" },
            r.mode,
            r.peers,
            r.seed,
            r.requests.total,
            r.requests.success_rate * 100.0,
            r.first_byte_ms.p50,
            r.first_byte_ms.p90,
            r.first_byte_ms.p99,
            r.first_byte_rtt.p50,
            r.first_byte_rtt.p90,
            r.first_byte_rtt.p99,
            r.first_byte_rtt.mean,
            r.first_byte_ms_cold.p50,
            r.first_byte_ms_warm.p50,
            r.hit_rate,
            r.waste,
            r.speculative_handshakes_per_request,
            r.overlay.get("handshakes").copied().unwrap_or(0),
            r.bytes_per_request,
            r.virtual_s,
            r.wall_s,
            r.memory.per_peer_kib / 1024.0,
        );
    }
    if reports.iter().any(|r| !r.membership.crashes.is_empty()) {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| mode | crashed peer | at s | observers | detected | first s | median s | all s | false downs |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let f = |x: Option<f64>| x.map_or("—".to_string(), |v| format!("{v:.2}"));
        for r in reports {
            for d in &r.membership.crashes {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
                    r.mode,
                    d.peer,
                    d.at_s,
                    d.observers,
                    d.detected,
                    f(d.first_s),
                    f(d.median_s),
                    f(d.all_s),
                    r.membership.false_downs
                );
            }
        }
    }
    s
}

/// Writes `latency-cdf.svg` and `timeline.svg` into `dir`.
pub fn write_svgs(reports: &[Report], dir: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    std::fs::create_dir_all(dir)?;
    let colors = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];

    let cdf_path = dir.join("latency-cdf.svg");
    {
        let root = SVGBackend::new(&cdf_path, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let xmax = reports
            .iter()
            .flat_map(|r| r.cdf.iter().map(|p| p[0]))
            .fold(1.0f64, f64::max)
            * 1.05;
        let title = format!(
            "{}: time to first response byte",
            reports.first().map_or("", |r| r.scenario.as_str())
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..xmax, 0f64..1.0f64)?;
        chart
            .configure_mesh()
            .x_desc("first byte, ms")
            .y_desc("fraction of answered requests")
            .draw()?;
        for (i, r) in reports.iter().enumerate() {
            let c = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(r.cdf.iter().map(|p| (p[0], p[1])), c))?
                .label(r.mode.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        root.present()?;
    }

    let tl_path = dir.join("timeline.svg");
    {
        let root = SVGBackend::new(&tl_path, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let tmax = reports
            .iter()
            .flat_map(|r| r.timeline.iter().map(|b| b.t_s + 1))
            .max()
            .unwrap_or(1) as f64;
        let ymax = reports
            .iter()
            .flat_map(|r| {
                r.timeline
                    .iter()
                    .map(|b| b.failed.max(b.rerouted).max(b.retried))
            })
            .max()
            .unwrap_or(0)
            .max(1) as f64
            * 1.1;
        let title = format!(
            "{}: failures and reroutes per second",
            reports.first().map_or("", |r| r.scenario.as_str())
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..tmax, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("time, s (virtual)")
            .y_desc("requests started in that second")
            .draw()?;
        for (i, r) in reports.iter().enumerate() {
            let c = colors[i % colors.len()];
            let failed: Vec<(f64, f64)> = r
                .timeline
                .iter()
                .map(|b| (b.t_s as f64, b.failed as f64))
                .collect();
            let rerouted: Vec<(f64, f64)> = r
                .timeline
                .iter()
                .map(|b| (b.t_s as f64, b.rerouted as f64))
                .collect();
            chart
                .draw_series(LineSeries::new(failed, c.stroke_width(2)))?
                .label(format!("{} failed", r.mode))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            chart
                .draw_series(LineSeries::new(rerouted, c.mix(0.5)))?
                .label(format!("{} rerouted", r.mode))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.mix(0.5)));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        root.present()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, at_s: f64, ms: Option<u64>, outcome: Outcome) -> RequestRecord {
        RequestRecord {
            id,
            at_s,
            client: 0,
            service: 0,
            outcome,
            attempts: 1,
            server: ms.map(|_| 1),
            first_byte: ms.map(Duration::from_millis),
            path_rtt: Some(Duration::from_millis(20)),
            cold: false,
            served: ms.map(|_| overlay::preauth::Served::Connection),
            through_cut: false,
            rerouted: false,
            first_try: ms.map(|_| 1),
            first_try_relays: Vec::new(),
            relays: Vec::new(),
            overlay_attempts: 1,
        }
    }

    fn facts() -> RunFacts {
        RunFacts {
            scenario: "t".into(),
            seed: 1,
            mode: "reactive".into(),
            peers: 2,
            time: "virtual".into(),
            wall_s: 0.1,
            virtual_s: 3.0,
            truncated: false,
            membership: MembershipReport::default(),
            overlay: BTreeMap::new(),
            net: NetStats::default(),
            memory: Memory::default(),
            false_link_downs: 0,
            restarts: Vec::new(),
        }
    }

    #[test]
    fn reroute_is_how_long_new_requests_went_into_the_dead_peer_until_its_restart() {
        let mut f = facts();
        f.membership.crashes = vec![
            Detection {
                peer: 1,
                at_s: 10.0,
                ..Detection::default()
            },
            Detection {
                peer: 2,
                at_s: 30.0,
                ..Detection::default()
            },
        ];
        f.restarts = vec![(1, 20.0)];
        f.membership.false_downs = 1;
        f.false_link_downs = 2;
        let mut recs = Vec::new();
        // Into dead 1 until 10.8 s (first attempt), also through it as a relay at 10.5 s.
        for (i, (at, first, relays)) in [
            (9.0, 1, vec![]),
            (10.2, 1, vec![]),
            (10.5, 3, vec![1]),
            (10.8, 1, vec![]),
            (11.0, 3, vec![]),
            // Restarted: going to it again is no reroute.
            (21.0, 1, vec![]),
            (31.0, 3, vec![]),
        ]
        .into_iter()
        .enumerate()
        {
            let mut r = rec(i as u64, at, Some(20), Outcome::Ok);
            r.first_try = Some(first);
            r.first_try_relays = relays;
            recs.push(r);
        }
        recs.push(rec(99, 31.5, None, Outcome::Failed));
        let r = Report::build(f, &recs);
        assert_eq!(r.routing.reroutes[0].ms, 800.0);
        assert_eq!(r.routing.reroutes[0].sent_into_dead, 3);
        assert_eq!(r.routing.reroutes[1].ms, 0.0);
        assert_eq!(r.reroute_ms.max, 800.0);
        assert_eq!(r.reroute_ms.p50, 800.0);
        assert_eq!(r.failed_before_first_byte, 1);
        assert_eq!(r.false_downs, 3);
    }

    #[test]
    fn percentiles_and_counts() {
        let mut recs: Vec<_> = (0..99)
            .map(|i| rec(i, 0.5, Some(20), Outcome::Ok))
            .collect();
        recs.push(rec(99, 1.5, Some(200), Outcome::Retried));
        recs.push(rec(100, 2.5, None, Outcome::Failed));
        let r = Report::build(facts(), &recs);
        assert_eq!(r.requests.total, 101);
        assert_eq!(r.requests.ok, 100);
        assert_eq!(r.requests.failed, 1);
        assert_eq!(r.requests.retried, 1);
        assert_eq!(r.first_byte_ms.p50, 20.0);
        assert_eq!(r.first_byte_rtt.p50, 1.0);
        assert!(r.first_byte_ms.max >= 199.0);
        assert_eq!(r.timeline.len(), 3);
        assert_eq!(r.timeline[2].failed, 1);
        let md = r.markdown();
        assert!(md.contains("| t | reactive | 2 |"), "{md}");
        let json = serde_json::to_value(&r).unwrap();
        for k in ["scenario", "seed", "peers", "wall_s", "virtual_s"] {
            assert!(json.get(k).is_some(), "{k}");
        }
        for k in ["p50", "p90", "p99", "mean"] {
            assert!(json["first_byte_ms"].get(k).is_some());
            assert!(json["first_byte_rtt"].get(k).is_some());
        }
    }

    #[test]
    fn svgs_render() {
        let recs: Vec<_> = (0..50)
            .map(|i| rec(i, i as f64 / 10.0, Some(20 + i), Outcome::Ok))
            .collect();
        let r = Report::build(facts(), &recs);
        let dir = std::env::temp_dir().join(format!("netsim-svg-{}", std::process::id()));
        write_svgs(&[r.clone(), r], &dir).unwrap();
        let svg = std::fs::read_to_string(dir.join("latency-cdf.svg")).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(dir.join("timeline.svg").exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}
