//! Real backing services for the storage tests, started per test and stopped on drop:
//! a throwaway PostgreSQL cluster and moto's S3 server.

#![allow(dead_code)]

pub mod moto;
pub mod postgres;
