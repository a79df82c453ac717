//! The agent's side of the local API: binds the socket and answers each
//! line from what the control loop last published.

use std::{
    os::unix::net::UnixStream,
    path::Path,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
};

use super::{Command, GroupLine, InstanceLine, Request, Response};
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
    pub groups: Arc<Mutex<std::collections::HashMap<String, Vec<GroupLine>>>>,
    /// Drains and undrains waiting for the control loop.
    pub commands: Arc<Mutex<Vec<Command>>>,
}

fn answer(shared: &Shared, line: &str) -> Response {
    match serde_json::from_str::<Request>(line) {
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

/// Binds the socket (replacing a stale one) and serves until the task is
/// dropped.
pub fn serve(path: &Path, shared: Shared) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match UnixStream::connect(path) {
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another agent answers on {}", path.display()),
            ));
        }
        Err(_) => {
            let _ = std::fs::remove_file(path);
        }
    }
    let listener = UnixListener::bind(path)?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut out = serde_json::to_vec(&answer(&shared, &line)).expect("serialises");
                    out.push(b'\n');
                    if w.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
    }))
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
        Shared {
            reports: Arc::default(),
            instances: Arc::new(Mutex::new(vec!["a".into()])),
            status: Arc::default(),
            groups: Arc::default(),
            commands: Arc::default(),
        }
    }

    #[test]
    fn drains_are_queued_for_known_instances() {
        let s = shared();
        assert!(answer(&s, r#"{"drain": {"instance": "a"}}"#).ok);
        assert!(answer(&s, r#"{"undrain": {"instance": "a"}}"#).ok);
        assert_eq!(
            *s.commands.lock().unwrap(),
            vec![Command::Drain("a".into()), Command::Undrain("a".into())]
        );
        assert!(!answer(&s, r#"{"drain": {"instance": "zz"}}"#).ok);
        assert_eq!(
            answer(&s, r#"{"groups": {"service": "nope"}}"#)
                .error
                .as_deref(),
            Some("unknown service `nope`")
        );
    }

    #[test]
    fn reports_for_known_instances_only() {
        let s = shared();
        let ok = answer(&s, r#"{"report": {"instance": "a", "queue_depth": 4}}"#);
        assert!(ok.ok, "{ok:?}");
        assert!(
            s.reports
                .lock()
                .unwrap()
                .fresh("a", Instant::now(), Duration::from_secs(1))
                .is_some()
        );
        let no = answer(&s, r#"{"report": {"instance": "b"}}"#);
        assert_eq!(no.error.as_deref(), Some("unknown instance `b`"));
        let bad = answer(&s, r#"{"reprot": {}}"#);
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
}
