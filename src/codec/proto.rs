//! The prost types generated from `proto/sessionizer.proto` at build time.
#![allow(missing_docs, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/sessionizer.v1.rs"));
