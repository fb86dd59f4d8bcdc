//! Does a configuration declare its own backend? A scan of the `.tf` files
//! of the root module for a `backend "NAME" {` (or a `cloud {`) block: comments
//! are skipped, strings kept as tokens. Terraform allows a backend only in
//! the root module's `terraform` block, so the root's files are enough; a
//! configuration written in JSON (`.tf.json`) counts as declaring one when
//! it has a `"backend"` key, which keeps the agent from overriding it.

use std::path::Path;

/// One lexical token of HCL, as far as this scan needs.
#[derive(Debug, PartialEq, Eq)]
enum Token {
    Ident(String),
    Str,
    Open,
    Other,
}

fn tokens(text: &str) -> Vec<Token> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 2;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                out.push(Token::Str);
            }
            b'{' => {
                out.push(Token::Open);
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'-')
                {
                    i += 1;
                }
                out.push(Token::Ident(text[start..i].to_string()));
            }
            c if c.is_ascii_whitespace() => i += 1,
            _ => {
                out.push(Token::Other);
                i += 1;
            }
        }
    }
    out
}

/// Whether HCL text holds a `backend "NAME" {` or `cloud {` block.
pub fn declares_backend_hcl(text: &str) -> bool {
    let t = tokens(text);
    t.windows(3).any(|w| {
        matches!(&w[0], Token::Ident(k) if k == "backend")
            && w[1] == Token::Str
            && w[2] == Token::Open
    }) || t
        .windows(2)
        .any(|w| matches!(&w[0], Token::Ident(k) if k == "cloud") && w[1] == Token::Open)
}

/// Whether the root module in `dir` declares a backend of its own. Files
/// Terraform ignores (hidden ones) are skipped; `skip` is the agent's own
/// file.
pub fn declares_backend(dir: &Path, skip: &str) -> std::io::Result<bool> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || name == skip || !entry.file_type()?.is_file() {
            continue;
        }
        if name.ends_with(".tf") {
            let text = std::fs::read_to_string(entry.path())?;
            if declares_backend_hcl(&text) {
                return Ok(true);
            }
        } else if name.ends_with(".tf.json") {
            let text = std::fs::read_to_string(entry.path())?;
            if text.contains("\"backend\"") || text.contains("\"cloud\"") {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_backend_blocks_and_ignores_comments_and_strings() {
        assert!(declares_backend_hcl(
            "terraform {\n  backend \"s3\" {\n    bucket = \"b\"\n  }\n}\n"
        ));
        assert!(declares_backend_hcl("terraform { backend \"local\"{} }"));
        assert!(declares_backend_hcl(
            "terraform {\n cloud {\n organization = \"o\" }\n}"
        ));
        assert!(!declares_backend_hcl(
            "# backend \"s3\" {\n// backend \"s3\" {\n/* backend \"s3\" { */\nresource \"null_resource\" \"a\" {}\n"
        ));
        assert!(!declares_backend_hcl(
            "locals { x = \"backend \\\"s3\\\" {\" }\nvariable \"backend\" {}\n"
        ));
        assert!(!declares_backend_hcl(
            "resource \"null_resource\" \"backend\" {\n  triggers = { backend = \"x\" }\n}\n"
        ));
        assert!(!declares_backend_hcl("backend = \"s3\"\n"));
    }

    #[test]
    fn scans_only_the_root_modules_visible_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("main.tf"),
            "resource \"null_resource\" \"a\" {}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(".hidden.tf"),
            "terraform { backend \"s3\" {} }",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("ours.tf"),
            "terraform { backend \"http\" {} }",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("modules")).unwrap();
        assert!(!declares_backend(dir.path(), "ours.tf").unwrap());
        std::fs::write(
            dir.path().join("backend.tf"),
            "terraform {\n backend \"s3\" {}\n}\n",
        )
        .unwrap();
        assert!(declares_backend(dir.path(), "ours.tf").unwrap());
    }
}
