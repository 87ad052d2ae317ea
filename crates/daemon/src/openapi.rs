//! What the OpenAPI document says about every route at once: the bearer security scheme of
//! TCP clients, and the error statuses any route can answer with (each an
//! [`hutch_api::ApiError`] body), so generated clients and contract checkers know every status
//! the daemon really sends.

use utoipa::openapi::{
    path::Operation,
    security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
    ContentBuilder, OpenApi, Ref, ResponseBuilder,
};

/// Name of the security scheme in the document.
pub const BEARER: &str = "bearer";

/// Adds the security scheme and the shared error statuses to the routes' document.
pub fn complete(doc: &mut OpenApi) {
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from `hutch token create`; required on TCP. The Unix socket \
                     needs none: its file permissions are the access control.",
                    ))
                    .build(),
            ),
        );
    doc.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
    inline_create_sandbox(doc);
    for (path, item) in doc.paths.paths.iter_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
        ];
        for op in ops.into_iter().flatten() {
            for (status, why) in shared_errors(path) {
                add_error(op, status, why);
            }
        }
    }
}

/// `CreateSandbox` flattens `SandboxSpec`, which utoipa writes as an `allOf` of the two; but
/// the spec's `additionalProperties: false` then refuses the create's own
/// `idempotency_key`. The schema becomes the spec's with that property added.
fn inline_create_sandbox(doc: &mut OpenApi) {
    let Some(schemas) = doc.components.as_mut().map(|c| &mut c.schemas) else {
        return;
    };
    let as_json = |s: &utoipa::openapi::RefOr<utoipa::openapi::Schema>| {
        serde_json::to_value(s).expect("serializable")
    };
    let (Some(spec), Some(create)) = (schemas.get("SandboxSpec"), schemas.get("CreateSandbox"))
    else {
        return;
    };
    let (mut merged, create) = (as_json(spec), as_json(create));
    let key = &create["allOf"][1]["properties"]["idempotency_key"];
    merged["properties"]["idempotency_key"] = key.clone();
    merged["description"] = create["description"].clone();
    let merged = serde_json::from_value(merged).expect("a schema stays a schema");
    schemas.insert("CreateSandbox".into(), merged);
}

/// The error statuses a route at `path` can answer with whatever it does.
fn shared_errors(path: &str) -> Vec<(&'static str, &'static str)> {
    let mut out = vec![
        ("400", "a malformed path, query or body"),
        ("500", "the host failed"),
    ];
    if !crate::observe::is_public(path) {
        out.push((
            "401",
            "on TCP: no bearer token, or an unknown or expired one",
        ));
    }
    if path.contains('{') {
        out.push(("403", "the token's scope does not cover it"));
        out.push(("404", "no such resource"));
    }
    if path.starts_with("/v1/sandboxes/{id}/") {
        out.push(("409", "not legal in the sandbox's current state"));
    }
    // Routes that wait on a guest: a sandbox's own, and the ones that boot one.
    if path.starts_with("/v1/sandboxes/{id}") || path == "/v1/templates" || path == "/v1/tasks" {
        out.push(("504", "the guest did not answer in time"));
    }
    out
}

/// Documents `status` on `op` with an error body, unless the route documents it itself.
fn add_error(op: &mut Operation, status: &str, why: &str) {
    op.responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| {
            ResponseBuilder::new()
                .description(why)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ApiError")))
                        .build(),
                )
                .build()
                .into()
        });
}
