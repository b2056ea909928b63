//! xapi's own JSON shape (rpclib's `Rpc.t` as JSON) of results and errors.
//!
//! xapi marshals variants as arrays (`["Nbd", {"uri": …}]`, `["Attached", "RO"]`,
//! `["Backend_error", ["code", ["p1"]]]`), a variant without payload as its bare name, `None`
//! fields by leaving them out and `Some x` option payloads as `[x]`. The CLI prints results and
//! errors in this shape, and the vector tests parse xapi's own samples with it.

use crate::call::{Response, ResultKind};
use crate::error::StorageError;
use crate::records::{BackendInfo, DpStat, DpState, Implementation, RoRw, StringMap};
use serde_json::{json, Map, Value};

/// A parse failure: what was expected, and the offending JSON.
pub type XapiParseError = String;

fn s(v: &Value) -> Result<String, XapiParseError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("expected a string, got {v}"))
}

fn arr(v: &Value) -> Result<&Vec<Value>, XapiParseError> {
    v.as_array()
        .ok_or_else(|| format!("expected an array, got {v}"))
}

fn pair(v: &Value) -> Result<(&Value, &Value), XapiParseError> {
    match arr(v)?.as_slice() {
        [a, b] => Ok((a, b)),
        _ => Err(format!("expected a pair, got {v}")),
    }
}

fn strings(v: &Value) -> Result<Vec<String>, XapiParseError> {
    arr(v)?.iter().map(s).collect()
}

/// A datapath state in xapi's shape: `"Detached"` or `["Attached", "RO"]`.
pub fn state_to_xapi(st: &DpState) -> Value {
    let rw = |m: &RoRw| match m {
        RoRw::RO => "RO",
        RoRw::RW => "RW",
    };
    match st {
        DpState::Detached => json!("Detached"),
        DpState::Attached(m) => json!(["Attached", rw(m)]),
        DpState::Activated(m) => json!(["Activated", rw(m)]),
    }
}

/// Parses a datapath state from xapi's shape.
pub fn state_from_xapi(v: &Value) -> Result<DpState, XapiParseError> {
    let rw = |v: &Value| match v.as_str() {
        Some("RO") => Ok(RoRw::RO),
        Some("RW") => Ok(RoRw::RW),
        _ => Err(format!("expected \"RO\" or \"RW\", got {v}")),
    };
    if v.as_str() == Some("Detached") {
        return Ok(DpState::Detached);
    }
    let (tag, m) = pair(v)?;
    match tag.as_str() {
        Some("Attached") => Ok(DpState::Attached(rw(m)?)),
        Some("Activated") => Ok(DpState::Activated(rw(m)?)),
        _ => Err(format!("unknown datapath state {v}")),
    }
}

/// An error in xapi's shape (`ErrorDescription` of XML-RPC, `error` of JSON-RPC).
pub fn error_to_xapi(e: &StorageError) -> Value {
    use StorageError as E;
    let (name, payload) = match e {
        E::BackendErrorWithBacktrace { code, params } | E::BackendError { code, params } => {
            (e.name(), json!([code, params]))
        }
        E::SrNotAttached(x)
        | E::VdiDoesNotExist(x)
        | E::Cancelled(x)
        | E::SrAttached(x)
        | E::Unimplemented(x)
        | E::ActivatedOnAnotherHost(x)
        | E::DuplicatedKey(x)
        | E::NoStoragePluginForSr(x)
        | E::MissingConfigurationParameter(x)
        | E::InternalError(x) => (e.name(), json!(x)),
        E::IllegalTransition { from, to } => {
            (e.name(), json!([state_to_xapi(from), state_to_xapi(to)]))
        }
        E::DoesNotExist { kind, id } => (e.name(), json!([kind, id])),
        E::ContentIdsDoNotMatch(a, b) => (e.name(), json!([a, b])),
        E::Redirect(x) => (e.name(), json!(x.iter().collect::<Vec<_>>())),
        E::UnknownError => return json!("Unknown_error"),
    };
    json!([name, payload])
}

/// Parses an error from xapi's shape.
pub fn error_from_xapi(v: &Value) -> Result<StorageError, XapiParseError> {
    use StorageError as E;
    if v.as_str() == Some("Unknown_error") {
        return Ok(E::UnknownError);
    }
    let (tag, p) = pair(v)?;
    let tag = tag
        .as_str()
        .ok_or_else(|| format!("error tag not a string: {v}"))?;
    Ok(match tag {
        "Backend_error" | "Backend_error_with_backtrace" => {
            let (code, params) = pair(p)?;
            let (code, params) = (s(code)?, strings(params)?);
            if tag == "Backend_error" {
                E::BackendError { code, params }
            } else {
                E::BackendErrorWithBacktrace { code, params }
            }
        }
        "Sr_not_attached" => E::SrNotAttached(s(p)?),
        "Vdi_does_not_exist" => E::VdiDoesNotExist(s(p)?),
        "Cancelled" => E::Cancelled(s(p)?),
        "Sr_attached" => E::SrAttached(s(p)?),
        "Unimplemented" => E::Unimplemented(s(p)?),
        "Activated_on_another_host" => E::ActivatedOnAnotherHost(s(p)?),
        "Duplicated_key" => E::DuplicatedKey(s(p)?),
        "No_storage_plugin_for_sr" => E::NoStoragePluginForSr(s(p)?),
        "Missing_configuration_parameter" => E::MissingConfigurationParameter(s(p)?),
        "Internal_error" => E::InternalError(s(p)?),
        "Illegal_transition" => {
            let (a, b) = pair(p)?;
            E::IllegalTransition {
                from: state_from_xapi(a)?,
                to: state_from_xapi(b)?,
            }
        }
        "Does_not_exist" => {
            let (a, b) = pair(p)?;
            E::DoesNotExist {
                kind: s(a)?,
                id: s(b)?,
            }
        }
        "Content_ids_do_not_match" => {
            let (a, b) = pair(p)?;
            E::ContentIdsDoNotMatch(s(a)?, s(b)?)
        }
        "Redirect" => match arr(p)?.as_slice() {
            [] => E::Redirect(None),
            [x] => E::Redirect(Some(s(x)?)),
            _ => return Err(format!("Redirect takes an option, got {p}")),
        },
        other => return Err(format!("unknown storage error {other:?}")),
    })
}

fn implementation_to_xapi(i: &Implementation) -> Value {
    match i {
        Implementation::XenDisk {
            params,
            extra,
            backend_type,
        } => json!(["XenDisk", {"params": params, "extra": extra, "backend_type": backend_type}]),
        Implementation::BlockDevice { path } => json!(["BlockDevice", {"path": path}]),
        Implementation::File { path } => json!(["File", {"path": path}]),
        Implementation::Nbd { uri } => json!(["Nbd", {"uri": uri}]),
    }
}

fn implementation_from_xapi(v: &Value) -> Result<Implementation, XapiParseError> {
    let (tag, body) = pair(v)?;
    let field = |k: &str| s(body.get(k).unwrap_or(&Value::Null));
    Ok(match tag.as_str() {
        Some("XenDisk") => Implementation::XenDisk {
            params: field("params")?,
            extra: serde_json::from_value::<StringMap>(
                body.get("extra").cloned().unwrap_or(json!({})),
            )
            .map_err(|e| e.to_string())?,
            backend_type: field("backend_type")?,
        },
        Some("BlockDevice") => Implementation::BlockDevice {
            path: field("path")?,
        },
        Some("File") => Implementation::File {
            path: field("path")?,
        },
        Some("Nbd") => Implementation::Nbd { uri: field("uri")? },
        _ => return Err(format!("unknown implementation {v}")),
    })
}

fn strip_null(mut v: Value, key: &str) -> Value {
    if let Value::Object(m) = &mut v {
        if m.get(key).is_some_and(Value::is_null) {
            m.remove(key);
        }
    }
    v
}

/// A successful result in xapi's shape.
pub fn response_to_xapi(r: &Response) -> Value {
    let to = |x: &dyn erased::Ser| x.value();
    match r {
        Response::Unit => Value::Null,
        Response::Query(q) => to(q),
        Response::Text(t) => json!(t),
        Response::DeviceConfig(m) => to(m),
        Response::VdiInfo(v) => strip_null(to(v), "uuid"),
        Response::VdiInfos(vs) => {
            Value::Array(vs.iter().map(|v| strip_null(to(v), "uuid")).collect())
        }
        Response::SrInfo(i) => strip_null(to(i), "sr_uuid"),
        Response::SrList(l) => to(l),
        Response::AttachInfo(a) => to(a),
        Response::Backend(b) => json!({
            "implementations": b.implementations.iter().map(implementation_to_xapi).collect::<Vec<_>>()
        }),
        Response::DpStat(d) => {
            let dps: Map<String, Value> = d
                .dps
                .iter()
                .map(|(k, v)| (k.clone(), state_to_xapi(v)))
                .collect();
            json!({"superstate": state_to_xapi(&d.superstate), "dps": dps})
        }
    }
}

/// Parses a successful result of the given kind from xapi's shape.
pub fn response_from_xapi(kind: ResultKind, v: &Value) -> Result<Response, XapiParseError> {
    fn de<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, XapiParseError> {
        serde_json::from_value(v.clone()).map_err(|e| format!("{e} in {v}"))
    }
    Ok(match kind {
        ResultKind::Unit => match v {
            Value::Null => Response::Unit,
            _ => return Err(format!("expected nothing (null), got {v}")),
        },
        ResultKind::Query => Response::Query(de(v)?),
        ResultKind::Text => Response::Text(s(v)?),
        ResultKind::DeviceConfig => Response::DeviceConfig(de(v)?),
        ResultKind::VdiInfo => Response::VdiInfo(de(v)?),
        ResultKind::VdiInfos => Response::VdiInfos(de(v)?),
        ResultKind::SrInfo => Response::SrInfo(de(v)?),
        ResultKind::SrList => Response::SrList(de(v)?),
        ResultKind::AttachInfo => Response::AttachInfo(de(v)?),
        ResultKind::Backend => Response::Backend(BackendInfo {
            implementations: arr(v.get("implementations").unwrap_or(&Value::Null))?
                .iter()
                .map(implementation_from_xapi)
                .collect::<Result<_, _>>()?,
        }),
        ResultKind::DpStat => {
            let dps = v
                .get("dps")
                .and_then(Value::as_object)
                .ok_or_else(|| format!("dp_stat without a dps object: {v}"))?
                .iter()
                .map(|(k, st)| Ok((k.clone(), state_from_xapi(st)?)))
                .collect::<Result<_, XapiParseError>>()?;
            Response::DpStat(DpStat {
                superstate: state_from_xapi(v.get("superstate").unwrap_or(&Value::Null))?,
                dps,
            })
        }
    })
}

mod erased {
    /// Serialize to a JSON value (derived serde shapes that already match xapi's).
    pub trait Ser {
        fn value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn value(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
        }
    }
}
