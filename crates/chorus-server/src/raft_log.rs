//! Bridges raft-rs's `slog` logging to `tracing`, so the whole process logs one way.

use std::fmt::Write as _;

/// A slog drain that re-emits each record as a tracing event under target `raft`.
pub struct TracingDrain;

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, value: &std::fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {key}={value}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let mut text = KvText(String::new());
        let _ = slog::KV::serialize(&record.kv(), record, &mut text);
        let _ = slog::KV::serialize(values, record, &mut text);
        let message = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{message}{}", text.0)
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{message}{}", text.0),
            slog::Level::Info => tracing::info!(target: "raft", "{message}{}", text.0),
            slog::Level::Debug => tracing::debug!(target: "raft", "{message}{}", text.0),
            slog::Level::Trace => tracing::trace!(target: "raft", "{message}{}", text.0),
        }
        Ok(())
    }
}

/// The logger handed to raft-rs.
pub fn logger(member_name: &str) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("member" => member_name.to_string()))
}
