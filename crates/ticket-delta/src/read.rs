//! The Delta table (`OUTPUT_FORMAT=delta`) as a DataFusion table: exactly the data files of
//! the snapshot read when the session opened, with their partition values from the log (not
//! from a listing: a file of a commit not made yet, or one no commit refers to, is never
//! read, so a query never sees half a commit).

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use object_store::ObjectStore;

use crate::{SnapshotFile, TABLE_DIR, Table};

/// The partition columns' types, in [`crate::PARTITION_COLUMNS`] order.
pub fn partition_fields() -> Vec<FieldRef> {
    crate::PARTITION_COLUMNS
        .iter()
        .map(|name| {
            let t = match *name {
                "date" => DataType::Date32,
                "hour" | "partition" => DataType::Int32,
                _ => DataType::Utf8,
            };
            Arc::new(Field::new(*name, t, true))
        })
        .collect()
}

#[derive(Debug)]
pub struct Snapshot {
    /// `s3://bucket`, registered with the session's object store.
    store_url: ObjectStoreUrl,
    files: Vec<PartitionedFile>,
    file_schema: SchemaRef,
    schema: SchemaRef,
}

impl Snapshot {
    /// `root`: the table's root as a path in the bucket (`prefix/tables/tickets_with_team/`).
    pub fn new(
        bucket: &str,
        root: &str,
        file_schema: SchemaRef,
        files: Vec<SnapshotFile>,
    ) -> Result<Snapshot> {
        let store_url = ObjectStoreUrl::parse(format!("s3://{bucket}"))?;
        let partition = partition_fields();
        let files = files
            .into_iter()
            .map(|f| {
                let values = partition
                    .iter()
                    .map(|field| {
                        let raw = f.partition_values.get(field.name()).cloned().flatten();
                        ScalarValue::try_from_string(raw.unwrap_or_default(), field.data_type())
                            .map_err(|e| {
                                DataFusionError::Plan(format!(
                                    "the Delta table's file {} has a bad {}: {e}",
                                    f.path,
                                    field.name()
                                ))
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(PartitionedFile::new(format!("{root}{}", f.path), f.size)
                    .with_partition_values(values))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut fields: Vec<FieldRef> = file_schema.fields().iter().cloned().collect();
        fields.extend(partition);
        Ok(Snapshot {
            store_url,
            files,
            file_schema,
            schema: Arc::new(Schema::new(fields)),
        })
    }
}

#[async_trait::async_trait]
impl TableProvider for Snapshot {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let table_schema = TableSchema::builder(self.file_schema.clone())
            .with_table_partition_cols(partition_fields())
            .build();
        let source = Arc::new(ParquetSource::new(table_schema));
        let mut builder = FileScanConfigBuilder::new(self.store_url.clone(), source);
        for f in &self.files {
            builder = builder.with_file(f.clone());
        }
        let config = builder
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

/// Registers the bucket's Delta table (under `S3_PREFIX` `prefix`), its current snapshot read
/// with `schema`, as `name`; `false` if the bucket has no table.
pub async fn register(
    ctx: &SessionContext,
    name: &str,
    store: &Arc<dyn ObjectStore>,
    bucket: &str,
    prefix: &str,
    schema: SchemaRef,
) -> anyhow::Result<bool> {
    let Some(table) = Table::open(store.clone(), bucket, prefix).await? else {
        return Ok(false);
    };
    let files = table.files().await?;
    let root = format!("{prefix}{TABLE_DIR}");
    let snapshot = Snapshot::new(bucket, &root, schema, files)?;
    ctx.register_table(name, Arc::new(snapshot))?;
    Ok(true)
}
