//! The network side: an accept thread and one reader thread per connection turn sockets
//! into [`Incoming`]s on the state loop's channel; the state loop ([`serve`]) hands them to
//! the machine as [`Event`]s and performs the machine's [`Action`]s on the sockets.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::protocol::{ReadError, WorkerMsg, read_frame, write_frame};

use super::machine::{Action, Machine};
use super::{MAX_CONNECTIONS, TICK, WRITE_TIMEOUT};

/// A connection, identified for the lifetime of the coordinator.
pub(super) type ConnId = u64;

/// What the network threads put on the state loop's channel.
pub(super) enum Incoming {
    /// A new connection, with the socket the state loop writes to (its reader thread has
    /// a clone of it). It comes before any event of the connection.
    Opened {
        conn: ConnId,
        stream: TcpStream,
        peer: SocketAddr,
    },
    Event(Event),
}

/// What the machine is told about the network.
#[derive(Debug)]
pub(super) enum Event {
    Connected {
        conn: ConnId,
        peer: SocketAddr,
    },
    Message {
        conn: ConnId,
        msg: WorkerMsg,
    },
    /// The connection ended: `None` for a clean close, else why it broke.
    Closed {
        conn: ConnId,
        reason: Option<String>,
    },
}

pub(super) fn accept_loop(
    listener: TcpListener,
    events: Sender<Incoming>,
    silence: Duration,
    shutdown: Arc<AtomicBool>,
) {
    let mut next_id: ConnId = 0;
    let open = Arc::new(AtomicUsize::new(0));
    let (mut turned_away, mut reported) = (0u64, Instant::now());
    for stream in listener.incoming() {
        if shutdown.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accepting a connection failed: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if open.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            drop(stream);
            turned_away += 1;
            if reported.elapsed() > Duration::from_secs(10) {
                tracing::warn!(
                    "{turned_away} connection(s) closed at once: {MAX_CONNECTIONS} are open already"
                );
                (turned_away, reported) = (0, Instant::now());
            }
            continue;
        }
        next_id += 1;
        let conn = next_id;
        let peer = match stream.peer_addr() {
            Ok(p) => p,
            Err(_) => continue,
        };
        // The read timeout is the heartbeat check: a worker silent this long is dead.
        let setup = stream
            .set_nodelay(true)
            .and_then(|()| stream.set_read_timeout(Some(silence)))
            .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
            .and_then(|()| stream.try_clone());
        let reader = match setup {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%peer, "setting up a connection failed: {e}");
                continue;
            }
        };
        if events
            .send(Incoming::Opened { conn, stream, peer })
            .is_err()
        {
            return;
        }
        let events = events.clone();
        open.fetch_add(1, Ordering::SeqCst);
        let open = open.clone();
        thread::spawn(move || {
            read_loop(conn, reader, events, silence);
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn read_loop(conn: ConnId, stream: TcpStream, events: Sender<Incoming>, silence: Duration) {
    let mut reader = BufReader::new(stream);
    loop {
        let event = match read_frame::<WorkerMsg>(&mut reader) {
            Ok(Some(msg)) => Event::Message { conn, msg },
            Ok(None) => Event::Closed { conn, reason: None },
            // The read timeout is the heartbeat check (see `accept_loop`).
            Err(ReadError::TimedOut) => Event::Closed {
                conn,
                reason: Some(format!(
                    "silent for {:.1} s (no heartbeat within cluster.heartbeat_timeout_s)",
                    silence.as_secs_f64()
                )),
            },
            Err(e) => Event::Closed {
                conn,
                reason: Some(e.to_string()),
            },
        };
        let last = matches!(event, Event::Closed { .. });
        if events.send(Incoming::Event(event)).is_err() || last {
            return;
        }
    }
}

/// The state loop: feeds the machine what the network threads report (or nothing, every
/// [`TICK`], so that it checks its timeouts), and performs what it decides, until the job
/// ends. Every connection is closed on the way out.
pub(super) fn serve(machine: &mut Machine, inbox: &Receiver<Incoming>) -> Result<()> {
    let mut sockets = Sockets::default();
    let outcome = loop {
        let event = match inbox.recv_timeout(TICK) {
            Ok(Incoming::Opened { conn, stream, peer }) => {
                sockets.open.insert(conn, (stream, peer));
                Some(Event::Connected { conn, peer })
            }
            Ok(Incoming::Event(event)) => Some(event),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                let outcome = machine.end(Err(anyhow::anyhow!("the listener stopped")));
                sockets.perform(machine.take_outbox());
                break outcome;
            }
        };
        // Its reader thread has ended: nothing more is written to it.
        let closed = match &event {
            Some(Event::Closed { conn, .. }) => Some(*conn),
            _ => None,
        };
        let end = machine.advance(event, Instant::now());
        sockets.perform(machine.take_outbox());
        if let Some(conn) = closed {
            sockets.open.remove(&conn);
        }
        if let Some(outcome) = end {
            break outcome;
        }
    };
    for (stream, _) in sockets.open.values() {
        let _ = stream.shutdown(Shutdown::Both);
    }
    outcome
}

/// The sockets of the open connections, which only the state loop writes to.
#[derive(Default)]
struct Sockets {
    open: HashMap<ConnId, (TcpStream, SocketAddr)>,
}

impl Sockets {
    fn perform(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send(conn, msg) => {
                    let Some((stream, peer)) = self.open.get_mut(&conn) else {
                        continue;
                    };
                    if let Err(e) = write_frame(stream, &msg) {
                        // Its reader thread reports the close, handled like any other loss.
                        tracing::warn!(%peer, "sending to a worker failed: {e:#}");
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                }
                Action::Close(conn) => {
                    if let Some((stream, _)) = self.open.get(&conn) {
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                }
            }
        }
    }
}
