//! The `roe` command line (`roe serve`, `roe expert ...`, `roe route`, `roe score`,
//! `roe generate`, `roe answer`, `roe expert train|export`, `roe train`): a thin client of the gRPC API, and the process that serves
//! it. `roe bench` and `roe eval` run the `roe-bench` binary beside it; `roe tls self-signed`
//! makes certificates for a private deployment.

pub mod cli;
pub mod models;
pub mod process;
pub mod tls;
pub mod training;
