//! Record-level checks on v2 record batches, for what the batch header alone cannot prove: that
//! the record count and offset deltas the header claims match the records in the body, and which
//! record a timestamp lookup lands on. Only uncompressed bodies are walked; compressed ones are
//! checked at the header level (decompressing on the produce path would cost a copy per batch
//! and needs a decompressed-size cap first).

use sluice_storage::batch::{BatchHeader, BATCH_HEADER_LEN};

const COMPRESSION_MASK: i16 = 0x07;

fn varint(buf: &[u8], pos: &mut usize) -> Result<i64, String> {
    let mut raw: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or("record truncated inside a varint")?;
        *pos += 1;
        raw |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            // zigzag
            return Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64));
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// (offset delta, timestamp delta) of each record, walking the uncompressed body.
fn walk(batch: &[u8], h: &BatchHeader) -> Result<Vec<(i64, i64)>, String> {
    let body = batch
        .get(BATCH_HEADER_LEN..)
        .ok_or("batch shorter than its header")?;
    let mut out = Vec::with_capacity((h.records_count.max(0) as usize).min(body.len()));
    let mut pos = 0usize;
    while pos < body.len() {
        let len = varint(body, &mut pos)?;
        if len < 0 || len as usize > body.len() - pos {
            return Err(format!(
                "record {} claims {len} bytes, {} left",
                out.len(),
                body.len() - pos
            ));
        }
        let end = pos + len as usize;
        let rec = &body[pos..end];
        let mut p = 1usize; // attributes
        let ts_delta = varint(rec, &mut p)?;
        let off_delta = varint(rec, &mut p)?;
        out.push((off_delta, ts_delta));
        pos = end;
    }
    Ok(out)
}

/// Header consistency always; for uncompressed bodies also the records themselves.
pub fn validate(batch: &[u8], h: &BatchHeader) -> Result<(), String> {
    if h.is_control() {
        return Err("control batches cannot be produced".into());
    }
    if h.records_count < 1 {
        return Err(format!("batch has {} records", h.records_count));
    }
    if i64::from(h.last_offset_delta) != i64::from(h.records_count) - 1 {
        return Err(format!(
            "lastOffsetDelta {} does not match {} records",
            h.last_offset_delta, h.records_count
        ));
    }
    if h.attributes & COMPRESSION_MASK != 0 {
        return Ok(());
    }
    let records = walk(batch, h)?;
    if records.len() != h.records_count as usize {
        return Err(format!(
            "header claims {} records, body holds {}",
            h.records_count,
            records.len()
        ));
    }
    if let Some((i, (d, _))) = records
        .iter()
        .enumerate()
        .find(|(i, (d, _))| *d != *i as i64)
    {
        return Err(format!("record {i} has offset delta {d}"));
    }
    Ok(())
}

/// The first record at or after `ts` in a stored batch: (offset, timestamp). For compressed
/// batches, the batch's first offset and max timestamp (the header is all we read).
pub fn first_at_or_after(batch: &[u8], h: &BatchHeader, ts: i64) -> Option<(i64, i64)> {
    if h.max_timestamp < ts {
        return None;
    }
    if h.attributes & COMPRESSION_MASK != 0 {
        return Some((h.base_offset, h.max_timestamp));
    }
    let records = walk(batch, h).ok()?;
    records
        .into_iter()
        .map(|(od, td)| (h.base_offset + od, h.base_timestamp + td))
        .find(|(_, t)| *t >= ts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };
    use sluice_storage::batch;

    fn encode(n: i64, compression: Compression) -> Vec<u8> {
        let records: Vec<Record> = (0..n)
            .map(|i| Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: 0,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: i,
                sequence: i as i32,
                timestamp: 1000 + i * 10,
                key: None,
                value: Some(bytes::Bytes::from(format!("v{i}"))),
                headers: Default::default(),
            })
            .collect();
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression,
            },
        )
        .unwrap();
        buf.to_vec()
    }

    #[test]
    fn accepts_real_batches_and_finds_timestamps() {
        let b = encode(5, Compression::None);
        let h = batch::validate(&b).unwrap();
        validate(&b, &h).unwrap();
        assert_eq!(first_at_or_after(&b, &h, 1025), Some((3, 1030)));
        assert_eq!(first_at_or_after(&b, &h, 0), Some((0, 1000)));
        assert_eq!(first_at_or_after(&b, &h, 2000), None);
        let z = encode(5, Compression::Gzip);
        let hz = batch::validate(&z).unwrap();
        validate(&z, &hz).unwrap();
    }

    #[test]
    fn rejects_counts_that_lie() {
        let b = encode(3, Compression::None);
        let mut h = batch::validate(&b).unwrap();
        h.last_offset_delta = 1000;
        assert!(validate(&b, &h).is_err());
        h.last_offset_delta = 4;
        h.records_count = 5;
        let e = validate(&b, &h).unwrap_err();
        assert!(e.contains("body holds 3"), "{e}");
        let mut cut = b.clone();
        cut.truncate(b.len() - 2);
        let h = batch::parse_header(&b).unwrap();
        assert!(validate(&cut, &h).is_err());
    }
}
