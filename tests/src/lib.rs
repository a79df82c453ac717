//! What the kernel and end-to-end tests share: a frame builder and a harness
//! that loads the real XDP program and runs frames through it with
//! `BPF_PROG_TEST_RUN`.

pub mod harness;
pub mod netns;
pub mod packet;
pub mod testbed;
pub mod traffic;
