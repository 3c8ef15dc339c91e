//! Connections whose writes wait for the end of the scheduler's round.
//!
//! The HTTP/2 server answers each request from a task of its own, and each task
//! wakes the connection's task, which writes what is queued and flushes. Run by a
//! busy worker, that is one `send` (and one packet, and one wake-up of the
//! client) per response: `perf stat` counted two `writev` per serializable get on
//! a member under 64 clients, and the kernel's share of a member's CPU was about
//! half. etcd's Go server batches instead: its writer flushes when its queue is
//! empty.
//!
//! [`CoalescedWrites`] does the same under tokio. Writes are copied into a buffer;
//! a flush is held back until the worker has run every task that was ready (tokio
//! wakes a yielded task only after it ran out of other work or every 61 tasks at
//! most, see `tokio::task::yield_now`), so the answers of every request handled
//! meanwhile leave in one `send`. A flush therefore costs at most one pass of the
//! worker's queue in latency. It also says it is not vectored, so the HTTP/2 codec
//! copies frames under 1 KiB into its own buffer instead of writing after each.
//! Large writes with nothing held pass straight through, uncopied.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use chorus_core::limits::CLIENT_WRITE_HELD_BYTES_MAX as HELD_BYTES_MAX;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
/// A write at least this large, with nothing held, goes straight to the socket.
const DIRECT_WRITE_BYTES: usize = 16 * 1024;
/// Buffer room kept for the next round once everything held is sent; a larger
/// buffer (after a large answer) is freed, so idle connections stay small.
const KEPT_CAPACITY_BYTES: usize = 64 * 1024;

/// A byte stream whose flushes wait for the end of the scheduler's round.
pub struct CoalescedWrites<S> {
    inner: S,
    held: Vec<u8>,
    /// How much of `held` the socket has taken.
    sent: usize,
    round: Arc<RoundEnd>,
    /// A flush is waiting for `round` to fire.
    waiting: bool,
}

/// Fired by the scheduler when the round a flush waits for has ended.
#[derive(Default)]
struct RoundEnd {
    fired: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for RoundEnd {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        if let Some(task) = self.task.lock().expect("round lock").take() {
            task.wake();
        }
    }
}

impl<S> CoalescedWrites<S> {
    pub fn new(inner: S) -> CoalescedWrites<S> {
        CoalescedWrites { inner, held: Vec::new(), sent: 0, round: Arc::default(), waiting: false }
    }
}

impl<S: AsyncWrite + Unpin> CoalescedWrites<S> {
    /// Writes held bytes until none are left or the socket is full.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.sent += n,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.held.capacity() > KEPT_CAPACITY_BYTES {
            self.held = Vec::new();
        } else {
            self.held.clear();
        }
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Pending until the scheduler has run the other ready tasks.
    fn poll_round_end(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.waiting {
            self.waiting = true;
            self.round.fired.store(false, Ordering::Release);
            let round_waker = Waker::from(self.round.clone());
            let mut yielded = std::pin::pin!(tokio::task::yield_now());
            // The first poll hands `round_waker` to the scheduler and is pending.
            let _ = yielded.as_mut().poll(&mut Context::from_waker(&round_waker));
        }
        if self.round.fired.load(Ordering::Acquire) {
            self.waiting = false;
            return Poll::Ready(());
        }
        *self.round.task.lock().expect("round lock") = Some(cx.waker().clone());
        // Fired between the check and the store: the waker may have been missed.
        if self.round.fired.load(Ordering::Acquire) {
            self.waiting = false;
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CoalescedWrites<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.held.len() - this.sent >= HELD_BYTES_MAX {
            match this.poll_send_held(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending if this.held.len() - this.sent >= HELD_BYTES_MAX => return Poll::Pending,
                Poll::Pending => {}
            }
        }
        if this.held.is_empty() && buf.len() >= DIRECT_WRITE_BYTES {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        // Up to the bound; the writer offers the rest again.
        let taken = buf.len().min(HELD_BYTES_MAX - (this.held.len() - this.sent));
        this.held.extend_from_slice(&buf[..taken]);
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.held.is_empty() {
            // A send the socket interrupted goes on at once; a new one waits for the round.
            if this.sent == 0 {
                std::task::ready!(this.poll_round_end(cx));
            }
            std::task::ready!(this.poll_send_held(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for CoalescedWrites<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_are_held_until_a_flush_and_then_sent_whole_and_in_order() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut writer = CoalescedWrites::new(client);
        writer.write_all(b"first ").await.unwrap();
        writer.write_all(b"second").await.unwrap();
        let mut probe = [0u8; 16];
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), server.read(&mut probe)).await;
        assert!(early.is_err(), "nothing reaches the peer before a flush");
        writer.flush().await.unwrap();
        let mut got = vec![0u8; 12];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"first second");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_than_the_peer_takes_at_once_arrives_whole_after_a_flush() {
        // A pipe of 4 KiB: the held bytes go out across many pending writes, and a
        // large write with nothing held goes straight through.
        let (client, mut server) = tokio::io::duplex(4096);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            server.read_to_end(&mut all).await.unwrap();
            all
        });
        let mut writer = CoalescedWrites::new(client);
        let mut expected = Vec::new();
        for i in 0..2_000u32 {
            let piece = i.to_be_bytes().repeat(1 + (i as usize % 7));
            writer.write_all(&piece).await.unwrap();
            expected.extend_from_slice(&piece);
            if i % 500 == 0 {
                writer.flush().await.unwrap();
            }
        }
        let big = vec![7u8; 3 * DIRECT_WRITE_BYTES];
        writer.flush().await.unwrap();
        writer.write_all(&big).await.unwrap();
        expected.extend_from_slice(&big);
        writer.shutdown().await.unwrap();
        drop(writer);
        assert_eq!(reader.await.unwrap(), expected);
    }

    #[tokio::test]
    async fn a_connection_keeps_no_large_buffer_once_its_large_answer_is_sent() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut writer = CoalescedWrites::new(client);
        let piece = [1u8; 1024];
        for _ in 0..100 {
            writer.write_all(&piece).await.unwrap();
        }
        assert!(writer.held.capacity() >= 100 * 1024);
        writer.flush().await.unwrap();
        assert!(writer.held.capacity() <= KEPT_CAPACITY_BYTES, "kept {}", writer.held.capacity());
        let mut got = vec![0u8; 100 * 1024];
        server.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|&b| b == 1));
    }
}
