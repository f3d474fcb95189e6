//! JWTs for service access: issuing, verifying, signing-key rotation, JWKS and the `jti`
//! deny-list. No I/O and no clock: `now` (Unix seconds) is passed in, and jsonwebtoken's own
//! time checks (which read the system clock) are disabled in favour of ours.
//!
//! A token is a compact JWS: header `{"typ":"JWT","alg":"EdDSA"|"HS256","kid":...}` and the
//! claims of [`Claims`]. Signing uses ring directly with keys parsed once; verification uses
//! `jsonwebtoken` (so a standard library is what accepts our tokens), after the header is read
//! by hand so that `alg: none`, unknown algorithms, a missing or unknown `kid`, and an `alg`
//! that differs from the key's (key confusion) are each refused with their own reason.
//!
//! Signing keys rotate: [`TokenAuthority::rotate`] makes a new current key; older keys sign
//! nothing more but verify until every token they signed has expired (`retired_at + ttl +
//! leeway`), then [`TokenAuthority::prune`] drops them.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};

use super::secret::{fill_random, random_id, SecretBytes, SecretString};

/// Longest token accepted for verification (checked before any work).
pub const MAX_TOKEN_LEN: usize = 2048;
/// Longest `jti` accepted.
pub const MAX_JTI_LEN: usize = 64;
/// Most entries on the `jti` deny-list; beyond this the earliest-expiring are dropped first
/// only if already expired, otherwise revocation is refused (never silently forgotten).
pub const MAX_DENIED_JTIS: usize = 100_000;

/// Signature algorithms meshd issues and accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TokenAlg {
    /// Ed25519 (default): anyone with the JWKS can verify.
    EdDSA,
    /// HMAC-SHA256 with a node-local secret: only this node can verify (single-node use).
    HS256,
}

impl TokenAlg {
    fn name(self) -> &'static str {
        match self {
            TokenAlg::EdDSA => "EdDSA",
            TokenAlg::HS256 => "HS256",
        }
    }
    fn jwt(self) -> Algorithm {
        match self {
            TokenAlg::EdDSA => Algorithm::EdDSA,
            TokenAlg::HS256 => Algorithm::HS256,
        }
    }
}

impl std::str::FromStr for TokenAlg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "EdDSA" => Ok(TokenAlg::EdDSA),
            "HS256" => Ok(TokenAlg::HS256),
            other => Err(format!(
                "unsupported token algorithm {other:?} (EdDSA or HS256)"
            )),
        }
    }
}

/// Token settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSettings {
    /// Lifetime of issued tokens, seconds. Default 300.
    pub ttl_secs: u64,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, seconds. Default 30.
    pub leeway_secs: u64,
    /// Algorithm of new signing keys. Default EdDSA.
    pub alg: TokenAlg,
    /// Algorithms accepted on verification (the allow-list). Default: EdDSA only.
    pub accept: Vec<TokenAlg>,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            ttl_secs: 300,
            leeway_secs: 30,
            alg: TokenAlg::EdDSA,
            accept: vec![TokenAlg::EdDSA],
        }
    }
}

/// The claims of a meshd token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer: node id of the node hosting the service.
    pub iss: String,
    /// Subject: node id of the caller.
    pub sub: String,
    /// Audience: the service name.
    pub aud: String,
    /// Granted scope.
    pub scope: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Not before, Unix seconds.
    pub nbf: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
    /// Unique token id (for the deny-list and audit).
    pub jti: String,
}

/// An issued token.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The compact JWT (a bearer secret).
    pub token: SecretString,
    /// Its claims.
    pub claims: Claims,
    /// Key id that signed it.
    pub kid: String,
}

/// Why a token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenRefusal {
    /// Not a well-formed compact JWS, or its claims do not parse.
    #[error("malformed token")]
    Malformed,
    /// `alg` is `none`, unknown, or not on the allow-list.
    #[error("token algorithm not allowed")]
    AlgorithmNotAllowed,
    /// `alg` differs from the algorithm of the key named by `kid` (key confusion).
    #[error("token algorithm does not match its key")]
    AlgorithmMismatch,
    /// No `kid`, or a `kid` this node does not know (or no longer keeps).
    #[error("unknown signing key id")]
    UnknownKid,
    /// The signature does not verify.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` has passed (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` is not this node.
    #[error("wrong token issuer")]
    WrongIssuer,
    /// `aud` is not the expected service.
    #[error("wrong token audience")]
    WrongAudience,
    /// `sub` is not the caller presenting it.
    #[error("token issued to another caller")]
    WrongSubject,
    /// `jti` is on the deny-list, or the token predates a deregistration of its service.
    #[error("token revoked")]
    Revoked,
}

/// A signing key as stored (secret material base64url).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredSigningKey {
    /// Key id.
    pub kid: String,
    /// Algorithm.
    pub alg: TokenAlg,
    /// PKCS#8 (EdDSA) or the shared secret (HS256), base64url.
    pub secret: SecretString,
    /// Created, Unix seconds.
    pub created_at: u64,
    /// Retired (no longer signs), Unix seconds.
    #[serde(default)]
    pub retired_at: Option<u64>,
}

enum Signer {
    Ed(Ed25519KeyPair),
    Hs(ring::hmac::Key),
}

struct SigningKey {
    kid: String,
    alg: TokenAlg,
    secret: SecretBytes,
    public: Option<Vec<u8>>,
    signer: Signer,
    decoding: DecodingKey,
    created_at: u64,
    retired_at: Option<u64>,
}

impl SigningKey {
    fn generate(alg: TokenAlg, now: u64) -> Result<Self, TokenError> {
        let secret = match alg {
            TokenAlg::EdDSA => {
                let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                    .map_err(|_| TokenError::Crypto)?;
                SecretBytes::new(doc.as_ref().to_vec())
            }
            TokenAlg::HS256 => SecretBytes::random(32),
        };
        Self::from_parts(random_id(5), alg, secret, now, None)
    }

    fn from_parts(
        kid: String,
        alg: TokenAlg,
        secret: SecretBytes,
        created_at: u64,
        retired_at: Option<u64>,
    ) -> Result<Self, TokenError> {
        let (signer, public, decoding) = match alg {
            TokenAlg::EdDSA => {
                let kp = Ed25519KeyPair::from_pkcs8_maybe_unchecked(secret.expose())
                    .map_err(|_| TokenError::Crypto)?;
                let public = kp.public_key().as_ref().to_vec();
                let dec = DecodingKey::from_ed_der(&public);
                (Signer::Ed(kp), Some(public), dec)
            }
            TokenAlg::HS256 => {
                if secret.expose().len() < 32 {
                    return Err(TokenError::Crypto);
                }
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.expose());
                (
                    Signer::Hs(key),
                    None,
                    DecodingKey::from_secret(secret.expose()),
                )
            }
        };
        Ok(Self {
            kid,
            alg,
            secret,
            public,
            signer,
            decoding,
            created_at,
            retired_at,
        })
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match &self.signer {
            Signer::Ed(kp) => kp.sign(msg).as_ref().to_vec(),
            Signer::Hs(k) => ring::hmac::sign(k, msg).as_ref().to_vec(),
        }
    }
}

/// Errors of the token authority itself (not refusals of presented tokens).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Key generation or parsing failed.
    #[error("signing key unusable")]
    Crypto,
    /// Encoding the claims failed.
    #[error("cannot encode token: {0}")]
    Encode(String),
    /// The deny-list is full of unexpired entries.
    #[error("jti deny-list full ({MAX_DENIED_JTIS} unexpired entries)")]
    DenyListFull,
    /// A stored key has an algorithm outside the allow-list configuration or a bad secret.
    #[error("stored signing key {0} is invalid")]
    BadStoredKey(String),
}

#[derive(Serialize)]
struct Header<'a> {
    typ: &'static str,
    alg: &'static str,
    kid: &'a str,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// Issues and verifies tokens for the services of one node.
pub struct TokenAuthority {
    issuer: String,
    settings: TokenSettings,
    keys: Vec<SigningKey>,
    denied_jti: HashMap<String, u64>,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuthority")
            .field("issuer", &self.issuer)
            .field("settings", &self.settings)
            .field(
                "kids",
                &self.keys.iter().map(|k| &k.kid).collect::<Vec<_>>(),
            )
            .field("denied_jti", &self.denied_jti.len())
            .finish()
    }
}

impl TokenAuthority {
    /// A new authority for `issuer` with one fresh signing key.
    pub fn new(issuer: String, settings: TokenSettings, now: u64) -> Result<Self, TokenError> {
        let key = SigningKey::generate(settings.alg, now)?;
        Ok(Self {
            issuer,
            settings,
            keys: vec![key],
            denied_jti: HashMap::new(),
        })
    }

    /// An authority from stored keys (a fresh key is made if none is current or if the
    /// configured algorithm changed).
    pub fn from_stored(
        issuer: String,
        settings: TokenSettings,
        stored: &[StoredSigningKey],
        now: u64,
    ) -> Result<Self, TokenError> {
        let mut keys = Vec::new();
        for s in stored {
            let secret = SecretBytes::from_b64(s.secret.expose())
                .ok_or_else(|| TokenError::BadStoredKey(s.kid.clone()))?;
            keys.push(
                SigningKey::from_parts(s.kid.clone(), s.alg, secret, s.created_at, s.retired_at)
                    .map_err(|_| TokenError::BadStoredKey(s.kid.clone()))?,
            );
        }
        let mut me = Self {
            issuer,
            settings,
            keys,
            denied_jti: HashMap::new(),
        };
        let usable = me
            .keys
            .last()
            .is_some_and(|k| k.retired_at.is_none() && k.alg == me.settings.alg);
        if !usable {
            me.rotate(now)?;
        }
        me.prune(now);
        Ok(me)
    }

    /// The settings.
    pub fn settings(&self) -> &TokenSettings {
        &self.settings
    }

    /// The issuer (`iss`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Key ids kept, current last.
    pub fn kids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.kid.clone()).collect()
    }

    /// The signing keys to store.
    pub fn stored(&self) -> Vec<StoredSigningKey> {
        self.keys
            .iter()
            .map(|k| StoredSigningKey {
                kid: k.kid.clone(),
                alg: k.alg,
                secret: k.secret.to_b64(),
                created_at: k.created_at,
                retired_at: k.retired_at,
            })
            .collect()
    }

    /// Issues a token for `sub` (caller node id) to `aud` (service) with `scope`.
    pub fn issue(
        &self,
        sub: &str,
        aud: &str,
        scope: &str,
        now: u64,
    ) -> Result<IssuedToken, TokenError> {
        let key = self
            .keys
            .iter()
            .rev()
            .find(|k| k.retired_at.is_none())
            .ok_or(TokenError::Crypto)?;
        let mut jti = [0u8; 16];
        fill_random(&mut jti);
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: sub.to_owned(),
            aud: aud.to_owned(),
            scope: scope.to_owned(),
            iat: now,
            nbf: now,
            exp: now + self.settings.ttl_secs,
            jti: URL_SAFE_NO_PAD.encode(jti),
        };
        let header = serde_json::to_vec(&Header {
            typ: "JWT",
            alg: key.alg.name(),
            kid: &key.kid,
        })
        .map_err(|e| TokenError::Encode(e.to_string()))?;
        let body = serde_json::to_vec(&claims).map_err(|e| TokenError::Encode(e.to_string()))?;
        let mut token = String::with_capacity(512);
        URL_SAFE_NO_PAD.encode_string(&header, &mut token);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&body, &mut token);
        let sig = key.sign(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&sig, &mut token);
        Ok(IssuedToken {
            token: SecretString::new(token),
            claims,
            kid: key.kid.clone(),
        })
    }

    /// Verifies signature, algorithm, `kid`, `iss`, `exp`, `nbf`/`iat` and the deny-list.
    /// The audience and subject are checked by [`Self::verify_for`].
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenRefusal> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenRefusal::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenRefusal::Malformed);
        };
        let hbytes = URL_SAFE_NO_PAD
            .decode(h)
            .map_err(|_| TokenRefusal::Malformed)?;
        let header: RawHeader =
            serde_json::from_slice(&hbytes).map_err(|_| TokenRefusal::Malformed)?;
        let alg: TokenAlg = header
            .alg
            .parse()
            .map_err(|_| TokenRefusal::AlgorithmNotAllowed)?;
        if !self.settings.accept.contains(&alg) {
            return Err(TokenRefusal::AlgorithmNotAllowed);
        }
        let kid = header.kid.ok_or(TokenRefusal::UnknownKid)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or(TokenRefusal::UnknownKid)?;
        if key.alg != alg {
            return Err(TokenRefusal::AlgorithmMismatch);
        }
        let mut v = Validation::new(key.alg.jwt());
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        v.leeway = 0;
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &v).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenRefusal::BadSignature,
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => TokenRefusal::AlgorithmMismatch,
            _ => TokenRefusal::Malformed,
        })?;
        let c = data.claims;
        if c.iss != self.issuer {
            return Err(TokenRefusal::WrongIssuer);
        }
        let leeway = self.settings.leeway_secs;
        if now > c.exp.saturating_add(leeway) {
            return Err(TokenRefusal::Expired);
        }
        if c.nbf > now.saturating_add(leeway) || c.iat > now.saturating_add(leeway) {
            return Err(TokenRefusal::NotYetValid);
        }
        if self.denied_jti.contains_key(&c.jti) {
            return Err(TokenRefusal::Revoked);
        }
        Ok(c)
    }

    /// [`Self::verify`], then checks the audience and (if given) the subject.
    pub fn verify_for(
        &self,
        token: &str,
        aud: &str,
        sub: Option<&str>,
        now: u64,
    ) -> Result<Claims, TokenRefusal> {
        let c = self.verify(token, now)?;
        if c.aud != aud {
            return Err(TokenRefusal::WrongAudience);
        }
        if sub.is_some_and(|s| s != c.sub) {
            return Err(TokenRefusal::WrongSubject);
        }
        Ok(c)
    }

    /// Whether `jti` is denied.
    pub fn is_jti_denied(&self, jti: &str) -> bool {
        self.denied_jti.contains_key(jti)
    }

    /// Denies a `jti` until `until` (Unix seconds; pass the token's `exp` if known, else
    /// `now + ttl`). Entries are kept until `until + leeway`.
    pub fn deny_jti(&mut self, jti: &str, until: u64, now: u64) -> Result<(), TokenError> {
        if self.denied_jti.len() >= MAX_DENIED_JTIS {
            self.prune(now);
            if self.denied_jti.len() >= MAX_DENIED_JTIS {
                return Err(TokenError::DenyListFull);
            }
        }
        let e = self.denied_jti.entry(jti.to_owned()).or_insert(until);
        *e = (*e).max(until);
        Ok(())
    }

    /// The deny-list, for the store.
    pub fn denied_jtis(&self) -> impl Iterator<Item = (&String, &u64)> {
        self.denied_jti.iter()
    }

    /// Makes a new current signing key; the old ones verify until their tokens expire.
    pub fn rotate(&mut self, now: u64) -> Result<String, TokenError> {
        let key = SigningKey::generate(self.settings.alg, now)?;
        for k in &mut self.keys {
            k.retired_at.get_or_insert(now);
        }
        let kid = key.kid.clone();
        self.keys.push(key);
        Ok(kid)
    }

    /// Drops retired keys whose tokens have all expired, and expired deny-list entries.
    pub fn prune(&mut self, now: u64) {
        let keep = self.settings.ttl_secs + self.settings.leeway_secs;
        self.keys
            .retain(|k| k.retired_at.is_none_or(|r| now <= r.saturating_add(keep)));
        let leeway = self.settings.leeway_secs;
        self.denied_jti
            .retain(|_, until| now <= until.saturating_add(leeway));
    }

    /// The public keys as a JWKS (RFC 7517): Ed25519 keys only; HS256 secrets are never
    /// published.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .keys
            .iter()
            .filter_map(|k| {
                k.public.as_ref().map(|p| {
                    serde_json::json!({
                        "kty": "OKP",
                        "crv": "Ed25519",
                        "x": URL_SAFE_NO_PAD.encode(p),
                        "kid": k.kid,
                        "alg": "EdDSA",
                        "use": "sig",
                    })
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }
}

/// Reads a token's claims without verifying anything (for logs of refusals and for clients
/// that need `exp` of a token they were just given). Never trust the result.
pub fn insecure_peek_claims(token: &str) -> Option<Claims> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let body = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(body).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn authority(alg: TokenAlg) -> TokenAuthority {
        TokenAuthority::new(
            "issuer-node".into(),
            TokenSettings {
                alg,
                accept: vec![alg],
                ..TokenSettings::default()
            },
            NOW,
        )
        .unwrap()
    }

    fn b64(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    fn claims_json(now: u64) -> serde_json::Value {
        serde_json::json!({"iss":"issuer-node","sub":"caller","aud":"db","scope":"connect",
            "iat":now,"nbf":now,"exp":now+300,"jti":"j1"})
    }

    #[test]
    fn issue_and_verify_both_algorithms() {
        for alg in [TokenAlg::EdDSA, TokenAlg::HS256] {
            let a = authority(alg);
            let t = a.issue("caller", "db", "connect", NOW).unwrap();
            let c = a
                .verify_for(t.token.expose(), "db", Some("caller"), NOW + 10)
                .unwrap();
            assert_eq!(c, t.claims);
            assert_eq!(c.exp, NOW + 300);
            assert_eq!(c.iss, "issuer-node");
        }
    }

    #[test]
    fn refusals_each_have_their_reason() {
        let a = authority(TokenAlg::EdDSA);
        let t = a.issue("caller", "db", "connect", NOW).unwrap();
        let tok = t.token.expose();
        // Expired (beyond leeway) and not yet valid.
        assert_eq!(a.verify(tok, NOW + 300 + 31), Err(TokenRefusal::Expired));
        assert!(a.verify(tok, NOW + 300 + 30).is_ok(), "within leeway");
        assert_eq!(a.verify(tok, NOW - 31), Err(TokenRefusal::NotYetValid));
        // Wrong audience, wrong subject.
        assert_eq!(
            a.verify_for(tok, "web", None, NOW),
            Err(TokenRefusal::WrongAudience)
        );
        assert_eq!(
            a.verify_for(tok, "db", Some("someone-else"), NOW),
            Err(TokenRefusal::WrongSubject)
        );
        // Wrong issuer: another node's authority does not accept it (unknown kid) and a token
        // signed by our key with another iss is refused for the issuer.
        let b = authority(TokenAlg::EdDSA);
        assert_eq!(b.verify(tok, NOW), Err(TokenRefusal::UnknownKid));
        let mut forged = TokenAuthority::from_stored(
            "other-node".into(),
            TokenSettings::default(),
            &a.stored(),
            NOW,
        )
        .unwrap();
        forged.keys.retain(|k| k.kid == t.kid);
        forged.keys[0].retired_at = None;
        let other_iss = forged.issue("caller", "db", "connect", NOW).unwrap();
        assert_eq!(
            a.verify(other_iss.token.expose(), NOW),
            Err(TokenRefusal::WrongIssuer)
        );
        // Tampered signature.
        let mut bad = tok.to_owned();
        let last = bad.pop().unwrap();
        bad.push(if last == 'A' { 'Q' } else { 'A' });
        assert_eq!(a.verify(&bad, NOW), Err(TokenRefusal::BadSignature));
        // Revoked jti.
        let mut a2 = authority(TokenAlg::EdDSA);
        let t2 = a2.issue("caller", "db", "connect", NOW).unwrap();
        a2.deny_jti(&t2.claims.jti, t2.claims.exp, NOW).unwrap();
        assert_eq!(
            a2.verify(t2.token.expose(), NOW),
            Err(TokenRefusal::Revoked)
        );
        // Malformed.
        for junk in ["", "a.b", "a.b.c.d", "!!!.x.y", &"a".repeat(5000)] {
            assert_eq!(
                a.verify(junk, NOW),
                Err(TokenRefusal::Malformed),
                "{junk:.20}"
            );
        }
    }

    #[test]
    fn alg_none_is_refused() {
        let a = authority(TokenAlg::EdDSA);
        let kid = a.kids()[0].clone();
        let tok = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg":"none","typ":"JWT","kid":kid})),
            b64(&claims_json(NOW))
        );
        assert_eq!(a.verify(&tok, NOW), Err(TokenRefusal::AlgorithmNotAllowed));
        let tok = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg":"None","kid":kid})),
            b64(&claims_json(NOW))
        );
        assert_eq!(a.verify(&tok, NOW), Err(TokenRefusal::AlgorithmNotAllowed));
    }

    #[test]
    fn hs256_token_where_eddsa_expected_is_refused() {
        // Key confusion: an attacker signs HS256 with the *public* Ed25519 key as the secret,
        // naming our EdDSA kid.
        let mut a = authority(TokenAlg::EdDSA);
        let kid = a.kids()[0].clone();
        let public = a.keys[0].public.clone().unwrap();
        let msg = format!(
            "{}.{}",
            b64(&serde_json::json!({"alg":"HS256","typ":"JWT","kid":kid})),
            b64(&claims_json(NOW))
        );
        let sig = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public),
            msg.as_bytes(),
        );
        let tok = format!("{msg}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
        assert_eq!(a.verify(&tok, NOW), Err(TokenRefusal::AlgorithmNotAllowed));
        // Even with HS256 on the allow-list, the alg must match the key's.
        a.settings.accept.push(TokenAlg::HS256);
        assert_eq!(a.verify(&tok, NOW), Err(TokenRefusal::AlgorithmMismatch));
    }

    #[test]
    fn unknown_or_missing_kid_is_refused() {
        let a = authority(TokenAlg::HS256);
        let t = a.issue("caller", "db", "connect", NOW).unwrap();
        let parts: Vec<&str> = t.token.expose().split('.').collect();
        let h = b64(&serde_json::json!({"alg":"HS256","typ":"JWT","kid":"zzzzzzzz"}));
        let tok = format!("{h}.{}.{}", parts[1], parts[2]);
        assert_eq!(a.verify(&tok, NOW), Err(TokenRefusal::UnknownKid));
        let h = b64(&serde_json::json!({"alg":"HS256","typ":"JWT"}));
        let tok = format!("{h}.{}.{}", parts[1], parts[2]);
        assert_eq!(a.verify(&tok, NOW), Err(TokenRefusal::UnknownKid));
    }

    #[test]
    fn rotation_keeps_old_keys_until_their_tokens_expire() {
        let mut a = authority(TokenAlg::EdDSA);
        let old = a.issue("c", "db", "connect", NOW).unwrap();
        let new_kid = a.rotate(NOW + 10).unwrap();
        let new = a.issue("c", "db", "connect", NOW + 10).unwrap();
        assert_eq!(new.kid, new_kid);
        assert_ne!(old.kid, new.kid);
        assert!(a.verify(old.token.expose(), NOW + 20).is_ok());
        assert_eq!(a.jwks()["keys"].as_array().unwrap().len(), 2);
        a.prune(NOW + 10 + 300 + 30 + 1);
        assert_eq!(a.kids(), vec![new_kid]);
        assert_eq!(
            a.verify(old.token.expose(), NOW + 20),
            Err(TokenRefusal::UnknownKid)
        );
    }

    #[test]
    fn jwks_works_with_a_standard_library() {
        let a = authority(TokenAlg::EdDSA);
        let t = a.issue("caller", "db", "connect", NOW).unwrap();
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(a.jwks()).unwrap();
        let header = jsonwebtoken::decode_header(t.token.expose()).unwrap();
        let jwk = set.find(header.kid.as_deref().unwrap()).unwrap();
        let key = DecodingKey::from_jwk(jwk).unwrap();
        let mut v = Validation::new(Algorithm::EdDSA);
        v.validate_exp = false;
        v.set_audience(&["db"]);
        let data = jsonwebtoken::decode::<Claims>(t.token.expose(), &key, &v).unwrap();
        assert_eq!(data.claims.sub, "caller");
        // HS256 secrets never appear in a JWKS.
        assert_eq!(
            authority(TokenAlg::HS256).jwks()["keys"]
                .as_array()
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn stored_keys_round_trip() {
        let a = authority(TokenAlg::EdDSA);
        let t = a.issue("c", "db", "connect", NOW).unwrap();
        let b = TokenAuthority::from_stored(
            "issuer-node".into(),
            TokenSettings::default(),
            &a.stored(),
            NOW,
        )
        .unwrap();
        assert!(b.verify(t.token.expose(), NOW).is_ok());
        assert!(!format!("{b:?}").contains(a.stored()[0].secret.expose()));
    }
}
