//! "Render for this site": the one transform between verification and
//! apply (docs/SITES.md).
//!
//! [`render`] is pure: it takes the verified objects of a release, the
//! site ([`Site`]: its labels, its operator-owned values, its age
//! identities) and returns the objects to apply plus per-object errors.
//!
//! - `CairnValues` objects (`cairn.dev/v1alpha1`) declare the bundle's
//!   variables (name, default, allowed pattern, type). They are signed like
//!   every object and never applied.
//! - `${name}` in any string value of any other object is replaced by the
//!   variable's value: `${label:KEY}` from the agent's labels, any other
//!   name from the agent's `valuesFile`, else the declared default.
//!   `$${x}` is the literal text `${x}`. A string that is exactly one
//!   placeholder of an `integer`/`boolean` variable becomes that JSON type.
//!   An undeclared variable, a value outside its pattern, a variable with
//!   no value, or a placeholder in an object's identity fields is an error
//!   that blocks the whole release ([`RenderError`]).
//! - `AgeSecret` objects are decrypted (in memory) with the site's identity
//!   file and applied as the `Secret` they hold. A Secret this site cannot
//!   decrypt is a per-object error ([`Rendered::object_errors`]); the rest
//!   of the release applies.

use crate::targets::DesiredObject;
use cairn_keys::text::escape_untrusted;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `apiVersion` of `CairnValues` (and `AgeSecret`).
pub const API_VERSION: &str = "cairn.dev/v1alpha1";
/// `kind` of the variables declaration.
pub const VALUES_KIND: &str = "CairnValues";
/// Most variables a bundle may declare.
pub const MAX_VARIABLES: usize = 256;
/// Longest pattern accepted (the regex crate bounds its own size too).
pub const MAX_PATTERN_CHARS: usize = 1024;
/// Largest values file read.
pub const MAX_VALUES_FILE_BYTES: u64 = 1 << 20;
/// Most errors listed in one message.
const MAX_LISTED: usize = 20;

/// What this site is: what [`render`] fills placeholders and decrypts with.
#[derive(Debug, Default)]
pub struct Site {
    /// The agent's labels (`${label:KEY}`).
    pub labels: BTreeMap<String, String>,
    /// The operator's values (`${name}`).
    pub values: BTreeMap<String, String>,
    /// Where `values` came from (for messages).
    pub values_source: Option<String>,
    /// The age identities, if an `ageIdentityFile` is configured.
    pub identities: Option<cairn_secret::Identities>,
}

impl Site {
    /// Reads the site's files (blocking IO: call on a blocking thread).
    pub fn load(
        labels: &BTreeMap<String, String>,
        values_file: Option<&Path>,
        identity_file: Option<&Path>,
    ) -> Result<Site, String> {
        let mut site = Site {
            labels: labels.clone(),
            ..Site::default()
        };
        if let Some(p) = values_file {
            let shown = escape_untrusted(&p.display().to_string());
            let bytes =
                crate::fsread::read_capped(p, MAX_VALUES_FILE_BYTES, crate::fsread::Links::Follow)
                    .map_err(|e| format!("valuesFile {shown}: {}", e.reason()))?;
            let text = String::from_utf8(bytes)
                .map_err(|e| format!("valuesFile {shown}: not UTF-8: {e}"))?;
            site.values =
                parse_values_file(&text).map_err(|m| format!("valuesFile {shown}: {m}"))?;
            site.values_source = Some(shown);
        }
        if let Some(p) = identity_file {
            site.identities = Some(
                cairn_secret::Identities::read(p).map_err(|e| format!("ageIdentityFile: {e}"))?,
            );
        }
        Ok(site)
    }
}

/// Parses a values file: a YAML map of variable names to scalars (strings,
/// numbers and booleans are taken as their text).
pub fn parse_values_file(text: &str) -> Result<BTreeMap<String, String>, String> {
    let v: Option<BTreeMap<String, serde_norway::Value>> =
        serde_norway::from_str(text).map_err(|e| {
            format!(
                "expected a map of variable names to values: {}",
                escape_untrusted(&e.to_string())
            )
        })?;
    let mut out = BTreeMap::new();
    for (k, v) in v.unwrap_or_default() {
        if let Err(m) = check_name(&k) {
            return Err(format!("key `{}`: {m}", escape_untrusted(&k)));
        }
        if k.starts_with("label:") {
            return Err(format!(
                "key `{}`: `label:` variables come from the agent's labels, not the values file",
                escape_untrusted(&k)
            ));
        }
        let s = match v {
            serde_norway::Value::String(s) => s,
            serde_norway::Value::Number(n) => n.to_string(),
            serde_norway::Value::Bool(b) => b.to_string(),
            _ => {
                return Err(format!(
                    "key `{}`: expected a string, number or boolean",
                    escape_untrusted(&k)
                ))
            }
        };
        out.insert(k, s);
    }
    Ok(out)
}

/// An error that blocks the release at this site: one line per problem,
/// each naming the variable and, where it is used, the object and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("site values: {}", lines.join("; "))]
pub struct RenderError {
    /// One line per problem.
    pub lines: Vec<String>,
}

/// The result of [`render`].
#[derive(Debug, Default)]
pub struct Rendered {
    /// The objects to apply, in manifest order (no `CairnValues`; each
    /// decrypted `AgeSecret` replaced by its `Secret`).
    pub objects: Vec<DesiredObject>,
    /// Objects not applied at this site, one line each (which object, why).
    pub object_errors: Vec<String>,
    /// The values in use (`sha256:` over their canonical JSON), if the
    /// bundle declares variables.
    pub values_digest: Option<String>,
}

/// The variable's JSON type when it is a whole string.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum VarType {
    #[default]
    String,
    Integer,
    Boolean,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VarDecl {
    name: String,
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    pattern: Option<String>,
    #[serde(default, rename = "type")]
    ty: VarType,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ValuesDoc {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[allow(dead_code)]
    metadata: Value,
    #[serde(default)]
    variables: Vec<VarDecl>,
}

/// A resolved variable.
struct Resolved {
    text: String,
    ty: VarType,
}

fn check_name(name: &str) -> Result<(), String> {
    let (key, label) = match name.strip_prefix("label:") {
        Some(k) => (k, true),
        None => (name, false),
    };
    let ok = !key.is_empty()
        && key.len() <= 253
        && key.chars().all(|c| {
            c.is_ascii_alphanumeric() || c == '_' || (label && matches!(c, '.' | '-' | '/'))
        })
        && (label || !key.starts_with(|c: char| c.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err("not a variable name (letters, digits and `_`, not starting with a digit; or `label:KEY`)".into())
    }
}

fn obj_name(o: &DesiredObject) -> String {
    let e = &o.entry;
    let name = if e.namespace.is_empty() {
        e.name.clone()
    } else {
        format!("{}/{}", e.namespace, e.name)
    };
    escape_untrusted(&format!(
        "{} {} ({} document {})",
        e.kind, name, e.path, e.document
    ))
}

fn is_kind(o: &DesiredObject, kind: &str) -> bool {
    o.entry.api_version == API_VERSION && o.entry.kind == kind
}

/// Resolves the declared variables at this site.
fn resolve(
    objects: &[&DesiredObject],
    site: &Site,
    lines: &mut Vec<String>,
) -> BTreeMap<String, Resolved> {
    let mut out = BTreeMap::new();
    for o in objects.iter().filter(|o| is_kind(o, VALUES_KIND)) {
        let where_ = obj_name(o);
        let doc: ValuesDoc = match serde_json::from_slice(&o.bytes) {
            Ok(d) => d,
            Err(e) => {
                lines.push(format!(
                    "{where_}: not a CairnValues declaration: {}",
                    escape_untrusted(&e.to_string())
                ));
                continue;
            }
        };
        if doc.variables.len() + out.len() > MAX_VARIABLES {
            lines.push(format!(
                "{where_}: more than {MAX_VARIABLES} variables declared"
            ));
            continue;
        }
        for (i, d) in doc.variables.into_iter().enumerate() {
            let _ = &d.description;
            let field = format!("{where_}: variables[{i}]");
            let shown = escape_untrusted(&d.name);
            if let Err(m) = check_name(&d.name) {
                lines.push(format!("{field}: name `{shown}`: {m}"));
                continue;
            }
            if out.contains_key(&d.name) {
                lines.push(format!("{field}: variable `{shown}` declared twice"));
                continue;
            }
            let pattern = match &d.pattern {
                None => None,
                Some(p) if p.chars().count() > MAX_PATTERN_CHARS => {
                    lines.push(format!(
                        "{field}: pattern longer than {MAX_PATTERN_CHARS} characters"
                    ));
                    continue;
                }
                Some(p) => match regex::Regex::new(&format!("^(?:{p})$")) {
                    Ok(r) => Some((p.clone(), r)),
                    Err(e) => {
                        lines.push(format!(
                            "{field}: pattern: {}",
                            escape_untrusted(&e.to_string())
                        ));
                        continue;
                    }
                },
            };
            let (value, from) = match d.name.strip_prefix("label:") {
                Some(k) => (site.labels.get(k).cloned(), "the agent's labels".to_owned()),
                None => (
                    site.values.get(&d.name).cloned(),
                    match &site.values_source {
                        Some(s) => format!("valuesFile {s}"),
                        None => "the values file (none configured)".to_owned(),
                    },
                ),
            };
            let (text, from) = match (value, &d.default) {
                (Some(v), _) => (v, from),
                (None, Some(def)) => (def.clone(), "its default".to_owned()),
                (None, None) => {
                    lines.push(format!(
                        "variable `{shown}`: no value at this site (not in {from}) and no default"
                    ));
                    continue;
                }
            };
            if let Some((p, r)) = &pattern {
                if !r.is_match(&text) {
                    lines.push(format!(
                        "variable `{shown}`: value `{}` from {from} does not match its pattern `{}`",
                        escape_untrusted(&text),
                        escape_untrusted(p)
                    ));
                    continue;
                }
            }
            let typed_ok = match d.ty {
                VarType::String => true,
                VarType::Integer => text.parse::<i64>().is_ok(),
                VarType::Boolean => text == "true" || text == "false",
            };
            if !typed_ok {
                lines.push(format!(
                    "variable `{shown}`: value `{}` from {from} is not a {:?}",
                    escape_untrusted(&text),
                    d.ty
                ));
                continue;
            }
            out.insert(d.name, Resolved { text, ty: d.ty });
        }
    }
    out
}

/// Replaces the placeholders of one string. `Ok(None)`: no placeholder
/// (and no escape), the string is unchanged.
fn substitute(s: &str, vars: &BTreeMap<String, Resolved>) -> Result<Option<Value>, String> {
    if !s.contains('$') {
        return Ok(None);
    }
    let mut out = String::with_capacity(s.len());
    let mut changed = false;
    let mut rest = s;
    let mut whole: Option<&Resolved> = None;
    let mut pieces = 0usize;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(r) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = r;
            changed = true;
            pieces += 2;
        } else if let Some(body) = after.strip_prefix("${") {
            let Some(end) = body.find('}') else {
                return Err(format!(
                    "`{}`: unterminated `${{` (write `$${{` for a literal `${{`)",
                    escape_untrusted(after)
                ));
            };
            let name = &body[..end];
            check_name(name).map_err(|m| format!("`${{{}}}`: {m}", escape_untrusted(name)))?;
            let Some(v) = vars.get(name) else {
                return Err(format!(
                    "`${{{}}}`: undeclared variable (declare it in the bundle's CairnValues)",
                    escape_untrusted(name)
                ));
            };
            if i == 0 && pieces == 0 && out.is_empty() {
                whole = Some(v);
            }
            out.push_str(&v.text);
            rest = &body[end + 1..];
            changed = true;
            pieces += 1;
        } else {
            out.push('$');
            rest = &after[1..];
            pieces += 1;
        }
    }
    out.push_str(rest);
    if !changed {
        return Ok(None);
    }
    if let (Some(v), true, 1) = (whole, rest.is_empty(), pieces) {
        match v.ty {
            VarType::Integer => {
                if let Ok(n) = v.text.parse::<i64>() {
                    return Ok(Some(Value::from(n)));
                }
            }
            VarType::Boolean => return Ok(Some(Value::Bool(v.text == "true"))),
            VarType::String => {}
        }
    }
    Ok(Some(Value::String(out)))
}

fn walk(
    v: &mut Value,
    path: &mut String,
    vars: &BTreeMap<String, Resolved>,
    errors: &mut Vec<String>,
) {
    match v {
        Value::String(s) => match substitute(s, vars) {
            Ok(Some(n)) => *v = n,
            Ok(None) => {}
            Err(m) => errors.push(format!("field {path}: {m}")),
        },
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, path, vars, errors);
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&escape_untrusted(k));
                walk(item, path, vars, errors);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn identity_fields(v: &Value) -> [Option<&Value>; 4] {
    [
        v.get("apiVersion"),
        v.get("kind"),
        v.get("metadata").and_then(|m| m.get("name")),
        v.get("metadata").and_then(|m| m.get("namespace")),
    ]
}

fn with_bytes(o: &DesiredObject, bytes: Vec<u8>) -> DesiredObject {
    let mut entry = o.entry.clone();
    entry.object = cairn_core::Address::of(&bytes);
    entry.size = bytes.len() as u64;
    DesiredObject { entry, bytes }
}

/// Renders a verified release for this site. `decrypt: false` skips the
/// `AgeSecret`s (they are passed through): the adoption check only needs
/// the values. (Holds every object: the agent streams with [`Renderer`].)
pub fn render(
    objects: &[DesiredObject],
    site: &Site,
    decrypt: bool,
) -> Result<Rendered, RenderError> {
    let mut lines = Vec::new();
    let values: Vec<&DesiredObject> = objects.iter().filter(|o| is_values(&o.entry)).collect();
    let renderer = Renderer::new(&values, site, &mut lines);
    let mut out = Rendered {
        values_digest: renderer.values_digest(),
        ..Rendered::default()
    };
    for o in objects {
        match renderer.render_one(o.clone(), site, decrypt) {
            One::Skip => {}
            One::Apply(o) => out.objects.push(o),
            One::ObjectError(m) => out.object_errors.push(m),
            One::Errors(e) => lines.extend(e),
        }
    }
    finish(lines)?;
    Ok(out)
}

/// Whether an entry is a `CairnValues` declaration (read first, never
/// applied).
pub fn is_values(e: &cairn_core::bundle::Entry) -> bool {
    e.api_version == API_VERSION && e.kind == VALUES_KIND
}

/// The error for the collected lines, if any (at most 20
/// listed).
pub fn finish(mut lines: Vec<String>) -> Result<(), RenderError> {
    if lines.is_empty() {
        return Ok(());
    }
    let more = lines.len().saturating_sub(MAX_LISTED);
    lines.truncate(MAX_LISTED);
    if more > 0 {
        lines.push(format!("and {more} more"));
    }
    Err(RenderError { lines })
}

/// What [`Renderer::render_one`] made of one object.
#[derive(Debug)]
pub enum One {
    /// Not applied (a `CairnValues` declaration).
    Skip,
    /// Apply this (its entry's address and size are the rendered bytes').
    Apply(DesiredObject),
    /// Not applied at this site (an `AgeSecret` it cannot decrypt).
    ObjectError(String),
    /// Errors that block the whole release.
    Errors(Vec<String>),
}

/// The variables of a release resolved for a site: renders its objects
/// one at a time, so a caller can stream them.
pub struct Renderer {
    vars: BTreeMap<String, Resolved>,
}

impl Renderer {
    /// Resolves the variables the `values` objects (the release's
    /// `CairnValues`) declare; problems go to `lines`.
    pub fn new(values: &[&DesiredObject], site: &Site, lines: &mut Vec<String>) -> Self {
        Self {
            vars: resolve(values, site, lines),
        }
    }

    /// The digest of the values in use ([`Rendered::values_digest`]).
    pub fn values_digest(&self) -> Option<String> {
        (!self.vars.is_empty()).then(|| {
            let canon: BTreeMap<&str, &str> = self
                .vars
                .iter()
                .map(|(k, v)| (k.as_str(), v.text.as_str()))
                .collect();
            cairn_keys::sha256_address(&serde_json::to_vec(&canon).unwrap_or_default())
        })
    }

    /// Renders one verified object (deterministic: the same object and
    /// site give the same bytes).
    pub fn render_one(&self, o: DesiredObject, site: &Site, decrypt: bool) -> One {
        let vars = &self.vars;
        if is_kind(&o, VALUES_KIND) {
            return One::Skip;
        }
        if is_kind(&o, cairn_secret::KIND) {
            if !decrypt {
                return One::Apply(o);
            }
            return match decrypt_one(&o, site) {
                Ok(d) => One::Apply(d),
                Err(m) => One::ObjectError(m),
            };
        }
        // Most objects have no `$`: keep their verified bytes as they are.
        if !o.bytes.contains(&b'$') {
            return One::Apply(o);
        }
        let mut v: Value = match serde_json::from_slice(&o.bytes) {
            Ok(v) => v,
            Err(e) => return One::Errors(vec![format!("{}: not JSON: {e}", obj_name(&o))]),
        };
        let before = identity_fields(&v).map(|f| f.cloned());
        let mut errors = Vec::new();
        walk(&mut v, &mut String::new(), vars, &mut errors);
        if errors.is_empty() && identity_fields(&v).map(|f| f.cloned()) != before {
            errors.push(
                "placeholders are not allowed in apiVersion, kind, metadata.name or metadata.namespace (the signed manifest names the object)".into(),
            );
        }
        if !errors.is_empty() {
            let n = obj_name(&o);
            return One::Errors(errors.into_iter().map(|e| format!("{n}: {e}")).collect());
        }
        match serde_json::to_vec(&v) {
            Ok(b) if b == o.bytes => One::Apply(o),
            Ok(b) => One::Apply(with_bytes(&o, b)),
            Err(e) => One::Errors(vec![format!("{}: {e}", obj_name(&o))]),
        }
    }
}

fn decrypt_one(o: &DesiredObject, site: &Site) -> Result<DesiredObject, String> {
    let file = obj_name(o);
    let Some(ids) = &site.identities else {
        return Err(format!(
            "encrypted Secret not applied: {file}: this agent has no ageIdentityFile configured"
        ));
    };
    let v: Value =
        serde_json::from_slice(&o.bytes).map_err(|e| format!("{file}: not JSON: {e}"))?;
    let doc = cairn_secret::from_value(v, &file)
        .map_err(|e| format!("encrypted Secret not applied: {e}"))?;
    let (_plain, secret) =
        cairn_secret::decrypt_value(&doc, &file, ids, &cairn_secret::yaml_values)
            .map_err(|e| format!("encrypted Secret not applied: {e}"))?;
    let bytes = serde_json::to_vec(&secret).map_err(|e| format!("{file}: {e}"))?;
    let mut d = with_bytes(o, bytes);
    d.entry.api_version = "v1".into();
    d.entry.kind = "Secret".into();
    Ok(d)
}

/// Rendering for this site, in status (`reconcile.site`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SiteStatus {
    /// The digest of the values in use ([`Rendered::values_digest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values_digest: Option<String>,
    /// Objects not applied at this site, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub object_errors: Vec<String>,
    /// Why the release could not be rendered (nothing applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The configured files, for [`Site::load`].
pub fn files(config: &crate::config::Config) -> (Option<PathBuf>, Option<PathBuf>) {
    (config.values_file.clone(), config.age_identity_file.clone())
}

#[cfg(test)]
mod tests;
