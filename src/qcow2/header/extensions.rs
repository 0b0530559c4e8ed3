//! Header extensions: the scan of the extension area and the known extensions' contents, and
//! their order and padding when the header is written back.

use super::parse::BeReader;
use super::{
    BitmapsExtension, FeatureName, HeaderError, HeaderExtension, autoclear, crypt, ext, limits,
};

/// The extensions found between `start` and `end`, and the structural error that stopped the scan.
pub(super) struct ExtensionScan {
    pub(super) extensions: Vec<HeaderExtension>,
    pub(super) error: Option<HeaderError>,
}

/// Walks the extension area like QEMU: stop at the end marker or at `end`; an extension whose data
/// runs past `end` is "Header extension too large".
pub(super) fn scan_extensions(r: BeReader, start: u64, end: u64) -> ExtensionScan {
    let mut extensions = Vec::new();
    let mut offset = start;
    while offset < end {
        let magic = r.u32(offset);
        let len = r.u32(offset + 4);
        let data_offset = offset + 8;
        if data_offset > end || u64::from(len) > end - data_offset {
            let error = HeaderError::ExtensionTooLarge {
                magic,
                offset,
                len,
                area_end: end,
            };
            return ExtensionScan {
                extensions,
                error: Some(error),
            };
        }
        if magic == ext::END {
            break;
        }
        extensions.push(HeaderExtension {
            magic,
            data: r.bytes(data_offset, len.into()),
        });
        offset = data_offset + u64::from(len).next_multiple_of(8);
    }
    ExtensionScan {
        extensions,
        error: None,
    }
}

/// The backing format: "just a single string ... the string is not \0 terminated". QEMU keeps it in a
/// 16-byte buffer and rejects `len >= 16`.
pub(super) fn parse_backing_format(data: &[u8]) -> Result<String, HeaderError> {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let error = |reason: String| HeaderError::BackingFormat { len, reason };
    if len > limits::MAX_BACKING_FORMAT_LEN {
        return Err(error("it must be shorter than 16 bytes".to_string()));
    }
    if data.contains(&0) {
        return Err(error(format!(
            "it contains a NUL byte ({:?})",
            String::from_utf8_lossy(data)
        )));
    }
    std::str::from_utf8(data).map(str::to_string).map_err(|_| {
        error(format!(
            "it is not valid UTF-8 ({:?})",
            String::from_utf8_lossy(data)
        ))
    })
}

/// The feature-name table: 48-byte entries `type u8, bit u8, name[46]`, the name "padded with zeros,
/// but not necessarily null terminated if it has full length". Like QEMU, a partial last entry is
/// zero-padded and the table ends at the first entry with an empty name.
pub(super) fn parse_feature_table(data: &[u8]) -> Vec<FeatureName> {
    let mut features = Vec::new();
    for chunk in data.chunks(limits::FEATURE_NAME_ENTRY_SIZE) {
        let mut entry = [0u8; limits::FEATURE_NAME_ENTRY_SIZE];
        entry[..chunk.len()].copy_from_slice(chunk);
        let name = &entry[2..];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        if name.is_empty() {
            break;
        }
        features.push(FeatureName {
            kind: entry[0],
            bit: entry[1],
            name: String::from_utf8_lossy(name).into_owned(),
        });
    }
    features
}

/// The full disk encryption header pointer: offset u64 (cluster aligned) and length u64, only with
/// LUKS.
pub(super) fn check_crypto_extension(
    data: &[u8],
    crypt_method: u32,
    cluster_size: u64,
) -> Result<(), HeaderError> {
    let error = |reason: String| HeaderError::CryptoExtension { reason };
    if crypt_method != crypt::LUKS {
        return Err(error(format!(
            "it is only expected with LUKS encryption, but crypt_method = {crypt_method}"
        )));
    }
    let fields: [u8; 16] = data
        .try_into()
        .map_err(|_| error(format!("its length is {}, expected 16", data.len())))?;
    let offset = u64::from_be_bytes(array_at(&fields, 0));
    if offset % cluster_size != 0 {
        return Err(error(format!(
            "the encryption header offset {offset:#x} is not a multiple of the cluster size {cluster_size}"
        )));
    }
    Ok(())
}

/// The bitmaps extension: nb_bitmaps u32, reserved u32, directory size u64, directory offset u64.
/// "The data of the extension should be considered consistent only if the corresponding auto-clear
/// feature bit is set": without it QEMU ignores the contents (after checking the length).
pub(super) fn parse_bitmaps(
    data: &[u8],
    autoclear_features: u64,
    cluster_size: u64,
) -> Result<Option<BitmapsExtension>, HeaderError> {
    let error = |field, value, reason| HeaderError::BitmapsExtension {
        field,
        value,
        reason,
    };
    let fields: [u8; 24] = data.try_into().map_err(|_| {
        error(
            "length",
            data.len() as u64,
            "the extension must be 24 bytes",
        )
    })?;
    if autoclear_features & autoclear::BITMAPS == 0 {
        return Ok(None);
    }
    let nb_bitmaps = u32::from_be_bytes(array_at(&fields, 0));
    let reserved = u32::from_be_bytes(array_at(&fields, 4));
    let directory_size = u64::from_be_bytes(array_at(&fields, 8));
    let directory_offset = u64::from_be_bytes(array_at(&fields, 16));
    if reserved != 0 {
        return Err(error(
            "reserved",
            reserved.into(),
            "the reserved field must be zero",
        ));
    }
    if nb_bitmaps > limits::MAX_BITMAPS {
        return Err(error(
            "nb_bitmaps",
            nb_bitmaps.into(),
            "more than the supported maximum of 65535 bitmaps",
        ));
    }
    if nb_bitmaps == 0 {
        return Err(error(
            "nb_bitmaps",
            0,
            "found bitmaps extension with zero bitmaps",
        ));
    }
    if directory_offset % cluster_size != 0 {
        return Err(error(
            "bitmap_directory_offset",
            directory_offset,
            "the bitmap directory offset is not aligned to the cluster size",
        ));
    }
    if directory_size > limits::MAX_BITMAP_DIRECTORY_SIZE {
        return Err(error(
            "bitmap_directory_size",
            directory_size,
            "the bitmap directory exceeds the supported maximum of 67107840 bytes",
        ));
    }
    Ok(Some(BitmapsExtension {
        nb_bitmaps,
        directory_size,
        directory_offset,
    }))
}

/// `N` bytes of a fixed-size array at `at` (callers pass in-bounds constant offsets).
fn array_at<const N: usize, const M: usize>(bytes: &[u8; M], at: usize) -> [u8; N] {
    let mut out = [0; N];
    if let Some(src) = bytes.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

/// The rank of an extension in the order QEMU's `qcow2_update_header` writes them: backing format,
/// external data file, full disk encryption, feature names, bitmaps, then the unknown ones.
pub(super) fn extension_rank(magic: u32) -> u8 {
    match magic {
        ext::BACKING_FORMAT => 0,
        ext::EXTERNAL_DATA_FILE => 1,
        ext::FULL_DISK_ENCRYPTION => 2,
        ext::FEATURE_NAMES => 3,
        ext::BITMAPS => 4,
        _ => 5,
    }
}

/// Appends `u32 magic, u32 len, data`, zero-padded to 8 bytes.
pub(super) fn push_extension(out: &mut Vec<u8>, magic: u32, data: &[u8]) {
    out.extend_from_slice(&magic.to_be_bytes());
    // Extension data comes from cluster 0, so its length fits in a u32; a larger one is cut off by
    // `encode`'s fit check anyway.
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
    // The data is padded to a multiple of 8 bytes counted from the extension's own start, as
    // QEMU writes and reads it: with a `header_length` that is not a multiple of 8 (unknown header
    // bytes of odd length, which QEMU keeps), the extensions are not 8-aligned in the file, and
    // aligning them absolutely would put every extension after the first where no reader looks
    // (found by the `header` fuzz target).
    out.resize(out.len() + (8 - data.len() % 8) % 8, 0);
}
