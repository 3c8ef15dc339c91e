//! chorus's `Barrier` service (`chorus.v1`, proto/chorus/v1/coord.proto): the
//! logic is chorus-core's [`chorus_core::barrier`]; this runs its reads and txns
//! through the node and waits on the barrier's keys between attempts.

use std::time::Instant;

use chorus_core::barrier::{self, Action, Enter, Leave};
use chorus_core::coord::{validate_timeout_ms, CoordError};
use chorus_core::limits::Limits;
use chorus_proto::chorus::v1::barrier_server::Barrier;
use chorus_proto::chorus::v1::{EnterRequest, EnterResponse, LeaveRequest, LeaveResponse};
use chorus_proto::etcdserverpb::{RangeResponse, TxnResponse};
use tonic::{Request, Response, Status};

use crate::api::coord::{deadline_after, txn, wait_for_change};
use crate::driver::NodeHandle;
use crate::status::coord_status;

pub struct BarrierService {
    node: NodeHandle,
    limits: Limits,
}

impl BarrierService {
    pub fn new(node: NodeHandle, limits: Limits) -> BarrierService {
        BarrierService { node, limits }
    }
}

/// Enter and Leave, as the runner sees them.
trait Call {
    fn name(&self) -> &str;
    fn start(&mut self) -> Action;
    fn start_over(&mut self) -> Action;
    fn give_up(&mut self) -> Action;
    fn on_range(&mut self, response: RangeResponse) -> Action;
    fn on_txn(&mut self, response: TxnResponse) -> Action;
}

macro_rules! call {
    ($type:ty) => {
        impl Call for $type {
            fn name(&self) -> &str {
                <$type>::name(self)
            }
            fn start(&mut self) -> Action {
                <$type>::start(self)
            }
            fn start_over(&mut self) -> Action {
                <$type>::start_over(self)
            }
            fn give_up(&mut self) -> Action {
                <$type>::give_up(self)
            }
            fn on_range(&mut self, response: RangeResponse) -> Action {
                <$type>::on_range(self, response)
            }
            fn on_txn(&mut self, response: TxnResponse) -> Action {
                <$type>::on_txn(self, response)
            }
        }
    };
}
call!(Enter);
call!(Leave);

impl BarrierService {
    /// Runs a call's actions until it is done or has given up at `deadline`.
    async fn run(&self, call: &mut impl Call, deadline: Instant) -> Result<Action, Status> {
        let mut action = call.start();
        let mut gave_up = false;
        loop {
            action = match action {
                Action::Read(range) => call.on_range(self.node.read(range).await?),
                Action::Write(request) => call.on_txn(txn(&self.node, &self.limits, request).await?),
                Action::Wait { revision } => {
                    if gave_up {
                        // Giving up led back to waiting: report the timeout.
                        return Ok(call.give_up());
                    }
                    if Instant::now() >= deadline {
                        gave_up = true;
                        call.give_up()
                    } else {
                        wait_for_change(&self.node, barrier::watch_range(call.name()), revision, deadline)
                            .await?;
                        call.start_over()
                    }
                }
                done => return Ok(done),
            }
        }
    }
}

#[tonic::async_trait]
impl Barrier for BarrierService {
    async fn enter(&self, request: Request<EnterRequest>) -> Result<Response<EnterResponse>, Status> {
        let request = request.into_inner();
        validate_timeout_ms(request.timeout_ms).map_err(coord_status)?;
        let mut enter = Enter::new(&request.name, request.count, request.lease).map_err(coord_status)?;
        match self.run(&mut enter, deadline_after(request.timeout_ms)).await? {
            Action::Passed(tripped) => Ok(Response::new(EnterResponse {
                trip_revision: tripped.revision,
                participants: tripped.participants,
            })),
            Action::TimedOut(message) => Err(coord_status(CoordError::DeadlineExceeded(message))),
            Action::Lost(message) => Err(coord_status(CoordError::FailedPrecondition(message))),
            other => Err(Status::internal(format!("barrier enter ended unexpectedly: {other:?}"))),
        }
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        let request = request.into_inner();
        validate_timeout_ms(request.timeout_ms).map_err(coord_status)?;
        let mut leave = Leave::new(&request.name, request.lease).map_err(coord_status)?;
        match self.run(&mut leave, deadline_after(request.timeout_ms)).await? {
            Action::Left { revision } => Ok(Response::new(LeaveResponse { revision })),
            Action::TimedOut(message) => Err(coord_status(CoordError::DeadlineExceeded(message))),
            other => Err(Status::internal(format!("barrier leave ended unexpectedly: {other:?}"))),
        }
    }
}
