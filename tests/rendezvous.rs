//! The NCCL unique-id rendezvous, on the CPU: a real coordinator on loopback and three
//! workers' protocol clients, each on a thread. Rank 0 makes the id (here random bytes in
//! place of `ncclGetUniqueId`'s, which needs libnccl) and every rank must get exactly those
//! bytes back through the coordinator, with distinct ranks 0..3 of a world of 3: what each
//! rank passes to `ncclCommInitRank`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::Result;
use bertrain_coordinator::{Coordinator, Fingerprint, JoinInfo, WorkerClient, load_job};
use bertrain_dataprep::Manifest;
use bertrain_worker::collective::{UNIQUE_ID_LEN, share_unique_id};
use common::*;

const WORLD: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(60);

/// Starts a coordinator for a job of `WORLD` workers; returns its address, the token and
/// the thread running it (which ends when every worker has said Done).
fn start_coordinator(dir: &std::path::Path) -> (String, String, thread::JoinHandle<Result<()>>) {
    let job_file = write_job(dir, dataset(), 0.0);
    let overrides = [
        format!("cluster.world_size={WORLD}"),
        format!("train.global_batch_size={}", 8 * WORLD),
        "cluster.http=\"127.0.0.1:0\"".to_string(),
    ]
    .map(|o| o.parse().unwrap());
    let job = load_job(&job_file, &overrides, false).unwrap();
    let token_path = job.token_path();
    let coordinator = Coordinator::bind(job, "127.0.0.1:0").unwrap();
    let addr = coordinator.local_addr().unwrap().to_string();
    let token = std::fs::read_to_string(token_path)
        .unwrap()
        .trim()
        .to_string();
    (addr, token, thread::spawn(move || coordinator.run()))
}

/// Joins the job as one worker; returns the client, its rank and the world size.
fn join(addr: &str, token: &str) -> (WorkerClient, usize, usize) {
    let info = JoinInfo {
        host: "test".into(),
        collective_addr: "127.0.0.1:9".into(),
    };
    let (client, welcome) = WorkerClient::join(addr, token, info, TIMEOUT, |job| {
        Ok(Fingerprint {
            model_hash: "same model".into(),
            dataset_hash: Manifest::load(&job.data.manifest)?.content_hash(),
            held_step: None,
        })
    })
    .unwrap();
    (client, welcome.rank, welcome.world_size)
}

/// Runs `work` as each of `WORLD` workers, then has every worker say Done and waits for
/// the coordinator to finish the job.
fn with_workers<T: Send + 'static>(
    tag: &str,
    work: impl Fn(&WorkerClient, usize) -> T + Send + Sync + Clone + 'static,
) -> Vec<(usize, usize, T)> {
    let tmp = TempDir::new(tag);
    let (addr, token, coordinator) = start_coordinator(tmp.path());
    let workers: Vec<_> = (0..WORLD)
        .map(|_| {
            let (addr, token, work) = (addr.clone(), token.clone(), work.clone());
            thread::spawn(move || {
                let (client, rank, world) = join(&addr, &token);
                let result = work(&client, rank);
                client.done().unwrap();
                (rank, world, result)
            })
        })
        .collect();
    let mut results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    coordinator.join().unwrap().unwrap();
    results.sort_by_key(|r| r.0);
    results
}

fn random_id() -> [u8; UNIQUE_ID_LEN] {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    std::array::from_fn(|i| (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (i % 57)) as u8 ^ i as u8)
}

#[test]
fn every_rank_gets_rank_0s_unique_id() {
    static CREATED: AtomicUsize = AtomicUsize::new(0);
    static ID: std::sync::OnceLock<[u8; UNIQUE_ID_LEN]> = std::sync::OnceLock::new();
    let results = with_workers("rendezvous", |client, rank| {
        share_unique_id(
            client,
            rank,
            || {
                CREATED.fetch_add(1, Ordering::SeqCst);
                Ok(*ID.get_or_init(random_id))
            },
            TIMEOUT,
        )
        .unwrap()
    });
    assert_eq!(
        CREATED.load(Ordering::SeqCst),
        1,
        "only rank 0 creates the id"
    );
    let created = ID.get().unwrap();
    for (i, (rank, world, id)) in results.iter().enumerate() {
        assert_eq!((*rank, *world), (i, WORLD), "ranks are 0..{WORLD}");
        assert_eq!(id, created, "rank {rank} got another id");
    }
}

#[test]
fn a_missing_or_malformed_id_is_a_clear_error_within_the_timeout() {
    let results = with_workers("rendezvous-bad", |client, rank| {
        if rank == 0 {
            // Not an NCCL id: 16 bytes. Sent directly, as a different sender might.
            client
                .exchange_bootstrap(Some(vec![7; 16]), TIMEOUT)
                .map(drop)
                .map_err(|e| e.to_string())
        } else {
            share_unique_id(
                client,
                rank,
                || unreachable!("only rank 0 creates"),
                TIMEOUT,
            )
            .map(drop)
            .map_err(|e| e.to_string())
        }
    });
    for (rank, _, result) in &results[1..] {
        let error = result.as_ref().unwrap_err();
        assert!(
            error.contains("16 bytes") && error.contains(&UNIQUE_ID_LEN.to_string()),
            "rank {rank}: {error}"
        );
    }

    // Nobody publishes: every rank gives up after its timeout, saying why.
    let started = std::time::Instant::now();
    let results = with_workers("rendezvous-none", |client, _rank| {
        client
            .exchange_bootstrap(None, Duration::from_secs(2))
            .map(drop)
            .map_err(|e| e.to_string())
    });
    assert!(started.elapsed() < TIMEOUT);
    for (rank, _, result) in &results {
        let error = result.as_ref().unwrap_err();
        assert!(
            error.contains("no collective bootstrap data from rank 0 within 2 s"),
            "rank {rank}: {error}"
        );
    }
}
