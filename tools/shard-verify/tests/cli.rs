//! End-to-end tests of the `shard-verify` binary on shard sets written by the `nxd-shard`
//! library from a tiny Llama checkpoint built here: intact sets pass, and every kind of damage
//! is caught with exit 1 and the file (and tensor) named.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nxd_layout::{HwBackend, ParallelConfig};
use nxd_shard::{run, ManifestTarget, ShardOptions};
use serde_json::Value;
use tensor_formats::xser::{tensor_file, tensors_dir, write_training_layout, NxdFile};
use tiny_llama::{write_checkpoint, H, HD};

/// A layout and the flags that state it.
struct Layout {
    parallel: ParallelConfig,
    xser: bool,
    /// nx-shard writes NxD's training-checkpoint xser form (TensorReferences, tensor_<i>.pt).
    xser_split: bool,
    flags: Vec<String>,
}

/// tp x pp, default settings.
fn plain(tp: usize, pp: usize) -> Layout {
    Layout {
        parallel: ParallelConfig::new(tp, pp),
        xser: false,
        xser_split: false,
        flags: vec!["--tp".into(), tp.to_string(), "--pp".into(), pp.to_string()],
    }
}

/// tp 8 x pp 2, qkv_linear, fused, kv size multiplier 4 (every kv head on 4 ranks), xser; the
/// flags in NxD's spellings.
fn gqa_fused() -> Layout {
    gqa(8, 4, 2)
}

/// tp x pp, qkv_linear, fused, trn1, xser, kv size multiplier `kvm` (tp must be KV x kvm).
fn gqa(tp: usize, kvm: usize, pp: usize) -> Layout {
    let mut parallel = ParallelConfig::new(tp, pp);
    parallel.qkv_linear = true;
    parallel.fuse_qkv = true;
    parallel.kv_size_multiplier = kvm;
    parallel.hw = HwBackend::Trn1;
    let flags = format!(
        "--tp_size {tp} --pp_size {pp} --kv_size_multiplier {kvm} --qkv_linear 1 --fuse_qkv \
         --hw_backend trn1 --save_xser 1"
    );
    Layout {
        parallel,
        xser: true,
        xser_split: false,
        flags: flags.split_whitespace().map(String::from).collect(),
    }
}

/// A temporary directory with the tiny checkpoint in `hf/`.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(&dir.path().join("hf"));
        Fixture { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("hf").join("config.json")
    }

    /// Shards the checkpoint into `<tmp>/<name>` with the nxd-shard library.
    fn shard(&self, name: &str, layout: &Layout) -> PathBuf {
        let out = self.dir.path().join(name);
        run(&ShardOptions {
            input: Some(self.dir.path().join("hf")),
            output: Some(out.clone()),
            config: None,
            parallel: layout.parallel.clone(),
            dtype: None,
            jobs: Some(2),
            rank: Some(0),
            world: Some(1),
            dry_run: false,
            manifest: ManifestTarget::Default,
            force: false,
            xser: layout.xser,
            xser_split: layout.xser_split,
            progress: false,
        })
        .unwrap();
        out
    }

    /// Runs shard-verify on `dir` with the layout's flags, `--config` and `extra`.
    fn verify(&self, dir: &Path, layout: &Layout, extra: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shard-verify"));
        cmd.arg(dir)
            .args(&layout.flags)
            .arg("--config")
            .arg(self.config())
            .args(extra);
        cmd.output().unwrap()
    }
}

/// Runs shard-verify on `dir` with exactly `args`.
fn raw(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shard-verify"))
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

fn shard(out: &Path, tp: usize, pp: usize) -> PathBuf {
    out.join("model")
        .join(format!("dp_rank_00_tp_rank_{tp:02}_pp_rank_{pp:02}.pt"))
}

fn rel(tp: usize, pp: usize) -> String {
    format!("model/dp_rank_00_tp_rank_{tp:02}_pp_rank_{pp:02}.pt")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap()
}

#[track_caller]
fn assert_ok(o: &Output) {
    assert_eq!(
        code(o),
        0,
        "stdout:\n{}\nstderr:\n{}",
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Asserts exit 1 and returns the JSON report's problems.
#[track_caller]
fn problems(o: &Output) -> Vec<Value> {
    assert_eq!(
        code(o),
        1,
        "stdout:\n{}\nstderr:\n{}",
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    v["problems"].as_array().unwrap().clone()
}

/// True if some problem names `file` (and `tensor`, if given) and contains `needle`.
fn names(problems: &[Value], file: &str, tensor: Option<&str>, needle: &str) -> bool {
    problems.iter().any(|p| {
        p["files"].as_array().unwrap().iter().any(|f| f == file)
            && tensor.is_none_or(|t| p["tensor"] == t)
            && p["message"].as_str().unwrap().contains(needle)
    })
}

/// The file offset and length of a tensor's bytes.
fn tensor_bytes_at(path: &Path, tensor: &str) -> (usize, usize) {
    let f = NxdFile::open(path).unwrap();
    let base = f.main().bytes().as_ptr() as usize;
    let (_, view) = f
        .tensors()
        .unwrap()
        .into_iter()
        .find(|(n, _)| *n == tensor)
        .unwrap();
    (view.storage.as_ptr() as usize - base, view.storage.len())
}

fn flip_byte(path: &Path, at: usize) {
    let mut b = fs::read(path).unwrap();
    b[at] ^= 0x40;
    fs::write(path, b).unwrap();
}

#[test]
fn intact_sets_pass_and_record_reproduces_nx_shards_manifest() {
    let fx = Fixture::new();
    let split = Layout {
        xser_split: true,
        ..gqa_fused()
    };
    for (name, layout) in [
        ("plain", plain(2, 2)),
        ("gqa", gqa_fused()),
        ("split", split),
    ] {
        let out = fx.shard(name, &layout);
        let manifest = out.join("nx-shard.manifest.jsonl");
        let record = fx.dir.path().join(format!("{name}.record.jsonl"));
        let o = fx.verify(
            &out,
            &layout,
            &[
                "--manifest",
                manifest.to_str().unwrap(),
                "--record",
                record.to_str().unwrap(),
            ],
        );
        assert_ok(&o);
        let text = stdout(&o);
        assert!(text.contains("result: OK"), "{text}");
        assert!(text.contains("cross-rank  ok:"), "{text}");
        // --record describes the same files exactly as nx-shard did.
        assert_eq!(
            fs::read_to_string(&record).unwrap(),
            fs::read_to_string(&manifest).unwrap()
        );
        // model/ itself, JSON, --fast.
        let o = fx.verify(&out.join("model"), &layout, &["--json", "--fast"]);
        assert_ok(&o);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(
            v["files"].as_array().unwrap().len(),
            layout.parallel.num_files()
        );
        assert_eq!(v["checks"][3]["status"], "skipped");
        assert_eq!(v["dtype"], "bfloat16");
    }
}

#[test]
fn missing_stray_truncated_empty_and_misnamed_files() {
    let fx = Fixture::new();
    let layout = plain(2, 2);
    let out = fx.shard("o", &layout);
    fs::remove_file(shard(&out, 1, 1)).unwrap();
    fs::write(out.join("model").join("notes.txt"), b"x").unwrap();
    let f = shard(&out, 0, 1);
    let len = fs::metadata(&f).unwrap().len();
    fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    fs::write(shard(&out, 1, 0), b"").unwrap();
    fs::rename(
        shard(&out, 0, 0),
        out.join("model").join("dp_rank_00_tp_rank_0_pp_rank_0.pt"),
    )
    .unwrap();
    let p = problems(&fx.verify(&out, &layout, &["--json"]));
    assert!(names(&p, &rel(1, 1), None, "missing"), "{p:#?}");
    assert!(names(&p, "model/notes.txt", None, "stray"), "{p:#?}");
    assert!(names(&p, &rel(0, 1), None, "truncated"), "{p:#?}");
    assert!(names(&p, &rel(1, 0), None, "empty file"), "{p:#?}");
    assert!(
        names(
            &p,
            "model/dp_rank_00_tp_rank_0_pp_rank_0.pt",
            None,
            "misnamed"
        ),
        "{p:#?}"
    );
    assert!(
        names(&p, &rel(0, 0), None, "missing (misnamed as"),
        "{p:#?}"
    );
    assert_eq!(p.len(), 6, "{p:#?}");

    // The human grid marks each file.
    let text = stdout(&fx.verify(&out, &layout, &[]));
    assert!(text.contains("  pp   0  MU\n  pp   1  UM\n"), "{text}");
}

#[test]
fn flipped_byte_is_caught_by_the_manifest() {
    let fx = Fixture::new();
    let layout = plain(2, 1);
    let out = fx.shard("o", &layout);
    let f = shard(&out, 1, 0);
    let (at, _) = tensor_bytes_at(&f, "model.layers.1.mlp.down_proj.weight");
    flip_byte(&f, at + 10);
    // Header-only checks cannot see it...
    assert_ok(&fx.verify(&out, &layout, &[]));
    // ... the manifest does.
    let manifest = out.join("nx-shard.manifest.jsonl");
    let p = problems(&fx.verify(
        &out,
        &layout,
        &["--json", "--manifest", manifest.to_str().unwrap()],
    ));
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(names(&p, &rel(1, 0), None, "sha256 differs"), "{p:#?}");
    // From stdin too.
    let o = Command::new(env!("CARGO_BIN_EXE_shard-verify"))
        .arg(&out)
        .args(["--tp", "2", "--config"])
        .arg(fx.config())
        .args(["--manifest", "-", "--json"])
        .stdin(fs::File::open(&manifest).unwrap())
        .output()
        .unwrap();
    assert!(names(&problems(&o), &rel(1, 0), None, "sha256 differs"));
    assert_eq!(code(&o), 1);
}

#[test]
fn swapped_files_are_caught_without_a_manifest() {
    let fx = Fixture::new();
    let layout = gqa_fused();
    let out = fx.shard("o", &layout);
    let (a, b) = (shard(&out, 0, 0), shard(&out, 1, 0));
    let tmp = out.join("tmp");
    fs::rename(&a, &tmp).unwrap();
    fs::rename(&b, &a).unwrap();
    fs::rename(&tmp, &b).unwrap();
    let p = problems(&fx.verify(&out, &layout, &["--json"]));
    // Header-only: the archive inside is named after the file torch saved it as.
    assert!(names(&p, &rel(0, 0), None, "swapped"), "{p:#?}");
    assert!(names(&p, &rel(1, 0), None, "swapped"), "{p:#?}");
    // Cross-rank: ranks 0 and 1 hold different kv heads, each replicated on 3 other ranks.
    let t = "model.layers.0.self_attn.qkv_proj.weight_qkv";
    assert!(
        names(&p, &rel(0, 0), Some(t), "kv head 0) differ"),
        "{p:#?}"
    );
    assert!(
        names(&p, &rel(1, 0), Some(t), "kv head 1) differ"),
        "{p:#?}"
    );
}

#[test]
fn a_file_from_a_different_layout_is_caught() {
    let fx = Fixture::new();
    let layout = gqa_fused();
    let out = fx.shard("o", &layout);
    let other = fx.shard("other", &gqa(4, 2, 2));
    fs::copy(shard(&other, 1, 0), shard(&out, 1, 0)).unwrap();
    let p = problems(&fx.verify(&out, &layout, &["--json"]));
    assert!(
        names(
            &p,
            &rel(1, 0),
            Some("model.embed_tokens.weight"),
            "shape [24, 64], expected [12, 64]"
        ),
        "{p:#?}"
    );
    assert!(
        names(
            &p,
            &rel(1, 0),
            Some("model.layers.0.self_attn.qkv_proj.weight_qkv"),
            "shape [32, 64], expected [24, 64]"
        ),
        "{p:#?}"
    );
    // The whole tp 8 set checked as tp 4: ranks 4-7 are strays, and every shape is wrong.
    let p = problems(&fx.verify(&out, &gqa(4, 2, 2), &["--json"]));
    assert!(
        names(
            &p,
            &rel(7, 1),
            None,
            "tp rank 7 pp rank 1 is outside the layout"
        ),
        "{p:#?}"
    );
    assert!(
        names(
            &p,
            &rel(0, 1),
            Some("lm_head.weight"),
            "shape [12, 64], expected [24, 64]"
        ),
        "{p:#?}"
    );
    // A pp 1 file in a pp 2 set: the other stage's tensors are unexpected.
    let pp1 = fx.shard("pp1", &gqa_fused_pp1());
    fs::copy(shard(&pp1, 2, 0), shard(&out, 2, 0)).unwrap();
    let p = problems(&fx.verify(&out, &layout, &["--json"]));
    assert!(
        names(
            &p,
            &rel(2, 0),
            Some("model.layers.2.self_attn.qkv_proj.weight_qkv"),
            "unexpected tensor"
        ),
        "{p:#?}"
    );
}

fn gqa_fused_pp1() -> Layout {
    gqa(8, 4, 1)
}

#[test]
fn edited_kv_replica_and_norm_are_named() {
    let fx = Fixture::new();
    let layout = gqa_fused();
    let out = fx.shard("o", &layout);
    // tp rank 2 holds q head 1 (8 rows), then kv head 0 of k (8 rows) and v (8 rows).
    let f = shard(&out, 2, 1);
    let t = "model.layers.2.self_attn.qkv_proj.weight_qkv";
    let (at, _) = tensor_bytes_at(&f, t);
    flip_byte(&f, at + (HD + 3) * H * 2 + 5 * 2);
    let n = shard(&out, 5, 1);
    let (at, _) = tensor_bytes_at(&n, "model.norm.weight");
    flip_byte(&n, at + 7);

    let p = problems(&fx.verify(&out, &layout, &["--json"]));
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(
        names(
            &p,
            &rel(2, 1),
            Some(t),
            "rows 8..16 (copy of model.layers.2.self_attn.k_proj.weight rows 0..8, kv head 0) \
             differ from the 3 identical copies"
        ),
        "{p:#?}"
    );
    assert!(
        names(
            &p,
            &rel(5, 1),
            Some("model.norm.weight"),
            "replicated on every tp rank) differ from the 7 identical copies"
        ),
        "{p:#?}"
    );
    let text = stdout(&fx.verify(&out, &layout, &[]));
    assert!(text.contains("  pp   1  ..X..X..\n"), "{text}");
    // --fast reads no tensor data, so it cannot see either.
    assert_ok(&fx.verify(&out, &layout, &["--fast"]));
}

#[test]
fn two_disagreeing_copies_without_a_majority_are_both_named() {
    let fx = Fixture::new();
    let layout = plain(2, 1);
    let out = fx.shard("o", &layout);
    let f = shard(&out, 1, 0);
    let (at, _) = tensor_bytes_at(&f, "model.layers.0.input_layernorm.weight");
    flip_byte(&f, at);
    let p = problems(&fx.verify(&out, &layout, &["--json"]));
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_eq!(p[0]["files"], serde_json::json!([rel(0, 0), rel(1, 0)]));
    assert_eq!(p[0]["tensor"], "model.layers.0.input_layernorm.weight");
    let msg = p[0]["message"].as_str().unwrap();
    assert!(
        msg.starts_with(
            "the 2 copies of model.layers.0.input_layernorm.weight (replicated on every tp rank) \
             disagree and no version has a majority"
        ),
        "{msg}"
    );
}

#[test]
fn vocabulary_rows_copied_over_another_rank_are_caught() {
    let fx = Fixture::new();
    let layout = plain(2, 1);
    let out = fx.shard("o", &layout);
    // Rank 0's tensors saved under rank 1's name: same shapes, its own archive name.
    let src = fs::read(shard(&out, 0, 0)).unwrap();
    let patched = replace_all(&src, b"tp_rank_00", b"tp_rank_01");
    fs::write(shard(&out, 1, 0), patched).unwrap();
    let p = problems(&fx.verify(&out, &layout, &["--json"]));
    assert!(
        names(
            &p,
            &rel(1, 0),
            Some("model.embed_tokens.weight"),
            "rows 0..48 and rows 48..96 are bit-identical"
        ),
        "{p:#?}"
    );
    assert!(
        names(&p, &rel(1, 0), Some("lm_head.weight"), "bit-identical"),
        "{p:#?}"
    );
    assert_eq!(p.len(), 2, "{p:#?}");
}

fn replace_all(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = hay.to_vec();
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn training_checkpoint_xser_layout() {
    let fx = Fixture::new();
    let layout = gqa_fused();
    let out = fx.shard("o", &layout);
    // Rewrite every file in NxD's training form: TensorReferences, tensor_<i>.pt, .info.pt.
    let tag = fx.dir.path().join("ckpt").join("step_10");
    fs::create_dir_all(tag.join("model")).unwrap();
    fs::write(tag.join("checkpoint"), "1").unwrap();
    fs::write(tag.join("done"), "1").unwrap();
    fs::create_dir_all(tag.join("optim")).unwrap();
    for tp in 0..8 {
        for pp in 0..2 {
            let src = NxdFile::open(shard(&out, tp, pp)).unwrap();
            let tensors: Vec<(String, _)> = src
                .tensors()
                .unwrap()
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect();
            let main = shard(&tag, tp, pp);
            fs::create_dir_all(tensors_dir(&main)).unwrap();
            write_training_layout(
                &main,
                &tensors,
                None,
                |p| Ok(fs::File::create(p)?),
                |_| Ok(()),
            )
            .unwrap();
        }
    }
    let o = fx.verify(&tag, &layout, &[]);
    assert_ok(&o);
    assert!(stdout(&o).contains("training checkpoint"), "{}", stdout(&o));

    fs::remove_file(tensor_file(&shard(&tag, 3, 0), 2)).unwrap();
    fs::write(tensors_dir(&shard(&tag, 4, 0)).join("stray.pt"), b"x").unwrap();
    fs::remove_file(tag.join("done")).unwrap();
    let p = problems(&fx.verify(&tag, &layout, &["--json"]));
    assert!(names(&p, &rel(3, 0), None, "tensor_2.pt"), "{p:#?}");
    assert!(
        names(
            &p,
            "model/dp_rank_00_tp_rank_04_pp_rank_00.pt.tensors/stray.pt",
            None,
            "stray"
        ),
        "{p:#?}"
    );
    assert!(names(&p, "done", None, "not finished"), "{p:#?}");
}

#[test]
fn xser_directories_must_match_the_flag() {
    let fx = Fixture::new();
    let xser = gqa_fused();
    let out = fx.shard("o", &xser);
    fs::remove_dir(tensors_dir(&shard(&out, 6, 1))).unwrap();
    let p = problems(&fx.verify(&out, &xser, &["--json"]));
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(names(&p, &rel(6, 1), None, "no xser directory"), "{p:#?}");
    // The same set checked without --xser: every directory is a stray.
    let mut no_xser = gqa_fused();
    let n = no_xser.flags.len();
    no_xser.flags.truncate(n - 2);
    let p = problems(&fx.verify(&out, &no_xser, &["--json"]));
    assert_eq!(p.len(), 15, "{p:#?}");
    assert!(names(
        &p,
        "model/dp_rank_00_tp_rank_00_pp_rank_00.pt.tensors",
        None,
        "stray xser directory"
    ));
}

#[test]
fn usage_errors_exit_2() {
    let fx = Fixture::new();
    let layout = plain(2, 1);
    let out = fx.shard("o", &layout);
    let config = fx.config();
    let c = config.to_str().unwrap();
    let cases: Vec<(PathBuf, Vec<&str>, &str)> = vec![
        (fx.dir.path().join("nope"), vec!["--config", c], "nope"),
        (
            fx.dir.path().join("hf"),
            vec!["--config", c],
            "holds no shard files",
        ),
        (
            out.clone(),
            vec!["--config", c, "--tp", "2", "--kv-size-multiplier", "0"],
            "at least 1",
        ),
        (
            out.clone(),
            vec!["--config", c, "--tp", "3"],
            "not divisible by tp 3",
        ),
        (
            out.clone(),
            vec!["--config", c, "--manifest", "/nonexistent.jsonl"],
            "reading manifest",
        ),
        (
            out.clone(),
            vec!["--config", c, "--json", "--record", "-"],
            "both write to stdout",
        ),
        (out.clone(), vec!["--tp", "2"], "pass --config"),
    ];
    for (dir, args, needle) in cases {
        let o = raw(&dir, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(code(&o), 2, "{dir:?} {args:?}: {err}");
        assert!(err.contains(needle), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // A malformed manifest names its line.
    let bad = fx.dir.path().join("bad.jsonl");
    fs::write(&bad, "{\"path\":\"a\"}\n").unwrap();
    let o = fx.verify(&out, &layout, &["--manifest", bad.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad.jsonl:1:"));
    // Without --config, config.json is looked for in the directory.
    fs::copy(fx.config(), out.join("config.json")).unwrap();
    assert_ok(&raw(&out, &["--tp", "2"]));
}

#[test]
fn any_directory_against_a_manifest() {
    let fx = Fixture::new();
    let hf = fx.dir.path().join("hf");
    let record = fx.dir.path().join("hf.jsonl");
    let layout = Layout {
        parallel: ParallelConfig::new(1, 1),
        xser: false,
        xser_split: false,
        flags: vec![],
    };
    // A directory without shards needs a manifest; --record writes one.
    let m = record.to_str().unwrap();
    let o = raw(&hf, &["--record", m, "--manifest", "/dev/null"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("warnings (2):"), "{}", stdout(&o));
    let records = suite_support::manifest::read_manifest_path(&record).unwrap();
    let paths: Vec<&str> = records.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, vec!["config.json", "model.safetensors"]);
    assert_ok(&fx.verify(&hf, &layout, &["--manifest", m]));

    let st = hf.join("model.safetensors");
    let len = fs::metadata(&st).unwrap().len() as usize;
    flip_byte(&st, len - 3);
    fs::write(hf.join("extra.bin"), b"x").unwrap();
    let o = fx.verify(&hf, &layout, &["--manifest", m, "--json"]);
    let p = problems(&o);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(names(&p, "model.safetensors", None, "sha256 differs"));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mode"], "manifest");
    assert_eq!(v["warnings"][0]["files"][0], "extra.bin");
}
