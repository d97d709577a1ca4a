//! Showing untrusted text safely.
//!
//! Strings that come from unverified or peer-supplied data (channel and
//! file names read before a signature check, gossip labels, peer error
//! strings) may carry terminal control sequences: an ANSI escape can
//! recolour, hide or rewrite what an operator sees, a carriage return can
//! overwrite a log line, a bidi override can reorder it. Every such string
//! passes through [`escape_untrusted`] before it reaches a terminal or a
//! text log.

/// `s` with every character that could control a terminal or reorder
/// text written as a visible escape: ASCII controls (including ESC, so an
/// ANSI sequence `ESC[31m` shows as `\x1b[31m`) and DEL as `\xNN`,
/// `\t` `\n` `\r` as themselves escaped, other Unicode controls (C1,
/// U+0085), bidi embeddings, overrides and isolates, zero-width and line/
/// paragraph separators as `\u{NNNN}`. Printable text, including
/// non-ASCII letters and backslashes, is unchanged, so escaping twice (at
/// the source of an error and again where it is printed) changes nothing.
pub fn escape_untrusted(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if is_unsafe_unicode(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Non-ASCII characters that control a terminal or change how the text
/// around them is displayed.
fn is_unsafe_unicode(c: char) -> bool {
    c.is_control() // C1 controls U+0080..=U+009F (U+009B is a one-byte CSI)
        || matches!(c,
            '\u{200b}'..='\u{200f}' // zero-width spaces/joiners, LRM, RLM
            | '\u{2028}' | '\u{2029}' // line and paragraph separators
            | '\u{202a}'..='\u{202e}' // bidi embeddings and overrides
            | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
            | '\u{2066}'..='\u{2069}' // bidi isolates
            | '\u{feff}' // zero-width no-break space (BOM)
        )
}

#[cfg(test)]
mod tests {
    use super::escape_untrusted;
    use proptest::prelude::*;

    #[test]
    fn ansi_sequences_and_controls_are_escaped() {
        assert_eq!(
            escape_untrusted("\u{1b}[31mred\u{1b}[0m"),
            "\\x1b[31mred\\x1b[0m"
        );
        assert_eq!(escape_untrusted("a\rb\nc\td\0"), "a\\rb\\nc\\td\\x00");
        assert_eq!(escape_untrusted("\u{7f}\u{9b}2J"), "\\x7f\\u{9b}2J");
        assert_eq!(escape_untrusted("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(escape_untrusted("a\\x1b"), "a\\x1b");
    }

    #[test]
    fn printable_text_is_unchanged() {
        for s in ["stable", "edge-berlin_1.x", "Grüße, 東京", "a b: `c`"] {
            assert_eq!(escape_untrusted(s), s);
        }
    }

    proptest! {
        #[test]
        fn output_has_no_control_characters(s in ".*") {
            let e = escape_untrusted(&s);
            prop_assert!(!e.chars().any(|c| c.is_control() || super::is_unsafe_unicode(c)), "{e:?}");
            prop_assert_eq!(escape_untrusted(&e), e);
        }
    }
}
