//! Bad wire input closes only the offending connection; the server keeps serving others.
//! Also transaction isolation as a client sees it.

use ddstor_xs_registry::client::{is_eagain, Xs};
use ddstor_xs_registry::server::{Server, ServerOptions};
use ddstor_xs_registry::wire::{encode_msg, Header, MsgType, HEADER_LEN};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

async fn closed_by_server(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // a reply to an earlier good request
            Err(_) => return false,
        }
    }
}

async fn still_serving(server: &Server) {
    let xs = Xs::connect(server.socket_path()).await.unwrap();
    assert_eq!(xs.read("/local/domain/0/domid").await.unwrap(), "0");
}

async fn hostile(server: &Server, bytes: &[u8]) {
    let mut s = UnixStream::connect(server.socket_path()).await.unwrap();
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    assert!(
        closed_by_server(&mut s).await,
        "server kept a connection after {:?}",
        &bytes[..bytes.len().min(32)]
    );
    still_serving(server).await;
}

fn header(ty: u32, len: u32) -> Vec<u8> {
    Header {
        ty,
        req_id: 1,
        tx_id: 0,
        len,
    }
    .encode()
    .to_vec()
}

#[tokio::test]
async fn oversized_payload_closes_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path().join("xs"), ServerOptions::default()).unwrap();
    let mut m = header(MsgType::Write as u32, 4097);
    m.extend_from_slice(&[b'a'; 4097]);
    hostile(&server, &m).await;
    hostile(&server, &header(MsgType::Read as u32, u32::MAX)).await;
}

#[tokio::test]
async fn unknown_type_closes_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path().join("xs"), ServerOptions::default()).unwrap();
    let mut m = header(20, 3);
    m.extend_from_slice(b"/a\0");
    hostile(&server, &m).await;
    let mut m = header(0xffff, 0);
    m.extend_from_slice(b"");
    hostile(&server, &m).await;
}

#[tokio::test]
async fn unterminated_string_and_short_payload_close_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path().join("xs"), ServerOptions::default()).unwrap();
    hostile(&server, &encode_msg(MsgType::Read, 1, 0, b"/local")).await;
    hostile(&server, &encode_msg(MsgType::Write, 1, 0, b"/local-no-nul")).await;
    // Header promises 100 bytes, 10 arrive, then EOF.
    let mut m = header(MsgType::Read as u32, 100);
    m.extend_from_slice(b"/local/dom");
    hostile(&server, &m).await;
    // Half a header.
    hostile(&server, &header(MsgType::Read as u32, 3)[..HEADER_LEN / 2]).await;
}

#[tokio::test]
async fn good_connection_survives_a_neighbours_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path().join("xs"), ServerOptions::default()).unwrap();
    let good = Xs::connect(server.socket_path()).await.unwrap();
    good.write("/k", "1").await.unwrap();
    hostile(&server, &header(99, 0)).await;
    assert_eq!(good.read("/k").await.unwrap(), "1");
}

#[tokio::test]
async fn conflicting_transaction_commit_answers_eagain() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path().join("xs"), ServerOptions::default()).unwrap();
    let a = Xs::connect(server.socket_path()).await.unwrap();
    let b = Xs::connect(server.socket_path()).await.unwrap();
    a.write("/counter", "0").await.unwrap();
    let t = a.transaction().await.unwrap();
    assert_eq!(t.read("/counter").await.unwrap(), b"0");
    t.write("/counter", b"1").await.unwrap();
    assert_eq!(
        b.read("/counter").await.unwrap(),
        "0",
        "not visible before commit"
    );
    b.write("/counter", "5").await.unwrap();
    let e = t.commit().await.unwrap_err();
    assert!(is_eagain(&e), "{e}");
    assert_eq!(b.read("/counter").await.unwrap(), "5");
    let t = a.transaction().await.unwrap();
    let v: u32 = String::from_utf8(t.read("/counter").await.unwrap())
        .unwrap()
        .parse()
        .unwrap();
    t.write("/counter", (v + 1).to_string().as_bytes())
        .await
        .unwrap();
    t.commit().await.unwrap();
    assert_eq!(b.read("/counter").await.unwrap(), "6");
}
