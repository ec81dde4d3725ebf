//! End-to-end tests of the `nx-shard` binary on a tiny Llama checkpoint built here.

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nxd_layout::{
    canonical_order, narrowed_box, plan, ModelConfig, ParallelConfig, ShardPlan, SourceTensor,
    TensorPlan,
};
use suite_support::manifest::read_manifest_path;
use tensor_formats::xser::NxdFile;
use tensor_formats::{DType, TensorRef};
use tiny_llama::{bits, hf_tensors, index_of, write_checkpoint, CONFIG, H, HD, HEADS, I, V};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nx-shard"))
}

/// The plan the tool must have followed.
fn expected_plan(parallel: &ParallelConfig) -> ShardPlan {
    let model = ModelConfig::from_json_str(CONFIG).unwrap();
    let tensors = hf_tensors();
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    let sources: Vec<SourceTensor> = canonical_order(&names)
        .into_iter()
        .map(|i| SourceTensor::new(tensors[i].0.clone(), tensors[i].1.clone(), "BF16", 2))
        .collect();
    plan(&model, parallel, &sources).unwrap()
}

fn run(args: &[&str]) -> Output {
    let out = bin()
        .args(args)
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_PROCID")
        .output()
        .unwrap();
    out
}

fn ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "nx-shard {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Element `idx` (logical) of a view, as raw 16-bit pattern.
fn read_u16(view: &TensorRef<'_>, idx: &[usize]) -> u16 {
    let l = view.layout;
    let e = l.offset
        + idx
            .iter()
            .zip(&l.strides)
            .map(|(i, s)| i * s)
            .sum::<usize>();
    u16::from_le_bytes([view.storage[2 * e], view.storage[2 * e + 1]])
}

/// Element `idx` (logical) of a planned tensor, computed naively from the plan and the source
/// formula (independently of the copy engine).
fn expected_u16(plan: &ShardPlan, t: &TensorPlan, idx: &[usize]) -> u16 {
    let mut pos = idx[t.concat_dim];
    for p in &t.parts {
        let src = &plan.sources[p.source];
        let b = narrowed_box(&src.shape, &p.narrow).unwrap();
        let len = b[t.concat_dim].len();
        if pos < len {
            let mut k = 0;
            for (d, r) in b.iter().enumerate() {
                let i = if d == t.concat_dim { pos } else { idx[d] };
                k = k * src.shape[d] + r.start + i;
            }
            return bits(index_of(&src.name), k);
        }
        pos -= len;
    }
    panic!("index {idx:?} out of tensor {}", t.name)
}

fn all_indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let mut out = vec![vec![]];
    for &n in shape {
        out = out
            .into_iter()
            .flat_map(|p| {
                (0..n).map(move |i| {
                    let mut q = p.clone();
                    q.push(i);
                    q
                })
            })
            .collect();
    }
    out
}

/// Reads back every file of `plan` under `out` and checks names, order, shapes, strides, dtype
/// and every element against the plan.
fn check_outputs(out: &Path, plan: &ShardPlan) {
    for f in &plan.files {
        let path = out.join("model").join(&f.file_name);
        let nxd = NxdFile::open(&path).unwrap();
        let got = nxd.tensors().unwrap();
        let got_names: Vec<&str> = got.iter().map(|(n, _)| *n).collect();
        let want_names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(got_names, want_names, "{}: key order", f.file_name);
        for ((_, view), t) in got.iter().zip(&f.tensors) {
            assert_eq!(view.dtype, DType::BF16, "{}", t.name);
            assert_eq!(view.layout.shape, t.shape, "{}", t.name);
            assert_eq!(view.layout.strides, t.strides(), "{}", t.name);
            assert_eq!(view.layout.offset, 0, "{}", t.name);
            assert_eq!(view.storage.len(), t.numel() * 2, "{}: own storage", t.name);
            for idx in all_indices(&t.shape) {
                assert_eq!(
                    read_u16(view, &idx),
                    expected_u16(plan, t, &idx),
                    "{} {}: element {idx:?}",
                    f.file_name,
                    t.name
                );
            }
        }
    }
}

fn tensor<'a>(nxd: &'a NxdFile, name: &str) -> TensorRef<'a> {
    nxd.tensors()
        .unwrap()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
}

fn out_file(out: &Path, tp: usize, pp: usize) -> PathBuf {
    out.join("model")
        .join(format!("dp_rank_00_tp_rank_{tp:02}_pp_rank_{pp:02}.pt"))
}

#[test]
fn tp2_pp2_default_layout() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let out = dir.path().join("out");
    write_checkpoint(&hf);
    ok(&[
        "--input",
        s(&hf),
        "--output",
        s(&out),
        "--tp",
        "2",
        "--pp",
        "2",
        "-j",
        "2",
    ]);

    let parallel = ParallelConfig::new(2, 2);
    let plan = expected_plan(&parallel);
    assert_eq!(plan.files.len(), 4);
    check_outputs(&out, &plan);

    // Hand-derived values, independent of the plan.
    let embed = index_of("model.embed_tokens.weight");
    let f = NxdFile::open(out_file(&out, 1, 0)).unwrap();
    let e = tensor(&f, "model.embed_tokens.weight");
    assert_eq!(e.layout.shape, vec![V / 2, H]);
    // tp rank 1 holds vocab rows 48..96.
    assert_eq!(read_u16(&e, &[0, 0]), bits(embed, 48 * H));
    assert_eq!(read_u16(&e, &[5, 7]), bits(embed, 53 * H + 7));
    let q = index_of("model.layers.0.self_attn.q_proj.weight");
    let qt = tensor(&f, "model.layers.0.self_attn.q_proj.weight");
    assert_eq!(qt.layout.shape, vec![HEADS * HD / 2, H]);
    assert_eq!(read_u16(&qt, &[3, 9]), bits(q, (32 + 3) * H + 9));
    // o_proj splits columns.
    let o = index_of("model.layers.0.self_attn.o_proj.weight");
    let ot = tensor(&f, "model.layers.0.self_attn.o_proj.weight");
    assert_eq!(ot.layout.shape, vec![H, 32]);
    assert_eq!(ot.layout.strides, vec![32, 1]);
    assert_eq!(read_u16(&ot, &[2, 5]), bits(o, 2 * 64 + 32 + 5));
    // gate_up = cat(gate chunk, up chunk).
    let gate = index_of("model.layers.0.mlp.gate_proj.weight");
    let up = index_of("model.layers.0.mlp.up_proj.weight");
    let gu = tensor(&f, "model.layers.0.mlp.gate_up_proj.weight");
    assert_eq!(gu.layout.shape, vec![I, H]);
    assert_eq!(read_u16(&gu, &[0, 1]), bits(gate, 64 * H + 1));
    assert_eq!(read_u16(&gu, &[64, 1]), bits(up, 64 * H + 1));
    // down_proj splits columns.
    let down = index_of("model.layers.0.mlp.down_proj.weight");
    let dt = tensor(&f, "model.layers.0.mlp.down_proj.weight");
    assert_eq!(dt.layout.shape, vec![H, I / 2]);
    assert_eq!(read_u16(&dt, &[1, 2]), bits(down, I + 64 + 2));
    // The last pp rank holds norm and lm_head, not the embeddings.
    let last = NxdFile::open(out_file(&out, 0, 1)).unwrap();
    let names: Vec<&str> = last.names().collect();
    assert!(names.contains(&"model.norm.weight") && names.contains(&"lm_head.weight"));
    assert!(!names.contains(&"model.embed_tokens.weight"));
    let norm = index_of("model.norm.weight");
    assert_eq!(
        read_u16(&tensor(&last, "model.norm.weight"), &[63]),
        bits(norm, 63)
    );

    // Manifest: one parsable line per file, hashes of what is on disk.
    let records = read_manifest_path(out.join("nx-shard.manifest.jsonl")).unwrap();
    assert_eq!(records.len(), 4);
    for r in &records {
        assert_eq!(r.kind.as_deref(), Some("nxd-shard"));
        let path = out.join(&r.path);
        assert_eq!(fs::metadata(&path).unwrap().len(), r.bytes);
        assert_eq!(suite_support::hash::sha256_file(&path).unwrap(), r.sha256);
        let tp = r.extra["tp"].as_u64().unwrap() as usize;
        let pp = r.extra["pp"].as_u64().unwrap() as usize;
        assert_eq!(path, out_file(&out, tp, pp));
        assert_eq!(
            r.extra["tensors"].as_u64().unwrap() as usize,
            plan.file(tp, pp).tensors.len()
        );
    }
    // No temporary files left behind.
    for e in fs::read_dir(out.join("model")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(name.starts_with("dp_rank_00_tp_rank_"), "{name}");
    }
}

#[test]
fn qkv_linear_fused_nxd_spelling_and_xser() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let out = dir.path().join("out");
    write_checkpoint(&hf);
    ok(&[
        "--input_dir",
        s(&hf),
        "--output_dir",
        s(&out),
        "--tp_size",
        "2",
        "--pp_size",
        "2",
        "--qkv_linear",
        "1",
        "--fuse_qkv",
        "--save_xser",
        "true",
        "--convert_from_full_state",
        "--hw_backend",
        "trn1",
    ]);
    let mut parallel = ParallelConfig::new(2, 2);
    parallel.qkv_linear = true;
    parallel.fuse_qkv = true;
    let plan = expected_plan(&parallel);
    check_outputs(&out, &plan);
    for f in &plan.files {
        let p = out.join("model").join(&f.file_name);
        let xdir = PathBuf::from(format!("{}.tensors", p.display()));
        assert!(xdir.is_dir(), "{}", xdir.display());
        assert_eq!(fs::read_dir(&xdir).unwrap().count(), 0);
        // o_proj is stored transposed: shape [H, n*hd], strides (1, H).
        for t in f
            .tensors
            .iter()
            .filter(|t| t.name.ends_with("o_proj.weight"))
        {
            assert!(t.stored_transposed);
            let nxd = NxdFile::open(&p).unwrap();
            let v = tensor(&nxd, &t.name);
            assert_eq!(v.layout.shape, vec![H, HEADS * HD / 2]);
            assert_eq!(v.layout.strides, vec![1, H]);
        }
        assert!(
            f.tensors
                .iter()
                .any(|t| t.name.ends_with("qkv_proj.weight_qkv"))
                || f.layers.is_empty()
        );
    }
}

#[test]
fn refusal_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let out = dir.path().join("out");
    write_checkpoint(&hf);
    let o = run(&["--input", s(&hf), "--output", s(&out), "--tp", "4"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("nx-shard: error: "), "{err}");
    assert!(err.contains("qkv"), "{err}");
    assert!(!out.join("model").exists() || fs::read_dir(out.join("model")).unwrap().count() == 0);
    // A bad flag value is a usage error too.
    let o = run(&[
        "--input",
        s(&hf),
        "--output",
        s(&out),
        "--qkv-linear",
        "maybe",
    ]);
    assert_eq!(o.status.code(), Some(2));
    // A missing input.
    let o = run(&["--input", s(&dir.path().join("nope")), "--output", s(&out)]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn dry_run_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let out = dir.path().join("out");
    write_checkpoint(&hf);
    let o = ok(&[
        "--input",
        s(&hf),
        "--output",
        s(&out),
        "--tp",
        "2",
        "--pp",
        "2",
        "--dry-run",
    ]);
    let text = String::from_utf8(o.stdout).unwrap();
    let plan = expected_plan(&ParallelConfig::new(2, 2));
    assert_eq!(text.trim_end(), plan.summary().to_string());
    assert!(!out.exists());

    // Config alone, no weights.
    let o = ok(&[
        "--config",
        s(&hf.join("config.json")),
        "--tp",
        "2",
        "--pp",
        "2",
        "--dry-run",
    ]);
    let text2 = String::from_utf8(o.stdout).unwrap();
    assert_eq!(text2, text);
    assert!(text.contains("dp_rank_00_tp_rank_01_pp_rank_01.pt"));
    // Without --dry-run, weights are required.
    let o = run(&["--config", s(&hf.join("config.json")), "--output", s(&out)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!out.exists());
}

#[test]
fn rerun_skips_and_force_rewrites() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let out = dir.path().join("out");
    write_checkpoint(&hf);
    let args = [
        "--input",
        s(&hf),
        "--output",
        s(&out),
        "--tp",
        "2",
        "--pp",
        "2",
    ];
    ok(&args);
    let victim = out_file(&out, 1, 1);
    let first = fs::read(&victim).unwrap();
    let manifest1 = fs::read_to_string(out.join("nx-shard.manifest.jsonl")).unwrap();
    // A finished file is kept untouched by a rerun (same inode and modification time).
    let ident = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(p).unwrap();
        (m.ino(), m.modified().unwrap())
    };
    let before = ident(&victim);
    let o = ok(&args);
    assert_eq!(ident(&victim), before);
    assert!(String::from_utf8_lossy(&o.stderr).contains("keeping existing"));
    // A file under a shard name that is not this layout's file is refused, not kept.
    fs::write(&victim, b"kept").unwrap();
    let refused = run(&args);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not this layout's file"));
    // A deleted file is recreated identically on resume.
    fs::remove_file(&victim).unwrap();
    ok(&args);
    assert_eq!(fs::read(&victim).unwrap(), first);
    let manifest2 = fs::read_to_string(out.join("nx-shard.manifest.jsonl")).unwrap();
    assert_eq!(manifest1, manifest2);
    // --force rewrites.
    fs::write(&victim, b"kept").unwrap();
    ok(&[&args[..], &["--force"]].concat());
    assert_eq!(fs::read(&victim).unwrap(), first);
}

#[test]
fn rank_world_split_and_stdout_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let out = dir.path().join("out");
    write_checkpoint(&hf);
    let mut all = Vec::new();
    for rank in 0..3 {
        let r = rank.to_string();
        let o = ok(&[
            "--input",
            s(&hf.join("model.safetensors")),
            "--config",
            s(&hf.join("config.json")),
            "--output",
            s(&out),
            "--tp",
            "2",
            "--pp",
            "2",
            "--rank",
            &r,
            "--world",
            "3",
            "--manifest",
            "-",
        ]);
        let text = String::from_utf8(o.stdout).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            all.push(v["path"].as_str().unwrap().to_string());
        }
    }
    all.sort();
    let want: Vec<String> = expected_plan(&ParallelConfig::new(2, 2))
        .files
        .iter()
        .map(|f| format!("model/{}", f.file_name))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(all, want, "every file written exactly once");
    check_outputs(&out, &expected_plan(&ParallelConfig::new(2, 2)));
}

#[test]
fn dtype_fp32_converts() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let out = dir.path().join("out");
    write_checkpoint(&hf);
    ok(&[
        "--input",
        s(&hf),
        "--output",
        s(&out),
        "--tp",
        "2",
        "--dtype",
        "fp32",
    ]);
    let f = NxdFile::open(out_file(&out, 0, 0)).unwrap();
    let e = tensor(&f, "model.embed_tokens.weight");
    assert_eq!(e.dtype, DType::F32);
    assert_eq!(e.layout.shape, vec![V / 2, H]);
    let embed = index_of("model.embed_tokens.weight");
    let got = f32::from_le_bytes(e.storage[4 * 70..4 * 71].try_into().unwrap());
    assert_eq!(got, half::bf16::from_bits(bits(embed, 70)).to_f32());
}

/// Writes the same checkpoint as a torch `full_state.pt` (a flat state dict).
fn write_full_state(path: &Path) {
    use tensor_formats::torch::{archive_name_for, write_pt, PtRoot, PtStorage, PtTensor};
    use tensor_formats::Layout;
    let tensors = hf_tensors();
    let root = PtRoot::Dict(
        tensors
            .iter()
            .enumerate()
            .map(|(i, (n, shape))| PtTensor {
                name: n.clone(),
                dtype: DType::BF16,
                layout: Layout::contiguous(shape),
                storage: i,
                requires_grad: false,
            })
            .collect(),
    );
    let storages: Vec<PtStorage> = tensors
        .iter()
        .map(|(_, shape)| PtStorage {
            dtype: DType::BF16,
            numel: shape.iter().product(),
        })
        .collect();
    let file = BufWriter::new(fs::File::create(path).unwrap());
    write_pt(file, &archive_name_for(path), &root, &storages, |i, w| {
        let numel: usize = tensors[i].1.iter().product();
        let bytes: Vec<u8> = (0..numel).flat_map(|k| bits(i, k).to_le_bytes()).collect();
        w.write_all(&bytes)?;
        Ok(())
    })
    .unwrap();
}

#[test]
fn full_state_pt_input_gives_the_same_files() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    write_checkpoint(&hf);
    let pt = hf.join("full_state.pt");
    write_full_state(&pt);
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let common = [
        "--tp",
        "2",
        "--pp",
        "2",
        "--qkv-linear",
        "--fuse-qkv",
        "false",
    ];
    ok(&[&["--input", s(&hf), "--output", s(&a)][..], &common].concat());
    ok(&[&["--input", s(&pt), "--output", s(&b)][..], &common].concat());
    let ma = fs::read_to_string(a.join("nx-shard.manifest.jsonl")).unwrap();
    let mb = fs::read_to_string(b.join("nx-shard.manifest.jsonl")).unwrap();
    assert_eq!(ma, mb);
    let mut parallel = ParallelConfig::new(2, 2);
    parallel.qkv_linear = true;
    check_outputs(&b, &expected_plan(&parallel));
}

#[test]
fn split_run_manifests_are_joined_by_the_last_rank_and_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let single = dir.path().join("single");
    let split = dir.path().join("split");
    write_checkpoint(&hf);
    let layout = ["--tp", "2", "--pp", "2"];
    ok(&[&["--input", s(&hf), "--output", s(&single)], &layout[..]].concat());
    let rank = |r: &str| {
        ok(&[
            &["--input", s(&hf), "--output", s(&split)],
            &layout[..],
            &["--rank", r, "--world", "3"],
        ]
        .concat())
    };
    let joined = split.join("nx-shard.manifest.jsonl");
    rank("0");
    rank("2");
    assert!(!joined.exists(), "joined before every rank finished");
    let early = run(&["--merge-manifests", "--output", s(&split)]);
    assert_eq!(early.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&early.stderr);
    assert!(msg.contains("rank(s) 1 of 3 have not finished"), "{msg}");
    rank("1");
    let single_manifest = fs::read_to_string(single.join("nx-shard.manifest.jsonl")).unwrap();
    assert_eq!(fs::read_to_string(&joined).unwrap(), single_manifest);
    fs::remove_file(&joined).unwrap();
    ok(&["--merge-manifests", "--output", s(&split)]);
    assert_eq!(fs::read_to_string(&joined).unwrap(), single_manifest);
    // A rank manifest naming a file that is gone is stale: refused, not joined.
    fs::remove_file(out_file(&split, 0, 0)).unwrap();
    let stale = run(&["--merge-manifests", "--output", s(&split)]);
    assert_eq!(stale.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&stale.stderr).contains("stale"));
}
