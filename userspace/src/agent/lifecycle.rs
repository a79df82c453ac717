//! Instances that come and go while the agent runs: registered through the
//! API (`sluice instance add`) or started by a launcher, kept in a file
//! beside the state file so a restarted agent has them again, and removed
//! the safe way — drained first, its pinned flows given until they go
//! quiet or a deadline passes, then taken out of the data path.
//!
//! The running config is always the config file plus these registrations:
//! every change to it goes through the agent's whole-or-nothing reload.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{
    api::{InstanceSpec, RegisteredLine},
    config::{Config, FieldError},
    sys::link,
};

/// Who registered an instance.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// An operator, through the API.
    Api,
    /// The service's launcher (the scaler or a failure rule started it; it
    /// stops it too).
    Launcher,
}

impl Source {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Launcher => "launcher",
        }
    }
}

/// One registration as the file keeps it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Registered {
    pub spec: InstanceSpec,
    pub source: Source,
}

#[derive(Debug, Default, Deserialize, Serialize)]
struct Saved {
    instances: Vec<Registered>,
}

/// A removal under way.
#[derive(Clone, Debug)]
pub struct Removal {
    /// Past this, whatever still flows to the instance is moved.
    pub deadline: Instant,
    /// The instance's delivered packets when last looked at, and since
    /// when they have not moved.
    packets: Option<u64>,
    quiet_since: Instant,
    /// What it waits for now.
    pub detail: String,
}

/// How long an instance with no groups must receive nothing before its
/// pinned flows count as finished.
pub const QUIET: Duration = Duration::from_secs(2);

/// Where a removal stands after one look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemovalStep {
    /// Still draining or still receiving: look again next interval.
    Wait,
    /// Nothing flows to it any more: take it out.
    Done,
    /// The deadline passed with `groups` groups or flows left: take it out
    /// anyway (what still flows is moved to the units' owners).
    Deadline,
}

impl Removal {
    #[must_use]
    pub fn new(now: Instant, deadline: Duration) -> Self {
        Self {
            deadline: now + deadline,
            packets: None,
            quiet_since: now,
            detail: "draining".into(),
        }
    }

    /// One look at the instance: how many groups it still owns and how
    /// many packets it has been delivered in all.
    pub fn step(&mut self, groups: usize, packets: u64, now: Instant) -> RemovalStep {
        if self.packets != Some(packets) || groups > 0 {
            self.packets = Some(packets);
            self.quiet_since = now;
        }
        let left = self.deadline.saturating_duration_since(now);
        if groups == 0 && now.saturating_duration_since(self.quiet_since) >= QUIET {
            return RemovalStep::Done;
        }
        if left.is_zero() {
            return RemovalStep::Deadline;
        }
        self.detail = if groups > 0 {
            format!(
                "draining: {groups} group(s) left; deadline in {:.0} s",
                left.as_secs_f64()
            )
        } else {
            format!(
                "waiting for its pinned flows to go quiet; deadline in {:.0} s",
                left.as_secs_f64()
            )
        };
        RemovalStep::Wait
    }
}

/// The registrations and the removals under way.
pub struct Lifecycle {
    file: PathBuf,
    registered: Vec<Registered>,
    pub removing: BTreeMap<String, Removal>,
}

/// The file the registrations of the agent with state file `state` live
/// in: beside it.
#[must_use]
pub fn file_for(state: &Path) -> PathBuf {
    let mut name = state
        .file_stem()
        .map(std::ffi::OsStr::to_os_string)
        .unwrap_or_default();
    name.push(".instances.json");
    state.with_file_name(name)
}

impl Lifecycle {
    /// Reads the registrations beside `state` (none when the file is not
    /// there). A file that does not parse stops the start: dropping the
    /// instances it names would take them out of the data path.
    pub fn open(state: &Path) -> anyhow::Result<Self> {
        let file = file_for(state);
        let saved: Saved = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{}: the registered instances do not parse; fix the file or move it aside (its instances are then no longer registered)",
                    file.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        Ok(Self {
            file,
            registered: saved.instances,
            removing: BTreeMap::new(),
        })
    }

    #[must_use]
    pub fn registered(&self) -> &[Registered] {
        &self.registered
    }

    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Registered> {
        self.registered.iter().find(|r| r.spec.name == name)
    }

    /// Writes the registrations: a new file, synced, renamed over the old.
    fn save(&self) -> std::io::Result<()> {
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.file.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        let saved = Saved {
            instances: self.registered.clone(),
        };
        f.write_all(&serde_json::to_vec_pretty(&saved).expect("serialises"))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.file)
    }

    /// Registers `r` (already applied) and saves.
    pub fn insert(&mut self, r: Registered) -> std::io::Result<()> {
        self.registered.retain(|o| o.spec.name != r.spec.name);
        self.registered.push(r);
        self.save()
    }

    /// Forgets `name` (already out of the data path) and saves.
    pub fn forget(&mut self, name: &str) -> std::io::Result<Option<Registered>> {
        self.removing.remove(name);
        let at = self.registered.iter().position(|r| r.spec.name == name);
        let gone = at.map(|at| self.registered.remove(at));
        self.save()?;
        Ok(gone)
    }

    /// The running config: `base` (the file) with every registration whose
    /// veth is there now (`ready`); the others wait (see
    /// [`Self::waiting`]). A registration the file's config refuses now
    /// (its name taken by the file, its service gone) is left out and
    /// returned with the reason.
    pub fn effective(
        &self,
        base: &Config,
        ready: impl Fn(&InstanceSpec) -> bool,
    ) -> (Config, Vec<(String, Vec<FieldError>)>) {
        let mut config = base.clone();
        let mut refused = Vec::new();
        for r in self.registered.iter().filter(|r| ready(&r.spec)) {
            if let Err(e) = config.add_instance(&r.spec) {
                refused.push((r.spec.name.clone(), e));
            }
        }
        (config, refused)
    }

    /// Registrations not in `running` (their veth was not there yet).
    pub fn waiting<'a>(&'a self, running: &'a Config) -> impl Iterator<Item = &'a Registered> {
        self.registered
            .iter()
            .filter(|r| !running.has_instance(&r.spec.name))
    }

    /// What `instances` answers of each registration.
    pub fn lines(
        &self,
        running: &Config,
        groups: impl Fn(&str) -> usize,
        failed: impl Fn(&str) -> bool,
    ) -> Vec<RegisteredLine> {
        self.registered
            .iter()
            .map(|r| {
                let name = &r.spec.name;
                let (state, detail) = if let Some(rm) = self.removing.get(name) {
                    ("removing", rm.detail.clone())
                } else if !running.has_instance(name) {
                    (
                        "waiting",
                        format!("its veth `{}` is not there yet", r.spec.veth),
                    )
                } else if failed(name) {
                    ("failed", "veth gone or reports stopped".to_owned())
                } else {
                    ("running", String::new())
                };
                RegisteredLine {
                    service: r.spec.service.clone(),
                    name: name.clone(),
                    veth: r.spec.veth.clone(),
                    netns: r.spec.netns.clone(),
                    source: r.source.name().into(),
                    state: state.into(),
                    detail,
                    groups: groups(name),
                }
            })
            .collect()
    }
}

/// Whether `spec`'s host-side veth exists now.
#[must_use]
pub fn veth_present(spec: &InstanceSpec) -> bool {
    link::ifindex(&spec.veth).is_ok()
}

/// Why a registration is refused, as the API answers and the log says
/// it: each field's error, one a line.
#[must_use]
pub fn refusal(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{BASE, parse, spec};

    fn base() -> Config {
        parse(BASE).unwrap()
    }

    #[test]
    fn registrations_survive_a_restart_and_join_the_running_config() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        assert_eq!(file_for(&state), dir.path().join("state.instances.json"));
        let mut life = Lifecycle::open(&state).unwrap();
        assert!(life.registered().is_empty());
        life.insert(Registered {
            spec: spec("kv", "kv-1", "v1"),
            source: Source::Api,
        })
        .unwrap();
        life.insert(Registered {
            spec: spec("kv", "kv-2", "v2"),
            source: Source::Launcher,
        })
        .unwrap();
        let again = Lifecycle::open(&state).unwrap();
        assert_eq!(again.registered(), life.registered());
        // kv-2's veth is not there yet: it waits.
        let (running, refused) = again.effective(&base(), |s| s.name != "kv-2");
        assert!(refused.is_empty());
        assert!(running.has_instance("kv-1") && !running.has_instance("kv-2"));
        let waiting: Vec<&str> = again
            .waiting(&running)
            .map(|r| r.spec.name.as_str())
            .collect();
        assert_eq!(waiting, ["kv-2"]);
        let lines = again.lines(&running, |_| 0, |_| false);
        assert_eq!(
            lines.iter().map(|l| l.state.as_str()).collect::<Vec<_>>(),
            ["running", "waiting"]
        );
        let mut again = again;
        assert!(again.forget("kv-1").unwrap().is_some());
        assert_eq!(Lifecycle::open(&state).unwrap().registered().len(), 1);
    }

    #[test]
    fn a_registration_the_file_now_refuses_is_left_out_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        let mut life = Lifecycle::open(&state).unwrap();
        // Its name is the file's own now.
        life.insert(Registered {
            spec: spec("kv", "kv-0", "v9"),
            source: Source::Api,
        })
        .unwrap();
        let (running, refused) = life.effective(&base(), |_| true);
        assert_eq!(running, base());
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].1[0].field, "name");
    }

    #[test]
    fn a_corrupt_file_stops_the_start_and_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        std::fs::write(file_for(&state), b"{not json").unwrap();
        let e = format!("{:#}", Lifecycle::open(&state).err().unwrap());
        assert!(
            e.contains("state.instances.json") && e.contains("move it aside"),
            "{e}"
        );
    }

    #[test]
    fn a_removal_waits_for_the_drain_then_for_quiet_or_the_deadline() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut r = Removal::new(t0, s(30));
        assert_eq!(r.step(3, 100, t0), RemovalStep::Wait);
        assert!(r.detail.contains("3 group"), "{}", r.detail);
        // Drained, but its pinned flows still deliver.
        assert_eq!(r.step(0, 150, t0 + s(5)), RemovalStep::Wait);
        assert_eq!(r.step(0, 180, t0 + s(6)), RemovalStep::Wait);
        assert!(r.detail.contains("quiet"), "{}", r.detail);
        assert_eq!(r.step(0, 180, t0 + s(7)), RemovalStep::Wait);
        assert_eq!(r.step(0, 180, t0 + s(8)), RemovalStep::Done);
        // Flows that never stop: the deadline.
        let mut r = Removal::new(t0, s(10));
        for i in 1..10 {
            assert_eq!(r.step(0, i * 10, t0 + s(i)), RemovalStep::Wait);
        }
        assert_eq!(r.step(0, 100, t0 + s(10)), RemovalStep::Deadline);
        // A drain that cannot finish: the deadline too.
        let mut r = Removal::new(t0, s(10));
        assert_eq!(r.step(2, 0, t0 + s(11)), RemovalStep::Deadline);
    }
}
