//! The RabbitMQ management API, for what AMQP cannot tell or do: a queue's
//! arguments and effective policy (is there a delivery limit?), unacked
//! counts, and dynamic shovels. Its address comes from the AMQP URL (same
//! host and credentials, port 15672) unless `--management-url` says otherwise.

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use super::OpsError;

#[derive(Clone)]
pub struct Management {
    /// `http://host:15672/api`, no trailing slash.
    base: String,
    user: String,
    password: String,
    /// The virtual host of the AMQP URL, decoded (`/` by default).
    vhost: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Management")
            .field("base", &self.base)
            .field("user", &self.user)
            .field("vhost", &self.vhost)
            .finish()
    }
}

fn mgmt_err(e: impl std::fmt::Display) -> OpsError {
    OpsError::Management(e.to_string())
}

impl Management {
    /// The management API beside the broker of `amqp_url`, or at
    /// `management_url` (`http://[user:password@]host:port[/api]`; credentials
    /// default to the AMQP URL's).
    pub fn new(amqp_url: &str, management_url: Option<&str>) -> Result<Self, OpsError> {
        let amqp = Url::parse(amqp_url).map_err(|e| OpsError::Usage(format!("AMQP URL {amqp_url:?}: {e}")))?;
        let mut user = percent_decode(amqp.username());
        let mut password = amqp.password().map(percent_decode).unwrap_or_default();
        if user.is_empty() {
            // What RabbitMQ clients assume for a URL without credentials.
            user = "guest".into();
            password = "guest".into();
        }
        let vhost = match amqp.path().trim_start_matches('/') {
            "" => "/".to_owned(),
            path => percent_decode(path),
        };
        let base = match management_url {
            Some(url) => {
                let mut parsed =
                    Url::parse(url).map_err(|e| OpsError::Usage(format!("management URL {url:?}: {e}")))?;
                if !parsed.username().is_empty() {
                    user = percent_decode(parsed.username());
                    password = parsed.password().map(percent_decode).unwrap_or_default();
                    let _ = parsed.set_username("");
                    let _ = parsed.set_password(None);
                }
                let text = parsed.as_str().trim_end_matches('/').to_owned();
                if text.ends_with("/api") {
                    text
                } else {
                    format!("{text}/api")
                }
            }
            None => format!("http://{}:15672/api", amqp.host_str().unwrap_or("127.0.0.1")),
        };
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(mgmt_err)?;
        Ok(Self { base, user, password, vhost, http })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    async fn request(&self, method: Method, path: &str, body: Option<&Value>) -> Result<(StatusCode, Value), OpsError> {
        let mut request =
            self.http.request(method, format!("{}{path}", self.base)).basic_auth(&self.user, Some(&self.password));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| OpsError::Management(format!("{}: {e}", self.base)))?;
        let status = response.status();
        let text = response.text().await.map_err(mgmt_err)?;
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status == StatusCode::UNAUTHORIZED {
            return Err(OpsError::Management(format!("{}: user {:?} was refused (401)", self.base, self.user)));
        }
        Ok((status, json))
    }

    /// Liveness: the broker's overview (version, node).
    pub async fn overview(&self) -> Result<Value, OpsError> {
        match self.request(Method::GET, "/overview", None).await? {
            (s, v) if s.is_success() => Ok(v),
            (s, v) => Err(OpsError::Management(format!("GET /overview: {s} {v}"))),
        }
    }

    /// The names of every queue of the vhost.
    pub async fn queue_names(&self) -> Result<Vec<String>, OpsError> {
        let path = format!("/queues/{}?columns=name", encode(&self.vhost));
        match self.request(Method::GET, &path, None).await? {
            (s, Value::Array(queues)) if s.is_success() => {
                Ok(queues.iter().filter_map(|q| q["name"].as_str().map(str::to_owned)).collect())
            }
            (s, v) => Err(OpsError::Management(format!("GET {path}: {s} {v}"))),
        }
    }

    /// A queue's details, `None` if it does not exist.
    pub async fn queue(&self, name: &str) -> Result<Option<Value>, OpsError> {
        let path = format!("/queues/{}/{}", encode(&self.vhost), encode(name));
        match self.request(Method::GET, &path, None).await? {
            (StatusCode::NOT_FOUND, _) => Ok(None),
            (s, v) if s.is_success() => Ok(Some(v)),
            (s, v) => Err(OpsError::Management(format!("GET {path}: {s} {v}"))),
        }
    }

    /// Creates a dynamic shovel (a runtime parameter of component `shovel`).
    pub async fn put_shovel(&self, name: &str, definition: &Value) -> Result<(), OpsError> {
        let path = format!("/parameters/shovel/{}/{}", encode(&self.vhost), encode(name));
        let body = serde_json::json!({ "value": definition });
        match self.request(Method::PUT, &path, Some(&body)).await? {
            (s, _) if s.is_success() => Ok(()),
            (s, v) => Err(OpsError::Management(format!("PUT {path}: {s} {v}"))),
        }
    }

    /// Whether the shovel's definition still exists (a shovel with
    /// `src-delete-after` removes it when done).
    pub async fn shovel_defined(&self, name: &str) -> Result<bool, OpsError> {
        let path = format!("/parameters/shovel/{}/{}", encode(&self.vhost), encode(name));
        match self.request(Method::GET, &path, None).await? {
            (StatusCode::NOT_FOUND, _) => Ok(false),
            (s, _) if s.is_success() => Ok(true),
            (s, v) => Err(OpsError::Management(format!("GET {path}: {s} {v}"))),
        }
    }

    /// The shovel's runtime status (`state`, `reason` when terminated).
    pub async fn shovel_status(&self, name: &str) -> Result<Option<Value>, OpsError> {
        let path = format!("/shovels/{}", encode(&self.vhost));
        match self.request(Method::GET, &path, None).await? {
            (s, Value::Array(items)) if s.is_success() => Ok(items.into_iter().find(|s| s["name"] == name)),
            (StatusCode::NOT_FOUND, _) => {
                Err(OpsError::Management("the shovel plugin (rabbitmq_shovel_management) is not enabled".into()))
            }
            (s, v) => Err(OpsError::Management(format!("GET {path}: {s} {v}"))),
        }
    }

    /// How many connections of the shovel are open (RabbitMQ names them
    /// `Shovel <name>`: one to its source, one to its destination).
    pub async fn shovel_connections(&self, name: &str) -> Result<usize, OpsError> {
        let path = format!("/vhosts/{}/connections?columns=client_properties", encode(&self.vhost));
        let wanted = format!("Shovel {name}");
        match self.request(Method::GET, &path, None).await? {
            (s, Value::Array(items)) if s.is_success() => {
                Ok(items.iter().filter(|c| c["client_properties"]["connection_name"] == wanted.as_str()).count())
            }
            (s, v) => Err(OpsError::Management(format!("GET {path}: {s} {v}"))),
        }
    }

    pub async fn delete_shovel(&self, name: &str) -> Result<(), OpsError> {
        let path = format!("/parameters/shovel/{}/{}", encode(&self.vhost), encode(name));
        match self.request(Method::DELETE, &path, None).await? {
            (s, _) if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            (s, v) => Err(OpsError::Management(format!("DELETE {path}: {s} {v}"))),
        }
    }
}

/// Percent-encodes one path segment (everything but unreserved characters).
pub fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_management_api_sits_beside_the_broker_with_its_credentials() {
        let m = Management::new("amqp://ops:s%40cret@rabbit.internal:5672/%2f", None).unwrap();
        assert_eq!(m.base_url(), "http://rabbit.internal:15672/api");
        assert_eq!((m.user.as_str(), m.password.as_str(), m.vhost()), ("ops", "s@cret", "/"));
        let m = Management::new("amqp://guest:guest@127.0.0.1:5672/prod", Some("https://admin:pw@mq.example:443/"))
            .unwrap();
        assert_eq!(m.base_url(), "https://mq.example/api");
        assert_eq!((m.user.as_str(), m.password.as_str(), m.vhost()), ("admin", "pw", "prod"));
        assert!(!format!("{m:?}").contains("pw"));
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("/"), "%2F");
        assert_eq!(encode("acme.orders.commands.dlq"), "acme.orders.commands.dlq");
        assert_eq!(percent_decode("%2f"), "/");
        assert_eq!(percent_decode("a%"), "a%");
    }
}
