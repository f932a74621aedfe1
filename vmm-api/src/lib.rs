//! The contract between one `ffmk-vmm` process and its clients (the
//! `ffmk-vmm` client commands, the node daemon `ffmk-node`, scripts): the
//! REST API of docs/api.yaml over a Unix socket.
//!
//! - [`http`]: the HTTP/1.1 codec both ends use (bounded, one request per
//!   connection);
//! - [`model`] and [`migration`]: one type per request and answer body;
//! - [`endpoint`]: every method and path, by operationId;
//! - [`Client`]: one typed method per endpoint.
//!
//! The crate links no KVM, device or VFIO code: a client of the API needs
//! only this. `tests/contract.rs` keeps the types and docs/api.yaml equal.
pub mod client;
pub mod endpoint;
pub mod http;
pub mod metrics;
pub mod migration;
pub mod model;

pub use client::{Client, Error};
