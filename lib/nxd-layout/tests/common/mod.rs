//! Test support: symbolic tensors, a plan executor, and an independent emulator of NxD's
//! `convert_full_state_to_tp` (a literal transcription of the Python, with crashes as `Err`).
#![allow(dead_code)]

use nxd_layout::*;

/// An element of a symbolic tensor: (source index, flat index in that source).
pub type Elem = (usize, usize);

/// A tensor whose elements say where they came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sym {
    pub shape: Vec<usize>,
    pub data: Vec<Elem>,
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

impl Sym {
    pub fn source(i: usize, shape: &[usize]) -> Sym {
        let n: usize = shape.iter().product();
        Sym {
            shape: shape.to_vec(),
            data: (0..n).map(|k| (i, k)).collect(),
        }
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Sym, String> {
        if dim >= self.shape.len() || start + len > self.shape[dim] {
            return Err(format!(
                "narrow({dim}, {start}, {len}) out of range for {:?}",
                self.shape
            ));
        }
        let mut shape = self.shape.clone();
        shape[dim] = len;
        let ist = strides(&self.shape);
        let ost = strides(&shape);
        let n: usize = shape.iter().product();
        let mut data = Vec::with_capacity(n);
        for k in 0..n {
            let mut src = 0;
            for d in 0..shape.len() {
                let i = (k / ost[d]) % shape[d];
                let i = if d == dim { i + start } else { i };
                src += i * ist[d];
            }
            data.push(self.data[src]);
        }
        Ok(Sym { shape, data })
    }

    pub fn cat(parts: &[Sym], dim: usize) -> Result<Sym, String> {
        if parts.is_empty() {
            return Err("torch.cat(): expected a non-empty list of Tensors".into());
        }
        let mut shape = parts[0].shape.clone();
        for p in &parts[1..] {
            if p.shape.len() != shape.len()
                || (0..shape.len()).any(|d| d != dim && p.shape[d] != shape[d])
            {
                return Err(format!("cat shape mismatch {:?} vs {:?}", p.shape, shape));
            }
            shape[dim] += p.shape[dim];
        }
        // Outer = product of dims before `dim`; each part contributes a run per outer index.
        let outer: usize = shape[..dim].iter().product();
        let mut data = Vec::new();
        for o in 0..outer {
            for p in parts {
                let run: usize = p.shape[dim..].iter().product();
                data.extend_from_slice(&p.data[o * run..(o + 1) * run]);
            }
        }
        Ok(Sym { shape, data })
    }

    pub fn transpose(&self) -> Sym {
        assert_eq!(self.shape.len(), 2);
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut data = Vec::with_capacity(r * c);
        for j in 0..c {
            for i in 0..r {
                data.push(self.data[i * c + j]);
            }
        }
        Sym {
            shape: vec![c, r],
            data,
        }
    }

    /// `x.repeat(k, 1)` for a 2-D x.
    pub fn repeat_rows(&self, k: usize) -> Sym {
        let mut data = Vec::new();
        for _ in 0..k {
            data.extend_from_slice(&self.data);
        }
        Sym {
            shape: vec![self.shape[0] * k, self.shape[1]],
            data,
        }
    }

    /// Rows `[start, start+len)` of a 2-D tensor, as a list of 2-D row blocks.
    pub fn row_block(&self, start: usize, len: usize) -> Sym {
        self.narrow(0, start, len).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// Models and sources

pub fn model(
    h: usize,
    q: usize,
    kv: usize,
    layers: usize,
    inter: usize,
    vocab: usize,
) -> ModelConfig {
    ModelConfig {
        hidden_size: h,
        num_attention_heads: q,
        num_key_value_heads: kv,
        num_hidden_layers: layers,
        intermediate_size: inter,
        vocab_size: vocab,
        tie_word_embeddings: false,
        head_dim: h / q,
    }
}

/// Spec §1 model a (GQA, untied).
pub fn model_a() -> ModelConfig {
    model(256, 8, 2, 6, 512, 1024)
}
/// Spec §1 model b (MHA).
pub fn model_b() -> ModelConfig {
    model(256, 8, 8, 5, 512, 1024)
}
/// Spec §1 model c (GQA, 7 layers, tied).
pub fn model_c() -> ModelConfig {
    let mut m = model(256, 8, 4, 7, 512, 1024);
    m.tie_word_embeddings = true;
    m
}

/// HF source list in canonical order, bf16, optionally with legacy inv_freq (model d).
pub fn sources(m: &ModelConfig, inv_freq: bool) -> Vec<SourceTensor> {
    let mut s = expected_source_tensors(m, "BF16", 2);
    if inv_freq {
        let mut out = Vec::new();
        for t in s {
            let is_o = t.name.ends_with("self_attn.o_proj.weight");
            let layer = t.name.split('.').nth(2).map(str::to_string);
            out.push(t);
            if is_o {
                out.push(SourceTensor::new(
                    format!(
                        "model.layers.{}.self_attn.rotary_emb.inv_freq",
                        layer.unwrap()
                    ),
                    vec![m.head_dim / 2],
                    "F32",
                    4,
                ));
            }
        }
        s = out;
    }
    s
}

pub fn pc(tp: usize, pp: usize) -> ParallelConfig {
    ParallelConfig::new(tp, pp)
}

// ---------------------------------------------------------------------------------------------
// Executing plans on symbols

/// One output file: (key, tensor) in order.
pub type SymFile = Vec<(String, Sym)>;

pub fn source_syms(sources: &[SourceTensor]) -> Vec<Sym> {
    sources
        .iter()
        .enumerate()
        .map(|(i, s)| Sym::source(i, &s.shape))
        .collect()
}

/// Runs a forward plan on symbolic sources.
pub fn execute(plan: &ShardPlan) -> Vec<SymFile> {
    let srcs = source_syms(&plan.sources);
    plan.files
        .iter()
        .map(|f| {
            f.tensors
                .iter()
                .map(|t| {
                    let parts: Vec<Sym> = t
                        .parts
                        .iter()
                        .map(|p| {
                            let mut x = srcs[p.source].clone();
                            for n in &p.narrow {
                                x = x.narrow(n.dim, n.start, n.len).unwrap();
                            }
                            x
                        })
                        .collect();
                    let x = Sym::cat(&parts, t.concat_dim).unwrap();
                    assert_eq!(x.shape, t.shape, "{}", t.name);
                    (t.name.clone(), x)
                })
                .collect()
        })
        .collect()
}

fn region(x: &Sym, narrows: &[Narrow]) -> Sym {
    let mut x = x.clone();
    for n in narrows {
        x = x.narrow(n.dim, n.start, n.len).unwrap();
    }
    x
}

/// Runs an inverse plan on executed shard files; returns the rebuilt sources. Also checks every
/// replica location against the original.
pub fn unshard_execute(u: &UnshardPlan, files: &[SymFile]) -> Vec<Sym> {
    let get = |file: usize, name: &str| -> Sym {
        files[file]
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} not in file {file}"))
            .1
            .clone()
    };
    u.tensors
        .iter()
        .map(|t| {
            let pieces: Vec<Sym> = t
                .pieces
                .iter()
                .map(|p| region(&get(p.file, &p.tensor), &p.narrow))
                .collect();
            let x = Sym::cat(&pieces, t.concat_dim).unwrap();
            let orig = Sym::source(t.source, &t.shape);
            for r in &t.replicas {
                let shard = region(&get(r.file, &r.tensor), &r.shard_narrow);
                assert_eq!(
                    shard,
                    region(&orig, &r.source_narrow),
                    "replica of {} in file {} `{}`",
                    t.name,
                    r.file,
                    r.tensor
                );
            }
            x
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The NxD emulator

/// An insertion-ordered dict, like Python's.
#[derive(Default, Clone, Debug)]
pub struct Dict(pub Vec<(String, Sym)>);

impl Dict {
    fn get(&self, k: &str) -> Option<&Sym> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v)
    }
    fn set(&mut self, k: String, v: Sym) {
        if let Some(e) = self.0.iter_mut().find(|(n, _)| *n == k) {
            e.1 = v;
        } else {
            self.0.push((k, v));
        }
    }
    fn pop(&mut self, k: &str) -> Result<Sym, String> {
        let i = self
            .0
            .iter()
            .position(|(n, _)| n == k)
            .ok_or_else(|| format!("KeyError: '{k}'"))?;
        Ok(self.0.remove(i).1)
    }
}

/// The full state dict NxD loads: the sources in order, plus the tied lm_head after
/// model.norm (as a tied `state_dict()` has it), sharing embed's symbols.
pub fn nxd_full_state(m: &ModelConfig, sources: &[SourceTensor]) -> Dict {
    let syms = source_syms(sources);
    let mut d = Dict::default();
    for (s, x) in sources.iter().zip(syms.iter()) {
        d.0.push((s.name.clone(), x.clone()));
    }
    if m.tie_word_embeddings && d.get("lm_head.weight").is_none() {
        let embed = d.get("model.embed_tokens.weight").unwrap().clone();
        let pos =
            d.0.iter()
                .position(|(n, _)| n == "model.norm.weight")
                .unwrap();
        d.0.insert(pos + 1, ("lm_head.weight".into(), embed));
    }
    d
}

fn create_partitions(stages: usize, names: &[usize]) -> Result<Vec<usize>, String> {
    let l = names.len();
    let per = l / stages;
    if per < 1 {
        return Err("AssertionError: The partition cannot be created".into());
    }
    let mut sizes = vec![per; stages];
    let rem = l % stages;
    for s in sizes.iter_mut().skip(stages - rem) {
        *s += 1;
    }
    let mut cuts = Vec::new();
    let mut cur = 0;
    for s in &sizes[..stages - 1] {
        cur += s;
        cuts.push(names[cur - 1]);
    }
    Ok(cuts)
}

fn is_qkv_weight(name: &str) -> bool {
    ["q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value"]
        .iter()
        .any(|s| name.contains(s))
}

/// `get_partition_dim` for the Llama names that reach it.
fn partition_dim(name: &str) -> usize {
    let dim0 = ["embed_tokens", "lm_head", "gate_proj", "up_proj"]
        .iter()
        .any(|s| name.contains(s))
        || is_qkv_weight(name);
    if dim0 {
        0
    } else if name.contains("down_proj") || name.contains("o_proj") {
        1
    } else {
        panic!("Unknown partition_dim for {name}")
    }
}

/// `get_weight_key(..., hf_to_nxd=True)` with qkv_linear's key map.
fn get_weight_key(name: &str) -> Result<String, String> {
    let f: Vec<&str> = name.split('.').collect();
    let last2 = f[f.len() - 2..].join(".");
    let mapped = match last2.as_str() {
        "q_proj.weight" => "qkv_proj.weight_q",
        "k_proj.weight" => "qkv_proj.weight_k",
        "v_proj.weight" => "qkv_proj.weight_v",
        _ => return Err(format!("KeyError: '{last2}'")),
    };
    Ok(format!("{}.{}", f[..f.len() - 2].join("."), mapped))
}

/// A literal transcription of `convert_from_full_state` (ep 1, hf model style, no padding).
/// Returns the files tp-major, or the crash.
pub fn nxd_convert(
    m: &ModelConfig,
    p: &ParallelConfig,
    full: &Dict,
) -> Result<Vec<SymFile>, String> {
    let q_heads = m.num_attention_heads;
    let kv_heads = m.num_key_value_heads;
    let head_dim = m.hidden_size / q_heads;
    let (tp_size, pp_size) = (p.tp, p.pp);
    let kvm = p.kv_size_multiplier;

    let mut layers: Vec<usize> = full
        .0
        .iter()
        .filter_map(|(n, _)| n.strip_prefix("model.layers."))
        .filter_map(|r| r.split('.').next()?.parse().ok())
        .collect();
    layers.sort();
    layers.dedup();
    let partitions = create_partitions(p.pp * p.vpp, &layers)?;

    let mut full = full.clone();
    if p.coalesce_qkv {
        for i in 0..m.num_hidden_layers {
            let q = full.pop(&format!("model.layers.{i}.self_attn.q_proj.weight"))?;
            let k = full.pop(&format!("model.layers.{i}.self_attn.k_proj.weight"))?;
            let v = full.pop(&format!("model.layers.{i}.self_attn.v_proj.weight"))?;
            let ps = m.hidden_size / tp_size;
            let mut parts = Vec::new();
            for r in 0..tp_size {
                let qs = q.narrow(0, r * ps, ps)?;
                let ks = k.narrow(0, r * ps, ps)?;
                let vs = v.narrow(0, r * ps, ps)?;
                parts.push(Sym::cat(&[qs, ks, vs], 0)?);
            }
            full.set(
                format!("model.layers.{i}.self_attn.qkv_proj.weight"),
                Sym::cat(&parts, 0)?,
            );
        }
    }

    let mut files = Vec::new();
    for tp_rank in 0..tp_size {
        for pp_rank in 0..pp_size {
            let mut partial = Dict::default();
            for (name, full_p) in &full.0 {
                if pp_rank != 0 && name.contains("embed_tokens") {
                    continue;
                }
                if pp_rank != pp_size - 1
                    && (name.contains("lm_head") || name.contains("model.norm.weight"))
                {
                    continue;
                }
                if name.contains("layers") {
                    let layer_idx: usize = name.split('.').nth(2).unwrap().parse().unwrap();
                    let mut current_stage = partitions.len();
                    for (stage, cut) in partitions.iter().enumerate() {
                        if layer_idx <= *cut {
                            current_stage = stage;
                            break;
                        }
                    }
                    if current_stage % pp_size != pp_rank {
                        continue;
                    }
                }

                if (is_qkv_weight(name) || name.contains("o_proj")) && p.qkv_linear {
                    let name = if is_qkv_weight(name) {
                        get_weight_key(name)?
                    } else {
                        name.clone()
                    };
                    if name.contains("weight_k") || name.contains("weight_v") {
                        let rep = full_p.repeat_rows(kvm);
                        let dim_size = rep.shape[0];
                        if dim_size % tp_size != 0 {
                            return Err("AssertionError: 0th dim after KV replication".into());
                        }
                        let ps = dim_size / tp_size;
                        partial.set(name, rep.narrow(0, tp_rank * ps, ps)?);
                    } else {
                        let is_o = name.contains("o_proj");
                        let w = if is_o {
                            full_p.transpose()
                        } else {
                            full_p.clone()
                        };
                        // weights = reshape(q_heads, head_dim, -1): head h = rows h*hd..(h+1)*hd
                        assert_eq!(w.shape[0], q_heads * head_dim, "emulator needs hd = H/Q");
                        let x = w.shape[1];
                        let head = |h: usize| w.row_block(h * head_dim, head_dim);
                        let to_load: Sym = match p.hw {
                            HwBackend::Trn2 => {
                                let per = q_heads / tp_size;
                                let start = (tp_rank * per).min(q_heads);
                                let end = ((tp_rank + 1) * per).min(q_heads);
                                if start == end {
                                    return Err("RuntimeError: cannot reshape tensor of 0 \
                                                elements into shape [-1, X]"
                                        .into());
                                }
                                let hs: Vec<Sym> = (start..end).map(head).collect();
                                Sym::cat(&hs, 0)?
                            }
                            HwBackend::Trn1 => {
                                let n = q_heads / (kv_heads * kvm);
                                if n == 0 || !q_heads.is_multiple_of(n) {
                                    return Err(format!(
                                        "RuntimeError: shape '[-1, {n}, {head_dim}, {x}]' is invalid"
                                    ));
                                }
                                let nblocks = q_heads / n;
                                let block = |b: usize| -> Sym {
                                    let hs: Vec<Sym> = (b * n..(b + 1) * n).map(head).collect();
                                    Sym::cat(&hs, 0).unwrap()
                                };
                                let indices: Vec<usize> =
                                    (0..kv_heads).map(|j| j * tp_size / kv_heads).collect();
                                let mut splits: Vec<usize> = Vec::new();
                                for i in 0..tp_size / kv_heads {
                                    for &ix in &indices {
                                        if ix + i >= nblocks {
                                            return Err(format!(
                                                "IndexError: index {} is out of bounds for \
                                                 dimension 0 with size {nblocks}",
                                                ix + i
                                            ));
                                        }
                                        splits.push(ix + i);
                                    }
                                }
                                if splits.is_empty() {
                                    return Err(
                                        "ValueError: torch.cat(): expected a non-empty list of Tensors"
                                            .into(),
                                    );
                                }
                                if tp_rank >= splits.len() {
                                    return Err(format!(
                                        "IndexError: index {tp_rank} is out of bounds for \
                                         dimension 0 with size {}",
                                        splits.len()
                                    ));
                                }
                                block(splits[tp_rank])
                            }
                        };
                        let to_load = if is_o { to_load.transpose() } else { to_load };
                        partial.set(name, to_load);
                    }
                } else if name.contains("embed_tokens")
                    || is_qkv_weight(name)
                    || name.contains("o_proj")
                    || name.contains("down_proj")
                    || name.contains("lm_head")
                {
                    let d = partition_dim(name);
                    let dim_size = full_p.shape[d];
                    if dim_size % tp_size != 0 {
                        return Err("AssertionError: vocab size is not divisiable".into());
                    }
                    let ps = dim_size / tp_size;
                    partial.set(name.clone(), full_p.narrow(d, tp_rank * ps, ps)?);
                } else if name.contains("gate_proj") || name.contains("up_proj") {
                    let d = partition_dim(name);
                    let dim_size = full_p.shape[d];
                    if dim_size % tp_size != 0 {
                        return Err("AssertionError: vocab size is not divisiable".into());
                    }
                    let ps = dim_size / tp_size;
                    let to_load = full_p.narrow(d, tp_rank * ps, ps)?;
                    let token = if name.contains("gate_proj") {
                        "gate_proj"
                    } else {
                        "up_proj"
                    };
                    let updated = name.replace(token, "gate_up_proj");
                    let v = match partial.get(&updated) {
                        Some(existing) if token == "gate_proj" => {
                            Sym::cat(&[to_load, existing.clone()], d)?
                        }
                        Some(existing) => Sym::cat(&[existing.clone(), to_load], d)?,
                        None => to_load,
                    };
                    partial.set(updated, v);
                } else {
                    partial.set(name.clone(), full_p.clone());
                }
            }
            if p.fuse_qkv {
                let layer_numbers: Vec<usize> = partial
                    .0
                    .iter()
                    .filter_map(|(n, _)| {
                        let r = n.strip_prefix("model.layers.")?;
                        let (num, rest) = r.split_once('.')?;
                        (rest == "self_attn.qkv_proj.weight_q").then(|| num.parse().unwrap())
                    })
                    .collect();
                for i in layer_numbers {
                    let q =
                        partial.pop(&format!("model.layers.{i}.self_attn.qkv_proj.weight_q"))?;
                    let k =
                        partial.pop(&format!("model.layers.{i}.self_attn.qkv_proj.weight_k"))?;
                    let v =
                        partial.pop(&format!("model.layers.{i}.self_attn.qkv_proj.weight_v"))?;
                    partial.set(
                        format!("model.layers.{i}.self_attn.qkv_proj.weight_qkv"),
                        Sym::cat(&[q, k, v], 0)?,
                    );
                }
            }
            files.push(partial.0);
        }
    }
    Ok(files)
}

/// Is an NxD output HF-GQA-consistent and complete for every layer? Checks, per layer and tp
/// rank, that the rows taken from q_proj (in any q/k/v/qkv tensor) are whole heads, likewise
/// for k_proj and v_proj, that each local q head sits with its own kv head under
/// repeat_interleave pairing, that o_proj's columns follow q's heads, and that every q head
/// appears exactly once over the ranks.
pub fn nxd_consistent(
    m: &ModelConfig,
    p: &ParallelConfig,
    sources: &[SourceTensor],
    files: &[SymFile],
) -> bool {
    let h = m.hidden_size;
    let hd = m.head_dim;
    let group = m.num_attention_heads / m.num_key_value_heads;
    let index = |name: &str| sources.iter().position(|s| s.name == name).unwrap();
    for l in 0..m.num_hidden_layers {
        let (qs, ks, vs, os) = (
            index(&format!("model.layers.{l}.self_attn.q_proj.weight")),
            index(&format!("model.layers.{l}.self_attn.k_proj.weight")),
            index(&format!("model.layers.{l}.self_attn.v_proj.weight")),
            index(&format!("model.layers.{l}.self_attn.o_proj.weight")),
        );
        let mut seen = vec![0usize; m.num_attention_heads];
        for tp in 0..p.tp {
            // rows by source, over this rank's files (only one holds layer l)
            let mut rows: [Vec<usize>; 3] = Default::default();
            let mut ocols: Vec<usize> = Vec::new();
            for f in &files[tp * p.pp..(tp + 1) * p.pp] {
                for (_, x) in f {
                    if x.shape.len() != 2 {
                        continue;
                    }
                    let (r, c) = (x.shape[0], x.shape[1]);
                    for i in 0..r {
                        let first = x.data[i * c];
                        for (slot, s) in [qs, ks, vs].iter().enumerate() {
                            if first.0 == *s {
                                // a whole source row, in order?
                                if c != h || first.1 % h != 0 {
                                    return false;
                                }
                                for j in 0..c {
                                    if x.data[i * c + j] != (*s, first.1 + j) {
                                        return false;
                                    }
                                }
                                rows[slot].push(first.1 / h);
                            }
                        }
                    }
                    if r > 0 && c > 0 && x.data[0].0 == os {
                        for j in 0..c {
                            ocols.push(x.data[j].1 % (m.num_attention_heads * hd));
                        }
                    }
                }
            }
            let heads = |rs: &[usize]| -> Option<Vec<usize>> {
                if !rs.len().is_multiple_of(hd) {
                    return None;
                }
                rs.chunks(hd)
                    .map(|c| {
                        (c[0] % hd == 0 && c.iter().enumerate().all(|(i, &x)| x == c[0] + i))
                            .then_some(c[0] / hd)
                    })
                    .collect()
            };
            let (Some(qh), Some(kh), Some(vh)) =
                (heads(&rows[0]), heads(&rows[1]), heads(&rows[2]))
            else {
                return false;
            };
            if kh != vh || ocols != rows[0] || kh.is_empty() || qh.len() % kh.len() != 0 {
                return false;
            }
            let g = qh.len() / kh.len();
            for (i, &qh_i) in qh.iter().enumerate() {
                if qh_i / group != kh[i / g] {
                    return false;
                }
                seen[qh_i] += 1;
            }
        }
        if seen.iter().any(|&n| n != 1) {
            return false;
        }
    }
    true
}

/// Compares an executed plan with the emulator's output: same files, same key order, same
/// tensors element by element.
pub fn assert_same(plan_files: &[SymFile], nxd: &[SymFile]) {
    assert_eq!(plan_files.len(), nxd.len(), "file count");
    for (fi, (a, b)) in plan_files.iter().zip(nxd).enumerate() {
        let an: Vec<&str> = a.iter().map(|(n, _)| n.as_str()).collect();
        let bn: Vec<&str> = b.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(an, bn, "key order of file {fi}");
        for ((n, x), (_, y)) in a.iter().zip(b) {
            assert_eq!(x, y, "tensor {n} of file {fi}");
        }
    }
}
