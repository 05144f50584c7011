//! Counting with DataFusion. Each micro-batch (or a whole file) becomes an Arrow batch of the
//! three grouping columns; one long-lived `SessionContext` runs the aggregation.

use std::sync::Arc;

use anyhow::Context;
use datafusion::arrow::array::{
    Array, ArrayRef, Int64Array, RecordBatch, StringArray, StringBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::prelude::{SessionContext, col, lit};
use ticket_core::counts::{CountRow, Counts};

/// Collects the grouping columns of valid tickets, row by row.
pub struct Columns {
    request_type: StringBuilder,
    priority: StringBuilder,
    support_team: StringBuilder,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            request_type: StringBuilder::new(),
            priority: StringBuilder::new(),
            support_team: StringBuilder::new(),
        }
    }
}

impl Columns {
    /// Room for `records` rows of the usual lengths.
    pub fn with_room_for(records: usize) -> Columns {
        let column = || StringBuilder::with_capacity(records, records * 16);
        Columns {
            request_type: column(),
            priority: column(),
            support_team: column(),
        }
    }

    pub fn push(&mut self, request_type: &str, priority: &str, support_team: &str) {
        self.request_type.append_value(request_type);
        self.priority.append_value(priority);
        self.support_team.append_value(support_team);
    }

    pub fn len(&self) -> usize {
        use datafusion::arrow::array::ArrayBuilder;
        self.request_type.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn finish(mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.request_type.finish()),
            Arc::new(self.priority.finish()),
            Arc::new(self.support_team.finish()),
        ];
        // The three columns always have the schema's types and equal lengths.
        RecordBatch::try_new(schema(), columns).unwrap_or_else(|_| RecordBatch::new_empty(schema()))
    }
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("request_type", DataType::Utf8, false),
        Field::new("priority", DataType::Utf8, false),
        Field::new("support_team", DataType::Utf8, false),
    ]))
}

#[derive(Clone)]
pub struct Aggregator {
    ctx: SessionContext,
}

impl Default for Aggregator {
    fn default() -> Self {
        Aggregator {
            ctx: SessionContext::new(),
        }
    }
}

impl Aggregator {
    /// ```sql
    /// SELECT request_type, priority, support_team, COUNT(*) AS count
    /// FROM tickets GROUP BY request_type, priority, support_team
    /// ```
    /// The counts of a Parquet file of tickets with their team (a Delta table's data file).
    pub async fn count_parquet(&self, body: bytes::Bytes) -> anyhow::Result<Counts> {
        use datafusion::parquet::arrow::ProjectionMask;
        use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let builder = ParquetRecordBatchReaderBuilder::try_new(body)
            .context("reading a Parquet file of tickets")?;
        let wanted = ["request_type", "priority", "support_team"];
        let mask = ProjectionMask::columns(builder.parquet_schema(), wanted);
        let batches = builder
            .with_projection(mask)
            .build()?
            .collect::<Result<Vec<_>, _>>()
            .context("reading a Parquet file of tickets")?;
        self.count(batches).await
    }

    pub async fn count(&self, batches: Vec<RecordBatch>) -> anyhow::Result<Counts> {
        let mut counts = Counts::default();
        if batches.iter().all(|b| b.num_rows() == 0) {
            return Ok(counts);
        }
        let result = self
            .ctx
            .read_batches(batches)
            .context("reading the batch into DataFusion")?
            .aggregate(
                vec![col("request_type"), col("priority"), col("support_team")],
                vec![count(lit(1)).alias("count")],
            )?
            .collect()
            .await
            .context("counting tickets with DataFusion")?;
        for batch in result {
            let text = |i: usize| -> anyhow::Result<StringArray> {
                let a = cast(batch.column(i), &DataType::Utf8)?;
                Ok(a.as_any()
                    .downcast_ref::<StringArray>()
                    .context("string column")?
                    .clone())
            };
            let (rt, pr, team) = (text(0)?, text(1)?, text(2)?);
            let n = cast(batch.column(3), &DataType::Int64)?;
            let n = n
                .as_any()
                .downcast_ref::<Int64Array>()
                .context("count column")?;
            for i in 0..batch.num_rows() {
                counts.add(&CountRow {
                    request_type: rt.value(i).to_string(),
                    priority: pr.value(i).to_string(),
                    support_team: team.value(i).to_string(),
                    count: n.value(i) as u64,
                });
            }
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_group_by_type_priority_and_team() {
        let mut c = Columns::default();
        for (rt, p, t) in [
            ("billing", "high", "Billing Team"),
            ("billing", "high", "Billing Team"),
            ("other", "low", "General Support"),
        ] {
            c.push(rt, p, t);
        }
        let mut c2 = Columns::default();
        c2.push("billing", "low", "Billing Team");
        let counts = Aggregator::default()
            .count(vec![c.finish(), c2.finish()])
            .await
            .expect("counts");
        let rows = counts.rows();
        assert_eq!(counts.total(), 4);
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (
                rows[0].request_type.as_str(),
                rows[0].priority.as_str(),
                rows[0].count
            ),
            ("billing", "high", 2)
        );
    }

    #[tokio::test]
    async fn nothing_to_count_is_zero() {
        let counts = Aggregator::default()
            .count(vec![Columns::default().finish()])
            .await
            .expect("counts");
        assert_eq!(counts.total(), 0);
    }
}
