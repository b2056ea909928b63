//! A hostile peer scribbling on the shared ring page between our reads and writes: the ring
//! must never panic or touch memory outside its mappings (AddressSanitizer watches), only
//! report `HostilePeer`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::atomic::Ordering;
use transport::vchan::mem::MemXen;
use transport::vchan::ring::Ring;
use transport::vchan::{Backend, DomId};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let orders = [(10u8, 11u8), (11, 10), (12, 12), (11, 13), (13, 11)][data[0] as usize % 5];
    let xen = MemXen::new();
    let sev = xen.bind_unbound(DomId(1)).unwrap();
    let (mut srv, gref) = Ring::server_init(&xen, DomId(1), sev.clone(), orders.0, orders.1).unwrap();
    let cev = xen.bind_interdomain(DomId(0), sev.local_port()).unwrap();
    let Ok(mut cli) = Ring::client_init(&xen, DomId(0), gref, cev) else { return };
    let mut buf = vec![0u8; 9000];
    for op in data[1..].chunks(6) {
        let arg = u32::from_le_bytes([op.get(1).copied().unwrap_or(0), op.get(2).copied().unwrap_or(0), op.get(3).copied().unwrap_or(0), op.get(4).copied().unwrap_or(0)]);
        let len = (arg as usize) % buf.len();
        let r = match op[0] % 6 {
            0 => srv.recv(&mut buf[..len]).map(|_| ()),
            1 => srv.send(&buf[..len]).map(|_| ()),
            2 => cli.send(&buf[..len]).map(|_| ()),
            3 => cli.recv(&mut buf[..len]).map(|_| ()),
            4 => srv.peer_live().map(|_| ()),
            _ => {
                // The peer writes any header byte (offsets 0..32, including grants).
                let off = (arg as usize >> 8) % 32;
                srv.page().u8_at(off).store(arg as u8, Ordering::SeqCst);
                Ok(())
            }
        };
        if r.is_err() {
            return;
        }
    }
});
