//! KV-cache eviction policies: what a softmax layer keeps of its past keys
//! and values when memory is capped.
//!
//! | spec | keeps | paper |
//! | --- | --- | --- |
//! | `full` | everything | — |
//! | `window=N` | the N most recent tokens | (the baseline StreamingLLM shows failing) |
//! | `sinks=S,window=N` | the first S tokens and the N most recent | StreamingLLM (Xiao et al. 2024) |
//! | `h2o=H,window=N` | the H tokens with the largest accumulated attention, and the N most recent | H2O (Zhang et al. 2023) |
//! | `a2sf=H,window=N,forget=λ` | as H2O, with the accumulated score decayed by λ each step | A2SF (Jo & Shin 2024) |
//! | `razor=F,sinks=S,window=N` | retrieval heads (the fraction F with the highest echo + induction score) keep everything; the others keep sinks, window and one compensation token, the mean of what they dropped | RazorAttention (Tang et al. 2024) |
//!
//! Instead of explicit sizes, `budget=B` splits B tokens per head the usual
//! way: `window,budget=B`, `sinks=4,budget=B` (window B−4), `h2o,budget=B`
//! (half heavy hitters, half recent), `a2sf,budget=B,forget=λ`,
//! `razor,budget=B` (4 sinks, the compensation token, the rest window).
//!
//! Each (layer, KV head) keeps its own cache (`HeadCache`), so heads evict
//! independently, as H2O and RazorAttention do. Keys are stored before RoPE
//! and rotated by their slot in the cache ("positions taken from the slot",
//! as StreamingLLM does for RoPE models); with nothing evicted the slot is
//! the position, so `full` equals ordinary attention.

use crate::error::{Error, Result};
use crate::kernels::{axpy, dot};
use rayon::prelude::*;
use std::str::FromStr;
use std::sync::Arc;

/// A parsed `--kv-policy` spec.
#[derive(Clone, Debug, PartialEq)]
pub enum KvPolicy {
    Full,
    Window {
        window: usize,
    },
    Sinks {
        sinks: usize,
        window: usize,
    },
    H2o {
        heavy: usize,
        window: usize,
    },
    A2sf {
        heavy: usize,
        window: usize,
        forget: f32,
    },
    Razor {
        /// Fraction of KV heads treated as retrieval heads.
        heads: f32,
        sinks: usize,
        window: usize,
    },
}

const NAMES: &str = "full, window, sinks, h2o, a2sf, razor";

fn bad(field: &str, msg: impl std::fmt::Display) -> Error {
    Error::config(format!("kv-policy {field}"), msg.to_string())
}

impl FromStr for KvPolicy {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        // key[=value] items; the first key names the policy unless it is a
        // size (`sinks=4,window=N` names StreamingLLM by its first field)
        let mut fields: Vec<(String, Option<String>)> = vec![];
        for item in spec.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(bad("spec", format!("`{spec}` has an empty item")));
            }
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k.trim().to_string(), Some(v.trim().to_string())),
                None => (item.to_string(), None),
            };
            if fields.iter().any(|(f, _)| *f == k) {
                return Err(bad(&k, "is given twice"));
            }
            fields.push((k, v));
        }
        let name = fields[0].0.clone();
        let allowed: &[&str] = match name.as_str() {
            "full" => &["full"],
            "window" => &["window", "budget"],
            "sinks" => &["sinks", "window", "budget"],
            "h2o" => &["h2o", "window", "budget"],
            "a2sf" => &["a2sf", "window", "budget", "forget"],
            "razor" => &["razor", "sinks", "window", "budget"],
            other => {
                return Err(bad(
                    "policy",
                    format!("unknown policy `{other}` (expected one of {NAMES})"),
                ))
            }
        };
        if let Some((f, _)) = fields.iter().find(|(f, _)| !allowed.contains(&f.as_str())) {
            return Err(bad(
                f,
                format!(
                    "is not a setting of `{name}` (it takes {})",
                    allowed.join(", ")
                ),
            ));
        }
        let get = |key: &str| {
            fields
                .iter()
                .find(|(f, _)| f == key)
                .map(|(_, v)| v.clone())
        };
        // a count: present with a non-negative integer, or absent
        let count = |key: &str| -> Result<Option<usize>> {
            match get(key) {
                None => Ok(None),
                Some(None) => Err(bad(key, "needs a number (`key=N`)")),
                Some(Some(v)) => match v.parse::<i64>() {
                    Ok(n) if n < 0 => Err(bad(key, format!("must not be negative, got {n}"))),
                    Ok(n) => Ok(Some(n as usize)),
                    Err(_) => Err(bad(key, format!("needs a whole number, got `{v}`"))),
                },
            }
        };
        let frac = |key: &str, default: f32| -> Result<f32> {
            match get(key) {
                None | Some(None) => Ok(default),
                Some(Some(v)) => match v.parse::<f32>() {
                    Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
                    Ok(x) => Err(bad(key, format!("must be in (0, 1], got {x}"))),
                    Err(_) => Err(bad(key, format!("needs a number, got `{v}`"))),
                },
            }
        };
        let budget = count("budget")?;
        if budget == Some(0) {
            return Err(bad("budget", "must be at least 1"));
        }
        let named = |key: &str| -> Result<Option<usize>> {
            match get(key) {
                Some(None) => Ok(None), // bare name: sizes from the budget
                _ => count(key),
            }
        };
        // the recent window: explicit, or what the budget leaves after `fixed`
        let window = |fixed: usize| -> Result<usize> {
            let w = match (named("window")?, budget) {
                (Some(w), Some(b)) if w + fixed > b => {
                    return Err(bad(
                        "window",
                        format!(
                        "({w}) is larger than the budget ({b}) allows after {fixed} other tokens"
                    ),
                    ))
                }
                (Some(w), _) => w,
                (None, Some(b)) if b > fixed => b - fixed,
                (None, Some(b)) => {
                    return Err(bad(
                        "budget",
                        format!("({b}) leaves no room for a window after {fixed} other tokens"),
                    ))
                }
                (None, None) => {
                    return Err(bad("window", "is missing (give window=N or budget=B)"))
                }
            };
            if w == 0 {
                return Err(bad("window", "must be at least 1"));
            }
            Ok(w)
        };
        Ok(match name.as_str() {
            "full" => KvPolicy::Full,
            "window" => KvPolicy::Window { window: window(0)? },
            "sinks" => {
                let sinks =
                    count("sinks")?.ok_or_else(|| bad("sinks", "needs a number (`sinks=S`)"))?;
                KvPolicy::Sinks {
                    sinks,
                    window: window(sinks)?,
                }
            }
            "h2o" | "a2sf" => {
                let heavy = match (named(&name)?, budget, count("window")?) {
                    (Some(h), _, _) => h,
                    (None, Some(b), Some(w)) => b.saturating_sub(w),
                    (None, Some(b), None) => b / 2,
                    (None, None, _) => {
                        return Err(bad(
                            &name,
                            format!("needs a number (`{name}=H`) or budget=B"),
                        ))
                    }
                };
                let window = window(heavy)?;
                if name == "h2o" {
                    KvPolicy::H2o { heavy, window }
                } else {
                    KvPolicy::A2sf {
                        heavy,
                        window,
                        forget: frac("forget", 0.9)?,
                    }
                }
            }
            _ => {
                let heads = match get("razor") {
                    Some(Some(_)) => frac("razor", 0.15)?,
                    _ => 0.15,
                };
                let sinks = count("sinks")?.unwrap_or(4);
                KvPolicy::Razor {
                    heads,
                    sinks,
                    window: window(sinks + 1)?,
                }
            }
        })
    }
}

impl std::fmt::Display for KvPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvPolicy::Full => write!(f, "full"),
            KvPolicy::Window { window } => write!(f, "window={window}"),
            KvPolicy::Sinks { sinks, window } => write!(f, "sinks={sinks},window={window}"),
            KvPolicy::H2o { heavy, window } => write!(f, "h2o={heavy},window={window}"),
            KvPolicy::A2sf {
                heavy,
                window,
                forget,
            } => write!(f, "a2sf={heavy},window={window},forget={forget}"),
            KvPolicy::Razor {
                heads,
                sinks,
                window,
            } => write!(f, "razor={heads},sinks={sinks},window={window}"),
        }
    }
}

impl KvPolicy {
    /// Tokens a (non-retrieval) head may hold; None = unbounded.
    pub fn budget(&self) -> Option<usize> {
        match *self {
            KvPolicy::Full => None,
            KvPolicy::Window { window } => Some(window),
            KvPolicy::Sinks { sinks, window } => Some(sinks + window),
            KvPolicy::H2o { heavy, window } | KvPolicy::A2sf { heavy, window, .. } => {
                Some(heavy + window)
            }
            // sinks, the compensation token, the window
            KvPolicy::Razor { sinks, window, .. } => Some(sinks + 1 + window),
        }
    }

    /// Whether the policy needs each token's attention accumulated.
    fn scores(&self) -> bool {
        matches!(self, KvPolicy::H2o { .. } | KvPolicy::A2sf { .. })
    }
}

pub use crate::kernels::rope::RopeTables;

/// One KV head's cache under a policy. Storage slots are reused after an
/// eviction; `order` lists the occupied slots oldest first, and a token's
/// rank in it is its position for RoPE.
#[derive(Clone, Debug, Default)]
pub struct HeadCache {
    /// Keys before RoPE, values: (slots, head_dim).
    k: Vec<f32>,
    v: Vec<f32>,
    /// Keys rotated to `rot_rank` (reused while a slot's rank is unchanged).
    rot: Vec<f32>,
    rot_rank: Vec<u32>,
    /// Accumulated attention per slot (H2O, A2SF).
    score: Vec<f32>,
    /// Absolute position per slot (for reports and tests).
    pos: Vec<u32>,
    order: Vec<u32>,
    free: Vec<u32>,
    /// RazorAttention's compensation token: sums of dropped keys/values.
    comp: Option<(Vec<f32>, Vec<f32>, usize)>,
    /// A retrieval head (RazorAttention): never evicts.
    pub retrieval: bool,
}

impl HeadCache {
    /// Tokens held (the compensation token counts as one).
    pub fn len(&self) -> usize {
        self.order.len() + usize::from(self.comp.as_ref().is_some_and(|c| c.2 > 0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Absolute positions of the tokens held, oldest first.
    pub fn positions(&self) -> Vec<usize> {
        self.order
            .iter()
            .map(|&s| self.pos[s as usize] as usize)
            .collect()
    }

    /// Bytes held by the buffers (allocated capacity).
    pub fn state_bytes(&self) -> usize {
        4 * (self.k.capacity() + self.v.capacity() + self.rot.capacity())
            + 4 * (self.rot_rank.capacity() + self.score.capacity() + self.pos.capacity())
            + 4 * (self.order.capacity() + self.free.capacity())
            + self
                .comp
                .as_ref()
                .map_or(0, |c| 4 * (c.0.capacity() + c.1.capacity()))
    }

    fn insert(&mut self, k: &[f32], v: &[f32], pos: usize) {
        let hd = k.len();
        let slot = match self.free.pop() {
            Some(s) => {
                let s = s as usize;
                self.k[s * hd..][..hd].copy_from_slice(k);
                self.v[s * hd..][..hd].copy_from_slice(v);
                self.rot_rank[s] = u32::MAX;
                self.score[s] = 0.0;
                self.pos[s] = pos as u32;
                s
            }
            None => {
                self.k.extend_from_slice(k);
                self.v.extend_from_slice(v);
                self.rot.extend_from_slice(k);
                self.rot_rank.push(u32::MAX);
                self.score.push(0.0);
                self.pos.push(pos as u32);
                self.pos.len() - 1
            }
        };
        self.order.push(slot as u32);
    }

    /// Drop the token at rank `r` (index into `order`).
    fn evict(&mut self, r: usize, hd: usize) {
        let s = self.order.remove(r);
        if let Some((ks, vs, n)) = &mut self.comp {
            let s = s as usize;
            for (a, &b) in ks.iter_mut().zip(&self.k[s * hd..][..hd]) {
                *a += b;
            }
            for (a, &b) in vs.iter_mut().zip(&self.v[s * hd..][..hd]) {
                *a += b;
            }
            *n += 1;
        }
        self.free.push(s);
    }

    /// Evict down to the policy's budget; the newest token always stays.
    fn enforce(&mut self, policy: &KvPolicy, hd: usize) {
        if self.retrieval {
            return;
        }
        let Some(budget) = policy.budget() else {
            return;
        };
        while self.len() > budget {
            let r = match *policy {
                KvPolicy::Full => unreachable!("full has no budget"),
                KvPolicy::Window { .. } => 0,
                KvPolicy::Sinks { sinks, .. } | KvPolicy::Razor { sinks, .. } => sinks,
                KvPolicy::H2o { window, .. } | KvPolicy::A2sf { window, .. } => {
                    // the lowest accumulated score outside the recent window
                    let old = self.order.len() - window;
                    (0..old)
                        .min_by(|&a, &b| {
                            let (sa, sb) = (
                                self.score[self.order[a] as usize],
                                self.score[self.order[b] as usize],
                            );
                            sa.total_cmp(&sb).then(a.cmp(&b))
                        })
                        .expect("a full cache has tokens outside the window")
                }
            };
            self.evict(r, hd);
        }
    }

    /// The keys and values attention reads, oldest first, with RoPE applied
    /// at their rank: (n, hd) each. The compensation token sits after the
    /// sinks.
    fn prepare(&mut self, rope: Option<&RopeTables>, sinks: usize, hd: usize) -> Vec<u32> {
        // ranks: sinks, [compensation], the rest
        let comp = self.comp.as_ref().is_some_and(|c| c.2 > 0);
        let mut slots = Vec::with_capacity(self.len());
        for (i, &s) in self.order.iter().enumerate() {
            let rank = if comp && i >= sinks { i + 1 } else { i };
            let su = s as usize;
            if self.rot_rank[su] != rank as u32 {
                let (src, dst) = (&self.k[su * hd..][..hd], &mut self.rot[su * hd..][..hd]);
                dst.copy_from_slice(src);
                if let Some(r) = rope {
                    r.rotate(dst, rank);
                }
                self.rot_rank[su] = rank as u32;
            }
            slots.push(s);
        }
        slots
    }
}

/// The caches of one layer: one `HeadCache` per KV head.
#[derive(Clone, Debug)]
pub struct PolicyCache {
    pub policy: KvPolicy,
    pub heads: Vec<HeadCache>,
    hd: usize,
    rope: Option<Arc<RopeTables>>,
    /// Tokens seen.
    pub seen: usize,
    /// Attention of each query head over the cache at the last step, in the
    /// cache's order (kept only when `record` is set: the retrieval-head probe).
    pub record: bool,
    pub last_probs: Vec<Vec<f32>>,
}

impl PolicyCache {
    /// `retrieval[g]`: KV head g keeps its full cache (RazorAttention).
    pub fn new(
        policy: &KvPolicy,
        n_kv_heads: usize,
        head_dim: usize,
        rope: Option<Arc<RopeTables>>,
        retrieval: &[bool],
    ) -> Self {
        let heads = (0..n_kv_heads)
            .map(|g| {
                let razor = matches!(policy, KvPolicy::Razor { .. });
                let mut c = HeadCache {
                    // only RazorAttention spares retrieval heads
                    retrieval: razor && retrieval.get(g).copied().unwrap_or(false),
                    comp: matches!(policy, KvPolicy::Razor { .. })
                        .then(|| (vec![0f32; head_dim], vec![0f32; head_dim], 0)),
                    ..Default::default()
                };
                if let (Some(b), false) = (policy.budget(), c.retrieval) {
                    // a capped head holds at most budget + 1 tokens (the
                    // newest is inserted before the eviction): allocate once
                    let n = b + 1;
                    c.k.reserve_exact(n * head_dim);
                    c.v.reserve_exact(n * head_dim);
                    c.rot.reserve_exact(n * head_dim);
                    c.rot_rank.reserve_exact(n);
                    c.score.reserve_exact(n);
                    c.pos.reserve_exact(n);
                    c.order.reserve_exact(n);
                    c.free.reserve_exact(n);
                }
                c
            })
            .collect();
        Self {
            policy: policy.clone(),
            heads,
            hd: head_dim,
            rope,
            seen: 0,
            record: false,
            last_probs: vec![],
        }
    }

    /// Most tokens any head holds.
    pub fn max_len(&self) -> usize {
        self.heads.iter().map(|h| h.len()).max().unwrap_or(0)
    }

    pub fn state_bytes(&self) -> usize {
        self.heads.iter().map(|h| h.state_bytes()).sum()
    }

    /// One token: q (h, hd), k and v (h_kv, hd), all before RoPE -> out
    /// (h, hd). Inserts the token, evicts to the budget, attends over what
    /// is kept, and accumulates the attention scores the policy uses.
    pub fn step(&mut self, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) -> Result<()> {
        let hd = self.hd;
        let h_kv = self.heads.len();
        let h = q.len() / hd;
        let group = h / h_kv;
        let pos = self.seen;
        let sinks = match self.policy {
            KvPolicy::Sinks { sinks, .. } | KvPolicy::Razor { sinks, .. } => sinks,
            _ => 0,
        };
        let (policy, rope) = (&self.policy, self.rope.as_deref());
        // 1. per KV head: insert, evict, rotate keys whose rank changed
        let slots: Vec<Vec<u32>> = self
            .heads
            .par_iter_mut()
            .enumerate()
            .map(|(g, c)| {
                c.insert(&k[g * hd..][..hd], &v[g * hd..][..hd], pos);
                c.enforce(policy, hd);
                if let Some(r) = rope.filter(|r| c.len() > r.max_len) {
                    return Err(Error::msg(format!(
                        "the KV cache holds {} tokens, more than the model's context of {} \
                         (cap it with a policy, e.g. sinks=4,window=1020)",
                        c.len(),
                        r.max_len
                    )));
                }
                Ok(c.prepare(rope, sinks, hd))
            })
            .collect::<Result<_>>()?;
        // 2. per query head: softmax attention over the kept tokens
        let scale = 1.0 / (hd as f32).sqrt();
        let heads = &self.heads;
        let probs: Vec<Vec<f32>> = out
            .par_chunks_mut(hd)
            .enumerate()
            .map(|(qh, o)| {
                let g = qh / group;
                let c = &heads[g];
                let mut qv = q[qh * hd..][..hd].to_vec();
                let comp = c.comp.as_ref().filter(|c| c.2 > 0);
                let n = slots[g].len() + usize::from(comp.is_some());
                if let Some(r) = rope {
                    r.rotate(&mut qv, n - 1);
                }
                // the compensation token: mean dropped key (rotated to its
                // rank, after the sinks) and value
                let comp_kv = comp.map(|(ks, vs, cnt)| {
                    let mut kc: Vec<f32> = ks.iter().map(|x| x / *cnt as f32).collect();
                    if let Some(r) = rope {
                        r.rotate(&mut kc, sinks.min(slots[g].len()));
                    }
                    (kc, vs.iter().map(|x| x / *cnt as f32).collect::<Vec<f32>>())
                });
                let key = |i: usize| -> &[f32] { &c.rot[slots[g][i] as usize * hd..][..hd] };
                let mut s: Vec<f32> = (0..slots[g].len())
                    .map(|i| dot(&qv, key(i)) * scale)
                    .collect();
                let comp_score = comp_kv.as_ref().map(|(kc, _)| dot(&qv, kc) * scale);
                let max = s
                    .iter()
                    .chain(comp_score.iter())
                    .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut z = 0f32;
                for x in s.iter_mut() {
                    *x = (*x - max).exp();
                    z += *x;
                }
                let pc = comp_score.map(|x| (x - max).exp());
                z += pc.unwrap_or(0.0);
                // (the fused path's order of operations, so that `full`
                // reproduces it bit for bit)
                o.fill(0.0);
                for (i, &p) in s.iter().enumerate() {
                    axpy(o, p, &c.v[slots[g][i] as usize * hd..][..hd]);
                }
                if let (Some(pc), Some((_, vc))) = (pc, &comp_kv) {
                    axpy(o, pc, vc);
                }
                for a in o.iter_mut() {
                    *a /= z;
                }
                for p in s.iter_mut() {
                    *p /= z;
                }
                s
            })
            .collect();
        // 3. accumulate attention (summed over the group's query heads)
        if policy.scores() {
            let forget = match *policy {
                KvPolicy::A2sf { forget, .. } => forget,
                _ => 1.0,
            };
            for (g, c) in self.heads.iter_mut().enumerate() {
                for (i, &s) in slots[g].iter().enumerate() {
                    let p: f32 = (0..group).map(|j| probs[g * group + j][i]).sum();
                    let sc = &mut c.score[s as usize];
                    *sc = forget * *sc + p;
                }
            }
        }
        if self.record {
            self.last_probs = probs;
        }
        self.seen += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<KvPolicy> {
        s.parse()
    }

    #[test]
    fn specs_parse() {
        assert_eq!(parse("full").unwrap(), KvPolicy::Full);
        assert_eq!(parse("window=64").unwrap(), KvPolicy::Window { window: 64 });
        assert_eq!(
            parse("window,budget=32").unwrap(),
            KvPolicy::Window { window: 32 }
        );
        assert_eq!(
            parse("sinks=4,window=60").unwrap(),
            KvPolicy::Sinks {
                sinks: 4,
                window: 60
            }
        );
        assert_eq!(
            parse("sinks=4,budget=64").unwrap(),
            KvPolicy::Sinks {
                sinks: 4,
                window: 60
            }
        );
        assert_eq!(
            parse("h2o=10,window=20").unwrap(),
            KvPolicy::H2o {
                heavy: 10,
                window: 20
            }
        );
        assert_eq!(
            parse("h2o,budget=64").unwrap(),
            KvPolicy::H2o {
                heavy: 32,
                window: 32
            }
        );
        assert_eq!(
            parse("a2sf=8,window=8,forget=0.5").unwrap(),
            KvPolicy::A2sf {
                heavy: 8,
                window: 8,
                forget: 0.5
            }
        );
        assert_eq!(
            parse("razor,budget=64").unwrap(),
            KvPolicy::Razor {
                heads: 0.15,
                sinks: 4,
                window: 59
            }
        );
        for p in [
            "sinks=4,window=60",
            "h2o=10,window=20",
            "a2sf=8,window=8,forget=0.5",
            "razor=0.25,sinks=2,window=9",
        ] {
            assert_eq!(
                parse(&parse(p).unwrap().to_string()).unwrap(),
                parse(p).unwrap()
            );
        }
    }

    const HD: usize = 8;

    fn e(i: usize, scale: f32) -> Vec<f32> {
        let mut v = vec![0f32; HD];
        v[i] = scale;
        v
    }

    /// One head, no RoPE: feed (q, k) pairs (v = k), return the cache.
    fn run(spec: &str, retrieval: bool, steps: &[(Vec<f32>, Vec<f32>)]) -> PolicyCache {
        let mut c = PolicyCache::new(&parse(spec).unwrap(), 1, HD, None, &[retrieval]);
        let mut out = vec![0f32; HD];
        for (q, k) in steps {
            c.step(q, k, k, &mut out).unwrap();
            if let (Some(b), false) = (c.policy.budget(), retrieval) {
                assert!(c.heads[0].len() <= b, "{spec}: {} > {b}", c.heads[0].len());
            }
        }
        c
    }

    fn plain(n: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
        (0..n).map(|j| (e(0, 0.0), e(j % HD, 1.0))).collect()
    }

    #[test]
    fn recency_policies_keep_the_expected_tokens() {
        assert_eq!(
            run("window=3", false, &plain(7)).heads[0].positions(),
            [4, 5, 6]
        );
        assert_eq!(
            run("sinks=2,window=2", false, &plain(7)).heads[0].positions(),
            [0, 1, 5, 6]
        );
        assert_eq!(
            run("full", false, &plain(7)).heads[0].positions(),
            [0, 1, 2, 3, 4, 5, 6]
        );
    }

    /// t0 is attended strongly early, t1 later, then the cache overflows:
    /// accumulated attention keeps t0, forgetting keeps t1.
    fn heavy_sequence() -> Vec<(Vec<f32>, Vec<f32>)> {
        vec![
            (e(0, 0.0), e(0, 1.0)),  // t0: p(t0) = 1
            (e(0, 10.0), e(1, 1.0)), // t1: the query looks at t0 (p ≈ 0.97)
            (e(1, 10.0), e(2, 1.0)), // t2: the query looks at t1 (p ≈ 0.94)
            (e(0, 0.0), e(3, 1.0)),  // t3: uniform; the cache overflows
        ]
    }

    #[test]
    fn heavy_hitters_follow_accumulated_attention() {
        // scores before t3 (H2O): t0 ≈ 2.0, t1 ≈ 0.97 -> t1 is evicted
        let c = run("h2o=1,window=2", false, &heavy_sequence());
        assert_eq!(c.heads[0].positions(), [0, 2, 3]);
        // A2SF forgets: t0 ≈ 0.1²·1 + 0.1·0.97 + 0.03 ≈ 0.14 < t1 ≈ 0.95 -> t0 goes
        let c = run("a2sf=1,window=2,forget=0.1", false, &heavy_sequence());
        assert_eq!(c.heads[0].positions(), [1, 2, 3]);
        // with no forgetting A2SF is H2O
        let c = run("a2sf=1,window=2,forget=1", false, &heavy_sequence());
        assert_eq!(c.heads[0].positions(), [0, 2, 3]);
    }

    #[test]
    fn razor_keeps_retrieval_heads_whole_and_compensates_the_rest() {
        // keys j·e0: the compensation key is the mean of the dropped ones
        let steps: Vec<_> = (0..5).map(|j| (e(0, 0.0), e(0, j as f32))).collect();
        let c = run("razor,sinks=1,window=1", false, &steps);
        let h = &c.heads[0];
        assert_eq!(h.positions(), [0, 4]);
        let (ks, vs, n) = h.comp.as_ref().unwrap();
        assert_eq!(*n, 3); // t1, t2, t3 dropped
        assert_eq!(ks[0] / *n as f32, 2.0);
        assert_eq!(vs[0] / *n as f32, 2.0);
        assert_eq!(h.len(), 3); // sink, compensation, window
        let c = run("razor,sinks=1,window=1", true, &steps);
        assert_eq!(c.heads[0].positions(), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn bad_specs_name_the_field() {
        for (spec, field) in [
            ("lru=4", "policy"),
            ("window", "window"),
            ("window=", "window"),
            ("window=-3", "window"),
            ("window=0", "window"),
            ("window=x", "window"),
            ("sinks=4", "window"),
            ("sinks=-1,window=4", "sinks"),
            ("sinks=4,window=100,budget=64", "window"),
            ("h2o=10", "window"),
            ("h2o=10,window=60,budget=64", "window"),
            ("a2sf=4,window=4,forget=1.5", "forget"),
            ("full,window=3", "window"),
            ("window=4,window=5", "window"),
            ("", "spec"),
        ] {
            let e = parse(spec).unwrap_err().to_string();
            assert!(e.contains(&format!("kv-policy {field}")), "{spec}: {e}");
        }
    }
}
