use super::*;

const GOOD: &str = r#"
[[service]]
name = "kv"
vip = "198.18.0.100"
ports = [7000, 7001]
protocol = "udp"
tag = { kind = "udp-payload", offset = 2, length = 8 }

[[service.instance]]
name = "kv-0"
veth = "slc-kv0"
mac = "02:00:5e:10:00:01"

[[service.instance]]
name = "kv-1"
veth = "slc-kv1"
netns = "kv1"

[[service]]
name = "web"
vip = "fd00:5100::100"
port = 443
protocol = "tcp"

[[service.instance]]
name = "web-0"
veth = "slc-web0"
"#;

/// Service `kv` (L4) with instance `kv-0`, service `web` (http) with
/// `web-0`.
pub(crate) const BASE: &str = r#"
[[service]]
name = "kv"
vip = "198.18.0.100"
port = 7000
protocol = "udp"

[[service.instance]]
name = "kv-0"
veth = "slc-kv0"

[[service]]
name = "web"
vip = "198.18.0.101"
port = 80
protocol = "tcp"
layer = "http"

[[service.instance]]
name = "web-0"
veth = "slc-web0"
addr = "198.18.16.2:8080"
"#;

pub(crate) fn spec(service: &str, name: &str, veth: &str) -> InstanceSpec {
    InstanceSpec {
        service: service.into(),
        name: name.into(),
        veth: veth.into(),
        ..InstanceSpec::default()
    }
}

pub(crate) fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"))
}

/// The one field error of `text`.
pub(crate) fn only_error(text: &str) -> FieldError {
    match parse(text) {
        Err(ConfigError::Invalid { errors, .. }) if errors.len() == 1 => errors[0].clone(),
        other => panic!("expected one field error, got {other:?}"),
    }
}

fn field_of(text: &str) -> String {
    only_error(text).field
}

#[test]
fn good_config_parses() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.services.len(), 2);
    assert_eq!(c.services[0].ports, vec![7000, 7001]);
    assert_eq!(
        c.services[0].tag,
        TagSpec::UdpPayload {
            offset: 2,
            length: 8
        }
    );
    assert_eq!(
        c.services[0].instances[0].mac,
        Some([2, 0, 0x5e, 0x10, 0, 1])
    );
    assert_eq!(c.services[0].instances[1].netns.as_deref(), Some("kv1"));
    assert_eq!(c.services[1].tag, TagSpec::None);
    assert_eq!(c.services[1].protocols, vec![Protocol::Tcp]);
    assert_eq!(c.instance_count(), 3);
}

const CLUSTER: &str = r#"
[cluster]
store = "etcd"
host = "host-a"
underlay = "198.18.1.1"
etcd_endpoints = ["http://198.18.0.1:2379"]
"#;

#[test]
fn a_cluster_table_parses_and_its_absence_means_one_host() {
    assert_eq!(parse(GOOD).unwrap().cluster, ClusterConfig::default());
    let c = parse(&format!("{CLUSTER}{GOOD}")).unwrap().cluster;
    assert_eq!(c.store, StoreKind::Etcd);
    assert_eq!(c.host, "host-a");
    assert_eq!(c.underlay, Some("198.18.1.1".parse().unwrap()));
    assert_eq!(c.etcd_endpoints, ["http://198.18.0.1:2379"]);
    assert_eq!(c.name, "default");
    assert_eq!(c.lease_ttl, Duration::from_secs(5));
    assert_eq!(c.fence_port, DEFAULT_FENCE_PORT);
    let c = parse(&format!("{CLUSTER}fence_port = 7001\n{GOOD}"))
        .unwrap()
        .cluster;
    assert_eq!(c.fence_port, 7001);
}

#[test]
fn cluster_errors_name_the_field_and_the_fix() {
    let with = |a: &str, b: &str| format!("{}{GOOD}", CLUSTER.replace(a, b));
    let cases = [
        (
            with("\"etcd\"", "\"zookeeper\""),
            "cluster.store",
            "embedded",
        ),
        (
            with("host = \"host-a\"\n", ""),
            "cluster.host",
            "name this host",
        ),
        (with("host-a", "host a"), "cluster.host", "letters, digits"),
        (
            with("underlay = \"198.18.1.1\"\n", ""),
            "cluster.underlay",
            "underlay =",
        ),
        (
            with("198.18.1.1", "127.0.0.1"),
            "cluster.underlay",
            "unicast",
        ),
        (
            with("198.18.1.1", "198.18.1"),
            "cluster.underlay",
            "unicast",
        ),
        (
            with("[\"http://198.18.0.1:2379\"]", "[]"),
            "cluster.etcd_endpoints",
            "list the etcd members",
        ),
        (
            with("http://", "https://"),
            "cluster.etcd_endpoints[0]",
            "http://address:port",
        ),
        (
            with(":2379", ""),
            "cluster.etcd_endpoints[0]",
            "http://address:port",
        ),
        (
            with("[\"http://198.18.0.1:2379\"]", "\"http://198.18.0.1:2379\""),
            "cluster.etcd_endpoints",
            "etcd_endpoints = [",
        ),
        (
            with("\"etcd\"", "\"embedded\""),
            "cluster.etcd_endpoints",
            "store = \"etcd\"",
        ),
        (
            format!("{CLUSTER}lease_ttl_secs = 0\n{GOOD}"),
            "cluster.lease_ttl_secs",
            "from 1 to 600",
        ),
        (
            format!("{CLUSTER}hots = \"x\"\n{GOOD}"),
            "cluster.hots",
            "spelling",
        ),
    ];
    for (text, field, fix) in cases {
        let e = only_error(&text);
        assert_eq!(e.field, field, "{e:?}");
        assert!(e.fix.contains(fix), "{field}: {e:?}");
    }
}

#[test]
fn errors_name_the_field() {
    let cases = [
        (
            GOOD.replace("198.18.0.100", "198.18.0.300"),
            "service[0].vip",
        ),
        (
            GOOD.replace("[7000, 7001]", "[7000, 70000]"),
            "service[0].ports",
        ),
        (
            GOOD.replace("[7000, 7001]", "[7000, 7000]"),
            "service[0].ports",
        ),
        (GOOD.replace("\"tcp\"", "\"sctp\""), "service[1].protocol"),
        (
            GOOD.replace("length = 8", "length = 17"),
            "service[0].tag.length",
        ),
        (GOOD.replace("udp-payload", "quic"), "service[0].tag.kind"),
        (
            GOOD.replace("02:00:5e:10:00:01", "01:00:5e:10:00:01"),
            "service[0].instance[0].mac",
        ),
        (
            GOOD.replace("slc-kv1", "slc-kv0"),
            "service[0].instance[1].veth",
        ),
        (
            GOOD.replace("slc-web0", "a-name-longer-than-15"),
            "service[1].instance[0].veth",
        ),
        (
            GOOD.replace("name = \"web\"", "name = \"kv\""),
            "service[1].name",
        ),
        (
            GOOD.replace("name = \"web-0\"", "name = \"kv-0\""),
            "service[1].instance[0].name",
        ),
        (
            GOOD.replace("port = 443", "port = 443\nports = [1]"),
            "service[1].port",
        ),
        (
            GOOD.replace(
                "\"tcp\"",
                "\"tcp\"\ntag = { kind = \"udp-payload\", length = 4 }",
            ),
            "service[1].tag.kind",
        ),
        (
            GOOD.replace(
                "kind = \"udp-payload\", offset = 2, length = 8",
                "kind = \"ipv6-flow-label\"",
            ),
            "service[0].tag.kind",
        ),
        (
            GOOD.replace("\"fd00:5100::100\"", "\"fd00:5100::100\"\nvip2 = 1"),
            "service[1].vip2",
        ),
        (
            GOOD.replace("ports = [7000, 7001]", "ports = [7000, \"x\"]"),
            "service[0].ports",
        ),
        (
            GOOD.replace("length = 8", "length = -1"),
            "service[0].tag.length",
        ),
        (
            GOOD.replace(
                "name = \"web-0\"",
                &format!("name = \"{}\"", "w".repeat(65)),
            ),
            "service[1].instance[0].name",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(field_of(&text), want, "{text}");
    }
}

#[test]
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn a_quic_cid_tag_parses_and_its_errors_name_the_field_and_the_fix() {
    let udp_payload = "kind = \"udp-payload\", offset = 2, length = 8";
    let quic = |spec: &str| GOOD.replace(udp_payload, spec);
    let c = parse(&quic(
        "kind = \"quic-cid\", cid_length = 8, offset = 2, length = 4",
    ))
    .unwrap();
    assert_eq!(
        c.services[0].tag,
        TagSpec::QuicCid {
            cid_length: 8,
            offset: 2,
            length: 4
        }
    );
    let c = parse(&quic("kind = \"quic-cid\", cid_length = 20, length = 16")).unwrap();
    assert_eq!(
        c.services[0].tag,
        TagSpec::QuicCid {
            cid_length: 20,
            offset: 0,
            length: 16
        },
        "offset defaults to 0"
    );
    let cases = [
        (
            quic("kind = \"quic-cid\", length = 4"),
            "service[0].tag.cid_length",
            "missing",
            "set cid_length = 1..20",
        ),
        (
            quic("kind = \"quic-cid\", cid_length = 0, length = 4"),
            "service[0].tag.cid_length",
            "0 bytes is not a QUIC connection id length",
            "use 1 to 20",
        ),
        (
            quic("kind = \"quic-cid\", cid_length = 21, length = 4"),
            "service[0].tag.cid_length",
            "21 bytes",
            "at most 20",
        ),
        (
            quic("kind = \"quic-cid\", cid_length = \"8\", length = 4"),
            "service[0].tag.cid_length",
            "8 bytes",
            "use 1 to 20",
        ),
        (
            quic("kind = \"quic-cid\", cid_length = 8"),
            "service[0].tag.length",
            "missing",
            "set length = 1..16",
        ),
        (
            quic("kind = \"quic-cid\", cid_length = 20, length = 17"),
            "service[0].tag.length",
            "17 bytes is not a supported tag length",
            "use 1 to 16",
        ),
        (
            quic("kind = \"quic-cid\", cid_length = 20, offset = 20, length = 1"),
            "service[0].tag.offset",
            "offset 20 is outside any QUIC connection id",
            "from 0 to 19",
        ),
        (
            quic("kind = \"quic-cid\", cid_length = 8, offset = 2, length = 8"),
            "service[0].tag.length",
            "offset 2 + length 8 reaches past the 8-byte connection id",
            "at most cid_length (8)",
        ),
        (
            GOOD.replace(
                udp_payload,
                "kind = \"quic-cid\", cid_length = 8, length = 4",
            )
            .replace("protocol = \"udp\"", "protocols = [\"udp\", \"tcp\"]"),
            "service[0].tag.kind",
            "a quic-cid tag needs the service to be UDP only",
            "protocol = \"udp\"",
        ),
        (
            quic("kind = \"udp-payload\", cid_length = 8, length = 4"),
            "service[0].tag.cid_length",
            "does not apply to tag kind `udp-payload`",
            "kind = \"quic-cid\"",
        ),
        (
            quic("kind = \"none\", cid_length = 8"),
            "service[0].tag.cid_length",
            "does not apply to tag kind `none`",
            "remove it",
        ),
        (
            quic("kind = \"quic\", cid_length = 8, length = 4"),
            "service[0].tag.kind",
            "unknown tag kind `quic`",
            "\"quic-cid\"",
        ),
    ];
    for (text, field, problem, fix) in cases {
        let e = only_error(&text);
        assert_eq!(e.field, field, "{text}: {e:?}");
        assert!(e.problem.contains(problem), "{field}: {e:?}");
        assert!(e.fix.contains(fix), "{field}: {e:?}");
        assert_eq!(e.line, Some(7), "{field}: the tag's line: {e:?}");
    }
}

#[test]
fn wlm_policy_band_and_plain_names() {
    for (text, want) in [
        (
            GOOD.replace(
                "name = \"web\"",
                "name = \"web\"\nwlm = { policy = \"even\" }",
            ),
            "service[1].wlm.policy",
        ),
        (
            GOOD.replace(
                "name = \"web\"",
                "name = \"web\"\nwlm = { balance_band = 0 }",
            ),
            "service[1].wlm.balance_band",
        ),
        (
            GOOD.replace("name = \"web-0\"", "name = \"../web-0\""),
            "service[1].instance[0].name",
        ),
    ] {
        assert_eq!(field_of(&text), want, "{text}");
    }
    let packed = parse(&GOOD.replace(
        "name = \"web\"",
        "name = \"web\"\nwlm = { policy = \"pack\", balance_band = 0.2 }",
    ))
    .unwrap();
    assert_eq!(packed.services[1].wlm.policy, WlmPolicy::Pack);
    assert!((packed.services[1].wlm.balance_band - 0.2).abs() < 1e-12);
}

/// One container serving several services: a service with several
/// VIPs (v4 and v6) and protocols, and instances of different services
/// behind one veth.
#[test]
fn several_vips_protocols_and_a_shared_container() {
    let web = GOOD
        .replace(
            "vip = \"fd00:5100::100\"",
            "vips = [\"198.18.0.101\", \"fd00:5100::100\"]",
        )
        .replace("protocol = \"tcp\"", "protocols = [\"tcp\", \"udp\"]");
    let c = parse(&web).unwrap();
    assert_eq!(c.services[1].vips.len(), 2);
    assert_eq!(c.services[1].protocols, vec![Protocol::Tcp, Protocol::Udp]);
    assert_eq!(c.services[1].pin, PinMode::Tcp, "TCP among them: pin TCP");
    assert_eq!(c.services[1].endpoints().count(), 4);
    // web-0 in kv-0's container.
    let shared = web.replace(
        "veth = \"slc-web0\"",
        "veth = \"slc-kv0\"\nmac = \"02:00:5e:10:00:01\"",
    );
    assert!(parse(&shared).is_ok(), "{:?}", parse(&shared).err());
    for (text, want, says) in [
        (
            web.replace(
                "veth = \"slc-web0\"",
                "veth = \"slc-kv0\"\nmac = \"02:00:5e:10:00:09\"",
            ),
            "service[1].instance[0].veth",
            "differ",
        ),
        (
            GOOD.replace("slc-kv1", "slc-kv0"),
            "service[0].instance[1].veth",
            "of this service",
        ),
        (
            web.replace("198.18.0.101", "198.18.0.100")
                .replace("port = 443", "port = 7001"),
            "service[1].port",
            "udp 198.18.0.100:7001 already belongs to service `kv`",
        ),
        (
            web.replace("\"tcp\", \"udp\"", "\"tcp\", \"tcp\""),
            "service[1].protocols",
            "listed twice",
        ),
        (
            web.replace("protocols = [\"tcp\", \"udp\"]", "protocols = []"),
            "service[1].protocols",
            "empty list",
        ),
        (
            GOOD.replace("protocol = \"udp\"", "protocols = [\"udp\", \"tcp\"]"),
            "service[0].tag.kind",
            "UDP only",
        ),
        (
            web.replace(
                "protocols = [\"tcp\", \"udp\"]",
                "protocols = [\"tcp\", \"udp\"]\ntag = { kind = \"ipv6-flow-label\" }",
            ),
            "service[1].tag.kind",
            "vip 198.18.0.101 is IPv4",
        ),
        (
            GOOD.replace("port = 443", "port = 443\nvip2 = 1").replace(
                "vip = \"fd00:5100::100\"",
                "vip = \"fd00:5100::100\"\nvips = [\"fd00:5100::101\"]",
            ),
            "service[1].vip",
            "both `vip` and `vips`",
        ),
    ] {
        let e = match parse(&text) {
            Err(ConfigError::Invalid { errors, .. }) => errors[0].clone(),
            other => panic!("expected an error for {want}, got {other:?}"),
        };
        assert_eq!(e.field, want, "{text}");
        assert!(
            e.to_string().contains(says),
            "{want}: `{e}` does not say `{says}`"
        );
    }
}

/// A scalar where a list or table belongs is an error of its field,
/// not a syntax error that hides the rest of the file.
#[test]
fn wrong_shapes_are_errors_of_their_field_and_the_rest_is_still_checked() {
    let text = GOOD
        .replace("ports = [7000, 7001]", "ports = 7000")
        .replace(
            "tag = { kind = \"udp-payload\", offset = 2, length = 8 }",
            "tag = \"udp-payload\"",
        )
        .replace("port = 443", "port = 443\nwlm = 0.8")
        .replace("02:00:5e:10:00:01", "not-a-mac");
    let Err(ConfigError::Invalid { errors, .. }) = parse(&text) else {
        panic!("expected field errors");
    };
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "service[0].ports",
            "service[0].tag",
            "service[0].instance[0].mac",
            "service[1].wlm"
        ],
        "{errors:#?}"
    );
    assert!(
        errors[0].problem.contains("`7000` is not a list"),
        "{}",
        errors[0]
    );
    assert!(errors[0].fix.contains("port = 7000"), "{}", errors[0]);
}

#[test]
fn vlan_and_host_macs() {
    let text = format!(
        "[agent]\nhost_macs = [\"02:00:5e:00:01:01\"]\n{}",
        GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nvlan = 42")
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.agent.host_macs, vec![[2, 0, 0x5e, 0, 1, 1]]);
    assert_eq!((c.services[0].vlan, c.services[1].vlan), (0, 42));

    let bad = GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nvlan = 4095");
    assert_eq!(field_of(&bad), "service[1].vlan");
    let bad = format!("[agent]\nhost_macs = [\"01:00:5e:00:00:01\"]\n{GOOD}");
    assert_eq!(field_of(&bad), "agent.host_macs[0]");
    let bad = format!(
        "[agent]\nhost_macs = [\"02:00:00:00:00:01\", \"02:00:00:00:00:02\", \"02:00:00:00:00:03\", \"02:00:00:00:00:04\"]\n{GOOD}"
    );
    assert_eq!(field_of(&bad), "agent.host_macs");
    // The same endpoint on two VLANs is two services.
    let two = GOOD.replace("fd00:5100::100", "198.18.0.100").replace(
        "port = 443\nprotocol = \"tcp\"",
        "port = 7000\nprotocol = \"udp\"\nvlan = 7",
    );
    assert!(parse(&two).is_ok());
}

#[test]
fn errors_carry_the_line() {
    let line_of = |text: &str| only_error(text).line;
    // GOOD starts with an empty line: `vip` of service 0 is line 4.
    assert_eq!(line_of(&GOOD.replace("198.18.0.100", "nope")), Some(4));
    assert_eq!(line_of(&GOOD.replace("slc-kv1", "slc-kv0")), Some(16));
    assert_eq!(line_of(&GOOD.replace("length = 8", "length = 99")), Some(7));
    assert_eq!(
        line_of(&GOOD.replace("name = \"web-0\"", "name = \"kv-0\"")),
        Some(26)
    );
    let e = parse(&GOOD.replace("\"tcp\"", "\"sctp\""))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("test.toml:23: `service[1].protocol`"), "{e}");
}

#[test]
fn error_message_says_how_to_fix() {
    let e = parse(&GOOD.replace("198.18.0.100", "nope"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("test.toml:4: `service[0].vip`"), "{e}");
    assert!(e.contains("fix: write an IPv4"), "{e}");
}

#[test]
fn too_many_endpoints_are_refused_naming_the_limit() {
    // 2 VIPs × 4,097 ports × 2 protocols = 16,388 endpoints, and `web`.
    let ports: Vec<String> = (10_000..14_097).map(|p| p.to_string()).collect();
    let text = GOOD
        .replace(
            "vip = \"198.18.0.100\"",
            "vips = [\"198.18.0.100\", \"198.18.0.101\"]",
        )
        .replace(
            "ports = [7000, 7001]",
            &format!("ports = [{}]", ports.join(", ")),
        )
        .replace(
            "protocol = \"udp\"\ntag",
            "protocols = [\"udp\", \"tcp\"]\n#tag",
        );
    let e = only_error(&text);
    assert_eq!(e.field, "service[].ports", "{e:?}");
    assert!(e.to_string().contains("16389 endpoints"), "{e}");
    assert!(e.to_string().contains("at most 16384"), "{e}");
    // At the limit it is accepted.
    let ok: Vec<String> = (10_000..14_095).map(|p| p.to_string()).collect();
    let text = text.replace(&ports.join(", "), &ok.join(", "));
    assert!(parse(&text).is_ok(), "{:?}", parse(&text).err());
}

#[test]
fn same_port_on_two_services_is_rejected() {
    let text = GOOD
        .replace("fd00:5100::100", "198.18.0.100")
        .replace("port = 443", "port = 7001")
        .replace("\"tcp\"", "\"udp\"");
    let e = only_error(&text);
    assert_eq!((e.field.as_str(), e.line), ("service[1].port", Some(22)));
}

#[test]
fn every_error_of_a_file_is_reported_at_once() {
    let text = format!(
        "[agent]\ninterval_ms = 10\nspeed = 3\n{}",
        GOOD.replace("198.18.0.100", "nope")
            .replace("\"tcp\"", "\"sctp\"")
            .replace("02:00:5e:10:00:01", "zz:00:5e:10:00:01")
    );
    let e = parse(&text).unwrap_err();
    let got: Vec<(Option<usize>, &str)> = e
        .fields()
        .iter()
        .map(|f| (f.line, f.field.as_str()))
        .collect();
    // Three agent lines come before GOOD (which starts with an empty
    // line), in file order.
    assert_eq!(
        got,
        vec![
            (Some(2), "agent.interval_ms"),
            (Some(3), "agent.speed"),
            (Some(7), "service[0].vip"),
            (Some(15), "service[0].instance[0].mac"),
            (Some(26), "service[1].protocol"),
        ],
        "{e}"
    );
    let shown = e.to_string();
    assert_eq!(shown.lines().count(), 5, "{shown}");
    assert!(
        shown.lines().all(|l| l.starts_with("test.toml:")),
        "{shown}"
    );
    assert!(
        shown.contains("test.toml:3: `agent.speed`: unknown key `speed` in `agent`"),
        "{shown}"
    );
}

#[test]
fn unknown_keys_point_at_their_own_line() {
    let text = GOOD.replace("veth = \"slc-kv1\"", "veth = \"slc-kv1\"\nnetnss = \"kv1\"");
    let e = only_error(&text);
    assert_eq!(
        (e.field.as_str(), e.line),
        ("service[0].instance[1].netnss", Some(17))
    );
}

#[test]
fn syntax_errors_name_the_line() {
    let e = parse(&GOOD.replace("port = 443", "port = = 443")).unwrap_err();
    assert!(matches!(e, ConfigError::Syntax { line: 22, .. }), "{e:?}");
    assert!(e.to_string().starts_with("test.toml:22: "), "{e}");
}

#[test]
fn values_are_typed_and_defaults_apply() {
    let c = parse(GOOD).unwrap();
    assert_eq!(
        c.services[1].vips,
        vec!["fd00:5100::100".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(c.services[1].pin, PinMode::Tcp, "TCP services pin TCP");
    assert_eq!(c.services[0].pin, PinMode::None);
    assert_eq!(c.agent, AgentConfig::default());
    assert_eq!(c.services[0].wlm, WlmConfig::default());
}

#[test]
fn empty_config_is_rejected() {
    assert_eq!(field_of(""), "service");
}

#[test]
fn mac_parsing() {
    assert_eq!(
        parse_mac("02:00:5e:10:00:01"),
        Some([2, 0, 0x5e, 0x10, 0, 1])
    );
    assert_eq!(parse_mac("02:00:5e:10:00"), None);
    assert_eq!(parse_mac("02:00:5e:10:00:01:02"), None);
    assert_eq!(parse_mac("ff:ff:ff:ff:ff:ff"), None);
    assert_eq!(format_mac(&[2, 0, 0x5e, 0x10, 0, 1]), "02:00:5e:10:00:01");
}
