//! Checks of single values (labels, sources, redirect hosts) that
//! `Config::from_raw` reports one line each.

pub(super) fn validate_label(k: &str, v: &str) -> Result<(), String> {
    let part_ok = |s: &str, allow_empty: bool| {
        (allow_empty || !s.is_empty())
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    };
    if !part_ok(k, false) {
        return Err("label keys are 1-63 characters of A-Z, a-z, 0-9, '-', '_' and '.'".into());
    }
    if !part_ok(v, true) {
        return Err(format!(
            "value `{v}`: up to 63 characters of A-Z, a-z, 0-9, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// A host name or IP address, as in a URL, without scheme, port or path.
pub(super) fn validate_redirect_host(h: &str) -> Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']'))
        && reqwest::Url::parse(&format!("http://{h}/")).is_ok_and(|u| u.port().is_none());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{h}`: expected a host name or IP address (no scheme, port or path)"
        ))
    }
}

pub(super) fn is_network(url: &str) -> bool {
    ["http://", "https://", "oci://"]
        .iter()
        .any(|p| url.starts_with(p))
}

/// TLS and credential settings: network sources only; a client
/// certificate needs its key.
pub(super) fn check_source_tls(url: &str, net: &cairn_oci::NetSettings) -> Result<(), String> {
    if *net != Default::default() && !is_network(url) {
        return Err(
            "caFile, clientCertFile, clientKeyFile and credentialsFile are only for \
                    http://, https:// and oci:// sources"
                .into(),
        );
    }
    if net.client_cert_file.is_some() != net.client_key_file.is_some() {
        return Err("clientCertFile and clientKeyFile go together".into());
    }
    Ok(())
}

pub(super) fn validate_source(s: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        return Err("empty source".into());
    }
    if s.starts_with("oci://") {
        return cairn_oci::OciRef::parse(s).map(|_| ());
    }
    if s.starts_with("http://") || s.starts_with("https://") {
        let url = reqwest::Url::parse(s).map_err(|e| format!("`{s}`: {e}"))?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("`{s}`: no host"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("`{s}`: a repository URL has no query or fragment"));
        }
        return Ok(());
    }
    if s.contains("://") {
        return Err(format!(
            "`{s}`: unsupported scheme (use http://, https://, oci:// or a directory path)"
        ));
    }
    Ok(())
}
