//! OCI registry sources (`oci://HOST[:PORT]/NAME`): a channel published
//! with `cairn push` (layout in `docs/FORMATS.md`, "OCI artifact").
//!
//! Repository paths map onto the registry: `roots/<v>` is the layer of
//! the `cairn.roots` manifest annotated with version `v`;
//! `channels/<c>` is the release layer of the release manifest that tag
//! `c`'s index names; `objects/sha256/<2>/<hex>` is blob `sha256:<hex>`
//! (so only the objects the pipeline asks for, the missing ones, move).
//! The registry is untrusted: every manifest fetched by digest and every
//! blob is checked against its digest here, and the pipeline verifies
//! signatures and addresses as for any source.

use super::{Source, SourceError, SourceOptions};
use crate::ingest::Item;
use crate::BoxFuture;
use cairn_oci::{Client, OciError, OciRef};

/// A bundle repository in an OCI registry.
#[derive(Debug)]
pub struct OciSource {
    name: String,
    client: Client,
}

impl OciSource {
    /// A source for `spec` (`oci://HOST[:PORT]/NAME`) with its TLS and
    /// credential settings from `opts`. Reads the CA, certificate and
    /// credentials files (at start-up).
    pub fn new(spec: &str, opts: &SourceOptions) -> Result<Self, String> {
        let reference = OciRef::parse(spec)?;
        let mut net = opts.tls.get(spec).cloned().unwrap_or_default();
        net.redirect_hosts = opts.redirect_hosts.get(spec).cloned().unwrap_or_default();
        let client = Client::new(reference, &net, opts.connect_timeout, opts.request_timeout)
            .map_err(|e| format!("{spec}: {e}"))?;
        Ok(Self {
            name: spec.to_owned(),
            client,
        })
    }

    async fn fetch(&self, rel_path: &str, limit: u64) -> Result<Option<Vec<u8>>, SourceError> {
        let invalid = |reason: String| SourceError::Invalid {
            source_name: self.name.clone(),
            path: rel_path.to_owned(),
            reason,
        };
        let result = if let Some(v) = rel_path.strip_prefix("roots/") {
            let v: u64 = v
                .parse()
                .map_err(|_| invalid("not a repository path".into()))?;
            self.client.root(v, limit).await
        } else if let Some(c) = rel_path.strip_prefix("channels/") {
            cairn_core::release::validate_channel(c).map_err(invalid)?;
            self.client
                .channel_release(c, limit)
                .await
                .map(|r| r.map(|r| r.envelope))
        } else if let Some(rest) = rel_path.strip_prefix("objects/sha256/") {
            let hex = rest.split_once('/').map(|(_, h)| h).unwrap_or_default();
            let digest = format!("sha256:{hex}");
            if cairn_core::layout::object_path_str(&digest).as_deref() != Some(rel_path) {
                return Err(invalid("not a repository path".into()));
            }
            self.client.get_blob(&digest, limit).await
        } else {
            return Err(invalid("not a repository path".into()));
        };
        result.map_err(|e| match e {
            OciError::Unavailable(reason) => SourceError::Unavailable {
                source_name: self.name.clone(),
                reason,
            },
            OciError::TooLarge { .. } => SourceError::TooLarge {
                source_name: self.name.clone(),
                path: rel_path.to_owned(),
                limit,
            },
            OciError::Auth(reason) | OciError::Invalid(reason) => invalid(reason),
        })
    }
}

impl Source for OciSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch_to_file<'a>(
        &'a self,
        address: &'a str,
        limit: u64,
        dest: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<Option<u64>, SourceError>> {
        Box::pin(async move {
            let what = format!("{}: blob {address}", self.name);
            let resp = match self.client.blob_response(address).await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(None),
                Err(e) => return Err(super::blob_error(&self.name, address, e)),
            };
            cairn_oci::blobfile::download_verified(resp, address, limit, dest, &what)
                .await
                .map(Some)
                .map_err(|e| super::blob_error(&self.name, address, e))
        })
    }

    fn get<'a>(
        &'a self,
        item: &'a Item,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(async move {
            match item.path() {
                Some(rel_path) => self.fetch(&rel_path, limit).await,
                None => Ok(None),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_repository_paths_become_requests() {
        // Port 1 on loopback: any request would fail as unavailable, so an
        // `invalid` answer proves no request was made.
        let s = OciSource::new("oci://127.0.0.1:1/fleet", &SourceOptions::default()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let hex = "ab".repeat(32);
        for bad in [
            "objects/sha256/zz/../../x".to_owned(),
            format!("objects/sha256/cd/{hex}"),
            "objects/sha256/ab/AB".to_owned(),
            "channels/Stable".to_owned(),
            "channels/../x".to_owned(),
            "roots/x".to_owned(),
            "manifests/stable".to_owned(),
        ] {
            let e = rt.block_on(s.fetch(&bad, 10)).unwrap_err();
            assert_eq!(e.kind(), "invalid", "{bad}: {e}");
        }
        let e = rt
            .block_on(s.fetch(&format!("objects/sha256/ab/{hex}"), 10))
            .unwrap_err();
        assert_eq!(e.kind(), "unavailable", "{e}");
        assert!(format!("{s:?}").contains("fleet"));
        assert!(OciSource::new("oci://h/Bad", &SourceOptions::default()).is_err());
    }
}
