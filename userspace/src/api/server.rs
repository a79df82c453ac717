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
    ScaleLine, budget::Budget,
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
    /// Refused connections being answered, over every socket (see
    /// [`REFUSALS`]).
    refusals: Arc<Semaphore>,
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
            refusals: Arc::new(Semaphore::new(REFUSALS)),
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
/// Most connections the control socket serves at once (root's only).
const CONTROL_CONNECTIONS: usize = 64;
/// Most connections each report socket serves at once, and most of them
/// one peer (user id) holds: budgets of their own, so no local user's
/// flood takes root's answers or another instance's reports (see
/// [`budget`](super::budget)).
const REPORT_CONNECTIONS: usize = 32;
const PEER_CONNECTIONS: usize = 8;
/// Most refused connections being answered at once, over every socket;
/// past it a refused connection is closed without an answer.
const REFUSALS: usize = 32;
/// How long a refused peer is given to send its request and take the
/// answer.
const REFUSAL_WAIT: Duration = Duration::from_secs(1);
/// A connection that sends no complete line for this long is closed.
const IDLE: Duration = Duration::from_mins(1);
/// An answer not taken by the client within this closes the connection.
const WRITE_WAIT: Duration = Duration::from_secs(5);

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

/// Accepts on `listener` until the task is dropped: each admitted
/// connection that fits in `budget` is served in a task of its own; any
/// other is told why and closed.
fn accept_loop(
    listener: UnixListener,
    shared: Shared,
    access: Access,
    budget: Arc<Budget>,
) -> JoinHandle<()> {
    let access = Arc::new(access);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let cred = stream.peer_cred().ok();
            let held =
                admit(&access, cred).and_then(|()| budget.take(cred.map_or(u32::MAX, |c| c.uid())));
            match held {
                Ok(held) => {
                    let (shared, access) = (shared.clone(), access.clone());
                    tokio::spawn(async move {
                        connection(stream, &shared, &access).await;
                        drop(held);
                    });
                }
                Err(why) => {
                    if let Some(unlogged) = budget.log_refusal(Instant::now()) {
                        tracing::warn!(?access, %why, refused_since_last_line = unlogged, "API connection refused");
                    }
                    // A few at once are told why; past that (a flood), the
                    // connection is closed at once.
                    if let Ok(permit) = shared.refusals.clone().try_acquire_owned() {
                        tokio::spawn(async move {
                            refuse_and_close(stream, why).await;
                            drop(permit);
                        });
                    }
                }
            }
        }
    })
}

/// Reads a refused peer's first line (closing at once could break its
/// write before it reads why), answers why, and closes, within
/// [`REFUSAL_WAIT`] each.
async fn refuse_and_close(stream: UnixStream, why: String) {
    let (r, mut w) = stream.into_split();
    let mut buf = Vec::new();
    let limit = u64::try_from(MAX_LINE).expect("small") + 1;
    let mut line = BufReader::new(r).take(limit);
    let _ = tokio::time::timeout(REFUSAL_WAIT, line.read_until(b'\n', &mut buf)).await;
    let mut out = serde_json::to_vec(&refuse(why)).expect("serialises");
    out.push(b'\n');
    let _ = tokio::time::timeout(REFUSAL_WAIT, w.write_all(&out)).await;
}

/// Answers one admitted connection's lines until it closes, idles, leaves
/// an answer unread for [`WRITE_WAIT`] or breaks a rule.
async fn connection(stream: UnixStream, shared: &Shared, access: &Access) {
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
        let response = if !whole && n > MAX_LINE {
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
        let wrote = tokio::time::timeout(WRITE_WAIT, w.write_all(&out)).await;
        if !matches!(wrote, Ok(Ok(()))) || (!whole && n > MAX_LINE) {
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
    let budget = Budget::new(CONTROL_CONNECTIONS, None);
    Ok(accept_loop(listener, shared, Access::Control, budget))
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
            let budget = Budget::new(REPORT_CONNECTIONS, Some(PEER_CONNECTIONS));
            let task = accept_loop(listener, self.shared.clone(), access, budget);
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
mod tests;
