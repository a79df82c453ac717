//! Instances registered while the agent runs (`sluice instance add`, or
//! started by a launcher): the rules the file's instances follow, checked
//! against the running config, so an added instance is as good as one
//! written in the file.

use super::{
    Config, FieldError, Instance, MAX_INSTANCES,
    check::{VETH_FIX, is_ifname, name_problem},
};

/// An error about field `field` of a registration (no line: it did not
/// come from the file).
fn refuse(field: &str, problem: impl Into<String>, fix: impl Into<String>) -> FieldError {
    FieldError {
        line: None,
        field: field.to_owned(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

impl Config {
    /// Whether any service has an instance named `name`.
    #[must_use]
    pub fn has_instance(&self, name: &str) -> bool {
        self.services
            .iter()
            .any(|s| s.instances.iter().any(|i| i.name == name))
    }

    /// Adds `inst` to service `service`, checked as the file's instances
    /// are (name, veth, uniqueness, `addr` for http services, the
    /// instance limit and the service's `max_instances`). Refused, it
    /// changes nothing.
    pub fn add_instance(&mut self, service: &str, inst: Instance) -> Result<(), FieldError> {
        let Some(si) = self.services.iter().position(|s| s.name == service) else {
            let known: Vec<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
            return Err(refuse(
                "service",
                format!("no service `{service}`"),
                format!("use one of: {}", known.join(", ")),
            ));
        };
        if inst.name.is_empty() {
            return Err(refuse("name", "empty", "give the instance a name"));
        }
        if let Some((problem, fix)) = name_problem(&inst.name, "instance") {
            return Err(refuse("name", problem, fix));
        }
        if self.has_instance(&inst.name) {
            return Err(refuse(
                "name",
                format!("instance name `{}` is in use", inst.name),
                "give every instance its own name",
            ));
        }
        if !is_ifname(&inst.veth) {
            return Err(refuse(
                "veth",
                format!("`{}` is not a valid interface name", inst.veth),
                VETH_FIX,
            ));
        }
        for (sj, s) in self.services.iter().enumerate() {
            for other in s.instances.iter().filter(|o| o.veth == inst.veth) {
                if sj == si {
                    return Err(refuse(
                        "veth",
                        format!(
                            "veth `{}` is already the veth of instance `{}` of this service",
                            inst.veth, other.name
                        ),
                        "give each instance of a service its own container and veth pair",
                    ));
                }
                if other.mac != inst.mac || other.netns != inst.netns {
                    return Err(refuse(
                        "veth",
                        format!(
                            "veth `{}` is shared with instance `{}`, but their `mac` or `netns` differ",
                            inst.veth, other.name
                        ),
                        "instances behind one veth live in one container: give them the same mac and netns",
                    ));
                }
            }
        }
        let svc = &self.services[si];
        match (svc.http.is_some(), inst.addr.is_some()) {
            (true, false) => {
                return Err(refuse(
                    "addr",
                    "missing: the L7 distributor is a proxy and needs the address it reaches the instance at",
                    "give the instance's own address and port, e.g. 198.18.16.2:8080",
                ));
            }
            (false, true) => {
                return Err(refuse(
                    "addr",
                    "addr is used only by layer = \"http\" services (L4 packets go to the veth)",
                    "leave addr out",
                ));
            }
            _ => {}
        }
        if let Some(scale) = &svc.scale
            && svc.instances.len() >= scale.max_instances as usize
        {
            return Err(refuse(
                "service",
                format!(
                    "service `{service}` runs {} instances, its scale.max_instances",
                    svc.instances.len()
                ),
                "raise [service.scale] max_instances, or remove an instance first",
            ));
        }
        if self.instance_count() >= MAX_INSTANCES {
            return Err(refuse(
                "name",
                format!("{MAX_INSTANCES} instances are running, the most supported"),
                "remove an instance first, or spread the instances over several hosts",
            ));
        }
        self.services[si].instances.push(inst);
        Ok(())
    }

    /// Takes instance `name` out of its service; `None` if there is none.
    pub fn remove_instance(&mut self, name: &str) -> Option<Instance> {
        self.services.iter_mut().find_map(|s| {
            let at = s.instances.iter().position(|i| i.name == name)?;
            Some(s.instances.remove(at))
        })
    }
}

#[cfg(test)]
mod tests {
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

    fn inst(name: &str, veth: &str) -> Instance {
        Instance {
            name: name.into(),
            veth: veth.into(),
            mac: None,
            netns: None,
            cgroup: None,
            cpu_limit: None,
            health_reports: false,
            addr: None,
        }
    }

    fn refused(c: &mut Config, service: &str, i: Instance) -> FieldError {
        let before = c.clone();
        let e = c.add_instance(service, i).expect_err("refused");
        assert_eq!(*c, before, "a refused registration changes nothing");
        e
    }

    #[test]
    fn a_good_instance_joins_its_service() {
        let mut c = parse(BASE).unwrap();
        c.add_instance("kv", inst("kv-1", "slc-kv1")).unwrap();
        assert_eq!(c.services[0].instances.len(), 2);
        assert!(c.has_instance("kv-1"));
        assert_eq!(c.remove_instance("kv-1").unwrap().veth, "slc-kv1");
        assert!(!c.has_instance("kv-1"));
        assert!(c.remove_instance("kv-1").is_none());
    }

    #[test]
    fn bad_registrations_name_the_field() {
        let mut c = parse(BASE).unwrap();
        assert_eq!(refused(&mut c, "nope", inst("x", "v")).field, "service");
        assert_eq!(refused(&mut c, "kv", inst("", "v")).field, "name");
        assert_eq!(refused(&mut c, "kv", inst("../x", "v")).field, "name");
        let taken = refused(&mut c, "kv", inst("web-0", "v"));
        assert!(taken.problem.contains("in use"), "{taken}");
        assert_eq!(refused(&mut c, "kv", inst("kv-1", "a/b")).field, "veth");
        let dup = refused(&mut c, "kv", inst("kv-1", "slc-kv0"));
        assert!(dup.problem.contains("kv-0"), "{dup}");
        assert_eq!(refused(&mut c, "web", inst("web-1", "w1")).field, "addr");
        let mut with_addr = inst("kv-1", "k1");
        with_addr.addr = Some("198.18.16.3:80".parse().unwrap());
        assert_eq!(refused(&mut c, "kv", with_addr).field, "addr");
    }
}
