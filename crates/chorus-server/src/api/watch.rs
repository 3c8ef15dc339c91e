//! etcd's `Watch` service: one bidirectional stream carries many watchers. The
//! stream's requests become driver inputs; its responses come from the driver's
//! watch hub through a bounded channel.

use std::pin::Pin;

use chorus_core::limits::WATCH_STREAM_RESPONSES_MAX;
use chorus_proto::etcdserverpb::watch_request::RequestUnion;
use chorus_proto::etcdserverpb::watch_server::Watch;
use chorus_proto::etcdserverpb::{WatchRequest, WatchResponse};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::driver::{ChannelSink, Input, NodeHandle};

pub struct WatchService {
    node: NodeHandle,
}

impl WatchService {
    pub fn new(node: NodeHandle) -> WatchService {
        WatchService { node }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let stream = crate::driver::next_watch_stream();
        let (responses, receiver) = mpsc::channel(WATCH_STREAM_RESPONSES_MAX);
        self.node.watch_input(Input::WatchOpen { stream, sink: ChannelSink(responses.clone()) }).await?;
        let node = self.node.clone();
        let mut requests = request.into_inner();
        tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                let input = match request {
                    Ok(WatchRequest { request_union: Some(RequestUnion::CreateRequest(request)) }) => {
                        Input::WatchCreate { stream, request }
                    }
                    Ok(WatchRequest { request_union: Some(RequestUnion::CancelRequest(cancel)) }) => {
                        Input::WatchCancel { stream, watch_id: cancel.watch_id }
                    }
                    Ok(WatchRequest { request_union: Some(RequestUnion::ProgressRequest(_)) }) => {
                        Input::WatchProgress { stream }
                    }
                    Ok(WatchRequest { request_union: None }) => continue,
                    Err(_) => break,
                };
                if node.watch_input(input).await.is_err() {
                    break;
                }
            }
            let _ = node.watch_input(Input::WatchClose { stream }).await;
            drop(responses);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}
