//! The connected agents of this replica and the dispatch index: agents
//! grouped by label set, each group a FIFO of agents that may have a free
//! slot (checked when taken).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use super::AgentTx;

pub(super) struct Conn {
    pub(super) session: u64,
    pub(super) tx: AgentTx,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) capacity: u32,
    pub(super) draining: bool,
    /// Last message from the agent: one that stopped talking (frozen,
    /// partitioned) gets no new lease even while its connection looks open.
    pub(super) last_seen: std::time::Instant,
}

/// Agents of one label set that may have a free slot, oldest first; an
/// entry is checked when taken (it may have gone, filled up or gone quiet).
#[derive(Default)]
pub(super) struct Group {
    pub(super) ready: VecDeque<String>,
    pub(super) queued: HashSet<String>,
}

/// The connected agents and the dispatch index.
#[derive(Default)]
pub(super) struct Agents {
    pub(super) conns: HashMap<String, Conn>,
    pub(super) groups: HashMap<BTreeMap<String, String>, Group>,
}

impl Agents {
    /// Puts `id` at the back of its group's FIFO unless it is there;
    /// whether it was added.
    pub(super) fn ready(&mut self, id: &str) -> bool {
        let Some(c) = self.conns.get(id) else {
            return false;
        };
        if c.draining || c.capacity == 0 {
            return false;
        }
        // Looked up before inserting: every heartbeat with a free slot comes
        // here, and the label set is cloned only for a new group.
        let g = match self.groups.get_mut(&c.labels) {
            Some(g) => g,
            None => self.groups.entry(c.labels.clone()).or_default(),
        };
        if g.queued.contains(id) {
            return false;
        }
        if g.queued.insert(id.to_string()) {
            g.ready.push_back(id.to_string());
            true
        } else {
            false
        }
    }

    /// The next agent with a free slot among those whose labels satisfy
    /// `selector`; agents quiet for `fresh` are set aside in `quiet`.
    pub(super) fn pick(
        &mut self,
        selector: &BTreeMap<String, String>,
        fresh: Duration,
        held: impl Fn(&str) -> u32,
        quiet: &mut Vec<String>,
    ) -> Option<String> {
        let Agents { conns, groups } = self;
        for (labels, g) in groups.iter_mut() {
            if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                continue;
            }
            while let Some(id) = g.ready.pop_front() {
                if !g.queued.remove(&id) {
                    continue;
                }
                let Some(c) = conns.get(&id) else { continue };
                if c.draining || c.capacity == 0 || &c.labels != labels {
                    continue;
                }
                if c.last_seen.elapsed() >= fresh {
                    quiet.push(id);
                    continue;
                }
                let busy = held(&id);
                if busy >= c.capacity {
                    // Back once a slot frees (a final status, a heartbeat).
                    continue;
                }
                if busy + 1 < c.capacity {
                    g.queued.insert(id.clone());
                    g.ready.push_back(id.clone());
                }
                return Some(id);
            }
        }
        None
    }
}
