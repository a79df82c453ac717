use crate::config::{
    ConfigError, FieldError, RequestKey, RequestMatch,
    tests::{only_error, parse},
};

const WEB: &str = r#"
[[service]]
name = "web"
vip = "198.18.1.1"
port = 80
protocol = "tcp"
layer = "http"

[service.http]
key = { header = "X-User" }
pool_size = 8
header_timeout_ms = 2000

[[service.http.priority]]
name = "gold"
header = "X-Tier"
value = "gold"
instances = ["web-2"]

[[service.http.priority]]
name = "checkout"
path_prefix = "/checkout"
instances = ["web-2"]

[[service.instance]]
name = "web-0"
veth = "i0"
addr = "198.18.16.2:8080"

[[service.instance]]
name = "web-1"
veth = "i1"
addr = "198.18.17.2:8080"

[[service.instance]]
name = "web-2"
veth = "i2"
addr = "[fd00:5100:0:18::2]:8080"
"#;

fn errors(text: &str) -> Vec<FieldError> {
    match parse(text) {
        Err(ConfigError::Invalid { errors, .. }) => errors,
        other => panic!("expected field errors, got {other:?}"),
    }
}

/// `WEB` with `from` replaced by `to`: its one error.
fn one_error(from: &str, to: &str) -> FieldError {
    assert!(WEB.contains(from), "{from}");
    only_error(&WEB.replacen(from, to, 1))
}

#[test]
fn an_http_service_parses_with_its_rules_and_limits() {
    let c = parse(WEB).unwrap();
    let s = &c.services[0];
    let h = s.http.as_ref().unwrap();
    assert_eq!(h.key, Some(RequestKey::Header("x-user".into())));
    assert_eq!(h.pool_size, 8);
    assert_eq!(h.limits.header_timeout.as_millis(), 2000);
    assert_eq!(h.limits.max_header_bytes, 16 * 1024, "default");
    assert_eq!(
        h.priority[0].when,
        RequestMatch::Header {
            name: "x-tier".into(),
            value: "gold".into()
        }
    );
    assert_eq!(
        h.priority[1].when,
        RequestMatch::PathPrefix("/checkout".into())
    );
    assert!(s.is_reserved("web-2") && !s.is_reserved("web-0"));
    assert_eq!(s.instances[2].addr.unwrap().port(), 8080);
}

#[test]
fn http_errors_name_the_field_and_the_fix() {
    for (from, to, field, says) in [
        (
            "layer = \"http\"",
            "layer = \"http2\"",
            "service[0].layer",
            "unknown layer",
        ),
        (
            "protocol = \"tcp\"",
            "protocol = \"udp\"",
            "service[0].protocol",
            "TCP only",
        ),
        (
            "addr = \"198.18.16.2:8080\"",
            "",
            "service[0].instance[0].addr",
            "missing",
        ),
        (
            "addr = \"198.18.16.2:8080\"",
            "addr = \"198.18.16.2\"",
            "service[0].instance[0].addr",
            "not an address and port",
        ),
        (
            "key = { header = \"X-User\" }",
            "key = { header = \"X User\" }",
            "service[0].http.key.header",
            "not a header or cookie name",
        ),
        (
            "key = { header = \"X-User\" }",
            "key = { header = \"X-User\", cookie = \"u\" }",
            "service[0].http.key",
            "one is needed",
        ),
        (
            "key = { header = \"X-User\" }",
            "key = { path_segment = 0 }",
            "service[0].http.key.path_segment",
            "out of range",
        ),
        (
            "pool_size = 8",
            "pool_size = 0",
            "service[0].http.pool_size",
            "out of range",
        ),
        (
            "pool_size = 8",
            "pool_size = 8\nmax_connections = 0",
            "service[0].http.max_connections",
            "out of range",
        ),
        (
            "instances = [\"web-2\"]",
            "instances = [\"web-9\"]",
            "service[0].http.priority[0].instances",
            "not an instance of this service",
        ),
        (
            "value = \"gold\"\n",
            "",
            "service[0].http.priority[0].value",
            "missing",
        ),
        (
            "path_prefix = \"/checkout\"",
            "path_prefix = \"checkout\"",
            "service[0].http.priority[1].path_prefix",
            "does not start with `/`",
        ),
        (
            "layer = \"http\"",
            "layer = \"http\"\ntag = { kind = \"none\" }",
            "service[0].tag",
            "no meaning for an http service",
        ),
    ] {
        let e = one_error(from, to);
        assert_eq!(e.field, field, "{e}");
        assert!(e.problem.contains(says), "{e}");
        assert!(!e.fix.is_empty(), "{e}");
    }
}

#[test]
fn an_idle_timeout_shorter_than_the_response_timeout_is_refused() {
    let e = one_error(
        "header_timeout_ms = 2000",
        "idle_timeout_secs = 10\nresponse_timeout_ms = 30000",
    );
    assert_eq!(e.field, "service[0].http.idle_timeout_secs", "{e}");
    assert!(
        e.problem.contains("idle_timeout_secs = 10")
            && e.problem.contains("response_timeout_ms = 30000"),
        "{e}"
    );
    assert!(e.fix.contains("at least 30"), "{e}");
    assert_eq!(e.line, Some(12), "at idle_timeout_secs: {e}");
    // The default idle time (60 s) against a longer response timeout:
    // the error points at the one written.
    let e = one_error("header_timeout_ms = 2000", "response_timeout_ms = 90000");
    assert_eq!(e.field, "service[0].http.idle_timeout_secs", "{e}");
    assert!(e.fix.contains("at least 90"), "{e}");
    assert_eq!(e.line, Some(12), "at response_timeout_ms: {e}");
    let equal = WEB.replace(
        "header_timeout_ms = 2000",
        "idle_timeout_secs = 30\nresponse_timeout_ms = 30000",
    );
    assert!(parse(&equal).is_ok(), "equal timeouts");
}

#[test]
fn max_connections_is_given_or_left_to_the_distributor() {
    let given = WEB.replace("pool_size = 8", "pool_size = 8\nmax_connections = 500");
    let limits = |text: &str| {
        parse(text).unwrap().services[0]
            .http
            .clone()
            .unwrap()
            .limits
    };
    assert_eq!(limits(&given).max_connections, Some(500));
    assert_eq!(limits(WEB).max_connections, None, "derived");
}

#[test]
fn every_instance_reserved_needs_spill() {
    let all = WEB.replace(
        "instances = [\"web-2\"]",
        "instances = [\"web-0\", \"web-1\", \"web-2\"]",
    );
    let e = errors(&all);
    assert!(
        e.iter()
            .any(|e| e.field == "service[0].http.priority" && e.fix.contains("spill")),
        "{e:#?}"
    );
    let spill = all.replace("pool_size = 8", "pool_size = 8\nspill = true");
    assert!(parse(&spill).is_ok());
}

#[test]
fn an_l4_service_takes_no_http_settings() {
    let l4 = WEB.replace("layer = \"http\"\n", "");
    let e = errors(&l4);
    let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
    assert!(fields.contains(&"service[0].http"), "{fields:?}");
    assert!(
        fields.contains(&"service[0].instance[0].addr"),
        "{fields:?}"
    );
}
