//! Seeing a vchan peer's *domain* die.
//!
//! A process at the other end of a vchan that dies is seen by the ring itself (the kernel's
//! unmap notification clears its live byte and signals). A destroyed or crashed *domain* is
//! not: its kernel never runs again, Xen closes its event channel without an event and its live
//! byte keeps its last value, so a reader would wait for ever. [`DomainWatch`] watches
//! xenstore's `@releaseDomain` (fired by xenstored whenever a domain goes away) and, once the
//! peer's `/local/domain/<id>/domid` is gone (the toolstack removes the domain's tree when it
//! destroys it), tells the stream through [`PeerGone::signal`]: readers then see end-of-file
//! and writers a broken pipe, so calls fail at once instead of at their timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::task::JoinHandle;
use transport::vchan::PeerGone;
use xs_registry::client::Xs;

/// Watches one peer domain for as long as it lives; aborts its task when dropped.
#[derive(Debug)]
pub struct DomainWatch {
    domid: u16,
    gone: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// The key whose absence says the domain is gone.
fn domid_key(domid: u16) -> String {
    format!("/local/domain/{domid}/domid")
}

impl DomainWatch {
    /// Registers a watch on `@releaseDomain` on `xs`'s connection and starts a task that,
    /// on every release (and once at the start, from xenstored's initial watch event), checks
    /// whether domain `domid` still has its tree; when it does not, it calls `on_gone.signal()`
    /// and ends. Fails when the watch cannot be registered (the caller then has no prompt
    /// detection and should say so).
    pub async fn start(
        xs: &Xs,
        domid: u16,
        on_gone: PeerGone,
    ) -> Result<DomainWatch, xs_registry::Error> {
        use futures::StreamExt;
        let mut events = xs.watch("@releaseDomain").await?;
        let gone = Arc::new(AtomicBool::new(false));
        let (xs, flag) = (xs.clone(), gone.clone());
        let task = tokio::spawn(async move {
            let key = domid_key(domid);
            while events.next().await.is_some() {
                match xs.read_opt(&key).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => {
                        tracing::info!(
                            domid,
                            "peer domain is gone (@releaseDomain fired and {key} was removed)"
                        );
                        flag.store(true, Ordering::SeqCst);
                        on_gone.signal();
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(domid, error = %e, "cannot read {key} after @releaseDomain");
                    }
                }
            }
            tracing::warn!(
                domid,
                "the @releaseDomain watch ended (xenstore connection lost): this peer's death \
                 will not be seen promptly"
            );
        });
        tracing::debug!(domid, "watching the peer domain through @releaseDomain");
        Ok(DomainWatch { domid, gone, task })
    }

    /// The watched domain.
    pub fn domid(&self) -> u16 {
        self.domid
    }

    /// Whether the domain was seen gone.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }
}

impl Drop for DomainWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use transport::vchan::mem::MemXen;
    use transport::vchan::{Backend, DomId, MemRendezvous, VchanClient, VchanServer};
    use xs_registry::server::{Server as XsServer, ServerOptions};

    async fn xenstored(doms: &[u16]) -> (tempfile::TempDir, XsServer, Xs) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("xs.sock");
        let srv = XsServer::start(
            &sock,
            ServerOptions {
                domains: doms.iter().map(|&d| xs_registry::DomId(d)).collect(),
                ..Default::default()
            },
        )
        .unwrap();
        let xs = Xs::connect(&sock).await.unwrap();
        (dir, srv, xs)
    }

    async fn vchan_pair() -> (transport::vchan::VchanStream, transport::vchan::VchanStream) {
        let xen: Arc<dyn Backend> = Arc::new(MemXen::new());
        let rz = Arc::new(MemRendezvous::new());
        let srv = VchanServer::new(xen.clone(), rz.clone(), DomId(0), DomId(5), "p", 1, 1).unwrap();
        let (s, c) = tokio::join!(srv.accept(), async {
            loop {
                match VchanClient::connect(&*xen, &*rz, DomId(0), DomId(5), "p").await {
                    Ok(c) => break c,
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        });
        (s.unwrap(), c)
    }

    #[tokio::test]
    async fn a_released_domain_ends_the_stream_of_its_peer() {
        let (_dir, _srv, xs) = xenstored(&[5]).await;
        let (mut s, c) = vchan_pair().await;
        let watch = DomainWatch::start(&xs, 5, s.peer_gone_handle())
            .await
            .unwrap();
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 8];
            let n = s.read(&mut b).await.unwrap();
            (s, n)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!reader.is_finished(), "the domain is alive: the read waits");
        assert!(!watch.is_gone());
        xs.release_domain(xs_registry::DomId(5)).await.unwrap();
        let (mut s, n) = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the release ends the read")
            .unwrap();
        assert_eq!(n, 0, "end-of-file once the peer's domain is released");
        assert!(watch.is_gone());
        assert!(s.write_all(b"x").await.is_err(), "writes fail too");
        drop(c);
    }

    #[tokio::test]
    async fn another_domain_going_does_not_end_the_stream() {
        let (_dir, _srv, xs) = xenstored(&[5, 6]).await;
        let (mut s, mut c) = vchan_pair().await;
        let watch = DomainWatch::start(&xs, 5, s.peer_gone_handle())
            .await
            .unwrap();
        xs.release_domain(xs_registry::DomId(6)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!watch.is_gone(), "domain 5 still lives");
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&b, b"ping", "the stream still carries data");
    }

    #[tokio::test]
    async fn a_domain_already_gone_is_seen_at_the_start() {
        let (_dir, _srv, xs) = xenstored(&[]).await;
        let (mut s, _c) = vchan_pair().await;
        let _watch = DomainWatch::start(&xs, 9, s.peer_gone_handle())
            .await
            .unwrap();
        let mut b = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("xenstored's initial watch event triggers the check")
            .unwrap();
        assert_eq!(n, 0);
    }
}
