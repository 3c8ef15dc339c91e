//! validate: being written.
