//! The coordinator <-> worker wire protocol: length-prefixed JSON frames over TCP.
//!
//! A frame is a big-endian `u32` byte length followed by that many bytes of JSON. JSON
//! keeps the protocol debuggable with `nc`; the traffic is a few small messages per step,
//! so its cost does not matter (gradients never travel here, they go over the collective).
//!
//! Conversation:
//! 1. worker -> `Hello{token, protocol_version}`; coordinator -> `JobOffer{job}` or `Refused`.
//! 2. The worker loads what the job names (model config, manifest) and computes its
//!    fingerprints, then -> `Join{host, collective_addr, model_hash, dataset_hash}`.
//! 3. When `world_size` workers have joined: coordinator -> `Welcome{rank, peers, ...}` to each.
//! 4. Rank 0 -> `Bootstrap{blob}` (e.g. an NCCL unique id); coordinator -> `Bootstrap` to all.
//! 5. Workers -> `Heartbeat` every `heartbeat_interval_s`, `StepReport` each step,
//!    `EvalReport` after each evaluation, and finally `Done` (or `Failed`).
//! 6. Rank 0 -> `Checkpointed` (or `CheckpointFailed`) after each checkpoint write.
//! 7. Coordinator -> `Stop{reason, rejoin}` when a generation must end (a rank was lost:
//!    the others rejoin), `CheckpointAndStop` when the job is interrupted, or `Regroup`
//!    when an elastic job can take back workers; after a regroup, each rank ->
//!    `Regrouped` and joins again.
//!
//! `generation`, `start_step` and `start` in `Welcome` are how a restarted generation
//! (after a lost worker or a resume) tells workers where to continue; `held_step` in
//! `Join` is how a survivor offers the state it kept.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::job::JobConfig;

/// Bumped on any incompatible change; a worker of another version is refused.
pub const PROTOCOL_VERSION: u32 = 2;
/// No frame is larger than this.
pub const MAX_FRAME_BYTES: u32 = 16 << 20;

/// A message type's largest frame: a reader refuses a longer one from its header, and
/// allocates only as the body arrives, so a peer costs memory only for bytes it sent.
pub trait Frame {
    const MAX_BYTES: u32;
}

/// What the coordinator accepts from anyone who connects: worker messages are reports of
/// a few hundred bytes (a failure's reason is cut to [`MAX_REASON_BYTES`]).
impl Frame for WorkerMsg {
    const MAX_BYTES: u32 = 64 << 10;
}

impl Frame for CoordinatorMsg {
    const MAX_BYTES: u32 = MAX_FRAME_BYTES;
}

/// Longest reason a worker sends in `Failed` and `CheckpointFailed`.
pub const MAX_REASON_BYTES: usize = 8 << 10;

/// Messages a worker sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerMsg {
    Hello {
        token: String,
        protocol_version: u32,
    },
    Join(JoinRequest),
    Heartbeat,
    StepReport(StepMetrics),
    EvalReport(EvalMetrics),
    /// Only rank 0 sends this; the coordinator relays it to every rank.
    Bootstrap {
        #[serde(with = "hex_bytes")]
        blob: Vec<u8>,
    },
    /// Rank 0 finished writing and sealing a checkpoint directory.
    Checkpointed {
        step: u64,
        dir: PathBuf,
        seconds: f64,
    },
    /// Rank 0 could not write a checkpoint (disk full, permissions); training goes on.
    CheckpointFailed {
        step: u64,
        reason: String,
    },
    Done,
    Failed {
        reason: String,
    },
    /// This rank left the generation after the step the ranks agreed on (see
    /// `CoordinatorMsg::Regroup`), keeping its state; it joins again at once.
    Regrouped {
        step: u64,
    },
}

/// Messages the coordinator sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CoordinatorMsg {
    JobOffer {
        job: Box<JobConfig>,
    },
    Welcome(Box<Welcome>),
    Refused {
        reason: String,
    },
    Bootstrap {
        #[serde(with = "hex_bytes")]
        blob: Vec<u8>,
    },
    /// Leave the current generation now. With `rejoin`, the job goes on: join again and
    /// continue from the latest committed checkpoint; without it, the job is over.
    Stop {
        reason: String,
        rejoin: bool,
    },
    /// Agree with the other ranks on a step, checkpoint there, and stop (SIGTERM/SIGINT of
    /// the job: the run can be resumed exactly).
    CheckpointAndStop {
        reason: String,
    },
    /// Agree with the other ranks on a step, leave the generation there keeping the state,
    /// and join again: workers are waiting to join (an elastic job grows back).
    Regroup {
        reason: String,
    },
}

/// What a worker says about itself when it joins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The worker's host name, for logs and the status page.
    pub host: String,
    /// `host:port` where this worker accepts its ring predecessor's connection.
    pub collective_addr: String,
    /// Fingerprint of the model the worker built from the job (config + initial weights).
    pub model_hash: String,
    /// `Manifest::content_hash()` of the training data as the worker sees it.
    pub dataset_hash: String,
    /// Steps completed by the training state (parameters and optimizer state) this worker
    /// kept from an earlier generation of the same job, if it kept one: a survivor of a
    /// lost rank.
    pub held_step: Option<u64>,
}

/// The coordinator's answer once the whole world has joined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Welcome {
    pub rank: usize,
    pub world_size: usize,
    /// Increases each time the job (re)starts its set of workers.
    pub generation: u64,
    /// Collective addresses, indexed by rank.
    pub peers: Vec<String>,
    pub job: JobConfig,
    /// Optimizer steps already completed (0 for a fresh job): the next step's 0-based
    /// index, which is also the data position (see the worker's `plan`).
    pub start_step: u64,
    /// Where the state after `start_step` steps comes from.
    pub start: StartFrom,
}

/// Where a generation's starting state comes from. Every rank ends up with the same
/// parameters and optimizer state: the source broadcasts them over the collective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StartFrom {
    /// The job's initial model: rank 0's, at step 0.
    Init,
    /// A committed checkpoint directory, which rank 0 loads.
    Checkpoint(PathBuf),
    /// The state rank `rank` kept from the previous generation (a survivor of a lost
    /// rank): no step is redone and no file is read.
    Peer { rank: usize },
}

/// One rank's figures for one optimizer step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepMetrics {
    /// Optimizer steps completed, this one included (the first step reports 1). A run
    /// resumed with `start_step = k` therefore reports k+1 first.
    pub step: u64,
    pub loss: f64,
    pub mlm_loss: f64,
    pub nsp_loss: f64,
    pub mlm_accuracy: f64,
    pub nsp_accuracy: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    pub step_time_s: f64,
    /// Time the step waited for the data loader.
    pub data_wait_s: f64,
    /// Time spent in the gradient all-reduce.
    pub comm_s: f64,
    /// Fraction of token positions in the step's batches that are padding.
    pub padding_fraction: f64,
    /// Ranks of the generation that ran the step, whose shares make up its figures: a
    /// report a survivor re-sends into a smaller generation is only part of its step.
    #[serde(default)]
    pub world: usize,
}

/// One rank's figures for one evaluation on the validation split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalMetrics {
    /// Optimizer steps completed when the evaluation ran.
    pub step: u64,
    pub loss: f64,
    pub mlm_loss: f64,
    pub nsp_loss: f64,
    pub mlm_accuracy: f64,
    pub nsp_accuracy: f64,
    pub perplexity: f64,
    /// Validation samples this rank evaluated.
    pub samples: u64,
}

/// Why [`read_frame`] returned no message (a clean end of stream between frames is
/// `Ok(None)`, not an error): what readers branch on to tell a silent peer from a broken
/// connection or a peer that does not speak the protocol.
#[derive(Debug)]
pub enum ReadError {
    /// Nothing arrived within the socket's read timeout.
    TimedOut,
    /// The stream ended inside a frame.
    Truncated(&'static str),
    /// A frame over the size limit, or one that is not a valid message.
    Malformed(String),
    /// The connection broke (reset, shut down, ...).
    Io(io::Error),
}

impl ReadError {
    /// Sorts a failed read: a read that ran out of its timeout (Linux reports those as
    /// `WouldBlock`) is [`ReadError::TimedOut`], an end of stream is `truncated`.
    fn from_io(e: io::Error, truncated: &'static str) -> ReadError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ReadError::TimedOut,
            io::ErrorKind::UnexpectedEof => ReadError::Truncated(truncated),
            _ => ReadError::Io(e),
        }
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::TimedOut => f.write_str("no frame arrived within the read timeout"),
            ReadError::Truncated(what) => write!(f, "the stream ended inside {what}"),
            ReadError::Malformed(why) => f.write_str(why),
            ReadError::Io(e) => write!(f, "reading a frame failed: {e}"),
        }
    }
}

impl std::error::Error for ReadError {}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<()> {
    let body = serde_json::to_vec(msg).context("encoding a protocol message")?;
    if body.len() > MAX_FRAME_BYTES as usize {
        bail!(
            "protocol message of {} bytes exceeds the {} byte limit",
            body.len(),
            MAX_FRAME_BYTES
        );
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames. Oversized,
/// truncated or malformed frames are errors, never panics.
pub fn read_frame<T: DeserializeOwned + Frame>(
    r: &mut impl Read,
) -> std::result::Result<Option<T>, ReadError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(ReadError::from_io(e, "a frame header")),
    }
    r.read_exact(&mut len[1..])
        .map_err(|e| ReadError::from_io(e, "a frame header"))?;
    let len = u32::from_be_bytes(len);
    if len > T::MAX_BYTES {
        return Err(ReadError::Malformed(format!(
            "frame of {len} bytes exceeds the {} byte limit",
            T::MAX_BYTES
        )));
    }
    let mut body = Vec::new();
    r.take(u64::from(len))
        .read_to_end(&mut body)
        .map_err(|e| ReadError::from_io(e, "a frame body"))?;
    if body.len() != len as usize {
        return Err(ReadError::Truncated("a frame body"));
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| ReadError::Malformed(format!("malformed protocol message: {e}")))
}

/// Byte blobs travel as hex strings: JSON has no bytes type, and an array of numbers is
/// four times larger and unreadable in a packet dump.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() % 2 != 0 || !text.is_ascii() {
            return Err(D::Error::custom("blob is not a hex string"));
        }
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(D::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let msgs = vec![
            WorkerMsg::Hello {
                token: "t".into(),
                protocol_version: PROTOCOL_VERSION,
            },
            WorkerMsg::Bootstrap {
                blob: vec![0, 1, 255, 16],
            },
            WorkerMsg::StepReport(StepMetrics {
                step: 3,
                loss: 1.5,
                ..Default::default()
            }),
            WorkerMsg::Done,
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            write_frame(&mut wire, m).unwrap();
        }
        let mut r = wire.as_slice();
        for m in &msgs {
            assert_eq!(read_frame::<WorkerMsg>(&mut r).unwrap().as_ref(), Some(m));
        }
        assert_eq!(read_frame::<WorkerMsg>(&mut r).unwrap(), None);
    }

    #[test]
    fn bad_frames_are_errors() {
        let oversized = (MAX_FRAME_BYTES + 1).to_be_bytes();
        assert!(read_frame::<CoordinatorMsg>(&mut oversized.as_slice()).is_err());
        let oversized = (WorkerMsg::MAX_BYTES + 1).to_be_bytes();
        assert!(read_frame::<WorkerMsg>(&mut oversized.as_slice()).is_err());
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"{{{{{");
        assert!(read_frame::<WorkerMsg>(&mut garbage.as_slice()).is_err());
        let truncated = [0u8, 0, 0, 9, b'{'];
        assert!(read_frame::<WorkerMsg>(&mut truncated.as_slice()).is_err());
        let half_header = [0u8, 0];
        assert!(read_frame::<WorkerMsg>(&mut half_header.as_slice()).is_err());
        let mut unknown = Vec::new();
        write_frame(
            &mut unknown,
            &serde_json::json!({"type": "launch_missiles"}),
        )
        .unwrap();
        assert!(read_frame::<WorkerMsg>(&mut unknown.as_slice()).is_err());
        let mut bad_hex = Vec::new();
        write_frame(
            &mut bad_hex,
            &serde_json::json!({"type": "bootstrap", "blob": "zz"}),
        )
        .unwrap();
        assert!(read_frame::<WorkerMsg>(&mut bad_hex.as_slice()).is_err());
    }

    #[test]
    fn read_errors_say_what_went_wrong() {
        /// A stream whose every read fails with `kind`, as a socket does.
        struct Failing(io::ErrorKind);
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(self.0.into())
            }
        }
        fn read(mut r: &mut dyn Read) -> ReadError {
            read_frame::<WorkerMsg>(&mut r).unwrap_err()
        }
        // A socket read timeout (Linux says WouldBlock) is a silent peer, not a broken one.
        assert!(matches!(
            read(&mut Failing(io::ErrorKind::WouldBlock)),
            ReadError::TimedOut
        ));
        assert!(matches!(
            read(&mut Failing(io::ErrorKind::ConnectionReset)),
            ReadError::Io(_)
        ));
        assert!(matches!(
            read(&mut [0u8, 0].as_slice()),
            ReadError::Truncated("a frame header")
        ));
        assert!(matches!(
            read(&mut [0u8, 0, 0, 9, b'{'].as_slice()),
            ReadError::Truncated("a frame body")
        ));
        let oversized = (WorkerMsg::MAX_BYTES + 1).to_be_bytes();
        let error = read(&mut oversized.as_slice());
        assert!(matches!(error, ReadError::Malformed(_)));
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"{{{{{");
        let error = read(&mut garbage.as_slice());
        assert!(matches!(error, ReadError::Malformed(_)), "{error}");
        assert!(!error.to_string().contains('\n'), "{error}");
    }
}
