//! The `meshd run` configuration file: TOML parsed into raw structs (unknown keys refused),
//! then validated once into [`overlay::NodeConfig`] and the daemon's own settings.
//!
//! Every error names the file and the key (`service[1].backend`), so an operator can fix it
//! without reading code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use overlay::auth::limits::{LimitSettings, Rate};
use overlay::auth::policy::Policy;
use overlay::auth::secret::SecretString;
use overlay::auth::tokens::{TokenAlg, TokenSettings};
use overlay::auth::AuthSettings;
use overlay::identity::valid_name;
use overlay::membership::MembershipConfig;
use overlay::{NodeConfig, PreauthSettings, ServiceConfig, TransportSettings, UpstreamConfig};
use serde::Deserialize;

/// A configuration error, naming the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("config {file}: {msg}")]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// What is wrong, naming the key.
    pub msg: String,
}

/// Raw file contents. Durations are in milliseconds (`*_ms`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Node name; must equal the certificate's common name.
    pub name: String,
    /// UDP address to bind.
    pub listen: String,
    /// Address peers dial, when `listen` is a wildcard.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Peers to join through.
    #[serde(default)]
    pub bootstrap: Vec<String>,
    /// Overlay CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// Node certificate (PEM).
    pub cert: PathBuf,
    /// Node key (PEM, must be mode 0600).
    pub key: PathBuf,
    /// Admin HTTP address (loopback only).
    pub admin: String,
    /// Directory for the node's state.
    pub state_dir: PathBuf,
    /// Seed for random choices (default: from the generation).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Published services.
    #[serde(default)]
    pub service: Vec<RawService>,
    /// Local forwarding ports.
    #[serde(default)]
    pub upstream: Vec<RawUpstream>,
    /// SWIM timings.
    #[serde(default)]
    pub membership: RawMembership,
    /// QUIC settings.
    #[serde(default)]
    pub transport: RawTransport,
    /// Service authentication.
    #[serde(default)]
    pub auth: RawAuth,
    /// Predictive pre-authentication.
    #[serde(default)]
    pub preauth: RawPreauth,
    /// Routing: relays, probes, retries.
    #[serde(default)]
    pub routing: RawRouting,
}

/// `[routing]`: path and instance choice, relaying for others, failure detection.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRouting {
    /// Relay streams for other peers (default true).
    pub relay: Option<bool>,
    /// Most relays on a path, 0 to 3 (default 2).
    pub max_relays: Option<usize>,
    /// Streams relayed at once (default 256).
    pub max_relayed: Option<usize>,
    /// Streams relayed at once for one origin (default 32).
    pub max_relayed_per_origin: Option<usize>,
    /// Probe period of links in use (default 200).
    pub probe_interval_ms: Option<u64>,
    /// Unanswered probes in a row that mark a link down (default 4).
    pub probe_misses: Option<u32>,
    /// Attempts of a request that got no response byte, 1 to 5 (default 3).
    pub max_attempts: Option<u32>,
    /// Longest wait for a first response byte (default 30000).
    pub first_byte_timeout_ms: Option<u64>,
    /// Longest time to open a path or reach a relay's next hop (default 2000).
    pub connect_timeout_ms: Option<u64>,
}

/// `[preauth]`: keeping predicted services warm for local clients, and early data.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPreauth {
    /// Keep warm paths for local clients (default true). Off: one shared connection per peer.
    pub enabled: Option<bool>,
    /// "predictive" (default), "recent" (a pool of the most recently used) or "off".
    pub policy: Option<String>,
    /// Warm services per local client (default 3, at most 64).
    pub budget: Option<usize>,
    /// Warm connections for all clients together (default 64; ~80 KiB each).
    pub max_warm_connections: Option<usize>,
    /// Pre-opened streams for all clients together (default 32).
    pub max_preopened_streams: Option<usize>,
    /// Speculative handshakes per second (default 20).
    pub speculative_handshakes_per_second: Option<f64>,
    /// Speculative handshakes per second for any one local client (default 5).
    pub speculative_handshakes_per_client_per_second: Option<f64>,
    /// Prediction horizon (default 2000).
    pub horizon_ms: Option<u64>,
    /// An unused warm entry is dropped after this long (default 30000).
    pub entry_ttl_ms: Option<u64>,
    /// An unused pre-opened stream is closed after this long (default 5000).
    pub stream_deadline_ms: Option<u64>,
    /// Send requests of idempotent services in 0-RTT data (default true).
    pub zero_rtt: Option<bool>,
    /// Pre-opened streams this node holds for other peers before shedding (default 256).
    pub max_preopened_inbound: Option<usize>,
    /// Longest this node keeps a peer's pre-opened stream waiting (default 10000).
    pub preopen_idle_max_ms: Option<u64>,
    /// Lifetime of the 0-RTT resumption tickets this node issues (default 600000).
    pub ticket_max_age_ms: Option<u64>,
}

/// `[auth]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// Token lifetime in seconds (default 300).
    pub token_ttl_secs: Option<u64>,
    /// Clock skew tolerated on token times, seconds (default 30).
    pub token_leeway_secs: Option<u64>,
    /// Signing algorithm: "EdDSA" (default) or "HS256" (single-node use).
    pub token_alg: Option<String>,
    /// The CA private key (PEM); makes this node an issuer: it signs revocations and renews
    /// its own certificate. Must be mode 0600.
    pub ca_key: Option<PathBuf>,
    /// Extra Ed25519 public keys (base64url, 32 bytes) trusted to sign revocations.
    #[serde(default)]
    pub trusted_revokers: Vec<String>,
    /// Default overlap window when retiring an API key, seconds (default 3600).
    pub key_overlap_secs: Option<u64>,
    /// Renew the certificate at this percentage of its lifetime (default 70).
    pub renew_at_percent: Option<u8>,
    /// Token requests and discoveries per second per caller per service (default 20).
    pub caller_service_per_second: Option<u32>,
    /// Burst for the above (default 40).
    pub caller_service_burst: Option<u32>,
    /// Token requests and discoveries per second per service (default 2000).
    pub service_per_second: Option<u32>,
    /// Burst for the above (default 4000).
    pub service_burst: Option<u32>,
    /// Failed authentications per second per caller before a lockout (default 1).
    pub failed_auth_per_second: Option<u32>,
    /// Burst for the above (default 10).
    pub failed_auth_burst: Option<u32>,
}

/// `[[service]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    /// Service name.
    pub name: String,
    /// Local TCP backend address.
    pub backend: String,
    /// Access policy (default: every overlay member may obtain `connect` tokens).
    #[serde(default)]
    pub policy: Option<Policy>,
    /// Requests are idempotent: they may arrive in 0-RTT data (default false: early requests
    /// wait for the handshake to complete).
    #[serde(default)]
    pub idempotent: bool,
}

/// `[[upstream]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Service name.
    pub service: String,
    /// Local TCP address to listen on.
    pub listen: String,
    /// API key of the service (used to obtain tokens from its host). Prefer `api_key_file`.
    #[serde(default)]
    pub api_key: Option<String>,
    /// File holding the API key (mode 0600).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Requests are idempotent: they may be sent in 0-RTT data (default false).
    #[serde(default)]
    pub idempotent: bool,
}

/// `[membership]`; defaults are memberlist's LAN values.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMembership {
    /// Time between probes (default 1000).
    pub probe_period_ms: Option<u64>,
    /// Direct probe timeout (default 500).
    pub probe_timeout_ms: Option<u64>,
    /// Suspicion before down (default 4000).
    pub suspect_timeout_ms: Option<u64>,
    /// Expected cluster size (default 32).
    pub cluster_size: Option<u32>,
}

/// `[transport]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTransport {
    /// Idle timeout (default 30000).
    pub idle_timeout_ms: Option<u64>,
    /// Keep-alive interval (default: none).
    pub keep_alive_ms: Option<u64>,
    /// Streams per connection (default 1024).
    pub max_streams_per_connection: Option<u32>,
    /// Connections (default 4096).
    pub max_connections: Option<usize>,
}

/// The validated daemon configuration.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Node name.
    pub name: String,
    /// UDP bind address.
    pub listen: SocketAddr,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    /// CA certificate path.
    pub ca_cert: PathBuf,
    /// Certificate path.
    pub cert: PathBuf,
    /// Key path.
    pub key: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// CA key, if this node is an issuer.
    pub ca_key: Option<PathBuf>,
    /// Overlay settings.
    pub node: NodeConfig,
}

fn addr(file: &Path, key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| ConfigError {
        file: file.to_owned(),
        msg: format!("key `{key}`: {v:?} is not an IP:port address"),
    })
}

fn ms(file: &Path, key: &str, v: Option<u64>, default: Duration) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(0) => Err(ConfigError {
            file: file.to_owned(),
            msg: format!("key `{key}`: must be greater than 0"),
        }),
        Some(ms) => Ok(Duration::from_millis(ms)),
    }
}

/// Reads and validates a config file.
pub fn load(file: &Path) -> Result<DaemonConfig, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_owned(),
        msg: format!("cannot read: {e}"),
    })?;
    parse(file, &text)
}

/// Parses and validates config text (`file` is used in messages and to resolve relative paths).
pub fn parse(file: &Path, text: &str) -> Result<DaemonConfig, ConfigError> {
    let de = toml::Deserializer::new(text);
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.message().to_owned();
        let line = inner
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
        ConfigError {
            file: file.to_owned(),
            msg: match (path.as_str(), line) {
                (".", Some(l)) => format!("line {l}: {msg}"),
                (".", None) => msg,
                (p, Some(l)) => format!("key `{p}` (line {l}): {msg}"),
                (p, None) => format!("key `{p}`: {msg}"),
            },
        }
    })?;
    validate(file, raw)
}

fn validate(file: &Path, raw: RawConfig) -> Result<DaemonConfig, ConfigError> {
    let err = |msg: String| ConfigError {
        file: file.to_owned(),
        msg,
    };
    if !valid_name(&raw.name) {
        return Err(err(format!(
            "key `name`: {:?} is not a valid node name (1-63 of a-z 0-9 - _ .)",
            raw.name
        )));
    }
    let listen = addr(file, "listen", &raw.listen)?;
    let admin = addr(file, "admin", &raw.admin)?;
    if !admin.ip().is_loopback() {
        return Err(err(format!(
            "key `admin`: {admin} is not a loopback address; the admin API is local only"
        )));
    }
    let advertise = raw
        .advertise
        .as_deref()
        .map(|a| addr(file, "advertise", a))
        .transpose()?;
    if listen.ip().is_unspecified() && advertise.is_none() {
        return Err(err(format!(
            "key `advertise`: required when `listen` is {listen} (the address peers dial)"
        )));
    }
    let bootstrap = raw
        .bootstrap
        .iter()
        .enumerate()
        .map(|(i, b)| addr(file, &format!("bootstrap[{i}]"), b))
        .collect::<Result<Vec<_>, _>>()?;
    let base = file.parent().unwrap_or(Path::new("."));
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };
    let mut services = Vec::new();
    let mut service_policies = std::collections::BTreeMap::new();
    for (i, s) in raw.service.iter().enumerate() {
        if !valid_name(&s.name) {
            return Err(err(format!(
                "key `service[{i}].name`: {:?} is not a valid service name",
                s.name
            )));
        }
        if services.iter().any(|x: &ServiceConfig| x.name == s.name) {
            return Err(err(format!(
                "key `service[{i}].name`: {:?} is published twice",
                s.name
            )));
        }
        services.push(ServiceConfig {
            name: s.name.clone(),
            backend: addr(file, &format!("service[{i}].backend"), &s.backend)?,
        });
        if let Some(p) = &s.policy {
            p.validate()
                .map_err(|e| err(format!("key `service[{i}].policy`: {e}")))?;
            service_policies.insert(s.name.clone(), p.clone());
        }
    }
    let mut upstreams = Vec::new();
    let mut upstream_keys = std::collections::BTreeMap::new();
    for (i, u) in raw.upstream.iter().enumerate() {
        if !valid_name(&u.service) {
            return Err(err(format!(
                "key `upstream[{i}].service`: {:?} is not a valid service name",
                u.service
            )));
        }
        upstreams.push(UpstreamConfig {
            service: u.service.clone(),
            listen: addr(file, &format!("upstream[{i}].listen"), &u.listen)?,
        });
        let key = match (&u.api_key, &u.api_key_file) {
            (Some(_), Some(_)) => {
                return Err(err(format!(
                    "key `upstream[{i}].api_key`: give api_key or api_key_file, not both"
                )))
            }
            (Some(k), None) => Some(SecretString::new(k.trim().to_owned())),
            (None, Some(f)) => {
                let path = resolve(f);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    err(format!(
                        "key `upstream[{i}].api_key_file`: {}: {e}",
                        path.display()
                    ))
                })?;
                Some(SecretString::new(text.trim().to_owned()))
            }
            (None, None) => None,
        };
        if let Some(k) = key {
            if overlay::auth::keys::parse_api_key(k.expose()).is_none() {
                return Err(err(format!(
                    "key `upstream[{i}].api_key`: not a meshd API key (mk_...)"
                )));
            }
            upstream_keys.insert(u.service.clone(), k);
        }
    }
    let md = MembershipConfig::default();
    let membership = MembershipConfig {
        probe_period: ms(
            file,
            "membership.probe_period_ms",
            raw.membership.probe_period_ms,
            md.probe_period,
        )?,
        probe_rtt: ms(
            file,
            "membership.probe_timeout_ms",
            raw.membership.probe_timeout_ms,
            md.probe_rtt,
        )?,
        suspect_to_down: ms(
            file,
            "membership.suspect_timeout_ms",
            raw.membership.suspect_timeout_ms,
            md.suspect_to_down,
        )?,
        cluster_size_hint: raw.membership.cluster_size.unwrap_or(md.cluster_size_hint),
        ..md
    };
    if membership.probe_rtt >= membership.probe_period {
        return Err(err(
            "key `membership.probe_timeout_ms`: must be less than probe_period_ms".into(),
        ));
    }
    let td = TransportSettings::default();
    let transport = TransportSettings {
        idle_timeout: ms(
            file,
            "transport.idle_timeout_ms",
            raw.transport.idle_timeout_ms,
            td.idle_timeout,
        )?,
        keep_alive: raw
            .transport
            .keep_alive_ms
            .map(|v| ms(file, "transport.keep_alive_ms", Some(v), Duration::ZERO))
            .transpose()?,
        max_streams_per_connection: raw
            .transport
            .max_streams_per_connection
            .unwrap_or(td.max_streams_per_connection),
        max_connections: raw.transport.max_connections.unwrap_or(td.max_connections),
        ..td
    };
    if let Some(k) = transport.keep_alive {
        if k >= transport.idle_timeout {
            return Err(err(
                "key `transport.keep_alive_ms`: must be less than idle_timeout_ms".into(),
            ));
        }
    }
    let a = &raw.auth;
    let td = TokenSettings::default();
    let alg: TokenAlg = match &a.token_alg {
        Some(s) => s
            .parse()
            .map_err(|e: String| err(format!("key `auth.token_alg`: {e}")))?,
        None => td.alg,
    };
    let ttl = a.token_ttl_secs.unwrap_or(td.ttl_secs);
    if ttl == 0 || ttl > 86_400 {
        return Err(err("key `auth.token_ttl_secs`: must be 1 to 86400".into()));
    }
    let positive = |key: &str, v: Option<u32>, d: u32| -> Result<u32, ConfigError> {
        match v {
            Some(0) => Err(err(format!("key `auth.{key}`: must be greater than 0"))),
            Some(v) => Ok(v),
            None => Ok(d),
        }
    };
    let ld = LimitSettings::default();
    let limits = LimitSettings {
        per_caller_service: Rate {
            per_second: positive(
                "caller_service_per_second",
                a.caller_service_per_second,
                ld.per_caller_service.per_second,
            )?,
            burst: positive(
                "caller_service_burst",
                a.caller_service_burst,
                ld.per_caller_service.burst,
            )?,
        },
        per_service: Rate {
            per_second: positive(
                "service_per_second",
                a.service_per_second,
                ld.per_service.per_second,
            )?,
            burst: positive("service_burst", a.service_burst, ld.per_service.burst)?,
        },
        failed_auth_per_caller: Rate {
            per_second: positive(
                "failed_auth_per_second",
                a.failed_auth_per_second,
                ld.failed_auth_per_caller.per_second,
            )?,
            burst: positive(
                "failed_auth_burst",
                a.failed_auth_burst,
                ld.failed_auth_per_caller.burst,
            )?,
        },
        ..ld
    };
    let mut trusted_revokers = Vec::new();
    for (i, k) in a.trusted_revokers.iter().enumerate() {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(k.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                err(format!(
                    "key `auth.trusted_revokers[{i}]`: expected a base64url Ed25519 public key"
                ))
            })?;
        trusted_revokers.push(bytes);
    }
    let renew = a.renew_at_percent.unwrap_or(70);
    if !(10..=95).contains(&renew) {
        return Err(err("key `auth.renew_at_percent`: must be 10 to 95".into()));
    }
    let mut idempotent = std::collections::BTreeSet::new();
    for s in raw.service.iter().filter(|s| s.idempotent) {
        idempotent.insert(s.name.clone());
    }
    for u in raw.upstream.iter().filter(|u| u.idempotent) {
        idempotent.insert(u.service.clone());
    }
    let preauth = preauth_settings(file, &raw.preauth, idempotent)?;
    let tls = overlay::tls::TlsSettings {
        ticket_max_age: ms(
            file,
            "preauth.ticket_max_age_ms",
            raw.preauth.ticket_max_age_ms,
            overlay::tls::TlsSettings::default().ticket_max_age,
        )?,
        ..overlay::tls::TlsSettings::default()
    };
    let routing = routing_settings(file, &raw.routing)?;
    let state_dir = resolve(&raw.state_dir);
    let auth = AuthSettings {
        tokens: TokenSettings {
            ttl_secs: ttl,
            leeway_secs: a.token_leeway_secs.unwrap_or(td.leeway_secs),
            alg,
            accept: vec![alg],
        },
        limits,
        state_dir: Some(state_dir.clone()),
        service_policies,
        upstream_keys,
        trusted_revokers,
        renew_at_fraction: f64::from(renew) / 100.0,
        key_overlap_secs: a.key_overlap_secs.unwrap_or(3600),
        ..AuthSettings::default()
    };
    Ok(DaemonConfig {
        ca_key: a.ca_key.as_deref().map(resolve),
        name: raw.name,
        listen,
        admin,
        ca_cert: resolve(&raw.ca_cert),
        cert: resolve(&raw.cert),
        key: resolve(&raw.key),
        state_dir,
        node: NodeConfig {
            advertise,
            bootstrap,
            services,
            upstreams,
            membership,
            transport,
            seed: raw.seed.unwrap_or(0),
            auth,
            preauth,
            tls,
            routing,
            ..NodeConfig::default()
        },
    })
}

/// `[routing]` → validated settings.
fn routing_settings(
    file: &Path,
    r: &RawRouting,
) -> Result<overlay::routing::RoutingConfig, ConfigError> {
    let d = overlay::routing::RoutingConfig::default();
    let err = |msg: String| ConfigError {
        file: file.to_owned(),
        msg,
    };
    let max_relays = r.max_relays.unwrap_or(d.max_relays);
    if max_relays > overlay::wire::MAX_RELAY_PATH - 2 {
        return Err(err(format!(
            "key `routing.max_relays`: at most {}",
            overlay::wire::MAX_RELAY_PATH - 2
        )));
    }
    let max_attempts = r.max_attempts.unwrap_or(d.max_attempts);
    if !(1..=5).contains(&max_attempts) {
        return Err(err("key `routing.max_attempts`: must be 1 to 5".into()));
    }
    let probe_misses = r.probe_misses.unwrap_or(d.probe_misses);
    if !(1..=100).contains(&probe_misses) {
        return Err(err("key `routing.probe_misses`: must be 1 to 100".into()));
    }
    Ok(overlay::routing::RoutingConfig {
        relay: r.relay.unwrap_or(d.relay),
        max_relays,
        max_relayed: r.max_relayed.unwrap_or(d.max_relayed),
        max_relayed_per_origin: r.max_relayed_per_origin.unwrap_or(d.max_relayed_per_origin),
        probe_interval: ms(
            file,
            "routing.probe_interval_ms",
            r.probe_interval_ms,
            d.probe_interval,
        )?,
        probe_misses,
        max_attempts,
        first_byte_timeout: ms(
            file,
            "routing.first_byte_timeout_ms",
            r.first_byte_timeout_ms,
            d.first_byte_timeout,
        )?,
        connect_timeout: ms(
            file,
            "routing.connect_timeout_ms",
            r.connect_timeout_ms,
            d.connect_timeout,
        )?,
        ..d
    })
}

/// `[preauth]` → validated settings.
fn preauth_settings(
    file: &Path,
    p: &RawPreauth,
    idempotent: std::collections::BTreeSet<String>,
) -> Result<PreauthSettings, ConfigError> {
    use overlay::preauth::{Policy as PreauthPolicy, PreauthConfig};
    let err = |msg: String| ConfigError {
        file: file.to_owned(),
        msg,
    };
    let d = PreauthConfig::default();
    let policy = match p.policy.as_deref() {
        None | Some("predictive") => PreauthPolicy::Predictive,
        Some("recent") => PreauthPolicy::Recent,
        Some("off") => PreauthPolicy::Off,
        Some(other) => {
            return Err(err(format!(
                "key `preauth.policy`: {other:?} is not one of predictive, recent, off"
            )))
        }
    };
    let budget = p.budget.unwrap_or(d.budget);
    if budget > 64 {
        return Err(err("key `preauth.budget`: at most 64".into()));
    }
    let rate = p
        .speculative_handshakes_per_second
        .unwrap_or(d.speculative_handshakes_per_s);
    if !(rate.is_finite() && rate >= 0.0) {
        return Err(err(
            "key `preauth.speculative_handshakes_per_second`: must be 0 or more".into(),
        ));
    }
    let client_rate = p
        .speculative_handshakes_per_client_per_second
        .unwrap_or(d.speculative_handshakes_per_client_per_s);
    if !(client_rate.is_finite() && client_rate >= 0.0) {
        return Err(err(
            "key `preauth.speculative_handshakes_per_client_per_second`: must be 0 or more".into(),
        ));
    }
    let engine = PreauthConfig {
        speculative_handshakes_per_client_per_s: client_rate,
        policy,
        budget,
        max_warm_connections: p.max_warm_connections.unwrap_or(d.max_warm_connections),
        max_preopened_streams: p.max_preopened_streams.unwrap_or(d.max_preopened_streams),
        speculative_handshakes_per_s: rate,
        horizon: ms(file, "preauth.horizon_ms", p.horizon_ms, d.horizon)?,
        entry_ttl: ms(file, "preauth.entry_ttl_ms", p.entry_ttl_ms, d.entry_ttl)?,
        stream_deadline: ms(
            file,
            "preauth.stream_deadline_ms",
            p.stream_deadline_ms,
            d.stream_deadline,
        )?,
        zero_rtt: p.zero_rtt.unwrap_or(d.zero_rtt),
        ..d
    };
    let sd = PreauthSettings::default();
    Ok(PreauthSettings {
        engine: p.enabled.unwrap_or(true).then_some(engine),
        idempotent,
        max_preopened_inbound: p.max_preopened_inbound.unwrap_or(sd.max_preopened_inbound),
        preopen_idle_max: ms(
            file,
            "preauth.preopen_idle_max_ms",
            p.preopen_idle_max_ms,
            sd.preopen_idle_max,
        )?,
        ..sd
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "alpha"
listen = "127.0.0.1:7000"
bootstrap = ["127.0.0.1:7001"]
ca_cert = "ca.crt"
cert = "node.crt"
key = "node.key"
admin = "127.0.0.1:7100"
state_dir = "state"

[[service]]
name = "echo"
backend = "127.0.0.1:9000"

[[upstream]]
service = "echo"
listen = "127.0.0.1:9100"
"#;

    fn parse_err(text: &str) -> String {
        parse(Path::new("/etc/meshd/x.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn good_config_parses_and_resolves_paths() {
        let c = parse(Path::new("/etc/meshd/node.toml"), GOOD).unwrap();
        assert_eq!(c.node.services[0].name, "echo");
        assert_eq!(c.cert, PathBuf::from("/etc/meshd/node.crt"));
        assert_eq!(c.node.bootstrap.len(), 1);
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let e = parse_err(&GOOD.replace("127.0.0.1:9000", "nope"));
        assert!(e.contains("/etc/meshd/x.toml"), "{e}");
        assert!(e.contains("service[0].backend"), "{e}");

        let e = parse_err(&format!("{GOOD}\nbogus = 1\n"));
        assert!(e.contains("bogus"), "{e}");

        let e = parse_err(&GOOD.replace("listen = \"127.0.0.1:7000\"", "listen = 7"));
        assert!(e.contains("listen"), "{e}");

        let e = parse_err(&GOOD.replace("admin = \"127.0.0.1:7100\"", "admin = \"0.0.0.0:7100\""));
        assert!(e.contains("admin") && e.contains("loopback"), "{e}");

        let e = parse_err(&GOOD.replace("name = \"alpha\"", "name = \"Alpha Node\""));
        assert!(e.contains("`name`"), "{e}");

        let e =
            parse_err(&GOOD.replace("listen = \"127.0.0.1:7000\"", "listen = \"0.0.0.0:7000\""));
        assert!(e.contains("advertise"), "{e}");

        let e = parse_err(&format!("{GOOD}\n[membership]\nprobe_period_ms = 0\n"));
        assert!(e.contains("membership.probe_period_ms"), "{e}");
    }

    #[test]
    fn auth_settings_parse_and_are_checked() {
        let text = format!(
            "{GOOD}\n[auth]\ntoken_ttl_secs = 60\ntoken_alg = \"HS256\"\ncaller_service_per_second = 5\n"
        );
        let c = parse(Path::new("/etc/meshd/x.toml"), &text).unwrap();
        assert_eq!(c.node.auth.tokens.ttl_secs, 60);
        assert_eq!(c.node.auth.tokens.alg, TokenAlg::HS256);
        assert_eq!(c.node.auth.limits.per_caller_service.per_second, 5);
        let e = parse_err(&format!("{GOOD}\n[auth]\ntoken_alg = \"none\"\n"));
        assert!(e.contains("auth.token_alg"), "{e}");
        let e = parse_err(&format!("{GOOD}\n[auth]\nservice_burst = 0\n"));
        assert!(e.contains("auth.service_burst"), "{e}");
        let e = parse_err(&GOOD.replace(
            "backend = \"127.0.0.1:9000\"",
            "backend = \"127.0.0.1:9000\"\npolicy = { deny_by_default = true, allow = [{ callers = [\"host:x\"] }] }",
        ));
        assert!(e.contains("service"), "{e}");
        let with_policy = GOOD.replace(
            "backend = \"127.0.0.1:9000\"",
            "backend = \"127.0.0.1:9000\"\npolicy = { deny_by_default = true, require_token = true, allow = [{ callers = [\"group:ops\"] }] }",
        );
        let c = parse(Path::new("/etc/meshd/x.toml"), &with_policy).unwrap();
        assert!(c.node.auth.service_policies["echo"].require_token);
        let e = parse_err(&GOOD.replace(
            "listen = \"127.0.0.1:9100\"",
            "listen = \"127.0.0.1:9100\"\napi_key = \"nope\"",
        ));
        assert!(e.contains("upstream[0].api_key"), "{e}");
    }

    #[test]
    fn routing_settings_parse_and_are_checked() {
        let c = parse(Path::new("/etc/meshd/x.toml"), GOOD).unwrap();
        assert!(c.node.routing.relay);
        assert_eq!(c.node.routing.max_relays, 2);
        let c = parse(
            Path::new("/etc/meshd/x.toml"),
            &format!("{GOOD}\n[routing]\nrelay = false\nmax_relays = 1\nprobe_interval_ms = 500\nmax_attempts = 1\n"),
        )
        .unwrap();
        let r = &c.node.routing;
        assert!(!r.relay);
        assert_eq!((r.max_relays, r.max_attempts), (1, 1));
        assert_eq!(r.probe_interval, Duration::from_millis(500));
        for (bad, key) in [
            ("max_relays = 9", "routing.max_relays"),
            ("max_attempts = 0", "routing.max_attempts"),
            ("probe_misses = 0", "routing.probe_misses"),
            ("probe_interval_ms = 0", "routing.probe_interval_ms"),
            ("connect_timeout_ms = 0", "routing.connect_timeout_ms"),
            ("hops = 3", "hops"),
        ] {
            let e = parse_err(&format!("{GOOD}\n[routing]\n{bad}\n"));
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn preauth_settings_parse_and_are_checked() {
        let c = parse(Path::new("/etc/meshd/x.toml"), GOOD).unwrap();
        let e = c.node.preauth.engine.as_ref().expect("on by default");
        assert_eq!(e.policy, overlay::preauth::Policy::Predictive);
        assert!(
            c.node.preauth.idempotent.is_empty(),
            "nothing is idempotent by default"
        );
        let text = format!(
            "{}\n[preauth]\npolicy = \"recent\"\nbudget = 5\nstream_deadline_ms = 900\n",
            GOOD.replace(
                "backend = \"127.0.0.1:9000\"",
                "backend = \"127.0.0.1:9000\"\nidempotent = true"
            )
        );
        let c = parse(Path::new("/etc/meshd/x.toml"), &text).unwrap();
        let e = c.node.preauth.engine.as_ref().unwrap();
        assert_eq!((e.policy, e.budget), (overlay::preauth::Policy::Recent, 5));
        assert_eq!(e.stream_deadline, Duration::from_millis(900));
        assert!(c.node.preauth.idempotent.contains("echo"));
        let off = parse(
            Path::new("/etc/meshd/x.toml"),
            &format!("{GOOD}\n[preauth]\nenabled = false\n"),
        )
        .unwrap();
        assert!(off.node.preauth.engine.is_none());
        let e = parse_err(&format!("{GOOD}\n[preauth]\npolicy = \"psychic\"\n"));
        assert!(e.contains("preauth.policy"), "{e}");
        let e = parse_err(&format!("{GOOD}\n[preauth]\nbudget = 1000\n"));
        assert!(e.contains("preauth.budget"), "{e}");
        let e = parse_err(&format!("{GOOD}\n[preauth]\nhorizon_ms = 0\n"));
        assert!(e.contains("preauth.horizon_ms"), "{e}");
        let e = parse_err(&format!("{GOOD}\n[preauth]\nwarp = 9\n"));
        assert!(e.contains("warp"), "{e}");
    }

    #[test]
    fn missing_required_key_is_named() {
        let e = parse_err(&GOOD.replace("state_dir = \"state\"\n", ""));
        assert!(e.contains("state_dir"), "{e}");
    }
}
