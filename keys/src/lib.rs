//! Cairn keys.
