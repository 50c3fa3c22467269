//! Real backing services for the storage tests, started per test and stopped on drop:
//! a throwaway PostgreSQL cluster.

#![allow(dead_code)]

pub mod postgres;
