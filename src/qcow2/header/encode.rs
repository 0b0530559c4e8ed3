//! Writing cluster 0 back the way QEMU's `qcow2_update_header` does.

use super::extensions::{extension_rank, parse_backing_format, push_extension};
use super::fields::HeaderField;
use super::{
    Header, HeaderError, HeaderExtension, QCOW_MAGIC, check_compression_type, ext, limits,
};

/// Cluster 0 as `encode` lays it out, before the checks.
struct Encoded {
    bytes: Vec<u8>,
    header_length: u32,
    extensions: Vec<HeaderExtension>,
    backing_file_offset: u64,
    backing_file_size: u32,
}

impl Header {
    /// Serializes the header, its extensions and the backing file name: the used part of cluster 0.
    ///
    /// The layout is QEMU's (`qcow2_update_header`): the fixed fields (72 bytes for v2, 112 for v3,
    /// compression type at 104 and zero padding), the unknown header bytes (so `header_length` is
    /// 112 + their length), the extensions in QEMU's order — backing format (taken from
    /// `backing_format`), external data file, full disk encryption, feature names, bitmaps, then the
    /// unknown ones in file order —, the end marker and the backing file name (from `backing_file`).
    /// The written `header_length`, `backing_file_offset` and `backing_file_size` are computed from
    /// that layout, not taken from the fields; [`Header::sync_layout`] sets the fields to match.
    ///
    /// Fails if the result does not fit in one cluster, or if a field cannot be represented.
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        self.check_encodable()?;
        let encoded = self.layout();
        if let Some(name) = &self.backing_file {
            let offset = encoded.backing_file_offset;
            let max = u64::from(limits::MAX_BACKING_FILE_NAME);
            if name.len() as u64 > max {
                return Err(HeaderError::BackingFileNameTooLong {
                    offset,
                    size: encoded.backing_file_size,
                    max,
                });
            }
        }
        let needed = encoded.bytes.len() as u64;
        if needed > self.cluster_size() {
            return Err(HeaderError::DoesNotFit {
                needed,
                cluster_size: self.cluster_size(),
            });
        }
        Ok(encoded.bytes)
    }

    /// Sets the backing file name and format (both stored as given, the name not resolved), and
    /// updates the layout fields (see [`Header::sync_layout`]). A name that is too long is reported
    /// by [`Header::encode`].
    pub fn set_backing(&mut self, file: Option<String>, format: Option<String>) {
        self.backing_file = file;
        self.backing_format = format;
        self.sync_layout();
    }

    /// Makes `header_length`, `extensions` (order, and the backing format entry),
    /// `backing_file_offset` and `backing_file_size` what [`Header::encode`] writes, so that parsing
    /// the encoded bytes gives back this header.
    pub fn sync_layout(&mut self) {
        let encoded = self.layout();
        self.header_length = encoded.header_length;
        self.extensions = encoded.extensions;
        self.backing_file_offset = encoded.backing_file_offset;
        self.backing_file_size = encoded.backing_file_size;
    }

    /// Refuses what cannot be written (or what QEMU would refuse to read back).
    fn check_encodable(&self) -> Result<(), HeaderError> {
        if !(2..=3).contains(&self.version) {
            return Err(HeaderError::UnsupportedVersion {
                version: self.version,
            });
        }
        if !(limits::MIN_CLUSTER_BITS..=limits::MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(HeaderError::ClusterBits {
                bits: self.cluster_bits,
            });
        }
        if self.version == 2 {
            self.check_version2_fields()?;
        }
        check_compression_type(self.compression_type.to_byte(), self.incompatible_features)?;
        if let Some(format) = &self.backing_format {
            parse_backing_format(format.as_bytes())?;
        }
        if let Some(name) = self.backing_file.as_ref().filter(|n| n.contains('\0')) {
            return Err(HeaderError::BackingFileName {
                offset: 0,
                size: u32::try_from(name.len()).unwrap_or(u32::MAX),
                reason: "it contains a NUL byte".to_string(),
            });
        }
        Ok(())
    }

    /// Version 2 headers end at byte 72: the v3 fields must have their implied values.
    fn check_version2_fields(&self) -> Result<(), HeaderError> {
        let v3_only = [
            ("incompatible_features", self.incompatible_features),
            ("compatible_features", self.compatible_features),
            ("autoclear_features", self.autoclear_features),
            ("compression_type", self.compression_type.to_byte().into()),
            (
                "unknown header bytes",
                self.unknown_header_bytes.len() as u64,
            ),
        ];
        if let Some((field, value)) = v3_only.into_iter().find(|&(_, value)| value != 0) {
            return Err(HeaderError::NotInVersion2 { field, value });
        }
        if self.refcount_order != 4 {
            return Err(HeaderError::NotInVersion2 {
                field: "refcount_order",
                value: self.refcount_order.into(),
            });
        }
        Ok(())
    }

    /// The extensions in the order `encode` writes them, the backing format one from
    /// `backing_format`.
    fn ordered_extensions(&self) -> Vec<HeaderExtension> {
        let backing_format = self.backing_format.iter().map(|format| HeaderExtension {
            magic: ext::BACKING_FORMAT,
            data: format.as_bytes().to_vec(),
        });
        let mut others: Vec<HeaderExtension> = self
            .extensions
            .iter()
            .filter(|e| e.magic != ext::BACKING_FORMAT && e.magic != ext::END)
            .cloned()
            .collect();
        // A stable sort keeps the file order within a rank.
        others.sort_by_key(|e| extension_rank(e.magic));
        backing_format.chain(others).collect()
    }

    fn layout(&self) -> Encoded {
        let header_length = if self.version == 2 {
            limits::V2_HEADER_LENGTH
        } else {
            let unknown = u32::try_from(self.unknown_header_bytes.len()).unwrap_or(u32::MAX);
            limits::V3_HEADER_LENGTH.saturating_add(unknown)
        };
        let mut bytes = self.encode_fixed_fields(header_length);
        let extensions = self.ordered_extensions();
        for extension in &extensions {
            push_extension(&mut bytes, extension.magic, &extension.data);
        }
        push_extension(&mut bytes, ext::END, &[]);
        // An empty name means no backing file, to QEMU as to `parse`.
        let (backing_file_offset, backing_file_size) =
            match self.backing_file.as_deref().filter(|n| !n.is_empty()) {
                Some(name) => {
                    let location = (
                        bytes.len() as u64,
                        u32::try_from(name.len()).unwrap_or(u32::MAX),
                    );
                    bytes.extend_from_slice(name.as_bytes());
                    location
                }
                None => (0, 0),
            };
        HeaderField::BackingFileOffset.put(&mut bytes, backing_file_offset);
        HeaderField::BackingFileSize.put(&mut bytes, backing_file_size.into());
        Encoded {
            bytes,
            header_length,
            extensions,
            backing_file_offset,
            backing_file_size,
        }
    }

    /// The fixed fields (backing file offset and size left zero) and the unknown header bytes.
    fn encode_fixed_fields(&self, header_length: u32) -> Vec<u8> {
        use HeaderField as F;
        let v3 = self.version >= 3;
        let fixed_len = if v3 {
            limits::V3_HEADER_LENGTH
        } else {
            limits::V2_HEADER_LENGTH
        };
        let mut out = vec![0u8; fixed_len as usize];
        let mut fields = vec![
            (F::Magic, u64::from(QCOW_MAGIC)),
            (F::Version, self.version.into()),
            (F::ClusterBits, self.cluster_bits.into()),
            (F::Size, self.size),
            (F::CryptMethod, self.crypt_method.into()),
            (F::L1Size, self.l1_size.into()),
            (F::L1TableOffset, self.l1_table_offset),
            (F::RefcountTableOffset, self.refcount_table_offset),
            (
                F::RefcountTableClusters,
                self.refcount_table_clusters.into(),
            ),
            (F::NbSnapshots, self.nb_snapshots.into()),
            (F::SnapshotsOffset, self.snapshots_offset),
        ];
        if v3 {
            fields.extend([
                (F::IncompatibleFeatures, self.incompatible_features),
                (F::CompatibleFeatures, self.compatible_features),
                (F::AutoclearFeatures, self.autoclear_features),
                (F::RefcountOrder, self.refcount_order.into()),
                (F::HeaderLength, header_length.into()),
                (F::CompressionType, self.compression_type.to_byte().into()),
            ]);
        }
        for (field, value) in fields {
            field.put(&mut out, value);
        }
        if v3 {
            out.extend_from_slice(&self.unknown_header_bytes);
        }
        out
    }
}
