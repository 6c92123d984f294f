//! The agent desk (專員工作台, `/desk`): static pages an agent works in, with an agent token.
//!
//! It is a client of the public API like any other and no more: it signs in with an agent
//! token (kept in the tab's `sessionStorage`), sets presence with `PUT …/presence`, listens on
//! the agent's WebSocket (`/api/v1/live`: offers with their deadline, revocations, customer
//! messages, outcomes; reconnecting with `?after=<last seq>`), reads each served
//! conversation's transcript with `GET /api/v1/conversations/{id}` and acts with the REST
//! actions (accept, decline, reply, close, transfer). Plain HTML, JS and CSS, compiled into
//! the binary: nothing to build, nothing to install.

use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;

use crate::AppState;

const PAGE: &str = include_str!("../static/desk/desk.html");
const SCRIPT: &str = include_str!("../static/desk/desk.js");
const STYLE: &str = include_str!("../static/desk/desk.css");

/// `/desk` and its assets.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/desk", get(page))
        .route("/desk/", get(page))
        .route("/desk/desk.js", get(script))
        .route("/desk/desk.css", get(style))
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
}

async fn style() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        STYLE,
    )
}
