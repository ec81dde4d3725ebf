//! torch .pt archives (in progress).
