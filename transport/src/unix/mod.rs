//! Unix-socket listener and connector (DESIGN.md §2 `transport/unix/`).
//!
//! The socket is created mode 0600 inside a directory of mode 0700 (created if missing, which
//! must be owned by us); a stale socket left by a dead process is replaced, a live one is not,
//! and anything that is not a socket is never deleted. Each accepted peer's credentials
//! (`SO_PEERCRED`) are checked against an allow-list of uids.

use crate::error::{Error, Result};
use std::fmt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio::net::{UnixListener, UnixStream};

/// A user id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uid(pub u32);

impl Uid {
    /// The effective uid of this process.
    pub fn current() -> Uid {
        // SAFETY: geteuid has no preconditions and cannot fail.
        Uid(unsafe { libc::geteuid() })
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {}", self.0)
    }
}

/// Credentials of an accepted peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// The peer's uid.
    pub uid: Uid,
    /// The peer's gid.
    pub gid: u32,
    /// The peer's pid, when the kernel reports it.
    pub pid: Option<i32>,
}

/// A listening unix socket that only hands out connections from allowed uids.
#[derive(Debug)]
pub struct UnixServer {
    listener: UnixListener,
    path: PathBuf,
    ino: u64,
    allow: Vec<Uid>,
}

fn prepare_dir(dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(md) => {
            if !md.is_dir() {
                return Err(Error::UnsafePath {
                    path: dir.into(),
                    reason: "not a directory".into(),
                });
            }
            if md.uid() != Uid::current().0 {
                return Err(Error::UnsafePath {
                    path: dir.into(),
                    reason: format!(
                        "owned by uid {}, not by us; use a directory we own",
                        md.uid()
                    ),
                });
            }
            if md.mode() & 0o777 != 0o700 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| Error::io(format!("chmod 0700 {}", dir.display()), e))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e)),
        Err(e) => Err(Error::io(format!("inspecting {}", dir.display()), e)),
    }
}

async fn remove_stale(path: &Path) -> Result<()> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("inspecting {}", path.display()), e)),
    };
    if !md.file_type().is_socket() {
        return Err(Error::UnsafePath {
            path: path.into(),
            reason: "exists and is not a socket; remove it by hand if it is not needed".into(),
        });
    }
    match UnixStream::connect(path).await {
        Ok(_) => Err(Error::AddressInUse(path.into())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing stale socket");
            std::fs::remove_file(path)
                .map_err(|e| Error::io(format!("removing stale socket {}", path.display()), e))
        }
        Err(e) => Err(Error::io(
            format!("probing existing socket {}", path.display()),
            e,
        )),
    }
}

impl UnixServer {
    /// Listen on `path`, accepting only peers whose uid is in `allow_uids`.
    pub async fn bind(path: impl AsRef<Path>, allow_uids: &[Uid]) -> Result<UnixServer> {
        let path = path.as_ref().to_path_buf();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        prepare_dir(&dir)?;
        remove_stale(&path).await?;
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::io(format!("binding {}", path.display()), e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("chmod 0600 {}", path.display()), e))?;
        let ino = std::fs::symlink_metadata(&path)
            .map_err(|e| Error::io(format!("inspecting {}", path.display()), e))?
            .ino();
        tracing::info!(path = %path.display(), allow = ?allow_uids, "listening");
        Ok(UnixServer {
            listener,
            path,
            ino,
            allow: allow_uids.to_vec(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept the next connection from an allowed peer. Peers whose uid is not allowed are
    /// closed at once and logged; this keeps waiting for an allowed one.
    pub async fn accept(&self) -> Result<(UnixStream, PeerCred)> {
        loop {
            let (stream, _) = self
                .listener
                .accept()
                .await
                .map_err(|e| Error::io(format!("accepting on {}", self.path.display()), e))?;
            let cred = match stream.peer_cred() {
                Ok(c) => PeerCred {
                    uid: Uid(c.uid()),
                    gid: c.gid(),
                    pid: c.pid(),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read peer credentials; refusing peer");
                    continue;
                }
            };
            if self.allow.contains(&cred.uid) {
                tracing::debug!(uid = cred.uid.0, pid = ?cred.pid, "accepted peer");
                return Ok((stream, cred));
            }
            tracing::warn!(
                uid = cred.uid.0,
                pid = ?cred.pid,
                path = %self.path.display(),
                "refusing peer: uid not in the allow-list"
            );
        }
    }
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        // Remove the socket only if it is still ours (not replaced by a newer server).
        if let Ok(md) = std::fs::symlink_metadata(&self.path) {
            if md.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Connect to a unix socket.
pub async fn connect(path: impl AsRef<Path>) -> Result<UnixStream> {
    let path = path.as_ref();
    UnixStream::connect(path)
        .await
        .map_err(|e| Error::io(format!("connecting to {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn socket_is_0600_in_a_0700_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run/ddstor/agent.sock");
        let srv = UnixServer::bind(&path, &[Uid::current()]).await.unwrap();
        let md = std::fs::metadata(&path).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.mode() & 0o777, 0o600);
        let dmd = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(dmd.mode() & 0o777, 0o700);
        drop(srv);
        assert!(!path.exists(), "socket removed on drop");
    }

    #[tokio::test]
    async fn allowed_peer_is_accepted_with_its_credentials() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s/a.sock");
        let srv = UnixServer::bind(&path, &[Uid::current()]).await.unwrap();
        let mut c = connect(&path).await.unwrap();
        let (mut s, cred) = srv.accept().await.unwrap();
        assert_eq!(cred.uid, Uid::current());
        assert_eq!(cred.pid, Some(std::process::id() as i32));
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn peer_with_a_uid_not_allowed_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s/a.sock");
        let other = Uid(Uid::current().0.wrapping_add(4242));
        let srv = UnixServer::bind(&path, &[other]).await.unwrap();
        let mut c = connect(&path).await.unwrap();
        let accepted =
            tokio::time::timeout(std::time::Duration::from_millis(300), srv.accept()).await;
        assert!(accepted.is_err(), "a refused peer must not be handed out");
        let mut buf = [0; 1];
        let n = c.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "the refused peer sees its connection closed");
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_but_live_one_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("d/a.sock");
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        // A stale socket: bound by a std listener that is then dropped (file remains).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = UnixServer::bind(&path, &[Uid::current()]).await.unwrap();
        let err = UnixServer::bind(&path, &[Uid::current()])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::AddressInUse(_)), "{err}");
        drop(live);
    }

    #[tokio::test]
    async fn regular_file_at_the_socket_path_is_never_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.sock");
        std::fs::write(&path, b"precious").unwrap();
        let err = UnixServer::bind(&path, &[Uid::current()])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::UnsafePath { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}
