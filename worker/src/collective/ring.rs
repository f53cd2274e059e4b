//! Ring all-reduce over TCP.
//!
//! Rank `r` sends to rank `r+1` and receives from rank `r-1` (mod W) on two connections.
//! All-reduce is the bandwidth-optimal ring: the buffer is cut into W chunks; W-1
//! reduce-scatter steps leave each rank with one fully summed chunk, which it scales to
//! the mean; W-1 all-gather steps copy the finished chunks around. Each rank sends and
//! receives 2(W-1)/W of the buffer, independent of W.
//!
//! Chunks travel in 1 MB segments, and the steps are pipelined: a sender thread sends
//! each segment as soon as the receiving thread has finished it in the step before, so
//! each direction is one continuous stream rather than 2(W-1) rounds with a pause between
//! them (a 1 MB all-reduce went from 74-83% to 84-114% of raw TCP in `bench allreduce`).
//! Sending and receiving on separate threads also means neither side can fill its socket
//! buffers and wait forever for the other, however large the buffer.
//!
//! Determinism: chunk boundaries and the order in which partial sums travel depend only
//! on the world size, so results are reproducible at a fixed world size, and because the
//! all-gather copies one rank's bytes everywhere, all ranks end bitwise identical.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use socket2::SockRef;

use bertrain_coordinator::faults;

use super::wire::{Framing, LinkError, SEGMENT_BYTES};
use super::{AbortHandle, Collective};

/// Identifies a ring connection's opening message.
const MAGIC: u32 = u32::from_le_bytes(*b"BRNG");
const SOCKET_BUFFER_BYTES: usize = 4 << 20;
const SEGMENT_FLOATS: usize = SEGMENT_BYTES / 4;

/// Timeouts and identity of a ring.
#[derive(Debug, Clone)]
pub struct RingOptions {
    /// How long to keep trying to connect the ring (peers may start later).
    pub connect_timeout: Duration,
    /// A peer silent for this long in the middle of an operation is declared dead. The
    /// coordinator's step timeout usually catches a hung job first.
    pub io_timeout: Duration,
    /// Must be equal on all ranks (e.g. the coordinator's generation): a connection from a
    /// stale ring of an earlier generation is turned away.
    pub session: u64,
    /// Checksum the frames of loopback links too (they are not by default; see
    /// [`super::wire`]): for tests, and to measure what a link between machines costs.
    pub always_checksum: bool,
}

impl Default for RingOptions {
    fn default() -> Self {
        RingOptions {
            connect_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(600),
            session: 0,
            always_checksum: false,
        }
    }
}

/// A rank's listening socket, bound before the rank knows its peers so that its address
/// can be published through the coordinator.
pub struct RingListener {
    listener: TcpListener,
}

impl RingListener {
    /// Binds `addr` (`127.0.0.1:0` for any free loopback port; a routable address for
    /// multi-machine jobs).
    pub fn bind(addr: &str) -> Result<RingListener> {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("binding the collective listener on {addr}"))?;
        Ok(RingListener { listener })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Connects the ring: dials `peers[rank + 1]` while accepting `peers[rank - 1]`.
    /// `peers` holds every rank's listener address, indexed by rank.
    pub fn connect(self, rank: usize, peers: &[String], options: &RingOptions) -> Result<TcpRing> {
        let world = peers.len();
        if rank >= world {
            bail!("rank {rank} is outside a ring of {world}");
        }
        if world == 1 {
            return Ok(TcpRing {
                rank,
                world,
                links: None,
                broken: None,
                scratch: Vec::new(),
                io_timeout: options.io_timeout,
            });
        }
        let deadline = Instant::now() + options.connect_timeout;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let next_addr = &peers[next_rank];
        let (next, prev) = thread::scope(|s| {
            let dial = s.spawn(|| dial(next_addr, rank, world, options.session, deadline));
            let prev = accept(&self.listener, prev_rank, world, options.session, deadline);
            let next = dial
                .join()
                .map_err(|_| anyhow!("the ring connect thread panicked"))?;
            Ok::<_, anyhow::Error>((
                next.with_context(|| format!("connecting to rank {next_rank} at {next_addr}"))?,
                prev.with_context(|| format!("waiting for rank {prev_rank} to connect"))?,
            ))
        })?;
        for stream in [&next, &prev] {
            tune(stream, options.io_timeout)?;
        }
        let links = Links {
            next_ctl: next.try_clone()?,
            prev_ctl: prev.try_clone()?,
            send: Framing::new(options.always_checksum || leaves_machine(&next)?),
            recv: Framing::new(options.always_checksum || leaves_machine(&prev)?),
            next,
            prev,
            next_rank,
            prev_rank,
        };
        Ok(TcpRing {
            rank,
            world,
            links: Some(links),
            broken: None,
            scratch: Vec::new(),
            io_timeout: options.io_timeout,
        })
    }
}

/// Whether a connection may cross a wire: frames on it are checksummed unless both of its
/// ends are loopback addresses (see [`super::wire`]). Both ends see the same two addresses.
fn leaves_machine(stream: &TcpStream) -> Result<bool> {
    Ok(!(stream.local_addr()?.ip().is_loopback() && stream.peer_addr()?.ip().is_loopback()))
}

/// Socket settings shared by the ring and the benchmark's raw-TCP baseline.
pub fn tune(stream: &TcpStream, io_timeout: Duration) -> Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;
    let sock = SockRef::from(stream);
    sock.set_send_buffer_size(SOCKET_BUFFER_BYTES)?;
    sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
    Ok(())
}

fn hello(rank: usize, world: usize, session: u64) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..12].copy_from_slice(&session.to_le_bytes());
    h[12..16].copy_from_slice(&(rank as u32).to_le_bytes());
    h[16..20].copy_from_slice(&(world as u32).to_le_bytes());
    h
}

fn dial(
    addr: &str,
    rank: usize,
    world: usize,
    session: u64,
    deadline: Instant,
) -> Result<TcpStream> {
    let mut backoff = Duration::from_millis(20);
    loop {
        let attempt = addr
            .to_socket_addrs()
            .map_err(anyhow::Error::from)
            .and_then(|mut a| a.next().context("the address resolves to nothing"))
            .and_then(|a| Ok(TcpStream::connect_timeout(&a, Duration::from_secs(5))?))
            .and_then(|mut s| {
                s.write_all(&hello(rank, world, session))?;
                Ok(s)
            });
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() + backoff >= deadline => {
                return Err(e.context("gave up retrying"));
            }
            Err(_) => {
                thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// Accepts connections until the expected predecessor arrives; strangers (wrong magic,
/// session, world or rank) are dropped and waiting continues.
fn accept(
    listener: &TcpListener,
    prev_rank: usize,
    world: usize,
    session: u64,
    deadline: Instant,
) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let expected = hello(prev_rank, world, session);
    loop {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(100)),
                ))?;
                let mut got = [0u8; 20];
                match stream.read_exact(&mut got) {
                    Ok(()) if got == expected => {
                        listener.set_nonblocking(false)?;
                        return Ok(stream);
                    }
                    _ => {
                        tracing::warn!(%peer, "ignoring a connection that is not this ring's rank {prev_rank}")
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!("no connection within the connect timeout");
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The two connections of a rank, with clones used only to shut a link down from the
/// other thread when one direction fails (so the other cannot block forever).
struct Links {
    next: TcpStream,
    prev: TcpStream,
    next_ctl: TcpStream,
    prev_ctl: TcpStream,
    /// Framing of what goes to `next` and of what comes from `prev`.
    send: Framing,
    recv: Framing,
    next_rank: usize,
    prev_rank: usize,
}

impl Links {
    fn shutdown(&self) {
        let _ = self.next_ctl.shutdown(Shutdown::Both);
        let _ = self.prev_ctl.shutdown(Shutdown::Both);
    }
}

/// What the receiving side does with the bytes of each step.
#[derive(Clone, Copy)]
enum Apply {
    Add,
    /// Adds, then divides by the world size: the last reduce-scatter step, fused so that
    /// the mean costs no extra pass over memory.
    AddThenDivide(f32),
    Copy,
}

/// Which of a rank's two links an operation failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Sending to the next rank.
    Sending,
    /// Receiving from the previous rank.
    Receiving,
}

/// How a ring operation failed. The ring decides on it (a silent peer is reported with
/// the timeout that declared it so, and the side that failed first is the one reported)
/// by matching, not by reading messages; at the `Collective` boundary it becomes the
/// source of an `anyhow::Error`.
#[derive(Debug)]
pub(crate) enum RingError {
    /// The link to or from rank `peer` failed: the peer is gone or out of step, or this
    /// rank's links were aborted (the coordinator ended the generation).
    Link {
        peer: usize,
        direction: Direction,
        cause: LinkError,
    },
    /// Rank `peer` sent or took nothing for `timeout` (`RingOptions::io_timeout`).
    PeerSilent {
        peer: usize,
        direction: Direction,
        timeout: Duration,
    },
    /// This direction stopped because the other one failed; the other's error is the one
    /// reported.
    OtherDirectionFailed,
    /// The thread sending this rank's part of an all-reduce panicked.
    SenderPanicked,
    /// An earlier failure left the ring in an unknown state: every later call fails.
    Broken(String),
}

impl std::fmt::Display for RingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let towards = |direction: &Direction, peer: &usize| match direction {
            Direction::Sending => format!("sending to rank {peer}"),
            Direction::Receiving => format!("receiving from rank {peer}"),
        };
        match self {
            RingError::Link {
                peer,
                direction,
                cause,
            } => write!(f, "{}: {cause}", towards(direction, peer)),
            RingError::PeerSilent {
                peer,
                direction,
                timeout,
            } => write!(
                f,
                "{}: nothing came for {timeout:?} (cluster.step_timeout_s): a peer is hung or silent",
                towards(direction, peer)
            ),
            RingError::OtherDirectionFailed => {
                f.write_str("stopped: the other direction of the ring failed")
            }
            RingError::SenderPanicked => f.write_str("the ring send thread panicked"),
            RingError::Broken(why) => {
                write!(
                    f,
                    "the collective ring is broken by an earlier error: {why}"
                )
            }
        }
    }
}

impl std::error::Error for RingError {}

/// The CPU collective: a ring of TCP connections between the ranks of a job.
pub struct TcpRing {
    rank: usize,
    world: usize,
    links: Option<Links>,
    /// Set after the first failure: the ring's state is unknown, every later call fails.
    broken: Option<String>,
    scratch: Vec<f32>,
    /// How long a read waits for a peer (`RingOptions::io_timeout`), for error messages.
    io_timeout: Duration,
}

impl TcpRing {
    fn ensure_usable(&self) -> Result<()> {
        match &self.broken {
            Some(why) => Err(RingError::Broken(why.clone()).into()),
            None => Ok(()),
        }
    }

    /// Runs `op`; on failure shuts both links (so neighbours fail fast instead of
    /// waiting for a timeout) and marks the ring broken.
    fn guarded(
        &mut self,
        what: &str,
        op: impl FnOnce(&mut Self) -> Result<(), RingError>,
    ) -> Result<()> {
        self.ensure_usable()?;
        let timeout = self.io_timeout;
        let result = op(self)
            .map_err(|e| match e {
                RingError::Link {
                    peer,
                    direction,
                    cause: LinkError::TimedOut { .. },
                } => RingError::PeerSilent {
                    peer,
                    direction,
                    timeout,
                },
                other => other,
            })
            .map_err(anyhow::Error::new)
            .with_context(|| format!("{what} on rank {} of {}", self.rank, self.world));
        if let Err(e) = &result {
            self.broken = Some(format!("{e:#}"));
            if let Some(links) = &self.links {
                links.shutdown();
            }
        }
        result
    }
}

/// One step of the ring schedule: this rank sends chunk `send` to the next rank while it
/// receives chunk `recv` from the previous one and applies it.
struct Step {
    send: Range<usize>,
    recv: Range<usize>,
    apply: Apply,
}

/// The all-reduce of `n` elements as rank `r` of `w` runs it. Reduce-scatter: after step
/// k, chunk (r - k - 1) holds k + 2 ranks' values; the last step completes chunk r + 1,
/// which this rank then owns, and turns its sum into the mean. All-gather: finished
/// chunks travel around the ring. Every step sends the chunk the step before received.
fn all_reduce_schedule(n: usize, w: usize, r: usize) -> Vec<Step> {
    let reduce_scatter = (0..w - 1).map(|k| Step {
        send: chunk(n, w, (r + w - k) % w),
        recv: chunk(n, w, (r + 2 * w - k - 1) % w),
        apply: if k == w - 2 {
            Apply::AddThenDivide(w as f32)
        } else {
            Apply::Add
        },
    });
    let all_gather = (0..w - 1).map(|k| Step {
        send: chunk(n, w, (r + 1 + w - k) % w),
        recv: chunk(n, w, (r + w - k) % w),
        apply: Apply::Copy,
    });
    reduce_scatter.chain(all_gather).collect()
}

/// A chunk as the segments it travels in. An empty chunk is one empty segment: every step
/// is a synchronisation point, which is what makes a one-element all-reduce a barrier.
fn segments(chunk: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let len = chunk.len();
    let count = len.div_ceil(SEGMENT_FLOATS).max(1);
    (0..count).map(move |i| {
        let start = chunk.start + i * SEGMENT_FLOATS;
        start..(start + SEGMENT_FLOATS).min(chunk.end)
    })
}

/// How far a rank's two threads have got in one all-reduce. The sender waits for segments
/// the receiver has finished; the receiver, before it overwrites a chunk in the all-gather,
/// waits until the sender has finished the steps that read it.
#[derive(Default)]
struct Progress {
    state: Mutex<ProgressState>,
    changed: Condvar,
}

#[derive(Default)]
struct ProgressState {
    /// Segments received and applied, over all steps so far.
    received: usize,
    /// Steps whose chunk has been sent completely.
    steps_sent: usize,
    /// The side that failed first; the other stops waiting.
    failed: Option<Direction>,
}

impl Progress {
    fn wait(&self, done: impl Fn(&ProgressState) -> bool) -> Result<(), RingError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if done(&state) {
                return Ok(());
            }
            if state.failed.is_some() {
                return Err(RingError::OtherDirectionFailed);
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn update(&self, f: impl FnOnce(&mut ProgressState)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_all();
    }

    fn fail(&self, side: Direction) {
        self.update(|s| {
            s.failed.get_or_insert(side);
        });
    }

    fn first_failure(&self) -> Option<Direction> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).failed
    }
}

/// The buffer of one all-reduce, shared by the rank's sender thread (reading segments)
/// and its receiving thread (writing segments). The schedule and [`Progress`] keep them
/// apart: the sender reads a segment only after the receiver has finished writing it (or
/// in step 0, where it is this rank's own input), and the receiver writes a segment that
/// was sent earlier only after the sender has finished that step. The mutex inside
/// `Progress` orders each write before the read that waits for it.
struct SharedBuf {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: see the type's documentation; every access goes through `segment` or
// `segment_mut`, whose callers uphold that discipline.
unsafe impl Send for SharedBuf {}
unsafe impl Sync for SharedBuf {}

impl SharedBuf {
    fn new(buf: &mut [f32]) -> SharedBuf {
        SharedBuf {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// # Safety
    /// No thread writes `range` while the returned slice lives.
    unsafe fn segment(&self, range: Range<usize>) -> &[f32] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked above); no concurrent writer (the caller's promise).
        unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.len()) }
    }

    /// # Safety
    /// No other thread reads or writes `range` while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn segment_mut(&self, range: Range<usize>) -> &mut [f32] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked above); exclusive (the caller's promise).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

/// Receives one segment into `into`, adding or copying.
fn receive_segment(
    stream: &mut TcpStream,
    framing: &mut Framing,
    into: &mut [f32],
    apply: Apply,
    scratch: &mut Vec<f32>,
) -> Result<(), LinkError> {
    match apply {
        Apply::Copy => framing.read(stream, bytemuck::cast_slice_mut(into)),
        Apply::Add | Apply::AddThenDivide(_) => {
            scratch.resize(into.len(), 0.0);
            framing.read(stream, bytemuck::cast_slice_mut(scratch.as_mut_slice()))?;
            let pairs = into.iter_mut().zip(scratch.iter());
            match apply {
                Apply::AddThenDivide(world) => {
                    pairs.for_each(|(acc, x)| *acc = (*acc + *x) / world)
                }
                _ => pairs.for_each(|(acc, x)| *acc += *x),
            }
            Ok(())
        }
    }
}

/// Chunk `i` of `n` elements cut into `world` nearly equal parts (sizes differ by at most
/// one; some are empty when `n < world`).
fn chunk(n: usize, world: usize, i: usize) -> Range<usize> {
    let bound = |k: usize| ((n as u128 * k as u128) / world as u128) as usize;
    bound(i)..bound(i + 1)
}

/// Runs an all-reduce `schedule` over `links` as one continuous stream in each direction:
/// a sender thread sends each segment as soon as the receiving thread (this one) has
/// finished it in the step before, instead of every step waiting for the previous one to
/// end. The arithmetic, and so the result, is the same as step by step.
fn pipelined_all_reduce(
    links: &mut Links,
    scratch: &mut Vec<f32>,
    buf: &mut [f32],
    schedule: &[Step],
) -> Result<(), RingError> {
    // Segments the receiver has finished before each step begins.
    let received_before: Vec<usize> = schedule
        .iter()
        .scan(0, |total, step| {
            let before = *total;
            *total += segments(step.recv.clone()).count();
            Some(before)
        })
        .collect();
    let progress = Progress::default();
    let shared = SharedBuf::new(buf);
    let Links {
        next,
        prev,
        next_ctl,
        prev_ctl,
        send,
        recv,
        next_rank,
        prev_rank,
    } = links;
    let (sent, received) = thread::scope(|s| {
        let sender = s.spawn(|| {
            let result = (|| -> Result<(), RingError> {
                for (i, step) in schedule.iter().enumerate() {
                    for (j, segment) in segments(step.send.clone()).enumerate() {
                        if i > 0 {
                            // Step i sends the chunk step i - 1 received, segment by segment.
                            let ready = received_before[i - 1] + j + 1;
                            progress.wait(|p| p.received >= ready)?;
                        }
                        // SAFETY: the receiver has finished this segment (waited for above;
                        // in step 0 it is untouched input) and does not write it again
                        // before `steps_sent` passes this step.
                        let data = unsafe { shared.segment(segment) };
                        send.write(next, bytemuck::cast_slice(data))
                            .map_err(|cause| RingError::Link {
                                peer: *next_rank,
                                direction: Direction::Sending,
                                cause,
                            })?;
                    }
                    progress.update(|p| p.steps_sent = i + 1);
                    if i == schedule.len() / 2 && faults::due_now(faults::DIE_IN_ALL_GATHER) {
                        thread::sleep(Duration::from_secs(1));
                        std::process::abort();
                    }
                }
                Ok(())
            })();
            if result.is_err() {
                progress.fail(Direction::Sending);
                let _ = prev_ctl.shutdown(Shutdown::Both);
            }
            result
        });
        let received = (|| -> Result<(), RingError> {
            for (i, step) in schedule.iter().enumerate() {
                if matches!(step.apply, Apply::Copy) {
                    // An all-gather step overwrites a chunk this rank sent in an earlier
                    // step: that send must be over.
                    progress.wait(|p| p.steps_sent >= i)?;
                }
                for segment in segments(step.recv.clone()) {
                    // SAFETY: the sender reads this segment only after `received` passes
                    // it, and has finished any earlier step that read it (waited for above;
                    // a reduce-scatter step receives a chunk no earlier step sent).
                    let into = unsafe { shared.segment_mut(segment) };
                    receive_segment(prev, recv, into, step.apply, scratch).map_err(|cause| {
                        RingError::Link {
                            peer: *prev_rank,
                            direction: Direction::Receiving,
                            cause,
                        }
                    })?;
                    progress.update(|p| p.received += 1);
                }
            }
            Ok(())
        })();
        if received.is_err() {
            progress.fail(Direction::Receiving);
            let _ = next_ctl.shutdown(Shutdown::Both);
        }
        let sent = sender.join().unwrap_or(Err(RingError::SenderPanicked));
        (sent, received)
    });
    // Report the side that failed first, not the one that stopped because of it.
    match progress.first_failure() {
        Some(Direction::Receiving) => received.and(sent),
        _ => sent.and(received),
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
        let (w, r, n) = (self.world, self.rank, buf.len());
        if w == 1 {
            return self.ensure_usable();
        }
        self.guarded("ring all-reduce", |ring| {
            let Some(links) = ring.links.as_mut() else {
                return Ok(());
            };
            pipelined_all_reduce(links, &mut ring.scratch, buf, &all_reduce_schedule(n, w, r))
        })
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let (w, r) = (self.world, self.rank);
        if root >= w {
            bail!("broadcast from rank {root} in a ring of {w}");
        }
        if w == 1 {
            return self.ensure_usable();
        }
        // Data flows root -> root+1 -> ... -> root-1, segment by segment, so ranks
        // further down the chain work on segment i while earlier ones forward i+1.
        let distance = (r + w - root) % w;
        self.guarded("ring broadcast", |ring| {
            let Some(links) = ring.links.as_mut() else {
                return Ok(());
            };
            let pieces: Vec<&mut [f32]> = if buf.is_empty() {
                vec![&mut buf[..]]
            } else {
                buf.chunks_mut(SEGMENT_FLOATS).collect()
            };
            for piece in pieces {
                if distance > 0 {
                    links
                        .recv
                        .read(&mut links.prev, bytemuck::cast_slice_mut(piece))
                        .map_err(|cause| RingError::Link {
                            peer: links.prev_rank,
                            direction: Direction::Receiving,
                            cause,
                        })?;
                }
                if distance < w - 1 {
                    links
                        .send
                        .write(&mut links.next, bytemuck::cast_slice(piece))
                        .map_err(|cause| RingError::Link {
                            peer: links.next_rank,
                            direction: Direction::Sending,
                            cause,
                        })?;
                }
            }
            Ok(())
        })
    }

    fn barrier(&mut self) -> Result<()> {
        self.all_reduce_mean(&mut [0.0])
    }

    fn abort_handle(&self) -> Option<AbortHandle> {
        let links = self.links.as_ref()?;
        let streams = [&links.next_ctl, &links.prev_ctl]
            .into_iter()
            .filter_map(|s| s.try_clone().ok())
            .collect();
        Some(AbortHandle::new(streams))
    }
}

impl Drop for TcpRing {
    fn drop(&mut self) {
        if let Some(links) = &self.links {
            links.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts `world` ranks as threads with real loopback sockets and runs `f` on each.
    fn with_ring<T: Send>(world: usize, f: impl Fn(&mut TcpRing) -> T + Sync) -> Vec<T> {
        with_checksummed_ring(world, false, f)
    }

    /// [`with_ring`], with frames checksummed as between machines when `always_checksum`.
    fn with_checksummed_ring<T: Send>(
        world: usize,
        always_checksum: bool,
        f: impl Fn(&mut TcpRing) -> T + Sync,
    ) -> Vec<T> {
        let options = RingOptions {
            connect_timeout: Duration::from_secs(20),
            io_timeout: Duration::from_secs(20),
            session: 5,
            always_checksum,
        };
        with_ring_options(world, &options, f)
    }

    /// [`with_ring`] with the ring's `options`.
    fn with_ring_options<T: Send>(
        world: usize,
        options: &RingOptions,
        f: impl Fn(&mut TcpRing) -> T + Sync,
    ) -> Vec<T> {
        let listeners: Vec<RingListener> = (0..world)
            .map(|_| RingListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let (peers, f) = (&peers, &f);
                    s.spawn(move || {
                        let mut ring = l.connect(rank, peers, options).unwrap();
                        f(&mut ring)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Rank r's input: small integers, so every partial sum is exact in f32.
    fn input(rank: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + rank * 13) % 101) as f32 - 50.0)
            .collect()
    }

    #[test]
    fn all_reduce_is_the_exact_mean_on_every_rank() {
        for (world, always_checksum) in (1..=4).flat_map(|w| [(w, false), (w, true)]) {
            for n in [
                0,
                1,
                2,
                3,
                5,
                17,
                1000,
                SEGMENT_FLOATS + 3,
                3 * SEGMENT_FLOATS + 1,
            ] {
                let results = with_checksummed_ring(world, always_checksum, |ring| {
                    let mut buf = input(ring.rank(), n);
                    ring.all_reduce_mean(&mut buf).unwrap();
                    buf
                });
                let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, n)).collect();
                let expected: Vec<f32> = (0..n)
                    .map(|i| inputs.iter().map(|v| v[i]).sum::<f32>() / world as f32)
                    .collect();
                for (rank, got) in results.iter().enumerate() {
                    assert_eq!(got.len(), n);
                    let same = got
                        .iter()
                        .zip(&expected)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "world {world}, n {n}, rank {rank}, checksums {always_checksum}"
                    );
                }
            }
        }
    }

    #[test]
    fn loopback_links_are_checksummed_only_when_asked() {
        for always_checksum in [false, true] {
            let flags = with_checksummed_ring(2, always_checksum, |ring| {
                let links = ring.links.as_ref().unwrap();
                (links.send.checksums, links.recv.checksums)
            });
            assert!(
                flags
                    .iter()
                    .all(|&f| f == (always_checksum, always_checksum))
            );
        }
    }

    #[test]
    fn repeated_calls_reuse_the_ring() {
        let results = with_ring(3, |ring| {
            let mut sums = Vec::new();
            for round in 0..20 {
                let mut buf = vec![(ring.rank() + round) as f32; 10];
                ring.all_reduce_mean(&mut buf).unwrap();
                ring.barrier().unwrap();
                sums.push(buf[9]);
            }
            sums
        });
        for sums in &results {
            let expected: Vec<f32> = (0..20)
                .map(|round| (round as f32 * 3.0 + 3.0) / 3.0)
                .collect();
            assert_eq!(sums, &expected);
        }
    }

    #[test]
    fn broadcast_copies_the_roots_buffer() {
        for world in 1..=4 {
            for root in 0..world {
                for n in [0, 1, 3, SEGMENT_FLOATS * 2 + 5] {
                    let results = with_ring(world, |ring| {
                        let mut buf = input(ring.rank(), n);
                        ring.broadcast(&mut buf, root).unwrap();
                        buf
                    });
                    for got in &results {
                        assert_eq!(got, &input(root, n), "world {world}, root {root}, n {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_dead_peer_is_an_error_not_a_hang() {
        let results = with_ring(3, |ring| {
            if ring.rank() == 2 {
                // Rank 2 leaves: its sockets close as the ring is dropped.
                let dead = std::mem::replace(
                    ring,
                    TcpRing {
                        rank: 2,
                        world: 3,
                        links: None,
                        broken: None,
                        scratch: Vec::new(),
                        io_timeout: Duration::ZERO,
                    },
                );
                drop(dead);
                return None;
            }
            let mut buf = vec![1.0; 100_000];
            let first = ring.all_reduce_mean(&mut buf).map_err(|e| format!("{e:#}"));
            let second = ring.all_reduce_mean(&mut buf).map_err(|e| format!("{e:#}"));
            Some((first, second))
        });
        for (rank, r) in results.into_iter().enumerate().take(2) {
            let (first, second) = r.unwrap();
            let err = first.expect_err("all-reduce with a dead peer must fail");
            assert!(err.contains("ring all-reduce"), "rank {rank}: {err}");
            assert!(second.unwrap_err().contains("broken"), "rank {rank}");
        }
    }

    #[test]
    fn a_silent_peer_is_told_from_a_gone_one() {
        let options = RingOptions {
            connect_timeout: Duration::from_secs(20),
            io_timeout: Duration::from_millis(300),
            session: 6,
            always_checksum: false,
        };
        // Rank 1 keeps its links open but sends nothing: rank 0 waits for the io timeout.
        let silent = with_ring_options(2, &options, |ring| {
            if ring.rank() == 1 {
                thread::sleep(Duration::from_secs(2));
                return None;
            }
            let first = ring.all_reduce_mean(&mut [1.0; 10]).unwrap_err();
            let second = ring.all_reduce_mean(&mut [1.0; 10]).unwrap_err();
            Some((first, second))
        });
        let (first, second) = silent[0].as_ref().unwrap();
        match first.downcast_ref::<RingError>() {
            Some(RingError::PeerSilent {
                peer: 1,
                direction: Direction::Receiving,
                timeout,
            }) => assert_eq!(*timeout, options.io_timeout),
            _ => panic!("expected rank 1 to be silent: {first:#}"),
        }
        assert!(matches!(
            second.downcast_ref::<RingError>(),
            Some(RingError::Broken(_))
        ));
        // Rank 1 leaves: rank 0's link fails at once, well before the timeout.
        let gone = with_ring_options(2, &options, |ring| {
            if ring.rank() == 1 {
                ring.links = None;
                return None;
            }
            Some(ring.all_reduce_mean(&mut [1.0; 10]).unwrap_err())
        });
        let error = gone[0].as_ref().unwrap();
        assert!(
            matches!(
                error.downcast_ref::<RingError>(),
                Some(RingError::Link { peer: 1, .. })
            ),
            "{error:#}"
        );
    }

    #[test]
    fn strangers_are_not_accepted_as_peers() {
        let listener = RingListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stranger = thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n....");
        });
        let options = RingOptions {
            connect_timeout: Duration::from_millis(500),
            ..Default::default()
        };
        let peers = vec![addr.to_string(), "127.0.0.1:9".to_string()];
        let err = listener
            .connect(0, &peers, &options)
            .err()
            .expect("must time out");
        assert!(format!("{err:#}").contains("rank 1"), "{err:#}");
        stranger.join().unwrap();
    }

    #[test]
    fn chunks_partition_the_buffer() {
        for n in [0, 1, 2, 7, 100] {
            for world in 1..=5 {
                let mut next = 0;
                for i in 0..world {
                    let c = chunk(n, world, i);
                    assert_eq!(c.start, next);
                    assert!(c.len() <= n / world + 1);
                    next = c.end;
                }
                assert_eq!(next, n);
            }
        }
    }
}
