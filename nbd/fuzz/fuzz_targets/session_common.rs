//! What the session fuzz targets share: one client session played from fuzz bytes against a
//! server connection.

use nbd::{serve_connection, Exports, NbdSink, ServerOptions};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Serves `exports` on (`sr`, `sw`) while the client end (`cr`, `cw`) sends `data`, closes,
/// and reads every reply; the server must end the connection after the client's EOF (no hang,
/// no panic).
pub async fn play<R, W, CR, CW>(sr: R, sw: W, mut cr: CR, mut cw: CW, exports: Exports, data: &[u8])
where
    R: AsyncRead + Unpin + Send + 'static,
    W: NbdSink,
    CR: AsyncRead + Unpin + Send + 'static,
    CW: AsyncWrite + Unpin,
{
    let srv =
        tokio::spawn(
            async move { serve_connection(sr, sw, exports, &ServerOptions::default()).await },
        );
    let drain = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut cr, &mut tokio::io::sink()).await;
    });
    let _ = cw.write_all(data).await;
    let _ = cw.shutdown().await;
    drop(cw);
    let res = tokio::time::timeout(Duration::from_secs(20), srv)
        .await
        .expect("the server did not end the connection after the client's EOF");
    let _ = res.expect("the connection task panicked");
    let _ = drain.await;
}
