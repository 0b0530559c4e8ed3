//! Reading cluster 0: the fixed fields, then the checks of QEMU's `qcow2_do_open` in its order.

use super::extensions::{
    check_crypto_extension, parse_backing_format, parse_bitmaps, parse_feature_table,
    scan_extensions,
};
use super::fields::HeaderField as F;
use super::{
    CompressionType, Header, HeaderError, HeaderExtension, QCOW_MAGIC, autoclear,
    check_compression_type, crypt, ext, incompatible, limits,
};

/// Big-endian reads of the start of the file. Bytes past the end read as zeros, as QEMU reads past
/// the end of the file.
#[derive(Clone, Copy)]
pub(super) struct BeReader<'a>(&'a [u8]);

impl BeReader<'_> {
    pub(super) fn array<const N: usize>(&self, offset: u64) -> [u8; N] {
        let mut out = [0; N];
        let available = usize::try_from(offset)
            .ok()
            .and_then(|start| self.0.get(start..))
            .unwrap_or_default();
        let n = available.len().min(N);
        out[..n].copy_from_slice(&available[..n]);
        out
    }

    pub(super) fn u8(&self, offset: u64) -> u8 {
        self.array::<1>(offset)[0]
    }

    pub(super) fn u32(&self, offset: u64) -> u32 {
        u32::from_be_bytes(self.array(offset))
    }

    pub(super) fn u64(&self, offset: u64) -> u64 {
        u64::from_be_bytes(self.array(offset))
    }

    /// `len` bytes at `offset`, zero-filled past the end. Callers bound `len` by the cluster size.
    pub(super) fn bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        let len = usize::try_from(len).unwrap_or(0);
        let mut out = vec![0; len];
        if let Some(available) = usize::try_from(offset)
            .ok()
            .and_then(|start| self.0.get(start..))
        {
            let n = available.len().min(len);
            out[..n].copy_from_slice(&available[..n]);
        }
        out
    }
}

impl Header {
    /// Parses and validates the header from the first bytes of the file.
    ///
    /// `start` holds the first `min(file_len, 2 MiB + 1024)` bytes of the file (enough for the largest
    /// cluster 0 and a backing file name that starts at its end); `file_len` is the file's length.
    ///
    /// The checks run in the order of QEMU's `qcow2_do_open`, so the first problem reported is the
    /// one QEMU reports. The dirty and corrupt bits are not errors: the caller decides whether the
    /// image may be written.
    pub fn parse(start: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        let r = BeReader(start);
        let mut header = Self::parse_fixed_fields(r)?;
        let compression_byte = header.check_header_length_and_backing_offset(r)?;
        header.compression_type =
            check_compression_type(compression_byte, header.incompatible_features)?;
        header.check_incompatible_features(r)?;
        header.check_subclusters()?;
        if header.refcount_order > 6 {
            return Err(HeaderError::RefcountOrder {
                order: header.refcount_order,
            });
        }
        header.check_tables()?;
        header.check_crypt_method()?;
        header.read_extensions(r)?;
        header.check_data_file()?;
        header.check_crypto_header()?;
        header.backing_file = header.read_backing_file_name(start, file_len)?;
        Ok(header)
    }

    /// Magic, version, cluster size, and every fixed field; the v3 fields take their implied values
    /// for v2 ("For version 2 images, the order is always assumed to be 4", header length 72).
    fn parse_fixed_fields(r: BeReader) -> Result<Header, HeaderError> {
        let magic = r.u32(F::Magic.offset());
        if magic != QCOW_MAGIC {
            return Err(HeaderError::BadMagic { found: magic });
        }
        let version = r.u32(F::Version.offset());
        if !(2..=3).contains(&version) {
            return Err(HeaderError::UnsupportedVersion { version });
        }
        let cluster_bits = r.u32(F::ClusterBits.offset());
        if !(limits::MIN_CLUSTER_BITS..=limits::MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(HeaderError::ClusterBits { bits: cluster_bits });
        }
        let v3 = version == 3;
        let v3_u64 = |offset| if v3 { r.u64(offset) } else { 0 };
        Ok(Header {
            version,
            backing_file_offset: r.u64(F::BackingFileOffset.offset()),
            backing_file_size: r.u32(F::BackingFileSize.offset()),
            cluster_bits,
            size: r.u64(F::Size.offset()),
            crypt_method: r.u32(F::CryptMethod.offset()),
            l1_size: r.u32(F::L1Size.offset()),
            l1_table_offset: r.u64(F::L1TableOffset.offset()),
            refcount_table_offset: r.u64(F::RefcountTableOffset.offset()),
            refcount_table_clusters: r.u32(F::RefcountTableClusters.offset()),
            nb_snapshots: r.u32(F::NbSnapshots.offset()),
            snapshots_offset: r.u64(F::SnapshotsOffset.offset()),
            incompatible_features: v3_u64(F::IncompatibleFeatures.offset()),
            compatible_features: v3_u64(F::CompatibleFeatures.offset()),
            autoclear_features: v3_u64(F::AutoclearFeatures.offset()),
            refcount_order: if v3 {
                r.u32(F::RefcountOrder.offset())
            } else {
                4
            },
            header_length: if v3 {
                r.u32(F::HeaderLength.offset())
            } else {
                limits::V2_HEADER_LENGTH
            },
            compression_type: CompressionType::Deflate,
            unknown_header_bytes: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            bitmaps: None,
        })
    }

    /// Checks `header_length` and `backing_file_offset`, keeps the unknown header bytes, and returns
    /// the raw compression type byte ("A field is considered not present when header_length is less
    /// than or equal to the field's offset", and an absent compression type means deflate).
    fn check_header_length_and_backing_offset(&mut self, r: BeReader) -> Result<u8, HeaderError> {
        let length = self.header_length;
        if self.version == 3 && length < limits::V3_MIN_HEADER_LENGTH {
            return Err(HeaderError::HeaderLength {
                length,
                reason: "a version 3 header is at least 104 bytes (header too short)".to_string(),
            });
        }
        if u64::from(length) > self.cluster_size() {
            return Err(HeaderError::HeaderLength {
                length,
                reason: format!(
                    "the header exceeds the cluster size of {} bytes",
                    self.cluster_size()
                ),
            });
        }
        if length > limits::V3_HEADER_LENGTH {
            let known = u64::from(limits::V3_HEADER_LENGTH);
            self.unknown_header_bytes = r.bytes(known, u64::from(length) - known);
        }
        if self.backing_file_offset > self.cluster_size() {
            return Err(HeaderError::BackingFileOffset {
                offset: self.backing_file_offset,
                cluster_size: self.cluster_size(),
            });
        }
        Ok(if length > F::CompressionType.offset() as u32 {
            r.u8(F::CompressionType.offset())
        } else {
            0
        })
    }

    /// End of the header extension area: the backing file name, or the end of the first cluster.
    fn extension_area_end(&self) -> u64 {
        if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        }
    }

    /// "An implementation must fail to open an image if an unknown bit is set." Like QEMU, the error
    /// names the bits the image's feature-name table describes.
    fn check_incompatible_features(&self, r: BeReader) -> Result<(), HeaderError> {
        let mask = self.incompatible_features & !incompatible::KNOWN;
        if mask == 0 {
            return Ok(());
        }
        // QEMU reads the extensions ignoring errors, just to find the feature-name table.
        let scan = scan_extensions(r, u64::from(self.header_length), self.extension_area_end());
        let table = scan
            .extensions
            .iter()
            .rev()
            .find(|e| e.magic == ext::FEATURE_NAMES)
            .map(|e| parse_feature_table(&e.data))
            .unwrap_or_default();
        let mut names = Vec::new();
        let mut unnamed = mask;
        for feature in table.iter().filter(|f| f.kind == 0 && f.bit < 64) {
            let bit = 1u64 << feature.bit;
            if unnamed & bit != 0 {
                names.push(feature.name.clone());
                unnamed &= !bit;
            }
        }
        Err(HeaderError::UnknownIncompatible {
            mask,
            names,
            unnamed,
        })
    }

    /// Extended L2 entries need subclusters (cluster_size / 32) of at least 512 bytes: "if the image
    /// has Extended L2 Entries then cluster_bits must be at least 14".
    fn check_subclusters(&self) -> Result<(), HeaderError> {
        if self.subcluster_size() < 1 << limits::MIN_CLUSTER_BITS {
            return Err(HeaderError::SubclusterSize {
                cluster_size: self.cluster_size(),
                subcluster_size: self.subcluster_size(),
            });
        }
        Ok(())
    }

    /// The refcount table, snapshot table and active L1 table checks of `qcow2_do_open`, then the
    /// virtual size against the L1 table.
    fn check_tables(&self) -> Result<(), HeaderError> {
        let cluster_size = self.cluster_size();
        if self.refcount_table_clusters == 0 {
            return Err(HeaderError::NoRefcountTable);
        }
        TableCheck {
            table: "reference count table",
            field: "refcount_table_clusters",
            offset: self.refcount_table_offset,
            entries: self.refcount_table_clusters.into(),
            entry_size: cluster_size,
            max_bytes: limits::MAX_REFTABLE_BYTES,
        }
        .run(cluster_size)?;
        TableCheck {
            table: "snapshot table",
            field: "nb_snapshots",
            offset: self.snapshots_offset,
            entries: self.nb_snapshots.into(),
            entry_size: limits::SNAPSHOT_HEADER_SIZE,
            max_bytes: limits::SNAPSHOT_HEADER_SIZE * u64::from(limits::MAX_SNAPSHOTS),
        }
        .run(cluster_size)?;
        TableCheck {
            table: "active L1 table",
            field: "l1_size",
            offset: self.l1_table_offset,
            entries: self.l1_size.into(),
            entry_size: limits::L1_ENTRY_SIZE,
            max_bytes: limits::MAX_L1_BYTES,
        }
        .run(cluster_size)?;
        self.check_size_against_l1()
    }

    /// QEMU: `size_to_l1(size) > INT_MAX` is "Image is too big" (QEMU computes in `int64_t`, so a size
    /// of 2^63 or more is too big as well); then "the L1 table must contain at least enough entries
    /// to put header.size bytes".
    fn check_size_against_l1(&self) -> Result<(), HeaderError> {
        let needed = self.l1_entries_for(self.size);
        if needed > limits::MAX_L1_INDEX || self.size > i64::MAX as u64 {
            return Err(HeaderError::ImageTooBig {
                size: self.size,
                l1_entries: needed,
            });
        }
        if u64::from(self.l1_size) < needed {
            return Err(HeaderError::L1TooSmall {
                l1_size: self.l1_size,
                size: self.size,
                needed,
            });
        }
        Ok(())
    }

    /// Refuses unknown encryption methods (as QEMU does) and AES (which snapfs does not read). LUKS is
    /// refused after the extensions are read, so that a missing FDE extension is reported as QEMU
    /// reports it.
    fn check_crypt_method(&self) -> Result<(), HeaderError> {
        match self.crypt_method {
            crypt::NONE | crypt::LUKS => Ok(()),
            crypt::AES => Err(HeaderError::Encrypted {
                method: crypt::AES,
                name: "AES",
            }),
            method => Err(HeaderError::EncryptionMethod { method }),
        }
    }

    /// Reads and checks the header extensions (QEMU's `qcow2_read_extensions`).
    fn read_extensions(&mut self, r: BeReader) -> Result<(), HeaderError> {
        let scan = scan_extensions(r, u64::from(self.header_length), self.extension_area_end());
        for extension in &scan.extensions {
            self.apply_extension(extension)?;
        }
        if let Some(error) = scan.error {
            return Err(error);
        }
        self.extensions = scan.extensions;
        Ok(())
    }

    fn apply_extension(&mut self, extension: &HeaderExtension) -> Result<(), HeaderError> {
        let data = &extension.data;
        match extension.magic {
            ext::BACKING_FORMAT => self.backing_format = Some(parse_backing_format(data)?),
            ext::FEATURE_NAMES => self.feature_names = parse_feature_table(data),
            ext::FULL_DISK_ENCRYPTION => {
                check_crypto_extension(data, self.crypt_method, self.cluster_size())?
            }
            ext::BITMAPS => {
                self.bitmaps = parse_bitmaps(data, self.autoclear_features, self.cluster_size())?
            }
            _ => {}
        }
        Ok(())
    }

    /// External data files are not supported; "data-file-raw requires a data file".
    fn check_data_file(&self) -> Result<(), HeaderError> {
        if self.incompatible_features & incompatible::EXTERNAL_DATA_FILE != 0 {
            let name = self
                .extension(ext::EXTERNAL_DATA_FILE)
                .map(|e| String::from_utf8_lossy(&e.data).into_owned());
            return Err(HeaderError::ExternalDataFile { name });
        }
        if self.autoclear_features & autoclear::DATA_FILE_RAW != 0 {
            return Err(HeaderError::DataFileRawWithoutDataFile {
                autoclear: self.autoclear_features,
            });
        }
        Ok(())
    }

    /// "The full disk encryption header must be present if, and only if, the crypt_method header
    /// requires metadata" (LUKS). snapfs refuses LUKS images either way.
    fn check_crypto_header(&self) -> Result<(), HeaderError> {
        if self.crypt_method != crypt::LUKS {
            return Ok(());
        }
        if self.extension(ext::FULL_DISK_ENCRYPTION).is_none() {
            return Err(HeaderError::MissingCryptoHeader {
                method: self.crypt_method,
            });
        }
        Err(HeaderError::Encrypted {
            method: crypt::LUKS,
            name: "LUKS",
        })
    }

    /// Reads the backing file name. QEMU: the name must fit in the first cluster and in 1023 bytes;
    /// an offset of 0 means no backing file, and so does an empty name.
    fn read_backing_file_name(
        &self,
        start: &[u8],
        file_len: u64,
    ) -> Result<Option<String>, HeaderError> {
        let offset = self.backing_file_offset;
        let size = self.backing_file_size;
        if offset == 0 {
            return Ok(None);
        }
        // offset <= cluster_size was checked before.
        let max = u64::from(limits::MAX_BACKING_FILE_NAME).min(self.cluster_size() - offset);
        if u64::from(size) > max {
            return Err(HeaderError::BackingFileNameTooLong { offset, size, max });
        }
        let name_error = |reason: String| HeaderError::BackingFileName {
            offset,
            size,
            reason,
        };
        let end = offset + u64::from(size);
        let bytes = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(from, to)| start.get(from..to))
            .ok_or_else(|| {
                name_error(format!(
                    "it lies past the end of the file ({file_len} bytes)"
                ))
            })?;
        if bytes.contains(&0) {
            return Err(name_error("it contains a NUL byte".to_string()));
        }
        let name = std::str::from_utf8(bytes).map_err(|_| {
            name_error(format!(
                "it is not valid UTF-8 ({:?})",
                String::from_utf8_lossy(bytes)
            ))
        })?;
        Ok((!name.is_empty()).then(|| name.to_string()))
    }
}

/// One table of QEMU's `qcow2_validate_table`.
struct TableCheck {
    table: &'static str,
    field: &'static str,
    offset: u64,
    entries: u64,
    entry_size: u64,
    max_bytes: u64,
}

impl TableCheck {
    /// "Use signed INT64_MAX as the maximum even for uint64_t header fields, because values will be
    /// passed to qemu functions taking int64_t."
    fn run(&self, cluster_size: u64) -> Result<(), HeaderError> {
        let max = self.max_bytes / self.entry_size;
        if self.entries > max {
            return Err(HeaderError::TableTooLarge {
                table: self.table,
                field: self.field,
                value: self.entries,
                max,
            });
        }
        let offset_error = |reason| HeaderError::TableOffset {
            table: self.table,
            offset: self.offset,
            reason,
        };
        if self.offset % cluster_size != 0 {
            return Err(offset_error("it is not aligned to the cluster size"));
        }
        // Cluster 0 is the header. QEMU does not check this here (it reads the header as the
        // table and fails later, or reads garbage), but no valid image has a table there.
        if self.entries > 0 && self.offset == 0 {
            return Err(offset_error("it points at the header (cluster 0)"));
        }
        // entries * entry_size <= max_bytes, so no overflow.
        if self.offset > i64::MAX as u64 - self.entries * self.entry_size {
            return Err(offset_error("the table would end beyond 2^63 bytes"));
        }
        Ok(())
    }
}
