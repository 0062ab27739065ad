//! Whole-service tests against the ferrokinesis emulator, each with its own emulator and streams.

// Tests measure wall time between processes and emulators, outside any paused clock.
#![allow(clippy::disallowed_types)]

mod helpers;

mod cli;
mod consumers;
mod crash;
mod dead_letters;
mod destinations;
mod detach;
mod faults;
mod kpl;
mod large_records;
mod leases;
mod network;
mod operate;
mod ordering;
mod positions;
mod pressure;
mod regions;
mod replication;
mod resharding;
mod roles;
mod routing;
mod shared_streams;
mod soak;
