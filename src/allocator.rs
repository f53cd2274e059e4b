//! glibc allocator tuning, the one place the process sets it: chosen once per command in
//! `main`, before any thread starts. Training reuses the same large buffers every step and
//! must not give them back; dataprep streams windows through and must keep its peak flat.

/// What the process is about to do.
pub enum Workload {
    /// A training process (worker, benchmarks, the demo's driver).
    Training,
    /// Reading a corpus through in windows (dataprep, vocab, inspect, synth-corpus).
    Streaming,
}

/// Sets glibc's allocator for `workload`. Must be called before any thread starts
/// (argument parsing starts none).
pub fn tune_for(workload: Workload) {
    match workload {
        Workload::Training => keep_freed_memory(),
        Workload::Streaming => {
            share_two_arenas();
            reuse_row_group_buffers();
        }
    }
}

/// glibc hands freed blocks above its mmap threshold straight back to the kernel, so every
/// training step would page-fault its activations in again (jemalloc measured slower
/// still). The threshold cannot go above 32 MB, and a mini model's MLM logits or flat
/// gradients are larger than that, so mmap is turned off altogether (`M_MMAP_MAX` 0: large
/// blocks come from the heap and are reused), and the heap is never trimmed. README's
/// benchmarks section has the figures.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; called before any thread
    // starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// glibc gives each thread an arena of its own (up to 8 per core), and each arena keeps its
/// own high-water mark, so dataprep's peak grows with its thread count. Two arenas bound
/// that whatever `--threads` is; one arena would be tighter still, but is slower with two
/// threads (they then wait on its lock).
fn share_two_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: as above.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Every Parquet row group allocates and frees a few MB of buffers; with glibc's defaults
/// those above its mmap threshold, and the top of the heap beyond its trim threshold, go
/// back to the kernel and come back as fresh pages, and the page faults cost a fifth of
/// dataprep's CPU. Keeping them costs memory: each arena keeps its high-water mark, so the
/// resident size settles a few windows into the run (README's dataprep section has the
/// figures).
fn reuse_row_group_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: as above.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}
