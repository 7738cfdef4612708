//! Code shared by the fuzz targets and, through `#[path]` includes, by `tests/fuzz_corpus.rs`,
//! which replays the committed corpora in the normal test suite. Each module uses only
//! `transport` and `std` so the test can include it without this crate's dependencies.

pub mod frame_roundtrip;
pub mod session_ops;
