//! A standalone S3 server (s3s-fs over a directory) for the benchmark:
//! `s3-server ROOT PORT` with the credentials of `tests/common` (test-access-key/test-secret-key).

use std::path::PathBuf;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let root = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: s3-server ROOT PORT"))?,
    );
    let port: u16 = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: s3-server ROOT PORT"))?
        .parse()?;
    std::fs::create_dir_all(&root)?;
    let mut b = s3s::service::S3ServiceBuilder::new(
        s3s_fs::FileSystem::new(&root).map_err(|e| anyhow::anyhow!("{e:?}"))?,
    );
    b.set_auth(s3s::auth::SimpleAuth::from_single(
        "test-access-key",
        "test-secret-key",
    ));
    let service = b.build();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (socket, _) = listener.accept().await?;
        let service = service.clone();
        tokio::spawn(async move {
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let _ = builder
                .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                .await;
        });
    }
}
