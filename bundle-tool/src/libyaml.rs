//! A safe event reader over libyaml (the `unsafe-libyaml-norway` port,
//! the same parser serde_norway uses). [`crate::yaml`] needs what
//! serde_norway's `Value` hides: each scalar's style (plain or quoted, to
//! resolve plain scalars by YAML 1.1 rules as kubectl does) and each
//! node's line (for duplicate keys and warnings).
//!
//! All `unsafe` of the YAML path is here. The parser is boxed (libyaml
//! keeps pointers into its own buffers), reads from a borrowed byte slice
//! that outlives it, and every event is copied into owned Rust values and
//! freed before the next call.

use std::marker::PhantomData;
use std::mem::MaybeUninit;
use unsafe_libyaml_norway as unsafe_sys;

/// Where an event starts: 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

/// How a scalar was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Unquoted: resolved by the schema (`yes`, `0755`, `~`).
    Plain,
    /// Quoted, literal (`|`) or folded (`>`): always a string.
    Quoted,
}

/// One parser event, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Start of the stream.
    StreamStart,
    /// End of the stream.
    StreamEnd,
    /// Start of a document.
    DocumentStart,
    /// End of a document.
    DocumentEnd,
    /// `*name`.
    Alias(String),
    /// A scalar.
    Scalar {
        /// `&name`, if any.
        anchor: Option<String>,
        /// The resolved tag (`tag:yaml.org,2002:str`), if any.
        tag: Option<String>,
        /// The text.
        value: String,
        /// Plain or quoted.
        style: Style,
    },
    /// Start of a sequence.
    SequenceStart {
        /// `&name`, if any.
        anchor: Option<String>,
        /// The resolved tag, if any.
        tag: Option<String>,
    },
    /// End of a sequence.
    SequenceEnd,
    /// Start of a mapping.
    MappingStart {
        /// `&name`, if any.
        anchor: Option<String>,
        /// The resolved tag, if any.
        tag: Option<String>,
    },
    /// End of a mapping.
    MappingEnd,
}

/// A syntax error, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    /// Where.
    pub mark: Mark,
    /// libyaml's problem and context.
    pub message: String,
}

/// Reads events from a UTF-8 text.
pub struct Parser<'input> {
    sys: Box<MaybeUninit<unsafe_sys::yaml_parser_t>>,
    done: bool,
    _input: PhantomData<&'input [u8]>,
}

fn mark(m: unsafe_sys::yaml_mark_t) -> Mark {
    Mark {
        line: usize::try_from(m.line)
            .unwrap_or(usize::MAX)
            .saturating_add(1),
        column: usize::try_from(m.column)
            .unwrap_or(usize::MAX)
            .saturating_add(1),
    }
}

/// Copies a NUL-terminated libyaml string.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string.
unsafe fn c_string(p: *const u8) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated (libyaml's contract).
    let s = unsafe { std::ffi::CStr::from_ptr(p.cast()) };
    Some(String::from_utf8_lossy(s.to_bytes()).into_owned())
}

impl<'input> Parser<'input> {
    /// A parser reading `input` (UTF-8).
    pub fn new(input: &'input str) -> Self {
        let mut boxed: Box<MaybeUninit<unsafe_sys::yaml_parser_t>> =
            Box::new(MaybeUninit::uninit());
        let p = boxed.as_mut_ptr();
        // SAFETY: `p` points to writable memory for a parser;
        // yaml_parser_initialize zeroes and initialises it (it fails only
        // on allocation failure, which aborts in Rust's allocator anyway).
        // The input slice outlives the parser (the `'input` lifetime).
        unsafe {
            let _ = unsafe_sys::yaml_parser_initialize(p);
            unsafe_sys::yaml_parser_set_encoding(p, unsafe_sys::YAML_UTF8_ENCODING);
            unsafe_sys::yaml_parser_set_input_string(p, input.as_ptr(), input.len() as _);
        }
        Parser {
            sys: boxed,
            done: false,
            _input: PhantomData,
        }
    }

    /// The next event and where it starts; `Ok(None)` after the stream's
    /// end.
    pub fn next_event(&mut self) -> Result<Option<(Event, Mark)>, SyntaxError> {
        if self.done {
            return Ok(None);
        }
        let p = self.sys.as_mut_ptr();
        let mut ev = MaybeUninit::<unsafe_sys::yaml_event_t>::uninit();
        // SAFETY: the parser was initialised in `new` and is not moved (it
        // is boxed). On success the event is initialised; every pointer
        // read below is one libyaml set for this event type, and the event
        // is deleted before returning.
        unsafe {
            if unsafe_sys::yaml_parser_parse(p, ev.as_mut_ptr()).fail {
                self.done = true;
                let parser = &*p;
                let problem =
                    c_string(parser.problem.cast()).unwrap_or_else(|| "syntax error".into());
                let message = match c_string(parser.context.cast()) {
                    Some(c) => format!("{problem}, {c}"),
                    None => problem,
                };
                return Err(SyntaxError {
                    mark: mark(parser.problem_mark),
                    message,
                });
            }
            let ev = ev.as_mut_ptr();
            let e = &*ev;
            let at = mark(e.start_mark);
            let out = match e.type_ {
                unsafe_sys::YAML_STREAM_START_EVENT => Event::StreamStart,
                unsafe_sys::YAML_STREAM_END_EVENT => {
                    self.done = true;
                    Event::StreamEnd
                }
                unsafe_sys::YAML_DOCUMENT_START_EVENT => Event::DocumentStart,
                unsafe_sys::YAML_DOCUMENT_END_EVENT => Event::DocumentEnd,
                unsafe_sys::YAML_ALIAS_EVENT => {
                    Event::Alias(c_string(e.data.alias.anchor).unwrap_or_default())
                }
                unsafe_sys::YAML_SCALAR_EVENT => {
                    let s = e.data.scalar;
                    let bytes = if s.value.is_null() {
                        &[][..]
                    } else {
                        std::slice::from_raw_parts(s.value, s.length as usize)
                    };
                    Event::Scalar {
                        anchor: c_string(s.anchor),
                        tag: c_string(s.tag),
                        value: String::from_utf8_lossy(bytes).into_owned(),
                        style: if s.style == unsafe_sys::YAML_PLAIN_SCALAR_STYLE {
                            Style::Plain
                        } else {
                            Style::Quoted
                        },
                    }
                }
                unsafe_sys::YAML_SEQUENCE_START_EVENT => Event::SequenceStart {
                    anchor: c_string(e.data.sequence_start.anchor),
                    tag: c_string(e.data.sequence_start.tag),
                },
                unsafe_sys::YAML_SEQUENCE_END_EVENT => Event::SequenceEnd,
                unsafe_sys::YAML_MAPPING_START_EVENT => Event::MappingStart {
                    anchor: c_string(e.data.mapping_start.anchor),
                    tag: c_string(e.data.mapping_start.tag),
                },
                unsafe_sys::YAML_MAPPING_END_EVENT => Event::MappingEnd,
                _ => {
                    unsafe_sys::yaml_event_delete(ev);
                    self.done = true;
                    return Err(SyntaxError {
                        mark: at,
                        message: "unexpected parser event".into(),
                    });
                }
            };
            unsafe_sys::yaml_event_delete(ev);
            Ok(Some((out, at)))
        }
    }
}

impl Drop for Parser<'_> {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, deleted exactly once.
        unsafe { unsafe_sys::yaml_parser_delete(self.sys.as_mut_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(t: &str) -> Vec<Event> {
        let mut p = Parser::new(t);
        let mut out = Vec::new();
        while let Some((e, _)) = p.next_event().unwrap() {
            out.push(e);
        }
        out
    }

    #[test]
    fn styles_tags_and_anchors_are_reported() {
        let ev = events("a: &x yes\nb: 'yes'\nc: !!str 1\nd: *x\n");
        let scalars: Vec<_> = ev
            .iter()
            .filter_map(|e| match e {
                Event::Scalar {
                    value,
                    style,
                    tag,
                    anchor,
                } => Some((value.as_str(), *style, tag.clone(), anchor.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(scalars[1], ("yes", Style::Plain, None, Some("x".into())));
        assert_eq!(scalars[3], ("yes", Style::Quoted, None, None));
        assert_eq!(
            scalars[5],
            (
                "1",
                Style::Plain,
                Some("tag:yaml.org,2002:str".into()),
                None
            )
        );
        assert!(ev.contains(&Event::Alias("x".into())));
    }

    #[test]
    fn errors_carry_the_line() {
        let mut p = Parser::new("a: b\nc: [unclosed\n");
        let e = loop {
            match p.next_event() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("no error"),
                Err(e) => break e,
            }
        };
        assert!(e.mark.line >= 2, "{e:?}");
        assert!(!e.message.is_empty());
        // After an error the parser stays finished.
        assert_eq!(p.next_event(), Ok(None));
    }
}
