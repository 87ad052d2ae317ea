//! The MCP front end: the Model Context Protocol over Streamable HTTP at `/mcp`, with the
//! official Rust SDK (`rmcp`).
//!
//! Like the HTTP routes, it only parses into calls on the one request surface
//! ([`SandboxApi`]) and formats their results: tools ([`tools`]) for the operations a model
//! asks for, resources ([`resources`]) for sandbox state and console logs. It is mounted
//! inside the API's router, so it has the same listeners and the same access rules: on the
//! Unix socket every caller is admin, on TCP the bearer token's scope is the [`Caller`] (a
//! request without a valid token never reaches it). The caller is read from each HTTP
//! request, never from a session.
//!
//! It runs stateless (no MCP session; every POST is served on its own), so `hutch mcp`'s
//! stdio bridge and any Streamable HTTP client reach the same implementation. Failures of a
//! tool come back as tool results with `isError: true` and the API's stable
//! [`ErrorCode`](hutch_types::ErrorCode), never as protocol errors.

mod resources;
mod tools;

use std::sync::Arc;

use axum::http::request::Parts;
use hutch_core::service::{Caller, SandboxApi};
use rmcp::{
    model::{
        CallToolRequestParams, CallToolResponse, Implementation, ListResourceTemplatesResult,
        ListResourcesResult, ListToolsResult, PaginatedRequestParams, ReadResourceRequestParams,
        ReadResourceResponse, ServerCapabilities, ServerConfig, Tool,
    },
    service::RequestContext,
    transport::streamable_http_server::{
        session::local::LocalSessionManager, StreamableHttpServerConfig, StreamableHttpService,
    },
    ErrorData, RoleServer, ServerHandler,
};

/// Largest MCP request body: a base64 archive or file of [`tools::MAX_INLINE`] bytes and its
/// JSON around it.
const MAX_REQUEST_BODY: usize = tools::MAX_INLINE * 4 / 3 + (1 << 20);

/// What the server tells a model about itself when it connects.
const INSTRUCTIONS: &str = "Hutch gives you disposable Linux microVMs (sandboxes). Create one \
with create_sandbox, run commands in it with exec, move files with write_file/read_file/\
list_files or whole directories as tar archives with upload_archive/download_archive, and \
destroy it with destroy_sandbox when done (or give it ttl_secs). A sandbox has no network \
unless its policy allows one (set_network_policy). run_task runs a coding agent command on a \
copy of a workspace and returns the host's verdict on its changes and their diff. Errors carry \
a stable code (not_found, bad_request, conflict, over_capacity, timeout, ...).";

/// The MCP service mounted at `/mcp`: one stateless handler per request over `api`.
pub fn service(api: Arc<dyn SandboxApi>) -> StreamableHttpService<Server, LocalSessionManager> {
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        // Every request is authenticated (the Unix socket's permissions, or a bearer token a
        // browser cannot add), so the DNS-rebinding guard on `Host` adds nothing.
        .disable_allowed_hosts()
        .with_max_request_body_bytes(MAX_REQUEST_BODY);
    StreamableHttpService::new(
        move || Ok(Server { api: api.clone() }),
        Arc::new(LocalSessionManager::default()),
        config,
    )
}

/// The MCP server over the request surface.
#[derive(Clone)]
pub struct Server {
    api: Arc<dyn SandboxApi>,
}

/// The caller of the HTTP request this MCP request came in (put there by the API's router:
/// admin on the Unix socket, the token's scope on TCP).
fn caller(ctx: &RequestContext<RoleServer>) -> Result<Caller, ErrorData> {
    ctx.extensions
        .get::<Parts>()
        .and_then(|parts| parts.extensions.get::<Caller>())
        .cloned()
        .ok_or_else(|| ErrorData::internal_error("the request carries no caller", None))
}

impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .build(),
        )
        .with_server_info(Implementation::new("hutch", env!("CARGO_PKG_VERSION")))
        .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools::list().to_vec()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        tools::list().iter().find(|t| t.name == name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let caller = caller(&ctx)?;
        let args = request.arguments.unwrap_or_default();
        let call = tools::Call {
            api: self.api.as_ref(),
            caller: &caller,
            ctx: &ctx,
        };
        match call.run(&request.name, args).await {
            Some(result) => Ok(result.into()),
            None => Err(ErrorData::invalid_params(
                format!("no tool named {:.60}", request.name),
                None,
            )),
        }
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let caller = caller(&ctx)?;
        resources::list(self.api.as_ref(), &caller).await
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(ListResourceTemplatesResult::with_all_items(
            resources::templates(),
        ))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let caller = caller(&ctx)?;
        Ok(resources::read(self.api.as_ref(), &caller, &request.uri)
            .await?
            .into())
    }
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request, Router};
    use hutch_types::TokenScope;
    use serde_json::{json, Value};
    use tower::ServiceExt;

    use super::*;
    use crate::routes::{router, router_with_tokens, tests::state};

    /// Posts one JSON-RPC request to `/mcp` (stateless: no handshake first): the HTTP status
    /// and the JSON-RPC answer.
    async fn rpc(app: &Router, method: &str, params: Value) -> (u16, Value) {
        let body = json!({ "jsonrpc": "2.0", "id": 7, "method": method, "params": params });
        let req = Request::builder()
            .method("POST")
            .uri("/mcp")
            .header("host", "hutch")
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// A tool call's result.
    async fn call(app: &Router, name: &str, args: Value) -> Value {
        let (status, answer) =
            rpc(app, "tools/call", json!({"name": name, "arguments": args})).await;
        assert_eq!(status, 200, "{answer}");
        answer["result"].clone()
    }

    /// A tool call that must be a tool error: its stable code.
    async fn code_of(app: &Router, name: &str, args: Value) -> String {
        let result = call(app, name, args).await;
        assert_eq!(result["isError"], true, "{result}");
        result["structuredContent"]["code"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn every_tool_is_listed_with_a_description_and_an_object_schema() {
        let (_dir, state) = state();
        let app = router(state, Caller::admin());
        let (status, answer) = rpc(&app, "tools/list", json!({})).await;
        assert_eq!(status, 200, "{answer}");
        let listed = answer["result"]["tools"].as_array().unwrap();
        assert_eq!(listed.len(), tools::list().len());
        for tool in listed {
            assert!(tool["description"].as_str().unwrap().len() > 20, "{tool}");
            assert_eq!(tool["inputSchema"]["type"], "object", "{tool}");
        }
        let exec = listed.iter().find(|t| t["name"] == "exec").unwrap();
        let props = &exec["inputSchema"]["properties"];
        for field in [
            "sandbox_id",
            "command",
            "argv",
            "cwd",
            "env",
            "timeout_secs",
        ] {
            assert!(props.get(field).is_some(), "exec lacks {field}: {props}");
        }
    }

    #[tokio::test]
    async fn refusals_are_tool_errors_with_stable_codes() {
        let (_dir, state) = state();
        let app = router(state.clone(), Caller::admin());
        let id = "sb-0123456789";
        for (name, args, code) in [
            ("exec", json!({"sandbox_id": id}), "bad_request"),
            (
                "exec",
                json!({"sandbox_id": id, "command": "x", "argv": ["x"]}),
                "bad_request",
            ),
            (
                "exec",
                json!({"sandbox_id": id, "command": "true"}),
                "not_found",
            ),
            (
                "exec",
                json!({"sandbox_id": "../etc", "command": "true"}),
                "not_found",
            ),
            ("create_sandbox", json!({"cpus": "many"}), "bad_request"),
            ("create_sandbox", json!({"gpus": 1}), "bad_request"),
            ("create_sandbox", json!({"cpus": 0}), "invalid_spec"),
            (
                "create_sandbox",
                json!({"network": {"mode": "open", "cidrs": ["192.0.2.0/24"]}}),
                "bad_request",
            ),
            (
                "write_file",
                json!({"sandbox_id": id, "path": "/x", "content": "!", "encoding": "base64"}),
                "bad_request",
            ),
            (
                "write_file",
                json!({"sandbox_id": id, "path": "/x", "content": "", "mode": "999"}),
                "bad_request",
            ),
            (
                "list_files",
                json!({"sandbox_id": id, "path": "-delete"}),
                "unsafe_path",
            ),
            (
                "read_file",
                json!({"sandbox_id": id, "path": "/etc/passwd"}),
                "not_found",
            ),
            ("destroy_sandbox", json!({"sandbox_id": id}), "not_found"),
        ] {
            assert_eq!(
                code_of(&app, name, args.clone()).await,
                code,
                "{name} {args}"
            );
        }
        // Tasks are host-wide: a scoped caller is refused, as on the HTTP routes.
        let scoped = router(
            state,
            Caller::scoped(TokenScope::Label {
                key: "team".into(),
                value: "a".into(),
            }),
        );
        let args = json!({"workspace_tar_base64": "", "command": ["true"]});
        assert_eq!(code_of(&scoped, "run_task", args).await, "forbidden");
    }

    #[tokio::test]
    async fn an_unknown_tool_is_a_protocol_error_and_tcp_needs_a_token() {
        let (_dir, state) = state();
        let app = router(state.clone(), Caller::admin());
        let (_, answer) = rpc(&app, "tools/call", json!({"name": "nope", "arguments": {}})).await;
        assert!(answer["error"]["code"].is_i64(), "{answer}");
        let (status, answer) = rpc(&router_with_tokens(state), "tools/list", json!({})).await;
        assert_eq!((status, &answer["code"]), (401, &json!("unauthorized")));
    }
}
