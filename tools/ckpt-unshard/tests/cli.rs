//! End-to-end tests of `ckpt-unshard` on tiny Llama checkpoints built here: HF -> nx-shard (the
//! `nxd-shard` library) -> ckpt-unshard gives back the original tensors bit for bit over a wide
//! matrix of layouts; training-checkpoint inputs; replica checks; bad inputs.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nxd_layout::{
    canonical_order, expected_source_tensors, file_name, validate, HwBackend, LayerTensor,
    ModelConfig, ParallelConfig,
};
use nxd_shard::{ManifestTarget, ShardOptions};
use nxd_unshard::{OutputFormat, UnshardOptions};
use suite_support::manifest::read_manifest_path;
use tensor_formats::safetensors::{SafetensorsWriter, ShardedCheckpoint, TensorSpec};
use tensor_formats::torch::PtFile;
use tensor_formats::xser::{tensors_dir, write_training_layout, NxdFile};
use tensor_formats::DType;

/// A tiny Llama model.
#[derive(Clone, Copy)]
struct Tiny {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    layers: usize,
    inter: usize,
    vocab: usize,
    tied: bool,
    /// Legacy float32 `rotary_emb.inv_freq` buffers in every layer.
    inv_freq: bool,
}

const GQA: Tiny = Tiny {
    hidden: 64,
    heads: 8,
    kv_heads: 2,
    layers: 3,
    inter: 128,
    vocab: 96,
    tied: false,
    inv_freq: true,
};
const MHA: Tiny = Tiny {
    hidden: 64,
    heads: 4,
    kv_heads: 4,
    layers: 2,
    inter: 96,
    vocab: 64,
    tied: false,
    inv_freq: false,
};
const TIED: Tiny = Tiny {
    hidden: 64,
    heads: 8,
    kv_heads: 4,
    layers: 5,
    inter: 128,
    vocab: 96,
    tied: true,
    inv_freq: false,
};

impl Tiny {
    fn config_json(&self) -> String {
        format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": {}, "num_attention_heads": {}, "num_key_value_heads": {},
  "num_hidden_layers": {}, "intermediate_size": {}, "vocab_size": {},
  "tie_word_embeddings": {}, "torch_dtype": "bfloat16"}}"#,
            self.hidden, self.heads, self.kv_heads, self.layers, self.inter, self.vocab, self.tied
        )
    }

    fn model(&self) -> ModelConfig {
        ModelConfig::from_json_str(&self.config_json()).unwrap()
    }

    /// The HF tensors (name, dtype, shape) in state-dict order.
    fn tensors(&self) -> Vec<(String, DType, Vec<usize>)> {
        let mut out: Vec<(String, DType, Vec<usize>)> =
            expected_source_tensors(&self.model(), "BF16", 2)
                .into_iter()
                .map(|s| (s.name, DType::BF16, s.shape))
                .collect();
        if self.inv_freq {
            let hd = self.hidden / self.heads;
            for l in 0..self.layers {
                out.push((LayerTensor::InvFreq.name(l), DType::F32, vec![hd / 2]));
            }
        }
        let names: Vec<&str> = out.iter().map(|t| t.0.as_str()).collect();
        let order = canonical_order(&names);
        order.into_iter().map(|i| out[i].clone()).collect()
    }

    /// Writes config.json and a safetensors checkpoint whose every element is distinct within
    /// its tensor.
    fn write(&self, dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("config.json"), self.config_json()).unwrap();
        let tensors = self.tensors();
        let specs = tensors
            .iter()
            .map(|(n, d, s)| TensorSpec {
                name: n.clone(),
                dtype: *d,
                shape: s.clone(),
            })
            .collect();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let file = BufWriter::new(fs::File::create(dir.join("model.safetensors")).unwrap());
        let mut w = SafetensorsWriter::new(file, specs, Some(meta)).unwrap();
        let order: Vec<String> = w.order().iter().map(|s| s.name.clone()).collect();
        for name in order {
            let t = tensors.iter().position(|x| x.0 == name).unwrap();
            let (_, dtype, shape) = &tensors[t];
            let numel: usize = shape.iter().product();
            let bytes: Vec<u8> = (0..numel)
                .flat_map(|k| {
                    let b = 0x3000 + ((k + 131 * t) % 0x2000) as u16;
                    if *dtype == DType::F32 {
                        (u32::from(b) << 16 | k as u32).to_le_bytes().to_vec()
                    } else {
                        b.to_le_bytes().to_vec()
                    }
                })
                .collect();
            w.write_tensor_bytes(&bytes).unwrap();
            w.finish_tensor().unwrap();
        }
        w.finish().unwrap();
    }
}

fn parallel(tp: usize, pp: usize) -> ParallelConfig {
    ParallelConfig::new(tp, pp)
}

fn qkv(tp: usize, pp: usize, kvm: usize, fuse: bool, hw: HwBackend) -> ParallelConfig {
    let mut p = ParallelConfig::new(tp, pp);
    p.qkv_linear = true;
    p.kv_size_multiplier = kvm;
    p.fuse_qkv = fuse;
    p.hw = hw;
    p
}

/// Shards `hf` into `out` with the nx-shard library.
fn shard(hf: &Path, out: &Path, p: &ParallelConfig, xser: bool) {
    nxd_shard::run(&ShardOptions {
        input: Some(hf.to_path_buf()),
        output: Some(out.to_path_buf()),
        config: None,
        parallel: p.clone(),
        dtype: None,
        jobs: Some(2),
        rank: Some(0),
        world: Some(1),
        dry_run: false,
        manifest: ManifestTarget::Default,
        force: false,
        xser,
        xser_split: false,
        progress: false,
    })
    .unwrap();
}

fn unshard_opts(input: &Path, output: &Path, config: &Path, p: &ParallelConfig) -> UnshardOptions {
    UnshardOptions {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        config: Some(config.to_path_buf()),
        tag: None,
        parallel: p.clone(),
        format: OutputFormat::Safetensors,
        max_shard_size: nxd_unshard::DEFAULT_MAX_SHARD_SIZE,
        dtype: None,
        check_replicas: true,
        jobs: Some(2),
        manifest: nxd_unshard::ManifestTarget::Default,
        progress: false,
    }
}

/// Every tensor of `out` equals the one of `hf`, bit for bit, and there are the same tensors.
fn assert_same_checkpoint(hf: &Path, out: &Path, what: &str) {
    let a = ShardedCheckpoint::open(hf).unwrap();
    let b = ShardedCheckpoint::open(out).unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut an: Vec<&String> = a.names().iter().collect();
    let mut bn: Vec<&String> = b.names().iter().collect();
    an.sort();
    bn.sort();
    assert_eq!(an, bn, "{what}: tensor names");
    for n in a.names() {
        let (fa, ea) = a.get(n).unwrap();
        let (fb, eb) = b.get(n).unwrap();
        let (ta, tb) = (fa.tensor(ea), fb.tensor(eb));
        assert_eq!(ta.dtype, tb.dtype, "{what}: {n}");
        assert_eq!(ta.layout.shape, tb.layout.shape, "{what}: {n}");
        assert!(
            ta.contiguous_bytes() == tb.contiguous_bytes(),
            "{what}: {n} differs"
        );
    }
}

/// The layouts of the matrix that nx-shard accepts for `m`: every tp / kv size multiplier /
/// qkv_linear / fuse / backend / trn2-tiling combination, each at two of the four pipeline
/// settings in turn (so that every pipeline setting meets every family), plus coalesced qkv.
fn matrix(m: &ModelConfig) -> Vec<ParallelConfig> {
    const PIPELINES: [(usize, usize); 4] = [(1, 1), (2, 1), (3, 1), (2, 2)];
    let mut out = Vec::new();
    let mut combo = 0;
    for tp in [1, 2, 4, 8] {
        for q in [false, true] {
            for kvm in [1, 2, 4] {
                for fuse in [false, true] {
                    for hw in [HwBackend::Trn1, HwBackend::Trn2] {
                        for allow in [false, true] {
                            if (!q && (kvm > 1 || fuse || hw == HwBackend::Trn2 || allow))
                                || (allow && hw == HwBackend::Trn1)
                            {
                                continue;
                            }
                            combo += 1;
                            for k in [combo, combo + 1] {
                                let (pp, vpp) = PIPELINES[k % PIPELINES.len()];
                                let mut p = parallel(tp, pp);
                                p.vpp = vpp;
                                p.qkv_linear = q;
                                p.kv_size_multiplier = kvm;
                                p.fuse_qkv = fuse;
                                p.hw = hw;
                                p.allow_nxd_trn2_kv_tiling = allow;
                                if validate(m, &p).is_ok() {
                                    out.push(p);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // Coalesced qkv (multi-head attention only).
    let mut p = parallel(2, 1);
    p.coalesce_qkv = true;
    if validate(m, &p).is_ok() {
        out.push(p);
    }
    out
}

#[test]
fn round_trip_is_exact_over_the_matrix() {
    let d = tempfile::tempdir().unwrap();
    let mut total = 0;
    for (name, tiny) in [("gqa", GQA), ("mha", MHA), ("tied", TIED)] {
        let hf = d.path().join(name).join("hf");
        tiny.write(&hf);
        let configs = matrix(&tiny.model());
        assert!(configs.len() >= 8, "{name}: {}", configs.len());
        for (i, p) in configs.iter().enumerate() {
            let what = format!("{name} {p:?}");
            let shards = d.path().join(name).join(format!("s{i}"));
            shard(&hf, &shards, p, i % 2 == 1);
            let out = d.path().join(name).join(format!("o{i}"));
            let mut opts = unshard_opts(&shards, &out, &hf.join("config.json"), p);
            // Several output shards now and then.
            opts.max_shard_size = [u64::MAX, 20_000, 1][i % 3];
            let outcome = nxd_unshard::run(&opts).unwrap_or_else(|e| panic!("{what}: {e:?}"));
            assert_eq!(outcome.tensors, tiny.tensors().len(), "{what}");
            assert_same_checkpoint(&hf, &out, &what);
            total += 1;
            fs::remove_dir_all(&shards).unwrap();
            fs::remove_dir_all(&out).unwrap();
        }
    }
    eprintln!("round trip: {total} layouts");
    assert!(total >= 40, "{total}");
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ckpt-unshard"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the binary, expecting `code`; returns stderr.
fn expect(code: i32, args: &[&str]) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "ckpt-unshard {args:?}: {err}"
    );
    err
}

/// The error line (checked to be the only line).
fn one_line_error(code: i32, args: &[&str]) -> String {
    let err = expect(code, args);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("ckpt-unshard: error: "), "{err}");
    lines[0].to_string()
}

fn flags(p: &ParallelConfig) -> Vec<String> {
    let mut v = vec![
        "--tp".to_string(),
        p.tp.to_string(),
        "--pp".into(),
        p.pp.to_string(),
        "--vpp".into(),
        p.vpp.to_string(),
        "--kv-size-multiplier".into(),
        p.kv_size_multiplier.to_string(),
        "--hw-backend".into(),
        p.hw.to_string(),
    ];
    for (f, on) in [
        ("--qkv-linear", p.qkv_linear),
        ("--fuse-qkv", p.fuse_qkv),
        ("--coalesce-qkv", p.coalesce_qkv),
        ("--allow-nxd-trn2-kv-tiling", p.allow_nxd_trn2_kv_tiling),
    ] {
        if on {
            v.push(f.to_string());
        }
    }
    v
}

/// Runs the binary on `input` with the layout flags of `p` and `extra` arguments.
fn cli(
    code: i32,
    input: &Path,
    output: &Path,
    config: &Path,
    p: &ParallelConfig,
    extra: &[&str],
) -> String {
    let f = flags(p);
    let mut args: Vec<&str> = vec![
        "--input",
        s(input),
        "--output",
        s(output),
        "--config",
        s(config),
        "-q",
    ];
    args.extend(f.iter().map(String::as_str));
    args.extend_from_slice(extra);
    expect(code, &args)
}

/// Rewrites every shard of `shards/model` in NxD's training-checkpoint xser layout under
/// `ckpt/<tag>/model/`, with the `checkpoint` marker, `done` when asked and `newest`, leaving
/// out the tensors named in `drop`.
fn to_training_checkpoint(shards: &Path, ckpt: &Path, tag: &str, done: bool, drop: &[&str]) {
    let model = ckpt.join(tag).join("model");
    fs::create_dir_all(&model).unwrap();
    let mut names: Vec<PathBuf> = fs::read_dir(shards.join("model"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pt"))
        .collect();
    names.sort();
    for src in names {
        let f = NxdFile::open(&src).unwrap();
        let tensors: Vec<(String, tensor_formats::TensorRef<'_>)> = f
            .tensors()
            .unwrap()
            .into_iter()
            .filter(|(n, _)| !drop.contains(n))
            .map(|(n, t)| (n.to_string(), t))
            .collect();
        let main = model.join(src.file_name().unwrap());
        fs::create_dir_all(tensors_dir(&main)).unwrap();
        write_training_layout(
            &main,
            &tensors,
            None,
            |p| Ok(BufWriter::new(fs::File::create(p)?)),
            |mut w| Ok(w.flush()?),
        )
        .unwrap();
    }
    fs::write(ckpt.join(tag).join("checkpoint"), "1").unwrap();
    if done {
        fs::write(ckpt.join(tag).join("done"), "1").unwrap();
    }
    fs::write(ckpt.join("newest"), tag).unwrap();
}

#[test]
fn training_checkpoint_by_tag() {
    let d = tempfile::tempdir().unwrap();
    let hf = d.path().join("hf");
    GQA.write(&hf);
    let config = hf.join("config.json");
    let p = qkv(4, 2, 2, true, HwBackend::Trn1);
    let shards = d.path().join("shards");
    shard(&hf, &shards, &p, false);
    let ckpt = d.path().join("ckpt");
    to_training_checkpoint(&shards, &ckpt, "step_100", true, &[]);

    let out = d.path().join("out");
    let err = cli(
        0,
        &ckpt,
        &out,
        &config,
        &p,
        &["--tag", "latest", "--check-replicas"],
    );
    assert!(err.contains("reading checkpoint tag step_100"), "{err}");
    assert_same_checkpoint(&hf, &out, "training checkpoint");
    let out2 = d.path().join("out2");
    cli(0, &ckpt.join("step_100"), &out2, &config, &p, &[]);
    assert_same_checkpoint(&hf, &out2, "tag dir");

    // A newer tag whose save did not finish: `latest` (via `newest`) is refused, saying why.
    to_training_checkpoint(&shards, &ckpt, "step_200", false, &[]);
    let out3 = d.path().join("out3");
    let err = one_line_error(
        2,
        &[
            "--input",
            s(&ckpt),
            "--output",
            s(&out3),
            "--config",
            s(&config),
            "--tp",
            "4",
            "--pp",
            "2",
            "--qkv-linear",
            "--kv-size-multiplier",
            "2",
            "--fuse-qkv",
        ],
    );
    assert!(
        err.contains("`step_200`") && err.contains("no `done` marker") && err.contains("step_100"),
        "{err}"
    );
    assert!(!out3.exists());
    cli(0, &ckpt, &out3, &config, &p, &["--tag", "step_100"]);
    assert_same_checkpoint(&hf, &out3, "named tag");
    let err = cli(
        2,
        &ckpt,
        &d.path().join("out4"),
        &config,
        &p,
        &["--tag", "step_7"],
    );
    assert!(
        err.contains("tag `step_7` is not a checkpoint tag"),
        "{err}"
    );

    // A truncated tensor file.
    let t = ckpt.join("step_100/model/dp_rank_00_tp_rank_01_pp_rank_00.pt.tensors/tensor_2.pt");
    let len = fs::metadata(&t).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&t)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out5 = d.path().join("out5");
    let err = cli(2, &ckpt, &out5, &config, &p, &["--tag", "step_100"]);
    assert!(
        err.contains("tensor_2.pt") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!out5.exists());
}

#[test]
fn tied_head_may_be_absent_from_a_training_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let hf = d.path().join("hf");
    TIED.write(&hf);
    let config = hf.join("config.json");
    let p = parallel(2, 2);
    let shards = d.path().join("shards");
    shard(&hf, &shards, &p, false);
    let ckpt = d.path().join("ckpt");
    to_training_checkpoint(&shards, &ckpt, "t", true, &["lm_head.weight"]);
    let out = d.path().join("out");
    cli(0, &ckpt, &out, &config, &p, &["--check-replicas"]);
    assert_same_checkpoint(&hf, &out, "no lm_head");
    // NxD's checkpoint.pt still holds it, as a tied state_dict() does.
    let pt = d.path().join("pt");
    cli(0, &ckpt, &pt, &config, &p, &["--format", "pt"]);
    let f = PtFile::open(pt.join("checkpoint.pt")).unwrap();
    assert!(f.named_tensors().iter().any(|(n, _)| n == "lm_head.weight"));
    // Untied, a missing lm_head is an error.
    let hf2 = d.path().join("hf2");
    GQA.write(&hf2);
    let shards2 = d.path().join("shards2");
    shard(&hf2, &shards2, &p, false);
    let ckpt2 = d.path().join("ckpt2");
    to_training_checkpoint(&shards2, &ckpt2, "t", true, &["lm_head.weight"]);
    let e = cli(
        2,
        &ckpt2,
        &d.path().join("o2"),
        &hf2.join("config.json"),
        &p,
        &[],
    );
    assert!(
        e.contains("dp_rank_00_tp_rank_00_pp_rank_01.pt: tensor `lm_head.weight` is missing"),
        "{e}"
    );
}

/// Flips the lowest bit of element `elem` (storage order) of `tensor` in the shard file `path`.
fn flip(path: &Path, tensor: &str, elem: usize) {
    let at = {
        let f = NxdFile::open(path).unwrap();
        let base = f.main().bytes().as_ptr() as usize;
        let tensors = f.tensors().unwrap();
        let (_, t) = tensors.iter().find(|(n, _)| *n == tensor).unwrap();
        t.storage.as_ptr() as usize - base + (t.layout.offset + elem) * t.dtype.size()
    };
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 1;
    fs::write(path, bytes).unwrap();
}

#[test]
fn replicas_that_differ_fail_the_check() {
    let d = tempfile::tempdir().unwrap();
    let hf = d.path().join("hf");
    GQA.write(&hf);
    let config = hf.join("config.json");
    // tp 4 with kv size multiplier 2: ranks 2 and 3 hold copies of ranks 0 and 1's kv heads.
    let p = qkv(4, 1, 2, false, HwBackend::Trn1);
    let shards = d.path().join("shards");
    shard(&hf, &shards, &p, false);
    let out = d.path().join("ok");
    let err = cli(0, &shards, &out, &config, &p, &["--check-replicas"]);
    assert!(err.contains("replica regions"), "{err}");

    let rank2 = shards.join("model").join(file_name(2, 0));
    flip(&rank2, "model.layers.1.self_attn.qkv_proj.weight_k", 5);
    let bad = d.path().join("bad");
    let err = cli(1, &shards, &bad, &config, &p, &["--check-replicas"]);
    assert!(
        err.contains("dp_rank_00_tp_rank_02_pp_rank_00.pt `model.layers.1.self_attn.qkv_proj.weight_k` differs from its copy in dp_rank_00_tp_rank_00_pp_rank_00.pt")
            && err.contains("element [0, 5] of `model.layers.1.self_attn.k_proj.weight`")
            && err.lines().count() == 1,
        "{err}"
    );
    assert!(!bad.exists());
    // Without the check, the first copy is read and the output is the original.
    cli(0, &shards, &bad, &config, &p, &[]);
    assert_same_checkpoint(&hf, &bad, "unchecked");

    // A replicated norm that drifted on tp rank 3, and the kv flip: both counted.
    flip(
        &shards.join("model").join(file_name(3, 0)),
        "model.layers.2.input_layernorm.weight",
        7,
    );
    let err = cli(
        1,
        &shards,
        &d.path().join("bad2"),
        &config,
        &p,
        &["--check-replicas"],
    );
    assert!(err.contains("(2 of "), "{err}");
    assert!(err.contains("weight_k"), "first in state-dict order: {err}");

    // Tied lm_head against the embedding.
    let hf = d.path().join("tied");
    TIED.write(&hf);
    let p = parallel(2, 2);
    let shards = d.path().join("tshards");
    shard(&hf, &shards, &p, false);
    flip(
        &shards.join("model").join(file_name(1, 1)),
        "lm_head.weight",
        3,
    );
    let err = cli(
        1,
        &shards,
        &d.path().join("bad3"),
        &hf.join("config.json"),
        &p,
        &["--check-replicas"],
    );
    assert!(
        err.contains("dp_rank_00_tp_rank_01_pp_rank_01.pt `lm_head.weight` differs from its copy in dp_rank_00_tp_rank_01_pp_rank_00.pt `model.embed_tokens.weight` at element [48, 3]"),
        "{err}"
    );
}

#[test]
fn bad_inputs_are_refused_with_one_line() {
    let d = tempfile::tempdir().unwrap();
    let hf = d.path().join("hf");
    TIED.write(&hf);
    let config = hf.join("config.json");
    let mut p = qkv(4, 2, 1, false, HwBackend::Trn1);
    p.vpp = 2;
    let shards = d.path().join("shards");
    shard(&hf, &shards, &p, true);
    let out = d.path().join("out");
    let run_with = |p: &ParallelConfig| cli(2, &shards, &out, &config, p, &[]);

    // Flags of another layout.
    let mut q = p.clone();
    q.qkv_linear = false;
    let e = run_with(&q);
    assert!(e.contains("qkv_proj.weight_q`, which the layout tp 4 x pp 2 x vpp 2, no qkv_linear does not produce"), "{e}");
    let mut q = p.clone();
    q.vpp = 1;
    let e = run_with(&q);
    assert!(
        e.contains("dp_rank_00_tp_rank_00_pp_rank_00.pt: tensor `model.layers.1."),
        "{e}"
    );
    assert!(
        e.contains("were the shards written with other layout flags"),
        "{e}"
    );
    let mut q = p.clone();
    q.tp = 2;
    q.hw = HwBackend::Trn2;
    let e = run_with(&q);
    assert!(
        e.contains("unexpected rank files") && e.contains("--tp 4 --pp 2"),
        "{e}"
    );
    let mut q = p.clone();
    q.hw = HwBackend::Trn2;
    q.kv_size_multiplier = 2;
    q.allow_nxd_trn2_kv_tiling = true;
    let e = run_with(&q);
    assert!(
        e.contains("`model.layers.0.self_attn.qkv_proj.weight_k` has shape [8, 64], the layout"),
        "{e}"
    );
    // Refused layouts say why.
    let mut q = p.clone();
    q.kv_size_multiplier = 2;
    let e = run_with(&q);
    assert!(e.contains("describe no layout nx-shard writes"), "{e}");
    // Another config.json (one layer more): shapes agree, layers do not.
    let other = d.path().join("other.json");
    let mut t = TIED;
    t.layers = 6;
    fs::write(&other, t.config_json()).unwrap();
    let e = cli(2, &shards, &out, &other, &p, &[]);
    assert!(e.contains("is missing"), "{e}");

    // A missing, an extra and a truncated rank file.
    let f = shards.join("model").join(file_name(3, 1));
    let kept = d.path().join("kept.pt");
    fs::rename(&f, &kept).unwrap();
    let e = run_with(&p);
    assert!(
        e.contains("missing rank file dp_rank_00_tp_rank_03_pp_rank_01.pt"),
        "{e}"
    );
    fs::copy(&kept, &f).unwrap();
    fs::copy(&kept, shards.join("model").join(file_name(4, 1))).unwrap();
    let e = run_with(&p);
    assert!(
        e.contains("unexpected rank file dp_rank_00_tp_rank_04_pp_rank_01.pt"),
        "{e}"
    );
    fs::remove_file(shards.join("model").join(file_name(4, 1))).unwrap();
    let len = fs::metadata(&f).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let e = run_with(&p);
    assert!(e.contains("dp_rank_00_tp_rank_03_pp_rank_01.pt"), "{e}");
    fs::copy(&kept, &f).unwrap();
    assert!(!out.exists());

    // Every error above is one line; a good run after them works.
    let e = one_line_error(
        2,
        &[
            "--input",
            s(&shards),
            "--output",
            s(&out),
            "--config",
            s(&config),
            "--tp",
            "3",
        ],
    );
    assert!(e.contains("not divisible by tp 3"), "{e}");
    cli(0, &shards, &out, &config, &p, &[]);
    assert_same_checkpoint(&hf, &out, "after the errors");
    // The output exists now: refused, untouched.
    let before = fs::read(out.join("ckpt-unshard.manifest.jsonl")).unwrap();
    let e = cli(2, &shards, &out, &config, &p, &[]);
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(
        fs::read(out.join("ckpt-unshard.manifest.jsonl")).unwrap(),
        before
    );
    // Inputs that are not there.
    let e = cli(
        2,
        &d.path().join("nope"),
        &d.path().join("o2"),
        &config,
        &p,
        &[],
    );
    assert!(e.contains("does not exist"), "{e}");
    let e = cli(2, &hf, &d.path().join("o2"), &config, &p, &[]);
    assert!(e.contains("no NxD shard files"), "{e}");
}

#[test]
fn pt_format_dtype_manifest_and_nxd_spellings() {
    let d = tempfile::tempdir().unwrap();
    let hf = d.path().join("hf");
    TIED.write(&hf);
    let config = hf.join("config.json");
    let p = qkv(4, 3, 1, true, HwBackend::Trn1);
    let shards = d.path().join("shards");
    shard(&hf, &shards, &p, true);

    // NxD's spellings, --format pt, manifest to stdout.
    let out = d.path().join("full");
    let o = run(&[
        "--input_dir",
        s(&shards.join("model")),
        "--output_dir",
        s(&out),
        "--config",
        s(&config),
        "--tp_size",
        "4",
        "--pp_size",
        "3",
        "--qkv_linear",
        "1",
        "--fuse_qkv",
        "True",
        "--kv_size_multiplier",
        "1",
        "--hw_backend",
        "trn1",
        "--load_xser",
        "1",
        "--convert_to_full_state",
        "--format",
        "pt",
        "--manifest",
        "-",
        "-q",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest = String::from_utf8(o.stdout).unwrap();
    assert!(
        manifest.starts_with("{\"path\":\"checkpoint.pt\""),
        "{manifest}"
    );
    let names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["checkpoint.pt".to_string()]);
    let pt = PtFile::open(out.join("checkpoint.pt")).unwrap();
    let tensors = pt.named_tensors();
    let mut want: Vec<String> = TIED.tensors().into_iter().map(|t| t.0).collect();
    want.push("lm_head.weight".into());
    let got: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(got, want);
    let embed = &tensors[0].1;
    let head = &tensors.last().unwrap().1;
    assert_eq!(embed.storage.key, head.storage.key, "tied: one storage");
    let src = ShardedCheckpoint::open(&hf).unwrap();
    for (name, t) in &tensors {
        let key = if name == "lm_head.weight" {
            "model.embed_tokens.weight"
        } else {
            name
        };
        let (f, e) = src.get(key).unwrap();
        assert_eq!(
            pt.tensor(t).unwrap().contiguous_bytes(),
            f.tensor(e).contiguous_bytes(),
            "{name}"
        );
    }

    // --dtype fp32 with a manifest file, several output shards.
    // The config is copied as config.json whatever its name.
    let renamed = d.path().join("llama.json");
    fs::copy(&config, &renamed).unwrap();
    let out = d.path().join("f32");
    let mf = d.path().join("m.jsonl");
    cli(
        0,
        &shards,
        &out,
        &renamed,
        &p,
        &[
            "--dtype",
            "fp32",
            "--manifest",
            s(&mf),
            "--max-shard-size",
            "300KB",
        ],
    );
    assert!(!out.join("ckpt-unshard.manifest.jsonl").exists());
    let records = read_manifest_path(&mf).unwrap();
    let mut files: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut listed: Vec<String> = records.iter().map(|r| r.path.clone()).collect();
    listed.sort();
    assert_eq!(files, listed);
    assert!(
        files.contains(&"model.safetensors.index.json".to_string())
            && files.contains(&"config.json".to_string())
    );
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let shards_n = files.iter().filter(|f| f.ends_with(".safetensors")).count();
    assert!(shards_n >= 3, "{files:?}");
    let total: u64 = TIED
        .tensors()
        .iter()
        .map(|t| t.2.iter().product::<usize>() as u64 * 4)
        .sum();
    assert_eq!(index["metadata"]["total_size"], total);
    let conv = ShardedCheckpoint::open(&out).unwrap();
    for n in src.names() {
        let (fa, ea) = src.get(n).unwrap();
        let (fb, eb) = conv.get(n).unwrap();
        assert_eq!(fb.tensor(eb).dtype, DType::F32);
        let a = fa.tensor(ea).contiguous_bytes().unwrap();
        let b = fb.tensor(eb).contiguous_bytes().unwrap();
        let widened: Vec<u8> = a.chunks(2).flat_map(|c| [0, 0, c[0], c[1]]).collect();
        assert_eq!(widened, b, "{n}");
    }
}

#[test]
fn help_has_examples() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let h = String::from_utf8(o.stdout).unwrap();
    for want in [
        "Examples:",
        "--tag",
        "--check-replicas",
        "--max-shard-size",
        "--format",
        "Exit status:",
        "tp_size",
    ] {
        assert!(h.contains(want), "{want}: {h}");
    }
}
