//! Developer tool used by the compat tests: reads checkpoint files with this crate and writes them back.
//!
//! * `ptconv dump FILE` prints one JSON line per tensor: name, dtype, shape, strides, offset and the
//!   sha256 of its logical (row-major) bytes, so Python can compare against `torch.load`.
//! * `ptconv rewrite IN.pt OUT.pt` re-saves a `.pt` keeping storages, views and strides, which must give
//!   torch's bytes again.
//!
//! Exit codes: 0 ok, 2 unreadable input (one-line error naming the file).

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use sha2::{Digest, Sha256};
use tensor_formats::copy::{write_view, Part};
use tensor_formats::torch::{archive_name_for, write_pt, PtFile, PtRoot, PtStorage, PtTensor};
use tensor_formats::xser::NxdFile;

struct HashWriter(Sha256);

impl Write for HashWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn dump(path: &str) -> tensor_formats::Result<()> {
    let file = NxdFile::open(path)?;
    for (name, t) in file.tensors()? {
        let mut h = HashWriter(Sha256::new());
        write_view(&Part::whole(t), t.dtype, &mut h)?;
        let digest: String = h.0.finalize().iter().map(|b| format!("{b:02x}")).collect();
        println!(
            "{{\"name\":{:?},\"dtype\":\"{}\",\"shape\":{:?},\"strides\":{:?},\"offset\":{},\"sha256\":\"{}\"}}",
            name, t.dtype, t.layout.shape, t.layout.strides, t.layout.offset, digest
        );
    }
    Ok(())
}

fn rewrite(input: &str, output: &str) -> tensor_formats::Result<()> {
    let pt = PtFile::open(input)?;
    let mut storage_index: HashMap<String, usize> = HashMap::new();
    let mut storages = Vec::new();
    let mut sources = Vec::new();
    let mut tensors = Vec::new();
    for (name, t) in pt.named_tensors() {
        let index = *storage_index
            .entry(t.storage.key.clone())
            .or_insert_with(|| {
                storages.push(PtStorage {
                    dtype: t.storage.dtype,
                    numel: t.storage.numel,
                });
                sources.push(t);
                storages.len() - 1
            });
        tensors.push(PtTensor {
            name,
            dtype: t.storage.dtype,
            layout: t.layout.clone(),
            storage: index,
            requires_grad: t.requires_grad,
        });
    }
    let out_path = std::path::Path::new(output);
    let file = std::fs::File::create(out_path)
        .map_err(|e| tensor_formats::FormatError::io(out_path, e))?;
    let root = if matches!(pt.root(), tensor_formats::torch::Value::Tensor(_)) {
        PtRoot::Tensor(tensors.remove(0))
    } else {
        PtRoot::Dict(tensors)
    };
    let mut w = std::io::BufWriter::new(file);
    write_pt(
        &mut w,
        &archive_name_for(out_path),
        &root,
        &storages,
        |i, out| {
            let bytes = pt.archive().storage_bytes(pt.bytes(), sources[i])?;
            out.write_all(bytes)?;
            Ok(())
        },
    )?;
    w.flush()?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("dump") if args.len() == 3 => dump(&args[2]),
        Some("rewrite") if args.len() == 4 => rewrite(&args[2], &args[3]),
        _ => {
            eprintln!("usage: ptconv dump FILE | ptconv rewrite IN.pt OUT.pt");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ptconv: error: {e}");
            ExitCode::from(2)
        }
    }
}
