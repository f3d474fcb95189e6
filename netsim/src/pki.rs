//! Reproducible identities for simulated peers: one overlay CA and node certificates whose
//! Ed25519 keys are derived from the run's seed, so node ids (and everything ordered by them:
//! membership, catalogs, provider choice) are the same on every run of a seed.
//!
//! The certificate profile is the one `overlay::identity::issue_node` produces (node id SAN,
//! both TLS usages, authority key id); the validity window is fixed and wide (2020 to 2099) so
//! that rustls, which reads the wall clock, accepts it whenever the simulation runs.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use overlay::{NodeId, NodeIdentity};

/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410); the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Errors making identities.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// rcgen refused.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// overlay refused the result.
    #[error("identity: {0}")]
    Identity(#[from] overlay::identity::IdentityError),
}

fn derived_key(seed: u64, label: &str, index: u64) -> Result<KeyPair, rcgen::Error> {
    let mut h = Sha256::new();
    h.update(b"netsim key v1");
    h.update(seed.to_be_bytes());
    h.update(label.as_bytes());
    h.update(index.to_be_bytes());
    let secret = h.finalize();
    let mut der = ED25519_PKCS8_PREFIX.to_vec();
    der.extend_from_slice(&secret);
    KeyPair::try_from(der.as_slice())
}

fn serial(index: u64, ca: bool) -> SerialNumber {
    let mut b = [0u8; 9];
    b[0] = if ca { 0x7f } else { 0x01 };
    b[1..].copy_from_slice(&index.to_be_bytes());
    SerialNumber::from_slice(&b)
}

fn validity() -> (OffsetDateTime, OffsetDateTime) {
    // 2020-01-01 and 2099-01-01, UTC.
    let from =
        OffsetDateTime::from_unix_timestamp(1_577_836_800).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let to =
        OffsetDateTime::from_unix_timestamp(4_070_908_800).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    (from, to)
}

/// An overlay CA that issues reproducible node identities.
pub struct SimPki {
    seed: u64,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for SimPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimPki").field("seed", &self.seed).finish()
    }
}

impl SimPki {
    /// The CA of seed `seed`.
    pub fn new(seed: u64) -> Result<Self, PkiError> {
        let key = derived_key(seed, "ca", 0)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "meshd overlay CA netsim");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        (params.not_before, params.not_after) = validity();
        params.serial_number = Some(serial(seed, true));
        let cert = params.self_signed(&key)?;
        let ca_pem = cert.pem();
        Ok(Self {
            seed,
            ca_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The identity of peer number `index`, named `name`.
    pub fn node(&self, name: &str, index: u64) -> Result<NodeIdentity, PkiError> {
        let key = derived_key(self.seed, "node", index)?;
        let node_id = NodeId::from_spki(&key.subject_public_key_info());
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = vec![SanType::DnsName(node_id.san().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        (params.not_before, params.not_after) = validity();
        params.serial_number = Some(serial(index, false));
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(NodeIdentity::from_pem(
            &self.ca_pem,
            &cert.pem(),
            &key.serialize_pem(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_reproducible_and_distinct() {
        let a = SimPki::new(7).unwrap();
        let b = SimPki::new(7).unwrap();
        let x = a.node("p0", 0).unwrap();
        assert_eq!(x.node_id(), b.node("p0", 0).unwrap().node_id());
        assert_eq!(x.chain, b.node("p0", 0).unwrap().chain);
        assert_ne!(x.node_id(), a.node("p1", 1).unwrap().node_id());
        assert_ne!(
            x.node_id(),
            SimPki::new(8).unwrap().node("p0", 0).unwrap().node_id()
        );
        assert_eq!(x.info.name, "p0");
    }
}
