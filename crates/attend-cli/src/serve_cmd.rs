//! `attend serve`: an OpenAI-compatible HTTP server (axum on tokio) over
//! the library's engine (`attend::serve`: continuous batching, chunked
//! prefill, paged KV cache, prefix caching). This file is the HTTP layer
//! only: requests in OpenAI's shapes -> token ids and sampling settings ->
//! the engine -> events -> text (incremental detokenizing, stop strings) ->
//! JSON or server-sent events.
//!
//! Endpoints: POST /v1/chat/completions, /v1/completions, /v1/embeddings,
//! /tokenize, /detokenize; GET /v1/models, /health, /metrics (Prometheus
//! text), / (a chat page). Errors use OpenAI's JSON shape.

use crate::kv_cmd::KvArgs;
use crate::load::{is_encoder_dir, load_model, WeightArgs};
use anyhow::{bail, Context, Result};
use attend::decode::SamplingParams;
use attend::formats::chat::{render, Message};
use attend::formats::hf::Embedder;
use attend::formats::tokenizer::{StreamDecoder, Tokenizer};
use attend::serve::{
    Engine, EngineConfig, Event, FinishReason, Request, Sink, SubmitError, TokenLogprob,
};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

#[derive(Args)]
pub struct ServeArgs {
    /// A model to serve: a GGUF file or Hugging Face decoder folder (chat,
    /// completions), or a sentence-transformers folder (embeddings).
    /// Repeat to serve several; each is named by its file or folder name
    /// (or `NAME=PATH`), which requests give as `model`.
    #[arg(long = "model", required = true, value_name = "[NAME=]PATH")]
    models: Vec<String>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences decoded at once per model (continuous batching: new ones
    /// join between steps).
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    /// Most tokens (prompt + reply) per sequence. Default: the model's
    /// context, at most 8192.
    #[arg(long)]
    ctx: Option<usize>,
    /// Memory for each decoder's KV caches: a paged pool of blocks (with
    /// --kv-policy, each running sequence's capped cache instead). Work
    /// waits, or the youngest sequence is preempted and recomputed, when it
    /// is full.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = attend::util::parse_bytes)]
    kv_memory: usize,
    /// Tokens per KV block (the unit of memory and of prefix sharing).
    #[arg(long, default_value_t = 32)]
    kv_block: usize,
    /// Tokens per engine step: every decoding sequence's next token, then
    /// chunks of waiting prompts (chunked prefill) up to this many.
    #[arg(long, default_value_t = 512)]
    step_tokens: usize,
    /// Requests that may wait for a place; more get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Require `Authorization: Bearer KEY` (also from ATTEND_API_KEY).
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Turn automatic prefix caching off.
    #[arg(long)]
    no_prefix_cache: bool,
    /// Speculative decoding for the decoder models, as `generate --draft`
    /// (lookup[:n=3,k=8], heads:PATH[,k=3], skip:…, model:PATH): replies
    /// are the tokens plain serving gives; /metrics counts drafted and
    /// accepted tokens. Not with --kv-policy (its caches cannot roll back).
    #[arg(long, value_name = "SPEC")]
    draft: Option<crate::run_cmd::DraftSpec>,
    /// Draft only while at most this many sequences decode at once (a
    /// fuller batch is compute-bound, and verifying drafts costs more than
    /// it saves).
    #[arg(long, default_value_t = 4, requires = "draft")]
    draft_max_batch: usize,
    /// Largest request body; larger ones get 413 without being read.
    #[arg(long, value_name = "SIZE", default_value = "8M", value_parser = attend::util::parse_bytes)]
    max_body: usize,
    /// Seconds running requests get to finish after SIGTERM / Ctrl-C.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    #[command(flatten)]
    kv: KvArgs,
    #[command(flatten)]
    weights: WeightArgs,
}

/// A decoder behind an engine, with what turns text into its tokens.
struct Decoder {
    engine: Engine,
    tok: Arc<Tokenizer>,
    template: Option<String>,
    bos: String,
    eos: String,
    /// The model's recommended sampling, else llama.cpp's defaults.
    defaults: SamplingParams,
    /// End-of-generation tokens: EOS and the template's end-of-turn.
    stop_ids: Vec<u32>,
    ctx: usize,
}

enum Kind {
    Decoder(Box<Decoder>),
    Encoder(Arc<Embedder>),
}

struct Served {
    id: String,
    kind: Kind,
    created: u64,
}

/// Request latencies for /metrics, as a Prometheus histogram.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
    n: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            n: AtomicU64::new(0),
        }
    }

    fn observe(&self, secs: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if secs <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_us
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
        self.n.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            out.push_str(&format!(
                "{name}_bucket{{le=\"{b}\"}} {}\n",
                c.load(Ordering::Relaxed)
            ));
        }
        let n = self.n.load(Ordering::Relaxed);
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {n}\n"));
        out.push_str(&format!(
            "{name}_sum {}\n{name}_count {n}\n",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        ));
    }
}

const LATENCY: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

struct AppState {
    models: Vec<Served>,
    api_key: Option<String>,
    stopping: AtomicBool,
    ttft: Histogram,
    e2e: Histogram,
    http_errors: AtomicU64,
    max_body: usize,
}

impl AppState {
    /// The decoder a generation request names (or the only one).
    fn decoder(&self, v: &Value) -> Result<(&Served, &Decoder), ApiError> {
        let m = self.model(v.get("model").and_then(Value::as_str), "decoder")?;
        match &m.kind {
            Kind::Decoder(d) => Ok((m, d)),
            Kind::Encoder(_) => unreachable!("model() checked: a decoder"),
        }
    }

    fn model(&self, name: Option<&str>, want: &str) -> Result<&Served, ApiError> {
        let fits = |m: &&Served| match want {
            "decoder" => matches!(m.kind, Kind::Decoder(_)),
            _ => matches!(m.kind, Kind::Encoder(_)),
        };
        match name {
            Some(n) => {
                let m = self.models.iter().find(|m| m.id == n).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        format!(
                            "The model `{n}` does not exist (served: {})",
                            self.models
                                .iter()
                                .map(|m| m.id.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                    .code("model_not_found")
                    .param("model")
                })?;
                if !fits(&m) {
                    return Err(ApiError::bad(format!(
                        "The model `{n}` is {}; this endpoint needs {}",
                        match m.kind {
                            Kind::Decoder(_) => "a decoder (chat, completions)",
                            Kind::Encoder(_) => "an encoder (embeddings)",
                        },
                        if want == "decoder" {
                            "a decoder"
                        } else {
                            "an encoder"
                        }
                    ))
                    .param("model"));
                }
                Ok(m)
            }
            // no model named: the only one of the kind
            None => {
                let mut it = self.models.iter().filter(fits);
                match (it.next(), it.next()) {
                    (Some(m), None) => Ok(m),
                    _ => Err(ApiError::bad("`model` is required").param("model")),
                }
            }
        }
    }
}

/// An error in OpenAI's shape: {"error": {message, type, param, code}}.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }

    fn code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }

    fn body(&self) -> Value {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()).code("queue_full")
            }
            SubmitError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            SubmitError::Invalid(m) => ApiError::bad(m),
        }
    }
}

/// The body as JSON: 413 past --max-body (refused from Content-Length,
/// before it is read), 400 when it is not JSON.
fn parse_body(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Value, ApiError> {
    let b = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let v: Value = serde_json::from_slice(&b)
        .map_err(|e| ApiError::bad(format!("The body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("The body must be a JSON object"));
    }
    Ok(v)
}

/// Sends engine events to the request's task.
struct ChanSink(mpsc::UnboundedSender<Event>);

impl Sink for ChanSink {
    fn send(&mut self, e: Event) -> bool {
        self.0.send(e).is_ok()
    }
    fn closed(&self) -> bool {
        self.0.is_closed()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn serve_cmd(a: ServeArgs) -> Result<()> {
    // the flags first: a bad one is refused before a model loads
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    if a.kv_block == 0 {
        bail!("--kv-block must be at least 1");
    }
    if a.step_tokens == 0 {
        bail!("--step-tokens must be at least 1");
    }
    let mut ids = std::collections::HashSet::new();
    let specs: Vec<(String, PathBuf)> = a
        .models
        .iter()
        .map(|m| {
            let (name, path) = match m.split_once('=') {
                Some((n, p)) if !n.is_empty() && !n.contains('/') => {
                    (n.to_string(), PathBuf::from(p))
                }
                _ => {
                    let p = PathBuf::from(m);
                    let name = p
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| m.clone());
                    (name, p)
                }
            };
            (name, path)
        })
        .collect();
    for (n, _) in &specs {
        if !ids.insert(n.clone()) {
            bail!("--model: two models are named `{n}` (name them with NAME=PATH)");
        }
    }
    let mut models = vec![];
    for (id, path) in specs {
        let kind = if path.is_dir() && is_encoder_dir(&path) {
            let e = Embedder::load(&path, &candle_core::Device::Cpu)
                .with_context(|| format!("--model {}", path.display()))?;
            Kind::Encoder(Arc::new(e))
        } else {
            let mut l = load_model(&path, &a.weights)?;
            a.kv.set_dtype(&mut l);
            let policy = a.kv.resolve(&l)?.map(|c| c.policy);
            let ctx = a.ctx.unwrap_or(l.model.cfg.max_len.min(8192));
            if ctx > l.model.cfg.max_len {
                bail!(
                    "--ctx {ctx} is beyond {}'s context of {}",
                    path.display(),
                    l.model.cfg.max_len
                );
            }
            let draft = match &a.draft {
                Some(d) => {
                    if policy.is_some() {
                        bail!("--draft cannot be used with --kv-policy: a policy's caches cannot roll back rejected drafts");
                    }
                    let prepared = d.prepare(&l)?;
                    Some((d.maker(&prepared)?, d.k))
                }
                None => None,
            };
            let tok = Arc::new(l.gguf.tokenizer);
            let name =
                |i: Option<u32>| i.and_then(|i| tok.inner.id_to_token(i)).unwrap_or_default();
            let (bos, eos) = (name(tok.bos), name(tok.eos));
            let mut stop_ids: Vec<u32> = tok.eos.into_iter().collect();
            for t in [
                "<|im_end|>",
                "<end_of_turn>",
                "<|eot_id|>",
                "<|end|>",
                "<|endoftext|>",
            ] {
                if let Some(i) = tok.inner.token_to_id(t) {
                    if !stop_ids.contains(&i) {
                        stop_ids.push(i);
                    }
                }
            }
            let defaults = l
                .gguf
                .sampling
                .clone()
                .unwrap_or_else(SamplingParams::llama_cpp);
            let template = l.gguf.chat_template.clone();
            let engine = Engine::start(
                Arc::new(l.model),
                EngineConfig {
                    parallel: a.parallel,
                    max_queue: a.max_queue,
                    kv_memory: a.kv_memory,
                    block_tokens: a.kv_block,
                    step_tokens: a.step_tokens,
                    ctx,
                    prefix_caching: !a.no_prefix_cache,
                    policy,
                    draft_k: draft.as_ref().map_or(4, |d| d.1),
                    draft: draft.map(|d| d.0),
                    draft_max_batch: a.draft_max_batch,
                },
            )
            .with_context(|| format!("--model {}", path.display()))?;
            eprintln!(
                "{id}: {} sequences at once, {}-token context, KV pool {} blocks of {} tokens ({} MiB)",
                engine.parallel,
                ctx,
                engine.stats.kv_blocks_total.load(Ordering::Relaxed),
                a.kv_block,
                (engine.stats.kv_blocks_total.load(Ordering::Relaxed) * engine.block_bytes) >> 20
            );
            Kind::Decoder(Box::new(Decoder {
                engine,
                tok,
                template,
                bos,
                eos,
                defaults,
                stop_ids,
                ctx,
            }))
        };
        models.push(Served {
            id,
            kind,
            created: now(),
        });
    }
    let state = Arc::new(AppState {
        models,
        api_key: a.api_key.clone().or_else(|| {
            std::env::var("ATTEND_API_KEY")
                .ok()
                .filter(|k| !k.is_empty())
        }),
        stopping: AtomicBool::new(false),
        ttft: Histogram::new(LATENCY),
        e2e: Histogram::new(LATENCY),
        http_errors: AtomicU64::new(0),
        max_body: a.max_body,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let grace = Duration::from_secs(a.shutdown_timeout);
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("--host/--port: cannot listen on {addr}"))?;
        // (--port 0: the port the system gave)
        let addr = listener.local_addr().map_or(addr, |a| a.to_string());
        eprintln!(
            "serving {} on http://{addr} (chat page at /, OpenAI API under /v1)",
            state
                .models
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let app = router(state.clone(), a.max_body);
        let st = state.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!(
                    "stopping: no new requests; running ones get {}s",
                    grace.as_secs()
                );
                st.stopping.store(true, Ordering::Release);
                // stop the engines (they finish what runs, until the grace
                // period ends); the server then drains its connections
                let st2 = st.clone();
                tokio::task::spawn_blocking(move || {
                    for m in &st2.models {
                        if let Kind::Decoder(d) = &m.kind {
                            d.engine.shutdown(grace);
                        }
                    }
                })
                .await
                .ok();
            })
            .await
            .context("serving")?;
        eprintln!("stopped");
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

fn router(state: Arc<AppState>, max_body: usize) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "No such endpoint").into_response()
        })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// The API key (on everything but the page, /health and /metrics), and a
/// count of error responses.
async fn guard(
    State(st): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let open = matches!(req.uri().path(), "/" | "/health" | "/metrics");
    if let (Some(key), false) = (&st.api_key, open) {
        let given = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            st.http_errors.fetch_add(1, Ordering::Relaxed);
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Incorrect or missing API key (send Authorization: Bearer KEY)",
            )
            .code("invalid_api_key")
            .into_response();
        }
    }
    // a body declared larger than --max-body is refused before a byte of
    // it is read (one sent without a length is cut off at the limit)
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > st.max_body as u64) {
        st.http_errors.fetch_add(1, Ordering::Relaxed);
        let mut r = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "The request body ({} bytes) is larger than this server takes ({} bytes, --max-body)",
                declared.unwrap_or(0),
                st.max_body
            ),
        )
        .into_response();
        // the unread body stays unread: close the connection after this
        r.headers_mut()
            .insert("connection", axum::http::HeaderValue::from_static("close"));
        return r;
    }
    let r = next.run(req).await;
    if r.status().is_client_error() || r.status().is_server_error() {
        st.http_errors.fetch_add(1, Ordering::Relaxed);
    }
    r
}

async fn page() -> Html<&'static str> {
    Html(include_str!("serve_page.html"))
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.stopping.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "stopping"})),
        )
            .into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn list_models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": st.models.iter().map(|m| json!({
            "id": m.id,
            "object": "model",
            "created": m.created,
            "owned_by": "attend",
            "kind": match m.kind { Kind::Decoder(_) => "decoder", Kind::Encoder(_) => "encoder" },
            "max_model_len": match &m.kind { Kind::Decoder(d) => Some(d.ctx), Kind::Encoder(_) => None },
        })).collect::<Vec<_>>(),
    }))
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, vals: Vec<(String, f64)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (m, v) in vals {
            out.push_str(&format!("{name}{{model=\"{m}\"}} {v}\n"));
        }
    };
    let decoders: Vec<(&str, &Decoder)> = st
        .models
        .iter()
        .filter_map(|m| match &m.kind {
            Kind::Decoder(d) => Some((m.id.as_str(), &**d)),
            _ => None,
        })
        .collect();
    macro_rules! each {
        ($name:expr, $kind:expr, $help:expr, $f:expr) => {
            metric(
                $name,
                $kind,
                $help,
                decoders
                    .iter()
                    .map(|(id, d)| (id.to_string(), $f(&d.engine.stats) as f64))
                    .collect(),
            )
        };
    }
    use attend::serve::Stats;
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let u = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed);
    each!(
        "attend_requests_total",
        "counter",
        "Generation requests accepted.",
        |s: &Stats| l(&s.requests)
    );
    each!(
        "attend_requests_finished_total",
        "counter",
        "Generations finished (stop or length).",
        |s: &Stats| l(&s.finished)
    );
    each!(
        "attend_requests_cancelled_total",
        "counter",
        "Generations whose client went away.",
        |s: &Stats| l(&s.cancelled)
    );
    each!(
        "attend_prompt_tokens_total",
        "counter",
        "Prompt tokens of finished requests.",
        |s: &Stats| l(&s.prompt_tokens)
    );
    each!(
        "attend_generation_tokens_total",
        "counter",
        "Tokens generated.",
        |s: &Stats| l(&s.generated_tokens)
    );
    each!(
        "attend_queue_length",
        "gauge",
        "Requests waiting for a place.",
        |s: &Stats| u(&s.waiting)
    );
    each!(
        "attend_running_sequences",
        "gauge",
        "Sequences decoding.",
        |s: &Stats| u(&s.running)
    );
    each!(
        "attend_batch_size",
        "gauge",
        "Sequences in the last engine step.",
        |s: &Stats| u(&s.batch_size)
    );
    each!(
        "attend_steps_total",
        "counter",
        "Engine steps.",
        |s: &Stats| l(&s.steps)
    );
    each!(
        "attend_step_tokens_total",
        "counter",
        "Tokens fed in engine steps (prefill and decode).",
        |s: &Stats| l(&s.step_tokens)
    );
    each!(
        "attend_kv_blocks_used",
        "gauge",
        "KV blocks in use (sequences and prefix cache).",
        |s: &Stats| u(&s.kv_blocks_used)
    );
    each!(
        "attend_kv_blocks_total",
        "gauge",
        "KV blocks in the pool (--kv-memory).",
        |s: &Stats| u(&s.kv_blocks_total)
    );
    each!(
        "attend_prefix_cache_blocks",
        "gauge",
        "KV blocks held by the prefix cache.",
        |s: &Stats| u(&s.prefix_cache_blocks)
    );
    each!(
        "attend_prefix_cache_queries_total",
        "counter",
        "Prefix cache lookups.",
        |s: &Stats| l(&s.prefix_queries)
    );
    each!(
        "attend_prefix_cache_hit_tokens_total",
        "counter",
        "Prompt tokens taken from the prefix cache.",
        |s: &Stats| l(&s.prefix_hit_tokens)
    );
    each!(
        "attend_preemptions_total",
        "counter",
        "Sequences preempted (KV pool full) and recomputed.",
        |s: &Stats| l(&s.preemptions)
    );
    each!(
        "attend_spec_passes_total",
        "counter",
        "Speculative decoding: verification passes (--draft).",
        |s: &Stats| l(&s.spec_passes)
    );
    each!(
        "attend_spec_drafted_tokens_total",
        "counter",
        "Speculative decoding: tokens drafted.",
        |s: &Stats| l(&s.spec_drafted)
    );
    each!(
        "attend_spec_accepted_tokens_total",
        "counter",
        "Speculative decoding: drafted tokens accepted (the tokens plain decoding gives).",
        |s: &Stats| l(&s.spec_accepted)
    );
    metric(
        "attend_kv_bytes_used",
        "gauge",
        "KV cache bytes in use (pool blocks and running sequences' fixed states).",
        decoders
            .iter()
            .map(|(id, d)| (id.to_string(), d.engine.kv_bytes() as f64))
            .collect(),
    );
    metric(
        "attend_kv_bytes_limit",
        "gauge",
        "KV cache bytes allowed (--kv-memory).",
        decoders
            .iter()
            .map(|(id, d)| (id.to_string(), d.engine.config().kv_memory as f64))
            .collect(),
    );
    // by draft position: passes that drafted / accepted a token there
    for (name, help, pick) in [
        (
            "attend_spec_drafted_at_total",
            "Speculative decoding: passes that drafted a token at this position.",
            0,
        ),
        (
            "attend_spec_accepted_at_total",
            "Speculative decoding: passes whose token at this position was accepted.",
            1,
        ),
    ] {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
        for (id, d) in &decoders {
            let s = &d.engine.stats;
            let v = if pick == 0 {
                &s.spec_drafted_at
            } else {
                &s.spec_accepted_at
            };
            for (i, c) in v.iter().enumerate() {
                out.push_str(&format!(
                    "{name}{{model=\"{id}\",position=\"{}\"}} {}\n",
                    i + 1,
                    l(c)
                ));
            }
        }
    }
    st.ttft.render(
        "attend_time_to_first_token_seconds",
        "Time from request to first token.",
        &mut out,
    );
    st.e2e.render(
        "attend_request_duration_seconds",
        "Time from request to last token.",
        &mut out,
    );
    out.push_str(&format!(
        "# HELP attend_http_errors_total Error responses.\n# TYPE attend_http_errors_total counter\nattend_http_errors_total {}\n",
        st.http_errors.load(Ordering::Relaxed)
    ));
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

// ---- request fields ----

fn f64_field(v: &Value, k: &'static str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => {
            let f = x
                .as_f64()
                .ok_or_else(|| ApiError::bad(format!("`{k}` must be a number")).param(k))?;
            if !(lo..=hi).contains(&f) {
                return Err(
                    ApiError::bad(format!("`{k}` must be between {lo} and {hi}, got {f}")).param(k),
                );
            }
            Ok(Some(f))
        }
    }
}

fn uint_field(v: &Value, k: &'static str) -> Result<Option<u64>, ApiError> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("`{k}` must be a non-negative integer")).param(k)),
    }
}

fn bool_field(v: &Value, k: &'static str) -> Result<bool, ApiError> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::bad(format!("`{k}` must be true or false")).param(k)),
    }
}

/// What a generation request asks for, beyond its prompt.
struct GenSpec {
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    /// Some(k) with logprobs
    logprobs: Option<usize>,
    stream: bool,
    include_usage: bool,
    /// vLLM's and llama.cpp's extension: keep going past end-of-generation
    /// tokens (benchmarks that want exactly max_tokens).
    ignore_eos: bool,
}

fn gen_spec(v: &Value, d: &Decoder, chat: bool, prompt_len: usize) -> Result<GenSpec, ApiError> {
    let mut p = d.defaults.clone();
    if let Some(t) = f64_field(v, "temperature", 0.0, 2.0)? {
        p.temperature = t;
    }
    if let Some(t) = f64_field(v, "top_p", 0.0, 1.0)? {
        if t == 0.0 {
            return Err(ApiError::bad("`top_p` must be above 0").param("top_p"));
        }
        p.top_p = t;
    }
    if let Some(k) = uint_field(v, "top_k")? {
        p.top_k = k as usize;
    }
    if let Some(m) = f64_field(v, "min_p", 0.0, 1.0)? {
        p.min_p = m;
    }
    if let Some(x) = f64_field(v, "presence_penalty", -2.0, 2.0)? {
        p.presence_penalty = x;
    }
    if let Some(x) = f64_field(v, "frequency_penalty", -2.0, 2.0)? {
        p.frequency_penalty = x;
    }
    if let Some(x) = f64_field(v, "repetition_penalty", 0.01, 10.0)? {
        p.repeat_penalty = x;
    }
    if let Some(s) = uint_field(v, "seed")? {
        p.seed = s;
    }
    if let Some(n) = uint_field(v, "n")? {
        if n != 1 {
            return Err(ApiError::bad("only `n` = 1 is supported").param("n"));
        }
    }
    let stop = match v.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::bad("`stop` must be a string or an array of strings").param("stop")
            })?,
        Some(_) => {
            return Err(
                ApiError::bad("`stop` must be a string or an array of strings").param("stop"),
            )
        }
    };
    if stop.len() > 4 || stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad("`stop` takes up to 4 non-empty strings").param("stop"));
    }
    let room = d.ctx.saturating_sub(prompt_len);
    let asked = match uint_field(v, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => uint_field(v, "max_tokens")?,
    };
    let max_tokens = match asked {
        Some(0) => return Err(ApiError::bad("`max_tokens` must be at least 1").param("max_tokens")),
        Some(n) => n as usize,
        // OpenAI's: completions 16, chat up to the context
        None if chat => room,
        None => 16,
    };
    if prompt_len + max_tokens > d.ctx {
        return Err(ApiError::bad(format!(
            "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the messages, {} in the completion). Please reduce the length of the messages or completion.",
            d.ctx,
            prompt_len + max_tokens,
            prompt_len,
            max_tokens
        ))
        .param(if chat { "messages" } else { "prompt" })
        .code("context_length_exceeded"));
    }
    let logprobs = if chat {
        match bool_field(v, "logprobs")? {
            true => Some(uint_field(v, "top_logprobs")?.unwrap_or(0) as usize),
            false => None,
        }
    } else {
        uint_field(v, "logprobs")?.map(|k| k as usize)
    };
    if logprobs.is_some_and(|k| k > 20) {
        return Err(ApiError::bad("at most 20 top logprobs").param("top_logprobs"));
    }
    if bool_field(v, "echo")? {
        return Err(ApiError::bad("`echo` is not supported").param("echo"));
    }
    let include_usage = v
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    p.validate().map_err(|e| ApiError::bad(e.to_string()))?;
    Ok(GenSpec {
        max_tokens,
        sampling: p,
        stop,
        logprobs,
        stream: bool_field(v, "stream")?,
        include_usage,
        ignore_eos: bool_field(v, "ignore_eos")?,
    })
}

/// The messages of a chat request (content as a string or as text parts).
fn messages(v: &Value) -> Result<Vec<Message>, ApiError> {
    let arr = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad("`messages` must be an array").param("messages"))?;
    if arr.is_empty() {
        return Err(ApiError::bad("`messages` is empty").param("messages"));
    }
    arr.iter()
        .map(|m| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad("each message needs a `role`").param("messages"))?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => Ok(t.to_string()),
                            _ => Err(ApiError::bad("only text content parts are supported")
                                .param("messages")),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
                None | Some(Value::Null) => String::new(),
                Some(_) => {
                    return Err(ApiError::bad(
                        "a message's `content` must be a string or text parts",
                    )
                    .param("messages"))
                }
            };
            Ok(Message {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

fn encode(tok: &Tokenizer, text: &str, special: bool) -> Result<Vec<u32>, ApiError> {
    tok.encode(text, special)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

// ---- generation ----

/// What the per-request task sends the response: text pieces, then the end.
enum Piece {
    Text {
        text: String,
        ids: Vec<u32>,
        logprobs: Vec<attend::serve::TokenLogprob>,
    },
    End {
        finish: &'static str,
        prompt_tokens: usize,
        cached_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

/// Submit and turn engine events into text pieces (stop strings applied,
/// text that may begin a stop string held back). Dropping the returned
/// receiver cancels the generation at the engine's next step.
fn start(
    st: &Arc<AppState>,
    d: &Decoder,
    prompt: Vec<u32>,
    spec: &GenSpec,
) -> Result<mpsc::UnboundedReceiver<Piece>, ApiError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    d.engine.submit(Request {
        prompt,
        max_tokens: spec.max_tokens,
        sampling: spec.sampling.clone(),
        stop_ids: if spec.ignore_eos {
            vec![]
        } else {
            d.stop_ids.clone()
        },
        logprobs: spec.logprobs,
        sink: Box::new(ChanSink(tx)),
    })?;
    let (out, rx_out) = mpsc::unbounded_channel();
    let tok = d.tok.clone();
    let stops = spec.stop.clone();
    let st = st.clone();
    tokio::spawn(async move {
        let mut dec = StreamDecoder::new(&tok);
        // text decoded but not yet sent (it may begin a stop string)
        let mut held = String::new();
        let mut ids = vec![];
        let mut lps = vec![];
        let mut first = true;
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token { id, logprob } => {
                    if first {
                        st.ttft.observe(t0.elapsed().as_secs_f64());
                        first = false;
                    }
                    ids.push(id);
                    lps.extend(logprob);
                    held.push_str(&dec.push(id).unwrap_or_default());
                    if let Some(at) = stops.iter().filter_map(|s| held.find(s.as_str())).min() {
                        held.truncate(at);
                        let text = std::mem::take(&mut held);
                        out.send(Piece::Text {
                            text,
                            ids: std::mem::take(&mut ids),
                            logprobs: std::mem::take(&mut lps),
                        })
                        .ok();
                        out.send(Piece::End {
                            finish: "stop",
                            prompt_tokens: 0,
                            cached_tokens: 0,
                            completion_tokens: 0,
                        })
                        .ok();
                        st.e2e.observe(t0.elapsed().as_secs_f64());
                        // dropping rx cancels the engine's sequence
                        return;
                    }
                    // send all but what could begin a stop string
                    let cut = held.len() - stop_prefix(&held, &stops);
                    if cut > 0 {
                        let text = held[..cut].to_string();
                        held.drain(..cut);
                        if out
                            .send(Piece::Text {
                                text,
                                ids: std::mem::take(&mut ids),
                                logprobs: std::mem::take(&mut lps),
                            })
                            .is_err()
                        {
                            return; // the client is gone
                        }
                    }
                }
                Event::Done {
                    finish,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens,
                } => {
                    if !held.is_empty() || !ids.is_empty() {
                        out.send(Piece::Text {
                            text: std::mem::take(&mut held),
                            ids: std::mem::take(&mut ids),
                            logprobs: std::mem::take(&mut lps),
                        })
                        .ok();
                    }
                    st.e2e.observe(t0.elapsed().as_secs_f64());
                    out.send(Piece::End {
                        finish: match finish {
                            FinishReason::Stop => "stop",
                            FinishReason::Length => "length",
                        },
                        prompt_tokens,
                        cached_tokens,
                        completion_tokens,
                    })
                    .ok();
                    return;
                }
                Event::Error(m) => {
                    out.send(Piece::Error(m)).ok();
                    return;
                }
            }
        }
    });
    Ok(rx_out)
}

/// Bytes at the end of `held` that begin some stop string (held back until
/// the next token says whether the stop string follows).
fn stop_prefix(held: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .filter_map(|s| {
            (1..s.len().min(held.len() + 1)).rev().find(|&l| {
                held.is_char_boundary(held.len() - l) && s.starts_with(&held[held.len() - l..])
            })
        })
        .max()
        .unwrap_or(0)
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id]).unwrap_or_default()
}

/// Chat logprobs content entries for the pieces' tokens.
fn chat_logprobs(tok: &Tokenizer, ids: &[u32], lps: &[attend::serve::TokenLogprob]) -> Vec<Value> {
    ids.iter()
        .zip(lps)
        .map(|(&id, lp)| {
            let t = token_text(tok, id);
            json!({
                "token": t,
                "logprob": lp.logprob,
                "bytes": t.as_bytes(),
                "top_logprobs": lp.top.iter().map(|&(i, l)| {
                    let s = token_text(tok, i);
                    json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
                }).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// Legacy completions logprobs: {tokens, token_logprobs, top_logprobs, text_offset}.
fn completion_logprobs(
    tok: &Tokenizer,
    ids: &[u32],
    lps: &[attend::serve::TokenLogprob],
    offset0: usize,
) -> Value {
    let mut off = offset0;
    let mut offsets = vec![];
    let tokens: Vec<String> = ids
        .iter()
        .map(|&i| {
            let t = token_text(tok, i);
            offsets.push(off);
            off += t.len();
            t
        })
        .collect();
    json!({
        "tokens": tokens,
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| {
            l.top.iter().map(|&(i, p)| (token_text(tok, i), json!(p))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

async fn chat(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let v = parse_body(body)?;
    let (m, d) = st.decoder(&v)?;
    let msgs = messages(&v)?;
    let template = d.template.as_deref().ok_or_else(|| {
        ApiError::bad(format!(
            "The model `{}` has no chat template; use /v1/completions",
            m.id
        ))
    })?;
    let text = render(template, &msgs, true, &d.bos, &d.eos).map_err(|e| {
        ApiError::bad(format!("the chat template refused the messages: {e}")).param("messages")
    })?;
    let prompt = encode(&d.tok, &text, false)?;
    let spec = gen_spec(&v, d, true, prompt.len())?;
    let rx = start(&st, d, prompt, &spec)?;
    let id = format!("chatcmpl-{:x}", rand::random::<u64>());
    let created = now();
    let model = m.id.clone();
    let tok = d.tok.clone();
    if spec.stream {
        let first = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}],
        });
        let want_lp = spec.logprobs.is_some();
        let base = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model});
        let b = base.clone();
        let text = move |text: String, ids: Vec<u32>, lps: Vec<TokenLogprob>| {
            let lp = if want_lp {
                json!({"content": chat_logprobs(&tok, &ids, &lps)})
            } else {
                Value::Null
            };
            with_choice(
                &b,
                json!({"index": 0, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}),
            )
        };
        let b = base.clone();
        let finish = move |f: &str| {
            with_choice(
                &b,
                json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": f}),
            )
        };
        return Ok(sse_stream(
            rx,
            Some(first),
            base,
            text,
            finish,
            spec.include_usage,
        ));
    }
    let r = collect(rx).await?;
    let lp = spec
        .logprobs
        .map(|_| json!({"content": chat_logprobs(&d.tok, &r.ids, &r.logprobs)}));
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": lp,
            "finish_reason": r.finish,
        }],
        "usage": usage(r.prompt_tokens, r.completion_tokens, r.cached_tokens),
    }))
    .into_response())
}

/// A generation as server-sent events: `first`, a `text` frame per text
/// piece, the `finish` frame, a usage frame (`base` with no choices) if
/// asked, then `[DONE]`; an error becomes an error frame. Dropping the
/// stream (the client went away) drops `rx`, which cancels the generation.
fn sse_stream(
    rx: mpsc::UnboundedReceiver<Piece>,
    first: Option<Value>,
    base: Value,
    mut text: impl FnMut(String, Vec<u32>, Vec<TokenLogprob>) -> Value + Send + 'static,
    finish: impl Fn(&str) -> Value + Send + 'static,
    include_usage: bool,
) -> Response {
    // a piece -> its frames, and whether it was the last
    let frames = move |p: Piece| -> (Vec<String>, bool) {
        match p {
            Piece::Text {
                text: t,
                ids,
                logprobs,
            } => (vec![text(t, ids, logprobs).to_string()], false),
            Piece::End {
                finish: f,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
            } => {
                let mut out = vec![finish(f).to_string()];
                if include_usage {
                    let mut u = base.clone();
                    u["choices"] = json!([]);
                    u["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens);
                    out.push(u.to_string());
                }
                out.push("[DONE]".into());
                (out, true)
            }
            Piece::Error(m) => (
                vec![json!({"error": {"message": m, "type": "server_error", "param": null, "code": null}})
                    .to_string()],
                true,
            ),
        }
    };
    let queue: std::collections::VecDeque<String> = first.iter().map(Value::to_string).collect();
    let stream = futures_util::stream::unfold(
        (rx, queue, false, frames),
        |(mut rx, mut queue, mut done, mut frames)| async move {
            loop {
                if let Some(f) = queue.pop_front() {
                    let ev = Ok::<_, std::convert::Infallible>(SseEvent::default().data(f));
                    return Some((ev, (rx, queue, done, frames)));
                }
                if done {
                    return None;
                }
                let (fs, last) = frames(rx.recv().await?);
                queue.extend(fs);
                done = last;
            }
        },
    );
    Sse::new(stream).into_response()
}

/// `base` (id, object, created, model) with one choice.
fn with_choice(base: &Value, choice: Value) -> Value {
    let mut v = base.clone();
    v["choices"] = json!([choice]);
    v
}

struct Collected {
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<attend::serve::TokenLogprob>,
    finish: &'static str,
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
}

async fn collect(mut rx: mpsc::UnboundedReceiver<Piece>) -> Result<Collected, ApiError> {
    let mut c = Collected {
        text: String::new(),
        ids: vec![],
        logprobs: vec![],
        finish: "stop",
        prompt_tokens: 0,
        cached_tokens: 0,
        completion_tokens: 0,
    };
    while let Some(p) = rx.recv().await {
        match p {
            Piece::Text {
                text,
                ids,
                logprobs,
            } => {
                c.text.push_str(&text);
                c.ids.extend(ids);
                c.logprobs.extend(logprobs);
            }
            Piece::End {
                finish,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
            } => {
                c.finish = finish;
                if prompt_tokens > 0 {
                    c.prompt_tokens = prompt_tokens;
                    c.cached_tokens = cached_tokens;
                    c.completion_tokens = completion_tokens;
                } else {
                    // ended by a stop string: count what was generated
                    c.completion_tokens = c.ids.len();
                }
                return Ok(c);
            }
            Piece::Error(m) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m)),
        }
    }
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the generation ended without a result",
    ))
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let v = parse_body(body)?;
    let (m, d) = st.decoder(&v)?;
    // a string, one string in an array, or token ids
    let bad =
        || ApiError::bad("`prompt` must be a string or an array of token ids").param("prompt");
    let prompt: Vec<u32> = match v.get("prompt") {
        Some(Value::String(s)) => encode(&d.tok, s, true)?,
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            encode(&d.tok, a[0].as_str().unwrap_or_default(), true)?
        }
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&i| (i as usize) < d.tok.vocab_size())
                    .map(|i| i as u32)
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if prompt.is_empty() {
        return Err(ApiError::bad("`prompt` is empty").param("prompt"));
    }
    let spec = gen_spec(&v, d, false, prompt.len())?;
    let rx = start(&st, d, prompt, &spec)?;
    let id = format!("cmpl-{:x}", rand::random::<u64>());
    let created = now();
    let model = m.id.clone();
    let tok = d.tok.clone();
    let want_lp = spec.logprobs.is_some();
    if spec.stream {
        let base =
            json!({"id": id, "object": "text_completion", "created": created, "model": model});
        let mut off = 0;
        let b = base.clone();
        let text = move |text: String, ids: Vec<u32>, lps: Vec<TokenLogprob>| {
            let lp = if want_lp {
                completion_logprobs(&tok, &ids, &lps, off)
            } else {
                Value::Null
            };
            off += text.len();
            with_choice(
                &b,
                json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": null}),
            )
        };
        let b = base.clone();
        let finish = move |f: &str| {
            with_choice(
                &b,
                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": f}),
            )
        };
        return Ok(sse_stream(rx, None, base, text, finish, spec.include_usage));
    }
    let r = collect(rx).await?;
    let lp = want_lp.then(|| completion_logprobs(&d.tok, &r.ids, &r.logprobs, 0));
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": r.text, "logprobs": lp, "finish_reason": r.finish}],
        "usage": usage(r.prompt_tokens, r.completion_tokens, r.cached_tokens),
    }))
    .into_response())
}

async fn embeddings(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let v = parse_body(body)?;
    let m = st.model(v.get("model").and_then(Value::as_str), "encoder")?;
    let Kind::Encoder(e) = &m.kind else {
        unreachable!("checked: an encoder")
    };
    let bad = || ApiError::bad("`input` must be a string or an array of strings").param("input");
    let texts: Vec<String> = match v.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    let base64 = match v.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(
                ApiError::bad(format!("`encoding_format` is float or base64, not {f}"))
                    .param("encoding_format"),
            )
        }
    };
    if v.get("dimensions").is_some_and(|d| !d.is_null()) {
        return Err(ApiError::bad("`dimensions` is not supported").param("dimensions"));
    }
    let e = e.clone();
    let (vecs, tokens) = tokio::task::spawn_blocking(move || -> attend::Result<_> {
        let tokens: usize = texts
            .iter()
            .map(|t| e.token_ids(t).map(|i| i.len()))
            .sum::<attend::Result<usize>>()?;
        Ok((e.embed(&texts, 32)?, tokens))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    use base64::Engine as _;
    let data: Vec<Value> = vecs
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let emb = if base64 {
                let bytes: Vec<u8> = x.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(x)
            };
            json!({"object": "embedding", "index": i, "embedding": emb})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": m.id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

/// The tokenizer of the named (or only) model.
fn tokenizer_of<'a>(st: &'a AppState, v: &Value) -> Result<&'a Tokenizer, ApiError> {
    let name = v.get("model").and_then(Value::as_str);
    match name {
        Some(n) => match st.models.iter().find(|m| m.id == n) {
            Some(Served {
                kind: Kind::Decoder(d),
                ..
            }) => Ok(&d.tok),
            Some(Served {
                kind: Kind::Encoder(e),
                ..
            }) => Ok(&e.tokenizer),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("The model `{n}` does not exist"),
            )
            .param("model")
            .code("model_not_found")),
        },
        None => match st.models.as_slice() {
            [one] => Ok(match &one.kind {
                Kind::Decoder(d) => &d.tok,
                Kind::Encoder(e) => &e.tokenizer,
            }),
            _ => Err(ApiError::bad("`model` is required").param("model")),
        },
    }
}

async fn tokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let v = parse_body(body)?;
    let tok = tokenizer_of(&st, &v)?;
    let text = v
        .get("content")
        .or_else(|| v.get("prompt"))
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad("`content` must be a string").param("content"))?;
    let special = match v.get("add_special") {
        None => true,
        Some(b) => b.as_bool().ok_or_else(|| {
            ApiError::bad("`add_special` must be true or false").param("add_special")
        })?,
    };
    let ids = encode(tok, text, special)?;
    Ok(Json(json!({"tokens": ids, "count": ids.len()})))
}

async fn detokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let v = parse_body(body)?;
    let tok = tokenizer_of(&st, &v)?;
    let ids: Vec<u32> = v
        .get("tokens")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .map(|x| {
                    x.as_u64()
                        .filter(|&i| (i as usize) < tok.vocab_size())
                        .map(|i| i as u32)
                })
                .collect()
        })
        .ok_or_else(|| {
            ApiError::bad("`tokens` must be an array of token ids of this model").param("tokens")
        })?;
    let text = tok
        .decode(&ids)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(json!({"content": text})))
}
