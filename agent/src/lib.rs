//! ddstor, the storage agent of a Xen driver domain.
//!
//! The library half of the `ddstor` binary: the command-line front end lives in [`cli`], and
//! later the daemon's core (SRs, VDIs, datapath state), differencing and datapath modules.

pub mod cli;
pub mod client;
pub mod config;
pub mod core;
pub mod datapath;
pub mod differencing;
pub mod failpoint;
pub mod peer_domain;
pub mod server;
