//! Instances registered while the agent runs (`sluice instance add`, or
//! started by a launcher): the rules the file's instances follow
//! ([`InstanceSpec::check`]), then the checks against the running config
//! (its service, uniqueness, shared veths, limits), so an added instance
//! is as good as one written in the file.

use super::{Config, FieldError, Instance, InstanceSpec, MAX_INSTANCES};

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

    /// Adds `spec` to its service: checked as the file's instances are
    /// ([`InstanceSpec::check`]), then against this config (its service,
    /// uniqueness, shared veths, `addr` for http services, the instance
    /// limit and the service's `max_instances`). Refused, it changes
    /// nothing.
    pub fn add_instance(&mut self, spec: &InstanceSpec) -> Result<(), Vec<FieldError>> {
        let service = spec.service.as_str();
        let (si, inst) = match (
            self.services.iter().position(|s| s.name == service),
            spec.check(),
        ) {
            (Some(si), Ok(inst)) => (si, inst),
            (si, checked) => {
                let mut errors = Vec::new();
                if si.is_none() {
                    let known: Vec<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
                    errors.push(refuse(
                        "service",
                        format!("no service `{service}`"),
                        format!("use one of: {}", known.join(", ")),
                    ));
                }
                errors.extend(checked.err().into_iter().flatten());
                return Err(errors);
            }
        };
        self.running_checks(si, &inst).map_err(|e| vec![e])?;
        self.services[si].instances.push(inst);
        Ok(())
    }

    /// What refuses `inst` in service `si` of this config.
    fn running_checks(&self, si: usize, inst: &Instance) -> Result<(), FieldError> {
        let service = &self.services[si].name;
        if self.has_instance(&inst.name) {
            return Err(refuse(
                "name",
                format!("instance name `{}` is in use", inst.name),
                "give every instance its own name",
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
mod tests;
