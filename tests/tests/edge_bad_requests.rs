//! Every class of bad request against the real edge and RabbitMQ, with no
//! processor running (ingest role only). For each one the test checks the
//! status, the problem document (content type, type, and the attribute,
//! header or JSON pointer it names), and that nothing reached the tenant's
//! queue: the queue is counted straight from the broker after each answer,
//! and the edge answers only after the broker confirmed, so anything queued
//! would already be counted.

use std::time::Duration;

use lapin::types::FieldTable;
use reqwest::header::HeaderValue;
use reqwest::{Method, RequestBuilder};
use serde_json::{json, Value};
use sluice_cli::serve::Role;
use sluice_cli::settings::Settings;
use sluice_ingest::auth::{hash_key, KeyConfig};
use sluice_tests::{
    delete_queue, eventually, orders_queue, partition_queues, publish_raw, queue_depth, rabbitmq_management,
    submit_order, test_settings, Answer, Platform, TestTenant,
};

/// What a refused request's problem must name.
enum Names {
    /// An `errors` entry with this member and value (`attribute`, `header`,
    /// `pointer`, `index`).
    Field(&'static str, Value),
    /// Words of the `detail`.
    Detail(&'static str),
}

/// One bad request and what the edge must answer.
struct Case {
    name: &'static str,
    build: Box<dyn Fn(&Ctx) -> RequestBuilder>,
    status: u16,
    kind: &'static str,
    names: Vec<Names>,
}

fn case(
    name: &'static str,
    status: u16,
    kind: &'static str,
    names: Vec<Names>,
    build: impl Fn(&Ctx) -> RequestBuilder + 'static,
) -> Case {
    Case { name, build: Box::new(build), status, kind, names }
}

fn attribute(name: &'static str) -> Names {
    Names::Field("attribute", json!(name))
}

fn header(name: &'static str) -> Names {
    Names::Field("header", json!(name))
}

fn pointer(pointer: &'static str) -> Names {
    Names::Field("pointer", json!(pointer))
}

/// The platform and tenants a group of cases runs against.
struct Ctx {
    platform: Platform,
    tenant: TestTenant,
    other: TestTenant,
    /// A key of `tenant` that may only send CancelOrder.
    cancel_only_key: String,
    /// What every queue of both tenants (each context's partition queues
    /// and DLQ) must hold: nothing, but for what a test queued on purpose.
    expected: std::sync::Mutex<std::collections::BTreeMap<String, u32>>,
}

impl Ctx {
    async fn start(adjust: impl FnOnce(&mut Settings)) -> Self {
        let (tenant, other) = (TestTenant::new(), TestTenant::new());
        let mut settings = test_settings(&[&tenant, &other]);
        let cancel_only_key = format!("{}-cancel-only", tenant.key);
        settings.tenants[0].keys.push(KeyConfig {
            sha256: hex::encode(hash_key(&cancel_only_key)),
            commands: vec!["com.example.orders.CancelOrder".into()],
            name: "cancel-only".into(),
        });
        adjust(&mut settings);
        let mut queues = std::collections::BTreeMap::new();
        for t in [&tenant, &other] {
            for context in sluice_schemas::catalog::CONTEXTS {
                for queue in partition_queues(&settings, t, context.name) {
                    queues.insert(queue, 0);
                }
                queues.insert(sluice_schemas::names::dead_letter_queue(&t.name, context.name), 0);
            }
        }
        let platform = Platform::start(settings, Role::Ingest).await;
        Self { platform, tenant, other, cancel_only_key, expected: std::sync::Mutex::new(queues) }
    }

    /// `count` more messages in `queue`, queued on purpose.
    fn queued(&self, queue: &str, count: u32) {
        *self.expected.lock().unwrap().get_mut(queue).expect("a queue of the tenants") += count;
    }

    /// Every queue of both tenants holds what was queued on purpose, and
    /// nothing else.
    async fn assert_queues(&self, after: &str) {
        let expected = self.expected.lock().unwrap().clone();
        assert_depths(&expected, after).await;
    }

    fn post(&self) -> RequestBuilder {
        self.platform.http.post(self.platform.url("/events")).bearer_auth(&self.tenant.key)
    }

    /// `request` sent with `key` instead of the tenant's (its one
    /// Authorization header replaced, not added to).
    fn as_key(request: RequestBuilder, key: &str) -> RequestBuilder {
        let (client, request) = request.build_split();
        let mut request = request.expect("a request");
        let value = HeaderValue::from_str(&format!("Bearer {key}")).expect("a header value");
        request.headers_mut().insert(reqwest::header::AUTHORIZATION, value);
        RequestBuilder::from_parts(client, request)
    }

    fn structured(&self, body: impl Into<reqwest::Body>) -> RequestBuilder {
        self.post().header("content-type", "application/cloudevents+json").body(body)
    }

    fn structured_event(&self, event: Value) -> RequestBuilder {
        self.structured(event.to_string())
    }

    fn batch(&self, body: impl Into<reqwest::Body>) -> RequestBuilder {
        self.post().header("content-type", "application/cloudevents-batch+json").body(body)
    }

    /// A valid SubmitOrder of `tenant`, to break one piece of.
    fn event(&self) -> Value {
        submit_order(&self.tenant, &uuid::Uuid::new_v4().to_string(), "order-1", "customer-1")
    }

    fn event_with(&self, attribute: &str, value: Value) -> Value {
        let mut event = self.event();
        event[attribute] = value;
        event
    }

    fn event_without(&self, attribute: &str) -> Value {
        let mut event = self.event();
        event.as_object_mut().unwrap().remove(attribute);
        event
    }

    fn event_with_data(&self, data: Value) -> Value {
        self.event_with("data", data)
    }

    /// Binary mode: the valid headers of a SubmitOrder, minus `without`,
    /// plus `extra`, JSON data in the body.
    fn binary(
        &self,
        without: &[&str],
        extra: &[(&str, &str)],
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> RequestBuilder {
        let mut request = self.post();
        let id = uuid::Uuid::new_v4().to_string();
        let defaults = [
            ("ce-specversion", "1.0"),
            ("ce-id", id.as_str()),
            ("ce-source", self.tenant.source.as_str()),
            ("ce-type", "com.example.orders.SubmitOrder"),
        ];
        for (name, value) in defaults {
            if !without.contains(&name) && !extra.iter().any(|(n, _)| *n == name) {
                request = request.header(name, value);
            }
        }
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.body(body)
    }

    fn good_data() -> Value {
        json!({"order_id": "order-1", "customer_id": "customer-1", "currency": "EUR",
               "lines": [{"sku": "tea", "quantity": 2, "unit_price_cents": 450}]})
    }

    /// Sends every case; checks each answer and that nothing was queued,
    /// on any queue of the tenant or of the other tenant.
    async fn run(&self, cases: Vec<Case>) {
        for case in cases {
            let response = (case.build)(self).send().await.unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let answer = Answer::read(response).await;
            answer.assert_problem(case.status, case.kind, case.name);
            for names in &case.names {
                match names {
                    Names::Field(key, value) => {
                        assert!(
                            answer.names(key, value),
                            "{}: the problem names {key} = {value}; body {}",
                            case.name,
                            answer.body
                        )
                    }
                    Names::Detail(words) => {
                        let detail = answer.body["detail"].as_str().unwrap_or_default();
                        assert!(detail.contains(words), "{}: detail {detail:?} mentions {words:?}", case.name)
                    }
                }
            }
            self.assert_queues(case.name).await;
        }
    }

    /// Once more at the end, after the edge stopped (a publish it confirmed
    /// late would show now), then the queues go.
    async fn finish(self) {
        let Ctx { platform, expected, .. } = self;
        platform.stop().await.unwrap();
        let expected = expected.into_inner().unwrap();
        assert_depths(&expected, "the end").await;
        for queue in expected.keys() {
            delete_queue(queue).await;
        }
    }
}

async fn assert_depths(expected: &std::collections::BTreeMap<String, u32>, after: &str) {
    for (queue, count) in expected {
        assert_eq!(queue_depth(queue).await, *count, "{after}: {queue} holds what was queued on purpose");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_refuses_broken_cloudevents() {
    let ctx = Ctx::start(|_| {}).await;
    let deep = "[".repeat(300) + &"]".repeat(300);
    let cases = vec![
        case("malformed JSON", 400, "malformed", vec![Names::Field("line", json!(1))], |c| {
            c.structured(r#"{"id": "1", "source": "#)
        }),
        case("trailing garbage", 400, "malformed", vec![Names::Detail("not valid JSON")], |c| {
            c.structured(format!("{} x", c.event()))
        }),
        case("empty body", 400, "malformed", vec![Names::Detail("not valid JSON")], |c| c.structured("")),
        case("JSON null", 400, "malformed", vec![attribute("")], |c| c.structured("null")),
        case("an array in structured mode", 400, "malformed", vec![attribute("")], |c| {
            c.structured(format!("[{}]", c.event()))
        }),
        case("invalid UTF-8", 400, "malformed", vec![Names::Detail("UTF-8")], |c| {
            let mut body = c.event().to_string().into_bytes();
            let at = body.len() - 3;
            body[at] = 0xff;
            c.structured(body)
        }),
        case("deeply nested data", 400, "malformed", vec![Names::Detail("recursion")], move |c| {
            let event = c.event().to_string();
            c.structured(event.replacen(r#""data":{"#, &format!(r#""deep":{deep},"data":{{"#), 1))
        }),
        case("missing id", 400, "malformed", vec![attribute("id")], |c| c.structured_event(c.event_without("id"))),
        case("missing source", 400, "malformed", vec![attribute("source")], |c| {
            c.structured_event(c.event_without("source"))
        }),
        case("missing specversion", 400, "malformed", vec![attribute("specversion")], |c| {
            c.structured_event(c.event_without("specversion"))
        }),
        case("missing type", 400, "malformed", vec![attribute("type")], |c| {
            c.structured_event(c.event_without("type"))
        }),
        case(
            "every required attribute missing",
            400,
            "malformed",
            vec![attribute("id"), attribute("source"), attribute("specversion"), attribute("type")],
            |c| c.structured_event(json!({"data": Ctx::good_data()})),
        ),
        case("empty id", 400, "malformed", vec![attribute("id")], |c| {
            c.structured_event(c.event_with("id", json!("")))
        }),
        case("empty source", 400, "malformed", vec![attribute("source")], |c| {
            c.structured_event(c.event_with("source", json!("")))
        }),
        case("numeric id", 400, "malformed", vec![attribute("id")], |c| {
            c.structured_event(c.event_with("id", json!(42)))
        }),
        case("specversion 0.3", 400, "malformed", vec![attribute("specversion")], |c| {
            c.structured_event(c.event_with("specversion", json!("0.3")))
        }),
        case("specversion 1", 400, "malformed", vec![attribute("specversion")], |c| {
            c.structured_event(c.event_with("specversion", json!("1")))
        }),
        case("time that is not a time", 400, "malformed", vec![attribute("time")], |c| {
            c.structured_event(c.event_with("time", json!("yesterday")))
        }),
        case("time without an offset", 400, "malformed", vec![attribute("time")], |c| {
            c.structured_event(c.event_with("time", json!("2026-11-26T10:00:00")))
        }),
        case("source with a space", 400, "malformed", vec![attribute("source")], |c| {
            c.structured_event(c.event_with("source", json!(format!("/{}/my shop", c.tenant.name))))
        }),
        case("source with a broken escape", 400, "malformed", vec![attribute("source")], |c| {
            c.structured_event(c.event_with("source", json!(format!("/{}/shop%zz", c.tenant.name))))
        }),
        case("source with non-ASCII", 400, "malformed", vec![attribute("source")], |c| {
            c.structured_event(c.event_with("source", json!(format!("/{}/café", c.tenant.name))))
        }),
        case("relative dataschema", 400, "malformed", vec![attribute("dataschema")], |c| {
            c.structured_event(c.event_with("dataschema", json!("schemas/1")))
        }),
        case("upper-case extension name", 400, "malformed", vec![attribute("Region")], |c| {
            c.structured_event(c.event_with("Region", json!("eu")))
        }),
        case("extension name over 20 characters", 400, "malformed", vec![attribute("abcdefghijklmnopqrstu")], |c| {
            c.structured_event(c.event_with("abcdefghijklmnopqrstu", json!("x")))
        }),
        case("object as extension value", 400, "malformed", vec![attribute("region")], |c| {
            c.structured_event(c.event_with("region", json!({"name": "eu"})))
        }),
        case("data and data_base64", 400, "malformed", vec![attribute("data_base64")], |c| {
            c.structured_event(c.event_with("data_base64", json!("AAAA")))
        }),
        case("empty subject", 400, "malformed", vec![attribute("subject")], |c| {
            c.structured_event(c.event_with("subject", json!("")))
        }),
        case("numeric datacontenttype", 400, "malformed", vec![attribute("datacontenttype")], |c| {
            c.structured_event(c.event_with("datacontenttype", json!(7)))
        }),
        case("text datacontenttype", 415, "unsupported-media-type", vec![attribute("datacontenttype")], |c| {
            let mut event = c.event_with("datacontenttype", json!("text/plain"));
            event["data"] = json!("order please");
            c.structured_event(event)
        }),
        case(
            "binary data_base64 for a JSON command",
            415,
            "unsupported-media-type",
            vec![attribute("datacontenttype")],
            |c| {
                let mut event = c.event_without("data");
                event["data_base64"] = json!("aGVsbG8=");
                event["datacontenttype"] = json!("application/octet-stream");
                c.structured_event(event)
            },
        ),
        case("no Content-Type", 415, "unsupported-media-type", vec![header("content-type")], |c| {
            c.post().body(c.event().to_string())
        }),
        case("plain JSON without ce-* headers", 415, "unsupported-media-type", vec![header("content-type")], |c| {
            c.post().header("content-type", "application/json").body(c.event().to_string())
        }),
        case("text/plain", 415, "unsupported-media-type", vec![header("content-type")], |c| {
            c.post().header("content-type", "text/plain").body(c.event().to_string())
        }),
        case("a JSON string as the event", 400, "malformed", vec![attribute("")], |c| c.structured(r#""an order""#)),
        case("a JSON number as the event", 400, "malformed", vec![attribute("")], |c| c.structured("42")),
        case("numeric source", 400, "malformed", vec![attribute("source")], |c| {
            c.structured_event(c.event_with("source", json!(7)))
        }),
        case("numeric type", 400, "malformed", vec![attribute("type")], |c| {
            c.structured_event(c.event_with("type", json!(7)))
        }),
        case("boolean id", 400, "malformed", vec![attribute("id")], |c| {
            c.structured_event(c.event_with("id", json!(true)))
        }),
        case("numeric specversion", 400, "malformed", vec![attribute("specversion")], |c| {
            c.structured_event(c.event_with("specversion", json!(1.0)))
        }),
        case("numeric time", 400, "malformed", vec![attribute("time")], |c| {
            c.structured_event(c.event_with("time", json!(1_764_000_000)))
        }),
        case("numeric subject", 400, "malformed", vec![attribute("subject")], |c| {
            c.structured_event(c.event_with("subject", json!(12)))
        }),
        case("numeric dataschema", 400, "malformed", vec![attribute("dataschema")], |c| {
            c.structured_event(c.event_with("dataschema", json!(1)))
        }),
        case("extension name with a dot", 400, "malformed", vec![attribute("my.region")], |c| {
            c.structured_event(c.event_with("my.region", json!("eu")))
        }),
        case("extension name with a hyphen", 400, "malformed", vec![attribute("my-region")], |c| {
            c.structured_event(c.event_with("my-region", json!("eu")))
        }),
        case("array as extension value", 400, "malformed", vec![attribute("region")], |c| {
            c.structured_event(c.event_with("region", json!(["eu", "us"])))
        }),
        case(
            "XML datacontenttype with JSON data",
            415,
            "unsupported-media-type",
            vec![attribute("datacontenttype")],
            |c| c.structured_event(c.event_with("datacontenttype", json!("application/xml"))),
        ),
        case("a CloudEvents XML body", 415, "unsupported-media-type", vec![header("content-type")], |c| {
            c.post().header("content-type", "application/cloudevents+xml").body("<event/>")
        }),
        case("a form post", 415, "unsupported-media-type", vec![header("content-type")], |c| {
            c.post().header("content-type", "application/x-www-form-urlencoded").body("id=1&type=x")
        }),
    ];
    ctx.run(cases).await;
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_mode_refuses_broken_headers_and_bodies() {
    let ctx = Ctx::start(|_| {}).await;
    let data = Ctx::good_data().to_string();
    let cases = vec![
        case("ce-specversion 0.3", 400, "malformed", vec![attribute("specversion")], {
            let data = data.clone();
            move |c| c.binary(&[], &[("ce-specversion", "0.3")], Some("application/json"), data.clone())
        }),
        case("no ce-source", 400, "malformed", vec![attribute("source")], {
            let data = data.clone();
            move |c| c.binary(&["ce-source"], &[], Some("application/json"), data.clone())
        }),
        case("no ce-specversion (ce-id present)", 400, "malformed", vec![attribute("specversion")], {
            let data = data.clone();
            move |c| c.binary(&["ce-specversion"], &[], Some("application/json"), data.clone())
        }),
        case("ce-id twice", 400, "malformed", vec![header("ce-id"), Names::Detail("more than once")], {
            let data = data.clone();
            move |c| c.binary(&[], &[], Some("application/json"), data.clone()).header("ce-id", "second")
        }),
        case("invalid attribute name in a header", 400, "malformed", vec![header("ce-order_id")], {
            let data = data.clone();
            move |c| c.binary(&[], &[("ce-order_id", "o1")], Some("application/json"), data.clone())
        }),
        case("bad percent-encoding", 400, "malformed", vec![header("ce-source")], {
            let data = data.clone();
            move |c| c.binary(&[], &[("ce-source", "/shop%zz")], Some("application/json"), data.clone())
        }),
        case("percent-encoded bytes that are not UTF-8", 400, "malformed", vec![header("ce-subject")], {
            let data = data.clone();
            move |c| c.binary(&[], &[("ce-subject", "%ff%fe")], Some("application/json"), data.clone())
        }),
        case("raw non-ASCII bytes in a header", 400, "malformed", vec![header("ce-subject")], {
            let data = data.clone();
            move |c| {
                c.binary(&[], &[], Some("application/json"), data.clone())
                    .header("ce-subject", HeaderValue::from_bytes(b"caf\xe9").unwrap())
            }
        }),
        case("ce-datacontenttype header", 400, "malformed", vec![header("ce-datacontenttype")], {
            let data = data.clone();
            move |c| {
                c.binary(&[], &[("ce-datacontenttype", "application/json")], Some("application/json"), data.clone())
            }
        }),
        case("ce-data header", 400, "malformed", vec![header("ce-data")], {
            let data = data.clone();
            move |c| c.binary(&[], &[("ce-data", "{}")], Some("application/json"), data.clone())
        }),
        case("ce-time that is not a time", 400, "malformed", vec![attribute("time")], {
            let data = data.clone();
            move |c| c.binary(&[], &[("ce-time", "26/11/2026")], Some("application/json"), data.clone())
        }),
        case("ce-source that decodes to a non-URI", 400, "malformed", vec![attribute("source")], {
            let data = data.clone();
            move |c| {
                let source = format!("/{}/my%20shop", c.tenant.name);
                c.binary(&[], &[("ce-source", source.as_str())], Some("application/json"), data.clone())
            }
        }),
        case("malformed JSON body", 400, "malformed", vec![attribute("data"), Names::Field("line", json!(1))], |c| {
            c.binary(&[], &[], Some("application/json"), r#"{"order_id": "#)
        }),
        case("text/plain data", 415, "unsupported-media-type", vec![attribute("datacontenttype")], |c| {
            c.binary(&[], &[], Some("text/plain"), "two cups of tea")
        }),
        case("XML data", 415, "unsupported-media-type", vec![attribute("datacontenttype")], |c| {
            c.binary(&[], &[], Some("application/xml"), "<order id=\"1\"/>")
        }),
        case("octet-stream data", 415, "unsupported-media-type", vec![attribute("datacontenttype")], |c| {
            c.binary(&[], &[], Some("application/octet-stream"), vec![0u8, 1, 2, 255])
        }),
        case(
            "non-JSON data without a Content-Type",
            415,
            "unsupported-media-type",
            vec![attribute("datacontenttype")],
            |c| c.binary(&[], &[], None, "two cups of tea"),
        ),
        case(
            "JSON data without a Content-Type, failing the schema",
            422,
            "invalid-data",
            vec![pointer("/order_id")],
            |c| c.binary(&[], &[], None, r#"{"order_id": 5}"#),
        ),
        case("data failing the schema", 422, "invalid-data", vec![pointer("/currency")], |c| {
            c.binary(&[], &[], Some("application/json"), r#"{"order_id": "o1", "customer_id": "c1", "currency": "euro", "lines": [{"sku": "x", "quantity": 1, "unit_price_cents": 1}]}"#)
        }),
        case("no body", 422, "invalid-data", vec![attribute("data")], |c| {
            c.binary(&[], &[], Some("application/json"), "")
        }),
        case("no ce-type", 400, "malformed", vec![attribute("type")], {
            let data = data.clone();
            move |c| c.binary(&["ce-type"], &[], Some("application/json"), data.clone())
        }),
        case("no ce-id", 400, "malformed", vec![attribute("id")], {
            let data = data.clone();
            move |c| c.binary(&["ce-id"], &[], Some("application/json"), data.clone())
        }),
        case("empty ce-id", 400, "malformed", vec![attribute("id")], {
            let data = data.clone();
            move |c| c.binary(&[], &[("ce-id", "")], Some("application/json"), data.clone())
        }),
        case("unknown ce-type", 400, "malformed", vec![attribute("type")], {
            let data = data.clone();
            move |c| {
                c.binary(&[], &[("ce-type", "com.example.orders.RefundOrder")], Some("application/json"), data.clone())
            }
        }),
        case("ce-time without an offset", 400, "malformed", vec![attribute("time")], {
            let data = data.clone();
            move |c| c.binary(&[], &[("ce-time", "2026-11-26T10:00:00")], Some("application/json"), data.clone())
        }),
        case("ce-source of another tenant", 403, "forbidden", vec![attribute("source")], {
            let data = data.clone();
            move |c| {
                let source = c.other.source.clone();
                c.binary(&[], &[("ce-source", source.as_str())], Some("application/json"), data.clone())
            }
        }),
        case("ce-source reserved for the process managers", 403, "forbidden", vec![attribute("source")], {
            let data = data.clone();
            move |c| {
                let source = format!("/{}/processes/onboarding", c.tenant.name);
                c.binary(&[], &[("ce-source", source.as_str())], Some("application/json"), data.clone())
            }
        }),
        case("ce-dataschema of an unknown version", 400, "malformed", vec![attribute("dataschema")], {
            let data = data.clone();
            move |c| {
                let schema = "https://sluice.dev/schemas/commands/com.example.orders.SubmitOrder/99";
                c.binary(&[], &[("ce-dataschema", schema)], Some("application/json"), data.clone())
            }
        }),
        case("a type this key may not send, in binary mode", 403, "forbidden", vec![attribute("type")], {
            let data = data.clone();
            move |c| Ctx::as_key(c.binary(&[], &[], Some("application/json"), data.clone()), &c.cancel_only_key)
        }),
        case("another tenant's key in binary mode", 403, "forbidden", vec![attribute("source")], {
            let data = data.clone();
            move |c| Ctx::as_key(c.binary(&[], &[], Some("application/json"), data.clone()), &c.other.key)
        }),
        case("an unknown key in binary mode", 401, "unauthorized", vec![header("authorization")], {
            let data = data.clone();
            move |c| {
                let key = format!("{}x", c.tenant.key);
                Ctx::as_key(c.binary(&[], &[], Some("application/json"), data.clone()), &key)
            }
        }),
        case("a JSON array as data", 422, "invalid-data", vec![pointer("")], |c| {
            c.binary(&[], &[], Some("application/json"), "[1, 2]")
        }),
        case("a quantity of zero in binary mode", 422, "invalid-data", vec![pointer("/lines/0/quantity")], |c| {
            let mut data = Ctx::good_data();
            data["lines"][0]["quantity"] = json!(0);
            c.binary(&[], &[], Some("application/json"), data.to_string())
        }),
    ];
    ctx.run(cases).await;
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_sources_types_and_schemas_are_checked() {
    let ctx = Ctx::start(|_| {}).await;
    let cases = vec![
        case("no Authorization", 401, "unauthorized", vec![header("authorization")], |c| {
            c.platform
                .http
                .post(c.platform.url("/events"))
                .header("content-type", "application/cloudevents+json")
                .body(c.event().to_string())
        }),
        case("Basic instead of Bearer", 401, "unauthorized", vec![header("authorization")], |c| {
            c.platform
                .http
                .post(c.platform.url("/events"))
                .basic_auth(&c.tenant.name, Some(&c.tenant.key))
                .header("content-type", "application/cloudevents+json")
                .body(c.event().to_string())
        }),
        case("empty bearer key", 401, "unauthorized", vec![header("authorization")], |c| {
            c.platform
                .http
                .post(c.platform.url("/events"))
                .header("authorization", "Bearer ")
                .header("content-type", "application/cloudevents+json")
                .body(c.event().to_string())
        }),
        case("unknown key", 401, "unauthorized", vec![header("authorization")], |c| {
            c.platform
                .http
                .post(c.platform.url("/events"))
                .bearer_auth(format!("{}x", c.tenant.key))
                .header("content-type", "application/cloudevents+json")
                .body(c.event().to_string())
        }),
        case("another tenant's source", 403, "forbidden", vec![attribute("source")], |c| {
            c.structured_event(c.event_with("source", json!(c.other.source)))
        }),
        case("another tenant's key for this tenant's source", 403, "forbidden", vec![attribute("source")], |c| {
            c.platform
                .http
                .post(c.platform.url("/events"))
                .bearer_auth(&c.other.key)
                .header("content-type", "application/cloudevents+json")
                .body(c.event().to_string())
        }),
        case("a source that only starts like the tenant's prefix", 403, "forbidden", vec![attribute("source")], |c| {
            c.structured_event(c.event_with("source", json!(format!("/{}-evil/shop", c.tenant.name))))
        }),
        case(
            "a source reserved for the process managers",
            403,
            "forbidden",
            vec![attribute("source"), Names::Detail("reserved for the platform's process managers")],
            |c| c.structured_event(c.event_with("source", json!(format!("/{}/processes/onboarding", c.tenant.name)))),
        ),
        case("a type this key may not send", 403, "forbidden", vec![attribute("type")], |c| {
            c.platform
                .http
                .post(c.platform.url("/events"))
                .bearer_auth(&c.cancel_only_key)
                .header("content-type", "application/cloudevents+json")
                .body(c.event().to_string())
        }),
        case("unknown type", 400, "malformed", vec![attribute("type")], |c| {
            c.structured_event(c.event_with("type", json!("com.example.orders.RefundOrder")))
        }),
        case("unknown dataschema", 400, "malformed", vec![attribute("dataschema")], |c| {
            c.structured_event(c.event_with(
                "dataschema",
                json!("https://sluice.dev/schemas/commands/com.example.orders.SubmitOrder/99"),
            ))
        }),
        case("another type's dataschema", 400, "malformed", vec![attribute("dataschema")], |c| {
            c.structured_event(c.event_with(
                "dataschema",
                json!("https://sluice.dev/schemas/commands/com.example.orders.CancelOrder/1"),
            ))
        }),
        case("a quantity of zero", 422, "invalid-data", vec![pointer("/lines/0/quantity")], |c| {
            let mut data = Ctx::good_data();
            data["lines"][0]["quantity"] = json!(0);
            c.structured_event(c.event_with_data(data))
        }),
        case(
            "two bad lines",
            422,
            "invalid-data",
            vec![pointer("/lines/0/sku"), pointer("/lines/1/unit_price_cents")],
            |c| {
                let mut data = Ctx::good_data();
                data["lines"] = json!([{"sku": "", "quantity": 1, "unit_price_cents": 1}, {"sku": "x", "quantity": 1, "unit_price_cents": -5}]);
                c.structured_event(c.event_with_data(data))
            },
        ),
        case(
            "a missing required field",
            422,
            "invalid-data",
            vec![pointer("/currency"), Names::Detail("at /currency")],
            |c| {
                let mut data = Ctx::good_data();
                data.as_object_mut().unwrap().remove("currency");
                c.structured_event(c.event_with_data(data))
            },
        ),
        case("lines that are not a list", 422, "invalid-data", vec![pointer("/lines")], |c| {
            let mut data = Ctx::good_data();
            data["lines"] = json!("tea");
            c.structured_event(c.event_with_data(data))
        }),
        case("a field the schema does not know", 422, "invalid-data", vec![pointer("/discount")], |c| {
            let mut data = Ctx::good_data();
            data["discount"] = json!(10);
            c.structured_event(c.event_with_data(data))
        }),
        case("data that is a string", 422, "invalid-data", vec![pointer("")], |c| {
            c.structured_event(c.event_with_data(json!("an order")))
        }),
        case("no data", 422, "invalid-data", vec![attribute("data")], |c| c.structured_event(c.event_without("data"))),
        case(
            "CancelOrder data for SubmitOrder",
            422,
            "invalid-data",
            vec![pointer("/customer_id"), pointer("/reason")],
            |c| c.structured_event(c.event_with_data(json!({"order_id": "o1", "reason": "no"}))),
        ),
    ];
    ctx.run(cases).await;
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_refused_whole() {
    let ctx = Ctx::start(|settings| settings.ingest.max_batch = 5).await;
    let cases = vec![
        case("one bad event", 400, "malformed", vec![Names::Field("index", json!(1)), attribute("specversion")], |c| {
            c.batch(json!([c.event(), c.event_with("specversion", json!("2.0")), c.event()]).to_string())
        }),
        case("one item that is not an object", 400, "malformed", vec![Names::Field("index", json!(0))], |c| {
            c.batch(json!(["event", c.event()]).to_string())
        }),
        case("not an array", 400, "malformed", vec![Names::Detail("JSON array")], |c| c.batch(c.event().to_string())),
        case("an empty array", 400, "malformed", vec![Names::Detail("at least one")], |c| c.batch("[]")),
        case("three empty events", 400, "malformed", vec![Names::Detail("3 event(s) of the batch are invalid")], |c| {
            c.batch("[{}, {}, {}]")
        }),
        case("malformed JSON", 400, "malformed", vec![Names::Field("line", json!(1))], |c| {
            c.batch(format!("[{},", c.event()))
        }),
        case(
            "one event of another tenant",
            403,
            "batch-refused",
            vec![Names::Field("index", json!(2)), attribute("source")],
            |c| c.batch(json!([c.event(), c.event(), c.event_with("source", json!(c.other.source))]).to_string()),
        ),
        case(
            "one event failing its schema",
            422,
            "batch-refused",
            vec![Names::Field("index", json!(0)), pointer("/currency")],
            |c| {
                let mut data = Ctx::good_data();
                data["currency"] = json!("eur");
                c.batch(json!([c.event_with_data(data), c.event()]).to_string())
            },
        ),
        case(
            "one event of an unknown type",
            400,
            "batch-refused",
            vec![Names::Field("index", json!(1)), attribute("type")],
            |c| c.batch(json!([c.event(), c.event_with("type", json!("com.example.Nope"))]).to_string()),
        ),
        case("more events than max_batch", 413, "too-large", vec![Names::Detail("at most 5")], |c| {
            c.batch(Value::Array((0..6).map(|_| c.event()).collect()).to_string())
        }),
        case("a null item", 400, "malformed", vec![Names::Field("index", json!(0))], |c| {
            c.batch(json!([null, c.event()]).to_string())
        }),
        case("a nested array", 400, "malformed", vec![Names::Field("index", json!(0))], |c| {
            c.batch(json!([[c.event()]]).to_string())
        }),
        case(
            "one event without an id",
            400,
            "malformed",
            vec![Names::Field("index", json!(1)), attribute("id")],
            |c| c.batch(json!([c.event(), c.event_without("id")]).to_string()),
        ),
        case(
            "one event with a reserved source",
            403,
            "batch-refused",
            vec![Names::Field("index", json!(1)), attribute("source")],
            |c| {
                let reserved = json!(format!("/{}/processes/onboarding", c.tenant.name));
                c.batch(json!([c.event(), c.event_with("source", reserved)]).to_string())
            },
        ),
        case(
            "one event of a type the key may not send",
            403,
            "batch-refused",
            vec![Names::Field("index", json!(0)), attribute("type")],
            |c| Ctx::as_key(c.batch(json!([c.event()]).to_string()), &c.cancel_only_key),
        ),
        case(
            "one event with an unknown dataschema",
            400,
            "batch-refused",
            vec![Names::Field("index", json!(1)), attribute("dataschema")],
            |c| {
                let schema = json!("https://sluice.dev/schemas/commands/com.example.orders.SubmitOrder/99");
                c.batch(json!([c.event(), c.event_with("dataschema", schema)]).to_string())
            },
        ),
        case("a batch without a key", 401, "unauthorized", vec![header("authorization")], |c| {
            c.platform
                .http
                .post(c.platform.url("/events"))
                .header("content-type", "application/cloudevents-batch+json")
                .body(json!([c.event()]).to_string())
        }),
    ];
    ctx.run(cases).await;

    // The same events without the bad one go through, all of them.
    let good: Vec<Value> = (0..5).map(|_| ctx.event()).collect();
    let answer = Answer::read(ctx.batch(Value::Array(good).to_string()).send().await.unwrap()).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    ctx.queued(&orders_queue(&ctx.tenant), 5);
    ctx.assert_queues("the good batch").await;
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_are_refused_before_parsing() {
    let ctx = Ctx::start(|settings| settings.ingest.max_body_bytes = 16 * 1024).await;
    let padding = "x".repeat(20 * 1024);
    let cases = vec![
        case("structured body over the limit", 413, "too-large", vec![Names::Detail("16384 bytes")], {
            let padding = padding.clone();
            move |c| c.structured_event(c.event_with("padding", json!(padding)))
        }),
        case("binary body over the limit", 413, "too-large", vec![Names::Detail("16384 bytes")], {
            let padding = padding.clone();
            move |c| c.binary(&[], &[], Some("application/json"), format!(r#"{{"pad": "{padding}"}}"#))
        }),
        case("batch body over the limit", 413, "too-large", vec![Names::Detail("16384 bytes")], {
            let padding = padding.clone();
            move |c| c.batch(json!([c.event_with("padding", json!(padding))]).to_string())
        }),
    ];
    ctx.run(cases).await;
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_key_gets_429s_and_other_tenants_do_not_notice() {
    let ctx = Ctx::start(|settings| {
        settings.ingest.rate_limit_per_second = 0.25;
        settings.ingest.rate_limit_burst = 3;
    })
    .await;
    // The tenant floods: the 3 of the burst pass, the rest are refused (at
    // one token per 4 s, the flood is over long before another comes).
    let floods = futures::future::join_all(
        (0..20).map(|_| async { Answer::read(ctx.structured_event(ctx.event()).send().await.unwrap()).await }),
    )
    .await;
    let accepted = floods.iter().filter(|a| a.status == 202).count();
    assert_eq!(accepted, 3, "the burst");
    for answer in floods.iter().filter(|a| a.status != 202) {
        answer.assert_problem(429, "rate-limited", "flood");
        let seconds: u64 = answer.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=4).contains(&seconds), "a token comes back every 4 s: Retry-After {seconds}");
    }
    ctx.queued(&orders_queue(&ctx.tenant), 3);
    ctx.assert_queues("429s queue nothing").await;

    // The other tenant, meanwhile, has its whole burst.
    for i in 0..3 {
        let event = submit_order(&ctx.other, &format!("other-{i}"), "order-9", "customer-9");
        let answer = Answer::read(ctx.platform.post_event(&ctx.other, &event).await).await;
        assert_eq!(answer.status, 202, "other tenant, request {i}: {}", answer.body);
    }
    ctx.queued(&orders_queue(&ctx.other), 3);
    ctx.assert_queues("the other tenant's burst").await;

    // Waiting as told is enough.
    let wait: u64 = floods.iter().find(|a| a.status == 429).unwrap().header("retry-after").unwrap().parse().unwrap();
    tokio::time::sleep(Duration::from_secs(wait)).await; // the test is about time passing
    let answer = Answer::read(ctx.structured_event(ctx.event()).send().await.unwrap()).await;
    assert_eq!(answer.status, 202, "after Retry-After: {}", answer.body);
    ctx.queued(&orders_queue(&ctx.tenant), 1);
    ctx.finish().await;
}

/// A broker that refuses: the queue is capped by a policy and full (the
/// queues overflow with reject-publish, so the broker nacks), then unbound
/// from the exchange (a mandatory publish comes back). Both are 503 with
/// Retry-After, and nothing is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_refuses_gets_503_and_nothing_is_queued() {
    let ctx = Ctx::start(|_| {}).await;
    let queue = orders_queue(&ctx.tenant);
    let policy = format!("/policies/%2f/{}-full", ctx.tenant.name);
    let definition = json!({"pattern": format!("^{}$", regex_escape(&queue)), "apply-to": "queues", "priority": 100,
                            "definition": {"max-length": 0}});
    let response = rabbitmq_management(Method::PUT, &policy, Some(definition)).await;
    assert!(response.status().is_success(), "policy: {}", response.status());
    eventually(Duration::from_secs(30), "the policy to apply to the queue", || async {
        let response = rabbitmq_management(Method::GET, &format!("/queues/%2f/{queue}"), None).await;
        let queue: Value = response.json().await.unwrap_or_default();
        (queue["effective_policy_definition"]["max-length"] == 0).then_some(())
    })
    .await;
    // A quorum queue takes messages while it holds no more than max-length,
    // so one message (sent around the edge) makes it full.
    publish_raw(&queue, b"filler", None, FieldTable::default()).await;
    ctx.queued(&queue, 1);
    ctx.assert_queues("the filler").await;
    ctx.run(vec![case("a queue that is full", 503, "unavailable", vec![Names::Detail("nothing was queued")], |c| {
        c.structured_event(c.event())
    })])
    .await;
    let response = rabbitmq_management(Method::DELETE, &policy, None).await;
    assert!(response.status().is_success(), "policy delete: {}", response.status());

    let connection =
        lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_unbind(
            queue.as_str().into(),
            sluice_schemas::names::COMMAND_EXCHANGE.into(),
            sluice_schemas::names::routing_key(&ctx.tenant.name, "orders", 0).into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "bye".into()).await;
    ctx.run(vec![case("no queue bound", 503, "unavailable", vec![Names::Detail("nothing was queued")], |c| {
        c.structured_event(c.event())
    })])
    .await;
    ctx.finish().await;
}

fn regex_escape(s: &str) -> String {
    s.chars().flat_map(|c| if c.is_ascii_alphanumeric() { vec![c] } else { vec!['\\', c] }).collect()
}
