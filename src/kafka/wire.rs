//! A bounds-checked reader and a writer for the few request/response versions we encode by hand
//! (versions the `kafka-protocol` crate dropped with Kafka 4.0). Every count is checked against the
//! bytes left before anything is allocated.

use bytes::{BufMut, Bytes, BytesMut};

pub struct Reader {
    buf: Bytes,
}

pub type WireResult<T> = Result<T, String>;

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf }
    }
    fn take(&mut self, n: usize) -> WireResult<Bytes> {
        if self.buf.len() < n {
            return Err(format!("need {n} bytes, {} left", self.buf.len()));
        }
        Ok(self.buf.split_to(n))
    }
    pub fn i16(&mut self) -> WireResult<i16> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    pub fn i32(&mut self) -> WireResult<i32> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn i64(&mut self) -> WireResult<i64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(i64::from_be_bytes(a))
    }
    pub fn nullable_string(&mut self) -> WireResult<Option<String>> {
        let n = self.i16()?;
        if n < 0 {
            return Ok(None);
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|_| "string is not UTF-8".to_string())
    }
    pub fn string(&mut self) -> WireResult<String> {
        self.nullable_string()?
            .ok_or_else(|| "null where a string is required".to_string())
    }
    pub fn nullable_bytes(&mut self) -> WireResult<Option<Bytes>> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(None);
        }
        self.take(n as usize).map(Some)
    }
    /// An array count, checked against the bytes left: each element takes at least `min_elem_bytes`.
    pub fn count(&mut self, min_elem_bytes: usize) -> WireResult<usize> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(0);
        }
        let n = n as usize;
        if n.saturating_mul(min_elem_bytes.max(1)) > self.buf.len() {
            return Err(format!(
                "array of {n} elements cannot fit in the {} bytes left",
                self.buf.len()
            ));
        }
        Ok(n)
    }
}

#[derive(Default)]
pub struct Writer {
    pub buf: BytesMut,
}

impl Writer {
    pub fn i16(&mut self, v: i16) -> &mut Self {
        self.buf.put_i16(v);
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.put_i32(v);
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.put_i64(v);
        self
    }
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.buf.put_i16(s.len() as i16);
        self.buf.put_slice(s.as_bytes());
        self
    }
    pub fn finish(self) -> Bytes {
        self.buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_counts_larger_than_the_buffer() {
        let mut w = Writer::default();
        w.i32(i32::MAX).i32(1);
        let mut r = Reader::new(w.finish());
        assert!(r.count(4).is_err());
    }

    #[test]
    fn reads_what_writer_wrote() {
        let mut w = Writer::default();
        w.string("topic").i16(-1).i64(42);
        let mut r = Reader::new(w.finish());
        assert_eq!(r.string().unwrap(), "topic");
        assert_eq!(r.nullable_string().unwrap(), None);
        assert_eq!(r.i64().unwrap(), 42);
        assert!(r.i16().is_err());
    }
}
