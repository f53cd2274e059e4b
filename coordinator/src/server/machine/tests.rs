//! The state machine driven by events alone, without processes or sockets: each test
//! asserts on what it queued for the network side (the outbox) and on the state it shows
//! (the status board, the journal).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::job::{JobConfig, Override};
use crate::journal::{self, Entry};
use crate::protocol::{
    CoordinatorMsg, JoinRequest, PROTOCOL_VERSION, StartFrom, StepMetrics, Welcome, WorkerMsg,
};
use crate::status::StatusBoard;

use super::super::network::{ConnId, Event};
use super::super::world_size;
use super::{Action, JobStart, Machine};

const TOKEN: &str = "the-token";
const DATASET: &str = "dataset-hash";

/// A machine over a run directory of its own, removed when the test ends.
struct Harness {
    machine: Machine,
    board: Arc<StatusBoard>,
    job: JobConfig,
    run_dir: PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// A two-worker job of `max_steps = 2`, with the `--set` overrides `sets` on top.
fn harness(sets: &[&str]) -> Harness {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let run_dir = std::env::temp_dir().join(format!(
        "bertrain-machine-test-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::SeqCst)
    ));
    let mut overrides = vec![
        "cluster.world_size=2".to_string(),
        "train.max_steps=2".to_string(),
        format!("job.run_dir={}", run_dir.display()),
    ];
    overrides.extend(sets.iter().map(|s| s.to_string()));
    let overrides: Vec<Override> = overrides.iter().map(|o| o.parse().unwrap()).collect();
    let text = "[model]\npreset = \"tiny\"\n[data]\nmanifest = \"data/manifest.json\"\n";
    let job = JobConfig::from_toml_str(text, "job.toml", Path::new("/jobs"), &overrides).unwrap();
    std::fs::create_dir_all(&run_dir).unwrap();
    let board = Arc::new(StatusBoard::new(
        "test",
        world_size(&job),
        job.train.max_steps,
        job.cluster.heartbeat_interval_s,
    ));
    let start = JobStart {
        job: job.clone(),
        token: TOKEN.to_string(),
        dataset_hash: DATASET.to_string(),
        total_rows: 1000,
        start_step: 0,
        resume_from: None,
        interrupt: Arc::new(AtomicBool::new(false)),
    };
    let machine = Machine::new(start, run_dir.join("metrics.jsonl"), board.clone()).unwrap();
    Harness {
        machine,
        board,
        job,
        run_dir,
    }
}

fn peer(conn: ConnId) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, conn as u8], 40_000))
}

fn collective_addr(conn: ConnId) -> String {
    format!("10.0.0.{conn}:29500")
}

impl Harness {
    /// Hands the machine `event` now; returns the job's outcome if it ended.
    fn event(&mut self, event: Event) -> Option<anyhow::Result<()>> {
        self.machine.advance(Some(event), Instant::now())
    }

    fn message(&mut self, conn: ConnId, msg: WorkerMsg) -> Option<anyhow::Result<()>> {
        self.event(Event::Message { conn, msg })
    }

    fn outbox(&mut self) -> Vec<Action> {
        self.machine.take_outbox()
    }

    /// Connection `conn` says hello; asserts that it is offered the job.
    fn hello(&mut self, conn: ConnId) {
        assert!(
            self.event(Event::Connected {
                conn,
                peer: peer(conn)
            })
            .is_none()
        );
        let hello = WorkerMsg::Hello {
            token: TOKEN.to_string(),
            protocol_version: PROTOCOL_VERSION,
        };
        assert!(self.message(conn, hello).is_none());
        let offer = CoordinatorMsg::JobOffer {
            job: Box::new(self.job.clone()),
        };
        assert_eq!(self.outbox(), [Action::Send(conn, offer)]);
    }

    /// Connection `conn` joins, offering a state kept at `held_step`.
    fn join(&mut self, conn: ConnId, held_step: Option<u64>) -> Option<anyhow::Result<()>> {
        let request = JoinRequest {
            host: format!("host{conn}"),
            collective_addr: collective_addr(conn),
            model_hash: "model-hash".to_string(),
            dataset_hash: DATASET.to_string(),
            held_step,
        };
        self.message(conn, WorkerMsg::Join(request))
    }

    fn report_step(&mut self, conn: ConnId, step: u64) {
        let report = WorkerMsg::StepReport(StepMetrics {
            step,
            loss: 2.5,
            ..Default::default()
        });
        assert!(self.message(conn, report).is_none());
    }

    /// The welcome each connection of `conns` gets, in rank order.
    fn welcomes(
        &self,
        conns: &[ConnId],
        generation: u64,
        start_step: u64,
        start: StartFrom,
    ) -> Vec<Action> {
        let peers: Vec<String> = conns.iter().map(|&c| collective_addr(c)).collect();
        conns
            .iter()
            .enumerate()
            .map(|(rank, &conn)| {
                let welcome = Welcome {
                    rank,
                    world_size: conns.len(),
                    generation,
                    peers: peers.clone(),
                    job: self.job.clone(),
                    start_step,
                    start: start.clone(),
                };
                Action::Send(conn, CoordinatorMsg::Welcome(Box::new(welcome)))
            })
            .collect()
    }

    fn journal(&self) -> Vec<Entry> {
        journal::read(&self.run_dir).unwrap()
    }
}

/// `actions` as the stop reasons sent to each connection, and the connections closed.
fn stops_and_closes(actions: &[Action]) -> (Vec<(ConnId, String, bool)>, Vec<ConnId>) {
    let mut stops = Vec::new();
    let mut closes = Vec::new();
    for action in actions {
        match action {
            Action::Send(conn, CoordinatorMsg::Stop { reason, rejoin }) => {
                stops.push((*conn, reason.clone(), *rejoin))
            }
            Action::Close(conn) => closes.push(*conn),
            other => panic!("expected only stops and closes, got {other:?}"),
        }
    }
    (stops, closes)
}

#[test]
fn a_job_goes_from_rendezvous_through_a_lost_rank_and_a_rejoin_to_its_end() {
    let mut h = harness(&[]);
    // Rendezvous: nothing is sent to the first worker until the world is complete.
    h.hello(1);
    assert!(h.join(1, None).is_none());
    assert_eq!(h.outbox(), []);
    assert_eq!(
        h.board.update(|s| (s.state, s.workers.len())),
        ("waiting", 1)
    );
    h.hello(2);
    assert!(h.join(2, None).is_none());
    assert_eq!(h.outbox(), h.welcomes(&[1, 2], 1, 0, StartFrom::Init));
    assert_eq!(h.board.update(|s| (s.state, s.generation)), ("running", 1));

    // Running: step 1 is logged once both ranks reported it.
    h.report_step(1, 1);
    assert_eq!(h.board.update(|s| s.step), None);
    h.report_step(2, 1);
    assert_eq!(h.board.update(|s| (s.step, s.loss)), (Some(1), Some(2.5)));
    assert_eq!(h.outbox(), []);

    // Rank 1 goes silent: its reader thread reports the connection closed. The survivor is
    // told to stop and rejoin, and its connection is closed.
    let silent = "silent for 10.0 s (no heartbeat within cluster.heartbeat_timeout_s)";
    let closed = Event::Closed {
        conn: 2,
        reason: Some(silent.to_string()),
    };
    assert!(h.event(closed).is_none());
    let (stops, closes) = stops_and_closes(&h.outbox());
    assert_eq!(stops.len(), 1, "{stops:?}");
    let (to, reason, rejoin) = &stops[0];
    assert_eq!((*to, *rejoin), (1, true));
    assert!(
        reason.starts_with("lost rank 1 (host2, 10.0.0.2:40000)"),
        "{reason}"
    );
    assert!(reason.ends_with(silent), "{reason}");
    assert_eq!(closes, [1]);
    assert_eq!(h.board.update(|s| (s.state, s.restarts)), ("waiting", 1));
    // The close of the survivor's old connection is no news.
    assert!(
        h.event(Event::Closed {
            conn: 1,
            reason: None
        })
        .is_none()
    );
    assert_eq!(h.outbox(), []);

    // Rejoin: the survivor comes back with the state of step 1, a replacement with none;
    // the survivor's state is where generation 2 starts.
    h.hello(3);
    assert!(h.join(3, None).is_none());
    h.hello(4);
    assert!(h.join(4, Some(1)).is_none());
    assert_eq!(
        h.outbox(),
        h.welcomes(&[3, 4], 2, 1, StartFrom::Peer { rank: 1 })
    );

    // Finished: the last step, then Done from every rank.
    h.report_step(3, 2);
    h.report_step(4, 2);
    assert_eq!(h.board.update(|s| s.step), Some(2));
    assert!(h.message(3, WorkerMsg::Done).is_none());
    let outcome = h.message(4, WorkerMsg::Done).expect("the job ends");
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(h.outbox(), []);

    let journal = h.journal();
    let kinds: Vec<&str> = journal
        .iter()
        .map(|e| match e {
            Entry::CoordinatorStarted { .. } => "started",
            Entry::GenerationStarted { .. } => "generation",
            Entry::GenerationFailed { .. } => "failed",
            Entry::JobFinished { .. } => "finished",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        ["started", "generation", "failed", "generation", "finished"]
    );
    assert!(matches!(
        &journal[2],
        Entry::GenerationFailed {
            generation: 1,
            restart: 1,
            last_step: Some(1),
            ..
        }
    ));
    assert!(matches!(
        &journal[3],
        Entry::GenerationStarted { generation: 2, start_step: 1, held, .. } if *held == [None, Some(1)]
    ));
}

#[test]
fn a_generation_without_progress_is_stopped_at_the_step_timeout() {
    let mut h = harness(&["cluster.step_timeout_s=30"]);
    for conn in [1, 2] {
        h.hello(conn);
        assert!(h.join(conn, None).is_none());
    }
    h.outbox();
    // Just short of the timeout: nothing happens.
    let started = Instant::now();
    assert!(
        h.machine
            .advance(None, started + Duration::from_secs(29))
            .is_none()
    );
    assert_eq!(h.outbox(), []);
    // Past it: both ranks are told to stop and rejoin, and their connections are closed.
    assert!(
        h.machine
            .advance(None, started + Duration::from_secs(31))
            .is_none()
    );
    let (stops, closes) = stops_and_closes(&h.outbox());
    assert_eq!(
        stops.iter().map(|s| (s.0, s.2)).collect::<Vec<_>>(),
        [(1, true), (2, true)]
    );
    assert!(
        stops[0].1.starts_with("no step completed for 30 s"),
        "{}",
        stops[0].1
    );
    assert_eq!(closes.len(), 2);
    assert_eq!(h.board.update(|s| (s.state, s.restarts)), ("waiting", 1));
}

#[test]
fn a_lost_rank_ends_the_job_once_the_restarts_are_spent() {
    let mut h = harness(&["cluster.max_restarts=0"]);
    for conn in [1, 2] {
        h.hello(conn);
        assert!(h.join(conn, None).is_none());
    }
    h.outbox();
    let failed = WorkerMsg::Failed {
        reason: "out of memory".to_string(),
    };
    let outcome = h.message(2, failed).expect("the job ends");
    let error = format!("{:#}", outcome.unwrap_err());
    assert!(
        error.starts_with("rank 1 (host2) failed: out of memory"),
        "{error}"
    );
    assert!(error.contains("giving up after 0 restart(s)"), "{error}");
    // Every rank is told to stop for good; nothing is closed by the machine (the network
    // side closes every connection as the job ends).
    let (stops, closes) = stops_and_closes(&h.outbox());
    assert_eq!(
        stops.iter().map(|s| (s.0, s.2)).collect::<Vec<_>>(),
        [(1, false), (2, false)]
    );
    assert_eq!(stops[0].1, error);
    assert!(closes.is_empty(), "{closes:?}");
    assert!(matches!(h.journal().last(), Some(Entry::JobStopped { .. })));
}

#[test]
fn workers_that_do_not_fit_are_refused_and_closed() {
    let mut h = harness(&[]);
    let refused = |actions: Vec<Action>, conn: ConnId| -> String {
        match actions.as_slice() {
            [
                Action::Send(to, CoordinatorMsg::Refused { reason }),
                Action::Close(closed),
            ] if *to == conn && *closed == conn => reason.clone(),
            other => panic!("expected a refusal to {conn}, got {other:?}"),
        }
    };
    // A wrong token.
    assert!(
        h.event(Event::Connected {
            conn: 1,
            peer: peer(1)
        })
        .is_none()
    );
    let hello = WorkerMsg::Hello {
        token: "guess".to_string(),
        protocol_version: PROTOCOL_VERSION,
    };
    assert!(h.message(1, hello).is_none());
    assert!(refused(h.outbox(), 1).starts_with("wrong job token"));
    // Another protocol version.
    assert!(
        h.event(Event::Connected {
            conn: 2,
            peer: peer(2)
        })
        .is_none()
    );
    let hello = WorkerMsg::Hello {
        token: TOKEN.to_string(),
        protocol_version: PROTOCOL_VERSION + 1,
    };
    assert!(h.message(2, hello).is_none());
    assert!(refused(h.outbox(), 2).starts_with("protocol version"));
    // A report before any hello.
    assert!(
        h.event(Event::Connected {
            conn: 3,
            peer: peer(3)
        })
        .is_none()
    );
    assert!(h.message(3, WorkerMsg::Done).is_none());
    assert!(refused(h.outbox(), 3).starts_with("unexpected Done message"));
    // Other data.
    h.hello(4);
    let request = JoinRequest {
        host: "host4".to_string(),
        collective_addr: collective_addr(4),
        model_hash: "model-hash".to_string(),
        dataset_hash: "other-data".to_string(),
        held_step: None,
    };
    assert!(h.message(4, WorkerMsg::Join(request)).is_none());
    assert!(refused(h.outbox(), 4).starts_with("dataset differs"));
    // A connection that never says hello is closed once HELLO_TIMEOUT has passed.
    assert!(
        h.event(Event::Connected {
            conn: 5,
            peer: peer(5)
        })
        .is_none()
    );
    let later = Instant::now() + super::HELLO_TIMEOUT + Duration::from_secs(1);
    assert!(h.machine.advance(None, later).is_none());
    let closed: Vec<Action> = h
        .outbox()
        .into_iter()
        .filter(|a| *a == Action::Close(5))
        .collect();
    assert_eq!(closed, [Action::Close(5)]);
    assert_eq!(h.board.update(|s| s.workers.len()), 0);
}
