//! YAML text to JSON values, hardened against hostile input. The one
//! module that touches the YAML parser (serde_norway).
//!
//! libyaml (under serde_norway) takes time quadratic in the flow nesting
//! depth (`[[[[...`), and expanding aliases can turn a few kilobytes into
//! gigabytes ("billion laughs"). So before the parser sees a byte, a
//! linear pre-scan ([`prescan`]) walks the text once and refuses, naming
//! the line and column:
//!
//! * nesting (flow collections, block indentation levels and compact
//!   `- - -` sequences together) deeper than [`MAX_NESTING`];
//! * aliases whose expansion would add more than [`MAX_ALIAS_EXPANSION`]
//!   bytes to a document (each anchored node's size is estimated from the
//!   text, generously, and aliases inside anchored nodes multiply);
//! * every tag except the core schema's `!!str`, `!!int`, `!!float`,
//!   `!!bool`, `!!null`, `!!map` and `!!seq` (so `!!python/...`,
//!   `!!binary`, `!custom`, `!<verbatim>` and `%TAG` directives), instead of
//!   letting a tag be dropped or misread further down.
//!
//! The scanner is deliberately conservative: it follows YAML's rules for
//! where a node starts (so `key: a[0]` or `echo hi!` are plain text), skips
//! comments, quoted scalars and block scalars, and over-estimates where it
//! has to. Only then is the text parsed.
//!
//! Two readers follow the scan. [`transcode_documents`] writes libyaml's
//! events straight as canonical JSON (the builder's common case: no value
//! tree, one buffer per document, a mapping's members sorted when it
//! ends); it gives up on whatever it does not handle exactly as the
//! composer does (anchors, aliases, merge keys, tags, duplicate or
//! non-string keys, errors), and [`parse_documents`] (events composed into
//! `serde_json::Value`s) then gives the result or the error. Sorting
//! copies a mapping's bytes once when it ends, so a document costs at most
//! its size times its nesting depth (≤ [`MAX_NESTING`]) in copies, and no
//! more memory than twice its canonical size.

use crate::libyaml::{Event, Mark, Parser, Style};
use cairn_keys::text::escape_untrusted;
use std::collections::HashMap;

/// Deepest nesting of collections accepted (flow and block together).
/// Kubernetes objects, even CRD schemas, stay well below; serde_norway's
/// own recursion limit is 128.
pub const MAX_NESTING: usize = 100;

/// Most bytes alias expansion may add to one document (16 MiB).
pub const MAX_ALIAS_EXPANSION: u64 = 16 << 20;

/// Tags of the YAML core schema that are accepted.
pub const CORE_TAGS: &[&str] = &[
    "!!str", "!!int", "!!float", "!!bool", "!!null", "!!map", "!!seq",
];

/// A YAML problem: what, and where (1-based line and column when known).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct YamlError {
    /// 1-based line, if known.
    pub line: Option<usize>,
    /// 1-based column, if known.
    pub column: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for YamlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "line {l} column {c}: {}", self.reason),
            // Parser errors carry their position in the reason.
            _ => f.write_str(&self.reason),
        }
    }
}

fn at(line: usize, col: usize, reason: String) -> YamlError {
    YamlError {
        line: Some(line + 1),
        column: Some(col + 1),
        reason,
    }
}

/// One YAML document of a stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// Index in the stream (0-based, counting empty documents).
    pub index: u32,
    /// 1-based line where the document starts.
    pub line: usize,
    /// The document as JSON; `None` for an empty document.
    pub value: Option<serde_json::Value>,
    /// Plain scalars that YAML 1.1 (kubectl) and YAML 1.2 read
    /// differently, one message each, starting with `line N: `.
    pub warnings: Vec<String>,
}

const TAG_STR: &str = "tag:yaml.org,2002:str";
const TAG_INT: &str = "tag:yaml.org,2002:int";
const TAG_FLOAT: &str = "tag:yaml.org,2002:float";
const TAG_BOOL: &str = "tag:yaml.org,2002:bool";
const TAG_NULL: &str = "tag:yaml.org,2002:null";
const TAG_MAP: &str = "tag:yaml.org,2002:map";
const TAG_SEQ: &str = "tag:yaml.org,2002:seq";

fn err_at(m: Mark, reason: String) -> YamlError {
    YamlError {
        line: Some(m.line),
        column: Some(m.column),
        reason,
    }
}

fn where_(path: &[String]) -> String {
    if path.is_empty() {
        "the document".to_owned()
    } else {
        format!("`{}`", escape_untrusted(&path.join(".")))
    }
}

/// Builds JSON values from parser events.
struct Composer<'a> {
    parser: Parser<'a>,
    anchors: HashMap<String, serde_json::Value>,
    warnings: Vec<String>,
}

impl Composer<'_> {
    fn next(&mut self) -> Result<(Event, Mark), YamlError> {
        match self.parser.next_event() {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err(YamlError {
                line: None,
                column: None,
                reason: "invalid YAML: unexpected end of the stream".into(),
            }),
            Err(e) => Err(YamlError {
                line: Some(e.mark.line),
                column: None,
                reason: format!(
                    "invalid YAML at line {} column {}: {}",
                    e.mark.line, e.mark.column, e.message
                ),
            }),
        }
    }

    fn node(
        &mut self,
        ev: Event,
        m: Mark,
        path: &mut Vec<String>,
    ) -> Result<serde_json::Value, YamlError> {
        use serde_json::Value as J;
        match ev {
            Event::Alias(name) => self.anchors.get(&name).cloned().ok_or_else(|| {
                err_at(
                    m,
                    format!(
                        "{}: alias `*{}` names no anchor before it",
                        where_(path),
                        escape_untrusted(&name)
                    ),
                )
            }),
            Event::Scalar {
                anchor,
                tag,
                value,
                style,
            } => {
                let v = self.scalar(&value, tag.as_deref(), style, m, path)?;
                if let Some(a) = anchor {
                    self.anchors.insert(a, v.clone());
                }
                Ok(v)
            }
            Event::SequenceStart { anchor, tag } => {
                if tag.as_deref().is_some_and(|t| t != TAG_SEQ) {
                    return Err(err_at(m, format!("{}: tag on a sequence", where_(path))));
                }
                let mut items = Vec::new();
                loop {
                    let (ev, m2) = self.next()?;
                    if ev == Event::SequenceEnd {
                        break;
                    }
                    path.push(items.len().to_string());
                    items.push(self.node(ev, m2, path)?);
                    path.pop();
                }
                let v = J::Array(items);
                if let Some(a) = anchor {
                    self.anchors.insert(a, v.clone());
                }
                Ok(v)
            }
            Event::MappingStart { anchor, tag } => {
                if tag.as_deref().is_some_and(|t| t != TAG_MAP) {
                    return Err(err_at(m, format!("{}: tag on a mapping", where_(path))));
                }
                let v = self.mapping(path)?;
                if let Some(a) = anchor {
                    self.anchors.insert(a, v.clone());
                }
                Ok(v)
            }
            _ => Err(err_at(m, "invalid YAML: unexpected event".into())),
        }
    }

    fn mapping(&mut self, path: &mut Vec<String>) -> Result<serde_json::Value, YamlError> {
        use serde_json::Value as J;
        let mut out = serde_json::Map::new();
        let mut lines: HashMap<String, usize> = HashMap::new();
        let mut merges: Vec<(J, Mark)> = Vec::new();
        loop {
            let (kev, km) = self.next()?;
            if kev == Event::MappingEnd {
                break;
            }
            let merge = matches!(
                &kev,
                Event::Scalar { value, style: Style::Plain, tag: None, .. } if value == "<<"
            );
            if merge {
                let (vev, vm) = self.next()?;
                path.push("<<".into());
                let v = self.node(vev, vm, path)?;
                path.pop();
                merges.push((v, vm));
                continue;
            }
            let key = self.key(kev, km, path)?;
            if let Some(first) = lines.get(&key) {
                return Err(err_at(
                    km,
                    format!(
                        "{}: duplicate key `{}` (first at line {first})",
                        where_(path),
                        escape_untrusted(&key)
                    ),
                ));
            }
            lines.insert(key.clone(), km.line);
            let (vev, vm) = self.next()?;
            // The key moves into the path and back out (no copy).
            path.push(key);
            let v = self.node(vev, vm, path)?;
            let key = path.pop().unwrap_or_default();
            out.insert(key, v);
        }
        // Merge keys: explicit keys win, then earlier merged maps.
        for (v, m) in merges {
            let sources = match v {
                J::Object(o) => vec![J::Object(o)],
                J::Array(items) => items,
                _ => {
                    return Err(err_at(
                        m,
                        format!(
                            "{}: YAML merge key `<<` needs a mapping or a sequence of mappings",
                            where_(path)
                        ),
                    ))
                }
            };
            for s in sources {
                let J::Object(s) = s else {
                    return Err(err_at(
                        m,
                        format!(
                            "{}: YAML merge key `<<` needs a mapping or a sequence of mappings",
                            where_(path)
                        ),
                    ));
                };
                for (k, v) in s {
                    out.entry(k).or_insert(v);
                }
            }
        }
        Ok(J::Object(out))
    }

    /// A mapping key. Keys are the one place the YAML 1.2 core schema is
    /// kept: kubectl would turn a key `y`, `no` or `on` into `"true"` or
    /// `"false"` (sigs.k8s.io/yaml stringifies YAML 1.1 booleans), which
    /// no author means; such keys stay text, with a warning. Keys that
    /// both schemas read as non-strings (`1`, `true`, `~`) are refused.
    fn key(&mut self, ev: Event, m: Mark, path: &mut Vec<String>) -> Result<String, YamlError> {
        let not_string = |path: &[String], text: &str, what: &serde_json::Value| {
            err_at(
                m,
                format!(
                    "{}: mapping key `{}` is not a string (YAML reads it as {what}); JSON (and Kubernetes) needs string keys, quote it",
                    where_(path),
                    escape_untrusted(text)
                ),
            )
        };
        match ev {
            Event::Scalar {
                anchor,
                tag: None,
                value,
                style: Style::Plain,
            } => {
                let v12 = resolve_yaml12(&value);
                match v12 {
                    Some(serde_json::Value::String(_)) => {}
                    Some(other) => return Err(not_string(path, &value, &other)),
                    None => return Err(not_string(path, &value, &serde_json::Value::Null)),
                }
                if let Ok(v11 @ serde_json::Value::Bool(_)) = resolve_yaml11(&value) {
                    self.warnings.push(format!(
                        "line {}: {}: key `{}` is kept as text; kubectl would send it as the key `{v11}` (YAML 1.1); quote it to silence this",
                        m.line,
                        where_(path),
                        escape_untrusted(&value)
                    ));
                }
                if let Some(a) = anchor {
                    self.anchors
                        .insert(a, serde_json::Value::String(value.clone()));
                }
                Ok(value)
            }
            Event::Scalar { .. } | Event::Alias(_) => {
                let text = match &ev {
                    Event::Scalar { value, .. } => value.clone(),
                    Event::Alias(name) => format!("*{name}"),
                    _ => String::new(),
                };
                match self.node(ev, m, path)? {
                    serde_json::Value::String(s) => Ok(s),
                    other => Err(not_string(path, &text, &other)),
                }
            }
            _ => Err(err_at(
                m,
                format!(
                    "{}: a mapping or sequence used as a mapping key; JSON (and Kubernetes) needs string keys",
                    where_(path)
                ),
            )),
        }
    }

    fn scalar(
        &mut self,
        value: &str,
        tag: Option<&str>,
        style: Style,
        m: Mark,
        path: &[String],
    ) -> Result<serde_json::Value, YamlError> {
        use serde_json::Value as J;
        let resolved =
            |v: &str| resolve_yaml11(v).map_err(|e| err_at(m, format!("{}: {e}", where_(path))));
        match tag {
            None if style == Style::Plain => {
                plain_scalar(value, m, &mut self.warnings, || where_(path))
            }
            None | Some(TAG_STR) => Ok(J::String(value.to_owned())),
            Some(t @ (TAG_INT | TAG_FLOAT | TAG_BOOL | TAG_NULL)) => {
                let v = resolved(value)?;
                let ok = match t {
                    TAG_INT => v.is_i64() || v.is_u64(),
                    TAG_FLOAT => v.is_number(),
                    TAG_BOOL => v.is_boolean(),
                    _ => v.is_null(),
                };
                if !ok {
                    return Err(err_at(
                        m,
                        format!(
                            "{}: `{}` is not a valid !!{}",
                            where_(path),
                            escape_untrusted(value),
                            t.rsplit(':').next().unwrap_or(t)
                        ),
                    ));
                }
                Ok(v)
            }
            Some(t) => Err(err_at(
                m,
                format!(
                    "{}: YAML tag `{}` is not supported in Kubernetes manifests",
                    where_(path),
                    escape_untrusted(t)
                ),
            )),
        }
    }
}

/// A plain, untagged scalar read as kubectl reads it (YAML 1.1), with a
/// warning in `warnings` where YAML 1.2 reads it differently. `where_`
/// names the node (`the document` or a backquoted key path); it is called
/// only for a warning or an error.
fn plain_scalar(
    value: &str,
    m: Mark,
    warnings: &mut Vec<String>,
    where_: impl Fn() -> String,
) -> Result<serde_json::Value, YamlError> {
    let v = resolve_yaml11(value).map_err(|e| err_at(m, format!("{}: {e}", where_())))?;
    // Text YAML 1.1 reads as a string and that does not start like a
    // number is a string in YAML 1.2 too (1.2's nulls and booleans are
    // 1.1's as well): no second resolution.
    if v.is_string()
        && !matches!(
            value.as_bytes().first(),
            Some(b'0'..=b'9' | b'+' | b'-' | b'.')
        )
    {
        return Ok(v);
    }
    let v12 = resolve_yaml12(value);
    if v12.as_ref() != Some(&v) {
        let other = match v12 {
            Some(x) => x.to_string(),
            None => "a number JSON cannot hold".into(),
        };
        warnings.push(format!(
            "line {}: {}: `{}` is read as {v} (YAML 1.1, as `kubectl apply -f` reads it) where YAML 1.2{} reads {}; write it as {v}, or quote it for the text",
            m.line,
            where_(),
            escape_untrusted(value),
            // Kustomize (go-yaml v3) keeps 1.1's numbers but not its
            // booleans.
            if v.is_boolean() { " (and so Kustomize)" } else { "" },
            escape_untrusted(&other),
        ));
    }
    Ok(v)
}

/// A number as kubectl sends it: Go encodes YAML's numbers as JSON, and
/// Kubernetes' JSON decoder reads every number that parses as a 64-bit
/// signed integer as one (so `1e1` and `10.0` are the integer 10), and
/// every other number as a float (so 2^64-1 becomes a float).
pub fn kube_number_f64(f: f64) -> Option<serde_json::Value> {
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    if f.fract() == 0.0 && (-TWO_63..TWO_63).contains(&f) {
        Some(serde_json::Value::from(f as i64))
    } else {
        serde_json::Number::from_f64(f).map(serde_json::Value::Number)
    }
}

/// [`kube_number_f64`] applied to every number of a JSON value (for
/// `.json` manifests).
pub fn kube_numbers(v: &mut serde_json::Value) {
    use serde_json::Value as J;
    match v {
        J::Number(n) => {
            if n.is_i64() {
                return;
            }
            if let Some(x) = n.as_f64().and_then(kube_number_f64) {
                *v = x;
            }
        }
        J::Array(a) => a.iter_mut().for_each(kube_numbers),
        J::Object(o) => o.values_mut().for_each(kube_numbers),
        _ => {}
    }
}

/// Go's `strconv.ParseUint(s, 0, 64)`: `0x`, `0o`, `0b` prefixes, a
/// leading `0` for octal, no sign.
fn go_parse_uint(s: &str) -> Option<u64> {
    let (digits, radix) = if let Some(r) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (r, 16)
    } else if let Some(r) = s.strip_prefix("0o").or_else(|| s.strip_prefix("0O")) {
        (r, 8)
    } else if let Some(r) = s.strip_prefix("0b").or_else(|| s.strip_prefix("0B")) {
        (r, 2)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// Go's `strconv.ParseInt(s, 0, 64)`.
fn go_parse_int(s: &str) -> Option<i64> {
    let (neg, rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let u = go_parse_uint(rest)?;
    if neg {
        if u <= i64::MAX as u64 + 1 {
            Some((u as i128).wrapping_neg() as i64)
        } else {
            None
        }
    } else {
        i64::try_from(u).ok()
    }
}

/// go-yaml v2's `yamlStyleFloat`:
/// `^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`.
fn yaml_style_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    if matches!(b.first(), Some(b'-' | b'+')) {
        i += 1;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    } else {
        if digits(&mut i) == 0 {
            return false;
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            digits(&mut i);
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// A plain scalar read as kubectl reads it: go-yaml v2's `resolve`
/// (YAML 1.1 booleans and nulls, Go integer syntax with `_` separators,
/// its float pattern; timestamps stay strings), then numbers as
/// [`kube_number_f64`]. Infinities and NaN are refused (kubectl refuses
/// them too: JSON has no such numbers).
pub fn resolve_yaml11(s: &str) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Ok(J::Null),
        "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
            return Ok(J::Bool(true))
        }
        "n" | "N" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
            return Ok(J::Bool(false))
        }
        ".nan" | ".NaN" | ".NAN" | ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF"
        | "-.inf" | "-.Inf" | "-.INF" => {
            return Err(format!(
            "`{s}` cannot be represented in JSON (kubectl refuses it too); quote it for the text"
        ))
        }
        _ => {}
    }
    let string = || Ok(J::String(s.to_owned()));
    match s.as_bytes()[0] {
        b'.' => {
            if s[1..]
                .bytes()
                .all(|c| c.is_ascii_digit() || matches!(c, b'e' | b'E' | b'+' | b'-' | b'.'))
            {
                if let Some(v) = s.parse::<f64>().ok().filter(|f| f.is_finite()) {
                    return Ok(kube_number_f64(v).unwrap_or(J::Null));
                }
            }
            string()
        }
        b'0'..=b'9' | b'+' | b'-' => {
            let plain = s.replace('_', "");
            if let Some(i) = go_parse_int(&plain) {
                return Ok(J::from(i));
            }
            if let Some(u) = go_parse_uint(&plain) {
                return Ok(kube_number_f64(u as f64).unwrap_or(J::Null));
            }
            if yaml_style_float(&plain) {
                if let Some(v) = plain.parse::<f64>().ok().filter(|f| f.is_finite()) {
                    return Ok(kube_number_f64(v).unwrap_or(J::Null));
                }
            }
            string()
        }
        _ => string(),
    }
}

/// A plain scalar read by the YAML 1.2 core schema (numbers normalised as
/// [`resolve_yaml11`] does); `None` where 1.2 reads a number JSON cannot
/// hold. Used only to warn where the two schemas differ.
pub fn resolve_yaml12(s: &str) -> Option<serde_json::Value> {
    use serde_json::Value as J;
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Some(J::Null),
        "true" | "True" | "TRUE" => return Some(J::Bool(true)),
        "false" | "False" | "FALSE" => return Some(J::Bool(false)),
        _ => {}
    }
    let unsigned = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<f64>().ok().and_then(kube_number_f64);
    }
    for (prefix, radix) in [("0o", 8), ("0x", 16)] {
        if let Some(r) = s.strip_prefix(prefix) {
            if r.is_empty() || !r.chars().all(|c| c.is_digit(radix)) {
                return Some(J::String(s.to_owned()));
            }
            return match u64::from_str_radix(r, radix).map(i64::try_from) {
                Ok(Ok(i)) => Some(J::from(i)),
                Ok(Err(_)) => u64::from_str_radix(r, radix)
                    .ok()
                    .and_then(|u| kube_number_f64(u as f64)),
                Err(_) => None,
            };
        }
    }
    if yaml_style_float(s) {
        return s.parse::<f64>().ok().and_then(kube_number_f64);
    }
    Some(J::String(s.to_owned()))
}

/// Parses a multi-document YAML stream into JSON values, after
/// [`prescan`]. Plain scalars are read as kubectl reads them (YAML 1.1,
/// see [`resolve_yaml11`]) and each one YAML 1.2 reads differently is
/// reported in [`Document::warnings`]. YAML merge keys (`<<:`) are
/// applied; duplicate keys and values JSON cannot carry (non-string keys,
/// `.nan`, tags) are refused, naming the line and the key path. A leading
/// byte order mark is skipped.
pub fn parse_documents(text: &str) -> Result<Vec<Document>, YamlError> {
    prescan(text)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut c = Composer {
        parser: Parser::new(text),
        anchors: HashMap::new(),
        warnings: Vec::new(),
    };
    let mut out = Vec::new();
    loop {
        let (ev, m) = c.next()?;
        match ev {
            Event::StreamStart | Event::DocumentEnd => {}
            Event::StreamEnd => break,
            Event::DocumentStart => {
                let index = u32::try_from(out.len()).map_err(|_| YamlError {
                    line: None,
                    column: None,
                    reason: "too many documents".into(),
                })?;
                c.anchors.clear();
                let (ev, m2) = c.next()?;
                // What is wrong with a document (not its syntax) names the
                // document, then the key path, then the line.
                let value = c.node(ev, m2, &mut Vec::new()).map_err(|e| match e {
                    YamlError {
                        line: Some(l),
                        column: Some(col),
                        reason,
                    } => YamlError {
                        line: Some(l),
                        column: None,
                        reason: format!("document {index}: {reason} (line {l} column {col})"),
                    },
                    other => other,
                })?;
                out.push(Document {
                    index,
                    line: m2.line.max(m.line),
                    value: (!value.is_null()).then_some(value),
                    warnings: std::mem::take(&mut c.warnings),
                });
            }
            _ => return Err(err_at(m, "invalid YAML: unexpected event".into())),
        }
    }
    Ok(out)
}

/// One YAML document transcoded straight to canonical JSON by
/// [`transcode_documents`].
#[derive(Clone, Debug, PartialEq)]
pub struct CanonicalDocument {
    /// Index in the stream (0-based, counting empty documents).
    pub index: u32,
    /// 1-based line where the document starts.
    pub line: usize,
    /// The document as canonical JSON (compact, keys sorted bytewise: what
    /// `serde_json::to_vec` writes for [`Document::value`]); `None` for an
    /// empty document.
    pub bytes: Option<Vec<u8>>,
    /// The fields a Kubernetes object is identified by, as they are in the
    /// document: `apiVersion`, `kind` and `metadata` with only its `name`,
    /// `namespace` and `generateName` (each only if present). An object
    /// (empty for an empty document).
    pub identity: serde_json::Value,
    /// As [`Document::warnings`].
    pub warnings: Vec<String>,
}

/// A document the transcoder does not handle exactly as
/// [`parse_documents`] does: the caller takes that path instead.
struct Fallback;

/// One step of the key path (for warnings).
enum Seg {
    Key(String),
    Index(usize),
}

/// A mapping member being transcoded: its key and where its value's
/// canonical bytes are in the output buffer.
struct Member {
    key: String,
    start: usize,
    end: usize,
}

/// libyaml events written straight as canonical JSON: no value tree, one
/// output buffer per document, members of a mapping sorted once when the
/// mapping ends.
struct Transcoder<'a> {
    parser: Parser<'a>,
    warnings: Vec<String>,
    /// The document's canonical JSON so far.
    out: Vec<u8>,
    /// Members of the open mappings, innermost last.
    members: Vec<Member>,
    /// Scratch for a mapping's sorted encoding.
    sorted: Vec<u8>,
    path: Vec<Seg>,
    identity: serde_json::Map<String, serde_json::Value>,
}

/// Where an identity field of [`CanonicalDocument::identity`] is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// `apiVersion` or `kind`.
    Top,
    /// `metadata` itself.
    Metadata,
    /// `metadata.name`, `metadata.namespace`, `metadata.generateName`.
    Meta,
}

impl Transcoder<'_> {
    fn next(&mut self) -> Result<(Event, Mark), Fallback> {
        match self.parser.next_event() {
            Ok(Some(e)) => Ok(e),
            _ => Err(Fallback),
        }
    }

    fn where_(&self) -> String {
        if self.path.is_empty() {
            return "the document".to_owned();
        }
        let mut s = String::new();
        for (i, seg) in self.path.iter().enumerate() {
            if i > 0 {
                s.push('.');
            }
            match seg {
                Seg::Key(k) => s.push_str(k),
                Seg::Index(n) => s.push_str(&n.to_string()),
            }
        }
        format!("`{}`", escape_untrusted(&s))
    }

    /// Whether the node at the current path is an identity field.
    fn slot(&self) -> Option<Slot> {
        match self.path.as_slice() {
            [Seg::Key(k)] if k == "apiVersion" || k == "kind" => Some(Slot::Top),
            [Seg::Key(k)] if k == "metadata" => Some(Slot::Metadata),
            [Seg::Key(m), Seg::Key(k)]
                if m == "metadata"
                    && matches!(k.as_str(), "name" | "namespace" | "generateName") =>
            {
                Some(Slot::Meta)
            }
            _ => None,
        }
    }

    fn capture(&mut self, slot: Slot, v: serde_json::Value) {
        let key = |s: &Seg| match s {
            Seg::Key(k) => k.clone(),
            Seg::Index(n) => n.to_string(),
        };
        match (slot, self.path.as_slice()) {
            (Slot::Top | Slot::Metadata, [k]) => {
                self.identity.insert(key(k), v);
            }
            (Slot::Meta, [_, k]) => {
                if let Some(serde_json::Value::Object(m)) = self.identity.get_mut("metadata") {
                    m.insert(key(k), v);
                }
            }
            _ => {}
        }
    }

    fn node(&mut self, ev: Event, m: Mark) -> Result<(), Fallback> {
        match ev {
            Event::Scalar {
                anchor: None,
                tag: None,
                value,
                style,
            } => {
                let slot = self.slot();
                if style == Style::Plain {
                    let mut warnings = std::mem::take(&mut self.warnings);
                    let v = plain_scalar(&value, m, &mut warnings, || self.where_());
                    self.warnings = warnings;
                    let v = v.map_err(|_| Fallback)?;
                    serde_json::to_writer(&mut self.out, &v).map_err(|_| Fallback)?;
                    if let Some(slot) = slot {
                        self.capture(slot, v);
                    }
                } else {
                    serde_json::to_writer(&mut self.out, value.as_str()).map_err(|_| Fallback)?;
                    if let Some(slot) = slot {
                        self.capture(slot, serde_json::Value::String(value));
                    }
                }
                Ok(())
            }
            Event::SequenceStart {
                anchor: None,
                tag: None,
            } => {
                if self.slot().is_some() {
                    return Err(Fallback);
                }
                self.out.push(b'[');
                let mut n = 0;
                loop {
                    let (ev, m2) = self.next()?;
                    if ev == Event::SequenceEnd {
                        break;
                    }
                    if n > 0 {
                        self.out.push(b',');
                    }
                    self.path.push(Seg::Index(n));
                    self.node(ev, m2)?;
                    self.path.pop();
                    n += 1;
                }
                self.out.push(b']');
                Ok(())
            }
            Event::MappingStart {
                anchor: None,
                tag: None,
            } => {
                match self.slot() {
                    None => {}
                    Some(Slot::Metadata) => {
                        self.capture(
                            Slot::Metadata,
                            serde_json::Value::Object(serde_json::Map::new()),
                        );
                    }
                    Some(_) => return Err(Fallback),
                }
                self.mapping()
            }
            // Anchors, aliases, tags: the composer's business.
            _ => Err(Fallback),
        }
    }

    fn mapping(&mut self) -> Result<(), Fallback> {
        let start = self.out.len();
        let base = self.members.len();
        loop {
            let (kev, km) = self.next()?;
            let key = match kev {
                Event::MappingEnd => break,
                Event::Scalar {
                    anchor: None,
                    tag: None,
                    value,
                    style,
                } => {
                    if style == Style::Plain {
                        // Merge keys, and keys that are not strings.
                        if value == "<<"
                            || !matches!(resolve_yaml12(&value), Some(serde_json::Value::String(_)))
                        {
                            return Err(Fallback);
                        }
                        if let Ok(v11 @ serde_json::Value::Bool(_)) = resolve_yaml11(&value) {
                            self.warnings.push(format!(
                                "line {}: {}: key `{}` is kept as text; kubectl would send it as the key `{v11}` (YAML 1.1); quote it to silence this",
                                km.line,
                                self.where_(),
                                escape_untrusted(&value)
                            ));
                        }
                    }
                    value
                }
                _ => return Err(Fallback),
            };
            let (vev, vm) = self.next()?;
            self.path.push(Seg::Key(key));
            let vstart = self.out.len();
            self.node(vev, vm)?;
            let Some(Seg::Key(key)) = self.path.pop() else {
                return Err(Fallback);
            };
            self.members.push(Member {
                key,
                start: vstart,
                end: self.out.len(),
            });
        }
        let members = &mut self.members[base..];
        members.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        if members.windows(2).any(|w| w[0].key == w[1].key) {
            // Duplicate keys: the composer names them.
            return Err(Fallback);
        }
        let sorted = &mut self.sorted;
        sorted.clear();
        sorted.push(b'{');
        for (i, mem) in members.iter().enumerate() {
            if i > 0 {
                sorted.push(b',');
            }
            serde_json::to_writer(&mut *sorted, mem.key.as_str()).map_err(|_| Fallback)?;
            sorted.push(b':');
            sorted.extend_from_slice(&self.out[mem.start..mem.end]);
        }
        sorted.push(b'}');
        self.out.truncate(start);
        self.out.extend_from_slice(sorted);
        self.members.truncate(base);
        Ok(())
    }
}

/// Transcodes a multi-document YAML stream straight to canonical JSON:
/// the bytes, warnings, document indices and lines that
/// [`parse_documents`] followed by `serde_json::to_vec` of each value
/// gives, without building a value tree. [`prescan`] runs first, as
/// there. `None` for a stream this path does not handle exactly as the
/// composer does — anchors, aliases, merge keys, tags, duplicate or
/// non-string keys, a document that is neither a mapping nor empty, an
/// identity field (see [`CanonicalDocument::identity`]) that is a
/// collection, any error — and the caller then takes
/// [`parse_documents`], which gives the result or the error.
pub fn transcode_documents(text: &str) -> Option<Vec<CanonicalDocument>> {
    prescan(text).ok()?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut t = Transcoder {
        parser: Parser::new(text),
        warnings: Vec::new(),
        out: Vec::new(),
        members: Vec::new(),
        sorted: Vec::new(),
        path: Vec::new(),
        identity: serde_json::Map::new(),
    };
    let mut out = Vec::new();
    loop {
        let (ev, m) = t.next().ok()?;
        match ev {
            Event::StreamStart | Event::DocumentEnd => {}
            Event::StreamEnd => break,
            Event::DocumentStart => {
                let index = u32::try_from(out.len()).ok()?;
                let (ev, m2) = t.next().ok()?;
                let bytes = match ev {
                    Event::MappingStart {
                        anchor: None,
                        tag: None,
                    } => {
                        t.mapping().ok()?;
                        let bytes = t.out.to_vec();
                        t.out.clear();
                        Some(bytes)
                    }
                    // An empty document (or `~`); any other scalar is not
                    // an object, which the composer's path reports.
                    Event::Scalar {
                        anchor: None,
                        tag: None,
                        value,
                        style: Style::Plain,
                    } => {
                        let v = plain_scalar(&value, m2, &mut t.warnings, || where_(&[])).ok()?;
                        if !v.is_null() {
                            return None;
                        }
                        None
                    }
                    _ => return None,
                };
                out.push(CanonicalDocument {
                    index,
                    line: m2.line.max(m.line),
                    bytes,
                    identity: serde_json::Value::Object(std::mem::take(&mut t.identity)),
                    warnings: std::mem::take(&mut t.warnings),
                });
            }
            _ => return None,
        }
    }
    Some(out)
}

/// An anchored node whose end the scanner has not reached yet.
struct OpenAnchor {
    name: String,
    /// Byte offset where the node starts.
    start: usize,
    /// Bytes added by aliases inside it so far.
    extra: u64,
    /// Flow depth at the anchor; in flow the node ends at the next `,` or
    /// closing bracket at this depth.
    flow_depth: usize,
    /// Indentation of the anchor's line; in block context the node ends at
    /// the next line indented no deeper (or with a non-`-` at that indent).
    line_indent: usize,
}

/// Scanner state across lines.
#[derive(Default)]
struct Scan {
    /// The nesting limit ([`MAX_NESTING`]; lower in tests).
    max_nesting: usize,
    /// The alias expansion limit ([`MAX_ALIAS_EXPANSION`]; lower in tests).
    max_expansion: u64,
    /// Open flow collections.
    flow: usize,
    /// Per open flow collection: whether it is a sequence, and whether its
    /// current entry is an implicit single-pair mapping (`[a: b]`), which
    /// nests one level more.
    levels: Vec<(bool, bool)>,
    /// How many open sequences hold such a pair now.
    pairs: usize,
    /// Indentation levels of enclosing block collections.
    indents: Vec<usize>,
    /// Inside a quoted scalar: its quote byte.
    quote: Option<u8>,
    /// Inside a block scalar: the indentation its content must exceed
    /// (`None` = parent at column -1, any indent is content), and the
    /// content's indentation once its first line is seen.
    block_scalar: Option<(Option<usize>, Option<usize>)>,
    anchors: HashMap<String, u64>,
    open: Vec<OpenAnchor>,
    /// Bytes added by aliases in the current document.
    expansion: u64,
}

impl Scan {
    fn close_anchor(&mut self, end: usize) {
        if let Some(a) = self.open.pop() {
            let size = (end.saturating_sub(a.start) as u64).saturating_add(a.extra);
            self.anchors.insert(a.name, size);
        }
    }

    fn new_document(&mut self, end: usize) {
        while !self.open.is_empty() {
            self.close_anchor(end);
        }
        self.anchors.clear();
        self.indents.clear();
        self.expansion = 0;
        self.flow = 0;
        self.levels.clear();
        self.pairs = 0;
    }
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t' || b == b'\r'
}

fn token_end(line: &[u8], from: usize, flow: bool) -> usize {
    let mut j = from;
    while j < line.len()
        && !is_blank(line[j])
        && !(flow && matches!(line[j], b',' | b'[' | b']' | b'{' | b'}'))
    {
        j += 1;
    }
    j
}

/// The linear pre-scan described in the module documentation. Refuses
/// with the line and column of the first problem.
pub fn prescan(text: &str) -> Result<(), YamlError> {
    prescan_limited(text, MAX_NESTING, MAX_ALIAS_EXPANSION)
}

fn prescan_limited(text: &str, max_nesting: usize, max_expansion: u64) -> Result<(), YamlError> {
    let mut s = Scan {
        max_nesting,
        max_expansion,
        ..Scan::default()
    };
    for (ln, (offset, line)) in lines(text.as_bytes()).enumerate() {
        // libyaml skips a byte order mark at the start of any line.
        let (offset, line) = match line.strip_prefix(b"\xEF\xBB\xBF") {
            Some(rest) => (offset + 3, rest),
            None => (offset, line),
        };
        scan_line(&mut s, ln, line, offset)?;
    }
    Ok(())
}

/// Splits at every line break libyaml knows: LF, CRLF, CR, NEL (U+0085),
/// LS (U+2028) and PS (U+2029). Yields (byte offset, line).
fn lines(text: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut start = 0usize;
    let mut i = 0usize;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        while i < text.len() {
            let brk = match text[i] {
                b'\n' => 1,
                b'\r' if text.get(i + 1) == Some(&b'\n') => 2,
                b'\r' => 1,
                0xC2 if text.get(i + 1) == Some(&0x85) => 2,
                0xE2 if text.get(i + 1) == Some(&0x80)
                    && matches!(text.get(i + 2), Some(0xA8 | 0xA9)) =>
                {
                    3
                }
                _ => 0,
            };
            if brk > 0 {
                let line = (start, &text[start..i]);
                i += brk;
                start = i;
                return Some(line);
            }
            i += 1;
        }
        done = true;
        Some((start, &text[start..]))
    })
}

fn scan_line(s: &mut Scan, ln: usize, line: &[u8], offset: usize) -> Result<(), YamlError> {
    let indent = line.iter().take_while(|&&b| b == b' ').count();
    let content = line[indent..].iter().any(|&b| !is_blank(b));
    // Block scalar content: skipped while indented deeper than its parent.
    if let Some((parent, content_indent)) = s.block_scalar {
        if !content {
            return Ok(());
        }
        // A document marker at column 0 ends any block scalar.
        let marker = (line.starts_with(b"---") || line.starts_with(b"..."))
            && line.get(3).is_none_or(|&b| is_blank(b));
        let inside = !marker
            && parent.is_none_or(|p| indent > p)
            && content_indent.is_none_or(|c| indent >= c);
        if inside {
            s.block_scalar = Some((parent, Some(content_indent.unwrap_or(indent))));
            return Ok(());
        }
        s.block_scalar = None;
    }
    let mut i = 0usize;
    let mut node_start;
    if let Some(q) = s.quote {
        // A quoted scalar continues from the previous line.
        match skip_quoted(line, 0, q) {
            Some(end) => {
                s.quote = None;
                i = end;
                node_start = false;
            }
            None => return Ok(()),
        }
    } else {
        if line.starts_with(b"%") && s.flow == 0 {
            if line.starts_with(b"%TAG") {
                return Err(at(
                    ln,
                    0,
                    "`%TAG` directive: tag handles are not allowed (only the core schema's !!tags)"
                        .into(),
                ));
            }
            return Ok(());
        }
        let marker = |m: &[u8]| line.starts_with(m) && line.get(3).is_none_or(|&b| is_blank(b));
        if s.flow == 0 && (marker(b"---") || marker(b"...")) {
            s.new_document(offset);
            i = 3;
        }
        if !content {
            return Ok(());
        }
        if s.flow == 0 && line[indent] != b'#' {
            // Block context: end anchored nodes this line is not part of,
            // and track the indentation levels.
            while let Some(a) = s.open.last() {
                let ends = a.flow_depth == 0
                    && (indent < a.line_indent
                        || (indent == a.line_indent && line.get(indent) != Some(&b'-')));
                if !ends {
                    break;
                }
                s.close_anchor(offset);
            }
            while s.indents.last().is_some_and(|&t| t >= indent) {
                s.indents.pop();
            }
            s.indents.push(indent);
            if s.indents.len() > s.max_nesting {
                return Err(at(
                    ln,
                    indent,
                    format!(
                        "collections nested deeper than {} levels; refused",
                        s.max_nesting
                    ),
                ));
            }
        }
        i = i.max(indent);
        node_start = true;
    }
    let mut compact = 0usize; // `- ` / `? ` nesting opened on this line
    let depth = |s: &Scan, compact: usize| s.indents.len() + compact + s.flow + s.pairs;
    let too_deep = |s: &Scan, i: usize| {
        at(
            ln,
            i,
            format!(
                "collections nested deeper than {} levels; refused",
                s.max_nesting
            ),
        )
    };
    while i < line.len() {
        let b = line[i];
        let next = line.get(i + 1).copied();
        let next_blank = next.is_none_or(is_blank);
        if is_blank(b) {
            i += 1;
            continue;
        }
        if b == b'#' && (i == 0 || is_blank(line[i - 1])) {
            break; // comment
        }
        let flow = s.flow > 0;
        if flow && matches!(b, b',' | b']' | b'}') {
            // The end of a node in this collection: close anchors on it.
            while s
                .open
                .last()
                .is_some_and(|a| a.flow_depth == s.flow || (b != b',' && a.flow_depth > s.flow))
            {
                s.close_anchor(offset + i);
            }
            if b == b',' {
                node_start = true;
                if let Some(top) = s.levels.last_mut() {
                    if top.1 {
                        top.1 = false;
                        s.pairs -= 1;
                    }
                }
            } else {
                if let Some((_, true)) = s.levels.pop() {
                    s.pairs -= 1;
                }
                s.flow -= 1;
                node_start = false;
                if s.flow == 0 {
                    while s.open.last().is_some_and(|a| a.flow_depth > 0) {
                        s.close_anchor(offset + i + 1);
                    }
                }
            }
            i += 1;
            continue;
        }
        if b == b'[' || b == b'{' {
            if flow || node_start {
                s.flow += 1;
                s.levels.push((b == b'[', false));
                if depth(s, compact) > s.max_nesting {
                    return Err(too_deep(s, i));
                }
                node_start = true;
            } else {
                node_start = false;
            }
            i += 1;
            continue;
        }
        let value_indicator = b == b':'
            && (next_blank
                || (flow && matches!(next, Some(b',' | b']' | b'}')))
                || (flow && i > 0 && matches!(line[i - 1], b'"' | b'\'' | b']' | b'}')));
        let flow_key = flow && node_start && b == b'?' && next_blank;
        if flow && (value_indicator || flow_key) {
            // `[a: b]` or `[? a]`: a single-pair mapping inside the sequence.
            if let Some(top) = s.levels.last_mut() {
                if top.0 && !top.1 {
                    top.1 = true;
                    s.pairs += 1;
                    if depth(s, compact) > s.max_nesting {
                        return Err(too_deep(s, i));
                    }
                }
            }
        }
        if value_indicator {
            node_start = true;
            i += 1;
            continue;
        }
        if !node_start {
            // Inside a plain scalar: nothing here starts a node.
            i += 1;
            continue;
        }
        match b {
            b'-' | b'?' if next_blank && !flow => {
                compact += 1;
                if depth(s, compact) > s.max_nesting {
                    return Err(at(
                        ln,
                        i,
                        format!(
                            "collections nested deeper than {} levels; refused",
                            s.max_nesting
                        ),
                    ));
                }
                i += 1;
            }
            b'?' if next_blank => i += 1,
            b'"' | b'\'' => match skip_quoted(line, i + 1, b) {
                Some(end) => {
                    i = end;
                    node_start = false;
                }
                None => {
                    s.quote = Some(b);
                    return Ok(());
                }
            },
            b'|' | b'>' if !flow => {
                // A document-level block scalar (`--- |`) may hold
                // content at any indentation.
                let parent = if line.starts_with(b"---") {
                    None
                } else {
                    Some(indent)
                };
                s.block_scalar = Some((parent, None));
                return Ok(());
            }
            b'!' => {
                let end = token_end(line, i, flow);
                let tag = String::from_utf8_lossy(&line[i..end]);
                if !CORE_TAGS.contains(&tag.as_ref()) {
                    return Err(at(
                        ln,
                        i,
                        format!(
                            "YAML tag `{}` is not allowed; only the core schema's {} are",
                            tag.escape_default(),
                            CORE_TAGS.join(", ")
                        ),
                    ));
                }
                i = end;
            }
            b'&' => {
                let end = token_end(line, i + 1, flow);
                let name = String::from_utf8_lossy(&line[i + 1..end]).into_owned();
                s.open.push(OpenAnchor {
                    name,
                    start: offset + i,
                    extra: 0,
                    flow_depth: s.flow,
                    line_indent: indent,
                });
                if s.open.len() > s.max_nesting * 2 {
                    return Err(at(ln, i, "too many nested anchors; refused".into()));
                }
                i = end;
            }
            b'*' => {
                let end = token_end(line, i + 1, flow);
                let name = String::from_utf8_lossy(&line[i + 1..end]);
                // An unknown or still-open anchor is the parser's error to
                // report; count what is known.
                let size = s.anchors.get(name.as_ref()).copied().unwrap_or(0);
                s.expansion = s.expansion.saturating_add(size);
                for a in &mut s.open {
                    a.extra = a.extra.saturating_add(size);
                }
                if s.expansion > s.max_expansion {
                    return Err(at(
                        ln,
                        i,
                        format!(
                            "aliases expand the document by more than {} bytes \
                             (alias `*{}`); refused",
                            s.max_expansion,
                            name.escape_default()
                        ),
                    ));
                }
                i = end;
                node_start = false;
            }
            _ => {
                node_start = false;
                i += 1;
            }
        }
    }
    Ok(())
}

/// Skips a quoted scalar's body from `from` (just after the opening quote);
/// returns the index after the closing quote, or `None` if the line ends
/// first.
fn skip_quoted(line: &[u8], from: usize, quote: u8) -> Option<usize> {
    let mut j = from;
    while j < line.len() {
        let c = line[j];
        if quote == b'"' && c == b'\\' {
            j += 2;
            continue;
        }
        if c == quote {
            if quote == b'\'' && line.get(j + 1) == Some(&b'\'') {
                j += 2;
                continue;
            }
            return Some(j + 1);
        }
        j += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    /// Collection nesting of a parsed value (keys count too).
    fn depth(v: &serde_norway::Value) -> usize {
        use serde_norway::Value as Y;
        match v {
            Y::Sequence(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            Y::Mapping(m) => {
                1 + m
                    .iter()
                    .map(|(k, v)| depth(k).max(depth(v)))
                    .max()
                    .unwrap_or(0)
            }
            Y::Tagged(t) => depth(&t.value),
            _ => 0,
        }
    }

    /// Pieces of YAML syntax, so that random texts are often valid and
    /// nested.
    const PIECES: &[&str] = &[
        "[",
        "]",
        "{",
        "}",
        ", ",
        ": ",
        "a",
        "b: ",
        "- ",
        "\n",
        "\n  ",
        "\n    ",
        "\"x\"",
        "'y'",
        " #c",
        "|",
        ">",
        "&a ",
        "*a",
        "!!str ",
        "? ",
        "--- ",
        "\r",
        "\u{2028}",
        "[[",
        "]]",
        "\t",
        "!x ",
        "!!binary ",
        "!<t> ",
        "%TAG ! t:\n",
        "!",
        "a!b ",
    ];

    /// Whether a parsed value carries a tag anywhere.
    fn tagged(v: &serde_norway::Value) -> bool {
        use serde_norway::Value as Y;
        match v {
            Y::Sequence(a) => a.iter().any(tagged),
            Y::Mapping(m) => m.iter().any(|(k, v)| tagged(k) || tagged(v)),
            Y::Tagged(_) => true,
            _ => false,
        }
    }

    /// Values with anchors and aliases, for the expansion property; each
    /// test text is a mapping `kN: VALUE` per line, so most texts parse.
    const ALIAS_VALUES: &[&str] = &[
        "&a [x, x, x, x, x, x, x, x]",
        "&b [*a, *a, *a, *a]",
        "[*b, *b, *b, *b]",
        "*a",
        "*b",
        "&a\n  - x\n  - x\n  - x",
        "&b\n  - *a\n  - *a\n  - *a",
        "&b\n  p: *a\n  q: [*a, *a]",
        "[*a, *a]",
        "{x: *b, y: *b}",
        "&a {p: [*b, *b]}",
        "&a \"xxxxxxxxxxxxxxxx\"",
        "x",
    ];

    /// Nodes in a parsed value (aliases counted as expanded).
    fn nodes(v: &serde_norway::Value) -> u64 {
        use serde_norway::Value as Y;
        1 + match v {
            Y::Sequence(a) => a.iter().map(nodes).sum(),
            Y::Mapping(m) => m.iter().map(|(k, v)| nodes(k) + nodes(v)).sum(),
            Y::Tagged(t) => nodes(&t.value),
            _ => 0,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        /// The alias estimate never under-counts: what passes the scan
        /// parses to at most about one node per byte of the text plus the
        /// expansion allowance.
        #[test]
        fn scan_bounds_alias_expansion(
            values in prop::collection::vec(prop::sample::select(ALIAS_VALUES), 0..12)
        ) {
            let text: String = values
                .iter()
                .enumerate()
                .map(|(i, v)| format!("k{i}: {v}\n"))
                .collect();
            let allowance = 16;
            if prescan_limited(&text, MAX_NESTING, allowance).is_ok() {
                let mut total = 0;
                for doc in serde_norway::Deserializer::from_str(&text) {
                    match serde_norway::Value::deserialize(doc) {
                        Ok(v) => total += nodes(&v),
                        Err(_) => break,
                    }
                }
                let bound = 2 * (text.len() as u64 + allowance) + 2;
                prop_assert!(total <= bound, "{text:?}: {total} nodes, bound {bound}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        /// The scan never under-counts: whatever it lets through parses
        /// (if at all) to no deeper nesting than its limit and carries no
        /// tag, and nothing panics.
        #[test]
        fn scan_bounds_the_parsed_depth(
            pieces in prop::collection::vec(prop::sample::select(PIECES), 0..40)
        ) {
            let text = pieces.concat();
            let limit = 3;
            if prescan_limited(&text, limit, MAX_ALIAS_EXPANSION).is_ok() {
                let mut docs = Vec::new();
                for doc in serde_norway::Deserializer::from_str(&text) {
                    match serde_norway::Value::deserialize(doc) {
                        Ok(v) => docs.push(v),
                        Err(_) => break,
                    }
                }
                for v in docs {
                    prop_assert!(
                        depth(&v) <= limit,
                        "{text:?} parsed to depth {}",
                        depth(&v)
                    );
                    prop_assert!(!tagged(&v), "{text:?} passed with a tag: {v:?}");
                }
            }
            let _ = parse_documents(&text);
        }
    }

    fn refused(text: &str) -> String {
        prescan(text).unwrap_err().to_string()
    }

    #[test]
    fn deep_flow_nesting_is_refused_at_the_limit() {
        let e = refused(&"[".repeat(1 << 20));
        assert!(
            e.starts_with("line 1 column 100: collections nested deeper than 100"),
            "{e}"
        );
        let e = refused(&format!("a: {}", "{a: ".repeat(500)));
        assert!(e.contains("nested deeper"), "{e}");
        // Single-pair mappings inside flow sequences nest one level more
        // (found by `scan_bounds_the_parsed_depth`).
        assert!(prescan_limited("[[b: ]]: ", 3, MAX_ALIAS_EXPANSION).is_err());
        assert!(prescan_limited("[[? b]]", 3, MAX_ALIAS_EXPANSION).is_err());
        prescan_limited("[{b: c}]", 3, MAX_ALIAS_EXPANSION).unwrap();
        // Just under the limit is fine for the scan.
        let ok = format!("{}{}", "[".repeat(90), "]".repeat(90));
        prescan(&ok).unwrap();
    }

    #[test]
    fn deep_block_nesting_is_refused() {
        let mut t = String::new();
        for i in 0..200 {
            t.push_str(&" ".repeat(i));
            t.push_str("a:\n");
        }
        let e = refused(&t);
        assert!(
            e.starts_with("line 101 column 101: collections nested deeper"),
            "{e}"
        );
        let e = refused(&format!("{}x\n", "- ".repeat(300)));
        assert!(e.contains("nested deeper"), "{e}");
    }

    #[test]
    fn brackets_inside_scalars_and_comments_are_text() {
        let t = format!(
            "a: b[{}\nc: \"{}\"\nd: '{}'\n# {}\ne: |\n  {}\n  {}\nf: ok\n",
            "[".repeat(300),
            "[".repeat(300),
            "{".repeat(300),
            "[".repeat(300),
            "[".repeat(300),
            "!!python/object x",
        );
        prescan(&t).unwrap();
        let v = parse_documents(&t).unwrap();
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn non_core_tags_are_refused_with_line() {
        for (t, tag) in [
            (
                "a: b\nc: !!python/object:os.system x\n",
                "!!python/object:os.system",
            ),
            ("a: !!binary aGVsbG8=\n", "!!binary"),
            ("a:\n  - !custom {x: 1}\n", "!custom"),
            ("a: [1, !<tag:x> 2]\n", "!<tag:x>"),
            ("a: !!timestamp 2001-12-14\n", "!!timestamp"),
        ] {
            let e = refused(t);
            assert!(
                e.contains(&format!("YAML tag `{tag}` is not allowed")),
                "{e}"
            );
            assert!(e.starts_with("line "), "{e}");
        }
        let e = refused("%TAG !! tag:evil.example,2000:\n---\na: !!str x\n");
        assert!(e.contains("%TAG"), "{e}");
        // Core tags and `!` inside text are fine.
        let v = parse_documents("a: !!str 1\nb: hello!\nc: \"!x\"\n").unwrap();
        assert_eq!(
            v[0].value.as_ref().unwrap(),
            &serde_json::json!({"a": "1", "b": "hello!", "c": "!x"})
        );
    }

    #[test]
    fn billion_laughs_is_refused() {
        let mut t = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        let names = ["b", "c", "d", "e", "f", "g", "h", "i"];
        let mut prev = "a";
        for n in names {
            t.push_str(&format!(
                "{n}: &{n} [{}]\n",
                vec![format!("*{prev}"); 9].join(",")
            ));
            prev = n;
        }
        let e = refused(&t);
        assert!(e.contains("aliases expand the document"), "{e}");
        // Wide rather than deep: one big anchor, many aliases.
        let big = format!(
            "a: &a [{}]\nb: [{}]\n",
            "1,".repeat(300_000),
            "*a,".repeat(100)
        );
        assert!(refused(&big).contains("aliases expand"));
        // Block-context anchors are measured too.
        let mut t = String::from("base: &b\n");
        for i in 0..20_000 {
            t.push_str(&format!("  k{i}: value\n"));
        }
        t.push_str("list:\n");
        for _ in 0..2000 {
            t.push_str("  - *b\n");
        }
        assert!(refused(&t).contains("aliases expand"));
    }

    #[test]
    fn ordinary_anchors_and_merge_keys_parse() {
        let v =
            parse_documents("base: &b {x: 1}\ndata:\n  <<: *b\n  y: 2\n---\n---\nz: 1\n").unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[1].value, None);
        assert_eq!(
            v[0].value.as_ref().unwrap()["data"],
            serde_json::json!({"x": 1, "y": 2})
        );
    }

    #[test]
    fn every_libyaml_line_break_and_bom_is_seen() {
        for brk in ["\r", "\r\n", "\u{85}", "\u{2028}", "\u{2029}"] {
            let e = refused(&format!("a: b{brk}c: !!python/object x{brk}"));
            assert!(e.starts_with("line 2 column 4: YAML tag"), "{brk:?}: {e}");
            let e = refused(&format!("a: b{brk}{}", "[".repeat(1000)));
            assert!(e.contains("nested deeper"), "{brk:?}: {e}");
        }
        let e = refused(&format!("\u{feff}{}", "[".repeat(1000)));
        assert!(e.contains("nested deeper"), "{e}");
        let e = refused(&format!("a: 1\n\u{feff}b: {}", "{".repeat(1000)));
        assert!(e.starts_with("line 2 column 1"), "{e}");
    }

    #[test]
    fn a_block_scalar_ends_where_libyaml_ends_it() {
        // At a document marker (found by `scan_bounds_the_parsed_depth`).
        let e = refused("--- |\r--- \t!x \n");
        assert!(e.contains("YAML tag `!x`"), "{e}");
        // Less indented than the scalar's first line: no longer content.
        let e = refused(&format!("key: |\n      first\n   {}\n", "[".repeat(500)));
        assert!(e.starts_with("line 3 column "), "{e}");
        prescan(&format!(
            "key: |\n  first\n    {}\nnext: 1\n",
            "[".repeat(500)
        ))
        .unwrap();
    }

    #[test]
    fn multi_line_quoted_scalars_are_skipped() {
        let t = "a: \"first [[[\n  second {{{ \\\" still\n  end\"\nb: 1\n";
        prescan(t).unwrap();
        assert_eq!(parse_documents(t).unwrap().len(), 1);
    }
}

#[cfg(test)]
mod resolve_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn yaml11_resolution_follows_go_yaml_v2() {
        for (s, v) in [
            ("0755", json!(493)),
            ("0o17", json!(15)),
            ("0x1F", json!(31)),
            ("-0x10", json!(-16)),
            ("0b101", json!(5)),
            ("1_000", json!(1000)),
            ("09", json!(9)),
            ("1e1", json!(10)),
            ("1.5", json!(1.5)),
            (".5", json!(0.5)),
            ("yes", json!(true)),
            ("Off", json!(false)),
            ("~", json!(null)),
            ("tRUE", json!("tRUE")),
            ("1:20", json!("1:20")),
            ("2001-12-14", json!("2001-12-14")),
            ("1e400", json!("1e400")),
            ("-", json!("-")),
        ] {
            assert_eq!(resolve_yaml11(s).unwrap(), v, "{s}");
        }
        assert!(resolve_yaml11(".inf").is_err());
        assert_eq!(resolve_yaml12("0755"), Some(json!(755)));
        assert_eq!(resolve_yaml12("yes"), Some(json!("yes")));
    }

    #[test]
    fn warnings_name_line_and_path_only_where_the_schemas_differ() {
        let d = parse_documents("a:\n  b: yes\n  c: 1e1\n  d: '0755'\n  e: 0755\n").unwrap();
        let w = &d[0].warnings;
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("line 2: `a.b`: `yes` is read as true"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("line 5: `a.e`: `0755` is read as 493"),
            "{w:?}"
        );
        assert!(w[1].contains("YAML 1.2 reads 755"), "{w:?}");
    }
}
