//! The serving engine: one scheduler thread owns the running sequences and
//! steps them together.
//!
//! Each iteration:
//!
//! 1. drops sequences whose client is gone (their blocks go back to the
//!    pool) and admits waiting ones while fewer than `parallel` run and the
//!    pool has room — a new sequence first takes the longest cached prefix
//!    of its prompt (`prefix`);
//! 2. plans one step: every decoding sequence feeds its last token, and the
//!    rest of a token budget (`step_tokens`) goes to prompt chunks, oldest
//!    first (chunked prefill: a long prompt is spread over several steps, so
//!    the others keep decoding);
//! 3. makes sure the pool can hold the step's new rows: evicts unused
//!    prefix blocks, then leaves prompt chunks for later, then preempts the
//!    youngest sequence (its blocks freed, its tokens recomputed when it is
//!    admitted again, as vLLM's recompute preemption);
//! 4. runs the step (`Transformer::step_many`: every linear map once over
//!    all the step's tokens), samples each sequence that reached the end of
//!    its known tokens, and streams the token to its client.
//!
//! With a draft (`EngineConfig::draft`, speculative decoding), a decoding
//! sequence feeds its last token and up to k drafted ones while at most
//! `draft_max_batch` sequences decode; the step computes each of those
//! positions as a one-token step would, keeps the longest accepted prefix
//! plus the target's own token, and rolls the cache back over the rest
//! (`decode::speculative`) — so replies are the tokens plain serving
//! gives. Drafting needs caches that roll back (paged ones: no
//! `--kv-policy`).
//!
//! A sequence is its tokens (prompt, then what it generated) and how many of
//! them its KV cache holds; a decode step and a prompt chunk are the same
//! thing — feeding the next known tokens — and the logits are used when
//! the feed reaches the last one.

use super::prefix::PrefixCache;
use crate::cache::paged::{BlockPool, KvBlock};
use crate::cache::policy::KvPolicy;
use crate::decode::speculative::{accept, Backoff, Context, Draft};
use crate::decode::{Sampler, SamplingParams};
use crate::error::{Error, Result};
use crate::model::{DecodeState, Transformer};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the engine runs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences running at once.
    pub parallel: usize,
    /// Most requests waiting for a place; more are refused.
    pub max_queue: usize,
    /// Bytes for KV caches: the paged pool plus, under a policy, every
    /// running sequence's fixed-size state (policy-capped caches and
    /// sliding-window rings).
    pub kv_memory: usize,
    /// Tokens per KV block.
    pub block_tokens: usize,
    /// Tokens per step (decode tokens first, prompt chunks in the rest).
    pub step_tokens: usize,
    /// Most tokens (prompt + generated) per sequence.
    pub ctx: usize,
    pub prefix_caching: bool,
    /// An eviction policy for every sequence's caches (`cache::policy`);
    /// such caches hold a fixed budget and are not paged.
    pub policy: Option<KvPolicy>,
    /// Speculative decoding: a fresh draft for each sequence.
    pub draft: Option<DraftMaker>,
    /// The most tokens drafted a pass.
    pub draft_k: usize,
    /// Draft only while at most this many sequences decode (a full batch
    /// is compute-bound: verifying drafts then costs more than it saves).
    pub draft_max_batch: usize,
}

/// Makes each sequence's draft (a draft keeps per-sequence state: a
/// lookup index, a draft model's cache).
#[derive(Clone)]
pub struct DraftMaker(pub Arc<dyn Fn() -> Box<dyn Draft + Send> + Send + Sync>);

impl std::fmt::Debug for DraftMaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DraftMaker")
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            parallel: 16,
            max_queue: 256,
            kv_memory: 1 << 30,
            block_tokens: 32,
            step_tokens: 512,
            ctx: 4096,
            prefix_caching: true,
            policy: None,
            draft: None,
            draft_k: 4,
            draft_max_batch: 4,
        }
    }
}

/// Where a request's events go (an HTTP response stream).
pub trait Sink: Send {
    /// Deliver an event; false when the client is gone.
    fn send(&mut self, e: Event) -> bool;
    /// Whether the client is gone (checked between steps).
    fn closed(&self) -> bool;
}

/// A sampled token's log-probability and the most likely alternatives
/// (of the model's distribution, before sampling's truncation).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token.
    Stop,
    /// max_tokens or the context.
    Length,
}

#[derive(Clone, Debug)]
pub enum Event {
    Token {
        id: u32,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache.
        cached_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

/// One generation.
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end the generation (not sent).
    pub stop_ids: Vec<u32>,
    /// Some(k): each token's logprob and its k likeliest alternatives.
    pub logprobs: Option<usize>,
    pub sink: Box<dyn Sink>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// max_queue requests are waiting.
    QueueFull,
    /// The engine is shutting down.
    ShuttingDown,
    /// The request can never run: why.
    Invalid(String),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull => write!(f, "the server is busy: the request queue is full"),
            SubmitError::ShuttingDown => write!(f, "the server is shutting down"),
            SubmitError::Invalid(m) => write!(f, "{m}"),
        }
    }
}

/// Counters for `/metrics` (Prometheus text), updated by the engine.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub prefix_queries: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    pub steps: AtomicU64,
    pub step_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    /// Sequences in the last step.
    pub batch_size: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub prefix_cache_blocks: AtomicUsize,
    /// Speculative decoding: verification passes, tokens drafted and
    /// accepted, and by draft position (the first 8).
    pub spec_passes: AtomicU64,
    pub spec_drafted: AtomicU64,
    pub spec_accepted: AtomicU64,
    pub spec_drafted_at: [AtomicU64; 8],
    pub spec_accepted_at: [AtomicU64; 8],
}

enum Msg {
    Submit(Box<Seq>),
    Shutdown(Instant),
}

/// A served model's engine: submit requests, read stats, shut down.
pub struct Engine {
    tx: Mutex<mpsc::Sender<Msg>>,
    pub stats: Arc<Stats>,
    accepting: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    cfg: EngineConfig,
    /// Bytes of one block of every paged layer.
    pub block_bytes: usize,
    /// Sequences that fit at once (parallel, as the memory allows).
    pub parallel: usize,
    /// Bytes of each running sequence's fixed-size state outside the pool
    /// (under a policy: its capped caches and sliding-window rings).
    pub fixed_bytes: usize,
}

struct Seq {
    req: Request,
    /// prompt, then the tokens generated
    tokens: Vec<u32>,
    prompt_len: usize,
    /// tokens the state holds (fed to the model)
    fed: usize,
    state: Option<DecodeState>,
    sampler: Sampler,
    generated: usize,
    cached: usize,
    order: u64,
    /// the prompt's blocks went to the prefix cache (at the end of its
    /// first prefill; a preempted sequence's recomputed reply is not added)
    registered: bool,
    /// speculative decoding: the draft, its length, the tokens drafted for
    /// this step, and the final hidden state that chose the last token
    draft: Option<Box<dyn Draft + Send>>,
    backoff: Backoff,
    drafted: Vec<u32>,
    hidden: Vec<f32>,
}

impl Engine {
    /// Start the scheduler thread for `model`.
    pub fn start(model: Arc<Transformer>, cfg: EngineConfig) -> Result<Engine> {
        if cfg.parallel == 0 {
            return Err(Error::config("parallel", "must be at least 1"));
        }
        if cfg.step_tokens == 0 {
            return Err(Error::config("step-tokens", "must be at least 1"));
        }
        let policy = cfg.policy.clone().filter(|p| p.budget().is_some());
        // the fixed part of each sequence (under a policy: its capped
        // caches and sliding-window rings); every other layer is paged
        let probe = match &policy {
            Some(p) => model.new_state_with_policy(p, None)?,
            None => model.new_state(None)?,
        };
        let mut fixed = 0usize;
        let mut paged_layers = 0usize;
        let mut dims = None;
        for l in &probe.layers {
            match &l.mixer {
                crate::attention::MixerState::Kv(c) => {
                    let c = &c[0];
                    let row = 2 * c.kv_heads() * c.dtype.bytes(c.head_dim());
                    match (c.window, &c.policy) {
                        (None, Some(p)) => fixed += (p.budget().unwrap_or(0) + 1) * row,
                        // beside policy caches, a sliding-window layer keeps its ring
                        (Some(w), _) if policy.is_some() => fixed += w * row,
                        // paged: full layers and, keeping every token,
                        // sliding-window ones
                        _ => {
                            paged_layers += 1;
                            dims = Some(row);
                        }
                    }
                }
                _ => return Err(Error::msg(
                    "attend serve batches softmax-attention models (this one has recurrent layers)",
                )),
            }
        }
        let block_bytes = dims.map_or(0, |row| row * cfg.block_tokens * paged_layers);
        // the pool gets what the fixed states of `parallel` sequences leave,
        // and at least room for one sequence's context
        let min_seq = cfg.ctx.div_ceil(cfg.block_tokens) * block_bytes;
        let parallel = match cfg.kv_memory.saturating_sub(min_seq).checked_div(fixed) {
            None => cfg.parallel,
            Some(n) => cfg.parallel.min(n),
        };
        if parallel == 0 {
            return Err(Error::config(
                "kv-memory",
                format!(
                    "{} holds no sequence: each needs {} of fixed state and {} for a {}-token context: raise it or lower --ctx",
                    size(cfg.kv_memory),
                    size(fixed),
                    size(min_seq),
                    cfg.ctx
                ),
            ));
        }
        let pool = if paged_layers > 0 {
            let left = cfg.kv_memory - parallel * fixed;
            let blocks = left / block_bytes;
            if blocks < cfg.ctx.div_ceil(cfg.block_tokens) {
                return Err(Error::config(
                    "kv-memory",
                    format!(
                        "{} holds {blocks} blocks of {} tokens; one {}-token context needs {} ({}): raise it or lower --ctx",
                        size(cfg.kv_memory),
                        cfg.block_tokens,
                        cfg.ctx,
                        cfg.ctx.div_ceil(cfg.block_tokens),
                        size(min_seq)
                    ),
                ));
            }
            Some(model.kv_pool(cfg.block_tokens, blocks * paged_layers)?)
        } else {
            None
        };
        let prefix = cfg.prefix_caching
            && policy.is_none()
            && paged_layers == probe.layers.len()
            && pool.is_some();
        let stats = Arc::new(Stats::default());
        stats.kv_blocks_total.store(
            pool.as_ref()
                .map_or(0, |p| p.capacity() / paged_layers.max(1)),
            Ordering::Relaxed,
        );
        let (tx, rx) = mpsc::channel();
        let mut sched = Scheduler {
            model,
            cfg: EngineConfig {
                parallel,
                policy,
                ..cfg.clone()
            },
            pool,
            layers: paged_layers,
            prefix: prefix.then(PrefixCache::default),
            waiting: VecDeque::new(),
            running: vec![],
            stats: stats.clone(),
            rx,
            deadline: None,
        };
        let thread = std::thread::Builder::new()
            .name("attend-engine".into())
            .spawn(move || sched.run())
            .map_err(|e| Error::msg(format!("starting the engine thread: {e}")))?;
        Ok(Engine {
            tx: Mutex::new(tx),
            stats,
            accepting: AtomicBool::new(true),
            thread: Mutex::new(Some(thread)),
            cfg,
            block_bytes,
            parallel,
            fixed_bytes: fixed,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// KV bytes in use now: the pool's blocks (sequences' and the prefix
    /// cache's) and the running sequences' fixed states; never above
    /// `kv_memory`.
    pub fn kv_bytes(&self) -> usize {
        self.stats.kv_blocks_used.load(Ordering::Relaxed) * self.block_bytes
            + self.stats.running.load(Ordering::Relaxed) * self.fixed_bytes
    }

    /// Queue a request; its events go to its sink.
    pub fn submit(&self, req: Request) -> std::result::Result<(), SubmitError> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if req.prompt.len() >= self.cfg.ctx {
            return Err(SubmitError::Invalid(format!(
                "the prompt has {} tokens; the server's context is {} (--ctx)",
                req.prompt.len(),
                self.cfg.ctx
            )));
        }
        req.sampling
            .validate()
            .map_err(|e| SubmitError::Invalid(e.to_string()))?;
        if self.stats.waiting.load(Ordering::Acquire) >= self.cfg.max_queue {
            return Err(SubmitError::QueueFull);
        }
        let sampler =
            Sampler::new(req.sampling.clone()).map_err(|e| SubmitError::Invalid(e.to_string()))?;
        self.stats.waiting.fetch_add(1, Ordering::AcqRel);
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let seq = Seq {
            tokens: req.prompt.clone(),
            prompt_len: req.prompt.len(),
            req,
            fed: 0,
            state: None,
            sampler,
            generated: 0,
            cached: 0,
            order: 0,
            registered: false,
            draft: self.cfg.draft.as_ref().map(|m| (m.0)()),
            backoff: Backoff::new(self.cfg.draft_k.max(1)),
            drafted: vec![],
            hidden: vec![],
        };
        let tx = self.tx.lock().expect("engine lock");
        tx.send(Msg::Submit(Box::new(seq))).map_err(|_| {
            self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
            SubmitError::ShuttingDown
        })
    }

    /// Stop admitting, finish what is running (until `grace` has passed;
    /// then the rest end with an error event), and join the thread.
    pub fn shutdown(&self, grace: Duration) {
        self.accepting.store(false, Ordering::Release);
        if let Ok(tx) = self.tx.lock() {
            tx.send(Msg::Shutdown(Instant::now() + grace)).ok();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            t.join().ok();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

struct Scheduler {
    model: Arc<Transformer>,
    cfg: EngineConfig,
    pool: Option<BlockPool>,
    /// paged layers (a token block costs this many pool blocks)
    layers: usize,
    prefix: Option<PrefixCache>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    stats: Arc<Stats>,
    rx: mpsc::Receiver<Msg>,
    deadline: Option<Instant>,
}

impl Scheduler {
    fn run(&mut self) {
        let mut order = 0u64;
        loop {
            // new requests (block when there is nothing to do)
            let idle = self.running.is_empty() && self.waiting.is_empty();
            let mut msgs = vec![];
            if idle && self.deadline.is_none() {
                match self.rx.recv() {
                    Ok(m) => msgs.push(m),
                    Err(_) => return,
                }
            }
            msgs.extend(self.rx.try_iter());
            for m in msgs {
                match m {
                    Msg::Submit(mut s) => {
                        order += 1;
                        s.order = order;
                        if self.deadline.is_some() {
                            self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
                            s.req
                                .sink
                                .send(Event::Error("the server is shutting down".into()));
                        } else {
                            self.waiting.push_back(*s);
                        }
                    }
                    Msg::Shutdown(at) => {
                        self.deadline = Some(at);
                        // queued requests are refused; running ones finish
                        for mut s in self.waiting.drain(..) {
                            self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
                            s.req
                                .sink
                                .send(Event::Error("the server is shutting down".into()));
                        }
                    }
                }
            }
            if let Some(d) = self.deadline {
                if self.running.is_empty() {
                    return;
                }
                if Instant::now() >= d {
                    for mut s in self.running.drain(..) {
                        s.req.sink.send(Event::Error(
                            "the server shut down before this request finished".into(),
                        ));
                    }
                    self.publish();
                    return;
                }
            }
            self.drop_closed();
            self.admit();
            self.step();
            self.publish();
        }
    }

    /// Pool blocks for a sequence to hold n tokens.
    fn blocks_for(&self, n: usize) -> usize {
        n.div_ceil(self.cfg.block_tokens) * self.layers
    }

    fn free(&self) -> usize {
        self.pool.as_ref().map_or(usize::MAX, |p| p.free_blocks())
    }

    /// Free pool blocks until `need` are free, evicting unused prefix
    /// blocks; whether that worked.
    fn make_room(&mut self, need: usize) -> bool {
        while self.free() < need {
            match self.prefix.as_mut().map_or(0, |p| p.evict_one()) {
                0 => return false,
                _ => continue,
            }
        }
        true
    }

    fn drop_closed(&mut self) {
        let before = self.running.len() + self.waiting.len();
        self.running.retain(|s| !s.req.sink.closed());
        let w0 = self.waiting.len();
        self.waiting.retain(|s| !s.req.sink.closed());
        let gone_waiting = w0 - self.waiting.len();
        self.stats.waiting.fetch_sub(gone_waiting, Ordering::AcqRel);
        let gone = before - self.running.len() - self.waiting.len();
        self.stats
            .cancelled
            .fetch_add(gone as u64, Ordering::Relaxed);
    }

    fn admit(&mut self) {
        while self.running.len() < self.cfg.parallel {
            let Some(mut s) = self.waiting.pop_front() else {
                return;
            };
            // the cached prefix of its known tokens
            let bt = self.cfg.block_tokens;
            let hit = match &mut self.prefix {
                Some(p) => {
                    self.stats.prefix_queries.fetch_add(1, Ordering::Relaxed);
                    p.lookup(&s.tokens, bt)
                }
                None => vec![],
            };
            let cached = hit.first().map_or(0, |b| b.len() * bt);
            // room for its prompt and a block to grow in per running
            // sequence (a sequence that cannot start waits its turn)
            let need = self.blocks_for(s.tokens.len() + 1) - self.blocks_for(cached)
                + self.layers * self.running.len();
            if !self.running.is_empty() && !self.make_room(need) {
                self.waiting.push_front(s);
                return;
            }
            let state = match (&self.pool, &self.cfg.policy) {
                (_, Some(p)) => self.model.new_state_with_policy(p, None),
                (Some(pool), None) => self
                    .model
                    .new_state_paged(pool, (!hit.is_empty()).then_some(&hit[..])),
                (None, None) => self.model.new_state(None),
            };
            self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
            match state {
                Ok(st) => {
                    s.fed = st.pos;
                    if s.generated == 0 {
                        s.cached = cached;
                        self.stats
                            .prefix_hit_tokens
                            .fetch_add(cached as u64, Ordering::Relaxed);
                    }
                    s.state = Some(st);
                    self.running.push(s);
                }
                Err(e) => {
                    s.req.sink.send(Event::Error(e.to_string()));
                }
            }
        }
    }

    /// Put the youngest running sequence back at the head of the queue,
    /// its blocks freed (recomputed when it runs again).
    fn preempt(&mut self) -> bool {
        let Some(i) = (0..self.running.len()).max_by_key(|&i| self.running[i].order) else {
            return false;
        };
        let mut s = self.running.remove(i);
        s.state = None;
        s.fed = 0;
        s.drafted.clear();
        s.hidden.clear();
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        self.stats.waiting.fetch_add(1, Ordering::AcqRel);
        self.waiting.push_front(s);
        true
    }

    /// Speculative decoding: draft for each decoding sequence (while few
    /// decode, and where the cache rolls back), into `Seq::drafted`.
    fn draft(&mut self) {
        for s in &mut self.running {
            s.drafted.clear();
        }
        let decoding = self
            .running
            .iter()
            .filter(|s| s.tokens.len() - s.fed == 1)
            .count();
        if self.cfg.draft.is_none() || decoding > self.cfg.draft_max_batch {
            return;
        }
        let (model, ctx) = (&self.model, self.cfg.ctx.min(self.model.cfg.max_len));
        for s in &mut self.running {
            let Seq {
                tokens,
                fed,
                state,
                draft,
                backoff,
                drafted,
                hidden,
                generated,
                req,
                ..
            } = s;
            let (Some(d), Some(st)) = (draft.as_mut(), state.as_mut()) else {
                continue;
            };
            if tokens.len() - *fed != 1 || !st.can_truncate() {
                continue;
            }
            // room in the context and in max_tokens (the target's own
            // token always follows the kept drafts)
            let room = ctx
                .saturating_sub(*fed + 1)
                .min(req.max_tokens.saturating_sub(*generated + 1));
            let want = backoff.want().min(room);
            if want == 0 {
                continue;
            }
            let h = (d.wants_hidden() && !hidden.is_empty()).then_some(&hidden[..]);
            let cx = Context {
                seq: tokens,
                hidden: h,
                model,
                state: st,
            };
            let mut p = d.propose_in(cx, want);
            p.truncate(want);
            *drafted = p;
        }
    }

    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        self.draft();
        // the plan: (index into running, tokens to feed)
        let plan = loop {
            self.running.sort_by_key(|s| s.order);
            let mut plan: Vec<(usize, usize)> = vec![];
            let decoding: usize = self
                .running
                .iter()
                .filter(|s| s.tokens.len() - s.fed == 1)
                .map(|s| 1 + s.drafted.len())
                .sum();
            let mut budget = self
                .cfg
                .step_tokens
                .saturating_sub(decoding)
                .max(self.cfg.block_tokens);
            for (i, s) in self.running.iter().enumerate() {
                let left = s.tokens.len() - s.fed;
                if left == 1 {
                    plan.push((i, 1 + s.drafted.len()));
                } else if budget > 0 {
                    // never a chunk of one prompt token, nor one left over:
                    // a single token takes the decode path (split-KV), whose
                    // numbers differ from the prefill form's, and a
                    // sequence's tokens must not depend on the load
                    let mut n = left.min(budget).max(2);
                    if left - n == 1 {
                        n += 1;
                    }
                    budget = budget.saturating_sub(n);
                    plan.push((i, n));
                }
            }
            // pool blocks the step takes
            let mut need: usize = plan
                .iter()
                .map(|&(i, n)| {
                    let s = &self.running[i];
                    self.blocks_for(s.fed + n) - self.blocks_for(s.fed)
                })
                .sum();
            if self.make_room(need) {
                break plan;
            }
            // leave the prompt chunks for later
            let decode_only: Vec<(usize, usize)> = plan
                .iter()
                .copied()
                .filter(|&(i, _)| {
                    let s = &self.running[i];
                    s.tokens.len() - s.fed == 1
                })
                .collect();
            need = decode_only
                .iter()
                .map(|&(i, n)| {
                    let s = &self.running[i];
                    self.blocks_for(s.fed + n) - self.blocks_for(s.fed)
                })
                .sum();
            if !decode_only.is_empty() && self.make_room(need) {
                break decode_only;
            }
            if self.running.len() == 1 {
                // one sequence that does not fit alone (the pool holds
                // at least one full context, so this is a bug, not load)
                let mut s = self.running.pop().expect("one");
                s.req.sink.send(Event::Error(
                    "the KV cache cannot hold this sequence (--kv-memory)".into(),
                ));
                return;
            }
            self.preempt();
        };
        // the planned sequences' next tokens (and drafts) and states (the
        // plan is in index order)
        let mut take = vec![0; self.running.len()];
        for &(i, n) in &plan {
            take[i] = n;
        }
        let mut feeds: Vec<Vec<u32>> = vec![];
        let mut verifying: Vec<bool> = vec![];
        let mut states: Vec<&mut DecodeState> = vec![];
        let mut hidden = false;
        for (s, &n) in self.running.iter_mut().zip(&take) {
            if n > 0 {
                let known = n - s.drafted.len();
                let mut f = s.tokens[s.fed..s.fed + known].to_vec();
                f.extend_from_slice(&s.drafted);
                feeds.push(f);
                verifying.push(!s.drafted.is_empty());
                hidden |= s.draft.as_ref().is_some_and(|d| d.wants_hidden());
                let st = s.state.as_mut().expect("running sequences hold a state");
                // each drafted position computed as a one-token step would
                st.set_one_by_one(!s.drafted.is_empty());
                states.push(st);
            }
        }
        let t: usize = feeds.iter().map(|f| f.len()).sum();
        let refs: Vec<&[u32]> = feeds.iter().map(|f| &f[..]).collect();
        let result = self
            .model
            .step_many_with(&mut states, &refs, &verifying, hidden, true);
        for st in &mut states {
            st.set_one_by_one(false);
        }
        drop((states, refs));
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .step_tokens
            .fetch_add(t as u64, Ordering::Relaxed);
        self.stats.batch_size.store(plan.len(), Ordering::Relaxed);
        let out = match result {
            Ok(l) => l,
            Err(e) => {
                // the step's sequences end with the error
                for &(i, _) in plan.iter().rev() {
                    let mut s = self.running.remove(i);
                    s.req.sink.send(Event::Error(e.to_string()));
                }
                return;
            }
        };
        let rows: usize = plan
            .iter()
            .zip(&verifying)
            .map(|(&(_, n), &v)| if v { n } else { 1 })
            .sum();
        let vocab = out.logits.len() / rows.max(1);
        let d_model = out.hidden.len() / rows.max(1);
        let mut done = vec![];
        let mut row0 = 0;
        for (&(i, n), &v) in plan.iter().zip(&verifying) {
            let here = row0;
            row0 += if v { n } else { 1 };
            let s = &mut self.running[i];
            let fed0 = s.fed;
            s.fed += n;
            if s.fed < s.prompt_len {
                continue;
            }
            if !s.registered {
                s.registered = true;
                if let Some(p) = &mut self.prefix {
                    register(p, s, self.cfg.block_tokens);
                }
            }
            if !v && s.fed < s.tokens.len() {
                continue;
            }
            let logits_at = |r: usize| &out.logits[(here + r) * vocab..][..vocab];
            // the tokens this step gives, each with its logits' row
            let mut emit: Vec<(u32, usize)> = vec![];
            let kept_row = if v {
                let d = std::mem::take(&mut s.drafted);
                let rows: Vec<&[f32]> = (0..n).map(logits_at).collect();
                let (a, fix, hist) = accept(&mut s.sampler, &rows, &s.tokens, &d);
                let bonus = fix.unwrap_or_else(|| s.sampler.sample_after(rows[a], &hist));
                let st = &self.stats;
                st.spec_passes.fetch_add(1, Ordering::Relaxed);
                st.spec_drafted.fetch_add(d.len() as u64, Ordering::Relaxed);
                st.spec_accepted.fetch_add(a as u64, Ordering::Relaxed);
                for j in 0..d.len().min(8) {
                    st.spec_drafted_at[j].fetch_add(1, Ordering::Relaxed);
                    st.spec_accepted_at[j].fetch_add(u64::from(j < a), Ordering::Relaxed);
                }
                s.backoff.record(d.len(), a);
                // forget the rejected tokens
                s.fed = fed0 + 1 + a;
                if a < d.len() {
                    let st = s.state.as_mut().expect("running");
                    if let Err(e) = st.truncate(s.fed) {
                        s.req.sink.send(Event::Error(e.to_string()));
                        done.push(i);
                        continue;
                    }
                }
                emit.extend(d[..a].iter().enumerate().map(|(r, &t)| (t, r)));
                emit.push((bonus, a));
                a
            } else {
                let id = s.sampler.sample_after(logits_at(0), &s.tokens);
                emit.push((id, 0));
                0
            };
            if d_model > 0 {
                s.hidden = out.hidden[(here + kept_row) * d_model..][..d_model].to_vec();
            }
            let mut finish = None;
            let mut alive = true;
            for (id, r) in emit {
                if s.req.stop_ids.contains(&id) {
                    finish = Some(FinishReason::Stop);
                    break;
                }
                let logprob = s.req.logprobs.map(|k| logprob(logits_at(r), id, k));
                s.tokens.push(id);
                s.generated += 1;
                self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                alive = s.req.sink.send(Event::Token { id, logprob });
                if s.generated >= s.req.max_tokens || s.tokens.len() >= self.cfg.ctx {
                    finish = Some(FinishReason::Length);
                    break;
                }
                if !alive {
                    break;
                }
            }
            if let Some(finish) = finish {
                // (the counters first: a client that reads /metrics after
                // its reply sees its request counted)
                self.stats.finished.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .prompt_tokens
                    .fetch_add(s.prompt_len as u64, Ordering::Relaxed);
                s.req.sink.send(Event::Done {
                    finish,
                    prompt_tokens: s.prompt_len,
                    cached_tokens: s.cached,
                    completion_tokens: s.generated,
                });
                done.push(i);
            } else if !alive {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                done.push(i);
            }
        }
        done.sort_unstable();
        done.dedup();
        for &i in done.iter().rev() {
            // (only prompt blocks are cached, at the end of the prefill: a
            // reply's keys and values come from decode steps, whose numbers
            // differ from a prefill's, and a later prompt that holds the
            // reply must get what a fresh prefill of it gets)
            self.running.remove(i);
        }
    }

    fn publish(&self) {
        let st = &self.stats;
        st.running.store(self.running.len(), Ordering::Relaxed);
        st.kv_blocks_used.store(
            self.pool
                .as_ref()
                .map_or(0, |p| p.used() / self.layers.max(1)),
            Ordering::Relaxed,
        );
        st.prefix_cache_blocks.store(
            self.prefix.as_ref().map_or(0, |p| p.len()),
            Ordering::Relaxed,
        );
    }
}

/// Bytes for a person: "12.5 MiB", "640 KiB".
fn size(b: usize) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{} KiB", b.div_ceil(1024))
    }
}

/// Put a sequence's full blocks in the prefix cache.
fn register(p: &mut PrefixCache, s: &Seq, bt: usize) {
    let Some(st) = &s.state else { return };
    let tables: Vec<&[Arc<KvBlock>]> = st
        .layers
        .iter()
        .filter_map(|l| match &l.mixer {
            crate::attention::MixerState::Kv(c) => c.first().and_then(|c| c.blocks()),
            _ => None,
        })
        .collect();
    if tables.len() == st.layers.len() {
        p.insert(&s.tokens[..s.fed], &tables, bt);
    }
}

/// log p(id) and the k likeliest tokens' log-probabilities.
fn logprob(l: &[f32], id: u32, k: usize) -> TokenLogprob {
    let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + l.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
    let mut top: Vec<(u32, f32)> = vec![];
    if k > 0 {
        let mut idx: Vec<u32> = (0..l.len() as u32).collect();
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |a, b| l[*b as usize].total_cmp(&l[*a as usize]));
        idx.truncate(k);
        idx.sort_by(|a, b| l[*b as usize].total_cmp(&l[*a as usize]));
        top = idx.into_iter().map(|i| (i, l[i as usize] - lse)).collect();
    }
    TokenLogprob {
        logprob: l[id as usize] - lse,
        top,
    }
}
