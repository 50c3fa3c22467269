//! The compliance agent of the HIPAA appliance: configuration, signing, evidence, the channel to the MSP, and the checks and fixes built on them.

pub mod cli;
pub mod config;
pub mod crypto;
pub mod error;
pub mod evidence;
pub mod mcp;
pub mod nar;
pub mod nixos;
pub mod orders;
pub mod queue;
pub mod schedule;

pub use error::{Error, Result};
