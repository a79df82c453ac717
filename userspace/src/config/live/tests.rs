use super::*;
use crate::config::tests::{BASE, parse, spec};

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
    c.add_instance(&spec("kv", "kv-1", "slc-kv1")).unwrap();
    assert_eq!(c.services[0].instances.len(), 2);
    assert!(c.has_instance("kv-1"));
    assert_eq!(c.remove_instance("kv-1").unwrap().veth, "slc-kv1");
    assert!(!c.has_instance("kv-1"));
    assert!(c.remove_instance("kv-1").is_none());
}

#[test]
fn bad_registrations_name_the_field() {
    let mut c = parse(BASE).unwrap();
    assert_eq!(refused(&mut c, &spec("nope", "x", "v")).field, "service");
    assert_eq!(refused(&mut c, &spec("kv", "", "v")).field, "name");
    assert_eq!(refused(&mut c, &spec("kv", "../x", "v")).field, "name");
    let taken = refused(&mut c, &spec("kv", "web-0", "v"));
    assert!(taken.problem.contains("in use"), "{taken}");
    assert_eq!(refused(&mut c, &spec("kv", "kv-1", "a/b")).field, "veth");
    let dup = refused(&mut c, &spec("kv", "kv-1", "slc-kv0"));
    assert!(dup.problem.contains("kv-0"), "{dup}");
    assert_eq!(refused(&mut c, &spec("web", "web-1", "w1")).field, "addr");
    let mut with_addr = spec("kv", "kv-1", "k1");
    with_addr.addr = Some("198.18.16.3:80".into());
    assert_eq!(refused(&mut c, &with_addr).field, "addr");
}
