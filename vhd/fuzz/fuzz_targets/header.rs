//! Dynamic header parsing: never panics; round-trips; locator decoding never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vhd::format::{checksum, decode_locator, Header, HEADER_SIZE, PLAT_MACX, PLAT_W2KU, PLAT_W2RU};

fuzz_target!(|data: &[u8]| {
    let mut b = data.to_vec();
    if b.len() >= HEADER_SIZE && data.first().is_some_and(|x| x & 1 == 1) {
        b[..8].copy_from_slice(b"cxsparse");
        let c = checksum(&b[..HEADER_SIZE], 36);
        b[36..40].copy_from_slice(&c.to_be_bytes());
    }
    if let Ok(h) = Header::parse(&b, "fuzz", 512) {
        let _ = h.bitmap_bytes();
        for l in &h.locators {
            let _ = l.space_bytes();
            let _ = l.code_name();
        }
        let again = Header::parse(&h.to_bytes(), "fuzz", 512).expect("re-serialised header parses");
        // Names are compared after the lossy UTF-16 decode, which is idempotent.
        assert_eq!(again.locators, h.locators);
        assert_eq!(again.block_size, h.block_size);
    }
    for code in [PLAT_MACX, PLAT_W2KU, PLAT_W2RU, 0] {
        let _ = decode_locator(code, data);
    }
});
