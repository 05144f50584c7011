//! A TCP relay in front of a service, to cut it off and bring it back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};

/// A TCP relay to `target` that can be cut: while down, it closes every connection at once.
pub struct Proxy {
    pub port: u16,
    down: Arc<AtomicBool>,
    epoch: Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Proxy::with_listener(listener, target)
    }

    /// A relay on a listener the caller has already bound (and so kept from anyone else).
    pub fn with_listener(listener: TcpListener, target: SocketAddr) -> Proxy {
        let port = listener.local_addr().expect("addr").port();
        let down = Arc::new(AtomicBool::new(false));
        let (tx, _) = tokio::sync::watch::channel(0u64);
        let epoch = Arc::new(tx);
        let (d, e) = (down.clone(), epoch.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut = e.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            down,
            epoch,
            task,
        }
    }

    /// Cuts every open connection and refuses new ones until [`Proxy::up`].
    pub fn down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    pub fn up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// A TCP relay to an HTTP/1.1 server that damages one byte (the 33rd) of the body of the first
/// `times` PUT requests whose request line contains `path_part`: what a faulty link or
/// middlebox behind TLS termination does. Everything else passes untouched.
pub struct Corrupter {
    pub port: u16,
    damaged: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Corrupter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where a client-to-server byte stream is: in a request's head, or in its body.
enum Http {
    Head(Vec<u8>),
    Body {
        left: usize,
        at: usize,
        damage: bool,
    },
}

impl Corrupter {
    pub async fn start(target: SocketAddr, path_part: &'static str, times: usize) -> Corrupter {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let damaged = Arc::new(AtomicUsize::new(0));
        let budget = Arc::new(AtomicUsize::new(times));
        let d = damaged.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let (d, budget) = (d.clone(), budget.clone());
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_server, mut to_server) = outbound.into_split();
                    let back = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                    });
                    let mut state = Http::Head(Vec::new());
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from_client.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        for byte in &mut buf[..n] {
                            state = match state {
                                Http::Head(mut head) => {
                                    head.push(*byte);
                                    if !head.ends_with(b"\r\n\r\n") {
                                        Http::Head(head)
                                    } else {
                                        let head = String::from_utf8_lossy(&head).to_string();
                                        let left = content_length(&head);
                                        let damage = head.starts_with("PUT ")
                                            && head
                                                .lines()
                                                .next()
                                                .is_some_and(|l| l.contains(path_part))
                                            && left > 64
                                            && budget
                                                .fetch_update(
                                                    Ordering::SeqCst,
                                                    Ordering::SeqCst,
                                                    |b| b.checked_sub(1),
                                                )
                                                .is_ok();
                                        if left == 0 {
                                            Http::Head(Vec::new())
                                        } else {
                                            Http::Body {
                                                left,
                                                at: 0,
                                                damage,
                                            }
                                        }
                                    }
                                }
                                Http::Body { left, at, damage } => {
                                    if damage && at == 32 {
                                        *byte ^= 0x01;
                                        d.fetch_add(1, Ordering::SeqCst);
                                    }
                                    if left == 1 {
                                        Http::Head(Vec::new())
                                    } else {
                                        Http::Body {
                                            left: left - 1,
                                            at: at + 1,
                                            damage,
                                        }
                                    }
                                }
                            };
                        }
                        if to_server.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    back.abort();
                });
            }
        });
        Corrupter {
            port,
            damaged,
            task,
        }
    }

    /// How many bodies were damaged so far.
    pub fn damaged(&self) -> usize {
        self.damaged.load(Ordering::SeqCst)
    }
}

/// The `Content-Length` of an HTTP head, 0 if it has none.
fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}
