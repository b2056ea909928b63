//! Newtypes for the identifiers xapi passes around as plain strings.
//!
//! xapi's `sr`, `vdi`, `dp` and `vm` are opaque strings; ddstor uses UUIDs for SRs and VDIs but
//! the types stay strings on the wire (serde-transparent) so any xapi value round-trips.
//! [`SrId::check`] and [`VdiId::check`] tell whether an id is safe to use as a file name.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// Wraps a string.
            pub fn new(s: impl Into<String>) -> Self {
                Self(s.into())
            }
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// Primary key of a storage repository (xapi's `sr`; a UUID in ddstor).
    SrId
);
string_id!(
    /// Primary key of a VDI inside its SR (xapi's `vdi`; a UUID in ddstor).
    VdiId
);
string_id!(
    /// A datapath: the client's name for one use of a VDI (xapi's `dp`).
    DpId
);
string_id!(
    /// A VM, as xapi names it in the datapath calls (xapi's `vm`; may be empty).
    VmId
);
string_id!(
    /// The caller's debug/trace id (xapi's `dbg`), logged with every call. Optional in JSON.
    Dbg
);

/// Why a string is not acceptable as an SR or VDI id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdProblem {
    /// Not in the canonical 8-4-4-4-12 hexadecimal UUID form.
    NotAUuid,
}

impl fmt::Display for IdProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdProblem::NotAUuid => f.write_str(
                "not a UUID of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hexadecimal)",
            ),
        }
    }
}

/// True when `s` is a canonical UUID: 36 characters, hex digits with dashes at 8, 13, 18, 23.
/// Such a string can never contain `/`, `..` or NUL, so it is safe as a file name.
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl SrId {
    /// Checks that the id is a canonical UUID (ddstor names SR folders and records after it).
    pub fn check(&self) -> Result<(), IdProblem> {
        if is_uuid(&self.0) {
            Ok(())
        } else {
            Err(IdProblem::NotAUuid)
        }
    }
}

impl VdiId {
    /// Checks that the id is a canonical UUID (ddstor names `<uuid>.vhd` files after it).
    pub fn check(&self) -> Result<(), IdProblem> {
        if is_uuid(&self.0) {
            Ok(())
        } else {
            Err(IdProblem::NotAUuid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_check_accepts_canonical_and_rejects_paths() {
        assert!(is_uuid("0f9c3d2e-1a2b-4c5d-8e9f-0123456789ab"));
        assert!(is_uuid("0F9C3D2E-1A2B-4C5D-8E9F-0123456789AB"));
        assert!(!is_uuid("../../etc/passwd"));
        assert!(!is_uuid("0f9c3d2e-1a2b-4c5d-8e9f-0123456789a/"));
        assert!(!is_uuid("0f9c3d2e-1a2b-4c5d-8e9f-0123456789abc"));
        assert!(!is_uuid("0f9c3d2e11a2b-4c5d-8e9f-0123456789ab"));
        assert!(VdiId::from("..").check().is_err());
        assert!(SrId::from("").check().is_err());
    }

    #[test]
    fn ids_serialize_as_plain_strings() {
        let v = serde_json::to_string(&VdiId::from("abc")).unwrap();
        assert_eq!(v, "\"abc\"");
    }
}
