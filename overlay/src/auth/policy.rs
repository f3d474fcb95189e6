//! Per-service access policy: which callers may obtain tokens, with which scopes. No I/O.
//!
//! A caller is identified by what mTLS authenticated: its node id, its certificate's name and
//! the groups its certificate carries ([`crate::identity::CertInfo`]). Matching syntax (JSON
//! and TOML): `"*"` (any overlay member), `"node:<node id>"`, `"name:<node name>"`,
//! `"group:<group>"`.
//!
//! Decision for `(caller, scope)`:
//! 1. `scope` not in the service's `scopes` → [`PolicyRefusal::UnknownScope`];
//! 2. a `deny` rule matches the caller and scope → [`PolicyRefusal::Denied`];
//! 3. an `allow` rule matches → allowed;
//! 4. otherwise allowed unless `deny_by_default`.
//!
//! The default policy (no rules, `deny_by_default = false`, scopes `["connect"]`) lets every
//! overlay member obtain `connect` tokens.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::identity::{valid_name, CertInfo, NodeId};

/// The scope that forwarding streams require.
pub const SCOPE_CONNECT: &str = "connect";
/// Most rules per list, scopes per service, and callers per rule.
pub const MAX_POLICY_ITEMS: usize = 256;

/// Who is asking: the identity mTLS authenticated for the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Node id.
    pub node_id: NodeId,
    /// Certificate name.
    pub name: String,
    /// Certificate groups.
    pub groups: Vec<String>,
}

impl From<&CertInfo> for Caller {
    fn from(c: &CertInfo) -> Self {
        Self {
            node_id: c.node_id,
            name: c.name.clone(),
            groups: c.groups.clone(),
        }
    }
}

/// One caller pattern.
#[derive(Clone, PartialEq, Eq)]
pub enum CallerMatch {
    /// Any overlay member.
    Any,
    /// One node id.
    Node(NodeId),
    /// A certificate name.
    Name(String),
    /// A certificate group.
    Group(String),
}

impl CallerMatch {
    fn matches(&self, c: &Caller) -> bool {
        match self {
            CallerMatch::Any => true,
            CallerMatch::Node(id) => *id == c.node_id,
            CallerMatch::Name(n) => *n == c.name,
            CallerMatch::Group(g) => c.groups.iter().any(|x| x == g),
        }
    }
}

impl std::str::FromStr for CallerMatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(CallerMatch::Any);
        }
        let bad = || {
            format!(
                "bad caller pattern {:?}: expected \"*\", \"node:<id>\", \"name:<name>\" or \"group:<group>\"",
                s.chars().take(80).collect::<String>()
            )
        };
        let (kind, v) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "node" => v.parse().map(CallerMatch::Node).map_err(|_| bad()),
            "name" if valid_name(v) => Ok(CallerMatch::Name(v.to_owned())),
            "group" if valid_name(v) => Ok(CallerMatch::Group(v.to_owned())),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for CallerMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallerMatch::Any => f.write_str("*"),
            CallerMatch::Node(id) => write!(f, "node:{id}"),
            CallerMatch::Name(n) => write!(f, "name:{n}"),
            CallerMatch::Group(g) => write!(f, "group:{g}"),
        }
    }
}

impl fmt::Debug for CallerMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl Serialize for CallerMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CallerMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A rule: these callers, these scopes (empty: every scope of the service).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Caller patterns; the rule applies if any matches.
    pub callers: Vec<CallerMatch>,
    /// Scopes the rule covers; empty means all.
    #[serde(default)]
    pub scopes: Vec<String>,
}

impl Rule {
    fn applies(&self, c: &Caller, scope: &str) -> bool {
        (self.scopes.is_empty() || self.scopes.iter().any(|s| s == scope))
            && self.callers.iter().any(|m| m.matches(c))
    }
}

fn default_scopes() -> BTreeSet<String> {
    BTreeSet::from([SCOPE_CONNECT.to_owned()])
}

/// A service's policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Refuse callers that no `allow` rule matches. Default false (all overlay members).
    #[serde(default)]
    pub deny_by_default: bool,
    /// Scopes the service knows; any other scope is refused. Default `["connect"]`.
    #[serde(default = "default_scopes")]
    pub scopes: BTreeSet<String>,
    /// Allow rules.
    #[serde(default)]
    pub allow: Vec<Rule>,
    /// Deny rules (checked first).
    #[serde(default)]
    pub deny: Vec<Rule>,
    /// Forwarded streams must carry a valid token with scope `connect`. Default false.
    #[serde(default)]
    pub require_token: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            deny_by_default: false,
            scopes: default_scopes(),
            allow: Vec::new(),
            deny: Vec::new(),
            require_token: false,
        }
    }
}

/// Why a policy refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyRefusal {
    /// The scope is not one the service declares.
    #[error("unknown scope")]
    UnknownScope,
    /// The policy does not allow this caller this scope.
    #[error("denied by policy")]
    Denied,
}

impl Policy {
    /// Checks a policy's values (names, sizes).
    pub fn validate(&self) -> Result<(), String> {
        if self.scopes.is_empty() {
            return Err("policy: `scopes` must not be empty".into());
        }
        if self.scopes.len() > MAX_POLICY_ITEMS
            || self.allow.len() > MAX_POLICY_ITEMS
            || self.deny.len() > MAX_POLICY_ITEMS
        {
            return Err(format!(
                "policy: at most {MAX_POLICY_ITEMS} scopes and rules"
            ));
        }
        if let Some(s) = self.scopes.iter().find(|s| !valid_name(s)) {
            return Err(format!("policy: invalid scope {s:?}"));
        }
        for r in self.allow.iter().chain(&self.deny) {
            if r.callers.is_empty() || r.callers.len() > MAX_POLICY_ITEMS {
                return Err("policy: a rule needs 1 to 256 callers".into());
            }
            if let Some(s) = r.scopes.iter().find(|s| !self.scopes.contains(*s)) {
                return Err(format!("policy: rule names undeclared scope {s:?}"));
            }
        }
        Ok(())
    }

    /// Decides whether `caller` may have `scope`.
    pub fn decide(&self, caller: &Caller, scope: &str) -> Result<(), PolicyRefusal> {
        if !self.scopes.contains(scope) {
            return Err(PolicyRefusal::UnknownScope);
        }
        if self.deny.iter().any(|r| r.applies(caller, scope)) {
            return Err(PolicyRefusal::Denied);
        }
        if self.allow.iter().any(|r| r.applies(caller, scope)) || !self.deny_by_default {
            return Ok(());
        }
        Err(PolicyRefusal::Denied)
    }

    /// The scopes `caller` may have (sorted).
    pub fn allowed_scopes(&self, caller: &Caller) -> Vec<String> {
        self.scopes
            .iter()
            .filter(|s| self.decide(caller, s).is_ok())
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(id_byte: u8, name: &str, groups: &[&str]) -> Caller {
        let id: NodeId = data_encoding::BASE32_NOPAD
            .encode(&[id_byte; 20])
            .to_ascii_lowercase()
            .parse()
            .unwrap();
        Caller {
            node_id: id,
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn default_allows_every_member_connect_only() {
        let p = Policy::default();
        let c = caller(1, "web", &[]);
        assert_eq!(p.decide(&c, "connect"), Ok(()));
        assert_eq!(p.decide(&c, "admin"), Err(PolicyRefusal::UnknownScope));
    }

    #[test]
    fn deny_by_default_with_rules_by_node_name_and_group() {
        let web = caller(1, "web", &["frontend"]);
        let ops = caller(2, "laptop", &["ops"]);
        let other = caller(3, "batch", &[]);
        let p: Policy = serde_json::from_value(serde_json::json!({
            "deny_by_default": true,
            "scopes": ["connect", "read", "write"],
            "allow": [
                {"callers": ["group:frontend"], "scopes": ["connect", "read"]},
                {"callers": ["group:ops", format!("node:{}", other.node_id)], "scopes": []},
            ],
            "deny": [{"callers": ["name:batch"], "scopes": ["write"]}],
        }))
        .unwrap();
        p.validate().unwrap();
        assert_eq!(p.decide(&web, "read"), Ok(()));
        assert_eq!(p.decide(&web, "write"), Err(PolicyRefusal::Denied));
        assert_eq!(p.decide(&ops, "write"), Ok(()));
        assert_eq!(p.decide(&other, "read"), Ok(()));
        assert_eq!(p.decide(&other, "write"), Err(PolicyRefusal::Denied));
        assert_eq!(p.decide(&web, "delete"), Err(PolicyRefusal::UnknownScope));
        assert_eq!(p.allowed_scopes(&web), vec!["connect", "read"]);
        let stranger = caller(4, "x", &[]);
        assert_eq!(p.decide(&stranger, "connect"), Err(PolicyRefusal::Denied));
        assert!(p.allowed_scopes(&stranger).is_empty());
    }

    #[test]
    fn bad_policies_are_refused() {
        assert!(serde_json::from_value::<Policy>(
            serde_json::json!({"allow":[{"callers":["host:x"]}]})
        )
        .is_err());
        assert!(serde_json::from_value::<Policy>(serde_json::json!({"bogus": 1})).is_err());
        let p: Policy = serde_json::from_value(
            serde_json::json!({"allow":[{"callers":["*"],"scopes":["nope"]}]}),
        )
        .unwrap();
        assert!(p.validate().is_err());
        let p: Policy = serde_json::from_value(serde_json::json!({"scopes": []})).unwrap();
        assert!(p.validate().is_err());
        // Round trip of patterns.
        for s in ["*", "name:web-1", "group:ops"] {
            assert_eq!(s.parse::<CallerMatch>().unwrap().to_string(), s);
        }
    }
}
