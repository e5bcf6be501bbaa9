//! `fledge inspect`: describe a resolved image.
//!
//! (stub: filled in by the source work)
