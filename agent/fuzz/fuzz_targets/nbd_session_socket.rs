//! A whole NBD client session from fuzz bytes, like `nbd_session`, but over a unix socket pair
//! against exports backed by a real file, so reads take the zero-copy path (the reply assembled
//! in a pipe from the file's pages and spliced into the socket) as well as the copying one. The
//! server must never panic and must end the connection once the client's bytes run out.
#![no_main]
#[path = "session_common.rs"]
mod session_common;
use ddstor::datapath::{ExportOptions, Exports, RawFileBackend};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// A 1 MiB file of patterned bytes, made once per process (writes of the session may change
/// its content, never its size).
fn image() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("ddstor-fuzz-nbd-{}.raw", std::process::id()));
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, data).expect("fuzz image");
        p
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let exports = Exports::new();
        let rw = RawFileBackend::open(image(), false).expect("open image");
        let ro = RawFileBackend::open(image(), true).expect("open image");
        exports
            .add("", Arc::new(rw), ExportOptions::default())
            .expect("export");
        exports
            .add(
                "ro",
                Arc::new(ro),
                ExportOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .expect("export");
        let (client, server) = tokio::net::UnixStream::pair().expect("socketpair");
        let (sr, sw) = server.into_split();
        let (cr, cw) = client.into_split();
        session_common::play(sr, sw, cr, cw, exports, data).await;
    });
});
