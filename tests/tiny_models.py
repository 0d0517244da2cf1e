"""Tiny random MoE checkpoints of each supported architecture, built offline for tests.

Each builder returns a transformers config; :func:`save_tiny_model` instantiates the
model from it (random weights, float32), saves it with ``save_pretrained`` together
with a word-level tokenizer trained locally with the ``tokenizers`` library, so that
``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``
load it back exactly as they would a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "the cache holds a few experts and the router picks two of them",
    "a mixture of experts model routes every token to its best experts",
    "misses cost one expert of weights read from slow flash storage",
    "consecutive tokens often reuse the experts of the previous token",
    "we replay traces through lru fifo lfu and belady caches",
    "hello world this is a tiny test of the capture command",
]

PROMPTS = [
    "the cache holds a few experts",
    "hello world",
    "a mixture of experts model routes every token to its best experts and the router picks",
    "misses cost one expert",
]

# Common tiny sizes: hidden 32, 2 attention heads, 8 experts, top-2.
_BASE = dict(
    hidden_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=256,
    initializer_range=0.2,  # decisive routing: few near-ties between expert scores
    tie_word_embeddings=False,
)


def _config(model_type: str, special: dict, **kwargs):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**_BASE, **special, **kwargs})


def tiny_configs(vocab_size: int, bos: int = 2, eos: int = 3, pad: int = 1) -> dict:
    """One tiny config per architecture, with dense layers and shared experts where the
    architecture has them. Keys are the ids used in tests."""
    special = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return {
        "mixtral": _config(
            "mixtral", special, num_hidden_layers=2, intermediate_size=32,
            num_local_experts=8, num_experts_per_tok=2),
        # layer 0 dense (mlp_only_layers), one shared expert, no top-k renormalisation
        "qwen2_moe": _config(
            "qwen2_moe", special, num_hidden_layers=3, intermediate_size=32,
            moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, mlp_only_layers=[0], decoder_sparse_step=1),
        # decoder_sparse_step=2: only layers 1 and 3 are MoE
        "qwen3_moe": _config(
            "qwen3_moe", special, num_hidden_layers=4, intermediate_size=32, head_dim=16,
            moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
            decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=True),
        "olmoe": _config(
            "olmoe", special, num_hidden_layers=2, intermediate_size=16, num_experts=8,
            num_experts_per_tok=2),
        # first dense layer, shared experts, group-limited greedy routing
        "deepseek_v2": _config(
            "deepseek_v2", special, num_hidden_layers=3, intermediate_size=32,
            moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=2, first_k_dense_replace=1, topk_method="group_limited_greedy",
            n_group=4, topk_group=2, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, head_dim=8, num_key_value_heads=2),
        # first dense layer, shared expert, sigmoid + correction bias + groups + scaling
        "deepseek_v3": _config(
            "deepseek_v3", special, num_hidden_layers=3, intermediate_size=32,
            moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
            num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
        "gpt_oss": _config(
            "gpt_oss", special, num_hidden_layers=2, intermediate_size=16, head_dim=16,
            num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                             "original_max_position_embeddings": 64}),
    }


ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")


def build_tokenizer():
    """A word-level fast tokenizer over SENTENCES with <s>/</s>/<pad>/<unk> specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>")


def save_tiny_model(arch: str, path: str | Path, *, seed: int = 0, eos_token_id: int | None = None):
    """Build a random tiny model of ``arch``, save it and a tokenizer under ``path``.

    ``eos_token_id`` overrides the generation config's EOS (tests use it to make some
    sequences finish early). Returns the path.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer()
    config = tiny_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                          tokenizer.pad_token_id)[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # make the bias matter
                buf.copy_(torch.randn_like(buf) * 0.5)
    if eos_token_id is not None:
        model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def mixtral_with_unsupported_router(vocab_size: int = 56):
    """A tiny Mixtral whose MoE blocks route through a module returning (scores, indices),
    a format capture does not support (like Llama-4's (scores, logits))."""
    import torch
    from transformers import AutoModelForCausalLM

    class ScoresAndIndicesRouter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.top_k = 2
            self.weight = torch.nn.Parameter(torch.randn(8, 32))

        def forward(self, hidden):
            scores = torch.nn.functional.linear(hidden, self.weight)
            return scores, scores.topk(2, dim=-1).indices

    class OddMoeBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = ScoresAndIndicesRouter()

        def forward(self, hidden):
            self.router(hidden.reshape(-1, hidden.shape[-1]))
            return hidden

    model = AutoModelForCausalLM.from_config(tiny_configs(vocab_size)["mixtral"])
    for layer in model.model.layers:
        layer.mlp = OddMoeBlock()
    return model


if __name__ == "__main__":  # python -m tests.tiny_models ARCH DIR: a model to try capture on
    import sys

    if len(sys.argv) != 3 or sys.argv[1] not in ARCHS:
        sys.exit(f"usage: python -m tests.tiny_models {{{','.join(ARCHS)}}} DIR")
    print(save_tiny_model(sys.argv[1], sys.argv[2]))
