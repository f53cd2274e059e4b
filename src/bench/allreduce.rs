//! `bench allreduce`: the TCP ring against raw loopback TCP.

use std::time::Instant;

use anyhow::{Result, bail};

/// Timing rounds per size (at least); each round times the ring and then raw TCP, and the
/// best round of each is reported, so a burst of noise on this shared machine hits both
/// alike. Small buffers get more rounds ([`allreduce_rounds`]): a 1 MB round lasts a few
/// milliseconds, and one scheduler hiccup on two shared cores is then a large part of it.
pub(super) const ALLREDUCE_ROUNDS: usize = 10;

/// Rounds for a buffer of `mb` MB: about the same measuring time for every size up to 16 MB.
pub(super) fn allreduce_rounds(mb: usize) -> usize {
    (ALLREDUCE_ROUNDS * 16 / mb).max(ALLREDUCE_ROUNDS)
}

pub(super) fn bench_allreduce(ranks: usize, max_mb: usize) -> Result<()> {
    use bertrain_worker::collective::{RingListener, RingOptions, TcpRing};
    if ranks < 2 {
        bail!("--ranks must be at least 2");
    }
    // Two rings: as on one machine (loopback, no checksums) and with every frame
    // checksummed, as between machines.
    let ring = |always_checksum: bool| -> Result<Vec<TcpRing>> {
        let listeners: Vec<RingListener> = (0..ranks)
            .map(|_| RingListener::bind("127.0.0.1:0"))
            .collect::<Result<_>>()?;
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| Ok(l.local_addr()?.to_string()))
            .collect::<Result<_>>()?;
        let options = RingOptions {
            always_checksum,
            ..RingOptions::default()
        };
        std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let (peers, options) = (&peers, &options);
                    s.spawn(move || listener.connect(rank, peers, options))
                })
                .collect();
            join_all(handles)
        })
    };
    let mut rings = ring(false)?;
    let mut checked_rings = ring(true)?;
    let links: Vec<_> = (0..2).map(|_| stream_pair()).collect::<Result<_>>()?;

    println!(
        "ring all-reduce over loopback TCP, {ranks} ranks (threads of this process), best of \
         {ALLREDUCE_ROUNDS} rounds (more below 16 MB); raw: plain TCP moving the same bytes between buffers of \
         the same size, one stream each way at once (what a ring link carries), same socket \
         settings; \"checksummed\": the same ring with a CRC32 on every frame, as between machines"
    );
    println!(
        "{:>6} {:>10} {:>12} {:>12} {:>12} {:>8} {:>12} {:>8}",
        "MB", "time ms", "algbw GB/s", "busbw GB/s", "raw GB/s", "of raw", "checksummed", "of raw"
    );
    let mut mb = 1;
    while mb <= max_mb {
        let bytes = mb << 20;
        // Buffers are allocated and touched before timing: page faults are not the
        // collective's cost.
        let mut buffers: Vec<Vec<f32>> = (0..ranks).map(|_| vec![1.0f32; bytes / 4]).collect();
        let mut raw_buffers: Vec<(Vec<u8>, Vec<u8>)> = (0..2)
            .map(|_| (vec![7u8; bytes], vec![0u8; bytes]))
            .collect();
        let reps = (256 / mb).clamp(2, 16);
        let (mut ring_s, mut checked_s, mut raw_s) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
        for _ in 0..allreduce_rounds(mb) {
            ring_s = ring_s.min(time_all_reduce(&mut rings, &mut buffers, reps)?);
            checked_s = checked_s.min(time_all_reduce(&mut checked_rings, &mut buffers, reps)?);
            raw_s = raw_s.min(time_raw_tcp(&links, &mut raw_buffers, reps)?);
        }
        let algbw = bytes as f64 / ring_s / 1e9;
        let busbw_of = |s: f64| bytes as f64 / s / 1e9 * 2.0 * (ranks - 1) as f64 / ranks as f64;
        let (busbw, checked) = (busbw_of(ring_s), busbw_of(checked_s));
        let raw = bytes as f64 / raw_s / 1e9;
        println!(
            "{mb:>6} {:>10.2} {algbw:>12.2} {busbw:>12.2} {raw:>12.2} {:>7.0}% {checked:>12.2} {:>7.0}%",
            ring_s * 1e3,
            100.0 * busbw / raw,
            100.0 * checked / raw
        );
        mb *= 2;
    }
    Ok(())
}

/// Seconds per all-reduce over `reps` back-to-back calls, the slowest rank's (after one
/// warm-up call and a barrier).
pub(super) fn time_all_reduce(
    rings: &mut [bertrain_worker::collective::TcpRing],
    buffers: &mut [Vec<f32>],
    reps: usize,
) -> Result<f64> {
    use bertrain_worker::collective::Collective;
    let per_rank: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = rings
            .iter_mut()
            .zip(buffers.iter_mut())
            .map(|(ring, buf)| {
                s.spawn(move || -> Result<f64> {
                    ring.all_reduce_mean(buf)?;
                    ring.barrier()?;
                    let started = Instant::now();
                    for _ in 0..reps {
                        ring.all_reduce_mean(buf)?;
                    }
                    Ok(started.elapsed().as_secs_f64() / reps as f64)
                })
            })
            .collect();
        join_all(handles)
    })?;
    Ok(per_rank.into_iter().fold(0.0, f64::max))
}

/// Seconds to move each pair's send buffer into its receive buffer over plain TCP, both
/// directions at once, in 1 MB writes; the mean of `reps` moves.
pub(super) fn time_raw_tcp(
    links: &[(std::net::TcpStream, std::net::TcpStream)],
    buffers: &mut [(Vec<u8>, Vec<u8>)],
    reps: usize,
) -> Result<f64> {
    use std::io::{Read, Write};
    let started = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for ((tx, rx), (send, recv)) in links.iter().zip(buffers) {
            let (mut tx, mut rx, send) = (tx, rx, &*send);
            handles.push(s.spawn(move || -> Result<()> {
                for _ in 0..reps {
                    for chunk in send.chunks(1 << 20) {
                        tx.write_all(chunk)?;
                    }
                }
                Ok(())
            }));
            handles.push(s.spawn(move || -> Result<()> {
                for _ in 0..reps {
                    for chunk in recv.chunks_mut(1 << 20) {
                        rx.read_exact(chunk)?;
                    }
                }
                Ok(())
            }));
        }
        join_all(handles).map(drop)
    })?;
    Ok(started.elapsed().as_secs_f64() / reps as f64)
}

/// Joins scoped benchmark threads; a panic becomes an error.
pub(super) fn join_all<T>(
    handles: Vec<std::thread::ScopedJoinHandle<'_, Result<T>>>,
) -> Result<Vec<T>> {
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))?
        })
        .collect()
}

pub(super) fn stream_pair() -> Result<(std::net::TcpStream, std::net::TcpStream)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let tx = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (rx, _) = listener.accept()?;
    for s in [&tx, &rx] {
        bertrain_worker::collective::tune(s, std::time::Duration::from_secs(60))?;
    }
    Ok((tx, rx))
}
