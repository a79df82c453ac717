//! The client side of the local API: one request, one answer.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use super::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no agent answers on {path} (is `sluice run` running? use --api-socket to point elsewhere)"
    )]
    NoAgent {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not for this user: the control socket is root's (run as root); an instance reports through its own socket (sluice report --instance NAME)"
    )]
    Denied { path: String },
    #[error("talking to the agent on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent said: {0}")]
    Refused(String),
}

/// Sends one request and returns the answer.
pub fn call(path: &Path, req: &Request) -> Result<Response, ClientError> {
    call_within(path, req, Duration::from_secs(5))
}

/// As [`call`], for a request the agent answers after carrying it out (an
/// instance registration reloads the data path).
pub fn call_waiting(path: &Path, req: &Request) -> Result<Response, ClientError> {
    call_within(path, req, Duration::from_secs(75))
}

fn call_within(path: &Path, req: &Request, wait: Duration) -> Result<Response, ClientError> {
    let p = path.display().to_string();
    let mut s = UnixStream::connect(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            ClientError::Denied { path: p.clone() }
        } else {
            ClientError::NoAgent {
                path: p.clone(),
                source,
            }
        }
    })?;
    let io = |source| ClientError::Io {
        path: p.clone(),
        source,
    };
    s.set_read_timeout(Some(wait)).map_err(io)?;
    let mut line = serde_json::to_vec(req).expect("serialises");
    line.push(b'\n');
    let sent = s.write_all(&line);
    // Even when the write broke, the agent may have said why first.
    let mut answer = String::new();
    let read = BufReader::new(&s).read_line(&mut answer);
    if answer.is_empty() {
        sent.map_err(io)?;
        read.map_err(io)?;
    }
    let r: Response = serde_json::from_str(&answer).map_err(|e| ClientError::Io {
        path: p.clone(),
        source: std::io::Error::other(e),
    })?;
    if !r.ok {
        return Err(ClientError::Refused(r.error.unwrap_or_default()));
    }
    Ok(r)
}
