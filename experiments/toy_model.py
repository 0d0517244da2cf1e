"""Train a small OLMoE-style MoE language model from scratch on CPU (``make toy-model``).

Corpus: the ``.py`` files of the running Python's standard library (``sysconfig``
stdlib path; test suites, ``site-packages`` and ``idlelib`` left out), in sorted path
order, or any UTF-8 text file given with ``--corpus`` (cut into documents of about
4,000 characters at line breaks). Every ``--heldout-every``-th document is held out,
so held-out text comes from separate files: the first ``--max-heldout-chars`` of it are
the test split, the next as many the validation split (for choosing settings). Only the
first ``--max-train-chars`` of training text are used. Written to ``--data-dir``:
``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` (one ``{"text": ...}`` document a
line, the format of ``moecache.remoe.data``) and ``test_prompts.jsonl`` (test token blocks
decoded back to text, the prompts of the forward-mode captures).

Tokenizer: byte-level BPE (``tokenizers``) trained on the training split, vocabulary
``--vocab`` (default 4096), ``<|endoftext|>`` as BOS/EOS, ``<pad>``.

Model (``--arch``): OLMoE by default (4 layers, hidden 128, 32 fine-grained experts of
width 128, top-4, 4 heads), or the same sizes as Qwen2-MoE (a gated shared expert) or
DeepSeek-V3 (first layer dense, a shared expert, latent attention, sigmoid scores with a
correction bias, group-limited routing): :func:`build_model`. Trained with its normal
LM loss plus the architecture's own load balancing (OLMoE and Qwen2-MoE: the auxiliary
loss, ``router_aux_loss_coef`` 0.01; DeepSeek-V3: its loss-free bias update,
:class:`BiasBalancer`; it is a baseline model, pretrained the way its architecture was),
AdamW, linear warm-up then cosine decay, packed blocks of ``--seq-len`` tokens. Seeded;
``save_pretrained`` + tokenizer to ``--out`` with ``output_router_logits`` off. Prints
the test perplexity at the end and
writes ``toy_train.json`` (settings, time, losses) beside the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moecache.remoe import load_texts, pack_blocks

SKIP_PARTS = {"test", "tests", "site-packages", "idlelib", "__pycache__", "dist-packages"}
EOS = "<|endoftext|>"
PAD = "<pad>"


def number(kind: type, low: float, *, above: bool = False, many: bool = False):
    """An argparse type: a finite ``kind`` >= ``low`` (> ``low`` with ``above``), or with
    ``many`` a comma-separated list of them; anything else is argparse's one-line error."""
    def one(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            bound = ">" if above else ">="
            raise argparse.ArgumentTypeError(f"must be a finite number {bound} {low}, got {text}")
        return value

    def parse(text: str):
        return [one(part) for part in text.split(",")] if many else one(text)
    return parse


def as_command(main, argv: list[str] | None = None) -> None:
    """``main(argv)`` as a command: a MoecacheError, an OSError (a path whose parent is a
    file, a full disk) or a corpus that is not UTF-8 is one line on stderr and exit status
    2, not a traceback."""
    from moecache.errors import MoecacheError

    try:
        main(argv)
    except (MoecacheError, OSError, UnicodeDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def refuse_existing(paths: list[Path], force: bool) -> None:
    """Exit 2, in one line, if any of ``paths`` exists and ``force`` is not given: what a
    user made is never replaced silently."""
    existing = [path for path in paths if path.exists()]
    if existing and not force:
        print(f"error: {existing[0]} exists: pass --force to replace it", file=sys.stderr)
        sys.exit(2)


def stdlib_documents() -> list[str]:
    """The stdlib ``.py`` sources (sorted relative paths), one document per file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if SKIP_PARTS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(text)
    return docs


def file_documents(path: Path, size: int = 4000) -> list[str]:
    """A text file cut into documents of about ``size`` characters at line breaks."""
    docs, current = [], []
    length = 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        current.append(line)
        length += len(line)
        if length >= size:
            docs.append("".join(current))
            current, length = [], 0
    if "".join(current).strip():
        docs.append("".join(current))
    return docs


def split(docs: list[str], every: int, max_train: int, max_heldout: int
          ) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, test): every ``every``-th document held out, its first
    ``max_heldout`` characters the test split and the next as many the validation split
    (whole documents, each split until its budget is reached); the others train, cut at
    ``max_train`` characters."""
    train: list[str] = []
    validation: list[str] = []
    test: list[str] = []
    for number, doc in enumerate(docs):
        if number % every != every - 1:
            targets = [(train, max_train)]
        else:
            targets = [(test, max_heldout), (validation, max_heldout)]
        for target, budget in targets:
            if sum(map(len, target)) < budget:
                target.append(doc)
                break
    return train, validation, test


def write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for text in texts:
            out.write(json.dumps({"text": text}) + "\n")


def build_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)


ARCHS = ("olmoe", "qwen2_moe", "deepseek_v3")
BIAS_RATE = 1e-3  # DeepSeek-V3's bias update speed (its paper's gamma)


def build_model(tokenizer, args):
    """A model of ``args.arch`` with ``args.experts`` routed experts of width
    ``args.expert_width``, top-``args.top_k``, in every layer: OLMoE (softmax router, no
    shared expert); Qwen2-MoE (softmax router and one gated shared expert 4x as wide);
    DeepSeek-V3 (the first layer dense, one shared expert, multi-head latent attention,
    sigmoid scores with a correction bias, group-limited: 4 groups, top 2)."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config, OlmoeConfig, Qwen2MoeConfig

    common = dict(vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.heads,
                  num_experts_per_tok=args.top_k, max_position_embeddings=1024, output_router_logits=False,
                  tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if args.arch == "olmoe":
        config = OlmoeConfig(intermediate_size=args.expert_width, num_experts=args.experts,
                             router_aux_loss_coef=args.aux_coef, **common)
    elif args.arch == "qwen2_moe":
        width = args.expert_width
        config = Qwen2MoeConfig(intermediate_size=4 * width, moe_intermediate_size=width,
                                shared_expert_intermediate_size=4 * width, num_experts=args.experts,
                                decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False,
                                router_aux_loss_coef=args.aux_coef, **common)
    else:
        head = args.hidden // args.heads
        width = args.expert_width
        config = DeepseekV3Config(intermediate_size=4 * width, moe_intermediate_size=width,
                                  n_routed_experts=args.experts, n_shared_experts=1, first_k_dense_replace=1,
                                  n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                                  q_lora_rank=None, kv_lora_rank=2 * head, qk_rope_head_dim=head // 2,
                                  qk_nope_head_dim=head // 2, v_head_dim=head, head_dim=head // 2,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e4}, **common)
    return AutoModelForCausalLM.from_config(config, experts_implementation=args.experts_impl)


class BiasBalancer:
    """DeepSeek-V3's auxiliary-loss-free load balancing: after each optimiser step, each
    MoE layer's score correction bias moves by ``rate`` toward the experts that step
    loaded less than the mean (``+rate``) and away from those it loaded more (``-rate``)."""

    def __init__(self, model, rate: float = BIAS_RATE) -> None:
        from moecache.capture.routers import find_routers, parse_router_output

        self.rate, self.loads, self.handles = rate, [], []
        for site in find_routers(model, probe_token=0).sites:
            bias = site.module.e_score_correction_bias
            load = torch.zeros_like(bias)

            def hook(_module, _args, output, load=load):
                route = parse_router_output(output)
                load += torch.bincount(route.indices.reshape(-1), minlength=load.numel()).to(load.dtype)
            self.handles.append(site.module.register_forward_hook(hook))
            self.loads.append((bias, load))

    @torch.no_grad()
    def step(self) -> None:
        for bias, load in self.loads:
            bias += self.rate * torch.sign(load.mean() - load)
            load.zero_()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def perplexity(model, blocks: np.ndarray, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over packed blocks (n, T), teacher-forced."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.as_tensor(blocks[start:start + batch_size])
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += float(loss) * n
        count += n
    return math.exp(total / count)


def split_blocks(tokenizer, data_dir: Path, name: str, seq_len: int, max_blocks: int) -> np.ndarray:
    """Packed blocks (n, seq_len) of split ``name`` (validation, test) of ``data_dir``."""
    return pack_blocks(tokenizer, load_texts(data_dir / f"{name}.jsonl"), seq_len, max_blocks=max_blocks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", type=Path, default=Path("models/toy-moe"))
    add("--data-dir", type=Path, default=Path("models/toy-data"))
    add("--corpus", type=Path, help="a UTF-8 text file instead of the Python stdlib sources")
    add("--max-train-chars", type=number(int, 1), default=2_000_000)
    add("--max-heldout-chars", type=number(int, 1), default=200_000,
        help="per held-out split (test, validation)")
    add("--heldout-every", type=number(int, 2), default=20)
    add("--vocab", type=number(int, 2), default=4096)
    add("--arch", choices=ARCHS, default="olmoe", help="the MoE architecture (see build_model)")
    add("--layers", type=number(int, 1), default=4)
    add("--hidden", type=number(int, 1), default=128)
    add("--heads", type=number(int, 1), default=4)
    add("--experts", type=number(int, 1), default=32)
    add("--top-k", type=number(int, 1), default=4)
    add("--expert-width", type=number(int, 1), default=128)
    add("--aux-coef", type=number(float, 0), default=0.01,
        help="load-balancing loss weight (0: off); deepseek_v3 balances by its correction bias instead")
    add("--steps", type=number(int, 1), default=240)
    add("--batch-size", type=number(int, 1), default=16)
    add("--seq-len", type=number(int, 2), default=128)
    add("--lr", type=number(float, 0, above=True), default=4e-3)
    add("--warmup", type=number(int, 1), default=20)
    add("--eval-blocks", type=number(int, 1), default=64, help="test blocks of 256 tokens for perplexity")
    add("--prompts", type=number(int, 1), default=32, help="test prompts of 256 tokens for captures")
    add("--threads", type=number(int, 1), default=2)
    add("--experts-impl", default="grouped_mm", help="transformers experts implementation")
    add("--seed", type=number(int, 0), default=0)
    add("--force", action="store_true", help="replace a model already in --out and the splits in --data-dir")
    args = parser.parse_args(argv)
    if args.experts < args.top_k or args.hidden % args.heads:
        parser.error("--top-k must be at most --experts, and --hidden a multiple of --heads")
    splits = [args.data_dir / f"{name}.jsonl" for name in ("train", "validation", "test", "test_prompts")]
    refuse_existing([args.out / "config.json", *splits], args.force)
    args.out.mkdir(parents=True, exist_ok=True)  # a path that cannot be written: said before training

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    docs = file_documents(args.corpus) if args.corpus else stdlib_documents()
    train, validation, test = split(docs, args.heldout_every, args.max_train_chars, args.max_heldout_chars)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    for name, texts in (("train", train), ("validation", validation), ("test", test)):
        write_jsonl(args.data_dir / f"{name}.jsonl", texts)
    tokenizer = build_tokenizer(train, args.vocab)
    blocks = pack_blocks(tokenizer, train, args.seq_len)
    held = split_blocks(tokenizer, args.data_dir, "test", 256, args.eval_blocks)
    prompts = split_blocks(tokenizer, args.data_dir, "test", 256, args.prompts)
    write_jsonl(args.data_dir / "test_prompts.jsonl", [tokenizer.decode(b) for b in prompts])
    print(f"corpus: {len(train)} train / {len(validation)} validation / {len(test)} test documents, "
          f"{blocks.size:,} train tokens ({len(blocks)} blocks of {args.seq_len}), {held.size:,} test tokens "
          f"for perplexity; tokenizer {time.perf_counter() - started:.0f}s")

    model = build_model(tokenizer, args)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.arch} {args.layers} layers, hidden {args.hidden}, {args.experts} experts "
          f"top-{args.top_k}, {params / 1e6:.2f}M parameters")
    balancer = BiasBalancer(model) if args.arch == "deepseek_v3" else None
    aux = args.aux_coef > 0 and balancer is None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(blocks))
    model.train()
    history, t0 = [], time.perf_counter()
    bar = tqdm(range(args.steps), desc="toy-moe pretrain", unit="step", dynamic_ncols=True)
    for step in bar:
        pick = order[(np.arange(args.batch_size) + step * args.batch_size) % len(order)]
        ids = torch.as_tensor(blocks[pick])
        extra = {"output_router_logits": True} if aux else {}
        out = model(input_ids=ids, labels=ids, use_cache=False, **extra)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if balancer is not None:
            balancer.step()
        aux_loss = 0.0 if getattr(out, "aux_loss", None) is None else out.aux_loss.item()
        lm = out.loss.item() - (args.aux_coef * aux_loss if aux else 0.0)
        if step % 10 == 0 or step == args.steps - 1:
            history.append(dict(step=step, lm=lm, aux=aux_loss, lr=sched.get_last_lr()[0]))
            bar.set_postfix(lm=f"{lm:.3f}", aux=f"{aux_loss:.3f}")
    train_s = time.perf_counter() - t0
    if balancer is not None:
        balancer.close()
    ppl = perplexity(model, held)
    model.config.output_router_logits = False
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    report = dict(settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  parameters=params, train_tokens=int(blocks.size),
                  tokens_seen=args.steps * args.batch_size * args.seq_len, train_s=round(train_s, 1),
                  total_s=round(time.perf_counter() - started, 1), test_ppl=ppl,
                  test_tokens=int(held.size), history=history)
    (args.out / "toy_train.json").write_text(json.dumps(report, indent=1))
    print(f"trained {args.steps} steps in {train_s / 60:.1f} min; test perplexity {ppl:.2f} "
          f"({held.size:,} tokens); saved {args.out}")


if __name__ == "__main__":
    as_command(main)
