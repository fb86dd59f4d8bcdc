//! Tools for the fault-injection suite: a network partition between an
//! agent and the control plane (a loopback TCP proxy that can stop
//! forwarding), and a recorder of the Docker engine's own container events
//! (their timestamps are the evidence of what ran when).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A TCP proxy on loopback in front of `upstream`. While cut, it forwards
/// nothing: open connections are held silent (a black hole, no FIN, no
/// RST) and new ones are accepted and held too. Healing drops the held
/// connections so that the peer reconnects, and forwards again.
pub struct Partition {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Partition {
    pub async fn start(upstream: SocketAddr) -> Partition {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (cut, watch) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(forward(client, upstream, watch.clone()));
            }
        });
        Partition { addr, cut, task }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Stops forwarding (connections stay open, silent).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Drops the held connections and forwards again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(mut client: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    if *cut.borrow_and_update() {
        // Accepted during the partition: held until it heals, then dropped.
        let _ = cut.wait_for(|c| !*c).await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let partitioned = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
        r = cut.wait_for(|c| *c) => r.is_ok(),
    };
    if partitioned {
        // Hold both sides without a byte until healed, then drop them.
        let _ = cut.wait_for(|c| !*c).await;
    }
}

/// One container event as the engine recorded it.
#[derive(Debug, Clone)]
pub struct EngineEvent {
    /// Container name.
    pub name: String,
    /// `start`, `die`, ...
    pub action: String,
    /// The engine's timestamp, nanoseconds since the Unix epoch.
    pub time_nano: i64,
    pub attributes: HashMap<String, String>,
}

/// Records the engine's `start` and `die` events of Outpost job containers
/// from the moment it starts (a live stream: the engine's own history is
/// short and shared with every other test).
pub struct EventRecorder {
    events: Arc<Mutex<Vec<EngineEvent>>>,
    task: JoinHandle<()>,
}

impl EventRecorder {
    pub async fn start() -> EventRecorder {
        let docker = bollard::Docker::connect_with_local_defaults()
            .expect("docker")
            .negotiate_version()
            .await
            .expect("docker version");
        // From a second ago: whatever the engine saw since then is replayed
        // from its buffer, so nothing between this call and the stream's
        // first poll is missed.
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .saturating_sub(Duration::from_secs(1));
        let options = bollard::query_parameters::EventsOptions {
            since: Some(format!("{}.{:09}", since.as_secs(), since.subsec_nanos())),
            until: None,
            filters: Some(HashMap::from([
                ("type".to_string(), vec!["container".to_string()]),
                (
                    "event".to_string(),
                    vec!["start".to_string(), "die".to_string()],
                ),
                ("label".to_string(), vec!["outpost.job".to_string()]),
            ])),
        };
        let events = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let events = events.clone();
            tokio::spawn(async move {
                let mut stream = Box::pin(docker.events(Some(options)));
                while let Some(Ok(e)) = stream.next().await {
                    let attributes = e.actor.and_then(|a| a.attributes).unwrap_or_default();
                    events.lock().push(EngineEvent {
                        name: attributes.get("name").cloned().unwrap_or_default(),
                        action: e.action.unwrap_or_default(),
                        time_nano: e.time_nano.unwrap_or_default(),
                        attributes,
                    });
                }
            })
        };
        EventRecorder { events, task }
    }

    /// Waits (bounded) for the `action` event of container `name`.
    pub async fn wait_for(&self, name: &str, action: &str, limit: Duration) -> EngineEvent {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(e) = self
                .events
                .lock()
                .iter()
                .find(|e| e.name == name && e.action == action)
            {
                return e.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {action:?} event for container {name} within {limit:?}; recorded: {:?}",
                self.events
                    .lock()
                    .iter()
                    .map(|e| (&e.name, &e.action))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every recorded event of container `name`.
    pub fn of(&self, name: &str) -> Vec<EngineEvent> {
        self.events
            .lock()
            .iter()
            .filter(|e| e.name == name)
            .cloned()
            .collect()
    }
}

impl Drop for EventRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
