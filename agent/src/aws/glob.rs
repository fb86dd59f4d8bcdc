//! `*` globs for the role allow-list: `*` matches any run of characters
//! (including `:` and `/`), everything else matches itself, case-sensitively
//! (IAM role ARNs are case-sensitive in their path and name).

/// Whether `text` matches `pattern`. Linear in practice: the classic
/// backtrack-to-the-last-star algorithm, no recursion.
pub fn matches(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0usize, 0usize);
    // Position after the last `*` seen, and where in `text` it started matching.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi + 1, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((after_star, started)) = star {
            // Let the last star swallow one more character.
            pi = after_star;
            ti = started + 1;
            star = Some((after_star, started + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Checks an allow-list pattern; the error says why it is unusable.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.trim().is_empty() {
        return Err("a pattern is empty".into());
    }
    if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("pattern {pattern:?} contains whitespace"));
    }
    if !pattern.starts_with("arn:") && pattern != "*" {
        return Err(format!(
            "pattern {pattern:?} must be a role ARN (starting with \"arn:\") or \"*\""
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str = "arn:aws:iam::123456789012:role/outpost/terraform-apply";

    #[test]
    fn literal_patterns_match_exactly() {
        assert!(matches(ROLE, ROLE));
        assert!(!matches(ROLE, &format!("{ROLE}x")));
        assert!(!matches(&format!("{ROLE}x"), ROLE));
        assert!(!matches(&ROLE.to_uppercase(), ROLE), "case-sensitive");
        assert!(!matches("", ROLE));
        assert!(matches("", ""));
    }

    #[test]
    fn stars_match_any_run_including_separators() {
        assert!(matches("*", ROLE));
        assert!(matches("arn:aws:iam::123456789012:role/*", ROLE));
        assert!(matches("arn:aws:iam::*:role/outpost/*", ROLE));
        assert!(matches(
            "arn:aws:iam::123456789012:role/*/terraform-*",
            ROLE
        ));
        assert!(matches(
            "arn:*:iam::123456789012:role/outpost/terraform-apply",
            ROLE
        ));
        assert!(matches("*apply", ROLE));
        assert!(matches(
            "arn:aws:iam::123456789012:role/outpost/terraform-apply*",
            ROLE
        ));
        assert!(matches("**", ROLE));
    }

    #[test]
    fn stars_do_not_widen_other_parts() {
        assert!(!matches("arn:aws:iam::123456789012:role/admin*", ROLE));
        assert!(!matches("arn:aws:iam::999999999999:role/*", ROLE));
        assert!(!matches("*plan", ROLE));
        assert!(!matches("arn:aws:iam::*:role/outpost/*-plan", ROLE));
        // A pattern for one account must not match a longer account id.
        assert!(!matches(
            "arn:aws:iam::12345678901:role/*",
            "arn:aws:iam::123456789012:role/x"
        ));
    }

    #[test]
    fn backtracking_finds_later_matches() {
        assert!(matches("*a*b*c", "xxaxxbxxaxxbxxc"));
        assert!(!matches("*a*b*c", "xxaxxbxxaxxbxx"));
        assert!(matches("a*a*a", "aaaaa"));
        assert!(!matches("a*a*a*a*a*a", "aaaaa"));
    }

    #[test]
    fn patterns_are_checked() {
        assert!(check_pattern("*").is_ok());
        assert!(check_pattern("arn:aws:iam::1:role/*").is_ok());
        assert!(check_pattern("").is_err());
        assert!(check_pattern("role/*").is_err());
        assert!(check_pattern("arn:aws:iam::1:role/a b").is_err());
    }
}
