//! mvcc: being written.
