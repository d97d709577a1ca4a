//! Denial rules: make requests for chosen kinds fail with 403 Forbidden, the way
//! RBAC would.
//!
//! Rule syntax (`--deny RULE`, case-insensitive): `TARGET[:VERBS]`.
//! * `TARGET` is a kind (`Secret`), a plural resource (`secrets`), `group/Kind`
//!   (`apps/Deployment`, `core/Secret` or `/Secret` for the core group) or
//!   `resource.group` (`deployments.apps`), or `*` for everything.
//! * `VERBS` is a comma-separated list of verbs (`create,delete`), `write`
//!   (default: create, update, patch, delete, deletecollection), `read`
//!   (get, list, watch) or `all`.

use crate::discovery::ResourceInfo;
use crate::error::{group_resource, ApiError};

const WRITE: &[&str] = &["create", "update", "patch", "delete", "deletecollection"];
const READ: &[&str] = &["get", "list", "watch"];

/// One denial rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyRule {
    target: String,
    verbs: Vec<String>,
}

impl DenyRule {
    /// Parses `TARGET[:VERBS]`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (target, verbs) = match s.split_once(':') {
            Some((t, v)) => (t, v),
            None => (s, "write"),
        };
        let target = target.trim().to_lowercase();
        if target.is_empty() {
            anyhow::bail!("empty deny target in {s:?}");
        }
        let mut out = Vec::new();
        for v in verbs.split(',').map(|v| v.trim().to_lowercase()) {
            match v.as_str() {
                "write" => out.extend(WRITE.iter().map(|s| s.to_string())),
                "read" => out.extend(READ.iter().map(|s| s.to_string())),
                "all" | "*" => {
                    out.extend(WRITE.iter().map(|s| s.to_string()));
                    out.extend(READ.iter().map(|s| s.to_string()));
                }
                "" => {}
                other if WRITE.contains(&other) || READ.contains(&other) => out.push(other.into()),
                other => anyhow::bail!("unknown verb {other:?} in deny rule {s:?}"),
            }
        }
        Ok(DenyRule { target, verbs: out })
    }

    /// Whether the rule denies `verb` on `info`.
    pub fn matches(&self, info: &ResourceInfo, verb: &str) -> bool {
        if !self.verbs.iter().any(|v| v == verb) {
            return false;
        }
        let kind = info.kind.to_lowercase();
        let group = info.group.to_lowercase();
        let t = self.target.as_str();
        t == "*"
            || t == kind
            || t == info.plural
            || t == format!("{group}/{kind}")
            || (group.is_empty() && (t == format!("core/{kind}") || t == format!("/{kind}")))
            || t == format!("{}.{group}", info.plural)
    }
}

/// Builds the 403 a real API server returns for an RBAC denial.
pub fn forbidden(
    user: &str,
    info: &ResourceInfo,
    verb: &str,
    sub: Option<&str>,
    namespace: Option<&str>,
    name: Option<&str>,
) -> ApiError {
    let gr = group_resource(&info.group, &info.plural);
    let subject = match name {
        Some(n) if !n.is_empty() => format!("{gr} \"{n}\""),
        _ => gr,
    };
    let resource = match sub {
        Some(s) => format!("{}/{s}", info.plural),
        None => info.plural.clone(),
    };
    let scope = match namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    let mut details = serde_json::json!({"kind": info.plural});
    if let Some(n) = name.filter(|n| !n.is_empty()) {
        details["name"] = serde_json::json!(n);
    }
    if !info.group.is_empty() {
        details["group"] = serde_json::json!(info.group);
    }
    ApiError::new(
        403,
        "Forbidden",
        format!(
            "{subject} is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{}\" {scope}",
            info.group
        ),
    )
    .with_details(details)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::builtins;

    #[test]
    fn rules() {
        let all = builtins();
        let secret = all.iter().find(|r| r.kind == "Secret").expect("secret");
        let deploy = all.iter().find(|r| r.kind == "Deployment").expect("deploy");
        let r = DenyRule::parse("Secret").expect("parse");
        assert!(r.matches(secret, "create"));
        assert!(!r.matches(secret, "get"));
        assert!(!r.matches(deploy, "create"));
        assert!(DenyRule::parse("apps/Deployment:all")
            .expect("p")
            .matches(deploy, "list"));
        assert!(DenyRule::parse("deployments.apps:delete")
            .expect("p")
            .matches(deploy, "delete"));
        assert!(DenyRule::parse("x:bogus").is_err());
        let e = forbidden("u", secret, "create", None, Some("ns"), Some("x"));
        assert_eq!(
            e.message,
            "secrets \"x\" is forbidden: User \"u\" cannot create resource \"secrets\" in API group \"\" in the namespace \"ns\""
        );
    }
}
