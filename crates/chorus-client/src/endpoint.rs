//! Endpoint addresses as users write them (`host:port` or `http://host:port`, as etcdctl
//! accepts them) turned into the URI that the gRPC channel dials.

use tonic::transport::Uri;

use crate::ClientError;

/// One endpoint: the address as the user wrote it (shown back in errors and status tables, so
/// that it matches what they typed) and the URI to dial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EndpointAddress {
    pub(crate) name: String,
    pub(crate) uri: Uri,
}

/// Parses one endpoint. Only plain-text `http` is accepted: chorus has no client TLS yet, and
/// silently dialing `https://` without TLS would fail later with a far less clear error.
pub(crate) fn parse_endpoint(text: &str) -> Result<EndpointAddress, ClientError> {
    let name = text.trim();
    let invalid = |reason: &str| ClientError::InvalidEndpoint {
        endpoint: text.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(invalid("empty address"));
    }
    let host_port = match name.split_once("://") {
        None => name,
        Some(("http", rest)) => rest,
        Some(("https", _)) => return Err(invalid("TLS (https) is not supported yet")),
        Some((scheme, _)) => return Err(invalid(&format!("unsupported scheme {scheme:?}"))),
    };
    let host_port = host_port.strip_suffix('/').unwrap_or(host_port);
    if host_port.contains(['/', '?', '#', '@']) {
        return Err(invalid("expected host:port with no path"));
    }
    let uri: Uri = format!("http://{host_port}").parse().map_err(|error| invalid(&format!("{error}")))?;
    let authority = uri.authority().ok_or_else(|| invalid("missing host"))?;
    if authority.host().is_empty() {
        return Err(invalid("missing host"));
    }
    if authority.port_u16().is_none() {
        return Err(invalid("missing port"));
    }
    Ok(EndpointAddress { name: name.to_string(), uri })
}

/// Parses every endpoint, refusing an empty list: a client with nowhere to send requests can
/// only fail later, with a less helpful error.
pub(crate) fn parse_endpoints(texts: &[String]) -> Result<Vec<EndpointAddress>, ClientError> {
    if texts.is_empty() {
        return Err(ClientError::NoEndpoints);
    }
    texts.iter().map(|text| parse_endpoint(text)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri_of(text: &str) -> String {
        parse_endpoint(text).unwrap().uri.to_string()
    }

    #[test]
    fn accepts_host_port_with_or_without_http() {
        assert_eq!(uri_of("127.0.0.1:2379"), "http://127.0.0.1:2379/");
        assert_eq!(uri_of("http://127.0.0.1:2379"), "http://127.0.0.1:2379/");
        assert_eq!(uri_of("http://localhost:2379/"), "http://localhost:2379/");
        assert_eq!(uri_of(" node-1.example:22379 "), "http://node-1.example:22379/");
        assert_eq!(uri_of("[::1]:2379"), "http://[::1]:2379/");
    }

    #[test]
    fn keeps_the_name_as_written() {
        assert_eq!(parse_endpoint("http://127.0.0.1:2379").unwrap().name, "http://127.0.0.1:2379");
        assert_eq!(parse_endpoint(" 127.0.0.1:2379").unwrap().name, "127.0.0.1:2379");
    }

    #[test]
    fn rejects_bad_addresses() {
        for text in [
            "",
            "   ",
            "127.0.0.1",
            "http://127.0.0.1",
            "https://127.0.0.1:2379",
            "unix:///tmp/sock",
            "127.0.0.1:2379/v3",
            "127.0.0.1:notaport",
            ":2379",
            "user@host:2379",
        ] {
            let error = parse_endpoint(text).expect_err(text);
            assert!(matches!(error, ClientError::InvalidEndpoint { .. }), "{text}: {error:?}");
        }
    }

    #[test]
    fn refuses_an_empty_list() {
        assert!(matches!(parse_endpoints(&[]), Err(ClientError::NoEndpoints)));
        let parsed = parse_endpoints(&["a:1".to_string(), "http://b:2".to_string()]).unwrap();
        assert_eq!(parsed.len(), 2);
        assert!(parse_endpoints(&["a:1".to_string(), "b".to_string()]).is_err());
    }
}
