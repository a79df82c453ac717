use super::*;
use crate::config::tests::parse;

const BASE: &str = r#"
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

fn inst(service: &str, name: &str, veth: &str) -> InstanceSpec {
    InstanceSpec {
        service: service.into(),
        name: name.into(),
        veth: veth.into(),
        ..InstanceSpec::default()
    }
}

/// The one error a registration of `i` meets; `c` is left as it was.
fn refused(c: &mut Config, i: &InstanceSpec) -> FieldError {
    let before = c.clone();
    let mut e = c.add_instance(i).expect_err("refused");
    assert_eq!(*c, before, "a refused registration changes nothing");
    assert_eq!(e.len(), 1, "{e:?}");
    e.remove(0)
}

#[test]
fn a_good_instance_joins_its_service() {
    let mut c = parse(BASE).unwrap();
    c.add_instance(&inst("kv", "kv-1", "slc-kv1")).unwrap();
    assert_eq!(c.services[0].instances.len(), 2);
    assert!(c.has_instance("kv-1"));
    assert_eq!(c.remove_instance("kv-1").unwrap().veth, "slc-kv1");
    assert!(!c.has_instance("kv-1"));
    assert!(c.remove_instance("kv-1").is_none());
}

#[test]
fn bad_registrations_name_the_field() {
    let mut c = parse(BASE).unwrap();
    assert_eq!(refused(&mut c, &inst("nope", "x", "v")).field, "service");
    assert_eq!(refused(&mut c, &inst("kv", "", "v")).field, "name");
    assert_eq!(refused(&mut c, &inst("kv", "../x", "v")).field, "name");
    let taken = refused(&mut c, &inst("kv", "web-0", "v"));
    assert!(taken.problem.contains("in use"), "{taken}");
    assert_eq!(refused(&mut c, &inst("kv", "kv-1", "a/b")).field, "veth");
    let dup = refused(&mut c, &inst("kv", "kv-1", "slc-kv0"));
    assert!(dup.problem.contains("kv-0"), "{dup}");
    assert_eq!(refused(&mut c, &inst("web", "web-1", "w1")).field, "addr");
    let mut with_addr = inst("kv", "kv-1", "k1");
    with_addr.addr = Some("198.18.16.3:80".into());
    assert_eq!(refused(&mut c, &with_addr).field, "addr");
}
