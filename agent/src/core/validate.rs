//! Argument validation. Every check runs before anything touches the disk, so a refused call
//! changes nothing.

use super::error::{invalid, Result};
use std::collections::BTreeMap;

/// Block size of every VHD the engine creates (2 MiB); virtual sizes are rounded up to it.
pub const BLOCK_SIZE: u64 = 2 << 20;
/// Largest virtual size a VHD can have (2040 GiB).
pub const MAX_VIRTUAL_SIZE: u64 = 2040 << 30;
/// Longest `name_label`, in bytes.
pub const MAX_NAME_LABEL: usize = 1024;
/// Longest `name_description`, in bytes.
pub const MAX_NAME_DESCRIPTION: usize = 4096;
/// Longest `content_id`, in bytes.
pub const MAX_CONTENT_ID: usize = 256;
/// Most `sm_config` entries.
pub const MAX_SM_CONFIG_KEYS: usize = 64;
/// Longest `sm_config` key, in bytes.
pub const MAX_SM_CONFIG_KEY: usize = 256;
/// Longest `sm_config` value, in bytes.
pub const MAX_SM_CONFIG_VALUE: usize = 4096;
/// Largest `sm_config` in total (keys + values), in bytes.
pub const MAX_SM_CONFIG_TOTAL: usize = 64 << 10;

/// Checks that `id` is a canonical UUID (so it can never contain `/`, `..` or NUL) and returns it
/// in lower case, the form used for file names.
pub fn uuid(kind: &str, id: &str) -> Result<String> {
    let b = id.as_bytes();
    let ok = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
    if !ok {
        let shown: String = id.chars().take(64).collect();
        return Err(invalid(kind, format!(
            "{kind} id {shown:?} is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx); pass the id that SR.scan or VDI.create returned"
        )));
    }
    Ok(id.to_ascii_lowercase())
}

/// Checks a requested virtual size and rounds it up to [`BLOCK_SIZE`].
pub fn virtual_size(requested: i64) -> Result<u64> {
    if requested <= 0 {
        return Err(invalid(
            "virtual_size",
            format!("virtual_size {requested} must be positive (bytes)"),
        ));
    }
    let r = requested as u64;
    if r > MAX_VIRTUAL_SIZE {
        return Err(invalid(
            "virtual_size",
            format!(
                "virtual_size {r} exceeds the VHD maximum of {MAX_VIRTUAL_SIZE} bytes (2040 GiB)"
            ),
        ));
    }
    Ok(r.div_ceil(BLOCK_SIZE) * BLOCK_SIZE)
}

fn text(field: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(invalid(
            field,
            format!(
                "{field} is {} bytes long; at most {max} are accepted",
                value.len()
            ),
        ));
    }
    if value.contains('\0') {
        return Err(invalid(field, format!("{field} contains a NUL character")));
    }
    Ok(())
}

/// Checks a `name_label`.
pub fn name_label(v: &str) -> Result<()> {
    text("name_label", v, MAX_NAME_LABEL)
}

/// Checks a `name_description`.
pub fn name_description(v: &str) -> Result<()> {
    text("name_description", v, MAX_NAME_DESCRIPTION)
}

/// Checks a `content_id`.
pub fn content_id(v: &str) -> Result<()> {
    text("content_id", v, MAX_CONTENT_ID)
}

/// Checks an `sm_config` map.
pub fn sm_config(m: &BTreeMap<String, String>) -> Result<()> {
    if m.len() > MAX_SM_CONFIG_KEYS {
        return Err(invalid(
            "sm_config",
            format!(
                "sm_config has {} keys; at most {MAX_SM_CONFIG_KEYS} are accepted",
                m.len()
            ),
        ));
    }
    let mut total = 0;
    for (k, v) in m {
        text("sm_config key", k, MAX_SM_CONFIG_KEY)?;
        text(&format!("sm_config[{k:?}]"), v, MAX_SM_CONFIG_VALUE)?;
        total += k.len() + v.len();
    }
    if total > MAX_SM_CONFIG_TOTAL {
        return Err(invalid(
            "sm_config",
            format!("sm_config totals {total} bytes; at most {MAX_SM_CONFIG_TOTAL} are accepted"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_checked_and_lowercased() {
        assert_eq!(
            uuid("VDI", "0F9C3D2E-1A2B-4C5D-8E9F-0123456789AB").unwrap(),
            "0f9c3d2e-1a2b-4c5d-8e9f-0123456789ab"
        );
        for bad in [
            "",
            "..",
            "../../etc/passwd",
            "0f9c3d2e-1a2b-4c5d-8e9f-0123456789a/",
            "0f9c3d2e-1a2b-4c5d-8e9f-0123456789abc",
            "{0f9c3d2e-1a2b-4c5d-8e9f-0123456789ab}",
            "0f9c3d2e1a2b4c5d8e9f0123456789ab",
        ] {
            assert!(uuid("VDI", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_are_rounded_up_and_bounded() {
        assert_eq!(virtual_size(1).unwrap(), BLOCK_SIZE);
        assert_eq!(virtual_size(BLOCK_SIZE as i64).unwrap(), BLOCK_SIZE);
        assert_eq!(virtual_size(BLOCK_SIZE as i64 + 1).unwrap(), 2 * BLOCK_SIZE);
        assert_eq!(
            virtual_size(MAX_VIRTUAL_SIZE as i64).unwrap(),
            MAX_VIRTUAL_SIZE
        );
        assert!(virtual_size(0).is_err());
        assert!(virtual_size(-1).is_err());
        assert!(virtual_size(MAX_VIRTUAL_SIZE as i64 + 1).is_err());
        assert!(virtual_size(i64::MAX).is_err());
    }

    #[test]
    fn long_names_and_sm_config_floods_are_refused() {
        assert!(name_label(&"x".repeat(1 << 20)).is_err());
        assert!(name_label("ok").is_ok());
        assert!(name_description(&"x".repeat(MAX_NAME_DESCRIPTION + 1)).is_err());
        let flood: BTreeMap<_, _> = (0..10_000).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(sm_config(&flood).is_err());
        let big: BTreeMap<_, _> = [("k".to_string(), "v".repeat(1 << 20))].into();
        assert!(sm_config(&big).is_err());
        let fine: BTreeMap<_, _> = [("k".to_string(), "v".to_string())].into();
        assert!(sm_config(&fine).is_ok());
    }
}
