//! The agent's side of the local API: binds the socket and answers each
//! line from what the control loop last published.

use std::{
    collections::HashMap,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream, unix::UCred},
    sync::{Semaphore, mpsc, oneshot},
    task::JoinHandle,
};

use super::{
    Command, FenceLine, GroupLine, InstanceLine, InstanceSpec, RegisteredLine, Request, Response,
    ScaleLine,
};
use crate::control::qos::Reports;

/// What the API serves from.
#[derive(Clone)]
pub struct Shared {
    pub reports: Arc<Mutex<Reports>>,
    /// Names of the configured instances (reports for others are refused).
    pub instances: Arc<Mutex<Vec<String>>>,
    /// Latest status, refreshed by the control loop.
    pub status: Arc<Mutex<Vec<InstanceLine>>>,
    /// Latest assignment per service, refreshed by the control loop.
    pub groups: Arc<Mutex<HashMap<String, Vec<GroupLine>>>>,
    /// Drains and undrains waiting for the control loop.
    pub commands: Arc<Mutex<Vec<Command>>>,
    /// Connection slots over every socket (see [`MAX_CONNECTIONS`]).
    pub slots: Arc<Semaphore>,
    /// Registered instances, refreshed by the control loop.
    pub registered: Arc<Mutex<Vec<RegisteredLine>>>,
    /// Scaled services, refreshed by the control loop.
    pub scale: Arc<Mutex<Vec<ScaleLine>>>,
    /// This host's fence, refreshed by the event loop (a cluster's).
    pub fence: Arc<Mutex<Option<FenceLine>>>,
    /// Lifecycle requests for the event loop, each with its answer to come.
    jobs: mpsc::UnboundedSender<Job>,
    /// The event loop's end of `jobs`, until it takes it.
    job_queue: Arc<Mutex<Option<mpsc::UnboundedReceiver<Job>>>>,
}

/// A lifecycle request the event loop carries out and answers.
#[derive(Debug)]
pub enum Job {
    Add {
        spec: InstanceSpec,
        reply: oneshot::Sender<Response>,
    },
    Remove {
        instance: String,
        deadline: Option<Duration>,
        reply: oneshot::Sender<Response>,
    },
}

/// An answer now, or one the event loop gives later.
enum Answer {
    Now(Response),
    Later(oneshot::Receiver<Response>),
}

impl From<Response> for Answer {
    fn from(r: Response) -> Self {
        Self::Now(r)
    }
}

/// Longest wait for the event loop to answer a lifecycle request (a
/// registration reloads the data path).
const JOB_WAIT: Duration = Duration::from_mins(1);

impl Shared {
    /// What an agent starts with: no status yet, no commands.
    #[must_use]
    pub fn new(reports: Arc<Mutex<Reports>>, instances: Vec<String>) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        Self {
            registered: Arc::default(),
            scale: Arc::default(),
            fence: Arc::default(),
            jobs,
            job_queue: Arc::new(Mutex::new(Some(queue))),
            reports,
            instances: Arc::new(Mutex::new(instances)),
            status: Arc::default(),
            groups: Arc::default(),
            commands: Arc::default(),
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }

    /// The lifecycle requests, for the event loop (once: `None` after).
    #[must_use]
    pub fn take_jobs(&self) -> Option<mpsc::UnboundedReceiver<Job>> {
        self.job_queue.lock().expect("jobs lock").take()
    }

    /// Hands `make(reply)` to the event loop.
    fn job(&self, make: impl FnOnce(oneshot::Sender<Response>) -> Job) -> Answer {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(make(tx)).is_err() {
            return refuse("the agent is shutting down".into()).into();
        }
        Answer::Later(rx)
    }
}

fn answer(shared: &Shared, line: &str) -> Answer {
    let request = serde_json::from_str::<Request>(line);
    match request {
        Ok(Request::InstanceAdd(spec)) => shared.job(|reply| Job::Add { spec, reply }),
        Ok(Request::InstanceRemove {
            instance,
            deadline_secs,
        }) => {
            let deadline = match deadline_secs {
                None => None,
                Some(s) if s.is_finite() && (0.0..=86_400.0).contains(&s) => {
                    Some(Duration::from_secs_f64(s))
                }
                Some(s) => {
                    return refuse(format!(
                        "deadline_secs {s} is out of range; give 0 to 86400 seconds"
                    ))
                    .into();
                }
            };
            shared.job(|reply| Job::Remove {
                instance,
                deadline,
                reply,
            })
        }
        Ok(Request::Instances {}) => Response {
            ok: true,
            registered: Some(shared.registered.lock().expect("registered lock").clone()),
            scale: Some(shared.scale.lock().expect("scale lock").clone()),
            ..Response::default()
        }
        .into(),
        other => answer_now(shared, other).into(),
    }
}

fn answer_now(shared: &Shared, request: Result<Request, serde_json::Error>) -> Response {
    match request {
        Ok(Request::Report(r)) => {
            if !shared
                .instances
                .lock()
                .expect("instances lock")
                .contains(&r.instance)
            {
                return Response {
                    ok: false,
                    error: Some(format!("unknown instance `{}`", r.instance)),
                    ..Response::default()
                };
            }
            shared
                .reports
                .lock()
                .expect("reports lock")
                .put(r, Instant::now());
            Response {
                ok: true,
                ..Response::default()
            }
        }
        Ok(Request::Status {}) => Response {
            ok: true,
            instances: Some(shared.status.lock().expect("status lock").clone()),
            fence: shared.fence.lock().expect("fence lock").clone(),
            ..Response::default()
        },
        Ok(Request::Groups { service }) => {
            match shared.groups.lock().expect("groups lock").get(&service) {
                Some(g) => Response {
                    ok: true,
                    groups: Some(g.clone()),
                    ..Response::default()
                },
                None => refuse(format!("unknown service `{service}`")),
            }
        }
        Ok(Request::Drain { instance } | Request::Undrain { instance })
            if !shared
                .instances
                .lock()
                .expect("instances lock")
                .contains(&instance) =>
        {
            refuse(format!("unknown instance `{instance}`"))
        }
        Ok(Request::Drain { instance }) => queue(shared, Command::Drain(instance)),
        Ok(Request::Undrain { instance }) => queue(shared, Command::Undrain(instance)),
        Ok(Request::InstanceAdd(_) | Request::InstanceRemove { .. } | Request::Instances {}) => {
            unreachable!("answered by `answer`")
        }
        Err(e) => Response {
            ok: false,
            error: Some(format!("bad request: {e}")),
            ..Response::default()
        },
    }
}

fn refuse(error: String) -> Response {
    Response {
        ok: false,
        error: Some(error),
        ..Response::default()
    }
}

fn queue(shared: &Shared, c: Command) -> Response {
    shared.commands.lock().expect("commands lock").push(c);
    Response {
        ok: true,
        ..Response::default()
    }
}

/// Longest request line; a longer one is answered with an error and the
/// connection closed, so a client cannot make the agent buffer without end.
pub const MAX_LINE: usize = 64 << 10;
/// Most connections served at once, over every socket.
const MAX_CONNECTIONS: usize = 256;
/// A connection that sends no complete line for this long is closed.
const IDLE: Duration = Duration::from_mins(1);

/// Who a socket is for.
#[derive(Clone, Debug)]
enum Access {
    /// The control API: root only.
    Control,
    /// One instance's report socket: reports for that instance only, from
    /// its own network namespace when the agent knows it.
    Report {
        instance: String,
        netns: Option<PathBuf>,
    },
}

/// The (device, inode) of a network namespace file.
fn netns_id(path: &Path) -> std::io::Result<(u64, u64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Whether the peer `cred` may use a socket for `access`; if not, why.
fn admit(access: &Access, cred: Option<UCred>) -> Result<(), String> {
    let Some(cred) = cred else {
        return Err("the agent could not tell who is connecting".into());
    };
    // SAFETY: geteuid has no preconditions.
    let agent_uid = unsafe { libc::geteuid() };
    let root = cred.uid() == 0 || cred.uid() == agent_uid;
    match access {
        Access::Control if root => Ok(()),
        Access::Control => Err(format!(
            "the control API is for root only (uid {} asked)",
            cred.uid()
        )),
        Access::Report { netns: None, .. } => Ok(()),
        Access::Report {
            instance,
            netns: Some(own),
        } => {
            let pid = cred.pid().ok_or("the peer's process id is unknown")?;
            let peer = netns_id(Path::new(&format!("/proc/{pid}/ns/net")))
                .map_err(|e| format!("reading the peer's network namespace: {e}"))?;
            let own = netns_id(own).map_err(|e| {
                format!(
                    "reading `{instance}`'s network namespace {}: {e}",
                    own.display()
                )
            })?;
            let host = netns_id(Path::new("/proc/self/ns/net"))
                .map_err(|e| format!("reading the agent's network namespace: {e}"))?;
            if peer == own || (root && peer == host) {
                Ok(())
            } else {
                Err(format!(
                    "reports for `{instance}` are taken from its own network namespace only; process {pid} is in another"
                ))
            }
        }
    }
}

/// A report on `instance`'s own socket: nothing else is answered there.
fn answer_report(shared: &Shared, instance: &str, line: &str) -> Response {
    let request = serde_json::from_str::<Request>(line);
    match request {
        Ok(Request::Report(r)) if r.instance == instance => {
            answer_now(shared, Ok(Request::Report(r)))
        }
        Ok(Request::Report(r)) => refuse(format!(
            "this socket takes reports for `{instance}` only, not `{}`",
            r.instance
        )),
        Ok(_) => refuse(format!(
            "this socket takes `report` requests for `{instance}` only; status, groups and drains are on the agent's control socket"
        )),
        Err(e) => refuse(format!("bad request: {e}")),
    }
}

/// Binds `path` with `mode`: under a temporary name first, so the socket
/// never exists with the umask's mode, then renamed into place (replacing a
/// stale socket).
fn bind_with_mode(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    let tmp = PathBuf::from(format!("{}.{}.tmp", path.display(), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Accepts on `listener` until the task is dropped, each connection in a
/// task of its own.
fn accept_loop(
    listener: UnixListener,
    shared: Shared,
    access: Access,
    slots: Arc<Semaphore>,
) -> JoinHandle<()> {
    let access = Arc::new(access);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (shared, access) = (shared.clone(), access.clone());
            let slot = slots.clone().try_acquire_owned();
            tokio::spawn(async move {
                let Ok(_slot) = slot else {
                    let _ = say(stream, &refuse("too many connections; try again".into())).await;
                    return;
                };
                connection(stream, &shared, &access).await;
            });
        }
    })
}

async fn say(mut stream: UnixStream, r: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(r).expect("serialises");
    out.push(b'\n');
    stream.write_all(&out).await
}

/// Answers one connection's lines until it closes, idles or breaks a rule.
async fn connection(stream: UnixStream, shared: &Shared, access: &Access) {
    // A refused peer's first request is read and answered with the reason:
    // closing at once could break its write before it reads why.
    let refused = admit(access, stream.peer_cred().ok()).err();
    if let Some(why) = &refused {
        tracing::warn!(?access, %why, "API connection refused");
    }
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let limit = u64::try_from(MAX_LINE).expect("small") + 1;
        let mut line = (&mut r).take(limit);
        let read = tokio::time::timeout(IDLE, line.read_until(b'\n', &mut buf)).await;
        let Ok(Ok(n)) = read else { break };
        if n == 0 {
            break;
        }
        let whole = buf.last() == Some(&b'\n');
        let response = if let Some(why) = &refused {
            refuse(why.clone())
        } else if !whole && n > MAX_LINE {
            refuse(format!("request line longer than {MAX_LINE} bytes"))
        } else {
            let line = String::from_utf8_lossy(&buf);
            match access {
                Access::Control => match answer(shared, line.trim_end()) {
                    Answer::Now(r) => r,
                    Answer::Later(rx) => match tokio::time::timeout(JOB_WAIT, rx).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(_)) => refuse("the agent dropped the request".into()),
                        Err(_) => refuse(format!(
                            "no answer within {} s; see `sluice instance list` and the agent's log",
                            JOB_WAIT.as_secs()
                        )),
                    },
                },
                Access::Report { instance, .. } => answer_report(shared, instance, line.trim_end()),
            }
        };
        let mut out = serde_json::to_vec(&response).expect("serialises");
        out.push(b'\n');
        if w.write_all(&out).await.is_err() || refused.is_some() || (!whole && n > MAX_LINE) {
            break;
        }
    }
}

/// The control socket at `path`, mode 0600 (root only), refusing to
/// replace one another agent answers on; served until the task is dropped.
pub fn serve(path: &Path, shared: Shared) -> std::io::Result<JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another agent answers on {}", path.display()),
        ));
    }
    let listener = bind_with_mode(path, 0o600)?;
    let slots = shared.slots.clone();
    Ok(accept_loop(listener, shared, Access::Control, slots))
}

/// One report socket per instance, `DIR/INSTANCE.sock`, mode 0666 so it can
/// be bind-mounted into the instance's container and used by any user
/// there. Removed when the instance leaves the config or this is dropped.
pub struct ReportSockets {
    dir: PathBuf,
    shared: Shared,
    open: HashMap<String, (Option<PathBuf>, JoinHandle<()>)>,
}

impl ReportSockets {
    /// Creates `dir` (mode 0755) for the sockets.
    pub fn new(dir: &Path, shared: Shared) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self {
            dir: dir.to_owned(),
            shared,
            open: HashMap::new(),
        })
    }

    fn path(&self, instance: &str) -> PathBuf {
        self.dir.join(format!("{instance}.sock"))
    }

    /// Serves a socket for each of `instances` (name, network namespace if
    /// known) and closes the others'.
    pub fn sync(&mut self, instances: &[(String, Option<PathBuf>)]) -> std::io::Result<()> {
        let gone: Vec<String> = self
            .open
            .keys()
            .filter(|n| !instances.iter().any(|(i, _)| i == *n))
            .cloned()
            .collect();
        for name in gone {
            self.close(&name);
        }
        for (name, netns) in instances {
            if self.open.get(name).is_some_and(|(n, _)| n == netns) {
                continue;
            }
            self.close(name);
            let listener = bind_with_mode(&self.path(name), 0o666)?;
            let access = Access::Report {
                instance: name.clone(),
                netns: netns.clone(),
            };
            let task = accept_loop(
                listener,
                self.shared.clone(),
                access,
                self.shared.slots.clone(),
            );
            self.open.insert(name.clone(), (netns.clone(), task));
        }
        Ok(())
    }

    fn close(&mut self, name: &str) {
        if let Some((_, task)) = self.open.remove(name) {
            task.abort();
            let _ = std::fs::remove_file(self.path(name));
        }
    }
}

impl Drop for ReportSockets {
    fn drop(&mut self) {
        let names: Vec<String> = self.open.keys().cloned().collect();
        for name in names {
            self.close(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        api::{ClientError, call},
        control::qos::Report,
    };

    fn shared() -> Shared {
        Shared::new(Arc::default(), vec!["a".into()])
    }

    /// The answer to `line`, which must be one given at once.
    fn now(s: &Shared, line: &str) -> Response {
        match answer(s, line) {
            Answer::Now(r) => r,
            Answer::Later(_) => panic!("`{line}` was handed to the event loop"),
        }
    }

    #[tokio::test]
    async fn lifecycle_requests_wait_for_the_event_loop() {
        let s = shared();
        let mut jobs = s.take_jobs().expect("the queue, once");
        assert!(s.take_jobs().is_none());
        let Answer::Later(rx) = answer(
            &s,
            r#"{"instance_add": {"service": "kv", "name": "kv-9", "veth": "v9"}}"#,
        ) else {
            panic!("an add is answered by the event loop");
        };
        let Some(Job::Add { spec, reply }) = jobs.recv().await else {
            panic!("the add is queued");
        };
        assert_eq!((spec.name.as_str(), spec.veth.as_str()), ("kv-9", "v9"));
        reply
            .send(Response {
                ok: true,
                done: Some("added".into()),
                ..Response::default()
            })
            .unwrap();
        assert_eq!(rx.await.unwrap().done.as_deref(), Some("added"));
        let bad = now(
            &s,
            r#"{"instance_remove": {"instance": "kv-9", "deadline_secs": -1}}"#,
        );
        assert!(bad.error.unwrap().contains("out of range"));
        let unknown_field = now(
            &s,
            r#"{"instance_add": {"service": "kv", "name": "x", "veth": "v", "vet": 1}}"#,
        );
        assert!(unknown_field.error.unwrap().contains("bad request"));
        let listed = now(&s, r#"{"instances": {}}"#);
        assert!(listed.registered.is_some() && listed.scale.is_some());
    }

    #[test]
    fn drains_are_queued_for_known_instances() {
        let s = shared();
        assert!(now(&s, r#"{"drain": {"instance": "a"}}"#).ok);
        assert!(now(&s, r#"{"undrain": {"instance": "a"}}"#).ok);
        assert_eq!(
            *s.commands.lock().unwrap(),
            vec![Command::Drain("a".into()), Command::Undrain("a".into())]
        );
        assert!(!now(&s, r#"{"drain": {"instance": "zz"}}"#).ok);
        assert_eq!(
            now(&s, r#"{"groups": {"service": "nope"}}"#)
                .error
                .as_deref(),
            Some("unknown service `nope`")
        );
    }

    #[test]
    fn reports_for_known_instances_only() {
        let s = shared();
        let ok = now(&s, r#"{"report": {"instance": "a", "queue_depth": 4}}"#);
        assert!(ok.ok, "{ok:?}");
        assert!(
            s.reports
                .lock()
                .unwrap()
                .fresh("a", Instant::now(), Duration::from_secs(1))
                .is_some()
        );
        let no = now(&s, r#"{"report": {"instance": "b"}}"#);
        assert_eq!(no.error.as_deref(), Some("unknown instance `b`"));
        let bad = now(&s, r#"{"reprot": {}}"#);
        assert!(bad.error.unwrap().starts_with("bad request"));
    }

    #[tokio::test]
    async fn serves_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let s = shared();
        let _task = serve(&path, s.clone()).unwrap();
        let p = path.clone();
        let r = tokio::task::spawn_blocking(move || {
            call(
                &p,
                &Request::Report(Report {
                    instance: "a".into(),
                    in_flight: Some(2.0),
                    ..Report::default()
                }),
            )
        })
        .await
        .unwrap();
        assert!(r.unwrap().ok);
        let p = path.clone();
        let e = tokio::task::spawn_blocking(move || {
            call(
                &p,
                &Request::Report(Report {
                    instance: "zz".into(),
                    ..Report::default()
                }),
            )
        })
        .await
        .unwrap();
        assert!(matches!(e, Err(ClientError::Refused(_))));
        let missing = call(&dir.path().join("none.sock"), &Request::Status {});
        assert!(matches!(missing, Err(ClientError::NoAgent { .. })));
    }

    /// Sends `bytes` on a fresh connection to `path` and reads the answer
    /// line; with `closed`, also whether the agent then closed the
    /// connection (waiting up to 2 s).
    async fn exchange_then(path: &Path, bytes: &[u8], closed: bool) -> (Response, bool) {
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        let mut rest = Vec::new();
        let closed = closed
            && tokio::time::timeout(Duration::from_secs(2), r.read_to_end(&mut rest))
                .await
                .is_ok_and(|n| n.is_ok_and(|n| n == 0));
        (serde_json::from_str(&line).unwrap(), closed)
    }

    async fn exchange(path: &Path, bytes: &[u8]) -> (Response, bool) {
        exchange_then(path, bytes, false).await
    }

    #[tokio::test]
    async fn a_line_over_the_cap_is_answered_and_the_connection_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let _task = serve(&path, shared()).unwrap();
        let long = vec![b'x'; MAX_LINE + 10];
        let (r, closed) = exchange_then(&path, &long, true).await;
        assert_eq!(
            r.error.as_deref(),
            Some("request line longer than 65536 bytes")
        );
        assert!(closed, "the connection stays open");
        // Malformed and well-formed lines on one connection.
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"{not json\n{\"status\": {}}\n").await.unwrap();
        let mut lines = BufReader::new(s).lines();
        let bad: Response =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert!(bad.error.unwrap().starts_with("bad request"));
        let ok: Response =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert!(ok.ok);
    }

    #[tokio::test]
    async fn sockets_have_their_modes_and_report_sockets_take_their_own_reports_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let s = Shared::new(Arc::default(), vec!["a".into(), "b".into()]);
        let _task = serve(&path, s.clone()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        let mut reports = ReportSockets::new(&dir.path().join("report"), s.clone()).unwrap();
        reports
            .sync(&[("a".into(), None), ("b".into(), None)])
            .unwrap();
        let a = dir.path().join("report/a.sock");
        assert_eq!(mode(&a), 0o666);
        let (r, _) = exchange(
            &a,
            b"{\"report\": {\"instance\": \"a\", \"queue_depth\": 3}}\n",
        )
        .await;
        assert!(r.ok, "{r:?}");
        let (r, _) = exchange(
            &a,
            b"{\"report\": {\"instance\": \"b\", \"queue_depth\": 3}}\n",
        )
        .await;
        assert_eq!(
            r.error.as_deref(),
            Some("this socket takes reports for `a` only, not `b`")
        );
        let (r, _) = exchange(&a, b"{\"drain\": {\"instance\": \"b\"}}\n").await;
        assert!(r.error.unwrap().contains("`report` requests for `a` only"));
        assert!(s.commands.lock().unwrap().is_empty());
        assert!(
            s.reports
                .lock()
                .unwrap()
                .fresh("b", Instant::now(), Duration::from_secs(1))
                .is_none()
        );
        // An instance that leaves the config loses its socket.
        reports.sync(&[("a".into(), None)]).unwrap();
        assert!(!dir.path().join("report/b.sock").exists());
        drop(reports);
        assert!(!a.exists(), "sockets are removed on drop");
    }

    /// The network namespace check, with this process as the peer: a
    /// socket for an instance in another namespace refuses it.
    #[tokio::test]
    async fn a_report_socket_refuses_a_peer_outside_its_instances_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let s = Shared::new(Arc::default(), vec!["a".into(), "b".into()]);
        let mut reports = ReportSockets::new(dir.path(), s).unwrap();
        // `a` lives in this process's namespace; `b` in a namespace file
        // that is not this process's (the init process's user namespace
        // file stands in: any other nsfs inode).
        reports
            .sync(&[
                ("a".into(), Some("/proc/self/ns/net".into())),
                ("b".into(), Some("/proc/self/ns/user".into())),
            ])
            .unwrap();
        let (r, _) = exchange(
            &dir.path().join("a.sock"),
            b"{\"report\": {\"instance\": \"a\"}}\n",
        )
        .await;
        assert!(r.ok, "{r:?}");
        // Root in the agent's own namespace may report for anyone.
        let (r, _) = exchange(
            &dir.path().join("b.sock"),
            b"{\"report\": {\"instance\": \"b\"}}\n",
        )
        .await;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(r.ok, "{r:?}");
        } else {
            assert!(
                r.error
                    .unwrap()
                    .contains("from its own network namespace only"),
                "a non-root peer elsewhere is refused"
            );
        }
    }
}
