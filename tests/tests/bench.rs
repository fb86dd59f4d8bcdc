//! The benchmark harness runs end to end (a smoke run: small numbers, and
//! only that every figure is measured and printed, never how fast).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outpost_tests::bin;

#[test]
fn the_benchmark_harness_measures_and_prints_every_figure() {
    let mut child = Command::new(bin("outpost-bench"))
        .arg("--smoke")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outpost-bench");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let mut stderr = child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("outpost-bench --smoke did not finish within 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = reader.join().expect("stdout reader");
    let err = err_reader.join().expect("stderr reader");
    assert!(
        status.success(),
        "outpost-bench failed: {status}\n{out}\n{err}"
    );
    for figure in [
        "machine:",
        "pickup p50 ms @50",
        "pickup p99 ms @50",
        "control plane RSS MB @50",
        "control plane threads @50",
        "control plane idle CPU cores @50",
        "restart: all back ms @50",
        "restart: pickup p99 ms @50",
        "follow / docker run",
        "agent peak RSS MB",
        "trivial job / engine API",
        "trivial job / docker run --rm",
    ] {
        assert!(out.contains(figure), "no {figure:?} in:\n{out}");
    }
    // Every job of the smoke run was leased.
    let lost = out
        .lines()
        .find(|l| l.starts_with("pickup never leased @50"))
        .and_then(|l| l.split_whitespace().nth(5)?.parse::<f64>().ok());
    assert_eq!(lost, Some(0.0), "{out}");
    // The stores section: SQLite always; PostgreSQL's set-ups, each against
    // SQLite as its baseline, where PostgreSQL is required (scripts/test.sh).
    let mut setups = vec!["sqlite"];
    if std::env::var(outpost_tests::pg::REQUIRE_ENV).is_ok_and(|v| v == "1") {
        setups.extend(["pg 1 replica", "pg 2 replicas"]);
    }
    for setup in setups {
        for figure in ["pickup p50 ms @50", "pickup p99 ms @50", "submit jobs/s"] {
            let key = format!("stores {setup}: {figure}");
            let row = out.lines().find(|l| l.starts_with(&key));
            assert!(row.is_some(), "no {key:?} in:\n{out}");
            let now = row
                .and_then(|l| {
                    l[key.len()..]
                        .split_whitespace()
                        .nth(1)?
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or(0.0);
            assert!(now > 0.0, "{key}: no measurement in:\n{out}");
        }
        let key = format!("stores {setup}: never leased @50");
        let lost = out.lines().find(|l| l.starts_with(&key)).and_then(|l| {
            l[key.len()..]
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        });
        assert_eq!(lost, Some(0.0), "{key} in:\n{out}");
    }
}
