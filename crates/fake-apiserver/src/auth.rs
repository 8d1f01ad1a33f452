//! TokenReview (`authentication.k8s.io/v1`) and SubjectAccessReview
//! (`authorization.k8s.io/v1`), with tokens the server issues.
//!
//! Tokens look like the real ones: `header.payload.signature`, the payload
//! a base64url JSON of the claims a projected ServiceAccount token carries
//! (`aud`, `exp`, `iat`, `sub`, `kubernetes.io.{namespace, pod, node,
//! serviceaccount}`). Only tokens this server issued review as
//! authenticated (the signature part is random; a payload edited by hand
//! is a different, unknown token). A review checks expiry against the
//! server's clock and the audiences as the real server does: the token's
//! `aud` must include one of `spec.audiences` (or, when none are asked
//! for, the API server's own audience), and `status.audiences` is the
//! intersection. The user is the ServiceAccount
//! (`system:serviceaccount:<ns>:<name>`, its groups) with the bound pod and
//! node in `extra` (`authentication.kubernetes.io/pod-name`, `pod-uid`,
//! `node-name`, `node-uid`, `credential-id`), or a plain user for tokens of
//! [`crate::FakeApiServerHandle::issue_user_token`].
//!
//! SubjectAccessReviews are answered from grants the test makes
//! ([`crate::FakeApiServerHandle::grant`]) by user or group, verb, API
//! group, resource and namespace (RBAC objects stored in the server are not
//! evaluated).

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::error::ApiError;

/// The audience of tokens that name none (the API server's own).
pub const API_SERVER_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// A ServiceAccount token to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The ServiceAccount's namespace and name.
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to.
    pub pod: Option<String>,
    /// The node claim (`kubernetes.io.node`); clusters before 1.30 leave it out.
    pub node: Option<String>,
    pub audiences: Vec<String>,
    /// Seconds from now to `exp`; negative: already expired.
    pub lifetime_seconds: i64,
}

#[derive(Debug, Clone)]
struct Issued {
    user: String,
    uid: String,
    groups: Vec<String>,
    extra: serde_json::Map<String, Value>,
    audiences: Vec<String>,
    /// Unix seconds; `None`: never expires.
    exp: Option<i64>,
}

/// Who a grant is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    User(String),
    Group(String),
}

/// One permission, as an RBAC rule would give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub subject: Subject,
    pub verb: String,
    /// API group (`""` for core).
    pub group: String,
    pub resource: String,
    /// `None`: every namespace (a ClusterRoleBinding).
    pub namespace: Option<String>,
}

/// Issued tokens and grants.
#[derive(Debug, Default)]
pub(crate) struct AuthState {
    tokens: HashMap<String, Issued>,
    grants: Vec<Grant>,
    issued: u64,
    seed: u64,
}

fn b64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

impl AuthState {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            seed,
            ..Self::default()
        }
    }

    fn token(&mut self, claims: &Value) -> String {
        let seed = self.seed;
        self.issued += 1;
        // SplitMix64 of the seed and the count: unguessable enough for tests.
        let mut z = seed
            .wrapping_add(self.issued.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_add(0x2545_F491_4F6C_DD1D);
        let mut sig = String::new();
        for _ in 0..4 {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            sig.push_str(&format!("{:016x}", x ^ (x >> 31)));
        }
        format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256","kid":"gpuscale-fake"}"#),
            b64(claims.to_string().as_bytes()),
            b64(sig.as_bytes())
        )
    }

    /// A bound ServiceAccount token; `now` in Unix seconds.
    pub(crate) fn issue(
        &mut self,
        req: &TokenRequest,
        pod_uid: Option<String>,
        now: i64,
    ) -> String {
        let user = format!(
            "system:serviceaccount:{}:{}",
            req.namespace, req.service_account
        );
        let exp = now + req.lifetime_seconds;
        let jti = format!("jti-{}", self.issued + 1);
        let mut k8s = json!({
            "namespace": req.namespace,
            "serviceaccount": {"name": req.service_account, "uid": format!("sa-{}", req.service_account)},
        });
        let mut extra = serde_json::Map::new();
        extra.insert(
            "authentication.kubernetes.io/credential-id".into(),
            json!([format!("JTI={jti}")]),
        );
        if let Some(pod) = &req.pod {
            let uid = pod_uid.unwrap_or_else(|| format!("pod-{pod}"));
            k8s["pod"] = json!({"name": pod, "uid": uid});
            extra.insert("authentication.kubernetes.io/pod-name".into(), json!([pod]));
            extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
        }
        if let Some(node) = &req.node {
            k8s["node"] = json!({"name": node, "uid": format!("node-{node}")});
            extra.insert(
                "authentication.kubernetes.io/node-name".into(),
                json!([node]),
            );
            extra.insert(
                "authentication.kubernetes.io/node-uid".into(),
                json!([format!("node-{node}")]),
            );
        }
        let claims = json!({
            "aud": req.audiences,
            "exp": exp,
            "iat": now,
            "nbf": now,
            "iss": API_SERVER_AUDIENCE,
            "jti": jti,
            "sub": user,
            "kubernetes.io": k8s,
        });
        let token = self.token(&claims);
        self.tokens.insert(
            token.clone(),
            Issued {
                user,
                uid: format!("sa-{}", req.service_account),
                groups: vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{}", req.namespace),
                    "system:authenticated".into(),
                ],
                extra,
                audiences: req.audiences.clone(),
                exp: Some(exp),
            },
        );
        token
    }

    /// A token of a plain user for the API server's audience, never expiring.
    pub(crate) fn issue_user(&mut self, user: &str, groups: &[&str]) -> String {
        let claims = json!({"sub": user, "aud": [API_SERVER_AUDIENCE]});
        let token = self.token(&claims);
        let mut all: Vec<String> = groups.iter().map(|g| (*g).to_string()).collect();
        all.push("system:authenticated".into());
        self.tokens.insert(
            token.clone(),
            Issued {
                user: user.to_string(),
                uid: format!("user-{user}"),
                groups: all,
                extra: serde_json::Map::new(),
                audiences: vec![API_SERVER_AUDIENCE.into()],
                exp: None,
            },
        );
        token
    }

    pub(crate) fn grant(&mut self, grant: Grant) {
        self.grants.push(grant);
    }

    /// Answers a TokenReview; `now` in Unix seconds.
    pub(crate) fn token_review(&self, body: &Value, now: i64) -> Result<Value, ApiError> {
        let spec = body
            .get("spec")
            .ok_or_else(|| ApiError::bad_request("spec: Required value"))?;
        let token = spec.get("token").and_then(Value::as_str).unwrap_or("");
        if token.is_empty() {
            return Err(ApiError::bad_request("spec.token: Required value"));
        }
        let asked: Vec<String> = spec
            .get("audiences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .filter(|a: &Vec<String>| !a.is_empty())
            .unwrap_or_else(|| vec![API_SERVER_AUDIENCE.to_string()]);
        let status = match self.tokens.get(token) {
            None => {
                json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
            }
            Some(t) if t.exp.is_some_and(|exp| exp <= now) => {
                json!({"authenticated": false, "error": "[invalid bearer token, service account token has expired]"})
            }
            Some(t) => {
                let both: Vec<&String> = asked.iter().filter(|a| t.audiences.contains(a)).collect();
                if both.is_empty() {
                    json!({"authenticated": false, "error": format!(
                        "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                        t.audiences, asked)})
                } else {
                    json!({
                        "authenticated": true,
                        "user": {"username": t.user, "uid": t.uid, "groups": t.groups, "extra": t.extra},
                        "audiences": both,
                    })
                }
            }
        };
        let mut out = body.clone();
        out["status"] = status;
        Ok(out)
    }

    /// Answers a SubjectAccessReview from the grants.
    pub(crate) fn access_review(&self, body: &Value) -> Result<Value, ApiError> {
        let spec = body
            .get("spec")
            .ok_or_else(|| ApiError::bad_request("spec: Required value"))?;
        let attrs = spec.get("resourceAttributes").ok_or_else(|| {
            ApiError::bad_request(
                "spec.resourceAttributes: Required value (non-resource attributes are not served)",
            )
        })?;
        let user = spec.get("user").and_then(Value::as_str).unwrap_or("");
        let groups: Vec<&str> = spec
            .get("groups")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if user.is_empty() && groups.is_empty() {
            return Err(ApiError::bad_request(
                "spec.user: at least one of user or group must be specified",
            ));
        }
        let field = |k: &str| attrs.get(k).and_then(Value::as_str).unwrap_or("");
        let allowed = self.grants.iter().any(|g| {
            let subject = match &g.subject {
                Subject::User(u) => u == user,
                Subject::Group(gr) => groups.contains(&gr.as_str()),
            };
            subject
                && g.verb == field("verb")
                && g.group == field("group")
                && g.resource == field("resource")
                && g.namespace
                    .as_deref()
                    .is_none_or(|ns| ns == field("namespace"))
        });
        let mut out = body.clone();
        out["status"] = if allowed {
            json!({"allowed": true, "reason": "granted by the test"})
        } else {
            json!({"allowed": false})
        };
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_without_padding() {
        assert_eq!(b64(b"f"), "Zg");
        assert_eq!(b64(b"fo"), "Zm8");
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn reviews_check_expiry_audience_and_the_token_itself() {
        let mut s = AuthState::new(7);
        let req = TokenRequest {
            namespace: "gpuscale-system".into(),
            service_account: "gpuscale-agent".into(),
            pod: Some("agent-x".into()),
            node: Some("node-a".into()),
            audiences: vec!["gpuscale".into()],
            lifetime_seconds: 3600,
        };
        let token = s.issue(&req, None, 1000);
        let review = |token: &str, aud: &[&str], now| {
            s.token_review(&json!({"spec": {"token": token, "audiences": aud}}), now)
                .expect("review")["status"]
                .clone()
        };
        let ok = review(&token, &["gpuscale"], 2000);
        assert_eq!(ok["authenticated"], true);
        assert_eq!(
            ok["user"]["username"],
            "system:serviceaccount:gpuscale-system:gpuscale-agent"
        );
        assert_eq!(
            ok["user"]["extra"]["authentication.kubernetes.io/node-name"][0],
            "node-a"
        );
        assert_eq!(review(&token, &["other"], 2000)["authenticated"], false);
        assert_eq!(
            review(&token, &[], 2000)["authenticated"],
            false,
            "the API server's audience"
        );
        assert_eq!(
            review(&token, &["gpuscale"], 4600)["authenticated"],
            false,
            "expired"
        );
        let mut forged = token.clone();
        forged.push('x');
        assert_eq!(review(&forged, &["gpuscale"], 2000)["authenticated"], false);
    }
}
