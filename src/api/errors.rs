//! `ApiError`: every failure the API reports, as an HTTP status, a stable machine-readable
//! `code`, a human `message` and, for validation failures, every problem with its field.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{header, Response, StatusCode};
use serde::Serialize;

/// One problem with a request body, and where (a dotted path into the body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

/// The JSON body of every error response:
/// `{"code": "...", "message": "...", "problems": [...]}` (`problems` only for 422).
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    /// Stable: clients may match on it. Changing one is a breaking change.
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<FieldProblem>,
    /// Extra structured detail (e.g. readiness checks); `null` is left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Box<serde_json::Value>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            problems: Vec::new(),
            detail: None,
        }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> ApiError {
        self.detail = Some(Box::new(detail));
        self
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn tenant_not_found(id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "tenant_not_found",
            format!("no tenant \"{id}\" in the tenants file"),
        )
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 422 with every problem found, not just the first.
    pub fn invalid(problems: Vec<FieldProblem>) -> ApiError {
        let message = match problems.as_slice() {
            [one] if one.field.is_empty() => one.message.clone(),
            [one] => format!("{}: {}", one.field, one.message),
            many => format!("the request has {} problems", many.len()),
        };
        ApiError {
            problems,
            ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
        }
    }

    /// A failure inside the agent; `message` must already be fit for the client (no secrets).
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut r = json_response(self.status, &self);
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"pgs\""),
            );
        }
        r
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        ApiError::internal(format!("{e:#}"))
    }
}

/// A JSON response with `status`.
pub fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec(body).unwrap_or_else(|e| {
        format!("{{\"code\":\"internal\",\"message\":\"cannot encode the response: {e}\"}}")
            .into_bytes()
    });
    text.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_a_stable_code_and_every_problem() {
        let e = ApiError::invalid(vec![
            FieldProblem {
                field: "id".into(),
                message: "missing".into(),
            },
            FieldProblem {
                field: "managed.memory".into(),
                message: "too small".into(),
            },
        ]);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["code"], "invalid_request");
        assert_eq!(v["problems"].as_array().unwrap().len(), 2);
        assert_eq!(v["message"], "the request has 2 problems");
        assert!(v.get("detail").is_none());
        let r = ApiError::unauthorized("no token").into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
    }
}
