//! Harness for the AWS tests: a local STS and S3 (`moto_server` from the
//! venv that `scripts/setup.sh` creates) on a random loopback port, and
//! helpers that reach into a job container's own network namespace (the
//! tests run as root, like the agent).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};

/// The account moto answers for.
pub const ACCOUNT: &str = "123456789012";

/// A `moto_server` child process; killed on drop.
pub struct Moto {
    pub port: u16,
    child: Child,
    _log: tempfile::NamedTempFile,
}

fn moto_binary() -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf();
    let bin = repo.join(".cache/venv/bin/moto_server");
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/setup.sh",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Moto {
    /// Starts moto on `127.0.0.1:<random port>` and waits until it answers (≤ 30s).
    pub async fn start() -> Moto {
        let bin = moto_binary();
        for _ in 0..3 {
            let port = free_port();
            let log = tempfile::NamedTempFile::new().expect("moto log file");
            let child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.reopen().expect("log"))
                .stderr(log.reopen().expect("log"))
                .spawn()
                .expect("spawn moto_server");
            let mut moto = Moto {
                port,
                child,
                _log: log,
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = moto.child.try_wait() {
                    break; // port taken: try another
                }
                if http_status(moto.addr(), "GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_some() {
                    return moto;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("moto_server did not start");
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// An S3 client with static test credentials (moto accepts any).
    pub fn s3(&self) -> aws_sdk_s3::Client {
        self.s3_with(Credentials::new("test", "test", None, None, "test"))
    }

    /// An S3 client with the given credentials.
    pub fn s3_with(&self, creds: Credentials) -> aws_sdk_s3::Client {
        let cfg = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(self.url())
            .force_path_style(true)
            .credentials_provider(creds)
            .http_client(outpost_agent::aws::http_client())
            .build();
        aws_sdk_s3::Client::from_conf(cfg)
    }

    /// An STS client with the given credentials.
    pub fn sts_with(&self, creds: Credentials) -> aws_sdk_sts::Client {
        let cfg = aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new("us-east-1"))
            .endpoint_url(self.url())
            .credentials_provider(creds)
            .http_client(outpost_agent::aws::http_client())
            .build();
        aws_sdk_sts::Client::from_conf(cfg)
    }

    pub async fn create_bucket(&self, bucket: &str) {
        self.s3()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .expect("create bucket");
    }

    /// An `[aws]` configuration for an agent using this moto as STS and S3,
    /// allowing roles `arn:aws:iam::<ACCOUNT>:role/outpost-*`, with artifacts
    /// in bucket `artifacts`.
    pub fn agent_aws_config(&self) -> outpost_agent::aws::AwsConfig {
        outpost_agent::aws::AwsConfig {
            sts_endpoint: Some(self.url()),
            s3_endpoint: Some(self.url()),
            s3_force_path_style: true,
            allowed_roles: vec![format!("arn:aws:iam::{ACCOUNT}:role/outpost-*")],
            artifact_bucket: Some("artifacts".into()),
            ..Default::default()
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A role ARN the test agent allows.
pub fn role(name: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/{name}")
}

/// Status code of one raw HTTP exchange with `addr`, or `None` if it failed.
fn http_status(addr: SocketAddr, request: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The host PID of a job's container once it runs (bounded wait).
pub async fn job_pid(job_id: &str, limit: Duration) -> u32 {
    let docker = bollard::Docker::connect_with_local_defaults()
        .expect("docker")
        .negotiate_version()
        .await
        .expect("docker version");
    let deadline = Instant::now() + limit;
    loop {
        for id in crate::containers_of(job_id).await {
            if let Ok(i) = docker.inspect_container(&id, None).await
                && let Some(pid) = i.state.and_then(|s| s.pid).filter(|p| *p > 0)
            {
                return pid as u32;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the container of job {job_id} did not run within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An open handle on a process's network namespace (keeps it alive).
pub fn netns_of(pid: u32) -> std::fs::File {
    std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("open the job's network namespace")
}

/// A TCP connection made from inside the network namespace `ns`.
pub fn connect_in(ns: &std::fs::File, port: u16) -> std::io::Result<TcpStream> {
    let ns = ns.try_clone()?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(2),
        )
    })
    .join()
    .map_err(|_| std::io::Error::other("netns thread panicked"))?
}

/// `GET` of the credentials endpoint inside `ns` with `authorization`:
/// status and body, or the connection error.
pub fn get_credentials_in(
    ns: &std::fs::File,
    port: u16,
    authorization: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = connect_in(ns, port)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /v1/credentials HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {authorization}\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {out:?}")))?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    Ok((status, body))
}

/// Forwards `127.0.0.1:<port>` inside the network namespace of `pid` to
/// `target` (here, moto on the host's loopback): only that job reaches it.
/// Stops when dropped.
pub struct NetnsProxy {
    task: tokio::task::JoinHandle<()>,
}

impl NetnsProxy {
    pub fn start(pid: u32, port: u16, target: SocketAddr) -> NetnsProxy {
        let listener =
            outpost_agent::netns::bind_in_netns_of(pid, SocketAddr::from(([127, 0, 0, 1], port)))
                .expect("bind the proxy in the job's network namespace");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        NetnsProxy { task }
    }
}

impl Drop for NetnsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A gzipped tar of `(path, contents)` files.
pub fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).expect("tar entry");
    }
    b.into_inner()
        .and_then(|gz| gz.finish())
        .expect("finish tarball")
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (h, mi, se) = (n(11..13)?, n(14..16)?, n(17..19)?);
    // Days from civil (Howard Hinnant).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + se).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_rfc3339() {
        assert_eq!(super::parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            super::parse_rfc3339("2027-01-15T08:00:00Z"),
            Some(1_800_000_000)
        );
        assert_eq!(
            super::parse_rfc3339("2000-02-29T00:00:00Z"),
            Some(951_782_400)
        );
        assert_eq!(super::parse_rfc3339("bad"), None);
    }
}
