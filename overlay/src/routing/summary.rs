//! Signed route summaries: a peer's coordinate, load and measured links, signed with its node
//! key so any member can hand them on and no peer can speak for another. No I/O.
//!
//! The envelope is the catalog's ([`SignedCatalog`]: key, body, signature) under its own
//! signature context, so a summary can never be passed off as a catalog or the reverse. The
//! body can only express links of which the signer is an end (`links` are all from
//! `node_id`), so "a peer advertising a link it does not own" cannot even be encoded; a
//! summary signed by one node but naming another is refused.

use crate::catalog::signed::{check, node_id_of_key, CatalogSigner, SignedError};
use crate::identity::NodeId;
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
    check(ROUTES_CONTEXT, s, summary.node_id, None)?;
    Ok(summary)
}

/// Opens a summary received straight from `sender` (authenticated by the membership channel
/// or by TLS): the body decodes within limits, names `sender` as its origin, and the envelope's
/// key is `sender`'s. The signature is not checked: it adds nothing to an authenticated
/// sender, and skipping it keeps a peer's summary work linear in the peers that probe it.
pub fn open_from(s: &SignedCatalog, sender: &NodeId) -> Result<RouteSummary, SignedError> {
    if s.signature.len() != 64 {
        return Err(wire::WireError::Malformed("bad signature size".into()).into());
    }
    let summary = wire::decode_route_summary(&s.body)?;
    if summary.node_id != *sender || node_id_of_key(&s.key) != *sender {
        return Err(SignedError::KeyMismatch(summary.node_id));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::test_identity as identity;
    use crate::routing::vivaldi::Coord;
    use crate::wire::{CatalogVersion, LinkReport, LoadReport};

    fn body(origin: crate::identity::NodeId, peer: crate::identity::NodeId) -> RouteSummary {
        RouteSummary {
            node_id: origin,
            version: CatalogVersion {
                generation: 1,
                seq: 1,
            },
            coord: Coord::default(),
            load: LoadReport::default(),
            relays: true,
            links: vec![LinkReport {
                peer,
                rtt_us: 1000,
                loss_ppm: 0,
            }],
        }
    }

    #[test]
    fn summaries_verify_only_as_their_signers_own() {
        let (a, b, c) = (identity("a"), identity("b"), identity("c"));
        let sa = CatalogSigner::new(&a.key).unwrap();
        let sb = CatalogSigner::new(&b.key).unwrap();
        // a's own link to c: fine.
        let ok = sign(&sa, &body(a.node_id(), c.node_id())).unwrap();
        assert_eq!(verify(&ok).unwrap().node_id, a.node_id());
        // Straight from its origin it opens; from anyone else it is refused.
        assert_eq!(open_from(&ok, &a.node_id()).unwrap().node_id, a.node_id());
        assert!(matches!(
            open_from(&ok, &b.node_id()),
            Err(SignedError::KeyMismatch(_))
        ));
        // b cannot sign a summary that speaks for c (a link b is not an end of).
        assert!(matches!(
            sign(&sb, &body(c.node_id(), a.node_id())),
            Err(SignedError::KeyMismatch(_))
        ));
        // Nor pass one off by swapping the body under its own key and signature.
        let forged_body = postcard::to_allocvec(&body(c.node_id(), a.node_id())).unwrap();
        let mut forged = sign(&sb, &body(b.node_id(), a.node_id())).unwrap();
        forged.body = forged_body;
        assert!(matches!(verify(&forged), Err(SignedError::KeyMismatch(_))));
        // b sending it itself does not help: the body names c.
        assert!(open_from(&forged, &b.node_id()).is_err());
        assert!(open_from(&forged, &c.node_id()).is_err());
        // A changed body under the right key fails the signature.
        let mut tampered = ok.clone();
        let mut s = verify(&ok).unwrap();
        s.links[0].rtt_us = 1;
        tampered.body = postcard::to_allocvec(&s).unwrap();
        assert!(matches!(
            verify(&tampered),
            Err(SignedError::BadSignature(_))
        ));
        // A summary listing a link to itself is malformed.
        let selfish = body(a.node_id(), a.node_id());
        assert!(sign(&sa, &selfish).is_ok());
        assert!(verify(&sign(&sa, &selfish).unwrap()).is_err());
        // A catalog signature is no summary signature.
        let cat = sa
            .sign_snapshot(
                CatalogVersion {
                    generation: 1,
                    seq: 1,
                },
                vec![],
            )
            .unwrap();
        assert!(verify(&cat).is_err());
    }

    #[test]
    fn gossip_framing_round_trips_and_refuses_garbage() {
        let a = identity("a");
        let sa = CatalogSigner::new(&a.key).unwrap();
        let s = sign(&sa, &body(a.node_id(), identity("b").node_id())).unwrap();
        let item = wire::encode_route_item(&s).unwrap();
        let payload = wire::encode_gossip_items([item.as_slice(), item.as_slice()]);
        let back = wire::decode_route_gossip(&payload).unwrap();
        assert_eq!(back, vec![s.clone(), s]);
        for n in 0..payload.len() {
            let _ = wire::decode_route_gossip(&payload[..n]);
        }
        assert!(wire::decode_route_gossip(&[0, 0]).is_err());
        assert!(wire::decode_route_gossip(&[0xff, 0xff, 1]).is_err());
    }
}
