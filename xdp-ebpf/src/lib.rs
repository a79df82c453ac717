#![no_std]
// The library target exists so that the userspace crate can list this crate
// as a build dependency (cargo then rebuilds it on change).
