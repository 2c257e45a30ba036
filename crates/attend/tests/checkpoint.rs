//! Checkpoints: a round trip restores the model exactly; resuming from step N
//! reproduces the losses of an uninterrupted run; broken checkpoints give
//! clear errors.

use attend::config::{ModelConfig, PositionKind, Shape};
use attend::tasks::{MqarConfig, TaskConfig, TransductionConfig};
use attend::train::{load_model, TrainConfig, Trainer};
use candle_core::{Device, Tensor};

fn small_reverse() -> (ModelConfig, TaskConfig, TrainConfig) {
    let m = ModelConfig {
        shape: Shape::EncoderDecoder,
        d_model: 32,
        n_encoder_layers: 1,
        n_decoder_layers: 1,
        n_heads: 2,
        d_ff: 64,
        vocab_size: 12,
        max_len: 16,
        dropout: 0.1,
        ..ModelConfig::default()
    };
    let t = TaskConfig::Reverse(TransductionConfig {
        vocab: 12,
        min_len: 2,
        max_len: 6,
    });
    let c = TrainConfig {
        steps: 12,
        batch_size: 8,
        warmup: 3,
        label_smoothing: 0.1,
        seed: 5,
        n_eval: 20,
        ..TrainConfig::default()
    };
    (m, t, c)
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("attend-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    for (m, t, c) in [
        small_reverse(),
        (
            ModelConfig {
                d_model: 32,
                n_heads: 2,
                d_ff: 64,
                vocab_size: 16,
                max_len: 16,
                position: PositionKind::Rope,
                dropout: 0.1,
                ..ModelConfig::default()
            },
            TaskConfig::Mqar(MqarConfig {
                vocab: 16,
                seq_len: 16,
                n_pairs: 2,
                power_a: 0.01,
                train_mix: vec![],
                curriculum: None,
            }),
            TrainConfig {
                steps: 12,
                batch_size: 8,
                warmup: 3,
                seed: 9,
                n_eval: 20,
                ..TrainConfig::default()
            },
        ),
    ] {
        let mut full = Trainer::new(m.clone(), t.clone(), c.clone()).unwrap();
        let all: Vec<f64> = (0..12).map(|_| full.train_step().unwrap().loss).collect();
        assert!(all[11] < all[0], "training should lower the loss: {all:?}");

        let dir = tmpdir(&format!("resume-{}", t.name()));
        let mut first = Trainer::new(m, t, c).unwrap();
        let head: Vec<f64> = (0..5).map(|_| first.train_step().unwrap().loss).collect();
        first.save(&dir, serde_json::json!({})).unwrap();
        drop(first);
        let mut resumed = Trainer::resume(&dir, None).unwrap();
        assert_eq!(resumed.step, 5);
        let tail: Vec<f64> = (5..12)
            .map(|_| resumed.train_step().unwrap().loss)
            .collect();
        let joined: Vec<f64> = head.into_iter().chain(tail).collect();
        for (i, (a, b)) in all.iter().zip(&joined).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * a.abs(),
                "step {}: uninterrupted {a} vs resumed {b}",
                i + 1
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn checkpoint_round_trip_restores_the_model() {
    let (m, t, c) = small_reverse();
    let mut tr = Trainer::new(m, t, c).unwrap();
    for _ in 0..3 {
        tr.train_step().unwrap();
    }
    let dir = tmpdir("roundtrip");
    tr.save(&dir, serde_json::json!({"note": 1})).unwrap();
    let (loaded, meta) = load_model(&dir, &Device::Cpu).unwrap();
    assert_eq!(meta.step, 3);
    assert_eq!(meta.model, tr.model_cfg);
    let src = Tensor::new(&[[3u32, 4, 5, 6]], &Device::Cpu).unwrap();
    let tgt = Tensor::new(&[[1u32, 6, 5]], &Device::Cpu).unwrap();
    tr.model.set_train_seed(None);
    let a = tr
        .model
        .decode(&tgt, Some(&tr.model.encode(&src, None).unwrap()))
        .unwrap();
    let b = loaded
        .decode(&tgt, Some(&loaded.encode(&src, None).unwrap()))
        .unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    // a second save replaces the tensor files and removes the old ones
    tr.train_step().unwrap();
    tr.save(&dir, serde_json::json!({})).unwrap();
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(files.contains(&"model-00000004.safetensors".to_string()));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn broken_checkpoints_give_clear_errors() {
    let e = load_model(std::path::Path::new("/nonexistent/ckpt"), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("/nonexistent/ckpt") && e.contains("not found"),
        "{e}"
    );

    let (m, t, c) = small_reverse();
    let tr = Trainer::new(m, t, c).unwrap();
    let dir = tmpdir("broken");
    tr.save(&dir, serde_json::json!({})).unwrap();
    // a config with fewer or more decoder layers than the weights hold is
    // refused, never run with layers ignored or drawn at random
    let meta_path = dir.join("checkpoint.json");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    let layers = meta["model"]["n_decoder_layers"].as_u64().unwrap();
    let tied = meta["model"]["tie_embeddings"].as_bool().unwrap();
    let mut more = meta.clone();
    more["model"]["n_decoder_layers"] = (layers + 1).into();
    // untied: the file lacks lm_head; tied: it holds one nothing reads
    let mut flipped = meta.clone();
    flipped["model"]["tie_embeddings"] = (!tied).into();
    let flip_want = if tied { "is missing" } else { "does not use" };
    for (bad, want) in [(more, "is missing"), (flipped, flip_want)] {
        std::fs::write(&meta_path, bad.to_string()).unwrap();
        let e = load_model(&dir, &Device::Cpu).err().unwrap().to_string();
        assert!(
            e.contains("model-00000000.safetensors") && e.contains(want),
            "{e}"
        );
    }
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    load_model(&dir, &Device::Cpu).unwrap();
    let weights = dir.join("model-00000000.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_model(&dir, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("model-00000000.safetensors"), "{e}");
    std::fs::write(&weights, b"garbage").unwrap();
    let e = load_model(&dir, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("model-00000000.safetensors"), "{e}");

    std::fs::write(
        dir.join("checkpoint.json"),
        "{\"format\": \"attend-checkpoint-v1\", \"step\": ",
    )
    .unwrap();
    let e = load_model(&dir, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("checkpoint.json"), "{e}");
    std::fs::remove_file(dir.join("checkpoint.json")).unwrap();
    let e = load_model(&dir, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("checkpoint.json"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn data_parallel_shards_give_the_same_training() {
    // dropout off: shards then differ from one thread only in the order of sums
    let (m, t, c) = small_reverse();
    let m = ModelConfig { dropout: 0.0, ..m };
    let mut one = Trainer::new(m.clone(), t.clone(), c.clone()).unwrap();
    let mut two = Trainer::new(m, t, c).unwrap();
    two.shards = 3;
    for _ in 0..6 {
        let (a, b) = (one.train_step().unwrap(), two.train_step().unwrap());
        assert!(
            (a.loss - b.loss).abs() < 1e-5 * a.loss.abs(),
            "{} vs {}",
            a.loss,
            b.loss
        );
        assert!(
            (a.grad_norm - b.grad_norm).abs() < 1e-4 * a.grad_norm,
            "{} vs {}",
            a.grad_norm,
            b.grad_norm
        );
    }
}

#[test]
fn mechanism_parameters_and_buffers_survive_a_round_trip() {
    // BASED's convolution and window projections, GLA's gates and the
    // performer's fixed random features (rebuilt from the layer's name)
    let (m, t, c) = small_reverse();
    let m = ModelConfig {
        n_encoder_layers: 2,
        n_decoder_layers: 2,
        layer_mechanisms: attend::config::MechanismConfig::parse_list(
            "linear:map=performer,dim=4,m=8;based:dim=4,w=3;gla:rank=4;window:w=3",
        )
        .unwrap(),
        ..m
    };
    let mut tr = Trainer::new(m, t, c).unwrap();
    for _ in 0..3 {
        tr.train_step().unwrap();
    }
    let names: Vec<String> = tr.store.vars().into_iter().map(|(n, _)| n).collect();
    for want in [
        "conv.weight",
        "q_win.weight",
        "gate_down.weight",
        "gate_up.bias",
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(want)),
            "no {want} in {names:?}"
        );
    }
    let dir = tmpdir("mechanisms");
    tr.save(&dir, serde_json::json!({})).unwrap();
    let (loaded, meta) = load_model(&dir, &Device::Cpu).unwrap();
    assert_eq!(meta.model, tr.model_cfg);
    let src = Tensor::new(&[[3u32, 4, 5, 6, 7]], &Device::Cpu).unwrap();
    let tgt = Tensor::new(&[[1u32, 7, 6, 5]], &Device::Cpu).unwrap();
    tr.model.set_train_seed(None);
    let a = tr
        .model
        .decode(&tgt, Some(&tr.model.encode(&src, None).unwrap()))
        .unwrap();
    let b = loaded
        .decode(&tgt, Some(&loaded.encode(&src, None).unwrap()))
        .unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    std::fs::remove_dir_all(&dir).ok();
}
