//! The compliance agent of the HIPAA appliance: configuration, signing, evidence, and the checks and fixes built on them.

pub mod cli;
pub mod config;
pub mod crypto;
pub mod error;
pub mod evidence;
pub mod nar;
pub mod nixos;
pub mod schedule;

pub use error::{Error, Result};
