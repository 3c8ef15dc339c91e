//! Client connections whose requests name their target as a URL.
//!
//! etcdctl 3.4 asks some questions of one endpoint at a time (`endpoint status`,
//! `endpoint hashkv`, `defrag`, `move-leader`, and every command with `--cluster`)
//! through a connection whose HTTP/2 `:authority` is the endpoint as given, for
//! example `http://10.0.0.1:2379`. That is not an authority (it has a scheme and
//! slashes), and the HTTP/2 library chorus serves with resets such a request with
//! PROTOCOL_ERROR before any of chorus's code sees it. etcd's Go server ignores
//! the authority, so these commands work against etcd.
//!
//! [`AuthorityFix`] sits between the socket and the HTTP/2 server and reads the
//! first request's header block of each HTTP/2 connection. If its `:authority` is
//! valid or absent (every other client), the connection is passed through
//! untouched from then on. If not, every header block of that connection is
//! decoded (HPACK, mirroring the client's compression table) and sent on with the
//! authority reduced to `host:port` (or dropped if even that is not valid), each
//! field as a literal that the server does not index, so the server's table never
//! disagrees with what it is sent. Everything else passes unchanged.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use chorus_core::limits::AUTHORITY_INSPECT_BYTES_MAX;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What every HTTP/2 connection starts with (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_BYTES: usize = 9;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 server accepts (SETTINGS_MAX_FRAME_SIZE's floor).
const FRAME_PAYLOAD_MAX: usize = 16_384;
/// How much is read from the socket at a time while inspecting.
const READ_CHUNK_BYTES: usize = 16 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Until the first header block: is this HTTP/2, and is its authority valid?
    Detect,
    /// Every header block is rewritten.
    Rewrite,
    /// Nothing more to do: bytes go straight to the server.
    PassThrough,
}

/// A header block being collected (a HEADERS frame and its CONTINUATIONs).
struct Block {
    /// The frames as received, sent on as they are if the block needs no change.
    frames: BytesMut,
    /// The header block fragments, joined.
    fragment: Vec<u8>,
    stream_id: u32,
    end_stream: bool,
}

/// A client connection, see the module documentation.
pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    preface_seen: bool,
    /// Bytes read from the socket, not yet looked at.
    raw: BytesMut,
    /// Bytes ready for the server.
    out: BytesMut,
    block: Option<Block>,
    decoder: Option<Box<loona_hpack::Decoder<'static>>>,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> AuthorityFix<S> {
        AuthorityFix {
            inner,
            mode: Mode::Detect,
            preface_seen: false,
            raw: BytesMut::new(),
            out: BytesMut::new(),
            block: None,
            decoder: None,
        }
    }

    fn pass_through(&mut self) {
        self.mode = Mode::PassThrough;
        if let Some(block) = self.block.take() {
            self.out.extend_from_slice(&block.frames);
        }
        self.out.extend_from_slice(&self.raw);
        self.raw = BytesMut::new();
        self.decoder = None;
    }

    /// Moves what can be judged from `raw` to `out`.
    fn process(&mut self) {
        if self.mode == Mode::PassThrough {
            return self.pass_through();
        }
        if !self.preface_seen {
            let seen = self.raw.len().min(PREFACE.len());
            if self.raw[..seen] != PREFACE[..seen] {
                // HTTP/1.1 (the JSON gateway) or not HTTP at all: not ours to judge.
                return self.pass_through();
            }
            if seen < PREFACE.len() {
                return;
            }
            let preface = self.raw.split_to(PREFACE.len());
            self.out.extend_from_slice(&preface);
            self.preface_seen = true;
        }
        while self.mode != Mode::PassThrough && self.raw.len() >= FRAME_HEADER_BYTES {
            let length = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
            let kind = self.raw[3];
            let flags = self.raw[4];
            let stream_id =
                u32::from_be_bytes([self.raw[5], self.raw[6], self.raw[7], self.raw[8]]) & 0x7fff_ffff;
            if length > AUTHORITY_INSPECT_BYTES_MAX {
                return self.pass_through();
            }
            if self.raw.len() < FRAME_HEADER_BYTES + length {
                return;
            }
            let frame = self.raw.split_to(FRAME_HEADER_BYTES + length);
            match (kind, self.block.as_mut()) {
                (FRAME_HEADERS, None) => {
                    let Some(fragment) = headers_fragment(&frame[FRAME_HEADER_BYTES..], flags) else {
                        self.out.extend_from_slice(&frame);
                        return self.pass_through();
                    };
                    self.block = Some(Block {
                        fragment: fragment.to_vec(),
                        frames: frame,
                        stream_id,
                        end_stream: flags & FLAG_END_STREAM != 0,
                    });
                }
                (FRAME_CONTINUATION, Some(block)) if block.stream_id == stream_id => {
                    block.fragment.extend_from_slice(&frame[FRAME_HEADER_BYTES..]);
                    block.frames.extend_from_slice(&frame);
                    if block.fragment.len() > AUTHORITY_INSPECT_BYTES_MAX {
                        return self.pass_through();
                    }
                }
                (_, Some(_)) => {
                    // Against the protocol (RFC 9113 §6.10): the server will say so.
                    self.out.extend_from_slice(&frame);
                    return self.pass_through();
                }
                (_, None) => {
                    self.out.extend_from_slice(&frame);
                    continue;
                }
            }
            if flags & FLAG_END_HEADERS != 0 {
                self.finish_block();
            }
        }
    }

    /// A whole header block was collected: sends it on as it is or rewritten.
    fn finish_block(&mut self) {
        let Some(block) = self.block.take() else { return };
        let decoder = self.decoder.get_or_insert_with(|| {
            let mut decoder = loona_hpack::Decoder::new();
            decoder.set_max_allowed_table_size(64 * 1024);
            Box::new(decoder)
        });
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let decoded = decoder.decode_with_cb(&block.fragment, |name, value| {
            fields.push((name.into_owned(), value.into_owned()));
        });
        if decoded.is_err() {
            // The server decodes the same bytes and ends the connection.
            self.block = Some(block);
            return self.pass_through();
        }
        if self.mode == Mode::Detect {
            let authority_valid = fields
                .iter()
                .find(|(name, _)| name == b":authority")
                .is_none_or(|(_, value)| valid_authority(value));
            if authority_valid {
                self.block = Some(block);
                return self.pass_through();
            }
            self.mode = Mode::Rewrite;
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        for (name, value) in &fields {
            if name == b":authority" {
                if let Some(fixed) = fixed_authority(value) {
                    encode_literal(&mut encoded, name, fixed);
                }
            } else {
                encode_literal(&mut encoded, name, value);
            }
        }
        write_header_frames(&mut self.out, &encoded, block.stream_id, block.end_stream);
    }
}

/// The header block fragment of a HEADERS frame's payload (without padding and
/// priority), or `None` if the frame is malformed.
fn headers_fragment(payload: &[u8], flags: u8) -> Option<&[u8]> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & FLAG_PADDED != 0 {
        let pad = *payload.first()? as usize;
        start += 1;
        end = end.checked_sub(pad)?;
    }
    if flags & FLAG_PRIORITY != 0 {
        start += 5;
    }
    payload.get(start..end)
}

fn valid_authority(value: &[u8]) -> bool {
    axum::http::uri::Authority::try_from(value).is_ok()
}

/// `http://host:port/...` as `host:port`, or `None` if that is no authority either.
fn fixed_authority(value: &[u8]) -> Option<&[u8]> {
    let after_scheme = match value.windows(3).position(|w| w == b"://") {
        Some(at) => &value[at + 3..],
        None => value,
    };
    let host_port = match after_scheme.iter().position(|&b| b == b'/') {
        Some(at) => &after_scheme[..at],
        None => after_scheme,
    };
    (!host_port.is_empty() && valid_authority(host_port)).then_some(host_port)
}

/// An HPACK integer with an `prefix_bits`-bit prefix (RFC 7541 §5.1); `first` holds
/// the bits above the prefix.
fn encode_integer(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let limit = (1usize << prefix_bits) - 1;
    if value < limit {
        out.push(first | value as u8);
        return;
    }
    out.push(first | limit as u8);
    value -= limit;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2).
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_integer(out, 0x00, 7, name.len());
    out.extend_from_slice(name);
    encode_integer(out, 0x00, 7, value.len());
    out.extend_from_slice(value);
}

/// A header block as a HEADERS frame and, if it is large, CONTINUATION frames.
fn write_header_frames(out: &mut BytesMut, block: &[u8], stream_id: u32, end_stream: bool) {
    let mut chunks: Vec<&[u8]> = block.chunks(FRAME_PAYLOAD_MAX).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let count = chunks.len();
    for (index, chunk) in chunks.into_iter().enumerate() {
        let kind = if index == 0 { FRAME_HEADERS } else { FRAME_CONTINUATION };
        let mut flags = if index + 1 == count { FLAG_END_HEADERS } else { 0 };
        if index == 0 && end_stream {
            flags |= FLAG_END_STREAM;
        }
        out.put_uint(chunk.len() as u64, 3);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(stream_id);
        out.extend_from_slice(chunk);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.mode == Mode::PassThrough {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; READ_CHUNK_BYTES];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) => {}
            }
            if read.filled().is_empty() {
                // The client is done: the server gets what is left, as it came,
                // then the end of the stream.
                this.pass_through();
                continue;
            }
            this.raw.extend_from_slice(read.filled());
            this.process();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_uint(payload.len() as u64, 3);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(stream_id);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    fn request(encoder: &mut loona_hpack::Encoder<'_>, authority: &[u8], path: &[u8]) -> Vec<u8> {
        let fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
        ];
        encoder.encode(fields)
    }

    /// Runs `input` through the rewriter in pieces of `step` bytes.
    fn run(input: &[u8], step: usize) -> Vec<u8> {
        let mut fix = AuthorityFix::new(());
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            fix.raw.extend_from_slice(piece);
            fix.process();
            out.extend_from_slice(&fix.out.split());
        }
        out
    }

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    /// The header blocks of `bytes` (after the preface), decoded by a fresh decoder
    /// as the server would, with each frame's kind.
    fn server_view(bytes: &[u8]) -> Vec<(u8, Fields)> {
        assert_eq!(&bytes[..PREFACE.len()], PREFACE);
        let mut rest = &bytes[PREFACE.len()..];
        let mut decoder = loona_hpack::Decoder::new();
        let mut seen = Vec::new();
        while !rest.is_empty() {
            let length = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (kind, flags) = (rest[3], rest[4]);
            let payload = &rest[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + length];
            let fields = if kind == FRAME_HEADERS {
                decoder.decode(headers_fragment(payload, flags).expect("fragment")).expect("server decodes")
            } else {
                Vec::new()
            };
            seen.push((kind, fields));
            rest = &rest[FRAME_HEADER_BYTES + length..];
        }
        seen
    }

    fn authority_of(fields: &[(Vec<u8>, Vec<u8>)]) -> Option<&[u8]> {
        fields.iter().find(|(name, _)| name == b":authority").map(|(_, value)| value.as_slice())
    }

    #[test]
    fn a_url_authority_becomes_host_and_port_in_every_request_of_the_connection() {
        let mut encoder = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let first = request(&mut encoder, b"http://127.0.0.1:2379", b"/etcdserverpb.Maintenance/Status");
        input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &first));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0"));
        // The second request's authority comes from the client's table.
        let second = request(&mut encoder, b"http://127.0.0.1:2379", b"/etcdserverpb.Maintenance/HashKV");
        let (a, b) = second.split_at(second.len() / 2);
        input.extend(frame(FRAME_HEADERS, FLAG_PADDED, 3, &[&[2u8][..], a, &[0, 0]].concat()));
        input.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 3, b));
        for step in [1, 7, input.len()] {
            let view = server_view(&run(&input, step));
            let kinds: Vec<u8> = view.iter().map(|(kind, _)| *kind).collect();
            assert_eq!(kinds, [0x4, FRAME_HEADERS, 0x0, FRAME_HEADERS], "step {step}");
            assert_eq!(authority_of(&view[1].1), Some(&b"127.0.0.1:2379"[..]));
            assert_eq!(authority_of(&view[3].1), Some(&b"127.0.0.1:2379"[..]));
            let path = view[3].1.iter().find(|(name, _)| name == b":path").map(|(_, v)| v.clone());
            assert_eq!(path.as_deref(), Some(&b"/etcdserverpb.Maintenance/HashKV"[..]));
        }
    }

    #[test]
    fn a_valid_authority_and_http1_pass_untouched() {
        let mut encoder = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        let first = request(&mut encoder, b"127.0.0.1:2379", b"/etcdserverpb.KV/Range");
        input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, 1, &first));
        input.extend(b"anything after is not looked at");
        assert_eq!(run(&input, 5), input);
        let http1 = b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\n\r\n{}".to_vec();
        assert_eq!(run(&http1, 3), http1);
    }

    #[test]
    fn an_authority_that_cannot_be_fixed_is_dropped() {
        assert_eq!(fixed_authority(b"http://10.0.0.1:2379/"), Some(&b"10.0.0.1:2379"[..]));
        assert_eq!(fixed_authority(b"unix://"), None);
        let mut encoder = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        let first = request(&mut encoder, b"http://", b"/etcdserverpb.KV/Range");
        input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, 1, &first));
        let view = server_view(&run(&input, 4));
        assert_eq!(authority_of(&view[0].1), None);
        assert_eq!(view[0].1.len(), 4);
    }
}
