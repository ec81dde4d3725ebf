//! Developer tool used by the compat tests: reads checkpoint files with this crate and writes them back.
//!
//! * `ptconv dump FILE` prints one JSON line per tensor: name, dtype, shape, strides, offset and the
//!   sha256 of its logical (row-major) bytes, so Python can compare against `torch.load`.
//! * `ptconv rewrite IN.pt OUT.pt` re-saves a `.pt` keeping storages, views and strides, which must give
//!   torch's bytes again.
//!
//! * `ptconv to-pt IN OUT.pt` writes every tensor of IN (safetensors file or HF dir, or `.pt`) as one
//!   contiguous `.pt` dict.
//! * `ptconv to-safetensors IN OUT_DIR MAX_SHARD_BYTES` writes an HF-sharded safetensors directory with
//!   its index (and copies `config.json` / `generation_config.json` from an HF input dir).
//!
//! * `ptconv to-xser-split IN OUT.pt` writes the NxD training-checkpoint xser layout (reference file,
//!   `OUT.pt.tensors/tensor_<i>.pt`, `OUT.pt.info.pt`).
//!
//! Exit codes: 0 ok, 2 unreadable input (one-line error naming the file).

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use sha2::{Digest, Sha256};
use tensor_formats::copy::{write_view, Part};
use tensor_formats::safetensors::{
    plan_shards, render_index, shard_file_name, SafetensorsWriter, ShardedCheckpoint, TensorSpec,
};
use tensor_formats::torch::{archive_name_for, write_pt, PtFile, PtRoot, PtStorage, PtTensor};
use tensor_formats::xser::{write_training_layout, NxdFile};
use tensor_formats::{FormatError, TensorRef};

/// A checkpoint of either family.
enum Source {
    Safetensors(ShardedCheckpoint),
    Torch(NxdFile),
}

impl Source {
    fn open(path: &str) -> tensor_formats::Result<Source> {
        let p = std::path::Path::new(path);
        if p.is_dir() || path.ends_with(".safetensors") {
            Ok(Source::Safetensors(ShardedCheckpoint::open(p)?))
        } else {
            Ok(Source::Torch(NxdFile::open(p)?))
        }
    }

    fn tensors(&self) -> tensor_formats::Result<Vec<(String, TensorRef<'_>)>> {
        match self {
            Source::Safetensors(ck) => Ok(ck
                .names()
                .iter()
                .map(|n| {
                    let (file, entry) = ck.get(n).expect("names() come from the checkpoint");
                    (n.clone(), file.tensor(entry))
                })
                .collect()),
            Source::Torch(f) => Ok(f
                .tensors()?
                .into_iter()
                .map(|(n, t)| (n.to_string(), t))
                .collect()),
        }
    }
}

fn create(path: &std::path::Path) -> tensor_formats::Result<std::io::BufWriter<std::fs::File>> {
    let f = std::fs::File::create(path).map_err(|e| FormatError::io(path, e))?;
    Ok(std::io::BufWriter::with_capacity(8 << 20, f))
}

fn to_pt(input: &str, output: &str) -> tensor_formats::Result<()> {
    let src = Source::open(input)?;
    let tensors = src.tensors()?;
    let storages: Vec<PtStorage> = tensors
        .iter()
        .map(|(_, t)| PtStorage {
            dtype: t.dtype,
            numel: t.layout.numel(),
        })
        .collect();
    let specs = tensors
        .iter()
        .enumerate()
        .map(|(i, (name, t))| PtTensor {
            name: name.clone(),
            dtype: t.dtype,
            layout: tensor_formats::Layout::contiguous(&t.layout.shape),
            storage: i,
            requires_grad: false,
        })
        .collect();
    let out = std::path::Path::new(output);
    let mut w = create(out)?;
    write_pt(
        &mut w,
        &archive_name_for(out),
        &PtRoot::Dict(specs),
        &storages,
        |i, o| write_view(&Part::whole(tensors[i].1), tensors[i].1.dtype, o).map(|_| ()),
    )?;
    w.flush()?;
    Ok(())
}

fn to_safetensors(input: &str, out_dir: &str, max_shard: u64) -> tensor_formats::Result<()> {
    let src = Source::open(input)?;
    let tensors = src.tensors()?;
    let dir = std::path::Path::new(out_dir);
    std::fs::create_dir_all(dir).map_err(|e| FormatError::io(dir, e))?;
    let sizes: Vec<(String, u64)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), (t.layout.numel() * t.dtype.size()) as u64))
        .collect();
    let shards = plan_shards(&sizes, max_shard);
    let mut weight_map = std::collections::BTreeMap::new();
    for (i, members) in shards.iter().enumerate() {
        let name = shard_file_name(i, shards.len());
        let specs = members
            .iter()
            .map(|&m| TensorSpec {
                name: tensors[m].0.clone(),
                dtype: tensors[m].1.dtype,
                shape: tensors[m].1.layout.shape.clone(),
            })
            .collect();
        let metadata = Some([("format".to_string(), "pt".to_string())].into());
        let mut w = SafetensorsWriter::new(create(&dir.join(&name))?, specs, metadata)?;
        let order: Vec<String> = w.order().iter().map(|s| s.name.clone()).collect();
        for tname in order {
            let t = tensors
                .iter()
                .find(|(n, _)| *n == tname)
                .expect("planned from this list")
                .1;
            write_view(&Part::whole(t), t.dtype, &mut w)?;
            w.finish_tensor()?;
            weight_map.insert(tname, name.clone());
        }
        w.finish()?.flush()?;
    }
    if shards.len() > 1 {
        let total: u64 = sizes.iter().map(|s| s.1).sum();
        let params: u64 = tensors.iter().map(|(_, t)| t.layout.numel() as u64).sum();
        let index = render_index(&weight_map, total, Some(params));
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, index).map_err(|e| FormatError::io(&path, e))?;
    }
    for extra in ["config.json", "generation_config.json"] {
        let from = std::path::Path::new(input).join(extra);
        if from.is_file() {
            std::fs::copy(&from, dir.join(extra)).map_err(|e| FormatError::io(&from, e))?;
        }
    }
    Ok(())
}

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
    let src = Source::open(path)?;
    for (name, t) in src.tensors()? {
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

fn to_xser_split(input: &str, output: &str) -> tensor_formats::Result<()> {
    let src = Source::open(input)?;
    let tensors = src.tensors()?;
    let main = std::path::Path::new(output);
    let dir = tensor_formats::xser::tensors_dir(main);
    std::fs::create_dir_all(&dir).map_err(|e| FormatError::io(&dir, e))?;
    write_training_layout(main, &tensors, None, create, |mut w| Ok(w.flush()?))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("dump") if args.len() == 3 => dump(&args[2]),
        Some("rewrite") if args.len() == 4 => rewrite(&args[2], &args[3]),
        Some("to-pt") if args.len() == 4 => to_pt(&args[2], &args[3]),
        Some("to-xser-split") if args.len() == 4 => to_xser_split(&args[2], &args[3]),
        Some("to-safetensors") if args.len() == 5 => match args[4].parse() {
            Ok(max) => to_safetensors(&args[2], &args[3], max),
            Err(_) => Err(FormatError::Invalid(format!("bad shard size {}", args[4]))),
        },
        _ => {
            eprintln!("usage: ptconv dump FILE | rewrite IN.pt OUT.pt | to-pt IN OUT.pt | to-safetensors IN OUT_DIR MAX_SHARD_BYTES");
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
