//! xapi's `Errors.error`: every error a storage call can return.

use crate::records::DpState;
use serde::{Deserialize, Serialize};

/// An error of the storage interface (xapi's `Storage_interface.Errors.error`, same variants
/// and payloads). Messages name what failed and why; [`StorageError::name`] gives xapi's tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StorageError {
    /// A backend failure with a backtrace (name, params).
    #[error("backend error {code}: {}", params.join(" "))]
    #[serde(rename = "Backend_error_with_backtrace")]
    BackendErrorWithBacktrace {
        /// Error code (e.g. `SR_BACKEND_FAILURE_…` or ddstor's own codes).
        code: String,
        /// Parameters, human-readable details first.
        params: Vec<String>,
    },
    /// The SR must be attached first (payload: the SR).
    #[error("SR {0} is not attached: call SR.attach first")]
    #[serde(rename = "Sr_not_attached")]
    SrNotAttached(String),
    /// The VDI is unknown (payload: the VDI).
    #[error("VDI {0} does not exist")]
    #[serde(rename = "Vdi_does_not_exist")]
    VdiDoesNotExist(String),
    /// The call implies an illegal datapath state transition (from, to).
    #[error("illegal datapath transition from {from:?} to {to:?}")]
    #[serde(rename = "Illegal_transition")]
    IllegalTransition {
        /// Current state.
        from: DpState,
        /// Requested state.
        to: DpState,
    },
    /// A backend failure (code, params): xapi's SR_BACKEND_FAILURE form.
    #[error("backend error {code}: {}", params.join(" "))]
    #[serde(rename = "Backend_error")]
    BackendError {
        /// Error code.
        code: String,
        /// Parameters, human-readable details first.
        params: Vec<String>,
    },
    /// Something does not exist (kind, id).
    #[error("{kind} {id} does not exist")]
    #[serde(rename = "Does_not_exist")]
    DoesNotExist {
        /// What kind of thing (e.g. `dp`, `sr`).
        kind: String,
        /// Its id.
        id: String,
    },
    /// The operation was cancelled (payload: task).
    #[error("cancelled: {0}")]
    #[serde(rename = "Cancelled")]
    Cancelled(String),
    /// Ask another agent (payload: its address, if known).
    #[error("redirect to {0:?}")]
    #[serde(rename = "Redirect")]
    Redirect(Option<String>),
    /// The SR is attached and the call needs it detached (payload: the SR).
    #[error("SR {0} is attached: call SR.detach first")]
    #[serde(rename = "Sr_attached")]
    SrAttached(String),
    /// The call is not implemented by this agent (payload: the call).
    #[error("{0} is not implemented by ddstor")]
    #[serde(rename = "Unimplemented")]
    Unimplemented(String),
    /// The VDI is activated on another host (payload: host uuid).
    #[error("VDI activated on another host {0}")]
    #[serde(rename = "Activated_on_another_host")]
    ActivatedOnAnotherHost(String),
    /// A duplicated key.
    #[error("duplicated key {0}")]
    #[serde(rename = "Duplicated_key")]
    DuplicatedKey(String),
    /// No storage plugin for the SR.
    #[error("no storage plugin for SR {0}")]
    #[serde(rename = "No_storage_plugin_for_sr")]
    NoStoragePluginForSr(String),
    /// Content ids differ (expected, actual).
    #[error("content ids do not match: {0} vs {1}")]
    #[serde(rename = "Content_ids_do_not_match")]
    ContentIdsDoNotMatch(String, String),
    /// A required `device_config` key is missing.
    #[error("missing configuration parameter {0}")]
    #[serde(rename = "Missing_configuration_parameter")]
    MissingConfigurationParameter(String),
    /// An internal error (a bug or an unexpected environment): details in the payload.
    #[error("internal error: {0}")]
    #[serde(rename = "Internal_error")]
    InternalError(String),
    /// An error xapi could not classify.
    #[error("unknown error")]
    #[serde(rename = "Unknown_error")]
    UnknownError,
}

/// ddstor's `Backend_error` codes (the `code` of [`StorageError::BackendError`]).
pub mod codes {
    /// A call argument is invalid (bad UUID, size, label…); params name the argument and why.
    pub const INVALID_ARGUMENT: &str = "INVALID_ARGUMENT";
    /// The SR is locked by another agent or process.
    pub const SR_LOCKED: &str = "SR_LOCKED";
    /// The SR still holds VDIs.
    pub const SR_NOT_EMPTY: &str = "SR_NOT_EMPTY";
    /// The SR already exists.
    pub const SR_EXISTS: &str = "SR_EXISTS";
    /// The SR does not exist (not created, or its folder is gone).
    pub const SR_DOES_NOT_EXIST: &str = "SR_DOES_NOT_EXIST";
    /// The VDI is in use (attached) and cannot be changed that way.
    pub const VDI_IN_USE: &str = "VDI_IN_USE";
    /// Not enough space on the SR.
    pub const NO_SPACE: &str = "NO_SPACE";
    /// An I/O error on the SR's storage.
    pub const IO_ERROR: &str = "IO_ERROR";
    /// The VHD layer refused or failed.
    pub const VHD_ERROR: &str = "VHD_ERROR";
    /// The call is malformed (unknown method, JSON that does not match the parameters).
    pub const BAD_REQUEST: &str = "BAD_REQUEST";
    /// The agent is shutting down and takes no new calls.
    pub const SHUTTING_DOWN: &str = "SHUTTING_DOWN";
}

impl StorageError {
    /// A `Backend_error(code, params)`.
    pub fn backend(code: impl Into<String>, params: Vec<String>) -> Self {
        StorageError::BackendError {
            code: code.into(),
            params,
        }
    }

    /// `Backend_error(INVALID_ARGUMENT, [argument, reason])`.
    pub fn invalid_argument(argument: &str, reason: impl Into<String>) -> Self {
        Self::backend(
            codes::INVALID_ARGUMENT,
            vec![argument.to_string(), reason.into()],
        )
    }

    /// xapi's tag of the variant (`Backend_error`, `Sr_not_attached`, …).
    pub fn name(&self) -> &'static str {
        match self {
            StorageError::BackendErrorWithBacktrace { .. } => "Backend_error_with_backtrace",
            StorageError::SrNotAttached(_) => "Sr_not_attached",
            StorageError::VdiDoesNotExist(_) => "Vdi_does_not_exist",
            StorageError::IllegalTransition { .. } => "Illegal_transition",
            StorageError::BackendError { .. } => "Backend_error",
            StorageError::DoesNotExist { .. } => "Does_not_exist",
            StorageError::Cancelled(_) => "Cancelled",
            StorageError::Redirect(_) => "Redirect",
            StorageError::SrAttached(_) => "Sr_attached",
            StorageError::Unimplemented(_) => "Unimplemented",
            StorageError::ActivatedOnAnotherHost(_) => "Activated_on_another_host",
            StorageError::DuplicatedKey(_) => "Duplicated_key",
            StorageError::NoStoragePluginForSr(_) => "No_storage_plugin_for_sr",
            StorageError::ContentIdsDoNotMatch(_, _) => "Content_ids_do_not_match",
            StorageError::MissingConfigurationParameter(_) => "Missing_configuration_parameter",
            StorageError::InternalError(_) => "Internal_error",
            StorageError::UnknownError => "Unknown_error",
        }
    }

    /// The backend error code, for `Backend_error` and `Backend_error_with_backtrace`.
    pub fn backend_code(&self) -> Option<&str> {
        match self {
            StorageError::BackendError { code, .. }
            | StorageError::BackendErrorWithBacktrace { code, .. } => Some(code),
            _ => None,
        }
    }
}
