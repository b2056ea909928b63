//! RFC 3339 UTC timestamps without a date library.

use std::time::{SystemTime, UNIX_EPOCH};

/// The Unix epoch in RFC 3339 (xapi's "never").
pub const NEVER: &str = "1970-01-01T00:00:00Z";

/// Now, as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_unix(secs)
}

/// Now in xapi's date form (`YYYYMMDDTHH:MM:SSZ`, as `interface::SNAPSHOT_TIME_NEVER`), for
/// `snapshot_time`.
pub fn now_xapi() -> String {
    xapi_form(&now_rfc3339())
}

/// Converts `YYYY-MM-DDTHH:MM:SSZ` to xapi's `YYYYMMDDTHH:MM:SSZ`.
pub fn xapi_form(rfc3339: &str) -> String {
    match rfc3339.split_once('T') {
        Some((date, rest)) => format!("{}T{rest}", date.replace('-', "")),
        None => rfc3339.to_string(),
    }
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_unix(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), after Howard Hinnant's published algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates_format_correctly() {
        assert_eq!(format_unix(0), NEVER);
        assert_eq!(format_unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_unix(1_795_608_000), "2026-11-25T12:00:00Z");
        assert_eq!(xapi_form(NEVER), interface::SNAPSHOT_TIME_NEVER);
    }
}
