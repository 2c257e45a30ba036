//! Running real checkpoints: `generate`, `chat`, `perplexity`, `tokenize`,
//! `inspect`.

use crate::kv_cmd::{Capped, KvArgs};
use crate::load::{load_model, Loaded, PruneArgs, WeightArgs};
use anyhow::{bail, Context, Result};
use attend::decode::{generate, Sampler, SamplingParams};
use attend::formats::chat::{render, Message};
use attend::formats::gguf;
use attend::formats::tokenizer::StreamDecoder;
use attend::Transformer;
use candle_core::{Device, Tensor};
use clap::Args;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// `--draft SPEC`: a draft for speculative decoding, and `k`, the most
/// tokens it drafts a pass.
#[derive(Clone, Debug, PartialEq)]
pub struct DraftSpec {
    pub kind: DraftKind,
    pub k: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum DraftKind {
    /// `lookup[:n=3,k=8]`: prompt lookup, n the longest n-gram matched.
    Lookup { n: usize },
    /// `model:PATH[,k=4]`: a smaller model with the same tokenizer.
    Model(PathBuf),
    /// `heads:PATH[,k=3]`: Hydra heads from `attend train-draft-heads`.
    Heads(PathBuf),
    /// `skip:layers=…,attn=…,ffn=…[,k=4]`: the model itself with those
    /// sublayers skipped.
    Skip(attend::model::Skip),
}

/// The known drafts, for errors and --help.
pub const DRAFTS: &str =
    "lookup[:n=3,k=8], model:PATH[,k=4], heads:PATH[,k=3], skip:layers=A-B+C,attn=…,ffn=…[,k=4]";

/// "3-5+9" -> [3, 4, 5, 9] (layer indices, from 0).
fn layer_list(key: &str, val: &str) -> std::result::Result<Vec<usize>, String> {
    let mut out = vec![];
    for part in val.split('+') {
        let num = |x: &str| {
            x.trim().parse::<usize>().map_err(|_| {
                format!("`{key}={val}`: expected layer numbers from 0, ranges A-B joined by + (e.g. 10-14+20)")
            })
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("`{key}={val}`: the range {a}-{b} is empty"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    Ok(out)
}

impl std::str::FromStr for DraftSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, opts) = s.split_once(':').unwrap_or((s, ""));
        let whole = |kv: &str, val: &str| -> std::result::Result<usize, String> {
            let v: usize = val
                .parse()
                .map_err(|_| format!("`{kv}`: {val} is not a whole number"))?;
            if (1..=64).contains(&v) {
                Ok(v)
            } else {
                Err(format!("`{kv}`: must be 1 to 64"))
            }
        };
        if name == "model" || name == "heads" {
            let default = if name == "model" { 4 } else { 3 };
            let (path, k) = match opts.rsplit_once(",k=") {
                Some((p, k)) => (p, whole(&format!("k={k}"), k)?),
                None => (opts, default),
            };
            if path.is_empty() {
                return Err(format!(
                    "{name}:PATH needs the {} (known drafts: {DRAFTS})",
                    if name == "model" {
                        "draft model's file or folder"
                    } else {
                        "heads' folder (from attend train-draft-heads)"
                    }
                ));
            }
            let path = PathBuf::from(path);
            let kind = if name == "model" {
                DraftKind::Model(path)
            } else {
                DraftKind::Heads(path)
            };
            return Ok(DraftSpec { kind, k });
        }
        let pairs = opts
            .split(',')
            .filter(|o| !o.is_empty())
            .map(|kv| {
                kv.split_once('=')
                    .ok_or_else(|| format!("`{kv}`: expected key=value (known drafts: {DRAFTS})"))
            })
            .collect::<std::result::Result<Vec<_>, String>>()?;
        match name {
            "lookup" => {
                let (mut n, mut k) = (3, 8);
                for (key, val) in pairs {
                    let kv = format!("{key}={val}");
                    match key {
                        "n" => n = whole(&kv, val)?,
                        "k" => k = whole(&kv, val)?,
                        _ => return Err(format!("`{key}`: lookup takes n and k")),
                    }
                }
                Ok(DraftSpec {
                    kind: DraftKind::Lookup { n },
                    k,
                })
            }
            "skip" => {
                let mut skip = attend::model::Skip::default();
                let mut k = 4;
                let set = |v: &mut Vec<bool>, at: Vec<usize>| {
                    for i in at {
                        if v.len() <= i {
                            v.resize(i + 1, false);
                        }
                        v[i] = true;
                    }
                };
                for (key, val) in pairs {
                    match key {
                        "layers" => {
                            let at = layer_list(key, val)?;
                            set(&mut skip.attn, at.clone());
                            set(&mut skip.ffn, at);
                        }
                        "attn" => set(&mut skip.attn, layer_list(key, val)?),
                        "ffn" => set(&mut skip.ffn, layer_list(key, val)?),
                        "k" => k = whole(&format!("k={val}"), val)?,
                        _ => return Err(format!("`{key}`: skip takes layers, attn, ffn and k")),
                    }
                }
                if skip.count() == 0 {
                    return Err(
                        "skip: name the sublayers to skip (layers=, attn=, ffn=: e.g. skip:layers=20-27)"
                            .into(),
                    );
                }
                Ok(DraftSpec {
                    kind: DraftKind::Skip(skip),
                    k,
                })
            }
            _ => Err(format!("unknown draft `{name}` (known: {DRAFTS})")),
        }
    }
}

/// What a draft loads once: a draft model, or heads.
#[derive(Default)]
pub struct Drafter {
    model: Option<std::sync::Arc<attend::Transformer>>,
    heads: Option<attend::decode::heads::Heads>,
}

impl DraftSpec {
    /// Load what the draft needs for `target`: a `model:` draft's model
    /// (its tokenizer checked against the target's), `heads:` heads
    /// (checked against the target), `skip:` layers checked.
    pub fn prepare(&self, target: &Loaded) -> Result<Drafter> {
        let mut d = Drafter::default();
        match &self.kind {
            DraftKind::Lookup { .. } => {}
            DraftKind::Model(path) => {
                let m = load_model(path, &WeightArgs::default())
                    .with_context(|| format!("--draft model:{}", path.display()))?;
                let probe = "Hello, world! The draft and the model: 12345 tokens.";
                if m.gguf.tokenizer.encode(probe, true)?
                    != target.gguf.tokenizer.encode(probe, true)?
                {
                    bail!(
                        "--draft model:{}: its tokenizer is not the model's (a draft must share it)",
                        path.display()
                    );
                }
                if m.model.cfg.vocab_size != target.model.cfg.vocab_size {
                    bail!(
                        "--draft model:{}: the draft model has {} tokens in its vocabulary, the model {}",
                        path.display(),
                        m.model.cfg.vocab_size,
                        target.model.cfg.vocab_size
                    );
                }
                d.model = Some(std::sync::Arc::new(m.model));
            }
            DraftKind::Heads(path) => {
                if !path.join("heads.json").exists() {
                    bail!(
                        "--draft heads:{}: no heads.json there (train heads with `attend train-draft-heads`)",
                        path.display()
                    );
                }
                d.heads = Some(
                    attend::decode::heads::Heads::load(path, &target.model, true)
                        .with_context(|| format!("--draft heads:{}", path.display()))?,
                );
            }
            DraftKind::Skip(s) => {
                let n = target.model.decoder.len();
                if s.attn.len() > n || s.ffn.len() > n {
                    bail!(
                        "--draft {}: the model has {n} layers (numbered 0 to {})",
                        self.describe(),
                        n - 1
                    );
                }
            }
        }
        Ok(d)
    }

    /// What makes a fresh draft (one per sequence), from what `prepare`
    /// loaded.
    pub fn maker(&self, d: &Drafter) -> Result<attend::serve::engine::DraftMaker> {
        use attend::decode::heads::HeadsDraft;
        use attend::decode::speculative::{Draft, Lookup, ModelDraft, SkipDraft};
        type Make = std::sync::Arc<dyn Fn() -> Box<dyn Draft + Send> + Send + Sync>;
        let make: Make = match &self.kind {
            DraftKind::Lookup { n } => {
                let n = *n;
                std::sync::Arc::new(move || Box::new(Lookup { max_ngram: n }))
            }
            DraftKind::Model(_) => {
                let m = d.model.clone().context("the draft model is not loaded")?;
                let vocab = m.cfg.vocab_size;
                std::sync::Arc::new(move || {
                    Box::new(ModelDraft::new(m.clone(), vocab).expect("the same vocabulary"))
                })
            }
            DraftKind::Heads(_) => {
                let heads = d.heads.clone().context("the heads are not loaded")?;
                std::sync::Arc::new(move || {
                    Box::new(HeadsDraft {
                        heads: heads.clone(),
                    })
                })
            }
            DraftKind::Skip(s) => {
                let skip = s.clone();
                std::sync::Arc::new(move || Box::new(SkipDraft { skip: skip.clone() }))
            }
        };
        Ok(attend::serve::engine::DraftMaker(make))
    }

    /// A fresh draft, from what `prepare` loaded.
    pub fn draft(&self, d: &Drafter) -> Result<Box<dyn attend::decode::speculative::Draft + Send>> {
        Ok((self.maker(d)?.0)())
    }

    /// How the spec reads back (reports).
    pub fn describe(&self) -> String {
        let k = self.k;
        match &self.kind {
            DraftKind::Lookup { n } => format!("lookup:n={n},k={k}"),
            DraftKind::Model(p) => format!("model:{},k={k}", p.display()),
            DraftKind::Heads(p) => format!("heads:{},k={k}", p.display()),
            DraftKind::Skip(s) => {
                let list = |v: &[bool]| {
                    let on: Vec<usize> = (0..v.len()).filter(|&i| v[i]).collect();
                    let mut parts: Vec<String> = vec![];
                    let mut i = 0;
                    while i < on.len() {
                        let mut j = i;
                        while j + 1 < on.len() && on[j + 1] == on[j] + 1 {
                            j += 1;
                        }
                        parts.push(if i == j {
                            on[i].to_string()
                        } else {
                            format!("{}-{}", on[i], on[j])
                        });
                        i = j + 1;
                    }
                    parts.join("+")
                };
                let mut out = vec![];
                let (a, f) = (list(&s.attn), list(&s.ffn));
                if a == f {
                    out.push(format!("layers={a}"));
                } else {
                    if !a.is_empty() {
                        out.push(format!("attn={a}"));
                    }
                    if !f.is_empty() {
                        out.push(format!("ffn={f}"));
                    }
                }
                out.push(format!("k={k}"));
                format!("skip:{}", out.join(","))
            }
        }
    }
}

/// Generate after `prompt` until EOS or `max_new` tokens, printing the text
/// as it comes when `print` is set; speculatively with `draft` when given.
/// -> the tokens and, with a draft, what the verifier did.
fn stream_generate(
    l: &Loaded,
    capped: Option<&Capped>,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    print: bool,
    draft: Option<&DraftSpec>,
) -> Result<(Vec<u32>, Option<attend::decode::speculative::SpecStats>)> {
    let tok = &l.gguf.tokenizer;
    let mut stream = StreamDecoder::new(tok);
    let mut stdout = std::io::stdout();
    let on_token = |id| {
        if print && Some(id) != tok.eos {
            out!("{}", stream.push(id)?);
            stdout.flush().ok();
        }
        Ok(())
    };
    if let Some(d) = draft {
        let state = match capped {
            None => l.model.new_state(None)?,
            Some(c) => l
                .model
                .new_state_with_policy(&c.policy, c.retrieval.as_deref())?,
        };
        let drafter = d.prepare(l)?;
        let mut draft = d.draft(&drafter)?;
        let (ids, stats) = attend::decode::speculative::generate_speculative(
            &l.model,
            state,
            prompt,
            max_new,
            sampler,
            tok.eos,
            draft.as_mut(),
            d.k,
            on_token,
        )?;
        return Ok((ids, Some(stats)));
    }
    Ok((
        match capped {
            None => generate(&l.model, prompt, None, max_new, sampler, tok.eos, on_token)?,
            Some(c) => attend::decode::generate_with_policy(
                &l.model,
                &c.policy,
                c.retrieval.as_deref(),
                prompt,
                max_new,
                sampler,
                tok.eos,
                on_token,
            )?,
        },
        None,
    ))
}

#[derive(Args)]
pub struct SamplingArgs {
    /// 0 = greedy. Default: generate decodes greedily; chat uses the
    /// model's recommended sampling (GGUF `general.sampling.*`,
    /// generation_config.json), else llama.cpp's (0.8, top-k 40, top-p
    /// 0.95, min-p 0.05). `--temperature 0` is exactly greedy.
    #[arg(long)]
    temperature: Option<f64>,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long)]
    top_p: Option<f64>,
    /// Keep tokens at least this fraction as likely as the likeliest (0 = off).
    #[arg(long)]
    min_p: Option<f64>,
    /// Divide a repeated token's positive logit by this (multiply a
    /// negative one) over the last --penalty-last-n tokens (1 = off).
    #[arg(long)]
    repeat_penalty: Option<f64>,
    /// Subtract this from a repeated token's logit (OpenAI's; -2..2, 0 = off).
    #[arg(long)]
    presence_penalty: Option<f64>,
    /// Subtract this times a token's count (OpenAI's; -2..2, 0 = off).
    #[arg(long)]
    frequency_penalty: Option<f64>,
    /// Tokens (prompt included) the penalties look back over.
    #[arg(long, default_value_t = 64)]
    penalty_last_n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the sampling settings in use (to stderr).
    #[arg(long)]
    verbose: bool,
}

impl SamplingArgs {
    /// `base` with every flag given put over it.
    fn params(&self, base: SamplingParams) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_k: self.top_k.unwrap_or(base.top_k),
            top_p: self.top_p.unwrap_or(base.top_p),
            min_p: self.min_p.unwrap_or(base.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(base.repeat_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(base.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(base.frequency_penalty),
            penalty_last_n: self.penalty_last_n,
            seed: self.seed,
        }
    }

    /// The flags alone, checked before a model loads.
    fn check(&self) -> Result<()> {
        Ok(self.params(SamplingParams::default()).validate()?)
    }

    /// The sampler over `base` (printing the settings with --verbose).
    fn sampler(&self, base: SamplingParams, from: &str) -> Result<Sampler> {
        let p = self.params(base);
        if self.verbose {
            eprintln!(
                "sampling ({from}, flags over it): temperature {}, top-k {}, top-p {}, min-p {}, \
                 repeat penalty {}, presence penalty {}, frequency penalty {} over the last {} tokens, seed {}",
                p.temperature,
                p.top_k,
                p.top_p,
                p.min_p,
                p.repeat_penalty,
                p.presence_penalty,
                p.frequency_penalty,
                p.penalty_last_n,
                p.seed
            );
        }
        Ok(Sampler::new(p)?)
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    /// A GGUF file (llama, gemma3, qwen2, qwen3, phi3) or a Hugging Face
    /// decoder folder (config.json + *.safetensors + tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    weights: WeightArgs,
    #[command(flatten)]
    prune: PruneArgs,
    /// Print {"prompt_ids", "ids", "text"} for the generated part instead of streaming.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    kv: KvArgs,
    /// Speculative decoding: draft tokens cheaply, verify several in one
    /// pass of the model, keep exactly the tokens plain decoding gives.
    /// `lookup[:n=3,k=8]` copies from the prompt and output (the last n
    /// tokens matched earlier, up to k of what followed: rewriting,
    /// editing, quoting); `model:PATH[,k=4]` drafts with a smaller model
    /// that shares the tokenizer; `heads:PATH[,k=3]` with Hydra heads
    /// trained by `attend train-draft-heads`; `skip:layers=20-27[,k=4]`
    /// (also attn=, ffn=; layers from 0, ranges joined by +) with the
    /// model itself, those sublayers skipped (`attend draft-search` finds
    /// which). Greedy: exactly plain decoding's tokens;
    /// sampling: the same distribution (the speculative-sampling rule).
    /// --json reports the passes and how many drafted tokens were kept.
    #[arg(long, value_name = "SPEC")]
    draft: Option<DraftSpec>,
}

pub fn generate_cmd(a: GenerateArgs) -> Result<()> {
    // the flags first: a bad one is refused before the model loads
    a.sampling.check()?;
    let mut l = load_model(&a.model, &a.weights)?;
    let dropped = a.prune.apply(&mut l)?;
    let mut sampler = a.sampling.sampler(SamplingParams::default(), "greedy")?;
    a.kv.set_dtype(&mut l);
    let tok = &l.gguf.tokenizer;
    // with the special tokens the file asks for (Gemma's BOS)
    let prompt = tok.encode(&a.prompt, true)?;
    let capped = a.kv.resolve(&l)?;
    if prompt.len() >= l.model.cfg.max_len && capped.is_none() {
        bail!(
            "the prompt has {} tokens; the model's context is {}",
            prompt.len(),
            l.model.cfg.max_len
        );
    }
    let (ids, spec) = stream_generate(
        &l,
        capped.as_ref(),
        &prompt,
        a.max_tokens,
        &mut sampler,
        !a.json,
        a.draft.as_ref(),
    )?;
    let text = tok.decode(&ids)?;
    if a.json {
        let mut v = serde_json::json!({ "prompt_ids": prompt, "ids": ids, "text": text });
        prune_report(&l, dropped.as_deref(), &mut v);
        if let Some(s) = spec {
            v["speculative"] = serde_json::json!({
                "passes": s.passes,
                "plain_steps": s.plain_steps,
                "drafted": s.drafted,
                "accepted": s.accepted,
                "tokens_per_pass": s.tokens_per_pass(),
                "backoffs": s.backoffs,
                "drafted_at": s.drafted_at,
                "accepted_at": s.accepted_at,
            });
        }
        outln!("{v}");
    } else {
        outln!();
    }
    Ok(())
}

#[derive(Args)]
pub struct ChatArgs {
    /// A GGUF file or Hugging Face decoder folder with a chat template.
    #[arg(long)]
    model: PathBuf,
    /// Optional system message (otherwise the template's default, if any).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    weights: WeightArgs,
    #[command(flatten)]
    prune: PruneArgs,
    #[command(flatten)]
    kv: KvArgs,
    /// Speculative decoding, as `generate --draft` (`lookup[:n=3,k=8]`
    /// pays off when replies quote the conversation; `model:PATH[,k=4]`,
    /// `heads:PATH[,k=3]`, `skip:layers=…[,k=4]`).
    #[arg(long, value_name = "SPEC")]
    draft: Option<DraftSpec>,
}

pub fn chat_cmd(a: ChatArgs) -> Result<()> {
    a.sampling.check()?;
    let mut l = load_model(&a.model, &a.weights)?;
    if let Some(d) = a.prune.apply(&mut l)? {
        eprintln!("dropped: {d}");
    }
    // what the model recommends, else llama.cpp's defaults: a chat that
    // decodes greedily falls into loops
    let mut sampler = match &l.gguf.sampling {
        Some(p) => a
            .sampling
            .sampler(p.clone(), "the model's recommendation")?,
        None => a
            .sampling
            .sampler(SamplingParams::llama_cpp(), "llama.cpp's defaults")?,
    };
    a.kv.set_dtype(&mut l);
    let tok = &l.gguf.tokenizer;
    let template = l.gguf.chat_template.clone().with_context(|| {
        format!(
            "{}: no chat template in its metadata (`tokenizer.chat_template`)",
            a.model.display()
        )
    })?;
    let token = |id: Option<u32>| {
        id.and_then(|i| tok.inner.id_to_token(i))
            .unwrap_or_default()
    };
    let (bos, eos) = (token(tok.bos), token(tok.eos));
    let mut messages: Vec<Message> = a
        .system
        .iter()
        .map(|s| Message {
            role: "system".into(),
            content: s.clone(),
        })
        .collect();
    let capped = a.kv.resolve(&l)?;
    // a template that does not parse, loops or explodes is refused before
    // the first turn (rendering is bounded: `chat::render`)
    let mut probe = messages.clone();
    probe.push(Message {
        role: "user".into(),
        content: "hello".into(),
    });
    render(&template, &probe, true, &bos, &eos)
        .with_context(|| format!("{}: `tokenizer.chat_template`", a.model.display()))?;
    let stdin = std::io::stdin();
    // the banner and prompts are for a person at a terminal; piped input
    // gets only the replies on stdout (and errors on stderr)
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    if interactive {
        eprintln!("chatting with {} (Ctrl-D to end)", a.model.display());
    }
    loop {
        if interactive {
            eprint!("> ");
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            if interactive {
                eprintln!();
            }
            return Ok(());
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        messages.push(Message {
            role: "user".into(),
            content: line.to_string(),
        });
        let prompt_text = render(&template, &messages, true, &bos, &eos)
            .with_context(|| format!("{}: `tokenizer.chat_template`", a.model.display()))?;
        let prompt = tok.encode(&prompt_text, false)?;
        if prompt.len() >= l.model.cfg.max_len && capped.is_none() {
            bail!(
                "the conversation has grown past the model's context ({} tokens)",
                l.model.cfg.max_len
            );
        }
        let (ids, _) = stream_generate(
            &l,
            capped.as_ref(),
            &prompt,
            a.max_tokens,
            &mut sampler,
            true,
            a.draft.as_ref(),
        )?;
        outln!();
        messages.push(Message {
            role: "assistant".into(),
            content: tok.decode(&ids)?,
        });
    }
}

#[derive(Args)]
pub struct PerplexityArgs {
    /// A GGUF file or Hugging Face decoder folder.
    #[arg(long)]
    model: PathBuf,
    /// UTF-8 text to score.
    #[arg(long)]
    file: PathBuf,
    /// Tokens per window; windows do not overlap and each is scored on its
    /// own (the first token of a window is not predicted).
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score at most this many tokens (0 = the whole file).
    #[arg(long, default_value_t = 0)]
    max_tokens: usize,
    #[command(flatten)]
    weights: WeightArgs,
    #[command(flatten)]
    prune: PruneArgs,
    /// Feed the text one token at a time through a decode state (the
    /// StreamingLLM protocol) instead of scoring windows; with --kv-policy
    /// the cache is capped. JSON adds cache_bytes_max.
    #[arg(long)]
    streaming: bool,
    /// llama-perplexity's protocol instead: whole --ctx chunks only, each
    /// starting with BOS (when the model takes one), and only the second
    /// half of each chunk scored (every prediction has ≥ ctx/2 tokens of
    /// context), so the figure is comparable with llama-perplexity's.
    #[arg(long, conflicts_with = "streaming")]
    halves: bool,
    #[command(flatten)]
    kv: KvArgs,
    #[arg(long)]
    json: bool,
}

/// Mean NLL over non-overlapping windows of `ctx` tokens, each scored on
/// its own; with `halves = Some(bos)` llama-perplexity's protocol: whole
/// chunks only, the first token replaced by `bos` (if any), predictions
/// from position ctx/2 on. -> (mean NLL, predictions, the bytes the first
/// window leaves in its decode state)
pub(crate) fn score_windows(
    model: &Transformer,
    ids: &[u32],
    ctx: usize,
    halves: Option<Option<u32>>,
) -> Result<(f64, usize, usize)> {
    let (mut nll, mut n, mut state_bytes) = (0f64, 0usize, None);
    for w in ids.chunks(ctx) {
        if w.len() < 2 || (halves.is_some() && w.len() < ctx) {
            continue;
        }
        let mut w = w.to_vec();
        if let Some(Some(bos)) = halves {
            w[0] = bos;
        }
        let first = if halves.is_some() { ctx / 2 } else { 0 };
        let input = Tensor::new(&w[..w.len() - 1], &Device::Cpu)?.unsqueeze(0)?;
        let target = Tensor::new(&w[1..], &Device::Cpu)?.unsqueeze(0)?;
        // a prefill into a fresh decode state (the CPU executor, with the
        // KV cache type asked for)
        let mut state = model.new_state(None)?;
        let logits = model.step(&input, &mut state)?;
        state_bytes.get_or_insert(state.state_bytes());
        let mask: Vec<f32> = (0..w.len() - 1)
            .map(|i| if i >= first { 1.0 } else { 0.0 })
            .collect();
        let weight = Tensor::from_vec(mask, target.shape(), &Device::Cpu)?;
        let sum = attend::train::cross_entropy_sum(&logits, &target, &weight, 0.0)?
            .to_scalar::<f32>()? as f64;
        nll += sum;
        n += w.len() - 1 - first;
    }
    if n == 0 {
        bail!("not enough tokens to score");
    }
    Ok((nll / n as f64, n, state_bytes.unwrap_or(0)))
}

pub fn perplexity_cmd(a: PerplexityArgs) -> Result<()> {
    let mut l = load_model(&a.model, &a.weights)?;
    let dropped = a.prune.apply(&mut l)?;
    a.kv.set_dtype(&mut l);
    if a.kv.kv_policy.is_some() && !a.streaming {
        bail!("--kv-policy applies to --streaming perplexity (windows are scored whole)");
    }
    if a.ctx < 2 || a.ctx > l.model.cfg.max_len {
        bail!(
            "--ctx must be in 2..={} (the model's context)",
            l.model.cfg.max_len
        );
    }
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("{}: cannot read", a.file.display()))?;
    // BOS first where the file asks for it, as transformers and
    // llama-perplexity score
    let mut ids = l.gguf.tokenizer.encode(&text, true)?;
    if a.max_tokens > 0 {
        ids.truncate(a.max_tokens);
    }
    if ids.len() < 2 {
        bail!(
            "{}: only {} token(s) to score; perplexity needs at least 2",
            a.file.display(),
            ids.len()
        );
    }
    if a.streaming {
        return crate::kv_cmd::streaming_cmd(&l, &ids, &a.kv, a.json);
    }
    let halves = a.halves.then(|| {
        // BOS at each chunk's start when the tokenizer put one first
        let t = &l.gguf.tokenizer;
        t.bos.filter(|&b| ids.first() == Some(&b))
    });
    let (mean_nll, n, _) = score_windows(&l.model, &ids, a.ctx, halves)?;
    let ppl = mean_nll.exp();
    if a.json {
        let mut v = serde_json::json!({ "perplexity": ppl, "n_tokens": ids.len(), "n_predictions": n, "mean_nll": mean_nll });
        prune_report(&l, dropped.as_deref(), &mut v);
        outln!("{v}");
    } else {
        outln!("perplexity {ppl:.4} (mean NLL {mean_nll:.5} over {n} predictions, {} tokens, windows of {})", ids.len(), a.ctx);
        if let Some(d) = &dropped {
            outln!("dropped: {d}");
        }
        if l.model.prune.ffn_skip.is_some() {
            outln!(
                "FFNs skipped: {:.1}%",
                100.0 * l.model.prune.stats.snapshot().share()
            );
        }
    }
    Ok(())
}

/// `dropped` and, with --ffn-skip, the share of FFNs skipped, into a JSON
/// report.
fn prune_report(l: &Loaded, dropped: Option<&str>, v: &mut serde_json::Value) {
    if let Some(d) = dropped {
        v["dropped"] = d.into();
    }
    if let Some(f) = &l.model.prune.ffn_skip {
        let c = l.model.prune.stats.snapshot();
        v["ffn_skip"] = serde_json::json!({
            "spec": f.to_string(),
            "share_skipped": c.share(),
            "skipped_per_layer": c.skipped,
            "computed_per_layer": c.computed,
        });
    }
}

#[derive(Args)]
pub struct TokenizeArgs {
    /// A GGUF file, or a Hugging Face model directory (tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    text: String,
    #[arg(long)]
    json: bool,
}

pub fn tokenize_cmd(a: TokenizeArgs) -> Result<()> {
    let ids = if a.model.is_dir() && crate::load::is_encoder_dir(&a.model) {
        // an encoder's: truncated at its max_seq_length, as it embeds
        let (tok, _) = attend::formats::hf::load_tokenizer(&a.model, 512)?;
        tok.encode(&a.text, true)?
    } else if a.model.is_dir() {
        let cfg = std::fs::read_to_string(a.model.join("config.json")).unwrap_or_default();
        let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap_or_default();
        attend::formats::hf_decoder::load_tokenizer(&a.model, &cfg)?.encode(&a.text, true)?
    } else {
        let l = gguf::load(&a.model, false, &Device::Cpu)?;
        l.tokenizer.encode(&a.text, true)?
    };
    if a.json {
        outln!("{}", serde_json::json!({ "ids": ids }));
    } else {
        outln!(
            "{}",
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct EmbedArgs {
    /// A Hugging Face sentence-transformers directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Embed this text instead of reading one text per line from stdin.
    #[arg(long)]
    text: Option<String>,
    /// Texts embedded together in one padding-free batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Print a JSON array of vectors, in input order.
    #[arg(long)]
    json: bool,
}

pub fn embed_cmd(a: EmbedArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let e = attend::formats::hf::Embedder::load(&a.model, &Device::Cpu)?;
    let texts: Vec<String> = match a.text {
        Some(t) => vec![t],
        None => std::io::stdin()
            .lock()
            .lines()
            .collect::<std::io::Result<_>>()
            .context("reading stdin")?,
    };
    let vecs = e.embed(&texts, a.batch_size)?;
    if a.json {
        outln!("{}", serde_json::to_string(&vecs)?);
    } else {
        for v in &vecs {
            outln!(
                "{}",
                v.iter()
                    .map(|x| format!("{x:.6}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct InspectArgs {
    /// A GGUF file or Hugging Face decoder folder.
    #[arg(long)]
    model: PathBuf,
}

pub fn inspect_cmd(a: InspectArgs) -> Result<()> {
    let g = if a.model.is_dir() {
        attend::formats::hf_decoder::load(&a.model, None, &Device::Cpu)?
    } else {
        gguf::load(&a.model, false, &Device::Cpu)?
    };
    outln!("{}", serde_json::to_string_pretty(&g.config)?);
    outln!("architecture: {}", g.arch.name);
    outln!("layer pattern: {}", g.config.layer_pattern());
    outln!("tensor types: {:?}", g.tensor_types);
    for (k, v) in &g.metadata {
        outln!("{k} = {v}");
    }
    Ok(())
}

/// Prompts from a JSON-lines file (`flag` names it in errors): each line
/// {"prompt": "..."} (raw text) or {"chat": "..."} (one user message under
/// the model's chat template) -> token ids, in order. `room`: the flag
/// and number of tokens generated after each prompt, which must fit in the
/// model's context with it.
pub fn read_prompts(
    l: &Loaded,
    model: &Path,
    file: &Path,
    flag: &str,
    room: (&str, usize),
) -> Result<Vec<Vec<u32>>> {
    let tok = &l.gguf.tokenizer;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("{flag} {}", file.display()))?;
    let mut prompts = vec![];
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{flag} {}: line {}", file.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(at)?;
        let ids = match (v["prompt"].as_str(), v["chat"].as_str()) {
            (Some(p), None) => tok.encode(p, true)?,
            (None, Some(c)) => {
                let template = l.gguf.chat_template.as_deref().with_context(|| {
                    format!(
                        "{}: a `chat` prompt needs a chat template, and {} has none",
                        at(),
                        model.display()
                    )
                })?;
                let name = |id: Option<u32>| {
                    id.and_then(|i| tok.inner.id_to_token(i))
                        .unwrap_or_default()
                };
                let msg = Message {
                    role: "user".into(),
                    content: c.into(),
                };
                let t = render(template, &[msg], true, &name(tok.bos), &name(tok.eos))?;
                tok.encode(&t, false)?
            }
            _ => bail!("{}: expected {{\"prompt\": …}} or {{\"chat\": …}}", at()),
        };
        if ids.is_empty() {
            bail!("{}: the prompt has no tokens", at());
        }
        let max = l.model.cfg.max_len;
        if ids.len() + room.1 > max {
            bail!(
                "{}: {} prompt tokens + {} {} pass the model's context ({max})",
                at(),
                ids.len(),
                room.0,
                room.1
            );
        }
        prompts.push(ids);
    }
    if prompts.is_empty() {
        bail!("{flag} {}: no prompts", file.display());
    }
    Ok(prompts)
}
