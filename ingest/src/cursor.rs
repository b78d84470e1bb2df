//! Listing cursors the edge hands out: opaque, and bound to the tenant and
//! customer they were issued for by an HMAC, so a tampered cursor, or one
//! taken from another tenant's or customer's listing, is refused (400)
//! before it reaches the read store.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the tag kept (128 bits).
const TAG_LEN: usize = 16;

pub struct Cursors {
    secret: Vec<u8>,
}

impl Cursors {
    pub fn new(secret: &str) -> Self {
        Self { secret: secret.as_bytes().to_vec() }
    }

    /// `inner` (the read store's cursor, URL-safe base64) with its tag.
    pub fn sign(&self, tenant: &str, customer: &str, inner: &str) -> String {
        let tag = self.mac(tenant, customer, inner).finalize().into_bytes();
        format!("{inner}.{}", hex::encode(&tag[..TAG_LEN]))
    }

    /// The inner cursor, if `cursor` was issued for this tenant and customer.
    pub fn open<'a>(&self, tenant: &str, customer: &str, cursor: &'a str) -> Option<&'a str> {
        let (inner, tag) = cursor.rsplit_once('.')?;
        let tag = hex::decode(tag).ok()?;
        if tag.len() != TAG_LEN {
            return None;
        }
        // Compared in constant time.
        self.mac(tenant, customer, inner).verify_truncated_left(&tag).ok()?;
        Some(inner)
    }

    fn mac(&self, tenant: &str, customer: &str, inner: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes keys of any length");
        // Its own domain: a cursor tag never verifies as anything else.
        for part in ["sluice.cursor", tenant, customer, inner] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_opens_only_for_its_tenant_and_customer_and_untouched() {
        let cursors = Cursors::new("s3cret");
        let signed = cursors.sign("acme", "alice", "AAEC");
        assert_eq!(cursors.open("acme", "alice", &signed), Some("AAEC"));
        assert_eq!(cursors.open("globex", "alice", &signed), None, "another tenant");
        assert_eq!(cursors.open("acme", "bob", &signed), None, "another customer");
        assert_eq!(cursors.open("acme", "alice", &signed.replacen("AAEC", "AAED", 1)), None, "tampered");
        assert_eq!(cursors.open("acme", "alice", "AAEC"), None, "unsigned");
        assert_eq!(Cursors::new("other").open("acme", "alice", &signed), None, "another secret");
    }
}
