//! The format driver of a layer: what one file of the chain says about a guest range through
//! its own table alone, and how to read what it stores. qcow2 and raw files are the two
//! drivers; the chain walker in [`crate::view`] is the one loop that goes from layer to layer
//! (as imago's drivers return a mapping and one generic loop does the I/O).

use std::sync::Arc;

use parking_lot::RwLockReadGuard;

use crate::chain::RawImage;
use crate::error::{Error, Result};
use crate::qcow2::l1::L1Table;
use crate::qcow2::l2::CompressedCluster;
use crate::qcow2::storage::Allocation;
use crate::qcow2::{HostOffset, Mapping, Qcow2Image};

/// Bytes a layer stores for a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Uncompressed qcow2 data at `host` (contiguous for the run).
    Data { host: HostOffset },
    /// `skip` bytes into a compressed qcow2 cluster.
    Compressed {
        cluster: CompressedCluster,
        skip: u64,
    },
    /// The same offset of a raw file.
    Raw,
}

/// What a layer says of the run of a guest range that starts where it was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerMap {
    /// The layer stores the bytes: [`FormatDriver::read_run`] reads them.
    Stored(Stored),
    /// The layer says they read as zeros (a zero cluster; a hole of a raw file).
    Zero,
    /// The layer does not hold them: the layer below shows through.
    Below,
}

/// How precisely a raw file's runs are told: reads take every byte of it as data (one pread,
/// no `lseek`); the data/hole map asks its file system where the holes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Read,
    Holes,
}

/// One layer's format.
pub trait FormatDriver {
    /// The layer's virtual size: past it the layer reads as zeros.
    fn size(&self) -> u64;

    /// The table the layer's active state maps through (`None`: a raw file has none).
    fn active_table(&self) -> Option<Arc<L1Table>>;

    /// Held while reading the layer's active state, so that no cluster it maps is freed and
    /// reused meanwhile (see [`Qcow2Image::read_guard`]).
    fn read_guard(&self) -> Option<RwLockReadGuard<'_, ()>>;

    /// The run at `offset` (at most `max_len` bytes, at least 1) through `table`, and its
    /// length.
    fn map(
        &self,
        table: Option<&L1Table>,
        offset: u64,
        max_len: u64,
        precision: Precision,
    ) -> Result<(LayerMap, u64)>;

    /// Reads the bytes of a run that [`FormatDriver::map`] said `stored` at guest `offset`.
    fn read_run(&self, stored: Stored, buf: &mut [u8], offset: u64) -> Result<()>;
}

impl FormatDriver for Qcow2Image {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn active_table(&self) -> Option<Arc<L1Table>> {
        Some(self.active_l1())
    }

    fn read_guard(&self) -> Option<RwLockReadGuard<'_, ()>> {
        Qcow2Image::read_guard(self)
    }

    fn map(
        &self,
        table: Option<&L1Table>,
        offset: u64,
        max_len: u64,
        _precision: Precision,
    ) -> Result<(LayerMap, u64)> {
        let active;
        let table = match table {
            Some(t) => t,
            None => {
                active = self.active_l1();
                &active
            }
        };
        let mapping = Qcow2Image::map(self, table, offset, max_len)?;
        let map = match mapping {
            Mapping::Data { host, .. } => LayerMap::Stored(Stored::Data { host }),
            Mapping::Compressed { cluster, skip, .. } => {
                LayerMap::Stored(Stored::Compressed { cluster, skip })
            }
            Mapping::Zero { .. } => LayerMap::Zero,
            Mapping::Unallocated { .. } => LayerMap::Below,
        };
        Ok((map, mapping.len()))
    }

    fn read_run(&self, stored: Stored, buf: &mut [u8], offset: u64) -> Result<()> {
        match stored {
            Stored::Data { host } => self.read_data(host, buf),
            Stored::Compressed { cluster, skip } => self.read_compressed(cluster, skip, buf),
            Stored::Raw => Err(Error::io(
                format!("{}: read at {offset:#x}", self.path().display()),
                std::io::Error::other("a qcow2 image holds no raw runs"),
            )),
        }
    }
}

impl FormatDriver for RawImage {
    fn size(&self) -> u64 {
        RawImage::size(self)
    }

    fn active_table(&self) -> Option<Arc<L1Table>> {
        None
    }

    fn read_guard(&self) -> Option<RwLockReadGuard<'_, ()>> {
        None
    }

    fn map(
        &self,
        _table: Option<&L1Table>,
        offset: u64,
        max_len: u64,
        precision: Precision,
    ) -> Result<(LayerMap, u64)> {
        if precision == Precision::Read {
            return Ok((LayerMap::Stored(Stored::Raw), max_len));
        }
        match self.storage().allocation(offset, max_len) {
            Ok((Allocation::Data, len)) => Ok((LayerMap::Stored(Stored::Raw), len)),
            Ok((Allocation::Hole, len)) => Ok((LayerMap::Zero, len)),
            Err(e) => Err(Error::io(format!("{}: lseek", self.path.display()), e)),
        }
    }

    fn read_run(&self, _stored: Stored, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read(buf, offset)
    }
}
