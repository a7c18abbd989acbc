//! Integration tests: the service over real Redis and the Firestore emulator. One binary;
//! run through `scripts/test.sh`, which starts both and exports their addresses.

mod admin;
mod contract;
mod faults;
mod handover;
mod helpers;
mod inputs;
mod migration;
mod quota;
mod ratelimit;
