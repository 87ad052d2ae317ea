//! MCP resources: each sandbox's state (`hutch://sandboxes/{id}`, JSON, confirmed by a health
//! check) and console log (`hutch://sandboxes/{id}/console`, the guest's bytes as lossy UTF-8,
//! its last [`CONSOLE_TAIL`] bytes).

use hutch_core::service::{Caller, SandboxApi, ServiceError};
use hutch_store::ListFilter;
use rmcp::{
    model::{
        ListResourcesResult, ReadResourceResult, Resource, ResourceContents, ResourceTemplate,
    },
    ErrorData,
};

use super::tools::parse_id;

/// The scheme and prefix of every resource.
const PREFIX: &str = "hutch://sandboxes/";
/// Most console bytes a read returns (the end of the log).
const CONSOLE_TAIL: usize = 64 << 10;

/// The resource templates: what a client may read for any sandbox id.
pub fn templates() -> Vec<ResourceTemplate> {
    vec![
        ResourceTemplate::new(format!("{PREFIX}{{id}}"), "sandbox")
            .with_description("A sandbox's state, spec and expiry (JSON)")
            .with_mime_type("application/json"),
        ResourceTemplate::new(format!("{PREFIX}{{id}}/console"), "console")
            .with_description("The end of a sandbox's console log (guest output: untrusted)")
            .with_mime_type("text/plain"),
    ]
}

/// Both resources of every sandbox the caller may see.
pub async fn list(api: &dyn SandboxApi, caller: &Caller) -> Result<ListResourcesResult, ErrorData> {
    let sandboxes = api
        .list(caller, ListFilter::default())
        .await
        .map_err(protocol)?;
    let resources = sandboxes
        .iter()
        .flat_map(|s| {
            [
                Resource::new(format!("{PREFIX}{}", s.id), format!("sandbox {}", s.id))
                    .with_mime_type("application/json"),
                Resource::new(
                    format!("{PREFIX}{}/console", s.id),
                    format!("console of {}", s.id),
                )
                .with_mime_type("text/plain"),
            ]
        })
        .collect();
    Ok(ListResourcesResult::with_all_items(resources))
}

/// Reads one resource.
pub async fn read(
    api: &dyn SandboxApi,
    caller: &Caller,
    uri: &str,
) -> Result<ReadResourceResult, ErrorData> {
    let not_found = || ErrorData::resource_not_found(format!("no resource {uri:.100}"), None);
    let rest = uri.strip_prefix(PREFIX).ok_or_else(not_found)?;
    let (raw, console) = match rest.strip_suffix("/console") {
        Some(raw) => (raw, true),
        None => (rest, false),
    };
    let id = parse_id(raw).map_err(|_| not_found())?;
    let text = if console {
        let log = api.console(caller, &id).await.map_err(protocol)?;
        let start = log.len().saturating_sub(CONSOLE_TAIL);
        String::from_utf8_lossy(&log[start..]).into_owned()
    } else {
        let info = api.get(caller, &id).await.map_err(protocol)?;
        serde_json::to_string_pretty(&info).expect("serializable")
    };
    let mime = if console {
        "text/plain"
    } else {
        "application/json"
    };
    Ok(ReadResourceResult::new(vec![ResourceContents::text(
        text, uri,
    )
    .with_mime_type(mime)]))
}

/// A refusal as an MCP error: resources have no result to carry it, so the stable code goes
/// in the error's data.
fn protocol(e: ServiceError) -> ErrorData {
    let data = serde_json::json!({ "code": e.code() });
    let message = hutch_core::chain(&e);
    match e.code() {
        hutch_types::ErrorCode::NotFound | hutch_types::ErrorCode::Forbidden => {
            ErrorData::resource_not_found(message, Some(data))
        }
        _ => ErrorData::internal_error(message, Some(data)),
    }
}
