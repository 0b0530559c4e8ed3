//! The error types, as the rest of the crate names them: the engine's own (`crate::qcow2::error`).

pub use crate::qcow2::error::{ChainError, Error, MetadataError, Result};
