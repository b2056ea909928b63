//! Fuzzes the test xenstored's request path: bytes are cut into messages, each parsed with
//! `wire::parse_request` (as the server's reader does) and, when valid, executed against one
//! store by `server::apply_node_op` as dom0 or as an unprivileged domain. Nothing may panic.
#![no_main]

use ddstor_xs_registry::server::apply_node_op;
use ddstor_xs_registry::store::{Limits, Store};
use ddstor_xs_registry::wire::{parse_request, Header, HEADER_LEN};
use ddstor_xs_registry::DomId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut store = Store::new("Domain-0", Limits::default());
    let _ = store.introduce(DomId(5), "guest");
    let mut rest = data;
    let mut n = 0u64;
    while rest.len() >= HEADER_LEN + 1 && n < 64 {
        n += 1;
        // First byte picks the caller: dom0, domain 5 or an unknown domain 9.
        let dom = DomId([0u16, 5, 9][(rest[0] % 3) as usize]);
        rest = &rest[1..];
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&rest[..HEADER_LEN]);
        let h = Header::decode(&hb);
        let len = (h.len as usize).min(rest.len() - HEADER_LEN);
        let msg = &rest[..HEADER_LEN + len];
        rest = &rest[HEADER_LEN + len..];
        if let Ok(req) = parse_request(msg) {
            let mut events = Vec::new();
            let _ = apply_node_op(&mut store, u64::from(dom.0), dom, &req, &mut events);
        }
    }
});
