use std::{net::IpAddr, time::Duration};

use super::{parse_days, parse_time};
use crate::config::{
    FailureRule, Launcher, MAX_INSTANCES, TemplateVars, expand,
    tests::{only_error, parse},
};

const WEB: &str = r#"
[[service]]
name = "web"
vip = "198.18.0.100"
port = 80
protocol = "tcp"
wlm = { underload = 0.3 }

[service.scale]
min_instances = 2
max_instances = 5
out_intervals = 4
in_intervals = 20
cooldown_secs = 12.5
drain_deadline_secs = 10
launcher = { kind = "command", start = ["podman", "run", "-d", "--name", "{name}", "--label", "{{x}}", "img:{index}"], stop = ["podman", "rm", "-f", "{name}"], start_timeout_secs = 20 }

[service.scale.failure]
restarts = 2
window_secs = 300

[[service.scale.window]]
days = ["mon-fri"]
from = "08:00"
to = "18:00"
min_instances = 3
overload = 0.6

[[service.scale.window]]
days = ["sat", "sun"]
from = "22:00"
to = "06:00"

[[service.instance]]
name = "web-0"
veth = "w0"
"#;

const COMMAND: &str = r#"launcher = { kind = "command", start = ["podman", "run", "-d", "--name", "{name}", "--label", "{{x}}", "img:{index}"], stop = ["podman", "rm", "-f", "{name}"], start_timeout_secs = 20 }"#;

const NETNS: &str = r#"launcher = { kind = "netns", command = ["python3", "-m", "http.server", "{port}"], subnet = "198.18.96.0/20", routes = ["198.18.0.0/24", "fd00:5100::/64", "198.18.1.1"] }"#;

/// `WEB` with `from` replaced by `to` (which must be there).
fn with(from: &str, to: &str) -> String {
    assert!(WEB.contains(from), "{from}");
    WEB.replacen(from, to, 1)
}

#[test]
fn a_full_scale_table_parses() {
    let c = parse(WEB).unwrap();
    let s = c.services[0].scale.as_ref().unwrap();
    assert_eq!((s.min_instances, s.max_instances), (2, 5));
    assert_eq!((s.out_intervals, s.in_intervals), (4, 20));
    assert_eq!(s.cooldown, Duration::from_millis(12_500));
    assert_eq!(s.drain_deadline, Duration::from_secs(10));
    let Some(Launcher::Command {
        start,
        stop,
        start_timeout,
    }) = &s.launcher
    else {
        panic!("{:?}", s.launcher);
    };
    assert_eq!(start[4], "{name}");
    assert_eq!(stop, &["podman", "rm", "-f", "{name}"]);
    assert_eq!(*start_timeout, Duration::from_secs(20));
    assert_eq!(
        s.failure,
        FailureRule {
            restarts: 2,
            window: Duration::from_mins(5)
        }
    );
    let [day, night] = &s.windows[..] else {
        panic!("{:?}", s.windows);
    };
    assert_eq!(day.days, [true, true, true, true, true, false, false]);
    assert_eq!((day.from, day.to), (8 * 60, 18 * 60));
    assert_eq!((day.min_instances, day.overload), (Some(3), Some(0.6)));
    assert_eq!(night.days, [false, false, false, false, false, true, true]);
    assert_eq!((night.from, night.to), (22 * 60, 6 * 60));
    assert_eq!((night.min_instances, night.overload), (None, None));
}

#[test]
fn defaults_apply_and_no_table_means_no_scaling() {
    let minimal = r#"
[[service]]
name = "web"
vip = "198.18.0.100"
port = 80
protocol = "tcp"
assign = "on-demand"

[service.scale]
max_instances = 3

[[service.instance]]
name = "web-0"
veth = "w0"
"#;
    let c = parse(minimal).unwrap();
    let s = c.services[0].scale.as_ref().unwrap();
    assert_eq!((s.min_instances, s.max_instances), (1, 3));
    assert_eq!((s.out_intervals, s.in_intervals), (5, 30));
    assert_eq!(s.cooldown, Duration::from_secs(30));
    assert_eq!(s.drain_deadline, Duration::from_secs(30));
    assert_eq!(s.launcher, None, "no launcher: failure detection only");
    assert_eq!(s.failure, FailureRule::default());
    assert_eq!(s.failure.restarts, 3);
    assert_eq!(s.failure.window, Duration::from_mins(10));
    assert!(s.windows.is_empty());
    assert!(c.services[0].on_demand, "on-demand services may scale");

    let none = minimal.replace("[service.scale]\nmax_instances = 3\n", "");
    assert_eq!(parse(&none).unwrap().services[0].scale, None);

    // A window without days holds every day; 24:00 ends a day.
    let every = minimal.replace(
        "max_instances = 3\n",
        "max_instances = 3\n[[service.scale.window]]\nfrom = \"18:00\"\nto = \"24:00\"\n",
    );
    let c = parse(&every).unwrap();
    let w = &c.services[0].scale.as_ref().unwrap().windows[0];
    assert_eq!((w.days, w.from, w.to), ([true; 7], 1080, 1440));
}

#[test]
fn a_netns_launcher_parses() {
    let c = parse(&with(COMMAND, NETNS)).unwrap();
    let Some(Launcher::Netns {
        command,
        subnet,
        routes,
        start_timeout,
    }) = &c.services[0].scale.as_ref().unwrap().launcher
    else {
        panic!();
    };
    assert_eq!(command[3], "{port}");
    assert_eq!(*subnet, ("198.18.96.0".parse().unwrap(), 20));
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        routes,
        &[
            (ip("198.18.0.0"), 24),
            (ip("fd00:5100::"), 64),
            (ip("198.18.1.1"), 32)
        ]
    );
    assert_eq!(*start_timeout, Duration::from_secs(30), "default");
}

#[test]
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn scale_errors_name_the_field_the_problem_and_the_fix() {
    let netns = |from: &str, to: &str| with(COMMAND, &NETNS.replacen(from, to, 1));
    let limit = MAX_INSTANCES.to_string();
    let too_many = (MAX_INSTANCES + 1).to_string();
    let cases = [
        (
            with("max_instances = 5", "max_instances = 1"),
            "scale.max_instances",
            "below min_instances 2",
            "at least 2",
        ),
        (
            with("min_instances = 2", "min_instances = 0"),
            "scale.min_instances",
            "0 instances",
            "min_instances = 1",
        ),
        (
            with("max_instances = 5", &format!("max_instances = {too_many}")),
            "scale.max_instances",
            "above the agent's limit",
            &limit,
        ),
        (
            with("max_instances = 5\n", ""),
            "scale.max_instances",
            "missing",
            "add max_instances",
        ),
        (
            with("max_instances = 5", "max_instances = \"5\""),
            "scale.max_instances",
            "not a whole number",
            "whole number",
        ),
        (
            with("cooldown_secs = 12.5", "cooldown_secs = 0"),
            "scale.cooldown_secs",
            "out of range",
            "from 0.001",
        ),
        (
            with("in_intervals = 20", "in_intervals = 0"),
            "scale.in_intervals",
            "out of range",
            "from 1",
        ),
        (
            with(
                "stop = [\"podman\", \"rm\", \"-f\", \"{name}\"]",
                "stop = []",
            ),
            "scale.launcher.stop",
            "empty list",
            "the program",
        ),
        (
            with("start = [\"podman\"", "start = [\"\""),
            "scale.launcher.start[0]",
            "program is an empty string",
            "name the program",
        ),
        (
            with("\"img:{index}\"", "\"img:{host}\""),
            "scale.launcher.start[7]",
            "unknown placeholder `{host}`",
            "{service}, {name}, {vip}, {port}, {index}",
        ),
        (
            with("\"rm\", \"-f\", \"{name}\"", "\"rm\", \"-f\", \"{name\""),
            "scale.launcher.stop[3]",
            "never closed",
            "{{",
        ),
        (
            with("\"{{x}}\"", "\"x}\""),
            "scale.launcher.start[6]",
            "closes nothing",
            "}}",
        ),
        (
            with(
                "start_timeout_secs = 20",
                "start_timeout_secs = 20, image = \"x\"",
            ),
            "scale.launcher.image",
            "unknown key",
            "spelling",
        ),
        (
            with("kind = \"command\"", "kind = \"docker\""),
            "scale.launcher.kind",
            "unknown launcher kind `docker`",
            "\"command\" (your start and stop commands) or \"netns\"",
        ),
        (
            with("kind = \"command\", ", ""),
            "scale.launcher.kind",
            "missing",
            "\"netns\"",
        ),
        (
            with("start_timeout_secs = 20", "subnet = \"198.18.96.0/20\""),
            "scale.launcher.subnet",
            "does not apply to launcher kind `command`",
            "kind = \"netns\"",
        ),
        (
            netns("198.18.96.0/20", "fd00:5100::/64"),
            "scale.launcher.subnet",
            "must be IPv4",
            "IPv4 prefix",
        ),
        (
            netns("198.18.96.0/20", "198.18.96.0/31"),
            "scale.launcher.subnet",
            "/31 is too small",
            "/16 to /30",
        ),
        (
            netns("198.18.96.0/20", "198.0.0.0/8"),
            "scale.launcher.subnet",
            "/8 is too large",
            "/16 to /30",
        ),
        (
            netns("198.18.96.0/20", "198.18.96.1/20"),
            "scale.launcher.subnet",
            "host bits set",
            "198.18.96.0/20",
        ),
        (
            netns("198.18.96.0/20", "198.18.96.0/33"),
            "scale.launcher.subnet",
            "not an address prefix",
            "198.18.96.0/20",
        ),
        (
            netns("subnet = \"198.18.96.0/20\", ", ""),
            "scale.launcher.subnet",
            "missing",
            "subnet =",
        ),
        (
            netns("\"198.18.0.0/24\"", "\"198.18.0.1/24\""),
            "scale.launcher.routes[0]",
            "host bits set",
            "198.18.0.0/24",
        ),
        (
            netns("\"198.18.1.1\"", "\"somewhere\""),
            "scale.launcher.routes[2]",
            "not an address prefix",
            "198.18.0.0/24",
        ),
        (
            netns("command = [", "start = [\"x\"], command = ["),
            "scale.launcher.start",
            "does not apply to launcher kind `netns`",
            "kind = \"command\"",
        ),
        (
            netns("\"{port}\"", "\"{addr}\""),
            "scale.launcher.command[3]",
            "unknown placeholder `{addr}`",
            "{port}",
        ),
        (
            with("from = \"08:00\"", "from = \"8h\""),
            "scale.window[0].from",
            "not a time of day",
            "HH:MM",
        ),
        (
            with("to = \"18:00\"", "to = \"25:00\""),
            "scale.window[0].to",
            "not a time of day",
            "24:00",
        ),
        (
            with("from = \"08:00\"", "from = \"24:00\""),
            "scale.window[0].from",
            "not a time of day",
            "23:59",
        ),
        (
            with("from = \"08:00\"", "from = \"18:00\""),
            "scale.window[0].to",
            "both 18:00",
            "to = \"24:00\"",
        ),
        (
            with("from = \"08:00\"\n", ""),
            "scale.window[0].from",
            "missing",
            "from = ",
        ),
        (
            with("\"mon-fri\"", "\"mon-fry\""),
            "scale.window[0].days[0]",
            "`mon-fry` is not a day",
            "mon, tue",
        ),
        (
            with("\"sat\", \"sun\"", "\"sat\", \"sunday\""),
            "scale.window[1].days[1]",
            "not a day",
            "\"mon-fri\"",
        ),
        (
            with("days = [\"mon-fri\"]", "days = []"),
            "scale.window[0].days",
            "never hold",
            "leave days out",
        ),
        (
            with("min_instances = 3", "min_instances = 0"),
            "scale.window[0].min_instances",
            "outside 1 to max_instances (5)",
            "from 1 to 5",
        ),
        (
            with("min_instances = 3", "min_instances = 6"),
            "scale.window[0].min_instances",
            "outside 1 to max_instances (5)",
            "from 1 to 5",
        ),
        (
            with("overload = 0.6", "overload = 0.3"),
            "scale.window[0].overload",
            "not above the service's wlm.underload 0.3",
            "lower wlm.underload",
        ),
        (
            with("overload = 0.6", "overload = 11"),
            "scale.window[0].overload",
            "out of range",
            "to 10",
        ),
        (
            with("to = \"18:00\"", "to = \"18:00\"\nhours = 3"),
            "scale.window[0].hours",
            "unknown key",
            "spelling",
        ),
        (
            with("restarts = 2", "retries = 2"),
            "scale.failure.retries",
            "unknown key",
            "spelling",
        ),
        (
            with("window_secs = 300", "window_secs = 0"),
            "scale.failure.window_secs",
            "out of range",
            "from 1",
        ),
        (
            with("min_instances = 2", "min_instances = 2\nmin = 1"),
            "scale.min",
            "unknown key",
            "spelling",
        ),
        // Wrong shapes are errors of their field, not syntax errors.
        (
            with(COMMAND, "launcher = \"podman\""),
            "scale.launcher",
            "is not a table",
            "kind = \"command\"",
        ),
        (
            with(
                "stop = [\"podman\", \"rm\", \"-f\", \"{name}\"]",
                "stop = \"podman rm\"",
            ),
            "scale.launcher.stop",
            "is not a list",
            "stop = [\"podman\"",
        ),
        (
            with("days = [\"mon-fri\"]", "days = \"mon-fri\""),
            "scale.window[0].days",
            "is not a list",
            "days = [",
        ),
    ];
    for (text, field, problem, fix) in cases {
        let e = only_error(&text);
        assert_eq!(e.field, format!("service[0].{field}"), "{e}");
        assert!(e.problem.contains(problem), "{field}: {e}");
        assert!(e.fix.contains(fix), "{field}: {e}");
        assert!(e.line.is_some(), "{field}: {e}");
    }
}

#[test]
fn the_bounds_count_the_configured_instances() {
    let two = with(
        "[[service.instance]]",
        "[[service.instance]]\nname = \"web-1\"\nveth = \"w1\"\n\n[[service.instance]]",
    );
    assert!(parse(&two).is_ok());
    let over = two
        .replace("min_instances = 2", "min_instances = 1")
        .replace("max_instances = 5", "max_instances = 1")
        .replace("min_instances = 3", "min_instances = 1");
    let e = only_error(&over);
    assert_eq!(e.field, "service[0].scale.max_instances", "{e}");
    assert!(
        e.problem.contains("2 instances are configured, more than"),
        "{e}"
    );
    assert!(e.fix.contains("at least 2"), "{e}");
    // Fewer configured than min_instances is fine: the agent launches.
    let c = parse(&with("min_instances = 2", "min_instances = 4")).unwrap();
    assert_eq!(c.services[0].instances.len(), 1);
}

#[test]
fn a_scale_table_of_the_wrong_shape_is_an_error_of_its_field() {
    let text = WEB
        .split("[service.scale]")
        .next()
        .unwrap()
        .replace("protocol = \"tcp\"", "protocol = \"tcp\"\nscale = 5")
        + "[[service.instance]]\nname = \"web-0\"\nveth = \"w0\"\n";
    let e = only_error(&text);
    assert_eq!(e.field, "service[0].scale", "{e}");
    assert!(e.problem.contains("is not a table"), "{e}");
}

#[test]
fn days_and_times_parse() {
    assert_eq!(parse_days("mon"), Some(vec![0]));
    assert_eq!(parse_days("Sun"), Some(vec![6]));
    assert_eq!(parse_days("mon-fri"), Some(vec![0, 1, 2, 3, 4]));
    assert_eq!(parse_days("fri-mon"), Some(vec![4, 5, 6, 0]), "wraps");
    assert_eq!(parse_days("wed-wed"), Some(vec![2]));
    assert_eq!(parse_days("monday"), None);
    assert_eq!(parse_days("mon-"), None);
    assert_eq!(parse_time("00:00", false), Some(0));
    assert_eq!(parse_time("8:05", false), Some(485));
    assert_eq!(parse_time("23:59", false), Some(1439));
    assert_eq!(parse_time("24:00", true), Some(1440));
    for bad in [
        "24:00", "12:60", "12", "12:5", "-1:00", "12:0a", "123:00", ":00",
    ] {
        assert_eq!(parse_time(bad, false), None, "{bad}");
    }
    assert_eq!(parse_time("24:01", true), None);
}

#[test]
fn templates_expand_their_placeholders() {
    let vars = TemplateVars {
        service: "web",
        name: "web-3",
        vip: "198.18.0.100".parse().unwrap(),
        port: 80,
        index: 3,
    };
    assert_eq!(
        expand("{service}/{name}@{vip}:{port}#{index}", &vars),
        "web/web-3@198.18.0.100:80#3"
    );
    assert_eq!(expand("{{.ID}}", &vars), "{.ID}");
    assert_eq!(expand("plain", &vars), "plain");
    assert_eq!(expand("", &vars), "");
}
