//! The datapath: attached VDIs served over NBD by the [`nbd`] crate.
//!
//! - [`chain`]: the [`nbd::BlockBackend`] of a VHD chain; [`raw`]: of a raw image file.
//! - [`manager`]: per-datapath state of every VDI (xapi's `vdi_automaton`), persisted, driving
//!   the exports; the engine's [`crate::core::datapath::DatapathHooks`].

pub mod chain;
pub mod manager;
pub mod raw;

pub use chain::ChainBackend;
pub use manager::Datapaths;
pub use raw::RawFileBackend;
