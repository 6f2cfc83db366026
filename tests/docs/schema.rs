//! The subset of JSON Schema (2020-12, as OpenAPI 3.1 uses it) that
//! docs/openapi.json is written in, checked here rather than with a crate:
//! the validators on crates.io pull in regex engines, URL fetching and
//! async HTTP clients for features this document does not use, and would
//! double the tests' build time. A keyword this code does not know is an
//! error, so the document cannot rely on a rule nobody checks.

use serde_json::Value;

/// Keywords that only describe.
const ANNOTATIONS: &[&str] = &[
    "description",
    "title",
    "examples",
    "example",
    "format",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
];

/// Resolves `#/...` references inside `document`.
pub fn resolve<'a>(document: &'a Value, value: &'a Value) -> &'a Value {
    let mut value = value;
    while let Some(reference) = value.get("$ref").and_then(Value::as_str) {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local references: {reference}"));
        value = document
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling reference {reference}"));
    }
    value
}

fn type_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(number) if number.is_i64() || number.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(name: &str, value: &Value) -> bool {
    let actual = type_of(value);
    name == actual || (name == "number" && actual == "integer")
}

/// Checks `value` against `schema`; the error names where (`at`, a path
/// like `data.events[2].type`) and what.
pub fn validate(document: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    check(document, schema, value, at, false)
}

/// As [`validate`], for an answer the docs promise: the string `…` stands
/// for any value there (an id, a time, a duration).
pub fn validate_promise(
    document: &Value,
    schema: &Value,
    value: &Value,
    at: &str,
) -> Result<(), String> {
    check(document, schema, value, at, true)
}

fn check(
    document: &Value,
    schema: &Value,
    value: &Value,
    at: &str,
    wildcards: bool,
) -> Result<(), String> {
    if wildcards && value == "…" {
        return Ok(());
    }
    let validate = |document: &Value, schema: &Value, value: &Value, at: &str| {
        check(document, schema, value, at, wildcards)
    };
    let schema = resolve(document, schema);
    let Some(rules) = schema.as_object() else {
        return match schema {
            Value::Bool(true) => Ok(()),
            _ => Err(format!("{at}: schema {schema} is not an object")),
        };
    };
    let fail = |what: String| Err(format!("{at}: {what} (value {value})"));
    for (keyword, rule) in rules {
        match keyword.as_str() {
            "$ref" => {}
            "type" => {
                let names: Vec<&str> = match rule {
                    Value::String(name) => vec![name.as_str()],
                    Value::Array(names) => names.iter().filter_map(Value::as_str).collect(),
                    _ => return fail(format!("bad type {rule}")),
                };
                if !names.iter().any(|name| type_matches(name, value)) {
                    return fail(format!("is {}, not {}", type_of(value), names.join(" or ")));
                }
            }
            "const" => {
                if value != rule {
                    return fail(format!("must be {rule}"));
                }
            }
            "enum" => {
                if !rule.as_array().is_some_and(|items| items.contains(value)) {
                    return fail(format!("must be one of {rule}"));
                }
            }
            "properties" | "required" | "additionalProperties" | "maxProperties" => {
                let Some(object) = value.as_object() else {
                    continue;
                };
                match keyword.as_str() {
                    "properties" => {
                        for (name, property) in rule.as_object().into_iter().flatten() {
                            if let Some(member) = object.get(name) {
                                validate(document, property, member, &format!("{at}.{name}"))?;
                            }
                        }
                    }
                    "required" => {
                        for name in rule.as_array().into_iter().flatten() {
                            let name = name.as_str().unwrap_or_default();
                            if !object.contains_key(name) {
                                return fail(format!("lacks required `{name}`"));
                            }
                        }
                    }
                    "additionalProperties" => {
                        let known = rules.get("properties").and_then(Value::as_object);
                        for (name, member) in object {
                            if known.is_some_and(|known| known.contains_key(name)) {
                                continue;
                            }
                            match rule {
                                Value::Bool(false) => {
                                    return fail(format!("has undocumented `{name}`"))
                                }
                                Value::Bool(true) => {}
                                schema => {
                                    validate(document, schema, member, &format!("{at}.{name}"))?
                                }
                            }
                        }
                    }
                    _ => {
                        if object.len() as u64 > rule.as_u64().unwrap_or(u64::MAX) {
                            return fail(format!("has more than {rule} members"));
                        }
                    }
                }
            }
            "items" | "minItems" | "maxItems" => {
                let Some(items) = value.as_array() else {
                    continue;
                };
                match keyword.as_str() {
                    "items" => {
                        for (index, item) in items.iter().enumerate() {
                            validate(document, rule, item, &format!("{at}[{index}]"))?;
                        }
                    }
                    "minItems" if (items.len() as u64) < rule.as_u64().unwrap_or(0) => {
                        return fail(format!("has fewer than {rule} items"))
                    }
                    "maxItems" if items.len() as u64 > rule.as_u64().unwrap_or(u64::MAX) => {
                        return fail(format!("has more than {rule} items"))
                    }
                    _ => {}
                }
            }
            "minLength" | "maxLength" => {
                let Some(text) = value.as_str() else {
                    continue;
                };
                let length = text.chars().count() as u64;
                let limit = rule.as_u64().unwrap_or(0);
                if (keyword == "minLength" && length < limit)
                    || (keyword == "maxLength" && length > limit)
                {
                    return fail(format!("{keyword} {limit}"));
                }
            }
            "minimum" | "maximum" => {
                let (Some(number), Some(limit)) = (value.as_f64(), rule.as_f64()) else {
                    continue;
                };
                if (keyword == "minimum" && number < limit)
                    || (keyword == "maximum" && number > limit)
                {
                    return fail(format!("{keyword} {limit}"));
                }
            }
            "allOf" => {
                for part in rule.as_array().into_iter().flatten() {
                    validate(document, part, value, at)?;
                }
            }
            "anyOf" | "oneOf" => {
                let parts = rule.as_array().cloned().unwrap_or_default();
                let results: Vec<Result<(), String>> = parts
                    .iter()
                    .map(|part| validate(document, part, value, at))
                    .collect();
                let passed = results.iter().filter(|result| result.is_ok()).count();
                let wanted = if keyword == "oneOf" {
                    passed == 1
                } else {
                    passed >= 1
                };
                if !wanted {
                    let reasons: Vec<String> =
                        results.into_iter().filter_map(Result::err).collect();
                    return fail(format!(
                        "{keyword}: {passed} of {} alternatives match ({})",
                        parts.len(),
                        reasons.join("; ")
                    ));
                }
            }
            annotation if ANNOTATIONS.contains(&annotation) => {}
            unknown => return Err(format!("{at}: schema keyword `{unknown}` is not supported")),
        }
    }
    Ok(())
}

#[test]
fn the_validator_checks_what_it_claims() {
    let document = serde_json::json!({"components": {"schemas": {
        "Thing": {"type": "object", "required": ["a"], "additionalProperties": false,
                  "properties": {"a": {"type": ["string", "null"], "maxLength": 3},
                                 "b": {"type": "array", "maxItems": 1, "items": {"enum": [1, 2]}}}},
        "Either": {"oneOf": [{"const": 1}, {"type": "integer", "minimum": 2}]}
    }}});
    let thing = serde_json::json!({"$ref": "#/components/schemas/Thing"});
    let check = |value: Value| validate(&document, &thing, &value, "x");
    assert!(check(serde_json::json!({"a": "abc", "b": [2]})).is_ok());
    assert!(check(serde_json::json!({"a": null})).is_ok());
    for bad in [
        serde_json::json!({}),
        serde_json::json!({"a": "abcd"}),
        serde_json::json!({"a": 1}),
        serde_json::json!({"a": "", "c": 1}),
        serde_json::json!({"a": "", "b": [3]}),
        serde_json::json!({"a": "", "b": [1, 2]}),
    ] {
        assert!(check(bad.clone()).is_err(), "{bad}");
    }
    let either = serde_json::json!({"$ref": "#/components/schemas/Either"});
    assert!(validate(&document, &either, &serde_json::json!(1), "x").is_ok());
    assert!(validate(&document, &either, &serde_json::json!(5), "x").is_ok());
    assert!(validate(&document, &either, &serde_json::json!(0), "x").is_err());
    let unknown = serde_json::json!({"pattern": "a+"});
    assert!(validate(&document, &unknown, &serde_json::json!("a"), "x").is_err());
}
