//! A watcher the server keeps for itself (for the Lock and Election services, which
//! wait for a key to go): a watch stream on the driver's watch hub, like a
//! client's, with a stream id from the member's one counter.

use chorus_core::limits::WATCH_STREAM_RESPONSES_MAX;
use chorus_proto::etcdserverpb::{ResponseHeader, WatchCreateRequest, WatchResponse};
use chorus_proto::mvccpb::{event::EventType, Event};
use tokio::sync::mpsc;
use tonic::Status;

use crate::driver::{ChannelSink, Input, NodeHandle};

pub struct KeyWatch {
    node: NodeHandle,
    stream: u64,
    responses: mpsc::Receiver<Result<WatchResponse, Status>>,
}

/// Why a watch ended without the event waited for.
#[derive(Debug)]
pub enum WatchEnd {
    /// The revision to start from was compacted: read again and watch from now.
    Compacted,
    /// The server is stopping or the watch failed.
    Failed(Status),
}

impl KeyWatch {
    /// Opens a stream and creates one watcher on it.
    pub async fn open(node: &NodeHandle, request: WatchCreateRequest) -> Result<KeyWatch, Status> {
        let stream = crate::driver::next_watch_stream();
        let (sender, responses) = mpsc::channel(WATCH_STREAM_RESPONSES_MAX);
        node.watch_input(Input::WatchOpen { stream, sink: ChannelSink(sender) }).await?;
        let watch = KeyWatch { node: node.clone(), stream, responses };
        node.watch_input(Input::WatchCreate { stream, request }).await?;
        Ok(watch)
    }

    /// The next events (never an empty batch), with their response's header.
    pub async fn next_events(&mut self) -> Result<(Option<ResponseHeader>, Vec<Event>), WatchEnd> {
        loop {
            let response = match self.responses.recv().await {
                Some(Ok(response)) => response,
                Some(Err(status)) => return Err(WatchEnd::Failed(status)),
                None => return Err(WatchEnd::Failed(Status::unavailable("etcdserver: server stopped"))),
            };
            if response.compact_revision > 0 {
                return Err(WatchEnd::Compacted);
            }
            if response.canceled {
                return Err(WatchEnd::Failed(Status::unavailable(format!(
                    "etcdserver: internal watch canceled: {}",
                    response.cancel_reason
                ))));
            }
            if !response.events.is_empty() {
                return Ok((response.header, response.events));
            }
        }
    }

    /// Waits until the watched key is deleted.
    pub async fn deleted(&mut self) -> Result<(), WatchEnd> {
        loop {
            let (_, events) = self.next_events().await?;
            if events.iter().any(|event| event.r#type == EventType::Delete as i32) {
                return Ok(());
            }
        }
    }
}

impl Drop for KeyWatch {
    fn drop(&mut self) {
        let close = Input::WatchClose { stream: self.stream };
        let node = self.node.clone();
        // Closing must not wait in a destructor; a full input queue gets a task.
        if let Err(error) = node.try_watch_input(close) {
            tokio::spawn(async move {
                let _ = node.watch_input(*error).await;
            });
        }
    }
}
