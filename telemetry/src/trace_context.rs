//! W3C Trace Context: which `traceparent` a command carries to the queue.
//!
//! A client may send it as the CloudEvents distributed-tracing extension
//! (`traceparent` attribute, or `ce-traceparent` in binary mode) or as the
//! plain HTTP `traceparent` header. The extension wins: it belongs to the
//! event and travels with it; the HTTP header describes only this hop. A
//! malformed value is ignored rather than refused, as the W3C spec asks of
//! receivers (a broken trace must not break the request).

/// The `traceparent` to put on the AMQP message, if any valid one was sent.
pub fn pick<'a>(extension: Option<&'a str>, http_header: Option<&'a str>) -> Option<&'a str> {
    extension.filter(|v| is_traceparent(v)).or(http_header.filter(|v| is_traceparent(v)))
}

/// `version-traceid-parentid-flags`, lower-case hex, ids not all zero;
/// version `ff` is invalid, and version `00` has exactly these four fields
/// (later versions may append fields after a dash).
pub fn is_traceparent(value: &str) -> bool {
    let mut parts = value.split('-');
    let (Some(version), Some(trace_id), Some(parent_id), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let rest_ok = match version {
        "00" => parts.next().is_none(),
        _ => true,
    };
    is_hex(version, 2)
        && version != "ff"
        && is_hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && is_hex(parent_id, 16)
        && parent_id.bytes().any(|b| b != b'0')
        && is_hex(flags, 2)
        && rest_ok
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn accepts_the_spec_example_and_refuses_broken_ones() {
        assert!(is_traceparent(GOOD));
        assert!(is_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(!is_traceparent(bad), "{bad}");
        }
    }

    #[test]
    fn the_extension_wins_and_invalid_values_are_ignored() {
        let other = "00-11111111111111111111111111111111-2222222222222222-00";
        assert_eq!(pick(Some(GOOD), Some(other)), Some(GOOD));
        assert_eq!(pick(None, Some(other)), Some(other));
        assert_eq!(pick(Some("garbage"), Some(other)), Some(other));
        assert_eq!(pick(Some("garbage"), Some("junk")), None);
    }
}
