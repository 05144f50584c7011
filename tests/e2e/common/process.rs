//! The workspace's binaries as processes, awaited with tokio; a process a test leaves running
//! is killed when it is dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{Env, bin, free_port, wait_for_port};

fn command(name: &str, env: &Env) -> Command {
    let mut c = Command::new(bin(name));
    // Run where no .env file can be picked up by accident.
    c.current_dir(std::env::temp_dir()).kill_on_drop(true);
    for (k, v) in env.vars() {
        c.env(k, v);
    }
    c
}

/// Runs a binary to completion; returns (success, stdout, stderr). A run that takes over
/// two minutes is killed and fails the test with what it printed.
pub async fn run(name: &str, env: &Env, args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = command(name, env)
        .args(args)
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn");
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait()).await;
    if status.is_err() {
        let _ = child.kill().await;
    }
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let Ok(status) = status else {
        panic!("{name} {args:?} did not finish within 120 s:\n{stdout}\n{stderr}");
    };
    let status = status.expect("wait");
    let stderr = if status.success() {
        stderr
    } else {
        format!("[{name} {}]\n{stderr}", describe(status))
    };
    (status.success(), stdout, stderr)
}

pub async fn run_ok(name: &str, env: &Env, args: &[&str]) -> String {
    let (ok, stdout, stderr) = run(name, env, args).await;
    assert!(ok, "{name} {args:?} failed:\n{stdout}\n{stderr}");
    stdout + &stderr
}

/// A binary running in the background, its stderr in a log file, its HTTP endpoint (the
/// processor's health and metrics) on a port of its own; killed when dropped.
pub struct Running {
    child: Child,
    /// How it ended, once it has: shown at the top of [`Running::log`].
    status: Option<ExitStatus>,
    pid: nix::unistd::Pid,
    log: PathBuf,
    http: SocketAddr,
}

impl Running {
    pub fn spawn(name: &str, env: &Env, args: &[&str], log: PathBuf) -> Running {
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let env = env.clone().set("HTTP_ADDR", http.to_string());
        let file = std::fs::File::create(&log).expect("log file");
        let child = command(name, &env)
            .args(args)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn");
        let pid = child.id().expect("a pid before the process is awaited");
        Running {
            child,
            status: None,
            pid: nix::unistd::Pid::from_raw(pid as i32),
            log,
            http,
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(self.pid, sig);
    }

    /// Its stderr; once it has exited (as last seen by [`Running::is_running`],
    /// [`Running::exit_within`] or [`Running::wait`]), headed by how it ended, so that every
    /// assertion message that shows the log says whether it exited, with which status, or
    /// which signal killed it.
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        match self.status {
            Some(s) => format!("[{}: {}]\n{log}", self.log.display(), describe(s)),
            None => log,
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        let status = self.child.try_wait().expect("wait");
        self.status = self.status.or(status);
        status.is_none()
    }

    /// The process's exit status if it exits within `timeout`, `None` if it is still running.
    pub async fn exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .map(|s| s.expect("wait"));
        self.status = self.status.or(status);
        status
    }

    /// Waits for the process to exit on its own; returns its success. Not exiting within
    /// `timeout` fails the test.
    pub async fn wait(&mut self, timeout: Duration) -> bool {
        match self.exit_within(timeout).await {
            Some(status) => status.success(),
            None => panic!(
                "process did not exit within {timeout:?}; log:\n{}",
                self.log()
            ),
        }
    }

    /// The address of the processor's HTTP endpoint, once it accepts connections.
    pub async fn http_addr(&self) -> SocketAddr {
        assert!(
            wait_for_port(self.http, Duration::from_secs(30)).await,
            "processor never served HTTP on {}; log:\n{}",
            self.http,
            self.log()
        );
        self.http
    }
}

/// An exit status as a person reads it: the code, or the signal that killed the process.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("killed by signal {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => status.to_string(),
    }
}

/// A plain HTTP/1.0 GET: the status and the whole response.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.expect("read");
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, buf)
}

/// The value of a metric (`name` as `/metrics` shows it, labels included) on the processor at
/// `addr`, or `None` if it is not there.
pub async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Runs a Python script (a reader we did not write: pyarrow, deltalake) and returns the
/// non-empty lines it printed; fails the test with `what` and its stderr if it fails.
pub fn python_lines(script: &str, args: &[&str], what: &str) -> Vec<Vec<u8>> {
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{what} (tests/run.sh installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}
