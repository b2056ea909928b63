//! The `ddstor` command line: one module per command family. Each exposes a clap `Args` type
//! and a `run` function; `main.rs` only dispatches.

pub mod call;
pub mod gc;
pub mod nbd;
pub mod serve;
pub mod sr;
pub mod vdi;
pub mod vhd;
pub mod vhd_coalesce;
pub mod xs;
