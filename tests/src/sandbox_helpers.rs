//! Helpers of the sandbox suite (`tests/sandbox.rs`): a fake instance
//! metadata service, a host service, an "outside" network namespace to
//! prove egress works, probes run from inside jobs, and what Docker and
//! iptables hold for a job.
//!
//! Traffic only ever goes to loopback or to addresses and namespaces the
//! fixture creates itself, and the fixture removes them when dropped (also
//! on panic).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;

use tokio::task::JoinHandle;

use crate::Cluster;

/// The instance metadata address.
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// Serves `banner` to every connection on `listener` until aborted.
fn serve(listener: std::net::TcpListener, banner: &'static [u8]) -> JoinHandle<()> {
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(banner).await;
            let _ = s.shutdown().await;
        }
    })
}

/// Targets a job probes: a fake metadata service on 169.254.169.254:80 (the
/// address added to `lo`), a host service on every host address (so also on
/// each bridge gateway), and a service in a namespace of its own behind a
/// veth pair, reachable only by routing through the host like the internet.
pub struct NetFixture {
    pub host_port: u16,
    /// `ip:port` of the service outside the host.
    pub outside: SocketAddr,
    /// The host's own address on the link to that namespace.
    pub host_side: String,
    netns: String,
    veth: String,
    added_metadata: bool,
    tasks: Vec<JoinHandle<()>>,
}

impl NetFixture {
    pub async fn start() -> NetFixture {
        let n = std::process::id() % 100_000;
        let netns = format!("opsbx{n}");
        let veth = format!("opsb{n}a");
        let peer = format!("opsb{n}b");
        let third = 100 + (n % 100) as u8;
        let host_ip = format!("198.18.{third}.1");
        let ns_ip = format!("198.18.{third}.2");
        // Leftovers of an earlier, killed run of the same pid.
        ip_quiet(&["netns", "del", &netns]);
        ip_quiet(&["link", "del", &veth]);
        let mut f = NetFixture {
            host_port: 0,
            outside: SocketAddr::from(([0, 0, 0, 0], 0)),
            host_side: host_ip.clone(),
            netns: netns.clone(),
            veth: veth.clone(),
            added_metadata: false,
            tasks: Vec::new(),
        };
        ip(&["netns", "add", &netns]);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &netns]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &peer,
        ]);
        ip(&["-n", &netns, "link", "set", &peer, "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&["-n", &netns, "route", "add", "default", "via", &host_ip]);
        let ns = std::fs::File::open(format!("/run/netns/{netns}")).expect("open netns");
        let outside: SocketAddr = format!("{ns_ip}:8080").parse().expect("addr");
        let listener = outpost_agent::netns::bind_in_netns(ns, outside).expect("bind in netns");
        f.outside = outside;
        f.tasks.push(serve(listener, b"OUTSIDE\n"));

        let present = Command::new("ip")
            .args(["-4", "addr", "show", "dev", "lo"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("169.254.169.254"))
            .unwrap_or(false);
        if !present {
            ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
            f.added_metadata = true;
        }
        let metadata = std::net::TcpListener::bind(SocketAddr::from((METADATA, 80)))
            .expect("bind the fake metadata service");
        f.tasks.push(serve(metadata, b"METADATA\n"));
        let host = std::net::TcpListener::bind("0.0.0.0:0").expect("bind host service");
        f.host_port = host.local_addr().expect("addr").port();
        f.tasks.push(serve(host, b"HOST\n"));
        // The fixture itself works (so a blocked probe means the firewall).
        for addr in [
            SocketAddr::from((METADATA, 80)),
            SocketAddr::from(([127, 0, 0, 1], f.host_port)),
            f.outside,
        ] {
            let banner = read_banner(addr).await;
            assert!(!banner.is_empty(), "fixture service {addr} answers");
        }
        f
    }
}

async fn read_banner(addr: SocketAddr) -> String {
    use tokio::io::AsyncReadExt;
    let connect = tokio::net::TcpStream::connect(addr);
    let Ok(Ok(mut s)) = tokio::time::timeout(std::time::Duration::from_secs(3), connect).await
    else {
        return String::new();
    };
    let mut out = String::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        s.read_to_string(&mut out),
    )
    .await;
    out
}

impl Drop for NetFixture {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        ip_quiet(&["netns", "del", &self.netns]);
        ip_quiet(&["link", "del", &self.veth]);
        if self.added_metadata {
            ip_quiet(&["addr", "del", "169.254.169.254/32", "dev", "lo"]);
        }
    }
}

/// A shell snippet that connects to `host port` and prints `NAME=REACHED`
/// (with the banner) or `NAME=BLOCKED` (with the error).
pub fn probe(name: &str, host: &str, port: u16) -> String {
    format!(
        "if out=$(nc -w 3 {host} {port} </dev/null 2>&1) && [ -n \"$out\" ]; \
         then echo \"{name}=REACHED $out\"; else echo \"{name}=BLOCKED $out\"; fi\n"
    )
}

/// The value of `NAME=` in a probe's output.
pub fn verdict(log: &str, name: &str) -> String {
    let prefix = format!("{name}=");
    log.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} probe in:\n{log}"))
        .to_string()
}

pub async fn docker() -> bollard::Docker {
    bollard::Docker::connect_with_local_defaults()
        .expect("docker")
        .negotiate_version()
        .await
        .expect("docker version")
}

/// The job's container, inspected (while it exists).
pub async fn inspect_job(job_id: &str) -> Option<bollard::models::ContainerInspectResponse> {
    let ids = crate::containers_of(job_id).await;
    let id = ids.first()?;
    docker().await.inspect_container(id, None).await.ok()
}

/// IPv4 address of the job's container on its network.
pub async fn container_ip(job_id: &str) -> Option<String> {
    let inspect = inspect_job(job_id).await?;
    inspect
        .network_settings?
        .networks?
        .into_values()
        .filter_map(|n| n.ip_address)
        .find(|ip| !ip.is_empty())
}

/// Networks labelled `outpost.job=<id>`.
pub async fn networks_of(job_id: &str) -> Vec<String> {
    let filters: HashMap<String, Vec<String>> =
        [("label".to_string(), vec![format!("outpost.job={job_id}")])].into();
    docker()
        .await
        .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
            filters: Some(filters),
        }))
        .await
        .expect("list networks")
        .into_iter()
        .filter_map(|n| n.name)
        .collect()
}

/// iptables rules (INPUT, DOCKER-USER) whose comment names `job_id`.
pub fn rules_of(job_id: &str) -> Vec<String> {
    let mut rules = Vec::new();
    for chain in ["INPUT", "DOCKER-USER"] {
        let out = Command::new("iptables")
            .args(["-w", "-S", chain])
            .output()
            .expect("iptables -S");
        rules.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("outpost:") && l.contains(job_id))
                .map(str::to_string),
        );
    }
    rules
}

/// Where the agent with this config keeps the secrets of `job_id`@`epoch`.
pub fn secrets_path(
    cfg: &outpost_agent::executor::SandboxConfig,
    job_id: &str,
    epoch: u64,
) -> PathBuf {
    let canonical = outpost_agent::executor::SandboxConfig {
        work_dir: cfg.work_dir.canonicalize().unwrap_or(cfg.work_dir.clone()),
        secrets_dir: cfg
            .secrets_dir
            .canonicalize()
            .unwrap_or(cfg.secrets_dir.clone()),
        ..cfg.clone()
    };
    let key = outpost_agent::job::LeaseKey {
        job_id: job_id.to_string(),
        epoch,
    };
    outpost_agent::executor::spec::secrets_dir(&key, &canonical).expect("secrets path")
}

impl Cluster {
    /// An in-process agent config whose local policy allows egress.
    pub fn egress_agent_config(&self, capacity: u32) -> outpost_agent::config::AgentConfig {
        let mut cfg = self.agent_config(capacity);
        cfg.policy.allow_egress = true;
        cfg
    }
}

/// Removes, when dropped, whatever Docker and iptables still hold for a job
/// (its containers, networks and firewall rules): a test that fails while
/// its agent is killed would otherwise leave them with no agent to clean
/// them up (its `work_dir` is gone with the test).
pub struct JobLeftoversGuard(pub String);

impl Drop for JobLeftoversGuard {
    fn drop(&mut self) {
        let label = format!("label=outpost.job={}", self.0);
        let list = |what: &[&str]| -> Vec<String> {
            Command::new("docker")
                .args(what)
                .args(["--filter", &label, "-q"])
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        for id in list(&["ps", "-a"]) {
            let _ = Command::new("docker").args(["rm", "-f", &id]).output();
        }
        for id in list(&["network", "ls"]) {
            let _ = Command::new("docker").args(["network", "rm", &id]).output();
        }
        for rule in rules_of(&self.0) {
            let args: Vec<String> = rule
                .replacen("-A", "-D", 1)
                .split_whitespace()
                .map(|t| t.trim_matches('"').to_string())
                .collect();
            let _ = Command::new("iptables").arg("-w").args(&args).output();
        }
    }
}
