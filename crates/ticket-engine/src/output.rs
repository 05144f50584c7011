//! The formats ticket objects are written in: JSON Lines (the original's contract, the
//! default) or Parquet (typed, compressed). Both hold the same tickets with the same fields;
//! [`ticket_schema`] is the Parquet files' schema and the one `query` reads both with.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use datafusion::arrow::array::{
    ArrayRef, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use ticket_core::TicketRef;

use crate::recycle::{Pool, bytes_with_room};

/// The version of the bytes an object holds for given tickets, in either format: recorded in
/// each batch's checkpoint, so that a batch committed by one version is never rebuilt by
/// another that would write other bytes under its keys. Raise it with any change to what
/// [`OutputFormat`]'s encoders write (a field, its formatting, Parquet's writer settings).
pub const ENCODING_VERSION: u32 = 1;

/// How ticket objects are written (`OUTPUT_FORMAT`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// One JSON object per line, as the original wrote.
    #[default]
    Jsonl,
    /// Parquet: typed columns (client_id integer, created_at timestamp UTC), zstd-compressed.
    Parquet,
}

impl OutputFormat {
    /// The file extension of its objects, which is also how `query` tells them apart.
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Jsonl => "jsonl",
            OutputFormat::Parquet => "parquet",
        }
    }
}

/// The columns of a ticket with its team, typed. `nullable` is for readers that must accept
/// what other tools may have written; our files never hold nulls.
pub fn ticket_schema(nullable: bool) -> SchemaRef {
    let utf8 = |name| Field::new(name, DataType::Utf8, nullable);
    Arc::new(Schema::new(vec![
        utf8("ticket_id"),
        Field::new("client_id", DataType::Int64, nullable),
        Field::new(
            "created_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            nullable,
        ),
        utf8("request"),
        utf8("request_type"),
        utf8("priority"),
        utf8("support_team"),
    ]))
}

/// JSON Lines bodies given back once their object is written (see [`crate::recycle`]).
static BODIES: Pool<Vec<u8>> = Pool::new(8);

/// Gives a JSON Lines object's body back for a later [`Rows::with_room_for`], if nothing else
/// holds it. (A Parquet body is not: Parquet rows are columns, not one buffer.)
pub fn recycle_body(format: OutputFormat, body: bytes::Bytes) {
    if format == OutputFormat::Jsonl
        && let Some(body) = unshared(body)
    {
        BODIES.give(body);
    }
}

/// The body's buffer, if nothing else holds it (no copy).
fn unshared(body: bytes::Bytes) -> Option<Vec<u8>> {
    Some(Vec::from(body.try_into_mut().ok()?))
}

/// Rows of one object as they are added: JSON Lines bytes, or columns for Parquet.
pub enum Rows {
    Jsonl(Vec<u8>),
    Parquet(Box<TicketColumns>),
}

impl Rows {
    pub fn new(format: OutputFormat) -> Rows {
        match format {
            OutputFormat::Jsonl => Rows::Jsonl(Vec::new()),
            OutputFormat::Parquet => Rows::Parquet(Box::default()),
        }
    }

    /// Rows with no room reserved, for many small groups (`process-file`'s hours).
    pub fn small(format: OutputFormat) -> Rows {
        match format {
            OutputFormat::Jsonl => Rows::Jsonl(Vec::new()),
            OutputFormat::Parquet => Rows::Parquet(Box::new(TicketColumns::with_capacity(0))),
        }
    }

    /// See [`crate::enrich::BatchBuilder::with_room_for`]. A JSON line is the input plus its
    /// team (`,"support_team":"…"`) and the time's fixed precision.
    pub fn with_room_for(format: OutputFormat, records: usize, bytes: usize) -> Rows {
        match format {
            OutputFormat::Jsonl => Rows::Jsonl(bytes_with_room(&BODIES, bytes + records * 48)),
            OutputFormat::Parquet => Rows::Parquet(Box::default()),
        }
    }

    pub fn push(&mut self, ticket: &TicketRef<'_>, team: &str) {
        match self {
            Rows::Jsonl(body) => {
                ticket.write_with_team(team, body);
                body.push(b'\n');
            }
            Rows::Parquet(columns) => columns.push(ticket, team),
        }
    }

    /// The rows as one whole object in its format.
    pub fn into_object(self) -> anyhow::Result<Vec<u8>> {
        match self {
            Rows::Jsonl(body) => Ok(body),
            Rows::Parquet(columns) => {
                let mut w = ObjectWriter::new(OutputFormat::Parquet, Vec::new())?;
                w.write(Rows::Parquet(columns))?;
                w.finish()
            }
        }
    }
}

/// A ticket's columns, one builder per field of [`ticket_schema`].
pub struct TicketColumns {
    ticket_id: StringBuilder,
    client_id: Int64Builder,
    created_at: TimestampMicrosecondBuilder,
    request: StringBuilder,
    request_type: StringBuilder,
    priority: StringBuilder,
    support_team: StringBuilder,
}

impl Default for TicketColumns {
    fn default() -> Self {
        TicketColumns::with_capacity(1024)
    }
}

impl TicketColumns {
    /// Room for `rows` rows (the text columns grow as needed).
    fn with_capacity(rows: usize) -> Self {
        let text = || StringBuilder::with_capacity(rows, rows);
        TicketColumns {
            ticket_id: text(),
            client_id: Int64Builder::with_capacity(rows),
            created_at: TimestampMicrosecondBuilder::with_capacity(rows).with_timezone("UTC"),
            request: text(),
            request_type: text(),
            priority: text(),
            support_team: text(),
        }
    }

    fn push(&mut self, t: &TicketRef<'_>, team: &str) {
        self.ticket_id.append_value(t.ticket_id());
        self.client_id.append_value(t.client_id());
        self.created_at
            .append_value(t.created_at().timestamp_micros());
        self.request.append_value(t.request());
        self.request_type.append_value(t.request_type());
        self.priority.append_value(t.priority().as_str());
        self.support_team.append_value(team);
    }

    fn finish(&mut self) -> anyhow::Result<RecordBatch> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.ticket_id.finish()),
            Arc::new(self.client_id.finish()),
            Arc::new(self.created_at.finish()),
            Arc::new(self.request.finish()),
            Arc::new(self.request_type.finish()),
            Arc::new(self.priority.finish()),
            Arc::new(self.support_team.finish()),
        ];
        RecordBatch::try_new(ticket_schema(false), columns).context("building ticket columns")
    }
}

/// How every Parquet file of ours is written: the objects, the table's data files and their
/// compactions.
pub fn parquet_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        // Bounds what a writer holds before it encodes a row group.
        .set_max_row_group_row_count(Some(128 * 1024))
        .build()
}

/// Writes rows, added in pieces, as one object or file in its format.
pub enum ObjectWriter<W: Write + Send> {
    Jsonl(W),
    Parquet(Box<ArrowWriter<W>>),
}

impl<W: Write + Send> ObjectWriter<W> {
    pub fn new(format: OutputFormat, out: W) -> anyhow::Result<ObjectWriter<W>> {
        Ok(match format {
            OutputFormat::Jsonl => ObjectWriter::Jsonl(out),
            OutputFormat::Parquet => {
                let w = ArrowWriter::try_new(out, ticket_schema(false), Some(parquet_properties()))
                    .context("starting a Parquet file")?;
                ObjectWriter::Parquet(Box::new(w))
            }
        })
    }

    /// Adds rows; they must be of this writer's format.
    pub fn write(&mut self, rows: Rows) -> anyhow::Result<()> {
        match (self, rows) {
            (ObjectWriter::Jsonl(w), Rows::Jsonl(body)) => Ok(w.write_all(&body)?),
            (ObjectWriter::Parquet(w), Rows::Parquet(mut columns)) => {
                Ok(w.write(&columns.finish()?)?)
            }
            _ => anyhow::bail!("rows of another format than the writer's"),
        }
    }

    /// Ends the object (Parquet writes its footer) and gives the output back.
    pub fn finish(self) -> anyhow::Result<W> {
        match self {
            ObjectWriter::Jsonl(mut w) => {
                w.flush()?;
                Ok(w)
            }
            ObjectWriter::Parquet(w) => Ok(w.into_inner().context("ending a Parquet file")?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_body_is_given_back_without_a_copy_unless_still_held() {
        let mut body = Vec::with_capacity(1 << 20);
        body.extend_from_slice(b"{\"ticket_id\":\"T-1\"}\n");
        let at = body.as_ptr();
        let body = bytes::Bytes::from(body);
        let held = body.clone();
        assert!(
            unshared(body).is_none(),
            "a body still held elsewhere is kept"
        );
        let back = unshared(held).expect("the last holder gives it back");
        assert_eq!(back.as_ptr(), at, "the same buffer, not a copy");
        assert!(back.capacity() >= 1 << 20);
    }
}
