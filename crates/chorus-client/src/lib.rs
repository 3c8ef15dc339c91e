//! A small async client for chorus, speaking etcd's v3 API (KV, Maintenance, Cluster).
//!
//! It owns what every caller would otherwise rewrite: parsing endpoint addresses, keeping one
//! gRPC channel per endpoint, sending each request to a healthy endpoint, moving to the next
//! one when an endpoint fails, and bounding every call by a deadline and a retry budget so that
//! nothing hangs. Because it speaks the etcd API, it works against etcd as well as chorus.
//!
//! Driving it:
//!
//! ```no_run
//! # async fn example() -> Result<(), chorus_client::ClientError> {
//! use chorus_client::{Client, ClientOptions};
//! let endpoints = vec!["127.0.0.1:2379".to_string(), "http://127.0.0.1:22379".to_string()];
//! let client = Client::connect(&endpoints, ClientOptions::default()).await?;
//! client.put("greeting", "hello").await?;
//! let response = client.get("greeting").await?;
//! assert_eq!(response.kvs[0].value, b"hello");
//! # Ok(())
//! # }
//! ```
//!
//! Retries follow etcd's own client: a read is retried on any `Unavailable` or transport
//! failure, since repeating it cannot change anything; a write is retried only when the error
//! proves it never left this process (the connection could not be established), because a
//! write that reached a server may still commit, and repeating it could apply it twice.
//!
//! This crate depends on `chorus-proto` only, never on the server, so that applications can use
//! it without pulling in the server's dependencies. The wire types are re-exported as
//! [`proto`] so callers build requests with the same version of the generated code.

mod client;
mod coord;
mod endpoint;
mod error;
mod range;

pub use chorus_proto as proto;
pub use client::{Client, ClientOptions};
pub use coord::{FenceGuard, LockGuard, Session, SharedFenceGuard, StaleToken};
pub use error::ClientError;
pub use range::prefix_range_end;
