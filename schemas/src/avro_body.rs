//! Avro's binary encoding read straight into Rust values, with no
//! `apache_avro::types::Value` tree in between: for records whose writer
//! schema is the one compiled in (the codec checks that by Parsing
//! Canonical Form, which fixes the bytes' layout), a hand-written reader
//! takes the fields in the schema's order. A rebuild decodes tens of
//! thousands of events a second, and building a tree of values (each string
//! copied in, then again out) was a seventh of its CPU.
//!
//! Every reader is checked against `apache_avro`'s own encoding of the same
//! event (`schemas/tests/properties.rs`), so a field added to a schema and
//! not to its reader fails there, not in production.

/// Why a body cannot be read: it ended early, or holds what its schema
/// does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("avro body: {0}")]
pub struct BodyError(pub &'static str);

/// The bytes of one Avro record (after the wire format's 5-byte header),
/// read front to back.
#[derive(Debug, Clone, Copy)]
pub struct Body<'a> {
    bytes: &'a [u8],
}

impl<'a> Body<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.bytes
    }

    /// A `long`: a zig-zag variable-length integer of at most 10 bytes.
    pub fn long(&mut self) -> Result<i64, BodyError> {
        let mut n: u64 = 0;
        for (i, byte) in self.bytes.iter().enumerate().take(10) {
            n |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.bytes = &self.bytes[i + 1..];
                return Ok((n >> 1) as i64 ^ -((n & 1) as i64));
            }
        }
        Err(BodyError(if self.bytes.len() < 10 { "ends inside a number" } else { "a number longer than 10 bytes" }))
    }

    /// An `int`: a `long` that fits 32 bits.
    pub fn int(&mut self) -> Result<i32, BodyError> {
        i32::try_from(self.long()?).map_err(|_| BodyError("an int out of range"))
    }

    /// A `string`: its length as a `long`, then UTF-8.
    pub fn string(&mut self) -> Result<String, BodyError> {
        let len = usize::try_from(self.long()?).map_err(|_| BodyError("a negative string length"))?;
        if len > self.bytes.len() {
            return Err(BodyError("ends inside a string"));
        }
        let (text, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        std::str::from_utf8(text).map(str::to_owned).map_err(|_| BodyError("a string that is not UTF-8"))
    }

    /// An `array`: blocks of items, each a count (negative: followed by
    /// the block's size in bytes) and that many items, up to a count of 0.
    pub fn array<T>(&mut self, mut item: impl FnMut(&mut Self) -> Result<T, BodyError>) -> Result<Vec<T>, BodyError> {
        let mut items = Vec::new();
        loop {
            let count = match self.long()? {
                0 => return Ok(items),
                n if n < 0 => {
                    self.long()?;
                    n.unsigned_abs()
                }
                n => n.unsigned_abs(),
            };
            // Each item takes a byte at least: a count past what is left
            // is a lie, not a reason to reserve memory.
            if count > self.bytes.len() as u64 {
                return Err(BodyError("an array longer than its bytes"));
            }
            items.reserve(count as usize);
            for _ in 0..count {
                items.push(item(self)?);
            }
        }
    }

    /// Done: every byte was read.
    pub fn finish(self) -> Result<(), BodyError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(BodyError("bytes after the record's last field"))
        }
    }
}

/// A record type read from its body by hand, in its schema's field order.
pub trait FromBody: Sized {
    fn from_body(body: &mut Body<'_>) -> Result<Self, BodyError>;

    /// The whole body is this one record.
    fn read(bytes: &[u8]) -> Result<Self, BodyError> {
        let mut body = Body::new(bytes);
        let record = Self::from_body(&mut body)?;
        body.finish()?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(deprecated)] // to_avro_datum: the simplest raw encoding, fine in a test
    fn numbers_strings_and_arrays_read_as_apache_avro_writes_them() {
        use apache_avro::types::Value;
        let schema = apache_avro::Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[{"name":"l","type":"long"},{"name":"i","type":"int"},
                {"name":"s","type":"string"},{"name":"a","type":{"type":"array","items":"long"}}]}"#,
        )
        .unwrap();
        for (l, i, s, a) in [
            (0i64, 0i32, "", vec![]),
            (-1, -1, "é", vec![1i64]),
            (i64::MAX, i32::MAX, "plain", vec![i64::MIN, 0, i64::MAX]),
            (i64::MIN, i32::MIN, "ünï cödé", (0..300).collect()),
        ] {
            let value = Value::Record(vec![
                ("l".into(), Value::Long(l)),
                ("i".into(), Value::Int(i)),
                ("s".into(), Value::String(s.into())),
                ("a".into(), Value::Array(a.iter().map(|n| Value::Long(*n)).collect())),
            ]);
            let bytes = apache_avro::to_avro_datum(&schema, value).unwrap();
            let mut body = Body::new(&bytes);
            assert_eq!(body.long().unwrap(), l);
            assert_eq!(body.int().unwrap(), i);
            assert_eq!(body.string().unwrap(), s);
            assert_eq!(body.array(Body::long).unwrap(), a);
            body.finish().unwrap();
        }
    }

    #[test]
    fn blocks_with_sizes_and_bad_bytes() {
        // Two blocks, the first with a negative count and its byte size.
        let mut body = Body::new(&[3, 2, 2, 4, 2, 6, 0]);
        assert_eq!(body.array(Body::long).unwrap(), [1, 2, 3]);
        body.finish().unwrap();
        assert!(Body::new(&[0x80]).long().is_err(), "ends inside a number");
        assert!(Body::new(&[0xff; 11]).long().is_err(), "too long");
        assert!(Body::new(&[4, b'a']).string().is_err(), "ends inside a string");
        assert!(Body::new(&[2, 0xff]).string().is_err(), "not UTF-8");
        assert!(Body::new(&[1]).string().is_err(), "negative length");
        assert!(Body::new(&[0x80, 0x80, 0x04]).array(Body::long).is_err(), "more items than bytes");
        assert!(Body::new(&[2, 2, 0, 9]).finish().is_err(), "trailing bytes");
    }
}
