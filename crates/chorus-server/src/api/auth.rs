//! etcd's `Auth` service. chorus has no authentication yet (README's feature
//! table): `AuthStatus` truthfully answers that it is off, and every other call
//! answers `Unimplemented` with a sentence that says so, instead of the empty
//! `Unimplemented` a client gets for a service that is not registered at all.

use std::future::Future;
use std::pin::Pin;

use chorus_proto::etcdserverpb::auth_server::Auth;
use chorus_proto::etcdserverpb::*;
use tonic::{Request, Response, Status};

use crate::api::maintenance::header;
use crate::driver::{HeaderIds, NodeHandle};

pub struct AuthService {
    node: NodeHandle,
    ids: HeaderIds,
}

impl AuthService {
    pub fn new(node: NodeHandle, ids: HeaderIds) -> AuthService {
        AuthService { node, ids }
    }
}

fn unsupported(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "etcdserver: {rpc}: chorus does not support authentication yet (users, roles and tokens); \
         it serves every client without credentials"
    ))
}

type Answer<'a, T> = Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send + 'a>>;

/// Handlers that answer [`unsupported`], written in the shape `#[async_trait]`
/// gives the trait's methods (it does not see methods a macro makes).
macro_rules! unsupported_rpcs {
    ($($method:ident($request:ty) -> $response:ty: $name:literal;)*) => {
        $(
            fn $method<'life0, 'async_trait>(&'life0 self, _request: Request<$request>) -> Answer<'async_trait, $response>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                Box::pin(std::future::ready(Err(unsupported($name))))
            }
        )*
    };
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_status(
        &self,
        _request: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        let status = self.node.status().await?;
        Ok(Response::new(AuthStatusResponse {
            header: Some(header(self.ids, &status)),
            enabled: false,
            auth_revision: 0,
        }))
    }

    unsupported_rpcs! {
        auth_enable(AuthEnableRequest) -> AuthEnableResponse: "AuthEnable";
        auth_disable(AuthDisableRequest) -> AuthDisableResponse: "AuthDisable";
        authenticate(AuthenticateRequest) -> AuthenticateResponse: "Authenticate";
        user_add(AuthUserAddRequest) -> AuthUserAddResponse: "UserAdd";
        user_get(AuthUserGetRequest) -> AuthUserGetResponse: "UserGet";
        user_list(AuthUserListRequest) -> AuthUserListResponse: "UserList";
        user_delete(AuthUserDeleteRequest) -> AuthUserDeleteResponse: "UserDelete";
        user_change_password(AuthUserChangePasswordRequest) -> AuthUserChangePasswordResponse: "UserChangePassword";
        user_grant_role(AuthUserGrantRoleRequest) -> AuthUserGrantRoleResponse: "UserGrantRole";
        user_revoke_role(AuthUserRevokeRoleRequest) -> AuthUserRevokeRoleResponse: "UserRevokeRole";
        role_add(AuthRoleAddRequest) -> AuthRoleAddResponse: "RoleAdd";
        role_get(AuthRoleGetRequest) -> AuthRoleGetResponse: "RoleGet";
        role_list(AuthRoleListRequest) -> AuthRoleListResponse: "RoleList";
        role_delete(AuthRoleDeleteRequest) -> AuthRoleDeleteResponse: "RoleDelete";
        role_grant_permission(AuthRoleGrantPermissionRequest) -> AuthRoleGrantPermissionResponse: "RoleGrantPermission";
        role_revoke_permission(AuthRoleRevokePermissionRequest) -> AuthRoleRevokePermissionResponse: "RoleRevokePermission";
    }
}
