//! TLS in front of a test service: a certificate authority and a server certificate for
//! `localhost` made by the test (openssl), and Debian's stunnel terminating TLS on a port of
//! its own and forwarding to the service in plain text. Killed when dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::{free_port, wait_for_port};

pub struct TlsFront {
    /// Where clients connect: `localhost:<port>` (the name the certificate is for).
    pub address: String,
    /// The PEM of the CA that signed the server's certificate.
    pub ca: PathBuf,
    /// The PEM of another CA, which did not.
    pub other_ca: PathBuf,
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (apt install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new P-256 key in `key` and, with `-x509`, a self-signed certificate for `subject` in
/// `out` (else a certificate request).
fn new_key(dir: &Path, key: &str, out: &str, subject: &str, x509: bool) {
    let mut args = vec!["req"];
    if x509 {
        args.extend(["-x509", "-days", "2"]);
    }
    args.extend([
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key,
        "-out",
        out,
        "-subj",
        subject,
    ]);
    openssl(dir, &args);
}

/// A self-signed CA certificate and key: `<name>.pem`, `<name>.key`.
fn make_ca(dir: &Path, name: &str) {
    let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
    new_key(dir, &key, &pem, &format!("/CN={name}"), true);
}

impl TlsFront {
    /// TLS on a free port of 127.0.0.1, forwarding to `target` (`host:port`).
    pub async fn start(target: &str) -> TlsFront {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        make_ca(d, "ca");
        make_ca(d, "other-ca");
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("ext.cnf");
        new_key(d, "server.key", "server.csr", "/CN=localhost", false);
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        let port = free_port();
        std::fs::write(
            d.join("stunnel.conf"),
            format!(
                "foreground = yes\npid =\n[front]\naccept = 127.0.0.1:{port}\nconnect = {target}\ncert = {}\nkey = {}\n",
                d.join("server.pem").display(),
                d.join("server.key").display()
            ),
        )
        .expect("stunnel.conf");
        let bin = if Path::new("/usr/bin/stunnel4").exists() {
            "stunnel4"
        } else {
            "stunnel"
        };
        let child = tokio::process::Command::new(bin)
            .arg(d.join("stunnel.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("stunnel (apt install stunnel4)");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            wait_for_port(addr, Duration::from_secs(10)).await,
            "stunnel never listened on {port}"
        );
        TlsFront {
            address: format!("localhost:{port}"),
            ca: d.join("ca.pem"),
            other_ca: d.join("other-ca.pem"),
            child,
            _dir: dir,
        }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
