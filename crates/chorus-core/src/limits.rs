//! limits: being written.
