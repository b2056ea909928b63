//! Hostile NBD clients get the protocol's error (or a closed connection when the stream cannot
//! be resynchronised); the server and its other clients are unaffected.

use ddstor_e2e::nbd::{run_ok, NbdServe, RawClient};
use ddstor_e2e::require_tool;
use std::io::Write;
use std::process::Command;

const SIZE: u64 = 4 << 20;
const REP_ACK: u32 = 1;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

fn server() -> (tempfile::TempDir, NbdServe) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::write(&img, vec![0x5au8; SIZE as usize]).unwrap();
    let srv = NbdServe::start(&img, &["--format=raw"]);
    (dir, srv)
}

/// A well-behaved client still works and the server process is alive.
fn assert_healthy(srv: &mut NbdServe) {
    assert!(srv.alive(), "server died");
    run_ok(
        Command::new(require_tool("qemu-io", "qemu-utils"))
            .args(["-f", "raw", "-c", "read -P 0x5a 0 64k"])
            .arg(srv.uri()),
    );
}

#[test]
fn bad_option_magic_closes_only_that_connection() {
    let (_d, mut srv) = server();
    let mut c = RawClient::connect(&srv.socket);
    c.s.write_all(b"NOTANOPTxxxxxxxxxxxxxxxx").unwrap();
    assert!(c.is_closed());
    assert_healthy(&mut srv);
}

#[test]
fn unknown_malformed_and_oversized_options_get_errors_and_handshake_continues() {
    let (_d, mut srv) = server();
    let mut c = RawClient::connect(&srv.socket);
    c.send_opt(99, b"whatever");
    assert_eq!(c.read_opt_final().unwrap().1, REP_ERR_UNSUP);
    c.send_opt(7, &[0, 0, 0, 50, b'x']); // GO with a name length past the data
    assert_eq!(c.read_opt_final().unwrap().1, REP_ERR_INVALID);
    c.send_opt(3, b"junk"); // LIST takes no data
    assert_eq!(c.read_opt_final().unwrap().1, REP_ERR_INVALID);
    c.send_opt(1000, &vec![0u8; 1 << 20]);
    assert_eq!(c.read_opt_final().unwrap().1, REP_ERR_TOO_BIG);
    let mut go = 7u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"missing");
    go.extend_from_slice(&0u16.to_be_bytes());
    c.send_opt(7, &go);
    assert_eq!(c.read_opt_final().unwrap().1, REP_ERR_UNKNOWN);
    // SET_META_CONTEXT before structured replies is refused.
    c.send_opt(10, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(c.read_opt_final().unwrap().1, REP_ERR_INVALID);
    c.send_opt(3, &[]);
    let (_, kind, data) = c.read_opt_reply().unwrap();
    assert_eq!(
        (kind, data),
        (2, vec![0, 0, 0, 0]),
        "LIST names the empty export"
    );
    assert_eq!(c.read_opt_reply().unwrap().1, REP_ACK);
    c.go("");
    c.request(0, 0, 1, 0, 16, &[]);
    assert_eq!(c.simple_reply(16).unwrap(), (0, 1, vec![0x5a; 16]));
    assert_healthy(&mut srv);
}

#[test]
fn out_of_range_oversized_and_unknown_requests_get_errors_on_a_live_connection() {
    let (_d, mut srv) = server();
    let mut c = RawClient::connect(&srv.socket);
    c.go("");
    c.request(0, 0, 1, SIZE - 512, 1024, &[]); // read past the end
    assert_eq!(c.simple_reply(1024).unwrap(), (EINVAL, 1, vec![]));
    c.request(0, 0, 2, u64::MAX - 10, 512, &[]); // offset + length overflows
    assert_eq!(c.simple_reply(512).unwrap(), (EINVAL, 2, vec![]));
    c.request(0, 0, 3, 0, 64 << 20, &[]); // read over the maximum payload
    assert_eq!(c.simple_reply(0).unwrap(), (EOVERFLOW, 3, vec![]));
    c.request(0, 1, 4, SIZE, 512, &[1; 512]); // write past the end
    assert_eq!(c.simple_reply(0).unwrap(), (ENOSPC, 4, vec![]));
    c.request(0, 77, 5, 0, 512, &[]); // unknown command
    assert_eq!(c.simple_reply(0).unwrap(), (EINVAL, 5, vec![]));
    c.request(0, 7, 6, 0, 512, &[]); // block status without a negotiated context
    assert_eq!(c.simple_reply(0).unwrap(), (EINVAL, 6, vec![]));
    // A write over the maximum payload is swallowed and refused; the stream stays in sync.
    let big = vec![9u8; 40 << 20];
    c.request(0, 1, 7, 0, big.len() as u32, &big);
    assert_eq!(c.simple_reply(0).unwrap(), (EOVERFLOW, 7, vec![]));
    c.request(0, 0, 8, 0, 8, &[]);
    assert_eq!(c.simple_reply(8).unwrap(), (0, 8, vec![0x5a; 8]));
    assert_healthy(&mut srv);
}

#[test]
fn bad_request_magic_drops_the_connection_only() {
    let (_d, mut srv) = server();
    let mut c = RawClient::connect(&srv.socket);
    c.go("");
    c.s.write_all(&[0xffu8; 28]).unwrap();
    assert!(c.is_closed());
    assert_healthy(&mut srv);
}

#[test]
fn client_disconnecting_mid_request_leaves_the_disk_and_server_intact() {
    let (_d, mut srv) = server();
    let mut c = RawClient::connect(&srv.socket);
    c.go("");
    // Header of a 64 KiB write, then only part of its payload, then gone.
    c.request(0, 1, 1, 0, 64 << 10, &[0u8; 100]);
    drop(c);
    // And one that leaves in the middle of the handshake.
    let mut c = RawClient::connect(&srv.socket);
    c.s.write_all(b"IHAVEOPT\0\0").unwrap();
    drop(c);
    assert_healthy(&mut srv);
}

#[test]
fn client_that_never_reads_replies_stalls_only_itself() {
    let (_d, mut srv) = server();
    let mut c = RawClient::connect(&srv.socket);
    c.go("");
    c.s.set_nonblocking(true).unwrap();
    // Queue far more 1 MiB reads than the server will hold in flight; stop when the socket
    // pushes back.
    let mut sent = 0;
    for i in 0..4096u64 {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&i.to_be_bytes());
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(&(1u32 << 20).to_be_bytes());
        match c.s.write(&m) {
            Ok(n) if n == m.len() => sent += 1,
            _ => break,
        }
    }
    assert!(sent > 100, "only {sent} requests went out");
    assert_healthy(&mut srv);
    drop(c);
    assert_healthy(&mut srv);
}

#[test]
fn many_pipelined_requests_are_all_answered() {
    let (_d, mut srv) = server();
    let mut c = RawClient::connect(&srv.socket);
    c.go("");
    for i in 0..200u64 {
        c.request(0, 0, 1000 + i, (i * 4096) % SIZE, 4096, &[]);
    }
    let mut cookies: Vec<u64> = (0..200)
        .map(|_| {
            let (err, cookie, data) = c.simple_reply(4096).unwrap();
            assert_eq!(err, 0);
            assert!(data.iter().all(|&b| b == 0x5a));
            cookie
        })
        .collect();
    cookies.sort();
    assert_eq!(cookies, (1000..1200).collect::<Vec<_>>());
    c.request(0, 2, 0, 0, 0, &[]); // NBD_CMD_DISC
    assert!(c.is_closed());
    assert_healthy(&mut srv);
}
