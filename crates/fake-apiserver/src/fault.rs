//! The request log and fault injection.

use std::fmt;
use std::time::Duration;

/// A request's verb as RBAC names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    /// GET of one object (or a non-resource path such as `/api`).
    Get,
    /// GET of a collection.
    List,
    /// GET of a collection with `watch=true`.
    Watch,
    /// POST.
    Create,
    /// PUT.
    Update,
    /// PATCH (any patch type, including server-side apply).
    Patch,
    /// DELETE of one object.
    Delete,
    /// DELETE of a collection.
    DeleteCollection,
}

impl Verb {
    /// The lowercase RBAC name: `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One request as the server saw it, in the terms of an RBAC rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// The RBAC verb.
    pub verb: Verb,
    /// The HTTP method (`GET`, `PATCH`, ...).
    pub method: String,
    /// The request path, without the query.
    pub path: String,
    /// API group (`""` for core); empty also for non-resource requests.
    pub group: String,
    /// API version (`v1`, `v1alpha1`); empty for non-resource requests.
    pub version: String,
    /// Resource plural (`pods`); empty for non-resource requests such as `/apis`.
    pub resource: String,
    /// Subresource (`status`, `scale`), if any.
    pub subresource: Option<String>,
    /// Namespace, for namespaced requests.
    pub namespace: Option<String>,
    /// Object name, for requests on one object.
    pub name: Option<String>,
    /// The `Content-Type` of a PATCH (which patch type), if any.
    pub patch_type: Option<String>,
    /// The `fieldManager` query parameter, if any.
    pub field_manager: Option<String>,
    /// The HTTP status code returned (0 when the request was made to hang).
    pub status: u16,
}

impl RequestRecord {
    /// Whether this was a request on a resource (as opposed to discovery or `/version`).
    pub fn is_resource_request(&self) -> bool {
        !self.resource.is_empty()
    }

    /// `resource` or `resource/subresource`, as an RBAC rule's `resources` lists it.
    pub fn rbac_resource(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{}", self.resource, sub),
            None => self.resource.clone(),
        }
    }
}

/// What an injected fault does to a matching request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Answer with this status code and the matching Status reason
    /// (409 Conflict, 429 TooManyRequests, 500 InternalError,
    /// 503 ServiceUnavailable, 504 Timeout, others InternalError).
    /// The request has no effect.
    Status(u16),
    /// Like [`FaultKind::Status`] with a `Retry-After` header (seconds).
    StatusRetryAfter(u16, u32),
    /// Never answer (until the client gives up or the server stops); no effect.
    Hang,
    /// Answer normally after this delay (tokio time).
    Delay(Duration),
}

/// A rule: the next `times` requests matching all the set filters get `kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// What happens to a matching request.
    pub kind: FaultKind,
    /// Only requests with this verb.
    pub verb: Option<Verb>,
    /// Only requests on this resource plural (`pods`, `deployments`).
    pub resource: Option<String>,
    /// Only requests on this subresource (`scale`, `status`); `Some("")` means the main resource only.
    pub subresource: Option<String>,
    /// Only requests on this object name.
    pub name: Option<String>,
    /// How many matching requests are still to fail.
    pub times: u32,
}

impl Fault {
    /// A fault that hits the next matching request once; narrow it with the builder methods.
    pub fn new(kind: FaultKind) -> Self {
        Self {
            kind,
            verb: None,
            resource: None,
            subresource: None,
            name: None,
            times: 1,
        }
    }

    /// Only requests with this verb.
    pub fn verb(mut self, verb: Verb) -> Self {
        self.verb = Some(verb);
        self
    }

    /// Only requests on this resource plural; `"deployments/scale"` also sets the subresource.
    pub fn resource(mut self, resource: &str) -> Self {
        match resource.split_once('/') {
            Some((r, sub)) => {
                self.resource = Some(r.to_string());
                self.subresource = Some(sub.to_string());
            }
            None => self.resource = Some(resource.to_string()),
        }
        self
    }

    /// Only requests on this subresource (`""` for the main resource only).
    pub fn subresource(mut self, subresource: &str) -> Self {
        self.subresource = Some(subresource.to_string());
        self
    }

    /// Only requests on this object.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Hit this many matching requests (at least one).
    pub fn times(mut self, times: u32) -> Self {
        self.times = times.max(1);
        self
    }

    pub(crate) fn matches(&self, r: &RequestRecord) -> bool {
        self.verb.is_none_or(|v| v == r.verb)
            && self.resource.as_ref().is_none_or(|res| *res == r.resource)
            && self
                .subresource
                .as_ref()
                .is_none_or(|s| s.as_str() == r.subresource.as_deref().unwrap_or(""))
            && self
                .name
                .as_ref()
                .is_none_or(|n| Some(n.as_str()) == r.name.as_deref())
    }
}
