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
    let bad: Response = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert!(bad.error.unwrap().starts_with("bad request"));
    let ok: Response = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
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

/// Runs `f` on a thread of its own as user `nobody` (65534). The raw
/// system call changes that thread's credentials only (glibc's
/// `setresuid` would change every thread's); the thread ends after `f`.
fn as_nobody<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: changes this thread's user ids only; the saved one stays 0.
        let r = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 0) };
        assert_eq!(r, 0, "setresuid: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the unprivileged thread")
}

/// `n` connections to `path` made by `nobody`, kept open.
fn flood(path: &Path, n: usize) -> Vec<std::os::unix::net::UnixStream> {
    let path = path.to_owned();
    as_nobody(move || {
        (0..n)
            .filter_map(|_| std::os::unix::net::UnixStream::connect(&path).ok())
            .collect()
    })
}

/// Whether `c` was closed by the agent (read to its end, or reset, within
/// `wait`).
fn closed_by_agent(mut c: &std::os::unix::net::UnixStream, wait: Duration) -> bool {
    use std::io::Read as _;
    c.set_read_timeout(Some(wait)).unwrap();
    let mut rest = Vec::new();
    // Closed with our requests unread, it reads as reset.
    match c.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// The issue's flood: a local user without privileges opens hundreds of
/// idle connections to an instance's report socket (mode 0666 by design)
/// and to a socket that refuses it. Root's control API, the other
/// instances' report sockets and root's reports on the flooded socket are
/// still answered; the refused and over-budget connections are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_users_connection_flood_locks_out_neither_root_nor_other_instances() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: changing a thread's user needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let control = dir.path().join("agent.sock");
    let s = Shared::new(Arc::default(), vec!["a".into(), "b".into(), "c".into()]);
    let _task = serve(&control, s.clone()).unwrap();
    let mut reports = ReportSockets::new(&dir.path().join("report"), s.clone()).unwrap();
    reports
        .sync(&[
            ("a".into(), None),
            ("b".into(), None),
            // In another namespace than the flooder's: it is refused there.
            ("c".into(), Some("/proc/self/ns/user".into())),
        ])
        .unwrap();
    let report = |i: &str| dir.path().join(format!("report/{i}.sock"));
    let (a, c) = (report("a"), report("c"));
    let (on_a, on_c) = tokio::task::spawn_blocking(move || (flood(&a, 300), flood(&c, 100)))
        .await
        .unwrap();
    assert!(
        on_a.len() + on_c.len() >= 300,
        "the flood connected ({} and {} of 300 and 100)",
        on_a.len(),
        on_c.len()
    );
    // The agent has taken them all.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let ask = |path: PathBuf, request: Request| {
        tokio::task::spawn_blocking(move || call(&path, &request))
    };
    let status = ask(control.clone(), Request::Status {}).await.unwrap();
    assert!(
        matches!(&status, Ok(r) if r.ok),
        "root's status during the flood: {status:?}"
    );
    for i in ["b", "a"] {
        let r = ask(
            report(i),
            Request::Report(Report {
                instance: i.into(),
                queue_depth: Some(1.0),
                ..Report::default()
            }),
        )
        .await
        .unwrap();
        assert!(
            matches!(&r, Ok(r) if r.ok),
            "root's report for `{i}` during the flood: {r:?}"
        );
    }

    // What the flood holds: a few connections on `a` at most, none on `c`.
    let (open_a, open_c) = tokio::task::spawn_blocking(move || {
        let open = |conns: &[std::os::unix::net::UnixStream]| {
            conns
                .iter()
                .filter(|c| !closed_by_agent(c, Duration::from_millis(100)))
                .count()
        };
        // Refusals end within a second or two.
        std::thread::sleep(Duration::from_secs(2));
        (open(&on_a), open(&on_c))
    })
    .await
    .unwrap();
    assert!(
        open_a <= PEER_CONNECTIONS,
        "{open_a} of the flood's connections to `a` are still open"
    );
    assert_eq!(open_c, 0, "refused connections are still open");
}

/// A client that sends requests and never reads its answers is cut off
/// once an answer has waited `WRITE_WAIT` to be written: it holds no
/// connection for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let _task = serve(&path, shared()).unwrap();
    let closed = tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        c.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        let lines = b"{\"status\": {}}\n".repeat(1000);
        // Until the agent stops reading (its answers are not read).
        for _ in 0..100 {
            if c.write_all(&lines).is_err() {
                break;
            }
        }
        // Not reading meanwhile: reading would let the agent go on.
        std::thread::sleep(WRITE_WAIT + Duration::from_secs(1));
        closed_by_agent(&c, Duration::from_secs(3))
    })
    .await
    .unwrap();
    assert!(closed, "the connection stays open");
}
