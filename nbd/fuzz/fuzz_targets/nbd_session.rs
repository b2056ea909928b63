//! A whole NBD client session from fuzz bytes: the client's handshake flags, options
//! (GO/INFO/LIST/ABORT/EXPORT_NAME, structured replies, meta contexts, extended headers) and
//! transmission requests, against a writable and a read-only in-memory export. The server must
//! never panic, and must end the connection once the client's bytes run out (no hang), while
//! the test reads every reply it sends.
#![no_main]
#[path = "session_common.rs"]
mod session_common;
use libfuzzer_sys::fuzz_target;
use nbd::{ExportOptions, Exports, MemBackend};
use std::sync::{Arc, OnceLock};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let exports = Exports::new();
        exports
            .add(
                "",
                Arc::new(MemBackend::new(1 << 20, false)),
                ExportOptions::default(),
            )
            .expect("export");
        exports
            .add(
                "ro",
                Arc::new(MemBackend::new(64 << 10, true)),
                ExportOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .expect("export");
        let (client, server) = tokio::io::duplex(64 << 10);
        let (sr, sw) = tokio::io::split(server);
        let (cr, cw) = tokio::io::split(client);
        session_common::play(sr, sw, cr, cw, exports, data).await;
    });
});
