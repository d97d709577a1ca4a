//! The agent's hooks into [`crate::site`]: render the verified objects for
//! this site before apply, and refuse to adopt a release whose values do
//! not fit this site.

use super::*;
use crate::site::{render, Site, SiteStatus};

impl Agent {
    /// Reads the site's files and renders `objects` on a blocking thread.
    async fn render_blocking(
        &self,
        objects: Vec<DesiredObject>,
        decrypt: bool,
    ) -> std::result::Result<crate::site::Rendered, String> {
        let labels = self.inner.config.labels.clone();
        let (values, identities) = crate::site::files(&self.inner.config);
        tokio::task::spawn_blocking(move || {
            let site = Site::load(&labels, values.as_deref(), identities.as_deref())?;
            render(&objects, &site, decrypt).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("render task failed: {e}"))?
    }

    /// The objects to apply at this site; records the outcome in status.
    pub(super) async fn render_for_site(
        &self,
        objects: Vec<DesiredObject>,
    ) -> Result<Vec<DesiredObject>> {
        match self.render_blocking(objects, true).await {
            Ok(r) => {
                for e in &r.object_errors {
                    tracing::warn!(error = %e, "object not applied at this site");
                }
                self.state().site = Some(SiteStatus {
                    values_digest: r.values_digest,
                    object_errors: r.object_errors,
                    error: None,
                });
                Ok(r.objects)
            }
            Err(m) => {
                self.state().site = Some(SiteStatus {
                    error: Some(m.clone()),
                    ..SiteStatus::default()
                });
                Err(Error::Status(m))
            }
        }
    }

    /// Before adoption: a release whose values do not fit this site (an
    /// undeclared variable, a value outside its pattern) is refused, with
    /// the reason in status. `None`: adopt.
    pub(super) async fn site_gate(&self, source: &str, manifest: &Manifest) -> Option<SyncOutcome> {
        let m = manifest.clone();
        let read = self
            .blocking(move |store| {
                let mut out = Vec::with_capacity(m.entries.len());
                for e in &m.entries {
                    match store.get_object(&e.object) {
                        Ok(Some(bytes)) => out.push(DesiredObject {
                            entry: e.clone(),
                            bytes,
                        }),
                        // Missing or damaged: the reconcile fetches it again
                        // and renders then.
                        _ => return Ok(None),
                    }
                }
                Ok(Some(out))
            })
            .await;
        let objects = match read {
            Ok(Some(o)) => o,
            _ => return None,
        };
        let message = self.render_blocking(objects, false).await.err()?;
        const REASON: &str = "site-values";
        tracing::warn!(source, reason = REASON, error = %message, "release not adopted at this site");
        self.inner.metrics.reject(REASON);
        let r = RejectionStatus {
            at: unix_now(),
            source: source.to_owned(),
            reason: REASON.to_owned(),
            message: message.clone(),
        };
        let mut st = self.state();
        st.last_rejection = Some(r.clone());
        st.sources
            .entry(source.to_owned())
            .or_default()
            .last_rejection = Some(r);
        st.site = Some(SiteStatus {
            error: Some(message),
            ..SiteStatus::default()
        });
        Some(SyncOutcome::Rejected { reason: REASON })
    }
}
