//! Egress networks: a Docker bridge network of the job's own, fenced by
//! iptables rules the agent installs and removes.
//!
//! A job with `--network egress` (only if this agent allows egress) gets the
//! network `outpost-<job_id>-<epoch>` (labelled like its container, inter-
//! container traffic off), created before its container and removed after it.
//! Its bridge is `br-<first 12 hex digits of the network id>` (Docker's
//! naming; Outpost never sets `com.docker.network.bridge.name`). For that
//! bridge the agent inserts, at the top of two chains of the `filter` table:
//!
//! | chain | rule | what it stops |
//! |---|---|---|
//! | `INPUT` | `-i BR -j REJECT` | every packet from the job to the host itself: the bridge gateway, every other host address, host services, a metadata address bound locally |
//! | `DOCKER-USER` | `-i BR -d 169.254.0.0/16 -j REJECT` | instance metadata (169.254.169.254), the ECS/EKS link-local endpoints, anything link-local routed on |
//! | `DOCKER-USER` | `-i BR -o br-+ -j REJECT` | other jobs' networks (and every other user-defined bridge) |
//! | `DOCKER-USER` | `-i BR -o docker0 -j REJECT` | containers on Docker's default bridge |
//!
//! Each rule carries the comment `outpost:<scope>:<job_id>-<epoch>` (`scope`:
//! [`spec::agent_scope`], derived from `work_dir`, so agents sharing a host
//! only touch their own rules).
//!
//! **Why this is correct (rule ordering).** Docker puts `-j DOCKER-USER` as
//! the first rule of `FORWARD`, re-creates that jump whenever it starts, and
//! never changes the rules inside `DOCKER-USER` (it only creates the chain,
//! ending in `RETURN`). So every forwarded packet from the job meets these
//! rules before Docker's own `ACCEPT`s (`-i BR ! -o BR -j ACCEPT`, the
//! conntrack rule) and before `DOCKER-ISOLATION-STAGE-*` (which, besides,
//! also drops traffic between bridges). Docker never touches `INPUT`; the
//! rule is inserted first, ahead of any host firewall's `ACCEPT`. Packets to
//! a published port of another container are DNAT-ed in `PREROUTING` and
//! then forwarded to `docker0`/`br-*`, which the `DOCKER-USER` rules reject;
//! through `docker-proxy` they would be local, which `INPUT` rejects. Replies
//! to connections the job opened are not matched (they arrive with `-o BR`).
//! IPv6: the network has none, and the container gets
//! `net.ipv6.conf.{all,default}.disable_ipv6=1`, so no link-local IPv6 path
//! to the host exists either (the job cannot change a sysctl: no
//! `CAP_NET_ADMIN`, read-only `/proc/sys`). DNS: Docker's embedded resolver
//! lives in the job's own namespace and forwards from it, so an upstream
//! resolver on the host itself is unreachable too (use one off-host).
//!
//! With network `none` the job has only a loopback interface: no address
//! outside it (169.254.169.254 included) is routable.
//!
//! **Rules outlive a crash.** If the agent dies, the rules stay (they are
//! kernel state) and keep fencing the job's bridge while its container runs;
//! a re-adopted job keeps them (and they are re-installed, idempotently, in
//! case the host lost them). At start, after re-adoption, the agent removes
//! every network labelled with its `work_dir` that it did not re-adopt, then
//! every rule with its scope whose job it did not re-adopt
//! ([`remove_rules_except`]). A host reboot clears the rules by itself.
//! Installing first deletes any rule with the same comment, so a retried
//! attempt never duplicates them.
//!
//! Requirements: the agent runs in the host's network namespace (it checks
//! that the bridge exists there), `iptables` (the variant Docker uses, so
//! that both edit the same tables) is on its `PATH`, and the engine manages
//! iptables (`DOCKER-USER` exists). Otherwise an egress job fails before it
//! runs, with the reason.

use std::collections::HashMap;
use std::path::Path;

use bollard::Docker;
use bollard::models::NetworkCreateRequest;
use bollard::query_parameters::ListNetworksOptions;

use super::ExecError;

/// `iptables` chains the agent adds rules to.
const CHAINS: [&str; 2] = ["INPUT", "DOCKER-USER"];
/// Link-local IPv4, including instance metadata (169.254.169.254).
pub const LINK_LOCAL: &str = "169.254.0.0/16";
/// Prefix of the comment of every rule the agent installs.
pub const COMMENT_PREFIX: &str = "outpost:";

/// A job's egress network once created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressNetwork {
    pub id: String,
    /// Its Linux bridge interface.
    pub bridge: String,
}

/// The comment marking the rules of one job of one agent.
pub fn rule_comment(scope: &str, job: &str) -> String {
    format!("{COMMENT_PREFIX}{scope}:{job}")
}

/// Docker's name for the bridge of network `id`.
pub fn bridge_name(id: &str) -> Option<String> {
    let short = id.get(..12)?;
    short
        .bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| format!("br-{short}"))
}

/// The rules fencing `bridge`, in the order they end up at the top of their
/// chain: `(chain, rule specification)`.
pub fn rules(bridge: &str, comment: &str) -> Vec<(&'static str, Vec<String>)> {
    let rule = |matches: &[&str]| {
        let mut spec = vec!["-i", bridge];
        spec.extend_from_slice(matches);
        spec.extend([
            "-m",
            "comment",
            "--comment",
            comment,
            "-j",
            "REJECT",
            "--reject-with",
            "icmp-admin-prohibited",
        ]);
        spec.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    vec![
        ("INPUT", rule(&[])),
        ("DOCKER-USER", rule(&["-d", LINK_LOCAL])),
        ("DOCKER-USER", rule(&["-o", "br-+"])),
        ("DOCKER-USER", rule(&["-o", "docker0"])),
    ]
}

/// From one line of `iptables -S CHAIN`, the comment and the arguments that
/// delete the rule (`-D CHAIN ...`), if it carries a comment.
pub fn parse_rule(line: &str) -> Option<(String, Vec<String>)> {
    let unquote = |t: &str| {
        t.strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(t)
            .to_string()
    };
    let mut tokens = line.split_whitespace();
    if tokens.next()? != "-A" {
        return None;
    }
    let mut args = vec!["-D".to_string()];
    args.extend(tokens.map(unquote));
    let at = args.iter().position(|t| t == "--comment")?;
    let comment = args.get(at + 1)?.clone();
    Some((comment, args))
}

async fn iptables(args: &[String]) -> Result<String, ExecError> {
    let failed = |message: String| ExecError::Firewall {
        command: format!("iptables {}", args.join(" ")),
        message,
    };
    let out = tokio::process::Command::new("iptables")
        .arg("-w")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let message = stderr
            .lines()
            .filter(|l| !l.starts_with("# Warning"))
            .collect::<Vec<_>>()
            .join("; ");
        Err(failed(format!("{}: {}", out.status, message.trim())))
    }
}

/// Whether an `iptables` executable is on the `PATH`.
fn iptables_installed() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("iptables").is_file()))
}

/// Deletes every rule of ours (comment `outpost:<scope>:<job>`) for which
/// `remove(job)` holds. Returns how many were deleted.
async fn remove_rules_where(
    scope: &str,
    remove: impl Fn(&str) -> bool,
) -> Result<usize, ExecError> {
    let prefix = rule_comment(scope, "");
    let mut removed = 0;
    if !iptables_installed() {
        // Then no rule of ours can exist (nor could an egress job run).
        return Ok(0);
    }
    for chain in CHAINS {
        let listing = match iptables(&["-S".to_string(), chain.to_string()]).await {
            Ok(listing) => listing,
            // No such chain (Docker without iptables): nothing of ours there.
            Err(_) if chain == "DOCKER-USER" => continue,
            Err(e) => return Err(e),
        };
        for line in listing.lines() {
            let Some((comment, args)) = parse_rule(line) else {
                continue;
            };
            if comment.strip_prefix(&prefix).is_some_and(&remove) {
                iptables(&args).await?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Installs the rules fencing `bridge` for `job` (idempotent: rules with the
/// same comment are deleted first).
pub async fn install_rules(scope: &str, job: &str, bridge: &str) -> Result<(), ExecError> {
    remove_rules_where(scope, |j| j == job).await?;
    let comment = rule_comment(scope, job);
    for (chain, spec) in rules(bridge, &comment).into_iter().rev() {
        let mut args = vec!["-I".to_string(), chain.to_string(), "1".to_string()];
        args.extend(spec);
        iptables(&args).await?;
    }
    Ok(())
}

/// Deletes the rules of `job`.
pub async fn remove_rules(scope: &str, job: &str) -> Result<usize, ExecError> {
    remove_rules_where(scope, |j| j == job).await
}

/// Deletes the rules of every job of this agent but those in `keep`
/// (`<job_id>-<epoch>`).
pub async fn remove_rules_except(scope: &str, keep: &[String]) -> Result<usize, ExecError> {
    remove_rules_where(scope, |j| !keep.iter().any(|k| k == j)).await
}

/// Creates the job's network and fences it. The caller removed any network
/// of the same name before (Docker 20.10 would create a duplicate).
pub async fn create(
    docker: &Docker,
    name: &str,
    labels: HashMap<String, String>,
    scope: &str,
    job: &str,
) -> Result<EgressNetwork, ExecError> {
    let request = NetworkCreateRequest {
        name: name.to_string(),
        driver: Some("bridge".to_string()),
        internal: Some(false),
        attachable: Some(false),
        enable_ipv6: Some(false),
        options: Some(HashMap::from([(
            "com.docker.network.bridge.enable_icc".to_string(),
            "false".to_string(),
        )])),
        labels: Some(labels),
        ..Default::default()
    };
    let created =
        docker
            .create_network(request)
            .await
            .map_err(|source| ExecError::CreateNetwork {
                name: name.to_string(),
                source,
            })?;
    let bridge = bridge_name(&created.id).ok_or_else(|| ExecError::Firewall {
        command: "docker network create".to_string(),
        message: format!("unexpected network id {:?}", created.id),
    })?;
    // The rules are only worth anything in the namespace the bridge lives in.
    if !Path::new("/sys/class/net").join(&bridge).exists() {
        return Err(ExecError::Firewall {
            command: format!("ip link show {bridge}"),
            message: "the network's bridge is not visible to the agent: it must run in the host's network namespace to fence egress networks".to_string(),
        });
    }
    install_rules(scope, job, &bridge).await?;
    Ok(EgressNetwork {
        id: created.id,
        bridge,
    })
}

/// Removes every network called exactly `name`. `Ok(false)` if there was none.
pub async fn remove_named(docker: &Docker, name: &str) -> Result<bool, ExecError> {
    let options = ListNetworksOptions {
        filters: Some(HashMap::from([(
            "name".to_string(),
            vec![name.to_string()],
        )])),
    };
    let networks = docker
        .list_networks(Some(options))
        .await
        .map_err(|source| ExecError::ListNetworks {
            filter: format!("name={name}"),
            source,
        })?;
    let mut removed = false;
    // The name filter matches substrings: compare exactly.
    for n in networks
        .into_iter()
        .filter(|n| n.name.as_deref() == Some(name))
    {
        if let Some(id) = n.id {
            removed |= remove_id(docker, &id).await?;
        }
    }
    Ok(removed)
}

/// Removes a network by id; `Ok(false)` if it was gone.
pub async fn remove_id(docker: &Docker, id: &str) -> Result<bool, ExecError> {
    match docker.remove_network(id).await {
        Ok(()) => Ok(true),
        Err(e) if super::run::status(&e) == Some(404) => Ok(false),
        Err(source) => Err(ExecError::RemoveNetwork {
            name: id.to_string(),
            source,
        }),
    }
}

/// Networks carrying all of `labels` (`key=value` filters): `(id, name,
/// their labels)`.
pub async fn list_labelled(
    docker: &Docker,
    labels: Vec<String>,
) -> Result<Vec<(String, String, HashMap<String, String>)>, ExecError> {
    let filter = labels.join(" and ");
    let options = ListNetworksOptions {
        filters: Some(HashMap::from([("label".to_string(), labels)])),
    };
    let networks = docker
        .list_networks(Some(options))
        .await
        .map_err(|source| ExecError::ListNetworks { filter, source })?;
    Ok(networks
        .into_iter()
        .filter_map(|n| {
            Some((
                n.id?,
                n.name.unwrap_or_default(),
                n.labels.unwrap_or_default(),
            ))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_fence_the_bridge_in_order() {
        let r = rules("br-0123456789ab", "outpost:s:job-1-2");
        let text: Vec<String> = r
            .iter()
            .map(|(chain, spec)| format!("{chain} {}", spec.join(" ")))
            .collect();
        let tail =
            "-m comment --comment outpost:s:job-1-2 -j REJECT --reject-with icmp-admin-prohibited";
        assert_eq!(
            text,
            vec![
                format!("INPUT -i br-0123456789ab {tail}"),
                format!("DOCKER-USER -i br-0123456789ab -d 169.254.0.0/16 {tail}"),
                format!("DOCKER-USER -i br-0123456789ab -o br-+ {tail}"),
                format!("DOCKER-USER -i br-0123456789ab -o docker0 {tail}"),
            ]
        );
        assert!(
            r.iter()
                .all(|(_, spec)| spec.iter().any(|t| t == "-i")
                    && !spec.iter().any(|t| t == "ACCEPT"))
        );
    }

    #[test]
    fn listing_lines_parse_into_delete_commands() {
        let line = r#"-A DOCKER-USER -d 169.254.0.0/16 -i br-0123456789ab -m comment --comment "outpost:s:job-1-2" -j REJECT --reject-with icmp-admin-prohibited"#;
        let (comment, args) = parse_rule(line).unwrap();
        assert_eq!(comment, "outpost:s:job-1-2");
        assert_eq!(
            args.join(" "),
            "-D DOCKER-USER -d 169.254.0.0/16 -i br-0123456789ab -m comment --comment outpost:s:job-1-2 -j REJECT --reject-with icmp-admin-prohibited"
        );
        assert_eq!(parse_rule("-N DOCKER-USER"), None);
        assert_eq!(parse_rule("-A DOCKER-USER -j RETURN"), None);
        assert_eq!(parse_rule("-P INPUT ACCEPT"), None);
        // Someone else's comment with spaces never looks like ours.
        let (comment, _) =
            parse_rule(r#"-A INPUT -m comment --comment "outpost:s:x y" -j ACCEPT"#).unwrap();
        assert_ne!(comment, "outpost:s:x");
    }

    #[test]
    fn bridge_names_follow_docker() {
        assert_eq!(
            bridge_name("a88a6c5e8303b3ded25334eb449eefbc0c136ba0b6b4213b597ccbb535ecd547")
                .as_deref(),
            Some("br-a88a6c5e8303")
        );
        assert_eq!(bridge_name("short"), None);
        assert_eq!(bridge_name("zzzzzzzzzzzzzzzz"), None);
    }
}
