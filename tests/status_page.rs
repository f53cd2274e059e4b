//! The coordinator's live status page in a real headless browser (Debian's chromium;
//! `scripts/test`, README's test command, installs it): while a job trains, the page's script must fetch `/status` and draw the
//! loss curve. Also `/status` and `/metrics` as plain HTTP.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::*;

const CHROMIUM: &str = "/usr/bin/chromium";

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of `attr` on the element with id `id` in dumped HTML.
fn attribute(html: &str, id: &str, attr: &str) -> Option<u64> {
    let tag_start = html.find(&format!("id=\"{id}\""))?;
    let tag = &html[html[..tag_start].rfind('<')?..];
    let tag = &tag[..tag.find('>')?];
    let value = tag.split(&format!("{attr}=\"")).nth(1)?;
    value[..value.find('"')?].parse().ok()
}

#[test]
fn status_page_draws_the_loss_chart_in_a_browser() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "this test needs Debian's chromium at {CHROMIUM}: run the tests with scripts/test, which installs it, or: sudo apt-get install -y chromium"
    );
    let tmp = TempDir::new("status-page");
    let job = write_job(tmp.path(), dataset(), 0.1);
    let run = tmp.path().join("run");
    let addr = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let c = coordinator_command(
        &job,
        &addr,
        &http,
        &run,
        &["train.max_steps=1000000".to_string()],
    );
    let _coordinator = Running::start(c);
    let token = run.join("token");
    wait_until(Duration::from_secs(60), "the job token", || token.exists());
    let _workers = start_workers(2, &addr, &token);
    wait_until(Duration::from_secs(120), "20 training steps", || {
        steps_logged(&run) >= 20
    });

    let status = http_get(&http, "/status");
    assert!(
        status.starts_with("HTTP/1.1 200") && status.contains("\"state\":\"running\""),
        "{status}"
    );
    let metrics = http_get(&http, "/metrics");
    assert!(
        metrics.contains("# TYPE bertrain_step gauge")
            && metrics.contains("bertrain_loss{job=\"e2e\"}"),
        "{metrics}"
    );

    let profile = tmp.path().join("chromium-profile");
    let mut browser = std::process::Command::new(CHROMIUM);
    browser.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=5000",
        "--dump-dom",
    ]);
    browser.arg(format!("--user-data-dir={}", profile.display()));
    browser.arg(format!("http://{http}/"));
    let out = run_bounded(browser, Duration::from_secs(120));
    let html = String::from_utf8_lossy(&out.stdout).into_owned();
    let points = attribute(&html, "loss-chart", "data-points");
    let inked = attribute(&html, "loss-chart", "data-inked");
    assert!(
        points.is_some_and(|p| p >= 20),
        "the chart has the steps: {points:?}\n{html}\n{}",
        describe(&out)
    );
    assert!(
        inked.is_some_and(|p| p > 500),
        "the chart is drawn: {inked:?} inked pixels\n{html}"
    );
    assert!(
        html.contains("bertrain: e2e") && html.contains("running | step"),
        "{html}"
    );
    assert!(
        html.contains("<td>ok</td>") || html.contains("class=\"ok\""),
        "workers listed: {html}"
    );
}
