//! Who is calling, and what they may read.
//!
//! **Agents** (`AgentService.Report`) present a bearer token
//! (`authorization: Bearer <token>`) or a client certificate. On
//! Kubernetes the token is the agent pod's projected ServiceAccount token
//! with audience `gpuscale`, checked with a TokenReview ([`AuthBackend`]),
//! which must name the agents' ServiceAccount; the stream is bound to the
//! node the token's pod runs on (the token's
//! `authentication.kubernetes.io/node-name` claim, else the pod's
//! `spec.nodeName`) and the ingest ends it with `PERMISSION_DENIED` if the
//! agent reports another node. With a certificate, its DNS name is the node.
//!
//! **API clients** (`ScalerService`, KEDA's `ExternalScaler`, reflection)
//! present a token (any user) or a client certificate (its DNS name is the
//! user); each workload they read is authorised with a
//! SubjectAccessReview (`get` on the `InferenceAutoscaler`) on Kubernetes,
//! by the static file's `clients[].namespaces` in standalone mode, and for
//! anyone authenticated when only certificates are used.
//!
//! Token reviews are cached until shortly before the token expires (its
//! `exp` claim) and at most [`AuthConfig::token_cache_ttl`]; authorisations
//! for [`AuthConfig::authz_cache_ttl`]. Tokens whose `exp` has passed or
//! whose `aud` lacks the audience are refused without asking the API
//! server. Every refusal is counted by reason
//! (`gpuscale_scaler_auth_refused_total`); a peer refused
//! [`AuthConfig::offender_threshold`] times within
//! [`AuthConfig::offender_window`] is reported once per window (a warning
//! log line and, on Kubernetes, an Event).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use gpuscale_core::{NodeName, Timestamp, WorkloadRef};
use serde::Deserialize;
use tokio::time::Instant;
use tonic::Code;

use crate::error::ScalerError;
use crate::metrics::ScalerMetrics;
use gpuscale_rt::Clock;

/// The audience agents' tokens must carry.
pub(crate) const DEFAULT_AUDIENCE: &str = "gpuscale";
/// The agents' ServiceAccount, `namespace/name`.
pub(crate) const DEFAULT_AGENT_SERVICE_ACCOUNT: &str = "gpuscale-system/gpuscale-agent";
/// TokenReview user extra: the node of the pod a bound token belongs to.
pub(crate) const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// TokenReview user extra: the pod a bound token belongs to.
pub(crate) const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The group the static file gives its agents.
pub(crate) const FILE_AGENT_GROUP: &str = "gpuscale:agents";

/// A boxed future of the backends.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How callers authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// Nobody is asked (local use; the CLI allows it only with plaintext or
    /// when asked for by name).
    None,
    /// TokenReview and SubjectAccessReview against the API server (the
    /// Kubernetes mode supplies the backend).
    Kubernetes,
    /// Tokens and grants from a static file ([`AuthFile`]).
    File(PathBuf),
    /// Client certificates only: the certificate's DNS name is the caller
    /// (for an agent, its node); anyone authenticated may read everything.
    Certificates,
}

/// Authentication and authorisation settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// The audience agents' tokens must carry.
    pub audience: String,
    /// The agents' ServiceAccount (Kubernetes mode): namespace and name.
    pub agent_service_account: (String, String),
    /// Longest a token review is trusted (also bounded by the token's expiry).
    pub token_cache_ttl: Duration,
    /// How long an authorisation is trusted.
    pub authz_cache_ttl: Duration,
    /// Refusals of one peer within [`Self::offender_window`] that make it a repeat offender.
    pub offender_threshold: u32,
    pub offender_window: Duration,
}

impl AuthConfig {
    /// No authentication (local use).
    pub fn none() -> Self {
        Self {
            mode: AuthMode::None,
            audience: DEFAULT_AUDIENCE.into(),
            agent_service_account: ("gpuscale-system".into(), "gpuscale-agent".into()),
            token_cache_ttl: Duration::from_secs(300),
            authz_cache_ttl: Duration::from_secs(30),
            offender_threshold: 5,
            offender_window: Duration::from_secs(600),
        }
    }

    /// `mode` with the defaults.
    pub fn with_mode(mode: AuthMode) -> Self {
        Self {
            mode,
            ..Self::none()
        }
    }

    /// The agents' ServiceAccount as a TokenReview names it.
    pub(crate) fn agent_user(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.agent_service_account.0, self.agent_service_account.1
        )
    }
}

/// Parses `namespace/name`.
pub(crate) fn parse_service_account(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!(
            "`{}` is not namespace/name, e.g. gpuscale-system/gpuscale-agent",
            quote(s)
        )),
    }
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// Authentication is off.
    None,
    Token,
    Certificate,
}

/// The authenticated caller of one request (in the request's extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user name (`system:serviceaccount:ns:name`, a certificate's DNS name).
    pub user: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
    pub credential: Credential,
    /// The node an agent's credential is bound to.
    pub node: Option<NodeName>,
    /// When the credential stops being valid.
    pub expires_at: Option<Timestamp>,
    /// The client's address.
    pub peer: Option<SocketAddr>,
}

impl Caller {
    /// Everyone, when authentication is off.
    pub fn anonymous(peer: Option<SocketAddr>) -> Self {
        Self {
            user: "system:anonymous".into(),
            uid: String::new(),
            groups: Vec::new(),
            extra: BTreeMap::new(),
            credential: Credential::None,
            node: None,
            expires_at: None,
            peer,
        }
    }
}

/// What a TokenReview said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenReview {
    pub authenticated: bool,
    /// Why not, when not.
    pub error: String,
    pub user: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
    /// The audiences the token is valid for (of those asked about).
    pub audiences: Vec<String>,
}

/// A backend that could not answer (the API server is away).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError(pub String);

/// A peer refused again and again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offender {
    pub peer: Option<SocketAddr>,
    /// The user, when the credential was valid.
    pub user: Option<String>,
    /// The pod a valid bound token belongs to: namespace and name.
    pub pod: Option<(String, String)>,
    /// The last refusal's reason.
    pub reason: &'static str,
    /// Refusals within the window.
    pub refusals: u32,
}

/// Where identities and permissions come from: the API server on
/// Kubernetes (`gpuscale_kube`), the static file standalone.
pub trait AuthBackend: Send + Sync + 'static {
    /// Reviews `token` for `audience` (a TokenReview).
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<TokenReview, BackendError>>;
    /// The node pod `namespace/name` runs on (`Ok(None)`: not scheduled or gone).
    fn pod_node<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, BackendError>>;
    /// Whether `caller` may `get` the InferenceAutoscaler `workload`.
    fn may_read<'a>(
        &'a self,
        caller: &'a Caller,
        workload: &'a WorkloadRef,
    ) -> BoxFuture<'a, Result<bool, BackendError>>;
    /// Tells someone about a repeat offender (best effort).
    fn report_offender<'a>(&'a self, offender: &'a Offender) -> BoxFuture<'a, ()>;
}

/// Which kind of call is being authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallKind {
    Agent,
    Client,
}

impl CallKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            CallKind::Agent => "agent",
            CallKind::Client => "api",
        }
    }
}

/// Why a call was refused: the gRPC code, a bounded reason for metrics, a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn unauthenticated(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: Code::Unauthenticated,
            reason,
            message: message.into(),
        }
    }
    fn denied(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: Code::PermissionDenied,
            reason,
            message: message.into(),
        }
    }
    pub(crate) fn status(&self) -> tonic::Status {
        tonic::Status::new(self.code, self.message.clone())
    }
}

/// At most this much of anything a caller sent is quoted back.
pub const QUOTE_LIMIT: usize = 64;

/// `s` for an error message: whole when short, else its first
/// [`QUOTE_LIMIT`] characters and its length.
pub fn quote(s: &str) -> String {
    if s.len() <= QUOTE_LIMIT {
        return s.to_string();
    }
    let mut end = QUOTE_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// A cached identity (or refusal) of one token.
#[derive(Debug, Clone)]
struct CachedToken {
    result: Result<Caller, Refusal>,
    until: Instant,
}

#[derive(Debug)]
struct OffenderState {
    refusals: u32,
    window_start: Instant,
    reported: bool,
}

/// Most cached tokens and authorisations.
const CACHE_LIMIT: usize = 10_000;
/// A token review is not trusted closer than this to the token's expiry.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// A refused token is refused again without asking for this long.
const NEGATIVE_TTL: Duration = Duration::from_secs(10);

/// Authenticates calls and authorises reads, with caches.
pub struct Authenticator {
    config: AuthConfig,
    backend: Option<Arc<dyn AuthBackend>>,
    clock: Clock,
    metrics: Arc<ScalerMetrics>,
    tokens: Mutex<HashMap<Vec<u8>, CachedToken>>,
    grants: Mutex<HashMap<(String, WorkloadRef), (bool, Instant)>>,
    offenders: Mutex<HashMap<String, OffenderState>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The claims of a JWT that decide caching and quick refusals (not verified
/// here: the TokenReview verifies).
#[derive(Debug, Default)]
struct Claims {
    exp: Option<i64>,
    aud: Option<Vec<String>>,
}

fn claims(token: &str) -> Option<Claims> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let aud = match v.get("aud") {
        Some(serde_json::Value::String(s)) => Some(vec![s.clone()]),
        Some(serde_json::Value::Array(a)) => Some(
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
        ),
        _ => None,
    };
    Some(Claims {
        exp: v.get("exp").and_then(serde_json::Value::as_i64),
        aud,
    })
}

impl Authenticator {
    pub fn new(
        config: AuthConfig,
        backend: Option<Arc<dyn AuthBackend>>,
        clock: Clock,
        metrics: Arc<ScalerMetrics>,
    ) -> Self {
        Self {
            config,
            backend,
            clock,
            metrics,
            tokens: Mutex::new(HashMap::new()),
            grants: Mutex::new(HashMap::new()),
            offenders: Mutex::new(HashMap::new()),
        }
    }

    /// Everyone is allowed everything.
    pub fn disabled(metrics: Arc<ScalerMetrics>) -> Self {
        Self::new(AuthConfig::none(), None, Clock::start(), metrics)
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    pub(crate) fn metrics(&self) -> &Arc<ScalerMetrics> {
        &self.metrics
    }

    /// Whether callers are checked at all.
    pub(crate) fn enabled(&self) -> bool {
        self.config.mode != AuthMode::None
    }

    /// Authenticates a call of `kind` from what it presented. The refusal
    /// is already counted.
    pub(crate) async fn authenticate(
        &self,
        kind: CallKind,
        token: Option<&str>,
        cert_names: Option<Vec<String>>,
        peer: Option<SocketAddr>,
    ) -> Result<Caller, Refusal> {
        if !self.enabled() {
            return Ok(Caller::anonymous(peer));
        }
        let result = self.identify(kind, token, cert_names, peer).await;
        if let Err(r) = &result {
            self.refused(kind, r, peer, None);
        }
        result
    }

    async fn identify(
        &self,
        kind: CallKind,
        token: Option<&str>,
        cert_names: Option<Vec<String>>,
        peer: Option<SocketAddr>,
    ) -> Result<Caller, Refusal> {
        if let Some(names) = cert_names {
            let Some(name) = names.into_iter().next() else {
                return Err(Refusal::unauthenticated(
                    "certificate_without_name",
                    "the client certificate has no DNS name (subjectAltName) to identify the caller by",
                ));
            };
            let mut caller = Caller::anonymous(peer);
            caller.user = name.clone();
            caller.credential = Credential::Certificate;
            if kind == CallKind::Agent {
                caller.node = Some(NodeName::new(name));
            }
            return Ok(caller);
        }
        let Some(token) = token else {
            return Err(Refusal::unauthenticated(
                "no_token",
                match kind {
                    CallKind::Agent => {
                        "no credentials: send `authorization: Bearer <token>` (the agent's projected ServiceAccount token, audience gpuscale) or a client certificate"
                    }
                    CallKind::Client => {
                        "no credentials: send `authorization: Bearer <token>` or a client certificate"
                    }
                },
            ));
        };
        let mut caller = self.token_identity(kind, token).await?;
        caller.peer = peer;
        Ok(caller)
    }

    fn digest(token: &str) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .to_vec()
    }

    /// The identity behind `token` for a call of `kind`, from the cache or
    /// the backend.
    async fn token_identity(&self, kind: CallKind, token: &str) -> Result<Caller, Refusal> {
        let key = {
            let mut k = Self::digest(token);
            k.push(kind as u8);
            k
        };
        let now = Instant::now();
        if let Ok(cache) = self.tokens.lock()
            && let Some(c) = cache.get(&key)
            && c.until > now
        {
            return c.result.clone();
        }
        let (result, ttl) = self.review(kind, token).await;
        if let Some(ttl) = ttl
            && let Ok(mut cache) = self.tokens.lock()
        {
            if cache.len() >= CACHE_LIMIT {
                cache.retain(|_, c| c.until > now);
                if cache.len() >= CACHE_LIMIT {
                    cache.clear();
                }
            }
            cache.insert(
                key,
                CachedToken {
                    result: result.clone(),
                    until: now + ttl,
                },
            );
        }
        result
    }

    /// Reviews a token; the result and how long it may be cached (`None`: not at all).
    async fn review(
        &self,
        kind: CallKind,
        token: &str,
    ) -> (Result<Caller, Refusal>, Option<Duration>) {
        let now_ms = self.clock.now().as_millis();
        let claims = claims(token);
        let mut expires_at = None;
        let mut ttl = self.config.token_cache_ttl;
        if let Some(c) = &claims {
            if let Some(exp) = c.exp {
                let exp_ms = exp.saturating_mul(1000);
                if exp_ms <= now_ms {
                    return (
                        Err(Refusal::unauthenticated(
                            "expired",
                            "the token has expired; the kubelet rotates projected tokens: read the token file again",
                        )),
                        Some(NEGATIVE_TTL),
                    );
                }
                expires_at = Some(Timestamp::from_millis(exp_ms));
                let left = Duration::from_millis(u64::try_from(exp_ms - now_ms).unwrap_or(0));
                ttl = ttl.min(left.saturating_sub(EXPIRY_MARGIN));
            }
            if kind == CallKind::Agent
                && let Some(aud) = &c.aud
                && !aud.contains(&self.config.audience)
            {
                return (
                    Err(Refusal::unauthenticated(
                        "wrong_audience",
                        format!(
                            "the token is not for audience `{}` (project the agent's token with `audience: {}`)",
                            self.config.audience, self.config.audience
                        ),
                    )),
                    Some(NEGATIVE_TTL),
                );
            }
        }
        let Some(backend) = &self.backend else {
            return (
                Err(Refusal::unauthenticated(
                    "invalid_token",
                    "bearer tokens are not accepted here: present a client certificate",
                )),
                Some(NEGATIVE_TTL),
            );
        };
        let audience = match kind {
            CallKind::Agent => self.config.audience.as_str(),
            // API clients bring whatever token their platform gives them:
            // the API server's own audience.
            CallKind::Client => "",
        };
        let review = match backend.review(token, audience).await {
            Ok(r) => r,
            Err(BackendError(e)) => {
                return (
                    Err(Refusal {
                        code: Code::Unavailable,
                        reason: "review_failed",
                        message: format!(
                            "the token could not be reviewed now ({}); retry",
                            quote(&e)
                        ),
                    }),
                    None,
                );
            }
        };
        if !review.authenticated {
            return (
                Err(Refusal::unauthenticated(
                    "invalid_token",
                    format!(
                        "the token was not accepted: {}",
                        quote(if review.error.is_empty() {
                            "invalid token"
                        } else {
                            &review.error
                        })
                    ),
                )),
                Some(NEGATIVE_TTL),
            );
        }
        if kind == CallKind::Agent
            && !review.audiences.is_empty()
            && !review.audiences.contains(&self.config.audience)
        {
            return (
                Err(Refusal::unauthenticated(
                    "wrong_audience",
                    format!("the token is not for audience `{}`", self.config.audience),
                )),
                Some(NEGATIVE_TTL),
            );
        }
        let mut caller = Caller {
            user: review.user.clone(),
            uid: review.uid.clone(),
            groups: review.groups.clone(),
            extra: review.extra.clone(),
            credential: Credential::Token,
            node: None,
            expires_at,
            peer: None,
        };
        if kind == CallKind::Agent {
            match self.bind_agent(backend.as_ref(), &mut caller).await {
                Ok(()) => {}
                Err(r) if r.code == Code::Unavailable => return (Err(r), None),
                Err(r) => return (Err(r), Some(NEGATIVE_TTL)),
            }
        }
        (Ok(caller), Some(ttl))
    }

    /// Checks an agent's account and finds its node.
    async fn bind_agent(
        &self,
        backend: &dyn AuthBackend,
        caller: &mut Caller,
    ) -> Result<(), Refusal> {
        let is_agent = match self.config.mode {
            AuthMode::File(_) => caller.groups.iter().any(|g| g == FILE_AGENT_GROUP),
            _ => caller.user == self.config.agent_user(),
        };
        if !is_agent {
            return Err(Refusal::denied(
                "wrong_service_account",
                format!(
                    "{} may not stream telemetry: only the agents' ServiceAccount ({}) may",
                    quote(&caller.user),
                    self.config.agent_user()
                ),
            ));
        }
        let first = |key: &str| {
            caller
                .extra
                .get(key)
                .and_then(|v| v.first())
                .filter(|s| !s.is_empty())
                .cloned()
        };
        if let Some(node) = first(NODE_NAME_EXTRA) {
            caller.node = Some(NodeName::new(node));
            return Ok(());
        }
        if let Some(pod) = first(POD_NAME_EXTRA) {
            let namespace = self.config.agent_service_account.0.clone();
            return match backend.pod_node(&namespace, &pod).await {
                Ok(Some(node)) => {
                    caller.node = Some(NodeName::new(node));
                    Ok(())
                }
                Ok(None) => Err(Refusal::denied(
                    "no_node_binding",
                    format!(
                        "the token's pod {namespace}/{} runs on no node",
                        quote(&pod)
                    ),
                )),
                Err(BackendError(e)) => Err(Refusal {
                    code: Code::Unavailable,
                    reason: "review_failed",
                    message: format!(
                        "the token's pod could not be looked up now ({}); retry",
                        quote(&e)
                    ),
                }),
            };
        }
        Err(Refusal::denied(
            "no_node_binding",
            "the token is not bound to a pod: use the agent pod's projected ServiceAccount token",
        ))
    }

    /// Counts a refusal and tracks repeat offenders.
    pub(crate) fn refused(
        &self,
        kind: CallKind,
        refusal: &Refusal,
        peer: Option<SocketAddr>,
        caller: Option<&Caller>,
    ) {
        self.metrics.auth_refused(kind.label(), refusal.reason);
        if refusal.code == Code::Unavailable {
            return;
        }
        let key = peer.map_or_else(
            || caller.map_or_else(String::new, |c| c.user.clone()),
            |p| p.ip().to_string(),
        );
        let now = Instant::now();
        let report = {
            let Ok(mut offenders) = self.offenders.lock() else {
                return;
            };
            if offenders.len() >= CACHE_LIMIT {
                let window = self.config.offender_window;
                offenders.retain(|_, o| now.duration_since(o.window_start) < window);
            }
            let o = offenders.entry(key).or_insert(OffenderState {
                refusals: 0,
                window_start: now,
                reported: false,
            });
            if now.duration_since(o.window_start) >= self.config.offender_window {
                *o = OffenderState {
                    refusals: 0,
                    window_start: now,
                    reported: false,
                };
            }
            o.refusals += 1;
            if o.refusals >= self.config.offender_threshold && !o.reported {
                o.reported = true;
                Some(o.refusals)
            } else {
                None
            }
        };
        if let Some(refusals) = report {
            let offender = Offender {
                peer,
                user: caller.map(|c| c.user.clone()),
                pod: caller.and_then(|c| {
                    c.extra
                        .get(POD_NAME_EXTRA)
                        .and_then(|p| p.first())
                        .map(|p| (self.config.agent_service_account.0.clone(), p.clone()))
                }),
                reason: refusal.reason,
                refusals,
            };
            tracing::warn!(peer = ?peer, user = ?offender.user, reason = refusal.reason, refusals, api = kind.label(), "repeatedly refused caller");
            self.metrics.repeat_offender();
            if let Some(backend) = self.backend.clone() {
                tokio::spawn(async move { backend.report_offender(&offender).await });
            }
        }
    }

    /// Whether `caller` may read `workload`.
    pub(crate) async fn may_read(
        &self,
        caller: &Caller,
        workload: &WorkloadRef,
    ) -> Result<bool, tonic::Status> {
        if !self.enabled() {
            return Ok(true);
        }
        let Some(backend) = &self.backend else {
            // Certificates only: authenticated is authorised.
            return Ok(caller.credential != Credential::None);
        };
        let key = (
            format!("{:?}:{}", caller.credential, caller.user),
            workload.clone(),
        );
        let now = Instant::now();
        if let Ok(grants) = self.grants.lock()
            && let Some((allowed, until)) = grants.get(&key)
            && *until > now
        {
            return Ok(*allowed);
        }
        let allowed = backend
            .may_read(caller, workload)
            .await
            .map_err(|BackendError(e)| {
                tonic::Status::unavailable(format!(
                    "could not check access to {workload} now ({}); retry",
                    quote(&e)
                ))
            })?;
        if let Ok(mut grants) = self.grants.lock() {
            if grants.len() >= CACHE_LIMIT {
                grants.retain(|_, (_, until)| *until > now);
                if grants.len() >= CACHE_LIMIT {
                    grants.clear();
                }
            }
            grants.insert(key, (allowed, now + self.config.authz_cache_ttl));
        }
        Ok(allowed)
    }

    /// `PERMISSION_DENIED` for `workload` unless `caller` may read it.
    pub(crate) async fn require_read(
        &self,
        caller: &Caller,
        workload: &WorkloadRef,
    ) -> Result<(), tonic::Status> {
        if self.may_read(caller, workload).await? {
            return Ok(());
        }
        let refusal = Refusal::denied(
            "forbidden_workload",
            format!(
                "{} may not read workload {workload} (needs `get` on inferenceautoscalers.autoscaling.gpuscale.dev in namespace {})",
                quote(&caller.user),
                workload.namespace
            ),
        );
        self.refused(CallKind::Client, &refusal, caller.peer, Some(caller));
        Err(refusal.status())
    }
}

// ---------------------------------------------------------------------------
// The static file (standalone mode).

/// `--auth-file`: tokens of agents and API clients, and what clients may read.
///
/// ```yaml
/// agents:                    # one per node; the token binds the stream to the node
///   - node: gpu-node-1
///     token: 9b1f...         # a long random string
/// clients:
///   - name: router           # the user name (a client certificate's DNS name works too)
///     token: 4c7e...         # optional when the client uses a certificate
///     namespaces: [llm]      # workloads it may read; absent: every workload
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    #[serde(default)]
    pub agents: Vec<AgentEntry>,
    #[serde(default)]
    pub clients: Vec<ClientEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    pub node: String,
    pub token: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    pub name: String,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub namespaces: Option<Vec<String>>,
}

/// Shortest token the file accepts.
const MIN_TOKEN_BYTES: usize = 16;

impl AuthFile {
    /// Reads and checks the file; errors name the file and the entry.
    pub fn load(path: &Path) -> Result<Self, ScalerError> {
        let fail = |message: String| ScalerError::ConfigFile {
            path: path.display().to_string(),
            message,
        };
        use crate::config_file::{MAX_CONFIG_BYTES, parse, read_bounded};
        let text =
            read_bounded(path, MAX_CONFIG_BYTES).map_err(|e| fail(format!("--auth-file: {e}")))?;
        let file: AuthFile = parse(&text).map_err(|e| fail(format!("--auth-file: {e}")))?;
        let mut seen = std::collections::BTreeSet::new();
        let tokens = file
            .agents
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("agents[{i}].token"), Some(&a.token)))
            .chain(
                file.clients
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (format!("clients[{i}].token"), c.token.as_ref())),
            );
        for (field, token) in tokens {
            let Some(token) = token else { continue };
            if token.len() < MIN_TOKEN_BYTES {
                return Err(fail(format!(
                    "--auth-file {field}: at least {MIN_TOKEN_BYTES} characters (use a long random string)"
                )));
            }
            if !seen.insert(token.clone()) {
                return Err(fail(format!("--auth-file {field}: the same token twice")));
            }
        }
        for (i, a) in file.agents.iter().enumerate() {
            if a.node.is_empty() {
                return Err(fail(format!("--auth-file agents[{i}].node: empty")));
            }
        }
        for (i, c) in file.clients.iter().enumerate() {
            if c.name.is_empty() {
                return Err(fail(format!("--auth-file clients[{i}].name: empty")));
            }
        }
        Ok(file)
    }
}

/// The static file as a backend.
#[derive(Debug)]
pub struct FileBackend {
    file: AuthFile,
}

impl FileBackend {
    pub fn new(file: AuthFile) -> Self {
        Self { file }
    }

    fn lookup(&self, token: &str) -> TokenReview {
        // Digests are compared, so the time taken says nothing about how
        // much of a token matched.
        let presented = Authenticator::digest(token);
        let eq = |a: &str| Authenticator::digest(a) == presented;
        if let Some(a) = self.file.agents.iter().find(|a| eq(&a.token)) {
            return TokenReview {
                authenticated: true,
                user: format!("gpuscale:agent:{}", a.node),
                groups: vec![FILE_AGENT_GROUP.to_string()],
                extra: BTreeMap::from([(NODE_NAME_EXTRA.to_string(), vec![a.node.clone()])]),
                ..TokenReview::default()
            };
        }
        if let Some(c) = self
            .file
            .clients
            .iter()
            .find(|c| c.token.as_deref().is_some_and(eq))
        {
            return TokenReview {
                authenticated: true,
                user: c.name.clone(),
                ..TokenReview::default()
            };
        }
        TokenReview {
            error: "no such token in the --auth-file".into(),
            ..TokenReview::default()
        }
    }
}

impl AuthBackend for FileBackend {
    fn review<'a>(
        &'a self,
        token: &'a str,
        _audience: &'a str,
    ) -> BoxFuture<'a, Result<TokenReview, BackendError>> {
        Box::pin(async move { Ok(self.lookup(token)) })
    }

    fn pod_node<'a>(
        &'a self,
        _namespace: &'a str,
        _name: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, BackendError>> {
        Box::pin(async { Ok(None) })
    }

    fn may_read<'a>(
        &'a self,
        caller: &'a Caller,
        workload: &'a WorkloadRef,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        Box::pin(async move {
            Ok(self
                .file
                .clients
                .iter()
                .find(|c| c.name == caller.user)
                .is_some_and(|c| {
                    c.namespaces
                        .as_ref()
                        .is_none_or(|ns| ns.contains(&workload.namespace))
                }))
        })
    }

    fn report_offender<'a>(&'a self, _offender: &'a Offender) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: serde_json::Value) -> String {
        let b = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.sig",
            b(b"{\"alg\":\"RS256\"}"),
            b(payload.to_string().as_bytes())
        )
    }

    #[test]
    fn claims_are_read_from_the_payload() {
        let c = claims(&jwt(
            serde_json::json!({"exp": 12, "aud": ["gpuscale", "x"]}),
        ))
        .expect("jwt");
        assert_eq!(c.exp, Some(12));
        assert_eq!(c.aud, Some(vec!["gpuscale".to_string(), "x".to_string()]));
        let c = claims(&jwt(serde_json::json!({"aud": "one"}))).expect("jwt");
        assert_eq!(c.aud, Some(vec!["one".to_string()]));
        assert!(claims("not-a-jwt").is_none());
    }

    #[test]
    fn quotes_are_bounded() {
        assert_eq!(quote("chat"), "chat");
        let long = "é".repeat(1_000_000);
        let q = quote(&long);
        assert!(q.len() < 100, "{q}");
        assert!(q.contains("2000000 bytes"), "{q}");
    }

    #[test]
    fn service_accounts_parse() {
        assert_eq!(
            parse_service_account("gpuscale-system/gpuscale-agent"),
            Ok(("gpuscale-system".into(), "gpuscale-agent".into()))
        );
        assert!(parse_service_account("agent").is_err());
        assert!(parse_service_account("a/b/c").is_err());
    }
}
