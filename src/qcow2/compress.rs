//! Decoding compressed clusters.
//!
//! deflate: a raw deflate stream (no zlib header), written by QEMU with a 4 KiB window
//! (windowBits -12); a decoder with the full 32 KiB window reads it too. zstd: one or more plain
//! zstd frames, no length prefix. Either way decoding stops when a full cluster has been produced;
//! input left over is padding and is ignored, and a stream that ends before the cluster is full is
//! an error — as in QEMU's `qcow2_co_decompress`.
//!
//! Hostile data is an error, never a panic or a large allocation: the output is the caller's
//! one-cluster buffer, deflate needs a fixed 32 KiB window, and zstd frames asking for a window
//! above [`ZSTD_WINDOW_LOG_MAX`] are refused (zstd would otherwise reserve up to 128 MiB per
//! decoder, as the frame header says).

use flate2::{Decompress, FlushDecompress, Status};

use crate::qcow2::header::CompressionType;

/// The largest zstd window accepted: 8 MiB, four times the largest cluster. QEMU compresses one
/// cluster per frame with its size known, so its frames' windows are at most the cluster size.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Decompresses `input` into `out`, which must be filled exactly.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Deflate => inflate_raw(input, out),
        CompressionType::Zstd => zstd_frames(input, out),
    }
}

fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut z = Decompress::new(false);
    loop {
        let in_pos = z.total_in() as usize;
        let out_pos = z.total_out() as usize;
        let status = z
            .decompress(
                &input[in_pos..],
                &mut out[out_pos..],
                FlushDecompress::Finish,
            )
            .map_err(|e| format!("deflate data is invalid: {e}"))?;
        let produced = z.total_out() as usize;
        if produced == out.len() {
            return Ok(());
        }
        let stalled = z.total_in() as usize == in_pos && produced == out_pos;
        if status == Status::StreamEnd || stalled {
            return Err(format!(
                "deflate stream ends after {produced} of {} bytes",
                out.len()
            ));
        }
    }
}

fn zstd_frames(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut decoder = Decoder::new().map_err(|e| format!("zstd decoder: {e}"))?;
    decoder
        .set_parameter(zstd::stream::raw::DParameter::WindowLogMax(
            ZSTD_WINDOW_LOG_MAX,
        ))
        .map_err(|e| format!("zstd decoder: {e}"))?;
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(out);
    let mut frame_unfinished = 0;
    while dst.pos() < dst.capacity() {
        let (in_before, out_before) = (src.pos(), dst.pos());
        frame_unfinished = decoder
            .run(&mut src, &mut dst)
            .map_err(|e| format!("zstd data is invalid: {e}"))?;
        if src.pos() == in_before && dst.pos() == out_before {
            return Err(format!(
                "zstd stream ends after {} of {} bytes",
                dst.pos(),
                dst.capacity()
            ));
        }
    }
    if frame_unfinished > 0 {
        // The cluster is full but the frame wants to produce more: the data is damaged.
        return Err("zstd frame decodes to more than one cluster".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn raw_deflate_with_trailing_padding() {
        let data = pattern(65536);
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        let mut compressed = enc.finish().unwrap();
        compressed.extend_from_slice(&[0u8; 300]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Deflate, &compressed, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn short_deflate_stream_is_an_error() {
        let data = pattern(1000);
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        let compressed = enc.finish().unwrap();
        let mut out = vec![0u8; 4096];
        let err = decompress(CompressionType::Deflate, &compressed, &mut out).unwrap_err();
        assert!(err.contains("1000 of 4096"), "{err}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            assert!(decompress(kind, &[0xff; 64], &mut out).is_err());
            assert!(decompress(kind, &[], &mut out).is_err());
        }
    }

    #[test]
    fn zstd_frame() {
        let data = pattern(65536);
        let mut compressed = zstd::bulk::compress(&data, 3).unwrap();
        compressed.extend_from_slice(&[0u8; 100]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zstd, &compressed, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_huge_window_is_refused() {
        // A frame header asking for a 128 MiB window (window descriptor exponent 17, no content
        // size), then an RLE block of 4096 bytes.
        let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 17 << 3];
        let block_header: u32 = 1 | (1 << 1) | (4096 << 3);
        frame.extend_from_slice(&block_header.to_le_bytes()[..3]);
        frame.push(0xab);
        let mut out = vec![0u8; 4096];
        let err = decompress(CompressionType::Zstd, &frame, &mut out).unwrap_err();
        assert!(err.contains("zstd"), "{err}");
        // The same frame with an 8 MiB window decodes.
        frame[5] = 13 << 3;
        decompress(CompressionType::Zstd, &frame, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0xab));
    }

    #[test]
    fn truncated_streams_are_errors() {
        let data = pattern(65536);
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        let deflated = enc.finish().unwrap();
        let zstd = zstd::bulk::compress(&data, 3).unwrap();
        let mut out = vec![0u8; 65536];
        for (kind, full) in [
            (CompressionType::Deflate, &deflated),
            (CompressionType::Zstd, &zstd),
        ] {
            // (Not the last byte: it may hold only the end of the final block.)
            for cut in [1, full.len() / 2] {
                assert!(
                    decompress(kind, &full[..cut], &mut out).is_err(),
                    "{kind:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn zstd_longer_than_cluster_is_an_error() {
        let data = pattern(8192);
        let compressed = zstd::bulk::compress(&data, 3).unwrap();
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zstd, &compressed, &mut out).is_err());
    }
}
