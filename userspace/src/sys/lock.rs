//! The lock a running agent holds on what it owns: its bpffs pin directory
//! (one interface's data path) and its state file. Taken before anything
//! is read or written, so a second agent started by mistake exits with the
//! first one's PID and touches nothing.
//!
//! Both are `flock`s, released by the kernel when the process ends however
//! it ends. The holder's PID is written beside each: `<state>.lock` holds
//! it as text; bpffs holds only pinned objects and directories, so the pin
//! directory gets an empty directory `pid=<PID>`.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another agent (PID {pid}) is running on {what} {}; stop it first (`kill {pid}`), or give this agent its own --iface/--pin-dir and --state",
        path.display()
    )]
    Held {
        what: &'static str,
        path: PathBuf,
        pid: String,
    },
    #[error(
        "cannot create the pin directory {} ({})",
        path.display(),
        super::BPFFS_HINT
    )]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Held for the life of the agent; dropping it releases both locks.
#[derive(Debug)]
pub struct AgentLock {
    _pin_dir: File,
    _state: File,
    pid_tag: PathBuf,
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when someone else holds it.
fn try_lock(f: &File) -> io::Result<bool> {
    // SAFETY: a valid open fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// The PID recorded as `pid=<PID>` in `dir`.
fn pid_tag_in(dir: &Path) -> Option<String> {
    fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        e.file_name()
            .to_str()?
            .strip_prefix("pid=")
            .map(str::to_owned)
    })
}

impl AgentLock {
    /// Locks `pin_dir` (created if missing) and `state` (through
    /// `<state>.lock`), and records this process as the holder.
    pub fn acquire(pin_dir: &Path, state: &Path) -> Result<Self, LockError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| LockError::Io { path, source }
        };
        let created_pin_dir = !pin_dir.exists();
        fs::create_dir_all(pin_dir).map_err(|source| LockError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        let dir = File::open(pin_dir).map_err(io(pin_dir))?;
        if !try_lock(&dir).map_err(io(pin_dir))? {
            return Err(LockError::Held {
                what: "pin directory",
                path: pin_dir.to_owned(),
                pid: pid_tag_in(pin_dir).unwrap_or_else(|| "unknown".into()),
            });
        }
        let lock_path = PathBuf::from(format!("{}.lock", state.display()));
        if let Some(parent) = lock_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        if !try_lock(&file).map_err(io(&lock_path))? {
            if created_pin_dir {
                let _ = fs::remove_dir(pin_dir);
            }
            let pid = fs::read_to_string(&lock_path).unwrap_or_default();
            return Err(LockError::Held {
                what: "state file",
                path: state.to_owned(),
                pid: Some(pid.trim().to_owned())
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| "unknown".into()),
            });
        }
        let me = std::process::id().to_string();
        file.set_len(0).map_err(io(&lock_path))?;
        file.write_all(me.as_bytes()).map_err(io(&lock_path))?;
        // A holder that died leaves its tag: ours replaces it.
        for e in fs::read_dir(pin_dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("pid=") {
                let _ = fs::remove_dir(e.path());
            }
        }
        let pid_tag = pin_dir.join(format!("pid={me}"));
        fs::create_dir(&pid_tag).map_err(io(&pid_tag))?;
        Ok(Self {
            _pin_dir: dir,
            _state: file,
            pid_tag,
        })
    }
}

/// The pin directory's lock alone, for `sluice detach`: taking a data path
/// down under a running agent would leave it steering with no program.
/// `Ok(None)` when the directory does not exist.
pub fn lock_pin_dir(pin_dir: &Path) -> Result<Option<File>, LockError> {
    let dir = match File::open(pin_dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LockError::Io {
                path: pin_dir.to_owned(),
                source,
            });
        }
    };
    match try_lock(&dir) {
        Ok(true) => Ok(Some(dir)),
        Ok(false) => Err(LockError::Held {
            what: "pin directory",
            path: pin_dir.to_owned(),
            pid: pid_tag_in(pin_dir).unwrap_or_else(|| "unknown".into()),
        }),
        Err(source) => Err(LockError::Io {
            path: pin_dir.to_owned(),
            source,
        }),
    }
}

impl Drop for AgentLock {
    fn drop(&mut self) {
        // Gone already when the pins were removed.
        let _ = fs::remove_dir(&self.pid_tag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let pins = tmp.path().join("pins");
        let state = tmp.path().join("state.json");
        let first = AgentLock::acquire(&pins, &state).unwrap();
        // flock is per open file: a second open in this process conflicts
        // just as another process's would.
        match AgentLock::acquire(&pins, &state) {
            Err(LockError::Held { what, pid, .. }) => {
                assert_eq!(what, "pin directory");
                assert_eq!(pid, std::process::id().to_string());
            }
            other => panic!("expected the lock to be held, got {other:?}"),
        }
        // Another pin directory, same state file: refused too.
        match AgentLock::acquire(&tmp.path().join("other"), &state) {
            Err(LockError::Held { what, .. }) => assert_eq!(what, "state file"),
            other => panic!("expected the state lock to be held, got {other:?}"),
        }
        assert!(
            !tmp.path().join("other").exists(),
            "a refused lock removes the pin directory it created"
        );
        // `sluice detach`'s lock is refused while an agent holds the
        // directory, and granted once it is gone.
        assert!(matches!(lock_pin_dir(&pins), Err(LockError::Held { .. })));
        drop(first);
        // A process another test forks in this moment holds a copy of the
        // lock's file until it execs (close-on-exec): give it a moment.
        let granted = (0..100).any(|_| {
            let got = matches!(lock_pin_dir(&pins), Ok(Some(_)));
            if !got {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            got
        });
        assert!(granted, "the lock is granted once its holder is gone");
        assert!(lock_pin_dir(&tmp.path().join("none")).unwrap().is_none());
        assert!(AgentLock::acquire(&pins, &state).is_ok());
    }
}
