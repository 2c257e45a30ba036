#!/usr/bin/env python3
"""Tiny Qwen2, Qwen3, Phi-3 and Llama 3 decoders for attend's tests.

No small real checkpoint of these families is on PyPI, so this builds one of
each with transformers (random weights from a fixed seed, 2 layers, d_model
64, a 384-token byte-level BPE vocabulary trained on tinyshakespeare with the
family's own pre-tokenizer), saves it as a Hugging Face folder (weights in
f32, bf16 or f16, so that every safetensors type is covered) and converts it
to GGUF (f32, and q8_0) with llama.cpp's convert_hf_to_gguf.py from the
vendored source. References come from PyTorch: token ids of a few texts, the logits
of every position of a prompt, and a greedy continuation.

    /tmp/stenv/bin/python scripts/make-tiny-decoders.py LLAMA_CPP_DIR [OUT]

OUT defaults to crates/attend/tests/data/tiny-decoders. Deterministic: the
same seed gives the same files.

One liberty with the converter: it names a BPE pre-tokenizer by hashing the
ids a known tokenizer gives a test string, and a vocabulary trained here has
no known hash, so its `get_vocab_base_pre` is told the family's name
(`qwen2`, `llama-bpe`) — the pre-tokenizer the tokenizer was built with.
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# the pre-tokenizer regexes of the families' tokenizer.json files
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "What's 12345 + 678? Let's see: 13023!",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "Ünïcödé — and émoji 🙂 too",
]
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"

FAMILIES = {
    # name: (config class, model class, pre-tokenizer, GGUF pre name, weight dtype)
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, QWEN2, "qwen2", torch.float32,
              dict(tie_word_embeddings=False)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, QWEN2, "qwen2", torch.bfloat16,
              dict(head_dim=32, tie_word_embeddings=True)),
    "phi3": (Phi3Config, Phi3ForCausalLM, LLAMA3, "llama-bpe", torch.float16,
             dict(tie_word_embeddings=False, original_max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "llama3": (LlamaConfig, LlamaForCausalLM, LLAMA3, "llama-bpe", torch.float32,
               dict(tie_word_embeddings=True, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # a Hugging Face folder only (llama.cpp's Gemma converter needs a
    # SentencePiece model; the real Gemma-3-270m GGUF covers that side):
    # seven layers, so that the sixth is global, with windows of 8 tokens
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, QWEN2, None, torch.bfloat16,
               dict(num_hidden_layers=7, num_key_value_heads=1, head_dim=32,
                    query_pre_attn_scalar=32, sliding_window=8)),
}


def train_tokenizer(pattern: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.read_text().splitlines(keepends=True), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that the logits are well separated (the default
    init's 0.02 leaves near-ties that a rounding difference can flip)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:  # biases
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def convert(llama: Path, folder: Path, out: Path, pre: str, outtype: str) -> None:
    """convert_hf_to_gguf.py --outtype OUTTYPE, with the pre-tokenizer named."""
    code = f"""
import sys, runpy
sys.path.insert(0, {str(llama)!r}); sys.path.insert(1, {str(llama / 'gguf-py')!r})
import conversion.base as b
b.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}
sys.argv = ['convert_hf_to_gguf.py', {str(folder)!r}, '--outtype', {outtype!r}, '--outfile', {str(out)!r}]
runpy.run_path({str(llama / 'convert_hf_to_gguf.py')!r}, run_name='__main__')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "NO_LOCAL_GGUF": "1"})
    if r.returncode != 0:
        sys.exit(f"convert_hf_to_gguf.py failed on {folder}:\n{r.stderr}")


def main() -> None:
    llama = Path(sys.argv[1]).resolve()
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "crates/attend/tests/data/tiny-decoders"
    torch.manual_seed(0)
    for seed, (name, (cfg_cls, model_cls, pattern, pre, dtype, extra)) in enumerate(FAMILIES.items()):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        tok = train_tokenizer(pattern)
        cfg = cfg_cls(**{**dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=256, rms_norm_eps=1e-6,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id), **extra})
        model = model_cls(cfg)
        init_weights(model, 100 + seed)
        # the numbers the saved type holds, computed with in f32 (weights
        # only: casting the whole model would round RoPE's frequencies too)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).to(torch.float32))
        model.eval()
        copy.deepcopy(model).to(dtype).save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        tc = json.loads((folder / "tokenizer_config.json").read_text())
        tc["tokenizer_class"] = "GPT2Tokenizer"  # the converter's Phi-3 path reads it
        (folder / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
        for junk in ["generation_config.json", "special_tokens_map.json"]:
            (folder / junk).unlink(missing_ok=True)
        # f32 (the exact weights) and q8_0 (llama.cpp's quantization, which
        # attend's --quantize q8_0 must reproduce)
        if pre is not None:
            convert(llama, folder, out / f"{name}.gguf", pre, "f32")
            convert(llama, folder, out / f"{name}-q8_0.gguf", pre, "q8_0")
        ids = tok(PROMPT)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
            seq = list(ids)
            for _ in range(16):
                nxt = model(torch.tensor([seq])).logits[0, -1].argmax().item()
                seq.append(nxt)
        ref = {
            "family": name,
            "weights": str(dtype).removeprefix("torch."),
            "texts": [{"text": t, "ids": tok(t)["input_ids"]} for t in TEXTS],
            "prompt": PROMPT,
            "prompt_ids": ids,
            "logits": [[round(float(x), 6) for x in row] for row in logits],
            "greedy": seq[len(ids):],
        }
        (folder / "reference.json").write_text(json.dumps(ref) + "\n")
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, "
              f"vocab {len(tok)}, prompt {len(ids)} tokens -> {out / name}")


if __name__ == "__main__":
    main()
