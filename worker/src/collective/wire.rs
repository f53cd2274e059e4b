//! Framing for collective traffic: every segment travels as
//! `[payload length u32][sequence number u32][crc32 of payload u32]` (little-endian)
//! followed by the payload, and is checked on arrival. The sequence number catches ranks
//! that disagree about which operation they are in; the checksum catches corruption that
//! TCP's weak 16-bit checksum lets through on flaky links.

use std::io::{IoSlice, Read, Write};

use anyhow::{Context, Result, bail};

pub(crate) const HEADER_BYTES: usize = 12;

/// Segments are at most this large, so a receiver can reduce one while the next arrives.
pub(crate) const SEGMENT_BYTES: usize = 1 << 20;

/// Writes `payload` as one frame; `seq` is the sender's frame counter for this link.
pub(crate) fn write_frame(w: &mut impl Write, seq: &mut u32, payload: &[u8]) -> Result<()> {
    let mut header = [0u8; HEADER_BYTES];
    header[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[4..8].copy_from_slice(&seq.to_le_bytes());
    header[8..12].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    *seq = seq.wrapping_add(1);
    write_all_vectored(w, &header, payload)
}

/// Reads one frame of exactly `into.len()` bytes into `into` and verifies it.
pub(crate) fn read_frame(r: &mut impl Read, seq: &mut u32, into: &mut [u8]) -> Result<()> {
    let mut header = [0u8; HEADER_BYTES];
    r.read_exact(&mut header)
        .context("reading a frame header")?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let got_seq = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let crc = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if got_seq != *seq {
        bail!(
            "frame {got_seq} arrived where frame {} was expected (ranks out of step)",
            *seq
        );
    }
    if len != into.len() {
        bail!(
            "frame of {len} bytes where {} were expected (ranks disagree on buffer sizes)",
            into.len()
        );
    }
    r.read_exact(into).context("reading a frame payload")?;
    if crc32fast::hash(into) != crc {
        bail!("frame {got_seq} failed its checksum (data corrupted in transit)");
    }
    *seq = seq.wrapping_add(1);
    Ok(())
}

/// Header and payload in as few syscalls as possible, without copying the payload.
fn write_all_vectored(w: &mut impl Write, header: &[u8], payload: &[u8]) -> Result<()> {
    let (mut h, mut p) = (header, payload);
    while !h.is_empty() {
        let n = w
            .write_vectored(&[IoSlice::new(h), IoSlice::new(p)])
            .context("writing a frame")?;
        if n == 0 {
            bail!("connection closed while writing a frame");
        }
        let from_header = n.min(h.len());
        h = &h[from_header..];
        p = &p[n - from_header..];
    }
    w.write_all(p).context("writing a frame")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_are_checked() {
        let mut wire = Vec::new();
        let mut send_seq = 7;
        write_frame(&mut wire, &mut send_seq, b"hello").unwrap();
        write_frame(&mut wire, &mut send_seq, b"").unwrap();
        let mut recv_seq = 7;
        let mut r = wire.as_slice();
        let mut buf = [0u8; 5];
        read_frame(&mut r, &mut recv_seq, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        read_frame(&mut r, &mut recv_seq, &mut []).unwrap();
        assert_eq!((send_seq, recv_seq), (9, 9));

        let mut corrupt = Vec::new();
        write_frame(&mut corrupt, &mut 0, b"hello").unwrap();
        corrupt[HEADER_BYTES] ^= 1;
        let err = read_frame(&mut corrupt.as_slice(), &mut 0, &mut buf).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        let mut wrong_seq = Vec::new();
        write_frame(&mut wrong_seq, &mut 3, b"hello").unwrap();
        assert!(read_frame(&mut wrong_seq.as_slice(), &mut 4, &mut buf).is_err());
        let mut wrong_len = Vec::new();
        write_frame(&mut wrong_len, &mut 0, b"hi").unwrap();
        assert!(read_frame(&mut wrong_len.as_slice(), &mut 0, &mut buf).is_err());
        assert!(read_frame(&mut &wire[..5], &mut 7, &mut buf).is_err());
    }
}
