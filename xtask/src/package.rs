//! `cargo xtask package`: the Debian package, built with cargo-deb from
//! `[package.metadata.deb]` in userspace/Cargo.toml.
//!
//! The man pages and shell completions come from the built binary itself
//! (`sluice man`, `sluice completions`), so they always match its CLI;
//! they are written next to it, under `target/<profile>/package/`, where
//! the metadata's assets point.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::setup;

/// Completion scripts: the shell, and the file name its directory expects.
const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "sluice.bash"),
    ("zsh", "_sluice"),
    ("fish", "sluice.fish"),
];

/// Builds the package; returns the .deb's path. `debug`: from a debug
/// build, compressed fast (what the test suite installs; quicker to make,
/// same files).
pub(crate) fn package(env: &mut setup::Env, root: &Path, debug: bool) -> anyhow::Result<PathBuf> {
    setup::packaging(env)?;
    eprintln!(
        "[package] building sluice ({})",
        if debug { "debug" } else { "release" }
    );
    crate::cargo(
        env,
        &["build", "--quiet", "--package", "sluice", "--bin", "sluice"],
        !debug,
    )?;
    let profile_dir = root
        .join("target")
        .join(if debug { "debug" } else { "release" });
    let bin = profile_dir.join("sluice");
    let generated = profile_dir.join("package");
    if generated.exists() {
        std::fs::remove_dir_all(&generated)
            .with_context(|| format!("removing {}", generated.display()))?;
    }
    eprintln!("[package] man pages and completions from {}", bin.display());
    let man = generated.join("man");
    crate::run(Command::new(&bin).arg("man").arg(&man))?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)
        .with_context(|| format!("reading {}", man.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    pages.sort();
    if !pages.iter().any(|p| p.ends_with("sluice.1")) {
        bail!("`sluice man` wrote no sluice.1 into {}", man.display());
    }
    // -n: no name or time stamp inside, so the same build packs the same.
    crate::run(Command::new("gzip").args(["-9nf"]).args(&pages))?;
    let completions = generated.join("completions");
    std::fs::create_dir_all(&completions)
        .with_context(|| format!("creating {}", completions.display()))?;
    for (shell, file) in COMPLETIONS {
        let out = Command::new(&bin)
            .args(["completions", shell])
            .output()
            .with_context(|| format!("running {} completions {shell}", bin.display()))?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!(
                "`sluice completions {shell}` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let path = completions.join(file);
        std::fs::write(&path, &out.stdout)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("[package] cargo deb");
    let mut deb = Command::new("cargo");
    deb.args(["deb", "--package", "sluice", "--no-build", "--output"])
        .arg(root.join("target/debian"));
    if debug {
        deb.args(["--profile", "dev", "--fast"]);
    }
    env.apply(&mut deb);
    let out = deb.output().context("running cargo deb")?;
    if !out.status.success() {
        bail!(
            "cargo deb failed:\n{}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    // It prints the package's path as its last line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .rev()
        .map(Path::new)
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .map(Path::to_owned)
        .with_context(|| format!("cargo deb named no .deb: {stdout}"))?;
    eprintln!("[package] {}", path.display());
    Ok(path)
}
