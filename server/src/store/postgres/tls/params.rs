//! The URL's TLS parameters that tokio-postgres does not parse
//! (`sslrootcert`, and `sslmode=verify-ca|verify-full`) are taken out of
//! either form of URL: `postgres://…?sslrootcert=/ca.pem&…` (values
//! percent-encoded) and `host=… sslrootcert='/ca.pem'` (values quoted
//! with `'`, `\` escaping).

use std::path::PathBuf;

use super::TlsSetupError;

/// A URL with its TLS parameters taken out.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Split {
    /// The URL without them, for tokio-postgres.
    pub(super) rest: String,
    /// `sslrootcert=`.
    pub(super) root_cert: Option<PathBuf>,
    /// `sslmode=verify-ca` or `verify-full` (taken out; the mode is
    /// `require`).
    pub(super) verify: bool,
}

/// Takes the TLS parameters out of `url`.
pub(super) fn split(url: &str) -> Result<Split, TlsSetupError> {
    let pairs = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        uri_params(url)?
    } else {
        key_value_params(url)?
    };
    let mut out = Split {
        rest: String::with_capacity(url.len()),
        root_cert: None,
        verify: false,
    };
    let mut cut: Vec<(usize, usize)> = Vec::new();
    for p in pairs {
        match (p.key.as_str(), p.value.as_str()) {
            ("sslrootcert", v) => out.root_cert = Some(PathBuf::from(v)),
            ("sslmode", "verify-ca" | "verify-full") => out.verify = true,
            _ => continue,
        }
        cut.push(p.span);
    }
    let mut at = 0;
    for (start, end) in cut {
        out.rest.push_str(&url[at..start]);
        at = end;
    }
    out.rest.push_str(&url[at..]);
    // A URI whose parameters were all taken keeps a dangling `?` or `&`.
    while out.rest.ends_with('&') || out.rest.ends_with('?') {
        out.rest.pop();
    }
    Ok(out)
}

/// One parameter: its key, its value (decoded) and the bytes to cut to
/// take it out.
struct Param {
    key: String,
    value: String,
    span: (usize, usize),
}

/// The query parameters of a `postgres://` URL; each span includes the
/// `&` that follows it (a `?` or `&` left at the end is dropped).
fn uri_params(url: &str) -> Result<Vec<Param>, TlsSetupError> {
    let Some(q) = url.find('?') else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut start = q + 1;
    for piece in url[q + 1..].split('&') {
        let end = start + piece.len();
        if let Some((k, v)) = piece.split_once('=') {
            out.push(Param {
                key: decode(k)?,
                value: decode(v)?,
                span: (start, (end + 1).min(url.len())),
            });
        }
        start = end + 1;
    }
    Ok(out)
}

/// Percent-decoding of a URI component.
fn decode(s: &str) -> Result<String, TlsSetupError> {
    let bad = || TlsSetupError::Param(format!("bad percent-encoding in {s:?}"));
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// The `key=value` pairs of a key-value connection string.
fn key_value_params(s: &str) -> Result<Vec<Param>, TlsSetupError> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == b.len() {
            return Ok(out);
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s[start..i].to_string();
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == b.len() || b[i] != b'=' {
            return Err(TlsSetupError::Param(format!("{key:?} has no value")));
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = Vec::new();
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            loop {
                match b.get(i) {
                    None => {
                        return Err(TlsSetupError::Param(format!(
                            "the value of {key:?} has no closing quote"
                        )));
                    }
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < b.len() => {
                        value.push(b[i + 1]);
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
        }
        let value = String::from_utf8(value)
            .map_err(|_| TlsSetupError::Param(format!("the value of {key:?} is not UTF-8")))?;
        out.push(Param {
            key,
            value,
            span: (start, i),
        });
    }
}
