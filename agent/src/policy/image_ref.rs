//! Image references, parsed and normalised the way the Docker engine does,
//! so that the allow-list compares what will actually run.
//!
//! Grammar (Docker's `reference` package, a strict subset):
//!
//! ```text
//! reference  := name [ ":" tag ] [ "@" digest ]
//! name       := [ domain "/" ] path-component ( "/" path-component )*
//! domain     := host-component ( "." host-component )* [ ":" port ]
//! path-component := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
//! tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
//! digest     := "sha256:" 64 lowercase hex | "sha512:" 128 lowercase hex
//! ```
//!
//! The first component is a registry host if it contains `.` or `:` or is
//! `localhost`; otherwise the image is on Docker Hub, exactly as `docker
//! pull` reads it. Normalisation: no host → `docker.io`; `index.docker.io` →
//! `docker.io`; a one-component Hub name gets `library/`; no tag and no digest
//! → tag `latest`. So `alpine` is `docker.io/library/alpine:latest` and
//! `outpost/runner:dev` is `docker.io/outpost/runner:dev`. Host names are
//! compared in lower case; repository paths must be lower case already.
//! Anything else (whitespace, `..`, an empty component, upper case in the
//! path, a bad digest) is not a reference and is refused.

use std::fmt;

/// Docker Hub's canonical registry name.
const HUB: &str = "docker.io";
/// Longest repository name Docker accepts.
const MAX_NAME_LEN: usize = 255;
/// Longest tag Docker accepts.
const MAX_TAG_LEN: usize = 128;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host (and port), lower case: `docker.io`, `registry.internal:5000`.
    pub domain: String,
    /// Repository path inside the registry: `library/alpine`, `team/runner`.
    pub path: String,
    /// Tag, if any (`latest` when neither tag nor digest was given).
    pub tag: Option<String>,
    /// Digest, if any: `sha256:<hex>`. When present, the engine runs exactly
    /// this content and ignores the tag.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses and normalises a reference; the error says what is wrong.
    pub fn parse(text: &str) -> Result<ImageRef, String> {
        if text.is_empty() {
            return Err("it is empty".into());
        }
        if let Some(c) = text
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || !c.is_ascii())
        {
            return Err(format!("it contains {c:?}"));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => (rest, Some(parse_digest(digest)?)),
            None => (text, None),
        };
        // A tag follows the last ':' after the last '/' (a ':' before it is a port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let (name, tag) = rest.split_at(last_slash + i);
                (name, Some(parse_tag(&tag[1..])?))
            }
            None => (rest, None),
        };
        if name.len() > MAX_NAME_LEN {
            return Err(format!("the name is longer than {MAX_NAME_LEN} characters"));
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains(['.', ':']) || first.eq_ignore_ascii_case("localhost") =>
            {
                (parse_domain(first)?, path.to_string())
            }
            _ => (HUB.to_string(), name.to_string()),
        };
        for component in path.split('/') {
            check_path_component(component)?;
        }
        let path = if domain == HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(ImageRef {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// `domain/path`: the repository, without tag or digest.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// One entry of `allowed_images`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRule {
    /// Ends in `/`: any repository under this registry or namespace, any tag
    /// or digest. Stored normalised with its trailing `/`
    /// (`docker.io/outpost/`).
    Prefix(String),
    /// A repository without tag or digest: that repository, any tag or digest.
    Repository(String),
    /// A repository with a tag: that tag only, and no digest (a digest would
    /// make the engine run other content than the tag names).
    Tagged { repository: String, tag: String },
    /// A repository with a digest: exactly that content (any tag).
    Pinned { repository: String, digest: String },
}

impl ImageRule {
    /// Parses an allow-list entry; the error says why it is unusable.
    pub fn parse(entry: &str) -> Result<ImageRule, String> {
        if let Some(prefix) = entry.strip_suffix('/') {
            return parse_prefix(prefix)
                .map(ImageRule::Prefix)
                .map_err(|e| format!("{entry:?} is not a registry or namespace prefix: {e}"));
        }
        let parsed = ImageRef::parse(entry).map_err(|e| format!("{entry:?}: {e}"))?;
        let repository = parsed.repository();
        let written_tag = tag_written(entry);
        Ok(match (parsed.digest, written_tag) {
            (Some(digest), _) => ImageRule::Pinned { repository, digest },
            (None, true) => ImageRule::Tagged {
                repository,
                tag: parsed.tag.unwrap_or_default(),
            },
            (None, false) => ImageRule::Repository(repository),
        })
    }

    /// Whether this entry admits `image`.
    pub fn admits(&self, image: &ImageRef) -> bool {
        match self {
            ImageRule::Prefix(prefix) => format!("{}/", image.repository()).starts_with(prefix),
            ImageRule::Repository(repository) => image.repository() == *repository,
            ImageRule::Tagged { repository, tag } => {
                image.repository() == *repository
                    && image.digest.is_none()
                    && image.tag.as_deref() == Some(tag)
            }
            ImageRule::Pinned { repository, digest } => {
                image.repository() == *repository && image.digest.as_deref() == Some(digest)
            }
        }
    }
}

impl fmt::Display for ImageRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRule::Prefix(prefix) => write!(f, "{prefix}*"),
            ImageRule::Repository(repository) => write!(f, "{repository}"),
            ImageRule::Tagged { repository, tag } => write!(f, "{repository}:{tag}"),
            ImageRule::Pinned { repository, digest } => write!(f, "{repository}@{digest}"),
        }
    }
}

/// A prefix without its trailing `/`, normalised: `outpost` is the Hub
/// namespace `docker.io/outpost/` (no `library/` is added), a first
/// component that is a host stays as the registry.
fn parse_prefix(prefix: &str) -> Result<String, String> {
    let mut components = prefix.split('/');
    let first = components.next().unwrap_or_default();
    let is_domain = first.contains(['.', ':']) || first.eq_ignore_ascii_case("localhost");
    let domain = if is_domain {
        parse_domain(first)?
    } else {
        check_path_component(first)?;
        HUB.to_string()
    };
    let mut normalised = format!("{domain}/");
    if !is_domain {
        normalised.push_str(first);
        normalised.push('/');
    }
    for component in components {
        if component.contains([':', '@']) {
            return Err("a prefix has no tag or digest".into());
        }
        check_path_component(component)?;
        normalised.push_str(component);
        normalised.push('/');
    }
    Ok(normalised)
}

/// Whether the entry, as written, carries a tag (a ':' after the last '/',
/// before any '@').
fn tag_written(entry: &str) -> bool {
    let rest = entry.split('@').next().unwrap_or(entry);
    let last = rest.rsplit('/').next().unwrap_or(rest);
    last.contains(':')
}

fn parse_digest(digest: &str) -> Result<String, String> {
    let (algorithm, hex) = digest
        .split_once(':')
        .ok_or_else(|| format!("digest {digest:?} is not algorithm:hex"))?;
    let len = match algorithm {
        "sha256" => 64,
        "sha512" => 128,
        _ => {
            return Err(format!(
                "digest algorithm {algorithm:?} is not sha256 or sha512"
            ));
        }
    };
    if hex.len() != len
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "digest {digest:?} is not {algorithm}: followed by {len} lowercase hex digits"
        ));
    }
    Ok(digest.to_string())
}

fn parse_tag(tag: &str) -> Result<String, String> {
    let mut bytes = tag.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if first_ok && rest_ok && tag.len() <= MAX_TAG_LEN {
        Ok(tag.to_string())
    } else {
        Err(format!("tag {tag:?} is not valid"))
    }
}

/// A registry host with an optional port; returned in lower case, with
/// `index.docker.io` as `docker.io`.
fn parse_domain(domain: &str) -> Result<String, String> {
    let bad = || format!("registry {domain:?} is not a host name with an optional port");
    let (host, port) = match domain.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (domain, None),
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if host.is_empty() || !host.split('.').all(label_ok) {
        return Err(bad());
    }
    let host = host.to_ascii_lowercase();
    let host = if host == "index.docker.io" {
        HUB.to_string()
    } else {
        host
    };
    Ok(match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

/// `[a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*`
fn check_path_component(component: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("repository component {component:?} {why}"));
    if component.is_empty() {
        return bad("is empty");
    }
    if component.bytes().any(|b| b.is_ascii_uppercase()) {
        return bad("has upper case letters");
    }
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return bad("must start and end with a letter or digit");
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return bad(&format!("has the separator {sep:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn norm(s: &str) -> String {
        ImageRef::parse(s).unwrap().to_string()
    }

    #[test]
    fn references_normalise_like_docker() {
        assert_eq!(norm("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(norm("alpine:3.20"), "docker.io/library/alpine:3.20");
        assert_eq!(norm("outpost/runner:dev"), "docker.io/outpost/runner:dev");
        assert_eq!(
            norm("docker.io/outpost/runner"),
            "docker.io/outpost/runner:latest"
        );
        assert_eq!(
            norm("index.docker.io/library/alpine"),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(norm("docker.io/alpine"), "docker.io/library/alpine:latest");
        assert_eq!(
            norm("Registry.Internal:5000/team/runner:v1"),
            "registry.internal:5000/team/runner:v1"
        );
        assert_eq!(norm("localhost/x"), "localhost/x:latest");
        assert_eq!(
            norm(&format!("alpine@{D}")),
            format!("docker.io/library/alpine@{D}")
        );
        assert_eq!(
            norm(&format!("outpost/runner:dev@{D}")),
            format!("docker.io/outpost/runner:dev@{D}")
        );
        assert_eq!(norm("a__b/c--d.e_f"), "docker.io/a__b/c--d.e_f:latest");
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "",
            " alpine",
            "alpine ",
            "al pine",
            "alpine\n",
            "Alpine",
            "outpost/Runner",
            "outpost/../x",
            "outpost/./x",
            "outpost//x",
            "/outpost/x",
            "outpost/x/",
            "outpost/-x",
            "outpost/x.",
            "outpost/a...b",
            "outpost/a___b",
            "outpost/x:",
            "outpost/x:-dev",
            "outpost/x:dev tag",
            "outpost/x@sha256:abc",
            "outpost/x@md5:0123456789abcdef0123456789abcdef",
            &format!("outpost/x@{}", D.to_uppercase().replace("SHA256", "sha256")),
            "reg_istry.internal/x",
            "registry.internal:port/x",
            "-registry.internal/x",
            "outpost/x\u{e9}",
            "outpost/x\0",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} must be refused");
        }
        let long = format!("outpost/{}", "a".repeat(300));
        assert!(ImageRef::parse(&long).is_err());
        let long_tag = format!("outpost/x:{}", "a".repeat(129));
        assert!(ImageRef::parse(&long_tag).is_err());
    }

    fn admitted(rule: &str, image: &str) -> bool {
        ImageRule::parse(rule)
            .unwrap()
            .admits(&ImageRef::parse(image).unwrap())
    }

    #[test]
    fn prefixes_match_whole_components_after_normalising() {
        assert!(admitted("outpost/", "outpost/runner:dev"));
        assert!(admitted("outpost/", "docker.io/outpost/runner"));
        assert!(admitted("outpost/", "index.docker.io/outpost/runner"));
        assert!(admitted("outpost/", &format!("outpost/runner:dev@{D}")));
        assert!(admitted("docker.io/outpost/", "outpost/runner:dev"));
        assert!(!admitted("outpost/", "outpostevil/runner"));
        assert!(!admitted("outpost/", "evil.com/outpost/x"));
        assert!(!admitted("outpost/", "library/outpost"));
        assert!(
            !admitted("outpost/", "outpost"),
            "docker.io/library/outpost"
        );
        assert!(admitted(
            "registry.internal/team/",
            "registry.internal/team/runner:v1"
        ));
        assert!(admitted(
            "registry.internal/team/",
            "REGISTRY.internal/team/a/b"
        ));
        assert!(!admitted(
            "registry.internal/team/",
            "registry.internal/teamx/runner"
        ));
        assert!(!admitted(
            "registry.internal/team/",
            "registry.internal:5000/team/runner"
        ));
        assert!(!admitted(
            "registry.internal/team/",
            "registry.internal.evil.com/team/x"
        ));
        assert!(admitted(
            "registry.internal/",
            "registry.internal/any/thing"
        ));
        assert!(!admitted("registry.internal/", "registry.internalx/any"));
        assert!(admitted("localhost:5000/", "localhost:5000/x"));
        assert!(!admitted("localhost:5000/", "localhost/x"));
        assert!(admitted("docker.io/library/", "alpine"));
        assert!(admitted("library/", "alpine"));
    }

    #[test]
    fn repositories_tags_and_digests_match_exactly() {
        assert!(admitted("outpost/runner", "outpost/runner:dev"));
        assert!(admitted("outpost/runner", &format!("outpost/runner@{D}")));
        assert!(!admitted("outpost/runner", "outpost/runner-evil:dev"));
        assert!(!admitted("outpost/runner", "outpost/runner/x"));
        assert!(admitted("alpine", "docker.io/library/alpine:3"));

        assert!(admitted("outpost/runner:dev", "outpost/runner:dev"));
        assert!(admitted(
            "outpost/runner:dev",
            "docker.io/outpost/runner:dev"
        ));
        assert!(!admitted("outpost/runner:dev", "outpost/runner:dev2"));
        assert!(
            !admitted("outpost/runner:dev", "outpost/runner"),
            "that is :latest"
        );
        assert!(
            !admitted("outpost/runner:dev", &format!("outpost/runner:dev@{D}")),
            "a digest would run other content than the allowed tag"
        );
        assert!(admitted("alpine:latest", "alpine"));

        let pinned = format!("outpost/runner@{D}");
        assert!(admitted(&pinned, &format!("outpost/runner@{D}")));
        assert!(admitted(&pinned, &format!("outpost/runner:dev@{D}")));
        assert!(admitted(&pinned, &format!("docker.io/outpost/runner@{D}")));
        let other = D.replace("0123", "3210");
        assert!(!admitted(&pinned, &format!("outpost/runner@{other}")));
        assert!(!admitted(&pinned, "outpost/runner:dev"));
        assert!(!admitted(&pinned, &format!("evil.com/outpost/runner@{D}")));
    }

    #[test]
    fn unusable_rules_are_refused() {
        for bad in [
            "",
            "/",
            "outpost//",
            "Outpost/",
            "outpost/:dev/",
            "outpost/x:dev/",
            "a b/",
            "../",
            "outpost/../x",
            "outpost/x@sha256:1",
        ] {
            assert!(ImageRule::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(
            ImageRule::parse("outpost/").unwrap(),
            ImageRule::Prefix("docker.io/outpost/".into())
        );
        assert_eq!(
            ImageRule::parse("Registry.Internal:5000/").unwrap(),
            ImageRule::Prefix("registry.internal:5000/".into())
        );
        assert_eq!(
            ImageRule::parse("outpost/runner:dev").unwrap().to_string(),
            "docker.io/outpost/runner:dev"
        );
    }
}
