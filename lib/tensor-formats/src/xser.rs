//! xser layouts (in progress).
