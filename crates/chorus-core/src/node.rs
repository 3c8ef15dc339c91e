//! node: being written.
