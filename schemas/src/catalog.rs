//! The catalog of bounded contexts: which command types exist, their JSON
//! Schemas, and the Avro schemas of their events. Adding a context means
//! adding its module and one line in [`CONTEXTS`].

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

/// A command type, the JSON Schema its `data` must satisfy, and where in
/// `data` its stream key is: commands of one stream go to one partition.
#[derive(Debug, Clone, Copy)]
pub struct CommandSpec {
    pub ty: &'static str,
    pub schema: &'static str,
    /// JSON pointer of the stream (aggregate) id in `data`, e.g. `/order_id`.
    pub stream_key: &'static str,
}

/// An event type and its Avro schema (full name = `ty`).
#[derive(Debug, Clone, Copy)]
pub struct EventSpec {
    pub ty: &'static str,
    pub avro: &'static str,
}

#[derive(Debug, Clone, Copy)]
pub struct ContextSpec {
    pub name: &'static str,
    pub commands: &'static [CommandSpec],
    pub events: &'static [EventSpec],
}

/// Every bounded context sluice knows.
pub const CONTEXTS: &[ContextSpec] = &[crate::orders::SPEC, crate::patients::SPEC];

pub fn context(name: &str) -> Option<&'static ContextSpec> {
    CONTEXTS.iter().find(|c| c.name == name)
}

/// The context that handles a command type.
pub fn context_of_command(ty: &str) -> Option<&'static ContextSpec> {
    CONTEXTS.iter().find(|c| c.commands.iter().any(|cmd| cmd.ty == ty))
}

/// The stream key of a command's `data` (a string at the type's pointer),
/// or `None` when the type is unknown or the key missing or not a string.
pub fn stream_key<'a>(ty: &str, data: &'a Value) -> Option<&'a str> {
    let spec = CONTEXTS.iter().flat_map(|c| c.commands).find(|cmd| cmd.ty == ty)?;
    data.pointer(spec.stream_key)?.as_str()
}

pub fn event_spec(ty: &str) -> Option<&'static EventSpec> {
    CONTEXTS.iter().flat_map(|c| c.events).find(|e| e.ty == ty)
}

/// Where a JSON pointer inside `data` failed its schema, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DataError {
    pub pointer: String,
    pub problem: String,
}

/// One compiled validator per command schema, built once and shared.
#[derive(Clone)]
pub struct CommandSchemas {
    /// By command type: the default schema's `$id` and its validator.
    by_type: Arc<HashMap<&'static str, (String, Arc<jsonschema::Validator>)>>,
    /// By `$id`, for events that name their schema in `dataschema`.
    by_id: Arc<HashMap<String, (&'static str, Arc<jsonschema::Validator>)>>,
}

impl CommandSchemas {
    pub fn load() -> Self {
        let mut by_type = HashMap::new();
        let mut by_id = HashMap::new();
        for spec in CONTEXTS.iter().flat_map(|c| c.commands) {
            let schema: Value = serde_json::from_str(spec.schema).expect("command schemas are valid JSON");
            let id = schema["$id"].as_str().expect("command schemas have an $id").to_owned();
            let validator = Arc::new(jsonschema::validator_for(&schema).expect("command schemas compile"));
            by_type.insert(spec.ty, (id.clone(), validator.clone()));
            by_id.insert(id, (spec.ty, validator));
        }
        Self { by_type: Arc::new(by_type), by_id: Arc::new(by_id) }
    }

    /// The `$id` of a command type's default schema.
    pub fn default_schema_id(&self, ty: &str) -> Option<&str> {
        self.by_type.get(ty).map(|(id, _)| id.as_str())
    }

    /// The command type a schema `$id` belongs to.
    pub fn type_of_schema(&self, id: &str) -> Option<&'static str> {
        self.by_id.get(id).map(|(ty, _)| *ty)
    }

    /// Validates `data` against a command type's schema; every failure is
    /// reported with its JSON pointer.
    pub fn validate(&self, ty: &str, data: &Value) -> Result<(), Vec<DataError>> {
        let Some((_, validator)) = self.by_type.get(ty) else {
            return Err(vec![DataError { pointer: String::new(), problem: format!("no schema for {ty}") }]);
        };
        let errors: Vec<DataError> = validator
            .iter_errors(data)
            .map(|e| {
                // A missing member is named by where it belongs, not by the
                // object that lacks it (`/lines/0/sku`, not `/lines/0`).
                let mut pointer = e.instance_path().to_string();
                let member = match e.kind() {
                    jsonschema::error::ValidationErrorKind::Required { property } => property.as_str(),
                    jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
                        unexpected.first().map(String::as_str)
                    }
                    _ => None,
                };
                if let Some(name) = member {
                    pointer = format!("{pointer}/{}", name.replace('~', "~0").replace('/', "~1"));
                }
                DataError { pointer, problem: e.to_string() }
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_schema_compiles_and_is_found() {
        let schemas = CommandSchemas::load();
        for spec in CONTEXTS.iter().flat_map(|c| c.commands) {
            let id = schemas.default_schema_id(spec.ty).unwrap();
            assert_eq!(schemas.type_of_schema(id), Some(spec.ty));
        }
        for spec in CONTEXTS.iter().flat_map(|c| c.events) {
            let avro = apache_avro::Schema::parse_str(spec.avro).unwrap();
            assert_eq!(avro.name().unwrap().fullname(None), spec.ty);
        }
    }

    #[test]
    fn every_command_schema_requires_its_stream_key() {
        for spec in CONTEXTS.iter().flat_map(|c| c.commands) {
            let schema: Value = serde_json::from_str(spec.schema).unwrap();
            let key = spec.stream_key.trim_start_matches('/');
            assert!(schema["required"].as_array().unwrap().iter().any(|r| r == key), "{} must require {key}", spec.ty);
            assert_eq!(schema["properties"][key]["type"], "string", "{}: the stream key is a string", spec.ty);
        }
        assert_eq!(stream_key(crate::orders::SHIP_ORDER, &json!({"order_id": "o1"})), Some("o1"));
        assert_eq!(stream_key(crate::orders::SHIP_ORDER, &json!({"order_id": 5})), None);
    }

    #[test]
    fn data_errors_carry_json_pointers() {
        let schemas = CommandSchemas::load();
        let data = json!({"order_id": "o1", "customer_id": "c1", "currency": "EUR",
                          "lines": [{"sku": "x", "quantity": 0, "unit_price_cents": 5}]});
        let errors = schemas.validate(crate::orders::SUBMIT_ORDER, &data).unwrap_err();
        assert_eq!(errors[0].pointer, "/lines/0/quantity");
        // Missing and unknown members are named where they (would) belong.
        let data = json!({"order_id": "o1", "lines": [{"quantity": 1, "unit_price_cents": 5}], "discount": 1});
        let mut pointers: Vec<String> =
            schemas.validate(crate::orders::SUBMIT_ORDER, &data).unwrap_err().into_iter().map(|e| e.pointer).collect();
        pointers.sort();
        assert_eq!(pointers, ["/currency", "/customer_id", "/discount", "/lines/0/sku"]);
    }
}
