//! NBD request headers (compact and extended): parsing never panics and what parses
//! re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nbd::proto::{encode_request, parse_request, EXTENDED_REQUEST_LEN, REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    for (extended, len) in [(false, REQUEST_LEN), (true, EXTENDED_REQUEST_LEN)] {
        if data.len() < len {
            continue;
        }
        if let Ok(req) = parse_request(&data[..len], extended) {
            assert_eq!(encode_request(&req, extended), data[..len].to_vec());
            assert_eq!(
                parse_request(&encode_request(&req, extended), extended),
                Ok(req)
            );
        }
    }
});
