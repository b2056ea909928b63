//! Arbitrary bytes through the frame splitter and decoder: never a panic, never an
//! allocation beyond the limit; whatever decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use transport::frame::{decode, encode, split_frame, Frame};
use transport::Hello;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Body {
    Unit,
    Num(u64, i32),
    Text(String),
    Bytes(Vec<u8>),
    Map(BTreeMap<String, Vec<String>>),
    Nested(Option<Box<Body>>),
    Hello(Hello),
}

const MAX: u32 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((payload, tail))) = split_frame(rest, MAX) {
        if let Ok(f) = decode::<Body>(payload, MAX) {
            let again = encode(f.id, &f.body, MAX).expect("a decoded frame re-encodes");
            assert_eq!(&again[4..], payload, "canonical encoding");
            let back: Frame<Body> = decode(&again[4..], MAX).unwrap();
            assert_eq!(back, f);
        }
        let _ = decode::<Hello>(payload, MAX);
        rest = tail;
    }
});
