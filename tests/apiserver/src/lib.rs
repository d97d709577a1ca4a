//! Test API server.
