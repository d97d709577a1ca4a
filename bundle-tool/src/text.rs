//! Text from untrusted sources (peers' gossip, unverified files) made safe
//! for a terminal or a text log.

use std::borrow::Cow;
use std::fmt::Write;

/// `s` with every control character (C0, DEL, C1: ESC starts ANSI
/// sequences), Unicode bidirectional and invisible format character, and
/// the backslash written as a Rust-style escape (`\u{1b}`, `\\`), so the
/// result never moves the cursor, recolours, hides or reorders text, and
/// distinct inputs stay distinct. Text with none of them is borrowed.
pub fn escape_untrusted(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if needs_escape(c) {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}'   // zero-width, LRM, RLM
            | '\u{2028}'..='\u{202e}' // line/paragraph separators, bidi embeddings
            | '\u{2060}'..='\u{2069}' // word joiner, bidi isolates
            | '\u{feff}'              // BOM / zero-width no-break space
            | '\u{061c}'              // Arabic letter mark
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_ansi_and_bidi_are_escaped() {
        assert!(matches!(
            escape_untrusted("edge-17 healthy"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            escape_untrusted("\u{1b}[2J\u{1b}[31mfailed\r\n"),
            "\\u{1b}[2J\\u{1b}[31mfailed\\u{d}\\u{a}"
        );
        assert_eq!(escape_untrusted("a\u{202e}b\u{9b}c"), "a\\u{202e}b\\u{9b}c");
        assert_eq!(escape_untrusted("tab\there\u{7f}"), "tab\\u{9}here\\u{7f}");
        // The backslash itself is escaped, so an escape cannot be faked.
        assert_eq!(escape_untrusted("\\u{1b}"), "\\\\u{1b}");
        assert_eq!(escape_untrusted("région ✓"), "région ✓");
        for c in (0u32..0x20).chain(0x7f..0xa0) {
            let s = char::from_u32(c).unwrap().to_string();
            assert!(
                !escape_untrusted(&s).chars().any(char::is_control),
                "{c:#x}"
            );
        }
    }
}
