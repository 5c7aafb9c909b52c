//! BPF_PROG_TEST_RUN for the tier-1 programs: crafted frames in, verdict, bytes and
//! `skb->tstamp` out. Public so that other crates (agent, testbed) can drive the real programs
//! without interfaces. Needs root (CAP_BPF + CAP_NET_ADMIN).
//!
//! The `__sk_buff` context is built from zeroed bytes (192 bytes, the kernel rejects garbage
//! in padding), with the offsets of the fields the kernel lets us set.

use std::os::fd::{AsRawFd, BorrowedFd};

/// `TC_ACT_OK`.
pub const TC_ACT_OK: i32 = 0;
/// `TC_ACT_SHOT`.
pub const TC_ACT_SHOT: i32 = 2;
/// `TC_ACT_REDIRECT`.
pub const TC_ACT_REDIRECT: i32 = 7;

const CTX_LEN: usize = 192;
const OFF_MARK: usize = 8;
const OFF_IFINDEX: usize = 40;
const OFF_TSTAMP: usize = 152;
const OFF_GSO_SEGS: usize = 164;
const OFF_GSO_SIZE: usize = 176;

/// Input context of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkbCtx {
    /// `skb->ifindex` (must name an existing device; the job is attributed by it).
    pub ifindex: u32,
    /// `skb->mark`.
    pub mark: u32,
    /// `skb->tstamp` in.
    pub tstamp: u64,
    /// `skb->gso_segs`.
    pub gso_segs: u32,
    /// `skb->gso_size`.
    pub gso_size: u32,
}

/// Result of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput {
    /// Program return value (TC action).
    pub retval: i32,
    /// Frame after the program.
    pub data: Vec<u8>,
    /// `skb->tstamp` after the program.
    pub tstamp: u64,
    /// Time the kernel measured around the program run, in nanoseconds.
    pub duration_ns: u32,
}

/// Errors of a test run.
#[derive(Debug, thiserror::Error)]
pub enum TestRunError {
    /// The bpf syscall failed.
    #[error("BPF_PROG_TEST_RUN: {0}")]
    Syscall(std::io::Error),
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

/// Runs `prog` once on `frame` (an Ethernet frame) with `ctx`.
pub fn run(prog: BorrowedFd<'_>, frame: &[u8], ctx: &SkbCtx) -> Result<RunOutput, TestRunError> {
    let mut ctx_in = [0u8; CTX_LEN];
    put_u32(&mut ctx_in, OFF_MARK, ctx.mark);
    put_u32(&mut ctx_in, OFF_IFINDEX, ctx.ifindex);
    ctx_in[OFF_TSTAMP..OFF_TSTAMP + 8].copy_from_slice(&ctx.tstamp.to_ne_bytes());
    put_u32(&mut ctx_in, OFF_GSO_SEGS, ctx.gso_segs);
    put_u32(&mut ctx_in, OFF_GSO_SIZE, ctx.gso_size);
    let mut ctx_out = [0u8; CTX_LEN];
    let mut data_out = vec![0u8; frame.len() + 256];

    // SAFETY: an all-zero bpf_test_run_opts is its documented default.
    let mut opts: libbpf_rs::libbpf_sys::bpf_test_run_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of_val(&opts) as _;
    opts.data_in = frame.as_ptr().cast();
    opts.data_size_in = frame.len() as u32;
    opts.data_out = data_out.as_mut_ptr().cast();
    opts.data_size_out = data_out.len() as u32;
    opts.ctx_in = ctx_in.as_ptr().cast();
    opts.ctx_size_in = CTX_LEN as u32;
    opts.ctx_out = ctx_out.as_mut_ptr().cast();
    opts.ctx_size_out = CTX_LEN as u32;
    opts.repeat = 1;
    // SAFETY: prog is a valid program fd for the duration of the call; every buffer pointer
    // refers to a live buffer of the stated size that outlives the call.
    let rc = unsafe { libbpf_rs::libbpf_sys::bpf_prog_test_run_opts(prog.as_raw_fd(), &mut opts) };
    if rc != 0 {
        return Err(TestRunError::Syscall(std::io::Error::from_raw_os_error(
            -rc,
        )));
    }
    data_out.truncate(opts.data_size_out as usize);
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&ctx_out[OFF_TSTAMP..OFF_TSTAMP + 8]);
    Ok(RunOutput {
        retval: opts.retval as i32,
        data: data_out,
        tstamp: u64::from_ne_bytes(ts),
        duration_ns: opts.duration,
    })
}
