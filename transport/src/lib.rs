//! Transport: length-prefixed bincode frames over any byte stream, unix sockets with peer
//! credential checks, and a libxenvchan-compatible vchan ring (Xen and simulated backends).
//!
//! - [`frame`] — the codec (the only module that reads or writes frame bytes).
//! - [`rpc`] — hello exchange, [`rpc::serve_connection`] and the pipelined [`rpc::Client`].
//! - [`unix`] — [`unix::UnixServer`] (0600 socket, 0700 directory, `SO_PEERCRED` allow-list)
//!   and [`unix::connect`].

pub mod error;
pub mod frame;
pub mod rpc;
pub mod unix;
pub mod vchan;

pub use error::{Error, Result};
pub use frame::MAX_FRAME_DEFAULT;
pub use rpc::{Client, Hello, PROTOCOL_VERSION};
