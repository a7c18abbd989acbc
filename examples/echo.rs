//! The benchmark's ceiling: a bare axum server doing what a quota request minimally costs
//! (parse a small JSON body with serde_json, serialise it back), with none of quotad's
//! logic or storage, on quotad's runtime and server loop. `bench/run.sh` compares quotad's
//! throughput and latency to this.
//!
//! Usage: `cargo run --release --example echo -- 127.0.0.1:9000`
//! - `POST /echo` body `{"amount":1}` → `200 {"amount":1}`
//! - `GET /echo` → `200 {"amount":1}`

use axum::{Json, Router, routing::get};
use quotad::http::serve::Deadlines;
use serde::{Deserialize, Serialize};

/// The same allocator as quotad, so the ceiling is measured on equal terms.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Deserialize, Serialize)]
struct Body {
    #[serde(default = "one")]
    amount: u64,
}

fn one() -> u64 {
    1
}

async fn echo_post(Json(body): Json<Body>) -> Json<Body> {
    Json(body)
}

async fn echo_get() -> Json<Body> {
    Json(Body { amount: 1 })
}

/// On quotad's runtime ([`quotad::startup::runtime`]): the same scheduler for the same
/// `TOKIO_WORKER_THREADS`.
fn main() -> std::io::Result<()> {
    quotad::startup::runtime()?.block_on(serve())
}

async fn serve() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9000".to_owned());
    let app = Router::new().route("/echo", get(echo_get).post(echo_post));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("echo listening on {}", listener.local_addr()?);
    // quotad's server loop, with its read deadlines (same terms)
    quotad::http::serve::serve(listener, app, Deadlines::default(), std::future::pending()).await
}
