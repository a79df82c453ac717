//! Rebuild the program when the `bpf-linker` binary changes: the linker is an
//! undeclared dependency of this crate (see aya-template).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
