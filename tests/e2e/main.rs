//! The end-to-end tests, one binary: each test binary links rdkafka, the AWS SDK, s3s and
//! DataFusion, so five of them cost five links of all of that for every edit.
//!
//! - [`pipeline`]: the producer and the processor from end to end, the original's scenario;
//! - [`faults`]: crashes, outages and stale owners, with the real processes killed for real;
//! - [`robustness`]: bad input, signals, TLS and SASL, what the logs may and may not say;
//! - [`lake`]: time partitions, Parquet and the Delta table read back by other readers,
//!   `query`, `compact`, `process-file`, the report in Chromium;
//! - [`deploy`]: the compose files, images, workflows and docs against the code.
//!
//! [`common`] starts the services they run against. `cargo test --test e2e lake::` runs one
//! module.

mod common;
mod deploy;
mod faults;
mod lake;
mod pipeline;
mod robustness;
