//! Strided-copy engine (in progress).
