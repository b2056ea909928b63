//! Fuzzes the registry's record parsing: another domain controls every value of its entry
//! (`version`, `state`, `load`, `heartbeat`…: any bytes, any length, present or not) and the
//! names under `srs/`; dom0's clock and `stale_after` are arbitrary too. `parse_record` must
//! never panic, and an accepted record must be consistent with what it was given.
//!
//! Input: domid (u16 LE), now (u64 LE), stale_after seconds (u64 LE), then pieces separated by
//! 0xFF: the values of `ENTRY_KEYS` in order (a piece that is exactly 0xFE means "key absent"),
//! then the `srs/` names. Seeds: `scripts/test.d/30-fuzz-xs.sh`.
#![no_main]

use ddstor_xs_registry::registry::{parse_record, RawEntry, ENTRY_KEYS, MAX_VALUE_LEN};
use ddstor_xs_registry::DomId;
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    if data.len() < 18 {
        return;
    }
    let dom = u16::from_le_bytes([data[0], data[1]]);
    let now = u64::from_le_bytes(data[2..10].try_into().unwrap());
    let stale = u64::from_le_bytes(data[10..18].try_into().unwrap());
    let mut pieces = data[18..].split(|&b| b == 0xFF);
    let mut raw = RawEntry::default();
    for (k, v) in ENTRY_KEYS.iter().zip(pieces.by_ref()) {
        if v != [0xFE] {
            raw.values.insert(k.to_string(), v.to_vec());
        }
    }
    raw.srs = pieces
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    if let Ok(r) = parse_record(DomId(dom), &raw, now, Duration::from_secs(stale)) {
        assert_eq!(r.domid, DomId(dom));
        assert!(r.agent.len() <= MAX_VALUE_LEN);
        assert_eq!(r.live, r.not_live_because.is_none());
        assert_eq!(r.srs.len(), raw.srs.len());
    }
});
