//! Cairn agent.
