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
    /// The same service behind a certificate of the same CA that has expired.
    pub expired: String,
    /// The same service behind a certificate of the same CA for another host name.
    pub wrong_name: String,
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

/// A server certificate signed by `ca`: `<name>.pem` with the key `<key>` (made by
/// [`new_key`]), valid for `san` for `days` days (negative: expired that long ago).
fn sign(dir: &Path, name: &str, csr: &str, san: &str, days: i32) {
    let ext = format!("{name}.cnf");
    std::fs::write(
        dir.join(&ext),
        format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"),
    )
    .expect("ext.cnf");
    let (out, days) = (format!("{name}.pem"), days.to_string());
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &out,
            "-days",
            &days,
            "-extfile",
            &ext,
        ],
    );
}

impl TlsFront {
    /// TLS on a free port of 127.0.0.1, forwarding to `target` (`host:port`).
    pub async fn start(target: &str) -> TlsFront {
        TlsFront::start_on(free_port(), target).await
    }

    /// TLS on `port` of 127.0.0.1 (a port the caller has picked, e.g. one a broker advertises).
    pub async fn start_on(port: u16, target: &str) -> TlsFront {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        make_ca(d, "ca");
        make_ca(d, "other-ca");
        new_key(d, "server.key", "server.csr", "/CN=localhost", false);
        sign(d, "server", "server.csr", "DNS:localhost,IP:127.0.0.1", 2);
        sign(d, "expired", "server.csr", "DNS:localhost,IP:127.0.0.1", -1);
        new_key(
            d,
            "elsewhere.key",
            "elsewhere.csr",
            "/CN=elsewhere.invalid",
            false,
        );
        sign(d, "elsewhere", "elsewhere.csr", "DNS:elsewhere.invalid", 2);
        let (expired_port, wrong_name_port) = (free_port(), free_port());
        let mut conf = "foreground = yes\npid =\n".to_string();
        for (section, accept, cert, key) in [
            ("front", port, "server.pem", "server.key"),
            ("expired", expired_port, "expired.pem", "server.key"),
            (
                "elsewhere",
                wrong_name_port,
                "elsewhere.pem",
                "elsewhere.key",
            ),
        ] {
            conf += &format!(
                "[{section}]\naccept = 127.0.0.1:{accept}\nconnect = {target}\ncert = {}\nkey = {}\n",
                d.join(cert).display(),
                d.join(key).display()
            );
        }
        std::fs::write(d.join("stunnel.conf"), conf).expect("stunnel.conf");
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
        for p in [port, expired_port, wrong_name_port] {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], p));
            assert!(
                wait_for_port(addr, Duration::from_secs(10)).await,
                "stunnel never listened on {p}"
            );
        }
        TlsFront {
            address: format!("localhost:{port}"),
            expired: format!("localhost:{expired_port}"),
            wrong_name: format!("localhost:{wrong_name_port}"),
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
