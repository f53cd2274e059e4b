//! The network side: an accept thread and one reader thread per connection turn sockets
//! into [`Event`]s on the state loop's channel.

use std::io::BufReader;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::thread;
use std::time::{Duration, Instant};

use crate::protocol::{ReadError, WorkerMsg, read_frame};

use super::{MAX_CONNECTIONS, WRITE_TIMEOUT};

/// A connection, identified for the lifetime of the coordinator.
pub(super) type ConnId = u64;

/// What the network tells the state loop.
pub(super) enum Event {
    Connected {
        conn: ConnId,
        stream: TcpStream,
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
    events: Sender<Event>,
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
            .send(Event::Connected { conn, stream, peer })
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

fn read_loop(conn: ConnId, stream: TcpStream, events: Sender<Event>, silence: Duration) {
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
        if events.send(event).is_err() || last {
            return;
        }
    }
}
