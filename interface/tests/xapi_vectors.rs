//! ddstor's interface types parse xapi's own marshalling samples (XML-RPC requests and
//! responses, `tests/vectors/xapi-idl-storage/`) of every method ddstor serves, and survive a
//! round trip through xapi's JSON shape and through bincode (the native protocol).

use ddstor_interface::{xapi, Call, Reply, Response, StorageError};
use serde_json::{Map, Value};
use std::path::PathBuf;

/// A minimal XML-RPC value parser: enough for xapi's samples (string, boolean, int, double,
/// nil, struct, array; entities). Panics with the position on anything else.
struct Xml<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Xml<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }
    fn eat(&mut self, tag: &str) -> bool {
        if self.rest().starts_with(tag) {
            self.pos += tag.len();
            true
        } else {
            false
        }
    }
    fn expect(&mut self, tag: &str) {
        assert!(
            self.eat(tag),
            "expected {tag} at {}: {}",
            self.pos,
            &self.rest()[..self.rest().len().min(80)]
        );
    }
    fn text_until(&mut self, end: &str) -> String {
        let i = self.rest().find(end).expect("closing tag");
        let raw = &self.rest()[..i];
        self.pos += i + end.len();
        raw.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&")
    }
    fn value(&mut self) -> Value {
        self.expect("<value>");
        let v = if self.eat("<struct>") {
            let mut m = Map::new();
            while self.eat("<member><name>") {
                let k = self.text_until("</name>");
                let v = self.value();
                self.expect("</member>");
                m.insert(k, v);
            }
            self.expect("</struct>");
            Value::Object(m)
        } else if self.eat("<array><data>") {
            let mut a = vec![];
            while self.rest().starts_with("<value>") {
                a.push(self.value());
            }
            self.expect("</data></array>");
            Value::Array(a)
        } else if self.eat("<boolean>") {
            Value::Bool(self.text_until("</boolean>") == "1")
        } else if self.eat("<nil/>") {
            Value::Null
        } else if self.eat("<string>") {
            Value::String(self.text_until("</string>"))
        } else if self.eat("<int>") {
            Value::from(self.text_until("</int>").parse::<i64>().unwrap())
        } else if self.eat("<i4>") {
            Value::from(self.text_until("</i4>").parse::<i64>().unwrap())
        } else if self.eat("<double>") {
            Value::from(self.text_until("</double>").parse::<f64>().unwrap())
        } else {
            let t = self.text_until("</value>");
            return Value::String(t);
        };
        self.expect("</value>");
        v
    }
}

fn vectors(dir: &str) -> Vec<(String, String)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/xapi-idl-storage");
    let mut out: Vec<(String, String)> = std::fs::read_dir(root.join(dir))
        .expect("vector folder")
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(e.path()).unwrap())
        })
        .collect();
    out.sort();
    out
}

fn method_of(file: &str, suffix: &str) -> String {
    file[..file.find(suffix).expect("vector file name")].to_string()
}

fn bincode_round_trip<T>(v: &T) -> T
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let bytes = bincode::serialize(v).expect("bincode encodes");
    bincode::deserialize(&bytes).expect("bincode decodes")
}

#[test]
fn every_request_vector_of_a_served_method_parses_into_a_call() {
    let files = vectors("requests");
    assert!(files.len() > 200, "vectors missing: {}", files.len());
    let mut methods = std::collections::BTreeSet::new();
    for (name, text) in &files {
        let mut x = Xml { s: text, pos: 0 };
        x.expect("<?xml version=\"1.0\"?><methodCall><methodName>");
        // Dispatch on the name inside the call, as a server does: xapi's own sample
        // `VDI.attach3.request.1` is a `VDI.attach2` call (the compatibility fallback).
        let method = x.text_until("</methodName>");
        if method != method_of(name, ".request.") {
            assert_eq!(name, "VDI.attach3.request.1", "file/method mismatch");
        }
        x.expect("<params><param>");
        let params = x.value();
        let call = Call::from_json(&method, params.clone())
            .unwrap_or_else(|e| panic!("{name}: {e}\n{params}"));
        assert_eq!(call.method(), method);
        assert_eq!(call.dbg(), "dbg", "{name}");
        if let Some(sr) = call.sr() {
            assert_eq!(sr.as_str(), "sr", "{name}");
        }
        // xapi's field values land in our fields (placeholders equal the field names).
        if let Call::VdiCreate { vdi_info, .. } | Call::VdiSnapshot { vdi_info, .. } = &call {
            assert_eq!(vdi_info.vdi.as_str(), "vdi");
            assert_eq!(vdi_info.name_label, "name_label");
            assert_eq!(vdi_info.snapshot_of.as_str(), "snapshot_of");
            assert_eq!(vdi_info.sm_config.get("sm_config").unwrap(), "sm_config");
            let want_uuid = params["vdi_info"].get("uuid").map(|_| "uuid".to_string());
            assert_eq!(vdi_info.uuid, want_uuid, "{name}");
        }
        // JSON and bincode round trips give the same call back.
        assert_eq!(Call::from_json(&method, call.params_json()).unwrap(), call);
        assert_eq!(bincode_round_trip(&call), call, "{name}");
        methods.insert(method);
    }
    // Every served method that xapi has samples for was exercised.
    for m in Call::METHODS {
        // `SR.gc` is ddstor's own extension: xapi has no sample for it.
        if *m != "VDI.activate_readonly" && *m != "SR.gc" {
            assert!(methods.contains(*m), "no request vector for {m}");
        }
    }
}

#[test]
fn every_response_vector_of_a_served_method_parses_as_result_or_error() {
    let files = vectors("responses");
    assert!(files.len() > 1000, "vectors missing: {}", files.len());
    let (mut ok, mut failed) = (0, 0);
    let mut error_names = std::collections::BTreeSet::new();
    for (name, text) in &files {
        let method = method_of(name, ".response.");
        let kind = Call::result_kind_of(&method).expect("served method");
        let mut x = Xml { s: text, pos: 0 };
        x.expect("<?xml version=\"1.0\"?><methodResponse><params><param>");
        let v = x.value();
        let reply: Reply = match v["Status"].as_str() {
            Some("Success") => {
                let value = v.get("Value").cloned().unwrap_or(Value::Null);
                let r = xapi::response_from_xapi(kind, &value)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                // Our xapi-shaped output parses back to the same value.
                let again = xapi::response_from_xapi(kind, &xapi::response_to_xapi(&r)).unwrap();
                assert_eq!(again, r, "{name}");
                ok += 1;
                Ok(r)
            }
            Some("Failure") => {
                let e = xapi::error_from_xapi(&v["ErrorDescription"])
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(
                    xapi::error_to_xapi(&e),
                    v["ErrorDescription"],
                    "{name}: error shape differs from xapi's"
                );
                error_names.insert(e.name());
                failed += 1;
                Err(e)
            }
            other => panic!("{name}: status {other:?}"),
        };
        assert_eq!(bincode_round_trip(&reply), reply, "{name}");
    }
    assert!(ok > 300 && failed > 500, "ok {ok} failed {failed}");
    // Every variant of xapi's Errors.error occurs in the samples and parses.
    assert_eq!(error_names.len(), 17, "{error_names:?}");
}

#[test]
fn unknown_method_and_wrong_params_are_bad_requests_naming_the_problem() {
    let e = Call::from_json("VDI.frobnicate", serde_json::json!({})).unwrap_err();
    assert_eq!(e.backend_code(), Some("BAD_REQUEST"));
    assert!(e.to_string().contains("VDI.create"), "{e}");
    let e = Call::from_json("VDI.stat", serde_json::json!({"sr": "x"})).unwrap_err();
    assert!(e.to_string().contains("vdi"), "{e}");
    let e = Call::from_json("VDI.stat", serde_json::json!([1])).unwrap_err();
    assert_eq!(e.backend_code(), Some("BAD_REQUEST"));
    let e = Call::from_json(
        "VDI.create",
        serde_json::json!({"sr": "s", "vdi_info": {"virtual_size": "12x"}}),
    )
    .unwrap_err();
    assert!(e.to_string().contains("12x"), "{e}");
}

#[test]
fn dbg_is_optional_and_vdi_info_takes_xapi_defaults() {
    let c = Call::from_json(
        "VDI.create",
        serde_json::json!({"sr": "s", "vdi_info": {"name_label": "disk", "virtual_size": 1048576}}),
    )
    .unwrap();
    let Call::VdiCreate { dbg, vdi_info, .. } = &c else {
        panic!("{c:?}")
    };
    assert_eq!(dbg.as_str(), "");
    assert!(vdi_info.persistent, "xapi's default persistent = true");
    assert_eq!(vdi_info.ty, "user");
    assert_eq!(
        vdi_info.snapshot_time,
        ddstor_interface::SNAPSHOT_TIME_NEVER
    );
    assert_eq!(vdi_info.virtual_size, 1 << 20);
    assert_eq!(c.vdi().unwrap().as_str(), "");
}

#[test]
fn errors_in_xapi_shape_round_trip() {
    let errors = [
        StorageError::backend("SR_LOCKED", vec!["sr".into(), "held by pid 7".into()]),
        StorageError::Redirect(None),
        StorageError::UnknownError,
        StorageError::IllegalTransition {
            from: ddstor_interface::DpState::Detached,
            to: ddstor_interface::DpState::Activated(ddstor_interface::RoRw::RW),
        },
    ];
    for e in errors {
        assert_eq!(xapi::error_from_xapi(&xapi::error_to_xapi(&e)).unwrap(), e);
        let r: Reply = Err(e.clone());
        assert_eq!(bincode_round_trip(&r), r);
    }
    assert_eq!(
        xapi::response_to_xapi(&Response::Unit),
        serde_json::Value::Null
    );
}
