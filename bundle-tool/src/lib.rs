//! Cairn bundles.
