//! Node identity: the overlay CA, node certificates and node ids.
//!
//! A [`NodeId`] is derived from a node's public key (the first 20 bytes of SHA-256 over the
//! certificate's SubjectPublicKeyInfo), printed as 32 lowercase base32 characters. It is carried
//! in the certificate as the DNS subject alternative name `<node id>.node.meshd`, so a peer's id
//! can be read from its certificate and checked against its key.
//!
//! This module writes key material to disk (atomically, mode 0600) but does no network I/O.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// DNS suffix of the SAN that carries a node id.
pub const NODE_SAN_SUFFIX: &str = ".node.meshd";
/// Prefix of the URI subject alternative names that carry a node's groups
/// (`urn:meshd:group:<group>`; repeatable, unlike subject OU entries in rcgen).
pub const GROUP_URI_PREFIX: &str = "urn:meshd:group:";
/// Most groups in one certificate.
pub const MAX_GROUPS: usize = 32;
/// Default validity of a node certificate.
pub const DEFAULT_NODE_VALIDITY_DAYS: u32 = 90;
/// Default validity of the overlay CA.
pub const DEFAULT_CA_VALIDITY_DAYS: u32 = 3650;
/// Longest node name accepted (it is also the certificate's common name).
pub const MAX_NODE_NAME_LEN: usize = 63;

/// File names inside a CA directory and a node directory.
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
pub const NODE_CERT_FILE: &str = "node.crt";
pub const NODE_KEY_FILE: &str = "node.key";

/// Stable, printable identifier of a node, derived from its public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId([u8; 20]);

impl NodeId {
    /// Length of the printed form.
    pub const STR_LEN: usize = 32;

    /// Derives the node id from a DER-encoded SubjectPublicKeyInfo.
    pub fn from_spki(spki_der: &[u8]) -> Self {
        let digest = Sha256::digest(spki_der);
        let mut id = [0u8; 20];
        id.copy_from_slice(&digest[..20]);
        Self(id)
    }

    /// Raw bytes of the id.
    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    /// The SAN DNS name that carries this id in a certificate.
    pub fn san(&self) -> String {
        format!("{self}{NODE_SAN_SUFFIX}")
    }

    /// First 10 characters, for logs.
    pub fn fmt_short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(10);
        s
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            &data_encoding::BASE32_NOPAD
                .encode(&self.0)
                .to_ascii_lowercase(),
        )
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.fmt_short())
    }
}

impl FromStr for NodeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != Self::STR_LEN {
            return Err(IdentityError::BadNodeId(s.chars().take(64).collect()));
        }
        let bytes = data_encoding::BASE32_NOPAD
            .decode(s.to_ascii_uppercase().as_bytes())
            .map_err(|_| IdentityError::BadNodeId(s.to_owned()))?;
        let arr: [u8; 20] = bytes
            .try_into()
            .map_err(|_| IdentityError::BadNodeId(s.to_owned()))?;
        Ok(Self(arr))
    }
}

impl Serialize for NodeIdStr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// Serialises a [`NodeId`] as its printed form (for JSON APIs).
#[derive(Clone, Copy, Debug)]
pub struct NodeIdStr(pub NodeId);

/// Errors of identity operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A file that would be overwritten already exists.
    #[error("{0} already exists (pass --force to overwrite)")]
    Exists(PathBuf),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM file held no usable certificate or key.
    #[error("{0}: no {1} found in PEM file")]
    NoPem(PathBuf, &'static str),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A certificate could not be parsed.
    #[error("malformed certificate: {0}")]
    BadCertificate(String),
    /// The certificate carries no node id SAN, or one that does not match its key.
    #[error("certificate node id does not match its public key")]
    NodeIdMismatch,
    /// A node id string is malformed.
    #[error("malformed node id {0:?} (expected 32 base32 characters)")]
    BadNodeId(String),
    /// A node name is invalid.
    #[error("invalid node name {0:?}: 1 to 63 characters of a-z, 0-9, '-', '_' or '.'")]
    BadName(String),
    /// Validity is invalid.
    #[error("invalid validity: {0}")]
    BadValidity(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks a node or service name: 1–63 characters of `[a-z0-9._-]`, starting alphanumeric.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NODE_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

/// Writes `contents` to `path` atomically with mode 0600 (the file is never seen half-written).
pub fn write_private_file(
    path: &Path,
    contents: &[u8],
    overwrite: bool,
) -> Result<(), IdentityError> {
    write_file_atomic(path, contents, 0o600, overwrite)
}

/// Writes a public file (certificate) atomically with mode 0644.
pub fn write_public_file(
    path: &Path,
    contents: &[u8],
    overwrite: bool,
) -> Result<(), IdentityError> {
    write_file_atomic(path, contents, 0o644, overwrite)
}

/// Writes through a temporary file renamed into place, with `mode` set from creation (the
/// content is never readable with wider permissions, not even briefly).
fn write_file_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    overwrite: bool,
) -> Result<(), IdentityError> {
    use std::os::unix::fs::OpenOptionsExt;

    use atomic_write_file::unix::OpenOptionsExt as _;

    if !overwrite && path.exists() {
        return Err(IdentityError::Exists(path.to_owned()));
    }
    let mut opts = atomic_write_file::OpenOptions::new();
    opts.preserve_mode(false).mode(mode);
    let mut file = opts.open(path).map_err(io_err(path))?;
    file.write_all(contents).map_err(io_err(path))?;
    file.commit().map_err(io_err(path))
}

/// Validity window of a certificate to issue.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// `days` days starting one hour before `now` (to tolerate clock skew).
    pub fn days_from(now: OffsetDateTime, days: u32) -> Result<Self, IdentityError> {
        if days == 0 || days > 36_500 {
            return Err(IdentityError::BadValidity(format!(
                "{days} days (expected 1 to 36500)"
            )));
        }
        Ok(Self {
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(i64::from(days)),
        })
    }
}

/// A CA certificate and key in PEM form.
pub struct CaMaterial {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA private key, PEM (PKCS#8).
    pub key_pem: String,
}

/// A node certificate and key in PEM form, with the node id.
pub struct NodeMaterial {
    /// The node id derived from the key.
    pub node_id: NodeId,
    /// The node certificate, PEM.
    pub cert_pem: String,
    /// The node private key, PEM (PKCS#8).
    pub key_pem: String,
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // keep it positive
    SerialNumber::from_slice(&bytes)
}

/// Makes a new overlay CA (Ed25519).
pub fn generate_ca(name: &str, validity: Validity) -> Result<CaMaterial, IdentityError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("meshd overlay CA {name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok(CaMaterial {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a node certificate signed by the CA: Ed25519 key, node id in the SAN, both TLS usages.
pub fn issue_node(
    ca: &CaMaterial,
    name: &str,
    validity: Validity,
) -> Result<NodeMaterial, IdentityError> {
    issue_node_with_groups(ca, name, &[], validity)
}

/// [`issue_node`] with groups (carried as `urn:meshd:group:<group>` URI SANs), which service
/// policies can match.
pub fn issue_node_with_groups(
    ca: &CaMaterial,
    name: &str,
    groups: &[String],
    validity: Validity,
) -> Result<NodeMaterial, IdentityError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let key_pem = key.serialize_pem();
    let (node_id, cert_pem) = sign_node_cert(ca, &key, name, groups, validity)?;
    Ok(NodeMaterial {
        node_id,
        cert_pem,
        key_pem,
    })
}

/// Renews a node certificate: a new certificate for the node's existing key (so its node id
/// does not change), with the same name and groups and a new validity.
pub fn renew_node_cert(
    ca: &CaMaterial,
    key_pem: &str,
    name: &str,
    groups: &[String],
    validity: Validity,
) -> Result<String, IdentityError> {
    let key = KeyPair::from_pem(key_pem)?;
    Ok(sign_node_cert(ca, &key, name, groups, validity)?.1)
}

/// [`renew_node_cert`] for a key held as PKCS#8 DER (a running node's key).
pub fn renew_node_cert_der(
    ca: &CaMaterial,
    key_der: &[u8],
    name: &str,
    groups: &[String],
    validity: Validity,
) -> Result<String, IdentityError> {
    use base64::Engine as _;
    let b64 = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key_der));
    let mut pem = zeroize::Zeroizing::new(String::from("-----BEGIN PRIVATE KEY-----\n"));
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    renew_node_cert(ca, &pem, name, groups, validity)
}

fn sign_node_cert(
    ca: &CaMaterial,
    key: &KeyPair,
    name: &str,
    groups: &[String],
    validity: Validity,
) -> Result<(NodeId, String), IdentityError> {
    if !valid_name(name) {
        return Err(IdentityError::BadName(name.to_owned()));
    }
    if let Some(g) = groups.iter().find(|g| !valid_name(g)) {
        return Err(IdentityError::BadName(g.clone()));
    }
    if groups.len() > MAX_GROUPS {
        return Err(IdentityError::BadName(format!(
            "more than {MAX_GROUPS} groups"
        )));
    }
    if validity.not_after <= validity.not_before {
        return Err(IdentityError::BadValidity(
            "not_after must be after not_before".into(),
        ));
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let node_id = NodeId::from_spki(&key.subject_public_key_info());
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = vec![SanType::DnsName(node_id.san().try_into()?)];
    for g in groups {
        params
            .subject_alt_names
            .push(SanType::URI(format!("{GROUP_URI_PREFIX}{g}").try_into()?));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(key, &issuer)?;
    Ok((node_id, cert.pem()))
}

/// `meshd ca init`: writes `dir/ca.crt` and `dir/ca.key`.
pub fn init_ca_dir(
    dir: &Path,
    validity: Validity,
    overwrite: bool,
) -> Result<CaMaterial, IdentityError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if !overwrite {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(IdentityError::Exists(p.clone()));
            }
        }
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let ca = generate_ca("root", validity)?;
    write_private_file(&key_path, ca.key_pem.as_bytes(), overwrite)?;
    write_public_file(&cert_path, ca.cert_pem.as_bytes(), overwrite)?;
    Ok(ca)
}

/// Reads a CA directory.
pub fn load_ca_dir(dir: &Path) -> Result<CaMaterial, IdentityError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    Ok(CaMaterial {
        cert_pem: fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?,
        key_pem: fs::read_to_string(&key_path).map_err(io_err(&key_path))?,
    })
}

/// `meshd ca issue`: writes `out/node.crt` and `out/node.key`.
pub fn issue_node_dir(
    ca: &CaMaterial,
    name: &str,
    out: &Path,
    validity: Validity,
    overwrite: bool,
) -> Result<NodeMaterial, IdentityError> {
    issue_node_dir_with_groups(ca, name, &[], out, validity, overwrite)
}

/// [`issue_node_dir`] with groups (`meshd ca issue --group`).
pub fn issue_node_dir_with_groups(
    ca: &CaMaterial,
    name: &str,
    groups: &[String],
    out: &Path,
    validity: Validity,
    overwrite: bool,
) -> Result<NodeMaterial, IdentityError> {
    let cert_path = out.join(NODE_CERT_FILE);
    let key_path = out.join(NODE_KEY_FILE);
    if !overwrite {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(IdentityError::Exists(p.clone()));
            }
        }
    }
    fs::create_dir_all(out).map_err(io_err(out))?;
    let node = issue_node_with_groups(ca, name, groups, validity)?;
    write_private_file(&key_path, node.key_pem.as_bytes(), overwrite)?;
    write_public_file(&cert_path, node.cert_pem.as_bytes(), overwrite)?;
    Ok(node)
}

/// What a peer's certificate says about it, after its node id was checked against its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The node id (SAN, matching the public key).
    pub node_id: NodeId,
    /// The common name (the node's name).
    pub name: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// End of validity, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before_unix: i64,
    /// Groups (`urn:meshd:group:<group>` URI SANs), sorted, for service policies.
    pub groups: Vec<String>,
}

/// Parses a node certificate: reads its SAN node id and checks it matches the public key.
pub fn parse_node_cert(der: &[u8]) -> Result<CertInfo, IdentityError> {
    parse_node_cert_spki(der).map(|(info, _)| info)
}

/// Like [`parse_node_cert`], and returns the certificate's raw Ed25519 public key (refused if
/// the key is not Ed25519).
pub fn parse_node_cert_key(der: &[u8]) -> Result<(CertInfo, [u8; 32]), IdentityError> {
    const PREFIX: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    let (info, spki) = parse_node_cert_spki(der)?;
    match spki.strip_prefix(&PREFIX[..]) {
        Some(key) if key.len() == 32 => {
            let mut k = [0u8; 32];
            k.copy_from_slice(key);
            Ok((info, k))
        }
        _ => Err(IdentityError::BadCertificate("not an Ed25519 key".into())),
    }
}

fn parse_node_cert_spki(der: &[u8]) -> Result<(CertInfo, Vec<u8>), IdentityError> {
    use x509_parser::prelude::*;

    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let spki = cert.tbs_certificate.subject_pki.raw;
    let key_id = NodeId::from_spki(spki);
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?
        .ok_or(IdentityError::NodeIdMismatch)?;
    let mut san_id = None;
    let mut groups = Vec::new();
    for gn in &san.value.general_names {
        if let GeneralName::URI(uri) = gn {
            if let Some(g) = uri.strip_prefix(GROUP_URI_PREFIX) {
                if valid_name(g) && groups.len() < MAX_GROUPS {
                    groups.push(g.to_owned());
                }
            }
        }
        if let GeneralName::DNSName(dns) = gn {
            if let Some(id) = dns.strip_suffix(NODE_SAN_SUFFIX) {
                if san_id.is_some() {
                    // Two node ids in one certificate: ambiguous, refuse.
                    return Err(IdentityError::NodeIdMismatch);
                }
                san_id = Some(id.parse::<NodeId>()?);
            }
        }
    }
    if san_id != Some(key_id) {
        return Err(IdentityError::NodeIdMismatch);
    }
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_owned();
    let serial = cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    groups.sort();
    groups.dedup();
    let info = CertInfo {
        node_id: key_id,
        name,
        serial,
        not_after_unix: cert.validity().not_after.timestamp(),
        not_before_unix: cert.validity().not_before.timestamp(),
        groups,
    };
    Ok((info, spki.to_vec()))
}

/// A node's loaded identity: certificate chain, key, and what the certificate says.
pub struct NodeIdentity {
    /// Certificate chain (leaf first).
    pub chain: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: PrivateKeyDer<'static>,
    /// What the leaf says.
    pub info: CertInfo,
    /// The overlay CA certificate(s) to trust.
    pub ca: Vec<CertificateDer<'static>>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            info: self.info.clone(),
            ca: self.ca.clone(),
        }
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("NodeIdentity")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem = fs::read(path).map_err(io_err(path))?;
    certs_from_pem(&pem).map_err(|e| match e {
        IdentityError::NoPem(_, what) => IdentityError::NoPem(path.to_owned(), what),
        other => other,
    })
}

fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(IdentityError::NoPem(PathBuf::new(), "certificate"));
    }
    Ok(certs)
}

fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, IdentityError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?
        .ok_or(IdentityError::NoPem(PathBuf::new(), "private key"))
}

impl NodeIdentity {
    /// Loads a node identity from PEM files.
    pub fn load(ca_cert: &Path, cert: &Path, key: &Path) -> Result<Self, IdentityError> {
        let ca = read_certs(ca_cert)?;
        let chain = read_certs(cert)?;
        let key_pem = fs::read(key).map_err(io_err(key))?;
        let key = key_from_pem(&key_pem).map_err(|e| match e {
            IdentityError::NoPem(_, what) => IdentityError::NoPem(key.to_owned(), what),
            other => other,
        })?;
        let info = parse_node_cert(&chain[0])?;
        Ok(Self {
            chain,
            key,
            info,
            ca,
        })
    }

    /// Builds an identity from in-memory PEM (demo, tests, simulator).
    pub fn from_pem(
        ca_cert_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, IdentityError> {
        let ca = certs_from_pem(ca_cert_pem.as_bytes())?;
        let chain = certs_from_pem(cert_pem.as_bytes())?;
        let key = key_from_pem(key_pem.as_bytes())?;
        let info = parse_node_cert(&chain[0])?;
        Ok(Self {
            chain,
            key,
            info,
            ca,
        })
    }

    /// Issues a fresh identity from an in-memory CA (demo, tests, simulator).
    pub fn issue(ca: &CaMaterial, name: &str, validity: Validity) -> Result<Self, IdentityError> {
        let node = issue_node(ca, name, validity)?;
        Self::from_pem(&ca.cert_pem, &node.cert_pem, &node.key_pem)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.info.node_id
    }
}

/// A node identity issued by a fresh CA (unit tests of modules that sign with node keys).
#[cfg(test)]
pub(crate) fn test_identity(name: &str) -> NodeIdentity {
    let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    let ca = generate_ca("t", Validity::days_from(now, 10).unwrap()).unwrap();
    NodeIdentity::issue(&ca, name, Validity::days_from(now, 10).unwrap()).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("valid timestamp")
    }

    #[test]
    fn node_id_round_trips_and_matches_key() {
        let ca = generate_ca("t", Validity::days_from(now(), 10).unwrap()).unwrap();
        let node = issue_node(&ca, "alpha", Validity::days_from(now(), 90).unwrap()).unwrap();
        let parsed: NodeId = node.node_id.to_string().parse().unwrap();
        assert_eq!(parsed, node.node_id);
        assert_eq!(node.node_id.to_string().len(), NodeId::STR_LEN);
        let id = NodeIdentity::from_pem(&ca.cert_pem, &node.cert_pem, &node.key_pem).unwrap();
        assert_eq!(id.info.node_id, node.node_id);
        assert_eq!(id.info.name, "alpha");
    }

    #[test]
    fn groups_are_carried_and_renewal_keeps_the_node_id() {
        let ca = generate_ca("t", Validity::days_from(now(), 10).unwrap()).unwrap();
        let groups = vec!["ops".to_string(), "db-admins".to_string()];
        let v = Validity::days_from(now(), 90).unwrap();
        let node = issue_node_with_groups(&ca, "alpha", &groups, v).unwrap();
        let id = NodeIdentity::from_pem(&ca.cert_pem, &node.cert_pem, &node.key_pem).unwrap();
        assert_eq!(id.info.groups, vec!["db-admins", "ops"]);
        let later = Validity::days_from(now() + time::Duration::days(60), 90).unwrap();
        let renewed = renew_node_cert(&ca, &node.key_pem, "alpha", &id.info.groups, later).unwrap();
        let id2 = NodeIdentity::from_pem(&ca.cert_pem, &renewed, &node.key_pem).unwrap();
        assert_eq!(id2.info.node_id, id.info.node_id);
        assert_eq!(id2.info.groups, id.info.groups);
        assert!(id2.info.not_after_unix > id.info.not_after_unix);
        assert_ne!(id2.info.serial, id.info.serial);
        assert!(issue_node_with_groups(&ca, "a", &["Bad Group".into()], v).is_err());
    }

    #[test]
    fn same_name_gives_different_ids() {
        let ca = generate_ca("t", Validity::days_from(now(), 10).unwrap()).unwrap();
        let v = Validity::days_from(now(), 90).unwrap();
        let a = issue_node(&ca, "alpha", v).unwrap();
        let b = issue_node(&ca, "alpha", v).unwrap();
        assert_ne!(a.node_id, b.node_id, "ids come from keys, not names");
    }

    #[test]
    fn rejects_bad_node_ids_and_names() {
        assert!("short".parse::<NodeId>().is_err());
        assert!("0".repeat(32).parse::<NodeId>().is_err()); // '0' is not base32
        assert!(!valid_name(""));
        assert!(!valid_name("Upper"));
        assert!(!valid_name(&"a".repeat(64)));
        assert!(valid_name("node-1.eu"));
    }

    #[test]
    fn key_files_are_private_and_not_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca_dir(dir.path(), Validity::days_from(now(), 10).unwrap(), false).unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = init_ca_dir(dir.path(), Validity::days_from(now(), 10).unwrap(), false);
        assert!(matches!(err, Err(IdentityError::Exists(_))));
        // The original CA is intact.
        let again = load_ca_dir(dir.path()).unwrap();
        assert_eq!(again.cert_pem, ca.cert_pem);
        let out = dir.path().join("n1");
        let v = Validity::days_from(now(), 90).unwrap();
        issue_node_dir(&ca, "n1", &out, v, false).unwrap();
        let mode = fs::metadata(out.join(NODE_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            issue_node_dir(&ca, "n1", &out, v, false),
            Err(IdentityError::Exists(_))
        ));
        issue_node_dir(&ca, "n1", &out, v, true).unwrap();
    }
}
