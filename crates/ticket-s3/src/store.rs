//! The object store behind the exactly-once protocol: the handful of operations the committers
//! need, with conditional writes (create-only, update-if-ETag).
//!
//! [`crate::Store`] is the real one (AWS S3, MinIO, any S3-compatible store);
//! [`memory::MemStore`] keeps objects in memory with the same conditional semantics and can
//! inject faults (a crash at the n-th request, a write that lands but whose answer is lost), so
//! the committers' protocols (`ticket-objects`, `ticket-delta`) are tested in one process, in
//! milliseconds.

use futures::future::BoxFuture;

/// What went wrong with one object operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A conditional write lost: someone else changed the object first.
    #[error("precondition failed on {key}: the object was changed by another writer")]
    Conflict { key: String },
    /// Worth trying again: network, timeout, throttling, a 5xx.
    #[error("{op} {location} failed: {message}")]
    Transient {
        op: &'static str,
        location: String,
        message: String,
    },
    /// Will fail the same way until someone changes something: permissions, a missing bucket,
    /// a request the server rejects. `hint` says what to fix.
    #[error("{op} {location} was refused: {message} ({hint})")]
    Permanent {
        op: &'static str,
        location: String,
        message: String,
        hint: String,
    },
}

impl StoreError {
    /// Whether trying the same request again may succeed (the one place that decides it).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient { .. })
    }
}

/// Which version of an object a write expects to replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Overwrite whatever is there.
    Any,
    /// The object must not exist yet.
    Absent,
    /// The object must still have this ETag.
    ETag(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// An object's bytes and its ETag.
pub type Object = (Vec<u8>, String);

/// The store as the processor's tasks share it.
pub type SharedStore = std::sync::Arc<dyn ObjectStore>;

/// An object store with conditional writes. Keys are relative to the store's bucket.
pub trait ObjectStore: Send + Sync + 'static {
    /// Where the objects live, for messages (`s3://bucket`).
    fn location(&self) -> String;
    /// The object's bytes and ETag, or `None` if it does not exist.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Object>>>;
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<bool>>;
    /// Writes an object, conditionally; returns its new ETag.
    fn put<'a>(
        &'a self,
        key: &'a str,
        body: bytes::Bytes,
        expect: Expect,
    ) -> BoxFuture<'a, StoreResult<String>>;
    /// Server-side copy: the bytes are not sent again.
    fn copy<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, StoreResult<()>>;
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<()>>;
    /// Every key under `prefix`, following pagination.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, StoreResult<Vec<String>>>;
}

pub mod memory {
    //! An in-memory [`ObjectStore`] with fault injection, for tests of the protocol.

    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A fault to inject at the n-th request (counted from 1 over every operation).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Fault {
        /// The process died before sending request n: it and every later request fail.
        CrashAt(u64),
        /// Request n (a write) is applied, but its answer is lost: the caller sees an error.
        LoseAnswerOf(u64),
        /// Requests from n on fail transiently, `count` of them.
        Outage { from: u64, count: u64 },
    }

    #[derive(Default)]
    pub struct MemStore {
        objects: Mutex<BTreeMap<String, (bytes::Bytes, String)>>,
        requests: AtomicU64,
        versions: AtomicU64,
        fault: Mutex<Option<Fault>>,
        /// Keys that refuse writes (a permission the role lacks), for tests of permanent errors.
        read_only_prefix: Mutex<Option<String>>,
    }

    impl MemStore {
        pub fn new() -> MemStore {
            MemStore::default()
        }

        /// Sets the fault, counting requests from now.
        pub fn inject(&self, fault: Option<Fault>) {
            self.requests.store(0, Ordering::SeqCst);
            *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
        }

        pub fn refuse_writes_under(&self, prefix: &str) {
            *self
                .read_only_prefix
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(prefix.to_string());
        }

        /// Requests made since the last [`MemStore::inject`].
        pub fn requests(&self) -> u64 {
            self.requests.load(Ordering::SeqCst)
        }

        pub fn keys(&self, prefix: &str) -> Vec<String> {
            self.lock()
                .keys()
                .filter(|k| k.starts_with(prefix))
                .cloned()
                .collect()
        }

        pub fn bytes(&self, key: &str) -> Option<bytes::Bytes> {
            self.lock().get(key).map(|(b, _)| b.clone())
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (bytes::Bytes, String)>> {
            self.objects.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Counts the request and says whether it is applied and whether its answer arrives.
        fn begin(&self, op: &'static str, key: &str) -> Result<bool, StoreError> {
            let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
            let fault = *self.fault.lock().unwrap_or_else(|p| p.into_inner());
            let failed = |message: &str| StoreError::Transient {
                op,
                location: key.to_string(),
                message: message.to_string(),
            };
            match fault {
                Some(Fault::CrashAt(at)) if n >= at => Err(failed("process crashed")),
                Some(Fault::Outage { from, count }) if n >= from && n < from + count => {
                    Err(failed("connection refused"))
                }
                Some(Fault::LoseAnswerOf(at)) if n == at => Ok(false),
                _ => Ok(true),
            }
        }

        fn lost(op: &'static str, key: &str) -> StoreError {
            StoreError::Transient {
                op,
                location: key.to_string(),
                message: "connection reset before the answer".to_string(),
            }
        }

        fn check_writable(&self, op: &'static str, key: &str) -> StoreResult<()> {
            let ro = self
                .read_only_prefix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            match ro {
                Some(p) if key.starts_with(&p) => Err(StoreError::Permanent {
                    op,
                    location: key.to_string(),
                    message: "403 AccessDenied".to_string(),
                    hint: "grant s3:PutObject".to_string(),
                }),
                _ => Ok(()),
            }
        }

        fn new_etag(&self) -> String {
            format!("\"v{}\"", self.versions.fetch_add(1, Ordering::SeqCst) + 1)
        }
    }

    impl ObjectStore for MemStore {
        fn location(&self) -> String {
            "memory://".to_string()
        }

        fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Object>>> {
            Box::pin(async move {
                self.begin("GET", key)?;
                Ok(self.lock().get(key).map(|(b, e)| (b.to_vec(), e.clone())))
            })
        }

        fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<bool>> {
            Box::pin(async move {
                self.begin("HEAD", key)?;
                Ok(self.lock().contains_key(key))
            })
        }

        fn put<'a>(
            &'a self,
            key: &'a str,
            body: bytes::Bytes,
            expect: Expect,
        ) -> BoxFuture<'a, StoreResult<String>> {
            Box::pin(async move {
                let answered = self.begin("PUT", key)?;
                self.check_writable("PUT", key)?;
                let etag = {
                    let mut objects = self.lock();
                    let current = objects.get(key).map(|(_, e)| e.as_str());
                    let ok = match &expect {
                        Expect::Any => true,
                        Expect::Absent => current.is_none(),
                        Expect::ETag(e) => current == Some(e.as_str()),
                    };
                    if !ok {
                        return Err(StoreError::Conflict {
                            key: key.to_string(),
                        });
                    }
                    let etag = self.new_etag();
                    objects.insert(key.to_string(), (body, etag.clone()));
                    etag
                };
                if answered {
                    Ok(etag)
                } else {
                    Err(MemStore::lost("PUT", key))
                }
            })
        }

        fn copy<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, StoreResult<()>> {
            Box::pin(async move {
                let answered = self.begin("COPY", to)?;
                self.check_writable("COPY", to)?;
                {
                    let mut objects = self.lock();
                    let Some((body, _)) = objects.get(from).cloned() else {
                        return Err(StoreError::Permanent {
                            op: "COPY",
                            location: from.to_string(),
                            message: "404 NoSuchKey".to_string(),
                            hint: "the source object is gone".to_string(),
                        });
                    };
                    let etag = self.new_etag();
                    objects.insert(to.to_string(), (body, etag));
                }
                if answered {
                    Ok(())
                } else {
                    Err(MemStore::lost("COPY", to))
                }
            })
        }

        fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<()>> {
            Box::pin(async move {
                let answered = self.begin("DELETE", key)?;
                self.lock().remove(key);
                if answered {
                    Ok(())
                } else {
                    Err(MemStore::lost("DELETE", key))
                }
            })
        }

        fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, StoreResult<Vec<String>>> {
            Box::pin(async move {
                self.begin("LIST", prefix)?;
                Ok(self.keys(prefix))
            })
        }
    }
}
