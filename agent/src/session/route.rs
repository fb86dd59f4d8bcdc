//! The IaC calls' channel (source blobs, plan reports): a balanced channel
//! with one endpoint, replaced when the session moves to another control
//! plane replica (the calls follow it to an address that answers) and when
//! the certificate is renewed (the next connections present the new one).
//! It dials lazily, so it never holds a connection the agent does not use.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

use super::{SessionError, endpoint_at};
use crate::config::AgentConfig;

/// Where the IaC calls go.
pub struct IacRoute {
    cfg: Arc<AgentConfig>,
    state: Mutex<State>,
}

struct State {
    changes: mpsc::Sender<Change<u64, Endpoint>>,
    key: u64,
    url: String,
}

impl IacRoute {
    /// The route and its channel, first to `server`.
    pub fn new(cfg: &Arc<AgentConfig>) -> Result<(Arc<IacRoute>, Channel), SessionError> {
        let first = endpoint_at(cfg, &cfg.server)?;
        let (channel, changes) = Channel::balance_channel::<u64>(4);
        let _ = changes.try_send(Change::Insert(0, first));
        let route = IacRoute {
            cfg: cfg.clone(),
            state: Mutex::new(State {
                changes,
                key: 0,
                url: cfg.server.clone(),
            }),
        };
        Ok((Arc::new(route), channel))
    }

    /// The session is up on `url`: the IaC calls go there from now on.
    pub fn follow(&self, url: &str) {
        if self.state.lock().url != url {
            self.replace(url);
        }
    }

    /// The certificate was renewed: the next connections present it.
    pub fn refresh(&self) {
        let url = self.state.lock().url.clone();
        self.replace(&url);
    }

    fn replace(&self, url: &str) {
        let ep = match endpoint_at(&self.cfg, url) {
            Ok(ep) => ep,
            Err(e) => {
                warn!(server = %url, error = %e, "cannot point the IaC calls at the control plane");
                return;
            }
        };
        let mut s = self.state.lock();
        let next = s.key + 1;
        if s.changes.try_send(Change::Insert(next, ep)).is_ok() {
            let _ = s.changes.try_send(Change::Remove(s.key));
            s.key = next;
            s.url = url.to_string();
            debug!(server = %url, "IaC calls go to the session's control plane");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration whose TLS files hold a real (self-signed) certificate.
    fn config(dir: &std::path::Path) -> Arc<AgentConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("agent.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("agent.key"), key.serialize_pem()).unwrap();
        let text = format!(
            "server = \"https://127.0.0.1:7443\"\nservers = [\"https://127.0.0.2:7443\"]\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/agent.pem\"\nkey = \"{d}/agent.key\"\n",
            d = dir.display()
        );
        Arc::new(AgentConfig::parse(&text).unwrap())
    }

    fn at(route: &IacRoute) -> (u64, String) {
        let s = route.state.lock();
        (s.key, s.url.clone())
    }

    #[tokio::test]
    async fn iac_calls_follow_the_session_and_renewals() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (route, _channel) = IacRoute::new(&cfg).unwrap();
        assert_eq!(at(&route), (0, "https://127.0.0.1:7443".to_string()));
        // Same address: the endpoint (and its connection) stays.
        route.follow("https://127.0.0.1:7443");
        assert_eq!(at(&route).0, 0);
        route.follow("https://127.0.0.2:7443");
        assert_eq!(at(&route), (1, "https://127.0.0.2:7443".to_string()));
        route.refresh();
        assert_eq!(at(&route), (2, "https://127.0.0.2:7443".to_string()));
        // An address no endpoint can be built for leaves the route as is.
        route.follow("https://bad host");
        assert_eq!(at(&route), (2, "https://127.0.0.2:7443".to_string()));
    }
}
