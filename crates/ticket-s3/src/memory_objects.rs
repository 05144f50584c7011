//! `object_store` over a [`MemStore`], for tests: the Delta table's log (which delta-rs reads
//! and writes through `object_store`) and its data files (which the stream writes through
//! [`crate::store::ObjectStore`]) in one store, with one request counter and one fault
//! ([`MemStore::inject`]) for both, as both are one bucket in S3. A fresh read of the table
//! after a fault then sees exactly the bytes the committer left.
//!
//! Conditional writes keep their meaning (`PutMode::Create` is create-only, `Update` is
//! update-if-ETag), which is what the log's commits rely on. Multipart uploads are not
//! supported (the table's writers make single PUTs).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyMode, CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload,
    ObjectMeta, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use crate::store::memory::MemStore;
use crate::store::{Expect, ObjectStore as _, StoreError};

/// `object_store` over a shared [`MemStore`].
#[derive(Clone)]
pub struct MemObjects(pub Arc<MemStore>);

impl fmt::Debug for MemObjects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MemObjects")
    }
}

impl fmt::Display for MemObjects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MemObjects")
    }
}

/// A [`StoreError`] as `object_store` says it: a lost conditional write as the mode's error,
/// anything else (a fault injected) as a generic failure, as a network error comes.
fn error(e: StoreError, path: &Path, mode: &PutMode) -> object_store::Error {
    let path = path.to_string();
    match (e, mode) {
        (StoreError::Conflict { key }, PutMode::Create) => object_store::Error::AlreadyExists {
            path,
            source: key.into(),
        },
        (StoreError::Conflict { key }, _) => object_store::Error::Precondition {
            path,
            source: key.into(),
        },
        (e, _) => object_store::Error::Generic {
            store: "MemObjects",
            source: Box::new(e),
        },
    }
}

fn meta(location: &Path, size: usize, e_tag: Option<String>) -> ObjectMeta {
    ObjectMeta {
        location: location.clone(),
        last_modified: chrono::Utc::now(),
        size: size as u64,
        e_tag,
        version: None,
    }
}

#[async_trait]
impl object_store::ObjectStore for MemObjects {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let expect = match &opts.mode {
            PutMode::Overwrite => Expect::Any,
            PutMode::Create => Expect::Absent,
            PutMode::Update(v) => Expect::ETag(v.e_tag.clone().unwrap_or_default()),
        };
        let etag = self
            .0
            .put(location.as_ref(), Bytes::from(payload), expect)
            .await
            .map_err(|e| error(e, location, &opts.mode))?;
        Ok(PutResult {
            e_tag: Some(etag),
            version: None,
        })
    }

    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(object_store::Error::NotImplemented {
            operation: "put_multipart_opts".into(),
            implementer: "MemObjects".into(),
        })
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let Some((body, etag)) = self
            .0
            .get(location.as_ref())
            .await
            .map_err(|e| error(e, location, &PutMode::Overwrite))?
        else {
            return Err(object_store::Error::NotFound {
                path: location.to_string(),
                source: "no such key".into(),
            });
        };
        let meta = meta(location, body.len(), Some(etag));
        let range = match &options.range {
            Some(r) => r
                .as_range(body.len() as u64)
                .map_err(|e| object_store::Error::Generic {
                    store: "MemObjects",
                    source: Box::new(e),
                })?,
            None => 0..body.len() as u64,
        };
        let bytes = if options.head {
            Bytes::new()
        } else {
            Bytes::from(body).slice(range.start as usize..range.end as usize)
        };
        Ok(GetResult {
            payload: GetResultPayload::Stream(futures::stream::once(async { Ok(bytes) }).boxed()),
            meta,
            range,
            attributes: Default::default(),
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let store = self.0.clone();
        locations
            .then(move |path| {
                let store = store.clone();
                async move {
                    let path = path?;
                    store
                        .delete(path.as_ref())
                        .await
                        .map_err(|e| error(e, &path, &PutMode::Overwrite))?;
                    Ok(path)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let store = self.0.clone();
        let prefix = prefix.cloned();
        futures::stream::once(async move {
            let p = prefix.as_ref().map(|p| format!("{p}/")).unwrap_or_default();
            let keys = store
                .list(&p)
                .await
                .map_err(|e| error(e, &Path::from(p.as_str()), &PutMode::Overwrite))?;
            let metas: Vec<object_store::Result<ObjectMeta>> = keys
                .iter()
                .map(|k| {
                    let size = store.bytes(k).map_or(0, |b| b.len());
                    Ok(meta(&Path::from(k.as_str()), size, None))
                })
                .collect();
            Ok::<_, object_store::Error>(futures::stream::iter(metas))
        })
        .map(|r| match r {
            Ok(s) => s.boxed(),
            Err(e) => futures::stream::once(async { Err(e) }).boxed(),
        })
        .flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let p = prefix.map(|p| format!("{p}/")).unwrap_or_default();
        let keys = self
            .0
            .list(&p)
            .await
            .map_err(|e| error(e, &Path::from(p.as_str()), &PutMode::Overwrite))?;
        let mut result = ListResult {
            common_prefixes: Vec::new(),
            objects: Vec::new(),
        };
        for k in keys {
            let rest = &k[p.len()..];
            match rest.split_once('/') {
                Some((dir, _)) => {
                    let dir = Path::from(format!("{p}{dir}").as_str());
                    if !result.common_prefixes.contains(&dir) {
                        result.common_prefixes.push(dir);
                    }
                }
                None => {
                    let size = self.0.bytes(&k).map_or(0, |b| b.len());
                    result
                        .objects
                        .push(meta(&Path::from(k.as_str()), size, None));
                }
            }
        }
        Ok(result)
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        if matches!(options.mode, CopyMode::Create)
            && self
                .0
                .exists(to.as_ref())
                .await
                .map_err(|e| error(e, to, &PutMode::Overwrite))?
        {
            return Err(object_store::Error::AlreadyExists {
                path: to.to_string(),
                source: "exists".into(),
            });
        }
        self.0
            .copy(from.as_ref(), to.as_ref())
            .await
            .map_err(|e| error(e, to, &PutMode::Overwrite))
    }
}
