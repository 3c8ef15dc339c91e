//! The byte format of a raft link: what one member writes to another on the peer
//! port to carry raft messages, without HTTP/2 or gRPC in between.
//!
//! A link is one TCP connection per ordered pair of members. The sender opens it
//! with a hello of [`HELLO_BYTES`]: the 8-byte [`MAGIC`] (which is how the peer
//! port tells a link from a gRPC connection), then the cluster id, the sender's
//! member id and the receiver's, each a little-endian u64. The receiver answers
//! with one [`Answer`]: a code byte, a little-endian u16 length and that many bytes
//! of UTF-8 reason. After [`Answer::ACCEPTED`] the sender writes frames and the
//! receiver writes nothing, unless it later refuses the sender (it was removed from
//! the cluster): then it writes one more answer and closes.
//!
//! A frame is a little-endian u32 length and a raft-rs `eraftpb::Message` of that
//! many bytes, as raft-rs's rust-protobuf encodes it. A frame of length 0 is a
//! keep-alive: a sender with nothing to say writes one every
//! [`KEEP_ALIVE_INTERVAL`], and a receiver that hears nothing for
//! [`IDLE_TIMEOUT`] closes the link.
//!
//! rust-protobuf 2's parser has a published advisory for untrusted input: a
//! receiver parses frames only after the hello named its cluster and itself, from a
//! member not removed, and only frames no longer than [`PEER_FRAME_BYTES_MAX`].

use bytes::{Buf, BytesMut};
use chorus_core::limits::{PEER_FRAME_BYTES_MAX, PEER_FRAME_RESERVE_BYTES_MAX};
use protobuf::Message as _;
use raft::prelude::Message;
use std::time::Duration;

/// The first bytes of a raft link. An HTTP/2 connection starts with `PRI *`.
pub const MAGIC: &[u8; 8] = b"CHORUSR1";
/// The length of a hello: magic, cluster id, sender id, receiver id.
pub const HELLO_BYTES: usize = 32;
/// The longest reason an answer carries; longer ones are cut.
pub const REASON_BYTES_MAX: usize = 1024;
/// How often a sender with nothing to send writes a keep-alive frame.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a receiver waits for a byte before it closes the link, and how long
/// written bytes may stay unacknowledged before the kernel gives up on the peer.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Who opens a link, to whom, in which cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub cluster_id: u64,
    pub from_id: u64,
    pub to_id: u64,
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut bytes = [0u8; HELLO_BYTES];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[8..16].copy_from_slice(&self.cluster_id.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.from_id.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.to_id.to_le_bytes());
        bytes
    }

    /// `None` if the bytes do not start with [`MAGIC`].
    pub fn decode(bytes: &[u8; HELLO_BYTES]) -> Option<Hello> {
        if &bytes[..8] != MAGIC {
            return None;
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        Some(Hello { cluster_id: word(8), from_id: word(16), to_id: word(24) })
    }
}

/// A receiver's word on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub code: u8,
    pub reason: String,
}

impl Answer {
    /// Frames may follow.
    pub const ACCEPTED: u8 = 0;
    /// The hello named another cluster or another member, or a frame was bad.
    pub const REFUSED: u8 = 1;
    /// The sender has been removed from the cluster.
    pub const REMOVED: u8 = 2;
    /// The length of an answer before its reason.
    pub const HEAD_BYTES: usize = 3;

    pub fn accepted() -> Answer {
        Answer { code: Self::ACCEPTED, reason: String::new() }
    }

    pub fn refused(reason: impl Into<String>) -> Answer {
        Answer { code: Self::REFUSED, reason: reason.into() }
    }

    pub fn removed(reason: impl Into<String>) -> Answer {
        Answer { code: Self::REMOVED, reason: reason.into() }
    }

    pub fn encode(&self) -> Vec<u8> {
        let reason = &self.reason.as_bytes()[..self.reason.len().min(REASON_BYTES_MAX)];
        let mut bytes = Vec::with_capacity(Self::HEAD_BYTES + reason.len());
        bytes.push(self.code);
        bytes.extend_from_slice(&(reason.len() as u16).to_le_bytes());
        bytes.extend_from_slice(reason);
        bytes
    }

    /// The reason's length, from an answer's first [`Answer::HEAD_BYTES`].
    pub fn reason_len(head: &[u8; Self::HEAD_BYTES]) -> usize {
        usize::from(u16::from_le_bytes([head[1], head[2]])).min(REASON_BYTES_MAX)
    }
}

/// Appends `message` to `buf` as one frame.
pub fn push_frame(buf: &mut Vec<u8>, message: &Message) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    message.write_to_vec(buf).expect("encode raft message");
    let len = (buf.len() - start - 4) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Appends a keep-alive frame to `buf`.
pub fn push_keep_alive(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&0u32.to_le_bytes());
}

/// Why a receiver closes a link.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is larger than the {PEER_FRAME_BYTES_MAX} bytes a member accepts")]
    TooLarge(usize),
    #[error("undecodable raft message: {0}")]
    Undecodable(String),
    #[error("message from member {found:016x} on the link of member {link:016x}")]
    WrongSender { link: u64, found: u64 },
}

/// Takes every whole frame off the front of `buf` and appends its message to
/// `out`, leaving a partial frame in place for the next read. `from` is the link's
/// sender; every message must name it.
pub fn take_frames(buf: &mut BytesMut, from: u64, out: &mut Vec<Message>) -> Result<(), FrameError> {
    while buf.len() >= 4 {
        let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
        if len > PEER_FRAME_BYTES_MAX {
            return Err(FrameError::TooLarge(len));
        }
        if buf.len() < 4 + len {
            // Room for the rest, so the next reads need no reallocation; but not
            // more than PEER_FRAME_RESERVE_BYTES_MAX on a length no byte has backed yet.
            buf.reserve((4 + len - buf.len()).min(PEER_FRAME_RESERVE_BYTES_MAX));
            break;
        }
        buf.advance(4);
        let frame = buf.split_to(len);
        if len == 0 {
            continue;
        }
        let message =
            Message::parse_from_bytes(&frame).map_err(|e| FrameError::Undecodable(e.to_string()))?;
        if message.from != from {
            return Err(FrameError::WrongSender { link: from, found: message.from });
        }
        out.push(message);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use raft::prelude::{Entry, MessageType};

    /// A one-entry append from `from` to member 9 (transport's tests use it too).
    pub(crate) fn append(from: u64, index: u64, data: &[u8]) -> Message {
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgAppend);
        message.from = from;
        message.to = 9;
        message.index = index;
        message.mut_entries().push(Entry {
            index: index + 1,
            data: data.to_vec().into(),
            ..Default::default()
        });
        message
    }

    #[test]
    fn a_hello_round_trips_and_anything_without_the_magic_is_not_one() {
        let hello = Hello { cluster_id: u64::MAX, from_id: 7, to_id: 1 << 40 };
        assert_eq!(Hello::decode(&hello.encode()), Some(hello));
        let mut http2 = [0u8; HELLO_BYTES];
        http2.copy_from_slice(&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\0\0\0\0\0"[..HELLO_BYTES]);
        assert_eq!(Hello::decode(&http2), None);
    }

    #[test]
    fn an_answer_carries_its_code_and_at_most_the_longest_reason() {
        let bytes = Answer { code: Answer::REMOVED, reason: "gone".into() }.encode();
        assert_eq!(bytes[0], Answer::REMOVED);
        assert_eq!(Answer::reason_len(&bytes[..3].try_into().unwrap()), 4);
        assert_eq!(&bytes[3..], b"gone");
        let long = Answer { code: Answer::REFUSED, reason: "x".repeat(5000) }.encode();
        assert_eq!(long.len(), Answer::HEAD_BYTES + REASON_BYTES_MAX);
        assert_eq!(Answer::reason_len(&long[..3].try_into().unwrap()), REASON_BYTES_MAX);
    }

    #[test]
    fn frames_split_anywhere_come_out_whole_in_order_and_keep_alives_vanish() {
        let sent = [append(3, 10, b"a"), append(3, 11, &[7; 3000]), append(3, 12, b"")];
        let mut wire = Vec::new();
        push_keep_alive(&mut wire);
        for message in &sent {
            push_frame(&mut wire, message);
            push_keep_alive(&mut wire);
        }
        for cut in [1, 3, 4, 5, 17, 100, wire.len() - 1] {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(cut) {
                buf.extend_from_slice(piece);
                take_frames(&mut buf, 3, &mut got).unwrap();
            }
            assert_eq!(got, sent, "pieces of {cut} bytes");
            assert!(buf.is_empty(), "pieces of {cut} bytes left {} bytes", buf.len());
        }
    }

    #[test]
    fn a_frame_too_large_undecodable_or_from_another_member_is_refused() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&((PEER_FRAME_BYTES_MAX + 1) as u32).to_le_bytes());
        let mut got = Vec::new();
        assert_eq!(take_frames(&mut buf, 3, &mut got), Err(FrameError::TooLarge(PEER_FRAME_BYTES_MAX + 1)));

        let mut buf = BytesMut::new();
        buf.extend_from_slice(&3u32.to_le_bytes());
        buf.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(take_frames(&mut buf, 3, &mut got), Err(FrameError::Undecodable(_))));

        let mut wire = Vec::new();
        push_frame(&mut wire, &append(4, 1, b"x"));
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(take_frames(&mut buf, 3, &mut got), Err(FrameError::WrongSender { link: 3, found: 4 }));
        assert!(got.is_empty());
    }
}
