//! The ONNX protobuf messages (`onnx.proto`, package `onnx`, proto2) as `prost` types.
//!
//! `onnx.rs` is generated and committed, so building needs no `protoc`; regenerate it after replacing
//! `onnx.proto` with `cargo run --manifest-path compiler/onnx-proto/gen/Cargo.toml`.

#![allow(clippy::all, missing_docs)]
include!("onnx.rs");
