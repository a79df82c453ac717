//! Builds the XDP program with aya-build and leaves it in `OUT_DIR`, where
//! `dataplane` embeds it. Without `bpf-linker` (or with `AYA_BUILD_SKIP=1`) an
//! empty stand-in is written instead, so `cargo check` and clippy work on a
//! machine without the eBPF toolchain; loading the stand-in fails with an
//! error that says how to build the real object (`cargo xtask setup`).
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

const EBPF_PACKAGE: &str = "sluice-ebpf";
/// Every program the eBPF crate builds; each lands in `OUT_DIR` under its
/// name.
const EBPF_BINS: [&str; 3] = ["sluice-xdp", "sluice-empty", "sluice-bench-xdp"];

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=SLUICE_EBPF_TOOLCHAIN");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip || which::which("bpf-linker").is_err() {
        println!(
            "cargo::warning=building the XDP programs as empty stand-ins ({}); run `cargo xtask setup` for the real ones",
            if skip {
                "AYA_BUILD_SKIP set"
            } else {
                "bpf-linker not found"
            }
        );
        for bin in EBPF_BINS {
            fs::write(out_dir.join(bin), [])?;
        }
        return Ok(());
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let pkg = packages
        .into_iter()
        .find(|p| p.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("{EBPF_PACKAGE} package not found"))?;
    let root = pkg
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", pkg.manifest_path))?;
    // xtask picks nightly, or stable with RUSTC_BOOTSTRAP=1 when no nightly
    // is installed.
    let toolchain = env::var("SLUICE_EBPF_TOOLCHAIN").unwrap_or_default();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir: root.as_str(),
            ..Default::default()
        }],
        match toolchain.as_str() {
            "" | "nightly" => aya_build::Toolchain::Nightly,
            custom => aya_build::Toolchain::Custom(custom),
        },
    )
}
