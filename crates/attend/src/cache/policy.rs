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
//! A policy is bookkeeping over the one KV cache (`cache::kv`): each
//! (layer, KV head) evicts independently, as H2O and RazorAttention do, and
//! keys are rotated by their rank among the kept tokens ("positions taken
//! from the slot", as StreamingLLM does for RoPE models); with nothing
//! evicted the rank is the position, so `full` equals ordinary attention.
//! Every policy works with every KV type.

use crate::error::{Error, Result};
use std::str::FromStr;

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
    pub(crate) fn scores(&self) -> bool {
        matches!(self, KvPolicy::H2o { .. } | KvPolicy::A2sf { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::kv::KvCache;
    use crate::kernels::kv::KvDType;

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
    fn run(spec: &str, retrieval: bool, steps: &[(Vec<f32>, Vec<f32>)]) -> KvCache {
        let p = parse(spec).unwrap();
        let mut c = KvCache::with_policy(&p, KvDType::F32, 1, HD, &[retrieval]).unwrap();
        let mut out = vec![0f32; HD];
        for (q, k) in steps {
            let (mut q, mut k) = (q.clone(), k.clone());
            let v = k.clone();
            c.attend(&mut q, &mut k, &v, None, 1, &mut out).unwrap();
            if let (Some(b), false) = (p.budget(), retrieval) {
                assert!(c.head_len(0) <= b, "{spec}: {} > {b}", c.head_len(0));
            }
        }
        c
    }

    fn plain(n: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
        (0..n).map(|j| (e(0, 0.0), e(j % HD, 1.0))).collect()
    }

    #[test]
    fn recency_policies_keep_the_expected_tokens() {
        assert_eq!(run("window=3", false, &plain(7)).positions(0), [4, 5, 6]);
        assert_eq!(
            run("sinks=2,window=2", false, &plain(7)).positions(0),
            [0, 1, 5, 6]
        );
        assert_eq!(
            run("full", false, &plain(7)).positions(0),
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
        assert_eq!(c.positions(0), [0, 2, 3]);
        // A2SF forgets: t0 ≈ 0.1²·1 + 0.1·0.97 + 0.03 ≈ 0.14 < t1 ≈ 0.95 -> t0 goes
        let c = run("a2sf=1,window=2,forget=0.1", false, &heavy_sequence());
        assert_eq!(c.positions(0), [1, 2, 3]);
        // with no forgetting A2SF is H2O
        let c = run("a2sf=1,window=2,forget=1", false, &heavy_sequence());
        assert_eq!(c.positions(0), [0, 2, 3]);
    }

    #[test]
    fn razor_keeps_retrieval_heads_whole_and_compensates_the_rest() {
        // keys j·e0: the compensation key is the mean of the dropped ones
        let steps: Vec<_> = (0..5).map(|j| (e(0, 0.0), e(0, j as f32))).collect();
        let c = run("razor,sinks=1,window=1", false, &steps);
        assert_eq!(c.positions(0), [0, 4]);
        let (ks, vs, n) = c.compensation(0).unwrap();
        assert_eq!(n, 3); // t1, t2, t3 dropped
        assert_eq!(ks[0], 2.0);
        assert_eq!(vs[0], 2.0);
        assert_eq!(c.head_len(0), 3); // sink, compensation, window
        let c = run("razor,sinks=1,window=1", true, &steps);
        assert_eq!(c.positions(0), [0, 1, 2, 3, 4]);
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
