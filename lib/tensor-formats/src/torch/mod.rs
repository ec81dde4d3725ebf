//! torch `.pt` archives: the zip container, the restricted pickle reader, the torch-exact pickle writer,
//! and file-level reading and writing.

pub mod pickle;
pub mod pickle_write;
pub mod reader;
pub mod writer;
pub mod zip;

pub use pickle::{StorageRef, TensorValue, Value};
pub use reader::{PtArchive, PtFile};
pub use writer::{archive_name_for, write_archive, write_pt, PtRoot, PtStorage, PtTensor};
