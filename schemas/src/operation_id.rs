//! Operation ids, signed so the edge needs no database write to hand one out.
//!
//! An id is `hex(digest) + hex(tag)`: the digest is SHA-256 of (tenant,
//! source, id) cut to 16 bytes, so a retried CloudEvent gets the same id; the
//! tag is an HMAC of (tenant, digest) under the server secret, cut to 8 bytes.
//! `GET /operations/{id}` checks the tag against the caller's tenant: a valid
//! id with no row yet is `accepted` (never 404), and an id of another tenant,
//! or a made-up one, fails the check and is 404. The edge issues ids for
//! clients' commands, the process managers for the commands they send.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

const DIGEST_LEN: usize = 16;
const TAG_LEN: usize = 8;

#[derive(Clone)]
pub struct OperationIds {
    secret: Vec<u8>,
}

/// Never prints its secret.
impl std::fmt::Debug for OperationIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OperationIds(..)")
    }
}

impl OperationIds {
    pub fn new(secret: &str) -> Self {
        Self { secret: secret.as_bytes().to_vec() }
    }

    pub fn issue(&self, tenant: &str, source: &str, id: &str) -> String {
        let mut hasher = Sha256::new();
        for part in [tenant, source, id] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        let digest = &hasher.finalize()[..DIGEST_LEN];
        format!("{}{}", hex::encode(digest), hex::encode(self.tag(tenant, digest)))
    }

    /// Whether `operation_id` was issued to `tenant`.
    pub fn verify(&self, tenant: &str, operation_id: &str) -> bool {
        let Ok(bytes) = hex::decode(operation_id) else {
            return false;
        };
        if bytes.len() != DIGEST_LEN + TAG_LEN {
            return false;
        }
        let (digest, tag) = bytes.split_at(DIGEST_LEN);
        // Compared in constant time.
        self.mac(tenant, digest).verify_truncated_left(tag).is_ok()
    }

    fn tag(&self, tenant: &str, digest: &[u8]) -> [u8; TAG_LEN] {
        let full = self.mac(tenant, digest).finalize().into_bytes();
        full[..TAG_LEN].try_into().expect("HMAC-SHA256 is 32 bytes")
    }

    fn mac(&self, tenant: &str, digest: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes keys of any length");
        mac.update(&(tenant.len() as u64).to_be_bytes());
        mac.update(tenant.as_bytes());
        mac.update(digest);
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_event_same_id_and_only_its_tenant_verifies() {
        let ids = OperationIds::new("s3cret");
        let a = ids.issue("acme", "/acme/shop", "1");
        assert_eq!(a, ids.issue("acme", "/acme/shop", "1"));
        assert_ne!(a, ids.issue("acme", "/acme/shop", "2"));
        assert!(ids.verify("acme", &a));
        assert!(!ids.verify("globex", &a));
        assert!(!ids.verify("acme", "00"));
        assert!(!OperationIds::new("other").verify("acme", &a));
    }
}
