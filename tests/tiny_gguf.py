"""Tiny random MoE models as GGUF files, built offline for tests of the llama.cpp capture.

Each model is a tiny Hugging Face checkpoint of :mod:`tests.tiny_models` (the same
configs, adjusted where llama.cpp's architecture is narrower, see :data:`GGUF_ADJUST`)
saved beside a small byte-level BPE tokenizer, then converted by llama.cpp's own
``convert_hf_to_gguf.py`` from the llama-cpp-python source distribution that
``make`` keeps in ``.venv/gguf-src/`` (override with ``MOECACHE_LLAMA_CPP=<vendor/llama.cpp>``).

The converter only accepts tokenizers whose pre-tokenizer hash it knows; a locally
trained one never matches, so the conversion runs with ``get_vocab_base_pre`` answering
"gpt-2" (the byte-level GPT-2 split this tokenizer uses).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .tiny_models import SENTENCES, tiny_configs

# moecache architecture id -> llama.cpp architecture name
GGUF_ARCHS = {
    "mixtral": "llama",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "olmoe": "olmoe",
    "deepseek_v2": "deepseek2",
}

# Where llama.cpp's architecture is narrower than the Hugging Face config of tiny_models:
# qwen2moe / qwen3moe have no dense blocks (mlp_only_layers, decoder_sparse_step);
# OLMoE's k-norm spans the hidden size (KV heads = heads); DeepSeek-V2 routes greedily
# as the released V2-Lite does, and has a q_lora_rank (llama.cpp's deepseek2 reads
# the V2-Lite layout, without one, only for a model of exactly 27 blocks).
# Sizes are multiples of 32 so that q8_0 quantizes the expert tensors.
GGUF_ADJUST = {
    "mixtral": dict(intermediate_size=32),
    "qwen2_moe": dict(mlp_only_layers=[], moe_intermediate_size=32),
    "qwen3_moe": dict(decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=32),
    "olmoe": dict(num_key_value_heads=2, intermediate_size=32),
    "deepseek_v2": dict(topk_method="greedy", n_group=1, topk_group=1, moe_intermediate_size=32,
                        q_lora_rank=16),
}

# argv: vendor folder, then (model folder, out file, outtype) triples; one process for all
_CONVERT = """
import runpy, sys
vendor, jobs = sys.argv[1], sys.argv[2:]
sys.path[:0] = [vendor, vendor + "/gguf-py"]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
script = vendor + "/convert_hf_to_gguf.py"
main = runpy.run_path(script, run_name="converter")["main"]
for i in range(0, len(jobs), 3):
    sys.argv = [script, jobs[i], "--outfile", jobs[i + 1], "--outtype", jobs[i + 2]]
    main()
"""


def llama_cpp_source() -> Path:
    """llama.cpp's source folder (holding convert_hf_to_gguf.py) from the kept sdist."""
    given = os.environ.get("MOECACHE_LLAMA_CPP")
    found = [Path(given)] if given else sorted(
        Path(sys.prefix).glob("gguf-src/llama_cpp_python-*/vendor/llama.cpp"))
    for folder in found:
        if (folder / "convert_hf_to_gguf.py").is_file():
            return folder
    raise FileNotFoundError("llama.cpp converter not found: run `make test` (it keeps the "
                            "llama-cpp-python sdist in .venv/gguf-src/) or set MOECACHE_LLAMA_CPP")


def build_bpe_tokenizer():
    """A byte-level BPE fast tokenizer over SENTENCES, <s> prepended, like GPT-2's split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", add_bos_token=True)


def save_tiny_hf(arch: str, path: str | Path, *, seed: int = 0) -> Path:
    """A random tiny ``arch`` model (its GGUF-compatible config) and BPE tokenizer in ``path``."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_bpe_tokenizer()
    config = tiny_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                          tokenizer.pad_token_id)[arch]
    for key, value in GGUF_ADJUST[arch].items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def convert(jobs: list[tuple[str | Path, str | Path, str]]) -> None:
    """Convert each (Hugging Face folder, GGUF out, outtype) with llama.cpp's converter,
    all in one process (the converter's imports take most of its time)."""
    vendor = llama_cpp_source()
    args = [str(x) for job in jobs for x in job]
    done = subprocess.run([sys.executable, "-c", _CONVERT, str(vendor), *args],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"convert_hf_to_gguf failed:\n{done.stderr[-3000:]}")


if __name__ == "__main__":  # python -m tests.tiny_gguf ARCH OUT.gguf [OUTTYPE]: a GGUF to try
    import tempfile

    if len(sys.argv) not in (3, 4) or sys.argv[1] not in GGUF_ARCHS:
        sys.exit(f"usage: python -m tests.tiny_gguf {{{','.join(GGUF_ARCHS)}}} OUT.gguf [f32|q8_0|...]")
    with tempfile.TemporaryDirectory() as folder:
        convert([(save_tiny_hf(sys.argv[1], folder), sys.argv[2], (sys.argv[3:] or ["f32"])[0])])
    print(sys.argv[2])
