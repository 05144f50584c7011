//! A standalone S3 server (s3s-fs over a directory) for the benchmark:
//! `s3-server ROOT PORT [STATS_FILE]` with the credentials of `tests/e2e/common`
//! (test-access-key/test-secret-key). With STATS_FILE, the number of requests served so far,
//! by kind, is written there as JSON five times a second (the benchmark reports requests per
//! batch from it).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::service::Service;

/// Request kinds counted: GET, HEAD, PUT, COPY (a PUT with a copy source), DELETE, LIST.
const KINDS: [&str; 6] = ["GET", "HEAD", "PUT", "COPY", "DELETE", "LIST"];

fn kind<B>(req: &hyper::Request<B>) -> Option<usize> {
    let listing = req.uri().query().is_some_and(|q| q.contains("list-type"));
    let name = match *req.method() {
        hyper::Method::GET if listing => "LIST",
        hyper::Method::GET => "GET",
        hyper::Method::HEAD => "HEAD",
        hyper::Method::PUT if req.headers().contains_key("x-amz-copy-source") => "COPY",
        hyper::Method::PUT => "PUT",
        hyper::Method::DELETE => "DELETE",
        _ => return None,
    };
    KINDS.iter().position(|k| *k == name)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = || anyhow::anyhow!("usage: s3-server ROOT PORT [STATS_FILE]");
    let root = PathBuf::from(args.next().ok_or_else(usage)?);
    let port: u16 = args.next().ok_or_else(usage)?.parse()?;
    let stats_file = args.next().map(PathBuf::from);
    std::fs::create_dir_all(&root)?;
    let mut b = s3s::service::S3ServiceBuilder::new(
        s3s_fs::FileSystem::new(&root).map_err(|e| anyhow::anyhow!("{e:?}"))?,
    );
    b.set_auth(s3s::auth::SimpleAuth::from_single(
        "test-access-key",
        "test-secret-key",
    ));
    let service = b.build();
    let counts: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
    if let Some(path) = stats_file {
        let counts = counts.clone();
        std::thread::spawn(move || {
            loop {
                let fields: Vec<String> = KINDS
                    .iter()
                    .zip(counts.iter())
                    .map(|(k, n)| format!("\"{k}\": {}", n.load(Ordering::Relaxed)))
                    .collect();
                let _ = std::fs::write(&path, format!("{{{}}}\n", fields.join(", ")));
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (socket, _) = listener.accept().await?;
        // As real S3 servers do (Go's net package, so MinIO, sets it by default): without it
        // each small response (a checkpoint, a COPY's result) waits ~40 ms for the client's
        // delayed ACK, which the benchmark would count against the processor.
        let _ = socket.set_nodelay(true);
        let (service, counts) = (service.clone(), counts.clone());
        tokio::spawn(async move {
            let counted =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    if let Some(i) = kind(&req) {
                        counts[i].fetch_add(1, Ordering::Relaxed);
                    }
                    Service::call(&service, req)
                });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let _ = builder
                .serve_connection(hyper_util::rt::TokioIo::new(socket), counted)
                .await;
        });
    }
}
