//! Shared support for the suite (in progress).
