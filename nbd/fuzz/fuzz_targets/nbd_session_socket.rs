//! A whole NBD client session from fuzz bytes, like `nbd_session`, but over a unix socket pair
//! against exports backed by a real file, so reads take the zero-copy path (the reply assembled
//! in a pipe from the file's pages and spliced into the socket) as well as the copying one. The
//! server must never panic and must end the connection once the client's bytes run out.
//! (The file backend is this target's own: the agent's raw-file backend lives in the agent.)
#![no_main]
#[path = "session_common.rs"]
mod session_common;
use libfuzzer_sys::fuzz_target;
use nbd::backend::{BlockBackend, Extent, ExtentState};
use nbd::splice::Piece;
use nbd::{Error, ExportOptions, Exports};
use std::fs::File;
use std::os::unix::fs::FileExt;
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

/// A file served byte for byte (positional I/O; the file itself is the read plan).
struct FileBackend {
    file: File,
    size: u64,
    read_only: bool,
}

impl FileBackend {
    fn open(path: &std::path::Path, read_only: bool) -> FileBackend {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .expect("open image");
        let size = file.metadata().expect("image size").len();
        FileBackend {
            file,
            size,
            read_only,
        }
    }

    fn writable(&self) -> Result<(), Error> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        Ok(self.file.read_exact_at(buf, offset)?)
    }
    fn read_plan(&self, offset: u64, len: u64) -> Result<Option<Vec<Piece<'_>>>, Error> {
        Ok(Some(vec![Piece::File {
            file: &self.file,
            offset,
            len,
        }]))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        self.writable()?;
        Ok(self.file.write_all_at(buf, offset)?)
    }
    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64) -> Result<(), Error> {
        self.writable()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.writable()?;
        nbd::backend::write_zeroes_by_writing(self, offset, len)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        Ok(vec![Extent {
            offset,
            length: len,
            state: ExtentState::Data,
        }])
    }
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let exports = Exports::new();
        let rw = FileBackend::open(image(), false);
        let ro = FileBackend::open(image(), true);
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
