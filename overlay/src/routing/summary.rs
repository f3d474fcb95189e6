//! Signed route summaries: a peer's coordinate, load and measured links, signed with its node
//! key so any member can hand them on and no peer can speak for another. No I/O.
//!
//! The envelope is the catalog's ([`SignedCatalog`]: key, body, signature) under its own
//! signature context, so a summary can never be passed off as a catalog or the reverse. The
//! body can only express links of which the signer is an end (`links` are all from
//! `node_id`), so "a peer advertising a link it does not own" cannot even be encoded; a
//! summary signed by one node but naming another is refused.

use crate::catalog::signed::{check, CatalogSigner, SignedError};
use crate::wire::{self, RouteSummary, SignedCatalog};

/// Signature context of a route summary body.
pub const ROUTES_CONTEXT: &[u8] = b"meshd-routes-v1\0";

/// Signs `summary` (its `node_id` must be the signer's).
pub fn sign(signer: &CatalogSigner, summary: &RouteSummary) -> Result<SignedCatalog, SignedError> {
    if summary.node_id != signer.node_id() {
        return Err(SignedError::KeyMismatch(summary.node_id));
    }
    let body =
        postcard::to_allocvec(summary).map_err(|e| wire::WireError::Malformed(e.to_string()))?;
    let signed = signer.sign(ROUTES_CONTEXT, body);
    if wire::encode_route_item(&signed).is_none() {
        return Err(wire::WireError::TooLarge {
            len: signed.body.len(),
            max: wire::MAX_GOSSIP_ITEM_LEN,
        }
        .into());
    }
    Ok(signed)
}

/// Checks a signed summary: the body decodes within limits, the key is the origin's, the
/// signature verifies.
pub fn verify(s: &SignedCatalog) -> Result<RouteSummary, SignedError> {
    if s.signature.len() != 64 {
        return Err(wire::WireError::Malformed("bad signature size".into()).into());
    }
    let summary = wire::decode_route_summary(&s.body)?;
    check(ROUTES_CONTEXT, s, summary.node_id)?;
    Ok(summary)
}

/// Reads origin and version without checking the signature (to skip stale ones cheaply).
pub fn peek(
    s: &SignedCatalog,
) -> Result<(crate::identity::NodeId, wire::CatalogVersion), SignedError> {
    let summary = wire::decode_route_summary(&s.body)?;
    Ok((summary.node_id, summary.version))
}
