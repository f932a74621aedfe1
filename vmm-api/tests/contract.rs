//! docs/api.yaml and this crate describe the same API:
//! - the document's operations are `endpoint::ALL`, method and path alike;
//! - every request and answer body in the document is a named schema, and
//!   every named schema has its Rust type here;
//! - a body built from a schema (every property, nested ones too) reads
//!   into its type and writes back with exactly the same properties: a
//!   field in one and not the other, or of another shape, fails.
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use vmm_api::endpoint;
use vmm_api::model::*;

fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.yaml");
    let text = std::fs::read_to_string(path).expect("docs/api.yaml");
    serde_norway::from_str(&text).expect("docs/api.yaml is YAML")
}

/// `#/components/schemas/X` -> its schema.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            let s = &doc["components"]["schemas"][name];
            assert!(s.is_object(), "dangling $ref {r}");
            resolve(doc, s)
        }
        None => schema,
    }
}

/// A value with every property the schema names (objects), one element
/// (arrays, or minItems), the first enum value, the example if any.
fn sample(doc: &Value, schema: &Value) -> Value {
    let schema = resolve(doc, schema);
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        let mut merged = Map::new();
        for part in all {
            match sample(doc, part) {
                Value::Object(m) => merged.extend(m),
                other => return other,
            }
        }
        return Value::Object(merged);
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        return e[0].clone();
    }
    if let Some(x) = schema.get("example") {
        return x.clone();
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("string") => json!("x"),
        Some("integer") => json!(schema.get("minimum").and_then(Value::as_u64).unwrap_or(1)),
        Some("number") => json!(1.5),
        Some("boolean") => json!(true),
        Some("array") => {
            let n = schema.get("minItems").and_then(Value::as_u64).unwrap_or(1);
            let item = sample(doc, &schema["items"]);
            Value::Array(vec![item; n as usize])
        }
        Some("object") | None => {
            let mut m = Map::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, v) in props {
                    m.insert(k.clone(), sample(doc, v));
                }
            } else if let Some(extra) = schema.get("additionalProperties").filter(|a| a.is_object())
            {
                m.insert("some_key".into(), sample(doc, extra));
            }
            Value::Object(m)
        }
        Some(t) => panic!("schema type {t} has no sample"),
    }
}

/// Objects whose keys are free (maps): `additionalProperties` without
/// `properties`.
fn is_map(doc: &Value, schema: &Value) -> bool {
    let s = resolve(doc, schema);
    s.get("properties").is_none() && s.get("additionalProperties").is_some_and(Value::is_object)
}

/// The property names of `a` and `b` are the same, at every depth the
/// schema names (`open`: extra keys of the Rust side allowed, for objects
/// with `additionalProperties: true`).
fn same_shape(doc: &Value, schema: &Value, a: &Value, b: &Value, at: &str) {
    let schema = resolve(doc, schema);
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            if is_map(doc, schema) {
                return;
            }
            let kx: BTreeSet<_> = x.keys().collect();
            let ky: BTreeSet<_> = y.keys().collect();
            assert_eq!(
                kx, ky,
                "{at}: docs/api.yaml has the left properties, the Rust type the right"
            );
            let props = properties(doc, schema);
            for k in kx {
                let sub = props.get(k).cloned().unwrap_or(Value::Null);
                same_shape(doc, &sub, &x[k], &y[k], &format!("{at}.{k}"));
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}: array length");
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                same_shape(doc, &schema["items"], p, q, &format!("{at}[{i}]"));
            }
        }
        (x, y) if x.is_number() && y.is_number() => {
            assert_eq!(x.as_f64(), y.as_f64(), "{at}");
        }
        (x, y) => assert_eq!(x, y, "{at}"),
    }
}

/// The properties of an object schema (through allOf).
fn properties(doc: &Value, schema: &Value) -> Map<String, Value> {
    let schema = resolve(doc, schema);
    let mut out = Map::new();
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for part in all {
            out.extend(properties(doc, part));
        }
    }
    if let Some(p) = schema.get("properties").and_then(Value::as_object) {
        out.extend(p.clone());
    }
    out
}

/// The schema `name` (each branch of a oneOf) reads into a `T` and writes
/// back with the same properties.
fn check<T: Serialize + DeserializeOwned>(doc: &Value, name: &str) {
    let schema = &doc["components"]["schemas"][name];
    assert!(schema.is_object(), "docs/api.yaml has no schema {name}");
    let branches: Vec<&Value> = match schema.get("oneOf").and_then(Value::as_array) {
        Some(b) => b.iter().collect(),
        None => vec![schema],
    };
    for (i, branch) in branches.into_iter().enumerate() {
        let body = sample(doc, branch);
        let t: T = serde_json::from_value(body.clone()).unwrap_or_else(|e| {
            panic!("{name} (branch {i}): the document's body does not read as the Rust type: {e}\n{body:#}")
        });
        let back = serde_json::to_value(&t).expect("serializes");
        same_shape(doc, branch, &body, &back, name);
    }
}

#[test]
fn the_documents_operations_are_the_endpoints() {
    let doc = document();
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for (method, op) in ops.as_object().expect("operations") {
            let id = op["operationId"].as_str().expect("operationId").to_string();
            documented.insert((id, method.to_uppercase(), path.clone()));
        }
    }
    let ours: BTreeSet<_> = endpoint::ALL
        .iter()
        .map(|e| {
            (
                e.operation.to_string(),
                e.method.to_string(),
                e.path.to_string(),
            )
        })
        .collect();
    assert_eq!(
        documented, ours,
        "docs/api.yaml (left) and endpoint::ALL (right)"
    );
}

#[test]
fn every_body_in_the_document_is_a_named_schema_with_a_rust_type() {
    let doc = document();
    let typed: BTreeSet<&str> = TYPES.iter().map(|(n, _)| *n).collect();
    let mut used = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for (method, op) in ops.as_object().expect("operations") {
            let mut bodies = vec![("request", &op["requestBody"])];
            if let Some(rs) = op["responses"].as_object() {
                bodies.extend(rs.iter().map(|(code, r)| (code.as_str(), r)));
            }
            for (what, b) in bodies {
                let b = match b.get("$ref").and_then(Value::as_str) {
                    Some(r) => &doc["components"]["responses"][r.rsplit('/').next().unwrap_or("")],
                    None => b,
                };
                let Some(schema) = b.pointer("/content/application~1json/schema") else {
                    continue;
                };
                let r = schema
                    .get("$ref")
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| {
                        panic!(
                            "{method} {path} {what}: an inline schema (name it under components)"
                        )
                    });
                used.insert(r.trim_start_matches("#/components/schemas/").to_string());
            }
        }
    }
    for name in &used {
        assert!(
            typed.contains(name.as_str()),
            "schema {name} has no Rust type in TYPES"
        );
    }
    for name in doc["components"]["schemas"]
        .as_object()
        .expect("schemas")
        .keys()
    {
        assert!(
            typed.contains(name.as_str()),
            "schema {name} has no Rust type in TYPES"
        );
    }
}

type Check = fn(&Value, &str);

/// Every named schema and its type.
const TYPES: &[(&str, Check)] = &[
    ("Error", check::<ErrorBody>),
    ("State", check::<StateReply>),
    ("Announced", check::<Announced>),
    ("VmInfo", check::<VmInfo>),
    ("VmConfig", check::<VmConfig>),
    ("Vcpus", check::<VcpusInfo>),
    ("Interrupts", check::<Interrupts>),
    ("DeviceState", check::<DeviceState>),
    ("Plugged", check::<Plugged>),
    ("DeviceRequest", check::<DeviceBody>),
    ("ResizeRequest", check::<ResizeBody>),
    ("Resized", check::<Resized>),
    ("SnapshotRequest", check::<SnapshotRequest>),
    ("SnapshotReply", check::<SnapshotReply>),
    ("MigrateRequest", check::<MigrateRequest>),
    ("MigrateStarted", check::<MigrateStarted>),
    ("MigrationProgress", check::<Progress>),
    ("MigrationStatus", check::<MigrationStatus>),
];

#[test]
fn every_schema_reads_into_its_type_and_back_unchanged() {
    let doc = document();
    for (name, check) in TYPES {
        check(&doc, name);
    }
}

#[test]
fn enumerations_read_every_documented_value() {
    let doc = document();
    let values = |schema: &str, prop: &str| -> Vec<Value> {
        doc["components"]["schemas"][schema]["properties"][prop]["enum"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("{schema}.{prop} has no enum"))
    };
    for v in values("State", "state") {
        let s: StateReply = serde_json::from_value(json!({ "state": v })).expect("a State");
        assert_eq!(json!(s.state.to_string()), v);
    }
    for v in values("SnapshotRequest", "kind") {
        let r: SnapshotRequest =
            serde_json::from_value(json!({ "dest": "/s", "kind": v })).expect("a kind");
        assert_eq!(serde_json::to_value(r.kind).ok(), Some(v));
    }
    for v in values("MigrationProgress", "phase") {
        let p: Phase = serde_json::from_value(v.clone()).expect("a phase");
        assert_eq!(serde_json::to_value(p).ok(), Some(v));
    }
    for v in values("DeviceState", "state") {
        let a: Attachment = serde_json::from_value(v.clone()).expect("an attachment");
        assert_eq!(serde_json::to_value(a).ok(), Some(v));
    }
}
