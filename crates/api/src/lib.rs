//! The HTTP API's wire types and its typed client.
//!
//! The daemon serves these bodies (its OpenAPI document is generated from them); [`client`]
//! is the one client every consumer uses: the CLI, the tests, the MCP server and SDKs.

#![forbid(unsafe_code)]

pub mod client;
mod model;

pub use model::*;
