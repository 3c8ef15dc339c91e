//! The one error type of this crate, and how a gRPC failure is classified: answered by the
//! server, failed in transport, or never sent at all. Retries depend on that classification.

use std::error::Error as _;

use tonic::{Code, Status};

/// Everything a call can fail with. Callers usually branch on [`ClientError::code`] (the gRPC
/// code, as with etcd's clients) or on the variant.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `Client::connect` was given no endpoint at all.
    #[error("no endpoints given")]
    NoEndpoints,

    /// An endpoint address could not be parsed; nothing was dialed.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },

    /// The server answered with an error (for example a compacted revision or an invalid
    /// request). It is shown as the server's message alone, as etcdctl shows it.
    #[error("{}", server_message(.status))]
    Server { endpoint: String, status: Status },

    /// No endpoint could serve the request: the last attempt failed in transport or was
    /// answered with `Unavailable`, and either the retry budget was spent or the request was a
    /// write that may already have been sent (so repeating it was not safe).
    #[error("{endpoint}: {}", describe_status(.status))]
    Unavailable { endpoint: String, status: Status },

    /// The request deadline passed before any endpoint answered. For a write, the outcome is
    /// unknown: it may or may not have been applied.
    #[error("request timed out after {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
}

impl ClientError {
    /// The gRPC status behind this error, when there is one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Server { status, .. } | ClientError::Unavailable { status, .. } => Some(status),
            ClientError::NoEndpoints | ClientError::InvalidEndpoint { .. } | ClientError::Timeout { .. } => {
                None
            }
        }
    }

    /// The gRPC code this error corresponds to, so callers can treat local and remote errors
    /// alike (an invalid endpoint is `InvalidArgument`, a local timeout `DeadlineExceeded`).
    pub fn code(&self) -> Code {
        match self {
            ClientError::Server { status, .. } | ClientError::Unavailable { status, .. } => status.code(),
            ClientError::NoEndpoints | ClientError::InvalidEndpoint { .. } => Code::InvalidArgument,
            ClientError::Timeout { .. } => Code::DeadlineExceeded,
        }
    }
}

/// The server's own message, or the code's description when the server sent none.
fn server_message(status: &Status) -> String {
    if status.message().is_empty() {
        status.code().description().to_string()
    } else {
        status.message().to_string()
    }
}

/// The status message followed by the root cause of its source chain ("tcp connect error:
/// Connection refused"), because for transport failures the useful part is the root cause;
/// the layers between (tonic's "transport error" wrappers) add nothing.
fn describe_status(status: &Status) -> String {
    let mut text = server_message(status);
    let mut root_cause = None;
    let mut source = status.source();
    while let Some(error) = source {
        root_cause = Some(error);
        source = error.source();
    }
    if let Some(root_cause) = root_cause {
        let message = root_cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
    }
    text
}

/// True when the request never left this process: the connection could not be established.
/// Only then is it safe to send a write again.
pub(crate) fn is_never_sent(status: &Status) -> bool {
    source_chain_has::<tonic::ConnectError>(status)
}

/// True when tonic itself gave up because the request's deadline passed (it enforces the
/// gRPC timeout we set on each request). That is our own timeout, not the server's answer.
pub(crate) fn is_local_timeout(status: &Status) -> bool {
    source_chain_has::<tonic::TimeoutExpired>(status)
}

/// True when the failure came from the transport (connection lost, reset, refused) rather than
/// from a gRPC answer of the server. tonic wraps every channel failure in a
/// `tonic::transport::Error`; a status the server sent has no such source.
pub(crate) fn is_transport_failure(status: &Status) -> bool {
    source_chain_has::<tonic::transport::Error>(status) || source_chain_has::<tonic::ConnectError>(status)
}

/// True when this endpoint looks unable to serve anyone right now, so the next request should
/// go to another endpoint.
pub(crate) fn is_endpoint_failure(status: &Status) -> bool {
    status.code() == Code::Unavailable || is_transport_failure(status)
}

fn source_chain_has<E: std::error::Error + 'static>(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(error) = source {
        if error.is::<E>() {
            return true;
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_show_the_server_message() {
        let error = ClientError::Server {
            endpoint: "127.0.0.1:2379".to_string(),
            status: Status::out_of_range("etcdserver: mvcc: required revision has been compacted"),
        };
        assert_eq!(error.to_string(), "etcdserver: mvcc: required revision has been compacted");
        assert_eq!(error.code(), Code::OutOfRange);
    }

    #[test]
    fn a_server_status_is_neither_transport_nor_unsent() {
        let status = Status::unavailable("etcdserver: no leader");
        assert!(!is_never_sent(&status));
        assert!(!is_transport_failure(&status));
        assert!(is_endpoint_failure(&status));
        assert!(!is_endpoint_failure(&Status::invalid_argument("bad")));
    }

    #[test]
    fn a_connect_error_means_never_sent() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let status = Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(is_never_sent(&status));
        assert!(is_transport_failure(&status));
    }
}
