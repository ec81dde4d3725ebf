//! The layout flags shared by the tools that write or read an NxD shard set (`nx-shard`, `ckpt-unshard`,
//! `shard-verify`), with NxD's `convert_checkpoints.py` spellings as aliases.
//!
//! Flatten [`LayoutArgs`] into a clap parser with `#[command(flatten)]`; [`LayoutArgs::parallel`]
//! turns it into the planner's [`ParallelConfig`].

use clap::{ArgAction, Args};
use nxd_layout::{HwBackend, ParallelConfig};
use tensor_formats::DType;

/// Boolean flag values: `1/0`, `true/false`, `yes/no`, `on/off` (a bare flag means true).
///
/// Unlike NxD's argparse `type=bool` (where `--qkv_linear 0` means true), `0` and `false` mean
/// false here.
pub fn parse_flag(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" | "y" | "t" => Ok(true),
        "0" | "false" | "no" | "off" | "n" | "f" | "" => Ok(false),
        _ => Err(format!("expected true/false or 1/0, got {s:?}")),
    }
}

/// The value of `--dtype`: `None` keeps each tensor's dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtypeChoice(pub Option<DType>);

/// `--dtype`: `keep`, or a float dtype (`bf16`, `fp32`, `fp16`).
pub fn parse_dtype(s: &str) -> Result<DtypeChoice, String> {
    if s.eq_ignore_ascii_case("keep") {
        return Ok(DtypeChoice(None));
    }
    match DType::parse_user(s) {
        Some(d) if d.is_float() => Ok(DtypeChoice(Some(d))),
        _ => Err(format!("expected keep, bf16 or fp32, got {s:?}")),
    }
}

/// `--hw-backend`: `trn1` or `trn2`.
pub fn parse_hw(s: &str) -> Result<HwBackend, String> {
    s.parse()
}

/// The TP x PP layout of a shard set: the `convert_checkpoints.py` settings that decide which
/// file holds which tensor.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct LayoutArgs {
    /// Tensor-parallel degree.
    #[arg(long, visible_alias = "tp_size", default_value_t = 1, value_name = "N")]
    pub tp: usize,

    /// Pipeline-parallel degree.
    #[arg(long, visible_alias = "pp_size", default_value_t = 1, value_name = "N")]
    pub pp: usize,

    /// Virtual pipeline stages per pp rank.
    #[arg(
        long,
        visible_alias = "virtual_pp_size",
        default_value_t = 1,
        value_name = "N"
    )]
    pub vpp: usize,

    /// Replicate the kv heads this many times (with --qkv-linear).
    #[arg(
        long,
        visible_alias = "kv_size_multiplier",
        default_value_t = 1,
        value_name = "N"
    )]
    pub kv_size_multiplier: usize,

    /// GQA QKV layout (qkv_proj.weight_q/_k/_v).
    #[arg(long, visible_alias = "qkv_linear", value_name = "BOOL", num_args = 0..=1,
          default_value = "false", default_missing_value = "true", value_parser = parse_flag,
          action = ArgAction::Set)]
    pub qkv_linear: bool,

    /// One fused qkv_proj.weight_qkv per layer (with --qkv-linear).
    #[arg(long, visible_alias = "fuse_qkv", value_name = "BOOL", num_args = 0..=1,
          default_value = "false", default_missing_value = "true", value_parser = parse_flag,
          action = ArgAction::Set)]
    pub fuse_qkv: bool,

    /// One qkv_proj.weight per layer (multi-head attention, without --qkv-linear).
    #[arg(long, visible_alias = "coalesce_qkv", value_name = "BOOL", num_args = 0..=1,
          default_value = "false", default_missing_value = "true", value_parser = parse_flag,
          action = ArgAction::Set)]
    pub coalesce_qkv: bool,

    /// Hardware backend: trn1 or trn2 (q-head placement differs).
    #[arg(long, visible_alias = "hw_backend", default_value = "trn1", value_parser = parse_hw,
          value_name = "trn1|trn2")]
    pub hw_backend: HwBackend,

    /// xser layout (NxD's --save_xser): a <file>.pt.tensors/ directory beside every shard file.
    #[arg(long, visible_alias = "save_xser", alias = "load_xser", value_name = "BOOL",
          num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = parse_flag, action = ArgAction::Set)]
    pub xser: bool,

    /// Accept trn2 + qkv_linear layouts that are not HF-GQA-consistent (NxD's tiled kv heads).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_value = "false",
          default_missing_value = "true", value_parser = parse_flag, action = ArgAction::Set)]
    pub allow_nxd_trn2_kv_tiling: bool,
}

impl LayoutArgs {
    /// The planner's view of these flags (everything but `xser`, which only changes the
    /// directories beside the files).
    pub fn parallel(&self) -> ParallelConfig {
        ParallelConfig {
            tp: self.tp,
            pp: self.pp,
            vpp: self.vpp,
            kv_size_multiplier: self.kv_size_multiplier,
            qkv_linear: self.qkv_linear,
            fuse_qkv: self.fuse_qkv,
            coalesce_qkv: self.coalesce_qkv,
            hw: self.hw_backend,
            allow_nxd_trn2_kv_tiling: self.allow_nxd_trn2_kv_tiling,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        layout: LayoutArgs,
    }

    fn parse(args: &[&str]) -> LayoutArgs {
        let mut all = vec!["x"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().layout
    }

    #[test]
    fn defaults_are_nxd_defaults() {
        let l = parse(&[]);
        assert_eq!(l.parallel(), ParallelConfig::new(1, 1));
        assert!(!l.xser);
    }

    #[test]
    fn nxd_spellings_and_optional_bool_values() {
        let l = parse(&[
            "--tp_size",
            "8",
            "--pp_size",
            "2",
            "--virtual_pp_size",
            "2",
            "--kv_size_multiplier",
            "4",
            "--qkv_linear",
            "1",
            "--fuse_qkv",
            "--hw_backend",
            "trn2",
            "--load_xser",
            "true",
        ]);
        let p = l.parallel();
        assert_eq!((p.tp, p.pp, p.vpp, p.kv_size_multiplier), (8, 2, 2, 4));
        assert!(p.qkv_linear && p.fuse_qkv && !p.coalesce_qkv);
        assert_eq!(p.hw, HwBackend::Trn2);
        assert!(l.xser);
        let l = parse(&["--qkv-linear", "0", "--save_xser", "0"]);
        assert!(!l.qkv_linear && !l.xser);
        assert!(Cli::try_parse_from(["x", "--qkv-linear", "maybe"]).is_err());
        assert!(Cli::try_parse_from(["x", "--hw-backend", "inf2"]).is_err());
    }
}
