//! Footer parsing: never panics; a parsed footer re-serialises to bytes that parse to the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vhd::format::{checksum, Footer, FOOTER_SIZE};

fuzz_target!(|data: &[u8]| {
    let mut b = data.to_vec();
    // Odd first byte of input: fix the checksum so field validation is explored too.
    if b.len() >= FOOTER_SIZE && data.first().is_some_and(|x| x & 1 == 1) {
        b[..8].copy_from_slice(b"conectix");
        let c = checksum(&b[..FOOTER_SIZE], 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
    }
    if let Ok(f) = Footer::parse(&b, "fuzz", 0) {
        let again = Footer::parse(&f.to_bytes(), "fuzz", 0).expect("re-serialised footer parses");
        assert_eq!(again, f);
    }
});
