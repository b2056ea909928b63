//! [`XsRendezvous`]: the vchan rendezvous (DESIGN.md §4) over xenstore, as libxenvchan does
//! it: the server writes `/local/domain/<server>/data/vchan/<client>/<port>/ring-ref` and
//! `…/event-channel` (decimal) in one transaction, each with permissions `n<server>, r<client>`
//! (the server owns them, the client may read them, nobody else may).

use crate::client::{is_eagain, is_enoent, Xs};
use crate::store::{Perm, PERM_READ};
use futures::future::BoxFuture;
use transport::vchan::{rendezvous_path, DomId, EvtchnPort, GrantRef, Rendezvous};

/// A [`Rendezvous`] through a xenstore connection (the server's or the client's domain).
#[derive(Debug, Clone)]
pub struct XsRendezvous {
    xs: Xs,
}

impl XsRendezvous {
    /// A rendezvous over `xs`.
    pub fn new(xs: Xs) -> Self {
        XsRendezvous { xs }
    }
}

fn verr(what: String, e: crate::Error) -> transport::Error {
    transport::Error::Vchan(format!("{what}: {e}"))
}

async fn publish(
    xs: &Xs,
    server: DomId,
    client: DomId,
    port: &str,
    ring_ref: GrantRef,
    evtchn: EvtchnPort,
) -> transport::Result<()> {
    let base = rendezvous_path(server, client, port);
    let perms = [
        Perm {
            dom: crate::DomId(server.0),
            bits: 0,
        },
        Perm {
            dom: crate::DomId(client.0),
            bits: PERM_READ,
        },
    ];
    let what = || format!("publishing vchan rendezvous {base}");
    for _ in 0..100 {
        let t = xs.transaction().await.map_err(|e| verr(what(), e))?;
        let r = async {
            for (k, v) in [("ring-ref", ring_ref.0), ("event-channel", evtchn.0)] {
                let p = format!("{base}/{k}");
                t.write(&p, v.to_string().as_bytes()).await?;
                t.set_perms(&p, &perms).await?;
            }
            Ok::<_, crate::Error>(())
        }
        .await;
        if let Err(e) = r {
            let _ = t.abort().await;
            return Err(verr(what(), e));
        }
        match t.commit().await {
            Ok(()) => return Ok(()),
            Err(e) if is_eagain(&e) => continue,
            Err(e) => return Err(verr(what(), e)),
        }
    }
    Err(transport::Error::Vchan(format!(
        "{}: transaction kept conflicting",
        what()
    )))
}

async fn read(
    xs: &Xs,
    server: DomId,
    client: DomId,
    port: &str,
) -> transport::Result<(GrantRef, EvtchnPort)> {
    let base = rendezvous_path(server, client, port);
    let num = |k: &'static str| {
        let p = format!("{base}/{k}");
        async move {
            let v = xs
                .read(&p)
                .await
                .map_err(|e| verr(format!("reading {p}"), e))?;
            v.trim().parse::<u32>().map_err(|_| {
                transport::Error::Vchan(format!(
                    "{p} is {:?}, not a decimal number",
                    v.chars().take(32).collect::<String>()
                ))
            })
        }
    };
    Ok((
        GrantRef(num("ring-ref").await?),
        EvtchnPort(num("event-channel").await?),
    ))
}

async fn remove(xs: &Xs, server: DomId, client: DomId, port: &str) -> transport::Result<()> {
    let base = rendezvous_path(server, client, port);
    match xs.rm(&base).await {
        Ok(()) => Ok(()),
        Err(e) if is_enoent(&e) => Ok(()),
        Err(e) => Err(verr(format!("removing {base}"), e)),
    }
}

impl Rendezvous for XsRendezvous {
    fn publish<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
        ring_ref: GrantRef,
        evtchn: EvtchnPort,
    ) -> BoxFuture<'a, transport::Result<()>> {
        Box::pin(publish(&self.xs, server, client, port, ring_ref, evtchn))
    }

    fn read<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
    ) -> BoxFuture<'a, transport::Result<(GrantRef, EvtchnPort)>> {
        Box::pin(read(&self.xs, server, client, port))
    }

    fn remove<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
    ) -> BoxFuture<'a, transport::Result<()>> {
        Box::pin(remove(&self.xs, server, client, port))
    }
}
