//! The single-host coordination store: the assignment in memory, persisted
//! to a JSON file on every change (write a temporary file, fsync, rename).

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_stream::{StreamExt as _, wrappers::BroadcastStream};

use super::{
    ClaimBatch, CoordError, CoordStore, Event, Events, GroupEntry, Load, Rewrite, Rewritten,
    Version, check_partition, ops,
};
use crate::plan::Group;

#[derive(Default, Serialize, Deserialize)]
struct State {
    next_version: Version,
    services: BTreeMap<String, Vec<GroupEntry>>,
}

/// The single-host store: in memory, persisted to a JSON file.
pub struct EmbeddedStore {
    path: Option<PathBuf>,
    state: Mutex<State>,
    loads: Mutex<HashMap<String, Load>>,
    events: broadcast::Sender<Event>,
}

impl EmbeddedStore {
    /// A store that is not persisted (tests, demos).
    #[must_use]
    pub fn in_memory() -> Self {
        Self::with_state(None, State::default())
    }

    /// A store persisted at `path`, loading what is there.
    pub fn open(path: &Path) -> Result<Self, CoordError> {
        let state = match fs::read(path) {
            Ok(bytes) => {
                let state: State =
                    serde_json::from_slice(&bytes).map_err(|e| CoordError::Corrupt {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    })?;
                for (service, groups) in &state.services {
                    check_partition(groups.iter().map(|e| &e.group)).map_err(|reason| {
                        CoordError::Corrupt {
                            path: path.to_owned(),
                            reason: format!("service `{service}`: {reason}"),
                        }
                    })?;
                }
                state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => {
                return Err(CoordError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Ok(Self::with_state(Some(path.to_owned()), state))
    }

    /// As [`Self::open`], but a corrupt file is moved aside (to
    /// `<path>.corrupt`, kept for a post-mortem) and the store starts empty:
    /// the agent then rebuilds the assignment from the pinned data path's
    /// owners rather than reshuffle every flow. Returns where the corrupt
    /// file went, if it was.
    pub fn open_or_recover(path: &Path) -> Result<(Self, Option<PathBuf>), CoordError> {
        match Self::open(path) {
            Ok(s) => Ok((s, None)),
            Err(CoordError::Corrupt { reason, .. }) => {
                let mut aside = path.as_os_str().to_owned();
                aside.push(".corrupt");
                let aside = PathBuf::from(aside);
                fs::rename(path, &aside).map_err(|source| CoordError::Io {
                    path: path.to_owned(),
                    source,
                })?;
                tracing::error!(path = %path.display(), moved_to = %aside.display(), %reason, "the state file is corrupt: moved aside; the assignment is rebuilt from the pinned data path where there is one");
                Ok((Self::open(path)?, Some(aside)))
            }
            Err(e) => Err(e),
        }
    }

    fn with_state(path: Option<PathBuf>, state: State) -> Self {
        Self {
            path,
            state: Mutex::new(state),
            loads: Mutex::new(HashMap::new()),
            events: broadcast::channel(1024).0,
        }
    }

    /// Runs `f` on the state; if it succeeds, persists and announces the
    /// change. A failed persist rolls the change back.
    fn change<T>(
        &self,
        service: &str,
        f: impl FnOnce(&mut State) -> Result<T, CoordError>,
    ) -> Result<T, CoordError> {
        self.change_if(service, |state| f(state).map(|out| (out, true)))
    }

    /// As [`Self::change`], for an `f` that may change nothing (says so
    /// with `false`): then nothing is persisted or announced.
    fn change_if<T>(
        &self,
        service: &str,
        f: impl FnOnce(&mut State) -> Result<(T, bool), CoordError>,
    ) -> Result<T, CoordError> {
        let mut state = self.state.lock().expect("store lock");
        let before = self
            .path
            .as_ref()
            .map(|_| serde_json::to_vec(&*state).expect("state serialises"));
        let (out, changed) = f(&mut state)?;
        if !changed {
            return Ok(out);
        }
        if let Some(path) = &self.path
            && let Err(e) = persist(path, &state)
        {
            *state =
                serde_json::from_slice(&before.expect("taken when persisted")).expect("round trip");
            return Err(e);
        }
        drop(state);
        let _ = self.events.send(Event::Assignment {
            service: service.to_owned(),
        });
        Ok(out)
    }
}

fn persist(path: &Path, state: &State) -> Result<(), CoordError> {
    let io = |source| CoordError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io)?;
    f.write_all(&serde_json::to_vec_pretty(state).expect("state serialises"))
        .map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    // The rename is durable only once the directory is: without this, a
    // power cut can bring back the previous file.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// The service's groups and the version counter, borrowed apart.
fn parts<'a>(
    state: &'a mut State,
    service: &str,
) -> Result<(&'a mut Vec<GroupEntry>, &'a mut Version), CoordError> {
    let State {
        next_version,
        services,
    } = state;
    let entries = services
        .get_mut(service)
        .ok_or_else(|| CoordError::UnknownService {
            service: service.to_owned(),
        })?;
    Ok((entries, next_version))
}

#[async_trait::async_trait]
impl CoordStore for EmbeddedStore {
    async fn groups(&self, service: &str) -> Result<Vec<GroupEntry>, CoordError> {
        let state = self.state.lock().expect("store lock");
        state
            .services
            .get(service)
            .cloned()
            .ok_or_else(|| CoordError::UnknownService {
                service: service.to_owned(),
            })
    }

    async fn group_of(&self, service: &str, unit: u32) -> Result<GroupEntry, CoordError> {
        let state = self.state.lock().expect("store lock");
        let entries = state
            .services
            .get(service)
            .ok_or_else(|| CoordError::UnknownService {
                service: service.to_owned(),
            })?;
        Ok(ops::group_of(entries, unit).clone())
    }

    async fn init(&self, service: &str, groups: &[(Group, String)]) -> Result<bool, CoordError> {
        if self
            .state
            .lock()
            .expect("store lock")
            .services
            .contains_key(service)
        {
            return Ok(false);
        }
        self.change(service, |state| {
            let entries = ops::rewrite(None, &mut state.next_version, service, groups)?;
            state.services.insert(service.to_owned(), entries);
            Ok(true)
        })
    }

    async fn reset(&self, service: &str, groups: &[(Group, String)]) -> Result<(), CoordError> {
        self.change(service, |state| {
            let entries = ops::rewrite(None, &mut state.next_version, service, groups)?;
            state.services.insert(service.to_owned(), entries);
            Ok(())
        })
    }

    /// `f` decides under the store's lock: nobody writes in between.
    async fn rewrite(&self, service: &str, f: &Rewrite<'_>) -> Result<Rewritten, CoordError> {
        self.change_if(service, |state| {
            let found = state.services.get(service).cloned();
            let Some(groups) = f(found.as_deref()) else {
                let entries = found.clone().unwrap_or_default();
                return Ok((
                    Rewritten {
                        found,
                        entries,
                        written: false,
                    },
                    false,
                ));
            };
            let entries =
                ops::rewrite(found.as_deref(), &mut state.next_version, service, &groups)?;
            state.services.insert(service.to_owned(), entries.clone());
            Ok((
                Rewritten {
                    found,
                    entries,
                    written: true,
                },
                true,
            ))
        })
    }

    async fn move_group(
        &self,
        service: &str,
        group: Group,
        version: Version,
        to: &str,
    ) -> Result<Version, CoordError> {
        self.change(service, |state| {
            let (entries, next) = parts(state, service)?;
            ops::move_group(entries, next, service, group, version, to)
        })
    }

    async fn split(
        &self,
        service: &str,
        group: Group,
        version: Version,
    ) -> Result<[GroupEntry; 2], CoordError> {
        self.change(service, |state| {
            let (entries, next) = parts(state, service)?;
            ops::split(entries, next, service, group, version)
        })
    }

    async fn merge(
        &self,
        service: &str,
        a: (Group, Version),
        b: (Group, Version),
    ) -> Result<GroupEntry, CoordError> {
        self.change(service, |state| {
            let (entries, next) = parts(state, service)?;
            ops::merge(entries, next, service, a, b)
        })
    }

    /// The whole batch in one change: one write of the file (and one
    /// fsync), not one per split and claim; none when nothing is claimed.
    async fn claim_units(
        &self,
        service: &str,
        units: &[u32],
        size: u32,
        owners: &[String],
        turn: usize,
    ) -> Result<ClaimBatch, CoordError> {
        {
            let state = self.state.lock().expect("store lock");
            let entries =
                state
                    .services
                    .get(service)
                    .ok_or_else(|| CoordError::UnknownService {
                        service: service.to_owned(),
                    })?;
            if ops::nothing_to_claim(entries, units, owners) {
                return Ok(ops::owners_of(entries, units));
            }
        }
        self.change(service, |state| {
            let (entries, next) = parts(state, service)?;
            ops::claim_units(entries, next, service, units, size, owners, turn)
        })
    }

    async fn publish_load(&self, instance: &str, load: Load) -> Result<(), CoordError> {
        self.loads
            .lock()
            .expect("loads lock")
            .insert(instance.to_owned(), load);
        Ok(())
    }

    async fn loads(&self) -> Result<HashMap<String, Load>, CoordError> {
        Ok(self.loads.lock().expect("loads lock").clone())
    }

    fn watch(&self) -> Events {
        Box::pin(BroadcastStream::new(self.events.subscribe()).map(|e| e.unwrap_or(Event::Lagged)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::group as assign;

    fn even(n: usize) -> Vec<(Group, String)> {
        assign::even(n)
            .into_iter()
            .enumerate()
            .flat_map(|(i, gs)| gs.into_iter().map(move |g| (g, format!("i{i}"))))
            .collect()
    }

    #[tokio::test]
    async fn cas_refuses_a_stale_version() {
        let s = EmbeddedStore::in_memory();
        assert!(s.init("kv", &even(2)).await.unwrap());
        assert!(
            !s.init("kv", &even(3)).await.unwrap(),
            "init keeps an existing assignment"
        );
        let g = s.groups("kv").await.unwrap()[0].clone();
        let v = s.move_group("kv", g.group, g.version, "i1").await.unwrap();
        let again = s.move_group("kv", g.group, g.version, "i0").await;
        assert!(
            matches!(again, Err(CoordError::Conflict { found: Some(f), .. }) if f == v),
            "{again:?}"
        );
        assert_eq!(s.groups("kv").await.unwrap()[0].owner, "i1");
    }

    #[tokio::test]
    async fn split_then_merge_restores_one_group() {
        let s = EmbeddedStore::in_memory();
        s.init("kv", &[(Group::ALL, "a".into())]).await.unwrap();
        let [lo, hi] = s.split("kv", Group::ALL, 1).await.unwrap();
        check_partition(s.groups("kv").await.unwrap().iter().map(|e| &e.group)).unwrap();
        // A stale split of the old whole group fails: it no longer exists.
        assert!(matches!(
            s.split("kv", Group::ALL, 1).await,
            Err(CoordError::Conflict { found: None, .. })
        ));
        let hi_v = s.move_group("kv", hi.group, hi.version, "b").await.unwrap();
        assert!(matches!(
            s.merge("kv", (lo.group, lo.version), (hi.group, hi_v))
                .await,
            Err(CoordError::DifferentOwners { .. })
        ));
        let hi_v = s.move_group("kv", hi.group, hi_v, "a").await.unwrap();
        let m = s
            .merge("kv", (lo.group, lo.version), (hi.group, hi_v))
            .await
            .unwrap();
        assert_eq!(m.group, Group::ALL);
        assert_eq!(s.groups("kv").await.unwrap(), vec![m]);
    }

    #[tokio::test]
    async fn persisted_assignment_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let s = EmbeddedStore::open(&path).unwrap();
        s.init("kv", &even(3)).await.unwrap();
        let g = s.groups("kv").await.unwrap()[1].clone();
        s.split("kv", g.group, g.version).await.unwrap();
        let before = s.groups("kv").await.unwrap();
        drop(s);
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.groups("kv").await.unwrap(), before);
        // Versions keep growing after a restart: no reuse.
        let e = before[0].clone();
        let v = s.move_group("kv", e.group, e.version, "i2").await.unwrap();
        assert!(before.iter().all(|b| b.version < v));
    }

    #[tokio::test]
    async fn corrupt_file_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, r#"{"next_version":3,"services":{"kv":[{"group":"0x0000/1","owner":"a","version":1}]}}"#).unwrap();
        let e = EmbeddedStore::open(&path)
            .err()
            .expect("half the units unassigned");
        assert!(
            e.to_string().contains("have no group") && e.to_string().contains("move it away"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_corrupt_file_is_moved_aside_and_the_store_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, b"{\"next_version\": 3, \"serv").unwrap();
        let (s, aside) = EmbeddedStore::open_or_recover(&path).unwrap();
        let aside = aside.expect("moved aside");
        assert_eq!(aside, dir.path().join("state.json.corrupt"));
        assert_eq!(fs::read(&aside).unwrap(), b"{\"next_version\": 3, \"serv");
        assert!(matches!(
            s.groups("kv").await,
            Err(CoordError::UnknownService { .. })
        ));
        // The fresh store persists where the corrupt one was.
        s.init("kv", &even(2)).await.unwrap();
        let (again, none) = EmbeddedStore::open_or_recover(&path).unwrap();
        assert!(none.is_none());
        assert_eq!(
            again.groups("kv").await.unwrap().len(),
            s.groups("kv").await.unwrap().len()
        );
    }

    #[tokio::test]
    async fn a_claim_batch_is_one_write_and_claims_as_one_by_one_would() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let s = EmbeddedStore::open(&path).unwrap();
        s.init("kv", &[(Group::ALL, String::new())]).await.unwrap();
        let mut rx = s.watch();
        let owners = ["a".to_owned(), "b".to_owned()];
        // Two units of one 256-unit group, one of another, one of a third.
        let units = [0x0010, 0x0020, 0x8000, 0xff00];
        let b = s.claim_units("kv", &units, 256, &owners, 1).await.unwrap();
        assert!(b.error.is_none());
        let got: Vec<String> = b.claimed.iter().map(|(g, o)| format!("{g}->{o}")).collect();
        assert_eq!(
            got,
            ["0x0000/8->b", "0x8000/8->a", "0xff00/8->b"],
            "one claim a group, owners in turn from `turn`"
        );
        let o: Vec<Option<String>> = ["b", "b", "a", "b"]
            .iter()
            .map(|x| Some((*x).to_owned()))
            .collect();
        assert_eq!(b.owners, o);
        check_partition(s.groups("kv").await.unwrap().iter().map(|e| &e.group)).unwrap();
        // One change announced (and persisted) for the whole batch.
        assert!(rx.next().await.is_some());
        let none = tokio::time::timeout(std::time::Duration::from_millis(50), rx.next()).await;
        assert!(none.is_err(), "a second write: {none:?}");
        // Persisted.
        let again = EmbeddedStore::open(&path).unwrap();
        assert_eq!(
            again.groups("kv").await.unwrap(),
            s.groups("kv").await.unwrap()
        );
        // Owned units: nothing written, owners as they are.
        let b = s
            .claim_units("kv", &[0x0030, 0x8001], 256, &owners, 0)
            .await
            .unwrap();
        assert!(b.claimed.is_empty());
        assert_eq!(b.owners, vec![Some("b".to_owned()), Some("a".to_owned())]);
        let none = tokio::time::timeout(std::time::Duration::from_millis(50), rx.next()).await;
        assert!(none.is_err(), "nothing claimed, yet written: {none:?}");
        // No owner to give to: nothing claimed, the unit stays unowned.
        let b = s.claim_units("kv", &[0x4000], 256, &[], 0).await.unwrap();
        assert!(b.claimed.is_empty());
        assert_eq!(b.owners, vec![Some(String::new())]);
    }

    #[tokio::test]
    async fn init_refuses_a_non_partition() {
        let s = EmbeddedStore::in_memory();
        let g: Group = "0x8000/1".parse().unwrap();
        assert!(matches!(
            s.init("kv", &[(g, "a".into())]).await,
            Err(CoordError::NotAPartition { .. })
        ));
    }

    #[tokio::test]
    async fn watchers_hear_changes() {
        let s = EmbeddedStore::in_memory();
        let mut rx = s.watch();
        s.init("kv", &even(2)).await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(1), rx.next())
            .await
            .expect("an event within a second");
        assert_eq!(
            got,
            Some(Event::Assignment {
                service: "kv".into()
            })
        );
    }
}
