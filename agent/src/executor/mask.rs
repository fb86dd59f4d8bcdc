//! Masking of secret values in a job's output stream.
//!
//! A job's output reaches the executor in chunks cut wherever the engine
//! chose, so a secret may be split across two (or more) chunks. [`Masker`]
//! decides a position only once what follows it settles the decision (at
//! least `max(len)` bytes follow, or no secret could still start there), so
//! every decision is the one masking the whole stream at once would make. It
//! keeps back the rest (the *carry*): at most `max(len) − 1` bytes, and only
//! from the first position where a secret may begin, so output that cannot
//! be part of a secret is never delayed. [`Masker::finish`] decides the carry
//! at the end of the stream.
//!
//! Properties (property tested below):
//!
//! - chunking does not matter: the concatenated output for any split of the
//!   input equals the output for the whole input;
//! - what was emitted so far is always a prefix of the masked whole, so a
//!   replay of the same stream (re-adoption) masked again from its start
//!   yields the same bytes at the same offsets;
//! - no secret value (that contains no `*`) is ever emitted;
//! - output without any secret value passes unchanged.
//!
//! Matching is leftmost, then longest: at each position the longest secret
//! starting there is replaced by [`MASK`].
//!
//! The executor masks stdout and stderr apart, so output on one stream
//! never splits a secret written to the other.
//!
//! What masking cannot catch: a secret transformed before printing (encoded,
//! quoted or escaped by `set -x`, split by other output written in between
//! to the same stream, or printed one line of a multi-line value at a time).
//! It guards against accidents, not against a job that means to leak.

use std::sync::Arc;

use bytes::Bytes;

/// What replaces each secret value.
pub const MASK: &[u8] = b"***";

/// A streaming replacer of secret values; see the module documentation.
#[derive(Clone)]
pub struct Masker {
    /// Distinct non-empty values, longest first.
    patterns: Arc<[Vec<u8>]>,
    /// Whether a byte starts some pattern.
    first: Arc<[bool; 256]>,
    carry: Vec<u8>,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field("patterns", &self.patterns.len())
            .field("carry", &self.carry.len())
            .finish()
    }
}

impl Masker {
    /// A masker for `secrets`; empty values are ignored.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a [u8]>) -> Masker {
        let mut patterns: Vec<Vec<u8>> = secrets
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        patterns.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        patterns.dedup();
        let mut first = [false; 256];
        for p in &patterns {
            if let Some(&b) = p.first() {
                first[usize::from(b)] = true;
            }
        }
        Masker {
            patterns: patterns.into(),
            first: Arc::new(first),
            carry: Vec::new(),
        }
    }

    /// Whether there is nothing to mask (output then passes through).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The same secrets with an empty carry, for a stream read again from
    /// its start.
    pub fn restart(&self) -> Masker {
        Masker {
            carry: Vec::new(),
            ..self.clone()
        }
    }

    /// Masks the next chunk; returns what can be emitted now (possibly
    /// nothing), keeping back at most `max(len) − 1` bytes that may begin a
    /// secret.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        if self.is_empty() {
            return chunk;
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(&chunk);
        let mut out = Vec::with_capacity(buf.len());
        let used = self.scan(&buf, &mut out, false);
        self.carry = buf.split_off(used);
        Bytes::from(out)
    }

    /// Ends the stream: masks and returns the carry.
    pub fn finish(&mut self) -> Bytes {
        let buf = std::mem::take(&mut self.carry);
        if buf.is_empty() {
            return Bytes::new();
        }
        let mut out = Vec::with_capacity(buf.len());
        let used = self.scan(&buf, &mut out, true);
        debug_assert_eq!(used, buf.len());
        Bytes::from(out)
    }

    /// Decides every position of `buf` whose decision cannot depend on
    /// bytes still to come (all of them at the end), in order, appending to
    /// `out`; returns the bytes consumed (up to the first undecided position).
    fn scan(&self, buf: &[u8], out: &mut Vec<u8>, at_end: bool) -> usize {
        let mut i = 0;
        while i < buf.len() {
            let Some(k) = buf[i..].iter().position(|&b| self.first[usize::from(b)]) else {
                out.extend_from_slice(&buf[i..]);
                return buf.len();
            };
            out.extend_from_slice(&buf[i..i + k]);
            i += k;
            let rest = &buf[i..];
            // A secret longer than what is left that begins with all of it:
            // only the next bytes can tell.
            if !at_end
                && self
                    .patterns
                    .iter()
                    .any(|p| p.len() > rest.len() && p.starts_with(rest))
            {
                return i;
            }
            match self.patterns.iter().find(|p| rest.starts_with(p)) {
                Some(p) => {
                    out.extend_from_slice(MASK);
                    i += p.len();
                }
                None => {
                    out.push(buf[i]);
                    i += 1;
                }
            }
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn mask_all(secrets: &[&[u8]], chunks: &[&[u8]]) -> Vec<u8> {
        let mut m = Masker::new(secrets.iter().copied());
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&m.push(Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&m.finish());
        out
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn masks_whole_and_split_values() {
        let s: &[&[u8]] = &[b"hunter2"];
        assert_eq!(mask_all(s, &[b"pw=hunter2!"]), b"pw=***!");
        assert_eq!(mask_all(s, &[b"pw=hun", b"ter2!"]), b"pw=***!");
        assert_eq!(
            mask_all(s, &[b"h", b"u", b"n", b"t", b"e", b"r", b"2"]),
            b"***"
        );
        assert_eq!(mask_all(s, &[b"hunter", b"3 hunter2"]), b"hunter3 ***");
        assert_eq!(
            mask_all(s, &[b"hunte"]),
            b"hunte",
            "a prefix at the end is not a secret"
        );
    }

    #[test]
    fn longest_value_wins_and_empty_values_are_ignored() {
        let s: &[&[u8]] = &[b"ab", b"abcd", b""];
        assert_eq!(mask_all(s, &[b"xabcdx abx"]), b"x***x ***x");
        assert_eq!(mask_all(&[b""], &[b"plain"]), b"plain");
        assert!(Masker::new([&b""[..]]).is_empty());
    }

    #[test]
    fn only_a_possible_secret_prefix_is_kept_back() {
        let mut m = Masker::new([&b"0123456789"[..], &b"xy"[..]]);
        // Nothing here can begin a secret: all of it goes out at once.
        let out = m.push(Bytes::from_static(b"aaaaaaaaaaaaaaaaaaaa\n"));
        assert_eq!(out, Bytes::from_static(b"aaaaaaaaaaaaaaaaaaaa\n"));
        assert!(m.carry.is_empty());
        let out = m.push(Bytes::from_static(b"abc 012345"));
        assert_eq!(out, Bytes::from_static(b"abc "));
        assert_eq!(m.carry, b"012345");
        let out = m.push(Bytes::from_static(b"6789 x"));
        assert_eq!(out, Bytes::from_static(b"*** "));
        assert_eq!(m.carry, b"x");
        // Never more than max(len) - 1 bytes.
        let out = m.push(Bytes::from_static(b"0123456780123"));
        assert_eq!(out, Bytes::from_static(b"x012345678"));
        assert_eq!(m.carry, b"0123");
        assert_eq!(m.finish(), Bytes::from_static(b"0123"));
    }

    #[test]
    fn restart_forgets_the_carry() {
        let mut m = Masker::new([&b"secret"[..]]);
        let _ = m.push(Bytes::from_static(b"sec"));
        let mut again = m.restart();
        assert_eq!(
            again.push(Bytes::from_static(b"ret")),
            Bytes::from_static(b"ret")
        );
        assert_eq!(again.finish(), Bytes::new());
    }

    /// Splits `data` at the given (sorted, deduplicated) cut points.
    fn split<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        points.sort_unstable();
        points.dedup();
        let mut parts = Vec::new();
        let mut from = 0;
        for p in points {
            parts.push(&data[from..p]);
            from = p;
        }
        parts.push(&data[from..]);
        parts
    }

    fn secret() -> impl Strategy<Value = Vec<u8>> {
        // A small alphabet makes overlaps, repeats and near misses common.
        proptest::collection::vec(prop::sample::select(b"abcx\n".to_vec()), 1..8)
    }

    /// Output made of noise and secret values, so that matches are frequent.
    fn output(secrets: Vec<Vec<u8>>) -> impl Strategy<Value = (Vec<Vec<u8>>, Vec<u8>)> {
        let n = secrets.len();
        let piece = prop_oneof![
            proptest::collection::vec(prop::sample::select(b"abcxy*\n".to_vec()), 0..6),
            (0..n).prop_map(|i| vec![0xff, i as u8]),
        ];
        proptest::collection::vec(piece, 0..40).prop_map(move |pieces| {
            let mut data = Vec::new();
            for p in pieces {
                match p.as_slice() {
                    [0xff, i] => data.extend_from_slice(&secrets[usize::from(*i)]),
                    other => data.extend_from_slice(other),
                }
            }
            (secrets.clone(), data)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn chunking_does_not_matter(
            (secrets, data) in proptest::collection::vec(secret(), 1..4).prop_flat_map(output),
            cuts in proptest::collection::vec(0usize..1000, 0..12),
        ) {
            let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
            let whole = mask_all(&refs, &[&data]);
            let chunked = mask_all(&refs, &split(&data, &cuts));
            prop_assert_eq!(&chunked, &whole);
        }

        #[test]
        fn what_is_emitted_is_a_prefix_of_the_masked_whole(
            (secrets, data) in proptest::collection::vec(secret(), 1..4).prop_flat_map(output),
            cut in 0usize..1000,
        ) {
            let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
            let whole = mask_all(&refs, &[&data]);
            let cut = cut % (data.len() + 1);
            let mut m = Masker::new(refs.iter().copied());
            let early = m.push(Bytes::copy_from_slice(&data[..cut]));
            prop_assert!(whole.starts_with(&early));
        }

        #[test]
        fn no_secret_is_ever_emitted(
            (secrets, data) in proptest::collection::vec(secret(), 1..4).prop_flat_map(output),
            cuts in proptest::collection::vec(0usize..1000, 0..12),
        ) {
            let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
            let masked = mask_all(&refs, &split(&data, &cuts));
            for s in &secrets {
                prop_assert!(!contains(&masked, s), "{:?} in {:?}", s, masked);
            }
        }

        #[test]
        fn output_without_secrets_passes_unchanged(
            secrets in proptest::collection::vec(secret(), 0..4),
            data in proptest::collection::vec(
                prop_oneof![prop::sample::select(b"abcx\n".to_vec()), any::<u8>()]
                    .prop_filter("no z", |b| *b != b'z'),
                0..300,
            ),
            cuts in proptest::collection::vec(0usize..1000, 0..12),
        ) {
            // Every secret ends in a byte the data lacks, so none occurs in
            // it, while their prefixes occur often.
            let secrets: Vec<Vec<u8>> = secrets
                .into_iter()
                .map(|mut s| {
                    s.push(b'z');
                    s
                })
                .collect();
            let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(mask_all(&refs, &split(&data, &cuts)), data);
        }
    }
}
