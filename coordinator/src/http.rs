//! The coordinator's HTTP status server: `GET /` (a self-contained page with a loss
//! chart), `GET /status` (JSON) and `GET /metrics` (Prometheus text format).
//!
//! It listens on `cluster.http`, by default the coordinator's port + 1 on the same host
//! (so 127.0.0.1 unless told otherwise). A minimal HTTP/1.1 subset is enough for browsers,
//! curl and Prometheus: one request per connection, `Connection: close`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::status::StatusBoard;

/// Request line plus headers larger than this are refused.
const MAX_HEAD_BYTES: u64 = 16 << 10;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until `shutdown` is set (and the listener is woken by a connection).
pub(crate) fn spawn(
    listener: TcpListener,
    board: Arc<StatusBoard>,
    shutdown: Arc<AtomicBool>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        for stream in listener.incoming() {
            if shutdown.load(Ordering::SeqCst) {
                return;
            }
            let Ok(stream) = stream else { continue };
            let board = board.clone();
            // One short-lived thread per request: a slow client cannot hold up the others.
            thread::spawn(move || {
                if let Err(e) = serve(stream, &board) {
                    tracing::debug!("http request failed: {e}");
                }
            });
        }
    })
}

fn serve(stream: TcpStream, board: &StatusBoard) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream.take(MAX_HEAD_BYTES));
    let (status, content_type, body) = match read_request_line(&mut reader) {
        Ok((method, path)) => route(&method, &path, board),
        Err(reason) => (
            400,
            "text/plain; charset=utf-8",
            format!("bad request: {reason}\n"),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        reason_phrase(status),
        body.len()
    );
    writer.write_all(head.as_bytes())?;
    writer.write_all(body.as_bytes())?;
    writer.flush()
}

/// Reads `METHOD PATH HTTP/1.x` and skips the headers; anything else is a bad request.
fn read_request_line(reader: &mut impl BufRead) -> Result<(String, String), String> {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("unreadable request: {e}"))?;
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line".into());
    };
    if !version.starts_with("HTTP/1.") {
        return Err("only HTTP/1.x is served".into());
    }
    loop {
        let mut header = String::new();
        let n = reader
            .read_line(&mut header)
            .map_err(|e| format!("unreadable headers: {e}"))?;
        if n == 0 {
            return Err("headers too long or truncated".into());
        }
        if header == "\r\n" || header == "\n" {
            break;
        }
    }
    let path = target.split('?').next().unwrap_or("/").to_string();
    Ok((method.to_string(), path))
}

fn route(method: &str, path: &str, board: &StatusBoard) -> (u16, &'static str, String) {
    if method != "GET" && method != "HEAD" {
        return (
            405,
            "text/plain; charset=utf-8",
            "only GET is served\n".into(),
        );
    }
    match path {
        "/" | "/index.html" => (200, "text/html; charset=utf-8", PAGE.to_string()),
        "/status" => (200, "application/json", board.to_json().to_string()),
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            board.to_prometheus(),
        ),
        _ => (
            404,
            "text/plain; charset=utf-8",
            "not found; try /, /status or /metrics\n".into(),
        ),
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    }
}

/// The status page: polls `/status` every second and draws the loss on a canvas.
const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>bertrain</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
 table { border-collapse: collapse; margin-top: 1em; }
 td, th { padding: 2px 10px; border-bottom: 1px solid #ddd; text-align: left; }
 .ok { color: #180; } .late { color: #b70; } .lost { color: #c00; } .done { color: #555; }
 #loss-chart { border: 1px solid #ccc; display: block; margin-top: 1em; }
</style>
</head>
<body>
<h1 id="title">bertrain</h1>
<div id="summary">connecting&hellip;</div>
<div><progress id="progress" max="1" value="0"></progress> <span id="percent"></span></div>
<canvas id="loss-chart" width="800" height="300" data-points="0" data-inked="0"></canvas>
<table><thead><tr><th>rank</th><th>host</th><th>health</th><th>last heartbeat</th><th>last step</th></tr></thead>
<tbody id="workers"></tbody></table>
<script>
function fmt(v, d) { return v === null || v === undefined ? "-" : Number(v).toFixed(d); }
function draw(points) {
  const c = document.getElementById("loss-chart"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  if (points.length === 0) { g.fillText("no steps yet", 20, 20); return; }
  const pad = 40, xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const X = x => pad + (x - x0) / (x1 - x0) * (c.width - 2 * pad);
  const Y = y => c.height - pad - (y - y0) / (y1 - y0) * (c.height - 2 * pad);
  g.strokeStyle = "#888"; g.beginPath();
  g.moveTo(pad, pad); g.lineTo(pad, c.height - pad); g.lineTo(c.width - pad, c.height - pad); g.stroke();
  g.fillStyle = "#444";
  g.fillText(fmt(y1, 3), 2, pad); g.fillText(fmt(y0, 3), 2, c.height - pad);
  g.fillText("step " + x0, pad, c.height - pad + 15); g.fillText("step " + x1, c.width - pad - 50, c.height - pad + 15);
  g.strokeStyle = "#1565c0"; g.lineWidth = 1.5; g.beginPath();
  points.forEach((p, i) => i ? g.lineTo(X(p[0]), Y(p[1])) : g.moveTo(X(p[0]), Y(p[1])));
  g.stroke();
  // What was drawn, for tests and scripts: the points and how many pixels hold ink.
  const px = g.getImageData(0, 0, c.width, c.height).data;
  let inked = 0;
  for (let i = 3; i < px.length; i += 4) if (px[i] > 0) inked++;
  c.dataset.points = points.length; c.dataset.inked = inked;
}
async function poll() {
  try {
    const s = await (await fetch("/status", {cache: "no-store"})).json();
    document.getElementById("title").textContent = "bertrain: " + s.job;
    document.getElementById("summary").textContent =
      s.state + (s.error ? " (" + s.error + ")" : "") + " | step " + fmt(s.step, 0) + " / " + s.max_steps +
      " | loss " + fmt(s.loss, 4) + " | " + fmt(s.tokens_per_s, 0) + " tokens/s | generation " + s.generation;
    const done = s.step === null ? 0 : s.step / s.max_steps;
    document.getElementById("progress").value = done;
    document.getElementById("percent").textContent = (100 * done).toFixed(1) + "%" +
      (s.last_checkpoint === null ? "" : " | last checkpoint at step " + s.last_checkpoint) +
      (s.restarts ? " | restarts " + s.restarts : "");
    const rows = document.getElementById("workers");
    rows.replaceChildren(...s.workers.map(w => {
      const tr = document.createElement("tr");
      [w.rank === null ? "-" : w.rank, w.host, w.health, fmt(w.last_heartbeat_age_s, 1) + " s ago", fmt(w.last_step, 0)]
        .forEach((v, i) => { const td = document.createElement("td"); td.textContent = v; if (i === 2) td.className = w.health; tr.appendChild(td); });
      return tr;
    }));
    draw(s.loss_history);
  } catch (e) {
    document.getElementById("summary").textContent = "coordinator unreachable (" + e + ")";
  }
}
poll(); setInterval(poll, 1000);
</script>
</body>
</html>
"##;
